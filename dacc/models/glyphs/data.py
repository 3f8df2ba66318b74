"""The glyphs model's data: ten symbols drawn with Pillow's bundled scalable font (no download)
at random sizes, stroke widths, rotations and sub-pixel offsets, rendered at 4x and box-filtered
to 16 x 16."""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from dacc.models.flow import splits
from dacc.models.glyphs import IMAGE

SYMBOLS = "AKXZ#@&%?+"
SUPER = 4  # rendered at 4x, then averaged: anti-aliased strokes thinner than a pixel


def render(symbol: str, size: int, angle: float, dx: float, dy: float, stroke: int) -> torch.Tensor:
    """One glyph, (IMAGE, IMAGE) in [0, 1]: `size` pixels tall, centred, then shifted and rotated."""
    canvas = Image.new("L", (IMAGE * SUPER, IMAGE * SUPER), 0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=size * SUPER)
    box = draw.textbbox((0, 0), symbol, font=font, stroke_width=stroke)
    x = (canvas.width - (box[2] - box[0])) / 2 - box[0] + dx * SUPER
    y = (canvas.height - (box[3] - box[1])) / 2 - box[1] + dy * SUPER
    draw.text((x, y), symbol, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    small = canvas.rotate(angle, resample=Image.BILINEAR).resize((IMAGE, IMAGE), Image.BOX)
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(IMAGE, IMAGE).float() / 255


def _draw(per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, symbol in enumerate(SYMBOLS):
        for _ in range(per_class):
            size = int(torch.randint(11, 16, (1,), generator=generator))
            angle = float(torch.empty(1).uniform_(-15, 15, generator=generator))
            dx, dy = (float(v) for v in torch.empty(2).uniform_(-1.5, 1.5, generator=generator))
            stroke = int(torch.randint(0, 3, (1,), generator=generator))
            images.append(render(symbol, size, angle, dx, dy, stroke))
            labels.append(label)
    return torch.stack(images) * 2 - 1, torch.tensor(labels)


def load_glyphs(seed: int = 0, per_class: int = 300, test_per_class: int = 60):
    """(train_images, train_labels, test_images, test_labels); images in [-1, 1], (N, 16, 16).
    The two splits are drawn from different generators, so no test glyph is a training glyph."""
    return splits(_draw, seed, per_class, test_per_class)

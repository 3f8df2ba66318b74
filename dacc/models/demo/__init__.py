"""The demo model: a small class-conditional rectified-flow FluxTransformer2DModel trained by
`train.py` on scikit-learn's handwritten digits (8x8, upsampled to 16x16), with its weights,
its sampler and a digit classifier for measuring conditional accuracy, all checked in.

Images are packed like Flux latents: 16x16x1 pixels -> 2x2 patches -> 64 tokens of 4 channels.
The class label plays the text prompt: a small `ClassEncoder` turns it into 4 "text" tokens and
a pooled vector; label 10 is the empty prompt used for classifier-free guidance.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from dacc.models.flow import ClassEncoder, TrainedModel

HERE = Path(__file__).parent

IMAGE = 16
PATCH = 2
GRID = IMAGE // PATCH  # 8x8 tokens
CHANNELS = PATCH * PATCH
TEXT_TOKENS = 4
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
JOINT_DIM = 64
POOLED_DIM = 64

TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=CHANNELS, num_layers=2, num_single_layers=4,
                          attention_head_dim=32, num_attention_heads=4, joint_attention_dim=JOINT_DIM,
                          pooled_projection_dim=POOLED_DIM, axes_dims_rope=(8, 12, 12))


def new_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def load_transformer() -> FluxTransformer2DModel:
    return DEMO.load_transformer()


def load_encoder() -> ClassEncoder:
    return DEMO.load_encoder()


def image_ids() -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(GRID, dtype=torch.float32), torch.arange(GRID, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(GRID * GRID, 3)


def text_ids() -> torch.Tensor:
    return torch.zeros(TEXT_TOKENS, 3)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 16, 16) pixels -> (B, 64, 4) tokens."""
    b = images.shape[0]
    x = images.view(b, GRID, PATCH, GRID, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(b, GRID * GRID, CHANNELS)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 64, 4) tokens -> (B, 16, 16) pixels."""
    b = tokens.shape[0]
    x = tokens.view(b, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(b, IMAGE, IMAGE)


def _inputs(x, prompt, pooled, sigma):
    """As diffusers' FluxPipeline calls its transformer (it scales the timestep itself)."""
    return dict(hidden_states=x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=sigma,
                img_ids=image_ids(), txt_ids=text_ids())


def _load_data(seed: int):
    from dacc.models.demo.data import load_digits_16
    return load_digits_16(seed)


DEMO = TrainedModel(name="demo", here=HERE, classes=NUM_CLASSES, image=IMAGE, train_steps=4000,
                    new_transformer=new_transformer,
                    new_encoder=lambda: ClassEncoder(NUM_CLASSES, TEXT_TOKENS, JOINT_DIM, POOLED_DIM),
                    pack=pack, unpack=unpack, inputs=_inputs, load_data=_load_data)

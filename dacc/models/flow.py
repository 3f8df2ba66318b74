"""What the trained models share: class-conditional rectified flow, trained and sampled on 2 CPU
cores. A `TrainedModel` says how one model packs its images and calls its transformer; training,
the Euler sampler with batched classifier-free guidance, and the classifier that measures
conditional accuracy are the same for every model.

Rectified flow: x_sigma = sigma * noise + (1 - sigma) * image, the transformer predicts the
velocity noise - image, sigma ~ logit-normal. Labels are dropped (replaced by the empty class)
10% of the time so classifier-free guidance works. The weights saved are an exponential moving
average, in fp16.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

LABEL_DROPOUT = 0.1


class ClassEncoder(torch.nn.Module):
    """A trained model's "text encoder": class label -> prompt tokens and pooled embedding; the
    label `classes` is the empty prompt used for classifier-free guidance."""

    def __init__(self, classes: int, tokens: int, dim: int, pooled_dim: int):
        super().__init__()
        self.shape = (tokens, dim)
        self.tokens = torch.nn.Embedding(classes + 1, tokens * dim)
        self.pooled = torch.nn.Embedding(classes + 1, pooled_dim)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens(labels).view(-1, *self.shape), self.pooled(labels)


@dataclass(frozen=True)
class TrainedModel:
    """One trained model: its files, sizes, and how its transformer is called.

    `inputs(x, prompt, pooled, sigma)` are the keyword arguments its diffusers pipeline would pass
    the transformer for the packed latent `x` at noise levels `sigma` (one per image)."""
    name: str
    here: Path
    classes: int
    image: int  # pixels per side; images are (N, image, image) in [-1, 1]
    new_transformer: Callable[[], torch.nn.Module]
    new_encoder: Callable[[], ClassEncoder]
    pack: Callable[[torch.Tensor], torch.Tensor]  # (N, image, image) -> the transformer's latent
    unpack: Callable[[torch.Tensor], torch.Tensor]
    inputs: Callable[..., dict]
    load_data: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    train_steps: int = 3000  # what its checked-in weights were trained for

    @property
    def null_class(self) -> int:
        return self.classes

    def weights(self, part: str) -> Path:
        return self.here / f"{part}.safetensors"

    def load_transformer(self) -> torch.nn.Module:
        return _loaded(self.new_transformer(), self.weights("transformer"))

    def load_encoder(self) -> ClassEncoder:
        return _loaded(self.new_encoder(), self.weights("class_encoder"))

    def load_classifier(self) -> "Classifier":
        return _loaded(Classifier(self.classes, self.image), self.weights("classifier"))

    def call(self, transformer, x, prompt, pooled, sigma) -> torch.Tensor:
        """The predicted velocity, in the layout of `x`."""
        return transformer(**self.inputs(x, prompt, pooled, sigma), return_dict=False)[0]

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """The initial latent of `n` images from `seed`."""
        shape = self.pack(torch.zeros(1, self.image, self.image)).shape[1:]
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _loaded(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    module.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return module.eval()


def flow_loss(m: TrainedModel, transformer, encoder, images, labels, generator) -> torch.Tensor:
    x = m.pack(images)
    noise = torch.randn(x.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(x.shape[0], generator=generator))
    s = sigma.view(-1, *[1] * (x.dim() - 1))
    noisy = s * noise + (1 - s) * x
    drop = torch.rand(labels.shape, generator=generator) < LABEL_DROPOUT
    prompt, pooled = encoder(torch.where(drop, torch.full_like(labels, m.null_class), labels))
    return F.mse_loss(m.call(transformer, noisy, prompt, pooled, sigma), noise - x)


def train(m: TrainedModel, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, ema_decay: float = 0.999,
          log_every: int = 100, log=print):
    """Returns (ema transformer, ema encoder, per-step losses)."""
    torch.manual_seed(seed)
    images, labels, _, _ = m.load_data(seed)
    transformer, encoder = m.new_transformer(), m.new_encoder()
    params = list(transformer.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema_t, ema_e = copy.deepcopy(transformer).eval(), copy.deepcopy(encoder).eval()
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.time()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        loss = flow_loss(m, transformer, encoder, images[idx], labels[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_t, transformer), (ema_e, encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            log(f"{m.name}: step {step + 1}/{steps}  loss {recent:.4f}  {time.time() - start:.0f}s")
    return ema_t, ema_e, losses


@dataclass
class Generation:
    images: torch.Tensor  # (B, image, image) in [0, 1]
    transformer_seconds: float


@torch.no_grad()
def generate(m: TrainedModel, transformer, encoder: ClassEncoder, labels: torch.Tensor, *, steps: int = 50,
             guidance: float = 4.0, seed: int = 0, progress: bool = False, desc: str = "sampling",
             on_step=None, device: str | torch.device | None = None) -> Generation:
    """Euler steps from sigma 1 to 0, the conditional and unconditional halves in one batch.
    `on_step(i, timestep)` is called before each transformer call (as a pipeline's
    `_current_timestep` would be set). `device`: where the transformer runs (its inputs are moved
    there, its output back; the sampler itself stays on the CPU)."""
    labels = labels.long()
    n = labels.shape[0]
    x = m.noise(n, seed)
    prompt, pooled = encoder(torch.cat([labels, torch.full_like(labels, m.null_class)]))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    spent = 0.0
    context = getattr(transformer, "cache_context", None) or (lambda name: contextlib.nullcontext())
    for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        sigma = sigmas[i]
        if on_step is not None:
            on_step(i, float(sigma) * 1000)
        start = time.perf_counter()
        with context("cond"):  # as diffusers pipelines call their transformer
            if device is None:
                v = m.call(transformer, torch.cat([x, x]), prompt, pooled, sigma.expand(2 * n).contiguous())
            else:
                kw = m.inputs(torch.cat([x, x]), prompt, pooled, sigma.expand(2 * n).contiguous())
                kw = {k: t.to(device) if isinstance(t, torch.Tensor) else t for k, t in kw.items()}
                v = transformer(**kw, return_dict=False)[0].to(x.device)
        spent += time.perf_counter() - start
        v_cond, v_uncond = v.chunk(2)
        x = x + (sigmas[i + 1] - sigma) * (v_uncond + guidance * (v_cond - v_uncond))
    return Generation(((m.unpack(x) + 1) / 2).clamp(0, 1), spent)


def cfg_inputs(m: TrainedModel, labels: torch.Tensor, sigma: float, seed: int) -> dict:
    """One batched-CFG call of the sampler (the conditional half, then the unconditional): a model
    file's example inputs."""
    n = labels.shape[0]
    prompt, pooled = m.load_encoder()(torch.cat([labels, torch.full_like(labels, m.null_class)]))
    x = m.noise(n, seed)
    return m.inputs(torch.cat([x, x]), prompt.detach(), pooled.detach(), torch.full((2 * n,), sigma))


def model_file(m: TrainedModel) -> tuple[Callable, ...]:
    """A trained model's model-file functions (build, example_inputs, more_example_inputs, sample),
    the same recipe for every trained model: example calls are batched-CFG calls of its sampler."""
    def build():
        return m.load_transformer()

    def example_inputs():
        return cfg_inputs(m, torch.tensor([3, 7]), 0.7, seed=0)

    def more_example_inputs():
        return [cfg_inputs(m, torch.arange(m.classes), 0.3, seed=1)]

    def model_sample(model, seed: int, steps: int | None = None) -> torch.Tensor:
        """One generation: one image of every class from `seed`, in [0, 1], in the artifact's
        number of steps (50 for a plain module)."""
        return sample(m, model, seed, steps)
    return build, example_inputs, more_example_inputs, model_sample


def splits(draw: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]], seed: int, per_class: int,
           test_per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_labels, test_images, test_labels) from `draw(per_class, generator)`; the
    two splits come from different generators, so no test image is a training one."""
    train = draw(per_class, torch.Generator().manual_seed(seed))
    test = draw(test_per_class, torch.Generator().manual_seed(seed + 10_000))
    return (*train, *test)


def sample(m: TrainedModel, model, seed: int, steps: int | None = None) -> torch.Tensor:
    """One generation: one image of every class from `seed`, (classes, image, image) in [0, 1]
    (a model file's `sample`, which calibration runs). `steps` defaults to the artifact's
    num_inference_steps (its gates are planned for that many), 50 for a plain module."""
    manifest = getattr(model, "manifest", None)
    steps = steps or (manifest.num_inference_steps if manifest is not None else 50)
    return generate(m, model, m.load_encoder(), torch.arange(m.classes), steps=steps, seed=seed).images


class Classifier(torch.nn.Module):
    """A small CNN that recognises a model's classes: the conditional accuracy of its samples."""

    def __init__(self, classes: int, image: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * (image // 4) ** 2, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, image, image) in [0, 1] -> logits (B, classes)."""
        x = images[:, None] * 2 - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def train_classifier(m: TrainedModel, seed: int = 0, epochs: int = 30) -> tuple[Classifier, float]:
    """Train on the model's training split (shifted by up to a pixel); returns (model, accuracy on
    the held-out split)."""
    torch.manual_seed(seed)
    images, labels, test_images, test_labels = m.load_data(seed)
    images, test_images = (images + 1) / 2, (test_images + 1) / 2
    model = Classifier(m.classes, m.image)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for k in range(0, len(order), 64):
            idx = order[k:k + 64]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            batch = torch.roll(images[idx], shifts=(dy, dx), dims=(1, 2))
            loss = F.cross_entropy(model(batch), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    return model, accuracy

"""Train the demo model (and its digit classifier) on 2 CPU cores.

    python -m dacc.models.demo.train            # full run: writes the checked-in weights
    python -m dacc.models.demo.train --steps 40 --out /tmp/demo   # a quick try

Rectified flow: x_sigma = sigma * noise + (1 - sigma) * image, the transformer predicts the
velocity noise - image, sigma ~ logit-normal. Labels are dropped (replaced by the empty class)
10% of the time so classifier-free guidance works. The weights saved are an exponential moving
average, in fp16.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dacc.models.demo import (CLASSIFIER_WEIGHTS, ENCODER_WEIGHTS, HERE, NULL_CLASS, TRANSFORMER_WEIGHTS,
                              ClassEncoder, image_ids, new_transformer, pack, text_ids)
from dacc.models.demo.classifier import train_classifier
from dacc.models.demo.data import load_digits_16

LABEL_DROPOUT = 0.1


def flow_loss(transformer, encoder, images, labels, generator) -> torch.Tensor:
    x = pack(images)
    noise = torch.randn(x.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(x.shape[0], generator=generator))
    noisy = sigma[:, None, None] * noise + (1 - sigma[:, None, None]) * x
    drop = torch.rand(labels.shape, generator=generator) < LABEL_DROPOUT
    prompt, pooled = encoder(torch.where(drop, torch.full_like(labels, NULL_CLASS), labels))
    v = transformer(hidden_states=noisy, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=sigma,
                    img_ids=image_ids(), txt_ids=text_ids(), return_dict=False)[0]
    return F.mse_loss(v, noise - x)


def train(steps: int = 4000, batch: int = 64, lr: float = 1e-3, seed: int = 0, ema_decay: float = 0.999,
          log_every: int = 100, log=print):
    """Returns (ema transformer, ema encoder, per-step losses)."""
    torch.manual_seed(seed)
    images, labels, _, _ = load_digits_16(seed)
    transformer, encoder = new_transformer(), ClassEncoder()
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
        loss = flow_loss(transformer, encoder, images[idx], labels[idx], gen)
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
            log(f"step {step + 1}/{steps}  loss {recent:.4f}  {time.time() - start:.0f}s")
    return ema_t, ema_e, losses


def _half(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().half().contiguous() for k, v in module.state_dict().items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE, help="directory for the weights")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    transformer, encoder, losses = train(args.steps, args.batch, args.lr, args.seed)
    flow_seconds = time.time() - start
    save_file(_half(transformer), str(args.out / TRANSFORMER_WEIGHTS.name))
    save_file(_half(encoder), str(args.out / ENCODER_WEIGHTS.name))
    classifier, test_accuracy = train_classifier(seed=args.seed)
    save_file(_half(classifier), str(args.out / CLASSIFIER_WEIGHTS.name))
    record = {"command": "python -m dacc.models.demo.train " + " ".join(argv or []), "steps": args.steps,
              "batch": args.batch, "lr": args.lr, "seed": args.seed, "torch": torch.__version__,
              "flow_train_seconds": round(flow_seconds, 1), "total_seconds": round(time.time() - start, 1),
              "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 4),
              "classifier_test_accuracy": round(test_accuracy, 4)}
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

"""Train the demo model (and its digit classifier) on 2 CPU cores: the recipe of
dacc/models/flow.py, run by dacc/models/train.py.

    python -m dacc.models.demo.train            # full run: writes the checked-in weights
    python -m dacc.models.demo.train --steps 40 --out /tmp/demo   # a quick try
"""
from __future__ import annotations

from dacc.models import flow
from dacc.models.demo import DEMO


def train(steps: int = DEMO.train_steps, batch: int = 64, lr: float = 1e-3, seed: int = 0, ema_decay: float = 0.999,
          log_every: int = 100, log=print):
    """Returns (ema transformer, ema encoder, per-step losses)."""
    return flow.train(DEMO, steps, batch, lr, seed, ema_decay, log_every, log)


def main(argv=None) -> None:
    from dacc.models.train import main as train_main
    train_main(["demo", *(argv or [])])


if __name__ == "__main__":
    main()

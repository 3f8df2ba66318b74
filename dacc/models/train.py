"""Train a trained model (and its classifier) on 2 CPU cores and write its checked-in weights.

    python -m dacc.models.train glyphs                     # full run: writes dacc/models/glyphs/
    python -m dacc.models.train patterns                   # writes dacc/models/patterns/
    python -m dacc.models.train demo                       # the demo model (dacc/models/demo/)
    python -m dacc.models.train glyphs --steps 40 --out /tmp/g   # a quick try

The recipe is dacc/models/flow.py's; each model's training record (command, seconds, final
loss, classifier accuracy) is written next to its weights as training.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dacc.models.flow import TrainedModel, train, train_classifier


def trained_models() -> dict[str, TrainedModel]:
    from dacc.models.demo import DEMO
    from dacc.models.glyphs import GLYPHS
    from dacc.models.patterns import PATTERNS
    return {"demo": DEMO, "glyphs": GLYPHS, "patterns": PATTERNS}


def _half(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().half().contiguous() for k, v in module.state_dict().items()}


def main(argv=None) -> None:
    models = trained_models()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(models))
    p.add_argument("--steps", type=int, default=None, help="default: the model's own (its checked-in record)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for the weights (default: the model's)")
    args = p.parse_args(argv)
    m = models[args.model]
    args.steps = args.steps or m.train_steps
    out = args.out or m.here
    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    transformer, encoder, losses = train(m, args.steps, args.batch, args.lr, args.seed)
    flow_seconds = time.time() - start
    save_file(_half(transformer), str(out / "transformer.safetensors"))
    save_file(_half(encoder), str(out / "class_encoder.safetensors"))
    classifier, accuracy = train_classifier(m, seed=args.seed)
    save_file(_half(classifier), str(out / "classifier.safetensors"))
    record = {"command": "python -m dacc.models.train " + " ".join(argv or [args.model]), "steps": args.steps,
              "batch": args.batch, "lr": args.lr, "seed": args.seed, "torch": torch.__version__,
              "flow_train_seconds": round(flow_seconds, 1), "total_seconds": round(time.time() - start, 1),
              "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 4),
              "classifier_test_accuracy": round(accuracy, 4)}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

"""`dacc demo` (what `make demo` runs): compile the bundled demo model, generate every class with
the eager model and with the artifact from the same seeds, and show both.

Writes demo_out/grid.png (eager and accelerated side by side, labelled) and prints a table:
transformer time, speedup, PSNR and SSIM against eager, conditional accuracy.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

import dacc
from dacc.compiler.compile import compile_model
from dacc.metrics import conditional_accuracy, psnr, ssim
from dacc.models.demo import load_encoder, load_transformer
from dacc.models.demo.classifier import load_classifier
from dacc.models.demo.sampler import Generation, generate
from dacc.schema.errors import DaccError
from dacc.schema.plan import parse_plan
from dacc.schema.plan_yaml import read_plan_data

DEMO_MODEL = Path(__file__).parent / "models" / "demo" / "model.py"
RECOMMENDED_PLAN = DEMO_MODEL.with_name("plan.yaml")
SCALE = 6


@dataclass
class DemoResult:
    eager: Generation
    compiled: Generation
    labels: torch.Tensor
    rows: list[dict]


def _panel(images: torch.Tensor, per_class: int, title: str) -> Image.Image:
    size = 16 * SCALE
    pad, top, left = 4, 22, 18
    panel = Image.new("L", (left + per_class * (size + pad), top + 10 * (size + pad)), 255)
    draw = ImageDraw.Draw(panel)
    draw.text((left, 4), title, fill=0)
    for i, img in enumerate(images):
        row, col = divmod(i, per_class)
        tile = Image.fromarray((img.numpy() * 255).round().astype("uint8")).resize((size, size), Image.NEAREST)
        panel.paste(tile, (left + col * (size + pad), top + row * (size + pad)))
        if col == 0:
            draw.text((4, top + row * (size + pad) + size // 2 - 5), str(row), fill=0)
    return panel


def write_grid(path: Path, result: DemoResult, per_class: int, accelerated_title: str) -> None:
    a = _panel(result.eager.images, per_class, "eager")
    b = _panel(result.compiled.images, per_class, accelerated_title)
    grid = Image.new("L", (a.width + b.width + 24, max(a.height, b.height)), 255)
    grid.paste(a, (0, 0))
    grid.paste(b, (a.width + 24, 0))
    grid.save(path)


def run_demo(out_dir: str | Path = "demo_out", plan: str | Path | None = None, per_class: int = 4,
             steps: int = 50, seed: int = 0, progress: bool = True, log=print, nproc: int = 1) -> DemoResult:
    """`nproc` > 1: the artifact runs on that many local processes (gloo), with the plan's parallel
    degrees, or, when it gives none, the split parallel.auto chooses on this machine's measured
    profile; the eager model runs in this process with all its threads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact = out / "demo.dacc"
    plan_path = Path(plan or RECOMMENDED_PLAN)
    data, _ = read_plan_data(plan_path)  # the safe reader: a user's plan file is untrusted input
    if not isinstance(data, (dict, type(None))):
        parse_plan(data, str(plan_path))  # raises the plan reader's error for a non-mapping plan
    resolved = {**(data or {}), "num_inference_steps": steps}  # the plan counts steps per generation
    if nproc > 1 and "parallel" not in resolved:
        resolved["parallel"] = {"auto": {"world_size": nproc, "device": str(_this_machine(out, log))}}
    world = parse_plan(resolved, str(plan_path)).parallel.world_size
    if world != nproc:  # before minutes of compiling
        raise DaccError(f"the plan's parallel degrees multiply to {world} ranks, and --nproc is {nproc}", str(plan_path),
                        f"run with --nproc {world}, or change the plan's parallel section")
    (out / "plan.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    manifest = compile_model(DEMO_MODEL, out / "plan.yaml", artifact, force=True, log=lambda m: log(f"  {m}"))
    eager, encoder = load_transformer(), load_encoder()
    labels = torch.arange(10).repeat_interleave(per_class)
    generate(eager, encoder, labels[:2], steps=2, seed=seed)  # warm up (first calls allocate and fill caches)
    ref = generate(eager, encoder, labels, steps=steps, seed=seed, progress=progress, desc="eager")
    if nproc == 1:
        compiled = dacc.load(artifact)
        generate(compiled, encoder, labels[:2], steps=2, seed=seed)
        compiled.reset()
        acc = generate(compiled, encoder, labels, steps=steps, seed=seed, progress=progress, desc="dacc")
    else:
        acc = _generate_on_ranks(artifact, nproc, labels, steps, seed, out)
    classifier = load_classifier()
    rows = [dict(name="eager", seconds=ref.transformer_seconds, speedup=1.0, psnr=float("inf"), ssim=1.0,
                 accuracy=conditional_accuracy(ref.images, labels, classifier)),
            dict(name="dacc" if nproc == 1 else f"dacc x{nproc}", seconds=acc.transformer_seconds, speedup=ref.transformer_seconds / acc.transformer_seconds,
                 psnr=psnr(acc.images, ref.images), ssim=ssim(acc.images, ref.images),
                 accuracy=conditional_accuracy(acc.images, labels, classifier))]
    result = DemoResult(ref, acc, labels, rows)
    title = f"dacc ({_plan_label((artifact / 'plan.yaml').read_text(), manifest.parallel)})"
    write_grid(out / "grid.png", result, per_class, title)
    return result


def _this_machine(out: Path, log) -> Path:
    from dacc.cost.devices import save_profile
    from dacc.cost.measure import measure_device

    log("  measuring this machine for parallel.auto (dacc profile-device)")
    return save_profile(measure_device("this-machine", log=lambda m: log(f"    {m}")), out / "device.yaml")


def _generate_on_ranks(artifact: Path, nproc: int, labels: torch.Tensor, steps: int, seed: int,
                       out: Path) -> Generation:
    from safetensors.torch import load_file

    from dacc.runtime.launch import run_local

    run_local(_demo_rank, nproc, str(artifact), labels, steps, seed, str(out / "ranks"))
    got = load_file(out / "ranks" / "images.safetensors")
    return Generation(got["images"], float(got["seconds"]))


def _demo_rank(rank: int, world: int, artifact: str, labels: torch.Tensor, steps: int, seed: int, out: str) -> None:
    """One rank of `dacc demo --nproc`: the same generation on every rank; rank 0 keeps it."""
    import os

    from safetensors.torch import save_file

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share this machine's cores
    compiled, encoder = dacc.load(artifact), load_encoder()
    generate(compiled, encoder, labels[:2], steps=2, seed=seed)
    compiled.reset()
    gen = generate(compiled, encoder, labels, steps=steps, seed=seed, progress=rank == 0, desc=f"dacc x{world}")
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({"images": gen.images.contiguous(), "seconds": torch.tensor(gen.transformer_seconds)},
                  f"{out}/images.safetensors")


def _plan_label(plan_yaml: str, parallel) -> str:
    cache = yaml.safe_load(plan_yaml)["cache"]
    label = "empty plan" if cache["strategy"] == "none" else f"{cache['strategy']}, cache_ratio {cache['cache_ratio']}"
    degrees = [f"{k} {getattr(parallel, k)}" for k in ("fsdp", "cfg", "ulysses", "ring") if getattr(parallel, k) > 1]
    return label + (f"; {' x '.join(degrees)} ranks" if degrees else "")


def format_table(rows: list[dict]) -> str:
    lines = [f"{'':8} {'transformer s':>13} {'speedup':>8} {'PSNR dB':>8} {'SSIM':>7} {'cond. acc':>10}"]
    for r in rows:
        lines.append(f"{r['name']:8} {r['seconds']:13.2f} {r['speedup']:7.2f}x {r['psnr']:8.2f} {r['ssim']:7.4f} "
                     f"{100 * r['accuracy']:9.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dacc.cli import main as cli_main
    return cli_main(["demo", *(argv or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

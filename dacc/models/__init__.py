"""Per-family example model files (tiny configs, random weights) and the demo model.

Each module here follows the model-file contract of `dacc compile` (see README.md 'Model files'),
so `dacc compile dacc/models/flux.py` works as it is. This is the only place for model-specific
knowledge.
"""
from __future__ import annotations

from pathlib import Path

FAMILIES = ("flux", "sd3", "pixart", "dit", "wan")
# Families whose graphs are not kept as per-pass goldens (tests/compiler/test_families.py covers
# FAMILIES); tests/compiler/test_more_families.py checks them against eager and under cache plans.
MORE_FAMILIES = ("hunyuan_dit", "stable_audio", "mochi", "chroma", "lumina2", "cogview3plus")
DECODERS = ("vae",)  # what runs after the transformer: compiled on its own (parallel.vae_patch)


def model_file(family: str) -> Path:
    known = FAMILIES + MORE_FAMILIES + DECODERS
    if family not in known:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(known)}")
    return Path(__file__).with_name(f"{family}.py")

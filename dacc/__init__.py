"""dacc: an ahead-of-time compiler that makes Diffusion Transformers generate faster."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path):
    """Load a compiled artifact as a drop-in replacement for the original transformer."""
    from dacc.runtime.module import load as _load

    return _load(path)


__all__ = ["load", "__version__"]

"""dacc: an ahead-of-time compiler that makes Diffusion Transformers generate faster."""
from __future__ import annotations

__version__ = "0.1.0"

import dacc.kernels.ops  # noqa: E402,F401  registers the dacc:: operators, so saved programs that use them load
import dacc.kernels.collectives  # noqa: E402,F401  the communication operators of parallel plans
import dacc.kernels.ring  # noqa: E402,F401  ring attention
import dacc.kernels.patches  # noqa: E402,F401  halo exchange and GroupNorm over row bands (vae_patch)


def load(path, trusted_keys=None, *, lowered="use", allow_native_code=False, cuda_graphs=False):
    """Load a compiled artifact as a drop-in replacement for the original transformer.

    `trusted_keys`: public keys (hex, 32 raw bytes, or `.pub` files from `dacc keygen`); when
    given, an artifact that is unsigned or signed by another key is refused before it is read.
    An artifact compiled with `lower:` carries packages of native code, loaded only when the
    signature verified or with `allow_native_code=True`; `lowered="fallback"` runs the unlowered
    segments (with a warning) where the packages cannot be used, `lowered="off"` never loads them.
    `cuda_graphs=True`: once the weights are on a CUDA device, each step's pieces are captured as
    CUDA graphs per input shape and replayed (launch-bound models gain most); no effect on CPU."""
    from dacc.runtime.module import load as _load

    return _load(path, trusted_keys, lowered=lowered, allow_native_code=allow_native_code, cuda_graphs=cuda_graphs)


__all__ = ["load", "__version__"]

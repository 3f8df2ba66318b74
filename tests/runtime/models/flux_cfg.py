"""The Flux test family with CFG batches (even) in every example, for parallel.cfg, and a
sample() (a batched-CFG Euler loop) so that a parallel plan's cache gates can be calibrated."""
import torch

from dacc.models.flux import _inputs, build  # noqa: F401  (build is the model file's entry point)


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(4, 6, 10, seed=2)]


@torch.no_grad()
def sample(model, seed: int, steps: int | None = None) -> torch.Tensor:
    """One generation from `seed`'s noise and text, guidance 4, in the artifact's number of steps."""
    manifest = getattr(model, "manifest", None)
    steps = steps or (manifest.num_inference_steps if manifest is not None else 6)
    call = _inputs(2, 8, 8, seed=1000 + seed)
    call["encoder_hidden_states"][1:] = 0  # the unconditional half: empty text
    x = call["hidden_states"][:1]
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        out = model(**{**call, "hidden_states": torch.cat([x, x]), "timestep": sigmas[i].expand(2).contiguous()})
        cond, uncond = (out.sample if hasattr(out, "sample") else out[0]).chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + 4.0 * (cond - uncond))
    return x

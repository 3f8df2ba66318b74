"""DiT (DiTTransformer2DModel): class-conditional, AdaLN-zero blocks that embed timestep and class
inside every block. Its patch embedding fixes the latent size at trace time, so each resolution is
its own program. Tiny config, random weights."""
import torch
from diffusers import DiTTransformer2DModel


def build():
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)


def _inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                class_labels=torch.randint(0, 10, (batch,), generator=g))


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(3, 12, 16, seed=2)]

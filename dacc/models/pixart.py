"""PixArt (PixArtTransformer2DModel): self-attention plus cross-attention to text, AdaLN-single.
Its patch embedding fixes the latent size at trace time, so each resolution is its own program.
Tiny config, random weights."""
import torch
from diffusers import PixArtTransformer2DModel


def build():
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                    caption_channels=24, norm_num_groups=1)


def _inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 24, generator=g),
                timestep=torch.rand(batch, generator=g) * 1000,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(3, 12, 16, seed=2)]

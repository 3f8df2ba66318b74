"""Wan (WanTransformer3DModel): video DiT with 3-D rotary embeddings, self- and cross-attention.
Tiny config, random weights."""
import torch
from diffusers import WanTransformer3DModel


def build():
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=64)


def _inputs(batch, frames, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
                timestep=torch.rand(batch, generator=g) * 1000,
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=g))


def example_inputs():
    return _inputs(2, 3, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(3, 2, 12, 16, seed=2)]

"""Flux (FluxTransformer2DModel): double-stream blocks then single-stream blocks, joint attention
over text + image tokens, rotary position embeddings. Tiny config, random weights."""
import torch
from diffusers import FluxTransformer2DModel

TEXT_TOKENS = 8


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def _inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = height * width
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(),
                                     indexing="ij"), -1).reshape(tokens, 3).float()
    return dict(hidden_states=torch.randn(batch, tokens, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 32, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g),
                timestep=torch.rand(batch, generator=g),
                img_ids=ids, txt_ids=torch.zeros(TEXT_TOKENS, 3))


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(3, 6, 10, seed=2)]

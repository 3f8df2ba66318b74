"""A larger Flux-shaped transformer for the quantization speed benchmark (a model file for
`dacc compile`): hidden 1024 (8 heads x 128), 2 double + 4 single blocks, 1024 image tokens
(32 x 32) + 128 text tokens, batch 2 (a CFG pair), random weights (132 M parameters)."""
import torch
from diffusers import FluxTransformer2DModel

TEXT_TOKENS, SIDE = 128, 32


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                  attention_head_dim=128, num_attention_heads=8, joint_attention_dim=512,
                                  pooled_projection_dim=256, axes_dims_rope=(16, 56, 56)).eval()


def _inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = height * width
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(),
                                     indexing="ij"), -1).reshape(tokens, 3).float()
    return dict(hidden_states=torch.randn(batch, tokens, 64, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 512, generator=g),
                pooled_projections=torch.randn(batch, 256, generator=g),
                timestep=torch.rand(batch, generator=g),
                img_ids=ids, txt_ids=torch.zeros(TEXT_TOKENS, 3))


def example_inputs():
    return _inputs(2, SIDE, SIDE, seed=1)


def more_example_inputs():
    return []


def bench_inputs(seed):
    return _inputs(2, SIDE, SIDE, seed)  # batch 2: a CFG pair

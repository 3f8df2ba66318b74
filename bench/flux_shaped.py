"""A FLUX.1-shaped transformer for the GPU lowering benchmark (a model file for `dacc compile`):
hidden 3072 (24 heads x 128), 6 double + 12 single blocks, joint_attention_dim 4096, guidance
embedding, bf16, random weights (3.8 B parameters); batch 1. The example call is small (32 x 32
image tokens, 128 text tokens): the token counts are dynamic, and the benchmark runs 4096 image +
512 text tokens (1024 x 1024) on the same packages.

DACC_FLUX_SHAPE=small (environment) shrinks it to 2 heads x 64, 1 + 1 blocks, fp32, so the
benchmark script itself can be checked on a CPU."""
import os

import torch
from diffusers import FluxTransformer2DModel

SMALL = os.environ.get("DACC_FLUX_SHAPE") == "small"
DOUBLE, SINGLE, HEADS, HEAD_DIM, JOINT = (1, 1, 2, 64, 256) if SMALL else (6, 12, 24, 128, 4096)
DTYPE = torch.float32 if SMALL else torch.bfloat16
ROPE = (8, 28, 28) if SMALL else (16, 56, 56)


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=DOUBLE, num_single_layers=SINGLE,
                                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=JOINT,
                                  pooled_projection_dim=768, guidance_embeds=True,
                                  axes_dims_rope=ROPE).to(DTYPE).eval()


def inputs(height: int, width: int, text: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = height * width
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(),
                                     indexing="ij"), -1).reshape(tokens, 3)
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g).to(DTYPE),
                encoder_hidden_states=torch.randn(1, text, JOINT, generator=g).to(DTYPE),
                pooled_projections=torch.randn(1, 768, generator=g).to(DTYPE),
                timestep=torch.rand(1, generator=g).to(DTYPE), img_ids=ids.to(DTYPE),
                txt_ids=torch.zeros(text, 3).to(DTYPE), guidance=torch.full((1,), 3.5).to(DTYPE))


def example_inputs():
    return inputs(32, 32, 128, seed=1)


def more_example_inputs():
    return [inputs(16, 16, 64, seed=2)]

"""FLUX.1-dev's widths with one block of each kind (a model file for `dacc compile`): hidden 3072
(24 heads x 128), joint_attention_dim 4096, guidance embedding, bf16, random weights. The
predictions in bench/predict_flux_dev.py count the double block 19 times and the single block 38
times, as FLUX.1-dev has them; the example sizes are small, the predictions are evaluated at
1024x1024 (4096 image + 512 text tokens)."""
import torch
from diffusers import FluxTransformer2DModel

DOUBLE, SINGLE = 19, 38  # FLUX.1-dev's block counts


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True,
                                  axes_dims_rope=(16, 56, 56)).to(torch.bfloat16).eval()


def _inputs(height, width, text, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = height * width
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(),
                                     indexing="ij"), -1).reshape(tokens, 3)
    bf = torch.bfloat16
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g).to(bf),
                encoder_hidden_states=torch.randn(1, text, 4096, generator=g).to(bf),
                pooled_projections=torch.randn(1, 768, generator=g).to(bf),
                timestep=torch.rand(1, generator=g).to(bf), img_ids=ids.to(bf), txt_ids=torch.zeros(text, 3).to(bf),
                guidance=torch.full((1,), 3.5).to(bf))


def example_inputs():
    return _inputs(8, 8, 16, seed=1)


def more_example_inputs():
    return [_inputs(8, 16, 32, seed=2)]  # token counts that split 8 ways, as the examples must

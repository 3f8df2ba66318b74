"""SD3 (SD3Transformer2DModel): MMDiT joint blocks over image + text streams; the last block
keeps only the image stream. Tiny config, random weights."""
import torch
from diffusers import SD3Transformer2DModel


def build():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                                 pos_embed_max_size=32)


def _inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g),
                timestep=torch.rand(batch, generator=g) * 1000)


def example_inputs():
    return _inputs(2, 16, 16, seed=1)


def more_example_inputs():
    return [_inputs(3, 12, 20, seed=2)]

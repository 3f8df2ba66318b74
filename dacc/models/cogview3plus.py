"""CogView3Plus (CogView3PlusTransformer2DModel): MMDiT blocks over image + text streams with
SDXL-style size/crop micro-conditioning; its patch embedding adds a cropped 2-D positional
table up to `pos_embed_max_size`. Tiny config, random weights."""
import torch
from diffusers import CogView3PlusTransformer2DModel


def build():
    torch.manual_seed(0)
    return CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                          num_attention_heads=2, out_channels=4, text_embed_dim=32,
                                          time_embed_dim=16, condition_dim=8, pos_embed_max_size=16,
                                          sample_size=8)


def _inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([[height * 8.0, width * 8.0]]).repeat(batch, 1)
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                original_size=size, target_size=size.clone(), crop_coords=torch.zeros(batch, 2))


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(3, 12, 16, seed=2)]

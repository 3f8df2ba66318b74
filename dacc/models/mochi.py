"""Mochi (MochiTransformer3DModel): asymmetric video DiT, separate image and text streams with
joint attention. Its attention processor drops masked prompt tokens with `torch.nonzero`, one
batch item at a time, so the traced graph has data-dependent (unbacked) sizes and the batch is
static, and its rotary grid fixes height and width (another resolution gets a program of its own).
Tiny config, random weights."""
import torch
from diffusers import MochiTransformer3DModel

TEXT_TOKENS = 8


def build():
    torch.manual_seed(0)
    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                   pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                   max_sequence_length=TEXT_TOKENS)


def _inputs(batch, frames, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)
    mask[:, TEXT_TOKENS - 2:] = False  # padded prompt tokens, as a tokenizer leaves them
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 32, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                encoder_attention_mask=mask)


def example_inputs():
    return _inputs(2, 2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(2, 3, 8, 8, seed=2)]  # frames are dynamic; height and width are fixed by its rotary grid

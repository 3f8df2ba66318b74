"""Stable Audio (StableAudioDiTModel): a 1-D audio DiT. A global (duration + timestep) token is
prepended to the audio tokens, so the rotary table the pipeline passes in has `tokens + 1` rows:
a size derived from another input's size, which the frontend keeps static under the default
Dim.AUTO, and with it the audio length (each length is a program of its own: list the lengths
you generate in more_example_inputs()). Grouped-query self-attention, cross-attention to text.
Tiny config, random weights."""
import torch
from diffusers import StableAudioDiTModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed

HEAD_DIM = 16


def build():
    torch.manual_seed(0)
    return StableAudioDiTModel(sample_size=16, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
                               num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4,
                               cross_attention_dim=32, time_proj_dim=16, global_states_input_dim=16,
                               cross_attention_input_dim=24)


def _inputs(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    cos, sin = get_1d_rotary_pos_embed(HEAD_DIM // 2, length + 1, use_real=True, repeat_interleave_real=False)
    return dict(hidden_states=torch.randn(batch, 4, length, generator=g),
                timestep=torch.rand(batch, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=g),
                global_hidden_states=torch.randn(batch, 1, 16, generator=g),
                rotary_embedding=(cos, sin))


def example_inputs():
    return _inputs(2, 16, seed=1)


def more_example_inputs():
    return [_inputs(3, 16, seed=2)]  # batch stays dynamic: the same program serves it

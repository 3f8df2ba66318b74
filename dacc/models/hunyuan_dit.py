"""HunyuanDiT (HunyuanDiT2DModel): DiT blocks with self-attention, cross-attention to two text
encoders (CLIP-like and T5, concatenated) and U-ViT long skips: the first half of the blocks
feeds its outputs to the mirrored blocks of the second half (such an output is still the stream
into the next block; a cached range reads the skip like any other input). Its text lengths are
fixed by the config (`text_len + text_len_t5` learned padding rows), so those input dims are
static: the frontend finds that by itself under the default Dim.AUTO. Tiny config, random weights.

Built without the style/image-size conditioning (like HunyuanDiT v1.2), so every input is a plain
tensor whose values may be redrawn freely. The rotary table is an input, as in the pipeline."""
import torch
from diffusers import HunyuanDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed

TEXT_LEN, TEXT_LEN_T5, HEAD_DIM, PATCH = 6, 8, 16, 2


def build():
    torch.manual_seed(0)
    return HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, patch_size=PATCH,
                             sample_size=8, hidden_size=32, num_layers=4, cross_attention_dim=32,
                             cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=TEXT_LEN,
                             text_len_t5=TEXT_LEN_T5, use_style_cond_and_image_meta_size=False)


def _inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    grid = (height // PATCH, width // PATCH)
    cos, sin = get_2d_rotary_pos_embed(HEAD_DIM, ((0, 0), grid), grid, output_type="pt")
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                timestep=torch.rand(batch, generator=g) * 1000,
                encoder_hidden_states=torch.randn(batch, TEXT_LEN, 32, generator=g),
                text_embedding_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                encoder_hidden_states_t5=torch.randn(batch, TEXT_LEN_T5, 32, generator=g),
                text_embedding_mask_t5=torch.ones(batch, TEXT_LEN_T5, dtype=torch.long),
                image_rotary_emb=(cos, sin))


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(3, 12, 16, seed=2)]

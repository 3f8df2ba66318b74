"""Chroma (ChromaTransformer2DModel): Flux's layout (double-stream blocks, text + image concatenated,
single-stream blocks) with the per-block modulation taken out of the blocks: one approximator
network computes every block's shift/scale/gate once, and each block's slice of it is cut between
the blocks. The model itself concatenates text and image between the double and single blocks
(diffusers' Flux does it inside each single block), so a cache range across that point has no
stream entering it of the joint stream's shape: the compiler replays the concatenation on the
streams entering the range (a `cache_base` segment) to have one. Tiny config, random weights."""
import torch
from diffusers import ChromaTransformer2DModel

TEXT_TOKENS = 8


def build():
    torch.manual_seed(0)
    return ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                    approximator_hidden_dim=32, approximator_layers=1)


def _inputs(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = height * width
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(),
                                     indexing="ij"), -1).reshape(tokens, 3).float()
    return dict(hidden_states=torch.randn(batch, tokens, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 32, generator=g),
                timestep=torch.rand(batch, generator=g),
                img_ids=ids, txt_ids=torch.zeros(TEXT_TOKENS, 3))


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(2, 6, 10, seed=2)]

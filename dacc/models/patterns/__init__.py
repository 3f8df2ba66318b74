"""The patterns model: a class-conditional rectified-flow PixArtTransformer2DModel (self-attention,
cross-attention to the prompt tokens, AdaLN-single on the timestep) trained by
`python -m dacc.models.train patterns` on ten families of procedural patterns
(dacc/models/patterns/data.py), with its weights and a classifier for the conditional accuracy of
its samples, all checked in.

It is the third trained model: the cross-attention family (PixArt's blocks read the prompt only
through cross-attention; there is no pooled vector), on textures rather than symbols. Cache
constants are tuned on one trained model and reported on the others.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import PixArtTransformer2DModel

from dacc.models.flow import ClassEncoder, TrainedModel

IMAGE = 16
TEXT_TOKENS = 4
CAPTION_DIM = 64

TRANSFORMER_CONFIG = dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
                          cross_attention_dim=128, sample_size=IMAGE, patch_size=2, caption_channels=CAPTION_DIM,
                          norm_num_groups=1)


def _inputs(x, prompt, pooled, sigma):
    """As diffusers' PixArtAlphaPipeline calls its transformer (timesteps 0-1000; no extra
    resolution conditions at this size; PixArt has no pooled prompt)."""
    return dict(hidden_states=x, encoder_hidden_states=prompt, timestep=sigma * 1000,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _load_data(seed: int):
    from dacc.models.patterns.data import load_patterns
    return load_patterns(seed)


PATTERNS = TrainedModel(
    name="patterns", here=Path(__file__).parent, classes=10, image=IMAGE,
    new_transformer=lambda: PixArtTransformer2DModel(**TRANSFORMER_CONFIG),
    new_encoder=lambda: ClassEncoder(10, TEXT_TOKENS, CAPTION_DIM, 1),
    pack=lambda images: images[:, None], unpack=lambda x: x[:, 0], inputs=_inputs, load_data=_load_data,
    train_steps=2000)

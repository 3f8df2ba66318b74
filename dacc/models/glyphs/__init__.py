"""The glyphs model: a class-conditional rectified-flow SD3Transformer2DModel (six joint blocks,
the last `context_pre_only`) trained by `python -m dacc.models.train glyphs` on ten symbols
rendered with Pillow's bundled font (dacc/models/glyphs/data.py), with its weights and a classifier
for the conditional accuracy of its samples, all checked in.

It is the second trained model: another architecture (SD3's joint blocks, a latent the model
patchifies itself, timesteps on SD3's 0-1000 scale) on other data than the demo's digits. Cache
constants are tuned on one trained model and reported on the others.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import SD3Transformer2DModel

from dacc.models.flow import ClassEncoder, TrainedModel

IMAGE = 16
TEXT_TOKENS = 4
JOINT_DIM = 64
POOLED_DIM = 64

TRANSFORMER_CONFIG = dict(sample_size=IMAGE, patch_size=2, in_channels=1, out_channels=1, num_layers=6,
                          attention_head_dim=32, num_attention_heads=4, joint_attention_dim=JOINT_DIM,
                          caption_projection_dim=128, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=IMAGE)


def _inputs(x, prompt, pooled, sigma):
    """As diffusers' StableDiffusion3Pipeline calls its transformer (timesteps 0-1000)."""
    return dict(hidden_states=x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=sigma * 1000)


def _load_data(seed: int):
    from dacc.models.glyphs.data import load_glyphs
    return load_glyphs(seed)


GLYPHS = TrainedModel(
    name="glyphs", here=Path(__file__).parent, classes=10, image=IMAGE,
    new_transformer=lambda: SD3Transformer2DModel(**TRANSFORMER_CONFIG),
    new_encoder=lambda: ClassEncoder(10, TEXT_TOKENS, JOINT_DIM, POOLED_DIM),
    pack=lambda images: images[:, None], unpack=lambda x: x[:, 0], inputs=_inputs, load_data=_load_data,
    train_steps=2400)

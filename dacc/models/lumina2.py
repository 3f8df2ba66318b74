"""Lumina2 (Lumina2Transformer2DModel): a context refiner (text) and a noise refiner (image) run
before the joint blocks. diffusers packs each batch item's text and image tokens by the caption
length read from the attention mask (`mask.sum(dim=1).tolist()`), a size taken from tensor
values that torch.export cannot trace: compiling the class as it is fails with a DaccError naming
that line.

`build()` therefore returns `Lumina2MaskLayout`: the same class and weights, whose forward lays
every item out as [all caption tokens | image tokens] and masks padded caption tokens in
attention instead of dropping them. Attention over the same keys with the same rotary positions
gives the same image tokens, so it matches the original on right-padded prompts (what tokenizers
produce; the original also assumes them). Tiny config, random weights."""
import torch
from diffusers import Lumina2Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

TEXT_TOKENS = 6
CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
              num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
              axes_lens=(32, 32, 32), cap_feat_dim=24)


class Lumina2MaskLayout(Lumina2Transformer2DModel):
    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, attention_kwargs=None,
                return_dict=True):
        batch, channels, height, width = hidden_states.shape
        p, caption = self.config.patch_size, encoder_hidden_states.shape[1]
        rows, cols = height // p, width // p
        temb, encoder_hidden_states = self.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
        mask = encoder_attention_mask.bool()
        # positions as Lumina2RotaryPosEmbed assigns them: caption token j -> (j, 0, 0), image patch
        # (r, c) -> (caption length, r, c); the caption length stays a tensor
        j = torch.arange(caption, device=mask.device).expand(batch, caption)
        cap_ids = torch.stack([j, torch.zeros_like(j), torch.zeros_like(j)], -1)
        r = torch.arange(rows, device=mask.device).repeat_interleave(cols)
        c = torch.arange(cols, device=mask.device).repeat(rows)
        img_ids = torch.stack([mask.sum(1, keepdim=True).expand(batch, rows * cols),
                               r.expand(batch, -1), c.expand(batch, -1)], -1)
        cap_freqs = self.rope_embedder._get_freqs_cis(cap_ids)
        img_freqs = self.rope_embedder._get_freqs_cis(img_ids)
        patches = (hidden_states.view(batch, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
                   .flatten(3).flatten(1, 2))
        hidden_states = self.x_embedder(patches)
        for layer in self.context_refiner:  # padded caption tokens get zero rotary tables, as in diffusers
            encoder_hidden_states = layer(encoder_hidden_states, encoder_attention_mask,
                                          cap_freqs * mask[..., None])
        for layer in self.noise_refiner:
            hidden_states = layer(hidden_states, None, img_freqs, temb)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], 1)
        joint_mask = torch.cat([mask, mask.new_ones(batch, rows * cols)], 1)
        joint_freqs = torch.cat([cap_freqs, img_freqs], 1)
        for layer in self.layers:
            hidden_states = layer(hidden_states, joint_mask, joint_freqs, temb)
        hidden_states = self.norm_out(hidden_states, temb)[:, caption:]
        output = (hidden_states.view(batch, rows, cols, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
                  .flatten(4, 5).flatten(2, 3))
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def build():
    torch.manual_seed(0)
    return Lumina2MaskLayout(**CONFIG)


def build_original():
    """The diffusers class with the same weights: the reference, and what cannot be traced."""
    torch.manual_seed(0)
    return Lumina2Transformer2DModel(**CONFIG)


def caption_mask(lengths, tokens=TEXT_TOKENS):
    """Right-padded prompt masks (valid tokens first), as a tokenizer returns them."""
    return (torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]).long()


def _inputs(batch, height, width, seed, lengths=None):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                timestep=torch.rand(batch, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 24, generator=g),
                encoder_attention_mask=caption_mask(lengths or [TEXT_TOKENS - k % 3 for k in range(batch)]))


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(3, 12, 16, seed=2)]

"""A VAE decoder (diffusers AutoencoderKL), the model file for `parallel.vae_patch`: the module
is what a pipeline calls after denoising, `vae.decode(latents).sample`. Mid-block attention,
GroupNorm everywhere, two nearest-upsampling stages. Tiny config, random weights."""
import torch
from diffusers import AutoencoderKL


class Decode(torch.nn.Module):
    """latents [B, 4, H, W] -> image [B, 3, 4H, 4W]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def build():
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 16, 16), sample_size=32)
    return Decode(vae).eval()


def _latents(batch, height, width, seed):
    return {"latents": torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))}


def example_inputs():
    return _latents(2, 8, 8, seed=1)


def more_example_inputs():
    return [_latents(3, 12, 16, seed=2)]

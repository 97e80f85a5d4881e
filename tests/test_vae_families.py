"""The latent helpers on every VAE family the text-to-image script trains with: `AutoencoderKL` (SD3, PixArt, Flux:
a posterior, scaling and shift factors) and Sana's `AutoencoderDC` (deterministic, no shift_factor, its own
compression ratio)."""

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL

from diffusers_selftrans import training as T


def tiny_dc():
    torch.manual_seed(0)
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                         decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16, 16),
                         decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1),
                         decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
                         decoder_qkv_multiscales=((), (), ()), scaling_factor=0.5).eval()


def tiny_kl():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         scaling_factor=0.5, shift_factor=0.25).eval()


def test_sana_autoencoder_dc_encodes_deterministically_with_its_own_ratio():
    vae = tiny_dc()
    assert "shift_factor" not in vae.config  # what crashed: vae.config.shift_factor
    assert T.vae_downsample_factor(vae) == 4 and T.vae_latent_size(vae, 16) == 4
    with pytest.raises(ValueError, match="not divisible by the VAE downsampling factor 4"):
        T.vae_latent_size(vae, 18)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    encoder = T.LatentEncoder(vae)
    x0 = encoder({"pixel_values": pixels}, "cpu")
    with torch.no_grad():
        expected = vae.encode(pixels).latent * 0.5
    assert x0.shape == (2, 4, 4, 4)
    torch.testing.assert_close(x0, expected)
    torch.testing.assert_close(encoder({"pixel_values": pixels}, "cpu"), x0)  # no posterior noise
    with torch.no_grad():
        torch.testing.assert_close(encoder.decode(x0), vae.decode(expected / 0.5).sample)
    from diffusers_selftrans.provenance import vae_encoder_identity

    assert vae_encoder_identity(vae)["shift_factor"] == 0.0


def test_autoencoder_kl_samples_its_posterior_and_applies_shift_and_scale():
    vae = tiny_kl()
    assert T.vae_downsample_factor(vae) == 2 and T.vae_latent_size(vae, 16) == 8
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    x0 = T.LatentEncoder(vae)({"pixel_values": pixels}, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.sample()
    torch.testing.assert_close(x0, (z - 0.25) * 0.5)

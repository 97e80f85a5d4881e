"""Tiny random diffusers transformers (2-4 blocks, hidden 16-32) and matching inputs, shared by the T2I tests."""

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
)

LATENT_CHANNELS = 4
SAMPLE_SIZE = 8
TEXT_TOKENS = 5
TEXT_DIM = 12
POOLED_DIM = 8
NUM_CLASSES = 10


def build(family, seed=0, num_layers=3):
    """A tiny random transformer of `family` in eval mode (Flux: 2 double + `num_layers - 2` single blocks)."""
    torch.manual_seed(seed)
    if family == "sd3":
        model = SD3Transformer2DModel(
            sample_size=SAMPLE_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=num_layers,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=32,
            pooled_projection_dim=POOLED_DIM, out_channels=LATENT_CHANNELS, pos_embed_max_size=SAMPLE_SIZE,
        )
    elif family == "flux":
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=num_layers - 2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM, axes_dims_rope=(2, 2, 4),
        )
    elif family == "pixart":
        model = PixArtTransformer2DModel(
            sample_size=SAMPLE_SIZE, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            in_channels=LATENT_CHANNELS, out_channels=2 * LATENT_CHANNELS, cross_attention_dim=16,
            caption_channels=TEXT_DIM, use_additional_conditions=False,
        )
    elif family == "sana":
        model = SanaTransformer2DModel(
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
            num_layers=num_layers, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=TEXT_DIM, mlp_ratio=2.5, sample_size=SAMPLE_SIZE, patch_size=1,
        )
    elif family == "dit":
        model = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS,
            out_channels=2 * LATENT_CHANNELS, num_layers=num_layers, sample_size=SAMPLE_SIZE, patch_size=2,
            num_embeds_ada_norm=NUM_CLASSES,
        )
    else:
        raise ValueError(family)
    return model.eval()


def latents(family, n, seed=0):
    """Clean latents x0 as the model takes them (Flux: packed tokens (N, L, 4C))."""
    g = torch.Generator().manual_seed(seed)
    if family == "flux":
        return torch.randn(n, (SAMPLE_SIZE // 2) ** 2, LATENT_CHANNELS * 4, generator=g)
    return torch.randn(n, LATENT_CHANNELS, SAMPLE_SIZE, SAMPLE_SIZE, generator=g)


def conditioning(family, n, seed=1):
    """(batched caption conditioning, static kwargs) for `family`; class labels for DiT."""
    g = torch.Generator().manual_seed(seed)
    if family == "dit":
        return {"class_labels": torch.randint(0, NUM_CLASSES, (n,), generator=g)}, {}
    cond = {"encoder_hidden_states": torch.randn(n, TEXT_TOKENS, TEXT_DIM, generator=g)}
    static = {}
    if family in ("sd3", "flux"):
        cond["pooled_projections"] = torch.randn(n, POOLED_DIM, generator=g)
    if family in ("pixart", "sana"):
        mask = torch.ones(n, TEXT_TOKENS)
        mask[:, -1] = 0  # a padded caption token
        cond["encoder_attention_mask"] = mask
    if family == "pixart":
        static["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    if family == "flux":
        side = SAMPLE_SIZE // 2
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        static["img_ids"] = img_ids.reshape(-1, 3)
        static["txt_ids"] = torch.zeros(TEXT_TOKENS, 3)
    return cond, static


def null_conditioning(family, seed=2):
    """The 'empty prompt' conditioning, batch 1 (DiT: the null class)."""
    if family == "dit":
        return {"class_labels": torch.tensor([NUM_CLASSES])}
    cond, _ = conditioning(family, 1, seed=seed)
    if "encoder_attention_mask" in cond:
        cond["encoder_attention_mask"] = torch.zeros(1, TEXT_TOKENS)
        cond["encoder_attention_mask"][:, :2] = 1  # start and end tokens of an empty prompt
    return cond

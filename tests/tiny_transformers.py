"""Tiny random diffusers transformers (2-4 blocks, hidden 16-32) and matching inputs, shared by the T2I tests."""

import torch
from diffusers import (
    DiTTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    Lumina2Transformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)

LATENT_CHANNELS = 4
SAMPLE_SIZE = 8
TEXT_TOKENS = 5
TEXT_DIM = 12
POOLED_DIM = 8
NUM_CLASSES = 10
NUM_FRAMES = 2  # Wan latent frames
PACKED = ("flux", "flux2", "qwenimage")


def build(family, seed=0, num_layers=3):
    """A tiny random transformer of `family` in eval mode (Flux, Flux.2: 2 double + `num_layers - 2` single blocks;
    Lumina 2, Z-Image: 1 noise- and 1 context-refiner block besides the `num_layers` main ones)."""
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
    elif family == "flux2":
        model = Flux2Transformer2DModel(
            patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=num_layers - 2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=32,
            mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
        )
    elif family == "qwenimage":
        model = QwenImageTransformer2DModel(
            patch_size=2, in_channels=LATENT_CHANNELS * 4, out_channels=LATENT_CHANNELS, num_layers=num_layers,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4),
        )
    elif family == "lumina2":
        model = Lumina2Transformer2DModel(
            sample_size=SAMPLE_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, hidden_size=32, num_layers=num_layers,
            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
            axes_lens=(32, 32, 32), cap_feat_dim=TEXT_DIM,
        )
    elif family == "zimage":
        model = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=32, n_layers=num_layers,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_DIM, axes_dims=[4, 6, 6],
            axes_lens=[64, 32, 32],
        )
    elif family == "wan":
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=num_layers,
            rope_max_seq_len=32,
        )
    else:
        raise ValueError(family)
    return model.eval()


def latents(family, n, seed=0):
    """Clean latents x0 as the training side holds them: packed tokens (N, L, 4C) for Flux, Flux.2 and Qwen-Image
    (2 x 2 patches packed by their pipelines), a video (N, C, F, H, W) for Wan, else the grid (N, C, H, W) (Z-Image's
    per-sample list is made by `model_inputs`)."""
    g = torch.Generator().manual_seed(seed)
    if family in PACKED:
        return torch.randn(n, (SAMPLE_SIZE // 2) ** 2, LATENT_CHANNELS * 4, generator=g)
    if family == "wan":
        return torch.randn(n, LATENT_CHANNELS, NUM_FRAMES, SAMPLE_SIZE, SAMPLE_SIZE, generator=g)
    return torch.randn(n, LATENT_CHANNELS, SAMPLE_SIZE, SAMPLE_SIZE, generator=g)


def caption_lengths(n):
    """Valid caption tokens per sample where captions have different lengths (Lumina 2, Z-Image): 5, 4, 3, 5, ..."""
    return [TEXT_TOKENS - i % 3 for i in range(n)]


def conditioning(family, n, seed=1):
    """(batched caption conditioning, static kwargs) for `family`; class labels for DiT."""
    g = torch.Generator().manual_seed(seed)
    if family == "dit":
        return {"class_labels": torch.randint(0, NUM_CLASSES, (n,), generator=g)}, {}
    if family == "zimage":  # unpadded per-sample caption features, as ZImagePipeline passes them
        return {"cap_feats": [torch.randn(k, TEXT_DIM, generator=g) for k in caption_lengths(n)]}, {}
    cond = {"encoder_hidden_states": torch.randn(n, TEXT_TOKENS, TEXT_DIM, generator=g)}
    static = {}
    if family in ("sd3", "flux"):
        cond["pooled_projections"] = torch.randn(n, POOLED_DIM, generator=g)
    if family in ("pixart", "sana"):
        mask = torch.ones(n, TEXT_TOKENS)
        mask[:, -1] = 0  # a padded caption token
        cond["encoder_attention_mask"] = mask
    if family == "qwenimage":
        mask = torch.ones(n, TEXT_TOKENS)
        mask[:, -1] = 0
        cond["encoder_hidden_states_mask"] = mask
        static["img_shapes"] = [[(1, SAMPLE_SIZE // 2, SAMPLE_SIZE // 2)]]  # QwenImagePipeline's (frame, h, w)
    if family == "lumina2":  # right-padded captions of different lengths (Gemma's mask)
        cond["encoder_attention_mask"] = torch.arange(TEXT_TOKENS)[None] < torch.tensor(caption_lengths(n))[:, None]
    if family == "pixart":
        static["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    if family == "flux":
        side = SAMPLE_SIZE // 2
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        static["img_ids"] = img_ids.reshape(-1, 3)
        static["txt_ids"] = torch.zeros(TEXT_TOKENS, 3)
    if family == "flux2":  # Flux2Pipeline's (t, h, w, l) position ids
        side = SAMPLE_SIZE // 2
        static["img_ids"] = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side),
                                                 torch.arange(1))
        static["txt_ids"] = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                                 torch.arange(TEXT_TOKENS))
    return cond, static


def null_conditioning(family, seed=2):
    """The 'empty prompt' conditioning, batch 1 (DiT: the null class)."""
    if family == "dit":
        return {"class_labels": torch.tensor([NUM_CLASSES])}
    cond, _ = conditioning(family, 1, seed=seed)
    for key in ("encoder_attention_mask", "encoder_hidden_states_mask"):
        if key in cond:
            mask = torch.zeros(1, TEXT_TOKENS, dtype=cond[key].dtype)
            mask[:, :2] = 1  # start and end tokens of an empty prompt
            cond[key] = mask
    return cond


def block_output(model, layer, x, t, kwargs):
    """Image tokens of `layer` from a plain full forward of `model`, through a hook registered here (independent of
    BlockFeatures): the reference the loss tests compare with."""
    from diffusers_selftrans.models.block_features import model_timestep

    blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))
    got = {}
    handle = blocks[layer - 1].register_forward_hook(
        lambda m, a, o: got.__setitem__("f", o[1] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(x, timestep=model_timestep(model, t), **kwargs)
    finally:
        handle.remove()
    return got["f"]

#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Text-to-image convergence benchmark: vanilla vs Self-Transcendence stage 2 on a tiny SD3-style MM-DiT from scratch.

The quickstart's data (scikit-learn's 1,797 digits, upsampled to 32x32, the bundled digits VAE
`examples/assets/digits-vae`) with captions: every image gets one of a few paraphrases of its class ("a handwritten
seven", "the digit 7", ...). A tiny `StableDiffusion3Pipeline` is written first: random tiny CLIP-L/CLIP-G/T5 text
encoders (frozen, never trained: the captions still differ through their tokens), character-level tokenizers, the
digits VAE and a flow-matching Euler scheduler. Per seed: stage 1 (VAE alignment, the guiding model), then stage 2 and
a vanilla run (`--stage 1 --align_loss_weight 0`: the plain flow-matching loss, no head) at equal steps,
all with `examples/train_self_transcendence_t2i.py`. Every `--eval_every` steps the EMA checkpoint is sampled through
`StableDiffusion3Pipeline` (class-balanced prompts, Euler, no CFG) and scored like `benchmarks/convergence.py`:
feature-FID of a small digits classifier and its accuracy on the class named by the prompt.

Writes `curves.json`, `results.md` and `convergence.png` into `--output_dir`; the spread is the sample std over seeds
and every comparison a Welch t-test (benchmarks/stats.py, through convergence.py).

    python benchmarks/convergence_t2i.py                       # 3 seeds (benchmarks/results/convergence_t2i/)
    python benchmarks/convergence_t2i.py --smoke --output_dir /tmp/smoke   # seconds; the test suite runs this
    python benchmarks/convergence_t2i.py --rederive benchmarks/results/convergence_t2i   # statistics again, no training
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Paraphrases per class: the class of a sample is read from its caption.
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("a handwritten {word}", "the digit {digit}", "a drawing of the number {word}",
                     "handwritten digit {digit}")
# Tiny text side: CLIP token budget (SD3's is 77) and T5 length, in characters (character-level tokenizers: the
# longest caption, "a drawing of the number seven", is 29 plus start/end); widths of the random text encoders.
TINY_CLIP_LENGTH = 32
TINY_T5_LENGTH = 32
TINY_CLIP_WIDTH = 16
TINY_CLIP_PROJECTION = 8
TINY_T5_WIDTH = 32
TINY_TEXT_LAYERS = 2
# Sana's tiny text side (a random Gemma 2 and a character-level Gemma tokenizer) and its image size: SanaPipeline
# samples only sides divisible by 32; a 3-stage `AutoencoderDC` (4x downsampling) gives 8 x 8 latents as the others'.
TINY_GEMMA_WIDTH = 32
# Gemma's token budget: SanaPipeline prefixes each prompt with its "complex human instruction" (~1,050 characters)
TINY_GEMMA_LENGTH = 2048
SANA_RESOLUTION = 32
# Lumina 2's Gemma token budget: its pipeline prefixes each prompt with a system prompt (~180 characters)
TINY_LUMINA2_LENGTH = 256
# Lumina2Pipeline assumes an 8x VAE (its `vae_scale_factor` is fixed) and samples sides divisible by 16: a 4-stage
# tiny `AutoencoderKL` with FLUX.1's scale and shift (what Lumina-Image-2.0 ships) gives 4 x 4 latents at 32 px.
LUMINA2_RESOLUTION = 32
# Wan (video; images are 1-frame videos): WanPipeline samples sides divisible by 16; a tiny 8x `AutoencoderKLWan`
# (4 latent channels normalised by `latents_mean` / `latents_std`) gives 1 x 4 x 4 latents at 32 px.
WAN_RESOLUTION = 32
WAN_LATENTS_MEAN = (0.1, -0.1, 0.05, 0.0)
WAN_LATENTS_STD = (1.5, 0.8, 1.2, 1.0)
# Z-Image's text side: a random Qwen3 behind a chat template (character-level tokenizer), its token budget.
TINY_ZIMAGE_LENGTH = 96
# Flux.2 [klein]'s text side: the hidden states of Qwen3 layers 9, 18 and 27 (Flux2KleinPipeline's default), stacked.
TINY_FLUX2_LENGTH = 64
FLUX2_TEXT_LAYERS = 27
# Qwen-Image's text side: a random Qwen2.5-VL whose last hidden states QwenImagePipeline reads behind its prompt
# template (the template's system part dropped: `prompt_template_encode_start_idx` tokens), its token budget; images
# at 32 px through a tiny 8x `AutoencoderKLQwenImage` (2 x 2 packed tokens of 4 x 4 latents).
TINY_QWENIMAGE_LENGTH = 64
QWENIMAGE_RESOLUTION = 32
ZIMAGE_CHAT_TEMPLATE = ("{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} "
                        "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")
# Flux's VAE latent normalisation (FLUX.1's `AutoencoderKL` config): x0 = (z - shift) * scale.
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159
# Characters of the tokenizers' vocabularies (lower-case captions, digits and basic punctuation).
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
# Same short-run choices as benchmarks/convergence.py (its constants, for the same reasons).
SHORT_RUN_EMA_DECAY = 0.99
TINY_LEARNING_RATE = 1e-3
# A short run cannot afford the released 5K warm-up steps: 5 % of the default 600 steps.
TINY_WARMUP_STEPS = 30
# Tiny SD3-style MM-DiT (6 blocks, width 128: the quickstart SiT's depth and width) on 4 x 8 x 8 latents.
TINY_MMDIT = dict(patch_size=2, num_layers=6, attention_head_dim=32, num_attention_heads=4)
DIGITS_RESOLUTION = 32


def caption_for(label: int, index: int) -> str:
    template = CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)]
    return template.format(word=NUMBER_WORDS[label], digit=label)


def class_of_caption(caption: str) -> int:
    """The digit a caption names (its number word or its numeral); an error if it names none or several."""
    words = caption.lower().replace(",", " ").split()
    found = {i for i, w in enumerate(NUMBER_WORDS) if w in words} | {int(w) for w in words if w.isdigit()}
    if len(found) != 1:
        raise ValueError(f"Caption {caption!r} names {sorted(found) or 'no'} digit(s); expected exactly one.")
    return found.pop()


# ----------------------------------------------------------------------------------------------------------------------
# A tiny T2I pipeline folder, built offline (also used by tests/test_train_t2i*.py and tests/test_readme_commands.py)


def clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in TOKEN_CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in TOKEN_CHARS] + [("\u2581" + c, -2.5) for c in TOKEN_CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def gemma_tokenizer(max_length: int):
    """Character-level `GemmaTokenizer` (BPE without merges over single characters; a space is "\u2581"), adding
    `<bos>` as Gemma's does."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in TOKEN_CHARS:
        vocab[c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=max_length, add_bos_token=True)


def gemma_encoder(vocab_size: int, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    return Gemma2Model(Gemma2Config(
        vocab_size=vocab_size, hidden_size=TINY_GEMMA_WIDTH, intermediate_size=2 * TINY_GEMMA_WIDTH,
        num_hidden_layers=TINY_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=TINY_GEMMA_LENGTH, sliding_window=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)).eval()


def clip_encoder(vocab_size: int, seed: int, projection: bool = True):
    """A random tiny CLIP text encoder: with its projection (SD3's pooled output) or without (Flux reads the
    `pooler_output` of a `CLIPTextModel`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TINY_CLIP_WIDTH, intermediate_size=2 * TINY_CLIP_WIDTH,
        num_hidden_layers=TINY_TEXT_LAYERS, num_attention_heads=2, max_position_embeddings=TINY_CLIP_LENGTH,
        projection_dim=TINY_CLIP_PROJECTION, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def t5_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=TINY_T5_WIDTH, d_kv=8, d_ff=2 * TINY_T5_WIDTH, num_layers=TINY_TEXT_LAYERS,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).eval()


def tiny_vae(latent_channels: int = 4, sample_size: int = 16, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=8, sample_size=sample_size, **overrides)


def tiny_flux_vae(latent_channels: int = 4, sample_size: int = 16):
    """`tiny_vae` as FLUX.1's VAE is configured: scaling and shift factors, no quant convs."""
    return tiny_vae(latent_channels, sample_size, scaling_factor=FLUX_VAE_SCALING_FACTOR,
                    shift_factor=FLUX_VAE_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)


def tiny_lumina2_vae(latent_channels: int = 4):
    """A 4-stage (8x down) `tiny_vae` with FLUX.1's scaling and shift factors, as Lumina 2's VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels, norm_num_groups=8,
                         sample_size=LUMINA2_RESOLUTION, scaling_factor=FLUX_VAE_SCALING_FACTOR,
                         shift_factor=FLUX_VAE_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)


def tiny_wan_vae(latent_channels: int = 4):
    """A random tiny `AutoencoderKLWan` (8x down in space, causal in time), with per-channel latent statistics."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            latents_mean=list(WAN_LATENTS_MEAN[:latent_channels]),
                            latents_std=list(WAN_LATENTS_STD[:latent_channels]))


def umt5_encoder(vocab_size: int, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=TINY_T5_WIDTH, d_kv=8, d_ff=2 * TINY_T5_WIDTH, num_layers=TINY_TEXT_LAYERS,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).eval()


def qwen3_encoder(vocab_size: int, seed: int, layers: int = TINY_TEXT_LAYERS, causal_lm: bool = False):
    """A random tiny Qwen3 (Z-Image's `Qwen3Model`; Flux.2 [klein]'s `Qwen3ForCausalLM`, as deep as the layers it
    reads)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(Qwen3Config(
        vocab_size=vocab_size, hidden_size=TINY_GEMMA_WIDTH, intermediate_size=2 * TINY_GEMMA_WIDTH,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=max(TINY_ZIMAGE_LENGTH, TINY_FLUX2_LENGTH), pad_token_id=0)).eval()


def qwenimage_tokenizer(template: str, template_tokens: int, max_length: int = 2048):
    """A byte-level BPE `Qwen2Tokenizer` built offline: single bytes (GPT-2's byte alphabet), `<|endoftext|>` (pad),
    `<|im_start|>` and `<|im_end|>`, and merges that spell out each word of `template` (QwenImagePipeline's prompt
    template) and nothing else. The template's system part is then `template_tokens` tokens, as with Qwen's own
    tokenizer (what `prompt_template_encode_start_idx` drops), and a caption is almost one token per character."""
    import re

    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    split = Qwen2Tokenizer(vocab={specials[0]: 0}, merges=[]).backend_tokenizer.pre_tokenizer
    merges = []
    for part in re.split("|".join(map(re.escape, specials)), template.replace("{}", "")):
        for word, _ in split.pre_tokenize_str(part):  # byte-level words: " image" is "\u0120image"
            for k in range(2, len(word) + 1):
                if word[:k] not in vocab:
                    vocab[word[:k]] = len(vocab)
                    merges.append((word[:k - 1], word[k - 1]))
    vocab.update({token: len(vocab) + i for i, token in enumerate(specials)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": list(specials[1:])})
    system = template[:template.index("{}")]
    if len(tok(system).input_ids) != template_tokens:
        raise ValueError(f"The tiny Qwen2 tokenizer splits the template's system part into "
                         f"{len(tok(system).input_ids)} tokens, not {template_tokens}.")
    return tok


def qwen25_vl_encoder(tokenizer, seed: int):
    """A random tiny `Qwen2_5_VLForConditionalGeneration` (QwenImagePipeline's text encoder): a 2-layer text model
    with multimodal RoPE sections and a 1-block vision tower (never called: the prompts are text)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=len(tokenizer), hidden_size=TINY_GEMMA_WIDTH, intermediate_size=2 * TINY_GEMMA_WIDTH,
                num_hidden_layers=TINY_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=4 * TINY_QWENIMAGE_LENGTH, bos_token_id=None,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TINY_GEMMA_WIDTH,
                  fullatt_block_indexes=[0])
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def tiny_qwenimage_vae(latent_channels: int = 4):
    """A random tiny `AutoencoderKLQwenImage` (Wan-style causal video VAE, 8x down in space) with per-channel latent
    statistics away from (0, 1), so the pipeline's `latents_mean` / `latents_std` matter."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  latents_mean=list(WAN_LATENTS_MEAN[:latent_channels]),
                                  latents_std=list(WAN_LATENTS_STD[:latent_channels]))


def tiny_flux2_vae(latent_channels: int = 4, sample_size: int = 16):
    """A random tiny `AutoencoderKLFlux2` (2x down) whose BatchNorm over the 2x2-patchified latents holds running
    statistics away from (0, 1), so the pipeline's normalisation matters."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                             layers_per_block=1, norm_num_groups=8, sample_size=sample_size)
    vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.num_features))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    return vae


def tiny_dc_vae(latent_channels: int = 4):
    """A random tiny `AutoencoderDC` (Sana's deep-compression VAE, deterministic): 3 ResBlock stages, 4x down."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(latent_channels=latent_channels, attention_head_dim=8, encoder_block_types="ResBlock",
                         decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16, 16),
                         decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1),
                         decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
                         decoder_qkv_multiscales=((), (), ()), scaling_factor=0.5)


def tiny_transformer_config(family: str, latent_side: int, latent_channels: int = 4, num_layers: int = 3,
                            head_dim: int = 8, heads: int = 2) -> dict:
    """A tiny transformer config matching `write_tiny_t2i_pipeline`'s text encoders."""
    if family == "sd3":
        return dict(sample_size=latent_side, patch_size=2, in_channels=latent_channels, num_layers=num_layers,
                    attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=TINY_T5_WIDTH,
                    caption_projection_dim=head_dim * heads, pooled_projection_dim=2 * TINY_CLIP_PROJECTION,
                    out_channels=latent_channels, pos_embed_max_size=latent_side)
    if family == "pixart":
        return dict(sample_size=latent_side, num_layers=num_layers, patch_size=2, attention_head_dim=head_dim,
                    num_attention_heads=heads, in_channels=latent_channels, out_channels=2 * latent_channels,
                    cross_attention_dim=head_dim * heads, caption_channels=TINY_T5_WIDTH,
                    use_additional_conditions=False)
    if family == "sana":
        return dict(sample_size=latent_side, patch_size=1, in_channels=latent_channels, out_channels=latent_channels,
                    num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=heads,
                    num_cross_attention_heads=heads, cross_attention_head_dim=head_dim,
                    cross_attention_dim=head_dim * heads, caption_channels=TINY_GEMMA_WIDTH, mlp_ratio=2.5)
    if family == "flux":  # packed 2x2 latent tokens; 1 double-stream block, the rest single-stream
        return dict(patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=num_layers - 1,
                    attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=TINY_T5_WIDTH,
                    pooled_projection_dim=TINY_CLIP_WIDTH, guidance_embeds=True,
                    axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2))
    if family == "lumina2":  # one refiner block each; caption positions up to Gemma's token budget
        return dict(sample_size=latent_side, patch_size=2, in_channels=latent_channels, hidden_size=head_dim * heads,
                    num_layers=num_layers, num_refiner_layers=1, num_attention_heads=heads, num_kv_heads=1,
                    multiple_of=16, axes_dim_rope=(head_dim // 2, head_dim // 4, head_dim // 4),
                    axes_lens=(TINY_LUMINA2_LENGTH + 1, 32, 32), cap_feat_dim=TINY_GEMMA_WIDTH)
    if family == "wan":  # (1, 2, 2) patches of 1-frame videos; UMT5 text in cross-attention
        return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                    in_channels=latent_channels, out_channels=latent_channels, text_dim=TINY_T5_WIDTH, freq_dim=32,
                    ffn_dim=4 * head_dim * heads, num_layers=num_layers, rope_max_seq_len=32)
    if family == "zimage":  # one refiner block each; caption positions up to the token budget
        return dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=head_dim * heads,
                    n_layers=num_layers, n_refiner_layers=1, n_heads=heads, n_kv_heads=heads,
                    cap_feat_dim=TINY_GEMMA_WIDTH, axes_dims=[head_dim // 2, head_dim // 4, head_dim // 4],
                    axes_lens=[TINY_ZIMAGE_LENGTH + 64, 32, 32])
    if family == "flux2":  # packed 2x2-patchified latents; 1 double-stream block, the rest single-stream
        return dict(patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=num_layers - 1,
                    attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=3 * TINY_GEMMA_WIDTH,
                    timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(head_dim // 4,) * 4,
                    guidance_embeds=False)
    if family == "qwenimage":  # packed 2x2 latent tokens (the pipeline packs them); Qwen2.5-VL text
        return dict(patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels, num_layers=num_layers,
                    attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=TINY_GEMMA_WIDTH,
                    axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2))
    raise ValueError(f"No tiny config for {family!r} (sd3, pixart, sana, flux, lumina2, wan, zimage, flux2, "
                     f"qwenimage).")


def write_tiny_t2i_pipeline(folder, family: str = "sd3", vae=None, transformer_config=None, seed: int = 0) -> Path:
    """Save a random tiny `StableDiffusion3Pipeline` ("sd3": CLIP-L, CLIP-G, T5), `PixArtSigmaPipeline` ("pixart":
    T5), `SanaPipeline` ("sana": Gemma 2, `AutoencoderDC`, flow DPM-Solver++; sample it at `SANA_RESOLUTION`) or
    `FluxPipeline` ("flux": CLIP-L without projection, T5, guidance-embedded transformer), `Lumina2Pipeline`
    ("lumina2": Gemma 2, an 8x `AutoencoderKL` with scale and shift; sample it at `LUMINA2_RESOLUTION`) or `WanPipeline`
    ("wan": UMT5, `AutoencoderKLWan`, flow UniPC; 1-frame videos at `WAN_RESOLUTION`) or `ZImagePipeline` ("zimage":
    Qwen3 behind a chat template, FLUX.1's VAE factors, per-sample caption lists) or `Flux2KleinPipeline` ("flux2":
    a 27-layer Qwen3, `AutoencoderKLFlux2` with BatchNorm statistics) with character-level tokenizers, or
    `QwenImagePipeline` ("qwenimage": Qwen2.5-VL behind its prompt template, `AutoencoderKLQwenImage`; sample it at
    `QWENIMAGE_RESOLUTION`) into `folder`, loadable offline by `<Pipeline>.from_pretrained(folder)`."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "sana":
        return _write_tiny_sana_pipeline(folder, vae, transformer_config, seed)
    if family == "lumina2":
        return _write_tiny_lumina2_pipeline(folder, vae, transformer_config, seed)
    if family == "wan":
        return _write_tiny_wan_pipeline(folder, vae, transformer_config, seed)
    if family == "zimage":
        return _write_tiny_zimage_pipeline(folder, vae, transformer_config, seed)
    if family == "flux2":
        return _write_tiny_flux2_pipeline(folder, vae, transformer_config, seed)
    if family == "qwenimage":
        return _write_tiny_qwenimage_pipeline(folder, vae, transformer_config, seed)
    if vae is None:
        vae = tiny_flux_vae() if family == "flux" else tiny_vae()
    if family == "sd3" and vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)  # StableDiffusion3Pipeline adds it when decoding; 0 changes nothing
    latent_side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    config = transformer_config or tiny_transformer_config(family, latent_side, vae.config.latent_channels)
    t5_tok = t5_tokenizer(TINY_T5_LENGTH)
    t5 = t5_encoder(len(t5_tok), seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    torch.manual_seed(seed)
    if family == "sd3":
        tok = clip_tokenizer(TINY_CLIP_LENGTH)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=diffusers.SD3Transformer2DModel(**config), scheduler=scheduler, vae=vae,
            text_encoder=clip_encoder(len(tok), seed + 1), tokenizer=tok,
            text_encoder_2=clip_encoder(len(tok), seed + 2), tokenizer_2=clip_tokenizer(TINY_CLIP_LENGTH),
            text_encoder_3=t5, tokenizer_3=t5_tok)
    elif family == "pixart":
        pipe = diffusers.PixArtSigmaPipeline(
            transformer=diffusers.PixArtTransformer2DModel(**config), scheduler=scheduler, vae=vae,
            text_encoder=t5, tokenizer=t5_tok)
    elif family == "flux":  # FLUX.1's scheduler: resolution-dependent shift (`mu` from the image token count)
        tok = clip_tokenizer(TINY_CLIP_LENGTH)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = diffusers.FluxPipeline(
            transformer=diffusers.FluxTransformer2DModel(**config), scheduler=scheduler, vae=vae,
            text_encoder=clip_encoder(len(tok), seed + 1, projection=False), tokenizer=tok,
            text_encoder_2=t5, tokenizer_2=t5_tok)
    else:
        raise ValueError(f"No tiny pipeline for {family!r} (sd3, pixart, sana, flux, lumina2, wan, zimage, flux2, "
                         f"qwenimage).")
    pipe.save_pretrained(folder)
    return Path(folder)


def _write_tiny_sana_pipeline(folder, vae=None, transformer_config=None, seed: int = 0) -> Path:
    import diffusers
    from diffusers import DPMSolverMultistepScheduler

    vae = vae if vae is not None else tiny_dc_vae()
    latent_side = SANA_RESOLUTION // vae.spatial_compression_ratio
    config = transformer_config or tiny_transformer_config("sana", latent_side, vae.config.latent_channels)
    tok = gemma_tokenizer(TINY_GEMMA_LENGTH)
    gemma = gemma_encoder(len(tok), seed + 4)
    # what Sana's pipelines ship: DPM-Solver++ sampling the velocity on flow sigmas, time shift 3
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    torch.manual_seed(seed)
    pipe = diffusers.SanaPipeline(transformer=diffusers.SanaTransformer2DModel(**config), scheduler=scheduler,
                                  vae=vae, text_encoder=gemma, tokenizer=tok)
    pipe.save_pretrained(folder)
    return Path(folder)


def _write_tiny_lumina2_pipeline(folder, vae=None, transformer_config=None, seed: int = 0) -> Path:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = vae if vae is not None else tiny_lumina2_vae()
    latent_side = LUMINA2_RESOLUTION // 8
    config = transformer_config or tiny_transformer_config("lumina2", latent_side, vae.config.latent_channels)
    tok = gemma_tokenizer(TINY_LUMINA2_LENGTH)
    torch.manual_seed(seed)
    pipe = diffusers.Lumina2Pipeline(transformer=diffusers.Lumina2Transformer2DModel(**config),
                                     scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), vae=vae,
                                     text_encoder=gemma_encoder(len(tok), seed + 5), tokenizer=tok)
    pipe.save_pretrained(folder)
    return Path(folder)


def _write_tiny_wan_pipeline(folder, vae=None, transformer_config=None, seed: int = 0) -> Path:
    import diffusers
    from diffusers import UniPCMultistepScheduler

    vae = vae if vae is not None else tiny_wan_vae()
    latent_side = WAN_RESOLUTION // vae.spatial_compression_ratio
    config = transformer_config or tiny_transformer_config("wan", latent_side, vae.config.z_dim)
    tok = t5_tokenizer(TINY_T5_LENGTH)
    # what Wan 2.1's T2V pipelines ship: UniPC sampling the velocity on flow sigmas, time shift (5 at 720p, 3 at 480p)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    torch.manual_seed(seed)
    pipe = diffusers.WanPipeline(transformer=diffusers.WanTransformer3DModel(**config), scheduler=scheduler, vae=vae,
                                 text_encoder=umt5_encoder(len(tok), seed + 6), tokenizer=tok)
    pipe.save_pretrained(folder)
    return Path(folder)


def _write_tiny_zimage_pipeline(folder, vae=None, transformer_config=None, seed: int = 0) -> Path:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = vae if vae is not None else tiny_flux_vae()  # Z-Image ships FLUX.1's VAE (scale and shift)
    latent_side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    config = transformer_config or tiny_transformer_config("zimage", latent_side, vae.config.latent_channels)
    tok = gemma_tokenizer(TINY_ZIMAGE_LENGTH)  # character-level, right-padded, with a chat template (Qwen3's role)
    tok.padding_side = "right"
    tok.chat_template = ZIMAGE_CHAT_TEMPLATE
    torch.manual_seed(seed)
    pipe = diffusers.ZImagePipeline(transformer=diffusers.ZImageTransformer2DModel(**config),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=qwen3_encoder(len(tok), seed + 7), tokenizer=tok)
    pipe.save_pretrained(folder)
    return Path(folder)


def _write_tiny_flux2_pipeline(folder, vae=None, transformer_config=None, seed: int = 0) -> Path:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = vae if vae is not None else tiny_flux2_vae()
    latent_side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    config = transformer_config or tiny_transformer_config("flux2", latent_side, vae.config.latent_channels)
    tok = gemma_tokenizer(TINY_FLUX2_LENGTH)  # character-level, right-padded, with a chat template (Qwen3's role)
    tok.padding_side = "right"
    tok.chat_template = ZIMAGE_CHAT_TEMPLATE
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # Flux.2: an empirical mu
    torch.manual_seed(seed)
    pipe = diffusers.Flux2KleinPipeline(
        transformer=diffusers.Flux2Transformer2DModel(**config), scheduler=scheduler, vae=vae,
        text_encoder=qwen3_encoder(len(tok), seed + 8, layers=FLUX2_TEXT_LAYERS, causal_lm=True), tokenizer=tok)
    pipe.save_pretrained(folder)
    return Path(folder)


def _write_tiny_qwenimage_pipeline(folder, vae=None, transformer_config=None, seed: int = 0) -> Path:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = vae if vae is not None else tiny_qwenimage_vae()
    latent_side = QWENIMAGE_RESOLUTION // vae.spatial_compression_ratio
    config = transformer_config or tiny_transformer_config("qwenimage", latent_side, vae.config.z_dim)
    # the pipeline's own prompt template and the number of its tokens it drops (its __init__ sets both)
    template = diffusers.QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                           transformer=None)
    tok = qwenimage_tokenizer(template.prompt_template_encode, template.prompt_template_encode_start_idx)
    # Qwen-Image's scheduler: resolution-dependent exponential time shift, sigmas stretched to end at 0.02
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    torch.manual_seed(seed)
    pipe = diffusers.QwenImagePipeline(
        transformer=diffusers.QwenImageTransformer2DModel(**config), scheduler=scheduler, vae=vae,
        text_encoder=qwen25_vl_encoder(tok, seed + 9), tokenizer=tok)
    pipe.save_pretrained(folder)
    return Path(folder)


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark

RUNS = ("vanilla", "stage1", "self_transcendence")


def parse_args(input_args=None):
    import quickstart_assets

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", type=str, default=str(ROOT / "benchmarks" / "results" / "convergence_t2i"))
    p.add_argument("--rederive", type=str, default=None, metavar="FOLDER",
                   help="Train nothing: recompute the summary, tests, results.md and plot of FOLDER from its "
                        "curves.json (e.g. benchmarks/results/convergence_t2i) and rewrite them there.")
    p.add_argument("--vae_name_or_path", type=str, default=str(quickstart_assets.DEFAULT_VAE_PATH))
    p.add_argument("--resolution", type=int, default=DIGITS_RESOLUTION)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="Steps of every run (and of the stage-1 guiding model).")
    p.add_argument("--guide_stop_step", type=int, default=None,
                   help="Default: a quarter of --steps (as convergence.py).")
    p.add_argument("--eval_every", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--ema_decay", type=float, default=SHORT_RUN_EMA_DECAY)
    p.add_argument("--learning_rate", type=float, default=TINY_LEARNING_RATE)
    p.add_argument("--lr_warmup_steps", type=int, default=TINY_WARMUP_STEPS)
    p.add_argument("--projector_dim", type=int, default=512, help="Alignment MLP width (4 D, as convergence.py).")
    p.add_argument("--samples_per_class", type=int, default=30)
    p.add_argument("--sampling_steps", type=int, default=25)
    p.add_argument("--max_real", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="A tiny model, a few steps, one seed: checks the plumbing.")
    args = p.parse_args(input_args)
    args.model = dict(TINY_MMDIT)
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.batch_size = args.seeds[:1], 4, 2, 8
        args.samples_per_class, args.sampling_steps, args.max_real = 2, 2, args.max_real or 200
        args.lr_warmup_steps, args.projector_dim = 1, 16
        args.model = dict(patch_size=2, num_layers=3, attention_head_dim=8, num_attention_heads=2)
    return args


def write_captioned_digits(root: Path, resolution: int) -> Path:
    """The quickstart's digits folders plus `metadata.jsonl`: each image with one paraphrase of its class."""
    import quickstart_assets

    quickstart_assets.write_digits_imagefolder(root, resolution)
    rows = []
    for path in sorted(root.glob("[0-9]/*.png")):
        label, index = int(path.parent.name), int(path.stem)
        rows.append(json.dumps({"file_name": f"{label}/{path.name}", "text": caption_for(label, index)}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def score_pipeline(pipe, prompts, labels, args, real, real_labels, classifier):
    """Sample one image per prompt (seeded per prompt, Euler `args.sampling_steps`, no CFG) and score them against
    the real images: {fid, accuracy} (accuracy: the classifier reads back `labels`, the class each prompt names)."""
    from diffusers_selftrans import evaluation as E

    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        generators = [torch.Generator().manual_seed(1234 + start + i) for i in range(len(chunk))]
        images.append(pipe(prompt=chunk, height=args.resolution, width=args.resolution, guidance_scale=1.0,
                           num_inference_steps=args.sampling_steps, max_sequence_length=TINY_T5_LENGTH,
                           generator=generators, output_type="np").images)
    images = E.to_uint8_nhwc(np.concatenate(images))
    metrics = E.evaluate_samples(real, real_labels, images, np.asarray(labels), classifier)
    return {"fid": metrics["fid"], "accuracy": metrics["accuracy"]}


def evaluate_run(folder: Path, pipe_folder: Path, args, real, real_labels, classifier, extra_seconds=0.0):
    """Score the EMA weights of every checkpoint of a run through StableDiffusion3Pipeline (no CFG):
    [{step, train_seconds, fid, accuracy}]; the intended class of a sample is the one its prompt names."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffusers_selftrans import checkpointing as C

    log = {json.loads(line)["step"]: json.loads(line) for line in (folder / "loss_log.jsonl").read_text().splitlines()}
    prompts = [caption_for(c, i) for c in range(len(NUMBER_WORDS)) for i in range(args.samples_per_class)]
    labels = [class_of_caption(p) for p in prompts]
    points = []
    for ckpt in C.list_checkpoints(folder):
        step = C.checkpoint_step(ckpt)
        model = SD3Transformer2DModel.from_pretrained(ckpt / "transformer_ema").eval()
        pipe = StableDiffusion3Pipeline.from_pretrained(pipe_folder, transformer=model)
        metrics = score_pipeline(pipe, prompts, labels, args, real, real_labels, classifier)
        points.append({"step": step, "train_seconds": log[step]["train_seconds"] + extra_seconds, **metrics})
    return points


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    import convergence  # benchmarks/convergence.py: real-image loading, summary, tests, table and plot

    if args.rederive:
        return convergence.rederive(args.rederive)
    import train_self_transcendence_t2i as t2i
    from diffusers import AutoencoderKL

    from diffusers_selftrans import evaluation as E

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. Captioned digits, the real images and the scoring classifier (as convergence.py), the tiny SD3 pipeline
    data_dir = write_captioned_digits(out / "data" / "digits", args.resolution)
    real, real_labels, num_classes = convergence.load_folder_images(str(data_dir), args.resolution, args.max_real)
    classifier = E.train_feature_classifier(real, real_labels, num_classes=num_classes, seed=0,
                                            cache_dir=str(out / "eval_cache"), input_size=args.resolution)
    vae = AutoencoderKL.from_pretrained(args.vae_name_or_path)
    latent_side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    config = tiny_transformer_config("sd3", latent_side, vae.config.latent_channels, args.model["num_layers"],
                                     args.model["attention_head_dim"], args.model["num_attention_heads"])
    pipe_folder = out / "pipeline"
    if not (pipe_folder / "model_index.json").exists():
        write_tiny_t2i_pipeline(pipe_folder, "sd3", vae=vae, transformer_config=config)
    (out / "mmdit.json").write_text(json.dumps(config))
    stop = args.guide_stop_step or max(1, args.steps // 4)

    # 2. Per seed: stage 1 (the guiding model), stage 2 on it, and vanilla, all from scratch at equal steps
    curves = {name: {} for name in RUNS}
    for seed in args.seeds:
        common = ["--pretrained_model_name_or_path", str(pipe_folder), "--transformer_config", str(out / "mmdit.json"),
                  "--train_data_dir", str(data_dir), "--cache_dir", str(out / "hf_cache"),
                  "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
                  "--seed", str(seed), "--max_train_steps", str(args.steps), "--checkpointing_steps",
                  str(args.eval_every), "--validation_steps", str(10 ** 9), "--report_to", "none",
                  "--ema_decay", str(args.ema_decay), "--learning_rate", str(args.learning_rate),
                  "--lr_warmup_steps", str(args.lr_warmup_steps), "--projector_dim", str(args.projector_dim),
                  "--max_sequence_length", str(TINY_T5_LENGTH), "--logging_steps", str(args.eval_every),
                  "--validation_num_inference_steps", str(args.sampling_steps), "--no-progress",
                  "--precompute_text_embeddings",  # 40 distinct captions: encode each once
                  "--dataloader_num_workers", "0",  # 1,797 tiny images: a worker restart per epoch costs more
                  "--validation_prompts", *[caption_for(c, 0) for c in range(4)]]
        runs = out / "runs" / f"seed{seed}"
        # The committed results (benchmarks/results/convergence_t2i) were made before the released T2I head and
        # caption dropout became the defaults: the plain stage-1 head, the teacher on the undropped captions.
        flags = {"stage1": ["--stage", "1", "--stage1_head", "plain"],
                 "vanilla": ["--stage", "1", "--align_loss_weight", "0"],
                 "self_transcendence": ["--stage", "2", "--guiding_model_name_or_path", str(runs / "stage1"),
                                        "--guide_stop_step", str(stop), "--teacher_captions", "original"]}
        for name in ("stage1", "self_transcendence", "vanilla"):
            if not (runs / name / "model_index.json").exists():
                print(f"[seed {seed}] {name}", flush=True)
                t2i.main(common + flags[name] + ["--output_dir", str(runs / name)])
        stage1_seconds = convergence.read_log(runs / "stage1")[args.steps]["train_seconds"]
        for name in RUNS:
            extra = stage1_seconds if name == "self_transcendence" else 0.0
            curves[name][seed] = evaluate_run(runs / name, pipe_folder, args, real, real_labels, classifier, extra)

    # 3. Mean and spread over seeds, the tests, the table and the plot (convergence.py's), everything in curves.json
    result, table = convergence.write_results(out, args, convergence.recorded_settings(args, out), curves,
                                              round(time.perf_counter() - start, 1), os.uname().machine)
    print(table)
    print(f"\nWrote {out / 'curves.json'}, {out / 'results.md'}, {out / 'convergence.png'}")
    return result


if __name__ == "__main__":
    main()

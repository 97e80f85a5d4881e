#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Text-to-image convergence benchmark: vanilla vs Self-Transcendence stage 2 on a tiny SD3-style MM-DiT from scratch.

The quickstart's data (scikit-learn's 1,797 digits, upsampled to 32x32, the bundled digits VAE
`examples/assets/digits-vae`) with captions: every image gets one of a few paraphrases of its class ("a handwritten
seven", "the digit 7", ...). A tiny `StableDiffusion3Pipeline` is written first: random tiny CLIP-L/CLIP-G/T5 text
encoders (frozen, never trained: the captions still differ through their tokens), character-level tokenizers, the
digits VAE and a flow-matching Euler scheduler. Per seed: stage 1 (VAE alignment, the guiding model), then stage 2 and
a vanilla run (`--align_loss_weight 0`-free: the plain flow-matching loss, i.e. stage 1 with weight 0) at equal steps,
all with `examples/train_self_transcendence_t2i.py`. Every `--eval_every` steps the EMA checkpoint is sampled through
`StableDiffusion3Pipeline` (class-balanced prompts, Euler, no CFG) and scored like `benchmarks/convergence.py`:
feature-FID of a small digits classifier and its accuracy on the class named by the prompt.

Writes `curves.json`, `results.md` and `convergence_t2i.png` into `--output_dir`.

    python benchmarks/convergence_t2i.py                                   # 3 seeds (benchmarks/results/convergence_t2i/)
    python benchmarks/convergence_t2i.py --smoke --output_dir /tmp/smoke   # seconds; the test suite runs this
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
# A tiny T2I pipeline folder, built offline (also used by tests/test_train_t2i.py)


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


def clip_encoder(vocab_size: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
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


def tiny_vae(latent_channels: int = 4, sample_size: int = 16):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=8, sample_size=sample_size)


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
    raise ValueError(f"No tiny config for {family!r} (sd3, pixart).")


def write_tiny_t2i_pipeline(folder, family: str = "sd3", vae=None, transformer_config=None, seed: int = 0) -> Path:
    """Save a random tiny `StableDiffusion3Pipeline` ("sd3": CLIP-L, CLIP-G, T5) or `PixArtSigmaPipeline` ("pixart":
    T5) with character-level tokenizers into `folder`, loadable offline by `<Pipeline>.from_pretrained(folder)`."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = vae if vae is not None else tiny_vae()
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
    else:
        raise ValueError(f"No tiny pipeline for {family!r} (sd3, pixart).")
    pipe.save_pretrained(folder)
    return Path(folder)

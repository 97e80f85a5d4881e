#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Self-Transcendence text-to-image on diffusers' transformers (SD3, PixArt, Sana, Flux(.2), Lumina 2, Wan, Z-Image,
Qwen-Image).

One script, both stages (the released T2I setting, method-notes §3.4, `train_t2i_vaeloss.sh` and
`train_t2i_self_trans.sh`):

- `--stage 1`: the guiding model. Block n/6 (4 of 24) goes through an MLP + head to the latent grid and regresses the
  velocity (VAE alignment), weight 0.5, at every t, through the released T2I head: modulated by the model's own
  time embedding (`--stage1_head plain`: the class-conditional head). No teacher. Flux's head predicts its packed
  2x2 latent tokens.
- `--stage 2` (default): the student's block n/2 (12 of 24) regresses, through an MLP, the classifier-free-guided
  features f_u + w (f_c - f_u), w = 5, of the frozen stage-1 model's block 2n/3 (16 of 24): f_c with the caption,
  f_u with the empty prompt's embeddings. Weight 0.5, every t, the guide stops after 50K steps. The teacher is the
  stage-1 output's EMA transformer (`--guiding_model_name_or_path stage1_output`).

    accelerate launch examples/train_self_transcendence_t2i.py --stage 1 \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers \
        --transformer_config mmdit.json \
        --dataset_name my/coco-captions --caption_column text --output_dir t2i-stage1
    accelerate launch examples/train_self_transcendence_t2i.py --stage 2 --guiding_model_name_or_path t2i-stage1 \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers \
        --transformer_config mmdit.json \
        --dataset_name my/coco-captions --caption_column text --output_dir t2i-stage2

The pipeline named by `--pretrained_model_name_or_path` provides the VAE, the frozen text encoders and tokenizers
(and the transformer when fine-tuning); `--transformer_config` trains a transformer from scratch instead. Text
embeddings are the pipeline's own `encode_prompt` (what its `__call__` uses at inference; Sana: the captions prefixed
with SanaPipeline's default complex human instruction, the empty prompt not, as its `__call__` does; Lumina 2: the
captions behind its system prompt, the empty prompt not, with Gemma's right-padded mask; Z-Image: Qwen3 features of
the chat-templated captions, each caption's unpadded tokens, as per-sample lists; Flux.2 [klein]: Qwen3 layers 9, 18
and 27 stacked; Qwen-Image: the last Qwen2.5-VL hidden states of its templated captions without the template's system
part, zero-padded to `--max_sequence_length` with the padding mask the pipeline passes). Flux.2 trains on the tokens of
its 2x2-patchified latents normalised by the VAE's BatchNorm statistics, with its (t, h, w, l) ids. Wan (video) trains
on images as 1-frame videos: latents (N, C, 1, H, W) normalised by the VAE's `latents_mean` / `latents_std`;
Qwen-Image on the same 1-frame latents of its `AutoencoderKLQwenImage`, packed 2x2 as Flux's, with the pipeline's
`img_shapes`. Time follows our convention (x_t = (1 - t) x0 + t eps, data at t = 0, `Transport`), converted to each
model's `timestep` with `model_timestep`. `--output_dir` ends as the matching diffusers pipeline folder with the EMA
transformer (Sana: sample it with `use_resolution_binning=False` unless its transformer's `sample_size` is one of
SanaPipeline's bins).

Images and captions come through the SiT scripts' data stream (`TrainDataStream`, the flags of `cli.add_data_args`):
the same decoding and skip limit for broken images, sharding by process and exact resume. Of several captions per
image (a list in `--caption_column`, e.g. COCO's five), one is picked uniformly at random each time the image is read,
as the released code does, from a seeded generator that checkpoints save and resume.

FSDP (models that do not fit one GPU): an accelerate config with `distributed_type: FSDP` and `fsdp_version: 2`. The
transformer and the alignment heads are sharded as one module (`TrainableModules`), the frozen stage-2 teacher stays
whole on every process, each process keeps the EMA of its own shards (`ShardedEMAState`, saved per process in each
checkpoint; model and optimizer go through accelerate's FSDP `save_state`), and the export gathers the full EMA.

LoRA (`--lora_rank`, both stages, on the pretrained transformer; `diffusers_selftrans.lora`): only an adapter on the
blocks' attention and feed-forward projections trains (with the alignment head); checkpoints hold the adapter and its
EMA, and `--output_dir` ends as the EMA adapter in diffusers' LoRA format (`pipe.load_lora_weights(output_dir)` on the
base pipeline) beside `projector/`. In stage 2 the teacher shares the student's base: the stage-1 LoRA output
(`--guiding_model_name_or_path`) as a second, frozen adapter (`--lora_teacher adapter`), or the pretrained base itself
with the adapters off (`--lora_teacher base`, no stage 1). Under FSDP2 the frozen base is sharded with the adapters
and the head, each process keeps the EMA of its adapter shards, checkpoints are accelerate's FSDP ones (the base's
shards included), the teacher pass runs through the FSDP root on the same sharded module (its early exit cuts the
block lists before the call, so every FSDP hook runs), and the export gathers the same diffusers-format LoRA.
Under `--mixed_precision bf16` / `fp16` the frozen base is cast to that dtype (not under FSDP; `--lora_fp32_base`
keeps it fp32), the trained adapter, its EMA and the head stay fp32.
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffusers_selftrans import checkpointing as C
from diffusers_selftrans import cli, hub
from diffusers_selftrans import lora as L
from diffusers_selftrans import runs as R
from diffusers_selftrans import training as T
from diffusers_selftrans.alignment import build_alignment, default_t2i_options
from diffusers_selftrans.data import DataConfig, TrainDataStream
from diffusers_selftrans.models.block_features import (BlockFeatures, describe_transformer, model_inputs,
                                                      model_velocity)
from diffusers_selftrans.provenance import (ProvenanceError, check_provenance, module_digest, read_provenance,
                                            vae_encoder_identity, write_provenance)
from diffusers_selftrans.transport import Transport

logger = get_logger(__name__)

# The diffusers pipelines this script trains: pipeline class -> (family, transformer class, pipeline's default
# text length: the `max_sequence_length` default of its `encode_prompt`).
PIPELINES = {
    "StableDiffusion3Pipeline": ("sd3", "SD3Transformer2DModel", 256),
    "PixArtSigmaPipeline": ("pixart", "PixArtTransformer2DModel", 300),
    "SanaPipeline": ("sana", "SanaTransformer2DModel", 300),
    "FluxPipeline": ("flux", "FluxTransformer2DModel", 512),
    "Lumina2Pipeline": ("lumina2", "Lumina2Transformer2DModel", 256),
    "WanPipeline": ("wan", "WanTransformer3DModel", 512),  # video: images train as 1-frame videos
    "ZImagePipeline": ("zimage", "ZImageTransformer2DModel", 512),
    "Flux2KleinPipeline": ("flux2", "Flux2Transformer2DModel", 512),  # Flux.2 [klein]: Qwen3 text
    # Qwen2.5-VL text; its `__call__` passes max_sequence_length=512 to `encode_prompt` (whose own default is 1024)
    "QwenImagePipeline": ("qwenimage", "QwenImageTransformer2DModel", 512),
}
# Families whose caption features are per-sample lists of unpadded (L_i, D) tensors (Z-Image's `cap_feats`).
LIST_CONDITIONING = ("zimage",)

# Released T2I setting (issue 16, `train_t2i_*.sh`): AdamW lr 2e-4, betas (0.9, 0.9), weight decay 0.03, 5K linear
# warm-up steps, caption dropout 0.1, stage 1 for 150K steps.
T2I_LEARNING_RATE = 2e-4
T2I_ADAM_BETA2 = 0.9
T2I_WEIGHT_DECAY = 0.03
T2I_WARMUP_STEPS = 5_000
T2I_CAPTION_DROPOUT = 0.1
T2I_STAGE1_STEPS = 150_000
# The released setting gives no separate budget for stage 2; we default to stage 1's (set --max_train_steps).
T2I_STAGE2_STEPS = T2I_STAGE1_STEPS
# MS-COCO 256 x 256 (released T2I setting).
T2I_RESOLUTION = 256
# FluxPipeline's default `guidance_scale` (3.5), fed to guidance-distilled Flux transformers (`guidance_embeds`).
FLUX_DEFAULT_GUIDANCE = 3.5
# Preview prompts when --validation_prompts is not given.
DEFAULT_VALIDATION_PROMPTS = ("a photograph of an astronaut riding a horse", "a bowl of fruit on a wooden table")
# A text-embedding cache file per caption (`--precompute_text_embeddings`).
TEXT_EMBEDDINGS_FOLDER = "text_embeddings"


# ----------------------------------------------------------------------------------------------------------------------
# 1. Arguments


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__.split("\n")[0])
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=False, default=None,
                   help="A diffusers SD3 / PixArt-Sigma / Sana / Flux / Flux.2 [klein] / Lumina 2 / Wan / Z-Image / "
                        "Qwen-Image pipeline folder or Hub id: VAE, text encoders and tokenizers from its subfolders, "
                        "and its transformer unless --transformer_config is given.")
    g.add_argument("--revision", type=str, default=None)
    g.add_argument("--transformer_config", type=str, default=None,
                   help="A transformer config JSON of the pipeline's transformer class: train from scratch.")
    g.add_argument("--stage", type=int, default=2, choices=[1, 2], help="1: VAE alignment; 2: self-transcendence.")
    g.add_argument("--guiding_model_name_or_path", type=str, default=None,
                   help="Stage 2: the stage-1 output folder (or Hub id); its transformer/ holds the EMA weights.")
    g.add_argument("--guiding_model_subfolder", type=str, default="transformer")
    g.add_argument("--time_sampling", type=str, default="uniform", choices=["uniform", "logit_normal"],
                   help="Training t density (released setting: uniform).")
    g.add_argument("--flux_guidance_scale", type=float, default=FLUX_DEFAULT_GUIDANCE,
                   help="Flux with guidance_embeds: the guidance value fed during training (FluxPipeline's default).")
    cli.add_data_args(parser, captions=True)  # images with captions: the SiT scripts' data flags and stream
    g = parser.add_argument_group("text")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="Text tokens (T5 / Gemma). Default: the pipeline's own `encode_prompt` default.")
    g.add_argument("--caption_dropout", type=float, default=T2I_CAPTION_DROPOUT,
                   help="Probability of replacing a caption's embeddings by the empty prompt's (CFG).")
    g.add_argument("--teacher_captions", type=str, default="dropped", choices=["dropped", "original"],
                   help="Stage 2: the teacher's conditional branch sees the student's captions after caption dropout "
                        "(dropped, default: the released code drops captions in the dataset, for both) or the "
                        "original caption even where the student's was dropped (original).")
    g.add_argument("--precompute_text_embeddings", action="store_true",
                   help="Before training, encode every caption of the data (and the validation prompts) once, shared "
                        "across processes, into OUTPUT_DIR/text_embeddings/ (never uploaded), then free the text "
                        "encoders: the run holds only the transformer, its teacher and the VAE.")
    g = parser.add_argument_group("self-transcendence")
    g.add_argument("--align_layer", type=int, default=None, help="Stage 1 block (default n/6: 4 of 24).")
    g.add_argument("--stage1_head", type=str, default="modulated", choices=["modulated", "plain"],
                   help="Stage 1 head: modulated (default, the released T2I FinalLayer: shift/scale from the model's "
                        "time embedding) or plain (the class-conditional stage 1's unmodulated head).")
    g.add_argument("--guided_layer", type=int, default=None, help="Stage 2 student block (default n/2: 12 of 24).")
    g.add_argument("--guiding_layer", type=int, default=None, help="Stage 2 teacher block (default 2n/3: 16 of 24).")
    g.add_argument("--guide_cfg_scale", type=float, default=None, help="w (default 5).")
    g.add_argument("--align_loss_weight", type=float, default=None,
                   help="lambda of either stage's loss (default 0.5). `--stage 1 --align_loss_weight 0` trains the "
                        "vanilla baseline (no alignment head at all).")
    g.add_argument("--guide_stop_step", type=int, default=None, help="Stage 2: guide off from this step (default 50K).")
    g.add_argument("--t_range", type=float, nargs=2, default=None,
                   help="Only apply the alignment loss for t in this range (released T2I setting: every t).")
    g.add_argument("--projector_dim", type=int, default=None, help="Alignment MLP width (default 2048).")
    cli.add_guiding_autocast_arg(g)
    g.add_argument("--guiding_weights_dtype", type=str, default="auto", choices=["auto", "fp32"],
                   help="Stage 2: the frozen teacher's weights in the run's --mixed_precision dtype (auto, default: "
                        "half the memory of fp32, e.g. 5 GB instead of 10 for a 2.5B SD3.5-medium teacher; at w = 5 "
                        "bf16 weights move the guide target by at most 0.044 relative, "
                        "benchmarks/results/teacher_precision) or in fp32.")
    g = parser.add_argument_group("LoRA (both stages; unset --lora_rank: full weights)")
    g.add_argument("--lora_rank", type=int, default=None,
                   help="Train a LoRA adapter of this rank on the pretrained transformer instead of its weights.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale alpha / rank (default alpha = rank).")
    g.add_argument("--lora_target_modules", type=str, nargs="+", default=None,
                   help="Adapted modules, as paths inside a block (e.g. attn.to_q ff.net.2); default: the family's "
                        "attention and feed-forward projections (diffusers_selftrans.lora.DEFAULT_TARGET_MODULES).")
    g.add_argument("--use_dora", action="store_true", help="DoRA (weight-decomposed LoRA) adapters.")
    g.add_argument("--lora_fp32_base", action="store_true",
                   help="Keep the frozen base in fp32 under --mixed_precision fp16 / bf16. Default: the base (and a "
                        "stage-1 guide adapter) in the mixed-precision dtype, as diffusers' LoRA scripts; the trained "
                        "adapter, its EMA and the head stay fp32 either way.")
    g.add_argument("--lora_teacher", type=str, default=None, choices=["adapter", "base"],
                   help="Stage 2 teacher, on the student's own base: adapter (default) = the stage-1 LoRA output "
                        "(--guiding_model_name_or_path) as a second, frozen adapter; base = the pretrained base "
                        "itself, adapters off for the teacher pass (no stage 1).")
    cli.add_training_args(parser)
    g = parser.add_argument_group("text-to-image training")
    g.add_argument("--lr_warmup_steps", type=int, default=T2I_WARMUP_STEPS, help="Linear warm-up, then constant.")
    g.add_argument("--validation_prompts", type=str, nargs="*", default=None)
    parser.set_defaults(learning_rate=T2I_LEARNING_RATE, adam_beta2=T2I_ADAM_BETA2,
                        adam_weight_decay=T2I_WEIGHT_DECAY, output_dir="t2i-selftrans", resolution=T2I_RESOLUTION)
    args = cli.parse_args_with_config(parser, input_args)
    if args.pretrained_model_name_or_path is None:
        parser.error("--pretrained_model_name_or_path is required (the pipeline that provides VAE and text encoders).")
    if args.lora_rank is not None:
        if args.transformer_config:
            parser.error("--lora_rank adapts a pretrained transformer; it cannot train one from --transformer_config.")
        if args.stage == 1 and args.lora_teacher:
            parser.error("--lora_teacher chooses the stage-2 teacher; stage 1 has none.")
        if args.stage == 2:
            args.lora_teacher = args.lora_teacher or "adapter"
        if args.lora_teacher == "base" and args.guiding_model_name_or_path is not None:
            parser.error("--lora_teacher base guides with the pretrained base: drop --guiding_model_name_or_path.")
        if args.stage == 2 and args.torch_compile:
            parser.error("--torch_compile is not supported with a LoRA teacher: its pass switches the adapters of the "
                         "student's own module, which a compiled step cannot follow. Drop --torch_compile.")
    elif (args.lora_teacher or args.lora_alpha is not None or args.lora_target_modules or args.use_dora
          or args.lora_fp32_base):
        parser.error("--lora_teacher, --lora_alpha, --lora_target_modules, --use_dora and --lora_fp32_base need "
                     "--lora_rank.")
    if args.stage == 2 and args.guiding_model_name_or_path is None and args.lora_teacher != "base":
        parser.error("--stage 2 needs --guiding_model_name_or_path (the stage-1 output).")
    if args.stage == 1 and args.guiding_model_name_or_path is not None:
        parser.error("--stage 1 trains the guiding model; it takes no --guiding_model_name_or_path.")
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("Pass --dataset_name or --train_data_dir (images with captions).")
    if not 0.0 <= args.caption_dropout < 1.0:
        parser.error(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}.")
    if args.max_train_steps is None:
        if args.num_train_epochs is not None:
            parser.error("Give the T2I run's length in steps (--max_train_steps); epochs are not supported here.")
        args.max_train_steps = T2I_STAGE1_STEPS if args.stage == 1 else T2I_STAGE2_STEPS
    return args


# ----------------------------------------------------------------------------------------------------------------------
# 2. Text: the pipeline's own `encode_prompt`, frozen; the conditioning keywords of each family


def encode_captions(family: str, text_pipe, captions, device, max_sequence_length: int, negative=False) -> dict:
    """Captions -> the transformer's conditioning keywords, batched, computed by the pipeline's `encode_prompt` as its
    `__call__` does for a prompt (`negative`: for the negative prompt; Sana prefixes only prompts with its complex
    human instruction)."""
    captions = list(captions)
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = text_pipe.encode_prompt(
                prompt=captions, prompt_2=captions, prompt_3=captions, device=device,
                do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if family in ("pixart", "sana"):
            extra = {} if family == "pixart" else {
                "complex_human_instruction": None if negative else sana_instruction(type(text_pipe))}
            embeds, mask, _, _ = text_pipe.encode_prompt(
                captions, do_classifier_free_guidance=False, device=device, clean_caption=False,
                max_sequence_length=max_sequence_length, **extra)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if family == "flux":
            embeds, pooled, _ = text_pipe.encode_prompt(prompt=captions, prompt_2=captions, device=device,
                                                        max_sequence_length=max_sequence_length)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if family == "lumina2":  # the system prompt prefixes prompts, not the negative prompt (Lumina2Pipeline)
            embeds, mask, neg, neg_mask = text_pipe.encode_prompt(
                captions, do_classifier_free_guidance=negative, negative_prompt=captions if negative else None,
                device=device, max_sequence_length=max_sequence_length)
            embeds, mask = (neg, neg_mask) if negative else (embeds, mask)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if family == "wan":  # UMT5, zero past each caption's tokens (no mask reaches the transformer)
            embeds, _ = text_pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=max_sequence_length)
            return {"encoder_hidden_states": embeds}
        if family == "zimage":  # Qwen3 behind its chat template, each caption's unpadded tokens
            embeds, _ = text_pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False,
                                                max_sequence_length=max_sequence_length)
            return {"cap_feats": list(embeds)}
        if family == "flux2":  # Qwen3 hidden states of several layers, stacked (the pipeline's default layers)
            embeds, _ = text_pipe.encode_prompt(prompt=captions, device=device,
                                                max_sequence_length=max_sequence_length)
            return {"encoder_hidden_states": embeds}
        if family == "qwenimage":  # Qwen2.5-VL behind the prompt template, padded to the batch's longest caption
            embeds, mask = text_pipe.encode_prompt(captions, device=device, max_sequence_length=max_sequence_length)
            return pad_text(embeds, mask, max_sequence_length)
    raise ValueError(f"Unknown family {family!r}.")


def pad_text(embeds: torch.Tensor, mask, length: int) -> dict:
    """QwenImagePipeline's caption embeddings (zero past each caption's tokens, padded to the batch's longest; its
    mask `None` when no caption is padded) zero-padded to a fixed `length` with the matching mask, so a caption's
    embeddings do not depend on its batch (cached one per caption, dropped to the empty prompt's row by row). The
    padding is masked out of the joint attention and the text RoPE positions of the real tokens stay 0..L-1: the
    transformer's image output is the same at either length."""
    n, tokens, _ = embeds.shape
    if mask is None:
        mask = torch.ones(n, tokens, dtype=torch.long, device=embeds.device)
    pad = length - tokens
    return {"encoder_hidden_states": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
            "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, pad))}


def as_float(cond: dict) -> dict:
    """The conditioning's floating tensors in fp32; masks keep their integer / boolean dtype (Lumina 2 counts the
    caption's tokens off its mask)."""
    return {k: [x.float() for x in v] if isinstance(v, list) else v.float() if v.is_floating_point() else v
            for k, v in cond.items()}


def sana_instruction(pipeline_cls) -> list:
    """The complex human instruction SanaPipeline's `__call__` prefixes to every prompt by default (its
    `complex_human_instruction` default; Sana's released training prefixes the captions with it too)."""
    import inspect

    return list(inspect.signature(pipeline_cls.__call__).parameters["complex_human_instruction"].default or [])


def text_encoders_identity(family: str, text_pipe, max_sequence_length: int) -> dict:
    """What decides a caption's embeddings: the family, every text encoder's weights and the tokenizer length."""
    encoders = {name: module_digest(module) for name, module in sorted(text_pipe.components.items())
                if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)}
    return {"family": family, "text_encoders": encoders, "max_sequence_length": max_sequence_length}


class TextEmbeddings:
    """`encode_captions`, optionally cached on disk: one safetensors file per distinct caption (sha1 of the text,
    the caption itself in its metadata), written atomically, so each caption is encoded once per run (and across
    resumes and processes). The cache records the text encoders' identity (`provenance.json`): a run with other
    encoders refuses it."""

    def __init__(self, family, text_pipe, device, max_sequence_length, cache_dir=None, identity=None):
        self.family, self.text_pipe, self.device = family, text_pipe, device
        self.max_sequence_length = max_sequence_length
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is not None:
            identity = identity or text_encoders_identity(family, text_pipe, max_sequence_length)
            check_provenance(self.cache_dir, read_provenance(self.cache_dir), identity,
                             remedy="Its embeddings came from other text encoders; delete that folder to encode the "
                                    "captions again.")
            write_provenance(self.cache_dir, identity)

    def __call__(self, captions) -> dict:
        if self.cache_dir is None:
            return encode_captions(self.family, self.text_pipe, captions, self.device, self.max_sequence_length)
        from safetensors import safe_open
        from safetensors.torch import save_file

        paths = [self.cache_dir / (hashlib.sha1(c.encode("utf-8")).hexdigest() + ".safetensors") for c in captions]
        missing = sorted({c for c, p in zip(captions, paths) if not p.is_file()})
        if missing and self.text_pipe is None:
            raise ValueError(f"{len(missing)} caption(s) are not in {self.cache_dir}, whose text encoders were freed "
                             f"after encoding every caption of the data (e.g. {missing[0]!r}): is the output folder on "
                             f"a file system every process shares?")
        if missing:
            fresh = encode_captions(self.family, self.text_pipe, missing, self.device, self.max_sequence_length)
            for i, caption in enumerate(missing):
                path = self.cache_dir / (hashlib.sha1(caption.encode("utf-8")).hexdigest() + ".safetensors")
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file({k: v[i].detach().cpu().contiguous() for k, v in fresh.items()}, str(tmp),
                          metadata={"caption": caption})
                os.replace(tmp, path)
        rows = []
        for caption, path in zip(captions, paths):
            with safe_open(str(path), framework="pt") as f:
                stored = (f.metadata() or {}).get("caption", caption)
                rows.append({k: f.get_tensor(k) for k in f.keys()})
            if stored != caption:  # two captions with one sha1, or a file copied in from elsewhere
                raise ProvenanceError(f"Refusing to reuse {path}: it holds the embeddings of {stored!r}, not of "
                                      f"{caption!r}. Delete it to encode the caption again.")
        if self.family in LIST_CONDITIONING:
            return {k: [r[k].to(self.device) for r in rows] for k in rows[0]}
        return {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}


def precompute_text_embeddings(accelerator, embed: TextEmbeddings, captions, batch_size: int) -> None:
    """Encode every caption into `embed`'s cache before training: each process its share (`captions` is this
    process's part), in batches, then all wait until every file is written."""
    from tqdm.auto import tqdm

    batch = []
    with tqdm(desc="encoding captions", unit="caption", disable=not accelerator.is_local_main_process) as bar:
        for caption in captions:
            batch.append(caption)
            if len(batch) == batch_size:
                embed(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            embed(batch)
            bar.update(len(batch))
    accelerator.wait_for_everyone()


def free_text_encoders(text_pipe) -> None:
    """Drop the pipeline's text encoders (after the cache holds every caption): their memory goes back."""
    import gc

    for name in [n for n in text_pipe.components if n.startswith("text_encoder")]:
        setattr(text_pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt_embedding_kwargs(family: str, cond: dict, null: dict) -> dict:
    """The family pipeline's `prompt_embeds`-style arguments for conditioning `cond` (empty prompt: `null`), so a
    pipeline without text encoders can sample."""
    n = len(next(iter(cond.values())))
    cond = as_float(cond)  # the preview transformer is fp32
    neg = {k: v * n if isinstance(v, list) else v.expand(n, *v.shape[1:]) for k, v in as_float(null).items()}
    if family == "sd3":
        return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"],
                "negative_prompt_embeds": neg["encoder_hidden_states"],
                "negative_pooled_prompt_embeds": neg["pooled_projections"]}
    if family == "wan":
        return {"prompt_embeds": cond["encoder_hidden_states"], "negative_prompt_embeds": neg["encoder_hidden_states"]}
    if family == "zimage":
        return {"prompt_embeds": cond["cap_feats"], "negative_prompt_embeds": neg["cap_feats"]}
    if family == "flux2":
        return {"prompt_embeds": cond["encoder_hidden_states"], "negative_prompt_embeds": neg["encoder_hidden_states"]}
    if family == "qwenimage":  # CFG (`true_cfg_scale`) from the negative embeddings, not a `negative_prompt`
        return {"prompt_embeds": cond["encoder_hidden_states"],
                "prompt_embeds_mask": cond["encoder_hidden_states_mask"], "negative_prompt": None,
                "negative_prompt_embeds": neg["encoder_hidden_states"],
                "negative_prompt_embeds_mask": neg["encoder_hidden_states_mask"]}
    if family == "lumina2":
        return {"prompt_embeds": cond["encoder_hidden_states"], "prompt_attention_mask": cond["encoder_attention_mask"],
                "negative_prompt_embeds": neg["encoder_hidden_states"],
                "negative_prompt_attention_mask": neg["encoder_attention_mask"]}
    if family in ("pixart", "sana"):  # their `negative_prompt` defaults to "", which refuses negative embeddings
        return {"prompt_embeds": cond["encoder_hidden_states"], "prompt_attention_mask": cond["encoder_attention_mask"],
                "negative_prompt": None, "negative_prompt_embeds": neg["encoder_hidden_states"],
                "negative_prompt_attention_mask": neg["encoder_attention_mask"]}
    if family == "flux":  # the negative embeddings for true CFG (`true_cfg_scale`)
        return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"],
                "negative_prompt": None, "negative_prompt_embeds": neg["encoder_hidden_states"],
                "negative_pooled_prompt_embeds": neg["pooled_projections"]}
    raise ValueError(f"Unknown family {family!r}.")


def drop_captions(cond: dict, null: dict, drop: torch.Tensor) -> dict:
    """Caption dropout for CFG: rows with `drop` get the empty prompt's conditioning."""
    out = {}
    for name, value in cond.items():
        if isinstance(value, list):  # per-sample lists
            out[name] = [null[name][0].to(v.device, v.dtype) if d else v for v, d in zip(value, drop.tolist())]
            continue
        empty = null[name].to(value.device, value.dtype).expand_as(value)
        out[name] = torch.where(drop.view(-1, *([1] * (value.ndim - 1))), empty, value)
    return out


def static_kwargs(family: str, transformer, latents_shape, device, dtype, num_text_tokens: int) -> dict:
    """The per-family keywords that are neither the caption's nor the time (the same for the teacher)."""
    n, _, h, w = latents_shape
    if family == "pixart":
        if transformer.config.get("use_additional_conditions"):
            return {"added_cond_kwargs": {"resolution": torch.tensor([[h, w]] * n, device=device, dtype=dtype) * 8,
                                          "aspect_ratio": torch.ones(n, 1, device=device, dtype=dtype)}}
        return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if family == "flux":
        from diffusers import FluxPipeline

        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, device, dtype)
        return {"img_ids": img_ids, "txt_ids": torch.zeros(num_text_tokens, 3, device=device, dtype=dtype)}
    if family == "flux2":  # Flux2 pipelines' (t, h, w, l) ids of the 2x2-patchified grid and of the text tokens
        from diffusers import Flux2KleinPipeline as F2

        return {"img_ids": F2._prepare_latent_ids(torch.zeros(n, 1, h // 2, w // 2)).to(device),
                "txt_ids": F2._prepare_text_ids(torch.zeros(n, num_text_tokens, 1)).to(device)}
    if family == "qwenimage":  # QwenImagePipeline's (frame, h, w) of the packed grid, per sample, for the RoPE
        return {"img_shapes": [[(1, h // 2, w // 2)]] * n}
    return {}


def pack(family: str, latents: torch.Tensor) -> torch.Tensor:
    """Flux trains on packed 2x2 latent tokens (N, HW/4, 4C), as its pipeline samples them (Flux.2: the tokens of its
    encoder's already 2x2-patchified grid; Qwen-Image: those of its 1-frame latents (N, C, 1, H, W), packed as
    QwenImagePipeline packs them); the others on the grid."""
    if family == "flux2":
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._pack_latents(latents)
    if family == "qwenimage":
        from diffusers import QwenImagePipeline

        latents = latents.squeeze(2)  # the frame axis (one frame)
        return QwenImagePipeline._pack_latents(latents, *latents.shape)
    if family != "flux":
        return latents
    from diffusers import FluxPipeline

    n, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, n, c, h, w)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Models


def pipeline_info(path: str, revision=None):
    """(pipeline class, family, transformer class, default text length) from the pipeline's model_index.json."""
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(path, revision=revision)
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{path} is a {name}; this script trains {', '.join(PIPELINES)}.")
    family, transformer_name, text_length = PIPELINES[name]
    return getattr(diffusers, name), family, getattr(diffusers, transformer_name), text_length


def load_student(args, transformer_cls, base_dtype=None):
    """The transformer to train: from `--transformer_config`, or the pretrained one; with `--lora_rank` that one
    frozen (cast to `base_dtype` when given: the mixed-precision dtype, as diffusers' LoRA scripts keep the frozen
    weights) with the student adapter added, whose trainable parameters are fp32."""
    if args.transformer_config:
        config = json.loads(Path(args.transformer_config).read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        return transformer_cls.from_config(config)
    model = transformer_cls.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer",
                                            revision=args.revision)
    if args.lora_rank:  # only the adapter requires grad from here on; the base weights stay as loaded (or cast)
        if base_dtype is not None:
            model.to(base_dtype)
        L.add_lora(model, args.lora_rank, alpha=args.lora_alpha, target_modules=args.lora_target_modules,
                   use_dora=args.use_dora)
        for p in model.parameters():  # diffusers' `cast_training_params`: the trained adapter in fp32
            if p.requires_grad:
                p.data = p.data.float()
    return model


def alignment_for_stage(args, model, family, null, device, teacher_autocast=None, teacher_dtype=None):
    """Stage 1: `vae_align`; stage 2: `self_transcendence` with the stage-1 EMA transformer as the frozen teacher
    (LoRA: the stage-1 adapter, or the base, on the student's own module). Released T2I defaults
    (`default_t2i_options`), each overridable by its flag."""
    if args.stage == 1 and args.align_loss_weight == 0:  # the vanilla baseline: flow matching only, no head
        return build_alignment("none", model)
    n = describe_transformer(model)["num_layers"]  # the blocks `BlockFeatures` numbers
    method = "vae_align" if args.stage == 1 else "self_transcendence"
    options = default_t2i_options(method, n)
    flags = {"layer": args.align_layer} if args.stage == 1 else {
        "guided_layer": args.guided_layer, "guiding_layer": args.guiding_layer, "guidance_scale": args.guide_cfg_scale,
        "guide_stop_step": args.guide_stop_step}
    flags.update(weight=args.align_loss_weight, projector_dim=args.projector_dim)
    options.update({k: v for k, v in flags.items() if v is not None})
    if args.t_range is not None:
        options["t_range"] = tuple(args.t_range)
    if args.stage == 1:
        options["modulated_head"] = args.stage1_head == "modulated"
        return build_alignment(method, model, **options)
    if args.lora_rank:  # no second model: the teacher pass switches the student's module to the guide's adapter
        if args.lora_teacher == "adapter":  # refuses an adapter of another family, layout or base
            L.load_lora(model, args.guiding_model_name_or_path, "guide")
        teacher = L.AdapterTeacher(model, "guide" if args.lora_teacher == "adapter" else None)
        return build_alignment(method, model, teacher=teacher, null_conditioning=null,
                               teacher_autocast=teacher_autocast, **options)
    if (Path(args.guiding_model_name_or_path) / L.LORA_RECORD_NAME).is_file():
        raise ValueError(f"{args.guiding_model_name_or_path} holds a stage-1 LoRA adapter: train stage 2 with "
                         f"--lora_rank (that adapter then guides on the same base).")
    guide_config = type(model).load_config(args.guiding_model_name_or_path, subfolder=args.guiding_model_subfolder)
    check_provenance(f"the guiding model {args.guiding_model_name_or_path}",
                     {"transformer_class": guide_config.get("_class_name")},
                     {"transformer_class": type(model).__name__},
                     remedy="Stage 2 guides the student with a stage-1 model of its own family (the stage-1 output "
                            "of this script with the same --pretrained_model_name_or_path).")
    teacher = type(model).from_pretrained(args.guiding_model_name_or_path, subfolder=args.guiding_model_subfolder)
    if family == "flux" and teacher.config.get("guidance_embeds") != model.config.get("guidance_embeds"):
        raise ValueError("The Flux guiding model and the student differ in guidance_embeds.")
    return build_alignment(method, model, teacher=teacher.to(device), null_conditioning=null,
                           teacher_autocast=teacher_autocast,
                           teacher_dtype=None if teacher_dtype in (None, torch.float32) else teacher_dtype, **options)


def flow_scheduler_for_pixart():
    """PixArt-Sigma's own scheduler samples an epsilon model; ours predicts the velocity. DPM-Solver++ in its flow
    mode (what SanaPipeline ships: `prediction_type="flow_prediction"`, `use_flow_sigmas`) samples it and, unlike
    FlowMatchEulerDiscreteScheduler, has the `init_noise_sigma` PixArtSigmaPipeline reads. Its timesteps are
    `1000 sigma`, our `model_timestep`; no time shift (`flow_shift=1`)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)


def final_pipeline(args, pipeline_cls, family, transformer):
    """The original pipeline's components with the trained transformer (PixArt: a flow-matching scheduler)."""
    extra = {"scheduler": flow_scheduler_for_pixart()} if family == "pixart" else {}
    return pipeline_cls.from_pretrained(args.pretrained_model_name_or_path, transformer=transformer,
                                        revision=args.revision, **extra)


@torch.no_grad()
def save_preview(args, accelerator, pipeline_cls, family, text_pipe, model, ema, step: int, embed=None, null=None):
    """EMA weights, eval mode, a private generator: the validation prompts through the matching pipeline (with
    `embed` and `null`: their cached embeddings, for a pipeline whose text encoders were freed)."""
    if not accelerator.is_main_process:
        return None
    from diffusers.utils import make_image_grid

    trained = T.unwrap(accelerator, model)
    if hasattr(trained, "peft_config") and isinstance(ema, GatheredEMA):  # LoRA under FSDP: the base is sharded
        preview, weights = lora_preview_model(args, type(trained), ema).to(accelerator.device), contextlib.nullcontext()
    elif hasattr(trained, "peft_config"):  # LoRA: the training module itself, its adapter's EMA weights swapped in
        preview, weights = trained, L.ema_weights(trained, ema, "student")  # (and eval mode) while sampling below
    else:
        preview, weights = type(trained).from_config(trained.config).to(accelerator.device), contextlib.nullcontext()
        ema.copy_to(preview.parameters())
        preview.eval()
    components = dict(text_pipe.components, transformer=preview)
    if family == "pixart":
        components["scheduler"] = flow_scheduler_for_pixart()
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(args.validation_prompts or DEFAULT_VALIDATION_PROMPTS)
    kwargs = {"max_sequence_length": args.max_sequence_length, "guidance_scale": args.validation_guidance_scale}
    if family in ("pixart", "sana"):  # the training captions were neither cleaned nor binned (Sana: instruction-
        kwargs.update(use_resolution_binning=False, clean_caption=False)  # prefixed, as its pipeline's default)
    if family == "wan":  # one frame, as trained
        kwargs.update(num_frames=1, output_type="pil")
    if family == "flux":  # FluxPipeline: `guidance_scale` is the embedded guidance (as trained), CFG `true_cfg_scale`
        kwargs.update(guidance_scale=args.flux_guidance_scale, true_cfg_scale=args.validation_guidance_scale,
                      negative_prompt=[""] * len(prompts))
    if family == "qwenimage":  # QwenImagePipeline: CFG is `true_cfg_scale` with a negative prompt (no guidance input)
        kwargs.update(guidance_scale=None, true_cfg_scale=args.validation_guidance_scale,
                      negative_prompt=[""] * len(prompts))
    if embed is not None:  # the text encoders were freed: the prompts' cached embeddings
        kwargs.update(prompt_embedding_kwargs(family, embed(prompts), null))
        prompts = None
    # under fp16 / bf16 mixed precision the pipeline mixes dtypes (a half-precision VAE decodes the fp32 latents of
    # an fp32 transformer, or of LoRA's fp32 adapter): autocast, as diffusers' validation does (fp32: a no-op)
    with weights, accelerator.autocast():
        result = pipe(prompt=prompts, height=args.resolution, width=args.resolution,
                      num_inference_steps=args.validation_num_inference_steps,
                      generator=torch.Generator("cpu").manual_seed(args.seed), **kwargs)
    images = [video[0] for video in result.frames] if family == "wan" else result.images
    grid = make_image_grid(images, rows=1, cols=len(images))
    path = Path(args.output_dir) / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# 4. Training


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    output_dir = Path(args.output_dir)
    # 4.1 Accelerator, logging, seeds
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=7200))],
    )
    T.configure_logging()
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not accelerator.is_fsdp2:
        # FSDP1 flattens the parameters into FlatParameters: the shard-local EMA below needs FSDP2's DTensors.
        raise NotImplementedError("This script supports FSDP through FSDP2 only: set `fsdp_version: 2` in the "
                                  "accelerate config (or `accelerate launch --use_fsdp --fsdp_version 2`).")
    if fsdp and args.torch_compile:
        raise NotImplementedError("--torch_compile is not supported under FSDP here; drop it or use DDP.")
    T.set_tf32(args.allow_tf32)
    # the output folder: locked for this run; a run that does not resume needs it empty (runs.py)
    args.run_id, lock, resume = R.claim_output_dir(
        accelerator, output_dir, resume_from_checkpoint=args.resume_from_checkpoint,
        allow_inexact=args.allow_inexact_resume, overwrite=args.overwrite_output_dir, break_lock=args.break_run_lock)
    if accelerator.is_main_process:  # args.json once the set-up passed its checks (a failed start leaves nothing)
        output_dir.mkdir(parents=True, exist_ok=True)
    per_device, global_batch = T.batch_sizes(args.global_batch_size, args.train_batch_size,
                                             accelerator.num_processes, args.gradient_accumulation_steps)
    # frozen parts (VAE, text encoders) in the mixed-precision dtype, as diffusers' SD3 / Flux examples do
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    set_seed(args.seed)

    # 4.2 The pipeline's frozen VAE and text encoders; the empty prompt (CFG dropout and the teacher's f_u)
    pipeline_cls, family, transformer_cls, text_length = pipeline_info(args.pretrained_model_name_or_path,
                                                                       args.revision)
    dtype = {} if weight_dtype == torch.float32 else {"torch_dtype": weight_dtype}
    text_pipe = pipeline_cls.from_pretrained(args.pretrained_model_name_or_path, transformer=None,
                                             revision=args.revision, **dtype)
    text_pipe.to(accelerator.device)
    for module in text_pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    vae = text_pipe.vae
    encoder = {"wan": VideoLatentEncoder, "qwenimage": VideoLatentEncoder,
               "flux2": Flux2LatentEncoder}.get(family, T.LatentEncoder)(vae)
    args.max_sequence_length = args.max_sequence_length or text_length
    text_identity = text_encoders_identity(family, text_pipe, args.max_sequence_length)
    embed = TextEmbeddings(family, text_pipe, accelerator.device, args.max_sequence_length,
                           output_dir / TEXT_EMBEDDINGS_FOLDER if args.precompute_text_embeddings else None,
                           identity=text_identity)
    null = as_float(encode_captions(family, text_pipe, [""], accelerator.device, args.max_sequence_length,
                                    negative=True))

    # 4.3 Data: images and captions, sharded by the stream itself (one sharding layer: not passed to `prepare`), with
    # an exact, per-process resumable position (the SiT scripts' `TrainDataStream`)
    stream = TrainDataStream(DataConfig.from_namespace(args), per_device, process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes, seed=args.seed)
    preview_embed = None
    if args.precompute_text_embeddings:  # every caption encoded once, shared across processes; then no encoders
        captions = stream.source.all_captions(accelerator.process_index, accelerator.num_processes)
        if accelerator.is_main_process:
            captions = itertools.chain(captions, args.validation_prompts or DEFAULT_VALIDATION_PROMPTS)
        precompute_text_embeddings(accelerator, embed, captions, batch_size=max(per_device, 8))
        free_text_encoders(text_pipe)
        embed.text_pipe = None
        preview_embed = embed

    # 4.4 The student, the alignment method of the stage, EMA, optimizer, warm-up
    # LoRA under fp16 / bf16 mixed precision: the frozen base in that dtype (half its fp32 memory), the adapter fp32.
    # Not under FSDP: its MixedPrecisionPolicy gathers and computes the shards in that dtype already (each process
    # stores 1/N of the base in fp32), and the cast base is untested there.
    lora_base_dtype = None if not args.lora_rank or args.lora_fp32_base or fsdp or weight_dtype == torch.float32 \
        else weight_dtype
    model = load_student(args, transformer_cls, lora_base_dtype)
    latent_side = T.vae_latent_size(vae, args.resolution)
    sample_size = model.config.get("sample_size")
    if family in ("sd3", "pixart") and sample_size is not None and sample_size < latent_side:
        raise ValueError(f"--resolution {args.resolution} gives {latent_side}x{latent_side} latents but the "
                         f"transformer's sample_size is {sample_size}.")
    if family in ("flux", "flux2") and latent_side % 2:  # FluxPipeline packs 2x2 latent patches
        raise ValueError(f"--resolution {args.resolution} gives {latent_side}x{latent_side} latents; Flux packs 2x2 "
                         f"patches: use a multiple of {2 * T.vae_downsample_factor(vae)}.")
    if family == "sana" and args.resolution % 32:  # refused by SanaPipeline, i.e. by the previews and the export's use
        raise ValueError(f"--resolution {args.resolution}: SanaPipeline samples only sides divisible by 32.")
    if family == "zimage" and args.resolution % (2 * T.vae_downsample_factor(vae)):  # ZImagePipeline's check
        raise ValueError(f"--resolution {args.resolution}: ZImagePipeline samples only sides divisible by "
                         f"{2 * T.vae_downsample_factor(vae)}.")
    if family == "qwenimage" and args.resolution % (2 * T.vae_downsample_factor(vae)):  # else the pipeline resizes
        raise ValueError(f"--resolution {args.resolution}: QwenImagePipeline samples only sides divisible by "
                         f"{2 * T.vae_downsample_factor(vae)}.")
    if family == "wan" and args.resolution % 16:
        raise ValueError(f"--resolution {args.resolution}: WanPipeline samples only sides divisible by 16.")
    if family == "lumina2" and (args.resolution % 16 or T.vae_downsample_factor(vae) != 8):
        raise ValueError(f"--resolution {args.resolution} with a {T.vae_downsample_factor(vae)}x VAE: "
                         "Lumina2Pipeline samples only sides divisible by 16 with an 8x VAE.")
    model.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    feats = BlockFeatures(model)  # hooks registered before any torch.compile
    method = alignment_for_stage(args, model, family, null, accelerator.device,
                                 teacher_autocast=T.teacher_autocast_dtype(args.guiding_autocast,
                                                                           accelerator.mixed_precision),
                                 teacher_dtype=weight_dtype if args.guiding_weights_dtype == "auto" else None)
    heads = method.trainable_modules()
    if args.lora_rank and not fsdp:  # the EMA of the adapter alone
        ema = L.adapter_ema(model, "student", decay=args.ema_decay, min_decay=args.ema_decay, foreach=True)
    elif not fsdp:  # under FSDP the EMA is built on the sharded parameters, after `prepare`
        ema = EMAModel(model.parameters(), decay=args.ema_decay, min_decay=args.ema_decay, foreach=True,
                       model_cls=transformer_cls, model_config=model.config)
    params = [p for m in (model, *heads) for p in m.parameters() if p.requires_grad]  # LoRA: adapter and heads
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                  fused=args.fused_adamw and accelerator.device.type == "cuda" and not fsdp)
    # accelerate steps a prepared scheduler once per process each step: scale the warm-up (diffusers' examples do too)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes)
    if args.torch_compile:  # the transformer only (the SiT scripts compile forward and loss as one graph)
        model = torch.compile(model, backend=args.torch_compile_backend)
        feats.model = model
    shard_states = []  # per-process checkpoint state (FSDP: each process's EMA shards)
    if fsdp:
        # accelerate's FSDP2 prepares one model: the transformer and the alignment heads as one module. The frozen
        # teacher (stage 2) stays outside, unsharded on every process: it has no gradients nor optimizer state.
        # LoRA: the frozen base is sharded with the adapters (block by block), the teacher is that same module.
        model, optimizer, lr_scheduler = accelerator.prepare(TrainableModules(model, heads), optimizer,
                                                             lr_scheduler)
        core, heads = model.transformer, list(model.heads)
        params = list(model.parameters())  # the sharded DTensors (what `clip_grad_norm_` matches to the model)
        # each process's EMA of its own shards: of the whole transformer, or (LoRA) of the student adapter alone
        followed = L.adapter_parameters(core, "student") if args.lora_rank else core.parameters()
        ema = EMAModel(followed, decay=args.ema_decay, min_decay=args.ema_decay, foreach=True)
        shard_states.append(ShardedEMAState(ema, accelerator.process_index))
        if args.lora_rank and args.stage == 2:
            # The LoRA teacher pass runs on the student's own, now sharded, module: through the FSDP root, as the
            # student's forward, so that the root's hooks (unshard, mixed-precision casts) run around it too. Its
            # early exit is no interruption: the block lists are cut before the call (`BlockFeatures`), the forward
            # returns normally, and each block that runs is unsharded and resharded by its own FSDP hooks; the
            # blocks past the guiding one are never gathered.
            method.guide.features.model = model
        sync_modules = (model,)
    else:
        model, optimizer, lr_scheduler, *heads = accelerator.prepare(model, optimizer, lr_scheduler, *heads)
        core = T.unwrap(accelerator, model)  # the transformer itself: its family, config and parameters
        sync_modules = (model, *heads)
    feats.model = model  # the prepared (DDP / FSDP) module runs the forward; the hooks sit on the inner blocks
    method.set_trainable_modules(heads)
    lora_params = L.adapter_parameters(core, "student") if args.lora_rank else None  # what the adapter's EMA follows
    if not fsdp:  # FSDP's `prepare` placed the sharded heads and EMA; `.to` cannot swap DTensor parameters
        method.to(accelerator.device)
        ema.to(accelerator.device)
        if args.lora_rank:  # checkpoints: the adapter and its EMA, not the base
            L.register_checkpoint_hooks(accelerator, ema, "student")
        else:
            C.register_checkpoint_hooks(accelerator, ema, transformer_cls=transformer_cls)
    transport = Transport(time_sampling=args.time_sampling)
    if accelerator.is_main_process:
        C.save_args(args, output_dir / "args.json")

    # 4.5 Resume (exact: weights, EMA, optimizer, warm-up, RNG of every process, data position, loss guard)
    global_step = 0
    guard = T.NonFiniteGuard(accelerator, args.max_nonfinite_steps, explosion_factor=args.loss_explosion_factor)
    # what the checkpoints depend on besides the flags: data size, processes, batch, VAE and text encoders
    provenance = C.checkpoint_provenance(
        dataset_size=stream.num_examples, num_processes=accelerator.num_processes, global_batch_size=global_batch,
        vae_encoder=vae_encoder_identity(vae),
        text_encoders=text_identity["text_encoders"],
        **({"lora_base": L.base_digest(core)} if args.lora_rank else {}))  # LoRA: the base the adapter is trained on
    args.resume_history = []
    if resume is not None:
        accelerator.print(f"Resuming from {resume}")
        global_step, args.resume_history = C.resume_training(accelerator, resume, run_args=vars(args),
                                                             optimizer=optimizer, ema=ema, stream=stream, guard=guard,
                                                             process_states=shard_states, provenance=provenance,
                                                             allow_inexact=args.allow_inexact_resume)
        # a changed --learning_rate is the new peak of the warm-up schedule (LambdaLR: lr = base_lr * factor(step))
        schedule = lr_scheduler.scheduler
        schedule.base_lrs = [args.learning_rate] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas):
            group["lr"] = args.learning_rate * factor(schedule.last_epoch)
        if accelerator.is_main_process:
            C.save_args(args, output_dir / "args.json")
    else:
        set_seed(args.seed, device_specific=True)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_project_name or output_dir.name, config=T.tracker_config(vars(args)))
    log = T.StepLog(accelerator, output_dir / "loss_log.jsonl", initial_step=global_step,
                    total_steps=args.max_train_steps, logging_steps=args.logging_steps, images_per_step=global_batch,
                    progress=args.progress)
    batches = iter(stream)
    preemption = R.Preemption()  # SIGTERM / SIGUSR1 / SIGINT: finish the step, checkpoint, exit (runs.py)

    # 4.6 Loop
    while global_step < args.max_train_steps:
        step_start = time.perf_counter()
        with accelerator.accumulate(*sync_modules):
            batch = next(batches)
            x0 = pack(family, encoder(batch, accelerator.device))  # scaled latents, fresh posterior sample
            cond = as_float(embed(batch["captions"]))  # the caption's (never dropped)
            t, noise, x_t, target = transport.sample(x0)
            drop = torch.rand(x0.shape[0], device=x0.device) < args.caption_dropout
            student_cond = drop_captions(cond, null, drop)
            teacher_cond = student_cond if args.teacher_captions == "dropped" else cond
            n_text = cond["encoder_hidden_states"].shape[1] if family in ("flux", "flux2") else 0  # their txt_ids
            static = static_kwargs(family, core, encoder_shape(batch, vae), x0.device, x0.dtype, n_text)
            shared = {}
            if family == "flux" and core.config.get("guidance_embeds"):
                shared = {"guidance": torch.full((x0.shape[0],), args.flux_guidance_scale, device=x0.device)}
            active = method.is_active(global_step)
            out = feats(**model_inputs(core, x_t, t), layers=method.student_layers if active else (),
                        return_time_embedding=active and getattr(method, "needs_time_embedding", False),
                        **student_cond, **static, **shared)
            velocity = model_velocity(core, out.sample)
            loss_diff = ((velocity.float() - target.float()) ** 2).mean()
            terms = method(out.hidden_states, x_t=x_t, t=t, target=target, x0=x0, noise=noise, step=global_step,
                           conditioning=teacher_cond, shared_kwargs=shared or None, model_kwargs=static,
                           time_embedding=out.time_embedding) if active else {}
            loss = loss_diff + sum(method.weights[name] * value for name, value in terms.items())
            accelerator.backward(loss)
            guard.observe(loss)
            # The step's one host read, once its backward is queued (a collective): every process skips a step that
            # is bad anywhere, learns of a preemption signal, and gets the logged values.
            stepped = accelerator.sync_gradients and guard.check(
                stop_requested=preemption.requested, counts={"data_skipped": stream.skips.num_skipped},
                logged={"loss": loss, "loss_diff": loss_diff, **{f"loss_{k}": v for k, v in terms.items()}})
            if stepped:
                if args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients go too
        if stepped:
            ema.step(core.parameters() if lora_params is None else lora_params)
        log.train_seconds += time.perf_counter() - step_start  # every micro-step counts, EMA included
        if not stepped:
            continue
        global_step += 1
        log.step(global_step, guard.values, lr=lr_scheduler.get_last_lr()[0], nonfinite_skipped=guard.skipped)
        if global_step % args.checkpointing_steps == 0 or guard.stop_requested:
            checkpoint = C.save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit,
                                           stream=stream, run_args=vars(args), guard=guard,
                                           process_states=shard_states, provenance=provenance)
        if guard.stop_requested:  # preempted: every process stops after this same step, its checkpoint written
            log.close()
            R.exit_preempted(preemption, global_step, checkpoint, lock)
        if global_step % args.validation_steps == 0:
            save_preview(args, accelerator, pipeline_cls, family, text_pipe, core, full_ema(ema), global_step,
                         preview_embed, null)
    log.close()
    preemption.restore()

    # 4.7 The matching diffusers pipeline with the EMA transformer (LoRA: the EMA adapter), a preview, the model
    # card, the Hub
    accelerator.wait_for_everyone()
    export_ema = full_ema(ema)  # FSDP: every process takes part in gathering the shards
    if args.lora_rank:  # the EMA adapter, for `load_lora_weights` on the base pipeline, and its alignment head
        # (every process: under FSDP the base digest and the heads gather their shards; the main one writes)
        L.save_lora(output_dir, pipeline_cls, core, "student", ema=export_ema,
                    is_main_process=accelerator.is_main_process)
        for head in heads:
            save_whole(T.unwrap(accelerator, head), output_dir / "projector", accelerator.is_main_process)
    if accelerator.is_main_process:
        if not args.lora_rank:
            final = transformer_cls.from_config(core.config)
            export_ema.copy_to(final.parameters())
            final_pipeline(args, pipeline_cls, family, final.eval()).save_pretrained(output_dir)
        grid = save_preview(args, accelerator, pipeline_cls, family, text_pipe, core, export_ema, global_step,
                            preview_embed, null)
        if grid is not None:
            os.replace(grid, output_dir / "samples.png")
        hparams = {k: v for k, v in vars(args).items() if "--" + k not in C.SECRET_FLAGS and k != "launch_command"}
        hub.render_model_card(
            output_dir, template="t2i.md", hyperparameters=hparams, command=args.launch_command,
            repo_id=args.hub_model_id or output_dir.name, dataset=args.dataset_name,
            data_description="local files" if args.train_data_dir else None, sample_image="samples.png",
            base_model=args.guiding_model_name_or_path if args.stage == 2 and not args.lora_rank
            else args.pretrained_model_name_or_path,
            metrics={"final_loss": log.last.get("loss"), "steps": global_step, "nonfinite_skipped": guard.skipped,
                     "data_skipped": log.last.get("data_skipped"),
                     **({"resume_history": json.dumps(args.resume_history)} if args.resume_history else {})},
            extra={"pipeline_class": pipeline_cls.__name__, "stage": args.stage,
                   "pretrained_model": args.pretrained_model_name_or_path,
                   "guiding_model": args.guiding_model_name_or_path,
                   "lora": args.lora_rank and {"rank": args.lora_rank, "alpha": args.lora_alpha or args.lora_rank,
                                               "dora": args.use_dora, "teacher": args.lora_teacher,
                                               "diffusers_loader": hasattr(pipeline_cls, "load_lora_weights")}},
            tags=["diffusers", "diffusers-selftrans", "self-transcendence", "text-to-image", family, "flow-matching"]
            + (["lora"] if args.lora_rank else []),
            pipeline_tag="text-to-image",  # the license: the base pipeline's (its VAE and text encoders ship here)
            license_from=[args.pretrained_model_name_or_path, args.guiding_model_name_or_path])
        if args.push_to_hub:
            repo_id = hub.push_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token,
                                      private=args.hub_private, commit_message=f"Upload {pipeline_cls.__name__}")
            logger.info(f"Pushed to https://huggingface.co/{repo_id}", main_process_only=True)
    R.finish_run(accelerator, lock)
    return output_dir


class TrainableModules(torch.nn.Module):
    """The transformer and the alignment heads as one module, for FSDP2 (accelerate prepares one model with it).
    `forward` is the transformer's; the heads are called by the alignment method on the block features."""

    def __init__(self, transformer: torch.nn.Module, heads):
        super().__init__()
        self.transformer = transformer
        self.heads = torch.nn.ModuleList(heads)
        # accelerate's TRANSFORMER_BASED_WRAP without a class list wraps the blocks the transformer declares
        self._no_split_modules = getattr(transformer, "_no_split_modules", None)

    def forward(self, *args, **kwargs):
        return self.transformer(*args, **kwargs)


class ShardedEMAState:
    """Checkpoint state of an EMA kept on FSDP2-sharded parameters: each process saves and loads its own shards
    (`transformer_ema_shards_rank{R}.pt`) and the EMA counters, so a resume is exact. `full_ema` gathers the shards
    for export."""

    def __init__(self, ema: EMAModel, process_index: int):
        self.ema, self.rank = ema, process_index

    def state_file(self, folder) -> Path:
        return Path(folder) / f"transformer_ema_shards_rank{self.rank}.pt"

    def save_state(self, folder) -> None:
        state = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        state["shadow_params"] = [_local(p).detach().cpu().clone() for p in self.ema.shadow_params]
        torch.save(state, self.state_file(folder))

    def load_state(self, folder) -> None:
        path = self.state_file(folder)
        if not path.is_file():
            raise ValueError(f"{path} is missing: the checkpoint was not written by an FSDP run with this many "
                             f"processes.")
        state = torch.load(path, weights_only=True)
        saved = state.pop("shadow_params")
        if len(saved) != len(self.ema.shadow_params) or any(
                s.shape != _local(p).shape for s, p in zip(saved, self.ema.shadow_params)):
            raise ValueError(f"{path} holds EMA shards of other shapes than this run's (a different model or "
                             f"number of processes).")
        for s, p in zip(saved, self.ema.shadow_params):
            _local(p).copy_(s)
        for key, value in state.items():
            setattr(self.ema, key, value)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class GatheredEMA:
    """The full EMA weights gathered from FSDP2 shards (on CPU), with EMAModel's `copy_to` and `shadow_params`
    (what `lora.save_lora` reads)."""

    def __init__(self, tensors):
        self.tensors = self.shadow_params = tensors

    def copy_to(self, parameters) -> None:
        for tensor, param in zip(self.tensors, parameters):
            param.data.copy_(tensor.to(param.device, param.dtype))


def full_ema(ema: EMAModel):
    """`ema` itself when unsharded; under FSDP2 its full weights, gathered (a collective: call on every process)."""
    if not any(hasattr(p, "full_tensor") for p in ema.shadow_params):
        return ema
    return GatheredEMA([p.full_tensor().cpu() if hasattr(p, "full_tensor") else p.cpu() for p in ema.shadow_params])


def save_whole(module, folder, is_main_process: bool) -> None:
    """`module.save_pretrained(folder)` on the main process; under FSDP2 (DTensor parameters) every process calls it:
    the shards are gathered into an unsharded copy of the module that the main process saves."""
    state = module.state_dict()
    if not any(hasattr(v, "full_tensor") for v in state.values()):
        if is_main_process:
            module.save_pretrained(folder)
        return
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in state.items()}
    if is_main_process:
        whole = type(module).from_config({k: v for k, v in module.config.items() if not k.startswith("_")})
        whole.load_state_dict(state)
        whole.save_pretrained(folder)


def lora_preview_model(args, transformer_cls, ema: GatheredEMA):
    """Previews under FSDP with LoRA: the pretrained base loaded whole (on the main process, as the full-weight
    previews under FSDP build the whole model) with the student's adapter holding the gathered EMA weights."""
    model = transformer_cls.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer",
                                            revision=args.revision)
    L.add_lora(model, args.lora_rank, alpha=args.lora_alpha, target_modules=args.lora_target_modules,
               use_dora=args.use_dora)
    ema.copy_to(L.adapter_parameters(model, "student"))
    return model.eval().requires_grad_(False)


def encoder_shape(batch, vae):
    """(N, C, h, w) of the latent grid of a pixel batch (any VAE: `AutoencoderKL`, Sana's `AutoencoderDC`, Wan's)."""
    n, _, h, w = batch["pixel_values"].shape
    factor = T.vae_downsample_factor(vae)
    return n, vae.config.get("latent_channels") or vae.config.z_dim, h // factor, w // factor


class Flux2LatentEncoder:
    """Images -> Flux.2's normalised 2x2-patchified latents (N, 4C, H/2, W/2): a fresh posterior sample each step,
    patchified and normalised by the VAE's BatchNorm running statistics (what Flux.2's pipelines undo to decode)."""

    def __init__(self, vae):
        self.vae = vae
        self.mean = vae.bn.running_mean.detach().float().view(1, -1, 1, 1)
        self.std = torch.sqrt(vae.bn.running_var.detach().float() + vae.config.batch_norm_eps).view(1, -1, 1, 1)

    @torch.no_grad()
    def __call__(self, batch, device) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        if "latent_mean" in batch:
            raise ValueError("Flux.2 trains from images (its latents are normalised after patchifying), not from "
                             "cached latents.")
        z = self.vae.encode(batch["pixel_values"].to(device, self.vae.dtype)).latent_dist.sample().float()
        return (Flux2KleinPipeline._patchify_latents(z) - self.mean.to(device)) / self.std.to(device)


class VideoLatentEncoder:
    """Images -> the normalised latents (N, C, 1, H, W) of 1-frame videos, x0 = (z - latents_mean) / latents_std
    (what WanPipeline and QwenImagePipeline undo before decoding), z a fresh posterior sample each step (as
    `T.LatentEncoder`)."""

    def __init__(self, vae):
        self.vae = vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(vae.config.latents_mean).view(shape)
        self.std = torch.tensor(vae.config.latents_std).view(shape)

    @torch.no_grad()
    def __call__(self, batch, device) -> torch.Tensor:
        if "latent_mean" in batch:
            raise ValueError("Wan and Qwen-Image train from images (their VAEs encode 1-frame videos), not from "
                             "cached latents.")
        pixels = batch["pixel_values"].to(device, self.vae.dtype).unsqueeze(2)
        z = self.vae.encode(pixels).latent_dist.sample().float()
        return (z - self.mean.to(device)) / self.std.to(device)


if __name__ == "__main__":
    main()

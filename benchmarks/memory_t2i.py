# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Peak memory per GPU of one text-to-image Self-Transcendence training step at the real model sizes (issue 27,
item 4): SD3.5-medium, PixArt-Sigma XL, Sana 1.6B and Flux.1-dev, as `examples/train_self_transcendence_t2i.py`
trains them (bf16 mixed precision, text embeddings precomputed: no text encoder held, AdamW + EMA).

Scope, per family at its real size and resolution (1024 px: SD3.5/PixArt-Sigma/Flux 128x128 latents, patch 2 or
packed 2x2 -> 4096 image tokens; Sana's DC-AE f32 -> 32x32 = 1024 tokens) with the family's text length (SD3:
77 CLIP + 256 T5 = 333 joint tokens, Flux 512, PixArt 300, Sana 300), and per-GPU batch 32 (the released global
batch 256 over 8 GPUs) and 1 (the minimum):
- `stage1`: stage 1 (`--stage 1`: block n/6 through the projector and the time-modulated head);
- `stage2_guided`: stage 2 while the guide is on (the frozen teacher, bf16 weights: `--guiding_weights_dtype auto`,
  runs ONE batched no-grad pass [caption, empty prompt] (batch 2N) to block 2n/3; the student's block n/2 goes through
  the projector);
- `stage2_after_stop`: stage 2 after the guide stop (no teacher, no projector pass: a vanilla step);
each with and without gradient checkpointing, for two ways to run on 8 GPUs:
- `ddp`: every GPU holds the whole student (accelerate's DDP, as the SiT table);
- `fsdp2`: the student and its heads sharded over 8 GPUs (FSDP2, `TrainableModules`): weights, gradients, AdamW
  and EMA / 8, the frozen teacher whole on every GPU.

How each number is obtained (the SiT benchmark's method, `benchmarks/memory_table.py`, whose tracker this reuses):
1. Parameter counts: the real transformers built on the meta device from their published configs, checked against
   the published sizes (stored tensors = parameters + persistent buffers: SD3.5-medium's 384x384 positional
   embedding is a 0.23B-element buffer inside its "2.5B"). Text encoders and VAEs the same way (their sizes).
2. Model states by arithmetic from those counts (bytes per GPU; P = student parameters, P_h = projector/head):
   ddp: student fp32 weights 4P + gradients 4P + AdamW 8P (16 B/param), EMA 4P, DDP gradient buckets 4(P + P_h)
   (accelerate's default `gradient_as_bucket_view=False`), the head 16 B/param while it trains (12 after the stop),
   the teacher 2P (bf16 weights; 4P with `--guiding_weights_dtype fp32`), the student's buffers in fp32 and the
   teacher's in bf16, the VAE 2 B/param (bf16, held to encode the images). fsdp2: (16 + 4) P / 8 and 16 P_h / 8, no
   DDP buckets, buffers replicated, teacher whole, plus FSDP2's all-gather/reduce-scatter working set (an estimate:
   bf16 copies of the unwrapped root parameters for the whole step, and of the largest wrapped block for the block
   running, the one prefetched, its unsharded gradient and the one being reduce-scattered: 2 (P_root + 4 P_block)).
   Text encoders: 0 (`--precompute_text_embeddings`); their bf16 size is given for runs without it.
   A probe step checks the weights, gradients, AdamW moments, EMA and the teacher's weights against these formulas.
3. Activations: MEASURED on this CPU with the SiT benchmark's dispatch-level tracker (`LiveStorageTracker`: every
   storage allocated during the step and when it is freed) around the script's own training step (the loop body of
   `train_self_transcendence_t2i.main`, rebuilt here from its helpers `drop_captions`, `static_kwargs`, `pack`, with
   `BlockFeatures`, `model_timestep`, `model_velocity` and the library's alignment methods), under CPU bf16
   autocast wrapped around the student's and the heads' forward as `accelerate.prepare` does (CUDA autocast's fp32
   `layer_norm` imitated), the teacher under the same autocast with bf16 weights. The batch (latents, caption
   embeddings) is allocated inside the step and counts. The step is cut into windows (the student's forward; the
   losses before the teacher pass (stage 1: its head); the teacher pass; the projector and guide loss; the backward)
   and each window's peak, the largest total of live storages that are not gradients, is extrapolated on its own
   (a window's peak is one event, so it scales like that event); the row's activations are the largest window.
   - Depth: probes with the smallest set of blocks that holds every block kind, and one block of each kind added
     (SD3.5: [joint, last] + a joint or a dual-attention block; Flux: [double, single] + a double or a single;
     PixArt/Sana: 1 block + 1), at batch 1 and 2: what one block leaves held (added-block probe - base probe, after
     the forward) is multiplied out to the model's count of that kind, and the per-sample bytes (batch 2 - batch 1)
     to the target batch. The backward peaks either at its start (everything held: grows the same way) or while
     one block is differentiated (with checkpointing, recomputed) after the heads' tensors are gone: the vanilla
     step's held bytes + the largest excess of one block of any kind over them (block working sets do not add up);
     the larger of the two. The probes' stage layers have the kind of the real ones (the Flux teacher stops in a
     single block as at block 38 of 57; SD3.5's at a joint block as at 16 of 24).
   - Width: the probes run at two narrow widths (fewer heads, the head width kept: Flux's RoPE axes and the
     attention kernels see the real head shape; SD3.5 3 and 6 of 24 heads, PixArt-Sigma 2 and 4 of 16, Sana 7 and
     14 of 70, Flux 2 and 4 of 24: narrower than a quarter to keep the run short, a 6-head Flux probe step taking
     twice a 4-head one's time here) with the real token counts and text widths, and each measured byte
     count is extrapolated LINEARLY in the number of heads to the real width: every stored activation is tokens x
     width (or tokens x heads for the attention kernels' log-sum-exp; no tokens^2 score matrix is stored by the
     flash / memory-efficient kernels) or independent of the width (the projector's 2048-wide hidden layer, the
     caption embeddings, the latents). The one part quadratic in the width, autocast's bf16 copies of the weights
     (held for backward: the batch-independent part), is not extrapolated: each copy the tracker sees being made
     from a parameter is counted at the size of the same parameter at the real width (both probe widths then hold
     the real-width copies). Under FSDP2 the parameters arrive in bf16 (MixedPrecisionPolicy param_dtype = bf16,
     accelerate's default with bf16), autocast makes no copies: the fsdp2 rows leave them out and count the
     working set of step 2 instead. Checked: a full-width PixArt-Sigma probe against the width extrapolation, and a
     full-depth SD3.5-medium step (narrow) against the depth extrapolation.
4. Optimizer/EMA step: AdamW's and `EMAModel(foreach=True)`'s temporaries, measured per parameter on a probe:
   fused AdamW for ddp (the script's default on CUDA without FSDP), foreach AdamW for fsdp2 (the script turns
   fused off under FSDP), the EMA step after zero_grad. Peak = model states + max(activation peak, optimizer/EMA
   transient); all gradients are counted next to the activation peak (an upper bound).
Not counted: the CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers, allocator fragmentation, the VAE encoder's
activations (transient, before the forward; none with precomputed latents), the text encoders' activations.

    python benchmarks/memory_t2i.py                          # the committed table (benchmarks/results/memory_t2i)
    python benchmarks/memory_t2i.py --families PixArt-Sigma-XL --output_dir /tmp/mem_t2i
    python benchmarks/memory_t2i.py --smoke --output_dir /tmp/mem_t2i_smoke   # tiny models, seconds

Writes `results.json` (every number, the probes, the checks, the command) and `results.md` (tables in GiB per GPU).
"""

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, Dict, List, Optional, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import diffusers  # noqa: E402
import memory_table as MT  # noqa: E402  (the tracker, the autocast imitation, fit status, display)
import train_self_transcendence_t2i as t2i  # noqa: E402  (the script's own step helpers)
from diffusers.training_utils import EMAModel  # noqa: E402

from diffusers_selftrans.alignment import build_alignment, default_t2i_options  # noqa: E402
from diffusers_selftrans.cli import DEFAULT_EMA_DECAY, DEFAULT_MAX_GRAD_NORM  # noqa: E402
from diffusers_selftrans.models.block_features import BlockFeatures, model_timestep, model_velocity  # noqa: E402
from diffusers_selftrans.models.projector import DEFAULT_PROJECTOR_DIM  # noqa: E402
from diffusers_selftrans.transport import Transport  # noqa: E402

SCRIPT = "benchmarks/memory_t2i.py"
STAGES = ("stage1", "stage2_guided", "stage2_after_stop")
STAGE_LABELS = {"stage1": "stage 1", "stage2_guided": "stage 2, guided",
                "stage2_after_stop": "stage 2, after the stop"}
MODES = ("ddp", "fsdp2")
MODE_LABELS = {"ddp": "DDP, 8 GPUs (whole student per GPU)", "fsdp2": "FSDP2, 8 GPUs (student sharded / 8)"}
MODE_SHORT = {"ddp": "DDP", "fsdp2": "FSDP2"}
# Windows of the step whose activation peaks are extrapolated separately (each is the max of its own events; the
# row's activations are the largest window): the student's forward, from its end to the teacher pass (velocity loss;
# stage 1: the head and its loss), the teacher pass, after it (projector, guide loss), the backward.
PHASES = ("student_forward", "loss_pre", "teacher", "loss_post", "backward")
PHASE_LABELS = {"student_forward": "student forward", "loss_pre": "losses (stage 1: head)", "teacher": "teacher pass",
                "loss_post": "projector + guide loss", "backward": "backward"}
# What a window holds that grows with the depth (the per-block increment read off the vanilla probes).
HELD_KEY = {"student_forward": "student_forward", "loss_pre": "backward_start", "teacher": "backward_start",
            "loss_post": "backward_start", "backward": "backward_start"}


def phases_of(stage: str) -> Tuple[str, ...]:
    return PHASES if stage == "stage2_guided" else ("student_forward", "loss_pre", "backward")
PROBE_BATCHES = (1, 2)
NEVER_STOP = MT.NEVER_STOP
# The released T2I setting: global batch 256 over 8 GPUs (32 per GPU); 1 is the least a step can take.
BATCHES = (32, 1)
NUM_GPUS = 8
FP32, BF16 = 4, 2
ADAMW_STATES = 2
GIB = 2**30
# Flux guidance fed during training (FluxPipeline's default; `--flux_guidance_scale`).
FLUX_GUIDANCE = t2i.FLUX_DEFAULT_GUIDANCE
# --smoke: one intra-op thread (tiny ops on a busy CPU lose more to thread hand-offs than they gain).
SMOKE_THREADS = 1
SMOKE_PROJECTOR_DIM = 32
# A parameter count within this fraction of the published size passes the check.
PUBLISHED_TOLERANCE = 0.05


# --- The families ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A text-to-image transformer at its real size, how its inputs look, and how to narrow it for the probes."""

    name: str
    family: str  # the script's family key (sd3, pixart, sana, flux)
    transformer: str  # diffusers class
    config: Dict[str, Any]  # the published transformer config
    published_params: float
    published_source: str
    resolution: int
    vae_factor: int
    latent_channels: int
    text_tokens: int
    text_note: str
    text_dim: int
    pooled_dim: Optional[int]
    text_mask: bool
    probe_heads: Tuple[int, int]
    text_encoders: Tuple[str, ...] = ()
    vae: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def latent_side(self) -> int:
        return self.resolution // self.vae_factor

    @property
    def image_tokens(self) -> int:
        side = self.latent_side
        patch = 2 if self.family == "flux" else self.config["patch_size"]  # Flux: packed 2x2 outside the model
        return (side // patch) ** 2


SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
PIXART_SIGMA_XL_1024 = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72,
                            caption_channels=4096, cross_attention_dim=1152, in_channels=4, interpolation_scale=2,
                            norm_elementwise_affine=False, norm_eps=1e-6, norm_type="ada_norm_single",
                            num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, out_channels=8,
                            patch_size=2, sample_size=128, use_additional_conditions=False)
SANA_1600M_1024 = dict(attention_bias=False, attention_head_dim=32, caption_channels=2304, cross_attention_dim=2240,
                       cross_attention_head_dim=112, in_channels=32, mlp_ratio=2.5, norm_elementwise_affine=False,
                       norm_eps=1e-6, num_attention_heads=70, num_cross_attention_heads=20, num_layers=20,
                       out_channels=32, patch_size=1, sample_size=32)
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))

FAMILIES = {
    "SD3.5-medium": Family(
        "SD3.5-medium", "sd3", "SD3Transformer2DModel", SD35_MEDIUM, 2.5e9,
        "Stability AI: SD3.5 Medium, 2.5B (MMDiT-X; the 384x384 positional embedding is stored with the weights)",
        1024, 8, 16, 77 + 256, "77 CLIP tokens + 256 T5 tokens (StableDiffusion3Pipeline's max_sequence_length)",
        4096, 2048, False, (3, 6), text_encoders=("CLIP-L/14 (with projection)", "OpenCLIP-bigG/14 (with projection)",
                                                  "T5-v1.1-XXL encoder"), vae="AutoencoderKL 16 ch (SD3/Flux)"),
    "PixArt-Sigma-XL": Family(
        "PixArt-Sigma-XL", "pixart", "PixArtTransformer2DModel", PIXART_SIGMA_XL_1024, 0.6e9,
        "PixArt-Sigma paper: 0.6B (PixArt-Sigma-XL-2-1024-MS; its fp32 safetensors hold 2,443,492,488 bytes)",
        1024, 8, 4, 300, "300 T5 tokens (PixArtSigmaPipeline's max_sequence_length)", 4096, None, True, (2, 4),
        text_encoders=("T5-v1.1-XXL encoder",), vae="AutoencoderKL 4 ch (SDXL)"),
    "Sana-1.6B": Family(
        "Sana-1.6B", "sana", "SanaTransformer2DModel", SANA_1600M_1024, 1.6e9,
        "Sana paper / Sana_1600M_1024px: 1.6B", 1024, 32, 32, 300,
        "300 Gemma-2 tokens (SanaPipeline's max_sequence_length)", 2304, None, True, (7, 14),
        text_encoders=("Gemma-2-2B (decoder, no LM head)",), vae="AutoencoderDC f32c32 (Sana)"),
    "Flux.1-dev": Family(
        "Flux.1-dev", "flux", "FluxTransformer2DModel", FLUX1_DEV, 12e9,
        "Black Forest Labs: FLUX.1 [dev], a 12 billion parameter rectified flow transformer",
        1024, 8, 16, 512, "512 T5 tokens (FluxPipeline's max_sequence_length for dev)", 4096, 768, False, (2, 4),
        text_encoders=("CLIP-L/14", "T5-v1.1-XXL encoder"), vae="AutoencoderKL 16 ch (SD3/Flux)"),
}
# The family whose probes are also measured at the real width (checks the width extrapolation), and the one whose
# full depth is measured at the narrow probe width (checks the depth extrapolation over three block kinds).
WIDTH_CHECK_FAMILY = "PixArt-Sigma-XL"
DEPTH_CHECK_FAMILY = "SD3.5-medium"

# --smoke: the same four classes, tiny, with tokens and text of a few entries.
SMOKE_FAMILIES = {
    "SD3.5-medium": Family(
        "SD3.5-medium", "sd3", "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
             joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
             pos_embed_max_size=8, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
        0.0, "", 64, 8, 4, 6, "", 16, 8, False, (2, 2)),
    "PixArt-Sigma-XL": Family(
        "PixArt-Sigma-XL", "pixart", "PixArtTransformer2DModel",
        dict(attention_head_dim=8, caption_channels=16, cross_attention_dim=32, in_channels=4, num_attention_heads=4,
             num_layers=3, out_channels=8, patch_size=2, sample_size=8, use_additional_conditions=False,
             norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6),
        0.0, "", 64, 8, 4, 6, "", 16, None, True, (1, 2)),
    "Sana-1.6B": Family(
        "Sana-1.6B", "sana", "SanaTransformer2DModel",
        dict(attention_head_dim=4, caption_channels=16, cross_attention_dim=28, cross_attention_head_dim=7,
             in_channels=4, mlp_ratio=2.5, num_attention_heads=7, num_cross_attention_heads=4, num_layers=3,
             out_channels=4, patch_size=1, sample_size=4),
        0.0, "", 128, 32, 4, 6, "", 16, None, True, (7, 7)),
    "Flux.1-dev": Family(
        "Flux.1-dev", "flux", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
             axes_dims_rope=(4, 6, 6)),
        0.0, "", 64, 8, 4, 6, "", 16, 8, False, (2, 2)),
}


def transformer_cls(spec: Family):
    return getattr(diffusers, spec.transformer)


def at_heads(spec: Family, heads: int, config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """`config` (default: the family's) narrowed to `heads` attention heads of the same head width; the widths tied
    to the hidden size follow (SD3's caption projection, PixArt's/Sana's cross-attention input, Sana's cross heads)."""
    c = dict(spec.config if config is None else config)
    full = spec.heads
    c["num_attention_heads"] = heads
    hidden = heads * c["attention_head_dim"]
    if spec.family == "sd3":
        c["caption_projection_dim"] = hidden
    elif spec.family == "pixart":
        c["cross_attention_dim"] = hidden
    elif spec.family == "sana":
        c["cross_attention_dim"] = hidden
        cross = spec.config["num_cross_attention_heads"] * heads
        if cross % full:
            raise ValueError(f"Sana probes need heads giving a whole number of cross-attention heads, got {heads}.")
        c["num_cross_attention_heads"] = cross // full
    return c


@dataclass
class DepthPlan:
    """The probes' block sets: `base` (every kind the stage layers need), one config per block kind with one more
    block of it, how many more blocks of each kind the full model has, and the probes' stage layers."""

    base: Dict[str, Any]
    added: Dict[str, Dict[str, Any]]
    counts: Dict[str, int]
    layers: Dict[str, int]
    real_layers: Dict[str, int]
    note: str


def depth_plan(spec: Family, config: Dict[str, Any]) -> DepthPlan:
    n = num_blocks(spec, config)
    real = {"stage1": default_t2i_options("vae_align", n)["layer"],
            **{k: v for k, v in default_t2i_options("self_transcendence", n).items()
               if k in ("guided_layer", "guiding_layer")}}
    if spec.family == "sd3":
        dual = set(config.get("dual_attention_layers") or ())
        if n - 1 in dual:
            raise ValueError("The SD3 depth plan expects the last block without dual attention.")
        n_dual = sum(1 for i in range(n - 1) if i in dual)
        n_joint = n - 1 - n_dual
        if n_joint < 1:
            raise ValueError("The SD3 depth plan needs at least one joint block besides the last.")
        base = {**config, "num_layers": 2, "dual_attention_layers": ()}
        added = {"joint": {**config, "num_layers": 3, "dual_attention_layers": ()},
                 "dual": {**config, "num_layers": 3, "dual_attention_layers": (0,)}}
        counts = {"joint": n_joint - 1, "dual": n_dual}
        # block 1 of [joint, last] is a joint block: the teacher exits there, truncated, as at the real block 2n/3
        layers = {"stage1": 1, "guided_layer": 1, "guiding_layer": 1}
        note = (f"{n} blocks = {n_dual} dual-attention + {n_joint} joint + the last (context_pre_only); probes "
                f"[joint, last] + one joint / one dual block")
    elif spec.family == "flux":
        d, s = config["num_layers"], config["num_single_layers"]
        base = {**config, "num_layers": 1, "num_single_layers": 1}
        added = {"double": {**config, "num_layers": 2, "num_single_layers": 1},
                 "single": {**config, "num_layers": 1, "num_single_layers": 2}}
        counts = {"double": d - 1, "single": s - 1}
        kind = lambda k: 1 if k <= d else 2  # noqa: E731  (block 1 of the probe is double, block 2 single)
        layers = {key: kind(value) for key, value in real.items()}
        note = f"{d} double + {s} single blocks; probes [double, single] + one double / one single block"
    else:
        base = {**config, "num_layers": 1}
        added = {"block": {**config, "num_layers": 2}}
        counts = {"block": n - 1}
        layers = {"stage1": 1, "guided_layer": 1, "guiding_layer": 1}
        note = f"{n} identical blocks; probes 1 block + one more"
    return DepthPlan(base, added, counts, layers, real, note)


def num_blocks(spec: Family, config: Dict[str, Any]) -> int:
    return config["num_layers"] + (config.get("num_single_layers", 0) if spec.family == "flux" else 0)


# --- Parameter counts (meta device) ---------------------------------------------------------------------------------
def null_conditioning(spec: Family, device="cpu") -> Dict[str, torch.Tensor]:
    """The empty prompt's conditioning (batch 1, random: its values do not change the memory)."""
    g = torch.Generator().manual_seed(1)
    make = (lambda *shape: torch.empty(*shape, device="meta")) if str(device) == "meta" else (
        lambda *shape: torch.randn(*shape, generator=g))
    null = {"encoder_hidden_states": make(1, spec.text_tokens, spec.text_dim)}
    if spec.pooled_dim:
        null["pooled_projections"] = make(1, spec.pooled_dim)
    if spec.text_mask:
        mask = torch.zeros(1, spec.text_tokens, device=device)
        if str(device) != "meta":
            mask[:, :1] = 1  # the empty prompt: one end-of-text token
        null["encoder_attention_mask"] = mask
    return null


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_counts(spec: Family, config: Dict[str, Any], projector_dim: int) -> Dict[str, Any]:
    """Parameter counts of the student, its teacher and the heads of both stages (meta device), the buffers, the
    matmul weights autocast copies, and FSDP2's wrapped units (the classes in `_no_split_modules`)."""
    cls = transformer_cls(spec)
    n = num_blocks(spec, config)
    with torch.device("meta"):
        model = cls(**config)
        stage1 = build_alignment("vae_align", model, **{**default_t2i_options("vae_align", n),
                                                         "projector_dim": projector_dim})
        teacher = cls(**config)
        stage2 = build_alignment("self_transcendence", model, teacher=teacher,
                                 null_conditioning=null_conditioning(spec, "meta"),
                                 **{**default_t2i_options("self_transcendence", n), "projector_dim": projector_dim})
    params = {name for name, _ in model.named_parameters()}
    persistent = sum(v.numel() for k, v in model.state_dict().items() if k not in params)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    matmul = lambda m: sum(sub.weight.numel() for sub in m.modules()  # noqa: E731
                           if isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)))
    wrapped = set(getattr(model, "_no_split_modules", None) or ())
    units, inside = [], set()
    for name, sub in model.named_modules():
        if type(sub).__name__ in wrapped and not any(name.startswith(prefix + ".") for prefix in inside):
            inside.add(name)
            units.append(count(sub))
    student = count(model)
    return {
        "student": student,
        "teacher": count(teacher),
        "stored": student + persistent,  # what a checkpoint holds: parameters + persistent buffers
        "persistent_buffers": persistent,
        "buffers": buffers,
        "stage1_head": count(stage1.projector),
        "stage2_projector": count(stage2.projector),
        "student_matmul_weights": matmul(model),
        "stage1_head_matmul_weights": matmul(stage1.projector),
        "stage2_projector_matmul_weights": matmul(stage2.projector),
        "fsdp_units": len(units),
        "fsdp_largest_unit": max(units) if units else 0,
        "fsdp_root": student - sum(units),  # + the heads, which sit in the same root (TrainableModules)
        "num_blocks": n,
    }


def encoder_counts() -> Dict[str, int]:
    """The text encoders and VAEs the families' pipelines hold, from their published configs (meta device)."""
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model,
                              T5Config, T5EncoderModel)

    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                            hidden_act="quick_gelu")
    clip_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
                            hidden_act="gelu")
    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    gemma = Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256)
    kl = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    dc = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
              encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
              decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
              encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
              decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
              encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
              encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
              decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
              upsample_block_type="interpolate", downsample_block_type="Conv")
    with torch.device("meta"):
        modules = {
            "CLIP-L/14 (with projection)": CLIPTextModelWithProjection(clip_l),
            "CLIP-L/14": CLIPTextModel(clip_l),
            "OpenCLIP-bigG/14 (with projection)": CLIPTextModelWithProjection(clip_g),
            "T5-v1.1-XXL encoder": T5EncoderModel(t5),
            "Gemma-2-2B (decoder, no LM head)": Gemma2Model(gemma),
            "AutoencoderKL 16 ch (SD3/Flux)": diffusers.AutoencoderKL(**kl, latent_channels=16, use_quant_conv=False,
                                                                      use_post_quant_conv=False),
            "AutoencoderKL 4 ch (SDXL)": diffusers.AutoencoderKL(**kl, latent_channels=4),
            "AutoencoderDC f32c32 (Sana)": diffusers.AutoencoderDC(**dc),
        }
    return {name: count(m) for name, m in modules.items()}


# Published sizes of the encoders (for the report; the counts above are what the arithmetic uses).
ENCODER_PUBLISHED = {
    "CLIP-L/14 (with projection)": "CLIP ViT-L/14 text tower: 123M",
    "CLIP-L/14": "CLIP ViT-L/14 text tower: 123M",
    "OpenCLIP-bigG/14 (with projection)": "OpenCLIP ViT-bigG/14 text tower: 695M",
    "T5-v1.1-XXL encoder": "T5-v1.1-XXL encoder: 4.7B",
    "Gemma-2-2B (decoder, no LM head)": "Gemma 2 2B: 2.6B (tied embeddings)",
}


# --- One probe step -------------------------------------------------------------------------------------------------
class WeightCopyTracker(MT.LiveStorageTracker):
    """`LiveStorageTracker` that also notes which storages are casts of a parameter (autocast's bf16 weight copies)
    and the factor that makes each the size of the same parameter at the real width (`scales`, by data pointer)."""

    def __init__(self, scales: Dict[int, float]):
        super().__init__()
        self.scales = scales
        self.copies: Dict[int, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            source = args[0]
            scale = self.scales.get(source.untyped_storage().data_ptr()) if isinstance(source, torch.Tensor) else None
            key = self.key_of(out)
            if scale is not None and key is not None and out.dtype != source.dtype:
                self.copies[key] = scale
        return out


def autocast_only(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """The teacher's pass: autocast around its forward (`frozen_forward_context` on CUDA), outputs as they are."""
    module.forward = MethodType(torch.autocast("cpu", dtype=dtype)(type(module).forward), module)


def make_batch(spec: Family, config: Dict[str, Any], model, n: int, seed: int):
    """What one step of the script holds for `n` samples: latents x0 (Flux: packed), the captions' conditioning,
    the family's static keywords and Flux's guidance."""
    g = torch.Generator().manual_seed(seed)
    side = spec.latent_side
    grid = torch.randn(n, spec.latent_channels, side, side, generator=g)
    x0 = t2i.pack(spec.family, grid)
    cond = {"encoder_hidden_states": torch.randn(n, spec.text_tokens, spec.text_dim, generator=g)}
    if spec.pooled_dim:
        cond["pooled_projections"] = torch.randn(n, spec.pooled_dim, generator=g)
    if spec.text_mask:
        mask = torch.zeros(n, spec.text_tokens)
        mask[:, : spec.text_tokens // 2 + 1] = 1  # padded captions
        cond["encoder_attention_mask"] = mask
    static = t2i.static_kwargs(spec.family, model, tuple(grid.shape), grid.device, grid.dtype, spec.text_tokens)
    shared = {}
    if spec.family == "flux" and config.get("guidance_embeds"):
        shared = {"guidance": torch.full((n,), FLUX_GUIDANCE)}
    return x0, cond, static, shared


def t2i_step(feats, core, method, x0, cond, null, static, shared, step: int):
    """The body of the script's training loop from the batch to the loss (`train_self_transcendence_t2i.main`,
    4.6): flow-matching sample, caption dropout, the student's forward through `BlockFeatures`, the velocity loss and
    the alignment term (the teacher pass inside the method)."""
    transport = Transport()
    t, noise, x_t, target = transport.sample(x0)
    drop = torch.rand(x0.shape[0]) < t2i.T2I_CAPTION_DROPOUT
    student_cond = t2i.drop_captions(cond, null, drop)
    teacher_cond = student_cond  # --teacher_captions dropped (the default)
    active = method.is_active(step)
    out = feats(x_t, timestep=model_timestep(core, t), layers=method.student_layers if active else (),
                return_time_embedding=active and getattr(method, "needs_time_embedding", False),
                **student_cond, **static, **shared)
    velocity = model_velocity(core, out.sample)
    loss_diff = ((velocity.float() - target.float()) ** 2).mean()
    terms = method(out.hidden_states, x_t=x_t, t=t, target=target, x0=x0, noise=noise, step=step,
                   conditioning=teacher_cond, shared_kwargs=shared or None, model_kwargs=static,
                   time_embedding=out.time_embedding) if active else {}
    return loss_diff + sum(method.weights[name] * value for name, value in terms.items())


def build_stage(spec: Family, config: Dict[str, Any], stage: str, layers: Dict[str, int], projector_dim: int,
                device: str = "cpu"):
    """Student (train mode), its `BlockFeatures` and the stage's alignment method (T2I defaults, the probe layers)."""
    cls = transformer_cls(spec)
    model = cls(**config).train()
    feats = BlockFeatures(model)
    n = num_blocks(spec, config)
    null = null_conditioning(spec, device)
    if stage == "stage1":
        options = {**default_t2i_options("vae_align", n), "layer": layers["stage1"], "projector_dim": projector_dim}
        return model, feats, build_alignment("vae_align", model, **options), null
    teacher = cls(**config)
    options = {**default_t2i_options("self_transcendence", n), "guided_layer": layers["guided_layer"],
               "guiding_layer": layers["guiding_layer"], "projector_dim": projector_dim,
               "guide_stop_step": NEVER_STOP if stage == "stage2_guided" else 0}
    # --guiding_weights_dtype auto under bf16: bf16 teacher weights; --guiding_autocast auto: bf16 autocast
    method = build_alignment("self_transcendence", model, teacher=teacher, null_conditioning=null,
                             teacher_dtype=torch.bfloat16, teacher_autocast=torch.bfloat16, **options)
    return model, feats, method, null


def copy_scales(spec: Family, model, heads, config: Dict[str, Any], target: Dict[str, Any], stage: str,
                layers: Dict[str, int], projector_dim: int) -> Dict[int, float]:
    """Data pointer of every trainable parameter -> (its numel in the same module at the `target` width) / (its
    numel here): autocast's copy of it is counted at the real width's size."""
    if target == config:
        return {p.untyped_storage().data_ptr(): 1.0 for m in [model] + heads for p in m.parameters()}
    with torch.device("meta"):
        big, _, big_method, _ = build_stage(spec, target, stage, layers, projector_dim, device="meta")
    sizes = {f"model.{k}": v.numel() for k, v in big.named_parameters()}
    for i, head in enumerate(big_method.trainable_modules()):
        sizes.update({f"head{i}.{k}": v.numel() for k, v in head.named_parameters()})
    scales = {}
    named = [(f"model.{k}", v) for k, v in model.named_parameters()]
    for i, head in enumerate(heads):
        named += [(f"head{i}.{k}", v) for k, v in head.named_parameters()]
    for name, p in named:
        scales[p.untyped_storage().data_ptr()] = sizes[name] / p.numel()
    return scales


def probe_step(spec: Family, config: Dict[str, Any], stage: str, *, batch: int, checkpointing: bool,
               layers: Dict[str, int], projector_dim: int, seed: int, target: Optional[Dict[str, Any]] = None,
               optimizer_step: bool = False) -> Dict[str, Any]:
    """One tracked training step of `stage` on `config` at `batch` samples; bytes of each phase's activation peak in
    three variants: `ddp` (autocast's weight copies at the `target` width's size), `fsdp2` (no weight copies) and
    `measured` (the copies as made here). `optimizer_step`: also clip, AdamW and EMA (foreach) and the state check."""
    torch.manual_seed(seed)
    model, feats, method, null = build_stage(spec, config, stage, layers, projector_dim)
    if checkpointing:
        model.enable_gradient_checkpointing()
    heads = method.trainable_modules()
    params = list(model.parameters()) + [p for h in heads for p in h.parameters() if p.requires_grad]
    if optimizer_step:
        ema = EMAModel(model.parameters(), decay=DEFAULT_EMA_DECAY, min_decay=DEFAULT_EMA_DECAY, foreach=True,
                       model_cls=type(model), model_config=model.config)
        adamw = dict(lr=t2i.T2I_LEARNING_RATE, betas=(0.9, t2i.T2I_ADAM_BETA2), weight_decay=t2i.T2I_WEIGHT_DECAY)
        optimizer = torch.optim.AdamW(params, foreach=True, **adamw)  # the script's under FSDP
        fused = torch.optim.AdamW(params, fused=True, **adamw)  # the script's on CUDA without FSDP (--fused_adamw)
    scales = copy_scales(spec, model, heads, config, target or config, stage, layers, projector_dim)
    for module in [model] + heads:  # accelerate.prepare under --mixed_precision bf16
        MT.autocast_forward(module, torch.bfloat16)
        MT.cuda_autocast_layer_norm(module)
    teacher = getattr(method, "teacher", None)
    if teacher is not None:
        autocast_only(teacher, torch.bfloat16)
        MT.cuda_autocast_layer_norm(teacher)

    tracker = WeightCopyTracker(scales)
    MT.mark_student_and_teacher(model, method, tracker)

    start = time.perf_counter()
    with tracker:
        tracker.mark("start")
        x0, cond, static, shared = make_batch(spec, config, model, batch, seed)
        loss = t2i_step(feats, model, method, x0, cond, null, static, shared, step=0)
        tracker.mark("forward_end")
        loss.backward()
        tracker.mark("backward_end")
        grads = {tracker.key_of(p.grad) for p in params if p.grad is not None}
        result = {"grad_bytes": sum(p.grad.nbytes for p in params if p.grad is not None)}
        if optimizer_step:
            torch.nn.utils.clip_grad_norm_(params, DEFAULT_MAX_GRAD_NORM, foreach=True)
            optimizer.step()
            tracker.mark("adamw_end")
            fused.step()  # the same gradients, a second optimizer: its own step's temporaries
            tracker.mark("fused_end")
            optimizer.zero_grad(set_to_none=True)
            ema.step(model.parameters())
        tracker.mark("end")
    seconds = time.perf_counter() - start
    del loss, x0, cond, static, shared
    copies = dict(tracker.copies)
    variants = {"ddp": (grads, copies), "fsdp2": (grads | set(copies), None), "measured": (grads, None)}
    guided = "teacher_start" in tracker.marks
    windows = {"student_forward": ("start", "student_end"), "backward": ("forward_end", "backward_end")}
    if guided:
        windows.update(loss_pre=("student_end", "teacher_start"), teacher=("teacher_start", "teacher_end"),
                       loss_post=("teacher_end", "forward_end"))
    else:
        windows["loss_pre"] = ("student_end", "forward_end")
    for variant, (exclude, scale) in variants.items():
        result[variant] = {w: tracker.live_curve(exclude, a, b, scale)["peak"] for w, (a, b) in windows.items()}
        result[variant]["backward_start"] = tracker.live_curve(exclude, "student_end", "forward_end", scale)["end"]
    result.update(
        weight_copy_bytes=sum(tracker.nbytes[k] for k in copies),
        weight_copy_bytes_at_target=sum(tracker.nbytes[k] * s for k, s in copies.items()),
        seconds=round(seconds, 3),
        teacher_forwards=getattr(method, "teacher_forwards", None),
        teacher_released=getattr(method, "teacher", None) is None if stage != "stage1" else None,
    )
    if "teacher_start" in tracker.marks:
        window = tracker.live_curve(grads, "teacher_start", "teacher_end")
        result["teacher_transient_bytes"] = window["peak"] - window["start"]
        result["teacher_features_bytes"] = window["end"] - window["start"]
    if optimizer_step:
        moments = [v for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
        adam = {tracker.key_of(v) for v in moments}
        adam |= {tracker.key_of(v) for s in fused.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
        step_adam = tracker.live_curve(grads | adam, "backward_end", "adamw_end")
        step_fused = tracker.live_curve(grads | adam, "adamw_end", "fused_end")
        step_ema = tracker.live_curve(grads | adam, "fused_end", "end")
        trainable = sum(p.numel() for p in params)
        student_params = sum(p.numel() for p in model.parameters())
        result.update(
            trainable_params=trainable,
            student_params=student_params,
            teacher_params=count(method.teacher) if getattr(method, "teacher", None) is not None else 0,
            student_buffer_elements=sum(b.numel() for b in model.buffers() if b.is_floating_point()),
            measured_state_bytes={
                "weights": sum(p.nbytes for p in model.parameters()),
                "gradients": result["grad_bytes"],
                "adamw": sum(v.nbytes for v in moments),
                "ema": sum(s.nbytes for s in ema.shadow_params),
                "teacher_weights": sum(p.nbytes for p in method.teacher.parameters()) if teacher is not None else 0,
                "student_buffers": sum(b.nbytes for b in model.buffers() if b.is_floating_point()),
            },
            adamw_step_transient_per_param=(step_adam["peak"] - step_adam["start"]) / trainable,
            fused_adamw_step_transient_per_param=(step_fused["peak"] - step_fused["start"]) / trainable,
            ema_step_transient_per_param=(step_ema["peak"] - step_ema["start"]) / student_params,
        )
    if "guiding_features" in vars(method):  # the marking wrapper refers back to the method: no reference cycle
        del method.guiding_features
    return result


# --- Measuring a family ---------------------------------------------------------------------------------------------
def probe_plan(spec: Family, heads: int):
    """Every probe of a family at one width: (stage, block set, config) with the block sets of `depth_plan`."""
    config = at_heads(spec, heads)
    plan = depth_plan(spec, config)
    probes = [(stage, "base", plan.base) for stage in STAGES]
    probes += [("stage2_after_stop", kind, cfg) for kind, cfg in plan.added.items()]
    return plan, probes


def measure_family(spec: Family, args, projector_dim: int, log) -> Dict[str, Any]:
    """{heads: {ckpt: {stage: {(block set, batch): result}}}} at both probe widths, plus the optimizer probe."""
    out, opt_probe = {}, None
    real_plan = depth_plan(spec, spec.config)
    for heads in sorted(set(spec.probe_heads)):
        plan, probes = probe_plan(spec, heads)
        per_width = {}
        for ckpt in (False, True):
            per_stage = {}
            for stage, kind, config in probes:
                target = real_plan.base if kind == "base" else real_plan.added[kind]
                for batch in PROBE_BATCHES:
                    res = probe_step(spec, config, stage, batch=batch, checkpointing=ckpt, layers=plan.layers,
                                     projector_dim=projector_dim, seed=args.seed, target=target)
                    per_stage.setdefault(stage, {})[(kind, batch)] = res
                    log(f"{spec.name} heads={heads} ckpt={int(ckpt)} {stage} {kind} batch={batch}: peak "
                        f"{peak_of(res, 'ddp', stage) / 2**20:.1f} MiB ddp, "
                        f"{peak_of(res, 'fsdp2', stage) / 2**20:.1f} MiB fsdp2 ({res['seconds']:.1f} s)")
            per_width[ckpt] = per_stage
        out[heads] = per_width
    heads = min(spec.probe_heads)
    plan, _ = probe_plan(spec, heads)
    opt_probe = probe_step(spec, plan.base, "stage2_guided", batch=PROBE_BATCHES[0], checkpointing=False,
                           layers=plan.layers, projector_dim=projector_dim, seed=args.seed, optimizer_step=True)
    log(f"{spec.name} optimizer probe: AdamW foreach {opt_probe['adamw_step_transient_per_param']:.2f} B/param, "
        f"fused {opt_probe['fused_adamw_step_transient_per_param']:.2f} B/param, EMA "
        f"{opt_probe['ema_step_transient_per_param']:.2f} B/param ({opt_probe['seconds']:.1f} s)")
    return {"probes": out, "optimizer_probe": opt_probe}


def peak_of(res: Dict[str, Any], variant: str, stage: str) -> float:
    return max(res[variant][p] for p in phases_of(stage))


def width_fit(values: Dict[int, float], heads: int) -> float:
    """Linear in the number of heads through the two probe widths, evaluated at `heads` (one width: as measured)."""
    (h1, v1), (h2, v2) = sorted(values.items())[0], sorted(values.items())[-1]
    if h1 == h2:
        return v1
    return v2 + (heads - h2) * (v2 - v1) / (h2 - h1)


def at_real_width(spec: Family, measured: Dict[str, Any], variant: str, key: str, ckpt: bool, stage: str,
                  point: Tuple[str, int], heads: Optional[int] = None) -> float:
    values = {}
    for h, per_width in measured["probes"].items():
        res = per_width[ckpt][stage][point]
        values[h] = res[variant][key] if variant else res[key]
    return width_fit(values, spec.heads if heads is None else heads)


def extrapolate(spec: Family, measured, variant: str, key: str, ckpt: bool, stage: str, target_batch: int,
                heads: Optional[int] = None, depth: bool = True) -> Dict[str, float]:
    """Width -> depth -> batch: each probe value at the real width (`heads`: another width), the added blocks
    multiplied out to the real block counts (`depth=False`: the base block set itself), then fixed + per-sample x
    `target_batch`."""
    plan = depth_plan(spec, spec.config)
    counts = plan.counts if depth else {k: 0 for k in plan.counts}
    value = lambda s, kind, b, k: at_real_width(spec, measured, variant, k, ckpt, s, (kind, b), heads)  # noqa: E731
    # A window's peak grows with the depth by what each block leaves held (read off the vanilla probes). The
    # backward's peak is either early (the heads' backward, everything still held: that grows so) or while one block
    # is differentiated (with checkpointing: recomputed) once the heads' tensors are freed: the vanilla step's held
    # bytes plus the largest excess of one block over them, over the block kinds (their working sets differ and do
    # not add up over blocks). The larger of the two.
    held = HELD_KEY[key]
    at_depth, per_block = {}, {}
    for b in PROBE_BATCHES:
        vanilla = value("stage2_after_stop", "base", b, held)
        blocks = {kind: value("stage2_after_stop", kind, b, held) - vanilla for kind in plan.counts}
        per_block[b] = blocks
        grown = sum(counts[k] * blocks[k] for k in plan.counts)
        at_depth[b] = value(stage, "base", b, key) + grown
        if key == "backward":
            sets = ["base"] + [k for k in plan.counts if counts[k]]
            excess = max(value("stage2_after_stop", kind, b, "backward")
                         - value("stage2_after_stop", kind, b, "backward_start") for kind in sets)
            at_depth[b] = max(at_depth[b], vanilla + grown + excess)
    b1, b2 = PROBE_BATCHES
    per_sample = (at_depth[b2] - at_depth[b1]) / (b2 - b1)
    fixed = at_depth[b1] - per_sample * b1
    return {"bytes": fixed + per_sample * target_batch, "per_sample_bytes": per_sample,
            "batch_independent_bytes": fixed,
            "per_block_per_sample_bytes": {k: (per_block[b2][k] - per_block[b1][k]) / (b2 - b1) for k in plan.counts},
            "at_probe_batches": {str(b): at_depth[b] for b in PROBE_BATCHES}}


def teacher_fit(spec: Family, measured, key: str, ckpt: bool, target_batch: int) -> Dict[str, float]:
    """The teacher's no-grad pass (depth-independent): width fit, then batch fit."""
    v = {b: at_real_width(spec, measured, None, key, ckpt, "stage2_guided", ("base", b)) for b in PROBE_BATCHES}
    b1, b2 = PROBE_BATCHES
    per_sample = (v[b2] - v[b1]) / (b2 - b1)
    return {"bytes": v[b1] + per_sample * (target_batch - b1), "per_sample_bytes": per_sample}


# --- Model states (arithmetic) --------------------------------------------------------------------------------------
def model_states(counts: Dict[str, Any], stage: str, mode: str, num_gpus: int, vae_params: int,
                 teacher_bytes: int = BF16) -> Dict[str, float]:
    """Bytes per GPU of everything that does not depend on the batch (see the module docstring for each term)."""
    p, buffers = counts["student"], counts["buffers"]
    head = counts["stage1_head" if stage == "stage1" else "stage2_projector"]
    head_trains = stage != "stage2_after_stop"
    shard = num_gpus if mode == "fsdp2" else 1
    guided = stage == "stage2_guided"
    states = {
        "weights": FP32 * p / shard,
        "gradients": FP32 * p / shard,
        "adamw": ADAMW_STATES * FP32 * p / shard,
        "ema": FP32 * p / shard,
        "buffers": FP32 * buffers,
        "projector": FP32 * head * (1 + ADAMW_STATES + (1 if head_trains else 0)) / shard,
        "ddp_buckets": FP32 * (p + head) if mode == "ddp" and num_gpus > 1 else 0,
        "fsdp_working_set": (BF16 * (counts["fsdp_root"] + head + 4 * counts["fsdp_largest_unit"])
                             if mode == "fsdp2" else 0),
        "teacher_weights": teacher_bytes * (counts["teacher"] + buffers) if guided else 0,
        "vae": BF16 * vae_params,
    }
    return states


def optimizer_transient(opt_probe: Dict[str, Any], counts: Dict[str, Any], stage: str, mode: str,
                        num_gpus: int) -> float:
    """AdamW's temporaries with every gradient alive (the script's fused AdamW under DDP, foreach under FSDP2), or
    the EMA step's (foreach) after zero_grad (gradients freed)."""
    shard = num_gpus if mode == "fsdp2" else 1
    head = counts["stage1_head" if stage == "stage1" else "stage2_projector"]
    trainable = (counts["student"] + (head if stage != "stage2_after_stop" else 0)) / shard
    adamw = opt_probe["fused_adamw_step_transient_per_param" if mode == "ddp" else "adamw_step_transient_per_param"]
    return max(adamw * trainable,
               opt_probe["ema_step_transient_per_param"] * counts["student"] / shard - FP32 * trainable)


def build_rows(spec: Family, counts, measured, vae_params: int, args) -> List[Dict[str, Any]]:
    rows = []
    opt_probe = measured["optimizer_probe"]
    for mode in MODES:
        for stage in STAGES:
            for ckpt in (False, True):
                states = model_states(counts, stage, mode, args.num_gpus, vae_params)
                state_bytes = sum(states.values())
                transient = optimizer_transient(opt_probe, counts, stage, mode, args.num_gpus)
                by_batch, phases_all = {}, {}
                for batch in args.batches:
                    phases = {ph: extrapolate(spec, measured, mode, ph, ckpt, stage, batch)
                              for ph in phases_of(stage)}
                    phase = max(phases, key=lambda k: phases[k]["bytes"])
                    acts = phases[phase]["bytes"]
                    peak = state_bytes + max(acts, transient)
                    by_batch[str(batch)] = {"activations": acts, "peak_phase": phase, "peak": peak,
                                            "gib": peak / GIB, "status_80gb": MT.fit_status(peak)}
                    phases_all[str(batch)] = phases
                ref = phases_all[str(args.batches[0])]
                row = {
                    "family": spec.name, "mode": mode, "stage": stage, "gradient_checkpointing": ckpt,
                    "states": states, "state_bytes": state_bytes, "optimizer_step_transient": transient,
                    "batches": by_batch,
                    "max_batch_per_gpu_80gb": min(MT.max_batch(state_bytes, ph, transient) for ph in ref.values()),
                    "activations": {ph: {k: v for k, v in e.items() if k != "bytes"} for ph, e in ref.items()},
                }
                if stage == "stage2_guided":
                    row["teacher_transient"] = {str(b): teacher_fit(spec, measured, "teacher_transient_bytes", ckpt,
                                                                    b) for b in args.batches}
                rows.append(row)
    return rows


# --- Checks ---------------------------------------------------------------------------------------------------------
def published_check(spec: Family, counts) -> Dict[str, Any]:
    stored = counts["stored"]
    rel = (stored - spec.published_params) / spec.published_params if spec.published_params else None
    return {"family": spec.name, "parameters": counts["student"], "persistent_buffers": counts["persistent_buffers"],
            "stored": stored, "published": spec.published_params, "source": spec.published_source,
            "relative_difference": rel, "tolerance": PUBLISHED_TOLERANCE,
            "ok": rel is not None and abs(rel) <= PUBLISHED_TOLERANCE}


def state_check(spec: Family, opt_probe) -> Dict[str, Any]:
    """The optimizer probe's real tensors vs the formulas of `model_states` (fp32 student, bf16 teacher)."""
    trainable, student = opt_probe["trainable_params"], opt_probe["student_params"]
    arithmetic = {"weights": FP32 * student, "gradients": FP32 * trainable, "adamw": ADAMW_STATES * FP32 * trainable,
                  "ema": FP32 * student, "teacher_weights": BF16 * opt_probe["teacher_params"],
                  "student_buffers": FP32 * opt_probe["student_buffer_elements"]}
    measured = opt_probe["measured_state_bytes"]
    return {"family": spec.name, "probe": "stage2_guided, base block set, narrowest width, batch 1",
            "student_params": student, "trainable_params": trainable, "measured_bytes": measured,
            "arithmetic_bytes": arithmetic, "equal": measured == arithmetic}


def width_check(spec: Family, measured, args, projector_dim: int, log) -> List[Dict[str, Any]]:
    """The base probes at the real width (every stage at batch 1, the guided stage also at batch 2: the per-sample
    bytes) vs the values extrapolated from the two narrow widths."""
    checks = []
    plan = depth_plan(spec, spec.config)
    for ckpt in (False, True):
        for stage in STAGES:
            for batch in PROBE_BATCHES if stage == "stage2_guided" else PROBE_BATCHES[:1]:
                res = probe_step(spec, plan.base, stage, batch=batch, checkpointing=ckpt, layers=plan.layers,
                                 projector_dim=projector_dim, seed=args.seed)
                for variant in ("ddp", "fsdp2"):
                    direct = peak_of(res, variant, stage)
                    fitted = max(extrapolate(spec, measured, variant, p, ckpt, stage, batch, depth=False)["bytes"]
                                 for p in phases_of(stage))
                    checks.append({"family": spec.name, "heads": spec.heads, "stage": stage, "batch": batch,
                                   "gradient_checkpointing": ckpt, "variant": variant, "measured_bytes": direct,
                                   "extrapolated_bytes": fitted, "relative_error": (fitted - direct) / direct,
                                   "seconds": res["seconds"]})
                log(f"width check {spec.name} ckpt={int(ckpt)} {stage} batch={batch}: measured "
                    f"{peak_of(res, 'ddp', stage) / 2**20:.1f} MiB, extrapolated "
                    f"{checks[-2]['extrapolated_bytes'] / 2**20:.1f} MiB ({res['seconds']:.1f} s)")
    return checks


def depth_check(spec: Family, measured, args, projector_dim: int, log) -> List[Dict[str, Any]]:
    """A full-depth guided step at the narrowest probe width, batch 1, vs the depth extrapolation at that width
    (the copies as measured: both sides at the probe width)."""
    checks = []
    heads = min(spec.probe_heads)
    config = at_heads(spec, heads)
    plan = depth_plan(spec, config)
    for ckpt in (False, True):
        res = probe_step(spec, config, "stage2_guided", batch=PROBE_BATCHES[0], checkpointing=ckpt,
                         layers=plan.real_layers, projector_dim=projector_dim, seed=args.seed)
        for variant in ("measured", "fsdp2"):
            predicted = max(extrapolate(spec, measured, variant, p, ckpt, "stage2_guided", PROBE_BATCHES[0],
                                        heads=heads)["bytes"] for p in PHASES)
            direct = peak_of(res, variant, "stage2_guided")
            checks.append({"family": spec.name, "heads": heads, "depth": num_blocks(spec, config),
                           "stage": "stage2_guided", "batch": PROBE_BATCHES[0], "gradient_checkpointing": ckpt,
                           "variant": variant, "measured_bytes": direct, "extrapolated_bytes": predicted,
                           "relative_error": (predicted - direct) / direct, "seconds": res["seconds"]})
        log(f"depth check {spec.name} ckpt={int(ckpt)}: measured {checks[-2]['measured_bytes'] / 2**20:.1f} MiB, "
            f"extrapolated {checks[-2]['extrapolated_bytes'] / 2**20:.1f} MiB ({res['seconds']:.1f} s)")
    return checks


def linearity(spec: Family, measured) -> List[Dict[str, Any]]:
    """Per probe: the ddp activation peak at batch 2 over batch 1 (> 1: activations grow with the batch; < 2 by the
    batch-independent weight copies) and the fsdp2 one (no copies: close to 2)."""
    out = []
    for heads, per_width in measured["probes"].items():
        for ckpt, per_stage in per_width.items():
            for stage, points in per_stage.items():
                for kind in sorted({k for k, _ in points}):
                    lo, hi = points[(kind, 1)], points[(kind, 2)]
                    for variant in ("ddp", "fsdp2"):
                        a = peak_of(lo, variant, stage)
                        b = peak_of(hi, variant, stage)
                        out.append({"family": spec.name, "heads": heads, "gradient_checkpointing": ckpt,
                                    "stage": stage, "block_set": kind, "variant": variant, "ratio": b / a})
    return out


# --- Output ---------------------------------------------------------------------------------------------------------
def probes_to_json(measured) -> Dict[str, Any]:
    out = {}
    for heads, per_width in measured["probes"].items():
        out[f"heads{heads}"] = {f"checkpointing_{str(ckpt).lower()}": {
            stage: {f"{kind}_batch{b}": res for (kind, b), res in points.items()}
            for stage, points in per_stage.items()}
            for ckpt, per_stage in per_width.items()}
    out["optimizer_probe"] = measured["optimizer_probe"]
    return out


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def markdown(result: Dict[str, Any]) -> str:
    rows, s = result["rows"], result["setting"]
    b_hi, b_lo = s["batches"]
    lines = [
        "# Peak GPU memory of a text-to-image training step (issue 27, item 4)",
        "",
        f"Command: `{result['command']}` ({result['run_seconds']:.0f} s on {result['device']}, torch "
        f"{result['torch']}, diffusers {result['diffusers']}).",
        "",
        f"bf16 mixed precision (autocast, fp32 master weights, gradients, AdamW and EMA), teacher weights in bf16 "
        f"(`--guiding_weights_dtype auto`), text embeddings precomputed (`--precompute_text_embeddings`: no text "
        f"encoder held), projector width {s['projector_dim']}, {s['num_gpus']} GPUs. GiB per GPU (2^30 bytes). "
        f"Peak = model states + max(activations, optimizer/EMA step transient). Against an 80 GB card "
        f"({MT.GPU_MEMORY_GIB:.1f} GiB): \"tight\" = within {MT.HEADROOM_GIB:.0f} GiB of it (CUDA context, "
        f"workspaces and fragmentation are not counted). Max batch: the largest per-GPU batch within the card minus "
        f"that headroom.",
        "",
        "| family | tokens (image + text) | stage | grad. ckpt | " + " | ".join(
            f"{MODE_SHORT[m]}, batch {b}" for m in MODES for b in (b_hi, b_lo)) + " | " + " | ".join(
            f"{MODE_SHORT[m]}, max batch" for m in MODES) + " |",
        "|---|---|---|---|" + "---:|" * (2 * len(MODES)) + "---:|" * len(MODES),
    ]
    fams = result["families"]
    for name in result["family_order"]:
        f = fams[name]
        for stage in STAGES:
            for ckpt in (False, True):
                cells, maxes = [], []
                for mode in MODES:
                    (r,) = [r for r in rows if r["family"] == name and r["mode"] == mode and r["stage"] == stage
                            and r["gradient_checkpointing"] == ckpt]
                    for b in (b_hi, b_lo):
                        e = r["batches"][str(b)]
                        mark = "" if e["status_80gb"] == "fits" else f" ({e['status_80gb']})"
                        cells.append(f"**{e['gib']:.1f}**{mark}")
                    maxes.append(str(r["max_batch_per_gpu_80gb"]))
                lines.append(f"| {name} | {f['image_tokens']} + {f['text_tokens']} | {STAGE_LABELS[stage]} | "
                             f"{'yes' if ckpt else 'no'} | " + " | ".join(cells) + " | " + " | ".join(maxes) + " |")
    lines.append("")

    lines += ["## Model states (GiB per GPU) and activations at batch " + str(b_hi), "",
              "| family | mode | stage | ckpt | weights | grads | AdamW | EMA | buffers | head | DDP buckets "
              "| FSDP2 working set | teacher | VAE | states | activations | opt. step | **peak** |",
              "|---|---|---|---|" + "---:|" * 14]
    for r in rows:
        st, e = r["states"], r["batches"][str(b_hi)]
        lines.append(
            f"| {r['family']} | {r['mode']} | {STAGE_LABELS[r['stage']]} "
            f"| {'yes' if r['gradient_checkpointing'] else 'no'} "
            f"| {gib(st['weights'])} | {gib(st['gradients'])} | {gib(st['adamw'])} | {gib(st['ema'])} "
            f"| {gib(st['buffers'])} | {gib(st['projector'])} | {gib(st['ddp_buckets'])} "
            f"| {gib(st['fsdp_working_set'])} | {gib(st['teacher_weights'])} | {gib(st['vae'])} "
            f"| {gib(r['state_bytes'])} | {gib(e['activations'])} | {gib(r['optimizer_step_transient'])} "
            f"| **{gib(e['peak'])}** |")
    lines.append("")

    lines += ["## Sizes: parameter counts (meta device) against the published sizes", "",
              "| family | config | blocks | parameters | persistent buffers | stored | published | difference "
              "| check | image tokens | text tokens | text encoders (bf16 GiB, held without precomputed embeddings) "
              "| VAE |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for name in result["family_order"]:
        f = fams[name]
        c = f["published_check"]
        enc = "; ".join(f"{e} {f['encoder_params'][e] / 1e9:.2f}B" for e in f["text_encoders"])
        lines.append(
            f"| {name} | {f['transformer']} ({f['resolution']} px) | {f['depth_note']} | {c['parameters']:,} "
            f"| {c['persistent_buffers']:,} | {c['stored']:,} | {c['published'] / 1e9:.1f}B "
            f"| {100 * c['relative_difference']:+.1f} % | {'ok' if c['ok'] else 'OFF'} | {f['image_tokens']} "
            f"| {f['text_tokens']} | {enc} = {f['text_encoder_gib']:.2f} GiB | {f['vae']} "
            f"{f['vae_params'] / 1e6:.1f}M |")
    lines += ["", "Published sizes: " + "; ".join(f"{n}: {fams[n]['published_check']['source']}"
                                                  for n in result["family_order"]) + ".",
              "Text encoders: " + "; ".join(f"{k} {v}" for k, v in ENCODER_PUBLISHED.items()) + ".", ""]

    lines += ["## The arithmetic for one row", ""] + result["worked_example"] + [""]

    lines += ["## Activations (measured, extrapolated)", "",
              f"Probes at {result['probe_heads_note']}; batch {list(PROBE_BATCHES)}. Per row (at batch {b_hi}): the "
              "phase that peaks, bytes per sample, per block (each kind) per sample, and the batch-independent part "
              "(ddp: autocast's bf16 weight copies at the real width, which the check below compares with 2 bytes "
              "x the matmul weights).", "",
              "| family | mode | stage | ckpt | peak phase | per sample MiB | per block per sample MiB "
              "| batch-independent MiB | teacher pass transient at batch " + str(b_hi) + " GiB |",
              "|---|---|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        e = r["batches"][str(b_hi)]
        a = r["activations"][e["peak_phase"]]
        blocks = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in a["per_block_per_sample_bytes"].items())
        teacher = gib(r["teacher_transient"][str(b_hi)]["bytes"]) if "teacher_transient" in r else "-"
        lines.append(f"| {r['family']} | {r['mode']} | {STAGE_LABELS[r['stage']]} "
                     f"| {'yes' if r['gradient_checkpointing'] else 'no'} | {PHASE_LABELS[e['peak_phase']]} "
                     f"| {a['per_sample_bytes'] / 2**20:.1f} | {blocks} | {a['batch_independent_bytes'] / 2**20:.1f} "
                     f"| {teacher} |")
    lines.append("")

    lines += ["## Checks", ""]
    c = result["checks"]
    lines.append("- Parameter counts against the published sizes (within "
                 f"{100 * PUBLISHED_TOLERANCE:.0f} %): " + ", ".join(
                     f"{x['family']} {100 * x['relative_difference']:+.1f} % {'ok' if x['ok'] else 'OFF'}"
                     for x in c["published"]) + ".")
    lines.append("- Model states on a probe (weights, `.grad`s, AdamW moments, EMA, bf16 teacher, buffers) equal "
                 "the formulas: " + ", ".join(f"{x['family']} {'yes' if x['equal'] else 'NO'}"
                                              for x in c["model_states"]) + ".")
    for x in c["width"]:
        if x["variant"] == "ddp":
            lines.append(f"- Width: {x['family']} at its real {x['heads']} heads, {STAGE_LABELS[x['stage']]}, "
                         f"checkpointing {'on' if x['gradient_checkpointing'] else 'off'}, batch {x['batch']}: "
                         f"measured {x['measured_bytes'] / 2**20:.1f} MiB, extrapolated from the narrow probes "
                         f"{x['extrapolated_bytes'] / 2**20:.1f} MiB ({100 * x['relative_error']:+.1f} %).")
    if c["width"]:
        worst = max(c["width"], key=lambda x: abs(x["relative_error"]))
        lines.append(f"- Width, largest error over both variants (ddp / fsdp2): {100 * worst['relative_error']:+.1f} "
                     f"% ({worst['variant']}, {STAGE_LABELS[worst['stage']]}, batch {worst['batch']}).")
    for x in c["depth"]:
        lines.append(f"- Depth: {x['family']} full {x['depth']} blocks at {x['heads']} heads, stage 2 guided, batch "
                     f"{x['batch']}, checkpointing {'on' if x['gradient_checkpointing'] else 'off'}, {x['variant']}: "
                     f"measured {x['measured_bytes'] / 2**20:.1f} MiB, extrapolated "
                     f"{x['extrapolated_bytes'] / 2**20:.1f} MiB ({100 * x['relative_error']:+.1f} %).")
    ratios = [x["ratio"] for x in c["batch_linearity"] if x["variant"] == "fsdp2"]
    if ratios:
        lines.append(f"- Batch: probes' activation peak at batch 2 over batch 1 without weight copies "
                     f"{min(ratios):.3f} to {max(ratios):.3f} (proportional: 2).")
    for x in c["weight_copies"]:
        lines.append(f"- bf16 weight copies, {x['family']} (ddp, no checkpointing, {STAGE_LABELS[x['stage']]}): "
                     f"batch-independent part {x['batch_independent_bytes'] / 2**20:.0f} MiB vs 2 bytes x matmul "
                     f"weights {x['expected_bytes'] / 2**20:.0f} MiB.")
    lines += ["", "## Caveats", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Activations are measured on CPU kernels (the CPU flash-attention kernel, which stores O(tokens) statistics like "
    "CUDA's flash / memory-efficient kernels; their exact saved tensors and workspaces can differ). CPU and CUDA "
    "autocast policies differ: layer_norm is imitated in fp32 as on CUDA; rms_norm (SD3.5's and Flux's q/k norms) "
    "upcasts to fp32 internally on both; the rest of these steps uses ops that both lists treat alike.",
    "Not counted: the CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers, the caching allocator's "
    "fragmentation (keep the headroom), the VAE encoder's activations (before the forward; none with precomputed "
    "latents) and, without `--precompute_text_embeddings`, the text encoders' activations (their weights are in the "
    "sizes table).",
    "The peak counts all gradients next to the activation peak: an upper bound (gradients grow while backward frees "
    "activations). The optimizer/EMA transient follows the script: fused AdamW under DDP, foreach under FSDP2 "
    "(`--no-fused_adamw` under DDP adds foreach's temporaries, 4 bytes per parameter, at batch 1 more than the "
    "activations).",
    "FSDP2's working set is arithmetic (an estimate of the unsharded bf16 parameters and gradients in flight), not a "
    "measurement; its activations are the DDP step's without autocast's weight copies. FSDP2 computes with bf16 "
    "parameters, so the few tensors that combine a parameter with activations outside autocast's ops (adaLN "
    "scale-shift tables, norm weights) can be bf16 there where the measured step has fp32: slightly less.",
    "Width: measured at two narrow widths and extrapolated linearly in heads (checked at the real width on "
    "PixArt-Sigma); weight copies counted at their real-width size. Depth: one block of each kind added to the "
    "smallest probe (checked on a full-depth narrow SD3.5-medium).",
    "The after-stop rows hold no teacher (the script frees it at the guide stop). A teacher with fp32 weights "
    "(`--guiding_weights_dtype fp32`) adds 2 bytes per teacher parameter to the guided rows.",
]


def worked_example(result, family: str, mode: str, stage: str, ckpt: bool, batch: int) -> List[str]:
    (r,) = [r for r in result["rows"] if r["family"] == family and r["mode"] == mode and r["stage"] == stage
            and r["gradient_checkpointing"] == ckpt]
    f = result["families"][family]
    c = f["counts"]
    n = result["setting"]["num_gpus"]
    st = r["states"]
    e = r["batches"][str(batch)]
    acts = r["activations"][e["peak_phase"]]  # per-sample and fixed bytes do not depend on the batch
    shard = f" / {n}" if mode == "fsdp2" else ""
    head = c["stage2_projector"] if stage != "stage1" else c["stage1_head"]
    lines = [
        f"{family}, {MODE_LABELS[mode]}, {STAGE_LABELS[stage]}, gradient checkpointing {'on' if ckpt else 'off'}, "
        f"batch {batch} per GPU. P = {c['student']:,} student parameters, P_h = {head:,} projector parameters, "
        f"{c['buffers']:,} buffer elements, teacher P = {c['teacher']:,}, VAE {f['vae_params']:,}.",
        "",
        f"- student weights 4P{shard} = {gib(st['weights'])} GiB; gradients 4P{shard} = {gib(st['gradients'])}; "
        f"AdamW 8P{shard} = {gib(st['adamw'])}; EMA 4P{shard} = {gib(st['ema'])}",
        f"- buffers 4 x {c['buffers']:,} = {gib(st['buffers'])}; projector 16 P_h{shard} = {gib(st['projector'])}",
    ]
    if mode == "ddp":
        lines.append(f"- DDP buckets 4 (P + P_h) = {gib(st['ddp_buckets'])}")
    else:
        lines.append(f"- FSDP2 working set 2 (P_root {c['fsdp_root']:,} + P_h + 4 x largest block "
                     f"{c['fsdp_largest_unit']:,}) = {gib(st['fsdp_working_set'])}")
    lines += [
        f"- teacher 2 (P + buffers) = {gib(st['teacher_weights'])} (bf16, whole); VAE 2 x {f['vae_params']:,} = "
        f"{gib(st['vae'])}; text encoders 0 (precomputed embeddings)",
        f"- model states = {gib(r['state_bytes'])} GiB",
        f"- activations ({PHASE_LABELS[e['peak_phase']]} peak) = batch-independent "
        f"{acts['batch_independent_bytes'] / 2**20:.1f} MiB + {batch} x {acts['per_sample_bytes'] / 2**20:.1f} MiB "
        f"per sample = {gib(e['activations'])} GiB; optimizer/EMA transient {gib(r['optimizer_step_transient'])} GiB",
        f"- peak = {gib(r['state_bytes'])} + max({gib(e['activations'])}, {gib(r['optimizer_step_transient'])}) = "
        f"**{gib(e['peak'])} GiB** ({e['status_80gb']} on an 80 GB card)",
    ]
    return lines


def weight_copy_checks(rows, result) -> List[Dict[str, Any]]:
    out = []
    for name in result["family_order"]:
        c = result["families"][name]["counts"]
        for r in rows:
            if r["family"] == name and r["mode"] == "ddp" and not r["gradient_checkpointing"] \
                    and r["stage"] == "stage2_after_stop":
                phase = r["batches"][str(result["setting"]["batches"][0])]["peak_phase"]
                out.append({"family": name, "stage": r["stage"],
                            "batch_independent_bytes": r["activations"][phase]["batch_independent_bytes"],
                            "expected_bytes": BF16 * c["student_matmul_weights"]})
    return out


# --- The run --------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=os.path.join("benchmarks", "results", "memory_t2i"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batches", type=int, nargs=2, default=list(BATCHES),
                        help="Per-GPU batches of the table (default 32 = 256 over 8 GPUs, and 1).")
    parser.add_argument("--num_gpus", type=int, default=NUM_GPUS)
    parser.add_argument("--projector_dim", type=int, default=None,
                        help=f"Projector width (default {DEFAULT_PROJECTOR_DIM}; --smoke {SMOKE_PROJECTOR_DIM}).")
    parser.add_argument("--no_checks", action="store_true", help="Skip the width and depth checks.")
    parser.add_argument("--threads", type=int, default=None, help=f"torch threads (--smoke: {SMOKE_THREADS}).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="Tiny models of the four classes (seconds).")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.num_gpus < 1:
        raise ValueError("--batches and --num_gpus must be >= 1.")
    return args


def run(args, command: str) -> Dict[str, Any]:
    start = time.perf_counter()
    projector_dim = args.projector_dim or (SMOKE_PROJECTOR_DIM if args.smoke else DEFAULT_PROJECTOR_DIM)
    specs = {name: (SMOKE_FAMILIES if args.smoke else FAMILIES)[name] for name in args.families}
    log = lambda message: print(message, flush=True)  # noqa: E731
    log(f"# command: {command}")
    encoders = encoder_counts()
    families, rows, probes = {}, [], {}
    checks = {"published": [], "model_states": [], "width": [], "depth": [], "batch_linearity": []}
    for name, spec in specs.items():
        real = FAMILIES[name]
        # the published check always concerns the real configs (meta device: no memory), also under --smoke
        checks["published"].append(published_check(real, model_counts(real, real.config, DEFAULT_PROJECTOR_DIM)))
        counts = model_counts(spec, spec.config, projector_dim)
        vae_params = encoders[real.vae] if not args.smoke else 0
        t0 = time.perf_counter()
        measured = measure_family(spec, args, projector_dim, log)
        rows += build_rows(spec, counts, measured, vae_params, args)
        checks["model_states"].append(state_check(spec, measured["optimizer_probe"]))
        checks["batch_linearity"] += linearity(spec, measured)
        if not args.no_checks and name == WIDTH_CHECK_FAMILY:
            checks["width"] += width_check(spec, measured, args, projector_dim, log)
        if not args.no_checks and name == DEPTH_CHECK_FAMILY:
            checks["depth"] += depth_check(spec, measured, args, projector_dim, log)
        plan = depth_plan(spec, spec.config)
        text_params = sum(encoders[e] for e in real.text_encoders)
        families[name] = {
            "transformer": spec.transformer, "config": spec.config, "resolution": spec.resolution,
            "vae_downsampling": spec.vae_factor,
            "latent": f"{spec.latent_channels}x{spec.latent_side}x{spec.latent_side}",
            "image_tokens": spec.image_tokens, "text_tokens": spec.text_tokens, "text_note": spec.text_note,
            "probe_heads": list(spec.probe_heads), "heads": spec.heads,
            "probe_widths": [h * spec.config["attention_head_dim"] for h in spec.probe_heads],
            "width": spec.heads * spec.config["attention_head_dim"],
            "depth_note": plan.note, "block_counts": plan.counts, "probe_layers": plan.layers,
            "real_layers": plan.real_layers, "counts": counts,
            "published_check": checks["published"][-1],
            "text_encoders": list(real.text_encoders),
            "encoder_params": {e: encoders[e] for e in real.text_encoders},
            "text_encoder_params": text_params, "text_encoder_gib": BF16 * text_params / GIB,
            "vae": real.vae, "vae_params": vae_params, "seconds": time.perf_counter() - t0,
        }
        probes[name] = probes_to_json(measured)
    first = next(iter(specs))
    result = {
        "command": command,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "smoke": bool(args.smoke),
        "run_seconds": 0.0,
        "family_order": list(specs),
        "families": families,
        "stages": list(STAGES),
        "modes": list(MODES),
        "setting": {"batches": list(args.batches), "num_gpus": args.num_gpus, "projector_dim": projector_dim,
                    "precision": "bf16 autocast, fp32 master weights; teacher bf16 weights",
                    "text_embeddings": "precomputed (no text encoder held)",
                    "gpu_memory_gib": MT.GPU_MEMORY_GIB, "headroom_gib": MT.HEADROOM_GIB},
        "probe_batches": list(PROBE_BATCHES),
        "probe_heads_note": "; ".join(f"{n}: {specs[n].probe_heads[0]} and {specs[n].probe_heads[1]} of "
                                      f"{specs[n].heads} heads (widths {families[n]['probe_widths'][0]} and "
                                      f"{families[n]['probe_widths'][1]} of {families[n]['width']})" for n in specs),
        "encoder_params": encoders,
        "state_formulas": {
            "weights": "4 P (ddp) | 4 P / 8 (fsdp2)", "gradients": "4 P | 4 P / 8", "adamw": "8 P | 8 P / 8",
            "ema": "4 P | 4 P / 8", "buffers": "4 x buffer elements (replicated)",
            "projector": "16 P_h while it trains, 12 P_h after the stop (/ 8 under fsdp2)",
            "ddp_buckets": "4 (P + P_h) (ddp, >1 GPU)",
            "fsdp_working_set": "2 (P_root + P_h + 4 P_largest_block) (fsdp2, estimate)",
            "teacher_weights": "2 (P + buffer elements), stage 2 guided only, whole on every GPU",
            "vae": "2 P_vae", "text_encoders": "0 (precomputed); 2 P_text otherwise"},
        "rows": rows,
        "checks": checks,
        "probes": probes,
        "notes": NOTES,
    }
    checks["weight_copies"] = weight_copy_checks(rows, result)
    example = DEPTH_CHECK_FAMILY if DEPTH_CHECK_FAMILY in specs else first
    result["worked_example"] = (
        worked_example(result, example, "fsdp2", "stage2_guided", True, args.batches[0]) + [""]
        + worked_example(result, example, "ddp", "stage2_guided", True, args.batches[0]))
    result["run_seconds"] = time.perf_counter() - start
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as fh:
        fh.write(markdown(result))
    log(f"# wrote results.json and results.md ({result['run_seconds']:.0f} s)")
    return result


def main(argv=None):
    args = parse_args(argv)
    command = MT.display_command(sys.argv[1:] if argv is None else list(argv), args.output_dir, script=SCRIPT)
    threads = torch.get_num_threads()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # the bf16 teacher's `.to()` warns once per probe
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or SMOKE_THREADS)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")  # rms_norm, bf16 q
            return run(args, command)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process
        diffusers.utils.logging.set_verbosity(verbosity)


if __name__ == "__main__":
    main()

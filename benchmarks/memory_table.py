# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Peak memory per GPU of one Self-Transcendence training step: SiT-B/2, SiT-L/2, SiT-XL/2 (issue 26, item 3).

Scope: 256 px ImageNet (SD-VAE latents 4x32x32, patch 2 -> 256 tokens, 1000 classes), batch 32 per GPU (the paper's
global batch 256 over 8 GPUs, DDP), for
- `stage1_vae_align`: stage 1 (`examples/train_align.py --alignment vae_align`);
- `stage2_guided`: stage 2 while the guide is on (`examples/train_self_transcendence.py`): a frozen same-size
  teacher runs [x_t, x_t] to block 2n/3 under no_grad, a projector MLP maps the student's block n/2;
- `stage2_after_stop`: stage 2 after the guide stop (a vanilla step: no teacher pass, no projector pass);
each with and without gradient checkpointing, under bf16 mixed precision (accelerate autocast, fp32 master weights)
and fp32. What a GPU also needs and this table does not count: the CUDA context, cuBLAS/cuDNN workspaces, allocator
fragmentation, NCCL buffers and the data pipeline.

How each number is obtained:
1. Model states: arithmetic from the parameter counts of the real modules (built on the meta device): student
   weights 4P (fp32), gradients 4P (fp32: the weights are fp32 under autocast), AdamW exp_avg + exp_avg_sq 2 x 4P,
   EMA 4P (diffusers `EMAModel` of the student), the teacher 4P_teacher (fp32 weights: the script loads them as
   saved; `--guiding_autocast bf16` changes its compute, not its weights), the projector/head 4 + 4 + 8 bytes per
   parameter while it trains (after the stop: its weights and AdamW states stay allocated, no gradients), and
   DDP's gradient buckets, 4 bytes per trainable parameter (accelerate's default `gradient_as_bucket_view=False`
   keeps a flat fp32 copy of the gradients on every GPU). A probe step checks the first four against the real
   tensors (AdamW states, `.grad`s, EMA shadow parameters).
2. Activations: MEASURED on this CPU by running the scripts' own `compute_loss` (`train_align.compute_loss` /
   `train_self_transcendence.compute_loss`), backward, clipping, AdamW and EMA, under a dispatch-level tracker that
   records every tensor storage allocated during the step and when it is freed (de-duplicated by storage). The
   activation peak is the largest total of live storages during forward + loss + backward that are not gradients,
   so it holds what autograd saves for backward, the checkpointed blocks' inputs and the recomputed block, the
   teacher's transient working set and its features f_c/f_u/f_g, and the backward's temporaries. Autograd's saved
   tensors are also recorded separately with `saved_tensors_hooks` (a cross-check; inside checkpointed blocks those
   go to the checkpoint's own hooks).
   The full models are too slow here, so each configuration is measured on probes of the same width, heads and
   tokens with 1 and 2 blocks, at batch 1 and 2: one block's bytes (2 blocks - 1 block; identical blocks give
   identical activations) are multiplied out to the full depth, and the per-sample bytes (batch 2 - batch 1) to
   batch 32. A full-depth SiT-B/2 step at batch 1 checks the depth extrapolation. bf16 rows are measured under CPU
   autocast wrapped around the student's and the heads' forward as `accelerate.prepare` does, with CUDA autocast's
   fp32 policy for `layer_norm` imitated (CPU autocast runs it in bf16; CUDA in fp32); the teacher runs under the
   same autocast (`--guiding_autocast auto`, the default: the run's precision, fp32 weights).
3. The optimizer/EMA step: foreach AdamW (the CUDA default) and `EMAModel(foreach=True)` need temporaries of the
   size of the parameters while the activations are gone; measured on a probe in bytes per parameter.
   Peak = model states + max(activation peak, optimizer/EMA step transient). Counting all gradients next to the
   activation peak is an upper bound: with `zero_grad(set_to_none=True)` the gradients grow while backward frees
   the activations.

    python benchmarks/memory_table.py                     # the committed table (benchmarks/results/memory_table)
    python benchmarks/memory_table.py --presets SiT-B/2 --precisions fp32 --output_dir /tmp/mem
    python benchmarks/memory_table.py --smoke --output_dir /tmp/mem_smoke   # a tiny model, seconds

Writes `results.json` (every number, the probes, the checks, the command) and `results.md` (the table in GiB per GPU).
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
import weakref
from types import MethodType
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

import train_align  # noqa: E402  (the training steps measured here are the scripts' own `compute_loss`)
import train_self_transcendence  # noqa: E402
from accelerate.utils import convert_outputs_to_fp32  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from diffusers_selftrans import SiTTransformer2DModel  # noqa: E402
from diffusers_selftrans.alignment import build_alignment  # noqa: E402
from diffusers_selftrans.alignment.common import resolve_sit_config  # noqa: E402
from diffusers_selftrans.cli import DEFAULT_EMA_DECAY, DEFAULT_LEARNING_RATE, DEFAULT_MAX_GRAD_NORM  # noqa: E402
from diffusers_selftrans.models.projector import DEFAULT_PROJECTOR_DIM  # noqa: E402
from diffusers_selftrans.models.transformer_sit import parse_preset  # noqa: E402
from diffusers_selftrans.transport import Transport  # noqa: E402

PRESETS = ("SiT-B/2", "SiT-L/2", "SiT-XL/2")
# 256 px ImageNet through the SD-VAE: 4x32x32 latents (256 tokens at patch 2), 1000 classes.
LATENT_SIZE = 32
NUM_CLASSES = 1000
# The scripts' default (`--qk_norm`, as the Self-Transcendence release): q/k LayerNorms add saved activations.
QK_NORM = True
# The paper's global batch 256 (method-notes §6.18) over 8 GPUs = 32 per GPU; 8 GPUs means DDP.
BATCH_PER_GPU = 32
NUM_GPUS = 8
STAGES = ("stage1_vae_align", "stage2_guided", "stage2_after_stop")
STAGE_LABELS = {
    "stage1_vae_align": "stage 1 (vae_align)",
    "stage2_guided": "stage 2, guided",
    "stage2_after_stop": "stage 2, after the guide stop",
}
PRECISIONS = ("bf16", "fp32")
# A guide stop far beyond the step: the guided phase is on. 0: the first step already runs after the stop.
NEVER_STOP = 10**9
# Probes: same width, heads and tokens as the preset, this many blocks and samples. Two of each give one block's
# bytes and one sample's bytes; the rest is arithmetic (see the module docstring).
PROBE_DEPTHS = (1, 2)
PROBE_BATCHES = (1, 2)
# The activation peak of each phase of the step, extrapolated separately (see `probe_step`).
PHASE_KEYS = ("student_forward_peak_bytes", "loss_peak_bytes", "backward_peak_bytes")
PHASE_LABELS = {"student_forward": "student forward", "loss": "head/teacher/loss", "backward": "backward"}
# Bytes per parameter of each model state (fp32 master weights in both precisions; AdamW keeps 2 fp32 moments).
FP32_BYTES = 4
ADAMW_STATES = 2
# An "80 GB" A100/H100 has 80 GiB of HBM; nvidia-smi shows 81559 MiB (H100 80GB HBM3) to 81920 MiB (A100 80GB).
GPU_MEMORY_GIB = 81559 / 1024
# Not measured here: CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces and caching-allocator fragmentation. A peak
# within this much of the card is marked "tight" rather than "fits".
HEADROOM_GIB = 4.0
GIB = 2**30
# --smoke: a tiny SiT with every piece (qk_norm, a 2-block probe, a 3-block "preset" for the depth check).
SMOKE_PRESET = "tiny"
SMOKE_CONFIG = dict(num_layers=3, num_attention_heads=2, attention_head_dim=32, patch_size=2, sample_size=16,
                    num_classes=10, qk_norm=QK_NORM)
SMOKE_PROJECTOR_DIM = 128
# One intra-op thread for --smoke (tiny ops on a busy CPU lose more to thread hand-offs than they gain).
SMOKE_THREADS = 1


# --- Measuring live tensor memory on the CPU ------------------------------------------------------------------------
class LiveStorageTracker(TorchDispatchMode):
    """Records every tensor storage that an op allocates (an output that does not alias one of the op's inputs) and
    when it is freed, as an event list of `(key, +bytes)` / `(key, -bytes)`; `mark(name)` notes a point in it.

    Tensors that existed before (parameters, the batch, optimizer states made earlier) are never counted; what the
    storages were (gradients, AdamW states) is decided afterwards with `key_of`.
    """

    def __init__(self):
        super().__init__()
        self._keys = WeakIdKeyDictionary()
        self.nbytes: Dict[int, int] = {}
        self.events: List[tuple] = []
        self.marks: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._keys:  # a view, an in-place result, or already known
                continue
            key, size = len(self.nbytes), storage.nbytes()
            self._keys[storage] = key
            self.nbytes[key] = size
            self.events.append((key, size))
            weakref.finalize(storage, self.events.append, (key, -size))
        return out

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.events)

    def key_of(self, tensor: torch.Tensor) -> Optional[int]:
        return self._keys.get(tensor.untyped_storage())

    def live_curve(self, exclude, start: str, end: str, scale: Optional[Dict[int, float]] = None) -> Dict[str, int]:
        """Live bytes of the storages not in `exclude` between two marks: at `start`, at `end`, and the peak.
        `scale`: storage key -> factor its bytes count with (others count once), e.g. to resize some storages."""
        live, at_start, peak = 0, 0, None
        for i, (key, delta) in enumerate(self.events[: self.marks[end]]):
            if i == self.marks[start]:
                at_start, peak = live, live
            if key not in exclude:
                live += delta if scale is None or key not in scale else delta * scale[key]
            if i >= self.marks[start]:
                peak = max(peak, live)
        if peak is None:  # no event after `start`
            at_start = peak = live
        return {"start": at_start, "end": live, "peak": peak}


def cuda_autocast_layer_norm(module: torch.nn.Module) -> None:
    """Makes `module`'s LayerNorms run in fp32 under CPU autocast, as CUDA autocast does (`layer_norm` is on CUDA's
    fp32 list; CPU autocast leaves it in the input's dtype): the q/k norms then save fp32 inputs as on a GPU."""

    def forward(self, x):
        if not torch.is_autocast_enabled("cpu"):
            return torch.nn.LayerNorm.forward(self, x)
        with torch.autocast("cpu", enabled=False):
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)

    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            sub.forward = MethodType(forward, sub)


def autocast_forward(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """What `accelerate.prepare` does to a model under `--mixed_precision`: forward under autocast, outputs to fp32."""
    forward = torch.autocast("cpu", dtype=dtype)(type(module).forward)
    module.forward = MethodType(convert_outputs_to_fp32(forward), module)


# --- One probe step ---------------------------------------------------------------------------------------------------
def build_stage(stage: str, config: Dict[str, Any], projector_dim: int):
    """Student, alignment method and the script's `compute_loss` of a stage (default layers for the depth)."""
    model = SiTTransformer2DModel(**config).train()
    if stage == "stage1_vae_align":
        return model, build_alignment("vae_align", model.config, projector_dim=projector_dim), train_align.compute_loss
    teacher = SiTTransformer2DModel(**config)  # the same architecture (paper: the stage-1 model); weights irrelevant
    stop = NEVER_STOP if stage == "stage2_guided" else 0
    method = build_alignment("self_transcendence", model.config, teacher=teacher, guide_stop_step=stop,
                             projector_dim=projector_dim)
    return model, method, train_self_transcendence.compute_loss


def mark_student_and_teacher(model, method, tracker) -> None:
    """Marks on `tracker` when the student's forward ends and when the teacher's pass starts and ends."""
    model.register_forward_hook(lambda *unused: tracker.mark("student_end"))  # after autocast's region ends
    guiding = getattr(method, "guiding_features", None)
    if guiding is not None:
        def tracked_guiding(*args, **kwargs):
            tracker.mark("teacher_start")
            try:
                return guiding(*args, **kwargs)
            finally:
                tracker.mark("teacher_end")
        method.guiding_features = tracked_guiding


def probe_step(config: Dict[str, Any], stage: str, *, batch: int, precision: str, checkpointing: bool,
               projector_dim: int, seed: int, optimizer_step: bool = False) -> Dict[str, Any]:
    """One training step of `stage` on `config`, tracked; returns bytes (see `LiveStorageTracker`).

    `optimizer_step`: also clip, AdamW (foreach) and EMA (foreach) as the scripts, and check the model states'
    bytes against the arithmetic; otherwise the step ends after backward (all the activations are gone by then).
    """
    torch.manual_seed(seed)
    model, method, compute_loss = build_stage(stage, config, projector_dim)
    if checkpointing:
        model.enable_gradient_checkpointing()
    heads = method.trainable_modules()
    # As the scripts: the optimiser gets the projector before the first is_active() (a stopped head gets no grads).
    params = list(model.parameters()) + [p for h in heads for p in h.parameters() if p.requires_grad]
    if optimizer_step:
        ema = EMAModel(model.parameters(), decay=DEFAULT_EMA_DECAY, min_decay=DEFAULT_EMA_DECAY, foreach=True,
                       model_cls=SiTTransformer2DModel, model_config=model.config)
        optimizer = torch.optim.AdamW(params, lr=DEFAULT_LEARNING_RATE, foreach=True)
    if precision == "bf16":
        # the teacher too: `--guiding_autocast auto` (the default) runs it under the run's autocast, weights fp32
        teacher = [method.teacher] if getattr(method, "teacher", None) is not None else []
        for module in [model] + heads + teacher:
            autocast_forward(module, torch.bfloat16)
            cuda_autocast_layer_norm(module)
    cfg = resolve_sit_config(config)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=gen)
    labels = torch.randint(0, cfg["num_classes"], (batch,), generator=gen)

    tracker = LiveStorageTracker()
    saved = {}  # storage key -> bytes, for what autograd saves outside checkpointed blocks

    def pack(tensor):
        key = tracker.key_of(tensor)
        if key is not None:  # parameters and the batch are not activations
            saved[key] = tracker.nbytes[key]
        return tensor

    mark_student_and_teacher(model, method, tracker)

    start = time.perf_counter()
    with tracker:
        tracker.mark("start")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, _, _ = compute_loss(model, method, x0, labels, Transport(), step=0,
                                      class_dropout_prob=model.config.class_dropout_prob)
        tracker.mark("forward_end")
        loss.backward()
        tracker.mark("backward_end")
        grads = {tracker.key_of(p.grad) for p in params if p.grad is not None}
        result = {"grad_bytes": sum(p.grad.nbytes for p in params if p.grad is not None)}
        if optimizer_step:
            torch.nn.utils.clip_grad_norm_(params, DEFAULT_MAX_GRAD_NORM, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.mark("adamw_end")
            ema.step(model.parameters())
        tracker.mark("end")
    seconds = time.perf_counter() - start
    del loss
    student = tracker.live_curve(grads, "start", "student_end")
    loss_phase = tracker.live_curve(grads, "student_end", "forward_end")
    backward = tracker.live_curve(grads, "forward_end", "backward_end")
    result.update(
        # The phases peak at different places (the student's forward: its end, with autocast's cache of bf16 weight
        # copies, which is freed when the autocast region ends; the alignment head, the teacher pass and the losses;
        # the backward: its start, or the first recomputed block). Each scales linearly with depth and batch on
        # its own: they are extrapolated separately and the largest is taken.
        student_forward_peak_bytes=student["peak"],
        loss_peak_bytes=loss_phase["peak"],
        backward_peak_bytes=backward["peak"],
        activation_peak_bytes=max(student["peak"], loss_phase["peak"], backward["peak"]),
        backward_start_bytes=loss_phase["end"],
        saved_for_backward_bytes=sum(saved.values()),
        seconds=round(seconds, 3),
        teacher_forwards=getattr(method, "teacher_forwards", None),
        teacher_released=getattr(method, "teacher", None) is None if stage != "stage1_vae_align" else None,
    )
    if "teacher_start" in tracker.marks:
        teacher = tracker.live_curve(grads, "teacher_start", "teacher_end")
        result["teacher_transient_bytes"] = teacher["peak"] - teacher["start"]
        result["teacher_features_bytes"] = teacher["end"] - teacher["start"]  # f_g (and what the pass left alive)
    if optimizer_step:
        moments = [v for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
        adam = {tracker.key_of(v) for v in moments}
        # Temporaries of clip + AdamW (gradients still there) and of the EMA step (gradients freed), not counting
        # the states themselves; what the activations left behind (the loss) is in `start` and subtracted.
        step_adam = tracker.live_curve(grads | adam, "backward_end", "adamw_end")
        step_ema = tracker.live_curve(grads | adam, "adamw_end", "end")
        trainable = sum(p.numel() for p in params)
        student_params = sum(p.numel() for p in model.parameters())
        result.update(
            trainable_params=trainable,
            student_params=student_params,
            measured_state_bytes={
                "weights": sum(p.nbytes for p in model.parameters()),
                "gradients": result["grad_bytes"],
                "adamw": sum(v.nbytes for v in moments),
                "ema": sum(s.nbytes for s in ema.shadow_params),
            },
            adamw_step_transient_per_param=(step_adam["peak"] - step_adam["start"]) / trainable,
            ema_step_transient_per_param=(step_ema["peak"] - step_ema["start"]) / student_params,
        )
    if "guiding_features" in vars(method):  # the marking wrapper refers back to the method: no reference cycle
        del method.guiding_features
    return result


# --- Model states: arithmetic from the parameter counts ---------------------------------------------------------------
def param_counts(config: Dict[str, Any], projector_dim: int) -> Dict[str, int]:
    """Parameter counts of the real modules, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = SiTTransformer2DModel(**config)
        stage1 = build_alignment("vae_align", model.config, projector_dim=projector_dim)
        teacher = SiTTransformer2DModel(**config)
        stage2 = build_alignment("self_transcendence", model.config, teacher=teacher, projector_dim=projector_dim)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    matmul = lambda module: sum(m.weight.numel() for m in module.modules()  # noqa: E731
                                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return {
        "student": count(model),
        "teacher": count(teacher),
        "stage1_head": count(stage1.projector),
        "stage2_projector": count(stage2.projector),
        # autocast keeps a bf16 copy of each matmul weight for backward: 2 bytes each (a batch-independent activation)
        "student_matmul_weights": matmul(model),
        "stage1_head_matmul_weights": matmul(stage1.projector),
        "stage2_projector_matmul_weights": matmul(stage2.projector),
    }


def model_states(counts: Dict[str, int], stage: str, num_gpus: int) -> Dict[str, int]:
    """Bytes per GPU of everything that does not depend on the batch (see the module docstring for each term)."""
    p = counts["student"]
    head = counts["stage1_head" if stage == "stage1_vae_align" else "stage2_projector"]
    head_trains = stage != "stage2_after_stop"  # after the stop: weights and AdamW moments stay, no gradients
    trainable = p + (head if head_trains else 0)
    return {
        "weights": FP32_BYTES * p,
        "gradients": FP32_BYTES * p,
        "adamw": ADAMW_STATES * FP32_BYTES * p,
        "ema": FP32_BYTES * p,
        "teacher_weights": FP32_BYTES * counts["teacher"] if stage == "stage2_guided" else 0,
        "projector": FP32_BYTES * head * (1 + ADAMW_STATES + (1 if head_trains else 0)),
        # DDP prepares the student and the head separately; both reducers keep fp32 buckets for every parameter
        # that required grad at prepare time (the head still did).
        "ddp_buckets": FP32_BYTES * (p + head) if num_gpus > 1 else 0,
        "_trainable_params": trainable,
        "_gradient_bytes_all": FP32_BYTES * trainable,
    }


# --- Extrapolation from the probes ------------------------------------------------------------------------------------
def extrapolate(stage_probes, block_probes, key: str, depth: int, batches, target_batch: int) -> Dict[str, float]:
    """Probe bytes -> bytes at `depth` blocks and `target_batch` samples (linear in depth, then in batch).

    `stage_probes[(d, b)]` at the smallest probe depth; `block_probes[(d, b)]` at two depths give one block's bytes.
    """
    d1, d2 = PROBE_DEPTHS
    b1, b2 = batches
    per_block = {b: (block_probes[(d2, b)][key] - block_probes[(d1, b)][key]) / (d2 - d1) for b in batches}
    at_depth = {b: stage_probes[(d1, b)][key] + (depth - d1) * per_block[b] for b in batches}
    per_sample = (at_depth[b2] - at_depth[b1]) / (b2 - b1)
    fixed = at_depth[b1] - per_sample * b1
    return {
        "bytes": fixed + per_sample * target_batch,
        "per_sample_bytes": per_sample,
        "batch_independent_bytes": fixed,
        "per_block_per_sample_bytes": (per_block[b2] - per_block[b1]) / (b2 - b1),
        "at_probe_batches": {str(b): at_depth[b] for b in batches},
    }


def batch_fit(probes, key: str, batches, target_batch: int) -> Dict[str, float]:
    """Depth-independent bytes (the teacher's no_grad pass) -> `target_batch` samples."""
    b1, b2 = batches
    d1 = PROBE_DEPTHS[0]
    per_sample = (probes[(d1, b2)][key] - probes[(d1, b1)][key]) / (b2 - b1)
    fixed = probes[(d1, b1)][key] - per_sample * b1
    return {"bytes": fixed + per_sample * target_batch, "per_sample_bytes": per_sample,
            "batch_independent_bytes": fixed}


def fit_status(peak_bytes: float) -> str:
    gib = peak_bytes / GIB
    if gib > GPU_MEMORY_GIB:
        return "does not fit"
    return "tight" if gib > GPU_MEMORY_GIB - HEADROOM_GIB else "fits"


def max_batch(states_bytes: float, activations: Dict[str, float], opt_transient: float) -> int:
    """Largest per-GPU batch whose peak stays within the card minus the headroom."""
    budget = (GPU_MEMORY_GIB - HEADROOM_GIB) * GIB - states_bytes
    if budget < opt_transient or activations["per_sample_bytes"] <= 0:
        return 0
    return max(0, int((budget - activations["batch_independent_bytes"]) // activations["per_sample_bytes"]))


# --- The run ----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=os.path.join("benchmarks", "results", "memory_table"))
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                        help="SiT presets (256 px: 32x32x4 latents, 1000 classes).")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--batch", type=int, default=BATCH_PER_GPU,
                        help=f"Per-GPU batch of the table (default {BATCH_PER_GPU} = 256 over {NUM_GPUS} GPUs).")
    parser.add_argument("--num_gpus", type=int, default=NUM_GPUS, help="GPUs (>1: DDP gradient buckets counted).")
    parser.add_argument("--projector_dim", type=int, default=None,
                        help=f"Projector MLP width (default {DEFAULT_PROJECTOR_DIM}; --smoke {SMOKE_PROJECTOR_DIM}).")
    parser.add_argument("--no_depth_check", action="store_true",
                        help="Skip the full-depth step of the first preset that checks the depth extrapolation.")
    parser.add_argument("--threads", type=int, default=None, help=f"torch threads (--smoke: {SMOKE_THREADS}).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="A tiny 3-block SiT instead of the presets (seconds).")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.num_gpus < 1:
        raise ValueError("--batch and --num_gpus must be >= 1.")
    return args


def preset_configs(args) -> Dict[str, Dict[str, Any]]:
    if args.smoke:
        return {SMOKE_PRESET: dict(SMOKE_CONFIG)}
    return {name: {**parse_preset(name), "sample_size": LATENT_SIZE, "num_classes": NUM_CLASSES, "qk_norm": QK_NORM}
            for name in args.presets}


def display_command(argv: List[str], output_dir: str, script: str = "benchmarks/memory_table.py") -> str:
    """The command with `--output_dir` relative to the repository (or a placeholder): no absolute paths."""
    shown, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        value = None
        if arg == "--output_dir" and i + 1 < len(argv):
            value, skip = argv[i + 1], True
        elif arg.startswith("--output_dir="):
            value = arg.split("=", 1)[1]
        if value is None:
            shown.append(arg)
            continue
        rel = os.path.relpath(os.path.abspath(value), REPO_ROOT)
        shown += ["--output_dir", rel if not rel.startswith("..") else "<output_dir>"]
    return "python " + " ".join(shlex.quote(a) for a in [script] + shown)


def measure_preset(name, config, args, projector_dim, batches, log) -> Dict[str, Any]:
    """Every probe of one preset: {precision: {checkpointing: {stage: {(depth, batch): result}}}}."""
    probes = {}
    for precision in args.precisions:
        for ckpt in (False, True):
            per_stage = {}
            for stage in STAGES:
                depths = PROBE_DEPTHS if stage == "stage2_after_stop" else PROBE_DEPTHS[:1]
                per_stage[stage] = {}
                for depth in depths:
                    for batch in batches:
                        # One probe also runs clip + AdamW + EMA: the optimizer-step transient and the state check.
                        opt = (precision == args.precisions[0] and not ckpt and stage == "stage2_guided"
                               and depth == PROBE_DEPTHS[0] and batch == batches[0])
                        res = probe_step({**config, "num_layers": depth}, stage, batch=batch, precision=precision,
                                         checkpointing=ckpt, projector_dim=projector_dim, seed=args.seed,
                                         optimizer_step=opt)
                        per_stage[stage][(depth, batch)] = res
                        log(f"{name} {precision} ckpt={int(ckpt)} {stage} depth={depth} batch={batch}: "
                            f"activation peak {res['activation_peak_bytes'] / 2**20:.1f} MiB ({res['seconds']:.1f} s)")
            probes.setdefault(precision, {})[ckpt] = per_stage
    return probes


def depth_check(name, config, args, projector_dim, batches, probes, log) -> List[Dict[str, Any]]:
    """A full-depth guided step at the smallest probe batch vs the value extrapolated from 1- and 2-block probes."""
    checks = []
    depth = config["num_layers"]
    for precision in args.precisions:
        for ckpt in (False, True):
            res = probe_step(config, "stage2_guided", batch=batches[0], precision=precision, checkpointing=ckpt,
                             projector_dim=projector_dim, seed=args.seed)
            per_stage = probes[precision][ckpt]
            b = batches[0]
            predicted = max(extrapolate(per_stage["stage2_guided"], per_stage["stage2_after_stop"], key, depth,
                                        batches, b)["bytes"] for key in PHASE_KEYS)
            measured = res["activation_peak_bytes"]
            checks.append({"preset": name, "stage": "stage2_guided", "precision": precision,
                           "gradient_checkpointing": ckpt, "depth": depth, "batch": b, "measured_bytes": measured,
                           "extrapolated_bytes": predicted, "relative_error": (predicted - measured) / measured,
                           "seconds": res["seconds"]})
            log(f"depth check {name} {precision} ckpt={int(ckpt)}: measured {measured / 2**20:.1f} MiB, "
                f"extrapolated {predicted / 2**20:.1f} MiB ({res['seconds']:.1f} s)")
    return checks


def build_rows(name, config, counts, probes, args, batches) -> List[Dict[str, Any]]:
    rows = []
    depth = config["num_layers"]
    opt_probe = probes[args.precisions[0]][False]["stage2_guided"][(PROBE_DEPTHS[0], batches[0])]
    for precision in args.precisions:
        for ckpt in (False, True):
            per_stage = probes[precision][ckpt]
            for stage in STAGES:
                states = model_states(counts, stage, args.num_gpus)
                trainable, grads_all = states.pop("_trainable_params"), states.pop("_gradient_bytes_all")
                phases = {key: extrapolate(per_stage[stage], per_stage["stage2_after_stop"], key, depth, batches,
                                           args.batch) for key in PHASE_KEYS}
                phase = max(phases, key=lambda k: phases[k]["bytes"])
                acts = phases[phase]
                held = extrapolate(per_stage[stage], per_stage["stage2_after_stop"], "backward_start_bytes",
                                   depth, batches, args.batch)
                saved = extrapolate(per_stage[stage], per_stage["stage2_after_stop"], "saved_for_backward_bytes",
                                    depth, batches, args.batch)
                # AdamW temporaries with every gradient alive; the EMA step's come after zero_grad (gradients freed).
                opt_transient = max(opt_probe["adamw_step_transient_per_param"] * trainable,
                                    opt_probe["ema_step_transient_per_param"] * counts["student"] - grads_all)
                state_bytes = sum(states.values())
                peak = state_bytes + max(acts["bytes"], opt_transient)
                row = {
                    "preset": name, "stage": stage, "precision": precision, "gradient_checkpointing": ckpt,
                    "batch_per_gpu": args.batch, "depth": depth,
                    "bytes": {**states, "activations": acts["bytes"], "optimizer_step_transient": opt_transient,
                              "peak": peak},
                    "gib": {k: v / GIB for k, v in {**states, "activations": acts["bytes"],
                                                     "optimizer_step_transient": opt_transient,
                                                     "peak": peak}.items()},
                    "activations": {**acts, "peak_phase": phase.replace("_peak_bytes", ""), "phases": phases,
                                    "backward_start": held, "saved_for_backward_hooks": saved},
                    "status_80gb": fit_status(peak),
                    "max_batch_per_gpu_80gb": min(max_batch(state_bytes, e, opt_transient) for e in phases.values()),
                }
                if stage == "stage2_guided":
                    row["activations"]["teacher_transient"] = batch_fit(per_stage[stage], "teacher_transient_bytes",
                                                                        batches, args.batch)
                    row["activations"]["teacher_features"] = batch_fit(per_stage[stage], "teacher_features_bytes",
                                                                       batches, args.batch)
                if precision == "bf16":
                    head = "stage1_head" if stage == "stage1_vae_align" else "stage2_projector"
                    copies = counts["student_matmul_weights"] + (counts[f"{head}_matmul_weights"]
                                                                 if stage != "stage2_after_stop" else 0)
                    row["activations"]["bf16_weight_copies_expected_bytes"] = 2 * copies
                rows.append(row)
    return rows


def linearity(probes, batches) -> List[Dict[str, Any]]:
    """Activation peak at batch b2 over batch b1, per probe (fp32: ~b2/b1; bf16 adds the batch-independent weight
    copies)."""
    out = []
    for precision, by_ckpt in probes.items():
        for ckpt, per_stage in by_ckpt.items():
            for stage, points in per_stage.items():
                for depth in sorted({d for d, _ in points}):
                    lo, hi = points[(depth, batches[0])], points[(depth, batches[1])]
                    out.append({"precision": precision, "gradient_checkpointing": ckpt, "stage": stage,
                                "depth": depth, "batches": list(batches),
                                "ratio": hi["activation_peak_bytes"] / lo["activation_peak_bytes"],
                                "expected_if_proportional": batches[1] / batches[0]})
    return out


def probes_to_json(probes) -> Dict[str, Any]:
    return {precision: {f"checkpointing_{str(ckpt).lower()}": {
        stage: {f"depth{d}_batch{b}": res for (d, b), res in points.items()} for stage, points in per_stage.items()}
        for ckpt, per_stage in by_ckpt.items()} for precision, by_ckpt in probes.items()}


def state_check(name, counts_probe, opt_probe) -> Dict[str, Any]:
    """The probe's real tensors vs the arithmetic used for the table (same formulas, the probe's counts)."""
    trainable, student = opt_probe["trainable_params"], opt_probe["student_params"]
    arithmetic = {"weights": FP32_BYTES * student, "gradients": FP32_BYTES * trainable,
                  "adamw": ADAMW_STATES * FP32_BYTES * trainable, "ema": FP32_BYTES * student}
    measured = opt_probe["measured_state_bytes"]
    return {"preset": name, "probe": "stage2_guided, 1 block, fp32 weights", "student_params": student,
            "trainable_params": trainable, "measured_bytes": measured, "arithmetic_bytes": arithmetic,
            "equal": measured == arithmetic}


def mib(x: float) -> str:
    return f"{round(x / 2**20, 1) + 0.0:,.1f}"  # + 0.0: no "-0.0" for a fit that lands a few bytes below zero


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def markdown(result: Dict[str, Any]) -> str:
    rows, s = result["rows"], result["setting"]
    lines = [
        "# Peak GPU memory of a training step (issue 26, item 3)",
        "",
        f"Command: `{result['command']}` ({result['run_seconds']:.0f} s on {result['device']}, "
        f"torch {result['torch']}).",
        "",
        f"Setting: {s['latent']} latents ({s['tokens']} tokens), {s['num_classes']} classes, qk_norm {s['qk_norm']}, "
        f"projector width {s['projector_dim']}, batch {s['batch_per_gpu']} per GPU on {s['num_gpus']} GPUs (DDP), "
        f"AdamW + EMA as the example scripts. GiB per GPU (2^30 bytes). Peak = model states + max(activations, "
        f"optimizer/EMA step transient). Status against an 80 GB card ({GPU_MEMORY_GIB:.1f} GiB): \"tight\" = within "
        f"{HEADROOM_GIB:.0f} GiB of it (CUDA context, workspaces and fragmentation are not counted).",
        "",
    ]
    for precision in result["precisions"]:
        title = ("bf16 mixed precision (autocast; fp32 master weights, gradients, AdamW, EMA; fp32 teacher)"
                 if precision == "bf16" else "fp32")
        lines += [f"## {title}", "",
                  "| model | stage | grad. ckpt | weights | grads | AdamW | EMA | teacher | projector | DDP buckets "
                  "| activations | opt. step | **peak** | 80 GB | max batch |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in rows:
            if r["precision"] != precision:
                continue
            g = r["gib"]
            lines.append(
                f"| {r['preset']} | {STAGE_LABELS[r['stage']]} | {'yes' if r['gradient_checkpointing'] else 'no'} "
                f"| {g['weights']:.2f} | {g['gradients']:.2f} | {g['adamw']:.2f} | {g['ema']:.2f} "
                f"| {g['teacher_weights']:.2f} | {g['projector']:.2f} | {g['ddp_buckets']:.2f} "
                f"| {g['activations']:.2f} | {g['optimizer_step_transient']:.2f} | **{g['peak']:.2f}** "
                f"| {r['status_80gb']} | {r['max_batch_per_gpu_80gb']} |")
        lines.append("")

    lines += ["## Model states: the arithmetic", "",
              "P = parameters of the real modules (built on the meta device). Bytes per GPU: weights 4P (fp32), "
              "gradients 4P (fp32), AdamW 2 x 4P, EMA 4P (fp32 copy of the student), teacher 4P_teacher (fp32 "
              "weights, stage 2 guided only), projector/head 4 + 4 + 8 bytes per parameter while it trains and 4 + 8 "
              "after the stop (weights and AdamW moments stay, no gradients), DDP buckets 4 x (P + P_head) (fp32, "
              "`gradient_as_bucket_view=False`).", ""]
    for name, c in result["param_counts"].items():
        p = c["student"]
        lines.append(f"- {name}: P = {p:,} -> weights = gradients = EMA = 4P = {gib(4 * p)} GiB, AdamW 8P = "
                     f"{gib(8 * p)} GiB; teacher P = {c['teacher']:,} -> {gib(4 * c['teacher'])} GiB; stage-1 head "
                     f"{c['stage1_head']:,} params -> 16 B/param = {gib(16 * c['stage1_head'])} GiB; stage-2 "
                     f"projector {c['stage2_projector']:,} -> {gib(16 * c['stage2_projector'])} GiB training, "
                     f"{gib(12 * c['stage2_projector'])} GiB after the stop; DDP buckets 4 x (P + P_head).")
    lines += ["", "Checked on a probe (1 block, after one real step): the bytes of the weights, `.grad`s, AdamW "
              "moments and EMA shadow parameters equal these formulas: "
              + ", ".join(f"{c['preset']} {'yes' if c['equal'] else 'NO'}" for c in result["checks"]["model_states"])
              + ".", ""]

    lines += ["## Activations (measured)", "",
              f"Probes of {list(PROBE_DEPTHS)} blocks at batch {list(result['probe_batches'])} (same width, heads and "
              "tokens as the preset), one real step each; the activation peak is the largest total of live tensor "
              "storages that are not gradients, in each phase of the step (the student's forward; the alignment "
              "head, the teacher pass and the losses; the backward). Each phase is scaled to the full depth (one "
              "block = 2-block probe - 1-block probe, identical blocks) and to the batch (per sample = batch-2 "
              "probe - batch-1 probe) on its own, and the largest is the row's activations. bf16: measured under "
              "CPU autocast with CUDA's fp32 `layer_norm` imitated; its batch-independent part is the bf16 copies "
              "of the matmul weights (saved for backward; with checkpointing, autocast's cache holds them until "
              "the student's forward ends).", "",
              f"| model | precision | grad. ckpt | stage | peak phase | per sample MiB | per block per sample MiB "
              f"| batch-independent MiB | held at backward start, GiB | activations at batch {s['batch_per_gpu']}, GiB "
              "| teacher pass (transient), GiB |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = r["activations"]
        teacher = gib(a["teacher_transient"]["bytes"]) if "teacher_transient" in a else "-"
        lines.append(f"| {r['preset']} | {r['precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} "
                     f"| {STAGE_LABELS[r['stage']]} | {PHASE_LABELS[a['peak_phase']]} | {mib(a['per_sample_bytes'])} "
                     f"| {mib(a['per_block_per_sample_bytes'])} | {mib(a['batch_independent_bytes'])} "
                     f"| {gib(a['backward_start']['bytes'])} | {gib(a['bytes'])} | {teacher} |")
    lines.append("")
    bf16 = [r for r in rows if r["precision"] == "bf16"]
    if bf16:
        lines += ["bf16 batch-independent part vs 2 bytes x the matmul weights (student + trained head): "
                  + "; ".join(f"{r['preset']} {STAGE_LABELS[r['stage']]} "
                              f"{mib(r['activations']['batch_independent_bytes'])} vs "
                              f"{mib(r['activations']['bf16_weight_copies_expected_bytes'])} MiB"
                              for r in bf16 if not r["gradient_checkpointing"]) + ".", ""]
    lin = result["checks"]["batch_linearity"]
    fp32 = [c["ratio"] for c in lin if c["precision"] == "fp32"]
    if fp32:
        lines += [f"Linearity in the batch: fp32 probes' activation peak at batch {result['probe_batches'][1]} over "
                  f"batch {result['probe_batches'][0]} = {min(fp32):.3f} to {max(fp32):.3f} "
                  f"(proportional: {lin[0]['expected_if_proportional']:.1f}).", ""]
    for c in result["checks"]["depth_extrapolation"]:
        lines.append(f"Depth extrapolation check, {c['preset']} {c['precision']}, checkpointing "
                     f"{'on' if c['gradient_checkpointing'] else 'off'}, full {c['depth']} blocks at batch "
                     f"{c['batch']}: measured {mib(c['measured_bytes'])} MiB, extrapolated "
                     f"{mib(c['extrapolated_bytes'])} MiB ({100 * c['relative_error']:+.1f} %).")
    lines.append("")

    lines += [f"## What does not fit an 80 GB GPU at batch {s['batch_per_gpu']}", ""]
    bad = [r for r in rows if r["status_80gb"] != "fits"]
    if not bad:
        lines.append("Every configuration fits.")
    for r in bad:
        ckpt_row = next((o for o in rows if o["preset"] == r["preset"] and o["stage"] == r["stage"]
                         and o["precision"] == r["precision"] and o["gradient_checkpointing"]), None)
        if r["gradient_checkpointing"] or ckpt_row is None:
            fix = f"needs a batch of at most {r['max_batch_per_gpu_80gb']} per GPU even with checkpointing"
        elif ckpt_row["status_80gb"] == "fits":
            fix = (f"needs gradient checkpointing ({ckpt_row['gib']['peak']:.1f} GiB) or a batch of at most "
                   f"{r['max_batch_per_gpu_80gb']} per GPU")
        else:
            fix = f"largest batch per GPU that fits without checkpointing: {r['max_batch_per_gpu_80gb']}"
        lines.append(f"- {r['preset']}, {STAGE_LABELS[r['stage']]}, {r['precision']}, checkpointing "
                     f"{'on' if r['gradient_checkpointing'] else 'off'}: {r['gib']['peak']:.1f} GiB, "
                     f"{r['status_80gb']}; {fix}.")
    lines += ["", "## Caveats", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Activations are measured on CPU kernels. CUDA's attention kernels (flash / memory-efficient) save O(T) "
    "statistics like the CPU flash kernel used here, but their exact saved tensors and workspaces can differ; "
    "autocast op lists differ between CPU and CUDA (layer_norm is imitated; the rest of the SiT step uses only ops on "
    "both lists or on neither).",
    "The peak counts all gradients next to the activation peak: an upper bound (with `zero_grad(set_to_none=True)` "
    "gradients grow while backward frees activations). CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers, the "
    "caching allocator's fragmentation and the VAE encoder (if latents are not precomputed) are not counted.",
    "The after-stop rows hold no teacher: the script frees it at the guide stop (tests/test_gpu_path.py checks that "
    "nothing keeps it alive).",
    "DDP buckets follow accelerate's default (`gradient_as_bucket_view=False`); "
    "`DistributedDataParallelKwargs(gradient_as_bucket_view=True)` would remove that column. One GPU: `--num_gpus 1`.",
    "bf16 rows run the teacher under bf16 autocast (`--guiding_autocast auto`, the default); `--guiding_autocast no` "
    "(fp32 compute, the released stage-2 setting) enlarges its transient working set. The optimizer/EMA transient is "
    "foreach AdamW's; fused AdamW (`--fused_adamw`, the default on CUDA) needs less.",
]


def run(args, command: str) -> Dict[str, Any]:
    start = time.perf_counter()
    projector_dim = args.projector_dim or (SMOKE_PROJECTOR_DIM if args.smoke else DEFAULT_PROJECTOR_DIM)
    batches = PROBE_BATCHES
    configs = preset_configs(args)
    log = lambda message: print(message, flush=True)  # noqa: E731
    log(f"# command: {command}")
    counts_all, probes_all, rows, depth_checks, state_checks, lin = {}, {}, [], [], [], []
    for i, (name, config) in enumerate(configs.items()):
        counts = param_counts(config, projector_dim)
        probes = measure_preset(name, config, args, projector_dim, batches, log)
        if i == 0 and not args.no_depth_check:
            depth_checks += depth_check(name, config, args, projector_dim, batches, probes, log)
        rows += build_rows(name, config, counts, probes, args, batches)
        opt_probe = probes[args.precisions[0]][False]["stage2_guided"][(PROBE_DEPTHS[0], batches[0])]
        state_checks.append(state_check(name, counts, opt_probe))
        lin += [{"preset": name, **c} for c in linearity(probes, batches)]
        counts_all[name], probes_all[name] = counts, probes_to_json(probes)
    first = next(iter(configs.values()))
    cfg = resolve_sit_config(first)
    result = {
        "command": command,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "run_seconds": time.perf_counter() - start,
        "presets": list(configs),
        "precisions": list(args.precisions),
        "stages": list(STAGES),
        "setting": {"latent": f"{cfg['in_channels']}x{cfg['sample_size']}x{cfg['sample_size']}",
                    "tokens": cfg["num_tokens"], "num_classes": cfg["num_classes"], "qk_norm": cfg["qk_norm"],
                    "projector_dim": projector_dim, "batch_per_gpu": args.batch, "num_gpus": args.num_gpus,
                    "gpu_memory_gib": GPU_MEMORY_GIB, "headroom_gib": HEADROOM_GIB},
        "probe_depths": list(PROBE_DEPTHS),
        "probe_batches": list(batches),
        "model_configs": configs,
        "param_counts": counts_all,
        "state_formulas": {"weights": "4 P", "gradients": "4 P", "adamw": "2 x 4 P", "ema": "4 P",
                           "teacher_weights": "4 P_teacher (stage 2 guided; fp32 weights)",
                           "projector": "(4 + 4 + 8) P_head while it trains, (4 + 8) P_head after the stop",
                           "ddp_buckets": "4 (P + P_head) when num_gpus > 1"},
        "rows": rows,
        "checks": {"model_states": state_checks, "batch_linearity": lin, "depth_extrapolation": depth_checks},
        "probes": probes_all,
        "notes": NOTES,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(markdown(result))
    log(f"# wrote results.json and results.md ({result['run_seconds']:.0f} s)")
    return result


def main(argv=None):
    args = parse_args(argv)
    command = display_command(sys.argv[1:] if argv is None else list(argv), args.output_dir)
    threads = torch.get_num_threads()
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or SMOKE_THREADS)
    try:
        return run(args, command)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process


if __name__ == "__main__":
    main()

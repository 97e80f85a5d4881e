# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""What a Self-Transcendence stage-2 step with LoRA costs, on the CPU (issue 28, item 4): peak memory against full
fine-tuning, and step time against the plain LoRA step, the FLOP bound and the snapshot-and-copy scheme.

Model: SD3.5-medium's MM-DiT (`memory_t2i.FAMILIES["SD3.5-medium"]`: 24 blocks, the first 13 with dual attention,
q/k RMSNorm, T5 width 4096, pooled 2048) at a quarter of its width (6 of its 24 heads of 64: hidden 384), all 24
blocks, with SD3-medium's 192x192 positional-embedding buffer (SD3.5's 384x384 would be 40 % of the narrowed
weights instead of 10 %), fp32, 128 px (16x16x16 latents: 64 image tokens) with 154 text tokens (77 CLIP + 77 T5),
batch 2; random latents and text embeddings (a cost benchmark). Stage 2 as
`examples/train_self_transcendence_t2i.py` runs it: the released T2I options (`default_t2i_options`: student block 12
through the projector, teacher block 16, w = 5), LoRA rank 16 on the family's default targets (`lora.add_lora`),
the script's loop body (flow-matching sample, the student's forward through `BlockFeatures`, velocity loss, guide
loss, backward, gradient clipping, AdamW (fused, the script's CUDA default), EMA (foreach) of what trains).

Schemes (rows):
- `full`: full fine-tuning, every weight trains; the teacher is a separate frozen copy of the transformer (what the
  script loads from the stage-1 folder without LoRA); the EMA is of the whole transformer.
- `lora_plain`: the plain LoRA step, no alignment (flow-matching loss only), the reference for the times.
- `lora_adapter_teacher`: ours, teacher = the stage-1 adapter (`save_lora` -> `load_lora(..., "guide")`, a second
  named adapter on the student's own module, `AdapterTeacher(model, "guide")` as `teacher=` to `build_alignment`):
  one batched no-grad pass [caption, empty prompt] with early exit at block 16.
- `lora_base_teacher`: ours, teacher = the pretrained base (`AdapterTeacher(model, None)`: adapters off for its pass).
- `lora_snapshot_copy`: the comparison baseline, implemented HERE ONLY (`SnapshotCopyTeacher`; SimpleTuner's stage 2
  with PEFT LoRA): one adapter on the model and the stage-1 adapter's parameters held as a snapshot; every guided step
  saves the student's adapter parameters, copies the snapshot into them, runs two separate full-depth no-grad
  forwards (caption, then the empty prompt; no early exit) reading block 16, copies the student's parameters back,
  then the student's pass (the copy must come first: copying into parameters after the student's forward would
  change tensors autograd saved for its backward).

How:
- Peak memory: `benchmarks/memory_table.py`'s `LiveStorageTracker` (every storage allocated during the step and when
  it is freed) around one step that follows an untracked one (AdamW's and the EMA's states exist then), plus what is
  resident before it (every distinct storage of the model's parameters and buffers, the separate teacher's, the
  projector's, AdamW's states, the EMA's shadow, the snapshot): peak = resident + the step's peak of live storages
  (activations, gradients, the teacher pass, the optimizer's and the EMA's temporaries). `mark_student_and_teacher`
  marks the teacher pass: its transient (peak during it minus at its start) is reported too.
  The teacher's own memory, measured on the tensors: the bytes of the storages the teacher's pass reads that the
  student's does not (the separate copy: all of it; the stage-1 adapter: the `guide` adapter's parameters; the base:
  nothing; the snapshot: its tensors).
- Step time: `timing.interleaved_timing` (the schemes round-robin, rotated; untimed rounds first, after each
  scheme's two steps of the memory phase), median of the repeats; the whole step, clipping, AdamW and EMA included.
  The full fine-tuning step is not timed (a different amount of work: every weight's gradient and update).
- FLOPs per step: counted on one step with `torch.utils.flop_counter.FlopCounterMode`, which follows
  `benchmarks/flops.py`'s convention (2 FLOPs per multiply-accumulate of every matmul, attention's QK^T and AV
  included; nothing for norms, activations, softmax or adds), with the CPU flash-attention kernel's forward and
  backward counted by torch's SDPA formulas. The backward is counted as it runs: frozen base weights get no weight
  gradient, so a LoRA step is ~2x its forward (flops.py's 3x is for weights that train); the teacher's no-grad pass
  counts 1x. The FLOP bound of a guided step = the plain step's median time x (its FLOPs / the plain step's FLOPs):
  what it would take if its extra work ran at the plain step's FLOP rate.

    python benchmarks/lora_cost.py            # the committed table (benchmarks/results/lora_cost), ~3 min alone
    python benchmarks/lora_cost.py --smoke --output_dir /tmp/lora_cost_smoke   # a tiny model, seconds

Writes `results.json` (settings, per scheme: memory in bytes and MiB, the teacher's own bytes, FLOPs, median step
seconds with the repeats, the FLOP-bound ratio; torch version, machine), `results.md` (the tables) and `README.md`
(what is measured, the command, the tables).
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import diffusers  # noqa: E402
import flops as F  # noqa: E402  (the FLOP convention and the CPU attention kernel's count)
import memory_t2i as M2  # noqa: E402  (SD3.5-medium's config and its narrowing)
import memory_table as MT  # noqa: E402  (the tracker, the teacher-pass marks, the displayed command)
import peft  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from timing import interleaved_timing, summarize  # noqa: E402

from diffusers_selftrans import lora as L  # noqa: E402
from diffusers_selftrans.alignment import build_alignment, default_t2i_options  # noqa: E402
from diffusers_selftrans.cli import DEFAULT_EMA_DECAY, DEFAULT_LEARNING_RATE, DEFAULT_MAX_GRAD_NORM  # noqa: E402
from diffusers_selftrans.models.block_features import BlockFeatures, model_timestep, model_velocity  # noqa: E402
from diffusers_selftrans.transport import Transport  # noqa: E402

SCRIPT = "benchmarks/lora_cost.py"
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "benchmarks", "results", "lora_cost")
SCHEMES = ("full", "lora_plain", "lora_adapter_teacher", "lora_base_teacher", "lora_snapshot_copy")
LABELS = {"full": "full fine-tuning, separate teacher copy", "lora_plain": "LoRA, plain (no alignment)",
          "lora_adapter_teacher": "LoRA, teacher = stage-1 adapter (ours)",
          "lora_base_teacher": "LoRA, teacher = base, adapters off (ours)",
          "lora_snapshot_copy": "LoRA, snapshot-and-copy teacher (SimpleTuner's scheme)"}
TIMED = SCHEMES[1:]  # the LoRA steps
SD35 = M2.FAMILIES["SD3.5-medium"]
POS_EMBED_MAX_SIZE = 192
MIB = 2**20
def settings(args) -> Dict[str, Any]:
    """The model config and the step's shapes (`--smoke`: a 4-block, 32-wide SD3 with small text widths)."""
    if args.smoke:
        config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                      pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0, 1),
                      qk_norm="rms_norm")
        shapes = dict(latent_side=8, text_tokens=6, batch=1, rank=4)
    else:
        # SD3-medium's 192x192 positional grid (see the module docstring)
        config = {**M2.at_heads(SD35, args.heads), "pos_embed_max_size": POS_EMBED_MAX_SIZE}
        shapes = dict(latent_side=args.latent_side, text_tokens=args.text_tokens, batch=args.batch, rank=args.rank)
    n = config["num_layers"]
    options = {**default_t2i_options("self_transcendence", n), "projector_dim": args.projector_dim}
    return {"config": config, **shapes, "text_dim": config["joint_attention_dim"],
            "pooled_dim": config["pooled_projection_dim"], "latent_channels": config["in_channels"],
            "image_tokens": (shapes["latent_side"] // config["patch_size"]) ** 2, "alignment": options}


def make_batch(s: Dict[str, Any], n: int, seed: int = 0):
    """Random latents x0 and caption conditioning of the right shapes (the values do not change the cost)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, s["latent_channels"], s["latent_side"], s["latent_side"], generator=g)
    cond = {"encoder_hidden_states": torch.randn(n, s["text_tokens"], s["text_dim"], generator=g),
            "pooled_projections": torch.randn(n, s["pooled_dim"], generator=g)}
    return x0, cond


# --- The comparison baseline ------------------------------------------------------------------------------------------
class SnapshotCopyTeacher:
    """SimpleTuner's stage-2 teacher with a LoRA (see the module docstring): the stage-1 adapter's parameters held as
    a snapshot; each call copies them into the model's single adapter, runs two separate full-depth no-grad forwards
    (caption, then the empty prompt), reads block `layer`, copies the student's parameters back. Call it BEFORE the
    student's forward. Returns f_g = f_u + w (f_c - f_u) in fp32, as `SelfTranscendence.guiding_features`."""

    def __init__(self, feats: BlockFeatures, stage1_state: Dict[str, torch.Tensor], layer: int, scale: float,
                 null: Dict[str, torch.Tensor], adapter_name: str = "student"):
        named = [(n, p) for n, p in feats.model.named_parameters() if L.adapter_of(n) == adapter_name]
        self.params = [p for _, p in named]
        # peft's key format: the parameter's name without the adapter's
        self.snapshot = [stage1_state[n.replace(f".{adapter_name}.", ".")].clone() for n, _ in named]
        self.feats, self.layer, self.scale, self.null = feats, layer, scale, null

    @torch.no_grad()
    def guiding_features(self, x_t: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        student = [p.detach().clone() for p in self.params]
        torch._foreach_copy_(self.params, self.snapshot)
        timestep = model_timestep(self.feats.model, t)
        null = {k: v.expand(x_t.shape[0], *v.shape[1:]) for k, v in self.null.items()}
        f_c = self.feats(x_t, timestep=timestep, layers=[self.layer], **cond).hidden_states[self.layer]
        f_u = self.feats(x_t, timestep=timestep, layers=[self.layer], **null).hidden_states[self.layer]
        torch._foreach_copy_(self.params, student)
        f_c, f_u = f_c.float(), f_u.float()
        return f_u + self.scale * (f_c - f_u)


# --- One scheme: the models, the method, the optimizer, the step ------------------------------------------------------
@dataclass
class Scheme:
    name: str
    model: torch.nn.Module
    feats: BlockFeatures
    method: Any  # SelfTranscendence, or None (plain)
    teacher: Any  # the separate module, an AdapterTeacher, or None
    snapshot: Optional[SnapshotCopyTeacher]
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: EMAModel
    ema_params: List[torch.nn.Parameter]


def base_model(s: Dict[str, Any], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same base weights every time (load_lora checks the stage-1 adapter's base)
    return diffusers.SD3Transformer2DModel(**s["config"])


def write_stage1_adapter(s: Dict[str, Any], folder: str, seed: int) -> str:
    """What stage 1 leaves: a LoRA adapter of the base in diffusers' format (random B: a trained adapter's cost)."""
    model = base_model(s, seed)
    L.add_lora(model, s["rank"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in L.adapter_parameters(model, "student"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    L.save_lora(folder, diffusers.StableDiffusion3Pipeline, model, "student")
    return folder


def build_scheme(name: str, s: Dict[str, Any], stage1: str, seed: int) -> Scheme:
    model = base_model(s, seed).train()
    feats = BlockFeatures(model)
    g = torch.Generator().manual_seed(seed + 2)
    null = {"encoder_hidden_states": torch.randn(1, s["text_tokens"], s["text_dim"], generator=g),
            "pooled_projections": torch.randn(1, s["pooled_dim"], generator=g)}
    options, teacher, snapshot = s["alignment"], None, None
    if name == "full":
        teacher = diffusers.SD3Transformer2DModel(**s["config"])  # the stage-1 transformer, frozen by the method
    else:
        L.add_lora(model, s["rank"])  # only the adapter trains from here on
        if name == "lora_adapter_teacher":
            L.load_lora(model, stage1, "guide")
            teacher = L.AdapterTeacher(model, "guide")
        elif name in ("lora_base_teacher", "lora_snapshot_copy"):
            # snapshot: the method gives the projector and the loss; its teacher call is replaced in `train_step`
            teacher = L.AdapterTeacher(model, None)
        if name == "lora_snapshot_copy":
            snapshot = SnapshotCopyTeacher(feats, L.read_lora(stage1)[1], options["guiding_layer"],
                                           options["guidance_scale"], null)
    method = None if name == "lora_plain" else build_alignment("self_transcendence", model, teacher=teacher,
                                                               null_conditioning=null, **options)
    heads = method.trainable_modules() if method is not None else []
    params = [p for m in (model, *heads) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=DEFAULT_LEARNING_RATE, fused=True)  # the script's default on CUDA
    if name == "full":
        ema_params = list(model.parameters())
        ema = EMAModel(ema_params, decay=DEFAULT_EMA_DECAY, min_decay=DEFAULT_EMA_DECAY, foreach=True)
    else:
        ema_params = L.adapter_parameters(model, "student")
        ema = L.adapter_ema(model, "student", decay=DEFAULT_EMA_DECAY, min_decay=DEFAULT_EMA_DECAY, foreach=True)
    return Scheme(name, model, feats, method, teacher, snapshot, params, optimizer, ema, ema_params)


def train_step(sc: Scheme, s: Dict[str, Any], seed: int = 0) -> torch.Tensor:
    """One stage-2 step of the script's loop (no caption dropout: random embeddings), the batch made inside it."""
    x0, cond = make_batch(s, s["batch"], seed)
    t, noise, x_t, target = Transport().sample(x0)
    if sc.snapshot is not None:  # the baseline's teacher runs first; the method's call returns its f_g
        f_g = sc.snapshot.guiding_features(x_t, t, cond)
        sc.method.guiding_features = lambda *args, **kwargs: f_g
    layers = sc.method.student_layers if sc.method is not None else ()
    out = sc.feats(x_t, timestep=model_timestep(sc.model, t), layers=layers, **cond)
    loss = ((model_velocity(sc.model, out.sample).float() - target.float()) ** 2).mean()
    if sc.method is not None:
        terms = sc.method(out.hidden_states, x_t=x_t, t=t, target=target, x0=x0, noise=noise, step=0,
                          conditioning=cond)
        loss = loss + sum(sc.method.weights[k] * v for k, v in terms.items())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(sc.params, DEFAULT_MAX_GRAD_NORM, foreach=True)
    sc.optimizer.step()
    sc.optimizer.zero_grad(set_to_none=True)
    sc.ema.step(sc.ema_params)
    if sc.snapshot is not None:
        del sc.method.guiding_features
    return loss.detach()


# --- Measurements -----------------------------------------------------------------------------------------------------
def storages(tensors) -> Dict[int, int]:
    """Distinct storages among `tensors`: data pointer -> bytes."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def module_tensors(module: torch.nn.Module, adapters=None):
    """The parameters and buffers of `module`; with `adapters` (a set), only the base's and those adapters'."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [t for n, t in named if adapters is None or L.adapter_of(n) in {None} | adapters]


def resident_bytes(sc: Scheme) -> Dict[str, int]:
    """Bytes held between steps, each storage counted once: the transformer (base, the student's adapter, buffers),
    the teacher's own (`teacher_own_storages`: left out of the transformer's), the heads, AdamW's states, the EMA's
    shadow."""
    teacher = teacher_own_storages(sc)
    model = storages(module_tensors(sc.model))
    heads = storages(p for h in (sc.method.trainable_modules() if sc.method else []) for p in h.parameters())
    adamw = storages(v for state in sc.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    parts = {"transformer": sum(size for ptr, size in model.items() if ptr not in teacher),
             "teacher_own": sum(teacher.values()), "heads": sum(heads.values()), "adamw": sum(adamw.values()),
             "ema": sum(storages(sc.ema.shadow_params).values())}
    parts["total"] = sum(parts.values())
    return parts


def teacher_own_storages(sc: Scheme) -> Dict[int, int]:
    """The storages the teacher's pass reads and the student's does not (the separate copy: all of it; the stage-1
    adapter: the `guide` adapter's parameters; the base: none), or the snapshot-and-copy scheme's snapshot."""
    if sc.snapshot is not None:
        return storages(sc.snapshot.snapshot)
    if sc.teacher is None:
        return {}
    if isinstance(sc.teacher, L.AdapterTeacher):
        used = module_tensors(sc.teacher.model, {sc.teacher.adapter_name} - {None})
    else:
        used = module_tensors(sc.teacher)
    student = storages(module_tensors(sc.model, {"student"}))
    return {ptr: size for ptr, size in storages(used).items() if ptr not in student}


def adapter_bytes(model: torch.nn.Module, name: str) -> int:
    return sum(storages(L.adapter_parameters(model, name)).values())


def count_flops(sc: Scheme, s: Dict[str, Any]) -> int:
    with FlopCounterMode(display=False, custom_mapping=F.CPU_ATTENTION_FLOPS) as counter:
        train_step(sc, s)
    return counter.get_total_flops()


def measure_memory(sc: Scheme, s: Dict[str, Any]) -> Dict[str, Any]:
    """Peak bytes of one step after a first one: resident + the step's peak of live storages (module docstring)."""
    resident = resident_bytes(sc)
    tracker = MT.LiveStorageTracker()
    MT.mark_student_and_teacher(sc.model, sc.snapshot or sc.method or sc, tracker)
    with tracker:
        tracker.mark("start")
        train_step(sc, s, seed=1)
        tracker.mark("end")
    step = tracker.live_curve(set(), "start", "end")
    result = {"resident_bytes": resident, "step_peak_bytes": step["peak"],
              "peak_bytes": resident["total"] + step["peak"]}
    if "teacher_start" in tracker.marks:
        teacher = tracker.live_curve(set(), "teacher_start", "teacher_end")
        result["teacher_pass_transient_bytes"] = teacher["peak"] - teacher["start"]
    holder = sc.snapshot or sc.method
    if holder is not None and "guiding_features" in vars(holder):
        del holder.guiding_features  # the marking wrapper
    result["mib"] = {"peak": result["peak_bytes"] / MIB, "step_peak": step["peak"] / MIB,
                     **{k: v / MIB for k, v in resident.items()}}
    return result


def run(args, command: str) -> Dict[str, Any]:
    start = time.perf_counter()
    s = settings(args)
    log = lambda message: print(message, flush=True)  # noqa: E731
    log(f"# command: {command}")
    rows = {name: {"label": LABELS[name]} for name in SCHEMES}
    schemes = {}
    with tempfile.TemporaryDirectory() as tmp:
        stage1 = write_stage1_adapter(s, os.path.join(tmp, "stage1"), args.seed)
        # 1. Memory and FLOPs, one scheme after the other (the first step, FLOP-counted, makes AdamW's and the EMA's
        # states). The LoRA schemes stay for the timing: the tracker counts what the step allocates, resident_bytes
        # what the scheme holds, so the others change neither.
        for name in SCHEMES:
            sc = build_scheme(name, s, stage1, args.seed)
            rows[name]["flops_per_step"] = count_flops(sc, s)
            rows[name]["memory"] = measure_memory(sc, s)
            if sc.method is not None and sc.snapshot is None:  # the method's own teacher passes (2 steps)
                rows[name]["teacher_forwards"] = sc.method.teacher_forwards
            log(f"{name}: peak {rows[name]['memory']['mib']['peak']:.1f} MiB, teacher's own "
                f"{rows[name]['memory']['resident_bytes']['teacher_own'] / MIB:.2f} MiB, "
                f"{rows[name]['flops_per_step'] / 1e9:.4g} GFLOPs")
            if name in TIMED:
                schemes[name] = sc
            del sc
            gc.collect()
    s["adapter_bytes"] = adapter_bytes(schemes["lora_plain"].model, "student")
    # 2. Step times of the LoRA schemes, interleaved
    times = interleaved_timing({name: (lambda sc=sc: train_step(sc, s)) for name, sc in schemes.items()},
                               "cpu", args.warmup, args.repeats)
    del schemes
    gc.collect()
    plain_s = summarize(times["lora_plain"])["median_ms"] / 1e3
    plain_flops = rows["lora_plain"]["flops_per_step"]
    for name in TIMED:
        t = summarize(times[name])
        row = rows[name]
        row["time"] = {"median_s": t["median_ms"] / 1e3, "min_s": t["min_ms"] / 1e3, "max_s": t["max_ms"] / 1e3,
                       "repeats_s": [x / 1e3 for x in t["times_ms"]]}
        row["flops_vs_plain"] = row["flops_per_step"] / plain_flops
        row["time_vs_plain"] = row["time"]["median_s"] / plain_s
        row["flop_bound_s"] = plain_s * row["flops_vs_plain"]
        row["time_vs_flop_bound"] = row["time"]["median_s"] / row["flop_bound_s"]
        log(f"{name}: {row['time']['median_s']:.3f} s ({row['time_vs_plain']:.2f}x plain; FLOP bound "
            f"{row['flop_bound_s']:.3f} s, {row['time_vs_flop_bound']:.2f}x it)")
    result = {
        "command": command,
        "smoke": bool(args.smoke),
        "machine": os.uname().machine,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "run_seconds": time.perf_counter() - start,
        "settings": {**s, "dtype": "float32", "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                     "optimizer": "AdamW (fused)", "ema": "EMAModel (foreach) of what trains",
                     "model": "SD3.5-medium layout" if not args.smoke else "tiny SD3 (smoke)"},
        "schemes": list(SCHEMES),
        "rows": rows,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    tables = markdown(result)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(tables)
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(readme(result, tables))
    log(f"# wrote results.json, results.md and README.md ({result['run_seconds']:.0f} s)")
    return result


# --- Reports ----------------------------------------------------------------------------------------------------------
def markdown(result: Dict[str, Any]) -> str:
    rows, s = result["rows"], result["settings"]
    mib = lambda b: f"{b / MIB:.1f}"  # noqa: E731
    lines = ["## Peak memory of one stage-2 step (MiB, 2^20 bytes)", "",
             "| scheme | transformer | teacher's own | heads | AdamW | EMA | step (activations, grads, temporaries) "
             "| peak | teacher pass transient |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SCHEMES:
        m = rows[name]["memory"]
        r = m["resident_bytes"]
        transient = m.get("teacher_pass_transient_bytes")
        lines.append(f"| {LABELS[name]} | {mib(r['transformer'])} | {mib(r['teacher_own'])} | {mib(r['heads'])} | "
                     f"{mib(r['adamw'])} | {mib(r['ema'])} | {mib(m['step_peak_bytes'])} | "
                     f"**{mib(m['peak_bytes'])}** | {'-' if transient is None else mib(transient)} |")
    full, ours = rows["full"]["memory"], rows["lora_adapter_teacher"]["memory"]
    lines += ["", f"The teacher's own memory (bytes the teacher's pass reads that the student's does not): full "
              f"fine-tuning {full['resident_bytes']['teacher_own']:,} (a whole transformer with its buffers); "
              f"stage-1 adapter {ours['resident_bytes']['teacher_own']:,} (the `guide` adapter; the student's own "
              f"adapter is {s['adapter_bytes']:,}); base "
              f"{rows['lora_base_teacher']['memory']['resident_bytes']['teacher_own']:,}; snapshot-and-copy "
              f"{rows['lora_snapshot_copy']['memory']['resident_bytes']['teacher_own']:,} (the snapshot; each step "
              f"also clones the student's adapter).", ""]
    lines += ["## Step time of the LoRA steps", "",
              f"Median of {s['repeats']} interleaved repeats after {s['warmup']} untimed round(s); FLOPs counted "
              "per step (2 per multiply-accumulate, matmuls and attention); FLOP bound = the plain step's median x "
              "the FLOP ratio.", "",
              "| scheme | GFLOPs / step | FLOPs vs plain | median s (min-max) | time vs plain | FLOP bound s "
              "| time / FLOP bound |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in TIMED:
        r = rows[name]
        t = r["time"]
        lines.append(f"| {LABELS[name]} | {r['flops_per_step'] / 1e9:.4g} | {r['flops_vs_plain']:.2f}x | "
                     f"{t['median_s']:.3f} ({t['min_s']:.3f}-{t['max_s']:.3f}) | {r['time_vs_plain']:.2f}x | "
                     f"{r['flop_bound_s']:.3f} | {r['time_vs_flop_bound']:.2f}x |")
    lines.append(f"\nFull fine-tuning step (not timed): {rows['full']['flops_per_step'] / 1e9:.4g} GFLOPs.")
    return "\n".join(lines) + "\n"


def readme(result: Dict[str, Any], tables: str) -> str:
    """README.md of the output folder: what is measured, the command, the tables, a reading of them."""
    s, rows = result["settings"], result["rows"]
    c, a = s["config"], s["alignment"]
    full, ours, snap = rows["full"], rows["lora_adapter_teacher"], rows["lora_snapshot_copy"]
    model = (f"SD3.5-medium's MM-DiT at {c['num_attention_heads']} of its 24 heads (hidden "
             f"{c['num_attention_heads'] * c['attention_head_dim']}), all {c['num_layers']} blocks"
             if not result["smoke"] else f"a tiny SD3 transformer ({c['num_layers']} blocks, smoke run)")
    mib = lambda row: row["memory"]["mib"]["peak"]  # noqa: E731
    own = lambda row: row["memory"]["resident_bytes"]["teacher_own"] / MIB  # noqa: E731
    paragraphs = [
        f"Measured by this project on a {result['threads']}-thread {result['machine']} CPU (no GPU): "
        f"`{result['command']}` ({result['run_seconds']:.0f} s wall, torch {result['torch']}, diffusers "
        f"{result['diffusers']}, peft {result['peft']}). Every number is in [`results.json`](results.json); the "
        f"tables are also in [`results.md`](results.md); how each is obtained: the docstring of `{SCRIPT}`.",
        f"What: one stage-2 training step of `examples/train_self_transcendence_t2i.py` (its loop body: "
        f"flow-matching sample, the student's forward, velocity loss, guide loss, backward, clipping, AdamW, EMA) on "
        f"{model}, fp32, {s['latent_side']}x{s['latent_side']} latents ({s['image_tokens']} image tokens) with "
        f"{s['text_tokens']} text tokens, batch {s['batch']}, random latents and text embeddings; LoRA rank "
        f"{s['rank']} on the family's default targets; student block {a['guided_layer']} through the projector, "
        f"teacher block {a['guiding_layer']}, w = {a['guidance_scale']}. Ours: the stage-1 adapter loaded as a "
        "second named adapter of the student's own module (`load_lora`, `AdapterTeacher`), or the base with the "
        "adapters off; one batched early-exit teacher pass [caption, empty prompt]. Full fine-tuning: every weight "
        "trains, the teacher is a separate frozen copy. Snapshot-and-copy (the scheme SimpleTuner ships, "
        "implemented in the benchmark only): every step copies the stage-1 adapter's snapshot into the model's "
        "single adapter, runs two separate full-depth teacher forwards (caption, then empty prompt) and copies the "
        "student's adapter back before the student's pass.",
        "How: peak memory = what is resident between steps (every distinct storage: transformer, separate teacher, "
        "heads, AdamW, EMA, snapshot) + the peak of the storages live during one step (`benchmarks/memory_table.py`'s "
        "tracker: activations, gradients, teacher pass, optimizer and EMA temporaries). Step times interleaved, "
        "medians. FLOPs counted on one step of each (`FlopCounterMode`, `benchmarks/flops.py`'s convention: 2 per "
        "multiply-accumulate of every matmul, attention included).",
    ]
    reading = [
        f"Reading: the stage-2 step with LoRA peaks at {mib(ours):.0f} MiB against {mib(full):.0f} MiB with full "
        f"fine-tuning. The teacher's own memory is {own(ours):.2f} MiB with the stage-1 adapter as the teacher "
        f"(the adapter) against {own(full):.1f} MiB with full fine-tuning (a second transformer), and "
        f"{own(rows['lora_base_teacher']):.0f} MiB with the base as the teacher. The guided step takes "
        f"{ours['time_vs_plain']:.2f}x the plain LoRA step, {ours['time_vs_flop_bound']:.2f}x its FLOP bound; the "
        f"snapshot-and-copy step {snap['time_vs_plain']:.2f}x the plain step "
        f"({snap['time']['median_s'] / ours['time']['median_s']:.2f}x ours) for {snap['flops_vs_plain']:.2f}x its "
        f"FLOPs (ours: {ours['flops_vs_plain']:.2f}x).",
        "Caveats: CPU kernels and the live tensor storages (no allocator fragmentation, no CUDA workspaces); a narrow "
        "model at a small resolution, so fixed per-step costs (the adapter switch, the copies, the optimizer) weigh "
        "more than at real sizes, and the FLOP rate of a no-grad teacher pass can differ from that of a training "
        "pass; fp32, no autocast.",
    ]
    fill = lambda text: textwrap.fill(text, 118, break_on_hyphens=False, break_long_words=False)  # noqa: E731
    title = "# Cost of a Self-Transcendence stage-2 step with LoRA, on the CPU (issue 28, item 4)"
    return "\n\n".join([title, *map(fill, paragraphs), tables.rstrip("\n"), *map(fill, reading)]) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default=None,
                   help=f"default: benchmarks/results/lora_cost (--smoke: {tempfile.gettempdir()}/lora_cost_smoke)")
    p.add_argument("--heads", type=int, default=6, help="attention heads of 64 (SD3.5-medium: 24)")
    p.add_argument("--latent_side", type=int, default=16, help="latent grid side (16: 128 px through the 8x VAE)")
    p.add_argument("--text_tokens", type=int, default=154, help="77 CLIP + max_sequence_length T5 tokens")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--projector_dim", type=int, default=None, help="default 2048 (smoke: 32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (after each scheme's two memory/FLOP steps)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 2)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's; smoke 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny model, seconds (the test)")
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = (os.path.join(tempfile.gettempdir(), "lora_cost_smoke") if args.smoke
                           else DEFAULT_OUTPUT_DIR)
    if args.projector_dim is None:
        args.projector_dim = 32 if args.smoke else 2048
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 7
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0.")
    for name in ("heads", "latent_side", "text_tokens", "batch", "rank", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1.")
    return args


def main(argv=None):
    args = parse_args(argv)
    command = MT.display_command(sys.argv[1:] if argv is None else list(argv), args.output_dir, script=SCRIPT)
    threads = torch.get_num_threads()
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    try:
        return run(args, command)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process


if __name__ == "__main__":
    main()

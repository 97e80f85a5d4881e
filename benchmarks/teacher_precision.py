# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""What bf16 costs the stage-2 guide target (issue 26, item 1, "Precision").

For each teacher (a tiny SiT with random and with trained weights, and SiT-B/2 with random weights) and the SAME
inputs (x_t = (1 - t) x0 + t eps, t and labels drawn with a fixed seed, t in the guide's window `DEFAULT_T_RANGE`),
the guiding block's (2n/3) features f_c (true labels), f_u (null class) and f_g = f_u + w (f_c - f_u), the guide loss
and its gradient are computed in
- `fp32`: the reference (run twice: `fp32_repeat` is a self-check whose errors must be exactly 0);
- `bf16_autocast`: fp32 weights under bf16 autocast (`--guiding_autocast bf16`, `teacher_autocast=torch.bfloat16`);
- `bf16_weights`: the teacher's weights cast to bf16 (`teacher_dtype=torch.bfloat16`; on CUDA the library then also
  runs it under bf16 autocast), so its residual stream is bf16 too;
and compared with the reference: ||a - a_ref|| / ||a_ref|| for f_c, f_u, f_c - f_u, f_g and the gradient, and
|loss - loss_ref| / loss_ref, for w in {1, 5, 30}.

Everything goes through the library: the method is `build_alignment("self_transcendence", ...)`, f_g is its
`guiding_features` and the loss its `forward` (projector, MSE over tokens and channels, `t_range` reduction). The
teacher runs ONCE per precision (`OnePassGuide` keeps that pass's [f_c; f_u]), and every w reuses it: w only enters
the formula. The loss is that of a fixed random student: the same random guided-block features (N(0, 1)) and the same
projector weights in every precision, run in fp32 outside any autocast, so only the target differs. "grad" is the
gradient of the loss with respect to those student features, i.e. the training signal the student gets.

On a CPU the library keeps the caller's precision (bf16 autocast is slow there on most CPUs), so the two bf16 rows
enter `torch.autocast("cpu", dtype=torch.bfloat16)` around the teacher pass here, as `frozen_forward_context` does on
CUDA: the same bf16 matmuls (CPU autocast's per-op lists differ slightly from CUDA's). `--device cuda` runs the
library's own CUDA path (TF32 off for the reference).

Teachers:
- tiny: depth 6, width 128, 16x16 grayscale digits, patch 4 (16 tokens), 10 classes (machine-notes: the size that
  learns in minutes on a CPU). "trained": vanilla flow matching on scikit-learn's bundled `load_digits` (pixel space,
  the training script's own `compute_loss`, label dropout 0.1 so the null class is trained); "random": the same
  architecture with every weight random (see `randomize_teacher_`). Its inputs are held-out digits.
- SiT-B/2: 256 tokens, 4 latent channels, 1000 classes, x0 ~ N(0, 1) latents. Random weights only: no trained SiT-B/2
  weights exist offline, so its "trained" row is reported as unavailable rather than invented.
Random teachers: SiT's own init zero-initialises adaLN and the output layer (every block is then the identity and
f_c == f_u), so every weight is drawn at fan-in scale (`overhead.randomize_`, as `gpu_check.py`'s tolerance check),
and the affine norm scales (q/k-norm) are then reset to 1 as at init, so attention is not flattened to uniform.

    python benchmarks/teacher_precision.py         # ~2 min on 2 idle CPU cores -> benchmarks/results/teacher_precision
    python benchmarks/teacher_precision.py --device cuda --output_dir precision_gpu
    python benchmarks/teacher_precision.py --smoke --output_dir /tmp/tp   # seconds; the test suite runs this

Writes `results.json` (every number, the command, torch version, device) and `results.md` (tables and a reading).
"""

import argparse
import contextlib
import copy
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quickstart_assets  # noqa: E402  (the digits, from scikit-learn's bundled copy)
import train_align  # noqa: E402  (the training step of the tiny teacher is the script's own compute_loss)
from convergence import TINY_LEARNING_RATE  # noqa: E402
from gpu_check import GUIDE_AUTOCAST_REL_TOL, relative_error  # noqa: E402
from overhead import randomize_  # noqa: E402

from diffusers_selftrans import SiTTransformer2DModel  # noqa: E402
from diffusers_selftrans.alignment import DEFAULT_T_RANGE, build_alignment  # noqa: E402
from diffusers_selftrans.alignment.common import T2I_GUIDANCE_SCALE, resolve_sit_config  # noqa: E402
from diffusers_selftrans.alignment.self_transcendence import GUIDANCE_SCALE_SIT  # noqa: E402
from diffusers_selftrans.cli import DEFAULT_MAX_GRAD_NORM  # noqa: E402
from diffusers_selftrans.models.projector import DEFAULT_PROJECTOR_DIM  # noqa: E402
from diffusers_selftrans.models.transformer_sit import parse_preset  # noqa: E402
from diffusers_selftrans.transport import Transport, interpolate  # noqa: E402

DEFAULT_OUTPUT_DIR = "benchmarks/results/teacher_precision"
# w = 1: no guidance (f_g = f_c); 5: the released T2I setting; 30: the paper's SiT default (§4.1).
GUIDANCE_SCALES = (1.0, T2I_GUIDANCE_SCALE, GUIDANCE_SCALE_SIT)
PRECISIONS = ("fp32", "fp32_repeat", "bf16_autocast", "bf16_weights")
PRECISION_LABELS = {
    "fp32_repeat": "fp32 again (self-check)",
    "bf16_autocast": "fp32 weights + bf16 autocast",
    "bf16_weights": "bf16 weights",
}
SEED = 0

# --- Tiny teacher: machine-notes "What learns in minutes" (digits at 16x16, patch 4, depth 6 / width 128) ------------
TINY_CONFIG = dict(sample_size=16, in_channels=1, patch_size=4, num_layers=6, num_attention_heads=4,
                   attention_head_dim=32, num_classes=quickstart_assets.DIGITS_NUM_CLASSES, qk_norm=True)
# ~0.18 s per step of batch 128 on 2 idle cores (measured; machine-notes: ~1,275 steps in 5 min, loss 0.85 -> 0.16):
# 400 steps are ~75 s (5x that when another job shares the cores), enough for class-conditional structure (and a
# trained null class) in the features: the committed run's loss fell from 1.29 to 0.28.
TINY_TRAIN_STEPS = 400
TINY_TRAIN_BATCH = 128
# Held-out digits the precisions are compared on (cheap at 16 tokens, so a larger batch than SiT-B/2's).
TINY_EVAL_BATCH = 64
# Train loss reported as the mean of this many steps at the start and at the end of the training.
LOSS_WINDOW = 20

# --- SiT-B/2: the paper's ablation model on 256 px ImageNet (SD-VAE latents 4 x 32 x 32, 256 tokens, 1000 classes) ---
B2_PRESET = "SiT-B/2"
B2_LATENT_SIZE, B2_LATENT_CHANNELS, B2_CLASSES = 32, 4, 1000
# Small so the three passes stay within seconds each on a 2-core CPU (the teacher sees 2 x batch images).
B2_EVAL_BATCH = 4
B2_NO_TRAINED_WEIGHTS = ("no trained SiT-B/2 weights exist offline (nothing to download here, and a CPU cannot train "
                         "one): random only")

# --- --smoke: the same rows with two very small models and a few training steps (seconds) --------------------------
SMOKE_TINY_CONFIG = dict(TINY_CONFIG, num_layers=3, num_attention_heads=2, attention_head_dim=16)
SMOKE_LARGE_CONFIG = dict(sample_size=8, in_channels=4, patch_size=2, num_layers=3, num_attention_heads=2,
                          attention_head_dim=16, num_classes=B2_CLASSES, qk_norm=True)
SMOKE_TRAIN_STEPS, SMOKE_TRAIN_BATCH, SMOKE_EVAL_BATCH, SMOKE_LARGE_BATCH = 6, 16, 8, 2
SMOKE_PROJECTOR_DIM = 64
# One intra-op thread for --smoke: tiny ops on a busy shared CPU spend longer waiting on each other than computing.
SMOKE_THREADS = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="Where results.json and results.md go.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--train_steps", type=int, default=None, help=f"Tiny teacher's steps (default {TINY_TRAIN_STEPS}).")
    p.add_argument("--b2_batch", type=int, default=None, help=f"SiT-B/2 images (default {B2_EVAL_BATCH}).")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch.set_num_threads for this run (restored after it); --smoke: {SMOKE_THREADS}.")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--smoke", action="store_true", help="Two very small models, a few training steps (seconds).")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available.")
    return args


def portable_command(argv: List[str]) -> str:
    """The command as typed, without this machine's paths: an absolute path inside the repository becomes relative,
    any other absolute path `OUTPUT_DIR`."""
    words = []
    for word in argv:
        if word.startswith("/"):
            path = Path(word).resolve()
            word = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else "OUTPUT_DIR"
        words.append(word)
    return "python " + " ".join(shlex.quote(w) for w in ["benchmarks/teacher_precision.py"] + words)


# --- Teachers ------------------------------------------------------------------------------------------------------
def randomize_teacher_(model: SiTTransformer2DModel, seed: int) -> SiTTransformer2DModel:
    """Every weight random at fan-in scale (adaLN-Zero would make f_c == f_u), affine norm scales back at 1."""
    randomize_(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model.eval()


def digits_tensors(resolution: int):
    """All digits as (N, 1, R, R) in [-1, 1] with labels, split into (train, held-out) by `split_digits`."""
    images, labels = quickstart_assets.load_digit_images(resolution)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    y = torch.from_numpy(labels)
    train, held_out = quickstart_assets.split_digits(len(x))
    return (x[train], y[train]), (x[held_out], y[held_out])


def train_tiny_teacher(config, data, steps: int, batch: int, seed: int, device) -> Tuple[SiTTransformer2DModel, Dict]:
    """A trained teacher: vanilla flow matching (`build_alignment("none")`, `train_align.compute_loss`), AdamW."""
    torch.manual_seed(seed)
    model = SiTTransformer2DModel(**config).to(device).train()
    method = build_alignment("none", model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TINY_LEARNING_RATE)
    transport = Transport()
    x, y = data[0].to(device), data[1].to(device)
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen).to(device)
        loss, _, _ = train_align.compute_loss(model, method, x[idx], y[idx], transport, step=step,
                                              class_dropout_prob=model.config.class_dropout_prob)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), DEFAULT_MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    window = min(LOSS_WINDOW, max(1, steps // 2))
    info = {"steps": steps, "batch": batch, "learning_rate": TINY_LEARNING_RATE,
            "max_grad_norm": DEFAULT_MAX_GRAD_NORM, "data": "scikit-learn load_digits, train split (pixel space)",
            "loss_first_steps": float(np.mean(losses[:window])), "loss_last_steps": float(np.mean(losses[-window:])),
            "loss_window": window, "seconds": round(time.perf_counter() - start, 1)}
    return model.eval(), info


# --- One teacher pass per precision ----------------------------------------------------------------------------------
class OnePassGuide:
    """Wraps the method's teacher call (`method.guide`): the first call runs the teacher and keeps [f_c; f_u]; a later
    call with the same inputs returns them. So `guiding_features` and `forward` run unchanged for every w on the
    features of ONE pass (the pass whose precision is measured)."""

    def __init__(self, guide):
        self.guide, self.inputs, self.features, self.passes = guide, None, None, 0

    def check(self, **kwargs) -> None:
        self.guide.check(**kwargs)

    def __call__(self, teacher, x_t2, t2, layer, **kwargs):
        inputs = (x_t2, t2, layer, kwargs.get("class_labels"))
        same = self.inputs is not None and inputs[2] == self.inputs[2] and all(
            torch.equal(a, b) for a, b in zip(inputs[:2] + inputs[3:], self.inputs[:2] + self.inputs[3:]))
        if not same:
            self.features = self.guide(teacher, x_t2, t2, layer, **kwargs)
            self.inputs = inputs
            self.passes += 1
        return self.features

    def close(self) -> None:
        self.guide.close()


def teacher_context(precision: str, device: torch.device):
    """On a CPU the bf16 rows need the autocast that `frozen_forward_context` enters itself on CUDA."""
    if precision.startswith("bf16") and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_precision(precision: str, teacher, inputs: Dict[str, torch.Tensor], projector_state, projector_dim: int,
                  device: torch.device) -> Dict[str, Any]:
    """f_c, f_u (one teacher pass) and, per w, f_g, the guide loss and its gradient w.r.t. the student features."""
    options = {"bf16_autocast": {"teacher_autocast": torch.bfloat16},
               "bf16_weights": {"teacher_dtype": torch.bfloat16}}.get(precision, {})
    teacher = copy.deepcopy(teacher)  # teacher_dtype casts in place
    method = build_alignment("self_transcendence", teacher.config, teacher=teacher, projector_dim=projector_dim,
                             **options)
    method.projector.load_state_dict(projector_state)  # the same student head in every precision
    method.to(device)
    guide = OnePassGuide(method.guide)
    method._hold_frozen("guide", guide)
    x_t, t, labels = inputs["x_t"], inputs["t"], inputs["labels"]

    start = time.perf_counter()
    with teacher_context(precision, device):
        method.guiding_features(x_t, t, labels)  # the one teacher pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    f_c, f_u = guide.features.float().chunk(2)

    per_w = {}
    for w in GUIDANCE_SCALES:
        method.guidance_scale = w
        f_g = method.guiding_features(x_t, t, labels)
        student = inputs["student_features"].clone().requires_grad_(True)
        loss = method({method.guided_layer: student}, x_t=x_t, t=t, class_labels=labels, step=0)[method.term]
        loss.backward()
        per_w[w] = {"f_g": f_g, "loss": loss.item(), "grad": student.grad.detach()}
    if guide.passes != 1:
        raise AssertionError(f"The teacher ran {guide.passes} times for {precision}; every w must reuse one pass.")
    return {"f_c": f_c, "f_u": f_u, "per_w": per_w, "seconds": seconds, "guiding_layer": method.guiding_layer,
            "guided_layer": method.guided_layer}


def compare(teacher, inputs, projector_dim: int, device, seed: int) -> Dict[str, Any]:
    """Every precision of one teacher against its fp32 pass: errors per precision and per w."""
    torch.manual_seed(seed)  # the projector: the same random student head for every precision
    probe = build_alignment("self_transcendence", teacher.config, teacher=copy.deepcopy(teacher),
                            projector_dim=projector_dim)
    projector_state = probe.projector.state_dict()
    del probe
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the reference is true fp32
    try:
        runs = {p: run_precision(p, teacher, inputs, projector_state, projector_dim, device) for p in PRECISIONS}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    ref = runs["fp32"]
    contrast_ref = ref["f_c"] - ref["f_u"]
    norm = lambda a: float(torch.linalg.vector_norm(a))  # noqa: E731
    result = {
        "guiding_layer": ref["guiding_layer"],
        "guided_layer": ref["guided_layer"],
        "feature_shape": list(ref["f_c"].shape),
        "norm_f_c": norm(ref["f_c"]),
        "contrast": norm(contrast_ref) / norm(ref["f_c"]),  # ||f_c - f_u|| / ||f_c||: what w amplifies
        "norm_f_g": {str(w): norm(ref["per_w"][w]["f_g"]) for w in GUIDANCE_SCALES},
        "loss_fp32": {str(w): ref["per_w"][w]["loss"] for w in GUIDANCE_SCALES},
        "pass_seconds": {p: round(runs[p]["seconds"], 3) for p in PRECISIONS},
        "precisions": {},
    }
    for p in PRECISIONS[1:]:
        run = runs[p]
        entry = {
            "rel_err_f_c": relative_error(ref["f_c"], run["f_c"]),
            "rel_err_f_u": relative_error(ref["f_u"], run["f_u"]),
            "rel_err_f_c_minus_f_u": relative_error(contrast_ref, run["f_c"] - run["f_u"]),
            "per_w": {},
        }
        for w in GUIDANCE_SCALES:
            a, b = ref["per_w"][w], run["per_w"][w]
            entry["per_w"][str(w)] = {
                "rel_err_f_g": relative_error(a["f_g"], b["f_g"]),
                "rel_err_loss": abs(b["loss"] - a["loss"]) / a["loss"],
                "rel_err_grad": relative_error(a["grad"], b["grad"]),
                "loss": b["loss"],
            }
        result["precisions"][p] = entry
    return result


# --- Inputs --------------------------------------------------------------------------------------------------------
def make_inputs(x0: torch.Tensor, labels: torch.Tensor, hidden_size: int, num_tokens: int, seed: int, device):
    """x_t = (1 - t) x0 + t eps with t ~ U(DEFAULT_T_RANGE) (where the guide loss applies), fixed student features."""
    gen = torch.Generator().manual_seed(seed)
    n = x0.shape[0]
    low, high = DEFAULT_T_RANGE
    t = low + (high - low) * torch.rand(n, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    student = torch.randn(n, num_tokens, hidden_size, generator=gen)
    return {"x_t": interpolate(x0, noise, t).to(device), "t": t.to(device), "labels": labels.to(device),
            "student_features": student.to(device)}


# --- Report --------------------------------------------------------------------------------------------------------
def fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def markdown(results: Dict[str, Any]) -> str:
    ws = [str(w) for w in GUIDANCE_SCALES]
    wl = [f"{float(w):g}" for w in ws]
    lines = [
        "Relative errors against the fp32 teacher on the same inputs: ||a - a_ref|| / ||a_ref|| (f_c, f_c - f_u, "
        "f_g, grad = the guide loss's gradient w.r.t. the student features) and |loss - loss_ref| / loss_ref.",
        "",
        "| teacher | weights | precision | f_c | f_c - f_u | " + " | ".join(f"f_g w={w}" for w in wl) + " | "
        + " | ".join(f"loss w={w}" for w in wl) + " | " + " | ".join(f"grad w={w}" for w in wl) + " |",
        "|---|---|---|" + "---:|" * (2 + 3 * len(ws)),
    ]
    for row in results["teachers"]:
        if row["comparison"] is None:
            lines.append(f"| {row['label']} | {row['weights']} | {row['note']} |" + " - |" * (2 + 3 * len(ws)))
            continue
        for p in ("bf16_autocast", "bf16_weights"):
            e = row["comparison"]["precisions"][p]
            cells = [fmt(e["rel_err_f_c"]), fmt(e["rel_err_f_c_minus_f_u"])]
            for key in ("rel_err_f_g", "rel_err_loss", "rel_err_grad"):
                cells += [fmt(e["per_w"][w][key]) for w in ws]
            lines.append(f"| {row['label']} | {row['weights']} | {PRECISION_LABELS[p]} | " + " | ".join(cells) + " |")
    lines += ["", "| teacher | weights | tokens x batch | guiding block | ||f_c - f_u|| / ||f_c|| | training | "
                  "pass s (fp32 / autocast / bf16 weights) |", "|---|---|---|---|---:|---|---|"]
    for row in results["teachers"]:
        c = row["comparison"]
        if c is None:
            continue
        tr = row.get("training")
        training = "-" if tr is None else (f"{tr['steps']} steps, loss {tr['loss_first_steps']:.3f} -> "
                                          f"{tr['loss_last_steps']:.3f}")
        secs = " / ".join(f"{c['pass_seconds'][p]:.2f}" for p in ("fp32", "bf16_autocast", "bf16_weights"))
        lines.append(f"| {row['label']} | {row['weights']} | {row['num_tokens']} x {row['batch']} | "
                     f"{c['guiding_layer']} of {row['num_layers']} | {fmt(c['contrast'])} | {training} | {secs} |")
    check = results["self_check_fp32_repeat_max_error"]
    lines += ["", f"Self-check: the fp32 pass run twice differs by {fmt(check)} (largest error of any quantity).",
              "", results["reading"]]
    return "\n".join(lines)


def reading(results: Dict[str, Any]) -> str:
    """One paragraph from the numbers: w = 30, autocast vs bf16 weights, and the verdict on the default."""
    w30 = str(GUIDANCE_SCALE_SIT)
    rows = [r for r in results["teachers"] if r["comparison"] is not None]

    def pick(p, key):
        return ", ".join(f"{r['label']} {r['weights']} {fmt(r['comparison']['precisions'][p]['per_w'][w30][key])}"
                         for r in rows)

    worst_autocast = max(r["comparison"]["precisions"]["bf16_autocast"]["per_w"][w30]["rel_err_f_g"] for r in rows)
    worst_weights = max(r["comparison"]["precisions"]["bf16_weights"]["per_w"][w30]["rel_err_f_g"] for r in rows)
    tol = GUIDE_AUTOCAST_REL_TOL
    autocast_ok, weights_ok = worst_autocast <= tol, worst_weights <= tol
    verdict = (
        f"The largest f_g error at w = 30 is {fmt(worst_autocast)} under autocast and {fmt(worst_weights)} with bf16 "
        f"weights ({worst_weights / max(worst_autocast, 1e-30):.1f}x); against the project's bound "
        f"({tol}, `gpu_check.GUIDE_AUTOCAST_REL_TOL`) bf16 autocast with fp32 weights "
        + ("passes on every teacher, so it is safe as the default teacher precision" if autocast_ok else
           "fails on at least one teacher, so it is NOT safe as the default without a further check")
        + ", and bf16 weights " + ("pass too" if weights_ok else "fail")
    )
    return (
        f"Reading. At w = 30 the relative error of f_g is, under bf16 autocast with fp32 weights: "
        f"{pick('bf16_autocast', 'rel_err_f_g')}; with bf16 weights: {pick('bf16_weights', 'rel_err_f_g')}. "
        f"The guide loss moves much less (autocast: {pick('bf16_autocast', 'rel_err_loss')}; bf16 weights: "
        f"{pick('bf16_weights', 'rel_err_loss')}), because the loss is dominated by ||prediction - f_g||^2 and the "
        "target error enters it mostly through a near-orthogonal cross term; the gradient the student receives "
        "carries the target error in full (the grad columns). w multiplies the rounding of f_c - f_u, so the f_g "
        "error grows with w towards the f_c - f_u error, which is large when the classes differ little at the "
        f"guiding block (small ||f_c - f_u|| / ||f_c||). {verdict}."
    )


# --- Main ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or SMOKE_THREADS)
    command = portable_command(sys.argv[1:] if argv is None else list(argv))
    try:
        return run(args, command)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process


def run(args, command: str) -> Dict[str, Any]:
    start = time.perf_counter()
    device = torch.device(args.device)
    smoke = args.smoke
    tiny_config = dict(SMOKE_TINY_CONFIG if smoke else TINY_CONFIG)
    large_config = dict(SMOKE_LARGE_CONFIG) if smoke else dict(parse_preset(B2_PRESET), sample_size=B2_LATENT_SIZE,
                                                               in_channels=B2_LATENT_CHANNELS, num_classes=B2_CLASSES,
                                                               qk_norm=True)
    large_label = "SiT-B/2 stand-in (smoke)" if smoke else B2_PRESET
    steps = args.train_steps if args.train_steps is not None else (SMOKE_TRAIN_STEPS if smoke else TINY_TRAIN_STEPS)
    train_batch = SMOKE_TRAIN_BATCH if smoke else TINY_TRAIN_BATCH
    tiny_batch = SMOKE_EVAL_BATCH if smoke else TINY_EVAL_BATCH
    large_batch = args.b2_batch or (SMOKE_LARGE_BATCH if smoke else B2_EVAL_BATCH)
    projector_dim = SMOKE_PROJECTOR_DIM if smoke else DEFAULT_PROJECTOR_DIM
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# command: {command}\n# device: {device} ({device_name}), torch {torch.__version__}", flush=True)

    teachers = []

    def add(label, weights, config, model, inputs, batch, training=None):
        cfg = resolve_sit_config(config)
        t0 = time.perf_counter()
        comparison = compare(model.to(device), inputs, projector_dim, device, args.seed)
        print(f"# {label} {weights}: compared in {time.perf_counter() - t0:.1f} s", flush=True)
        teachers.append({"label": label, "weights": weights, "config": config, "num_layers": cfg["num_layers"],
                         "hidden_size": cfg["hidden_size"], "num_tokens": cfg["num_tokens"], "batch": batch,
                         "params": sum(p.numel() for p in model.parameters()), "training": training,
                         "comparison": comparison, "note": None})

    # 1. Tiny teacher on held-out digits: trained, then the same architecture random.
    train_data, held_out = digits_tensors(tiny_config["sample_size"])
    tcfg = resolve_sit_config(tiny_config)
    tiny_inputs = make_inputs(held_out[0][:tiny_batch], held_out[1][:tiny_batch], tcfg["hidden_size"],
                              tcfg["num_tokens"], args.seed, device)
    trained, training = train_tiny_teacher(tiny_config, train_data, steps, train_batch, args.seed, device)
    print(f"# tiny teacher trained: {training}", flush=True)
    add("tiny", "trained", tiny_config, trained, tiny_inputs, tiny_batch, training)
    add("tiny", "random", tiny_config, randomize_teacher_(SiTTransformer2DModel(**tiny_config), args.seed + 1),
        tiny_inputs, tiny_batch)

    # 2. SiT-B/2 sized: random weights only.
    lcfg = resolve_sit_config(large_config)
    gen = torch.Generator().manual_seed(args.seed + 2)
    x0 = torch.randn(large_batch, lcfg["in_channels"], lcfg["sample_size"], lcfg["sample_size"], generator=gen)
    labels = torch.randint(0, lcfg["num_classes"], (large_batch,), generator=gen)
    large_inputs = make_inputs(x0, labels, lcfg["hidden_size"], lcfg["num_tokens"], args.seed + 3, device)
    add(large_label, "random", large_config,
        randomize_teacher_(SiTTransformer2DModel(**large_config), args.seed + 4), large_inputs, large_batch)
    teachers.append({"label": large_label, "weights": "trained", "config": large_config,
                     "num_layers": lcfg["num_layers"], "hidden_size": lcfg["hidden_size"],
                     "num_tokens": lcfg["num_tokens"], "batch": large_batch, "params": None, "training": None,
                     "comparison": None, "note": B2_NO_TRAINED_WEIGHTS})

    # 3. Report.
    repeat_errors = []
    for row in teachers:
        if row["comparison"] is not None:
            e = row["comparison"]["precisions"]["fp32_repeat"]
            repeat_errors += [e["rel_err_f_c"], e["rel_err_f_u"], e["rel_err_f_c_minus_f_u"]]
            repeat_errors += [v for per in e["per_w"].values() for k, v in per.items() if k.startswith("rel_err")]
    results = {
        "command": command,
        "torch": torch.__version__,
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "smoke": smoke,
        "seed": args.seed,
        "guidance_scales": list(GUIDANCE_SCALES),
        "precisions": list(PRECISIONS),
        "t_range": list(DEFAULT_T_RANGE),
        "projector_dim": projector_dim,
        "autocast_tolerance": GUIDE_AUTOCAST_REL_TOL,
        "teachers": teachers,
        "self_check_fp32_repeat_max_error": max(repeat_errors),
    }
    results["reading"] = reading(results)
    results["seconds"] = round(time.perf_counter() - start, 1)
    table = markdown(results)
    results["markdown"] = table
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    header = (f"# Teacher precision: what bf16 costs the stage-2 guide target\n\n`{command}`  \n"
              f"torch {torch.__version__}, {device} ({device_name}), {results['seconds']:.0f} s\n\n")
    (out / "results.md").write_text(header + table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()

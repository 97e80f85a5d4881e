#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Evidence benchmark (issue 17): equal compute, runs that converge, and the paper's ablations at CPU scale.

Every training is the project's own script in its own process (`python examples/train_align.py ...` or
`examples/train_self_transcendence.py ...`), one after the other, each with `--resume_from_checkpoint latest`, so

    nohup nice -n 19 python benchmarks/evidence.py --output_dir bench_evidence > evidence.log 2>&1 &

can be killed at any time and started again with the same command: a finished run (its pipeline folder exists) is
skipped, an unfinished one resumes from its newest checkpoint, a checkpoint already scored is not scored again, and
`results.json`, `results.md`, `loss_curves.json` and the plots (`equal_compute.png`, `loss_curves.png`,
`ablations.png`) are rewritten after every run and every evaluation from whatever is finished (commit them whenever
you like).

What runs (rows; the paper's SiT-B/2 FID-10K at 80 epochs next to each, Tables 4 and 5):
- `vanilla` for `--steps` + the stage-1 budget: its first `--steps` are the vanilla row, the whole run is vanilla
  at equal compute with the teacher charged (same seed, same data order, constant lr: a prefix of a longer run is the
  shorter run).
- `vae_align` (Table 4 V1): stage 1. Seed `TEACHER_SEED`'s run is THE guiding model of every Self-Transcendence row
  (its checkpoints at 25/50/100/150 % of the stage-1 budget are the teacher ages), so the teacher is amortised over
  every seed and ablation; the other seeds give the V1 spread.
- `self_transcendence` (full), the w rows {1, 15, 45, 60} (30 is the full row), `w1_loss_matched` (w = 1 with lambda
  raised so that its initial guide loss equals w = 30's, measured by two probe runs at learning rate 0 on the same
  first batches), the layer rows (the paper's m -> n of 12 blocks scaled to the depth: round(m x depth / 12)),
  the teacher ages, the lambda rows, and `vanilla_teacher` (Table 4 V2: the guiding model is vanilla at the stage-1
  budget).
Each checkpoint's EMA weights are sampled (class-balanced, Euler, no CFG) and scored with the feature-FID and class
accuracy of `diffusers_selftrans.evaluation` (a small classifier trained on the real images). The spread over seeds is
the sample std; every verdict (the trends, equal compute, the convergence check) is Welch's t-test on the seeds' FIDs,
with its p-value and 95 % interval in the results (benchmarks/stats.py).

Training FLOPs (benchmarks/flops.py): 2 FLOPs per multiply-accumulate; a trained module costs 3 x its forward, the
frozen guiding model 1 x its forward up to the guiding block, twice per image (true label and null class); the
alignment projector (and stage 1's head) is trained. The guided phase costs student + projector + teacher; after the
guide stop a step is a vanilla step. "Teacher charged" adds the guiding model's whole stage-1 FLOPs (and seconds) to a
Self-Transcendence run; "teacher amortised" adds them divided by the number of rows x seeds sharing that teacher.

    python benchmarks/evidence.py --output_dir bench_evidence                 # digits, the full run (CPU-hours)
    python benchmarks/evidence.py --quick --output_dir bench_quick            # a short budget, headline rows only
    python benchmarks/evidence.py --train_data_dir my_class_folders --resolution 32 --output_dir bench_mine
    python benchmarks/evidence.py --smoke --output_dir /tmp/smoke             # the plumbing, ~1 min; tests run this
    python benchmarks/evidence.py --output_dir bench_evidence --report_only   # rewrite the results, train nothing
    python benchmarks/evidence.py --rederive benchmarks/results/evidence      # the statistics again from results.json
    # a benchmark split over machines or days (an output folder lost in between): the runs finished in the earlier
    # output are reported from its results.json / loss_curves.json and not trained again (settings must match)
    python benchmarks/evidence.py --output_dir bench_day2 --merge_results benchmarks/results/evidence
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import flops as F  # noqa: E402
import quickstart_assets  # noqa: E402
import stats as S  # noqa: E402

# --- budgets -----------------------------------------------------------------------------------------------------------
# Measured (benchmarks/results/evidence/results.json, "curves" -> "vanilla_charged", seed 0: 4,500 steps): vanilla's
# feature-FID falls 297.6 / 35.8 / 18.8 / 15.4 at 375 / 750 / 1,125 / 1,500 steps and has flattened by 1,875 (13.7):
# from there to 4,500 steps it stays within 11.9-14.7 while the diffusion loss still creeps down (0.224 -> 0.206, the
# mean of each 375-step window). 3,000 steps puts the budget well inside the flat part (its last 37 % is flat), so the
# late evaluations compare converged models and the early ones show the speed-up. Every report still checks that the
# last FLAT_TAIL_FRACTION of vanilla's curve is flat (see FLAT_TAIL_FRACTION).
DEFAULT_STEPS = 3000
# Evaluations every 12.5 % of the run (~10 %), chosen so that the teacher ages below (25 % of a stage-1 budget of half
# the run = 12.5 % of the run) fall on evaluated checkpoints.
EVAL_FRACTION = 0.125
# Paper Table 5: the default guiding model M_align is trained 200K iterations for a 400K-iteration (80-epoch) stage 2.
STAGE1_FRACTION = 0.5
# Released code: the guide loss stops after 100K of the 400K iterations (paper: 20 of 80 epochs for SiT-B).
GUIDE_STOP_FRACTION = 0.25
# EMA suited to the length: keep the paper's averaging horizon as a fraction of the run. Decay 0.9999 averages over
# ~1 / (1 - 0.9999) = 10K steps of a 400K-step run = 2.5 %; the decay giving 2.5 % of `steps` is 1 - 1 / (0.025 steps)
# (3,000 steps: 0.9867, a horizon of 75 steps, well inside the 375 steps between evaluations).
PAPER_EMA_DECAY = 0.9999
PAPER_TRAIN_STEPS = 400_000
EMA_HORIZON_FRACTION = (1.0 / (1.0 - PAPER_EMA_DECAY)) / PAPER_TRAIN_STEPS
# Trends are judged twice: at the end (converged models) and at this fraction of the run, where vanilla's curve is
# still falling (1,500 of 3,000 steps: 15.0 against 12.0 at the end). The paper's 80-epoch SiT-B/2 FIDs (23-39) are
# far from converged too, so the mid-run verdict is the closer analogue of its tables; the end says what survives.
TREND_MID_FRACTION = 0.5
# Convergence check: the last 20 % of vanilla's curve is "flat" if the seeds' FIDs at its first and last evaluation
# do not differ significantly (Welch's two-sided t-test, p >= 0.05: benchmarks/stats.py); "still changing" otherwise.
FLAT_TAIL_FRACTION = 0.2
# convergence.py's measurement: lr 1e-4 (tuned for SiT-B at batch 256 over 400K steps) barely trains the tiny SiT in
# a few hundred steps (loss 0.43 after 300 steps vs 0.35 at 1e-3).
TINY_LEARNING_RATE = 1e-3
TINY_BATCH_SIZE = 128
# The paper's 2048-wide projector is for D = 768-1152; 4 D for the tiny SiT's D = 128 (as convergence.py).
TINY_PROJECTOR_DIM = 512
QUICK_STEPS = 600  # --quick: the old convergence budget, headline rows only

# --- the paper's settings (Self-Transcendence, SiT-B/2 = 12 blocks) ----------------------------------------------------
PAPER_DEPTH = 12
DEFAULT_W = 30.0
DEFAULT_LAMBDA = 0.5
DEFAULT_LAYERS = (8, 6)  # guiding block -> guided block, of 12
W_VALUES = (1.0, 15.0, 45.0, 60.0)  # plus 30 = the full row (Table 5)
LAYER_ROWS = ((8, 4), (8, 8), (6, 6), (10, 6))  # plus 8 -> 6 = the full row (Table 5)
TEACHER_AGES = (0.25, 0.5, 1.5)  # fractions of the stage-1 budget (paper 50K/100K/300K of 200K); 1.0 = full row
LAMBDAS = (0.1, 0.3, 0.7, 1.0)  # plus 0.5 = the full row (Table 5)
# Paper FID-10K of each row (SiT-B/2, 80 epochs; Table 4 and Table 5 of the Self-Transcendence paper).
PAPER_FID = {
    "vanilla": ("Table 4", 38.60), "vae_align": ("Table 4 V1", 32.20), "vanilla_teacher": ("Table 4 V2", 25.21),
    "self_transcendence": ("Tables 4/5", 22.91), "self_transcendence_rerun": ("Tables 4/5, the full row", 22.91),
    "w1": ("Table 5", 29.30), "w15": ("Table 5", 24.26), "w45": ("Table 5", 23.01), "w60": ("Table 5", 23.57),
    "w1_loss_matched": ("not in the paper", None),
    "layers_8-4": ("Table 5", 23.43), "layers_8-8": ("Table 5", 24.29), "layers_6-6": ("Table 5", 24.37),
    "layers_10-6": ("Table 5", 24.05),
    "teacher_25": ("Table 5 (50K)", 28.32), "teacher_50": ("Table 5 (100K)", 25.20),
    "teacher_150": ("Table 5 (300K)", 22.91),
    "lambda_0.1": ("Table 5", 24.28), "lambda_0.3": ("Table 5", 23.08), "lambda_0.7": ("Table 5", 23.27),
    "lambda_1.0": ("Table 5", 23.24),
}
# The full row again, 2 seeds, trained with the ablation rows. A benchmark split over days (--merge_results) retrains
# its guiding model on each new disk, and a retrained one is not bit-identical on another CPU: the rows trained that
# day are compared with this row (same guiding model) as well as with the full row.
RERUN_ROW = "self_transcendence_rerun"
# Trends the paper reports, as (better row, worse row, what it tests); judged at mid-run and at the last evaluation.
TRENDS = (
    ("self_transcendence", "vanilla", "Self-Transcendence beats vanilla at equal steps"),
    ("vae_align", "vanilla", "Table 4: VAE-align alone beats vanilla (V1)"),
    ("self_transcendence", "vae_align", "Table 4: the self-guided stage adds to VAE-align (full vs V1)"),
    ("self_transcendence", "vanilla_teacher", "Table 4: a VAE-aligned teacher beats a vanilla one (full vs V2)"),
    ("self_transcendence", "w1", "Table 5: w = 30 beats w = 1"),
    ("self_transcendence", "w1_loss_matched", "w = 30 beats w = 1 at the same initial loss (the CFG direction)"),
    ("self_transcendence", "w60", "Table 5: w = 30 beats w = 60"),
    ("self_transcendence", "layers_8-8", "Table 5: guiding a shallow block (8->6) beats a deep one (8->8)"),
    ("self_transcendence", "layers_6-6", "Table 5: an abstraction gap (8->6) beats the same depth (6->6)"),
    ("self_transcendence", "layers_10-6", "Table 5: 8->6 beats a very deep guide (10->6)"),
    ("self_transcendence", "teacher_25", "Table 5: a trained teacher (100 %) beats a young one (25 %)"),
    ("self_transcendence", "lambda_0.1", "Table 5: lambda 0.5 beats 0.1"),
    # The same trends against the full row run again beside the ablations (RERUN_ROW): same day, same guiding model
    (RERUN_ROW, "self_transcendence", "control: the retrained guiding model makes a better full row"),
    (RERUN_ROW, "layers_8-8", "Table 5, same teacher: 8->6 beats 8->8"),
    (RERUN_ROW, "layers_6-6", "Table 5, same teacher: 8->6 beats 6->6"),
    (RERUN_ROW, "layers_10-6", "Table 5, same teacher: 8->6 beats 10->6"),
    (RERUN_ROW, "teacher_25", "Table 5, same teacher: a trained teacher (100 %) beats a young one (25 %)"),
    (RERUN_ROW, "teacher_50", "Table 5, same teacher: a trained teacher (100 %) beats a half-trained one (50 %)"),
    *((RERUN_ROW, f"lambda_{lam}", f"Table 5, same teacher: lambda 0.5 beats {lam}") for lam in LAMBDAS),
)
# Loss-matched control: the initial guide loss of w = 1 and w = 30, averaged over this many first batches of probe runs
# at learning rate 0 (the weights never move, so every batch sees the initial student and projector).
LOSS_MATCH_PROBE_STEPS = 8
TEACHER_SEED = 0
HEADLINE_SEEDS = (0, 1, 2)  # headline, equal-compute and w rows (issue 17)
ABLATION_SEEDS = (0, 1)  # the other ablations: at least 2
SMOKE_MODEL = {"patch_size": 2, "num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 16}
SMOKE_ROWS = ("vanilla", "vae_align", "self_transcendence", "w1_loss_matched")
LOG_TAIL_CHARS = 3000
# What must be equal for runs of an earlier output to be reported beside these (--merge_results); the model is compared
# through its FLOPs per image, its path may differ between machines.
MERGE_SETTINGS = ("train_data_dir", "vae_name_or_path", "resolution", "steps", "batch_size", "learning_rate",
                  "ema_decay", "projector_dim", "samples_per_class", "sampling_steps", "max_real", "eval_every",
                  "stage1_steps", "guide_stop_step", "smoke")


# ----------------------------------------------------------------------------------------------------------------------
# Rows and runs
# ----------------------------------------------------------------------------------------------------------------------
def ema_decay_for(steps: int) -> float:
    """The EMA decay whose horizon 1 / (1 - decay) is EMA_HORIZON_FRACTION of a `steps`-step run."""
    return 1.0 - 1.0 / max(EMA_HORIZON_FRACTION * steps, 1.0)


def scaled_layer(block: int, depth: int) -> int:
    """The paper's block of 12 at the same relative depth of a `depth`-block model (1-based, at least 1)."""
    return min(depth, max(1, round(block * depth / PAPER_DEPTH)))


def all_rows():
    """Every row: name -> {kind, group, seeds, (Self-Transcendence) w, lam, layers, teacher}, in the order run."""
    st = lambda **kw: dict({"kind": "st", "w": DEFAULT_W, "lam": DEFAULT_LAMBDA, "layers": DEFAULT_LAYERS,  # noqa: E731
                            "teacher": ("vae_align", 1.0), "seeds": HEADLINE_SEEDS}, **kw)
    rows = {"vanilla": {"kind": "vanilla", "group": "headline", "seeds": HEADLINE_SEEDS},
            "vae_align": {"kind": "vae_align", "group": "table4", "seeds": HEADLINE_SEEDS},
            "self_transcendence": st(group="headline")}
    for w in W_VALUES:
        rows[f"w{w:g}"] = st(group="guidance scale", w=w)
    rows["w1_loss_matched"] = st(group="guidance scale", w=1.0, lam="matched")
    rows["vanilla_teacher"] = st(group="table4", teacher=("vanilla", 1.0), seeds=ABLATION_SEEDS)
    rows[RERUN_ROW] = st(group="control", seeds=ABLATION_SEEDS)
    for m, n in LAYER_ROWS:
        rows[f"layers_{m}-{n}"] = st(group="layers", layers=(m, n), seeds=ABLATION_SEEDS)
    for age in TEACHER_AGES:
        rows[f"teacher_{round(age * 100)}"] = st(group="teacher age", teacher=("vae_align", age), seeds=ABLATION_SEEDS)
    for lam in LAMBDAS:
        rows[f"lambda_{lam}"] = st(group="lambda", lam=lam, seeds=ABLATION_SEEDS)
    return rows


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", type=str, default=None, help="Required unless --rederive.")
    p.add_argument("--rederive", type=str, default=None, metavar="FOLDER",
                   help="Train nothing, score nothing: recompute the summary, tests, results.md and plots of FOLDER "
                        "from its results.json and loss_curves.json (e.g. benchmarks/results/evidence) and rewrite "
                        "them there.")
    p.add_argument("--train_data_dir", type=str, default=None,
                   help="An image-class folder (default: scikit-learn's digits). Without --vae_name_or_path a VAE is "
                        "trained on it first (quickstart_assets.py train-vae) and its held-out PSNR reported.")
    p.add_argument("--vae_name_or_path", type=str, default=None,
                   help="Default: the bundled digits VAE for the digits, a VAE trained on --train_data_dir otherwise.")
    p.add_argument("--vae_steps", type=int, default=quickstart_assets.VAE_TRAIN_STEPS)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--model", type=str, default=str(ROOT / "examples" / "configs" / "sit-tiny.json"))
    p.add_argument("--rows", nargs="+", default=None, help=f"Rows to run (default all): {list(all_rows())}.")
    p.add_argument("--steps", type=int, default=None, help=f"Stage-2 / baseline budget (default {DEFAULT_STEPS}).")
    p.add_argument("--batch_size", type=int, default=TINY_BATCH_SIZE)
    p.add_argument("--learning_rate", type=float, default=TINY_LEARNING_RATE)
    p.add_argument("--ema_decay", type=float, default=None, help="Default: ema_decay_for(steps) (see EMA_HORIZON_FRACTION).")
    p.add_argument("--projector_dim", type=int, default=TINY_PROJECTOR_DIM)
    p.add_argument("--samples_per_class", type=int, default=30)
    p.add_argument("--sampling_steps", type=int, default=25)
    p.add_argument("--max_real", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="Only these seeds (default: 3 for headline / w rows, 2 for the other ablations).")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, the headline rows only.")
    p.add_argument("--smoke", action="store_true", help="A tiny model, 4 steps, 1 seed, 4 rows: the plumbing.")
    p.add_argument("--report_only", action="store_true",
                   help="Train nothing: score the finished runs (cached scores are reused) and rewrite the results.")
    p.add_argument("--merge_results", type=str, default=None,
                   help="An earlier output folder (its results.json and loss_curves.json, e.g. "
                        "benchmarks/results/evidence): the runs finished there and not here are reported from it and "
                        "not trained again, so a benchmark split over machines or days reports as one. Its settings "
                        "must match these.")
    args = p.parse_args(input_args)
    if args.rederive:
        return args
    if args.output_dir is None:
        p.error("--output_dir is required (or --rederive FOLDER).")
    rows = all_rows()
    if args.rows is None:
        args.rows = list(SMOKE_ROWS) if args.smoke else (
            [r for r in rows if rows[r]["group"] == "headline"] + ["vae_align"] if args.quick else list(rows))
    unknown = sorted(set(args.rows) - set(rows))
    if unknown:
        p.error(f"Unknown rows {unknown}; choose from {list(rows)}.")
    if args.smoke:
        args.steps, args.batch_size, args.samples_per_class, args.sampling_steps = 4, 8, 2, 2
        args.max_real, args.projector_dim, args.vae_steps = args.max_real or 200, 32, 4
        args.seeds = args.seeds or [0]
        model = Path(args.output_dir) / "smoke_model.json"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_text(json.dumps(SMOKE_MODEL))
        args.model = str(model)
    args.steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    args.ema_decay = ema_decay_for(args.steps) if args.ema_decay is None else args.ema_decay
    # 2 evaluations in --smoke (every 50 %), otherwise every EVAL_FRACTION of the run
    args.eval_every = max(1, args.steps // 2 if args.smoke else round(args.steps * EVAL_FRACTION))
    args.stage1_steps = max(1, round(args.steps * STAGE1_FRACTION))
    args.guide_stop_step = max(1, round(args.steps * GUIDE_STOP_FRACTION))
    # the evaluated step nearest TREND_MID_FRACTION of the run
    args.mid_step = max(args.eval_every, args.eval_every * round(TREND_MID_FRACTION * args.steps / args.eval_every))
    check_schedule(args, rows, p.error)
    if args.merge_results:
        from convergence import recorded_settings

        previous = json.loads((Path(args.merge_results) / "results.json").read_text())["settings"]
        here = recorded_settings(args, args.output_dir)  # paths as each output records them: no machine's folders
        differ = {k: (previous.get(k), here[k]) for k in MERGE_SETTINGS if previous.get(k) != here[k]
                  and not (isinstance(previous.get(k), float) and math.isclose(previous[k], here[k]))}
        if differ:
            p.error(f"--merge_results {args.merge_results} ran with other settings (there, here): {differ}.")
    return args


def teacher_step(args, teacher) -> int:
    return round(args.stage1_steps * teacher[1])


def check_schedule(args, rows, error):
    """Every checkpoint a row needs (teacher ages, the stage-1 budget, the end) must be a multiple of eval_every."""
    needed = {"--steps": args.steps, "stage-1 budget": args.stage1_steps}
    for name in args.rows:
        if rows[name]["kind"] == "st":
            needed[f"{name}'s teacher"] = teacher_step(args, rows[name]["teacher"])
    bad = {k: v for k, v in needed.items() if v % args.eval_every or v < 1}
    if bad:
        error(f"Checkpoints fall every {args.eval_every} steps ({EVAL_FRACTION:g} of --steps {args.steps}) but these "
              f"steps are not multiples of it: {bad}. Pick --steps a multiple of {round(1 / (EVAL_FRACTION * 0.25))}.")


def row_seeds(args, row):
    return [s for s in row["seeds"] if args.seeds is None or s in args.seeds] if not args.smoke else list(args.seeds)


def run_length(args, kind):
    """Training steps of a run: vanilla runs on to steps + stage 1 (equal compute); stage 1 to its oldest teacher."""
    if kind == "vanilla":
        return args.steps + args.stage1_steps
    if kind == "vae_align":
        return max(args.steps, round(args.stage1_steps * max(TEACHER_AGES + (1.0,))))
    return args.steps


# ----------------------------------------------------------------------------------------------------------------------
# Training: one subprocess per run, resumed from its own checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def child_env():
    import diffusers_selftrans

    env = dict(os.environ)
    src = str(Path(diffusers_selftrans.__file__).resolve().parents[1])  # the package this process imports
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_training(script: str, flags, folder: Path, events: Path):
    """`python examples/<script> FLAGS --resume_from_checkpoint latest` unless `folder` holds a finished run."""
    if (folder / "model_index.json").exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    resumed = any(p.name.startswith("checkpoint-") for p in folder.iterdir())
    argv = [sys.executable, str(ROOT / "examples" / script), *map(str, flags), "--output_dir", str(folder),
            "--resume_from_checkpoint", "latest", "--no-progress"]
    print(f"[evidence] {'resume' if resumed else 'train'} {folder}", flush=True)
    start = time.perf_counter()
    with open(folder / "train.log", "a") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=str(ROOT)).returncode
    if code != 0 or not (folder / "model_index.json").exists():
        tail = (folder / "train.log").read_text()[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"Training failed (exit {code}): {' '.join(argv)}\n--- {folder / 'train.log'} ---\n{tail}")
    from convergence import recorded_path

    with open(events, "a") as f:  # the run folder relative to the output folder (runs/<row>/seed<n>)
        f.write(json.dumps({"run": recorded_path(folder, events.parent), "resumed": resumed,
                            "seconds": round(time.perf_counter() - start, 1)}) + "\n")
    return True


def common_flags(args, ctx, seed, steps, checkpoint_every):
    return ["--model", args.model, "--vae_name_or_path", ctx["vae"], "--resolution", args.resolution,
            "--latents_dir", ctx["latents"], "--train_batch_size", args.batch_size, "--seed", seed,
            "--max_train_steps", steps, "--checkpointing_steps", checkpoint_every, "--validation_steps", 10 ** 9,
            "--report_to", "none", "--ema_decay", args.ema_decay, "--logging_steps", args.eval_every,
            "--validation_num_inference_steps", args.sampling_steps, "--validation_class_labels", 0,
            "--projector_dim", args.projector_dim, "--learning_rate", args.learning_rate]


def run_folder(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed{seed}"


def teacher_path(out: Path, teacher) -> Path:
    """The EMA weights of the shared guiding model's checkpoint at its age (vae_align, or vanilla for V2)."""
    kind, _ = teacher
    return run_folder(out, kind, TEACHER_SEED)


def st_flags(args, ctx, row, seed, depth, lam):
    m, n = row["layers"]
    ckpt = teacher_path(ctx["out"], row["teacher"]) / f"checkpoint-{teacher_step(args, row['teacher'])}"
    return common_flags(args, ctx, seed, args.steps, args.eval_every) + [
        "--guiding_model_name_or_path", ckpt / "transformer_ema", "--guide_stop_step", args.guide_stop_step,
        "--guide_cfg_scale", row["w"], "--guide_loss_weight", lam,
        "--guiding_layer", scaled_layer(m, depth), "--guided_layer", scaled_layer(n, depth)]


def probe_initial_guide_loss(args, ctx, row, seed, depth, w, events):
    """Mean guide loss over the first LOSS_MATCH_PROBE_STEPS batches at lr 0 (initial student, projector, teacher)."""
    folder = ctx["out"] / "probes" / f"w{w:g}" / f"seed{seed}"
    steps = min(LOSS_MATCH_PROBE_STEPS, args.steps)
    flags = st_flags(args, ctx, dict(row, w=w), seed, depth, DEFAULT_LAMBDA)
    flags[flags.index("--max_train_steps") + 1] = steps
    flags[flags.index("--checkpointing_steps") + 1] = steps
    flags[flags.index("--learning_rate") + 1] = 0.0
    flags[flags.index("--guide_stop_step") + 1] = steps + 1  # the guide stays on through the probe
    run_training("train_self_transcendence.py", flags, folder, events)
    rows = [json.loads(line) for line in (folder / "loss_log.jsonl").read_text().splitlines()]
    values = [r["loss_guide"] for r in rows if r.get("loss_guide")]  # 0 where the t-range mask removed the batch
    if not values:
        raise RuntimeError(f"The probe {folder} logged no guide loss in {steps} steps (t-range mask): raise "
                           f"LOSS_MATCH_PROBE_STEPS.")
    return float(np.mean(values)), len(values)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation, cached per checkpoint
# ----------------------------------------------------------------------------------------------------------------------
def read_log(folder: Path):
    return {r["step"]: r for r in map(json.loads, (folder / "loss_log.jsonl").read_text().splitlines())}


def evaluate_run(folder: Path, args, ctx, max_step: int):
    """{step: {fid, accuracy}} of every checkpoint up to max_step; each result is cached in folder/evals/."""
    from diffusers_selftrans import checkpointing as C
    from diffusers_selftrans import evaluation as E
    from diffusers_selftrans import training as T

    results = {}
    for ckpt in C.list_checkpoints(folder):
        step = C.checkpoint_step(ckpt)
        if step > max_step:
            continue
        cache = folder / "evals" / f"step-{step}.json"
        if not cache.exists():
            model = T.load_transformer(str(ckpt / "transformer_ema"))
            pipe = T.build_pipeline(model, ctx["vae_model"])
            pipe.set_progress_bar_config(disable=True)
            plan = E.class_balanced_plan(args.samples_per_class * ctx["num_classes"], ctx["num_classes"], seed=1234)
            samples = folder / "eval_samples" / f"step-{step}"
            E.generate_samples(pipe, plan, str(samples), batch_size=256, num_inference_steps=args.sampling_steps,
                               progress=False)
            labels = np.array([p.class_label for p in sorted(plan, key=lambda p: p.index)])
            metrics = E.evaluate_samples(ctx["real"], ctx["real_labels"], E.load_images(str(samples)), labels,
                                         ctx["classifier"])
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"fid": float(metrics["fid"]), "accuracy": float(metrics["accuracy"])}))
        results[step] = json.loads(cache.read_text())
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Results from whatever is finished
# ----------------------------------------------------------------------------------------------------------------------
def fids_at(curves, view, step):
    """The seeds' feature-FIDs of a row (view) at an evaluated step, in seed order."""
    return [p["fid"] for seed in sorted(curves[view]) for p in curves[view][seed] if p["step"] == step]


def judged(test):
    """A stats.compare result as the results record it (the difference is worse - better: > 0 in the expected
    order)."""
    return {"fid_difference": test["difference"], "p_value": test["p_value"],
            "ci95": None if test["ci_low"] is None else [test["ci_low"], test["ci_high"]], "t": test["t"],
            "df": test["df"], "verdict": test["verdict"]}


def run_flops(args, ctx, name, row, folder, step):
    """Cumulative training FLOPs of a run at `step`, without its teacher."""
    per_image = ctx["flops"][name]
    images = args.batch_size
    if row["kind"] != "st":
        return step * images * per_image
    guided = min(step, args.guide_stop_step)
    return images * (guided * per_image + (step - guided) * ctx["flops"]["vanilla"])


def teacher_flops(args, ctx, row):
    """Training FLOPs of the guiding model up to its age."""
    return teacher_step(args, row["teacher"]) * args.batch_size * ctx["flops"][row["teacher"][0]]


def teacher_seconds(args, ctx, row, logs):
    """Training seconds of the guiding model up to its age, from its log here."""
    folder = run_folder(ctx["out"], row["teacher"][0], TEACHER_SEED)
    return logs.setdefault(folder, read_log(folder))[teacher_step(args, row["teacher"])]["train_seconds"]


def local_run(args, ctx, name, row, seed, max_step, logs):
    """(points, loss curve, loss windows) of a run finished and scored here, from its folder; None if it is not."""
    evals = ctx["evals"].get((name, seed))
    if not evals:
        return None
    folder = run_folder(ctx["out"], name, seed)
    log = logs.setdefault(folder, read_log(folder))
    points = [{"step": step, **metrics, "seconds": log[step]["train_seconds"],
               "flops": run_flops(args, ctx, name, row, folder, step)}
              for step, metrics in sorted(evals.items()) if step <= max_step]
    if row["kind"] == "st":
        seconds = teacher_seconds(args, ctx, row, logs)
        for point in points:
            point["teacher_seconds"] = seconds
    loss_curve = [[s, round(r["loss_diff"], 6)] for s, r in sorted(log.items()) if s <= max_step]
    windows = [0] + [p["step"] for p in points]
    losses = {}
    for key in ("loss_diff", "loss_guide"):
        means = [window_mean(log, key, a, b) for a, b in zip(windows, windows[1:])]
        if any(m is not None for m in means):
            losses[key] = dict(zip(windows[1:], means))
    return points, loss_curve, losses


def merged_run(ctx, view, name, seed):
    """(points, loss curve, loss windows) of a run taken from --merge_results's output; None if it is not one.
    Points keep what was measured there: FIDs, the run's seconds and its teacher's (on the machine it trained on)."""
    if (name, seed) not in ctx["merged"]:
        return None
    previous = ctx["previous"]
    own = ("step", "fid", "accuracy", "seconds", "flops", "teacher_seconds")
    points = [{k: p[k] for k in own if k in p} for p in previous["results"]["curves"][view][str(seed)]]
    losses = {key: {int(step): v for step, v in by_seed[str(seed)].items()}
              for key, by_seed in previous["results"]["losses"].get(name, {}).items() if str(seed) in by_seed}
    return points, previous["loss_curves"][name][str(seed)], losses


def collect(args, ctx, rows):
    """Curves of every finished row and seed: points {step, fid, accuracy, seconds, flops, (charged/amortised)}."""
    curves, loss_curves, logs, losses = {}, {}, {}, {}
    shares = {}  # teacher -> number of (row, seed) runs sharing it
    for name in args.rows:
        if rows[name]["kind"] == "st":
            key = rows[name]["teacher"][0]
            shares[key] = shares.get(key, 0) + len(row_seeds(args, rows[name]))
    views = [(name, name, args.steps) for name in args.rows]
    if "vanilla" in args.rows:
        views.append(("vanilla_charged", "vanilla", run_length(args, "vanilla")))
    for view, name, max_step in views:
        row = rows[name]
        for seed in row_seeds(args, row):
            run = local_run(args, ctx, name, row, seed, max_step, logs) or merged_run(ctx, view, name, seed)
            if run is None:
                continue
            points, loss_curve, run_losses = run
            if row["kind"] == "st":  # the teacher's cost; its seconds measured where the run trained
                t_flops, n = teacher_flops(args, ctx, row), shares[row["teacher"][0]]
                for point in points:
                    t_secs = point["teacher_seconds"]
                    point.update(flops_charged=point["flops"] + t_flops, seconds_charged=point["seconds"] + t_secs,
                                 flops_amortised=point["flops"] + t_flops / n,
                                 seconds_amortised=point["seconds"] + t_secs / n, teacher_shared_by=n)
            curves.setdefault(view, {})[seed] = points
            if view == name:
                loss_curves.setdefault(name, {})[seed] = loss_curve
                for key, windows in run_losses.items():
                    losses.setdefault(name, {}).setdefault(key, {})[seed] = windows
    return curves, loss_curves, losses


def window_mean(log, key, after, upto):
    """Mean of a logged loss over the steps (after, upto]; None if it was never logged there (a guide after its stop
    logs 0 or nothing: both count as absent)."""
    values = [r[key] for s, r in log.items() if after < s <= upto and r.get(key)]
    return float(np.mean(values)) if values else None


def losses_markdown(losses):
    """Mean diffusion and guide loss of each evaluation window, mean over seeds: what each term weighs."""
    lines = []
    for name, by_key in losses.items():
        for key, by_seed in by_key.items():
            steps = sorted(set.intersection(*[set(v) for v in by_seed.values()]))
            cells = []
            for step in steps:
                values = [v[step] for v in by_seed.values() if v[step] is not None]
                cells.append(f"{step}: {np.mean(values):.4g}" if values else f"{step}: -")
            lines.append(f"| {name} | {key} | {len(by_seed)} | " + ", ".join(cells) + " |")
    if not lines:
        return []
    return ["", "## Losses (mean of each evaluation window (previous evaluation, step], mean over seeds; unweighted)",
            "", "| row | loss | seeds | step: mean |", "|---|---|---|---|"] + lines


def summarize(curves):
    """Mean and sample std (ddof 1; None for one seed) over seeds at each step every seed has reached."""
    summary = {}
    for view, by_seed in curves.items():
        steps = sorted(set.intersection(*[{p["step"] for p in pts} for pts in by_seed.values()]))
        rows = []
        for step in steps:
            pts = [next(p for p in pts if p["step"] == step) for pts in by_seed.values()]
            entry = {"step": step, "seeds": len(pts)}
            for key in ("fid", "accuracy", "seconds", "flops", "flops_charged", "seconds_charged", "flops_amortised",
                        "seconds_amortised"):
                if key in pts[0]:
                    entry[f"{key}_mean"], entry[f"{key}_std"] = S.mean_std([p[key] for p in pts])
            rows.append(entry)
        summary[view] = rows
    return summary


def flatness(args, summary, curves):
    """Is the last FLAT_TAIL_FRACTION of vanilla's curve flat? Welch's t-test between the seeds' FIDs at the tail's
    first and last evaluation: "flat" unless they differ with p < 0.05 (no significant change, which with 2-3 seeds
    is weak evidence of none)."""
    rows = [r for r in summary.get("vanilla", []) if r["step"] <= args.steps]
    if not rows or rows[-1]["step"] != args.steps:
        return {"verdict": "not yet run"}
    tail = [r for r in rows if r["step"] >= (1 - FLAT_TAIL_FRACTION) * args.steps]
    if len(tail) < 2:
        tail = rows[-2:]
    first, last = tail[0]["step"], tail[-1]["step"]
    test = S.compare(fids_at(curves, "vanilla", last), fids_at(curves, "vanilla", first))  # first - last
    if test["p_value"] is None:
        word = test["verdict"]
    else:
        word = "still changing: raise DEFAULT_STEPS" if test["p_value"] < S.ALPHA else "flat"
    return {"verdict": word, "fid_change": abs(test["difference"]), "from_step": first, "to_step": last,
            "test": {k: v for k, v in judged(test).items() if k != "verdict"}}


def fmt(row, key="fid", digits=None):
    """mean ± sample std over seeds; a single seed has no spread, so none is shown."""
    digits = digits if digits is not None else (2 if key == "fid" else 3)
    return S.fmt(row[f"{key}_mean"], row[f"{key}_std"] if row["seeds"] > 1 else None, digits)


def write_results(args, ctx, rows):
    """results.json, results.md, loss_curves.json and the plots, from every finished evaluation."""
    from convergence import recorded_path, recorded_settings

    out = ctx["out"]
    curves, loss_curves, losses = collect(args, ctx, rows)
    vae = ctx["vae_metrics"] and dict(ctx["vae_metrics"], data=recorded_path(ctx["vae_metrics"]["data"], out))
    measured = {"flops_per_image": ctx["flops"], "vae": vae, "loss_match": ctx["loss_match"],
                "runs_finished": sorted(f"{n}/seed{s}" for (n, s) in set(ctx["evals"]) | ctx["merged"]),
                "runs_merged": {"from": recorded_path(args.merge_results, out),
                                "runs": sorted(f"{n}/seed{s}" for (n, s) in ctx["merged"])},
                "machine": os.uname().machine}
    sources = {"data": recorded_path(ctx["data_dir"], out), "vae": recorded_path(ctx["vae"], out)}
    return derive_results(args, out, recorded_settings(args, out), measured, curves, loss_curves, losses, sources)


def derive_results(args, out: Path, settings, measured, curves, loss_curves, losses, sources):
    """Everything the per-seed curves determine (summary, convergence check, trends, equal compute), written with
    them: results.json, loss_curves.json, results.md and the plots. `measured`: the recorded FLOPs, VAE metrics,
    loss match, finished and merged runs and machine; `sources`: the data and VAE as results.md names them."""
    rows = all_rows()
    summary = summarize(curves)
    final = {v: s[-1] for v, s in summary.items() if s and s[-1]["step"] == (
        run_length(args, "vanilla") if v == "vanilla_charged" else args.steps)}
    mid = {v: r for v in final if v != "vanilla_charged" for r in summary[v] if r["step"] == args.mid_step}
    flat = flatness(args, summary, curves)
    trends = []
    for better, worse, what in TRENDS:
        if better in final and worse in final:
            trend = {"trend": what, "better": better, "worse": worse}
            for key, at in (("end", final), ("mid", mid)):
                step = at[better]["step"]
                test = S.compare(fids_at(curves, better, step), fids_at(curves, worse, step))
                trend[key] = {"step": step, **judged(test)}
            trends.append(trend)
        elif better in args.rows and worse in args.rows:
            trends.append({"trend": what, "better": better, "worse": worse, "verdict": "not yet run"})
    equal = equal_compute(final, curves)
    equal["along_curve"] = equal_compute_curve(summary)
    result = {"settings": settings, "flops_per_image": measured["flops_per_image"], "vae": measured["vae"],
              "loss_match": measured["loss_match"], "statistics": S.TEST, "convergence": flat,
              "equal_compute": equal, "trends": trends, "summary": summary, "curves": curves, "losses": losses,
              "runs_finished": measured["runs_finished"], "runs_merged": measured["runs_merged"],
              "machine": measured["machine"]}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "loss_curves.json").write_text(json.dumps(loss_curves))
    (out / "results.md").write_text(report_markdown(args, result, sources, rows, final, mid, losses))
    plot(args, rows, summary, loss_curves, out)
    return result


def rederive(folder):
    """Recompute the summary, the convergence check, the trends, equal compute, results.md and the plots of a
    finished benchmark from its results.json and loss_curves.json (the per-seed points measured then; nothing is
    trained or scored) and rewrite them in `folder`."""
    import quickstart_assets
    from convergence import recorded_path

    out = Path(folder)
    saved = json.loads((out / "results.json").read_text())
    loss_curves = json.loads((out / "loss_curves.json").read_text())
    settings = saved["settings"]
    # JSON keys are strings: seeds and loss-window steps back to the integers a fresh run holds
    curves = {view: {int(seed): points for seed, points in by_seed.items()}
              for view, by_seed in saved["curves"].items()}
    losses = {name: {key: {int(seed): {int(step): v for step, v in windows.items()}
                           for seed, windows in by_seed.items()} for key, by_seed in by_key.items()}
              for name, by_key in saved["losses"].items()}
    measured = {k: saved[k] for k in ("flops_per_image", "vae", "loss_match", "runs_finished", "runs_merged",
                                      "machine")}
    # the data and VAE as prepare_data chose them (recorded: the digits written to data/digits, the bundled VAE, or
    # one trained into the output folder)
    default_vae = recorded_path(str(quickstart_assets.DEFAULT_VAE_PATH), out) if settings["train_data_dir"] is None \
        else "vae"
    sources = {"data": settings["train_data_dir"] or "data/digits", "vae": settings["vae_name_or_path"] or default_vae}
    result = derive_results(argparse.Namespace(**settings), out, settings, measured, curves, loss_curves, losses,
                            sources)
    print((out / "results.md").read_text())
    return result


def vanilla_fid_at(vanilla_rows, cost, key):
    """Vanilla's mean FID at a cost (key "flops" or "seconds"), linearly interpolated between its two neighbouring
    evaluations; None outside its evaluated range."""
    xs = [r[f"{key}_mean"] for r in vanilla_rows]
    if not xs or not xs[0] <= cost <= xs[-1]:
        return None
    return float(np.interp(cost, xs, [r["fid_mean"] for r in vanilla_rows]))


def equal_compute_curve(summary):
    """At every evaluated Self-Transcendence step: its FID and vanilla's FID at the same cost (FLOPs and seconds,
    teacher charged and amortised), so "does it win at equal compute" is answered along the run, not only at its end."""
    st, vanilla = summary.get("self_transcendence"), summary.get("vanilla_charged")
    if not st or not vanilla:
        return []
    points = []
    for r in st:
        point = {"step": r["step"], "st_fid": r["fid_mean"], "st_fid_std": r["fid_std"]}
        for budget in ("charged", "amortised"):
            for key in ("flops", "seconds"):
                cost = r[f"{key}_{budget}_mean"]
                point[f"{key}_{budget}"] = cost
                point[f"vanilla_fid_at_{key}_{budget}"] = vanilla_fid_at(vanilla, cost, key)
        points.append(point)
    return points


def equal_compute(final, curves):
    """Self-Transcendence (teacher charged and amortised) against vanilla run for steps + stage 1 steps: Welch's
    t-test on the seeds' FIDs at their last evaluations."""
    st, van = final.get("self_transcendence"), final.get("vanilla_charged")
    if st is None or van is None:
        return {"verdict": "not yet run"}
    test = judged(S.compare(fids_at(curves, "self_transcendence", st["step"]),
                            fids_at(curves, "vanilla_charged", van["step"])))
    word = test.pop("verdict")
    return {"st_fid": st["fid_mean"], "st_fid_std": st["fid_std"], "vanilla_fid": van["fid_mean"],
            "vanilla_fid_std": van["fid_std"], "st_flops_charged": st["flops_charged_mean"],
            "st_flops_amortised": st["flops_amortised_mean"], "vanilla_flops": van["flops_mean"],
            "st_seconds_charged": st["seconds_charged_mean"], "vanilla_seconds": van["seconds_mean"], **test,
            "verdict": f"Self-Transcendence (teacher charged) beats vanilla at equal steps+stage 1: {word}"}


def curves_markdown(summary):
    """Feature-FID (mean ± std over the seeds every one has reached) of each row at every evaluated step."""
    steps = sorted({r["step"] for rows in summary.values() for r in rows})
    if not steps:
        return []
    lines = ["", "## Curves (feature-FID at each evaluated step; vanilla_charged is vanilla run on to steps + stage 1)",
             "", "| row | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for view, rows in summary.items():
        at = {r["step"]: r for r in rows}
        cells = [fmt(at[s], digits=1).replace(" (1 seed)", "") if s in at else "" for s in steps]
        seeds = min((r["seeds"] for r in rows), default=0)
        lines.append(f"| {view} ({seeds} seed{'s' * (seeds != 1)}) | " + " | ".join(cells) + " |")
    return lines


def test_cells(test):
    """'difference [95 % CI] | p | verdict' of a judged() test (the p-value in its own column)."""
    ci = f" [{test['ci95'][0]:+.2f}, {test['ci95'][1]:+.2f}]" if test["ci95"] else ""
    p = "" if test["p_value"] is None else f"{test['p_value']:.2g}"
    return f"{test['fid_difference']:+.2f}{ci} | {p} | {test['verdict'].split(' (p=')[0]}"


def report_markdown(args, result, sources, rows, final, mid, losses):
    flat, equal, trends, summary = result["convergence"], result["equal_compute"], result["trends"], result["summary"]
    merged = result["runs_merged"]
    lines = [f"# Evidence benchmark ({'smoke' if args.smoke else 'quick' if args.quick else 'full'})", "",
             f"Budget {args.steps} steps (stage 1 {args.stage1_steps}, guide stop {args.guide_stop_step}), batch "
             f"{args.batch_size}, lr {args.learning_rate:g}, EMA {args.ema_decay:.5f}, evaluations every "
             f"{args.eval_every} steps; feature-FID of {args.samples_per_class} samples/class (Euler "
             f"{args.sampling_steps}, no CFG). Data: {sources['data']}; VAE {sources['vae']}"
             + (f" (held-out PSNR {result['vae']['held_out_psnr']:.1f} dB)" if result["vae"] else "") + ".",
             "", *([f"{len(merged['runs'])} of the runs finished in {merged['from']} (not here) and are reported "
                    "from its results.json and loss_curves.json (--merge_results).", ""] if merged["runs"] else []),
             f"Spread: mean ± sample std (ddof 1) over seeds. Tests: {S.TEST}.", "",
             f"Convergence: the last {FLAT_TAIL_FRACTION:.0%} of vanilla's curve is **{flat['verdict']}**"
             + (f" (FID moved {flat['fid_change']:.2f} from step {flat['from_step']} to {flat['to_step']}; Welch's "
                f"t-test between the seeds' FIDs at the two steps, p={flat['test']['p_value']:.2g}: flat unless "
                "p < 0.05)." if flat.get("test", {}).get("p_value") is not None else "."), "",
             "## Equal compute", ""]
    if "st_fid" in equal:
        lines += [f"Vanilla for {run_length(args, 'vanilla')} steps: FID {fmt(final['vanilla_charged'])}, "
                  f"{equal['vanilla_flops']:.3g} FLOPs, {equal['vanilla_seconds']:.0f} s. "
                  f"Self-Transcendence: FID {fmt(final['self_transcendence'])}, {equal['st_flops_charged']:.3g} "
                  f"FLOPs / {equal['st_seconds_charged']:.0f} s with its teacher charged, "
                  f"{equal['st_flops_amortised']:.3g} FLOPs amortised. {equal['verdict'].split(' (p=')[0]} (difference "
                  f"{equal['fid_difference']:+.2f}" + (f", 95 % CI [{equal['ci95'][0]:+.2f}, {equal['ci95'][1]:+.2f}]"
                                                      f", Welch p={equal['p_value']:.2g}" if equal["ci95"] else "")
                  + ").", ""]
    else:
        lines += ["Not yet run.", ""]
    if equal.get("along_curve"):
        show = lambda v: "beyond vanilla's run" if v is None else f"{v:.1f}"  # noqa: E731
        lines += ["Along the run (vanilla's FID at the same cost, linearly interpolated between its evaluations):", "",
                  "| ST step | ST FID | FLOPs, teacher charged | vanilla FID there | FLOPs, teacher amortised | "
                  "vanilla FID there | seconds, teacher charged | vanilla FID there |", "|---|---|---|---|---|---|---|---|"]
        for q in equal["along_curve"]:
            lines.append(f"| {q['step']} | {q['st_fid']:.1f} | {q['flops_charged']:.3g} | "
                         f"{show(q['vanilla_fid_at_flops_charged'])} | {q['flops_amortised']:.3g} | "
                         f"{show(q['vanilla_fid_at_flops_amortised'])} | {q['seconds_charged']:.0f} | "
                         f"{show(q['vanilla_fid_at_seconds_charged'])} |")
        lines.append("")
    lines += ["## Rows (feature-FID at mid-run and at the end; paper: SiT-B/2 FID-10K at 80 epochs)", "",
              f"| row | group | feature-FID at {args.mid_step} | feature-FID at {args.steps} | class accuracy at "
              f"{args.steps} | seeds | train s (+ teacher) | paper FID |", "|---|---|---|---|---|---|---|---|"]
    views = list(args.rows) + (["vanilla_charged"] if "vanilla" in args.rows else [])
    for view in views:
        source, paper = ("vanilla", ("Table 4, longer", None)) if view == "vanilla_charged" else (view, PAPER_FID[view])
        paper_text = f"{paper[1]:.2f} ({paper[0]})" if paper[1] is not None else paper[0]
        group = "equal compute" if view == "vanilla_charged" else rows[source]["group"]
        if view not in final:
            lines.append(f"| {view} | {group} | not yet run | | | | | {paper_text} |")
            continue
        r = final[view]
        secs = f"{r['seconds_mean']:.0f}" + (f" (+{r['seconds_charged_mean'] - r['seconds_mean']:.0f})"
                                               if "seconds_charged_mean" in r else "")
        at_mid = fmt(mid[view]) if view in mid else ""
        lines.append(f"| {view} | {group} | {at_mid} | {fmt(r)} | {fmt(r, 'accuracy')} | {r['seeds']} | {secs} | "
                     f"{paper_text} |")
    lines += curves_markdown(summary)
    lines += losses_markdown(losses)
    lines += ["", f"## Trends (test: {S.TEST})", "",
              f"Judged at step {args.mid_step} (mid-run, curves still falling) and at step {args.steps} (the end). "
              "Difference: mean FID of the worse row - the better one, with its 95 % confidence interval (Welch).",
              "",
              "| trend | at mid-run: difference (worse - better) [95 % CI] | p | verdict | at the end: difference "
              "[95 % CI] | p | verdict |", "|---|---|---|---|---|---|---|"]
    for t in trends:
        cells = [test_cells(t[k]) if k in t else f" | | {t['verdict']}" for k in ("mid", "end")]
        lines.append(f"| {t['trend']} | {cells[0]} | {cells[1]} |")
    if result["loss_match"]:
        lm = result["loss_match"]
        lines += ["", f"Loss-matched w = 1: initial guide loss {lm['loss_w1']:.4g} (w = 1) vs {lm['loss_w30']:.4g} "
                      f"(w = 30), mean of {lm['batches']} first batches at lr 0, seed {lm['seed']}; lambda = "
                      f"{DEFAULT_LAMBDA} x {lm['loss_w30']:.4g} / {lm['loss_w1']:.4g} = {lm['lambda']:.4g}."]
    flops = json.dumps({k: f"{v:.3g}" for k, v in result["flops_per_image"].items()})
    lines += ["", f"FLOPs per training image: {flops} "
                  "(benchmarks/flops.py: 3 x forward of trained modules, the guiding model's forward to its block "
                  "twice per image in the guided phase).",
              "", "A CPU-scale result says whether the mechanisms behave as the paper reports on a tiny SiT and a tiny "
                  "dataset; it does not predict ImageNet FIDs, the size of the gains at SiT-B/XL scale, or behaviour "
                  "at 400K steps.", ""]
    return "\n".join(lines)


def fid_band(ax, xs, rows, label, color, marker="o", **style):
    """A row's mean FID over seeds at xs, with a ± sample std band (none for one seed)."""
    mean = np.array([r["fid_mean"] for r in rows])
    std = np.array([r["fid_std"] or 0.0 for r in rows])
    ax.plot(xs, mean, marker=marker, label=label, color=color, **style)
    ax.fill_between(xs, mean - std, mean + std, alpha=0.15, color=color)


def plot(args, rows, summary, loss_curves, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {}  # one colour per row on every panel (Self-Transcendence's two costs differ by line style)

    def band(ax, xs, points, label, **style):
        fid_band(ax, xs, points, label, colors.setdefault(label.split(" ")[0], f"C{len(colors)}"), **style)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for view, series in summary.items():
        if not series or view not in ("vanilla_charged", "vae_align", "self_transcendence"):
            continue
        band(axes[0], [r["step"] for r in series], series, view)
        if view == "self_transcendence":
            for i, kind in ((1, "flops"), (2, "seconds")):
                band(axes[i], [r[f"{kind}_charged_mean"] for r in series], series,
                     "self_transcendence (teacher charged)", linewidth=2.5)
                band(axes[i], [r[f"{kind}_amortised_mean"] for r in series], series,
                     "self_transcendence (teacher amortised)", linestyle="--")
        else:
            band(axes[1], [r["flops_mean"] for r in series], series, view)
            band(axes[2], [r["seconds_mean"] for r in series], series, view)
    for ax, label in zip(axes, ("training steps", "training FLOPs", "training seconds (measured)")):
        ax.set_xlabel(label)
        ax.set_ylabel("feature-FID (lower is better, log scale)")
        ax.set_yscale("log")  # the curves fall ~20x; the converged tail differs by a few units
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:  # partial results before the first run: no rows yet
            ax.legend(fontsize=7)
    fig.suptitle("Equal compute: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(out / "equal_compute.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, by_seed in loss_curves.items():
        length = min(len(v) for v in by_seed.values())
        steps = [s for s, _ in next(iter(by_seed.values()))[:length]]
        loss = np.mean([[v for _, v in series[:length]] for series in by_seed.values()], axis=0)
        window = max(1, length // 50)  # a moving average over 2 % of the run, to read the trend
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=name, linewidth=2.0 if name == "self_transcendence" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss (loss_diff, mean over seeds, moving average)")
    ax.grid(alpha=0.3)
    if loss_curves:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)

    # The ablations: one panel per group, each row against the full row and vanilla (mean ± std over seeds)
    groups = ("table4", "guidance scale", "layers", "teacher age", "lambda")
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.2), sharey=True)
    for ax, group in zip(axes, groups):
        names = [n for n in ("vanilla", "self_transcendence", RERUN_ROW) if summary.get(n)]
        names += [n for n in rows if rows[n]["group"] == group and n not in names and summary.get(n)]
        for i, name in enumerate(names):
            series = summary[name]
            color, style = (("0.5", {"linestyle": "--"}) if name == "vanilla" else
                            ("k", {"linewidth": 2.0}) if name == "self_transcendence" else
                            ("k", {"linestyle": ":"}) if name == RERUN_ROW else (f"C{i}", {}))
            fid_band(ax, [r["step"] for r in series], series, f"{name} ({series[0]['seeds']} seeds)", color,
                     marker=".", **style)
        ax.set_title(group)
        ax.set_xlabel("training steps")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if names:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not yet run", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel("feature-FID (lower is better, log scale)")
    fig.suptitle("Ablations at CPU scale, mean ± std over seeds (full row: w 30, lambda 0.5, 8->6, teacher 100 %)")
    fig.tight_layout()
    fig.savefig(out / "ablations.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------
def prepare_data(args, out: Path, events: Path):
    """The data folder, a VAE for it (trained when the folder is the user's and no VAE is given), latents, real images
    and the evaluation classifier."""
    import preprocess_latents
    from diffusers import AutoencoderKL

    from diffusers_selftrans import evaluation as E

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from convergence import load_folder_images

    data_dir = args.train_data_dir or str(quickstart_assets.write_digits_imagefolder(out / "data" / "digits",
                                                                                       args.resolution))
    vae, vae_metrics = args.vae_name_or_path, None
    if vae is None and args.train_data_dir is None:
        vae = str(quickstart_assets.DEFAULT_VAE_PATH)
    elif vae is None:
        vae = str(out / "vae")
        if not (Path(vae) / quickstart_assets.VAE_METRICS_FILE).exists():
            print(f"[evidence] train a VAE on {data_dir}", flush=True)
            argv = [sys.executable, str(ROOT / "examples" / "quickstart_assets.py"), "train-vae", "--train_data_dir",
                    data_dir, "--resolution", str(args.resolution), "--steps", str(args.vae_steps), "--output_dir", vae]
            subprocess.run(argv, check=True, env=child_env(), cwd=str(ROOT), stdout=subprocess.DEVNULL)
        vae_metrics = json.loads((Path(vae) / quickstart_assets.VAE_METRICS_FILE).read_text())
    latents = out / "data" / "latents"
    if not (latents / "stats.json").exists():
        preprocess_latents.main(preprocess_latents.parse_args([
            "--train_data_dir", data_dir, "--resolution", str(args.resolution), "--vae_name_or_path", vae,
            "--output_dir", str(latents), "--batch_size", "256"]))
    real, real_labels, num_classes = load_folder_images(data_dir, args.resolution, args.max_real)
    classifier = E.train_feature_classifier(real, real_labels, num_classes=num_classes, seed=0,
                                            cache_dir=str(out / "eval_cache"), input_size=args.resolution)
    return {"out": out, "data_dir": data_dir, "vae": vae, "vae_metrics": vae_metrics, "latents": str(latents),
            "vae_model": AutoencoderKL.from_pretrained(vae).eval(), "real": real, "real_labels": real_labels,
            "num_classes": num_classes, "classifier": classifier, "evals": {}, "loss_match": None}


def load_merged(args, ctx, rows):
    """ctx["previous"] (--merge_results's results.json and loss_curves.json) and ctx["merged"]: the (row, seed) runs
    finished there and not here, which are reported from it."""
    ctx["previous"], ctx["merged"] = None, set()
    if not args.merge_results:
        return
    folder = Path(args.merge_results)
    previous = {"results": json.loads((folder / "results.json").read_text()),
                "loss_curves": json.loads((folder / "loss_curves.json").read_text())}
    there = previous["results"]["flops_per_image"]["vanilla"]
    if not math.isclose(there, ctx["flops"]["vanilla"]):
        raise ValueError(f"--merge_results {folder} trained another model ({there:.4g} FLOPs per image, here "
                         f"{ctx['flops']['vanilla']:.4g}): its runs cannot be reported beside these.")
    finished = {(r.rsplit("/seed", 1)[0], int(r.rsplit("/seed", 1)[1])) for r in previous["results"]["runs_finished"]}
    ctx["previous"] = previous
    ctx["merged"] = {(name, seed) for name, seed in finished
                     if name in args.rows and seed in row_seeds(args, rows[name])
                     and not (run_folder(ctx["out"], name, seed) / "model_index.json").exists()}
    if any(name == "w1_loss_matched" for name, _ in ctx["merged"]):  # its lambda (a local run's probes redo it)
        ctx["loss_match"] = previous["results"]["loss_match"]


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    if args.rederive:
        return rederive(args.rederive)
    from diffusers_selftrans import training as T

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    events = out / "runs_log.jsonl"  # one line per training that ran in this or an earlier invocation
    ctx = prepare_data(args, out, events)
    rows = all_rows()
    # The student's config, resolved as the scripts resolve it (latent size and classes from the VAE and the data)
    vae_cfg = ctx["vae_model"]
    config = T.model_config(args.model, sample_size=T.vae_latent_size(vae_cfg, args.resolution),
                            in_channels=vae_cfg.config.latent_channels, num_classes=ctx["num_classes"],
                            qk_norm=True, class_dropout_prob=0.1)  # the scripts' defaults; no FLOPs either way
    depth = config["num_layers"]
    ctx["flops"] = {"vanilla": F.method_flops_per_image("vanilla", config),
                    "vae_align": F.method_flops_per_image("vae_align", config, projector_dim=args.projector_dim)}
    for name in args.rows:
        if rows[name]["kind"] == "st":
            ctx["flops"][name] = F.method_flops_per_image(
                "self_transcendence", config, projector_dim=args.projector_dim, teacher_config=config,
                guiding_layer=scaled_layer(rows[name]["layers"][0], depth))
    load_merged(args, ctx, rows)

    # Order: the shared teacher(s) first, then each row's seeds; results are rewritten after every run. A run taken
    # from --merge_results is not trained, unless it is the teacher of a run that is.
    runs = [(name, seed) for name in args.rows for seed in row_seeds(args, rows[name])]
    needed_kinds = {rows[n]["teacher"][0] for n, s in runs if rows[n]["kind"] == "st" and (n, s) not in ctx["merged"]}
    order = [(k, TEACHER_SEED) for k in ("vae_align", "vanilla") if k in needed_kinds]
    order += [run for run in runs if run not in order and run not in ctx["merged"]]
    for name, seed in order:
        row = rows[name]
        folder = run_folder(out, name, seed)
        if args.report_only and not (folder / "model_index.json").exists():
            continue
        if row["kind"] in ("vanilla", "vae_align"):
            length = run_length(args, row["kind"])
            method = "none" if row["kind"] == "vanilla" else "vae_align"
            run_training("train_align.py", common_flags(args, ctx, seed, length, args.eval_every)
                         + ["--alignment", method], folder, events)
        else:
            lam = row["lam"]
            if lam == "matched":
                loss_w1, n1 = probe_initial_guide_loss(args, ctx, row, TEACHER_SEED, depth, 1.0, events)
                loss_w30, n30 = probe_initial_guide_loss(args, ctx, row, TEACHER_SEED, depth, DEFAULT_W, events)
                lam = DEFAULT_LAMBDA * loss_w30 / loss_w1
                ctx["loss_match"] = {"loss_w1": loss_w1, "loss_w30": loss_w30, "batches": min(n1, n30),
                                     "seed": TEACHER_SEED, "lambda": lam}
            run_training("train_self_transcendence.py", st_flags(args, ctx, row, seed, depth, lam), folder, events)
        if name in args.rows:
            max_step = run_length(args, "vanilla") if name == "vanilla" else args.steps
            ctx["evals"][(name, seed)] = evaluate_run(folder, args, ctx, max_step)
            ctx["merged"].discard((name, seed))  # a merged teacher trained here again is reported from here
        write_results(args, ctx, rows)  # partial results after every run
    result = write_results(args, ctx, rows)
    print((out / "results.md").read_text())
    return result


if __name__ == "__main__":
    main()

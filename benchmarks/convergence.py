#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Convergence benchmark: does Self-Transcendence reach a given quality in fewer steps / seconds than the baselines?

Trains, on the same data, model size, seeds and step budget, with the project's own training scripts:
  vanilla (`--alignment none`), VAE-align only (= the stage-1 guiding model), Self-Transcendence (stage 2 on that
  guiding model; its whole stage-1 cost is added to its wall-clock), SRA, LayerSync, dispersive loss, and REPA when
  `--repa_encoder` names a local `transformers` encoder.
Every `--eval_every` steps the EMA weights of the checkpoint are sampled (class-balanced, seeded, Euler, no CFG) and
scored with a feature-FID whose features come from a small classifier trained on the real images (seeded, cached),
and with that classifier's accuracy on the intended classes. Several seeds give a mean and a spread (the sample std)
and a Welch t-test of Self-Transcendence against every other method, and of every method against vanilla, at every
evaluated step (benchmarks/stats.py).

Writes to `--output_dir`: `curves.json` (every point of every run, the summary and the tests), `results.md` (the
table at the last step and the tests) and `convergence.png` (FID against steps and against training seconds).

    python benchmarks/convergence.py --output_dir bench_out                       # digits, 3 seeds
    python benchmarks/convergence.py --train_data_dir ./my_folders --vae_name_or_path my-vae --resolution 64 ...
    python benchmarks/convergence.py --smoke --output_dir /tmp/smoke              # seconds; the test suite runs this
    python benchmarks/convergence.py --rederive benchmarks/results/convergence    # statistics again, no training
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import preprocess_latents  # noqa: E402
import quickstart_assets  # noqa: E402
import train_align  # noqa: E402
import train_self_transcendence  # noqa: E402
import stats as S  # noqa: E402

METHODS = ("vanilla", "vae_align", "self_transcendence", "sra", "layersync", "dispersive", "repa")
# The vanilla run is `--alignment none`; the VAE-align run is the stage-1 guiding model itself.
ALIGNMENT_FLAG = {"vanilla": "none", "vae_align": "vae_align", "sra": "sra", "layersync": "layersync",
                  "dispersive": "dispersive", "repa": "repa"}
# A short run needs a short EMA: with the ImageNet decay 0.9999, 600 steps leave ~94 % of the initial weights.
SHORT_RUN_EMA_DECAY = 0.99
# REPA's lr 1e-4 is tuned for SiT-B+ at batch 256 over 400K steps; a depth-6 / width-128 SiT trained for a few hundred
# steps barely learns its class embedding at that rate (measured here: loss 0.43 after 300 steps vs 0.35 at 1e-3).
TINY_LEARNING_RATE = 1e-3
# Results are committed from whichever machine ran them, so they record no folder of that machine (see recorded_path).
# The settings that hold paths, in this benchmark, convergence_t2i.py and evidence.py:
PATH_SETTINGS = ("output_dir", "train_data_dir", "vae_name_or_path", "model", "repa_encoder", "merge_results")
OUTPUT_DIR_PLACEHOLDER = "OUTPUT_DIR"


def recorded_path(path, output_dir):
    """`path` as a results file records it: relative to `output_dir` when inside it (run folders, the data written
    there), `OUTPUT_DIR` for the output folder itself, relative to the repository when inside it
    (`examples/assets/digits-vae`), `.../<name>` anywhere else on the machine. What is no local path (None, a Hub id,
    a preset name such as `SiT-B/2`, a dict) is returned unchanged."""
    if not isinstance(path, (str, os.PathLike)) or not (os.path.isabs(path) or os.path.exists(path)):
        return path
    path, out = Path(path).resolve(), Path(output_dir).resolve()
    if path == out:
        return OUTPUT_DIR_PLACEHOLDER
    for base in (out, ROOT):
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    return f".../{path.name}"


def recorded_settings(args, output_dir):
    """The parsed flags as the results record them: every path setting through `recorded_path`."""
    return {k: recorded_path(v, output_dir) if k in PATH_SETTINGS else v for k, v in vars(args).items()}


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", type=str, default=None, help="Required unless --rederive.")
    p.add_argument("--rederive", type=str, default=None, metavar="FOLDER",
                   help="Train nothing: recompute the summary, comparisons, results.md and plot of FOLDER from its "
                        "curves.json (e.g. benchmarks/results/convergence) and rewrite them there.")
    p.add_argument("--train_data_dir", type=str, default=None,
                   help="Image class folders (default: scikit-learn's digits, written to OUTPUT_DIR/data).")
    p.add_argument("--vae_name_or_path", type=str, default=str(quickstart_assets.DEFAULT_VAE_PATH))
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--model", type=str, default=str(ROOT / "examples" / "configs" / "sit-tiny.json"))
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "repa"], choices=METHODS)
    p.add_argument("--repa_encoder", type=str, default=None, help="A local transformers encoder; adds REPA.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="Steps of every run (and of the stage-1 guiding model).")
    p.add_argument("--guide_stop_step", type=int, default=None, help="Default: a quarter of --steps (paper 20/80).")
    p.add_argument("--eval_every", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--ema_decay", type=float, default=SHORT_RUN_EMA_DECAY)
    p.add_argument("--learning_rate", type=float, default=TINY_LEARNING_RATE)
    p.add_argument("--projector_dim", type=int, default=512,
                   help="Alignment MLP width. The paper's 2048 is for D=768-1152; at D=128 it would cost more than "
                        "the SiT itself, so the default here scales it down (4 D).")
    p.add_argument("--samples_per_class", type=int, default=30)
    p.add_argument("--sampling_steps", type=int, default=25)
    p.add_argument("--max_real", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="A tiny model, a few steps, one seed: checks the plumbing.")
    args = p.parse_args(input_args)
    if args.rederive:
        return args
    if args.output_dir is None:
        p.error("--output_dir is required (or --rederive FOLDER).")
    if args.repa_encoder and "repa" not in args.methods:
        args.methods.append("repa")
    if "repa" in args.methods and not args.repa_encoder:
        p.error("repa needs --repa_encoder (a local folder: no downloads here).")
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.batch_size = args.seeds[:1], 4, 2, 8
        args.samples_per_class, args.sampling_steps, args.max_real = 2, 2, args.max_real or 200
        smoke_model = Path(args.output_dir) / "smoke_model.json"
        smoke_model.parent.mkdir(parents=True, exist_ok=True)
        smoke_model.write_text(json.dumps({"patch_size": 2, "num_layers": 4, "num_attention_heads": 2,
                                           "attention_head_dim": 16}))
        args.model = str(smoke_model)
    return args


def load_folder_images(root: str, resolution: int, limit=None):
    """Real images of an image-class folder as uint8 (N, R, R, 3) with labels, through the training preprocessing."""
    from diffusers_selftrans.data import preprocess_image

    classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((Path(root) / name).iterdir()):
            x = preprocess_image(str(path), resolution)  # (3, R, R) in [-1, 1], ADM crop
            images.append(((x.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8))
            labels.append(label)
    order = np.random.RandomState(0).permutation(len(images))[:limit]
    return np.stack(images)[order], np.array(labels)[order], len(classes)


def train_run(module, argv):
    module.main(module.parse_args(argv + ["--no-progress"]))


def read_log(folder: Path):
    rows = {}
    for line in (folder / "loss_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def evaluate_checkpoints(folder: Path, args, vae, real, real_labels, classifier, num_classes, extra_seconds=0.0):
    """Score the EMA weights of every checkpoint of a run: [{step, train_seconds, fid, accuracy}]."""
    from diffusers_selftrans import evaluation as E
    from diffusers_selftrans import checkpointing as C
    from diffusers_selftrans import training as T

    log = read_log(folder)
    points = []
    for ckpt in C.list_checkpoints(folder):
        step = C.checkpoint_step(ckpt)
        model = T.load_transformer(str(ckpt / "transformer_ema"))
        pipe = T.build_pipeline(model, vae)
        pipe.set_progress_bar_config(disable=True)
        out = folder / "eval_samples" / f"step-{step}"
        plan = E.class_balanced_plan(args.samples_per_class * num_classes, num_classes, seed=1234)
        E.generate_samples(pipe, plan, str(out), batch_size=256, num_inference_steps=args.sampling_steps,
                           progress=False)
        images = E.load_images(str(out))
        labels = np.array([p.class_label for p in sorted(plan, key=lambda p: p.index)])
        metrics = E.evaluate_samples(real, real_labels, images, labels, classifier)
        points.append({"step": step, "train_seconds": log[step]["train_seconds"] + extra_seconds,
                       "fid": metrics["fid"], "accuracy": metrics["accuracy"]})
    return points


def summarize(curves, methods):
    """Mean and sample std (ddof 1; None for one seed) over seeds at every evaluated step."""
    summary = {}
    for method in methods:
        runs = [curves[method][s] for s in sorted(curves[method])]
        steps = [p["step"] for p in runs[0]]
        rows = []
        for i, step in enumerate(steps):
            fid_mean, fid_std = S.mean_std([r[i]["fid"] for r in runs])
            acc_mean, acc_std = S.mean_std([r[i]["accuracy"] for r in runs])
            rows.append({"step": step, "fid_mean": fid_mean, "fid_std": fid_std, "accuracy_mean": acc_mean,
                         "accuracy_std": acc_std,
                         "train_seconds_mean": float(np.mean([r[i]["train_seconds"] for r in runs])),
                         "seeds": len(runs)})
        summary[method] = rows
    return summary


def comparison_pairs(methods):
    """(better, worse) pairs judged: Self-Transcendence against every other method, every other method against
    vanilla."""
    st = "self_transcendence"
    pairs = [(st, m) for m in methods if st in methods and m != st]
    return pairs + [(m, "vanilla") for m in methods if "vanilla" in methods and m not in (st, "vanilla")]


def compare_curves(curves, methods):
    """Every pair of comparison_pairs at every step both have evaluated: the seeds' FIDs through stats.compare
    (Welch's t-test)."""
    results = []
    for better, worse in comparison_pairs(methods):
        fid = {m: [{p["step"]: p["fid"] for p in curves[m][s]} for s in sorted(curves[m])] for m in (better, worse)}
        steps = sorted(set.intersection(*[set(d) for m in fid for d in fid[m]]))
        for step in steps:
            test = S.compare([d[step] for d in fid[better]], [d[step] for d in fid[worse]])
            results.append({"better": better, "worse": worse, "step": step, **test})
    return results


def write_report(summary, args, out: Path, comparisons=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, rows in summary.items():
        x_steps = [r["step"] for r in rows]
        x_secs = [r["train_seconds_mean"] for r in rows]
        mean = np.array([r["fid_mean"] for r in rows])
        std = np.array([r["fid_std"] or 0.0 for r in rows])  # one seed: no band
        style = {"linewidth": 2.5} if method == "self_transcendence" else {"linewidth": 1.2}
        for ax, x in ((axes[0], x_steps), (axes[1], x_secs)):
            ax.plot(x, mean, marker="o", label=method, **style)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    axes[0].set_xlabel("training steps (Self-Transcendence: stage-2 steps)")
    axes[1].set_xlabel("training seconds (Self-Transcendence: + its whole stage 1)")
    for ax in axes:
        ax.set_ylabel("feature-FID (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{len(args.seeds)} seed(s), mean ± sample std, {args.samples_per_class} samples/class, "
                 f"Euler {args.sampling_steps} steps, no CFG")
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)
    plt.close(fig)

    lines = [f"Step budget {args.steps}, batch {args.batch_size}, seeds {args.seeds}, EMA decay {args.ema_decay}; "
             f"feature-FID of {args.samples_per_class} samples/class (Euler {args.sampling_steps}, no CFG). "
             "Mean ± sample std (ddof 1) over seeds.", "",
             "| method | feature-FID at last step | class accuracy | FID at first eval | train seconds |",
             "|---|---|---|---|---|"]
    ranked = sorted(summary.items(), key=lambda kv: kv[1][-1]["fid_mean"])
    for method, rows in ranked:
        last, first = rows[-1], rows[0]
        lines.append(f"| {method} | {S.fmt(last['fid_mean'], last['fid_std'])} | "
                     f"{S.fmt(last['accuracy_mean'], last['accuracy_std'], 3)} | {first['fid_mean']:.2f} | "
                     f"{last['train_seconds_mean']:.0f} |")
    if comparisons:
        steps = sorted({c["step"] for c in comparisons})
        pairs = list(dict.fromkeys((c["better"], c["worse"]) for c in comparisons))
        at = {(c["better"], c["worse"], c["step"]): c for c in comparisons}
        lines += ["", f"## Comparisons (test: {S.TEST})", "",
                  "Each cell: FID difference (worse - better) [95 % confidence interval], p-value: verdict.", "",
                  "| better | worse | " + " | ".join(f"at step {s}" for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for better, worse in pairs:
            cells = [f"{S.fmt_test(c)}: {c['verdict'].split(' (')[0]}" if (c := at.get((better, worse, s))) else ""
                     for s in steps]
            lines.append(f"| {better} | {worse} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def write_results(out: Path, args, settings, curves, benchmark_seconds, machine):
    """curves.json (the per-seed curves, their summary and the comparisons), results.md and convergence.png."""
    methods = list(curves)
    summary = summarize(curves, methods)
    comparisons = compare_curves(curves, methods)
    result = {"settings": settings, "curves": curves, "summary": summary, "statistics": S.TEST,
              "comparisons": comparisons, "benchmark_seconds": benchmark_seconds, "machine": machine}
    (out / "curves.json").write_text(json.dumps(result, indent=2, default=str))
    table = write_report(summary, args, out, comparisons)
    return result, table


def read_curves(folder: Path):
    """A finished benchmark's curves.json and its per-seed curves {method: {seed (int): points}}."""
    saved = json.loads((Path(folder) / "curves.json").read_text())
    return saved, {m: {int(seed): points for seed, points in by_seed.items()} for m, by_seed in saved["curves"].items()}


def rederive(folder):
    """Recompute the summary, the comparisons, results.md and the plot of a finished benchmark from its curves.json
    (the per-seed points measured then; nothing is trained or scored) and rewrite them in `folder`."""
    folder = Path(folder)
    saved, curves = read_curves(folder)
    args = argparse.Namespace(**saved["settings"])
    result, table = write_results(folder, args, saved["settings"], curves, saved["benchmark_seconds"],
                                  saved["machine"])
    print(table)
    return result


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    if args.rederive:
        return rederive(args.rederive)
    from diffusers import AutoencoderKL

    from diffusers_selftrans import evaluation as E

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # Data: image folders (default digits), encoded once to latents for every run but REPA (which needs pixels)
    data_dir = args.train_data_dir or str(quickstart_assets.write_digits_imagefolder(out / "data" / "digits",
                                                                                       args.resolution))
    latents = out / "data" / "latents"
    if not (latents / "stats.json").exists():
        preprocess_latents.main(preprocess_latents.parse_args([
            "--train_data_dir", data_dir, "--resolution", str(args.resolution), "--vae_name_or_path",
            args.vae_name_or_path, "--output_dir", str(latents), "--batch_size", "256"]))
    real, real_labels, num_classes = load_folder_images(data_dir, args.resolution, args.max_real)
    classifier = E.train_feature_classifier(real, real_labels, num_classes=num_classes, seed=0,
                                            cache_dir=str(out / "eval_cache"), input_size=args.resolution)
    vae = AutoencoderKL.from_pretrained(args.vae_name_or_path).eval()
    stop = args.guide_stop_step or max(1, args.steps // 4)

    curves = {m: {} for m in args.methods}
    for seed in args.seeds:
        common = ["--model", args.model, "--vae_name_or_path", args.vae_name_or_path, "--resolution",
                  str(args.resolution), "--train_batch_size", str(args.batch_size), "--seed", str(seed),
                  "--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.eval_every),
                  "--validation_steps", str(10 ** 9), "--report_to", "none", "--ema_decay", str(args.ema_decay),
                  "--logging_steps", str(args.eval_every), "--validation_num_inference_steps", str(args.sampling_steps),
                  "--validation_class_labels", *[str(c) for c in range(min(num_classes, 4))],
                  "--projector_dim", str(args.projector_dim), "--learning_rate", str(args.learning_rate)]
        latent_data = ["--latents_dir", str(latents)]
        runs = out / "runs" / f"seed{seed}"
        stage1 = runs / "vae_align"
        needs_stage1 = {"vae_align", "self_transcendence"} & set(args.methods)
        if needs_stage1 and not (stage1 / "model_index.json").exists():
            print(f"[seed {seed}] vae_align (stage 1)", flush=True)
            train_run(train_align, common + latent_data + ["--alignment", "vae_align", "--output_dir", str(stage1)])
        stage1_seconds = read_log(stage1)[args.steps]["train_seconds"] if needs_stage1 else 0.0
        for method in args.methods:
            folder = runs / method
            if not (folder / "model_index.json").exists():
                print(f"[seed {seed}] {method}", flush=True)
                if method == "self_transcendence":
                    train_run(train_self_transcendence, common + latent_data + [
                        "--guiding_model_name_or_path", str(stage1), "--guide_stop_step", str(stop),
                        # the committed results guided with the EMA (made before raw weights became the default)
                        "--guiding_weights", "ema", "--output_dir", str(folder)])
                elif method == "repa":
                    train_run(train_align, common + ["--train_data_dir", data_dir, "--alignment", "repa",
                                                     "--repa_encoder", args.repa_encoder, "--output_dir", str(folder)])
                else:
                    train_run(train_align, common + latent_data + ["--alignment", ALIGNMENT_FLAG[method],
                                                                   "--output_dir", str(folder)])
            extra = stage1_seconds if method == "self_transcendence" else 0.0
            curves[method][seed] = evaluate_checkpoints(folder, args, vae, real, real_labels, classifier,
                                                        num_classes, extra_seconds=extra)

    result, table = write_results(out, args, recorded_settings(args, out), curves,
                                  round(time.perf_counter() - start, 1), os.uname().machine)
    print(table)
    print(f"\nWrote {out / 'curves.json'}, {out / 'results.md'}, {out / 'convergence.png'}")
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Does Self-Transcendence help LoRA fine-tuning? (issue 28, item 5)

A tiny text-to-image model is pretrained here, then LoRA-fine-tuned to a new, harder target, with three methods:

- the base: a tiny SD3-style MM-DiT (`convergence_t2i.TINY_MMDIT`) trained from scratch (flow matching only) on the
  captioned upright digits of `benchmarks/convergence_t2i.py` ("a handwritten seven", ...), through
  `examples/train_self_transcendence_t2i.py`; one base for every method and seed.
- the target: the same digits mirrored left to right, each drawn bright (full intensity) or faint (half), captions
  naming both ("a faint mirrored seven", "mirrored digit 7, bright", ...): 20 classes (brightness x digit) that the
  base never saw, and caption words it never read. (The bundled digits VAE reconstructs mirrored and dimmed digits at
  > 37 dB; colours and textures it cannot: they would measure the VAE, not the fine-tune.)
- `plain_lora`: LoRA, flow-matching loss only (`--stage 1 --align_loss_weight 0 --lora_rank R`);
- `st_lora_base`: Self-Transcendence stage 2 with the pretrained base as the teacher (`--lora_teacher base`: the
  same module with its adapters off; no stage 1);
- `st_lora_adapter`: a stage-1 LoRA (VAE alignment) on the target first, then stage 2 guided by that adapter
  (`--lora_teacher adapter`), its stage 1 charged to its cost.

Every run starts from the same base with the same LoRA rank, learning rate and batch; the guide stops at a quarter of
the fine-tuning steps (as `convergence.py`). `plain_lora` runs twice as many steps, so that it can be compared at
equal steps (its checkpoint at the others' last step) and at equal compute (its FID interpolated at the training
seconds the guided runs spent, stage 1 included, on this machine with nothing else running). Every `--eval_every`
steps the adapter's EMA (from the checkpoint) on the base is sampled through `StableDiffusion3Pipeline` (prompts
balanced over the 20 classes, Euler, no CFG) and scored on the target: feature-FID of a small classifier trained on the
target's images, and caption accuracy (the classifier reads back the brightness and digit the prompt names). Step 0 is
the base itself. Mean and sample std over seeds; every verdict is Welch's t-test (benchmarks/stats.py).

Writes `curves.json`, `results.md` and `finetune.png` into `--output_dir`.

    python benchmarks/finetune_t2i.py                      # 3 seeds (benchmarks/results/finetune_t2i/)
    python benchmarks/finetune_t2i.py --smoke --output_dir /tmp/smoke    # seconds; the test suite runs this
    python benchmarks/finetune_t2i.py --rederive benchmarks/results/finetune_t2i   # statistics again, no training
"""

import argparse
import copy
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

import convergence_t2i as CT  # noqa: E402  (the captioned digits, the tiny SD3 pipeline, scoring)
import stats as S  # noqa: E402

# The target: mirrored digits at two brightnesses (multipliers of the white-on-black image), named in the caption.
STYLES = (("bright", 1.0), ("faint", 0.5))
# At most 29 characters (convergence_t2i's character-level token budget, TINY_CLIP_LENGTH, less start and end)
TARGET_TEMPLATES = ("a {style} mirrored {word}", "mirrored digit {digit}, {style}", "{style} mirrored {digit}",
                    "a mirrored {word}, {style}")
METHODS = ("plain_lora", "st_lora_base", "st_lora_adapter")
GUIDED = METHODS[1:]
RUNS = ("plain_lora", "st_lora_base", "stage1_adapter", "st_lora_adapter")  # in training order
# LoRA on the tiny MM-DiT (width 128): rank 16 on the default attention and feed-forward projections, alpha = rank.
LORA_RANK = 16
# Fine-tuning runs are short: a short warm-up (the pretraining's 5 % rule).
FINETUNE_WARMUP_STEPS = 10


def target_caption(style: int, label: int, index: int) -> str:
    template = TARGET_TEMPLATES[index % len(TARGET_TEMPLATES)]
    return template.format(style=STYLES[style][0], word=CT.NUMBER_WORDS[label], digit=label)


def class_of_target_caption(caption: str) -> int:
    """The target class a caption names: brightness index x 10 + digit; an error unless it names one of each."""
    words = caption.lower().replace(",", " ").split()
    styles = [i for i, (name, _) in enumerate(STYLES) if name in words]
    if len(styles) != 1:
        raise ValueError(f"Caption {caption!r} names {len(styles)} brightness words; expected exactly one.")
    return styles[0] * len(CT.NUMBER_WORDS) + CT.class_of_caption(caption)


def write_target_digits(root: Path, resolution: int) -> Path:
    """The target domain as an image-class folder `root/<class:02d>/<index:04d>.png` (class = brightness x 10 + digit,
    image i drawn with brightness i % 2, mirrored) plus `metadata.jsonl` (one caption naming both per image)."""
    import quickstart_assets
    from PIL import Image

    if (root / "metadata.jsonl").exists():
        return root
    images, labels = quickstart_assets.load_digit_images(resolution)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        style = i % len(STYLES)
        drawn = np.rint(image[:, ::-1].astype(np.float32) * STYLES[style][1]).astype(np.uint8)
        name = f"{style * len(CT.NUMBER_WORDS) + int(label):02d}/{i:04d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(drawn, mode="L").convert("RGB").save(root / name)
        rows.append(json.dumps({"file_name": name, "text": target_caption(style, int(label), i)}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def parse_args(input_args=None):
    import quickstart_assets

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", type=str, default=str(ROOT / "benchmarks" / "results" / "finetune_t2i"))
    p.add_argument("--rederive", type=str, default=None, metavar="FOLDER",
                   help="Train nothing: recompute the summary, tests, results.md and plot of FOLDER from its "
                        "curves.json and rewrite them there.")
    p.add_argument("--vae_name_or_path", type=str, default=str(quickstart_assets.DEFAULT_VAE_PATH))
    p.add_argument("--resolution", type=int, default=CT.DIGITS_RESOLUTION)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain_steps", type=int, default=900, help="Steps of the base (batch --pretrain_batch_size).")
    p.add_argument("--pretrain_batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=240,
                   help="Fine-tuning steps of the guided runs; plain_lora runs twice as many (equal compute).")
    p.add_argument("--stage1_steps", type=int, default=None, help="Stage-1 adapter steps (default: --steps / 2).")
    p.add_argument("--guide_stop_step", type=int, default=None, help="Default: a quarter of --steps.")
    p.add_argument("--eval_every", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lora_rank", type=int, default=LORA_RANK)
    p.add_argument("--ema_decay", type=float, default=CT.SHORT_RUN_EMA_DECAY)
    p.add_argument("--learning_rate", type=float, default=CT.TINY_LEARNING_RATE)
    p.add_argument("--projector_dim", type=int, default=512, help="Alignment MLP width (4 D, as convergence_t2i.py).")
    p.add_argument("--samples_per_class", type=int, default=10, help="Per target class (20 classes).")
    p.add_argument("--sampling_steps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="A tiny model, a few steps, one seed: checks the plumbing.")
    args = p.parse_args(input_args)
    args.model = dict(CT.TINY_MMDIT)
    if args.smoke:
        args.seeds, args.pretrain_steps, args.pretrain_batch_size = args.seeds[:1], 4, 8
        args.steps, args.eval_every, args.batch_size, args.lora_rank = 4, 2, 8, 2
        args.samples_per_class, args.sampling_steps, args.projector_dim = 1, 2, 16
        args.learning_rate = 1e-2  # four steps: an adapter that visibly moves
        args.model = dict(patch_size=2, num_layers=3, attention_head_dim=8, num_attention_heads=2)
    args.stage1_steps = args.stage1_steps or max(1, args.steps // 2)
    args.guide_stop_step = args.guide_stop_step or max(1, args.steps // 4)
    if args.steps % args.eval_every or args.stage1_steps % args.eval_every:
        p.error("--steps and --stage1_steps must be multiples of --eval_every (checkpoints at the last step).")
    return args


def common_flags(args, pipe_folder: Path, data_dir: Path, out: Path, seed: int, batch_size: int):
    return ["--pretrained_model_name_or_path", str(pipe_folder), "--train_data_dir", str(data_dir),
            "--cache_dir", str(out / "hf_cache"), "--resolution", str(args.resolution),
            "--train_batch_size", str(batch_size), "--seed", str(seed), "--checkpointing_steps", str(args.eval_every),
            "--validation_steps", str(10 ** 9), "--report_to", "none", "--ema_decay", str(args.ema_decay),
            "--learning_rate", str(args.learning_rate), "--projector_dim", str(args.projector_dim),
            "--max_sequence_length", str(CT.TINY_T5_LENGTH), "--logging_steps", str(args.eval_every),
            "--validation_num_inference_steps", str(args.sampling_steps), "--no-progress",
            "--precompute_text_embeddings",  # 80 distinct captions: encode each once
            "--dataloader_num_workers", "0",  # 1,797 tiny images: a worker restart per epoch costs more
            "--validation_prompts", target_caption(0, 7, 0), target_caption(1, 2, 0)]


def pretrain_base(args, out: Path) -> Path:
    """The tiny SD3 pipeline, its transformer trained from scratch on the upright captioned digits: `out/base`."""
    import train_self_transcendence_t2i as t2i
    from diffusers import AutoencoderKL

    base = out / "base"
    if (base / "model_index.json").exists():
        return base
    vae = AutoencoderKL.from_pretrained(args.vae_name_or_path)
    latent_side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    config = CT.tiny_transformer_config("sd3", latent_side, vae.config.latent_channels, args.model["num_layers"],
                                        args.model["attention_head_dim"], args.model["num_attention_heads"])
    CT.write_tiny_t2i_pipeline(out / "pipeline", "sd3", vae=vae, transformer_config=config)
    (out / "mmdit.json").write_text(json.dumps(config))
    digits = CT.write_captioned_digits(out / "data" / "digits", args.resolution)
    print(f"[base] {args.pretrain_steps} steps from scratch on upright digits", flush=True)
    t2i.main(common_flags(args, out / "pipeline", digits, out, 0, args.pretrain_batch_size)
             + ["--stage", "1", "--align_loss_weight", "0", "--transformer_config", str(out / "mmdit.json"),
                "--max_train_steps", str(args.pretrain_steps), "--lr_warmup_steps", str(CT.TINY_WARMUP_STEPS),
                "--checkpointing_steps", str(max(1, args.pretrain_steps // 3)), "--resume_from_checkpoint", "latest",
                "--output_dir", str(base)])
    return base


def run_flags(args, name: str, runs: Path):
    lora = ["--lora_rank", str(args.lora_rank), "--lr_warmup_steps", str(min(FINETUNE_WARMUP_STEPS, args.steps))]
    guided = ["--stage", "2", "--guide_stop_step", str(args.guide_stop_step), "--max_train_steps", str(args.steps)]
    return lora + {
        "plain_lora": ["--stage", "1", "--align_loss_weight", "0", "--max_train_steps", str(2 * args.steps)],
        "stage1_adapter": ["--stage", "1", "--max_train_steps", str(args.stage1_steps)],
        "st_lora_base": guided + ["--lora_teacher", "base"],
        "st_lora_adapter": guided + ["--lora_teacher", "adapter", "--guiding_model_name_or_path",
                                     str(runs / "stage1_adapter")],
    }[name]


def step_flops(args, common, name: str, runs: Path, work: Path):
    """Model FLOPs of one training step of a run kind, counted by `torch.utils.flop_counter.FlopCounterMode` on the
    script itself (benchmarks/flops.py's convention, the CPU attention kernel included): a 2-step run minus a 1-step run (everything else of the two runs is the same and cancels).
    Guided kinds are counted with their guide on."""
    import shutil

    import flops as F
    import train_self_transcendence_t2i as t2i
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    for steps in (1, 2):
        folder = work / f"{name}-{steps}"
        shutil.rmtree(folder, ignore_errors=True)
        flags = run_flags(args, name, runs) + ["--max_train_steps", str(steps), "--guide_stop_step", "10",
                                               "--checkpointing_steps", "10", "--output_dir", str(folder)]
        with FlopCounterMode(display=False, custom_mapping=F.CPU_ATTENTION_FLOPS) as counter:
            t2i.main(common + flags)
        totals.append(counter.get_total_flops())
        shutil.rmtree(folder)
    return totals[1] - totals[0]


def run_flops(flops, name: str, step: int, stop: int) -> float:
    """Training FLOPs of a run after `step` steps: guided steps until the guide stop, plain steps after it."""
    if name in GUIDED:
        return min(step, stop) * flops[name] + max(0, step - stop) * flops["plain_lora"]
    return step * flops[name]


def checkpoint_transformer(base_transformer, checkpoint: Path, rank: int):
    """The base transformer with a run's adapter at a checkpoint, its EMA weights (what the run exports at its end)."""
    from diffusers_selftrans import lora as L

    model = copy.deepcopy(base_transformer)
    L.add_lora(model, rank)
    params = L.adapter_parameters(model, "student")
    state = torch.load(checkpoint / L.LORA_EMA_CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    shadow = state["shadow_params"]
    if [s.shape for s in shadow] != [p.shape for p in params]:
        raise ValueError(f"{checkpoint} holds an adapter of another rank or layout than rank {rank}.")
    with torch.no_grad():
        for s, p in zip(shadow, params):
            p.copy_(s)
    return model.eval()


def evaluate(args, base: Path, folder, score, cost=None, extra=(0.0, 0.0)):
    """[{step, train_seconds, flops, fid, accuracy}]: the base itself (`folder` None: step 0) or the EMA adapter of
    every checkpoint of a run in `folder`, on the base, through StableDiffusion3Pipeline; `cost(step)` gives a point's
    FLOPs; `extra` (seconds, FLOPs: a stage 1) is added to every point's."""
    from diffusers import StableDiffusion3Pipeline

    from diffusers_selftrans import checkpointing as C

    pipe = StableDiffusion3Pipeline.from_pretrained(base)
    if folder is None:
        return [{"step": 0, "train_seconds": 0.0, "flops": 0.0, **score(pipe)}]
    log = {json.loads(line)["step"]: json.loads(line) for line in (folder / "loss_log.jsonl").read_text().splitlines()}
    base_transformer, points = pipe.transformer, []
    for ckpt in C.list_checkpoints(folder):
        step = C.checkpoint_step(ckpt)
        pipe.transformer = checkpoint_transformer(base_transformer, ckpt, args.lora_rank)
        points.append({"step": step, "train_seconds": log[step]["train_seconds"] + extra[0],
                       "flops": cost(step) + extra[1], **score(pipe)})
    return points


def interpolate(points, key, value, target="fid"):
    """`target` of a curve at `key` = value, linear between the two points around it (None outside the curve)."""
    xs, ys = [p[key] for p in points], [p[target] for p in points]
    if not xs[0] <= value <= xs[-1]:
        return None
    return float(np.interp(value, xs, ys))


def comparisons(curves, steps):
    """Every guided method against plain_lora (Welch's t-test on the seeds' FIDs): at equal steps (each of the guided
    run's evaluated steps), and at equal compute (plain_lora's FID interpolated at the training FLOPs the guided run had
    spent, its stage 1 included)."""
    rows = []
    for method in GUIDED:
        seeds = sorted(curves[method])
        for step in [p["step"] for p in curves[method][seeds[0]] if p["step"] > 0]:
            mine = [next(p for p in curves[method][s] if p["step"] == step) for s in seeds]
            plain_steps = [next(p for p in curves["plain_lora"][s] if p["step"] == step)["fid"] for s in seeds]
            plain_cost = [interpolate(curves["plain_lora"][s], "flops", m["flops"]) for s, m in zip(seeds, mine)]
            fids = [m["fid"] for m in mine]
            rows.append({"better": method, "worse": "plain_lora", "step": step, "at": "equal steps",
                         **S.compare(fids, plain_steps)})
            if None not in plain_cost:
                rows.append({"better": method, "worse": "plain_lora", "step": step, "at": "equal compute",
                             "flops": float(np.mean([m["flops"] for m in mine])), **S.compare(fids, plain_cost)})
    return rows


def flops_at(by_seed, step):
    return next(p["flops"] for p in by_seed[min(by_seed)] if p["step"] == step)


def write_report(out: Path, settings, curves, benchmark_seconds, machine):
    """curves.json (per-seed curves, summary, comparisons), results.md and finetune.png."""
    import convergence
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = convergence.summarize(curves, list(curves))
    tests = comparisons(curves, settings["steps"])
    (out / "curves.json").write_text(json.dumps(
        {"settings": settings, "curves": curves, "summary": summary, "statistics": S.TEST, "comparisons": tests,
         "benchmark_seconds": benchmark_seconds, "machine": machine}, indent=2, default=str))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, rows in summary.items():
        flops = [p["flops"] / 1e12 for p in curves[method][min(curves[method])]]  # the same for every seed
        mean = np.array([r["fid_mean"] for r in rows])
        std = np.array([r["fid_std"] or 0.0 for r in rows])
        acc = np.array([r["accuracy_mean"] for r in rows])
        steps = [r["step"] for r in rows]
        for ax, x, y in ((axes[0], steps, mean), (axes[1], flops, mean), (axes[2], steps, acc)):
            ax.plot(x, y, marker="o", label=method, linewidth=2.5 if method in GUIDED else 1.2)
            if y is mean:
                ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    axes[0].set(xlabel="fine-tuning steps", ylabel="feature-FID on the target (lower is better)")
    axes[1].set(xlabel="training TFLOPs (st_lora_adapter: + its stage 1)", ylabel="feature-FID")
    axes[2].set(xlabel="fine-tuning steps", ylabel="caption accuracy (brightness and digit)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"LoRA fine-tuning to mirrored bright/faint digits: {len(settings['seeds'])} seed(s), mean ± "
                 f"sample std, {settings['samples_per_class']} samples/class, Euler {settings['sampling_steps']}, "
                 "no CFG")
    fig.tight_layout()
    fig.savefig(out / "finetune.png", dpi=110)
    plt.close(fig)

    last = settings["steps"]
    lines = [f"Base: {settings['pretrain_steps']} steps from scratch on upright digits; LoRA rank "
             f"{settings['lora_rank']}, batch {settings['batch_size']}, seeds {settings['seeds']}; guide stop at step "
             f"{settings['guide_stop_step']}, stage-1 adapter {settings['stage1_steps']} steps; feature-FID and caption "
             f"accuracy of {settings['samples_per_class']} samples per target class (20 classes). Mean ± sample std "
             "over seeds. TFLOPs: model FLOPs counted on the script's steps (st_lora_adapter: its stage 1 included); "
             "train seconds: wall-clock on this machine.", "",
             f"| method | FID at step {last} | accuracy at {last} | FID at step {2 * last} | TFLOPs at {last} | "
             f"train seconds at {last} |", "|---|---|---|---|---|---|"]
    for method, rows in summary.items():
        at = {r["step"]: r for r in rows}
        end = at.get(2 * last)
        lines.append(f"| {method} | {S.fmt(at[last]['fid_mean'], at[last]['fid_std'])} | "
                     f"{S.fmt(at[last]['accuracy_mean'], at[last]['accuracy_std'], 3)} | "
                     f"{S.fmt(end['fid_mean'], end['fid_std']) if end else '-'} | "
                     f"{flops_at(curves[method], last) / 1e12:.2f} | {at[last]['train_seconds_mean']:.0f} |")
    lines.append(f"| base (step 0) | {summary['plain_lora'][0]['fid_mean']:.2f} | "
                 f"{summary['plain_lora'][0]['accuracy_mean']:.3f} | | 0 | 0 |")
    lines += ["", f"## Against plain LoRA (test: {S.TEST})", "",
              "Each cell: FID difference (plain - method) [95 % confidence interval], p-value: verdict.", "",
              "| method | at | " + " | ".join(f"step {s}" for s in sorted({t["step"] for t in tests})) + " |",
              "|---|---|" + "---|" * len({t["step"] for t in tests})]
    for method in GUIDED:
        for at in ("equal steps", "equal compute"):
            cells = {t["step"]: f"{S.fmt_test(t)}: {t['verdict'].split(' (')[0]}" for t in tests
                     if t["better"] == method and t["at"] == at}
            lines.append(f"| {method} | {at} | " + " | ".join(cells.get(s, "-") for s in
                                                              sorted({t["step"] for t in tests})) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    return table


def recorded_settings(args):
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "rederive", "vae_name_or_path")}
    return dict(settings, vae_name_or_path=os.path.relpath(args.vae_name_or_path, ROOT)
                if Path(args.vae_name_or_path).is_absolute() else args.vae_name_or_path)


def rederive(folder):
    """The summary, comparisons, results.md and plot again from `folder`'s curves.json (nothing trained or scored)."""
    import convergence

    saved, curves = convergence.read_curves(folder)
    table = write_report(Path(folder), saved["settings"], curves, saved["benchmark_seconds"], saved["machine"])
    print(table)
    return table


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    if args.rederive:
        return rederive(args.rederive)
    import convergence  # benchmarks/convergence.py: real-image loading
    import train_self_transcendence_t2i as t2i

    from diffusers_selftrans import evaluation as E

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. The base (pretrained once), the target images and the classifier that scores samples on the target
    base = pretrain_base(args, out)
    target = write_target_digits(out / "data" / "target", args.resolution)
    real, real_labels, num_classes = convergence.load_folder_images(str(target), args.resolution)
    classifier = E.train_feature_classifier(real, real_labels, num_classes=num_classes, seed=0,
                                            cache_dir=str(out / "eval_cache"), input_size=args.resolution)
    prompts = [target_caption(c // len(CT.NUMBER_WORDS), c % len(CT.NUMBER_WORDS), i)
               for c in range(num_classes) for i in range(args.samples_per_class)]
    labels = [class_of_target_caption(p) for p in prompts]

    def score(pipe):
        return CT.score_pipeline(pipe, prompts, labels, args, real, real_labels, classifier)

    base_point = evaluate(args, base, None, score)

    # 2. Per seed: plain LoRA, Self-Transcendence LoRA with the base as teacher, a stage-1 adapter and the
    # Self-Transcendence LoRA it guides; every run from the same base
    curves = {name: {} for name in METHODS}
    for seed in args.seeds:
        runs = out / "runs" / f"seed{seed}"
        common = common_flags(args, base, target, out, seed, args.batch_size)
        for name in RUNS:
            if not (runs / name / "selftrans_lora.json").exists():
                print(f"[seed {seed}] {name}", flush=True)
                t2i.main(common + run_flags(args, name, runs) + ["--output_dir", str(runs / name)])
        if seed == args.seeds[0]:  # FLOPs per step of each kind (the adapter teacher: this seed's stage 1)
            flops = {name: step_flops(args, common, name, runs, out / "flops_runs") for name in RUNS}
        stage1 = (convergence.read_log(runs / "stage1_adapter")[args.stage1_steps]["train_seconds"],
                  run_flops(flops, "stage1_adapter", args.stage1_steps, args.guide_stop_step))
        for name in METHODS:
            curves[name][seed] = base_point + evaluate(
                args, base, runs / name, score, lambda step, n=name: run_flops(flops, n, step, args.guide_stop_step),
                stage1 if name == "st_lora_adapter" else (0.0, 0.0))

    # 3. Mean and spread over seeds, the tests, the table and the plot
    table = write_report(out, dict(recorded_settings(args), flops_per_step=flops), curves,
                         round(time.perf_counter() - start, 1), os.uname().machine)
    print(table)
    print(f"\nWrote {out / 'curves.json'}, {out / 'results.md'}, {out / 'finetune.png'}")
    return curves


if __name__ == "__main__":
    main()

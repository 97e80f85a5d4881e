#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""The CPU quickstart (`make quickstart`): Self-Transcendence against a vanilla SiT on real data, in minutes.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes, no download) upsampled to 32 px,
encoded once with a tiny `AutoencoderKL` this project trained itself (`examples/assets/digits-vae`, made by
`examples/quickstart_assets.py`). Then, with the same scripts and flags a GPU user runs, at a tiny model size:

1. stage 1  `train_align.py --alignment vae_align`                 -> the guiding model
2. stage 2  `train_self_transcendence.py --guiding_model ...`       -> the Self-Transcendence model
3. vanilla  `train_align.py --alignment none`, same steps as stage 2 -> the baseline
4. class-balanced samples from both models, a labelled PNG grid per model, and a table of feature-FID (features of a
   small classifier trained on the real digits) and class accuracy (how often that classifier recognises the
   intended class), printed and written as JSON
5. a summary of where everything was written.

At this scale (minutes of CPU, 16 tokens) the numbers are a smoke test of the whole method, not evidence about
ImageNet: `benchmarks/convergence.py` runs several seeds and the baselines for that question.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import preprocess_latents  # noqa: E402
import quickstart_assets  # noqa: E402
import train_align  # noqa: E402
import train_self_transcendence  # noqa: E402

from diffusers_selftrans import SiTPipeline, SiTTransformer2DModel  # noqa: E402
from diffusers_selftrans import evaluation as E  # noqa: E402

# Measured on the 2-core project CPU (machine-notes): a depth-6 / width-128 SiT at 16 tokens, batch 128, learns
# digits in ~1,000 steps; 600 steps per run keeps the whole quickstart under ~15 minutes.
DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 128
DEFAULT_RESOLUTION = 32
DEFAULT_SAMPLES_PER_CLASS = 50
DEFAULT_SAMPLING_STEPS = 30
# A short run needs a short EMA: with the ImageNet decay 0.9999, 600 steps leave ~94 % of the initial weights.
SHORT_RUN_EMA_DECAY = 0.99
# The paper's 2048-wide alignment MLPs are sized for D = 768-1152; at D = 128 they would cost more than the SiT.
TINY_PROJECTOR_DIM = 512
# REPA's lr 1e-4 is tuned for SiT-B+ at batch 256 over 400K steps; a depth-6 / width-128 SiT trained for a few hundred
# steps barely learns its class embedding at that rate (measured here: loss 0.43 after 300 steps vs 0.35 at 1e-3).
TINY_LEARNING_RATE = 1e-3


def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", type=str, default="quickstart_output")
    p.add_argument("--model", type=str, default=str(HERE / "configs" / "sit-tiny.json"))
    p.add_argument("--vae_name_or_path", type=str, default=str(quickstart_assets.DEFAULT_VAE_PATH))
    p.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    p.add_argument("--stage1_steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Steps of stage 2 and of the vanilla SiT.")
    p.add_argument("--guide_stop_step", type=int, default=None, help="Default: a quarter of --steps (paper: 20/80).")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--samples_per_class", type=int, default=DEFAULT_SAMPLES_PER_CLASS)
    p.add_argument("--sampling_steps", type=int, default=DEFAULT_SAMPLING_STEPS)
    p.add_argument("--guidance_scale", type=float, default=1.0, help="1.0 = no CFG (the paper's Table 1 setting).")
    p.add_argument("--max_real", type=int, default=None, help="Limit the real images (tests).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(input_args)


def run(name, module, argv, progress):
    """Run one script's `main` in this process and print the equivalent shell command."""
    script = f"{module.__name__}.py"
    print(f"\n==> {name}\n    accelerate launch examples/{script} {' '.join(argv)}", flush=True)
    if not progress and module is not preprocess_latents:
        argv = argv + ["--no-progress"]
    start = time.perf_counter()
    module.main(module.parse_args(argv))
    return time.perf_counter() - start


def labelled_grid(images: np.ndarray, labels: np.ndarray, title: str, per_class: int = 4, scale: int = 2) -> Image.Image:
    """A grid with one column per class (labelled 0..9) and `per_class` rows, under a title."""
    classes = sorted(set(int(c) for c in labels))
    h, w = images.shape[1] * scale, images.shape[2] * scale
    header, label_row = 18, 14
    grid = Image.new("RGB", (w * len(classes), header + label_row + h * per_class), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), title, fill="black")
    for col, c in enumerate(classes):
        draw.text((col * w + w // 2 - 3, header), str(c), fill="black")
        picks = np.flatnonzero(labels == c)[:per_class]
        for row, i in enumerate(picks):
            tile = Image.fromarray(images[i]).resize((w, h), Image.NEAREST)
            grid.paste(tile, (col * w, header + label_row + row * h))
    return grid


def sample_model(folder: Path, out_dir: Path, args, num_classes: int):
    pipe = SiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    plan = E.class_balanced_plan(args.samples_per_class * num_classes, num_classes, seed=args.seed)
    E.generate_samples(pipe, plan, str(out_dir), batch_size=250, guidance_scale=args.guidance_scale,
                       num_inference_steps=args.sampling_steps, progress=args.progress)
    images = E.load_images(str(out_dir))
    labels = np.array([p.class_label for p in sorted(plan, key=lambda p: p.index)])
    return images, labels


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    timings = {}
    start = time.perf_counter()

    # 0. Data: digits as PNG class folders, encoded once to latent shards with the project's own VAE
    digits = quickstart_assets.write_digits_imagefolder(out / "data" / "digits", args.resolution)
    latents = out / "data" / "latents"
    if not (latents / "stats.json").exists():
        timings["encode_latents"] = run("encode the digits once", preprocess_latents, [
            "--train_data_dir", str(digits), "--resolution", str(args.resolution),
            "--vae_name_or_path", args.vae_name_or_path, "--output_dir", str(latents), "--batch_size", "256",
        ], args.progress)
    common = ["--model", args.model, "--vae_name_or_path", args.vae_name_or_path, "--latents_dir", str(latents),
              "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
              "--seed", str(args.seed), "--report_to", "tensorboard", "--logging_steps", "25",
              "--ema_decay", str(SHORT_RUN_EMA_DECAY), "--projector_dim", str(TINY_PROJECTOR_DIM),
              "--learning_rate", str(TINY_LEARNING_RATE),
              "--validation_num_inference_steps", str(args.sampling_steps)]

    # 1.-3. The three trainings
    stage1, stage2, vanilla = out / "stage1_guiding", out / "stage2_selftrans", out / "vanilla_sit"
    stop = args.guide_stop_step or max(1, args.steps // 4)
    timings["stage1"] = run("stage 1: guiding model (VAE alignment)", train_align, common + [
        "--alignment", "vae_align", "--max_train_steps", str(args.stage1_steps), "--output_dir", str(stage1),
        "--checkpointing_steps", str(args.stage1_steps), "--validation_steps", str(args.stage1_steps)], args.progress)
    timings["stage2"] = run("stage 2: Self-Transcendence", train_self_transcendence, common + [
        "--guiding_model_name_or_path", str(stage1), "--guide_stop_step", str(stop),
        # benchmarks/results/quickstart was made guiding with the EMA (before raw weights became the default)
        "--guiding_weights", "ema",
        "--max_train_steps", str(args.steps), "--output_dir", str(stage2),
        "--checkpointing_steps", str(args.steps), "--validation_steps", str(args.steps)], args.progress)
    timings["vanilla"] = run("vanilla SiT (same steps)", train_align, common + [
        "--alignment", "none", "--max_train_steps", str(args.steps), "--output_dir", str(vanilla),
        "--checkpointing_steps", str(args.steps), "--validation_steps", str(args.steps)], args.progress)

    # 4. Samples, labelled grids, feature-FID and accuracy
    print("\n==> evaluation: class-balanced samples, feature-FID and class accuracy", flush=True)
    real, real_labels = quickstart_assets.load_digit_images(args.resolution)
    if args.max_real:
        real, real_labels = real[: args.max_real], real_labels[: args.max_real]
    real = np.repeat(real[..., None], 3, axis=-1)  # the pipelines decode RGB
    classifier = E.train_feature_classifier(real, real_labels, num_classes=10, seed=args.seed,
                                            cache_dir=str(out / "eval_cache"), input_size=args.resolution)
    results = {"settings": {"stage1_steps": args.stage1_steps, "steps": args.steps, "guide_stop_step": stop,
                            "batch_size": args.batch_size, "sampling": f"Euler {args.sampling_steps} steps",
                            "guidance_scale": args.guidance_scale, "samples_per_model": args.samples_per_class * 10,
                            "real_images": len(real), "seed": args.seed},
               "train_seconds": {k: round(v, 1) for k, v in timings.items()}, "models": {}}
    results["settings"]["parameters"] = sum(
        p.numel() for p in SiTTransformer2DModel.from_pretrained(stage2 / "transformer").parameters())
    for name, folder in (("self_transcendence", stage2), ("vanilla_sit", vanilla), ("stage1_guiding", stage1)):
        images, labels = sample_model(folder, out / "samples" / name, args, num_classes=10)
        metrics = E.evaluate_samples(real, real_labels, images, labels, classifier)
        results["models"][name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
        grid = labelled_grid(images, labels, f"{name}: {args.steps if folder != stage1 else args.stage1_steps} steps")
        grid.save(out / f"grid_{name}.png")
    results["total_seconds"] = round(time.perf_counter() - start, 1)  # end to end, data and evaluation included
    (out / "results.json").write_text(json.dumps(results, indent=2))

    # 5. Summary
    print("\n| model | feature-FID (lower is better) | class accuracy | train time (s) |")
    print("|---|---|---|---|")
    seconds = {"self_transcendence": timings["stage2"], "vanilla_sit": timings["vanilla"], "stage1_guiding": timings["stage1"]}
    for name, m in results["models"].items():
        print(f"| {name} | {m['fid']:.2f} | {m['accuracy']:.3f} | {seconds[name]:.0f} |")
    print(f"\n(Self-Transcendence's cost includes its guiding model: {timings['stage1'] + timings['stage2']:.0f} s "
          f"in all.)\nWritten under {out}/:\n"
          f"  grid_self_transcendence.png, grid_vanilla_sit.png, grid_stage1_guiding.png   labelled sample grids\n"
          f"  results.json                          the table above, with settings and timings\n"
          f"  stage1_guiding/ stage2_selftrans/ vanilla_sit/   SiTPipeline folders (SiTPipeline.from_pretrained)\n"
          f"      each with README.md (model card), samples.png, loss_log.jsonl, logs/ (tensorboard), checkpoint-*/\n"
          f"  samples/<model>/*.png                 the evaluated samples\n")
    return results


if __name__ == "__main__":
    main()

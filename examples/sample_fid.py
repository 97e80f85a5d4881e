#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Class-balanced sampling from a SiTPipeline, ADM `.npz` export and metrics (FID-50K and friends).

Every process draws its share of one class-balanced plan (each sample seeded from `--seed` and its index, so the
images do not depend on the number of processes or the batch size), writing `samples/{index:06d}.png`; a rerun skips
existing files. The main process then writes `samples.npz` (`arr_0` uint8 NHWC, `arr_1` labels: the input of
openai/guided-diffusion's `evaluations/evaluator.py`) and `sampling_info.json` (sampler, NFE, CFG, seed, metrics).

    accelerate launch examples/sample_fid.py --pipeline_name_or_path path/to/sit-pipeline \\
        --output_dir eval/sde250 --sampler sde --num_inference_steps 250 --guidance_scale 1.8 \\
        --guidance_interval 0.0 0.7 --ref_batch VIRTUAL_imagenet256_labeled.npz \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth

Metrics (main process, after sampling):
- `--feature_classifier FILE` (a `train_feature_classifier` cache file): class accuracy of the samples, plus a
  feature-FID against `--ref_batch` when given. Offline, no extra packages (the digits quickstart/benchmark).
- Inception metrics (FID, sFID, IS, precision/recall; need `pip install diffusers-selftrans[metrics]`) when
  `--inception_weights` is given, or when `--ref_batch` is given without `--feature_classifier` (weights then come
  from the torch hub cache). Nothing is ever downloaded. Resizing is TF-compatible (paper-comparable) unless
  `--antialias`.
"""

import argparse
import json
import logging
import math
import os

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from diffusers_selftrans.evaluation import (
    NPZ_IMAGES_KEY,
    SAMPLING_INFO_NAME,
    class_balanced_plan,
    class_accuracy,
    compute_fid,
    compute_inception_metrics,
    create_npz_from_sample_folder,
    generate_samples,
    load_feature_classifier,
    load_images,
    sampling_info,
    write_sampling_info,
)
from diffusers_selftrans.provenance import check_provenance, module_digest


logger = get_logger(__name__)

SAMPLERS = ("euler", "heun", "sde")
# REPA README / Self-Transcendence `generate.sh` evaluate with the SDE sampler at 250 steps, FID over 50K samples.
DEFAULT_SAMPLER = "sde"
DEFAULT_NUM_INFERENCE_STEPS = 250
DEFAULT_NUM_SAMPLES = 50_000
# No CFG (paper Table 1); the CFG results use e.g. scale 1.8 with interval (0, 0.7) (REPA README).
DEFAULT_GUIDANCE_SCALE = 1.0
DEFAULT_GUIDANCE_INTERVAL = (0.0, 1.0)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings that must match for a rerun to reuse the PNGs already in --output_dir.
# (num_samples too: the class-balanced plan, hence the label of each index, depends on it.)
_RESUME_KEYS = (
    "pipeline", "torch_dtype", "sampler", "scheduler_config", "num_inference_steps", "guidance_scale",
    "guidance_interval", "num_samples", "num_classes", "seed",
    # the weights themselves: a model retrained into the same folder keeps its path
    "transformer_digest", "vae_digest",
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--pipeline_name_or_path", type=str, required=True, help="A SiTPipeline folder or Hub id.")
    model.add_argument("--revision", type=str, default=None, help="Hub revision of the pipeline.")
    model.add_argument("--torch_dtype", type=str, default="float32", choices=sorted(TORCH_DTYPES))

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_samples", type=int, default=DEFAULT_NUM_SAMPLES)
    sampling.add_argument("--per_device_batch_size", type=int, default=64)
    sampling.add_argument("--sampler", type=str, default=DEFAULT_SAMPLER, choices=SAMPLERS)
    sampling.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
    sampling.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    sampling.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        default=list(DEFAULT_GUIDANCE_INTERVAL),
        metavar=("LOW", "HIGH"),
        help="CFG only for t in [LOW, HIGH] (t=1 noise, t=0 data); REPA's --guidance-low/--guidance-high.",
    )
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--output_dir", type=str, required=True)

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--ref_batch", type=str, default=None, help="ADM reference .npz (arr_0) or a folder of real images."
    )
    metrics.add_argument(
        "--inception_weights", type=str, default=None, help="Path of weights-inception-2015-12-05-6726825d.pth."
    )
    metrics.add_argument("--feature_classifier", type=str, default=None, help="A train_feature_classifier cache file.")
    metrics.add_argument("--metrics_batch_size", type=int, default=64)
    metrics.add_argument(
        "--antialias", action="store_true", help="Antialiased Inception resize (not comparable with published FIDs)."
    )

    args = parser.parse_args(input_args)
    if args.num_samples < 1 or args.per_device_batch_size < 1 or args.num_inference_steps < 1:
        raise ValueError("--num_samples, --per_device_batch_size and --num_inference_steps must be positive.")
    low, high = args.guidance_interval
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"--guidance_interval needs 0 <= LOW <= HIGH <= 1, got {low} {high}.")
    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance_scale must be a finite number, got {args.guidance_scale}.")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}.")
    return args


def build_scheduler(sampler: str):
    """The scheduler for `--sampler` (flow matching with data at t=0; timesteps = 1000 * t)."""
    if sampler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=1.0)
    if sampler == "heun":
        from diffusers import FlowMatchHeunDiscreteScheduler

        return FlowMatchHeunDiscreteScheduler(shift=1.0)
    if sampler == "sde":
        from diffusers_selftrans import SiTEulerMaruyamaScheduler

        return SiTEulerMaruyamaScheduler()
    raise ValueError(f"Unknown sampler {sampler!r}; choose from {SAMPLERS}.")


def check_resumable(info_path: str, info: dict) -> None:
    """Refuses to mix PNGs from a run with other sampling settings into this one."""
    if not os.path.isfile(info_path):
        return
    with open(info_path, encoding="utf-8") as f:
        previous = json.load(f).get("sampling", {})
    # every key is compared, also one the earlier run did not record (an older version: its weights are unknown)
    check_provenance(f"the samples in {os.path.dirname(info_path)}", {k: previous.get(k) for k in _RESUME_KEYS},
                     {k: info[k] for k in _RESUME_KEYS}, remedy="Use another --output_dir.")


def compute_metrics(args, npz_path: str, labels, device) -> dict:
    """Metrics of the packed samples, as chosen by --feature_classifier / --ref_batch / --inception_weights."""
    if not (args.feature_classifier or args.ref_batch or args.inception_weights):
        return {}
    with np.load(npz_path) as data:
        fake = data[NPZ_IMAGES_KEY]
    real = load_images(args.ref_batch) if args.ref_batch else None
    metrics = {}
    if args.feature_classifier:
        classifier = load_feature_classifier(args.feature_classifier, map_location=device)
        metrics["class_accuracy"] = class_accuracy(classifier, fake, labels, batch_size=args.metrics_batch_size)
        if real is not None:
            metrics["feature_fid"] = compute_fid(
                real, fake, feature_extractor=classifier, batch_size=args.metrics_batch_size, device=device
            )
            metrics["num_real"] = len(real)
    if args.inception_weights or (real is not None and not args.feature_classifier):
        metrics.update(
            compute_inception_metrics(
                real,
                fake,
                inception_weights=args.inception_weights,
                batch_size=args.metrics_batch_size,
                device=device,
                antialias=args.antialias,
            )
        )
    metrics["num_fake"] = len(fake)
    return metrics


def main(args):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    from diffusers_selftrans import SiTPipeline  # imported here: the example's CLI parses without it

    load_kwargs = {}
    if args.revision is not None:
        load_kwargs["revision"] = args.revision
    if args.torch_dtype != "float32":  # only when asked: the keyword name differs across diffusers versions
        load_kwargs["torch_dtype"] = TORCH_DTYPES[args.torch_dtype]
    pipeline = SiTPipeline.from_pretrained(args.pipeline_name_or_path, **load_kwargs)
    pipeline.scheduler = build_scheduler(args.sampler)
    pipeline = pipeline.to(accelerator.device)
    num_classes = pipeline.transformer.config.num_classes

    plan = class_balanced_plan(args.num_samples, num_classes, args.seed)
    info = sampling_info(
        pipeline,
        num_samples=args.num_samples,
        num_classes=num_classes,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval),
    )
    info.update(pipeline=args.pipeline_name_or_path, torch_dtype=args.torch_dtype,
                transformer_digest=module_digest(pipeline.transformer), vae_digest=module_digest(pipeline.vae))
    info_path = os.path.join(args.output_dir, SAMPLING_INFO_NAME)
    check_resumable(info_path, info)  # on every process, so that all of them stop together
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(info_path, "w", encoding="utf-8") as f:  # recorded up front so a resumed run can be checked
            json.dump({"sampling": info, "metrics": {}}, f, indent=2, sort_keys=True, default=str)

    sample_dir = os.path.join(args.output_dir, "samples")
    written = generate_samples(
        pipeline,
        plan,
        sample_dir,
        batch_size=args.per_device_batch_size,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval),
        num_inference_steps=args.num_inference_steps,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        progress=accelerator.is_local_main_process,
    )
    logger.info(f"process {accelerator.process_index} wrote {len(written)} samples", main_process_only=False)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        labels = [entry.class_label for entry in plan]
        npz_path = create_npz_from_sample_folder(sample_dir, args.num_samples, labels=labels)
        metrics = compute_metrics(args, npz_path, labels, accelerator.device)
        write_sampling_info(npz_path, info, metrics)
        logger.info(f"wrote {npz_path}; metrics: {json.dumps(metrics, default=str)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Input-pipeline throughput: images per second per worker process for the training input path at 256 px, JPEGs vs
pre-encoded latents, and the CPU cores per GPU needed to feed a training rate R (issue 26, item 5).

What is timed is the library's own code, nothing re-implemented:

1. JPEGs, per stage, in this process (one thread): file read + JPEG decode (`open_image`), `to_rgb`,
   `adm_center_crop` to 256, `image_to_tensor` ([-1, 1]) and the horizontal flip; and `preprocess_image` + flip whole.
2. JPEGs through the real `TrainDataStream` over a local imagefolder (`datasets` imagefolder, map-style,
   `--random_flip`), batch 32, with `dataloader_num_workers` 0 / 1 / 2: batches per second after a warm-up.
3. Latents through the same `TrainDataStream` with `--latents_dir`: shards in the format of
   `examples/preprocess_latents.py` (float32 posterior mean/std, 4x32x32 per 256 px image, with the flipped image's
   moments, `--shard_size` 1000), written here with `save_latent_shard` from random moments (reading does not
   depend on the values).

The JPEGs are written by the benchmark itself, sized like ImageNet train images (`IMAGE_SIZES`, 333 to 500 px a side,
mean 173k pixels, between 400x350 and 500x375; quality 90, ~110 KB), with textured content (smooth multi-scale noise +
gradients + grain) so that the decoder does real work.
Files sit in the page cache: this measures CPU cost, not disk or network I/O.

"Per worker" = images per CPU-second of the processes doing the per-image work (the DataLoader workers, CPU time from
/proc; with 0 workers the training process): the rate of one worker on a core of its own, which does not depend on
what else runs on this machine (wall-clock rates are reported next to it). The sizing figure is the per-worker rate of
the layout the input should use (`per_worker_figure`): 0 workers when reading an item in the training process costs
it less than receiving one from a worker (latents), else the best worker row (JPEGs). Cores per GPU = R /
(per-worker rate), R = `--target_images_per_sec` (default: the paper's SiT-B/2 stage-2 rate, 214 img/s per GPU), plus
the training process's own core.

    python benchmarks/data_throughput.py           # ~2.5 minutes on 2 cores -> benchmarks/results/data_throughput
    python benchmarks/data_throughput.py --smoke --output_dir /tmp/data_throughput   # seconds

Writes `results.json` (every number, the command, CPU model, versions) and `results.md` (tables and a reading).
"""

import argparse
import io
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

# Offline: the imagefolder builder is part of `datasets`, nothing is fetched (set before `datasets` is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_selftrans.data import (  # noqa: E402
    CROP_RECIPE,
    LATENT_FORMAT_VERSION,
    LATENT_STATS_FILE,
    DataConfig,
    LatentSource,
    TrainDataStream,
    adm_center_crop,
    image_to_tensor,
    latent_shard_name,
    open_image,
    preprocess_image,
    save_latent_shard,
    to_rgb,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py, also when loaded by path (tests)
from timing import summarize, timed  # noqa: E402


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT_DIR = os.path.join("benchmarks", "results", "data_throughput")
# Paper §4.5: SiT-B/2 stage 2 (guided phase) runs 6.69 iterations/s on 8 A800 GPUs at global batch 256,
# i.e. 6.69 * 256 / 8 = 214 images/s per GPU: the rate one GPU's input pipeline must sustain.
PAPER_IMAGES_PER_SEC_PER_GPU = 6.69 * 256 / 8
# REPA / Self-Transcendence train at 256x256; the SD-VAE (downsampling 8, 4 channels) gives 4x32x32 latents.
RESOLUTION = 256
LATENT_CHANNELS = 4
VAE_DOWNSAMPLING = 8
# Per-GPU batch of the paper's run (global 256 on 8 GPUs): the batch one training process collates.
BATCH_SIZE = 32
# ImageNet train images: most are 500x375 / 375x500 / 500x333 (the mean is about 400x350, a few are much larger);
# these six cycle, mean 173k pixels (between 400x350 and 500x375). Decode cost scales with the pixel count.
IMAGE_SIZES = ((500, 375), (375, 500), (500, 333), (400, 350), (500, 400), (450, 350))
# ImageNet's JPEGs are mostly quality ~90, ~110 KB on average.
JPEG_QUALITY = 90
# Texture: smooth noise octaves (cell size px, amplitude) + per-pixel grain + a per-image gradient. The grain's std
# (GRAIN_STD, on 0..255) was tuned so that the mean file at IMAGE_SIZES and quality 90 is ~110 KB, like ImageNet's.
TEXTURE_OCTAVES = ((128, 40.0), (32, 30.0), (8, 20.0), (2, 10.0))
GRAIN_STD = 28.0
GRADIENT_AMPLITUDE = 60.0
# Each image is a random window of one textured canvas (cheap to make, different content per image).
CANVAS_SIZE = 1024
# Class folders of the imagefolder tree (labels are read and checked like real ones).
NUM_CLASSES = 10
# preprocess_latents.py's default shard size: 1000 latents, ~64 MB with flips.
LATENT_SHARD_SIZE = 1000
# ImageNet-1k train images, for per-epoch costs.
IMAGENET_TRAIN_IMAGES = 1_281_167
# A common GPU node for the reading: 8 GPUs and 64 cores, i.e. 8 cores per GPU (one runs the training process).
NODE_CORES_PER_GPU = 8
# Full run (~2.5 minutes on 2 cores). A row is timed until its first epoch ends (no worker restart in the window) or for
# DEFAULT_SECONDS_PER_ROW: JPEG rows read their epoch in ~10-20 s, latents with 0 workers theirs (8000 latents, ~0.5 GB
# of shards) in a few seconds; latent rows with workers hit the time limit.
DEFAULT_NUM_IMAGES = 2560
DEFAULT_NUM_LATENTS = 8000
DEFAULT_SECONDS_PER_ROW = 20.0
DEFAULT_WORKERS = (0, 1, 2)
# Batches read before timing: worker start-up, first file opens, the DataLoader's prefetch filling.
WARMUP_BATCHES = 2
# Stage breakdown: images decoded per timed loop, loops timed (median), one untimed loop first.
DEFAULT_STAGE_IMAGES = 120
DEFAULT_STAGE_REPEATS = 3
# --smoke: every path once, in seconds.
SMOKE = dict(num_images=48, num_latents=96, workers=(0, 1), batch_size=8, stage_images=6, stage_repeats=1,
             seconds_per_row=2.0)


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=None,
                        help=f"Where results.json and results.md go (default {DEFAULT_OUTPUT_DIR}; with --smoke a "
                             f"temporary folder).")
    parser.add_argument("--target_images_per_sec", type=float, default=PAPER_IMAGES_PER_SEC_PER_GPU,
                        help="Training rate R (images/s per GPU) to size the CPU for (default: the paper's SiT-B/2 "
                             "stage 2, 6.69 it/s x 256 / 8 GPUs = 214).")
    parser.add_argument("--num_images", type=int, default=DEFAULT_NUM_IMAGES, help="JPEGs written and read.")
    parser.add_argument("--num_latents", type=int, default=DEFAULT_NUM_LATENTS, help="Latents written and read.")
    parser.add_argument("--num_workers", type=int, nargs="+", default=list(DEFAULT_WORKERS),
                        help="dataloader_num_workers values to time.")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="Per-process batch of the stream.")
    parser.add_argument("--seconds_per_row", type=float, default=DEFAULT_SECONDS_PER_ROW,
                        help="Time each stream row for at most this long (or until its first epoch ends).")
    parser.add_argument("--stage_images", type=int, default=DEFAULT_STAGE_IMAGES,
                        help="Images per timed loop of the per-stage breakdown.")
    parser.add_argument("--stage_repeats", type=int, default=DEFAULT_STAGE_REPEATS,
                        help="Timed loops per stage (median).")
    parser.add_argument("--work_dir", default=None,
                        help="Where the JPEGs, latents and datasets cache are written (default: a temporary folder, "
                             "removed at the end).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes: every path once, in seconds (tests).")
    args = parser.parse_args(input_args)
    if args.smoke:
        defaults = {"num_images": DEFAULT_NUM_IMAGES, "num_latents": DEFAULT_NUM_LATENTS,
                    "num_workers": list(DEFAULT_WORKERS), "batch_size": BATCH_SIZE,
                    "stage_images": DEFAULT_STAGE_IMAGES, "stage_repeats": DEFAULT_STAGE_REPEATS,
                    "seconds_per_row": DEFAULT_SECONDS_PER_ROW}
        smoke = dict(SMOKE, num_workers=list(SMOKE["workers"]))
        for name, default in defaults.items():  # flags given explicitly win over the smoke sizes
            if getattr(args, name) == default:
                setattr(args, name, smoke[name])
    if min(args.num_workers) < 0 or args.batch_size < 1 or args.stage_images < 1 or args.stage_repeats < 1:
        parser.error("--num_workers must be >= 0; --batch_size, --stage_images and --stage_repeats >= 1.")
    if args.seconds_per_row <= 0:
        parser.error("--seconds_per_row must be positive.")
    if args.target_images_per_sec <= 0:
        parser.error("--target_images_per_sec must be positive.")
    for name, count in (("num_images", args.num_images), ("num_latents", args.num_latents)):
        if count < (WARMUP_BATCHES + 1) * args.batch_size:
            parser.error(f"--{name} must hold at least {WARMUP_BATCHES + 1} batches of --batch_size "
                         f"{args.batch_size} (warm-up + one timed batch).")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data the benchmark writes
# ---------------------------------------------------------------------------------------------------------------------


def _texture_canvas(rng: np.random.Generator) -> np.ndarray:
    """float32 (S, S, 3) around 0: bicubic-upsampled noise at several scales plus per-pixel grain."""
    size = CANVAS_SIZE
    canvas = np.zeros((size, size, 3), np.float32)
    for cell, amplitude in TEXTURE_OCTAVES:
        cells = size // cell + 1
        small = np.clip(rng.normal(size=(cells, cells, 3)) * 40 + 128, 0, 255).astype(np.uint8)
        up = Image.fromarray(small).resize((cells * cell, cells * cell), Image.BICUBIC)
        canvas += (np.asarray(up, np.float32)[:size, :size] - 128) / 40 * amplitude
    canvas += rng.normal(scale=GRAIN_STD, size=canvas.shape).astype(np.float32)
    return canvas


def write_jpegs(root: str, num_images: int, seed: int) -> Dict[str, Any]:
    """`num_images` textured JPEGs in `root/class_XX/` (an imagefolder tree); returns their sizes."""
    rng = np.random.default_rng(seed)
    canvas = _texture_canvas(rng)
    file_bytes = []
    for index in range(num_images):
        width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        x, y = (int(v) for v in rng.integers(0, CANVAS_SIZE - max(IMAGE_SIZES[0]), 2))
        a, b, c = rng.uniform(-GRADIENT_AMPLITUDE, GRADIENT_AMPLITUDE, 3)
        gradient = (a * np.linspace(-1, 1, width, dtype=np.float32)[None, :, None]
                    + b * np.linspace(-1, 1, height, dtype=np.float32)[:, None, None] + c + 128)
        pixels = np.clip(canvas[y:y + height, x:x + width] + gradient, 0, 255).astype(np.uint8)
        folder = os.path.join(root, f"class_{index % NUM_CLASSES:02d}")
        os.makedirs(folder, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=JPEG_QUALITY)
        with open(os.path.join(folder, f"img_{index:06d}.jpg"), "wb") as f:
            f.write(buffer.getvalue())
        file_bytes.append(buffer.tell())
    pixels = [w * h for w, h in (IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(num_images))]
    return {
        "count": num_images,
        "sizes_px": [list(size) for size in IMAGE_SIZES],
        "mean_pixels": statistics.mean(pixels),
        "jpeg_quality": JPEG_QUALITY,
        "mean_kb": statistics.mean(file_bytes) / 1e3,
        "min_kb": min(file_bytes) / 1e3,
        "max_kb": max(file_bytes) / 1e3,
    }


def write_latents(latents_dir: str, num_latents: int, seed: int) -> Dict[str, Any]:
    """Shards as `examples/preprocess_latents.py --with_flip --resolution 256` writes them (random moments)."""
    os.makedirs(latents_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shape = (LATENT_CHANNELS, RESOLUTION // VAE_DOWNSAMPLING, RESOLUTION // VAE_DOWNSAMPLING)
    num_shards = math.ceil(num_latents / LATENT_SHARD_SIZE)
    # The shard metadata preprocess_latents.py writes (`_shard_metadata` + per-shard counts).
    metadata = {"format_version": str(LATENT_FORMAT_VERSION), "world_size": "1", "rank": "0",
                "shard_size": str(LATENT_SHARD_SIZE), "resolution": str(RESOLUTION),
                "vae_name_or_path": "random-sd-vae-shaped", "vae_subfolder": "None", "flip": "True",
                "max_samples": "None"}
    for shard in range(num_shards):
        count = min(LATENT_SHARD_SIZE, num_latents - shard * LATENT_SHARD_SIZE)
        tensors = {
            "latent_mean": torch.randn((count, *shape), generator=generator),
            "latent_std": torch.rand((count, *shape), generator=generator) * 0.1 + 1e-3,
            "latent_mean_flip": torch.randn((count, *shape), generator=generator),
            "latent_std_flip": torch.rand((count, *shape), generator=generator) * 0.1 + 1e-3,
            "class_labels": torch.arange(shard * LATENT_SHARD_SIZE, shard * LATENT_SHARD_SIZE + count) % NUM_CLASSES,
        }
        shard_metadata = dict(metadata, shard_index=str(shard), num_records=str(count), num_skipped="0")
        save_latent_shard(os.path.join(latents_dir, latent_shard_name(shard, 0)), tensors, shard_metadata)
    stats = {
        "format_version": LATENT_FORMAT_VERSION, "vae_name_or_path": "random-sd-vae-shaped", "vae_subfolder": None,
        "vae_encoder": None, "scaling_factor": 0.18215, "shift_factor": 0.0, "latent_channels": LATENT_CHANNELS,
        "latent_size": list(shape[1:]), "resolution": RESOLUTION, "crop": CROP_RECIPE, "flip": True,
        "num_classes": NUM_CLASSES, "id2label": None, "count": num_latents, "num_skipped": 0,
        "num_shards": num_shards, "world_size": 1, "shard_size": LATENT_SHARD_SIZE, "dtype": "float32",
        "dataset_name": None, "train_data_dir": None, "dataset_split": "train", "sanity_psnr": None,
    }
    with open(os.path.join(latents_dir, LATENT_STATS_FILE), "w") as f:
        json.dump(stats, f, indent=2)
    bytes_per_latent = 4 * 4 * math.prod(shape)  # mean, std and their flips, float32
    return {"count": num_latents, "shape": list(shape), "num_shards": num_shards, "with_flip": True,
            "kb_per_latent": bytes_per_latent / 1e3}


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def time_stages(paths: List[str], repeats: int) -> Dict[str, Any]:
    """ms per image of each stage of `preprocess_image` (+ the flip), and of the whole, in this process: the median
    wall time of `repeats` loops, and their CPU time per image (after one untimed loop)."""

    def per_image(fn):
        fn()  # untimed: allocator, caches
        cpu_start = time.process_time()
        wall_ms = statistics.median(timed(fn, "cpu", 0, repeats)) / len(paths)
        cpu_ms = (time.process_time() - cpu_start) * 1e3 / (len(paths) * repeats)
        return {"wall_ms": wall_ms, "cpu_ms": cpu_ms}

    decoded = [open_image(path) for path in paths]
    rgb = [to_rgb(image) for image in decoded]
    cropped = [adm_center_crop(image, RESOLUTION) for image in rgb]
    tensors = [image_to_tensor(image) for image in cropped]
    stages = {
        "read_and_decode": per_image(lambda: [open_image(path) for path in paths]),
        "to_rgb": per_image(lambda: [to_rgb(image) for image in decoded]),
        "adm_center_crop": per_image(lambda: [adm_center_crop(image, RESOLUTION) for image in rgb]),
        "to_tensor": per_image(lambda: [image_to_tensor(image) for image in cropped]),
        "flip": per_image(lambda: [tensor.flip(-1) for tensor in tensors]),
    }
    whole = per_image(lambda: [preprocess_image(path, RESOLUTION).flip(-1) for path in paths])
    return {"stages": stages, "whole": whole, "img_per_cpu_s": 1e3 / whole["cpu_ms"], "images": len(paths),
            "repeats": repeats}


def children_cpu_seconds() -> Dict[int, float]:
    """CPU time (user + system, s) of each child process of this one (the DataLoader workers), from /proc; {} where
    there is no /proc."""
    if not os.path.isdir("/proc"):
        return {}
    ticks, me, cpu = os.sysconf("SC_CLK_TCK"), os.getpid(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ... utime, stime
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    return cpu


def time_stream(config: DataConfig, batch_size: int, seed: int, max_seconds: float) -> Dict[str, Any]:
    """Read `TrainDataStream` batches: start-up, a warm-up, then batches timed one by one until the first epoch ends
    or `max_seconds` have been timed (an epoch end restarts the workers: not a steady-state cost).

    Wall time gives the rates of this machine; CPU time (the training process's, and the workers' from /proc) gives
    what a worker delivers on a core of its own, which does not depend on what else runs here.
    """
    build_start = time.perf_counter()
    stream = TrainDataStream(config, batch_size, seed=seed)
    build_s = time.perf_counter() - build_start
    max_batches = stream.batches_per_epoch - WARMUP_BATCHES
    workers = config.dataloader_num_workers
    batches = iter(stream)
    try:
        first_batch_ms = timed(lambda: next(batches), "cpu", 0, 1)[0]
        for _ in range(WARMUP_BATCHES - 1):
            next(batches)
        batch_ms = []
        children_start = children_cpu_seconds()
        main_start = time.process_time()
        while len(batch_ms) < max_batches and sum(batch_ms) < max_seconds * 1e3:
            batch_ms += timed(lambda: next(batches), "cpu", 0, 1)
        main_cpu_s = time.process_time() - main_start  # with workers: receiving items + collation
        children_end = children_cpu_seconds()
    finally:
        batches.close()  # stops the DataLoader workers
    seconds = sum(batch_ms) / 1e3
    images = batch_size * len(batch_ms)
    # The processes that do the per-image work: the workers, or the training process itself with 0 workers.
    worker_pids = set(children_start) & set(children_end)
    if workers == 0:
        worker_cpu_s, cpu_source = main_cpu_s, "training process"
    elif len(worker_pids) == workers and sum(children_end[p] - children_start[p] for p in worker_pids) > 0:
        worker_cpu_s, cpu_source = sum(children_end[p] - children_start[p] for p in worker_pids), "/proc"
    else:  # no /proc (or a window shorter than a clock tick): count the workers busy all the time
        worker_cpu_s, cpu_source = seconds * workers, "wall time"
    return {
        "num_workers": workers,
        "img_per_s": images / seconds,
        "wall_img_per_s_per_worker": images / seconds / max(workers, 1),
        # images per CPU-second of the workers: the rate of one worker on a core of its own
        "per_worker_img_per_s": images / worker_cpu_s,
        "worker_cpu_s": worker_cpu_s,
        "worker_cpu_source": cpu_source,
        # share of their wall time the workers got a CPU: below 1 when they wait (for a core, or for the consumer)
        "worker_busy_fraction": worker_cpu_s / (seconds * max(workers, 1)),
        "main_process_cpu_ms_per_image": main_cpu_s * 1e3 / images,
        "main_process_cpu_fraction": main_cpu_s / seconds,
        "timed_images": images,
        "timed_seconds": seconds,
        "build_s": build_s,
        "first_batch_s": first_batch_ms / 1e3,
        "batch_ms": {k: v for k, v in summarize(batch_ms).items() if k != "times_ms"},
    }


def per_worker_figure(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The per-worker rate to size the CPU with, from the layout this input should use.

    Workers pay off only when they take more work off the training process than the hand-off of the items adds back
    to it: if reading an item in the training process (0 workers) costs it less CPU than receiving one from a worker,
    the 0-worker row (latents); otherwise the worker row with the best per-worker rate (JPEGs, whose decoding must
    also overlap the GPU step rather than stall it).
    """
    by_workers = {row["num_workers"]: row for row in rows}
    with_workers = [row for row in rows if row["num_workers"] > 0]
    in_process = by_workers.get(0)
    if not with_workers or (in_process is not None and in_process["main_process_cpu_ms_per_image"]
                            < min(row["main_process_cpu_ms_per_image"] for row in with_workers)):
        best = in_process
    else:
        best = max(with_workers, key=lambda row: row["per_worker_img_per_s"])
    return {"per_worker_img_per_s": best["per_worker_img_per_s"], "per_worker_from_num_workers": best["num_workers"]}


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def portable_command(argv: List[str]) -> str:
    """The command with absolute paths made relative to the repository (or replaced by a placeholder)."""

    def portable(token):
        flag, sep, value = token.partition("=") if token.startswith("--") else ("", "", token)
        if os.path.isabs(value):
            relative = os.path.relpath(value, REPO_ROOT)
            value = relative if not relative.startswith("..") else "<absolute path>"
        return f"{flag}{sep}{value}"

    return "python " + " ".join(shlex.quote(portable(a)) for a in ["benchmarks/data_throughput.py"] + argv)


def markdown(result: Dict[str, Any]) -> str:
    target = result["target_images_per_sec"]
    jpeg, latents = result["jpeg"], result["latents"]
    images, shards, env = result["data"]["images"], result["data"]["latents"], result["environment"]
    lines = [
        "# Input-pipeline throughput (issue 26, item 5)",
        "",
        f"`{result['command']}` ({result['run_seconds']:.0f} s)",
        "",
        f"CPU: {env['cpu_model']} ({env['logical_cpus']} logical CPUs), Python {env['python']}, torch {env['torch']}, "
        f"Pillow {env['pillow']}, datasets {env['datasets']}; load average {env['loadavg_before'][0]:.2f} before, "
        f"{env['loadavg_after'][0]:.2f} after. Batch {result['settings']['batch_size']}, `--random_flip`, "
        f"{RESOLUTION} px.",
        "",
        f"JPEGs: {images['count']} written by the benchmark, sizes "
        f"{', '.join(f'{w}x{h}' for w, h in images['sizes_px'])} (mean {images['mean_pixels'] / 1e3:.0f}k px), "
        f"quality {images['jpeg_quality']}, mean {images['mean_kb']:.0f} KB "
        f"({images['min_kb']:.0f}-{images['max_kb']:.0f}); textured (multi-scale noise, gradients, grain). "
        f"Latents: {shards['count']} in preprocess_latents.py shards ({'x'.join(map(str, shards['shape']))} "
        f"mean/std + flipped, {shards['kb_per_latent']:.0f} KB each). Files are in the page cache: CPU cost only.",
        "",
        f"## TrainDataStream, after {WARMUP_BATCHES} warm-up batches, up to "
        f"{result['settings']['seconds_per_row']:.0f} s within the first epoch",
        "",
        "| input | workers | img/s total | img/s per worker (wall) | **img/s per worker (CPU time)** | workers busy | "
        "training process, CPU ms/img | first batch (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("JPEG", row) for row in jpeg["stream"]] + [("latents", row) for row in latents["stream"]]
    for name, row in rows:
        lines.append(f"| {name} | {row['num_workers']} | {row['img_per_s']:.0f} | "
                     f"{row['wall_img_per_s_per_worker']:.0f} | **{row['per_worker_img_per_s']:.0f}** | "
                     f"{row['worker_busy_fraction']:.0%} | {row['main_process_cpu_ms_per_image']:.2f} | "
                     f"{row['first_batch_s']:.2f} |")
    stages = jpeg["stages"]
    lines += [
        "",
        "Workers 0: the training process is the worker. img/s per worker (CPU time) = images / CPU seconds of the "
        "workers (from /proc): the rate of a worker with a core of its own, whatever else runs on this machine. "
        "Workers busy: their CPU time / their wall time (below 100%: waiting for a core or for the training process). "
        "Training process CPU ms/img: with workers, receiving the items and collating the batch.",
        "",
        f"## JPEG stages, in one process and one thread ({stages['images']} images, {stages['repeats']} timed loops "
        f"after one untimed)",
        "",
        "| stage | CPU ms per image | wall ms per image (median) |",
        "|---|---|---|",
    ]
    for stage, ms in stages["stages"].items():
        lines.append(f"| {stage} | {ms['cpu_ms']:.2f} | {ms['wall_ms']:.2f} |")
    lines += [
        f"| **`preprocess_image` + flip** | **{stages['whole']['cpu_ms']:.2f}** ({stages['img_per_cpu_s']:.0f} img "
        f"per CPU-second) | {stages['whole']['wall_ms']:.2f} |",
        "",
        f"## Cores per GPU at R = {target:.0f} img/s per GPU",
        "",
        "| input | img/s per worker (CPU time) | cores per GPU (R / per-worker rate) |",
        "|---|---|---|",
        f"| JPEG | {jpeg['per_worker_img_per_s']:.0f} | {jpeg['cores_per_gpu']:.2f} |",
        f"| latents | {latents['per_worker_img_per_s']:.0f} | {latents['cores_per_gpu']:.2f} |",
        "",
        f"Per-worker rate: JPEG from the {jpeg['per_worker_from_num_workers']}-worker row, latents from the "
        f"{latents['per_worker_from_num_workers']}-worker row: 0 workers when reading an item in the training process "
        f"costs it less CPU than receiving one from a worker, else the best worker row. Add the training process's own "
        f"core. "
        f"R defaults to the paper's SiT-B/2 stage-2 rate, 6.69 it/s x 256 / 8 GPUs = "
        f"{PAPER_IMAGES_PER_SEC_PER_GPU:.0f} img/s per GPU.",
        "",
        "## Reading",
        "",
    ]
    lines += [line for line in result["reading"]]
    return "\n".join(lines) + "\n"


def reading(result: Dict[str, Any]) -> List[str]:
    """A few sentences, each computed from the numbers above it."""
    target = result["target_images_per_sec"]
    jpeg, latents = result["jpeg"], result["latents"]
    spare = NODE_CORES_PER_GPU - 1

    def layout(block):
        row = next(row for row in block["stream"] if row["num_workers"] == block["per_worker_from_num_workers"])
        if row["num_workers"] == 0:
            return "read in the training process (0 workers)"
        workers = math.ceil(block["cores_per_gpu"])
        main_share = target * row["main_process_cpu_ms_per_image"] / 1e3
        return (f"{workers} worker{'s' if workers != 1 else ''} per training process, plus {main_share:.2f} of the "
                f"training process's core for receiving and collating ({row['main_process_cpu_ms_per_image']:.2f} ms "
                f"per image)")

    text = [
        f"- **JPEGs**: {jpeg['per_worker_img_per_s']:.0f} img/s per worker on this core, so {target:.0f} img/s per GPU "
        f"needs {jpeg['cores_per_gpu']:.2f} cores per GPU: {layout(jpeg)}. That is "
        f"{'within' if jpeg['cores_per_gpu'] <= spare else 'beyond'} the {spare} spare cores per GPU of an 8-GPU node "
        f"with {8 * NODE_CORES_PER_GPU} cores; a core k times slower than this one needs k times as many.",
        f"- **Latents**: {latents['per_worker_img_per_s']:.0f} img/s per worker, {latents['cores_per_gpu']:.3f} cores "
        f"per GPU, {layout(latents)}: {latents['per_worker_img_per_s'] / jpeg['per_worker_img_per_s']:.0f}x cheaper "
        f"per image than decoding JPEGs (and training then skips the VAE encode on the GPU, not measured here).",
    ]
    by_workers = {row["num_workers"]: row for row in latents["stream"]}
    with_workers = [row for row in latents["stream"] if row["num_workers"] > 0]
    if 0 in by_workers and with_workers:
        best = max(with_workers, key=lambda row: row["img_per_s"])
        ratio = by_workers[0]["img_per_s"] / best["img_per_s"]
        shards = result["data"]["latents"]
        if ratio > 1:
            why = (f"each item's tensors are views of their whole shard tensor "
                   f"({shards['item_storage_kb'] / 1e3:.0f} MB of storage for {shards['item_kb']:.0f} KB of data), "
                   f"and a worker hands the whole storage over through shared memory"
                   if shards["item_storage_kb"] > 2 * shards["item_kb"]
                   else "the DataLoader hands each item's tensors over one by one, a shared-memory segment each")
            text.append(
                f"- Latents read **{ratio:.0f}x faster with 0 workers** ({by_workers[0]['img_per_s']:.0f} img/s) than "
                f"with {best['num_workers']} ({best['img_per_s']:.0f} img/s), and the training process spends more "
                f"CPU per latent receiving it from a worker ({best['main_process_cpu_ms_per_image']:.2f} ms) than "
                f"reading it itself ({by_workers[0]['main_process_cpu_ms_per_image']:.2f} ms): {why}."
            )
        else:
            text.append(f"- Latents read fastest with {best['num_workers']} workers ({best['img_per_s']:.0f} img/s).")
    text.append(
        f"- **When to recommend latents**: when the cores per GPU left for the input pipeline (node cores / GPUs, "
        f"minus one for the training process) are fewer than {jpeg['cores_per_gpu']:.1f} scaled to your core's "
        f"speed, when R is higher (smaller models, faster GPUs: the JPEG figure grows with R), and for any run that "
        f"reads the data for more than an epoch or two: one ImageNet epoch (1.28M images) costs "
        f"{IMAGENET_TRAIN_IMAGES / jpeg['per_worker_img_per_s'] / 60:.0f} core-minutes of JPEG decoding every epoch, "
        f"against {IMAGENET_TRAIN_IMAGES / latents['per_worker_img_per_s'] / 60:.1f} core-minutes of latent reading "
        f"after a one-off encode. Raw JPEGs stay the simpler choice for short runs, a new VAE, or augmentations beyond "
        f"the flip."
    )
    return text


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    command = portable_command(sys.argv[1:] if argv is None else list(argv))
    output_dir = args.output_dir or (tempfile.mkdtemp(prefix="data_throughput_smoke_") if args.smoke
                                     else os.path.join(REPO_ROOT, DEFAULT_OUTPUT_DIR))
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="data_throughput_")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core figures; DataLoader workers run one thread each anyway
    start = time.perf_counter()
    loadavg_before = list(os.getloadavg())
    print(f"$ {command}", flush=True)
    try:
        result = run(args, command, work_dir)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    result["run_seconds"] = time.perf_counter() - start
    result["environment"]["loadavg_before"] = loadavg_before
    result["environment"]["loadavg_after"] = list(os.getloadavg())
    result["reading"] = reading(result)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    print(f"Wrote {os.path.join(output_dir, 'results.json')} and results.md ({result['run_seconds']:.0f} s).")
    return result


def run(args: argparse.Namespace, command: str, work_dir: str) -> Dict[str, Any]:
    import datasets
    import safetensors

    datasets.disable_progress_bars()
    image_dir, latents_dir = os.path.join(work_dir, "images"), os.path.join(work_dir, "latents")
    cache_dir = os.path.join(work_dir, "datasets_cache")

    # 1. Data.
    images = write_jpegs(image_dir, args.num_images, args.seed)
    latents = write_latents(latents_dir, args.num_latents, args.seed)
    print(f"{images['count']} JPEGs (mean {images['mean_kb']:.0f} KB), {latents['count']} latents written.", flush=True)

    # 2. JPEG stages in this process.
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(image_dir) for name in names)
    stages = time_stages(paths[: args.stage_images], args.stage_repeats)
    print(f"preprocess_image + flip: {stages['whole']['cpu_ms']:.2f} CPU ms/image", flush=True)

    # 3. The real stream, JPEGs then latents, for each worker count.
    jpeg_rows, latent_rows = [], []
    for workers in args.num_workers:
        config = DataConfig(train_data_dir=image_dir, cache_dir=cache_dir, resolution=RESOLUTION, random_flip=True,
                            dataloader_num_workers=workers)
        jpeg_rows.append(time_stream(config, args.batch_size, args.seed, args.seconds_per_row))
        print(f"JPEG    {workers} workers: {jpeg_rows[-1]['img_per_s']:.0f} img/s, "
              f"{jpeg_rows[-1]['per_worker_img_per_s']:.0f} per worker (CPU time)", flush=True)
    for workers in args.num_workers:
        config = DataConfig(latents_dir=latents_dir, resolution=RESOLUTION, random_flip=True,
                            dataloader_num_workers=workers)
        latent_rows.append(time_stream(config, args.batch_size, args.seed, args.seconds_per_row))
        print(f"latents {workers} workers: {latent_rows[-1]['img_per_s']:.0f} img/s, "
              f"{latent_rows[-1]['per_worker_img_per_s']:.0f} per worker (CPU time)", flush=True)

    target = args.target_images_per_sec
    jpeg = dict(per_worker_figure(jpeg_rows), stages=stages, stream=jpeg_rows)
    latent = dict(per_worker_figure(latent_rows), stream=latent_rows)
    # Diagnosis of the worker rows: how much memory an item's tensors keep (a view of the whole shard tensor would
    # ship the shard through shared memory with every item)
    item = LatentSource(latents_dir).reader[0]
    latents["item_kb"] = sum(t.nbytes for t in item.values()) / 1e3
    latents["item_storage_kb"] = sum(t.untyped_storage().nbytes() for t in item.values()) / 1e3
    for block in (jpeg, latent):
        block["cores_per_gpu"] = target / block["per_worker_img_per_s"]
    return {
        "command": command,
        "environment": {
            "cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "datasets": datasets.__version__, "safetensors": safetensors.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {"resolution": RESOLUTION, "batch_size": args.batch_size, "random_flip": True,
                     "num_workers": list(args.num_workers), "warmup_batches": WARMUP_BATCHES,
                     "seconds_per_row": args.seconds_per_row, "seed": args.seed,
                     "smoke": args.smoke},
        "data": {"images": images, "latents": latents},
        "target_images_per_sec": target,
        "paper_images_per_sec_per_gpu": PAPER_IMAGES_PER_SEC_PER_GPU,
        "jpeg": jpeg,
        "latents": latent,
        "cores_per_gpu": {"jpeg": jpeg["cores_per_gpu"], "latents": latent["cores_per_gpu"]},
    }


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Encode an image dataset into VAE latent shards once, for training with `--latents_dir`.

Each image is ADM-center-cropped to `--resolution`, scaled to [-1, 1] and encoded with an `AutoencoderKL`; the shards
store the posterior moments `latent_dist.mean` / `latent_dist.std` (float32, as REPA stores mean and std), optionally
those of the horizontally flipped image (`--with_flip`, as LightningDiT does), and the class labels. The training
script samples `z = mean + std * randn` and scales it with `scaling_factor` / `shift_factor` from `stats.json`.

    accelerate launch examples/preprocess_latents.py --dataset_name ILSVRC/imagenet-1k --output_dir latents/in1k-256
    accelerate launch examples/preprocess_latents.py --train_data_dir /data/imagenet/train --with_flip --output_dir ...

Every process encodes its own share of the data (record i of the process-local order goes to process i % world, or
whole streaming shards) into `latents-{shard:05d}-rank{rank:03d}.safetensors`, `--shard_size` records per shard.
Shards are written atomically (temp file + rename): after a kill, re-run the same command and the completed shards are
skipped (the run must use the same number of processes). `stats.json` is written last, so its presence marks a
finished directory.
"""

import argparse
import itertools
import json
import logging
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env
from safetensors import safe_open
from tqdm.auto import tqdm

from diffusers import AutoencoderKL
from diffusers_selftrans.data import (
    CROP_RECIPE,
    LATENT_FORMAT_VERSION,
    LATENT_SHARD_RE,
    LATENT_STATS_FILE,
    DataConfig,
    ImageSource,
    SkipCounter,
    default_num_workers,
    latent_shard_name,
    list_latent_shards,
    ordered_map,
    read_latent_shard_metadata,
    save_latent_shard,
)
from diffusers_selftrans.cli import add_data_args
from diffusers_selftrans.provenance import check_provenance, vae_encoder_identity


logger = get_logger(__name__)

# REPA decodes with sd-vae-ft-ema (method notes §2.1); ft-ema and ft-mse share the encoder, so the latents match.
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
# Records per shard: 1000 ImageNet latents at 256 px are ~32 MB (64 MB with flips).
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 64
# Images encoded and decoded at the end to print a reconstruction PSNR.
DEFAULT_NUM_SANITY_IMAGES = 4
# Pixels live in [-1, 1]: the peak-to-peak range used by the PSNR.
PIXEL_RANGE = 2.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Encode a dataset into VAE latent shards (posterior mean and std).")
    add_data_args(parser)
    parser.add_argument("--vae_name_or_path", type=str, default=DEFAULT_VAE, help="AutoencoderKL Hub id or path.")
    parser.add_argument("--vae_subfolder", type=str, default=None, help="Subfolder of the VAE (e.g. 'vae').")
    parser.add_argument("--vae_dtype", type=str, default="float32", choices=sorted(DTYPES), help="Encoder precision.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where shards and stats.json are written.")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="Images per VAE call and process.")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="Records per shard file.")
    parser.add_argument("--with_flip", action="store_true", help="Also store the moments of the flipped image.")
    parser.add_argument("--max_samples", type=int, default=None, help="Encode only the first N records (tests).")
    parser.add_argument(
        "--num_sanity_images", type=int, default=DEFAULT_NUM_SANITY_IMAGES, help="Images for the final PSNR check."
    )
    args = parser.parse_args(input_args)

    if args.latents_dir is not None:
        raise ValueError("--latents_dir is an input of the training scripts; use --output_dir here.")
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.max_samples is not None and args.max_samples <= 0:
        raise ValueError(f"--max_samples must be positive, got {args.max_samples}.")
    return args


def _shard_metadata(args, rank: int, world_size: int) -> Dict[str, str]:
    """Settings a resumed run must share with the shards already on disk."""
    return {
        "format_version": str(LATENT_FORMAT_VERSION),
        "world_size": str(world_size),
        "rank": str(rank),
        "shard_size": str(args.shard_size),
        "resolution": str(args.resolution),
        "vae_name_or_path": str(args.vae_name_or_path),
        "vae_subfolder": str(args.vae_subfolder),
        "flip": str(bool(args.with_flip)),
        "max_samples": str(args.max_samples),
    }


def _completed_shards(output_dir: str, expected: Dict[str, str], rank: int) -> int:
    """Number of leading shards this rank already wrote; refuses shards written with other settings."""
    done = set()
    for path in list_latent_shards(output_dir):
        metadata = read_latent_shard_metadata(path)
        # a key the shard lacks is compared too (as None): it comes from a version that did not record it
        check_provenance(path, {k: metadata.get(k) for k in expected}, {k: v for k, v in expected.items() if k != "rank"},
                         remedy="Use a new --output_dir, or re-run with the original settings, VAE and number of "
                                "processes.")
        shard, shard_rank = (int(g) for g in LATENT_SHARD_RE.search(os.path.basename(path)).groups())
        if shard_rank == rank:
            done.add(shard)
    count = 0
    while count in done:
        count += 1
    return count


@torch.no_grad()
def _encode(vae: AutoencoderKL, pixel_values: torch.Tensor, dtype: torch.dtype):
    """Posterior moments (float32, on CPU) of a batch in [-1, 1]."""
    posterior = vae.encode(pixel_values.to(vae.device, dtype)).latent_dist
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


def _encode_items(vae, items, dtype, with_flip, buffers) -> None:
    pixel_values = torch.stack([item["pixel_values"] for item in items])
    count = len(items)
    if with_flip:
        pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
    mean, std = _encode(vae, pixel_values, dtype)
    buffers["latent_mean"].append(mean[:count])
    buffers["latent_std"].append(std[:count])
    if with_flip:
        buffers["latent_mean_flip"].append(mean[count:])
        buffers["latent_std_flip"].append(std[count:])
    buffers["class_labels"].append(torch.tensor([item["label"] for item in items], dtype=torch.long))


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, pixel_values: torch.Tensor, dtype: torch.dtype) -> float:
    """PSNR (dB) of decode(posterior mean) against the input, for images in [-1, 1]."""
    mean, _ = _encode(vae, pixel_values, dtype)
    decoded = vae.decode(mean.to(vae.device, dtype)).sample.float().cpu().clamp(-1, 1)
    mse = torch.mean((decoded - pixel_values) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(PIXEL_RANGE**2 / mse)


def main(args: Optional[argparse.Namespace] = None) -> Dict:
    if args is None:
        args = parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # `accelerate launch --cpu` only sets ACCELERATE_USE_CPU, which PartialState alone does not read.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    rank, world_size = state.process_index, state.num_processes
    dtype = DTYPES[args.vae_dtype]
    os.makedirs(args.output_dir, exist_ok=True)
    stats_path = os.path.join(args.output_dir, LATENT_STATS_FILE)
    if state.is_main_process and os.path.exists(stats_path):
        # The directory is "finished" only once stats.json is rewritten at the end of this run.
        os.remove(stats_path)
    state.wait_for_everyone()

    # 1. VAE, resume point (a run with other settings or another VAE fails before any work), data.
    vae = AutoencoderKL.from_pretrained(args.vae_name_or_path, subfolder=args.vae_subfolder)
    vae_identity = vae_encoder_identity(vae)  # of the weights as stored, before any --vae_dtype cast
    vae = vae.to(state.device, dtype=dtype).eval().requires_grad_(False)
    metadata = _shard_metadata(args, rank, world_size)
    metadata["vae_encoder"] = json.dumps(vae_identity, sort_keys=True)
    first_shard = _completed_shards(args.output_dir, metadata, rank)
    with state.main_process_first():  # the Arrow cache of local data is built once
        source = ImageSource(DataConfig.from_namespace(args))
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, args.resolution // downsample, args.resolution // downsample)

    # 2. This process's records: every world_size-th record (or whole streaming shards), no shuffling.
    if args.max_samples is None:
        rank_limit = None
    else:
        rank_limit = args.max_samples // world_size + int(rank < args.max_samples % world_size)
    start = first_shard * args.shard_size
    keys = source.epoch_keys(0, 0, rank, world_size, shuffle=False, drop_remainder=False)
    keys = itertools.islice(keys, rank_limit)
    # Resume: skip the records of the completed shards (streams are read, not decoded).
    keys = itertools.islice(keys, start, None)
    workers = default_num_workers(latents=False) if args.dataloader_num_workers is None else args.dataloader_num_workers
    results = iter(ordered_map(source.reader, keys, workers))
    if first_shard:
        logger.info(f"Resuming: {first_shard} shards of rank {rank} already written.", main_process_only=False)

    total = None
    if source.num_examples is not None:
        rank_records = len(range(rank, source.num_examples, world_size))
        total = max((rank_records if rank_limit is None else min(rank_records, rank_limit)) - start, 0)
    # judged from the first read against all of this rank's records when their number is known (see SkipCounter);
    # a resumed run counts the records of its finished shards as read
    skips = SkipCounter(args.max_skip_fraction, name=f"rank {rank}",
                        expected_per_epoch=None if total is None else total + start)
    skips.num_read = start
    progress = tqdm(total=total, unit="img", desc=f"encoding (rank {rank})", disable=not state.is_main_process)

    # 3. Encode shard by shard; a shard covers `shard_size` records (skipped ones included), so resume is exact.
    shard_index = first_shard
    while True:
        buffers, pending, num_records, num_skipped = defaultdict(list), [], 0, 0
        for item in itertools.islice(results, args.shard_size):
            num_records += 1
            progress.update(1)
            if "error" in item:
                num_skipped += 1
                skips.skip(item["description"], item["error"])
                continue
            skips.ok()
            pending.append(item)
            if len(pending) == args.batch_size:
                _encode_items(vae, pending, dtype, args.with_flip, buffers)
                pending = []
        if pending:
            _encode_items(vae, pending, dtype, args.with_flip, buffers)
        if num_records == 0:
            break
        names = ["latent_mean", "latent_std", "class_labels"]
        names += ["latent_mean_flip", "latent_std_flip"] if args.with_flip else []
        tensors = {}
        for name in names:
            if buffers[name]:
                tensors[name] = torch.cat(buffers[name])
            else:  # every record of the shard was undecodable
                tensors[name] = torch.zeros((0,) if name == "class_labels" else (0, *latent_shape))
                tensors[name] = tensors[name].long() if name == "class_labels" else tensors[name]
        if tuple(tensors["latent_mean"].shape[1:]) != latent_shape:
            raise ValueError(f"Latents of shape {tuple(tensors['latent_mean'].shape[1:])}, expected {latent_shape}.")
        shard_metadata = dict(metadata, shard_index=str(shard_index), num_records=str(num_records),
                              num_skipped=str(num_skipped))
        save_latent_shard(os.path.join(args.output_dir, latent_shard_name(shard_index, rank)), tensors, shard_metadata)
        shard_index += 1
        if num_records < args.shard_size:
            break
    skips.end_of_epoch()  # every record read: the rate is exact, also for streams of unknown size
    progress.close()
    logger.info(
        f"Rank {rank}: {skips.num_read} images read, {skips.num_skipped} undecodable skipped in this run.",
        main_process_only=False,
    )
    state.wait_for_everyone()

    # 4. Main process: stats.json (last, so it marks a finished directory) and a decode sanity check.
    stats = None
    if state.is_main_process:
        files = list_latent_shards(args.output_dir)
        count, skipped = 0, 0
        for path in files:
            shard_meta = read_latent_shard_metadata(path)
            skipped += int(shard_meta.get("num_skipped", 0))
            with safe_open(path, framework="pt") as f:
                count += f.get_slice("class_labels").get_shape()[0]
        shift_factor = getattr(vae.config, "shift_factor", None)
        sanity = []
        sanity_keys = source.epoch_keys(0, 0, 0, 1, shuffle=False, drop_remainder=False)
        for item in ordered_map(source.reader, sanity_keys, 0):
            if "error" not in item:
                sanity.append(item["pixel_values"])
            if len(sanity) == args.num_sanity_images:
                break
        psnr = reconstruction_psnr(vae, torch.stack(sanity), dtype) if sanity else None
        if psnr is not None:
            print(f"VAE reconstruction PSNR on {len(sanity)} images: {psnr:.2f} dB")
        stats = {
            "format_version": LATENT_FORMAT_VERSION,
            "vae_name_or_path": args.vae_name_or_path,
            "vae_subfolder": args.vae_subfolder,
            "vae_encoder": vae_identity,  # compared with the training run's VAE (data/latents.check_latent_stats)
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": 0.0 if shift_factor is None else float(shift_factor),
            "latent_channels": latent_shape[0],
            "latent_size": list(latent_shape[1:]),
            "resolution": args.resolution,
            "crop": CROP_RECIPE,
            "flip": bool(args.with_flip),
            "num_classes": source.num_classes,
            "id2label": None if source.id2label is None else {str(k): v for k, v in source.id2label.items()},
            "count": count,
            "num_skipped": skipped,
            "num_shards": len(files),
            "world_size": world_size,
            "shard_size": args.shard_size,
            "dtype": "float32",
            "dataset_name": args.dataset_name,
            "train_data_dir": args.train_data_dir,
            "dataset_split": args.dataset_split,
            "sanity_psnr": psnr,
        }
        tmp_path = f"{stats_path}.tmp"
        with open(tmp_path, "w") as f:
            json.dump(stats, f, indent=2)
        os.replace(tmp_path, stats_path)
        logger.info(f"Wrote {count} latents in {len(files)} shards to {args.output_dir} ({skipped} images skipped).")
    state.wait_for_everyone()
    return stats


if __name__ == "__main__":
    main()

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Class-balanced deterministic sampling, the images' uint8 interchange format, and the ADM-format `.npz` export.

- `class_balanced_plan` -> `partition_plan` -> `generate_samples` (PNGs `{index:06d}.png`, resumable)
  -> `create_npz_from_sample_folder` (the `arr_0` uint8 NHWC file the ADM evaluator of openai/guided-diffusion
  `evaluations/` reads) -> `write_sampling_info` (`sampling_info.json` next to the npz). Every sample has its own seed
  derived from (seed, index), so a result does not depend on the batch size or the number of processes. REPA's
  `generate.py` draws uniform labels with one seed per rank; we draw an exact class-balanced set instead (each class
  floor or ceil of N / num_classes).
- `to_uint8_nchw` accepts uint8 numpy NHWC, float numpy NHWC in [0, 1] (a pipeline's `output_type="np"`), uint8 torch
  NCHW, float torch NCHW in [0, 1], or a list of PIL images. Float -> uint8 is `uint8(clamp(255 * x, 0, 255))`,
  truncation, which equals REPA/ADM `generate.py` `clamp(255 * (x + 1) / 2, 0, 255).to(uint8)` for x in [-1, 1]
  (diffusers' `numpy_to_pil` rounds instead). `load_images` reads an ADM `.npz` or a folder of image files.
"""

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image


# ADM `evaluations/evaluator.py` reads the images of a sample batch from this key; guided-diffusion's
# `image_sample.py` stores the class labels as `arr_1`.
NPZ_IMAGES_KEY = "arr_0"
NPZ_LABELS_KEY = "arr_1"
SAMPLING_INFO_NAME = "sampling_info.json"
# How float images in [0, 1] become uint8 (REPA/ADM `generate.py`: truncation, not rounding).
PIXEL_CONVERSION = "uint8(clamp(255 * x, 0, 255)), truncation as REPA/ADM generate.py"
# A float image whose minimum is below this was almost surely given in [-1, 1] instead of [0, 1].
_NEGATIVE_RANGE_HINT = -0.5
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

ImagesLike = Union[np.ndarray, torch.Tensor, Sequence[Image.Image]]


def _float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    if x.numel() and float(x.min()) < _NEGATIVE_RANGE_HINT:
        raise ValueError(
            f"Float images must be in [0, 1]; got a minimum of {float(x.min()):.3f}. "
            "Convert [-1, 1] images with (x + 1) / 2 first."
        )
    # Truncation, as REPA/ADM generate.py (`clamp(255 * (x + 1) / 2, 0, 255).to(uint8)`).
    return (x.float() * 255).clamp(0, 255).to(torch.uint8)


def to_uint8_nchw(images: ImagesLike) -> torch.Tensor:
    """Converts any supported image batch to a uint8 torch tensor `(N, C, H, W)`.

    Accepted: numpy `(N, H, W, C)` or `(N, H, W)` (uint8, or float in [0, 1]); torch `(N, C, H, W)` (uint8, or float in
    [0, 1]); a list of PIL images (converted to RGB). Numpy arrays are channel-last, tensors channel-first.
    """
    if isinstance(images, (list, tuple)):
        if not images or not isinstance(images[0], Image.Image):
            raise ValueError("A list of images must be a non-empty list of PIL images.")
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"Numpy images must be channel-last (N, H, W, C) with C in (1, 3) or (N, H, W); got {images.shape}."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Torch images must be channel-first (N, C, H, W) with C in (1, 3); got {tuple(images.shape)}."
            )
        tensor = images.detach().cpu()
    else:
        raise TypeError(f"Unsupported image type {type(images).__name__}.")
    if tensor.dtype == torch.uint8:
        return tensor.contiguous()
    if not tensor.is_floating_point():
        raise ValueError(f"Images must be uint8 or float in [0, 1]; got dtype {tensor.dtype}.")
    return _float_to_uint8(tensor).contiguous()


def to_uint8_nhwc(images: ImagesLike) -> np.ndarray:
    """Same conversion as `to_uint8_nchw`, returned as a numpy uint8 `(N, H, W, C)` array (the ADM layout)."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).numpy()


def load_images(path: str) -> np.ndarray:
    """Loads uint8 RGB images `(N, H, W, 3)` from an ADM `.npz` (`arr_0`) or a folder of image files (sorted names)."""
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if name.lower().endswith(_IMAGE_EXTENSIONS))
        if not names:
            raise FileNotFoundError(f"No image files ({', '.join(_IMAGE_EXTENSIONS)}) in {path}.")
        images = []
        for name in names:
            with Image.open(os.path.join(path, name)) as image:
                images.append(np.asarray(image.convert("RGB")))
        return np.stack(images)
    if path.endswith(".npz"):
        with np.load(path) as data:
            if NPZ_IMAGES_KEY not in data:
                raise ValueError(f"{path} has no `{NPZ_IMAGES_KEY}` array (keys: {list(data.keys())}).")
            images = data[NPZ_IMAGES_KEY]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"`{NPZ_IMAGES_KEY}` of {path} must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}."
            )
        return images
    raise ValueError(f"Expected a folder of images or an ADM .npz file, got {path}.")




@dataclass(frozen=True)
class SamplePlan:
    """One sample to draw: its file index, its class and its own seed (derived from the run seed and the index)."""

    index: int
    class_label: int
    seed: int


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` in a run seeded with `seed` (63 bits, independent of batching and ranks)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & (2**63 - 1))


def class_balanced_plan(num_samples: int, num_classes: int, seed: int) -> List[SamplePlan]:
    """An exact class-balanced plan: every class gets floor or ceil of `num_samples / num_classes` samples.

    Which classes get the extra sample and the order of the labels are shuffled with `seed`.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    rng = np.random.default_rng(seed)
    base, remainder = divmod(num_samples, num_classes)
    counts = np.full(num_classes, base, dtype=np.int64)
    counts[rng.permutation(num_classes)[:remainder]] += 1
    labels = rng.permutation(np.repeat(np.arange(num_classes), counts))
    return [SamplePlan(index=i, class_label=int(label), seed=sample_seed(seed, i)) for i, label in enumerate(labels)]


def partition_plan(plan: Sequence[SamplePlan], rank: int, world_size: int) -> List[SamplePlan]:
    """The entries process `rank` of `world_size` draws (strided, so every index is drawn exactly once)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return list(plan[rank::world_size])


def sample_path(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, f"{index:06d}.png")


def _save_png_atomic(image: np.ndarray, path: str) -> None:
    # Write then rename, so an interrupted run never leaves a truncated PNG that a resumed run would skip.
    array = image[..., 0] if image.shape[-1] == 1 else image
    fd, tmp_path = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(path))
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp_path, format="PNG")
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def generate_samples(
    pipeline,
    plan: Sequence[SamplePlan],
    output_dir: str,
    *,
    batch_size: int,
    guidance_scale: float = 1.0,
    guidance_interval: Tuple[float, float] = (0.0, 1.0),
    num_inference_steps: int = 50,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> List[int]:
    """Draws this rank's share of `plan` and writes `{index:06d}.png` files; returns the indices written.

    Files already present are skipped, so an interrupted run resumes. `pipeline` is anything called as
    `pipeline(class_labels=..., guidance_scale=..., guidance_interval=..., num_inference_steps=..., generator=[...],
    output_type="np")` returning `.images` (float `(N, H, W, C)` in [0, 1]); each sample gets its own CPU generator
    seeded with `entry.seed`, so the images do not depend on `batch_size` or `world_size` as long as the pipeline
    draws every random number of a sample from that sample's generator.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    os.makedirs(output_dir, exist_ok=True)
    mine = partition_plan(plan, rank, world_size)
    todo = [entry for entry in mine if not os.path.exists(sample_path(output_dir, entry.index))]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)  # one bar over batches, not one per pipeline call

    from tqdm.auto import tqdm

    written = []
    for batch in tqdm(batches, desc=f"sampling (rank {rank})", disable=not progress):
        output = pipeline(
            class_labels=[entry.class_label for entry in batch],
            guidance_scale=guidance_scale,
            guidance_interval=tuple(guidance_interval),
            num_inference_steps=num_inference_steps,
            generator=[torch.Generator().manual_seed(entry.seed) for entry in batch],
            output_type="np",
        )
        images = to_uint8_nhwc(output.images)
        if len(images) != len(batch):
            raise ValueError(f"The pipeline returned {len(images)} images for a batch of {len(batch)}.")
        for entry, image in zip(batch, images):
            _save_png_atomic(image, sample_path(output_dir, entry.index))
            written.append(entry.index)
    return written


def create_npz_from_sample_folder(folder: str, num_samples: int, labels: Optional[Sequence[int]] = None) -> str:
    """Packs `{index:06d}.png` (index < num_samples) into `{folder}.npz` for the ADM evaluator; returns its path.

    `arr_0` is uint8 `(N, H, W, 3)` (RGB, grayscale PNGs are expanded); `labels`, if given, go to `arr_1` as in
    guided-diffusion's `image_sample.py`.
    """
    missing = [i for i in range(num_samples) if not os.path.exists(sample_path(folder, i))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {num_samples} samples are missing in {folder} "
            f"(first: {sample_path(folder, missing[0])})."
        )
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"Got {len(labels)} labels for {num_samples} samples.")
    samples = []
    for i in range(num_samples):
        with Image.open(sample_path(folder, i)) as image:
            samples.append(np.asarray(image.convert("RGB")))
    arrays = {NPZ_IMAGES_KEY: np.stack(samples)}
    if labels is not None:
        arrays[NPZ_LABELS_KEY] = np.asarray(labels, dtype=np.int64)
    npz_path = f"{folder.rstrip(os.sep)}.npz"
    np.savez(npz_path, **arrays)
    return npz_path


def count_nfe(scheduler, num_inference_steps: int) -> Optional[int]:
    """Transformer evaluations per sample (a CFG pass over the doubled batch counts once): `len(timesteps)`.

    Euler: N; diffusers' Heun: 2N - 1. Returns `None` when the scheduler cannot be probed.
    """
    try:
        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(num_inference_steps)
        return len(probe.timesteps)
    except Exception:  # a scheduler with another `set_timesteps` signature: record nothing rather than a guess
        return None


def sampling_info(
    pipeline,
    *,
    num_samples: int,
    num_classes: int,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    guidance_interval: Tuple[float, float],
) -> Dict[str, Any]:
    """What a result was sampled with: sampler, NFE, CFG scale and interval, sample count, seed, pixel conversion."""
    scheduler = pipeline.scheduler
    config = dict(getattr(scheduler, "config", {}) or {})
    return {
        "sampler": type(scheduler).__name__,
        "scheduler_config": {k: v for k, v in config.items() if not k.startswith("_")},
        "num_inference_steps": int(num_inference_steps),
        "nfe": count_nfe(scheduler, num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "guidance_interval": [float(guidance_interval[0]), float(guidance_interval[1])],
        "num_samples": int(num_samples),
        "num_classes": int(num_classes),
        "class_balanced": True,
        "seed": int(seed),
        "pixel_conversion": PIXEL_CONVERSION,
    }


def write_sampling_info(npz_path: str, info: Dict[str, Any], metrics: Optional[Dict[str, Any]] = None) -> str:
    """Writes `sampling_info.json` next to `npz_path` (sampling settings, the npz name and the metrics)."""
    record = {"npz": os.path.basename(npz_path), "sampling": info, "metrics": metrics or {}}
    path = os.path.join(os.path.dirname(os.path.abspath(npz_path)), SAMPLING_INFO_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
    return path

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Evaluation: class-balanced deterministic sampling, ADM-format `.npz` export and image metrics.

Scope
- Sampling: `class_balanced_plan` -> `partition_plan` -> `generate_samples` (PNGs `{index:06d}.png`, resumable)
  -> `create_npz_from_sample_folder` (the `arr_0` uint8 NHWC file the ADM evaluator of
  openai/guided-diffusion `evaluations/` reads) -> `write_sampling_info` (`sampling_info.json` next to the npz).
  Every sample has its own seed derived from (seed, index), so a result does not depend on the batch size or the
  number of processes. REPA's `generate.py` draws uniform labels with one seed per rank; we draw an exact
  class-balanced set instead (each class floor or ceil of N / num_classes).
- Images: one interchange format, converted by `to_uint8_nchw`: uint8 numpy NHWC, float numpy NHWC in [0, 1]
  (a pipeline's `output_type="np"`), uint8 torch NCHW, float torch NCHW in [0, 1], or a list of PIL images.
  Float -> uint8 is `uint8(clamp(255 * x, 0, 255))`, truncation, which equals REPA/ADM `generate.py`
  `clamp(255 * (x + 1) / 2, 0, 255).to(uint8)` for x in [-1, 1] (diffusers' `numpy_to_pil` rounds instead).
- Inception metrics (FID, sFID, Inception Score, precision/recall) on torch-fidelity's InceptionV3 with the
  TF-2015 weights, through torchmetrics. Never downloads: the weights come from `inception_weights` or the torch hub
  cache. Images are resized to 299 with the TF1-compatible bilinear resize (`antialias=False`), which is what makes
  the numbers comparable with papers (ADM evaluator); torchmetrics' default `antialias=True` is not.
- Small-data metrics (the digits quickstart and benchmark): a small CNN classifier trained on the real images
  (seeded, cached by a hash of data + hyper-parameters) whose penultimate layer is the feature space of a
  "feature-FID", and `class_accuracy`: how often it recognises the intended class of a conditional sample.
"""

import copy
import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


# --- constants (each names its source) ---

# ADM `evaluations/evaluator.py` reads the images of a sample batch from this key; guided-diffusion's
# `image_sample.py` stores the class labels as `arr_1`.
NPZ_IMAGES_KEY = "arr_0"
NPZ_LABELS_KEY = "arr_1"
SAMPLING_INFO_NAME = "sampling_info.json"
# How float images in [0, 1] become uint8 (REPA/ADM `generate.py`: truncation, not rounding).
PIXEL_CONVERSION = "uint8(clamp(255 * x, 0, 255)), truncation as REPA/ADM generate.py"
# torch-fidelity `feature_extractor_inceptionv3.py` `URL_INCEPTION_V3`: the TF-2015 Inception weights in PyTorch form.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILENAME = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
# ADM evaluator: sFID uses `mixed_6/conv:0` (= torch-fidelity `Mixed_6d.branch1x1`, after ReLU), first 7 channels.
SPATIAL_FEATURE_CHANNELS = 7
# ADM evaluator: Inception Score over splits of 5000 samples (10 splits for 50K samples).
INCEPTION_SCORE_SPLITS = 10
# Improved precision/recall (Kynkaenniemi et al. 2019) as in the ADM evaluator's `ManifoldEstimator`: k = 3.
PRECISION_RECALL_K = 3
# A float image whose minimum is below this was almost surely given in [-1, 1] instead of [0, 1].
_NEGATIVE_RANGE_HINT = -0.5
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

ImagesLike = Union[np.ndarray, torch.Tensor, Sequence[Image.Image]]


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Class-balanced, deterministically seeded sampling
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction and distances
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    extractor: nn.Module, images: ImagesLike, *, batch_size: int = 64, device: Union[str, torch.device, None] = None
) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """Runs `extractor` on uint8 `(B, C, H, W)` batches; returns its (float32, CPU) output for all images.

    The extractor receives uint8 images (the torch-fidelity/torchmetrics convention) and returns `(B, D)` or a dict
    of such tensors.
    """
    if device is not None:
        extractor = extractor.to(device)
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    total = len(images)
    outputs: List[Any] = []
    for start in range(0, total, batch_size):
        batch = to_uint8_nchw(images[start : start + batch_size]).to(device)
        outputs.append(extractor(batch))
    if not outputs:
        raise ValueError("No images to extract features from.")
    if isinstance(outputs[0], dict):
        return {key: torch.cat([o[key].float().cpu() for o in outputs]) for key in outputs[0]}
    return torch.cat([o.float().cpu() for o in outputs])


class _PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID consume features computed elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `(N, D)` (torchmetrics' FID, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real_features.ndim != 2 or fake_features.ndim != 2 or real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"Need two (N, D) feature sets, got {tuple(real_features.shape)} and {tuple(fake_features.shape)}."
        )
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real_features.shape[1]))
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


def _knn_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    # Distance of each point to its k-th nearest neighbour in the same set (k + 1: the point itself is at 0).
    radii = [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(batch_size)]
    return torch.cat(radii)


def _fraction_inside(ref: torch.Tensor, ref_radii: torch.Tensor, query: torch.Tensor, batch_size: int) -> float:
    inside = [(torch.cdist(chunk, ref) <= ref_radii[None]).any(dim=1) for chunk in query.split(batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, *, k: int = PRECISION_RECALL_K, batch_size: int = 1024
) -> Dict[str, float]:
    """Improved precision/recall (Kynkaenniemi et al. 2019; ADM evaluator): k-NN balls around each set.

    precision: share of fake samples inside some real k-NN ball; recall: share of real samples inside some fake ball.
    """
    if min(len(real_features), len(fake_features)) <= k:
        raise ValueError(f"Precision/recall with k={k} needs more than {k} samples per set.")
    real, fake = real_features.float(), fake_features.float()
    precision = _fraction_inside(real, _knn_radii(real, k, batch_size), fake, batch_size)
    recall = _fraction_inside(fake, _knn_radii(fake, k, batch_size), real, batch_size)
    return {"precision": precision, "recall": recall}


def inception_score(
    logits: torch.Tensor, *, splits: int = INCEPTION_SCORE_SPLITS, seed: int = 0
) -> Tuple[float, float]:
    """Inception Score (mean, std over splits) from unbiased Inception logits, via torchmetrics' `InceptionScore`."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=_PrecomputedFeatures(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):  # torchmetrics shuffles with the global RNG: keep the score reproducible
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# ----------------------------------------------------------------------------------------------------------------
# Inception (torch-fidelity weights, never downloaded here)
# ----------------------------------------------------------------------------------------------------------------


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def resolve_inception_weights(inception_weights: Optional[str] = None) -> str:
    """Path of the Inception weights: `inception_weights`, else the torch hub cache; a clear error if absent."""
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise FileNotFoundError(
                f"Inception weights not found at {inception_weights}. Download {INCEPTION_WEIGHTS_URL} there "
                "(FID/IS/sFID also need `pip install torch-fidelity`, i.e. `pip install diffusers-selftrans[metrics]`)."
            )
        return inception_weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILENAME)
    if not os.path.isfile(cached):
        raise FileNotFoundError(
            f"Inception weights not found at {cached} (the torch hub cache, $TORCH_HOME/hub/checkpoints). "
            f"This code never downloads: fetch {INCEPTION_WEIGHTS_URL} and put it at that path or pass its location with "
            "`inception_weights` / `--inception_weights`. Inception metrics also need "
            "`pip install torch-fidelity` (`pip install diffusers-selftrans[metrics]`)."
        )
    return cached


class InceptionFeatureExtractor(nn.Module):
    """torch-fidelity's InceptionV3 (TF-2015 weights) giving pool (2048), spatial (sFID) and unbiased-logit features.

    Input: uint8 `(N, 3, H, W)` at any size (resized to 299 inside). Output: dict with `pool` `(N, 2048)` (FID,
    precision/recall), `spatial` `(N, 7 * 17 * 17)` (sFID: `mixed_6/conv`, first 7 channels, flattened channel-last as
    the ADM evaluator) and `logits` `(N, 1008)` (Inception Score, no bias as ADM and torch-fidelity).
    `antialias=False` (default) uses the TF1-compatible resize for paper-comparable numbers.
    """

    def __init__(self, inception_weights: Optional[str] = None, antialias: bool = False):
        super().__init__()
        weights = resolve_inception_weights(inception_weights)
        if not _torch_fidelity_available():
            raise ImportError(
                "Inception metrics (FID, sFID, IS, precision/recall) need torch-fidelity, which is not installed: "
                "`pip install diffusers-selftrans[metrics]` (or `pip install torch-fidelity`; it needs a torchvision "
                "that matches your torch). Without it, pass `feature_extractor=<nn.Module>` "
                "(e.g. a feature classifier)."
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=weights,
            antialias=antialias,
        )
        self._spatial: Optional[torch.Tensor] = None
        # TF `mixed_6` is the 4th 17x17 block, torch-fidelity's `Mixed_6d`; `conv` is its 1x1 branch (post-ReLU).
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_FEATURE_CHANNELS].permute(0, 2, 3, 1).flatten(1).clone()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise ValueError("InceptionFeatureExtractor expects uint8 images; convert with `to_uint8_nchw`.")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pool, logits = self.net._torch_fidelity_forward(images)
        return {"pool": pool, "spatial": self._spatial, "logits": logits}


def compute_fid(
    real: ImagesLike,
    fake: ImagesLike,
    feature_extractor: Optional[nn.Module] = None,
    inception_weights: Optional[str] = None,
    *,
    batch_size: int = 64,
    device: Union[str, torch.device, None] = None,
    antialias: bool = False,
) -> float:
    """FID between two image sets.

    With `feature_extractor` (an `nn.Module` taking uint8 `(N, C, H, W)`, returning `(N, D)`) it runs fully offline.
    Without it, the Inception pool features with weights from `inception_weights` or the torch hub cache (needs
    torch-fidelity); `antialias=False` gives the paper-comparable (TF-compatible) resize.
    """
    if feature_extractor is None:
        extractor = InceptionFeatureExtractor(inception_weights, antialias=antialias)
        real_f = extract_features(extractor, real, batch_size=batch_size, device=device)["pool"]
        fake_f = extract_features(extractor, fake, batch_size=batch_size, device=device)["pool"]
    else:
        real_f = extract_features(feature_extractor, real, batch_size=batch_size, device=device)
        fake_f = extract_features(feature_extractor, fake, batch_size=batch_size, device=device)
    return frechet_distance(real_f, fake_f)


def compute_inception_metrics(
    real: Optional[ImagesLike],
    fake: ImagesLike,
    inception_weights: Optional[str] = None,
    *,
    batch_size: int = 64,
    device: Union[str, torch.device, None] = None,
    antialias: bool = False,
    k: int = PRECISION_RECALL_K,
) -> Dict[str, float]:
    """FID, sFID, Inception Score, precision and recall in one Inception pass per set (IS only when `real` is None)."""
    extractor = InceptionFeatureExtractor(inception_weights, antialias=antialias)
    fake_f = extract_features(extractor, fake, batch_size=batch_size, device=device)
    is_mean, is_std = inception_score(fake_f["logits"])
    metrics = {"inception_score": is_mean, "inception_score_std": is_std, "num_fake": len(fake)}
    if real is not None:
        real_f = extract_features(extractor, real, batch_size=batch_size, device=device)
        metrics["fid"] = frechet_distance(real_f["pool"], fake_f["pool"])
        metrics["sfid"] = frechet_distance(real_f["spatial"], fake_f["spatial"])
        metrics.update(precision_recall(real_f["pool"], fake_f["pool"], k=k))
        metrics["num_real"] = len(real)
    metrics["antialias"] = antialias
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Small-data metrics: a feature classifier trained on the real images
# ----------------------------------------------------------------------------------------------------------------

# Bump when the classifier architecture or training changes, so old cache files are not reused.
_CLASSIFIER_VERSION = 1
# Pooled spatial grid before the feature layer.
_CLASSIFIER_POOL_SIZE = 4
# Our choices for the small-data classifier (no paper default exists): 16 px input covers digits (8 px originals)
# and keeps training at seconds on a CPU; 64 features keep the FID covariance well conditioned with ~1K samples.
_CLASSIFIER_INPUT_SIZE = 16
_CLASSIFIER_WIDTH = 16
_CLASSIFIER_NUM_FEATURES = 64
_CLASSIFIER_EPOCHS = 15
_CLASSIFIER_BATCH_SIZE = 128
_CLASSIFIER_LEARNING_RATE = 2e-3


class FeatureClassifier(nn.Module):
    """Small CNN classifier; its penultimate layer (`num_features` wide) is the feature space of the feature-FID.

    `forward(images)` returns features `(N, num_features)`; `logits(images)` the class logits. Images: uint8, or
    float in [0, 1], `(N, C, H, W)` at any size, resized to `input_size` (antialiased bilinear) so that training takes
    seconds on a CPU; 1- and 3-channel inputs are converted to `in_channels`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        num_features: int = _CLASSIFIER_NUM_FEATURES,
        width: int = _CLASSIFIER_WIDTH,
        input_size: int = _CLASSIFIER_INPUT_SIZE,
    ):
        super().__init__()
        self.config = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            num_features=num_features,
            width=width,
            input_size=input_size,
        )
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(_CLASSIFIER_POOL_SIZE),
            nn.Flatten(),
            nn.Linear(4 * width * _CLASSIFIER_POOL_SIZE**2, num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)
        self.loaded_from_cache = False
        self.cache_path: Optional[str] = None
        self.train_accuracy: Optional[float] = None

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        channels = self.config["in_channels"]
        if x.shape[1] != channels:
            if x.shape[1] == 3 and channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif x.shape[1] == 1 and channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"The classifier takes {channels}-channel images, got {x.shape[1]} channels.")
        size = self.config["input_size"]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - 0.5) / 0.5  # [0, 1] -> [-1, 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self._prepare(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


def save_feature_classifier(classifier: FeatureClassifier, path: str) -> None:
    payload = {
        "config": classifier.config,
        "state_dict": classifier.state_dict(),
        "train_accuracy": classifier.train_accuracy,
        "version": _CLASSIFIER_VERSION,
    }
    fd, tmp_path = tempfile.mkstemp(suffix=".pt", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    torch.save(payload, tmp_path)
    os.replace(tmp_path, path)


def load_feature_classifier(path: str, map_location: Union[str, torch.device] = "cpu") -> FeatureClassifier:
    """Loads a classifier written by `save_feature_classifier` / `train_feature_classifier` (eval mode)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("version") != _CLASSIFIER_VERSION:
        raise ValueError(
            f"{path} was written by classifier version {payload.get('version')}, need {_CLASSIFIER_VERSION}."
        )
    classifier = FeatureClassifier(**payload["config"])
    classifier.load_state_dict(payload["state_dict"])
    classifier.train_accuracy = payload.get("train_accuracy")
    classifier.cache_path = path
    return classifier.eval()


def train_feature_classifier(
    images: ImagesLike,
    labels: Union[Sequence[int], np.ndarray, torch.Tensor],
    *,
    num_classes: Optional[int] = None,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    epochs: int = _CLASSIFIER_EPOCHS,
    batch_size: int = _CLASSIFIER_BATCH_SIZE,
    learning_rate: float = _CLASSIFIER_LEARNING_RATE,
    num_features: int = _CLASSIFIER_NUM_FEATURES,
    width: int = _CLASSIFIER_WIDTH,
    input_size: int = _CLASSIFIER_INPUT_SIZE,
) -> FeatureClassifier:
    """Trains (seeded, CPU, seconds for ~2K small images) a `FeatureClassifier` on real images, or loads it from cache.

    With `cache_dir`, the weights are stored as `feature_classifier_<hash>.pt`, the hash covering the images, labels and
    every hyper-parameter; a later call with the same inputs loads the file (`classifier.loaded_from_cache` is True).
    """
    pixels = to_uint8_nchw(images)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if targets.ndim != 1 or len(targets) != len(pixels):
        raise ValueError(f"Need one label per image: {len(pixels)} images, labels of shape {tuple(targets.shape)}.")
    num_classes = int(targets.max()) + 1 if num_classes is None else num_classes
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"Labels must lie in [0, {num_classes}).")
    hparams = dict(
        num_classes=num_classes, seed=seed, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
        num_features=num_features, width=width, input_size=input_size, version=_CLASSIFIER_VERSION,
    )
    cache_path = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        digest.update(json.dumps(hparams, sort_keys=True).encode())
        digest.update(str(tuple(pixels.shape)).encode())
        digest.update(pixels.numpy().tobytes())
        digest.update(targets.numpy().astype(np.int64).tobytes())
        cache_path = os.path.join(cache_dir, f"feature_classifier_{digest.hexdigest()[:16]}.pt")
        if os.path.isfile(cache_path):
            classifier = load_feature_classifier(cache_path)
            classifier.loaded_from_cache = True
            return classifier

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        classifier = FeatureClassifier(pixels.shape[1], num_classes, num_features, width, input_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    classifier.train()
    inputs = classifier._prepare(pixels)  # resize and normalise once, not every step
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=generator)
        for start in range(0, len(pixels), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(classifier.head(classifier.body(inputs[idx])), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    classifier.eval()
    classifier.train_accuracy = class_accuracy(classifier, pixels, targets)
    if cache_path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        save_feature_classifier(classifier, cache_path)
        classifier.cache_path = cache_path
    return classifier


@torch.no_grad()
def class_accuracy(
    classifier: FeatureClassifier,
    images: ImagesLike,
    labels: Union[Sequence[int], np.ndarray, torch.Tensor],
    *,
    batch_size: int = 256,
) -> float:
    """Share of `images` that `classifier` assigns to their intended class `labels`."""
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(targets) != len(images):
        raise ValueError(f"Need one label per image: {len(images)} images, {len(targets)} labels.")
    device = next(classifier.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = to_uint8_nchw(images[start : start + batch_size]).to(device)
        predicted = classifier.logits(batch).argmax(dim=1).cpu()
        correct += int((predicted == targets[start : start + batch_size]).sum())
    return correct / max(len(targets), 1)


def evaluate_samples(
    real_images: ImagesLike,
    real_labels: Optional[Union[Sequence[int], np.ndarray, torch.Tensor]],
    fake_images: ImagesLike,
    fake_labels: Union[Sequence[int], np.ndarray, torch.Tensor],
    classifier: FeatureClassifier,
    *,
    batch_size: int = 256,
) -> Dict[str, float]:
    """Feature-FID (classifier features) and class accuracy of conditional samples.

    Returns `fid`, `accuracy` (intended class recognised), `real_accuracy` (the same classifier on the real images,
    when `real_labels` is given: the ceiling of `accuracy`), `num_real`, `num_fake`.
    """
    fid = compute_fid(real_images, fake_images, feature_extractor=classifier, batch_size=batch_size)
    result = {
        "fid": fid,
        "accuracy": class_accuracy(classifier, fake_images, fake_labels, batch_size=batch_size),
        "num_real": len(real_images),
        "num_fake": len(fake_images),
    }
    if real_labels is not None:
        result["real_accuracy"] = class_accuracy(classifier, real_images, real_labels, batch_size=batch_size)
    return result

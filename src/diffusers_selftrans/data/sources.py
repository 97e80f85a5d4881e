"""Training data for the example scripts: images through `datasets`, or pre-encoded VAE latent shards.

Scope:
* `add_data_args` adds every data flag to an `argparse` parser (the same flags in both training scripts and in
  `examples/preprocess_latents.py`).
* `ImageSource` opens any image dataset with ONE code path, `datasets.load_dataset`: Hub ids (default
  `ILSVRC/imagenet-1k`, streamed), local `imagefolder` trees, parquet files and webdataset tars (map-style, Arrow
  cached, by default). Images are decoded by us, not by `datasets`, so that a corrupt file is skipped and counted
  instead of killing the run.
* `LatentSource` reads the safetensors shards written by `examples/preprocess_latents.py` (posterior mean/std,
  optionally of the flipped image too) and `check_latent_stats` refuses shards encoded with another VAE.
* `TrainDataStream` is the iterable both training scripts consume: per-process batches forever, sharded by process
  itself (exactly one sharding layer: do NOT pass it to `accelerator.prepare`), with an exact `state_dict` for resume.

Preprocessing follows REPA/ADM (method notes §2.1): ADM center crop, no horizontal flip by default, pixels in [-1, 1].

Unconditional data: a dataset without a label column (or with a single class) gives `num_classes == 1` and every
label is 0; the model then only ever sees class 0 and its null class. Labels are never dropped silently: an image
that sits beside the class folders of an imagefolder tree is skipped with a warning (`ImageSource.stray_files`), and
map-style labels are checked in one vectorised pass at start-up (missing or out-of-range labels are errors that name
the row; classes without examples are a warning).
"""

import argparse
import base64
import bisect
import glob
import io
import itertools
import json
import logging
import math
import os
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
from PIL import Image


logger = logging.getLogger(__name__)

# Default Hub dataset: the official ImageNet-1k parquet repo (gated: accept the terms, then log in or set HF_TOKEN).
DEFAULT_DATASET_NAME = "ILSVRC/imagenet-1k"
# REPA / Self-Transcendence train at 256x256 (method notes §2.1).
DEFAULT_RESOLUTION = 256
# Streaming shuffle buffer. datasets' default is 1000; ImageNet parquet shards are large, so a bigger buffer mixes
# classes better. It holds undecoded JPEG bytes (~110 KB each for ImageNet), i.e. about 1 GB per process.
DEFAULT_SHUFFLE_BUFFER_SIZE = 10_000
# Stop when more than 1% of the images cannot be decoded: ImageNet-1k has none, so this means broken data.
DEFAULT_MAX_SKIP_FRACTION = 0.01
# Streaming data of unknown size: the skip rate is only judged after this many images (or at the end of the first
# epoch), so one bad file early on does not stop a run. Data of known size is judged from the first read instead.
MIN_SAMPLES_FOR_SKIP_CHECK = 1000
# ADM / REPA crop (guided-diffusion `center_crop_arr`, REPA `dataset_tools.py` "center-crop-dhariwal").
CROP_RECIPE = "adm_center_crop"

# Column names tried in order when --image_column / --label_column are not given (imagefolder and ImageNet parquet
# use image/label; webdataset uses the file extension, e.g. jpg/cls).
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class", "class_label")
# `--label_column none` forces unconditional data even when the dataset has labels.
NO_LABEL_VALUES = ("", "none")

# Latent shard layout written by examples/preprocess_latents.py.
LATENT_STATS_FILE = "stats.json"
LATENT_SHARD_GLOB = "latents-*-rank*.safetensors"
LATENT_SHARD_RE = re.compile(r"latents-(\d+)-rank(\d+)\.safetensors$")
LATENT_FORMAT_VERSION = 1
# Decoder-only fine-tunes of the same SD kl-f8 encoder: latents of one are valid for the other (REPA encodes with
# ft-mse and samples with ft-ema, method notes §2.1), so a name mismatch inside this family is only a warning.
SAME_ENCODER_VAES = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")

# What PIL raises for undecodable or truncated files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the data flags shared by the training scripts and `preprocess_latents.py`."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=f"Hub dataset id or local path for `datasets.load_dataset` (default when neither --train_data_dir nor "
        f"--latents_dir is given: {DEFAULT_DATASET_NAME}, gated: log in or pass --hub_token).",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset config (`name=`).")
    group.add_argument("--dataset_split", type=str, default="train", help="Split to read.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Local data: an imagefolder tree (class sub-folders), parquet file(s) or webdataset .tar shards. "
        "With --dataset_name it is passed as `data_dir=`.",
    )
    group.add_argument("--image_column", type=str, default=None, help="Image column (auto-detected if not given).")
    group.add_argument(
        "--label_column",
        type=str,
        default=None,
        help="Label column (auto-detected if not given; 'none' = unconditional: one class, every label 0).",
    )
    group.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="Number of classes when the label column is a plain integer (no ClassLabel), e.g. webdataset `cls` "
        "(required when streaming; map-style default: the largest label + 1, with a warning naming how many classes "
        "have no example). A label outside it is an error naming the row.",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="`datasets` cache directory.")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: HF_TOKEN / cached login).")
    group.add_argument(
        "--latents_dir",
        type=str,
        default=None,
        help="Directory written by examples/preprocess_latents.py; when given, images are not read at all.",
    )
    group.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="Training image resolution.")
    group.add_argument(
        "--random_flip",
        action="store_true",
        help="Random horizontal flips (off by default, as in REPA). With --latents_dir the shards must hold flips.",
    )
    group.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=DEFAULT_SHUFFLE_BUFFER_SIZE,
        help="Shuffle buffer for streaming data (undecoded records).",
    )
    group.add_argument(
        "--max_skip_fraction",
        type=float,
        default=DEFAULT_MAX_SKIP_FRACTION,
        help="Stop when more than this fraction of images cannot be decoded. Judged from the first read when the "
        "dataset size is known (map-style data: each process stops as soon as its skips exceed this fraction of the "
        "images it reads per epoch, later as a fraction of all images read), so small data with broken files stops "
        f"at once and one bad file in a huge dataset does not; streaming data of unknown size is judged after "
        f"{MIN_SAMPLES_FOR_SKIP_CHECK} images and at the end of every epoch.",
    )
    group.add_argument(
        "--streaming",
        dest="streaming",
        action="store_true",
        default=None,
        help="Stream with `load_dataset(..., streaming=True)` (default for Hub ids).",
    )
    group.add_argument(
        "--no_streaming",
        dest="streaming",
        action="store_false",
        help="Map-style Arrow-cached dataset (default for local data).",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Decoding workers per process (0 = decode in the main process). The sample order does not depend on it.",
    )
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Image decoding and preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def open_image(value: Any) -> Image.Image:
    """Open an image from a `datasets` `Image(decode=False)` value (`{"bytes", "path"}`), bytes, a path or a PIL image.

    The pixels are loaded here, so a truncated file raises now (OSError) rather than later.
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        data, path = None, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data = value
        elif isinstance(value, str):
            path = value
        else:
            raise ValueError(f"Unsupported image value of type {type(value).__name__}.")
        if data is not None:
            image = Image.open(io.BytesIO(data))
        elif path is not None and os.path.exists(path):
            image = Image.open(path)
        elif path is not None:
            # Remote path from a streamed dataset (`hf://`, `zip://...`): open it like datasets does.
            from datasets.utils.file_utils import xopen

            with xopen(path, "rb") as f:
                image = Image.open(io.BytesIO(f.read()))
        else:
            raise ValueError("Image value has neither bytes nor path.")
    image.load()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB.

    Grayscale, CMYK, 16-bit and palette images are converted with `Image.convert("RGB")` (as REPA/ADM do). Images with
    transparency (RGBA, LA, palette + transparency) are composited on WHITE: a bare `convert("RGB")` would expose the
    arbitrary colour stored under transparent pixels. ImageNet JPEGs carry no alpha, so this changes nothing there.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits first, PIL's convert would clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def adm_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM center crop: BOX-halve while the short side >= 2 * resolution, BICUBIC-resize the short side to
    `resolution`, then crop the center `resolution` x `resolution` square (REPA `center-crop-dhariwal`)."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    # Repeated 2x box downsampling avoids the aliasing of one big bicubic resize.
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    width, height = image.size
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL image -> float32 (3, H, W) in [-1, 1] (x / 127.5 - 1, as REPA feeds the VAE)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0).contiguous()


def preprocess_image(value: Any, resolution: int) -> torch.Tensor:
    """Open, convert to RGB, ADM-center-crop to `resolution` and scale to [-1, 1]: float32 (3, R, R)."""
    return image_to_tensor(adm_center_crop(to_rgb(open_image(value)), resolution))


class SkipCounter:
    """Counts undecodable images and stops the run once the skip rate passes `max_fraction`.

    The rule, so that small broken data stops at once and one bad file in a huge dataset does not:
    * `expected_per_epoch` known (map-style data: the images this process reads per epoch): judged from the first
      read, against `max(num_read, expected_per_epoch)` images. In the first epoch that is the epoch size, so the
      run stops as soon as the skips alone exceed the allowed share of the data; later it is the rate over everything
      read (a bad file is skipped again every epoch).
    * unknown size (streaming): judged once `min_samples` images were read, and at the end of every epoch
      (`end_of_epoch`), against the images read.
    """

    def __init__(self, max_fraction: float, min_samples: int = MIN_SAMPLES_FOR_SKIP_CHECK, name: str = "data",
                 expected_per_epoch: Optional[int] = None):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_fraction}.")
        if expected_per_epoch is not None and expected_per_epoch <= 0:
            expected_per_epoch = None  # an empty share: nothing to judge against, the streaming rule applies
        self.max_fraction, self.min_samples, self.name = max_fraction, min_samples, name
        self.expected_per_epoch = expected_per_epoch
        self.num_read = 0
        self.num_skipped = 0

    def ok(self) -> None:
        self.num_read += 1
        # With a known size a good read never raises the judged rate; without, the rate is first judged here.
        if self.expected_per_epoch is None and self.num_read == self.min_samples:
            self.check()

    def skip(self, description: str, error: str) -> None:
        self.num_read += 1
        self.num_skipped += 1
        logger.warning(
            f"{self.name}: skipped undecodable image {description} ({error}); "
            f"{self.num_skipped} skipped out of {self.num_read} read so far."
        )
        self.check()

    def end_of_epoch(self) -> None:
        """A whole epoch was read: the rate over the images read is exact, whatever `min_samples`."""
        self.check(whole_epoch=True)

    @property
    def fraction(self) -> float:
        return self.num_skipped / max(self.num_read, 1)

    def check(self, whole_epoch: bool = False) -> None:
        if self.expected_per_epoch is not None and self.num_read <= self.expected_per_epoch:
            # First epoch: at least this share of the data is broken, whatever the rest holds.
            fraction = self.num_skipped / self.expected_per_epoch
            counted = f"{self.num_skipped} of the {self.expected_per_epoch} images this process reads per epoch"
        elif self.expected_per_epoch is not None or whole_epoch or self.num_read >= self.min_samples:
            fraction = self.fraction
            counted = f"{self.num_skipped} of {self.num_read} images"
        else:
            return
        if fraction > self.max_fraction:
            raise RuntimeError(
                f"{self.name}: {counted} could not be decoded ({fraction:.2%} > --max_skip_fraction "
                f"{self.max_fraction:.2%}). The data looks broken; fix it or raise --max_skip_fraction."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Ordered parallel map (exact order whatever the number of workers)
# ---------------------------------------------------------------------------------------------------------------------


def _identity(x):
    return x


class _KeyIterable:
    """A one-shot 'sampler' that hands arbitrary keys (indices or raw records) to DataLoader workers."""

    def __init__(self, keys: Iterable):
        self.keys = keys

    def __iter__(self):
        return iter(self.keys)


def ordered_map(reader: torch.utils.data.Dataset, keys: Iterable, num_workers: int = 0) -> Iterator:
    """Yield `reader[key]` for every key, in key order.

    With workers, a torch DataLoader with `batch_size=None` and the keys as its sampler: the main process hands out the
    keys (map-style indices, or the undecoded records of a stream) and the workers decode. DataLoader returns results
    in sampler order, so the output (and thus exact resume) does not depend on `num_workers`.
    """
    if num_workers < 0:
        raise ValueError(f"dataloader_num_workers must be >= 0, got {num_workers}.")
    if num_workers == 0:
        for key in keys:
            yield reader[key]
        return
    loader = torch.utils.data.DataLoader(
        reader, sampler=_KeyIterable(keys), batch_size=None, num_workers=num_workers, collate_fn=_identity
    )
    yield from loader


# ---------------------------------------------------------------------------------------------------------------------
# Image source: one `load_dataset` path for Hub ids, imagefolder, parquet and webdataset
# ---------------------------------------------------------------------------------------------------------------------


def _is_local(path: Optional[str]) -> bool:
    return path is not None and os.path.exists(path)


def _local_builder(path: str) -> Dict[str, Any]:
    """`load_dataset` arguments for a local file or directory: parquet, webdataset .tar or imagefolder."""
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        builders = {".parquet": "parquet", ".tar": "webdataset", ".arrow": "arrow"}
        if ext not in builders:
            raise ValueError(f"--train_data_dir {path} is a file of unknown type {ext!r} (expected .parquet or .tar).")
        return {"path": builders[ext], "data_files": {"train": [path]}}
    if not os.path.isdir(path):
        raise ValueError(f"--train_data_dir {path} does not exist.")
    for ext, builder in ((".parquet", "parquet"), (".tar", "webdataset")):
        files = sorted(glob.glob(os.path.join(path, "**", f"*{ext}"), recursive=True))
        if files:
            return {"path": builder, "data_files": {"train": files}}
    return {"path": "imagefolder", "data_dir": path}


def _digit_sort_warning(names: List[str]) -> None:
    """imagefolder sorts class folders as strings: warn when numeric folder names end up in a non-numeric order."""
    if names and all(name.isdigit() for name in names) and names != sorted(names, key=int):
        logger.warning(
            f"Class names {names[:6]}{'...' if len(names) > 6 else ''} are numbers sorted as strings: label i is "
            f"the i-th name in string order (e.g. folder '10' comes before '2'), not int(folder). Zero-pad the folder "
            f"names (0000..0999) or use synset names if the label ids must match the folder numbers."
        )


class ImageSource:
    """An image dataset opened with `datasets.load_dataset`, images left undecoded (`Image(decode=False)`).

    Attributes: `dataset` (a `datasets.Dataset` or `IterableDataset`), `streaming`, `image_column`, `label_column`
    (None for unconditional data), `num_classes`, `id2label` (dict int -> str, or None), `num_examples` (from the
    dataset's own metadata when streaming, see `streamed_num_examples`; None when it has none), `reader` (a torch
    Dataset mapping a key to `{"pixel_values", "label"}` or `{"error", "label"}`; a bad label raises `LabelError`),
    `stray_files` (imagefolder images beside or below the class folders, left out).
    """

    is_latent = False

    def __init__(self, args: argparse.Namespace):
        import datasets

        # 1. Where the data comes from.
        dataset_name, data_dir = args.dataset_name, getattr(args, "train_data_dir", None)
        if dataset_name is not None:
            load_kwargs = {"path": dataset_name, "name": getattr(args, "dataset_config_name", None)}
            if data_dir is not None:
                load_kwargs["data_dir"] = data_dir
            local = _is_local(dataset_name) or data_dir is not None
        elif data_dir is not None:
            load_kwargs = _local_builder(data_dir)
            local = True
        else:
            load_kwargs = {"path": DEFAULT_DATASET_NAME, "name": getattr(args, "dataset_config_name", None)}
            local = False
        streaming = getattr(args, "streaming", None)
        self.streaming = (not local) if streaming is None else bool(streaming)
        requested_label = getattr(args, "label_column", None)
        self.stray_files = []
        unconditional = requested_label is not None and requested_label.lower() in NO_LABEL_VALUES
        if load_kwargs["path"] == "imagefolder" and not unconditional:
            # An image beside the class folders would make `datasets` drop every label: leave it out instead.
            load_kwargs, self.stray_files = _without_stray_images(
                load_kwargs, getattr(args, "dataset_split", "train"), getattr(args, "cache_dir", None)
            )

        # 2. One `load_dataset` call for every source.
        dataset = datasets.load_dataset(
            **load_kwargs,
            split=getattr(args, "dataset_split", "train"),
            streaming=self.streaming,
            cache_dir=getattr(args, "cache_dir", None),
            token=getattr(args, "hub_token", None),
        )
        if self.streaming and dataset.features is None:
            dataset = dataset._resolve_features()
        features = dataset.features

        # 3. Columns.
        self.image_column = self._find_image_column(features, getattr(args, "image_column", None))
        self.label_column = self._find_label_column(features, getattr(args, "label_column", None))

        # 4. Classes, from the data: ClassLabel names, or integer labels with --num_classes / a scan of the column.
        num_classes_arg = getattr(args, "num_classes", None)
        self.id2label = None
        if self.label_column is None:
            self.num_classes = 1
            logger.info("No label column: unconditional data, num_classes=1 and every label is 0.")
        else:
            feature = features[self.label_column]
            if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
                if self.streaming:
                    raise ValueError(
                        f"Label column {self.label_column!r} holds strings; streaming needs integer or ClassLabel "
                        f"labels. "
                        f"Use --no_streaming (labels are then encoded in sorted order)."
                    )
                dataset = dataset.class_encode_column(self.label_column)
                feature = dataset.features[self.label_column]
            if isinstance(feature, datasets.ClassLabel):
                self.num_classes = feature.num_classes
                self.id2label = {i: name for i, name in enumerate(feature.names)}
                _digit_sort_warning(list(feature.names))
            elif num_classes_arg is not None:
                self.num_classes = num_classes_arg
            elif not self.streaming:
                self.num_classes = None  # from the scan of the label column below
            else:
                raise ValueError(
                    f"Label column {self.label_column!r} is a plain {feature!r} without class names; pass "
                    f"--num_classes for streaming data."
                )
            if num_classes_arg is not None and self.num_classes is not None and num_classes_arg != self.num_classes:
                raise ValueError(f"--num_classes {num_classes_arg} but the data has {self.num_classes} classes.")

        # 5. We decode ourselves so that a bad file can be caught and skipped.
        dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        keep = [self.image_column] + ([self.label_column] if self.label_column is not None else [])
        dataset = dataset.select_columns(keep)
        self.dataset = dataset

        # 6. Map-style labels are checked now, in one pass, not when a bad row comes up mid-epoch.
        if self.label_column is not None and not self.streaming:
            self.num_classes = _check_label_column(dataset, self.image_column, self.label_column, self.num_classes,
                                                   self.id2label)
        if self.streaming:
            self.num_examples = streamed_num_examples(
                dataset, getattr(args, "dataset_split", "train"), load_kwargs,
                cache_dir=getattr(args, "cache_dir", None), token=getattr(args, "hub_token", None),
            )
        else:
            self.num_examples = len(dataset)
        self.resolution = args.resolution
        self.shuffle_buffer_size = getattr(args, "shuffle_buffer_size", DEFAULT_SHUFFLE_BUFFER_SIZE)
        table = None if self.streaming else dataset
        self.reader = _ImageReader(table, self.image_column, self.label_column, self.num_classes, args.resolution)
        logger.info(
            f"Image data {load_kwargs.get('path')} ({'streaming' if self.streaming else 'map-style'}): "
            f"image column {self.image_column!r}, label column {self.label_column!r}, {self.num_classes} classes"
            + ("" if self.num_examples is None else f", {self.num_examples} examples")
            + "."
        )

    @staticmethod
    def _find_image_column(features, requested: Optional[str]) -> str:
        import datasets

        if requested is not None:
            if requested not in features:
                raise ValueError(f"--image_column {requested!r} not in the dataset columns {list(features)}.")
            return requested
        for name in IMAGE_COLUMN_CANDIDATES:
            if name in features:
                return name
        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                return name
        raise ValueError(f"No image column found in {list(features)}; pass --image_column.")

    @staticmethod
    def _find_label_column(features, requested: Optional[str]) -> Optional[str]:
        import datasets

        if requested is not None:
            if requested.lower() in NO_LABEL_VALUES:
                return None
            if requested not in features:
                raise ValueError(f"--label_column {requested!r} not in the dataset columns {list(features)}.")
            return requested
        for name in LABEL_COLUMN_CANDIDATES:
            if name in features:
                return name
        for name, feature in features.items():
            if isinstance(feature, datasets.ClassLabel):
                return name
        return None

    def epoch_keys(self, epoch: int, seed: int, process_index: int, num_processes: int, *, shuffle: bool = True,
                   drop_remainder: bool = True) -> Iterator:
        """Keys (indices, or raw streamed records) this process reads in `epoch`, in order."""
        if not self.streaming:
            yield from _map_style_keys(self.num_examples, epoch, seed, process_index, num_processes, shuffle,
                                       drop_remainder)
            return
        from datasets.distributed import split_dataset_by_node

        dataset = self.dataset
        if shuffle:
            # Deterministic in (seed, epoch): shard order and buffer draws both come from the seed and the epoch.
            dataset = dataset.shuffle(seed=seed, buffer_size=self.shuffle_buffer_size)
        if num_processes > 1:
            # Whole shards per process when num_shards % num_processes == 0, else every process reads all records and
            # keeps one in num_processes (datasets' rule). Same seed everywhere, so the split is a partition.
            dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        # After the split: split_dataset_by_node returns a new dataset at epoch 0.
        dataset.set_epoch(epoch)
        yield from dataset


def _without_stray_images(load_kwargs: Dict[str, Any], split: str, cache_dir: Optional[str]):
    """imagefolder: leave out the images that sit at another depth than the class folders' images.

    `datasets` infers labels from the parent folders only when every image sits at the same depth; one stray file
    (`data/readme.png` beside `data/cat/`, or `data/cat/extra/x.png`) silently drops all labels. The depth that holds
    the most images (ties: the deepest) is the class-folder depth; the other images are listed in a warning and left
    out. Returns `(load_kwargs, stray_files)`; `load_kwargs` is unchanged when there is nothing to leave out (or when
    a metadata file gives the labels).
    """
    import collections

    import datasets
    from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    builder = datasets.load_dataset_builder(**load_kwargs, cache_dir=cache_dir)
    files = next((list(v) for k, v in (builder.config.data_files or {}).items() if str(k) == split), None)
    if not files or any(os.path.basename(f) in FolderBasedBuilder.METADATA_FILENAMES for f in files):
        return load_kwargs, []
    extensions = {ext.lower() for ext in ImageFolder.EXTENSIONS}
    images = [f for f in files if os.path.splitext(f)[1].lower() in extensions]

    def depth(path):
        return len(os.path.normpath(path).replace("\\", "/").split("/"))

    counts = collections.Counter(depth(f) for f in images)
    if len(counts) <= 1:
        return load_kwargs, []
    class_depth = max(counts, key=lambda d: (counts[d], d))
    stray = sorted(f for f in images if depth(f) != class_depth)
    stray_set = set(stray)
    keep = [f for f in files if f not in stray_set]
    shown = ", ".join(stray[:5]) + (f", ... ({len(stray) - 5} more)" if len(stray) > 5 else "")
    logger.warning(
        f"Left out {len(stray)} file{'s' if len(stray) > 1 else ''} beside or below the class folders of "
        f"{load_kwargs.get('data_dir', 'the image folder')} (an image at another depth would drop every label): "
        f"{shown}. Move them into a class folder, or pass --label_column none to train unconditionally on all images."
    )
    new_kwargs = {k: v for k, v in load_kwargs.items() if k != "data_dir"}
    new_kwargs["data_files"] = {split: keep}
    return new_kwargs, stray


def _check_label_column(dataset, image_column: str, label_column: str, num_classes: Optional[int],
                        id2label: Optional[Dict[int, str]]) -> int:
    """One vectorised pass over a map-style label column: returns the class count.

    Missing, non-integer, negative or >= `num_classes` labels are errors naming the first bad row (index and file
    path). With `num_classes=None` (plain integer labels, no --num_classes) the count is the largest label + 1. Classes
    without any example are a warning that says how many there are.
    """
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")[label_column]  # in row order (honours an indices mapping)

    def row(index, problem):
        value = dataset[int(index)][image_column]
        return LabelError(
            f"Label column {label_column!r}: row {int(index)} ({_describe(value, int(index))}) {problem}. Fix the "
            f"row, or pass --label_column none to train unconditionally."
        )

    if column.null_count:
        raise row(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0], "has no label (None)")
    values = column.to_numpy()
    if values.dtype.kind not in "iub":
        integral = np.isfinite(values) & (values == np.round(values)) if values.dtype.kind == "f" else None
        if integral is None:
            raise LabelError(f"Label column {label_column!r} holds {values.dtype} values, not integer labels.")
        if not integral.all():
            bad = np.flatnonzero(~integral)[0]
            raise row(bad, f"has label {values[bad]!r}, not an integer")
    values = values.astype(np.int64)
    if values.size == 0:
        return num_classes or 1
    from_scan = num_classes is None
    if from_scan:
        num_classes = max(int(values.max()) + 1, 1)
    outside = (values < 0) | (values >= num_classes)
    if outside.any():
        bad = np.flatnonzero(outside)[0]
        source = "the class names" if id2label else "--num_classes"
        raise row(bad, f"has label {int(values[bad])}, outside [0, {num_classes}) ({source})")
    empty = np.flatnonzero(np.bincount(values, minlength=num_classes) == 0)
    if empty.size:
        names = [f"{i} {id2label[i]!r}" if id2label else str(i) for i in empty[:10].tolist()]
        hint = (
            f" The class count comes from the largest label ({num_classes - 1}); if that label is a mistake, pass "
            f"--num_classes (a label outside it is then an error naming the row)."
            if from_scan
            else ""
        )
        logger.warning(
            f"Label column {label_column!r}: {empty.size} of the {num_classes} classes have no example "
            f"({', '.join(names)}{', ...' if empty.size > 10 else ''}): the model gets {num_classes} classes and "
            f"samples of the empty ones will be untrained.{hint}"
        )
    return num_classes


def streamed_num_examples(dataset, split: str, load_kwargs: Optional[Dict[str, Any]] = None, *,
                           cache_dir: Optional[str] = None, token=None) -> Optional[int]:
    """The size of a streamed split from the dataset's own metadata, never from its name; None when it has none.

    1. The split info (`dataset.info.splits[split].num_examples`): for Hub datasets it comes from the `dataset_info`
       YAML of the dataset card (ImageNet-1k's says 1,281,167 train images).
    2. Else, when every data file of the split is parquet (the builder `load_kwargs` resolves them, e.g. a Hub repo
       without card metadata or local files), the sum of `num_rows` in the parquet footers: only the footers are read
       (a few KB per shard over HTTP Range requests), not the data.
    3. Else None (webdataset tars, generator-based datasets): the caller must be given the size or a step count.
    """
    splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
    split_info = splits.get(split) if hasattr(splits, "get") else None
    if split_info is not None and split_info.num_examples:
        return int(split_info.num_examples)
    if not load_kwargs:
        return None
    import datasets

    builder = datasets.load_dataset_builder(**load_kwargs, cache_dir=cache_dir, token=token)
    data_files = (builder.config.data_files or {}).get(split) if builder.config.data_files else None
    if not data_files or not all(str(f).endswith(".parquet") for f in data_files):
        return None
    return sum(parquet_num_rows(f, token=token) for f in data_files)


def parquet_num_rows(path: str, token=None) -> int:
    """Rows of a parquet file (local, `hf://` or any fsspec URL) from its footer, without reading the data."""
    import pyarrow.parquet as pq
    from datasets import DownloadConfig
    from datasets.utils.file_utils import xopen

    with xopen(path, "rb", download_config=DownloadConfig(token=token)) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _map_style_keys(num_examples, epoch, seed, process_index, num_processes, shuffle, drop_remainder):
    """Indices of this process: an exact per-epoch permutation (seed + epoch), then every num_processes-th index.

    With `drop_remainder` the permutation is cut to a multiple of num_processes, so all processes read the same number.
    """
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_examples, generator=generator).tolist()
    else:
        order = range(num_examples)
    if drop_remainder:
        order = order[: (num_examples // num_processes) * num_processes]
    return iter(order[process_index::num_processes])


class _ImageReader(torch.utils.data.Dataset):
    """key (index into the Arrow table, or a streamed record) -> decoded, cropped image and its label."""

    def __init__(self, table, image_column, label_column, num_classes, resolution):
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.num_classes, self.resolution = num_classes, resolution

    def __getitem__(self, key):
        record = self.table[int(key)] if isinstance(key, (int, np.integer)) else key
        value = record[self.image_column]
        label = 0 if self.label_column is None else _checked_label(record[self.label_column], self.num_classes,
                                                                   _describe(value, key))
        try:
            pixel_values = preprocess_image(value, self.resolution)
        except _DECODE_ERRORS as error:
            error = f"{type(error).__name__}: {error}"
            return {"error": error, "label": int(label), "description": _describe(value, key)}
        return {"pixel_values": pixel_values, "label": int(label)}


class LabelError(ValueError):
    """A missing, non-integer or out-of-range label (a ValueError, so callers that catch ValueError still do)."""


def _checked_label(label, num_classes: int, description: str) -> int:
    """`label` as an int in [0, num_classes), else a LabelError naming `description` (the file or row)."""
    if label is None:
        raise LabelError(f"{description} has no label (None).")
    try:
        value = int(label)
    except (TypeError, ValueError):
        value = None
    if value is None or value != label:
        raise LabelError(f"{description} has label {label!r}, not an integer.")
    if not 0 <= value < num_classes:
        raise LabelError(f"{description} has label {value}, outside [0, {num_classes}).")
    return value


def _describe(value, key) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return f"#{key}" if isinstance(key, (int, np.integer)) else "<streamed record>"


# ---------------------------------------------------------------------------------------------------------------------
# Latent shards
# ---------------------------------------------------------------------------------------------------------------------


def latent_shard_name(shard_index: int, rank: int) -> str:
    return f"latents-{shard_index:05d}-rank{rank:03d}.safetensors"


def list_latent_shards(latents_dir: str) -> List[str]:
    """Shard files of a latents directory, in (rank, shard) order: the global example order."""
    files = glob.glob(os.path.join(latents_dir, LATENT_SHARD_GLOB))

    def order(path):
        match = LATENT_SHARD_RE.search(os.path.basename(path))
        return int(match.group(2)), int(match.group(1))

    return sorted((f for f in files if LATENT_SHARD_RE.search(os.path.basename(f))), key=order)


def save_latent_shard(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, Any]) -> None:
    """Write a shard atomically (temp file + rename), so a killed run never leaves a half-written shard."""
    from safetensors.torch import save_file

    tmp_path = f"{path}.tmp-{os.getpid()}"
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, tmp_path, metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp_path, path)


def read_latent_shard_metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def _config_get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _normalize_vae_name(name) -> Optional[str]:
    if not name:
        return None
    name = os.fspath(name)
    return os.path.realpath(name) if os.path.exists(name) else name.rstrip("/")


def check_latent_stats(stats: Dict[str, Any], vae) -> None:
    """Raise a ValueError when latent shards (their `stats.json`) were not encoded by `vae`.

    `vae`: an `AutoencoderKL`, or its config (dict / FrozenDict). Compares latent channels, scaling_factor,
    shift_factor and, when both are Hub ids, the VAE id (local paths cannot be compared by name: only a warning then).
    """
    config = vae.config if hasattr(vae, "config") else vae
    problems = []
    channels, stored = _config_get(config, "latent_channels"), stats.get("latent_channels")
    if channels is not None and stored is not None and int(channels) != int(stored):
        problems.append(f"latent channels {stored} (shards) vs {channels} (VAE)")
    for key in ("scaling_factor", "shift_factor"):
        mine = _config_get(config, key)
        mine = 0.0 if (mine is None and key == "shift_factor") else mine
        theirs = stats.get(key)
        theirs = 0.0 if (theirs is None and key == "shift_factor") else theirs
        if mine is not None and theirs is not None and not math.isclose(float(mine), float(theirs), rel_tol=1e-6):
            problems.append(f"{key} {theirs} (shards) vs {mine} (VAE)")
    shard_name = _normalize_vae_name(stats.get("vae_name_or_path"))
    vae_name = _normalize_vae_name(_config_get(config, "_name_or_path"))
    if shard_name and vae_name and shard_name != vae_name:
        if _is_local(shard_name) or _is_local(vae_name):
            logger.warning(f"Latents were encoded with VAE {shard_name!r}; training with {vae_name!r} (not compared).")
        elif shard_name in SAME_ENCODER_VAES and vae_name in SAME_ENCODER_VAES:
            logger.warning(
                f"Latents were encoded with {shard_name!r}, the VAE is {vae_name!r}: same encoder (decoder-only "
                f"fine-tunes), so the latents are valid."
            )
        else:
            problems.append(f"VAE {shard_name!r} (shards) vs {vae_name!r}")
    if problems:
        raise ValueError(
            f"The latent shards in {stats.get('latents_dir', 'the latents directory')} were encoded with a different "
            f"VAE: {'; '.join(problems)}. Re-run examples/preprocess_latents.py with this VAE or pass the matching "
            f"VAE."
        )


class LatentSource:
    """Pre-encoded latents (`examples/preprocess_latents.py`): map-style, indexed in (rank, shard, row) order."""

    is_latent = True
    streaming = False

    def __init__(self, latents_dir: str):
        from safetensors import safe_open

        stats_path = os.path.join(latents_dir, LATENT_STATS_FILE)
        if not os.path.isfile(stats_path):
            raise ValueError(
                f"{stats_path} not found: {latents_dir} is not a finished preprocess_latents.py output (the stats "
                f"file is written last; re-run the preprocessing, it resumes)."
            )
        with open(stats_path) as f:
            self.stats = json.load(f)
        self.stats["latents_dir"] = latents_dir
        self.files = list_latent_shards(latents_dir)
        if self.stats.get("num_shards") is not None and len(self.files) != int(self.stats["num_shards"]):
            raise ValueError(
                f"{latents_dir}: stats.json lists {self.stats['num_shards']} shards, found {len(self.files)}."
            )
        self.has_flip = bool(self.stats.get("flip"))
        labels, offsets, total = [], [], 0
        for path in self.files:
            with safe_open(path, framework="pt") as f:
                shard_labels = f.get_tensor("class_labels").long()
            offsets.append(total)
            total += shard_labels.numel()
            labels.append(shard_labels)
        if total == 0:
            raise ValueError(f"{latents_dir} holds no latents.")
        if self.stats.get("count") is not None and int(self.stats["count"]) != total:
            raise ValueError(f"{latents_dir}: stats.json count {self.stats['count']} but the shards hold {total}.")
        self.class_labels = torch.cat(labels)
        self.num_examples = total
        self.num_classes = int(self.stats.get("num_classes") or 1)
        id2label = self.stats.get("id2label")
        self.id2label = None if id2label is None else {int(k): v for k, v in id2label.items()}
        self.reader = _LatentReader(self.files, offsets, self.has_flip)

    def epoch_keys(self, epoch, seed, process_index, num_processes, *, shuffle=True, drop_remainder=True):
        return _map_style_keys(self.num_examples, epoch, seed, process_index, num_processes, shuffle, drop_remainder)


class _LatentReader(torch.utils.data.Dataset):
    """index -> posterior moments (and those of the flipped image) and label, read from memory-mapped shards."""

    def __init__(self, files, offsets, has_flip):
        self.files, self.offsets, self.has_flip = files, offsets, has_flip
        self._handles = {}

    def __getstate__(self):
        # safetensors handles cannot be pickled: each worker opens its own.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __getitem__(self, index):
        from safetensors import safe_open

        shard = bisect.bisect_right(self.offsets, int(index)) - 1
        row = int(index) - self.offsets[shard]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(self.files[shard], framework="pt")
        names = ["latent_mean", "latent_std", "class_labels"]
        if self.has_flip:
            names += ["latent_mean_flip", "latent_std_flip"]
        return {name: handle.get_slice(name)[row : row + 1][0] for name in names}


# ---------------------------------------------------------------------------------------------------------------------
# The training stream
# ---------------------------------------------------------------------------------------------------------------------


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


class TrainDataStream:
    """Per-process training batches, forever, with exact resume.

    Args:
        args: parsed flags from `add_data_args`.
        batch_size: per-process batch size.
        process_index, num_processes: this process and the world size (`accelerator.process_index`,
            `accelerator.num_processes`). The stream shards by process itself: do NOT pass it to `accelerator.prepare`.
        seed: shuffling (per-epoch permutation / streaming shuffle seed + epoch) and flip seed.
        vae_config: an `AutoencoderKL` or its config; with `--latents_dir` the shards are checked against it.
        min_samples_for_skip_check: images read before the skip rate is judged, for streaming data of unknown size
            (map-style data is judged from the first read against its size; see `SkipCounter`).

    Batches (CPU tensors; move them to the device yourself):
        images:  {"pixel_values": float32 (B, 3, R, R) in [-1, 1], "class_labels": int64 (B,)}
        latents: {"latent_mean": float32 (B, C, h, w), "latent_std": float32 (B, C, h, w), "class_labels": int64 (B,)}
                 (raw posterior moments: the training script samples z = mean + std * randn and applies the VAE
                 scaling/shift from `latent_stats`; with --random_flip the flipped moments are picked with p=0.5).

    Epochs: map-style data (local datasets, latents) uses an exact permutation per epoch (seed + epoch) cut to a
    multiple of num_processes; process p reads every num_processes-th index from position p, so each example is read
    exactly once per epoch and every process gets the same number of batches. The last partial batch of each process
    is dropped (at most batch_size - 1 examples per process and epoch). Undecodable images are skipped and the batch is
    filled from the next records, so with bad files a process may end an epoch one batch early; the stream is
    infinite, so steps stay in lockstep anyway. Streaming data is shuffled deterministically in (seed, epoch) and split
    across processes with `datasets.distributed.split_dataset_by_node` (whole shards when num_shards % num_processes
    == 0, which may give processes different epoch lengths; otherwise one record in num_processes).

    Resume: `state_dict()` (taken between batches) holds the epoch, the number of records this process consumed in it,
    the counters and the flip RNG; a stream restored with `load_state_dict` yields exactly the batches the
    uninterrupted stream would have yielded. Map-style data resumes instantly; streaming data re-reads (without
    decoding) the consumed records of the current epoch, because datasets' own stream state drops the shuffle buffer
    (cost: reading up to one epoch of this process's raw records once per resume). Each process has its own state:
    save it per process (`save_state` / `load_state` write `data_state_rank{i}.json`;
    `accelerator.register_for_checkpointing` would keep only the main process's state). `dataloader_num_workers`
    does not change the order, so it may differ on resume.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        batch_size: int,
        *,
        process_index: int = 0,
        num_processes: int = 1,
        seed: int = 0,
        vae_config=None,
        min_samples_for_skip_check: int = MIN_SAMPLES_FOR_SKIP_CHECK,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} not in [0, {num_processes}).")
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.random_flip = bool(getattr(args, "random_flip", False))
        self.num_workers = int(getattr(args, "dataloader_num_workers", 0) or 0)

        latents_dir = getattr(args, "latents_dir", None)
        if latents_dir:
            self.source = LatentSource(latents_dir)
            self.latent_stats = self.source.stats
            resolution = getattr(args, "resolution", None)
            if resolution is not None and self.latent_stats.get("resolution") not in (None, resolution):
                raise ValueError(
                    f"--resolution {resolution} but the latents in {latents_dir} were encoded at "
                    f"{self.latent_stats['resolution']}."
                )
            if vae_config is not None:
                check_latent_stats(self.latent_stats, vae_config)
            if self.random_flip and not self.source.has_flip:
                raise ValueError(
                    f"--random_flip needs flipped latents, but {latents_dir} was encoded without --with_flip. "
                    f"Re-encode with --with_flip or drop --random_flip."
                )
        else:
            self.source = ImageSource(args)
            self.latent_stats = None
        self.is_latent = self.source.is_latent
        self.num_classes = self.source.num_classes
        self.id2label = self.source.id2label
        self.num_examples = self.source.num_examples
        self.streaming = self.source.streaming

        self.skips = SkipCounter(
            getattr(args, "max_skip_fraction", DEFAULT_MAX_SKIP_FRACTION),
            min_samples_for_skip_check,
            name=f"process {process_index}",
            # Map-style: the records this process reads per epoch (see `_map_style_keys`); streaming: unknown.
            expected_per_epoch=None if self.num_examples is None else self.num_examples // num_processes,
        )
        # Flip decisions come from one generator per process, kept in the state dict.
        self._generator = torch.Generator().manual_seed((seed << 16) + process_index)
        self.epoch = 0
        self.samples_seen = 0
        self._position = 0  # records of the current epoch consumed by yielded batches
        self._snapshot = self._make_snapshot()

    @property
    def batches_per_epoch(self) -> Optional[int]:
        """Full batches per process and epoch (map-style data without skips); None when streaming."""
        if self.num_examples is None or self.streaming:  # streams split by shard: lengths differ
            return None
        return (self.num_examples // self.num_processes) // self.batch_size

    # -- iteration -------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches from the current state on; one live iterator at a time (it advances the stream's state)."""
        # Start from the last yielded batch: records an abandoned iterator read past it are read (and counted) again.
        self.skips.num_read, self.skips.num_skipped = self._snapshot["num_read"], self._snapshot["num_skipped"]
        while True:
            yielded = False
            for batch in self._epoch_batches():
                yielded = True
                yield batch
            if not self.is_latent:
                self.skips.end_of_epoch()
            if not yielded and self._position == 0:
                raise ValueError(
                    f"Process {self.process_index} got no full batch of {self.batch_size} in epoch {self.epoch}: "
                    f"the dataset is too small for batch_size x num_processes."
                )
            self.epoch += 1
            self._position = 0
            self._snapshot = self._make_snapshot()

    def _epoch_batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        keys = self.source.epoch_keys(self.epoch, self.seed, self.process_index, self.num_processes)
        # Resume: skip the records consumed before the checkpoint (for streams: read, not decoded).
        keys = itertools.islice(keys, self._position, None)
        consumed = self._position
        items = []
        records = ordered_map(self.source.reader, keys, self.num_workers)
        while True:
            try:
                item = next(records, None)
            except LabelError as error:
                raise LabelError(
                    f"Bad label in record {consumed} of epoch {self.epoch} read by process {self.process_index} "
                    f"(counted from 0 in this process's order of the epoch): {error}"
                ) from error
            if item is None:
                break
            consumed += 1
            if "error" in item:
                self.skips.skip(item["description"], item["error"])
                continue
            if not self.is_latent:
                self.skips.ok()
            items.append(item)
            if len(items) == self.batch_size:
                batch = self._collate(items)
                items = []
                self._position = consumed
                self.samples_seen += self.batch_size
                self._snapshot = self._make_snapshot()
                yield batch

    def _collate(self, items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        flips = None
        if self.random_flip:
            flips = torch.rand(len(items), generator=self._generator) < 0.5
        if self.is_latent:
            labels = torch.stack([item["class_labels"] for item in items]).long()
            mean = torch.stack([item["latent_mean"] for item in items]).float()
            std = torch.stack([item["latent_std"] for item in items]).float()
            if flips is not None:
                view = flips.view(-1, 1, 1, 1)
                mean = torch.where(view, torch.stack([item["latent_mean_flip"] for item in items]).float(), mean)
                std = torch.where(view, torch.stack([item["latent_std_flip"] for item in items]).float(), std)
            return {"latent_mean": mean, "latent_std": std, "class_labels": labels}
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        if flips is not None:
            pixel_values = torch.where(flips.view(-1, 1, 1, 1), pixel_values.flip(-1), pixel_values)
        labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return {"pixel_values": pixel_values, "class_labels": labels}

    # -- state -----------------------------------------------------------------------------------------------------

    def _make_snapshot(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self._position,
            "samples_seen": self.samples_seen,
            "num_read": self.skips.num_read,
            "num_skipped": self.skips.num_skipped,
            "rng_state": _encode_rng(self._generator.get_state()),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "process_index": self.process_index,
            "num_processes": self.num_processes,
            "is_latent": self.is_latent,
            "streaming": self.streaming,
            "num_examples": self.num_examples,
        }

    def state_dict(self) -> Dict[str, Any]:
        """JSON-friendly state as of the last yielded batch."""
        return dict(self._snapshot)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a `state_dict()`; the next `iter()` continues exactly after the saved batch.

        If the batch size, world size, seed or data changed, an exact resume is impossible: the stream warns and
        restarts at the beginning of the saved epoch (counters kept).
        """
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state["samples_seen"])
        self.skips.num_read, self.skips.num_skipped = int(state["num_read"]), int(state["num_skipped"])
        keys = ("seed", "batch_size", "process_index", "num_processes", "is_latent", "streaming", "num_examples")
        changed = [k for k in keys if state.get(k) != getattr(self, k)]
        if changed:
            changes = ", ".join(f"{k}: {state.get(k)} -> {getattr(self, k)}" for k in changed)
            logger.warning(
                f"Data stream settings changed since the checkpoint ({changes}): no exact resume, restarting epoch "
                f"{self.epoch} from its beginning."
            )
            self._position = 0
        else:
            self._position = int(state["position"])
            self._generator.set_state(_decode_rng(state["rng_state"]))
        self._snapshot = self._make_snapshot()

    def save_state(self, output_dir: str) -> str:
        """Write this process's state to `output_dir/data_state_rank{process_index}.json` (call on every process)."""
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, f"data_state_rank{self.process_index}.json")
        with open(path, "w") as f:
            json.dump(self.state_dict(), f)
        return path

    def load_state(self, input_dir: str) -> None:
        """Read the state written by `save_state` for this process."""
        path = os.path.join(input_dir, f"data_state_rank{self.process_index}.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} not found: the checkpoint has no data state for process {self.process_index} (was it written "
                f"with fewer processes?)."
            )
        with open(path) as f:
            self.load_state_dict(json.load(f))

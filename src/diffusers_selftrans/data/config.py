"""The data settings: `DataConfig` (what the library takes; `cli.add_data_args` defines the same settings as flags).

`ImageSource` and `TrainDataStream` take a `DataConfig`; scripts parse the flags of `add_data_args` and convert
once with `DataConfig.from_namespace(args)`.
"""

import argparse
import dataclasses
import os
from typing import Optional


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
# Decoding workers when `--dataloader_num_workers` is not given, for images: one JPEG worker (decode, RGB, ADM crop,
# flip, to tensor at 256 px) reads ~191 img/s per core and SiT-B/2's stage 2 takes ~214 img/s per GPU (paper §4.5),
# i.e. ~1.1 cores per GPU (benchmarks/results/data_throughput). The cap leaves headroom for slower cores, larger
# originals or faster models without starting dozens of processes on a big node.
MAX_AUTO_NUM_WORKERS = 8


def default_num_workers(latents: bool) -> int:
    """Decoding workers per process when none are given: 0 for pre-encoded latents (the training process reads one
    ~200x faster than a worker can hand it over: benchmarks/results/data_throughput); for images the cores of this
    process (the machine's usable cores / `LOCAL_WORLD_SIZE`) minus one for the training loop, between 1 and
    `MAX_AUTO_NUM_WORKERS`."""
    if latents:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(MAX_AUTO_NUM_WORKERS, max(1, per_process - 1))


@dataclasses.dataclass
class DataConfig:
    """Where the training data comes from and how it is read; the fields are the flags of `add_data_args`, with the
    same defaults (see their help for details). Build one directly in a notebook, or with `from_namespace` in a script.

    Images with class labels (the SiT scripts) or with captions (`caption_column`, the text-to-image script): one
    source and one stream for both; data with a caption column is read without labels.
    """

    dataset_name: Optional[str] = None  # Hub id or local path for `load_dataset` (default: DEFAULT_DATASET_NAME)
    dataset_config_name: Optional[str] = None  # the dataset config (`name=`)
    dataset_split: str = "train"  # split to read
    train_data_dir: Optional[str] = None  # local imagefolder tree, parquet file(s) or webdataset .tar shards
    image_column: Optional[str] = None  # image column (auto-detected when None)
    label_column: Optional[str] = None  # label column (auto-detected when None; "none" = unconditional)
    # caption column: text-to-image data, batches of captions instead of labels (None: class-conditional data)
    caption_column: Optional[str] = None
    num_classes: Optional[int] = None  # class count for plain integer labels (required when streaming them)
    cache_dir: Optional[str] = None  # `datasets` cache directory
    hub_token: Optional[str] = None  # Hub token (default: HF_TOKEN / cached login)
    latents_dir: Optional[str] = None  # output of examples/preprocess_latents.py; images are then not read at all
    resolution: int = DEFAULT_RESOLUTION  # training image resolution
    random_flip: bool = False  # random horizontal flips (off, as in REPA); latents must then hold flips
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE  # shuffle buffer for streaming data (undecoded records)
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION  # stop when more images than this cannot be decoded
    streaming: Optional[bool] = None  # `load_dataset(streaming=...)`; None: stream Hub ids, not local data
    # decoding workers per process (0 = main process; None = `default_num_workers`); the order does not change
    dataloader_num_workers: Optional[int] = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "DataConfig":
        """The data settings of a namespace parsed with `add_data_args` (its other attributes are ignored)."""
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if not hasattr(args, name)]
        if missing:
            raise ValueError(f"The namespace lacks the data settings {missing}: parse it with `add_data_args`.")
        return cls(**{name: getattr(args, name) for name in names})


def check_data_config(config) -> None:
    """A clear error for the old calling convention (the scripts' namespace instead of a `DataConfig`)."""
    if not isinstance(config, DataConfig):
        raise TypeError(
            f"Expected a DataConfig, got {type(config).__name__}; convert parsed flags with "
            f"`DataConfig.from_namespace(args)`."
        )

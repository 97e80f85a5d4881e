"""Image datasets through ONE code path, `datasets.load_dataset`: Hub ids (default `ILSVRC/imagenet-1k`, streamed),
local `imagefolder` trees, parquet files and webdataset tars (map-style, Arrow cached, by default).

Images are decoded by us (`images.py`), not by `datasets`, so that a corrupt file is skipped and counted instead of
killing the run. Each image comes with a class label, or with its captions (text-to-image data: `caption_column`;
labels are then not read). Unconditional data: a dataset without a label column (or with a single class) gives
`num_classes == 1` and every label is 0. Labels are never dropped silently: an image that sits beside the class
folders of an imagefolder tree is skipped with a warning (`ImageSource.stray_files`), and map-style labels are checked
in one vectorised pass at start-up (missing or out-of-range labels are errors that name the row; classes without
examples are a warning). Captions are checked the same way: a string, or a non-empty list of strings, per record
(map-style data at start-up in one pass, streamed records when read); anything else is an error naming the record.
"""

import glob
import logging
import os
import reprlib
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from .config import DEFAULT_DATASET_NAME, DataConfig, check_data_config
from .images import _DECODE_ERRORS, preprocess_image


logger = logging.getLogger(__name__)

# Column names tried in order when --image_column / --label_column are not given (imagefolder and ImageNet parquet
# use image/label; webdataset uses the file extension, e.g. jpg/cls).
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class", "class_label")
# `--label_column none` forces unconditional data even when the dataset has labels.
NO_LABEL_VALUES = ("", "none")


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
    (None for unconditional and for caption data), `caption_column` (None for class-conditional data), `num_classes`
    (None for caption data), `id2label` (dict int -> str, or None), `num_examples` (from the dataset's own metadata
    when streaming, see `streamed_num_examples`; None when it has none), `reader` (a torch Dataset mapping a key to
    `{"pixel_values", "label"}`, or `{"pixel_values", "captions"}` with every caption of the record as a list of
    strings, or `{"error", "description", ...}` for an undecodable image; a bad label raises `LabelError`, a bad
    caption `CaptionError`), `stray_files` (imagefolder images beside or below the class folders, left out).
    `config`: a `DataConfig` (its latents_dir, random_flip, max_skip_fraction and dataloader_num_workers are the
    stream's, unused here).
    """

    is_latent = False

    def __init__(self, config: DataConfig):
        import datasets

        check_data_config(config)

        # 1. Where the data comes from.
        dataset_name, data_dir = config.dataset_name, config.train_data_dir
        if dataset_name is not None:
            load_kwargs = {"path": dataset_name, "name": config.dataset_config_name}
            if data_dir is not None:
                load_kwargs["data_dir"] = data_dir
            local = _is_local(dataset_name) or data_dir is not None
        elif data_dir is not None:
            load_kwargs = _local_builder(data_dir)
            local = True
        else:
            load_kwargs = {"path": DEFAULT_DATASET_NAME, "name": config.dataset_config_name}
            local = False
        streaming = config.streaming
        self.streaming = (not local) if streaming is None else bool(streaming)
        requested_label = config.label_column
        captions = config.caption_column is not None
        if captions and requested_label is not None and requested_label.lower() not in NO_LABEL_VALUES:
            raise ValueError(
                f"--label_column {requested_label!r} and --caption_column {config.caption_column!r}: a dataset is read "
                f"with labels or with captions, not both."
            )
        self.stray_files = []
        no_labels = captions or (requested_label is not None and requested_label.lower() in NO_LABEL_VALUES)
        if load_kwargs["path"] == "imagefolder" and not no_labels:
            # An image beside the class folders would make `datasets` drop every label: leave it out instead.
            load_kwargs, self.stray_files = _without_stray_images(
                load_kwargs, config.dataset_split, config.cache_dir
            )

        # 2. One `load_dataset` call for every source.
        dataset = datasets.load_dataset(
            **load_kwargs,
            split=config.dataset_split,
            streaming=self.streaming,
            cache_dir=config.cache_dir,
            token=config.hub_token,
        )
        if self.streaming and dataset.features is None:
            dataset = dataset._resolve_features()
        features = dataset.features

        # 3. Columns.
        self.image_column = self._find_image_column(features, config.image_column)
        self.caption_column = self._find_caption_column(features, config.caption_column)
        self.label_column = None if captions else self._find_label_column(features, config.label_column)

        # 4. Classes, from the data: ClassLabel names, or integer labels with --num_classes / a scan of the column.
        num_classes_arg = config.num_classes
        self.id2label = None
        if self.caption_column is not None:
            self.num_classes = None  # captions, no classes
        elif self.label_column is None:
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
        keep = [self.image_column] + [c for c in (self.label_column, self.caption_column) if c is not None]
        dataset = dataset.select_columns(keep)
        self.dataset = dataset

        # 6. Map-style labels and captions are checked now, in one pass, not when a bad row comes up mid-epoch.
        if self.label_column is not None and not self.streaming:
            self.num_classes = _check_label_column(dataset, self.image_column, self.label_column, self.num_classes,
                                                   self.id2label)
        if self.caption_column is not None and not self.streaming:
            _check_caption_column(dataset, self.image_column, self.caption_column)
        if self.streaming:
            self.num_examples = streamed_num_examples(
                dataset, config.dataset_split, load_kwargs,
                cache_dir=config.cache_dir, token=config.hub_token,
            )
        else:
            self.num_examples = len(dataset)
        self.resolution = config.resolution
        self.shuffle_buffer_size = config.shuffle_buffer_size
        table = None if self.streaming else dataset
        self.reader = _ImageReader(table, self.image_column, self.label_column, self.num_classes, config.resolution,
                                   caption_column=self.caption_column)
        targets = (
            f"caption column {self.caption_column!r}"
            if self.caption_column is not None
            else f"label column {self.label_column!r}, {self.num_classes} classes"
        )
        logger.info(
            f"Image data {load_kwargs.get('path')} ({'streaming' if self.streaming else 'map-style'}): "
            f"image column {self.image_column!r}, {targets}"
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
    def _find_caption_column(features, requested: Optional[str]) -> Optional[str]:
        if requested is not None and requested not in features:
            raise ValueError(f"--caption_column {requested!r} not in the dataset columns {list(features)}.")
        return requested

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


    def all_captions(self, process_index: int = 0, num_processes: int = 1) -> Iterator[str]:
        """Every caption of the data, without decoding an image: record i's (all of its captions) goes to process
        i % num_processes, so the processes share one pass (e.g. to encode every caption once before training).
        Bad captions raise `CaptionError` naming the record."""
        if self.caption_column is None:
            raise ValueError("all_captions needs caption data (a caption_column).")
        if not self.streaming:
            column = self.dataset.with_format("arrow")[self.caption_column].to_pylist()
            records = ((i, value) for i, value in enumerate(column) if i % num_processes == process_index)
        else:
            stream = self.dataset.select_columns([self.caption_column])
            records = ((i, row[self.caption_column]) for i, row in enumerate(stream) if i % num_processes == process_index)
        for index, value in records:
            yield from _checked_captions(value, f"record {index}")


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


def _check_caption_column(dataset, image_column: str, caption_column: str) -> None:
    """One vectorised pass over a map-style caption column: every row holds a string or a non-empty list of strings.

    Anything else (a missing caption, an empty list, a list with a missing entry, a column of numbers) is a
    `CaptionError` naming the first bad row (index and file path).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")[caption_column]  # in row order (honours an indices mapping)
    if len(column) == 0:
        return

    def row(index, problem):
        record = dataset[int(index)]
        return CaptionError(
            f"Caption column {caption_column!r}: row {int(index)} ({_describe(record[image_column], int(index))}) has "
            f"caption {reprlib.repr(record[caption_column])}, {problem}. Fix the row, or pass the column that holds "
            f"the captions as --caption_column."
        )

    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if column.null_count:
            raise row(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0], "not a string")
        return
    if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
            and (pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type))):
        raise row(0, f"not a string or a list of strings (the column holds {kind} values)")
    # null rows have a null length: filled as 0, i.e. an empty list
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    bad = lengths == 0
    elements = pc.list_flatten(column)
    if elements.null_count:  # a missing entry inside a list: mark its row
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        bad[parents[pc.is_null(elements).to_numpy(zero_copy_only=False)]] = True
    if bad.any():
        raise row(np.flatnonzero(bad)[0], "not a string or a non-empty list of strings")


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
    """key (index into the Arrow table, or a streamed record) -> decoded, cropped image and its label, or its
    captions (all of them: the stream picks one, in order, so that the choice is part of its resumable state)."""

    def __init__(self, table, image_column, label_column, num_classes, resolution, caption_column=None):
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.num_classes, self.resolution, self.caption_column = num_classes, resolution, caption_column

    def __getitem__(self, key):
        record = self.table[int(key)] if isinstance(key, (int, np.integer)) else key
        value = record[self.image_column]
        if self.caption_column is not None:
            target = {"captions": _checked_captions(record[self.caption_column], _describe(value, key))}
        else:
            label = 0 if self.label_column is None else _checked_label(record[self.label_column], self.num_classes,
                                                                       _describe(value, key))
            target = {"label": int(label)}
        try:
            pixel_values = preprocess_image(value, self.resolution)
        except _DECODE_ERRORS as error:
            error = f"{type(error).__name__}: {error}"
            return {"error": error, "description": _describe(value, key), **target}
        return {"pixel_values": pixel_values, **target}


class LabelError(ValueError):
    """A missing, non-integer or out-of-range label (a ValueError, so callers that catch ValueError still do)."""

    what = "label"


class CaptionError(ValueError):
    """A caption that is neither a string nor a non-empty list of strings (a ValueError, like `LabelError`)."""

    what = "caption"


def _checked_captions(value, description: str) -> List[str]:
    """The captions of a record as a non-empty list of strings, else a CaptionError naming `description`."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(caption, str) for caption in value):
        return list(value)
    raise CaptionError(
        f"{description} has caption {reprlib.repr(value)}, not a string or a non-empty list of strings."
    )


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

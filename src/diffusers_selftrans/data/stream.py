"""`TrainDataStream`, the iterable every training script consumes (images with labels or captions, or latents):
per-process batches forever, sharded by process itself (exactly one sharding layer: do NOT pass it to
`accelerator.prepare`), with an exact `state_dict` for resume; `SkipCounter` (the undecodable-image budget) and
`ordered_map` (parallel decoding in key order)."""

import base64
import itertools
import json
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch

from .config import MIN_SAMPLES_FOR_SKIP_CHECK, DataConfig, check_data_config, default_num_workers
from .latents import LatentSource, check_latent_stats
from .sources import CaptionError, ImageSource, LabelError


logger = logging.getLogger(__name__)

# Mixed into the flip generator's seed to seed the caption-choice generator (any constant other than 0 would do).
CAPTION_SEED_SALT = 0x5EED_CA97


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
    # A private generator for the workers' base seed: the default one would take a draw from the global RNG at every
    # epoch start and at a resume, so a resumed run's noise would differ from the uninterrupted run's.
    loader = torch.utils.data.DataLoader(
        reader, sampler=_KeyIterable(keys), batch_size=None, num_workers=num_workers, collate_fn=_identity,
        generator=torch.Generator().manual_seed(0),
    )
    yield from loader


def _original_message(error: Exception) -> str:
    """The message of an error raised in a DataLoader worker, without the worker traceback torch wraps around it."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]  # "package.module.LabelError: <the message>"
    return last.split(": ", 1)[1] if ": " in last else last


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


class TrainDataStream:
    """Per-process training batches, forever, with exact resume.

    Args:
        config: the data settings, a `DataConfig` (scripts: `DataConfig.from_namespace(args)` after `add_data_args`).
        batch_size: per-process batch size.
        process_index, num_processes: this process and the world size (`accelerator.process_index`,
            `accelerator.num_processes`). The stream shards by process itself: do NOT pass it to `accelerator.prepare`.
        seed: shuffling (per-epoch permutation / streaming shuffle seed + epoch), flip and caption-choice seed.
        vae_config: an `AutoencoderKL` or its config; with `--latents_dir` the shards are checked against it.
        min_samples_for_skip_check: images read before the skip rate is judged, for streaming data of unknown size
            (map-style data is judged from the first read against its size; see `SkipCounter`).

    Batches (CPU tensors; move them to the device yourself):
        images:  {"pixel_values": float32 (B, 3, R, R) in [-1, 1], "class_labels": int64 (B,)}
        images with captions (`caption_column`): {"pixel_values": as above, "captions": list of B strings}
                 (a record with several captions, e.g. COCO's five, gives one of them, picked uniformly at random
                 per sample and anew each time the record is read, as the released T2I code does; the choice comes
                 from a generator of the stream's state, so a resumed run picks the same captions)
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
    the counters, the flip RNG and (caption data) the caption-choice RNG; a stream restored with `load_state_dict`
    yields exactly the batches the uninterrupted stream would have yielded. Map-style data resumes instantly; streaming
    data re-reads (without decoding) the consumed records of the current epoch, because datasets' own stream state
    drops the shuffle buffer (cost: reading up to one epoch of this process's raw records once per resume). Each
    process has its own state: save it per process (`save_state` / `load_state` write `data_state_rank{i}.json`;
    `accelerator.register_for_checkpointing` would keep only the main process's state). `dataloader_num_workers`
    does not change the order, so it may differ on resume.
    """

    def __init__(
        self,
        config: DataConfig,
        batch_size: int,
        *,
        process_index: int = 0,
        num_processes: int = 1,
        seed: int = 0,
        vae_config=None,
        min_samples_for_skip_check: int = MIN_SAMPLES_FOR_SKIP_CHECK,
    ):
        check_data_config(config)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} not in [0, {num_processes}).")
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.random_flip = bool(config.random_flip)

        latents_dir = config.latents_dir
        if latents_dir and config.caption_column is not None:
            raise ValueError(f"--caption_column {config.caption_column!r} with --latents_dir: latent shards hold no "
                             f"captions; train on the images.")
        if latents_dir:
            self.source = LatentSource(latents_dir)
            self.latent_stats = self.source.stats
            resolution = config.resolution
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
            self.source = ImageSource(config)
            self.latent_stats = None
        self.is_latent = self.source.is_latent
        workers = config.dataloader_num_workers
        self.num_workers = default_num_workers(self.is_latent) if workers is None else int(workers)
        self.num_classes = self.source.num_classes
        self.id2label = self.source.id2label
        self.caption_column = getattr(self.source, "caption_column", None)  # None: labels (or latents)
        self.num_examples = self.source.num_examples
        self.streaming = self.source.streaming

        self.skips = SkipCounter(
            config.max_skip_fraction,
            min_samples_for_skip_check,
            name=f"process {process_index}",
            # Map-style: the records this process reads per epoch (see `_map_style_keys`); streaming: unknown.
            expected_per_epoch=None if self.num_examples is None else self.num_examples // num_processes,
        )
        # Flip decisions come from one generator per process, kept in the state dict; caption choices from another
        # (so flips do not depend on how many captions the records have).
        self._generator = torch.Generator().manual_seed((seed << 16) + process_index)
        self._caption_generator = None
        if self.caption_column is not None:
            self._caption_generator = torch.Generator().manual_seed(((seed << 16) + process_index) ^ CAPTION_SEED_SALT)
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
            except (LabelError, CaptionError) as error:
                raise type(error)(
                    f"Bad {error.what} in record {consumed} of epoch {self.epoch} read by process {self.process_index} "
                    f"(counted from 0 in this process's order of the epoch): {_original_message(error)}"
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
        if self.caption_column is not None:
            # One uniform draw per sample, whatever its number of captions: the generator advances by the batch size.
            draws = torch.rand(len(items), generator=self._caption_generator, dtype=torch.float64).tolist()
            captions = [item["captions"][min(int(u * len(item["captions"])), len(item["captions"]) - 1)]
                        for item, u in zip(items, draws)]
            return {"pixel_values": pixel_values, "captions": captions}
        labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return {"pixel_values": pixel_values, "class_labels": labels}

    # -- state -----------------------------------------------------------------------------------------------------

    def _make_snapshot(self) -> Dict[str, Any]:
        captions = {}
        if self._caption_generator is not None:
            captions = {"caption_column": self.caption_column,
                        "caption_rng_state": _encode_rng(self._caption_generator.get_state())}
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
            **captions,
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
        keys = ("seed", "batch_size", "process_index", "num_processes", "is_latent", "streaming", "num_examples",
                "caption_column")
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
            if self._caption_generator is not None:
                self._caption_generator.set_state(_decode_rng(state["caption_rng_state"]))
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

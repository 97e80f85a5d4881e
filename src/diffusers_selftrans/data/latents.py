"""Pre-encoded VAE latents: the safetensors shards written by `examples/preprocess_latents.py` (posterior mean/std,
optionally of the flipped image too), `LatentSource` to read them and `check_latent_stats` to refuse shards encoded
with another VAE."""

import bisect
import glob
import json
import logging
import math
import os
import re
from typing import Any, Dict, List, Optional

import torch

from ..provenance import check_provenance, vae_encoder_identity
from .sources import _is_local, _map_style_keys


logger = logging.getLogger(__name__)

# Latent shard layout written by examples/preprocess_latents.py.
LATENT_STATS_FILE = "stats.json"
LATENT_SHARD_GLOB = "latents-*-rank*.safetensors"
LATENT_SHARD_RE = re.compile(r"latents-(\d+)-rank(\d+)\.safetensors$")
LATENT_FORMAT_VERSION = 1
# Decoder-only fine-tunes of the same SD kl-f8 encoder: latents of one are valid for the other (REPA encodes with
# ft-mse and samples with ft-ema, method notes §2.1), so a name mismatch inside this family is only a warning.
SAME_ENCODER_VAES = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")


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

    `vae`: an `AutoencoderKL`, or its config (dict / FrozenDict). With the model and shards that recorded their VAE
    encoder's identity (`provenance.vae_encoder_identity`: factors and encoder weights), that identity is compared
    (`ProvenanceError`). Otherwise latent channels, scaling_factor, shift_factor and, when both are Hub ids, the VAE id
    (local paths cannot be compared by name: only a warning then).
    """
    if stats.get("vae_encoder") is not None and hasattr(vae, "state_dict"):
        check_provenance(stats.get("latents_dir", "the latent shards"), {"vae_encoder": stats["vae_encoder"]},
                         {"vae_encoder": vae_encoder_identity(vae)},
                         remedy="Re-run examples/preprocess_latents.py with this VAE, or train with the VAE that "
                                "encoded them.")
        return
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
            try:
                with safe_open(path, framework="pt") as f:
                    shard_labels = f.get_tensor("class_labels").long()
            except Exception as error:  # safetensors' own error names neither the file nor the cause
                raise ValueError(
                    f"Latent shard {path} is unreadable ({type(error).__name__}: {error}); it was damaged after it "
                    f"was written (shards are renamed into place complete), e.g. a copy cut short. Delete it and "
                    f"re-run examples/preprocess_latents.py with the same flags: it writes only the missing shards."
                ) from error
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
        # a copy: a view would keep (and, through a DataLoader worker, ship) the whole shard's storage with each row
        item = {name: handle.get_slice(name)[row : row + 1][0].clone() for name in names}
        bad = [name for name in names[:2] + names[3:] if not bool(torch.isfinite(item[name]).all())]
        if bad:  # skipped and counted like an undecodable image (--max_skip_fraction), named
            return {"error": f"non-finite {', '.join(bad)}", "description": f"row {row} of {self.files[shard]}"}
        return item

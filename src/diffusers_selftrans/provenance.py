# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""What made an artifact, and the one check that refuses to reuse it for something else.

Every artifact a later step reuses records the inputs that decide its content: a checkpoint its classes, dataset size,
process count, global batch and VAE; latent shards the VAE encoder and resolution; the text-embedding cache the text
encoders and tokenizer length; a sample folder the weights and sampling settings; a stage-1 output its VAE. The place
that reuses the artifact calls `check_provenance`, which refuses a mismatch with `ProvenanceError`, one message format
naming the artifact, every differing input with both values, and the override flag where one makes sense.

Identities are digests (`module_digest`, `vae_encoder_identity`), not names: a folder retrained in place keeps its
name and changes its weights.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

PROVENANCE_NAME = "provenance.json"
# Values hashed per tensor: a digest must tell two checkpoints apart, not prove them bit-equal, and hashing every
# value of a 12B-parameter teacher would cost minutes. Evenly spaced values of every tensor (with its name, shape and
# dtype) differ between any two trainings or fine-tunes of the same architecture.
DIGEST_VALUES_PER_TENSOR = 4096
DIGEST_LENGTH = 16  # hex characters shown and stored (64 bits)


class ProvenanceError(ValueError):
    """An artifact was made from other inputs than the run that wants to reuse it."""


# float32 holds every integer only up to 2**24: evenly spaced indices of larger tensors are computed in float64.
_EXACT_FLOAT32_INTEGERS = 2 ** 24


def sampled_values(flat: torch.Tensor) -> torch.Tensor:
    """Up to `DIGEST_VALUES_PER_TENSOR` evenly spaced values of a 1-D tensor (all of a smaller one), first and last
    included. Indices in float32 up to 2**24 elements (the digests recorded so far), float64 beyond (float32 rounds
    the last index up to `numel` there: out of range)."""
    n = flat.numel()
    if n <= DIGEST_VALUES_PER_TENSOR:
        return flat
    dtype = torch.float32 if n <= _EXACT_FLOAT32_INTEGERS else torch.float64
    return flat[torch.linspace(0, n - 1, DIGEST_VALUES_PER_TENSOR, dtype=dtype, device=flat.device).long()]


def tensors_digest(named_tensors: Iterable[Tuple[str, torch.Tensor]], extra: Any = None) -> str:
    """A short digest of named tensors (name, dtype, shape and up to `DIGEST_VALUES_PER_TENSOR` evenly spaced values
    each) and of `extra` (any JSON-friendly value, e.g. a config)."""
    h = hashlib.sha256()
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard: the digest is of the whole tensor
            tensor = tensor.full_tensor()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(sampled_values(tensor.reshape(-1)).float().cpu().numpy().tobytes())
    return h.hexdigest()[:DIGEST_LENGTH]


def _plain_config(module) -> Dict[str, Any]:
    """A diffusers (FrozenDict) or transformers (PretrainedConfig) config without private keys and library versions
    (an upgrade does not change a model)."""
    config = getattr(module, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}


def module_digest(module: torch.nn.Module) -> str:
    """The identity of a model: its class, config and weights (`tensors_digest` of its state dict)."""
    return tensors_digest(module.state_dict().items(), extra=[type(module).__name__, _plain_config(module)])


def vae_encoder_identity(vae) -> Dict[str, Any]:
    """What decides the latents a VAE makes: latent channels, scaling / shift factors and the encoder's weights.

    The decoder is left out on purpose: decoder-only fine-tunes (SD's `sd-vae-ft-mse` / `sd-vae-ft-ema`) encode the
    same latents, so training data made with one is valid for the other."""
    config = vae.config
    encoder = [(name, value) for name, value in vae.state_dict().items()
               if name.startswith(("encoder.", "quant_conv."))]
    return {
        "latent_channels": int(config.get("latent_channels") or 0),
        "scaling_factor": float(config.get("scaling_factor") or 1.0),
        "shift_factor": float(config.get("shift_factor") or 0.0),
        "encoder_digest": tensors_digest(encoder, extra=type(vae).__name__),
    }


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def check_provenance(artifact, recorded: Optional[Dict[str, Any]], current: Dict[str, Any], *,
                     override: Optional[str] = None, remedy: Optional[str] = None,
                     allowed: bool = False) -> Dict[str, list]:
    """Refuse to reuse `artifact` (a path or a description) when an input in `current` differs from what the
    artifact `recorded`.

    Keys that `recorded` lacks (an artifact of an older version) are not compared. Returns `{key: [recorded,
    current]}` of the differences, logged as a warning, when `allowed` (the caller's user passed `override`); raises
    `ProvenanceError` otherwise: "Refusing to reuse X: it was made with other inputs than this run. key: A (there) vs B (this run);
    ... remedy. Pass --override to use it anyway."."""
    recorded = _normalise(recorded or {})
    current = _normalise(current)
    differ = {k: [recorded[k], v] for k, v in current.items() if k in recorded and recorded[k] != v}
    if not differ:
        return {}
    details = "; ".join(f"{k}: {old} (there) vs {new} (this run)" for k, (old, new) in differ.items())
    if allowed:
        logger.warning("Reusing %s although it was made with other inputs (%s): %s.", artifact, override, details)
        return differ
    raise ProvenanceError(
        f"Refusing to reuse {artifact}: it was made with other inputs than this run. {details}."
        + (f" {remedy}" if remedy else "")
        + (f" Pass {override} to use it anyway." if override else "")
    )


def read_provenance(folder) -> Optional[Dict[str, Any]]:
    path = Path(folder) / PROVENANCE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_provenance(folder, record: Dict[str, Any]) -> Path:
    """`folder/provenance.json`, written atomically (processes that write the same record at once are safe)."""
    path = Path(folder) / PROVENANCE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PROVENANCE_NAME}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_normalise(record), indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path

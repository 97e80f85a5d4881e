# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Convert released SiT / REPA / Self-Transcendence checkpoints into `SiTTransformer2DModel` folders.

Scope: the class-conditional ImageNet checkpoints of three codebases, all built on the same SiT backbone.

| flavor               | code                                            | differences from our default config            |
|----------------------|-------------------------------------------------|------------------------------------------------|
| `sit`                | willisma/SiT `models.py`                        | `learn_sigma=True` (8 output channels), reversed time (data at t=1) |
| `repa`               | sihyun-yu/REPA `models/sit.py`                  | none; `projectors.{j}.{0,2,4}` MLP heads       |
| `self_transcendence` | csslc/Self-Transcendence `models/sit_*_model.py`| `qk_norm=True`; `projectors.{0,2,4}` and (stage 1) `projectors_final.linear` |

Our parameter names equal the reference ones, so the conversion is a strict check rather than a rename:
- `pos_embed` (a frozen table in the checkpoints, recomputed by our model) is compared with ours and dropped;
  a different table means a wrong `sample_size`/`patch_size`, which is an error.
- REPA "legacy" checkpoints (`decoder_blocks.{j}` after `blocks.{0..k-1}`, what REPA's `--legacy` flag loads) are renumbered.
- projector heads are split off and returned as `AlignmentProjector`s (or dropped).
- every missing, unexpected or mis-shaped key is an error that names it: the reference code loads its teacher with
  `strict=False`, which silently ignores a `qk_norm` mismatch (method-notes §6.11). We never do.

Which weights: `use_ema=None` takes `"ema"` when present, else `"model"`, else the dict itself (a bare state dict, as
the released SiT/REPA files are). `use_ema=True` insists on `"ema"` and `use_ema=False` on `"model"` whenever the
checkpoint is a training checkpoint (has either key). Note that Self-Transcendence stage 2 uses the stage-1 *raw*
weights (`"model"`) as the guiding model (method-notes §3.2): convert it with `use_ema=False`.

CLI:
    python -m diffusers_selftrans.convert --checkpoint last.pt --model SiT-XL/2 --flavor repa --output_dir sit-xl-repa
"""

import argparse
import json
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from diffusers.utils import logging

from .models.projector import AlignmentProjector
from .models.transformer_sit import SiTTransformer2DModel, parse_preset, sincos_pos_embed_2d

logger = logging.get_logger(__name__)

FLAVORS = ("sit", "repa", "self_transcendence")
# Config fields each codebase fixes (method-notes §1.1, §3.4, §5.1); `config_overrides` win over these.
FLAVOR_DEFAULTS = {
    "sit": {"learn_sigma": True, "time_convention": "sit", "qk_norm": False},  # willisma/SiT `SiT(learn_sigma=True)`
    "repa": {"learn_sigma": False, "time_convention": "repa", "qk_norm": False},  # REPA `--qk-norm` default False
    "self_transcendence": {"learn_sigma": False, "time_convention": "repa", "qk_norm": True},  # ST `--qk-norm` default True
}
POS_EMBED_KEY = "pos_embed"
# Wrappers whose prefix ends up in saved keys: DDP (`module.`) and torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The reference tables are float64 sin/cos stored as float32; ours too. Anything above this is a different table.
POS_EMBED_ATOL = 1e-5
# Keys listed in an error message before it is cut short.
MAX_KEYS_IN_ERROR = 20

_REPA_PROJECTOR = re.compile(r"projectors\.(\d+)\.(0|2|4)\.(weight|bias)")
_ST_PROJECTOR = re.compile(r"projectors\.(0|2|4)\.(weight|bias)")
_ST_PROJECTOR_FINAL = re.compile(r"projectors_final\.linear\.(weight|bias)")
_LEGACY_DECODER = re.compile(r"decoder_blocks\.(\d+)\.(.+)")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def load_checkpoint(checkpoint: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """A path (`.safetensors`, or a `torch.save` file read with `weights_only=True`) or an already-loaded dict."""
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint)
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    # REPA/SiT training checkpoints pickle their `argparse.Namespace` under "args": allow exactly that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path!r} holds a {type(loaded).__name__}, expected a state dict or a training checkpoint dict.")
    return dict(loaded)


def select_state_dict(checkpoint: Mapping[str, Any], use_ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """Pick the weights out of a training checkpoint; returns `(state_dict, source)` with source "ema", "model" or "state_dict"."""
    wrapped = [k for k in ("ema", "model") if isinstance(checkpoint.get(k), Mapping)]
    if not wrapped:
        if use_ema is not None and any(k in checkpoint for k in ("ema", "model")):
            raise ValueError("The checkpoint's 'ema'/'model' entries are not state dicts.")
        state_dict, source = checkpoint, "state_dict"
    elif use_ema is True and "ema" not in wrapped:
        raise ValueError(f"use_ema=True but the checkpoint has no 'ema' weights (keys: {sorted(checkpoint)}); pass use_ema=False.")
    elif use_ema is False and "model" not in wrapped:
        raise ValueError(f"use_ema=False but the checkpoint has no 'model' weights (keys: {sorted(checkpoint)}).")
    else:
        source = "model" if use_ema is False or "ema" not in wrapped else "ema"
        state_dict = checkpoint[source]
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(f"Expected a state dict of tensors; these entries are not tensors: {_list_keys(non_tensors)}.")
    return dict(state_dict), source


def _list_keys(keys) -> str:
    keys = sorted(keys, key=_natural_key)
    shown = ", ".join(keys[:MAX_KEYS_IN_ERROR])
    return shown + (f", ... ({len(keys) - MAX_KEYS_IN_ERROR} more)" if len(keys) > MAX_KEYS_IN_ERROR else "")


def _natural_key(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _strip_wrapper_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _renumber_legacy_blocks(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """REPA legacy layout: `blocks.{0..k-1}` then `decoder_blocks.{j}` = block k + j (REPA `utils.load_legacy_checkpoints`)."""
    if not any(_LEGACY_DECODER.fullmatch(k) for k in state_dict):
        return state_dict
    encoder_blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))}
    encoder_depth = max(encoder_blocks) + 1 if encoder_blocks else 0
    if encoder_blocks != set(range(encoder_depth)):
        raise ValueError(f"Legacy checkpoint with non-contiguous encoder blocks {sorted(encoder_blocks)}.")
    logger.info(f"Renumbering legacy REPA `decoder_blocks.*` after {encoder_depth} encoder blocks.")
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_DECODER.fullmatch(key)
        out[f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else key] = value
    return out


def split_projectors(
    state_dict: Dict[str, torch.Tensor], flavor: str
) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """Split the alignment heads off a backbone state dict, renamed to `AlignmentProjector` keys.

    REPA: `projectors.{j}.{0,2,4}` -> projector j `mlp.{0,2,4}`. Self-Transcendence: `projectors.{0,2,4}` -> `mlp.{0,2,4}`
    and `projectors_final.linear` -> `head.1` (the stage-1 head; its LayerNorm has no weights). Keys of a flavor that
    has no such heads are left in place, to be reported as unexpected.
    """
    backbone, heads = {}, {}
    for key, value in state_dict.items():
        if flavor == "repa" and (m := _REPA_PROJECTOR.fullmatch(key)):
            heads.setdefault(int(m.group(1)), {})[f"mlp.{m.group(2)}.{m.group(3)}"] = value
        elif flavor == "self_transcendence" and (m := _ST_PROJECTOR.fullmatch(key)):
            heads.setdefault(0, {})[f"mlp.{m.group(1)}.{m.group(2)}"] = value
        elif flavor == "self_transcendence" and (m := _ST_PROJECTOR_FINAL.fullmatch(key)):
            heads.setdefault(0, {})[f"head.1.{m.group(1)}"] = value
        else:
            backbone[key] = value
    if sorted(heads) != list(range(len(heads))):
        raise ValueError(f"Projector indices {sorted(heads)} are not contiguous from 0.")
    return backbone, [heads[j] for j in sorted(heads)]


def build_projector(state_dict: Dict[str, torch.Tensor]) -> AlignmentProjector:
    """An `AlignmentProjector` whose sizes are read off the weights, loaded strictly."""
    required = {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    has_head = any(k.startswith("head.") for k in state_dict)
    if has_head:
        required |= {"head.1.weight", "head.1.bias"}
    missing, unexpected = required - set(state_dict), set(state_dict) - required
    if missing or unexpected:
        raise ValueError(f"Incomplete projector weights: missing [{_list_keys(missing)}], unexpected [{_list_keys(unexpected)}].")
    projector = AlignmentProjector(
        in_features=state_dict["mlp.0.weight"].shape[1],
        out_features=state_dict["mlp.4.weight"].shape[0],
        hidden_features=state_dict["mlp.0.weight"].shape[0],
        head_features=state_dict["head.1.weight"].shape[0] if has_head else None,
    )
    _check_shapes(projector.state_dict(), state_dict, what="projector")
    projector.load_state_dict(state_dict, strict=True)
    return projector.eval()


def build_config(model: Union[str, Mapping[str, Any]], flavor: str, **config_overrides) -> Dict[str, Any]:
    """Preset name or config dict -> `SiTTransformer2DModel` kwargs, with the flavor's defaults under the overrides."""
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}.")
    if isinstance(model, str):
        base = parse_preset(model)
    elif isinstance(model, Mapping):
        base = {k: v for k, v in model.items() if not k.startswith("_")}  # drops `_class_name`, `_diffusers_version`
    else:
        raise ValueError(f"model must be a preset name such as 'SiT-XL/2' or a config dict, got {type(model).__name__}.")
    defaults = {k: v for k, v in FLAVOR_DEFAULTS[flavor].items() if k not in base}
    return {**base, **defaults, **config_overrides}


def check_pos_embed(table: torch.Tensor, model: SiTTransformer2DModel) -> None:
    """Raise unless a checkpoint's frozen `pos_embed` equals the table our model computes from its config."""
    ours = model.pos_embed
    cfg = model.config
    if tuple(table.shape) != tuple(ours.shape):
        hint = ""
        tokens = table.shape[-2] if table.ndim >= 2 else None
        if tokens and int(tokens**0.5) ** 2 == tokens and table.shape[-1] == ours.shape[-1]:
            hint = f" The checkpoint has {tokens} tokens: sample_size={int(tokens ** 0.5) * cfg.patch_size} at patch_size={cfg.patch_size}?"
        raise ValueError(
            f"pos_embed shape {tuple(table.shape)} does not match the model's {tuple(ours.shape)} "
            f"(sample_size={cfg.sample_size}, patch_size={cfg.patch_size}, hidden={model.hidden_size}).{hint}"
        )
    atol = max(POS_EMBED_ATOL, 2 * torch.finfo(table.dtype).eps) if table.is_floating_point() else POS_EMBED_ATOL
    diff = (table.float() - ours.float()).abs().max().item()
    if diff > atol:
        raise ValueError(
            f"The checkpoint's pos_embed differs from the 2-D sin-cos table of this config (max abs diff {diff:.3g}): "
            f"wrong sample_size/patch_size, or a checkpoint that is not a SiT."
        )


def _check_shapes(expected: Mapping[str, torch.Tensor], provided: Mapping[str, torch.Tensor], what: str = "model") -> None:
    bad = [k for k in expected if k in provided and tuple(expected[k].shape) != tuple(provided[k].shape)]
    if not bad:
        return
    lines = [f"  {k}: checkpoint {tuple(provided[k].shape)} vs {what} {tuple(expected[k].shape)}" for k in sorted(bad, key=_natural_key)]
    hints = []
    if any(k.startswith("final_layer.linear") for k in bad):
        hints.append("final_layer.linear: learn_sigma (SiT: 2x output channels) or patch_size/out_channels differ")
    if any(k.startswith("y_embedder") for k in bad):
        hints.append("y_embedder: num_classes (+1 null row when class_dropout_prob > 0) differs")
    if any(k.startswith("x_embedder") for k in bad):
        hints.append("x_embedder: patch_size or in_channels differ")
    raise ValueError(f"Shape mismatch for {len(bad)} {what} key(s):\n" + "\n".join(lines[:MAX_KEYS_IN_ERROR])
                     + ("\nHints: " + "; ".join(hints) if hints else ""))


def _check_keys(expected: Mapping[str, torch.Tensor], provided: Mapping[str, torch.Tensor], config: Mapping[str, Any], flavor: str) -> None:
    missing = set(expected) - set(provided)
    unexpected = set(provided) - set(expected)
    if not missing and not unexpected:
        return
    hints = []
    norm_keys = lambda keys: [k for k in keys if ".attn.q_norm." in k or ".attn.k_norm." in k]  # noqa: E731
    if norm_keys(unexpected) and not config.get("qk_norm"):
        hints.append("the checkpoint has q/k-norm weights: it was trained with qk_norm=True (flavor='self_transcendence')")
    if norm_keys(missing) and config.get("qk_norm"):
        hints.append("the checkpoint has no q/k-norm weights: pass qk_norm=False (REPA and SiT train without it)")
    if any(k.startswith("projectors") for k in unexpected):
        hints.append(f"projector heads that flavor={flavor!r} does not have ('repa': projectors.{{j}}.{{0,2,4}}; "
                     "'self_transcendence': projectors.{0,2,4} and projectors_final.linear)")
    block_ids = lambda keys: {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}  # noqa: E731
    if block_ids(provided) != block_ids(expected):
        hints.append(f"the number of blocks differs from num_layers={config.get('num_layers')}")
    message = f"Checkpoint does not match SiTTransformer2DModel (flavor={flavor!r})."
    if missing:
        message += f"\nMissing keys ({len(missing)}): {_list_keys(missing)}"
    if unexpected:
        message += f"\nUnexpected keys ({len(unexpected)}): {_list_keys(unexpected)}"
    if hints:
        message += "\nHints: " + "; ".join(hints)
    raise ValueError(message)


def convert_original_checkpoint(
    checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    model: Union[str, Mapping[str, Any]] = "SiT-XL/2",
    flavor: str = "repa",
    use_ema: Optional[bool] = None,
    return_projectors: bool = False,
    **config_overrides,
) -> Union[SiTTransformer2DModel, Tuple[SiTTransformer2DModel, List[AlignmentProjector]]]:
    """
    Build a `SiTTransformer2DModel` (eval mode, fp32) from a SiT / REPA / Self-Transcendence checkpoint.

    Args:
        checkpoint: a `.pt`/`.pth` file, a `.safetensors` file, or a loaded dict; a training checkpoint
            (`{"model", "ema", ...}`) or a bare state dict.
        model: a preset (`"SiT-XL/2"`) or a full config dict (e.g. `other_model.config`).
        flavor: `"sit"`, `"repa"` or `"self_transcendence"` (sets `learn_sigma`, `time_convention`, `qk_norm`).
        use_ema: `None` = "ema" if present, else "model", else the dict itself; `True`/`False` insist on "ema"/"model".
        return_projectors: also return the checkpoint's alignment heads as `AlignmentProjector`s (a list, REPA may
            have several; empty when there are none). Otherwise they are dropped.
        **config_overrides: any config field, e.g. `sample_size=64` for 512 px checkpoints, `num_classes`.

    Raises:
        ValueError: missing, unexpected or mis-shaped keys (all named), or a `pos_embed` that is not ours.
    """
    config = build_config(model, flavor, **config_overrides)
    state_dict, source = select_state_dict(load_checkpoint(checkpoint), use_ema)
    state_dict = _renumber_legacy_blocks(_strip_wrapper_prefixes(state_dict))
    state_dict, projector_dicts = split_projectors(state_dict, flavor)

    sit = SiTTransformer2DModel(**config)
    if POS_EMBED_KEY in state_dict:
        check_pos_embed(state_dict.pop(POS_EMBED_KEY), sit)
    else:
        logger.warning("The checkpoint has no pos_embed table; it cannot be checked against sample_size/patch_size.")
    expected = sit.state_dict()
    _check_keys(expected, state_dict, config, flavor)
    _check_shapes(expected, state_dict)
    sit.load_state_dict(state_dict, strict=True)
    sit.eval()
    logger.info(f"Converted {len(state_dict)} tensors from the checkpoint's {source!r} weights ({flavor}).")

    if not return_projectors:
        if projector_dicts:
            logger.info(f"Dropped {len(projector_dicts)} projector head(s); pass return_projectors=True to keep them.")
        return sit
    return sit, [build_projector(sd) for sd in projector_dicts]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert a SiT/REPA/Self-Transcendence checkpoint to a diffusers folder.")
    parser.add_argument("--checkpoint", required=True, help="A .pt/.pth (torch.save) or .safetensors file.")
    parser.add_argument("--model", default="SiT-XL/2",
                        help="Preset name (SiT-B/2, SiT-XL/2, ...), or a config.json / save_pretrained folder for other configs.")
    parser.add_argument("--flavor", default="repa", choices=FLAVORS)
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--no_ema", dest="use_ema", action="store_const", const=False,
                     help="Take the raw 'model' weights (e.g. a Self-Transcendence stage-1 guiding model).")
    ema.add_argument("--ema", dest="use_ema", action="store_const", const=True, help="Insist on the 'ema' weights.")
    parser.set_defaults(use_ema=None)
    parser.add_argument("--sample_size", type=int, default=None, help="Latent side (32 for 256 px, 64 for 512 px SD-VAE).")
    parser.add_argument("--num_classes", type=int, default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--save_projectors", action="store_true",
                        help="Also write the alignment heads to OUT/projector (OUT/projector_{j} when there are several).")
    return parser.parse_args(argv)


def _model_arg(model: str) -> Union[str, Dict[str, Any]]:
    """A preset name, or the config in a JSON file / a `save_pretrained` folder."""
    path = os.path.join(model, SiTTransformer2DModel.config_name) if os.path.isdir(model) else model
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return model


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("sample_size", "num_classes") if getattr(args, k) is not None}
    sit, projectors = convert_original_checkpoint(
        args.checkpoint, model=_model_arg(args.model), flavor=args.flavor, use_ema=args.use_ema, return_projectors=True, **overrides
    )
    sit.save_pretrained(args.output_dir)
    written = [args.output_dir]
    if args.save_projectors:
        for j, projector in enumerate(projectors):
            path = os.path.join(args.output_dir, "projector" if len(projectors) == 1 else f"projector_{j}")
            projector.save_pretrained(path)
            written.append(path)
    elif projectors:
        logger.warning(f"{len(projectors)} projector head(s) not written; pass --save_projectors to keep them.")
    print("Wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

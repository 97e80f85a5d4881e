# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""What both example training scripts share, and nothing else.

- argument groups and `--config file.yaml|json` (same keys as the flags; unknown keys are an error),
- model / VAE / guiding-model loading and the latent encoding of a batch,
- checkpoints: `accelerator.save_state` written to a temporary folder with a manifest written last, then renamed (a
  kill mid-write never leaves a `checkpoint-N` that looks complete), save/load hooks that write `save_pretrained`
  folders, pruning, `latest` (the newest complete one), the flags a resume may change, full-disk errors,
- the non-finite / exploding-loss guard, EMA-model sample grids, and the final pipeline folder (cards and Hub push:
  `hub.py`).

The training loops themselves live in `examples/train_align.py` and `examples/train_self_transcendence.py`.
"""

import argparse
import collections
import errno
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .models import AlignmentProjector, SiTTransformer2DModel
from .models.transformer_sit import parse_preset

logger = logging.getLogger(__name__)

# REPA/ST recipe (method-notes §2): AdamW lr 1e-4 constant, betas (0.9, 0.999), wd 0, eps 1e-8, grad clip 1.0,
# EMA 0.9999 constant, global batch 256.
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_GLOBAL_BATCH_SIZE = 256
DEFAULT_EMA_DECAY = 0.9999
DEFAULT_MAX_GRAD_NORM = 1.0
# The ST training preview draws 50-step Euler samples at CFG 4.0 (method-notes §3.4).
DEFAULT_VALIDATION_GUIDANCE = 4.0
CHECKPOINT_PREFIX = "checkpoint-"
# The loss guard: a finite loss this many times above the running mean of recent healthy losses is an explosion.
# A healthy flow-matching loss falls slowly and, being a mean over the batch and every latent element, its per-batch
# noise is a fraction of its mean; the reported divergence reached 2.6e18. One order of magnitude is a margin we
# chose between the two (not a measured threshold): `--loss_explosion_factor` sets it, 0 disables it.
LOSS_EXPLOSION_FACTOR = 10.0
# Number of recent healthy losses in that running mean (long enough to smooth batch noise, short enough to follow
# the loss as it falls during training).
LOSS_EXPLOSION_WINDOW = 100


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


def add_model_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default="SiT-B/2",
                   help="A preset (SiT-S/2 ... SiT-XL/8) or a path to a SiTTransformer2DModel config JSON.")
    g.add_argument("--qk_norm", action=argparse.BooleanOptionalAction, default=True,
                   help="q/k LayerNorm. On in the Self-Transcendence release (REPA: off).")
    g.add_argument("--class_dropout_prob", type=float, default=0.1, help="Label dropout for CFG (SiT/REPA: 0.1).")
    g.add_argument("--vae_name_or_path", type=str, default="stabilityai/sd-vae-ft-ema",
                   help="A diffusers AutoencoderKL folder or Hub id.")
    g.add_argument("--vae_subfolder", type=str, default=None)
    g.add_argument("--time_sampling", type=str, default="uniform", choices=["uniform", "logit_normal"],
                   help="Training t density (REPA/ST: uniform).")


def add_training_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default="sit-output")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", type=int, default=None,
                   help="Per-device batch. Default: --global_batch_size / (processes * accumulation).")
    g.add_argument("--global_batch_size", type=int, default=DEFAULT_GLOBAL_BATCH_SIZE)
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Optimizer steps. Default: --num_train_epochs over the dataset size.")
    g.add_argument("--num_train_epochs", type=float, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=DEFAULT_LEARNING_RATE)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=DEFAULT_MAX_GRAD_NORM)
    g.add_argument("--ema_decay", type=float, default=DEFAULT_EMA_DECAY, help="Constant EMA decay (REPA: 0.9999).")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the transformer.")
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="Stop after this many consecutive bad steps (NaN/inf or exploding loss; each is skipped).")
    g.add_argument("--loss_explosion_factor", type=float, default=LOSS_EXPLOSION_FACTOR,
                   help="A finite loss above this many times the running mean of recent healthy losses is a bad "
                        "step too (skipped, counted like NaN). 0 disables the check.")
    g = parser.add_argument_group("logging, checkpoints, samples")
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all, or none.")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--tracker_project_name", type=str, default=None)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--checkpointing_steps", type=int, default=10_000)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='A checkpoint folder or "latest" (the newest complete one; damaged ones are skipped).')
    g.add_argument("--allow_inexact_resume", action="store_true",
                   help="Resume from a checkpoint whose RNG states are missing or damaged, or that has no manifest "
                        "(older versions): the run continues but is NOT the same as an uninterrupted one.")
    g.add_argument("--validation_steps", type=int, default=10_000, help="Sample a grid from the EMA model every N steps.")
    g.add_argument("--validation_class_labels", type=int, nargs="*", default=None,
                   help="Classes of the sample grid (default: up to 8 classes spread over the label range).")
    g.add_argument("--validation_num_inference_steps", type=int, default=50)
    g.add_argument("--validation_guidance_scale", type=float, default=DEFAULT_VALIDATION_GUIDANCE)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_private", action="store_true")
    g.add_argument("--save_remote_code", action=argparse.BooleanOptionalAction, default=True,
                   help="Also write the pipeline's and the transformer's .py files into --output_dir (and so into the "
                        "Hub push), so that DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) loads it "
                        "with diffusers alone, without this package. --no-save_remote_code writes only weights and "
                        "configs (then only SiTPipeline.from_pretrained loads the folder).")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar.")


def parse_args_with_config(parser: argparse.ArgumentParser, input_args: Optional[Sequence[str]] = None):
    """Parse flags; `--config FILE` (YAML or JSON) supplies defaults with the same keys, flags still win."""
    parser.add_argument("--config", type=str, default=None, help="YAML/JSON file with the same keys as the flags.")
    argv = list(sys.argv[1:] if input_args is None else input_args)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = load_config_file(pre.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown keys in {pre.config}: {unknown}. Valid keys are the script's flags.")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    # the exact command, for args.json and the model card (not sys.argv: tests and the quickstart call main(argv))
    args.launch_command = shlex.join(["accelerate", "launch", f"examples/{parser.prog}", *redact_secrets(argv)])
    return args


SECRET_FLAGS = ("--hub_token",)


def redact_secrets(argv: Sequence[str]) -> List[str]:
    """Hide token values (`--hub_token X` or `--hub_token=X`) in anything written to disk or the Hub."""
    out, hide_next = [], False
    for item in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif item in SECRET_FLAGS:
            out.append(item)
            hide_next = True
        elif item.split("=", 1)[0] in SECRET_FLAGS:
            out.append(item.split("=", 1)[0] + "=***")
        else:
            out.append(item)
    return out


def load_config_file(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values.")
    return {k.replace("-", "_"): v for k, v in values.items()}


def save_args(args, path: Path):
    """The resolved arguments next to the outputs (secrets removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {k: v for k, v in vars(args).items() if "--" + k not in SECRET_FLAGS}
    path.write_text(json.dumps(values, indent=2, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------------------------------
# Models


def model_config_from_args(args, *, sample_size: int, in_channels: int, num_classes: int) -> dict:
    """`--model` preset or config JSON, completed with what the data and VAE decide."""
    if os.path.isfile(args.model):
        config = json.loads(Path(args.model).read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config = parse_preset(args.model)
    config.update(sample_size=sample_size, in_channels=in_channels, num_classes=num_classes,
                  qk_norm=args.qk_norm, class_dropout_prob=args.class_dropout_prob)
    return config


# Released training checkpoints (torch.save pickles) that `python -m diffusers_selftrans.convert` turns into folders.
RAW_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


def load_transformer(name_or_path: str, subfolder: Optional[str] = None, **kwargs) -> SiTTransformer2DModel:
    """Load a SiT from a `save_pretrained` folder, a pipeline folder (its `transformer/`), or a Hub id.

    Anything else is one clear error: a raw checkpoint file names the conversion command, and a path that is neither
    a local folder nor a reachable Hub repo says so (instead of the Hub client's chain of tracebacks)."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        if name_or_path.endswith(RAW_CHECKPOINT_SUFFIXES):
            raise ValueError(
                f"{name_or_path} is a raw training checkpoint, not a diffusers folder. Convert it first:\n"
                f"  python -m diffusers_selftrans.convert --checkpoint {name_or_path} --model SiT-B/2 "
                f"--flavor self_transcendence --output_dir converted  (set --model and --flavor to match it)\n"
                f"then pass the output folder."
            )
        raise ValueError(f"{name_or_path} is a file; pass the folder written by save_pretrained or a training run.")
    if os.path.isdir(name_or_path):
        root = Path(name_or_path)
        if subfolder is None and not (root / "config.json").exists():
            if (root / "transformer" / "config.json").exists():
                subfolder = "transformer"
            else:
                raise ValueError(f"{name_or_path} holds neither a SiT config.json nor a transformer/ subfolder.")
        return SiTTransformer2DModel.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)
    try:
        if subfolder is not None:
            return SiTTransformer2DModel.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)
        try:  # a pipeline repo on the Hub
            return SiTTransformer2DModel.from_pretrained(name_or_path, subfolder="transformer", **kwargs)
        except OSError:
            return SiTTransformer2DModel.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:  # HFValidationError is a ValueError; offline / not found are OSErrors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{name_or_path!r} is neither a local folder nor a reachable Hub id with a SiT "
            f"(Hub: {type(err).__name__}: {reason})"
        ) from None


def load_vae(name_or_path: str, subfolder: Optional[str] = None):
    """A frozen `AutoencoderKL` (eval mode, no gradients) from a folder or Hub id."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder)
    return vae.eval().requires_grad_(False)


def vae_latent_size(vae, resolution: int) -> int:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not divisible by the VAE downsampling factor {factor}.")
    return resolution // factor


class LatentEncoder:
    """A data batch -> scaled latents x0 = (z - shift) * scale, z a fresh posterior sample (as REPA, each step)."""

    def __init__(self, vae):
        self.vae = vae
        self.scale = vae.config.scaling_factor
        self.shift = vae.config.shift_factor or 0.0

    @torch.no_grad()
    def __call__(self, batch: Dict[str, torch.Tensor], device) -> torch.Tensor:
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(device, torch.float32)
            std = batch["latent_std"].to(device, torch.float32)
            z = mean + std * torch.randn_like(mean)
        else:
            pixels = batch["pixel_values"].to(device, self.vae.dtype)
            z = self.vae.encode(pixels).latent_dist.sample().float()
        return (z - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale + self.shift).sample


def unwrap(accelerator, model: nn.Module) -> nn.Module:
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def register_checkpoint_hooks(accelerator, ema=None, transformer_cls=None):
    """Save the prepared transformer as `transformer/`, an `AlignmentProjector` as `projector/` (both `save_pretrained`
    folders) and the EMA as `transformer_ema/`; load them back on resume. Other modules stay with accelerate.

    `transformer_cls`: the transformer's class (default our `SiTTransformer2DModel`; the T2I script passes the
    diffusers class it trains, e.g. `SD3Transformer2DModel`)."""
    transformer_cls = transformer_cls or SiTTransformer2DModel
    handled = (transformer_cls, AlignmentProjector)

    def folder_name(model) -> str:
        return "transformer" if isinstance(model, transformer_cls) else "projector"

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for i in reversed(range(len(models))):
            model = getattr(models[i], "_orig_mod", models[i])
            if isinstance(model, handled):
                model.save_pretrained(os.path.join(output_dir, folder_name(model)))
                weights.pop(i)
        if ema is not None:
            ema.save_pretrained(os.path.join(output_dir, "transformer_ema"))

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            model = getattr(models[i], "_orig_mod", models[i])
            if isinstance(model, handled):
                loaded = type(model).from_pretrained(os.path.join(input_dir, folder_name(model)))
                model.load_state_dict(loaded.state_dict())
                models.pop(i)
        if ema is not None:
            loaded = type(ema).from_pretrained(os.path.join(input_dir, "transformer_ema"), transformer_cls,
                                               foreach=ema.foreach)
            ema.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir) -> List[Path]:
    """`checkpoint-N` folders (complete or not: see `checkpoint_problems`), oldest first (by step number, not by
    name). A `.tmp` folder left by a kill mid-write is never listed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


# Written LAST into `checkpoint-N.tmp` (before the rename): the relative path and size of every other file. A
# checkpoint is complete only when every listed file is there with its size.
MANIFEST_NAME = "manifest.json"
# The resolved arguments of the run that wrote the checkpoint (compared on resume) and the loss guard's state.
CHECKPOINT_ARGS_NAME = "args.json"
GUARD_STATE_NAME = "guard_state.json"
# accelerate's per-process RNG files. Without them `load_state` only logs an INFO line and the run goes on with other
# random draws: a resume that is not exact. Damage there is the only kind `--allow_inexact_resume` accepts.
RNG_STATE_FILE = re.compile(r"random_states_(\d+)\.pkl")


def write_manifest(folder: Path) -> Path:
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    path = folder / MANIFEST_NAME
    with open(path, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return path


def checkpoint_problems(path, num_processes: Optional[int] = None) -> List[tuple]:
    """What keeps checkpoint `path` from an exact resume, as `(relative file, reason)` pairs; `[]` when complete.

    `num_processes`: also require the RNG state of every process of the resuming run."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return [(MANIFEST_NAME, f"{MANIFEST_NAME} is missing (a checkpoint of a version without manifests: its files "
                                f"cannot be verified)")]
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [(MANIFEST_NAME, f"{MANIFEST_NAME} is unreadable")]
    problems = []
    for relative, size in files.items():
        f = path / relative
        if not f.is_file():
            problems.append((relative, f"{relative} is missing"))
        elif f.stat().st_size != size:
            problems.append((relative, f"{relative} has {f.stat().st_size} bytes, the manifest says {size}"))
    for rank in range(num_processes or 0):
        relative = f"random_states_{rank}.pkl"
        if relative not in files:
            problems.append((relative, f"{relative} was never written (the checkpoint comes from fewer processes)"))
    return problems


def _inexact_only(problems) -> bool:
    """Problems `--allow_inexact_resume` may accept: only RNG states, or no manifest (an older checkpoint)."""
    return all(RNG_STATE_FILE.fullmatch(Path(rel).name) or rel == MANIFEST_NAME for rel, _ in problems)


def _describe(path: Path, problems) -> str:
    return f"{path}: " + "; ".join(reason for _, reason in problems)


def _accept_inexact(path: Path, problems):
    logger.warning(
        "!!! INEXACT RESUME (--allow_inexact_resume) from %s: %s. The run continues, but it is NOT exact: it will "
        "not repeat the losses and weights of an uninterrupted run.", path, "; ".join(r for _, r in problems))


def resolve_resume_checkpoint(args, num_processes: Optional[int] = None) -> Optional[Path]:
    """The checkpoint to resume from, or None. `latest` takes the newest complete checkpoint and logs every newer
    one it skipped and why; an explicitly named damaged checkpoint is an error naming the damaged file. A checkpoint
    that can only resume inexactly (missing/damaged RNG states, no manifest) needs `--allow_inexact_resume`."""
    if not args.resume_from_checkpoint:
        return None
    allow_inexact = getattr(args, "allow_inexact_resume", False)
    hint = (" Pass --allow_inexact_resume to resume anyway from a checkpoint whose only problem is its RNG states or "
            "a missing manifest (the run is then not exact).")
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch.", args.output_dir)
            return None
        skipped = []
        for path in reversed(found):
            problems = checkpoint_problems(path, num_processes)
            if problems and allow_inexact and _inexact_only(problems):
                _accept_inexact(path, problems)
                problems = []
            if not problems:
                for bad, reasons in skipped:
                    logger.warning("--resume_from_checkpoint latest: skipping damaged %s", _describe(bad, reasons))
                return path
            skipped.append((path, problems))
        inexact = any(_inexact_only(p) for _, p in skipped)
        raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint in {args.output_dir}. "
                         + " | ".join(_describe(p, r) for p, r in skipped) + "." + (hint if inexact else ""))
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        path = Path(args.output_dir) / args.resume_from_checkpoint
    if not path.is_dir():
        raise ValueError(f"Checkpoint {args.resume_from_checkpoint} does not exist.")
    problems = checkpoint_problems(path, num_processes)
    if problems and allow_inexact and _inexact_only(problems):
        _accept_inexact(path, problems)
    elif problems:
        raise ValueError(f"Checkpoint {_describe(path, problems)}." + (hint if _inexact_only(problems) else ""))
    return path


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(CHECKPOINT_PREFIX):])


# Flags a resumed run may change, and how each takes effect. Any other difference from the checkpoint's arguments
# (model shape, alignment method and its layers/weights, seed, data, batch size, precision, ...) is refused: the
# saved state would silently win, or the run would no longer be the one its args.json and model card describe.
RESUME_CHANGEABLE_FLAGS = {
    "learning_rate": "set on the optimizer's param groups after loading",
    "adam_beta1": "set on the optimizer's param groups after loading",
    "adam_beta2": "set on the optimizer's param groups after loading",
    "adam_weight_decay": "set on the optimizer's param groups after loading",
    "adam_epsilon": "set on the optimizer's param groups after loading",
    "ema_decay": "set on the EMA model after loading",
    "max_grad_norm": "read every step",
    "max_train_steps": "read every step",
    "num_train_epochs": "only resolves --max_train_steps",
    "max_nonfinite_steps": "the guard is built after loading",
    "loss_explosion_factor": "the guard is built after loading",
    "logging_steps": "cadence, read every step",
    "checkpointing_steps": "cadence, read every step",
    "checkpoints_total_limit": "read at every save",
    "validation_steps": "cadence, read every step",
    "validation_class_labels": "preview grids only",
    "validation_num_inference_steps": "preview grids only",
    "validation_guidance_scale": "preview grids only",
    "report_to": "logging only", "logging_dir": "logging only", "tracker_project_name": "logging only",
    "progress": "logging only",
    "push_to_hub": "export only", "hub_model_id": "export only", "hub_private": "export only",
    "save_remote_code": "export only",
    "output_dir": "the run's folder may move", "cache_dir": "where `datasets` caches, not what it reads",
    "gradient_checkpointing": "speed and memory; the same math",
    "torch_compile": "speed; the same math",
    "allow_tf32": "matmul precision on GPUs, set at start",
}
# Never compared: the invocation itself.
RESUME_BOOKKEEPING_KEYS = ("launch_command", "resume_from_checkpoint", "config", "allow_inexact_resume",
                           "resume_history")


def compare_resume_args(args, checkpoint: Path) -> Dict[str, list]:
    """`{flag: [checkpoint value, current value]}` for the flags that differ from the checkpoint's `args.json` and
    may change (`RESUME_CHANGEABLE_FLAGS`; the caller applies them); a ValueError naming both values for any other."""
    saved_path = Path(checkpoint) / CHECKPOINT_ARGS_NAME
    if not saved_path.is_file():  # only reachable through --allow_inexact_resume (no manifest: an older version)
        logger.warning("%s has no %s: the flags of this run cannot be compared with the checkpoint's.",
                       checkpoint, CHECKPOINT_ARGS_NAME)
        return {}
    saved = json.loads(saved_path.read_text())
    current = json.loads(json.dumps(vars(args), default=str))  # the same normalisation as `save_args`
    absent = "(absent)"
    changed = {}
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_BOOKKEEPING_KEYS or "--" + key in SECRET_FLAGS:
            continue
        old, new = saved.get(key, absent), current.get(key, absent)
        if old != new:
            changed[key] = [old, new]
    refused = {k: v for k, v in changed.items() if k not in RESUME_CHANGEABLE_FLAGS}
    if refused:
        raise ValueError(
            "Cannot resume with changed settings that cannot take effect on a resumed run: "
            + "; ".join(f"--{k}: {old} in {saved_path}, now {new}" for k, (old, new) in refused.items())
            + ". Resume with the checkpoint's values, or start a new run in another --output_dir."
        )
    return changed


def apply_resume_changes(args, optimizer, ema) -> None:
    """After `load_state`: the current flags, not the saved state, set the optimizer and EMA hyperparameters."""
    for group in optimizer.param_groups:
        group.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                     weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    ema.decay = ema.min_decay = args.ema_decay


def record_resume(args, checkpoint: Path, step: int, changed: Dict[str, list]) -> List[dict]:
    """Set `args.resume_history`: the checkpoint's history plus `{step, changed}` when flags changed now."""
    saved_path = Path(checkpoint) / CHECKPOINT_ARGS_NAME
    history = json.loads(saved_path.read_text()).get("resume_history", []) if saved_path.is_file() else []
    if changed:
        history = history + [{"step": step, "changed": changed}]
        logger.warning("Resumed at step %d with changed flags: %s", step,
                       ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changed.items()))
    args.resume_history = history
    return history


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; its partial `.tmp` folder was removed."""


# Torch's writer reports a full disk as `basic_ios::clear: iostream error`, without an errno. A filesystem left with
# less free space than this right after a failed write (before the partial files are removed) was filled by it.
DISK_FULL_FREE_BYTES = 16 * 2**20


def newest_complete_checkpoint(output_dir) -> Optional[Path]:
    for path in reversed(list_checkpoints(output_dir)):
        if not checkpoint_problems(path):
            return path
    return None


def _checkpoint_write_error(output_dir, tmp: Path, step: int, error: BaseException) -> CheckpointWriteError:
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < DISK_FULL_FREE_BYTES)
    shutil.rmtree(tmp, ignore_errors=True)
    intact = newest_complete_checkpoint(output_dir)
    cause = (f"The device holding {output_dir} is full ({free} bytes free)" if full
             else f"Writing failed ({type(error).__name__}: {error})")
    return CheckpointWriteError(
        f"{cause} while writing {CHECKPOINT_PREFIX}{step}; the partial {tmp} was removed. "
        + (f"The newest intact checkpoint is {intact}. " if intact else "No intact checkpoint exists yet. ")
        + ("Free some space, then " if full else "Fix the cause, then ")
        + "rerun the same command with --resume_from_checkpoint latest."
    )


def save_checkpoint(accelerator, output_dir, step: int, total_limit: Optional[int] = None, stream=None, args=None,
                    guard=None) -> Path:
    """`accelerator.save_state` into `checkpoint-N.tmp`, then an atomic rename to `checkpoint-N`; prune old ones.

    `stream` (a `TrainDataStream`) writes each process's data position into the same folder, `args` the resolved
    arguments (`args.json`, compared on resume) and `guard` (a `NonFiniteGuard`) its state, which also records
    whether this checkpoint is healthy. `manifest.json` is written last, then the folder is renamed. A failed write
    (full disk, ...) removes the `.tmp` folder and raises a `CheckpointWriteError` that says how to resume.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if stream is not None:
            stream.save_state(str(tmp))
        if accelerator.is_main_process:
            if args is not None:
                save_args(args, tmp / CHECKPOINT_ARGS_NAME)
            if guard is not None:
                guard.checkpoint_saved(final)
                (tmp / GUARD_STATE_NAME).write_text(json.dumps(guard.state_dict()))
    except (OSError, RuntimeError) as error:
        raise _checkpoint_write_error(output_dir, tmp, step, error) from error
    if guard is not None and not accelerator.is_main_process:
        guard.checkpoint_saved(final)  # every process keeps the same guard state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            write_manifest(tmp)
        except OSError as error:
            raise _checkpoint_write_error(output_dir, tmp, step, error) from error
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final


def rewind_loss_log(path: Path, step: int) -> float:
    """Resume the per-step loss log at `step`: drop rows written after that checkpoint (a run killed between two
    checkpoints logged steps that will be trained again) and return the training seconds logged at `step`, so the
    wall-clock of a resumed run continues instead of starting again at zero."""
    path = Path(path)
    if not path.is_file():
        return 0.0
    kept, seconds = [], 0.0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if row.get("step", step + 1) <= step:
            kept.append(line)
            seconds = float(row.get("train_seconds", seconds))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return seconds


class NonFiniteGuard:
    """Skip steps whose loss is bad on any process, NaN/inf or exploding (above `explosion_factor` x the running mean
    of the last `window` healthy losses; None/0 disables that part); stop after `max_consecutive` bad steps in a row,
    naming the last checkpoint saved with only healthy steps since the previous save."""

    def __init__(self, accelerator, max_consecutive: int, explosion_factor: Optional[float] = LOSS_EXPLOSION_FACTOR,
                 window: int = LOSS_EXPLOSION_WINDOW):
        self.accelerator = accelerator
        self.max_consecutive = max_consecutive
        self.explosion_factor = explosion_factor if explosion_factor and explosion_factor > 0 else None
        self.recent = collections.deque(maxlen=window)  # recent healthy losses (mean over processes)
        self.skipped = 0
        self.consecutive = 0
        self.bad_since_save = False
        self.last_good_checkpoint: Optional[Path] = None

    def check(self, loss: torch.Tensor) -> bool:
        """True if the step is healthy on every process. Collective: call it on all processes; one host sync, the
        gathered losses (every process then takes the same decision from the same numbers)."""
        losses = self.accelerator.gather(loss.detach().float().reshape(1)).cpu()
        reason = None
        if not bool(torch.isfinite(losses).all()):
            reason = "Non-finite loss"
        else:
            value = float(losses.mean())
            if self.explosion_factor is not None and self.recent:
                running = sum(self.recent) / len(self.recent)
                if value > self.explosion_factor * running:
                    reason = f"Exploding loss {value:.4g} (> {self.explosion_factor:g} x running mean {running:.4g})"
        if reason is None:
            self.recent.append(value)
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        self.bad_since_save = True
        logger.warning("%s: step skipped (%d skipped in total).", reason, self.skipped)
        if self.consecutive >= self.max_consecutive:
            where = self.last_good_checkpoint or "none saved yet"
            raise RuntimeError(
                f"{self.consecutive} consecutive steps had a non-finite or exploding loss; stopping. "
                f"Last good checkpoint: {where}"
            )
        return False

    def checkpoint_saved(self, path: Path) -> bool:
        """Record a checkpoint: healthy (and the new last good one) if no bad step happened since the last save."""
        healthy = not self.bad_since_save
        if healthy:
            self.last_good_checkpoint = Path(path)
        self.bad_since_save = False
        return healthy

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "skipped": self.skipped, "consecutive": self.consecutive,
                "bad_since_save": self.bad_since_save,
                "last_good_checkpoint": None if self.last_good_checkpoint is None else str(self.last_good_checkpoint)}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(float(v) for v in state["recent"])
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.bad_since_save = bool(state["bad_since_save"])
        last = state.get("last_good_checkpoint")
        self.last_good_checkpoint = Path(last) if last else None


# ----------------------------------------------------------------------------------------------------------------------
# Samples, final export


def default_validation_labels(num_classes: int, count: int = 8) -> List[int]:
    count = min(count, num_classes)
    return [round(i * (num_classes - 1) / max(count - 1, 1)) for i in range(count)]


def build_pipeline(transformer, vae, id2label=None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .pipelines import SiTPipeline

    # shift 1 and the pipeline's own sigma grid reproduce REPA's uniform Euler sampler.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    return SiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)


@torch.no_grad()
def sample_grid(transformer, vae, class_labels: List[int], *, num_inference_steps: int, guidance_scale: float,
                seed: int, id2label=None, rows: int = 2):
    """PIL grid of samples, `rows` per class, drawn with a private generator (the training RNG is untouched)."""
    from diffusers.utils import make_image_grid

    pipe = build_pipeline(transformer, vae, id2label)
    pipe.set_progress_bar_config(disable=True)
    labels = [c for c in class_labels for _ in range(rows)]
    device = next(transformer.parameters()).device
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(labels))]
    images = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                  generator=generators).images
    del pipe
    # one column per class, `rows` rows
    ordered = [images[c * rows + r] for r in range(rows) for c in range(len(class_labels))]
    return make_image_grid(ordered, rows=rows, cols=len(class_labels))


def save_ema_samples(args, accelerator, model, ema, vae, step: int, num_classes: int, id2label=None) -> Optional[Path]:
    """Swap the EMA weights in (eval mode), draw a grid, write `samples/step-N.png`, restore the training weights."""
    if not accelerator.is_main_process:
        return None
    model = unwrap(accelerator, model)
    was_training = model.training
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    model.eval()
    try:
        labels = args.validation_class_labels or default_validation_labels(num_classes)
        guidance = args.validation_guidance_scale
        if model.config.class_dropout_prob <= 0 and guidance != 1.0:
            logger.warning("The model has no null class (class_dropout_prob 0): sample grids are drawn without CFG "
                           "(guidance 1 instead of --validation_guidance_scale %s).", guidance)
            guidance = 1.0
        grid = sample_grid(model, vae, labels, num_inference_steps=args.validation_num_inference_steps,
                           guidance_scale=guidance, seed=args.seed, id2label=id2label)
    finally:
        ema.restore(model.parameters())
        model.train(was_training)
    path = Path(args.output_dir) / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("samples", np.asarray(grid)[None], step, dataformats="NHWC")
    return path


def export_pipeline(output_dir, transformer, ema, vae, id2label=None, save_remote_code: bool = True) -> Path:
    """Write `output_dir` as a SiTPipeline folder: `transformer`'s config, `ema`'s weights (main process only)."""
    output_dir = Path(output_dir)
    final = SiTTransformer2DModel.from_config(transformer.config)
    ema.copy_to(final.parameters())
    final.eval()
    pipe = build_pipeline(final, vae, id2label)
    # On by default: the folder (and its Hub copy) then also loads with diffusers alone,
    # `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.
    pipe.save_pretrained(output_dir, save_remote_code=save_remote_code)
    return output_dir


def steps_from_epochs(epochs: float, dataset_size: Optional[int], global_batch: int, what: str) -> int:
    """Optimizer steps of `epochs` epochs: epochs x (dataset_size // global_batch), at least 1.

    `dataset_size` comes from the dataset's metadata (`ImageSource.num_examples`); None (a stream without split info
    or parquet footers, e.g. webdataset tars) is an error naming the flag `what` to pass instead.
    """
    if dataset_size is None:
        raise ValueError(
            f"The dataset size is unknown: the streamed dataset has neither split sizes in its metadata (the "
            f"`dataset_info` of its card) nor parquet files whose footers give the row count, so "
            f"{epochs} epochs cannot be converted to steps. Pass {what} (optimizer steps) instead, or use "
            f"--no_streaming (map-style data knows its length)."
        )
    if global_batch <= 0:
        raise ValueError(f"The global batch size must be positive, got {global_batch}.")
    if dataset_size < global_batch:
        raise ValueError(
            f"The dataset has {dataset_size} examples, fewer than one global batch of {global_batch}: an epoch has "
            f"no full step. Lower --global_batch_size or pass {what}."
        )
    return max(1, math.floor(epochs * (dataset_size // global_batch)))



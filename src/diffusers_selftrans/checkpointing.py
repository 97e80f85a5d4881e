# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Checkpoints that a kill, a full disk or a changed flag cannot turn into a silently wrong run.

- `save_checkpoint`: `accelerator.save_state` into `checkpoint-N.tmp` (transformer / projector / EMA as
  `save_pretrained` folders through `register_checkpoint_hooks`), each process's data position, the run's arguments
  and the loss guard's state, then `manifest.json` (every file and its size) LAST, then an atomic rename; a failed
  write removes the `.tmp` and says which checkpoint is intact.
- `resolve_resume_checkpoint`: `latest` is the newest checkpoint whose manifest matches; damaged ones are skipped and
  named; a resume that cannot be exact refuses to start unless `allow_inexact`.
- `resume_training`: refuses a checkpoint made from other data, processes or VAE (`checkpoint_provenance`, compared
  with `provenance.check_provenance`) and changed flags that cannot take effect (`RESUME_CHANGEABLE_FLAGS` lists those
  that can), loads the state and applies the rest; `rewind_loss_log` drops log rows written after the checkpoint.
"""

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .models import AlignmentProjector, SiTTransformer2DModel
from .provenance import check_provenance, read_provenance, write_provenance

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# The run's arguments as recorded in `args.json`, checkpoints and model cards (secrets removed)

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


def run_arguments(args) -> Dict[str, Any]:
    """The flags of a run as a plain dict without secrets: what `args.json`, resume checks and model cards record."""
    values = args if isinstance(args, dict) else vars(args)
    return {k: v for k, v in values.items() if "--" + k not in SECRET_FLAGS}


def save_args(args, path: Path):
    """The resolved arguments (a namespace or a dict) next to the outputs, secrets removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = run_arguments(args)
    path.write_text(json.dumps(values, indent=2, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_PREFIX = "checkpoint-"


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
            # EMAModel.save_pretrained builds (randomly initialises) a model: keep that off the training RNG, or a
            # run that checkpoints would draw other noise than one that does not
            with torch.random.fork_rng(devices=[]):
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
    made_by = (read_provenance(path) or {}).get("num_processes", num_processes)
    for rank in range(num_processes if made_by == num_processes else 0):  # else `resume_training` names the cause
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


def resolve_resume_checkpoint(resume_from_checkpoint: Optional[str], output_dir, *, num_processes: Optional[int] = None,
                              allow_inexact: bool = False) -> Optional[Path]:
    """The checkpoint to resume from, or None. `latest` takes the newest complete checkpoint and logs every newer
    one it skipped and why; an explicitly named damaged checkpoint is an error naming the damaged file. A checkpoint
    that can only resume inexactly (missing/damaged RNG states, no manifest) needs `--allow_inexact_resume`."""
    if not resume_from_checkpoint:
        return None
    hint = (" Pass --allow_inexact_resume to resume anyway from a checkpoint whose only problem is its RNG states or "
            "a missing manifest (the run is then not exact).")
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch.", output_dir)
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
        raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}. "
                         + " | ".join(_describe(p, r) for p, r in skipped) + "." + (hint if inexact else ""))
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise ValueError(f"Checkpoint {resume_from_checkpoint} does not exist.")
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
    "torch_compile_backend": "speed; the same math",
    "allow_tf32": "matmul precision on GPUs, set at start",
    "fused_adamw": "the same update in one kernel (CUDA)",
}
# Never compared: the invocation itself.
RESUME_BOOKKEEPING_KEYS = ("launch_command", "resume_from_checkpoint", "config", "allow_inexact_resume",
                           "resume_history", "run_id", "overwrite_output_dir", "break_run_lock",
                           # derived from the data and the batch: `checkpoint_provenance` compares those, by name
                           "steps_per_epoch")

# Inputs of a checkpoint that an inexact resume (`--allow_inexact_resume`) may change: the data stream then restarts
# its epoch and the new processes draw fresh random numbers. The classes and the VAE may never change: the class
# embedding rows and the latents the weights were trained on would silently mean something else.
INEXACT_PROVENANCE_KEYS = ("dataset_size", "num_processes", "global_batch_size")


def checkpoint_provenance(*, dataset_size, num_processes: int, global_batch_size: int, num_classes=None,
                          id2label=None, vae_encoder: Optional[dict] = None, **inputs) -> Dict[str, Any]:
    """What a checkpoint's state depends on besides the flags (the classes and their names, the dataset's size, the
    process count, the global batch, the VAE encoder, and any other `inputs`, e.g. the text encoders): compared on
    resume by `resume_training`."""
    names = None if not id2label else [id2label[k] for k in sorted(id2label)]
    record = {"dataset_size": dataset_size, "num_processes": num_processes, "global_batch_size": global_batch_size}
    if num_classes is not None:
        record.update(num_classes=num_classes, class_names=names)
    if vae_encoder is not None:
        record["vae_encoder"] = vae_encoder
    record.update(inputs)
    return record


def check_checkpoint_provenance(checkpoint: Path, provenance: Dict[str, Any], allow_inexact: bool = False) -> None:
    recorded = read_provenance(checkpoint)
    exact = {k: v for k, v in provenance.items() if k not in INEXACT_PROVENANCE_KEYS}
    check_provenance(checkpoint, recorded, exact,
                     remedy="Resume with the data and VAE it was trained on, or start a new run in another "
                            "--output_dir.")
    inexact = {k: v for k, v in provenance.items() if k in INEXACT_PROVENANCE_KEYS}
    check_provenance(checkpoint, recorded, inexact, override="--allow_inexact_resume", allowed=allow_inexact,
                     remedy="An exact resume needs the same dataset, process count and global batch size.")


def compare_resume_args(run_args: Dict[str, Any], checkpoint: Path) -> Dict[str, list]:
    """`{flag: [checkpoint value, current value]}` for the flags that differ from the checkpoint's `args.json` and
    may change (`RESUME_CHANGEABLE_FLAGS`; the caller applies them); a ValueError naming both values for any other."""
    saved_path = Path(checkpoint) / CHECKPOINT_ARGS_NAME
    if not saved_path.is_file():  # only reachable through --allow_inexact_resume (no manifest: an older version)
        logger.warning("%s has no %s: the flags of this run cannot be compared with the checkpoint's.",
                       checkpoint, CHECKPOINT_ARGS_NAME)
        return {}
    saved = json.loads(saved_path.read_text())
    current = json.loads(json.dumps(run_arguments(run_args), default=str))  # the same normalisation as `save_args`
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


def record_resume(checkpoint: Path, step: int, changed: Dict[str, list]) -> List[dict]:
    """The run's resume history: the checkpoint's, plus `{step, changed}` when flags changed now (logged)."""
    saved_path = Path(checkpoint) / CHECKPOINT_ARGS_NAME
    history = json.loads(saved_path.read_text()).get("resume_history", []) if saved_path.is_file() else []
    if changed:
        history = history + [{"step": step, "changed": changed}]
        logger.warning("Resumed at step %d with changed flags: %s", step,
                       ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changed.items()))
    return history


def resume_training(accelerator, checkpoint: Path, *, run_args: Dict[str, Any], optimizer, ema, stream=None,
                    guard=None, process_states=(), provenance: Optional[Dict[str, Any]] = None,
                    allow_inexact: bool = False) -> Tuple[int, List[dict]]:
    """Continue a run from `checkpoint`; returns `(global step, resume history)`.

    Flags that differ from the checkpoint's and cannot take effect are refused before anything loads; then the
    accelerate state (models, optimizer, EMA, RNG), each process's data position and the guard's state are loaded,
    and the current optimizer / EMA hyperparameters (`run_args`) replace the saved ones.

    `process_states`: more objects with `save_state(folder)` / `load_state(folder)` that every process loads (e.g.
    the T2I script's FSDP EMA shards), after the accelerate state and before the EMA hyperparameters are applied.
    `provenance`: this run's `checkpoint_provenance`, compared with the checkpoint's before anything loads.
    """
    changed = compare_resume_args(run_args, checkpoint)  # a changed flag is named as the flag
    if provenance is not None:
        check_checkpoint_provenance(checkpoint, provenance, allow_inexact)
    accelerator.load_state(str(checkpoint))
    if stream is not None:
        stream.load_state(str(checkpoint))
    for state in process_states:
        state.load_state(str(checkpoint))
    for group in optimizer.param_groups:  # the current flags, not the saved state, set the hyperparameters
        group.update(lr=run_args["learning_rate"], betas=(run_args["adam_beta1"], run_args["adam_beta2"]),
                     weight_decay=run_args["adam_weight_decay"], eps=run_args["adam_epsilon"])
    ema.decay = ema.min_decay = run_args["ema_decay"]
    if guard is not None:
        if (checkpoint / GUARD_STATE_NAME).is_file():
            guard.load_state_dict(json.loads((checkpoint / GUARD_STATE_NAME).read_text()))
            last = guard.last_good_checkpoint  # by name: the run's folder may have moved
            guard.last_good_checkpoint = None if last is None else checkpoint.parent / last.name
        else:
            guard.last_good_checkpoint = checkpoint
    step = checkpoint_step(checkpoint)
    return step, record_resume(checkpoint, step, changed)


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


def save_checkpoint(accelerator, output_dir, step: int, total_limit: Optional[int] = None, stream=None,
                    run_args: Optional[Dict[str, Any]] = None, guard=None, process_states=(),
                    provenance: Optional[Dict[str, Any]] = None) -> Path:
    """`accelerator.save_state` into `checkpoint-N.tmp`, then an atomic rename to `checkpoint-N`; prune old ones.

    `stream` (a `TrainDataStream`) writes each process's data position into the same folder, `run_args` the resolved
    arguments (`args.json`, compared on resume) and `guard` (a `NonFiniteGuard`) its state, which also records
    whether this checkpoint is healthy; every process writes each of `process_states` (objects with
    `save_state(folder)`, like `stream`) into the folder too, and `provenance` (`checkpoint_provenance`) goes to
    `provenance.json`. `manifest.json` is written last, then the folder is renamed. A failed write
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
        for state in process_states:
            state.save_state(str(tmp))
        if accelerator.is_main_process:
            if run_args is not None:
                save_args(run_args, tmp / CHECKPOINT_ARGS_NAME)
            if provenance is not None:
                write_provenance(tmp, provenance)
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

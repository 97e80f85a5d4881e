# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""What the SiT training scripts share around their loops: loading models and the VAE, encoding a batch, the loss
guard, the per-step log, EMA sample grids and the exported pipeline folder.

Flags live in `cli.py`, checkpoints and resume in `checkpointing.py`, model cards and the Hub in `hub.py`; the
training loops themselves are written out in `examples/train_align.py` and `examples/train_self_transcendence.py`.
"""

import collections
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .models import SiTTransformer2DModel
from .models.transformer_sit import parse_preset
from .provenance import check_provenance, vae_encoder_identity

logger = logging.getLogger(__name__)

# The loss guard: a finite loss this many times above the running mean of recent healthy losses is an explosion.
# A healthy flow-matching loss falls slowly and, being a mean over the batch and every latent element, its per-batch
# noise is a fraction of its mean; the reported divergence reached 2.6e18. One order of magnitude is a margin we
# chose between the two (not a measured threshold): `--loss_explosion_factor` sets it, 0 disables it.
LOSS_EXPLOSION_FACTOR = 10.0
# Number of recent healthy losses in that running mean (long enough to smooth batch noise, short enough to follow
# the loss as it falls during training).
LOSS_EXPLOSION_WINDOW = 100


# ----------------------------------------------------------------------------------------------------------------------
# Models


def configure_logging():
    """INFO logging with timestamps for a training script (accelerate's logger adds the process)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)


def tracker_config(run_args: Dict) -> Dict:
    """The flags a tracker (tensorboard, wandb) can record: the scalar ones."""
    return {k: v for k, v in run_args.items() if isinstance(v, (int, float, str, bool))}


def model_config(model: str, *, sample_size: int, in_channels: int, num_classes: int, qk_norm: bool,
                 class_dropout_prob: float, id2label: Optional[Dict[int, str]] = None) -> dict:
    """A SiT config from a preset name (`SiT-B/2`) or a config JSON path, completed with what the data and VAE decide."""
    if os.path.isfile(model):
        config = json.loads(Path(model).read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config = parse_preset(model)
    config.update(sample_size=sample_size, in_channels=in_channels, num_classes=num_classes, qk_norm=qk_norm,
                  class_dropout_prob=class_dropout_prob)
    if id2label:
        config["id2label"] = {int(k): v for k, v in id2label.items()}
    return config


def batch_sizes(global_batch_size: int, train_batch_size: Optional[int], num_processes: int,
                gradient_accumulation_steps: int) -> Tuple[int, int]:
    """`(per-device batch, global batch)`: `train_batch_size` per device if given, else `global_batch_size` split over
    processes x accumulation steps (an error if it does not divide)."""
    denom = num_processes * gradient_accumulation_steps
    if train_batch_size is None:
        if global_batch_size % denom:
            raise ValueError(f"--global_batch_size {global_batch_size} is not divisible by processes x accumulation "
                             f"({denom}).")
        train_batch_size = global_batch_size // denom
    return train_batch_size, train_batch_size * denom


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


# Which stage-1 weights guide stage 2 (`--guiding_weights`). The released stage 2 loads the stage-1 checkpoint's raw
# weights (`ckpt['model']`, method-notes §3.2 and §3.5), so `raw` is the default; stage 1 writes them beside its EMA
# pipeline (`transformer_raw/`). `ema` guides with the exported EMA transformer (`transformer/`).
GUIDING_WEIGHTS_SUBFOLDERS = {"raw": "transformer_raw", "ema": "transformer"}


def load_guiding_model(name_or_path: str, weights: str = "raw", subfolder: Optional[str] = None) -> SiTTransformer2DModel:
    """The frozen stage-1 model that guides stage 2.

    A stage-1 output folder (or its Hub copy) holds two sets of weights: `weights="raw"` loads `transformer_raw/`
    (what the released stage 2 guides with), `"ema"` the pipeline's EMA `transformer/`. A folder that is one model
    (config.json at its root, e.g. a converted released checkpoint) and an explicit `subfolder` load as given. A
    stage-1 folder without raw weights is an error naming `--guiding_weights ema`, never a silent switch."""
    if weights not in GUIDING_WEIGHTS_SUBFOLDERS:
        raise ValueError(f"--guiding_weights {weights!r}: choose one of {sorted(GUIDING_WEIGHTS_SUBFOLDERS)}.")
    root = Path(os.fspath(name_or_path))
    if subfolder is not None or (root.is_dir() and (root / "config.json").exists()):
        logger.info("Guiding model: the weights in %s%s, as given.", name_or_path, f"/{subfolder}" if subfolder else "")
        return load_transformer(name_or_path, subfolder=subfolder)
    subfolder = GUIDING_WEIGHTS_SUBFOLDERS[weights]
    if weights == "raw" and root.is_dir() and not (root / subfolder / "config.json").exists():
        raise ValueError(
            f"{name_or_path} has no {subfolder}/: no raw stage-1 weights to guide with (stage 1 writes them since "
            f"they are the released stage 2's teacher). Pass --guiding_weights ema to guide with its EMA weights "
            f"(transformer/), or point --guiding_model_name_or_path at a model folder.")
    try:
        model = load_transformer(name_or_path, subfolder=subfolder)
    except ValueError as error:
        if weights != "raw":
            raise
        raise ValueError(f"{name_or_path} has no {subfolder}/ with raw stage-1 weights ({error}). Pass "
                         f"--guiding_weights ema to guide with its EMA weights (transformer/).") from None
    logger.info("Guiding model: the %s stage-1 weights of %s (%s/).", weights, name_or_path, subfolder)
    return model


def load_vae(name_or_path: str, subfolder: Optional[str] = None):
    """A frozen `AutoencoderKL` (eval mode, no gradients) from a folder or Hub id."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder)
    return vae.eval().requires_grad_(False)


def check_guiding_vae(guiding_name_or_path: str, vae, allowed: bool = False) -> None:
    """Refuse a guiding model trained on other latents than `vae` makes: the VAE its stage-1 pipeline folder (or Hub
    repo) holds in `vae/` against this run's, by `vae_encoder_identity` (decoder-only fine-tunes pass).
    `allowed` (`--allow_guiding_vae_mismatch`) turns the refusal into a warning."""
    root = Path(os.fspath(guiding_name_or_path))
    if root.is_dir():  # the pipeline folder, or its transformer/ subfolder
        root = root if (root / "vae").is_dir() else root.parent if (root.parent / "vae").is_dir() else None
    try:
        guiding_vae = None if root is None else load_vae(os.fspath(root), "vae")
    except (OSError, ValueError):  # a Hub repo without vae/, or unreachable
        guiding_vae = None
    if guiding_vae is None:
        logger.warning("%s has no vae/ beside its transformer: cannot check that it was trained on this run's VAE "
                       "latents.", guiding_name_or_path)
        return
    check_provenance(f"the guiding model {guiding_name_or_path}", {"vae_encoder": vae_encoder_identity(guiding_vae)},
                     {"vae_encoder": vae_encoder_identity(vae)}, override="--allow_guiding_vae_mismatch",
                     allowed=allowed,
                     remedy="Its guide features were learnt on the latents of its own VAE (its vae/): train stage 2 "
                            "with that VAE (--vae_name_or_path), or a guiding model trained on yours.")


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls and cuDNN convolutions on CUDA (`--allow_tf32`, on by default); nothing on a CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_autocast_dtype(choice: str, mixed_precision: str) -> Optional[torch.dtype]:
    """`--guiding_autocast`: `auto` follows the run's mixed precision (`accelerator.mixed_precision`)."""
    return AUTOCAST_DTYPES.get(mixed_precision if choice == "auto" else choice)


def vae_downsample_factor(vae) -> int:
    """Pixels per latent cell along a side: what the VAE says (`spatial_compression_ratio`: Sana's `AutoencoderDC`,
    the video VAEs), else `AutoencoderKL`'s encoder, which halves the side in every block but the last."""
    ratio = getattr(vae, "spatial_compression_ratio", None)
    return int(ratio) if ratio else 2 ** (len(vae.config.block_out_channels) - 1)


def vae_latent_size(vae, resolution: int) -> int:
    factor = vae_downsample_factor(vae)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not divisible by the VAE downsampling factor {factor}.")
    return resolution // factor


class LatentEncoder:
    """A data batch -> scaled latents x0 = (z - shift) * scale: z a fresh posterior sample each step (as REPA) for a
    VAE with a posterior (`AutoencoderKL`), the encoder's output for a deterministic one (Sana's `AutoencoderDC`).
    Scale and shift come from the VAE config (no shift_factor: 0)."""

    def __init__(self, vae):
        self.vae = vae
        self.scale = vae.config.scaling_factor
        self.shift = vae.config.get("shift_factor") or 0.0

    @torch.no_grad()
    def __call__(self, batch: Dict[str, torch.Tensor], device) -> torch.Tensor:
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(device, torch.float32)
            std = batch["latent_std"].to(device, torch.float32)
            z = mean + std * torch.randn_like(mean)
        else:
            pixels = batch["pixel_values"].to(device, self.vae.dtype)
            encoded = self.vae.encode(pixels)
            z = encoded.latent_dist.sample() if hasattr(encoded, "latent_dist") else encoded.latent
            z = z.float()
        return (z - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale + self.shift).sample


def unwrap(accelerator, model: nn.Module) -> nn.Module:
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


class NonFiniteGuard:
    """The one host read of an optimizer step, taken once its backward is queued, and what is decided from it.

    Skip steps whose loss is bad on any process, NaN/inf or exploding (above `explosion_factor` x the running mean
    of the last `window` healthy losses; None/0 disables that part); stop after `max_consecutive` bad steps in a row,
    naming the last checkpoint saved with only healthy steps since the previous save. The same read carries the
    preemption flag and the values the step log records, so the training loop reads the device once per step.

    Per micro-step: `observe(loss)` (device only). Per optimizer step: `check(...)`, a collective."""

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
        self.stop_requested = False  # a preemption signal reached some process (see `check`)
        self.values: Dict[str, float] = {}  # the last step's logged values, on the host (see `check`)
        self._loss_sum, self._micro_steps = None, 0

    def observe(self, loss: torch.Tensor) -> None:
        """Add one micro-step's loss to the step's (no host read: a device-side sum; NaN/inf propagate into it)."""
        loss = loss.detach().float().reshape(())
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro_steps += 1

    def check(self, loss: Optional[torch.Tensor] = None, stop_requested: bool = False,
              logged: Optional[Dict[str, torch.Tensor]] = None, counts: Optional[Dict[str, float]] = None) -> bool:
        """True if the step is healthy on every process. Collective: call it on all processes. ONE gather and ONE
        device-to-host copy of: the mean loss of the micro-steps `observe`d since the last check (plus `loss`, if
        given), this process's `stop_requested`, the `logged` scalar tensors and the host `counts`; every process then
        takes the same decisions from the same numbers.

        After it: `stop_requested` is True on every process once any process asked (a preemption signal: all of them
        stop after this same optimizer step), and `values` holds the `logged` values averaged over processes and the
        `counts` summed over processes, as floats."""
        if loss is not None:
            self.observe(loss)
        if self._loss_sum is None:
            raise RuntimeError("NonFiniteGuard.check: no loss observed since the last check.")
        device = self._loss_sum.device
        logged, counts = dict(logged or {}), dict(counts or {})
        row = torch.stack([self._loss_sum / self._micro_steps, torch.tensor(float(stop_requested), device=device)]
                          + [v.detach().float().reshape(()).to(device) for v in logged.values()]
                          + [torch.tensor(float(c), device=device) for c in counts.values()])
        self._loss_sum, self._micro_steps = None, 0
        gathered = self.accelerator.gather(row).cpu().reshape(-1, len(row))  # the step's one host read
        losses = gathered[:, 0]
        self.stop_requested = self.stop_requested or bool(gathered[:, 1].any())
        means, sums = gathered[:, 2:2 + len(logged)].mean(0).tolist(), gathered[:, 2 + len(logged):].sum(0).tolist()
        self.values = {**dict(zip(logged, means)), **{name: int(round(v)) for name, v in zip(counts, sums)}}
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


class StepLog:
    """The per-step record of a run: a row per optimizer step in `loss_log.jsonl` (main process), the trackers and
    the progress bar every `logging_steps`.

    `step(...)` takes values already on the host (`NonFiniteGuard.values`: reduced across processes in the step's
    one collective), so logging reads nothing from the device. A resumed run continues the log at its checkpoint
    (`checkpointing.rewind_loss_log`) and its clock.
    """

    def __init__(self, accelerator, path, *, initial_step: int, total_steps: int, logging_steps: int,
                 images_per_step: int, progress: bool = True):
        from tqdm.auto import tqdm

        from .checkpointing import rewind_loss_log

        self.accelerator = accelerator
        self.logging_steps, self.total_steps, self.images_per_step = logging_steps, total_steps, images_per_step
        self.train_seconds = 0.0  # time in training steps only (no checkpoints, no grids)
        self.file = None
        if accelerator.is_main_process:  # a fresh run starts an empty log; a resumed one continues at its checkpoint
            self.train_seconds = rewind_loss_log(path, initial_step)
            self.file = open(path, "a")
        self.progress = tqdm(total=total_steps, initial=initial_step, desc="train",
                             disable=not (progress and accelerator.is_local_main_process))
        self.images, self.tick = 0, time.perf_counter()
        self.last: Dict[str, float] = {}

    def step(self, step: int, values: Dict[str, float], **host) -> Dict[str, float]:
        """Log optimizer step `step`: `values` (host numbers, already reduced across processes) and `host` values
        (this process's)."""
        row = {"train_seconds": round(self.train_seconds, 4), **values, **host}
        self.images += self.images_per_step
        self.progress.update(1)
        if step % self.logging_steps == 0 or step == self.total_steps:
            row["images_per_sec"] = self.images / max(time.perf_counter() - self.tick, 1e-9)
            self.images, self.tick = 0, time.perf_counter()
            self.accelerator.log(row, step=step)
            self.progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_sec']:.1f}")
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **row}) + "\n")
            self.file.flush()
        self.last = row
        return row

    def close(self):
        self.progress.close()
        if self.file is not None:
            self.file.close()


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


def save_ema_samples(accelerator, model, ema, vae, path, *, class_labels: List[int], num_inference_steps: int,
                     guidance_scale: float, seed: int, id2label=None, step: int = 0) -> Optional[Path]:
    """Swap the EMA weights in (eval mode), draw a grid to `path`, restore the training weights (main process)."""
    if not accelerator.is_main_process:
        return None
    model = unwrap(accelerator, model)
    was_training = model.training
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    model.eval()
    try:
        if model.config.class_dropout_prob <= 0 and guidance_scale != 1.0:
            logger.warning("The model has no null class (class_dropout_prob 0): sample grids are drawn without CFG "
                           "(guidance 1 instead of %s).", guidance_scale)
            guidance_scale = 1.0
        grid = sample_grid(model, vae, class_labels, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, seed=seed, id2label=id2label)
    finally:
        ema.restore(model.parameters())
        model.train(was_training)
    path = Path(path)
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



# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""What both example training scripts share, and nothing else.

- argument groups and `--config file.yaml|json` (same keys as the flags; unknown keys are an error),
- model / VAE / guiding-model loading and the latent encoding of a batch,
- checkpoints: `accelerator.save_state` written to a temporary folder and renamed (a kill mid-write never leaves a
  `checkpoint-N` that cannot load), save/load hooks that write `save_pretrained` folders, pruning, `latest`,
- the non-finite guard, EMA-model sample grids, and the final pipeline folder with its model card and Hub push.

The training loops themselves live in `examples/train_align.py` and `examples/train_self_transcendence.py`.
"""

import argparse
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
                   help="Stop after this many consecutive steps with a NaN/inf loss (each is skipped).")
    g = parser.add_argument_group("logging, checkpoints, samples")
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all, or none.")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--tracker_project_name", type=str, default=None)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--checkpointing_steps", type=int, default=10_000)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help='A checkpoint folder or "latest".')
    g.add_argument("--validation_steps", type=int, default=10_000, help="Sample a grid from the EMA model every N steps.")
    g.add_argument("--validation_class_labels", type=int, nargs="*", default=None,
                   help="Classes of the sample grid (default: up to 8 classes spread over the label range).")
    g.add_argument("--validation_num_inference_steps", type=int, default=50)
    g.add_argument("--validation_guidance_scale", type=float, default=DEFAULT_VALIDATION_GUIDANCE)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_private", action="store_true")
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


def load_transformer(name_or_path: str, subfolder: Optional[str] = None, **kwargs) -> SiTTransformer2DModel:
    """Load a SiT from a `save_pretrained` folder, a pipeline folder (its `transformer/`), or a Hub id."""
    if os.path.isdir(name_or_path):
        root = Path(name_or_path)
        if subfolder is None and not (root / "config.json").exists():
            if (root / "transformer" / "config.json").exists():
                subfolder = "transformer"
            else:
                raise ValueError(f"{name_or_path} holds neither a SiT config.json nor a transformer/ subfolder.")
        return SiTTransformer2DModel.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)
    if subfolder is not None:
        return SiTTransformer2DModel.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)
    try:  # a pipeline repo on the Hub
        return SiTTransformer2DModel.from_pretrained(name_or_path, subfolder="transformer", **kwargs)
    except (OSError, EnvironmentError):
        return SiTTransformer2DModel.from_pretrained(name_or_path, **kwargs)


def load_vae(args):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae_name_or_path, subfolder=args.vae_subfolder)
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


def register_checkpoint_hooks(accelerator, ema=None):
    """Save the prepared SiT as `transformer/`, an `AlignmentProjector` as `projector/` (both `save_pretrained`
    folders) and the EMA as `transformer_ema/`; load them back on resume. Other modules stay with accelerate."""

    def folder_name(model) -> str:
        return "transformer" if isinstance(model, SiTTransformer2DModel) else "projector"

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for i in reversed(range(len(models))):
            model = getattr(models[i], "_orig_mod", models[i])
            if isinstance(model, (SiTTransformer2DModel, AlignmentProjector)):
                model.save_pretrained(os.path.join(output_dir, folder_name(model)))
                weights.pop(i)
        if ema is not None:
            ema.save_pretrained(os.path.join(output_dir, "transformer_ema"))

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            model = getattr(models[i], "_orig_mod", models[i])
            if isinstance(model, (SiTTransformer2DModel, AlignmentProjector)):
                loaded = type(model).from_pretrained(os.path.join(input_dir, folder_name(model)))
                model.load_state_dict(loaded.state_dict())
                models.pop(i)
        if ema is not None:
            loaded = type(ema).from_pretrained(os.path.join(input_dir, "transformer_ema"), SiTTransformer2DModel,
                                               foreach=ema.foreach)
            ema.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir) -> List[Path]:
    """Complete `checkpoint-N` folders, oldest first (by step number, not by name)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume_checkpoint(args) -> Optional[Path]:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch.", args.output_dir)
            return None
        return found[-1]
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        path = Path(args.output_dir) / args.resume_from_checkpoint
    if not path.is_dir():
        raise ValueError(f"Checkpoint {args.resume_from_checkpoint} does not exist.")
    return path


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(CHECKPOINT_PREFIX):])


def save_checkpoint(accelerator, output_dir, step: int, total_limit: Optional[int] = None, stream=None) -> Path:
    """`accelerator.save_state` into `checkpoint-N.tmp`, then an atomic rename to `checkpoint-N`; prune old ones.

    `stream` (a `TrainDataStream`) writes each process's data position into the same folder before the rename.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if stream is not None:
        stream.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
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
    """Skip steps whose loss is NaN/inf on any process; stop after `max_consecutive` of them in a row."""

    def __init__(self, accelerator, max_consecutive: int):
        self.accelerator = accelerator
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.last_good_checkpoint: Optional[Path] = None

    def check(self, loss: torch.Tensor) -> bool:
        """True if every process has a finite loss. Collective: call it on all processes."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        finite = bool(self.accelerator.gather(finite).min() > 0)
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        logger.warning("Non-finite loss: step skipped (%d skipped in total).", self.skipped)
        if self.consecutive >= self.max_consecutive:
            where = self.last_good_checkpoint or "none saved yet"
            raise RuntimeError(
                f"{self.consecutive} consecutive steps had a non-finite loss; stopping. "
                f"Last good checkpoint: {where}"
            )
        return False


# ----------------------------------------------------------------------------------------------------------------------
# Samples, final export, model card, Hub


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
        grid = sample_grid(model, vae, labels, num_inference_steps=args.validation_num_inference_steps,
                           guidance_scale=args.validation_guidance_scale, seed=args.seed, id2label=id2label)
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


def export_pipeline(args, accelerator, model, ema, vae, id2label=None) -> Path:
    """Write `output_dir` as a complete SiTPipeline folder whose transformer holds the EMA weights."""
    output_dir = Path(args.output_dir)
    if not accelerator.is_main_process:
        return output_dir
    trained = unwrap(accelerator, model)
    final = SiTTransformer2DModel.from_config(trained.config)
    ema.copy_to(final.parameters())
    final.eval()
    pipe = build_pipeline(final, vae, id2label)
    pipe.save_pretrained(output_dir)
    return output_dir


MODEL_CARDS_DIR = Path(__file__).resolve().parents[2] / "model_cards"


def render_model_card(output_dir: Path, *, template: str, args, command: str, metrics: Optional[dict] = None,
                      sample_image: Optional[str] = None, base_model: Optional[str] = None, extra: Optional[dict] = None):
    """Render `model_cards/<template>` into `output_dir/README.md` with Hub front matter."""
    from huggingface_hub import ModelCard, ModelCardData

    template_path = MODEL_CARDS_DIR / template
    if not template_path.exists():  # installed without the repository checkout
        template_path = Path(__file__).parent / "model_cards" / template
    dataset = args.dataset_name or ("local image folder" if getattr(args, "train_data_dir", None) else None)
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffusers", "diffusers-selftrans", "sit", "self-transcendence", "class-conditional",
              "image-generation", "flow-matching"],
        datasets=[args.dataset_name] if getattr(args, "dataset_name", None) else None,
        base_model=base_model,
        pipeline_tag="unconditional-image-generation",
    )
    hparams = {k: v for k, v in sorted(vars(args).items())
               if "--" + k not in SECRET_FLAGS and k != "launch_command"}
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=args.hub_model_id or Path(args.output_dir).name,
        command=command,
        hyperparameters=json.dumps(hparams, indent=2, default=str),
        metrics=metrics or {},
        sample_image=sample_image,
        dataset=dataset,
        base_model=base_model,
        **(extra or {}),
    )
    card.save(str(Path(output_dir) / "README.md"))
    return card


# Everything that is not part of the published pipeline.
HUB_IGNORE_PATTERNS = [f"{CHECKPOINT_PREFIX}*", "logs/*", "*.tmp", "samples/step-*"]


def push_to_hub(args, output_dir: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(repo_id=args.hub_model_id or Path(output_dir).name, exist_ok=True,
                              private=args.hub_private).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="Upload SiT pipeline",
                      ignore_patterns=HUB_IGNORE_PATTERNS)
    return repo_id


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



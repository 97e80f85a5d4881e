# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Every command-line flag of the SiT training scripts, in one place, with its default and where that comes from.

`examples/train_align.py` (stage 1 and the baselines) and `examples/train_self_transcendence.py` (stage 2) build
their parsers from these groups: model, data (also `preprocess_latents.py`), training, alignment and, for
stage 2, the guide. `--config file.yaml|json` takes the same keys as the flags. Only the scripts and this module
know the argparse namespace: the library takes explicit parameters, and `alignment_options` / `guide_options` turn
flags into the options of `diffusers_selftrans.alignment.build_alignment`.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .alignment import ALIGNMENT_METHODS
from .data.config import (
    DEFAULT_DATASET_NAME,
    DEFAULT_MAX_SKIP_FRACTION,
    DEFAULT_RESOLUTION,
    DEFAULT_SHUFFLE_BUFFER_SIZE,
    MIN_SAMPLES_FOR_SKIP_CHECK,
)
from .checkpointing import redact_secrets
from .training import LOSS_EXPLOSION_FACTOR

# REPA/ST recipe (method-notes §2): AdamW lr 1e-4 constant, betas (0.9, 0.999), wd 0, eps 1e-8, grad clip 1.0,
# EMA 0.9999 constant, global batch 256.
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_GLOBAL_BATCH_SIZE = 256
DEFAULT_EMA_DECAY = 0.9999
DEFAULT_MAX_GRAD_NORM = 1.0
# The ST training preview draws 50-step Euler samples at CFG 4.0 (method-notes §3.4).
DEFAULT_VALIDATION_GUIDANCE = 4.0


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
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls and convolutions on CUDA (the released stage-2 script enables them); "
                        "--no-allow_tf32 for full fp32 matmuls.")
    g.add_argument("--fused_adamw", action=argparse.BooleanOptionalAction, default=True,
                   help="torch's fused AdamW kernel on CUDA (one kernel for all parameters, no host reads of the "
                        "step counters); --no-fused_adamw for the foreach implementation.")
    g.add_argument("--torch_compile", action="store_true",
                   help="torch.compile each training step's forward and loss (the student, the alignment head and, "
                        "while guided, the teacher's early-exit pass) as one graph (fullgraph=True); it recompiles "
                        "once, at the guide stop.")
    g.add_argument("--torch_compile_backend", type=str, default="inductor",
                   help="torch.compile backend (inductor; aot_eager or eager to debug).")
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
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="A run that does not resume refuses an --output_dir holding another run's outputs; this flag "
                        "deletes them first (only in a run folder: one with args.json or checkpoints).")
    g.add_argument("--break_run_lock", action="store_true",
                   help="Take over the output folder's lock left by a run on another host that is known to be dead "
                        "(same-host locks of dead processes are taken over without it).")
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


# ----------------------------------------------------------------------------------------------------------------------
# Data (the fields of `data.DataConfig`; `DataConfig.from_namespace(args)` turns them into the library's input)


def add_data_args(parser: argparse.ArgumentParser, captions: bool = False) -> argparse.ArgumentParser:
    """Add the data flags shared by the training scripts and `preprocess_latents.py`.

    `captions=True` (the text-to-image script): images with captions, `--caption_column` in place of the label flags
    and `--latents_dir` (the namespace still holds every `DataConfig` field: those three at their defaults).
    """
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id or local path for `datasets.load_dataset` "
        + (
            "(this or --train_data_dir is required)."
            if captions
            else f"(default when neither --train_data_dir nor --latents_dir is given: {DEFAULT_DATASET_NAME}, gated: "
            f"log in or pass --hub_token)."
        ),
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset config (`name=`).")
    group.add_argument("--dataset_split", type=str, default="train", help="Split to read.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Local data: "
        + ("an imagefolder with metadata.jsonl (captions)" if captions else "an imagefolder tree (class sub-folders)")
        + ", parquet file(s) or webdataset .tar shards. With --dataset_name it is passed as `data_dir=`.",
    )
    group.add_argument("--image_column", type=str, default=None, help="Image column (auto-detected if not given).")
    if captions:
        group.add_argument(
            "--caption_column",
            type=str,
            default="text",
            help="Caption column: a string or a list of strings per image; of several captions one is picked "
            "uniformly at random each time the image is read (as the released T2I code does), from a seeded "
            "generator that a resumed run restores.",
        )
        parser.set_defaults(label_column=None, num_classes=None, latents_dir=None)
    else:
        group.add_argument(
            "--label_column",
            type=str,
            default=None,
            help="Label column (auto-detected if not given; 'none' = unconditional: one class, every label 0).",
        )
        group.add_argument(
            "--num_classes",
            type=int,
            default=None,
            help="Number of classes when the label column is a plain integer (no ClassLabel), e.g. webdataset `cls` "
            "(required when streaming; map-style default: the largest label + 1, with a warning naming how many "
            "classes have no example). A label outside it is an error naming the row.",
        )
        parser.set_defaults(caption_column=None)
    group.add_argument("--cache_dir", type=str, default=None, help="`datasets` cache directory.")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: HF_TOKEN / cached login).")
    if not captions:
        group.add_argument(
            "--latents_dir",
            type=str,
            default=None,
            help="Directory written by examples/preprocess_latents.py; when given, images are not read at all.",
        )
    group.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="Training image resolution.")
    group.add_argument(
        "--random_flip",
        action="store_true",
        help="Random horizontal flips (off by default, as in REPA)."
        + ("" if captions else " With --latents_dir the shards must hold flips."),
    )
    group.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=DEFAULT_SHUFFLE_BUFFER_SIZE,
        help="Shuffle buffer for streaming data (undecoded records).",
    )
    group.add_argument(
        "--max_skip_fraction",
        type=float,
        default=DEFAULT_MAX_SKIP_FRACTION,
        help="Stop when more than this fraction of images cannot be decoded. Judged from the first read when the "
        "dataset size is known (map-style data: each process stops as soon as its skips exceed this fraction of the "
        "images it reads per epoch, later as a fraction of all images read), so small data with broken files stops "
        f"at once and one bad file in a huge dataset does not; streaming data of unknown size is judged after "
        f"{MIN_SAMPLES_FOR_SKIP_CHECK} images and at the end of every epoch.",
    )
    group.add_argument(
        "--streaming",
        dest="streaming",
        action="store_true",
        default=None,
        help="Stream with `load_dataset(..., streaming=True)` (default for Hub ids).",
    )
    group.add_argument(
        "--no_streaming",
        "--no-streaming",
        dest="streaming",
        action="store_false",
        help="Map-style Arrow-cached dataset (default for local data).",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Decoding workers per process (0 = decode in the main process). Default: 0 with --latents_dir, else the "
        "cores per local process minus one, at most 8 (data.config.default_num_workers). The sample order does not "
        "depend on it.",
    )
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# Alignment (stage 1 and the baselines)

# Every method but stage 2's, which has its own script.
STAGE1_ALIGNMENTS = tuple(m for m in ALIGNMENT_METHODS if m != "self_transcendence")


def add_t_range_and_projector_args(g):
    """The flags stage 1 (vae_align) and stage 2 (the guide) share."""
    g.add_argument("--t_range", type=float, nargs=2, default=[0.4, 0.7],
                   help="vae_align / guide loss only for t in this range (released scripts: 0.4 0.7).")
    g.add_argument("--no_t_range", action="store_true", help="Apply the alignment loss at every t.")
    g.add_argument("--t_range_mode", type=str, default="code_compat", choices=["code_compat", "per_sample"],
                   help="code_compat: the released code's batch-mean mask (paper numbers); per_sample: the intent.")
    g.add_argument("--projector_dim", type=int, default=None,
                   help="Hidden width of the alignment MLPs (REPA/ST: 2048). Tiny models may want less.")


def add_alignment_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("alignment")
    g.add_argument("--alignment", type=str, default="vae_align", choices=STAGE1_ALIGNMENTS)
    g.add_argument("--align_layer", type=int, default=None,
                   help="Student block (1-based). Default: the method's depth-scaled default.")
    g.add_argument("--align_target_layer", type=int, default=None,
                   help="Deeper block for sra/layersync. Default: the method's depth-scaled default.")
    g.add_argument("--align_loss_weight", type=float, default=None, help="lambda. Default: the method's.")
    g.add_argument("--align_target", type=str, default="velocity", choices=["velocity", "x0"],
                   help="vae_align target: velocity (released code, default) or x0 (paper Eq. 1).")
    add_t_range_and_projector_args(g)
    g.add_argument("--repa_encoder", type=str, default="facebook/dinov2-base",
                   help="transformers.AutoModel id or folder of the REPA encoder.")
    g.add_argument("--sra_t_max", type=float, default=0.2, help="SRA teacher time offset (SRA default 0.2).")


# Which flag sets which option of each method (`build_alignment(method, config, **options)`); a flag left at None
# keeps the method's own default.
ALIGNMENT_FLAG_OPTIONS = {
    "none": {},
    "vae_align": {"align_layer": "layer", "align_loss_weight": "weight", "align_target": "align_target",
                  "t_range_mode": "t_range_mode", "projector_dim": "projector_dim"},
    "repa": {"align_layer": "layer", "align_loss_weight": "weight", "repa_encoder": "encoder",
             "projector_dim": "projector_dim"},
    "sra": {"align_layer": "student_layer", "align_target_layer": "teacher_layer", "align_loss_weight": "weight",
            "sra_t_max": "t_max"},
    "layersync": {"align_layer": "weak_layer", "align_target_layer": "target_layer", "align_loss_weight": "weight"},
    "dispersive": {"align_layer": "layer", "align_loss_weight": "weight"},
}
# Methods whose loss is restricted to --t_range (None, from --no_t_range, applies it at every t).
T_RANGE_METHODS = ("vae_align",)


def alignment_options(args, method: str) -> Dict[str, Any]:
    """The `build_alignment(method, ...)` options that the flags set (`ALIGNMENT_FLAG_OPTIONS`)."""
    options = {option: getattr(args, flag) for flag, option in ALIGNMENT_FLAG_OPTIONS[method].items()
               if getattr(args, flag) is not None}
    if method in T_RANGE_METHODS:
        options["t_range"] = None if args.no_t_range else tuple(args.t_range)
    return options


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: the guide


def add_guiding_autocast_arg(g):
    """The teacher's compute precision (both stage-2 scripts)."""
    g.add_argument("--guiding_autocast", type=str, default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="Compute precision of the frozen teacher, whose weights stay fp32. auto (default): the run's "
                        "--mixed_precision (bf16 autocast under bf16). no: fp32 (TF32 matmuls with --allow_tf32, "
                        "what the released stage-2 script does). On a CPU the teacher always runs fp32. "
                        "benchmarks/teacher_precision.py measures what bf16 costs the guide target.")


def add_guide_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("self-transcendence")
    add_t_range_and_projector_args(g)
    g.add_argument("--guiding_model_name_or_path", type=str, required=False, default=None,
                   help="The stage-1 output folder, its transformer/ subfolder, or a Hub id.")
    g.add_argument("--guiding_weights", type=str, default="raw", choices=["raw", "ema"],
                   help="Which stage-1 weights guide: raw (default, what the released stage 2 loads: ckpt['model']; "
                        "stage 1 writes them to transformer_raw/) or ema (the exported EMA pipeline's transformer/).")
    g.add_argument("--guiding_model_subfolder", type=str, default=None,
                   help="Load this subfolder of the guiding model as given (overrides --guiding_weights).")
    g.add_argument("--guiding_layer", type=int, default=None, help="Teacher block (default 2n/3).")
    g.add_argument("--guided_layer", type=int, default=None, help="Student block (default n/2).")
    g.add_argument("--guide_cfg_scale", type=float, default=None,
                   help="w in f_u + w (f_c - f_u). Default 30 (SiT), 10 with LightningDiT options.")
    g.add_argument("--guide_loss_weight", type=float, default=None, help="lambda of the guide loss (default 0.5).")
    g.add_argument("--guide_stop_step", type=int, default=None,
                   help="Optimizer step after which the guide loss and the teacher stop. Default: --guide_stop_epochs.")
    g.add_argument("--guide_stop_epochs", type=float, default=None,
                   help="Default 20 epochs for 12-block models, 10 for deeper ones (paper §4), converted to steps "
                        "with the dataset size and the global batch.")
    g.add_argument("--allow_guiding_vae_mismatch", action="store_true",
                   help="Train although the guiding model's VAE (its folder's vae/) encodes other latents than "
                        "--vae_name_or_path: the guide loss then compares features of different latents.")
    g.add_argument("--guiding_classes_correspond", action="store_true",
                   help="Accept a guiding model whose id2label names other classes (same count): its class k is "
                        "taken to be the data's class k.")
    add_guiding_autocast_arg(g)

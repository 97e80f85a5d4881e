#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Stage 2 of Self-Transcendence: a fresh SiT guided by the frozen stage-1 model's classifier-free-guided features.

The student's block n/2 goes through an MLP and regresses f_g = f_u + w (f_c - f_u), the guiding model's block 2n/3
on the same x_t and t with the true label (f_c) and the null class (f_u), in one batched pass that stops at that
block. Weight 0.5, w 30; the guide loss (and every teacher forward) stops after `--guide_stop_step`
(paper: 20 epochs for B, 10 for L/XL), after which the step costs what a vanilla SiT step costs.

    accelerate launch examples/train_self_transcendence.py --model SiT-B/2 \
        --guiding_model_name_or_path sit-b2-guiding --output_dir sit-b2-selftrans

Flags are those of `train_align.py` (data, model, optimisation, checkpoints, Hub) plus the guide flags below.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_align import add_alignment_args, train  # noqa: E402  (the loop shared by both stages)

from diffusers_selftrans import training as T  # noqa: E402
from diffusers_selftrans.alignment import build_alignment  # noqa: E402
from diffusers_selftrans.data import add_data_args  # noqa: E402

logger = logging.getLogger(__name__)

# Paper Table 1 runs 80 epochs (400K iterations at batch 256); the guide stops after 20 epochs for SiT-B
# (released code: 100K iterations), 10 epochs for L/XL (method-notes §3.2).
STAGE2_EPOCHS = 80
GUIDE_STOP_EPOCHS_BY_DEPTH = {12: 20, 24: 10, 28: 10}
DEFAULT_GUIDE_STOP_EPOCHS = 20  # other depths: SiT-B's setting


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__.split("\n")[0])
    T.add_model_args(parser)
    add_data_args(parser)
    T.add_training_args(parser)
    add_alignment_args(parser)  # t_range options are shared; --alignment is fixed to self_transcendence here
    g = parser.add_argument_group("self-transcendence")
    g.add_argument("--guiding_model_name_or_path", type=str, required=False, default=None,
                   help="The stage-1 output folder, its transformer/ subfolder, or a Hub id.")
    g.add_argument("--guiding_model_subfolder", type=str, default=None,
                   help="Subfolder of the guiding model (default: transformer/ when the path is a pipeline).")
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
    g.add_argument("--guiding_classes_correspond", action="store_true",
                   help="Accept a guiding model whose id2label names other classes (same count): its class k is "
                        "taken to be the data's class k.")
    g.add_argument("--guiding_autocast", type=str, default="no", choices=["no", "bf16", "fp16"],
                   help="Run the fp32 teacher under autocast (GPU: bf16 is ~4x faster). Keep its weights fp32: "
                        "with bf16 weights, w=30 amplifies the rounding of f_c - f_u (benchmarks/gpu_check.py "
                        "measures both against fp32).")
    args = T.parse_args_with_config(parser, input_args)
    if args.guiding_model_name_or_path is None:
        parser.error("--guiding_model_name_or_path is required (the stage-1 output of train_align.py).")
    if args.alignment != "vae_align":
        parser.error("--alignment is not used by stage 2 (the method is self_transcendence).")
    if args.num_train_epochs is None and args.max_train_steps is None:
        args.num_train_epochs = STAGE2_EPOCHS
    return args


def build_stage2_method(args, model, accelerator):
    import torch

    teacher = T.load_transformer(args.guiding_model_name_or_path, subfolder=args.guiding_model_subfolder)
    teacher = teacher.to(accelerator.device)
    stop = args.guide_stop_step
    if stop is None:
        epochs = args.guide_stop_epochs
        if epochs is None:
            epochs = GUIDE_STOP_EPOCHS_BY_DEPTH.get(model.config.num_layers, DEFAULT_GUIDE_STOP_EPOCHS)
        if args.steps_per_epoch:  # epochs of this dataset, whatever --max_train_steps says
            stop = max(1, round(epochs * args.steps_per_epoch))
            how = f"{epochs:g} epochs x {args.steps_per_epoch} steps per epoch"
        else:  # dataset size unknown: the paper's fraction of the run (20 of 80 epochs for SiT-B)
            stop = max(1, round(args.max_train_steps * epochs / (args.num_train_epochs or STAGE2_EPOCHS)))
            how = (f"the dataset size is unknown, so {epochs:g} of {args.num_train_epochs or STAGE2_EPOCHS:g} "
                   f"epochs of the {args.max_train_steps}-step run; pass --guide_stop_step to choose")
            logger.warning("Guide stop: %s.", how)
        args.guide_stop_step = stop
        logger.info("The guide loss stops after step %d (%s).", stop, how)
    options = {
        "teacher": teacher,
        "guided_layer": args.guided_layer,
        "guiding_layer": args.guiding_layer,
        "guidance_scale": args.guide_cfg_scale,
        "weight": args.guide_loss_weight,
        "guide_stop_step": stop,
        "t_range_mode": args.t_range_mode,
        "projector_dim": args.projector_dim,
        "teacher_autocast": {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.guiding_autocast],
        "classes_correspond": args.guiding_classes_correspond,
    }
    options = {k: v for k, v in options.items() if v is not None}
    options["t_range"] = None if args.no_t_range else tuple(args.t_range)  # None: the guide applies at every t
    return build_alignment("self_transcendence", model.config, **options)


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    return train(args, build_stage2_method, card_template="stage2.md", base_model=args.guiding_model_name_or_path)


if __name__ == "__main__":
    main()

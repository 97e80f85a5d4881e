#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Stage 1 of Self-Transcendence, and every single-model baseline, on `accelerate`.

Trains a class-conditional SiT with the flow-matching loss plus one alignment loss:
- `--alignment vae_align` (default): the guiding model of Self-Transcendence. Block k (2 of 12, scaled by depth)
  goes through an MLP + unconditioned head to the latent grid and regresses the velocity (released code) or x0
  (paper Eq. 1), weight 0.5, for t in [0.4, 0.7]. Its EMA output is what `train_self_transcendence.py` loads.
- `--alignment none`: vanilla SiT. `repa`, `sra`, `layersync`, `dispersive`: the baselines of the paper's tables.

    accelerate launch examples/train_align.py --model SiT-B/2 --output_dir sit-b2-guiding          # ImageNet, streamed
    accelerate launch examples/train_align.py --train_data_dir ./my_images --resolution 256 ...     # your own folders

The training loop in `train()` is shared with stage 2 (`train_self_transcendence.py` imports it), so both stages
draw noise, time, labels and checkpoints the same way.
"""

import argparse
import json
import logging
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from diffusers_selftrans import SiTTransformer2DModel, hub
from diffusers_selftrans import training as T
from diffusers_selftrans.alignment import ALIGNMENT_METHODS, accepted_options, build_alignment
from diffusers_selftrans.data import DataConfig, TrainDataStream, add_data_args
from diffusers_selftrans.transport import Transport

logger = get_logger(__name__)

# Stage 1 of the release trains 200K iterations = 40 epochs of ImageNet at batch 256 (method-notes §3.1).
STAGE1_EPOCHS = 40
STAGE1_ALIGNMENTS = tuple(m for m in ALIGNMENT_METHODS if m != "self_transcendence")


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
    g.add_argument("--t_range", type=float, nargs=2, default=[0.4, 0.7],
                   help="vae_align / guide loss only for t in this range (released scripts: 0.4 0.7).")
    g.add_argument("--no_t_range", action="store_true", help="Apply the alignment loss at every t.")
    g.add_argument("--t_range_mode", type=str, default="code_compat", choices=["code_compat", "per_sample"],
                   help="code_compat: the released code's batch-mean mask (paper numbers); per_sample: the intent.")
    g.add_argument("--projector_dim", type=int, default=None,
                   help="Hidden width of the alignment MLPs (REPA/ST: 2048). Tiny models may want less.")
    g.add_argument("--repa_encoder", type=str, default="facebook/dinov2-base",
                   help="transformers.AutoModel id or folder of the REPA encoder.")
    g.add_argument("--sra_t_max", type=float, default=0.2, help="SRA teacher time offset (SRA default 0.2).")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__.split("\n")[0])
    T.add_model_args(parser)
    add_data_args(parser)
    T.add_training_args(parser)
    add_alignment_args(parser)
    args = T.parse_args_with_config(parser, input_args)
    if args.num_train_epochs is None and args.max_train_steps is None:
        args.num_train_epochs = STAGE1_EPOCHS
    return args


def alignment_options(args, method: str) -> dict:
    """Generic CLI flags -> the option names `method` accepts (None keeps the method's default)."""
    options = {
        "layer": args.align_layer, "student_layer": args.align_layer, "weak_layer": args.align_layer,
        "teacher_layer": args.align_target_layer, "target_layer": args.align_target_layer,
        "weight": args.align_loss_weight,
        "align_target": args.align_target,
        "t_range_mode": args.t_range_mode,
        "encoder": args.repa_encoder,
        "t_max": args.sra_t_max,
        "projector_dim": args.projector_dim,
    }
    accepted = accepted_options(method)
    options = {k: v for k, v in options.items() if v is not None and k in accepted}
    if "t_range" in accepted:  # None is meaningful here: no range, the loss applies at every t
        options["t_range"] = None if args.no_t_range else tuple(args.t_range)
    return options


def build_stage1_method(args, model, accelerator):
    return build_alignment(args.alignment, model.config, **alignment_options(args, args.alignment))


def train(args, build_method, *, card_template: str, base_model=None):
    """The training loop of both stages. `build_method(args, model, accelerator)` returns the alignment module."""
    output_dir = Path(args.output_dir)
    # 1. Accelerator, logging, seeds
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=7200))],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        T.save_args(args, output_dir / "args.json")
    per_device = args.train_batch_size
    if per_device is None:
        denom = accelerator.num_processes * args.gradient_accumulation_steps
        if args.global_batch_size % denom:
            raise ValueError(f"--global_batch_size {args.global_batch_size} is not divisible by processes x accumulation ({denom}).")
        per_device = args.global_batch_size // denom
    global_batch = per_device * accelerator.num_processes * args.gradient_accumulation_steps

    # 2. VAE and data (exactly one sharding layer: the stream shards by process itself; it is not passed to `prepare`)
    set_seed(args.seed)
    vae = T.load_vae(args.vae_name_or_path, args.vae_subfolder).to(accelerator.device)
    stream = TrainDataStream(DataConfig.from_namespace(args), per_device, process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes, seed=args.seed, vae_config=vae)
    dataset_size = stream.num_examples  # from the dataset's own metadata (split info or parquet footers)
    if args.max_train_steps is None:
        args.max_train_steps = T.steps_from_epochs(args.num_train_epochs, dataset_size, global_batch, "--max_train_steps")
    # recorded in args.json; stage 2 turns its guide-stop epochs into steps with it (None: dataset size unknown)
    args.steps_per_epoch = None if dataset_size is None else dataset_size // global_batch

    # 3. Models: the same initial weights on every process, then per-process noise
    encoder = T.LatentEncoder(vae)
    config = T.model_config_from_args(args, sample_size=T.vae_latent_size(vae, args.resolution),
                                      in_channels=vae.config.latent_channels, num_classes=stream.num_classes)
    if stream.id2label:
        config["id2label"] = {int(k): v for k, v in stream.id2label.items()}
    model = SiTTransformer2DModel(**config)
    model.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    method = build_method(args, model, accelerator)
    if accelerator.is_main_process:  # again, with what the data and the method resolved (steps, guide stop)
        T.save_args(args, output_dir / "args.json")
    heads = method.trainable_modules()  # projectors / heads: prepared (DDP) on their own, never the method object
    ema = EMAModel(model.parameters(), decay=args.ema_decay, min_decay=args.ema_decay, foreach=True,
                   model_cls=SiTTransformer2DModel, model_config=model.config)
    params = list(model.parameters()) + [p for h in heads for p in h.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.torch_compile:
        model = torch.compile(model)
    model, optimizer, *heads = accelerator.prepare(model, optimizer, *heads)
    method.set_trainable_modules(heads)  # the prepared (DDP-wrapped) heads are what the loss must call
    method.to(accelerator.device)
    ema.to(accelerator.device)
    ema_teacher = None
    if getattr(method, "requires_teacher", False):  # SRA: the EMA network is the teacher
        ema_teacher = SiTTransformer2DModel.from_config(T.unwrap(accelerator, model).config).to(accelerator.device)
        ema_teacher.eval().requires_grad_(False)
        ema.copy_to(ema_teacher.parameters())  # the teacher is the EMA from the first step on, not a random network
    T.register_checkpoint_hooks(accelerator, ema)
    transport = Transport(time_sampling=args.time_sampling)

    # 4. Resume
    global_step, train_seconds = 0, 0.0  # train_seconds: time in training steps only (no checkpoints, no grids)
    guard = T.NonFiniteGuard(accelerator, args.max_nonfinite_steps, explosion_factor=args.loss_explosion_factor)
    # a complete checkpoint (manifest), or an error / `--allow_inexact_resume`'s loud warning
    resume = T.resolve_resume_checkpoint(args, num_processes=accelerator.num_processes)
    args.resume_history = []
    if resume is not None:
        accelerator.print(f"Resuming from {resume}")
        global_step = T.checkpoint_step(resume)
        # flags that cannot take effect on a resumed run are refused before anything loads; the others apply below
        changed = T.compare_resume_args(args, resume)
        accelerator.load_state(str(resume))
        stream.load_state(str(resume))  # every process its own data position
        T.apply_resume_changes(args, optimizer, ema)  # the current flags win over the saved hyperparameters
        if ema_teacher is not None:
            ema.copy_to(ema_teacher.parameters())  # SRA's teacher is the loaded EMA, as in an uninterrupted run
        if (resume / T.GUARD_STATE_NAME).is_file():
            guard.load_state_dict(json.loads((resume / T.GUARD_STATE_NAME).read_text()))
            last = guard.last_good_checkpoint  # by name: the run's folder may have moved
            guard.last_good_checkpoint = None if last is None else resume.parent / last.name
        else:
            guard.last_good_checkpoint = resume
        T.record_resume(args, resume, global_step, changed)
        if accelerator.is_main_process:
            T.save_args(args, output_dir / "args.json")  # args.json records the values in effect and the history
    else:
        set_seed(args.seed, device_specific=True)  # on resume, load_state restored every process's RNG instead
    if accelerator.is_main_process and accelerator.trackers == [] and args.report_to != "none":
        config_for_tracker = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name or output_dir.name, config=config_for_tracker)

    num_classes = stream.num_classes
    id2label = stream.id2label
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="train",
                    disable=not (args.progress and accelerator.is_local_main_process))
    logged = {}
    images_seen, tick = 0, time.perf_counter()
    loss_log = None
    if accelerator.is_main_process:  # a fresh run starts an empty log; a resumed one continues at its checkpoint
        train_seconds = T.rewind_loss_log(output_dir / "loss_log.jsonl", global_step)
        loss_log = open(output_dir / "loss_log.jsonl", "a")
    batches = iter(stream)

    # 5. Loop
    while global_step < args.max_train_steps:
        step_start = time.perf_counter()
        with accelerator.accumulate(model, *heads):
            batch = next(batches)
            x0 = encoder(batch, accelerator.device)
            labels = batch["class_labels"].to(accelerator.device)
            t, noise, x_t, target = transport.sample(x0)
            # One label-dropout draw, shared by every model that needs the student's labels (SRA); none at all when
            # --class_dropout_prob is 0 (the model then has no null class to drop to).
            drop = None
            if args.class_dropout_prob > 0:
                drop = torch.rand(labels.shape[0], device=labels.device) < args.class_dropout_prob
            active = method.is_active(global_step)  # False for good after ST's guide stop: no teacher, no head
            layers = method.student_layers if active else ()
            out = model(x_t, t, labels, output_hidden_states=list(layers) or None, force_drop_ids=drop)
            loss_diff = ((out.sample.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).mean()
            terms = method(out.hidden_states, x0=x0, noise=noise, x_t=x_t, t=t, target=target,
                           class_labels=labels, force_drop_ids=drop, step=global_step,
                           pixel_values=batch.get("pixel_values"), teacher=ema_teacher) if active else {}
            loss = loss_diff + sum(method.weights[name] * value for name, value in terms.items())
            stepped = guard.check(loss)  # collective: every process skips a step that is non-finite anywhere
            if stepped:
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if not accelerator.sync_gradients or not stepped:
            train_seconds += time.perf_counter() - step_start
            continue
        ema.step(T.unwrap(accelerator, model).parameters())
        if ema_teacher is not None:
            ema.copy_to(ema_teacher.parameters())
        train_seconds += time.perf_counter() - step_start  # every micro-step counts, EMA included
        global_step += 1
        images_seen += global_batch
        logged = {"train_seconds": round(train_seconds, 4)}
        for name, value in [("loss", loss), ("loss_diff", loss_diff)] + [(f"loss_{k}", v) for k, v in terms.items()]:
            logged[name] = accelerator.reduce(value.detach().float(), "mean").item()
        # undecodable images skipped so far, all processes together (cumulative; restored on resume)
        logged["data_skipped"] = int(accelerator.reduce(torch.tensor(stream.skips.num_skipped,
                                                                     device=accelerator.device), "sum").item())
        progress.update(1)
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            elapsed = time.perf_counter() - tick
            logged["images_per_sec"] = images_seen / max(elapsed, 1e-9)
            logged["nonfinite_skipped"] = guard.skipped
            images_seen, tick = 0, time.perf_counter()
            accelerator.log(logged, step=global_step)
            progress.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{logged['images_per_sec']:.1f}")
        if loss_log is not None:
            loss_log.write(json.dumps({"step": global_step, **logged}) + "\n")
            loss_log.flush()
        if global_step % args.checkpointing_steps == 0:
            T.save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, stream=stream,
                              args=args, guard=guard)  # the guard notes whether this checkpoint is healthy
        if global_step % args.validation_steps == 0:
            T.save_ema_samples(args, accelerator, model, ema, vae, global_step, num_classes, id2label)
    progress.close()

    # 6. Final EMA pipeline, samples, card, Hub
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        loss_log.close()
        T.export_pipeline(output_dir, T.unwrap(accelerator, model), ema, vae, id2label,
                          save_remote_code=args.save_remote_code)
        grid_path = T.save_ema_samples(args, accelerator, model, ema, vae, global_step, num_classes, id2label)
        final_grid = output_dir / "samples.png"
        if grid_path is not None:
            os.replace(grid_path, final_grid)
        hparams = {k: v for k, v in vars(args).items() if "--" + k not in T.SECRET_FLAGS and k != "launch_command"}
        hub.render_model_card(output_dir, template=card_template, hyperparameters=hparams,
                              command=args.launch_command, repo_id=args.hub_model_id or output_dir.name,
                              dataset=args.dataset_name,
                              data_description="local image folder" if args.train_data_dir else None,
                              sample_image=final_grid.name, base_model=base_model,
                              metrics={"final_loss": logged.get("loss"), "steps": global_step,
                                       "nonfinite_skipped": guard.skipped,
                                       "data_skipped": logged.get("data_skipped"),
                                       # flags changed on resume: [{step, changed: {flag: [old, new]}}]
                                       **({"resume_history": json.dumps(args.resume_history)}
                                          if args.resume_history else {})})
        if args.push_to_hub:
            repo_id = hub.push_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token,
                                      private=args.hub_private)
            logger.info(f"Pushed to https://huggingface.co/{repo_id}", main_process_only=True)
    accelerator.end_training()
    return output_dir


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    return train(args, build_stage1_method, card_template="stage1.md")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Stage 2 of Self-Transcendence: a fresh SiT guided by the frozen stage-1 model's classifier-free-guided features.

The student's block n/2 goes through an MLP and regresses f_g = f_u + w (f_c - f_u), the guiding model's block 2n/3
on the same x_t and t with the true label (f_c) and the null class (f_u), in one batched pass that stops at that
block. Weight 0.5, w 30; the guide loss (and every teacher forward) stops after `--guide_stop_step`
(paper: 20 epochs for B, 10 for L/XL), after which the step costs what a vanilla SiT step costs.

    accelerate launch examples/train_self_transcendence.py --model SiT-B/2 \
        --guiding_model_name_or_path sit-b2-guiding --output_dir sit-b2-selftrans

The script reads top to bottom: `guide_stop_step` turns the paper's epochs into a step, `compute_loss` is one
training step's loss, `main` the run around it. It writes out its own loop (as `train_align.py` does for stage 1),
so that it can be forked on its own; what both need around the loop is in the library. Every flag is in
`diffusers_selftrans/cli.py` (model, data, training, and the guide group).
"""

import argparse
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel

from diffusers_selftrans import SiTTransformer2DModel, cli, hub
from diffusers_selftrans import checkpointing as C
from diffusers_selftrans import runs as R
from diffusers_selftrans import training as T
from diffusers_selftrans.alignment import build_alignment
from diffusers_selftrans.data import DataConfig, TrainDataStream
from diffusers_selftrans.provenance import vae_encoder_identity
from diffusers_selftrans.transport import Transport

logger = get_logger(__name__)

# Paper Table 1 runs 80 epochs (400K iterations at batch 256); the guide stops after 20 epochs for SiT-B
# (released code: 100K iterations), 10 epochs for L/XL (method-notes §3.2).
STAGE2_EPOCHS = 80
GUIDE_STOP_EPOCHS_BY_DEPTH = {12: 20, 24: 10, 28: 10}
DEFAULT_GUIDE_STOP_EPOCHS = 20  # other depths: SiT-B's setting


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__.split("\n")[0])
    cli.add_model_args(parser)
    cli.add_data_args(parser)
    cli.add_training_args(parser)
    cli.add_guide_args(parser)
    args = cli.parse_args_with_config(parser, input_args)
    if args.guiding_model_name_or_path is None:
        parser.error("--guiding_model_name_or_path is required (the stage-1 output of train_align.py).")
    if args.num_train_epochs is None and args.max_train_steps is None:
        args.num_train_epochs = STAGE2_EPOCHS
    return args


def guide_stop_step(args, num_layers: int) -> int:
    """--guide_stop_step, or --guide_stop_epochs (default by depth, paper §4) of this dataset in steps."""
    if args.guide_stop_step is not None:
        return args.guide_stop_step
    epochs = args.guide_stop_epochs
    if epochs is None:
        epochs = GUIDE_STOP_EPOCHS_BY_DEPTH.get(num_layers, DEFAULT_GUIDE_STOP_EPOCHS)
    if args.steps_per_epoch:  # epochs of this dataset, whatever --max_train_steps says
        stop = max(1, round(epochs * args.steps_per_epoch))
        logger.info(f"The guide loss stops after step {stop} ({epochs:g} epochs x {args.steps_per_epoch} steps).")
        return stop
    run_epochs = args.num_train_epochs or STAGE2_EPOCHS  # dataset size unknown: the paper's fraction of the run
    stop = max(1, round(args.max_train_steps * epochs / run_epochs))
    logger.warning(f"Guide stop: the dataset size is unknown, so {epochs:g} of {run_epochs:g} epochs of the "
                   f"{args.max_train_steps}-step run = step {stop}; pass --guide_stop_step to choose.")
    return stop


def compute_loss(model, guide, x0, labels, transport, *, class_dropout_prob, step=None):
    """One batch's loss: flow matching on x_t = (1 - t) x0 + t eps plus lambda x the guide term while it is active.

    The guiding model sees the same x_t and t with the TRUE labels (its f_c) and the null class (f_u); the student
    sees its own label-dropped labels. `step` is for the guide stop (`guide.is_active(step)`); the training loop
    passes None, having made that call itself (it frees the teacher) before this function, which `--torch_compile`
    compiles as one graph, the teacher's early-exit pass included. Returns `(loss, loss_diff, terms)`.
    """
    t, noise, x_t, target = transport.sample(x0)
    drop = None  # no null class to drop to when class_dropout_prob is 0
    if class_dropout_prob > 0:
        drop = torch.rand(labels.shape[0], device=labels.device) < class_dropout_prob
    active = guide.is_active(step)  # False for good after the guide stop: no teacher, no head
    layers = guide.student_layers if active else ()
    out = model(x_t, t, labels, output_hidden_states=list(layers) or None, force_drop_ids=drop)
    loss_diff = ((out.sample.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).mean()
    terms = guide(out.hidden_states, x_t=x_t, t=t, class_labels=labels, step=step) if active else {}
    loss = loss_diff + sum(guide.weights[name] * value for name, value in terms.items())
    return loss, loss_diff, terms


def main(args=None):
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    output_dir = Path(args.output_dir)

    # 1. Accelerator, the output folder (locked for this run; a fresh run needs it empty), batch sizes
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=7200))],
    )
    T.configure_logging()
    T.set_tf32(args.allow_tf32)
    args.run_id, lock, resume = R.claim_output_dir(
        accelerator, output_dir, resume_from_checkpoint=args.resume_from_checkpoint,
        allow_inexact=args.allow_inexact_resume, overwrite=args.overwrite_output_dir, break_lock=args.break_run_lock)
    if accelerator.is_main_process:  # args.json once the set-up passed its checks (a failed start leaves nothing)
        output_dir.mkdir(parents=True, exist_ok=True)
    per_device, global_batch = T.batch_sizes(args.global_batch_size, args.train_batch_size,
                                             accelerator.num_processes, args.gradient_accumulation_steps)

    # 2. VAE and data (exactly one sharding layer: the stream shards by process itself; it is not passed to `prepare`)
    set_seed(args.seed)
    vae = T.load_vae(args.vae_name_or_path, args.vae_subfolder).to(accelerator.device)
    stream = TrainDataStream(DataConfig.from_namespace(args), per_device, process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes, seed=args.seed, vae_config=vae)
    dataset_size = stream.num_examples  # from the dataset's own metadata (split info or parquet footers)
    if args.max_train_steps is None:
        args.max_train_steps = T.steps_from_epochs(args.num_train_epochs, dataset_size, global_batch, "--max_train_steps")
    args.steps_per_epoch = None if dataset_size is None else dataset_size // global_batch  # recorded in args.json

    # 3. Student, frozen guiding model and guide, EMA, optimizer: the same initial weights on every process
    encoder = T.LatentEncoder(vae)
    model = SiTTransformer2DModel(**T.model_config(
        args.model, sample_size=T.vae_latent_size(vae, args.resolution), in_channels=vae.config.latent_channels,
        num_classes=stream.num_classes, qk_norm=args.qk_norm, class_dropout_prob=args.class_dropout_prob,
        id2label=stream.id2label))
    model.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    teacher = T.load_guiding_model(args.guiding_model_name_or_path, args.guiding_weights, args.guiding_model_subfolder)
    T.check_guiding_vae(args.guiding_model_name_or_path, vae, allowed=args.allow_guiding_vae_mismatch)
    args.guide_stop_step = guide_stop_step(args, model.config.num_layers)  # recorded in args.json and the card
    options = dict(guided_layer=args.guided_layer, guiding_layer=args.guiding_layer,
                   guidance_scale=args.guide_cfg_scale, weight=args.guide_loss_weight,
                   t_range_mode=args.t_range_mode, projector_dim=args.projector_dim,
                   teacher_autocast=T.teacher_autocast_dtype(args.guiding_autocast, accelerator.mixed_precision))
    guide = build_alignment("self_transcendence", model.config, teacher=teacher.to(accelerator.device),
                            guide_stop_step=args.guide_stop_step, classes_correspond=args.guiding_classes_correspond,
                            t_range=None if args.no_t_range else tuple(args.t_range),  # None: the guide at every t
                            **{k: v for k, v in options.items() if v is not None})
    del teacher  # the guide holds it, and releases it at the guide stop: no other reference may keep it alive
    if accelerator.is_main_process:  # with what the data and the guide resolved (steps, guide stop)
        C.save_args(args, output_dir / "args.json")
    heads = guide.trainable_modules()  # the projector: prepared (DDP) on its own, never the guide object
    ema = EMAModel(model.parameters(), decay=args.ema_decay, min_decay=args.ema_decay, foreach=True,
                   model_cls=SiTTransformer2DModel, model_config=model.config)
    params = list(model.parameters()) + [p for h in heads for p in h.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                  fused=args.fused_adamw and accelerator.device.type == "cuda")
    model, optimizer, *heads = accelerator.prepare(model, optimizer, *heads)
    loss_fn = compute_loss
    if args.torch_compile:  # forward, teacher pass and loss as one graph; recompiled once, at the guide stop
        loss_fn = torch.compile(compute_loss, fullgraph=True, backend=args.torch_compile_backend)
    guide.set_trainable_modules(heads)  # the prepared (DDP-wrapped) projector is what the loss must call
    guide.to(accelerator.device)
    ema.to(accelerator.device)
    C.register_checkpoint_hooks(accelerator, ema)
    transport = Transport(time_sampling=args.time_sampling)
    guard = T.NonFiniteGuard(accelerator, args.max_nonfinite_steps, explosion_factor=args.loss_explosion_factor)

    # 4. Resume: a complete checkpoint (manifest) of the same data, processes and VAE (provenance), with the flags
    #    that may change applied and the others refused
    provenance = C.checkpoint_provenance(num_classes=stream.num_classes, id2label=stream.id2label,
                                         dataset_size=dataset_size, num_processes=accelerator.num_processes,
                                         global_batch_size=global_batch, vae_encoder=vae_encoder_identity(vae))
    global_step, args.resume_history = 0, []
    if resume is not None:
        accelerator.print(f"Resuming from {resume}")
        global_step, args.resume_history = C.resume_training(accelerator, resume, run_args=vars(args),
                                                             optimizer=optimizer, ema=ema, stream=stream, guard=guard,
                                                             provenance=provenance,
                                                             allow_inexact=args.allow_inexact_resume)
        if accelerator.is_main_process:
            C.save_args(args, output_dir / "args.json")  # the values in effect and the resume history
    else:
        set_seed(args.seed, device_specific=True)  # on resume, load_state restored every process's RNG instead
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_project_name or output_dir.name, config=T.tracker_config(vars(args)))
    log = T.StepLog(accelerator, output_dir / "loss_log.jsonl", initial_step=global_step,
                    total_steps=args.max_train_steps, logging_steps=args.logging_steps, images_per_step=global_batch,
                    progress=args.progress)
    grid_options = dict(class_labels=args.validation_class_labels or T.default_validation_labels(stream.num_classes),
                        num_inference_steps=args.validation_num_inference_steps,
                        guidance_scale=args.validation_guidance_scale, seed=args.seed, id2label=stream.id2label)
    batches = iter(stream)
    preemption = R.Preemption()  # SIGTERM / SIGUSR1 / SIGINT: finish the step, checkpoint, exit (runs.py)

    # 5. Loop
    while global_step < args.max_train_steps:
        step_start = time.perf_counter()
        with accelerator.accumulate(model, *heads):
            batch = next(batches)
            x0 = encoder(batch, accelerator.device)
            labels = batch["class_labels"].to(accelerator.device)
            guide.is_active(global_step)  # the guide stop (the teacher is freed) happens here, outside the loss
            loss, loss_diff, terms = loss_fn(model, guide, x0, labels, transport,
                                             class_dropout_prob=args.class_dropout_prob)
            accelerator.backward(loss)
            guard.observe(loss)
            # The step's one host read, once its backward is queued (a collective): every process skips a step that
            # is bad anywhere, learns of a preemption signal, and gets the logged values.
            stepped = accelerator.sync_gradients and guard.check(
                stop_requested=preemption.requested, counts={"data_skipped": stream.skips.num_skipped},
                logged={"loss": loss, "loss_diff": loss_diff, **{f"loss_{k}": v for k, v in terms.items()}})
            if stepped:
                if args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients go too
        if stepped:
            ema.step(T.unwrap(accelerator, model).parameters())
        log.train_seconds += time.perf_counter() - step_start  # every micro-step counts, EMA included
        if not stepped:
            continue
        global_step += 1
        log.step(global_step, guard.values, nonfinite_skipped=guard.skipped)
        if global_step % args.checkpointing_steps == 0 or guard.stop_requested:
            checkpoint = C.save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit,
                                           stream=stream, run_args=vars(args), guard=guard, provenance=provenance)
        if guard.stop_requested:  # preempted: every process stops after this same step, its checkpoint written
            log.close()
            R.exit_preempted(preemption, global_step, checkpoint, lock)
        if global_step % args.validation_steps == 0:
            T.save_ema_samples(accelerator, model, ema, vae, output_dir / "samples" / f"step-{global_step:07d}.png",
                               step=global_step, **grid_options)
    log.close()
    preemption.restore()

    # 6. The EMA pipeline folder, its sample grid and model card, the Hub
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        T.export_pipeline(output_dir, T.unwrap(accelerator, model), ema, vae, stream.id2label,
                          save_remote_code=args.save_remote_code)
        T.save_ema_samples(accelerator, model, ema, vae, output_dir / "samples.png", step=global_step, **grid_options)
        hub.write_run_card(output_dir, run_args=vars(args), template="stage2.md", sample_image="samples.png",
                           base_model=args.guiding_model_name_or_path,
                           metrics={"final_loss": log.last.get("loss"), "steps": global_step,
                                    "nonfinite_skipped": guard.skipped, "data_skipped": log.last.get("data_skipped")})
        if args.push_to_hub:
            repo_id = hub.push_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token,
                                      private=args.hub_private)
            logger.info(f"Pushed to https://huggingface.co/{repo_id}", main_process_only=True)
    R.finish_run(accelerator, lock)
    return output_dir


if __name__ == "__main__":
    main()

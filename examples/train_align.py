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

The script reads top to bottom: `compute_loss` is one training step's loss, `main` the run around it. Stage 2
(`train_self_transcendence.py`) writes out its own loop rather than sharing this one, so that each script can be
forked on its own (the diffusers convention); what both need around the loop (checkpoints and resume, the loss
guard, the per-step log, sample grids, the exported pipeline, cards) is in the library. Every flag is in
`diffusers_selftrans/cli.py`.
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
from diffusers_selftrans.cli import alignment_options  # noqa: F401  (flags -> method options; tests use it here)
from diffusers_selftrans.data import DataConfig, TrainDataStream
from diffusers_selftrans.provenance import vae_encoder_identity
from diffusers_selftrans.transport import Transport

logger = get_logger(__name__)

# Stage 1 of the release trains 200K iterations = 40 epochs of ImageNet at batch 256 (method-notes §3.1).
STAGE1_EPOCHS = 40
# Methods whose step compiles as one graph (tests/test_gpu_path.py); the others run a model `torch.compile` cannot
# trace whole (REPA's `transformers` encoder, SRA's EMA teacher call) and compile with graph breaks.
FULLGRAPH_ALIGNMENTS = ("none", "vae_align", "dispersive", "layersync")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__.split("\n")[0])
    cli.add_model_args(parser)
    cli.add_data_args(parser)
    cli.add_training_args(parser)
    cli.add_alignment_args(parser)
    args = cli.parse_args_with_config(parser, input_args)
    if args.num_train_epochs is None and args.max_train_steps is None:
        args.num_train_epochs = STAGE1_EPOCHS
    return args


def compute_loss(model, method, x0, labels, transport, *, class_dropout_prob, step=None, pixel_values=None,
                 teacher=None):
    """One batch's loss: flow matching on x_t = (1 - t) x0 + t eps plus the method's weighted terms.

    `step` is for a method that stops (`method.is_active(step)`); the training loop passes None, having made that
    call itself before this function, which `--torch_compile` compiles as one graph. Returns `(loss, loss_diff,
    terms)` (`terms`: the method's unweighted terms, empty once it is inactive).
    """
    t, noise, x_t, target = transport.sample(x0)
    # One label-dropout draw, shared by every model that needs the student's labels (SRA); none at all when
    # class_dropout_prob is 0 (the model then has no null class to drop to).
    drop = None
    if class_dropout_prob > 0:
        drop = torch.rand(labels.shape[0], device=labels.device) < class_dropout_prob
    active = method.is_active(step)  # a method may stop for good (then no head, no teacher)
    layers = method.student_layers if active else ()
    out = model(x_t, t, labels, output_hidden_states=list(layers) or None, force_drop_ids=drop)
    loss_diff = ((out.sample.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).mean()
    terms = method(out.hidden_states, x0=x0, noise=noise, x_t=x_t, t=t, target=target, class_labels=labels,
                   force_drop_ids=drop, step=step, pixel_values=pixel_values, teacher=teacher) if active else {}
    loss = loss_diff + sum(method.weights[name] * value for name, value in terms.items())
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

    # 3. Model, alignment method, EMA, optimizer: the same initial weights on every process
    encoder = T.LatentEncoder(vae)
    model = SiTTransformer2DModel(**T.model_config(
        args.model, sample_size=T.vae_latent_size(vae, args.resolution), in_channels=vae.config.latent_channels,
        num_classes=stream.num_classes, qk_norm=args.qk_norm, class_dropout_prob=args.class_dropout_prob,
        id2label=stream.id2label))
    model.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    method = build_alignment(args.alignment, model.config, **cli.alignment_options(args, args.alignment))
    if accelerator.is_main_process:  # with what the data resolved (steps per epoch, max steps)
        C.save_args(args, output_dir / "args.json")
    heads = method.trainable_modules()  # projectors / heads: prepared (DDP) on their own, never the method object
    ema = EMAModel(model.parameters(), decay=args.ema_decay, min_decay=args.ema_decay, foreach=True,
                   model_cls=SiTTransformer2DModel, model_config=model.config)
    params = list(model.parameters()) + [p for h in heads for p in h.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                  fused=args.fused_adamw and accelerator.device.type == "cuda")
    model, optimizer, *heads = accelerator.prepare(model, optimizer, *heads)
    loss_fn = compute_loss
    if args.torch_compile:  # forward and loss as one graph: the training loop keeps every host read outside it
        loss_fn = torch.compile(compute_loss, fullgraph=args.alignment in FULLGRAPH_ALIGNMENTS,
                                backend=args.torch_compile_backend)
    method.set_trainable_modules(heads)  # the prepared (DDP-wrapped) heads are what the loss must call
    method.to(accelerator.device)
    ema.to(accelerator.device)
    ema_teacher = None
    if getattr(method, "requires_teacher", False):  # SRA: the EMA network is the teacher
        ema_teacher = SiTTransformer2DModel.from_config(T.unwrap(accelerator, model).config).to(accelerator.device)
        ema_teacher.eval().requires_grad_(False)
        ema.copy_to(ema_teacher.parameters())  # the teacher is the EMA from the first step on, not a random network
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
        if ema_teacher is not None:
            ema.copy_to(ema_teacher.parameters())  # SRA's teacher is the loaded EMA, as in an uninterrupted run
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
            method.is_active(global_step)  # a method's stop happens here, outside the (compiled) loss
            loss, loss_diff, terms = loss_fn(model, method, x0, labels, transport,
                                             class_dropout_prob=args.class_dropout_prob,
                                             pixel_values=batch.get("pixel_values"), teacher=ema_teacher)
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
            if ema_teacher is not None:
                ema.copy_to(ema_teacher.parameters())
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
        # the raw weights too: the released stage 2 guides with them (stage 2's --guiding_weights raw, the default)
        T.unwrap(accelerator, model).save_pretrained(output_dir / T.GUIDING_WEIGHTS_SUBFOLDERS["raw"])
        T.save_ema_samples(accelerator, model, ema, vae, output_dir / "samples.png", step=global_step, **grid_options)
        hub.write_run_card(output_dir, run_args=vars(args), template="stage1.md", sample_image="samples.png",
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

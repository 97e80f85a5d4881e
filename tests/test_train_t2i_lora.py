"""`examples/train_self_transcendence_t2i.py --lora_rank` (issue 28, items 1-3) end to end on the tiny offline SD3
pipeline of `tests/test_train_t2i.py`: stage 1 trains an adapter and its head only and exports the EMA adapter in
diffusers' LoRA format (`load_lora_weights` on the base pipeline); stage 2 guides with the stage-1 adapter, or the
base, on the student's own module (one base in memory); exact resume from adapter checkpoints; refusals."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence_t2i  # noqa: E402  (the tiny pipeline builder)
import diffusers  # noqa: E402
import train_self_transcendence_t2i as t2i  # noqa: E402
from test_train_t2i import RESOLUTION, flags, launch_ddp, read_losses  # noqa: E402

from diffusers_selftrans import lora as L  # noqa: E402
from diffusers_selftrans.provenance import ProvenanceError  # noqa: E402

RANK = 4
# decay 0.5: the EMA moves visibly in 4 steps (with the default it would stay at the adapter's identity start)
LORA = dict(lora_rank=RANK, ema_decay=0.5)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_lora_assets")
    convergence_t2i.write_tiny_t2i_pipeline(root / "pipe_sd3", "sd3")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": convergence_t2i.caption_for(i % 3, i)}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def run(assets, output_dir, **extra):
    """`t2i.main` on the tiny SD3 pipeline; returns the transformer module the run trained (base and adapters)."""
    seen = {}
    build = t2i.alignment_for_stage

    def recording(args, model, *rest, **kwargs):
        seen["model"] = model
        return build(args, model, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(t2i, "alignment_for_stage", recording)
        t2i.main(flags(assets, "sd3", output_dir, **extra))
    return seen["model"]


def base_transformer(assets):
    return diffusers.SD3Transformer2DModel.from_pretrained(assets / "pipe_sd3", subfolder="transformer")


def numel(parameters):
    return sum(p.numel() for p in parameters)


@pytest.fixture(scope="module")
def stage1(assets):
    out = assets / "stage1"
    model = run(assets, out, stage=1, validation_steps=2, **LORA)  # a preview mid-run swaps the EMA in and out
    return out, model


@pytest.fixture(scope="module")
def stage2(assets, stage1):
    out = assets / "stage2"
    model = run(assets, out, guiding_model_name_or_path=stage1[0], guide_stop_step=2, **LORA)
    return out, model


def ema_adapted(transformer, checkpoint):
    """`transformer` with a student adapter holding the EMA weights saved in `checkpoint`."""
    L.add_lora(transformer, RANK)
    ema = torch.load(checkpoint / L.LORA_EMA_CHECKPOINT_NAME, weights_only=True)
    with torch.no_grad():
        for p, shadow in zip(L.adapter_parameters(transformer, "student"), ema["shadow_params"], strict=True):
            p.copy_(shadow)
    return transformer.eval()


def inputs(model, n=2):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    return dict(hidden_states=torch.randn(n, cfg.in_channels, 8, 8, generator=g), timestep=torch.tensor([300., 700.]),
                encoder_hidden_states=torch.randn(n, 5, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(n, cfg.pooled_projection_dim, generator=g))


def test_stage1_trains_the_adapter_and_head_only_and_exports_the_ema_adapter(assets, stage1):
    out, model = stage1
    losses = read_losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["loss_vae_align"] > 0 for r in losses.values())
    # the base weights are those of the pretrained transformer, untouched by training
    base = base_transformer(assets).state_dict()
    trained = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if L.adapter_of(k) is None}
    assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in base)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if L.adapter_of(n) == "student"]
    # checkpoints: the adapter, its EMA and the head, never the whole transformer
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / L.LORA_CHECKPOINT_NAME).is_file() and (ckpt / L.LORA_EMA_CHECKPOINT_NAME).is_file()
        assert (ckpt / "projector" / "diffusion_pytorch_model.safetensors").is_file()
        assert not (ckpt / "transformer").exists() and not list(ckpt.glob("model*.safetensors"))
    # the output: the adapter in diffusers' LoRA format beside its head, card and samples; no pipeline
    assert {p.name for p in out.iterdir()} >= {L.LORA_WEIGHT_NAME, L.LORA_RECORD_NAME, "projector", "README.md",
                                               "samples.png"}
    assert not (out / "transformer").exists() and not (out / "model_index.json").exists()
    exported = load_file(out / L.LORA_WEIGHT_NAME)
    assert exported and all(".lora_A." in k or ".lora_B." in k for k in exported)
    assert json.loads((out / L.LORA_RECORD_NAME).read_text())["weights"] == "ema"
    # the base pipeline loads it with diffusers alone, and its transformer is the EMA-adapted model of the run
    reference = ema_adapted(base_transformer(assets), out / "checkpoint-4")
    with torch.no_grad():
        expected = reference(**inputs(reference)).sample
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(assets / "pipe_sd3")
    with torch.no_grad():
        plain = pipe.transformer(**inputs(reference)).sample
        pipe.load_lora_weights(out)
        got = pipe.transformer(**inputs(reference)).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 0  # the trained adapter changes the output
    images = pipe(prompt=["a handwritten seven", "the digit 2"], height=RESOLUTION, width=RESOLUTION,
                  num_inference_steps=2, guidance_scale=2.0, max_sequence_length=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()
    card = (out / "README.md").read_text()
    assert "LoRA adapter** (rank 4" in card and "stage 1" in card and "pipe.load_lora_weights" in card
    assert f"base_model: {assets / 'pipe_sd3'}" in card and "- lora" in card


def test_previews_sample_the_ema_adapter_and_leave_training_as_it_was(assets, stage1, tmp_path):
    """The run of `stage1` previewed at step 2 on its own module with the EMA adapter swapped in; without the preview
    the same run has the same losses and exports the same adapter (the trained weights, the modes and the random
    stream were restored)."""
    out = tmp_path / "no_preview"
    run(assets, out, stage=1, validation_steps=100, **LORA)
    assert (stage1[0] / "samples" / "step-0000002.png").is_file()
    previewed, plain = read_losses(stage1[0]), read_losses(out)
    assert sorted(plain) == sorted(previewed) == [1, 2, 3, 4]
    for step in previewed:
        for key in ("loss", "loss_diff", "loss_vae_align", "lr"):
            assert plain[step][key] == previewed[step][key], (step, key)
    a, b = load_file(out / L.LORA_WEIGHT_NAME), load_file(stage1[0] / L.LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pixart_stage1_adapter_loads_with_load_lora(assets, tmp_path):
    """PixArt-Sigma has no LoRA loader in diffusers: its adapter loads with `lora.load_lora`, as the card says, and
    samples through the base pipeline with the flow-matching scheduler."""
    pipe_folder = convergence_t2i.write_tiny_t2i_pipeline(tmp_path / "pipe_pixart", "pixart")
    out = tmp_path / "pixart"
    t2i.main(flags(assets, "pixart", out, pretrained_model_name_or_path=pipe_folder, stage=1, max_train_steps=2,
                   **LORA))
    reference = ema_adapted(diffusers.PixArtTransformer2DModel.from_pretrained(pipe_folder, subfolder="transformer"),
                            out / "checkpoint-2")
    pipe = diffusers.PixArtSigmaPipeline.from_pretrained(pipe_folder, scheduler=t2i.flow_scheduler_for_pixart())
    L.load_lora(pipe.transformer, out, "student")
    g = torch.Generator().manual_seed(0)
    cfg = reference.config
    x = dict(hidden_states=torch.randn(2, cfg.in_channels, 8, 8, generator=g), timestep=torch.tensor([300., 700.]),
             encoder_hidden_states=torch.randn(2, 5, cfg.caption_channels, generator=g),
             added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**x).sample, reference(**x).sample, rtol=0, atol=1e-6)
    images = pipe(prompt=["a handwritten seven"], height=RESOLUTION, width=RESOLUTION, num_inference_steps=2,
                  max_sequence_length=16, output_type="np", use_resolution_binning=False, clean_caption=False,
                  generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(images).all()
    card = (out / "README.md").read_text()
    assert 'load_lora(pipe.transformer, snapshot_download(' in card and "flow_prediction" in card
    assert "load_lora_weights" not in card


def test_stage2_guides_with_the_stage1_adapter_on_one_base(assets, stage1, stage2):
    out, model = stage2
    losses = read_losses(out)
    assert losses[1]["loss_guide"] > 0 and losses[2]["loss_guide"] > 0
    assert "loss_guide" not in losses[3] and "loss_guide" not in losses[4]
    assert all(np.isfinite(r["loss"]) for r in losses.values())
    for step in (1, 2):  # total = diffusion + 0.5 guide (the released weight)
        assert losses[step]["loss"] == pytest.approx(losses[step]["loss_diff"] + 0.5 * losses[step]["loss_guide"],
                                                     rel=1e-5)
    # one base: the run's module is the base plus the student's and the guide's adapters
    adapters = [L.adapter_parameters(model, name) for name in ("student", "guide")]
    assert numel(model.parameters()) == numel(base_transformer(assets).parameters()) + sum(map(numel, adapters))
    # the guide is the stage-1 output's (EMA) adapter, unchanged by training; only the student's trained
    stage1_state = L.read_lora(stage1[0])[1]
    guide = L.adapter_state_dict(model, "guide")
    assert guide.keys() == stage1_state.keys() and all(torch.equal(guide[k], stage1_state[k]) for k in guide)
    assert L.active_adapters(model) == ["student"]
    assert all(not p.requires_grad for p in adapters[1]) and all(p.requires_grad for p in adapters[0])
    assert (out / L.LORA_WEIGHT_NAME).is_file() and (out / "projector").is_dir()
    card = (out / "README.md").read_text()
    assert "stage 2" in card and f"the stage-1 LoRA adapter {stage1[0]}" in card
    assert f"base_model: {assets / 'pipe_sd3'}" in card


def test_stage2_with_the_base_as_teacher_needs_no_stage1(assets, tmp_path):
    out = tmp_path / "base_teacher"
    model = run(assets, out, lora_teacher="base", guide_stop_step=1, max_train_steps=2, checkpointing_steps=100,
                **LORA)
    losses = read_losses(out)
    assert losses[1]["loss_guide"] > 0 and np.isfinite(losses[1]["loss"]) and "loss_guide" not in losses[2]
    assert set(model.peft_config) == {"student"}
    student = L.adapter_parameters(model, "student")
    assert numel(model.parameters()) == numel(base_transformer(assets).parameters()) + numel(student)
    assert "the pretrained base itself" in (out / "README.md").read_text()


def test_exact_resume_matches_the_straight_run(assets, stage1, stage2):
    """Stopped at checkpoint 2 and resumed: the straight run's losses, checkpoint and exported adapter, exactly."""
    out = assets / "stage2_resumed"
    common = dict(guiding_model_name_or_path=stage1[0], guide_stop_step=2, **LORA)
    run(assets, out, max_train_steps=2, **common)
    run(assets, out, resume_from_checkpoint="latest", **common)
    straight, resumed = read_losses(stage2[0]), read_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in straight:
        for key in ("loss", "loss_diff", "lr"):
            assert resumed[step][key] == straight[step][key], (step, key)
    for name in (L.LORA_CHECKPOINT_NAME, "projector/diffusion_pytorch_model.safetensors"):
        a, b = load_file(out / "checkpoint-4" / name), load_file(stage2[0] / "checkpoint-4" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ema_a, ema_b = (torch.load(folder / "checkpoint-4" / L.LORA_EMA_CHECKPOINT_NAME, weights_only=True)
                    for folder in (out, stage2[0]))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"], strict=True))
    a, b = load_file(out / L.LORA_WEIGHT_NAME), load_file(stage2[0] / L.LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refusals(assets, stage1, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    refused = [dict(transformer_config=tmp_path / "config.json", stage=1),  # LoRA needs a pretrained base
               dict(lora_teacher="base", guiding_model_name_or_path=stage1[0]),
               dict(guiding_model_name_or_path=stage1[0], torch_compile=True),
               dict(stage=1, lora_teacher="adapter")]
    for extra in refused:
        with pytest.raises(SystemExit):
            t2i.parse_args(flags(assets, "sd3", tmp_path / "x", **{**LORA, **extra}))
    with pytest.raises(SystemExit):
        t2i.parse_args(flags(assets, "sd3", tmp_path / "x", stage=1, lora_alpha=8))  # LoRA flags need --lora_rank
    with pytest.raises(SystemExit):
        t2i.parse_args(flags(assets, "sd3", tmp_path / "x", stage=1, lora_fp32_base=True))
    # a stage-1 adapter trained on another base: refused before training, naming the base digests
    other = convergence_t2i.write_tiny_t2i_pipeline(tmp_path / "other_pipe", "sd3", seed=1)
    with pytest.raises(ProvenanceError, match=r"base_digest: .* \(there\) vs .* \(this run\).*other base weights"):
        t2i.main(flags(assets, "sd3", tmp_path / "other", pretrained_model_name_or_path=other,
                       guiding_model_name_or_path=stage1[0], **LORA))
    # a full-weight stage 2 given a LoRA stage-1 output
    with pytest.raises(ValueError, match="holds a stage-1 LoRA adapter: train stage 2 with --lora_rank"):
        t2i.main(flags(assets, "sd3", tmp_path / "full", guiding_model_name_or_path=stage1[0]))


def test_two_processes_stage2_lora(assets, stage1, tmp_path):
    """DDP on CPU (gloo), stage 2 with the stage-1 adapter as teacher, past the guide stop."""
    launch_ddp(flags(assets, "sd3", tmp_path / "ddp", guiding_model_name_or_path=stage1[0], guide_stop_step=1,
                     max_train_steps=2, train_batch_size=1, **LORA), 29581)
    losses = read_losses(tmp_path / "ddp")
    assert losses[1]["loss_guide"] > 0 and "loss_guide" not in losses[2]
    assert (tmp_path / "ddp" / "checkpoint-2" / L.LORA_CHECKPOINT_NAME).is_file()
    assert (tmp_path / "ddp" / L.LORA_WEIGHT_NAME).is_file()


def test_fsdp_two_processes_stage2_lora_exports_the_ema_adapter_and_resumes_exactly(assets, stage1, tmp_path):
    """FSDP2 on 2 CPU processes, stage 2 with the stage-1 adapter as teacher (its pass on the same sharded module),
    past the guide stop: the frozen base is sharded with the adapters, each process keeps the EMA of its adapter
    shards, the export is the whole EMA adapter in diffusers' format (loaded by `load_lora_weights`), equal to the
    DDP run's on the same data; stopped after step 1 and resumed, the run repeats the straight run exactly."""
    from test_train_t2i import launch_fsdp

    common = dict(guiding_model_name_or_path=stage1[0], guide_stop_step=2, max_train_steps=3, train_batch_size=1,
                  checkpointing_steps=1, **LORA)
    straight = tmp_path / "fsdp"
    launch_fsdp(tmp_path, flags(assets, "sd3", straight, **common), 29583)
    ckpt = straight / "checkpoint-3"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()  # accelerate's DCP shards
    shards = [torch.load(ckpt / f"transformer_ema_shards_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert shards[0]["optimization_step"] == 3
    losses = read_losses(straight)
    assert losses[1]["loss_guide"] > 0 and losses[2]["loss_guide"] > 0 and "loss_guide" not in losses[3]
    # the export: the student adapter's EMA, whole (each tensor its two processes' shards joined along dim 0)
    exported = load_file(straight / L.LORA_WEIGHT_NAME)
    model = base_transformer(assets)
    L.add_lora(model, RANK)
    names = [n.replace(".student", "") for n, p in model.named_parameters() if L.adapter_of(n) == "student"]
    assert len(names) == len(shards[0]["shadow_params"]) == len(exported)
    for name, a, b in zip(names, shards[0]["shadow_params"], shards[1]["shadow_params"]):
        assert torch.equal(exported[f"transformer.{name}"], torch.cat([a, b])), name
    assert json.loads((straight / L.LORA_RECORD_NAME).read_text())["base_digest"] == L.base_digest(model)
    assert (straight / "projector" / "diffusion_pytorch_model.safetensors").is_file()

    # the same run under DDP (one whole base per process, the teacher pass on the unwrapped module): the same losses,
    # so the same guide targets and gradients, and the same exported adapter up to float rounding
    ddp = tmp_path / "ddp"
    launch_ddp(flags(assets, "sd3", ddp, **dict(common, checkpointing_steps=100)), 29584)
    for step, row in read_losses(ddp).items():
        for key in ("loss", "loss_diff", "loss_guide"):
            if key in row:
                assert losses[step][key] == pytest.approx(row[key], rel=1e-5), (step, key)
    reference = load_file(ddp / L.LORA_WEIGHT_NAME)
    assert exported.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    heads = [load_file(folder / "projector" / "diffusion_pytorch_model.safetensors") for folder in (straight, ddp)]
    for name in heads[1]:
        torch.testing.assert_close(heads[0][name], heads[1][name], rtol=1e-5, atol=1e-6, msg=name)
    # the base pipeline loads the FSDP export with diffusers alone
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(assets / "pipe_sd3")
    pipe.load_lora_weights(straight)
    images = pipe(prompt=["a handwritten seven"], height=RESOLUTION, width=RESOLUTION, num_inference_steps=2,
                  guidance_scale=2.0, max_sequence_length=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(images).all()

    # exact resume under FSDP: a copy of the run stopped at checkpoint-1, resumed to step 3 (the guide stops on the way)
    resumed = tmp_path / "fsdp_resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    rows = (straight / "loss_log.jsonl").read_text().splitlines()[:1]
    (resumed / "loss_log.jsonl").write_text("\n".join(rows) + "\n")
    launch_fsdp(tmp_path, flags(assets, "sd3", resumed, resume_from_checkpoint="latest", **common), 29585)
    again = read_losses(resumed)
    for step in (2, 3):
        for key in ("loss", "loss_diff", "lr"):
            assert again[step][key] == losses[step][key], (step, key)
    a = load_file(resumed / L.LORA_WEIGHT_NAME)
    assert a.keys() == exported.keys() and all(torch.equal(a[k], exported[k]) for k in a)
    for r in (0, 1):
        x = torch.load(resumed / "checkpoint-3" / f"transformer_ema_shards_rank{r}.pt", weights_only=True)
        assert all(torch.equal(u, v) for u, v in zip(x["shadow_params"], shards[r]["shadow_params"], strict=True))


def test_fsdp_two_processes_stage1_and_base_teacher_lora_equal_ddp(assets, tmp_path):
    """FSDP2 on 2 CPU processes: stage 1, and stage 2 with the pretrained base as teacher (adapters off on the sharded
    module), have the DDP runs' losses and export the same EMA adapter and head up to float rounding."""
    from test_train_t2i import launch_fsdp

    for i, extra in enumerate([dict(stage=1), dict(lora_teacher="base", guide_stop_step=2)]):
        common = dict(max_train_steps=2, train_batch_size=1, checkpointing_steps=100, **extra, **LORA)
        fsdp, ddp = tmp_path / f"fsdp{i}", tmp_path / f"ddp{i}"
        launch_fsdp(tmp_path, flags(assets, "sd3", fsdp, **common), 29586 + i)
        launch_ddp(flags(assets, "sd3", ddp, **common), 29588 + i)
        a, b = read_losses(fsdp), read_losses(ddp)
        assert sorted(a) == sorted(b) == [1, 2]
        term = "loss_vae_align" if i == 0 else "loss_guide"
        for step in b:
            assert a[step][term] > 0
            for key in ("loss", "loss_diff", term):
                assert a[step][key] == pytest.approx(b[step][key], rel=1e-5), (extra, step, key)
        for name in (L.LORA_WEIGHT_NAME, "projector/diffusion_pytorch_model.safetensors"):
            x, y = load_file(fsdp / name), load_file(ddp / name)
            assert x.keys() == y.keys()
            for key in y:
                torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6, msg=f"{extra} {name} {key}")


def test_bf16_mixed_precision_keeps_the_frozen_base_in_bf16_and_the_adapter_in_fp32(assets, stage1, tmp_path):
    """`--mixed_precision bf16`: the frozen base in bf16 (as diffusers' LoRA scripts), the trained adapter, its EMA
    and the head in fp32; the fp32 stage-1 adapter is accepted as the guide of the bf16 base (the base digest ignores
    precision), the losses are finite and the export is an fp32 LoRA that `load_lora_weights` loads."""
    from accelerate.state import AcceleratorState

    out = tmp_path / "bf16"
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state fixes the precision once
    try:
        model = run(assets, out, guiding_model_name_or_path=stage1[0], guide_stop_step=2, max_train_steps=2,
                    checkpointing_steps=100, mixed_precision="bf16", **LORA)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(dtype == torch.bfloat16 for name, dtype in dtypes.items() if L.adapter_of(name) is None)
    assert all(dtypes[name] == torch.float32 for name in dtypes if L.adapter_of(name) == "student")
    losses = read_losses(out)
    assert all(np.isfinite(r["loss"]) and r["loss_guide"] > 0 for r in losses.values())
    exported = load_file(out / L.LORA_WEIGHT_NAME)
    assert exported and all(v.dtype == torch.float32 for v in exported.values())
    head = load_file(out / "projector" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in head.values())
    fp32_base = base_transformer(assets)
    assert json.loads((out / L.LORA_RECORD_NAME).read_text())["base_digest"] == L.base_digest(fp32_base)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(assets / "pipe_sd3")
    with torch.no_grad():
        plain = pipe.transformer(**inputs(fp32_base)).sample
        pipe.load_lora_weights(out)
        got = pipe.transformer(**inputs(fp32_base)).sample
    assert torch.isfinite(got).all() and (got - plain).abs().max() > 0

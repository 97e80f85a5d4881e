"""`examples/train_self_transcendence_t2i.py` end to end on tiny offline SD3 and PixArt-Sigma pipelines (random tiny
CLIP / T5 text encoders, character-level tokenizers) and a tiny captioned imagefolder: both stages, checkpoints, the
output loaded into the matching diffusers pipeline and sampled, exact resume, text-embedding cache, caption dropout,
errors, and a 2-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence_t2i  # noqa: E402  (the tiny pipeline builder)
import train_self_transcendence_t2i as t2i  # noqa: E402

FAMILIES = ("sd3", "pixart")
PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline"}
NUM_IMAGES = 8
RESOLUTION = 16  # the tiny VAE: 16 px -> 4 x 8 x 8 latents


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_assets")
    for family in FAMILIES:
        convergence_t2i.write_tiny_t2i_pipeline(root / f"pipe_{family}", family)
    write_captioned_images(root / "data")
    return root


def write_captioned_images(data):
    """NUM_IMAGES 20 px noise images with digit captions, as an imagefolder with metadata.jsonl."""
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(NUM_IMAGES):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": convergence_t2i.caption_for(i % 3, i)}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def flags(assets, family, output_dir, **extra):
    base = {"pretrained_model_name_or_path": assets / f"pipe_{family}", "train_data_dir": assets / "data",
            "cache_dir": assets / "hf_cache", "resolution": RESOLUTION, "train_batch_size": 2, "max_train_steps": 4,
            "checkpointing_steps": 2, "validation_steps": 100, "validation_num_inference_steps": 2,
            "projector_dim": 16, "lr_warmup_steps": 2, "max_sequence_length": 16, "output_dir": output_dir,
            "report_to": "none", "seed": 0,
            "dataloader_num_workers": 0}  # the tests run alone on few cores (the default would start workers)
    base.update(extra)
    argv = []
    for key, value in base.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv + ["--no-progress"]


def read_losses(output_dir):
    rows = {}
    for line in (Path(output_dir) / "loss_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def weights(folder):
    return load_file(Path(folder) / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def sample(family, folder):
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASS[family]).from_pretrained(folder)
    kwargs = {"use_resolution_binning": False, "clean_caption": False} if family == "pixart" else {}
    images = pipe(prompt=["a handwritten seven", "the digit 2"], height=RESOLUTION, width=RESOLUTION,
                  num_inference_steps=2, guidance_scale=2.0, max_sequence_length=16, output_type="np",
                  generator=torch.Generator().manual_seed(0), **kwargs).images
    return pipe, images


@pytest.fixture(scope="module")
def stage1(assets):
    out = {}
    for family in FAMILIES:
        out[family] = assets / f"stage1_{family}"
        t2i.main(flags(assets, family, out[family], stage=1))
    return out


@pytest.fixture(scope="module")
def stage2(assets, stage1):
    out = {}
    for family in FAMILIES:
        out[family] = assets / f"stage2_{family}"
        t2i.main(flags(assets, family, out[family], guiding_model_name_or_path=stage1[family], guide_stop_step=2))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_checkpoints_pipeline_and_card(stage1, family):
    out = stage1[family]
    for step in (2, 4):
        for sub in ("transformer", "transformer_ema", "projector"):
            assert (out / f"checkpoint-{step}" / sub / "diffusion_pytorch_model.safetensors").exists(), sub
        data_state = json.loads((out / f"checkpoint-{step}" / "data_state_rank0.json").read_text())
        assert data_state["samples_seen"] == 2 * step and "caption_rng_state" in data_state
    losses = read_losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["loss_vae_align"] > 0 for r in losses.values())
    # the released recipe's optimiser, warm-up and stage-1 block (n/6 of 3 blocks rounds to 1)
    args = json.loads((out / "args.json").read_text())
    assert (args["learning_rate"], args["adam_beta2"], args["adam_weight_decay"]) == (2e-4, 0.9, 0.03)
    assert [losses[s]["lr"] for s in (1, 2, 3)] == pytest.approx([1e-4, 2e-4, 2e-4])
    # the exported transformer is the last EMA, and the folder is the matching diffusers pipeline
    assert_same_weights(out / "transformer", out / "checkpoint-4" / "transformer_ema")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASS[family]
    pipe, images = sample(family, out)
    assert type(pipe).__name__ == PIPELINE_CLASS[family]
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and PIPELINE_CLASS[family] in card and "stage 1" in card
    assert "accelerate launch examples/train_self_transcendence_t2i.py" in card


@pytest.mark.parametrize("family", FAMILIES)
def test_stage2_uses_the_stage1_ema_teacher_and_stops_the_guide(stage1, stage2, family):
    out = stage2[family]
    losses = read_losses(out)
    assert losses[1]["loss_guide"] > 0 and losses[2]["loss_guide"] > 0
    assert "loss_guide" not in losses[3] and "loss_guide" not in losses[4]
    for step in (1, 2):  # total = diffusion + 0.5 guide (the released weight)
        assert losses[step]["loss"] == pytest.approx(losses[step]["loss_diff"] + 0.5 * losses[step]["loss_guide"],
                                                     rel=1e-5)
    assert_same_weights(out / "transformer", out / "checkpoint-4" / "transformer_ema")
    pipe, images = sample(family, out)
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()
    if family == "pixart":  # an epsilon-model DPM scheduler would sample our velocity model wrongly
        assert pipe.scheduler.config.prediction_type == "flow_prediction"
    card = (out / "README.md").read_text()
    assert str(stage1[family]) in card and "stage 2" in card


def test_teacher_is_the_stage1_output_transformer(assets, stage1):
    """The guiding model built by the script holds exactly the stage-1 output's transformer/ (its EMA)."""
    args = t2i.parse_args(flags(assets, "sd3", assets / "unused", guiding_model_name_or_path=stage1["sd3"]))
    import diffusers

    student = diffusers.SD3Transformer2DModel.from_pretrained(stage1["sd3"], subfolder="transformer")
    null = {"encoder_hidden_states": torch.zeros(1, 1, 1), "pooled_projections": torch.zeros(1, 1)}
    method = t2i.alignment_for_stage(args, student, "sd3", null, "cpu")
    ema = weights(stage1["sd3"] / "checkpoint-4" / "transformer_ema")
    teacher = method.teacher.state_dict()
    assert all(torch.equal(teacher[k], ema[k]) for k in ema)
    assert (method.guided_layer, method.guiding_layer, method.guidance_scale) == (2, 2, 5.0)  # n/2, 2n/3 of 3; w=5
    # in a bf16 run the teacher's weights are bf16 (--guiding_weights_dtype auto), the same numbers rounded
    assert args.guiding_weights_dtype == "auto"
    half = t2i.alignment_for_stage(args, student, "sd3", null, "cpu", teacher_dtype=torch.bfloat16).teacher
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(torch.equal(p, ema[k].to(torch.bfloat16)) for k, p in half.state_dict().items())


def test_exact_resume_matches_a_straight_run_with_cached_text_embeddings(assets, stage1, stage2, tmp_path):
    """Stopped at step 2 and resumed: the same losses and final weights as the straight run (which encoded every
    caption on the fly; this one reads the per-caption cache, and decodes its images in a worker process: neither
    the order nor the random draws depend on it)."""
    out = tmp_path / "resumed"
    common = dict(guiding_model_name_or_path=stage1["sd3"], guide_stop_step=2, precompute_text_embeddings=True,
                  dataloader_num_workers=1)
    t2i.main(flags(assets, "sd3", out, max_train_steps=2, **common))
    t2i.main(flags(assets, "sd3", out, resume_from_checkpoint="latest", **common))
    straight, resumed = read_losses(stage2["sd3"]), read_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in straight:
        for key in ("loss", "loss_diff", "lr"):
            assert resumed[step][key] == straight[step][key], (step, key)
    for sub in ("transformer", "transformer_ema", "projector"):
        assert_same_weights(out / "checkpoint-4" / sub, stage2["sd3"] / "checkpoint-4" / sub)
    assert_same_weights(out / "transformer", stage2["sd3"] / "transformer")
    # one file per distinct caption of the data and per validation prompt, all encoded before the first step
    cached = list((out / t2i.TEXT_EMBEDDINGS_FOLDER).glob("*.safetensors"))
    assert len(cached) == len(distinct_captions(assets) | set(t2i.DEFAULT_VALIDATION_PROMPTS))


def distinct_captions(assets):
    return {json.loads(line)["text"] for line in (assets / "data" / "metadata.jsonl").read_text().splitlines()}


def test_precomputed_text_embeddings_are_encoded_before_training_then_the_encoders_are_freed(assets, tmp_path,
                                                                                             monkeypatch):
    """--precompute_text_embeddings: every caption of the data and every validation prompt is encoded before the first
    step, the text encoders are dropped, and the previews sample from the cached embeddings."""
    from diffusers_selftrans import training as T

    started, encoded_after_start, pipes = [], [], []
    encode, step, free = t2i.encode_captions, T.StepLog.step, t2i.free_text_encoders

    def recording_encode(*args, **kwargs):
        if started:
            encoded_after_start.append(args[2])
        return encode(*args, **kwargs)

    def recording_step(self, *args, **kwargs):
        started.append(True)
        return step(self, *args, **kwargs)

    def recording_free(text_pipe):
        pipes.append(text_pipe)
        return free(text_pipe)

    monkeypatch.setattr(t2i, "encode_captions", recording_encode)
    monkeypatch.setattr(T.StepLog, "step", recording_step)
    monkeypatch.setattr(t2i, "free_text_encoders", recording_free)
    out = tmp_path / "stage1"
    t2i.main(flags(assets, "sd3", out, stage=1, max_train_steps=3, validation_steps=2, precompute_text_embeddings=True))
    assert started and encoded_after_start == []
    cached = list((out / t2i.TEXT_EMBEDDINGS_FOLDER).glob("*.safetensors"))
    assert len(cached) == len(distinct_captions(assets) | set(t2i.DEFAULT_VALIDATION_PROMPTS))
    (text_pipe,) = pipes
    encoders = [name for name in text_pipe.components if name.startswith("text_encoder")]
    assert len(encoders) == 3 and all(getattr(text_pipe, name) is None for name in encoders)  # SD3: CLIP x2 + T5
    assert (out / "samples" / "step-0000002.png").is_file() and (out / "samples.png").is_file()


def test_caption_dropout_swaps_in_the_empty_prompt():
    cond = {"encoder_hidden_states": torch.randn(3, 4, 5), "encoder_attention_mask": torch.ones(3, 4)}
    null = {"encoder_hidden_states": torch.randn(1, 4, 5), "encoder_attention_mask": torch.tensor([[1.0, 0, 0, 0]])}
    out = t2i.drop_captions(cond, null, torch.tensor([False, True, False]))
    assert torch.equal(out["encoder_hidden_states"][1], null["encoder_hidden_states"][0])
    assert torch.equal(out["encoder_attention_mask"][1], null["encoder_attention_mask"][0])
    for i in (0, 2):
        assert torch.equal(out["encoder_hidden_states"][i], cond["encoder_hidden_states"][i])


def test_teacher_sees_the_dropped_captions_by_default_as_the_released_code(assets, stage1, tmp_path):
    """Released T2I: captions are dropped in the dataset, so the teacher's conditional branch gets the empty prompt
    wherever the student's caption was dropped. With every caption dropped, f_c = f_u and the target f_u + w (f_c -
    f_u) no longer depends on w (dropout 0.999999: every caption of the seeded draw): the first step's guide loss is the same for w = 5 and w = 1. With
    --teacher_captions original the teacher keeps the caption, and w matters."""
    def first_guide_loss(name, **extra):
        out = tmp_path / name
        t2i.main(flags(assets, "sd3", out, guiding_model_name_or_path=stage1["sd3"], caption_dropout=0.999999,
                       max_train_steps=1, checkpointing_steps=100, **extra))
        return read_losses(out)[1]["loss_guide"]

    dropped = [first_guide_loss(f"dropped_w{w}", guide_cfg_scale=w) for w in (5, 1)]
    assert dropped[0] == pytest.approx(dropped[1], rel=1e-6)
    original = [first_guide_loss(f"original_w{w}", guide_cfg_scale=w, teacher_captions="original") for w in (5, 1)]
    assert original[0] != pytest.approx(original[1], rel=1e-3)
    assert original[1] != pytest.approx(dropped[1], rel=1e-3)  # w = 1: f_g = f_c, the caption's or the empty prompt's
    assert t2i.parse_args(flags(assets, "sd3", tmp_path / "x", guiding_model_name_or_path=stage1["sd3"])
                          ).teacher_captions == "dropped"


def test_empty_prompt_has_the_caption_sequence_length(assets):
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(assets / "pipe_sd3", transformer=None)
    null = t2i.encode_captions("sd3", pipe, [""], "cpu", 16)
    caps = t2i.encode_captions("sd3", pipe, ["a handwritten seven", "the digit 2"], "cpu", 16)
    assert null["encoder_hidden_states"].shape[1:] == caps["encoder_hidden_states"].shape[1:]
    assert null["pooled_projections"].shape == (1, caps["pooled_projections"].shape[1])
    # the pipeline's own encode_prompt at inference gives the same embeddings
    ref, _, pooled, _ = pipe.encode_prompt("the digit 2", "the digit 2", "the digit 2", device="cpu",
                                           do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(caps["encoder_hidden_states"][1:], ref)
    torch.testing.assert_close(caps["pooled_projections"][1:], pooled)


def test_bad_input_is_a_clear_error(assets, tmp_path):
    with pytest.raises(SystemExit):
        t2i.parse_args(flags(assets, "sd3", tmp_path / "x"))  # stage 2 without a guiding model
    with pytest.raises(ValueError, match=r"--caption_column 'caption' not in the dataset columns \['image', 'text'\]"):
        t2i.main(flags(assets, "sd3", tmp_path / "y", stage=1, caption_column="caption"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="this script trains StableDiffusion3Pipeline"):
        t2i.main(flags(assets, "sd3", tmp_path / "z", stage=1, pretrained_model_name_or_path=tmp_path / "other"))


def test_two_processes_stage2(assets, stage1, tmp_path):
    """DDP on CPU (gloo) through accelerate's torchrun launcher, past the guide stop."""
    launch_ddp(flags(assets, "sd3", tmp_path / "ddp", guiding_model_name_or_path=stage1["sd3"], guide_stop_step=1,
                     max_train_steps=2, train_batch_size=1), 29571)
    ckpt = tmp_path / "ddp" / "checkpoint-2"
    states = [json.loads((ckpt / f"data_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["epoch"], s["position"], s["process_index"]) for s in states] == [(0, 2, 0), (0, 2, 1)]
    assert (ckpt / "random_states_1.pkl").exists()
    losses = read_losses(tmp_path / "ddp")
    assert losses[1]["loss_guide"] > 0 and "loss_guide" not in losses[2]
    assert (tmp_path / "ddp" / "model_index.json").exists()


# The accelerate config of the README's FSDP recipe (FSDP2, blocks wrapped by the transformer's `_no_split_modules`,
# sharded checkpoints), for 2 CPU processes.
FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
mixed_precision: 'no'
dynamo_config: {}
num_machines: 1
num_processes: 2
main_process_port: %d
use_cpu: false
"""


def _launch(launcher_args, argv):
    """`accelerate launch` of the text-to-image script on 2 CPU processes (gloo, one thread each); asserts it exits 0."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def launch_ddp(argv, port):
    return _launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--main_process_port", str(port),
                    str(ROOT / "examples" / "train_self_transcendence_t2i.py")], argv)


def launch_fsdp(tmp_path, argv, port):
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG % port)
    return _launch(["--config_file", str(config), str(ROOT / "tests" / "fsdp_on_cpu.py"),
                    str(ROOT / "examples" / "train_self_transcendence_t2i.py")], argv)


def test_fsdp_two_processes_stage2_exports_full_ema_and_resumes_exactly(assets, stage1, tmp_path):
    """FSDP2 on 2 CPU processes, stage 2 past the guide stop: sharded checkpoints (model, optimizer through accelerate;
    each process's EMA shards), the exported transformer is the full gathered EMA and loads in
    StableDiffusion3Pipeline; stopped after step 1 and resumed, the run repeats the straight run exactly."""
    common = dict(guiding_model_name_or_path=stage1["sd3"], guide_stop_step=1, max_train_steps=2, train_batch_size=1,
                  checkpointing_steps=1)
    straight = tmp_path / "fsdp"
    launch_fsdp(tmp_path, flags(assets, "sd3", straight, **common), 29573)
    ckpt = straight / "checkpoint-2"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()  # accelerate's DCP shards
    assert not (ckpt / "transformer").exists()  # no unsharded copy on one process
    shards = [torch.load(ckpt / f"transformer_ema_shards_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert shards[0]["optimization_step"] == 2
    losses = read_losses(straight)
    assert losses[1]["loss_guide"] > 0 and "loss_guide" not in losses[2]
    # the export is the EMA, whole: each parameter is its two processes' shards joined along dim 0 (FSDP2's Shard(0))
    exported = weights(straight / "transformer")
    import diffusers

    names = [n for n, _ in diffusers.SD3Transformer2DModel.from_pretrained(straight / "transformer").named_parameters()]
    assert len(names) == len(shards[0]["shadow_params"])
    for name, a, b in zip(names, shards[0]["shadow_params"], shards[1]["shadow_params"]):
        assert torch.equal(exported[name], torch.cat([a, b])), name
    pipe, images = sample("sd3", straight)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    # the same run under DDP (same data and random draws per process): the same losses and EMA up to float rounding.
    # DDP without a mid-run checkpoint: its EMA save hook builds a model (`from_config`), which draws from the global
    # RNG on the main process and so changes the next steps' noise; FSDP's checkpoints draw nothing.
    ddp = tmp_path / "ddp"
    launch_ddp(flags(assets, "sd3", ddp, **dict(common, checkpointing_steps=100)), 29575)
    for step, row in read_losses(ddp).items():
        assert losses[step]["loss"] == pytest.approx(row["loss"], rel=1e-5), step
    reference = weights(ddp / "transformer")
    assert exported.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()

    # exact resume under FSDP: a copy of the run stopped at checkpoint-1, resumed to step 2
    resumed = tmp_path / "fsdp_resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    rows = (straight / "loss_log.jsonl").read_text().splitlines()[:1]
    (resumed / "loss_log.jsonl").write_text("\n".join(rows) + "\n")
    launch_fsdp(tmp_path, flags(assets, "sd3", resumed, resume_from_checkpoint="latest", **common), 29574)
    again = read_losses(resumed)
    for key in ("loss", "loss_diff", "lr"):
        assert again[2][key] == losses[2][key], key
    assert_same_weights(resumed / "transformer", straight / "transformer")
    for r in (0, 1):
        a = torch.load(resumed / "checkpoint-2" / f"transformer_ema_shards_rank{r}.pt", weights_only=True)
        b = torch.load(ckpt / f"transformer_ema_shards_rank{r}.pt", weights_only=True)
        assert all(torch.equal(x, y) for x, y in zip(a["shadow_params"], b["shadow_params"]))


# ----------------------------------------------------------------------------------------------------------------------
# Cluster safety (issue 25): preemption, the guide's family, the text-embedding cache's encoders


def test_preempted_stage2_checkpoints_the_step_and_resumes_exactly(assets, stage1, stage2, tmp_path, monkeypatch):
    import signal

    from test_cluster_safety import signal_at_call

    from diffusers_selftrans import checkpointing as C
    from diffusers_selftrans import runs as R

    out = tmp_path / "preempted"
    run = flags(assets, "sd3", out, guiding_model_name_or_path=stage1["sd3"], guide_stop_step=2,
                checkpointing_steps=100)
    signal_at_call(monkeypatch, signal.SIGTERM, 3)
    with pytest.raises(R.Preempted) as preempted:
        t2i.main(run)
    assert preempted.value.code == 143 and [p.name for p in C.list_checkpoints(out)] == ["checkpoint-3"]
    monkeypatch.undo()
    t2i.main(run + ["--resume_from_checkpoint", "latest"])
    straight, resumed = read_losses(stage2["sd3"]), read_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in straight:
        for key in ("loss", "loss_diff", "lr"):
            assert resumed[step][key] == straight[step][key], (step, key)
    assert_same_weights(out / "transformer", stage2["sd3"] / "transformer")


def test_stage2_refuses_a_guiding_model_of_another_family_before_loading_it(assets, stage1, tmp_path):
    from diffusers_selftrans.provenance import ProvenanceError

    with pytest.raises(ProvenanceError, match=r"guiding model .*stage1_pixart.*transformer_class: "
                                              r"PixArtTransformer2DModel \(there\) vs SD3Transformer2DModel"):
        t2i.main(flags(assets, "sd3", tmp_path / "out", guiding_model_name_or_path=stage1["pixart"]))


def test_text_embedding_cache_refuses_other_text_encoders_and_a_misfiled_caption(assets, tmp_path):
    import diffusers

    from diffusers_selftrans.provenance import ProvenanceError

    other = convergence_t2i.write_tiny_t2i_pipeline(tmp_path / "other_pipe", "sd3", seed=1)
    pipes = [diffusers.StableDiffusion3Pipeline.from_pretrained(p, transformer=None)
             for p in (assets / "pipe_sd3", other)]
    cache = tmp_path / "cache"
    captions = ["a handwritten seven", "the digit 2"]
    first = t2i.TextEmbeddings("sd3", pipes[0], "cpu", 16, cache)(captions)
    again = t2i.TextEmbeddings("sd3", pipes[0], "cpu", 16, cache)(captions)  # the same encoders: read back
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(ProvenanceError, match=r"cache.*text_encoders.*\(there\) vs .*\(this run\)"):
        t2i.TextEmbeddings("sd3", pipes[1], "cpu", 16, cache)
    with pytest.raises(ProvenanceError, match=r"max_sequence_length: 16 \(there\) vs 8"):
        t2i.TextEmbeddings("sd3", pipes[0], "cpu", 8, cache)
    files = sorted(cache.glob("*.safetensors"))
    files[0].rename(tmp_path / "moved")
    files[1].rename(files[0])  # a file under another caption's name
    with pytest.raises(ProvenanceError, match="holds the embeddings of"):
        t2i.TextEmbeddings("sd3", pipes[0], "cpu", 16, cache)(captions)


def test_the_loop_reads_the_device_once_per_step(assets, stage1, monkeypatch):
    """Issue 26, item 2, for this script's loop (the instrument: test_host_syncs.HostReads). The captions are read
    from the text-embedding cache, as in a run whose embeddings were computed before training."""
    from test_host_syncs import assert_one_read_after_backward, make_recorder

    reads = make_recorder(monkeypatch)
    out = assets / "syncs_t2i"
    common = dict(guiding_model_name_or_path=stage1["sd3"], guide_stop_step=6, checkpointing_steps=4,
                  precompute_text_embeddings=True)
    t2i.main(flags(assets, "sd3", out, max_train_steps=4, **common))  # every caption is encoded (and cached) once
    with reads:
        t2i.main(flags(assets, "sd3", out, max_train_steps=8, resume_from_checkpoint="latest", **common))
    assert_one_read_after_backward(reads, steps=[5, 6])  # step 6 guided, step 7 after the guide stop

"""The two training scripts end to end on tiny local data: files, stage 2 on stage 1, exact resume, 2 processes,
Hub push (network boundary patched), config files, checkpoints and the non-finite guard."""

import json
import os
import shutil
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

import train_align  # noqa: E402
import train_self_transcendence  # noqa: E402

from diffusers_selftrans import checkpointing as C  # noqa: E402
from diffusers_selftrans import hub, training as T  # noqa: E402

TINY_MODEL = {"patch_size": 2, "num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 16}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """3 classes x 8 images (20 px, cropped to 16) and a tiny random AutoencoderKL (16 px -> 4 x 8 x 8)."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("train_assets")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "data" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            pixels = (rng.random((20, 20, 3)) * 80 + c * 80).astype("uint8")
            Image.fromarray(pixels).save(root / "data" / f"class{c}" / f"{i}.png")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
    ).save_pretrained(root / "vae")
    (root / "model.json").write_text(json.dumps(TINY_MODEL))
    return root


def flags(assets, output_dir, **extra):
    base = {
        "model": assets / "model.json", "vae_name_or_path": assets / "vae", "train_data_dir": assets / "data",
        "cache_dir": assets / "hf_cache", "resolution": 16, "train_batch_size": 4, "max_train_steps": 4,
        "checkpointing_steps": 2, "validation_steps": 2, "validation_num_inference_steps": 2,
        "output_dir": output_dir, "report_to": "none", "seed": 0,
        "dataloader_num_workers": 0,  # the tests run alone on few cores (the default would start workers)
    }
    base.update(extra)
    argv = []
    for key, value in base.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", *([str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)])]
    return argv + ["--no-progress"]


def read_losses(output_dir):
    rows = {}
    for line in (Path(output_dir) / "loss_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run rewrites steps after its checkpoint
    return rows


def resolve(args):
    """The checkpoint a training script resumes from, given its flags."""
    return C.resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir,
                                       allow_inexact=args.allow_inexact_resume)


@pytest.fixture(scope="module")
def stage1(assets):
    out = assets / "stage1"
    train_align.main(flags(assets, out))
    return out


def test_stage1_writes_checkpoints_samples_pipeline_and_card(stage1):
    from diffusers_selftrans import SiTPipeline

    for step in (2, 4):
        ckpt = stage1 / f"checkpoint-{step}"
        for sub in ("transformer", "transformer_ema", "projector"):
            assert (ckpt / sub / "diffusion_pytorch_model.safetensors").exists(), sub
        assert (ckpt / "data_state_rank0.json").exists() and (ckpt / "optimizer.bin").exists()
    assert not list(stage1.glob("*.tmp"))
    assert (stage1 / "samples" / "step-0000002.png").exists()
    grid = Image.open(stage1 / "samples.png")
    assert grid.size[0] > grid.size[1] > 0  # one column per class, two rows
    index = json.loads((stage1 / "model_index.json").read_text())
    assert {"transformer", "vae", "scheduler"} <= set(index)
    args = json.loads((stage1 / "args.json").read_text())
    assert args["alignment"] == "vae_align" and args["max_train_steps"] == 4
    card = (stage1 / "README.md").read_text()
    assert card.startswith("---") and "library_name: diffusers" in card
    assert "accelerate launch examples/train_align.py --model" in card
    losses = read_losses(stage1)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in losses.values())
    assert "loss_vae_align" in losses[1]

    # the final transformer is the EMA of the last checkpoint, and the folder is a working pipeline
    final = load_file(stage1 / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = load_file(stage1 / "checkpoint-4" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    assert final.keys() == ema.keys() and all(torch.equal(final[k], ema[k]) for k in final)
    pipe = SiTPipeline.from_pretrained(stage1)
    assert pipe.transformer.config.id2label == {"0": "class0", "1": "class1", "2": "class2"} or \
        {int(k): v for k, v in pipe.transformer.config.id2label.items()} == {0: "class0", 1: "class1", 2: "class2"}
    images = pipe(class_labels=["class1", 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def test_stage2_trains_on_stage1_output_and_stops_the_guide(assets, stage1):
    out = assets / "stage2"
    train_self_transcendence.main(flags(assets, out, guiding_model_name_or_path=stage1, guide_stop_step=2,
                                        validation_steps=100))
    losses = read_losses(out)
    assert "loss_guide" in losses[1] and "loss_guide" in losses[2]
    assert "loss_guide" not in losses[3] and "loss_guide" not in losses[4]
    assert losses[3]["loss"] == pytest.approx(losses[3]["loss_diff"])
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert f"base_model: {stage1}" in card and "stage 2" in card
    # the student's state dict is a plain SiT (the projector lives in its own folder)
    student = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not any(k.startswith("projector") for k in student)
    assert (out / "checkpoint-2" / "projector" / "config.json").exists()


def test_stage2_guides_with_the_raw_stage1_weights_by_default(assets, stage1, tmp_path):
    """The released stage 2 guides with the stage-1 checkpoint's raw weights (ckpt['model']): stage 1 writes them to
    transformer_raw/, stage 2 loads them unless --guiding_weights ema; a folder without them is refused by name."""
    import shutil

    def safetensors(folder):
        return load_file(folder / "diffusion_pytorch_model.safetensors")

    raw, ema = safetensors(stage1 / "transformer_raw"), safetensors(stage1 / "transformer")
    last = safetensors(stage1 / "checkpoint-4" / "transformer")  # the training weights at the last step
    assert raw.keys() == last.keys() and all(torch.equal(raw[k], last[k]) for k in raw)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # two different teachers
    assert train_self_transcendence.parse_args(flags(assets, tmp_path / "s2", guiding_model_name_or_path=stage1)
                                               ).guiding_weights == "raw"
    for weights, expected in (("raw", raw), ("ema", ema)):
        state = T.load_guiding_model(str(stage1), weights).state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected), weights
    # a model folder (e.g. a converted released checkpoint) loads as given, whichever weights it holds
    state = T.load_guiding_model(str(stage1 / "transformer")).state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    # a stage-1 folder without raw weights: never a silent switch to the EMA
    older = tmp_path / "older"
    shutil.copytree(stage1, older, ignore=shutil.ignore_patterns("checkpoint-*", "transformer_raw"))
    with pytest.raises(ValueError, match=r"no transformer_raw/.*--guiding_weights ema"):
        T.load_guiding_model(str(older))
    with pytest.raises(ValueError, match=r"--guiding_weights ema"):
        train_self_transcendence.main(flags(assets, tmp_path / "s2", guiding_model_name_or_path=older,
                                            max_train_steps=1))
    assert T.load_guiding_model(str(older), "ema").config.num_layers == TINY_MODEL["num_layers"]


def test_stage2_accepts_the_transformer_subfolder_and_rejects_mismatched_teachers(assets, stage1, tmp_path):
    teacher = T.load_transformer(str(stage1 / "transformer"))
    assert teacher.config.num_layers == TINY_MODEL["num_layers"]
    other_grid = dict(TINY_MODEL, patch_size=1)  # 64 student tokens against the teacher's 16
    (tmp_path / "p1.json").write_text(json.dumps(other_grid))
    with pytest.raises(ValueError, match="[Tt]oken count"):
        train_self_transcendence.main(flags(assets, tmp_path / "out", model=tmp_path / "p1.json",
                                            guiding_model_name_or_path=stage1, max_train_steps=1))


def test_exact_resume(assets):
    straight = assets / "resume_straight"
    train_align.main(flags(assets, straight, validation_steps=100))
    split = assets / "resume_split"
    # "preempted" after step 3: its last checkpoint is step 2, so step 3 is logged, lost, and trained again
    train_align.main(flags(assets, split, validation_steps=100, max_train_steps=3))
    train_align.main(flags(assets, split, validation_steps=100, resume_from_checkpoint="latest"))

    a, b = read_losses(straight), read_losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (split / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the lost step 3 is not logged twice
    seconds = [r["train_seconds"] for r in rows]
    assert all(later > earlier for earlier, later in zip(seconds, seconds[1:]))  # the clock continues on resume
    for step in a:
        for key in ("loss", "loss_diff", "loss_vae_align"):
            assert a[step][key] == b[step][key], (step, key)
    for sub in ("transformer", "projector", "transformer_ema"):
        wa = load_file(straight / "checkpoint-4" / sub / "diffusion_pytorch_model.safetensors")
        wb = load_file(split / "checkpoint-4" / sub / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    assert json.loads((split / "checkpoint-4" / "data_state_rank0.json").read_text()) == \
        json.loads((straight / "checkpoint-4" / "data_state_rank0.json").read_text())


def test_checkpoints_total_limit_and_latest_ignores_partial_writes(assets):
    out = assets / "limit"
    train_align.main(flags(assets, out, max_train_steps=6, checkpointing_steps=1, checkpoints_total_limit=2,
                           validation_steps=100))
    assert [p.name for p in C.list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6"]
    # a kill during a save leaves only a .tmp folder: `latest` must never pick it
    (out / "checkpoint-7.tmp").mkdir()
    shutil.copytree(out / "checkpoint-6", out / "checkpoint-10")  # numeric, not string, order (a complete copy)
    args = train_align.parse_args(flags(assets, out, resume_from_checkpoint="latest"))
    assert resolve(args).name == "checkpoint-10"


def test_two_processes_run_stage2_past_the_guide_stop(assets, stage1, tmp_path):
    """DDP on CPU (gloo) through accelerate's torchrun launcher; accelerate's own `--cpu` multi-process path needs
    mpirun. Step 2 runs after the guide stop: the projector is no longer called and DDP must not complain."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561",
           str(ROOT / "examples" / "train_self_transcendence.py"),
           *flags(assets, tmp_path / "ddp", guiding_model_name_or_path=stage1, guide_stop_step=1, max_train_steps=2,
                  train_batch_size=2, validation_steps=100, no_t_range=True)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "ddp" / "checkpoint-2"
    assert (ckpt / "data_state_rank0.json").exists() and (ckpt / "data_state_rank1.json").exists()
    assert (ckpt / "random_states_1.pkl").exists()
    losses = read_losses(tmp_path / "ddp")
    assert losses[1]["loss_guide"] > 0 and "loss_guide" not in losses[2]
    # both processes read different examples: their data states advanced over disjoint positions of one plan
    states = [json.loads((ckpt / f"data_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0] != states[1]


def test_push_to_hub_uploads_pipeline_without_checkpoints(assets, stage1, monkeypatch):
    """The Hub is patched at the network boundary: every HfApi call that `upload_folder` makes to the server."""
    import huggingface_hub.hf_api
    from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, RepoUrl

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def validate_yaml(self, content, **kwargs):  # a POST to /api/validate-yaml for README.md
        calls["validated_card"] = content

    def create_commit(self, repo_id, operations, **kwargs):
        calls["repo_id"] = repo_id
        calls["uploaded"] = sorted(op.path_in_repo for op in operations)
        assert all(isinstance(op, CommitOperationAdd) for op in operations)
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                          commit_description="", oid="0" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # with hf_xet installed, upload_folder streams through its own xet pipeline instead of create_commit: take the
    # single-commit path, whose create_commit is patched above (older huggingface_hub versions always take it)
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False, raising=False)
    out = assets / "pushed"
    train_align.main(flags(assets, out, max_train_steps=2, push_to_hub=True, hub_model_id="me/sit-tiny",
                           hub_token="hf_secret_value", validation_steps=1))
    for written in ("README.md", "args.json"):
        assert "hf_secret_value" not in (out / written).read_text()
    assert calls["create_repo"] == calls["repo_id"] == "me/sit-tiny"
    assert calls["validated_card"] == (out / "README.md").read_text()
    uploaded = calls["uploaded"]
    # the complete pipeline with its card and the remote code (--save_remote_code is on by default) ...
    assert {"model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
            "README.md", "samples.png", "pipeline_sit.py", "transformer/transformer_sit.py"} <= set(uploaded)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_sit", "SiTPipeline"]
    # ... and nothing from training: the written folder has checkpoints, logs and step grids, the upload does not
    assert (out / "checkpoint-2").is_dir() and list((out / "samples").glob("step-*.png"))
    assert not any(f.startswith(("checkpoint-", "logs/", "samples/step-")) for f in uploaded), uploaded
    assert not any(f.endswith((".bin", ".pkl", ".pt", ".tmp")) for f in uploaded), uploaded
    front = (out / "README.md").read_text().split("---")[1]
    assert "library_name: diffusers" in front and "self-transcendence" in front


def test_no_save_remote_code_writes_weights_and_configs_only(assets, tmp_path):
    from diffusers_selftrans import SiTPipeline

    out = tmp_path / "plain"
    train_align.main(flags(assets, out, max_train_steps=1, checkpointing_steps=100, validation_steps=100)
                     + ["--no-save_remote_code"])
    assert not list(out.rglob("*.py"))
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "SiTPipeline"
    assert json.loads((out / "args.json").read_text())["save_remote_code"] is False
    assert type(SiTPipeline.from_pretrained(out).transformer).__name__ == "SiTTransformer2DModel"


def test_model_card_templates_ship_inside_the_package():
    import diffusers_selftrans

    package_dir = Path(diffusers_selftrans.__file__).parent
    for name in ("stage1.md", "stage2.md"):
        assert hub.read_model_card_template(name) == (package_dir / "model_cards" / name).read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"stage3\.md.*available: \['stage1\.md', 'stage2\.md', 't2i\.md'\]"):
        hub.read_model_card_template("stage3.md")


def test_config_file_sets_defaults_and_rejects_unknown_keys(assets, tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text("learning_rate: 0.0003\nalignment: layersync\nmax_train_steps: 7\n")
    args = train_align.parse_args(["--config", str(good), "--max_train_steps", "9"])
    assert args.learning_rate == 3e-4 and args.alignment == "layersync" and args.max_train_steps == 9
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 1e-4, "learning_rat": 1e-3}))
    with pytest.raises(ValueError, match="learning_rat"):
        train_align.parse_args(["--config", str(bad)])


@pytest.mark.parametrize("alignment", ["none", "layersync", "dispersive", "sra"])
def test_baselines_train(assets, tmp_path, alignment):
    out = tmp_path / alignment
    train_align.main(flags(assets, out, alignment=alignment, max_train_steps=2, checkpointing_steps=100,
                           validation_steps=100))
    losses = read_losses(out)
    assert sorted(losses) == [1, 2]
    if alignment != "none":
        assert f"loss_{alignment}" in losses[2]


def test_nonfinite_steps_are_skipped_then_stop_the_run(assets, tmp_path, monkeypatch):
    from diffusers_selftrans.transport import Transport

    original = Transport.sample
    calls = {"n": 0}

    def poisoned(self, x0, generator=None):
        calls["n"] += 1
        t, noise, x_t, target = original(self, x0, generator)
        if calls["n"] in poison:
            x_t = x_t * float("nan")
        return t, noise, x_t, target

    monkeypatch.setattr(Transport, "sample", poisoned)
    poison = {2}
    out = tmp_path / "nan_once"
    train_align.main(flags(assets, out, max_train_steps=3, checkpointing_steps=100, validation_steps=100,
                           logging_steps=1))
    losses = read_losses(out)
    assert sorted(losses) == [1, 2, 3]  # the poisoned micro-step was skipped, training went on
    assert losses[3]["nonfinite_skipped"] == 1
    calls["n"] = 0
    poison = {3, 4, 5}
    with pytest.raises(RuntimeError, match="Last good checkpoint: .*checkpoint-2"):
        train_align.main(flags(assets, tmp_path / "nan_stop", max_train_steps=6, checkpointing_steps=2,
                               validation_steps=100, max_nonfinite_steps=3))


def test_generic_flags_map_to_each_methods_options():
    args = train_align.parse_args(["--no_t_range", "--align_layer", "3", "--align_target_layer", "4"])
    assert train_align.alignment_options(args, "vae_align") == {
        "layer": 3, "align_target": "velocity", "t_range_mode": "code_compat", "t_range": None}
    assert train_align.alignment_options(args, "layersync") == {"weak_layer": 3, "target_layer": 4}
    sra = train_align.alignment_options(args, "sra")
    assert sra["student_layer"] == 3 and sra["teacher_layer"] == 4 and sra["t_max"] == 0.2 and "t_range" not in sra
    args = train_align.parse_args([])
    assert train_align.alignment_options(args, "vae_align")["t_range"] == (0.4, 0.7)


def test_rewind_loss_log_drops_steps_after_the_checkpoint_and_returns_the_clock(tmp_path):
    log = tmp_path / "loss_log.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "train_seconds": 0.5 * s} for s in range(1, 6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # killed mid-write
    assert C.rewind_loss_log(log, 3) == 1.5
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert C.rewind_loss_log(log, 0) == 0.0 and log.read_text() == ""  # a fresh run starts an empty log
    assert C.rewind_loss_log(tmp_path / "missing.jsonl", 7) == 0.0

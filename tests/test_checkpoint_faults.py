"""Checkpoints and resume that fail loudly and lose nothing (issue 14, items 2, 3, 4, 5, 10): changed flags on
resume, damaged checkpoints, the loss-explosion guard and the last good checkpoint, a full disk, and exact resume for
every alignment method."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import assets, flags, read_losses, resolve, train_align, train_self_transcendence  # noqa: F401

from diffusers_selftrans import checkpointing as C
from diffusers_selftrans import training as T

# Every run here is tiny: 2 steps, a checkpoint after each, no sample grids in between.
FAST = {"max_train_steps": 2, "checkpointing_steps": 1, "validation_steps": 100}


@pytest.fixture(scope="module")
def two_checkpoints(assets):  # noqa: F811
    """A finished 2-step vae_align run with checkpoint-1 and checkpoint-2 (copy it before damaging it)."""
    out = assets / "faults_base"
    train_align.main(flags(assets, out, **FAST))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------------
# 2. Resume with changed flags


def test_resume_applies_new_learning_rate_and_ema_decay_and_records_the_history(
        assets, two_checkpoints, tmp_path):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-2")
    train_align.main(flags(assets, out, **FAST, resume_from_checkpoint="latest", learning_rate=3e-4, ema_decay=0.5))

    optimizer = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=False)
    assert {g["lr"] for g in optimizer["param_groups"]} == {3e-4}
    ema_config = json.loads((out / "checkpoint-2" / "transformer_ema" / "config.json").read_text())
    assert ema_config["decay"] == 0.5 and ema_config["min_decay"] == 0.5
    # the run's folder moved too (copied): recorded, and allowed
    history = [{"step": 1, "changed": {"ema_decay": [0.9999, 0.5], "learning_rate": [1e-4, 3e-4],
                                       "output_dir": [str(two_checkpoints), str(out)]}}]
    assert json.loads((out / "args.json").read_text())["resume_history"] == history
    assert json.loads((out / "checkpoint-2" / "args.json").read_text())["resume_history"] == history
    assert "resume_history" in (out / "README.md").read_text() and "learning_rate" in (out / "README.md").read_text()


@pytest.mark.parametrize("flag, old, new", [("seed", 0, 1), ("align_layer", None, 1), ("train_batch_size", 4, 2)])
def test_resume_refuses_changes_that_cannot_take_effect(assets, two_checkpoints, tmp_path, flag, old, new):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path / "run")
    with pytest.raises(ValueError, match=rf"--{flag}: {old} in .*checkpoint-2.* now {new}"):
        train_align.main(flags(assets, out, **dict(FAST, max_train_steps=3), resume_from_checkpoint="latest",
                               **{flag: new}))


# ----------------------------------------------------------------------------------------------------------------------
# 3. Damaged checkpoints


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGES = {
    "truncated_weights": ("transformer/diffusion_pytorch_model.safetensors", truncate),
    "missing_ema": ("transformer_ema", shutil.rmtree),
    "missing_rng": ("random_states_0.pkl", Path.unlink),
    "truncated_rng": ("random_states_0.pkl", truncate),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_latest_skips_a_damaged_newest_checkpoint_and_an_explicit_one_is_an_error(
        assets, two_checkpoints, tmp_path, caplog, damage):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path / "run")
    relative, spoil = DAMAGES[damage]
    spoil(out / "checkpoint-2" / relative)
    with caplog.at_level(logging.WARNING):
        chosen = resolve(train_align.parse_args(flags(assets, out, resume_from_checkpoint="latest")))
    assert chosen.name == "checkpoint-1"
    assert "checkpoint-2" in caplog.text and relative.split("/")[0] in caplog.text
    explicit = train_align.parse_args(flags(assets, out, resume_from_checkpoint=str(out / "checkpoint-2")))
    with pytest.raises(ValueError, match=rf"checkpoint-2.*{relative.split('/')[0]}"):
        resolve(explicit)


def test_latest_resume_past_a_truncated_checkpoint_is_exact(assets, two_checkpoints, tmp_path):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path / "run")
    truncate(out / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    train_align.main(flags(assets, out, **FAST, resume_from_checkpoint="latest"))
    a, b = read_losses(two_checkpoints), read_losses(out)
    assert sorted(a) == sorted(b) == [1, 2]
    assert all(a[s][k] == b[s][k] for s in a for k in a[s] if k.startswith("loss")), (a, b)
    a = load_file(two_checkpoints / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inexact_resume_needs_the_flag_and_checkpoints_without_manifest_are_refused(
        assets, two_checkpoints, tmp_path, caplog):  # noqa: F811
    out = copy_run(two_checkpoints, tmp_path / "run")
    (out / "checkpoint-2" / "random_states_0.pkl").unlink()
    (out / "checkpoint-1" / "manifest.json").unlink()  # as written by an older version
    with pytest.raises(ValueError, match=r"checkpoint-1.*manifest\.json.*--allow_inexact_resume"):
        resolve(train_align.parse_args(flags(assets, out, resume_from_checkpoint="latest")))
    with caplog.at_level(logging.WARNING):
        chosen = resolve(train_align.parse_args(
            flags(assets, out, resume_from_checkpoint="latest", allow_inexact_resume=True)))
    assert chosen.name == "checkpoint-2" and "NOT exact" in caplog.text and "random_states_0.pkl" in caplog.text
    # damaged weights stay an error even with the flag
    truncate(out / "checkpoint-2" / "projector" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"projector"):
        resolve(train_align.parse_args(
            flags(assets, out, resume_from_checkpoint=str(out / "checkpoint-2"), allow_inexact_resume=True)))


# ----------------------------------------------------------------------------------------------------------------------
# 4. Non-finite and exploding losses, and the last good checkpoint


class OneProcess:
    """The part of `Accelerator` the guard uses, for a single process."""

    def gather(self, tensor):
        return tensor


def test_guard_counts_exploding_finite_losses_as_bad_and_names_a_healthy_checkpoint():
    guard = T.NonFiniteGuard(OneProcess(), max_consecutive=2, explosion_factor=10.0)
    assert all(guard.check(torch.tensor(v)) for v in (2.0, 1.5, 1.2))
    guard.checkpoint_saved(Path("checkpoint-3"))
    assert guard.check(torch.tensor(1.0))
    assert not guard.check(torch.tensor(2.6e18))  # finite, but far above the running mean: skipped
    assert guard.check(torch.tensor(1.1))
    guard.checkpoint_saved(Path("checkpoint-5"))  # a bad step since the last save: not a healthy checkpoint
    with pytest.raises(RuntimeError, match="Last good checkpoint: checkpoint-3"):
        guard.check(torch.tensor(float("nan")))
        guard.check(torch.tensor(50.0))
    disabled = T.NonFiniteGuard(OneProcess(), max_consecutive=2, explosion_factor=None)
    assert disabled.check(torch.tensor(1.0)) and disabled.check(torch.tensor(1e6))


def test_guard_state_round_trips():
    guard = T.NonFiniteGuard(OneProcess(), max_consecutive=3, explosion_factor=10.0)
    for v in (1.0, float("inf"), 2.0):
        guard.check(torch.tensor(v))
    other = T.NonFiniteGuard(OneProcess(), max_consecutive=3, explosion_factor=10.0)
    other.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert other.state_dict() == guard.state_dict() and other.skipped == 1


def test_run_stops_naming_the_checkpoint_saved_before_the_trouble(assets, tmp_path, monkeypatch):  # noqa: F811
    from diffusers_selftrans.transport import Transport

    original, calls = Transport.sample, {"n": 0}

    def poisoned(self, x0, generator=None):
        calls["n"] += 1
        t, noise, x_t, target = original(self, x0, generator)
        return t, noise, (x_t * float("nan") if calls["n"] in (2, 4, 5) else x_t), target

    monkeypatch.setattr(Transport, "sample", poisoned)
    # call 1 -> checkpoint-1 (healthy); call 2 skipped; call 3 -> checkpoint-2 (saved after a bad step); 4, 5 stop
    with pytest.raises(RuntimeError, match=r"Last good checkpoint: .*checkpoint-1$"):
        train_align.main(flags(assets, tmp_path / "out", max_train_steps=6, checkpointing_steps=1,
                               validation_steps=100, max_nonfinite_steps=2))
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


# ----------------------------------------------------------------------------------------------------------------------
# 5. A full disk during a checkpoint write


def test_full_disk_removes_the_partial_checkpoint_and_says_how_to_resume(assets, tmp_path, monkeypatch):  # noqa: F811
    import collections

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-2.tmp" in str(f):  # torch's writer on a full disk: a partial file, then this error
            Path(f).write_bytes(b"\0" * 10)
            raise RuntimeError("basic_ios::clear: iostream error")
        return real_save(obj, f, *args, **kwargs)

    usage, real_usage = collections.namedtuple("usage", "total used free"), shutil.disk_usage
    out = tmp_path / "out"
    monkeypatch.setattr(torch, "save", save)
    # only the run's folder is full (`datasets` checks the free space of its cache too)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: usage(10**9, 10**9, 0) if str(out) in str(path) else real_usage(path))
    with pytest.raises(C.CheckpointWriteError, match=r"(?s)full.*checkpoint-1.*--resume_from_checkpoint latest"):
        train_align.main(flags(assets, out, **FAST))
    assert not (out / "checkpoint-2.tmp").exists() and not (out / "checkpoint-2").exists()
    assert C.checkpoint_problems(out / "checkpoint-1") == []


# ----------------------------------------------------------------------------------------------------------------------
# 10. Exact resume for every alignment method


@pytest.fixture(scope="module")
def tiny_dinov2(assets):  # noqa: F811
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = assets / "tiny-dinov2"
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             patch_size=2, image_size=8)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def guiding_model(assets):  # noqa: F811
    out = assets / "faults_guide"
    train_align.main(flags(assets, out, max_train_steps=1, checkpointing_steps=100, validation_steps=100))
    return out


METHODS = ["none", "vae_align", "self_transcendence", "repa", "sra", "layersync", "dispersive"]


@pytest.mark.parametrize("method", METHODS)
def test_exact_resume_for_every_alignment_method(assets, tmp_path, method, request):  # noqa: F811
    if method == "self_transcendence":
        guide = request.getfixturevalue("guiding_model")
        script, extra = train_self_transcendence, {"guiding_model_name_or_path": guide, "no_t_range": True,
                                                   "guide_stop_step": 10}  # the guide is on at the resumed step
    elif method == "repa":
        script, extra = train_align, {"alignment": method, "repa_encoder": request.getfixturevalue("tiny_dinov2")}
    else:
        script, extra = train_align, {"alignment": method, "no_t_range": method == "vae_align"}
    straight = tmp_path / "straight"
    script.main(flags(assets, straight, **FAST, **extra))
    split = tmp_path / "split"
    split.mkdir()
    shutil.copytree(straight / "checkpoint-1", split / "checkpoint-1")  # "preempted" after its first checkpoint
    script.main(flags(assets, split, **FAST, **extra, resume_from_checkpoint="latest"))

    a, b = read_losses(straight), read_losses(split)
    assert sorted(b) == [2]
    assert {k: v for k, v in a[2].items() if k.startswith("loss")} == \
        {k: v for k, v in b[2].items() if k.startswith("loss")}
    assert method == "none" or f"loss_{'guide' if method == 'self_transcendence' else method}" in a[2]
    # every weight file: the SiT, its EMA, and the heads (`projector/`, or accelerate's `model_N.safetensors`)
    files = sorted(p.relative_to(straight).as_posix() for p in (straight / "checkpoint-2").rglob("*.safetensors"))
    assert len(files) == (2 if method in ("none", "dispersive", "layersync") else 3), files  # layersync: no head
    for name in files:
        wa, wb = load_file(straight / name), load_file(split / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name

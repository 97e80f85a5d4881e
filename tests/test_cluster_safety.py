"""Cluster-safe runs (issue 25): one run per output folder, nothing lost on preemption, and every reused artifact
checked against what made it. Each case of the issue's fault battery is reproduced here on tiny runs (the text-to-image
cases are in test_train_t2i.py, the sample folder in test_evaluation.py)."""

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import ROOT, assets, flags, read_losses, stage1, train_align, train_self_transcendence  # noqa: F401

from diffusers_selftrans import checkpointing as C
from diffusers_selftrans import runs as R
from diffusers_selftrans.provenance import ProvenanceError, vae_encoder_identity

FAST = {"max_train_steps": 2, "checkpointing_steps": 1, "validation_steps": 100}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------------------------------
# 1. One run per folder: the lock


def write_lock(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": "other", "started": "then", **holder}
    (folder / R.LOCK_NAME).write_text(json.dumps(record))
    return folder / R.LOCK_NAME


def test_a_live_run_holds_its_folder_and_a_second_run_refuses_naming_it(assets, tmp_path):  # noqa: F811
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        write_lock(out, pid=live.pid, run_id="abc123")
        with pytest.raises(R.OutputDirInUse, match=rf"in use by run abc123 \(host {socket.gethostname()}, "
                                                   rf"pid {live.pid}.*--break_run_lock"):
            train_align.main(flags(assets, out, **FAST))
        assert R.run_outputs(out) == []  # it wrote nothing
    finally:
        live.kill()
        live.wait()


def test_a_dead_runs_lock_is_taken_over_and_released_at_the_end(assets, tmp_path, caplog):  # noqa: F811
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    write_lock(out, pid=dead.pid)
    with caplog.at_level(logging.WARNING):
        train_align.main(flags(assets, out, **FAST))
    assert f"its process {dead.pid} is gone" in caplog.text
    assert not (out / R.LOCK_NAME).exists() and (out / "model_index.json").is_file()
    run_id = json.loads((out / "args.json").read_text())["run_id"]
    assert len(run_id) == 12 and json.loads((out / "checkpoint-2" / "args.json").read_text())["run_id"] == run_id


def test_another_hosts_lock_needs_break_run_lock(tmp_path, caplog):
    lock = write_lock(tmp_path, host="some-other-node", pid=1)
    with pytest.raises(R.OutputDirInUse, match="some-other-node"):
        R.RunLock(tmp_path, "mine").acquire()
    with caplog.at_level(logging.WARNING):
        mine = R.RunLock(tmp_path, "mine").acquire(break_lock=True)
    assert "--break_run_lock was passed" in caplog.text
    assert json.loads(lock.read_text())["run_id"] == "mine"
    mine.release()
    assert not lock.exists()


def _take(folder, run_id, results, done):
    try:
        R.RunLock(folder, run_id).acquire()
        results.put(run_id)
    except R.OutputDirInUse:
        results.put(None)
    done.wait(30)  # a run lives on while the others try (a dead holder's lock may be taken over)


def test_of_runs_that_start_together_exactly_one_gets_the_folder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    results, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_take, args=(tmp_path, f"run{i}", results, done)) for i in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    done.set()
    for p in procs:
        p.join(30)
    winners = [r for r in outcomes if r is not None]
    assert len(winners) == 1
    assert json.loads((tmp_path / R.LOCK_NAME).read_text())["run_id"] == winners[0]


# ----------------------------------------------------------------------------------------------------------------------
# 2. A fresh run in a folder that holds another run


@pytest.fixture(scope="module")
def finished(assets):  # noqa: F811
    """A finished 2-step run with checkpoint-1 and checkpoint-2 (copy it before changing it)."""
    out = assets / "finished"
    train_align.main(flags(assets, out, **FAST))
    return out


def test_a_fresh_run_refuses_a_finished_runs_folder_and_overwrite_clears_it(assets, finished, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    model = out / "transformer" / "diffusion_pytorch_model.safetensors"
    before = model.read_bytes()
    with pytest.raises(R.OutputDirInUse, match=r"holds the outputs of another run \(README\.md, args\.json, checkpoint-1.*"
                                               r"--resume_from_checkpoint latest.*--overwrite_output_dir"):
        train_align.main(flags(assets, out, **dict(FAST, max_train_steps=1), seed=1))
    assert model.read_bytes() == before and len((out / "loss_log.jsonl").read_text().splitlines()) == 2

    train_align.main(flags(assets, out, max_train_steps=1, checkpointing_steps=1, validation_steps=100, seed=1,
                           checkpoints_total_limit=1, overwrite_output_dir=True))
    assert [p.name for p in C.list_checkpoints(out)] == ["checkpoint-1"]  # the old run's checkpoint-2 is gone
    assert sorted(read_losses(out)) == [1] and json.loads((out / "args.json").read_text())["seed"] == 1
    assert model.read_bytes() != before


def test_overwrite_never_clears_a_folder_that_is_not_a_run(assets, tmp_path):  # noqa: F811
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(R.OutputDirInUse, match=r"not a training run's \(notes\.txt.*Nothing was deleted"):
        train_align.main(flags(assets, out, **FAST, overwrite_output_dir=True))
    assert (out / "notes.txt").read_text() == "keep me"


def test_latest_without_a_checkpoint_restarts_an_unfinished_run_but_never_overwrites_a_model(
        assets, finished, tmp_path):  # noqa: F811
    early = tmp_path / "early"  # a requeued job preempted before its first checkpoint: nothing to lose
    early.mkdir()
    shutil.copy(finished / "args.json", early / "args.json")
    (early / "loss_log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    train_align.main(flags(assets, early, **FAST, resume_from_checkpoint="latest"))
    assert sorted(read_losses(early)) == [1, 2] and read_losses(early)[1]["loss"] != 9.0
    assert json.loads((early / "args.json").read_text())["run_id"] == json.loads(
        (finished / "args.json").read_text())["run_id"]  # the same run, started again

    done = tmp_path / "done"  # a finished run whose checkpoints were pruned away: its model stays
    shutil.copytree(finished, done)
    for ckpt in C.list_checkpoints(done):
        shutil.rmtree(ckpt)
    with pytest.raises(R.OutputDirInUse, match="model_index.json"):
        train_align.main(flags(assets, done, **FAST, resume_from_checkpoint="latest"))


# ----------------------------------------------------------------------------------------------------------------------
# 3. Preemption: finish the step, checkpoint, exit non-zero; the resume is exact


def signal_at_call(monkeypatch, signum, call):
    """Send `signum` to this process during the `call`-th training step (its time draw), as a scheduler would."""
    from diffusers_selftrans.transport import Transport

    original, calls = Transport.sample, {"n": 0}

    def sample(self, x0, generator=None):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return original(self, x0, generator)

    monkeypatch.setattr(Transport, "sample", sample)


@pytest.fixture(scope="module")
def straight_4(assets):  # noqa: F811
    out = assets / "straight_4"
    train_align.main(flags(assets, out, max_train_steps=4, checkpointing_steps=100, validation_steps=100))
    return out


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_signal_checkpoints_the_current_step_exits_nonzero_and_the_resume_is_exact(
        assets, straight_4, tmp_path, monkeypatch, caplog, signame):  # noqa: F811
    signum = getattr(signal, signame)
    handler = signal.getsignal(signum)
    out = tmp_path / "run"
    run = flags(assets, out, max_train_steps=4, checkpointing_steps=100, validation_steps=100)
    signal_at_call(monkeypatch, signum, 3)
    with caplog.at_level(logging.WARNING), pytest.raises(R.Preempted) as preempted:
        train_align.main(run)
    assert preempted.value.code == 128 + signum
    assert "Preempted at step 3" in caplog.text and signame in caplog.text
    assert [p.name for p in C.list_checkpoints(out)] == ["checkpoint-3"] and C.checkpoint_problems(out / "checkpoint-3") == []
    assert not (out / R.LOCK_NAME).exists() and not (out / "model_index.json").exists()
    assert signal.getsignal(signum) == handler  # the run's handlers are gone

    monkeypatch.undo()
    train_align.main(run + ["--resume_from_checkpoint", "latest"])
    a, b = read_losses(straight_4), read_losses(out)
    assert sorted(b) == [1, 2, 3, 4]
    assert all(a[s][k] == b[s][k] for s in a for k in a[s] if k.startswith("loss")), (a, b)
    assert same_weights(straight_4 / "transformer" / "diffusion_pytorch_model.safetensors",
                        out / "transformer" / "diffusion_pytorch_model.safetensors")


PREEMPT_WRAPPER = Path(__file__).with_name("preempt_run.py")


def launch_two(script, argv, port, env_extra=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           *script, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", **(env_extra or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_stop_after_the_same_step_when_one_is_signalled_and_resume_exactly(assets, stage1, tmp_path):  # noqa: F811
    """Stage 2 under DDP: only rank 1 gets SIGTERM (at step 2); rank 0 learns of it through the step's collective."""
    script = str(ROOT / "examples" / "train_self_transcendence.py")

    def argv(out):
        return flags(assets, out, guiding_model_name_or_path=stage1, guide_stop_step=3, max_train_steps=3,
                     train_batch_size=2, checkpointing_steps=100, validation_steps=100, no_t_range=True)

    straight = launch_two([script], argv(tmp_path / "straight"), 29581)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "split"
    preempted = launch_two([str(PREEMPT_WRAPPER), script], argv(out), 29582,
                           {"PREEMPT_SIGNAL": "SIGTERM", "PREEMPT_AT_CALL": "2", "PREEMPT_RANK": "1"})
    assert preempted.returncode != 0 and "Preempted at step 2" in preempted.stderr, preempted.stderr[-3000:]
    assert [p.name for p in C.list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file() and not (out / "model_index.json").exists()
    resumed = launch_two([script], argv(out) + ["--resume_from_checkpoint", "latest"], 29583)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_losses(tmp_path / "straight"), read_losses(out)
    assert sorted(b) == [1, 2, 3] and "loss_guide" in b[3]
    assert all(a[s][k] == b[s][k] for s in a for k in a[s] if k.startswith("loss")), (a, b)
    assert same_weights(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors",
                        out / "transformer" / "diffusion_pytorch_model.safetensors")


def test_sigterm_to_the_launcher_reaches_every_worker_and_they_checkpoint_the_same_step(assets, tmp_path):  # noqa: F811
    """What Slurm and Kubernetes do: SIGTERM to the launcher (torchrun under `accelerate launch`), which forwards it
    to its workers (and kills them 30 s later)."""
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29584",
           str(ROOT / "examples" / "train_align.py"),
           *flags(assets, out, max_train_steps=10_000, train_batch_size=2, checkpointing_steps=10_000,
                  validation_steps=10_000)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not ((out / "loss_log.jsonl").is_file() and (out / "loss_log.jsonl").read_text().count("\n") >= 2):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    checkpoints = C.list_checkpoints(out)
    assert len(checkpoints) == 1 and C.checkpoint_problems(checkpoints[0], num_processes=2) == [], stderr[-3000:]
    step = C.checkpoint_step(checkpoints[0])
    assert stderr.count(f"Preempted at step {step}") == 2  # both workers stopped after the same step
    assert max(read_losses(out)) == step and not (out / R.LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------------------------------
# 4, 5. Resume after the data changed


def run_on_copied_data(assets, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(assets / "data", data)
    out = tmp_path / "run"
    train_align.main(flags(assets, out, **FAST, train_data_dir=data, cache_dir=tmp_path / "cache"))
    shutil.rmtree(out / "checkpoint-2")
    return data, out


def resume(assets, out, data, tmp_path, **extra):  # noqa: F811
    train_align.main(flags(assets, out, **FAST, train_data_dir=data, cache_dir=tmp_path / "cache2",
                           resume_from_checkpoint="latest", **extra))


def test_resume_refuses_renamed_or_added_classes(assets, tmp_path):  # noqa: F811
    data, out = run_on_copied_data(assets, tmp_path)
    (data / "class0").rename(data / "class9")  # the same count: every label would silently shift
    with pytest.raises(ProvenanceError, match=r"checkpoint-1.*class_names: \['class0', 'class1', 'class2'\] \(there\) "
                                              r"vs \['class1', 'class2', 'class9'\] \(this run\)"):
        resume(assets, out, data, tmp_path)
    shutil.copytree(data / "class1", data / "class0")  # a class added: named, not a raw size mismatch
    with pytest.raises(ProvenanceError, match=r"num_classes: 3 \(there\) vs 4 \(this run\)"):
        resume(assets, out, data, tmp_path)


def test_resume_names_a_changed_dataset_size_and_accepts_it_only_as_inexact(assets, tmp_path, caplog):  # noqa: F811
    data, out = run_on_copied_data(assets, tmp_path)
    (data / "class0" / "0.png").unlink()
    with pytest.raises(ProvenanceError, match=r"dataset_size: 24 \(there\) vs 23 \(this run\).*--allow_inexact_resume"):
        resume(assets, out, data, tmp_path)
    with caplog.at_level(logging.WARNING):
        resume(assets, out, data, tmp_path, allow_inexact_resume=True)
    assert "dataset_size: 24 (there) vs 23 (this run)" in caplog.text and sorted(read_losses(out)) == [1, 2]


def test_another_process_count_is_named_not_reported_as_damage(finished):
    ckpt = finished / "checkpoint-2"
    assert C.resolve_resume_checkpoint("latest", finished, num_processes=2) == ckpt  # not "random_states_1 missing"
    provenance = dict(json.loads((ckpt / "provenance.json").read_text()), num_processes=2)
    with pytest.raises(ProvenanceError, match=r"num_processes: 1 \(there\) vs 2 \(this run\).*--allow_inexact_resume"):
        C.check_checkpoint_provenance(ckpt, provenance)
    C.check_checkpoint_provenance(ckpt, provenance, allow_inexact=True)


# ----------------------------------------------------------------------------------------------------------------------
# 6. Stage 2 with another VAE than the guiding model's


def save_vae_variant(assets, folder, part):  # noqa: F811
    """The run's VAE with its `part` ("encoder" or "decoder") weights changed."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(assets / "vae")
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.startswith(part):
                p.add_(0.01)
    vae.save_pretrained(folder)
    return folder


def test_stage2_refuses_a_vae_whose_encoder_differs_from_the_guiding_models(assets, stage1, tmp_path, caplog):  # noqa: F811
    other = save_vae_variant(assets, tmp_path / "other_vae", "encoder")
    run = dict(guiding_model_name_or_path=stage1, max_train_steps=1, validation_steps=100, vae_name_or_path=other)
    with pytest.raises(ProvenanceError, match=r"guiding model .*stage1.*vae_encoder.*encoder_digest.*"
                                              r"--allow_guiding_vae_mismatch"):
        train_self_transcendence.main(flags(assets, tmp_path / "refused", **run))
    assert not (tmp_path / "refused" / "args.json").exists()
    with caplog.at_level(logging.WARNING):
        train_self_transcendence.main(flags(assets, tmp_path / "forced", **run, allow_guiding_vae_mismatch=True))
    assert "--allow_guiding_vae_mismatch" in caplog.text
    # a decoder-only fine-tune (SD's ft-mse / ft-ema) encodes the same latents: accepted
    decoder = save_vae_variant(assets, tmp_path / "decoder_vae", "decoder")
    train_self_transcendence.main(flags(assets, tmp_path / "ok", **dict(run, vae_name_or_path=decoder)))
    assert (tmp_path / "ok" / "model_index.json").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# 7. Pre-encoded latents: another VAE, a truncated shard, a NaN row


@pytest.fixture(scope="module")
def latents(assets):  # noqa: F811
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_latents", ROOT / "examples" / "preprocess_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = assets / "latents"
    script.main(script.parse_args(["--train_data_dir", str(assets / "data"), "--cache_dir", str(assets / "hf_cache"),
                                   "--resolution", "16", "--vae_name_or_path", str(assets / "vae"), "--output_dir",
                                   str(out), "--shard_size", "8", "--num_sanity_images", "1"]))
    stats = json.loads((out / "stats.json").read_text())
    from diffusers import AutoencoderKL

    assert stats["vae_encoder"] == vae_encoder_identity(AutoencoderKL.from_pretrained(assets / "vae"))
    return out


def latent_flags(assets, out, latents_dir, **extra):  # noqa: F811
    return flags(assets, out, **dict(FAST, **extra), train_data_dir=None, latents_dir=latents_dir)


def test_latents_of_another_vae_are_refused(assets, latents, tmp_path):  # noqa: F811
    other = save_vae_variant(assets, tmp_path / "other_vae", "encoder")
    with pytest.raises(ProvenanceError, match=r"latents.*vae_encoder.*preprocess_latents"):
        train_align.main(latent_flags(assets, tmp_path / "run", latents, vae_name_or_path=other))


def test_a_truncated_shard_is_named(assets, latents, tmp_path):  # noqa: F811
    damaged = tmp_path / "latents"
    shutil.copytree(latents, damaged)
    shard = sorted(damaged.glob("latents-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"Latent shard {shard} is unreadable.*re-run examples/preprocess_latents"):
        train_align.main(latent_flags(assets, tmp_path / "run", damaged))


def test_a_nan_row_is_skipped_naming_its_shard(assets, latents, tmp_path, caplog):  # noqa: F811
    from safetensors.torch import save_file

    from diffusers_selftrans.data import read_latent_shard_metadata

    damaged = tmp_path / "latents"
    shutil.copytree(latents, damaged)
    shard = sorted(damaged.glob("latents-*.safetensors"))[0]
    tensors, metadata = load_file(shard), read_latent_shard_metadata(str(shard))
    tensors["latent_mean"][5, 0, 0, 0] = float("nan")
    save_file(tensors, str(shard), metadata=metadata)
    with caplog.at_level(logging.WARNING):
        train_align.main(latent_flags(assets, tmp_path / "run", damaged, max_train_steps=6, max_skip_fraction=0.5))
    assert f"row 5 of {shard}" in caplog.text and "non-finite latent_mean" in caplog.text
    assert all(r["nonfinite_skipped"] == 0 for r in read_losses(tmp_path / "run").values())  # not a NaN loss


def test_the_lock_and_the_text_cache_are_never_pushed(tmp_path):
    import fnmatch

    from diffusers_selftrans import hub

    names = [R.LOCK_NAME, f"{R.LOCK_NAME}.stale-host-1", "text_embeddings/0a1b.safetensors",
             "text_embeddings/provenance.json", "checkpoint-4/optimizer.bin"]
    assert all(any(fnmatch.fnmatch(n, p) for p in hub.HUB_IGNORE_PATTERNS) for n in names)
    assert not any(fnmatch.fnmatch("model_index.json", p) for p in hub.HUB_IGNORE_PATTERNS)

"""Smoke test of benchmarks/memory_table.py: one tiny in-process run into tmp_path, then checks on what it measured
and wrote (batch linearity, checkpointing, the teacher's weights, the model-state arithmetic, no absolute paths)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "memory_table.py"
STAGES = ("stage1_vae_align", "stage2_guided", "stage2_after_stop")


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "benchmark_memory_table")


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_table")
    threads = torch.get_num_threads()
    returned = bench.main(["--smoke", "--output_dir", str(out)])
    assert torch.get_num_threads() == threads  # main() restores the caller's thread count
    return out, returned, json.loads((out / "results.json").read_text())


def rows_by(data, **match):
    return [r for r in data["rows"] if all(r[k] == v for k, v in match.items())]


def test_files_and_no_absolute_paths(smoke):
    out, returned, data = smoke
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert returned["rows"] == data["rows"]
    assert data["command"] == "python benchmarks/memory_table.py --smoke --output_dir '<output_dir>'"
    for name in ("results.json", "results.md"):
        text = (out / name).read_text()
        for path in {str(out), str(out.parent), str(REPO), os.getcwd(), os.path.expanduser("~"), "/tmp/", "/work/"}:
            assert path not in text, f"{name} contains the absolute path {path}"
    md = (out / "results.md").read_text()
    assert "| tiny | stage 2, guided | no |" in md and "## Model states: the arithmetic" in md
    assert len(data["rows"]) == len(STAGES) * 2 * 2  # stages x precisions x checkpointing


def test_activations_scale_with_the_batch(smoke):
    _, _, data = smoke
    fp32 = [c for c in data["checks"]["batch_linearity"] if c["precision"] == "fp32"]
    assert len(fp32) == 8  # 2 checkpointing x (3 stages at 1 block + the after-stop probe at 2 blocks)
    for check in fp32:
        assert check["expected_if_proportional"] == 2.0
        assert abs(check["ratio"] - 2.0) <= 0.2, check  # 2x the batch -> 2x the bytes, within 10 %
    # bf16: the batch-independent part is autocast's bf16 copies of the matmul weights (2 bytes each).
    for row in rows_by(data, precision="bf16", gradient_checkpointing=False):
        act = row["activations"]
        assert act["per_sample_bytes"] > 0
        assert act["batch_independent_bytes"] == pytest.approx(act["bf16_weight_copies_expected_bytes"], rel=0.25)
    # The row's activations are the largest phase, evaluated at the table's batch.
    for row in data["rows"]:
        act = row["activations"]
        assert act["bytes"] == max(p["bytes"] for p in act["phases"].values())
        assert act["bytes"] == pytest.approx(act["batch_independent_bytes"] + 32 * act["per_sample_bytes"])


def test_checkpointing_lowers_activations(smoke):
    _, _, data = smoke
    for precision in ("bf16", "fp32"):
        for stage in STAGES:
            (plain,) = rows_by(data, precision=precision, stage=stage, gradient_checkpointing=False)
            (ckpt,) = rows_by(data, precision=precision, stage=stage, gradient_checkpointing=True)
            assert ckpt["bytes"]["activations"] < plain["bytes"]["activations"]
            per_block = "per_block_per_sample_bytes"
            assert ckpt["activations"][per_block] < plain["activations"][per_block]
            assert ckpt["bytes"]["peak"] < plain["bytes"]["peak"]


def test_teacher_weights_only_while_guided(smoke):
    _, _, data = smoke
    teacher_params = data["param_counts"]["tiny"]["teacher"]
    assert teacher_params == data["param_counts"]["tiny"]["student"]  # same architecture
    for row in data["rows"]:
        expected = 4 * teacher_params if row["stage"] == "stage2_guided" else 0
        assert row["bytes"]["teacher_weights"] == expected
        assert ("teacher_transient" in row["activations"]) == (row["stage"] == "stage2_guided")
    for precision, by_ckpt in data["probes"]["tiny"].items():
        for per_stage in by_ckpt.values():
            for probe in per_stage["stage2_guided"].values():
                assert probe["teacher_forwards"] == 1 and probe["teacher_released"] is False
                assert probe["teacher_transient_bytes"] > 0
            for probe in per_stage["stage2_after_stop"].values():
                assert probe["teacher_forwards"] == 0 and probe["teacher_released"] is True
    (guided,) = rows_by(data, precision="fp32", stage="stage2_guided", gradient_checkpointing=False)
    (stopped,) = rows_by(data, precision="fp32", stage="stage2_after_stop", gradient_checkpointing=False)
    assert guided["bytes"]["peak"] > stopped["bytes"]["peak"] + 4 * teacher_params


def test_model_states_equal_the_arithmetic(smoke):
    _, _, data = smoke
    (check,) = data["checks"]["model_states"]
    assert check["equal"] is True and check["measured_bytes"] == check["arithmetic_bytes"]
    assert check["measured_bytes"]["adamw"] == 8 * check["trainable_params"]
    assert check["measured_bytes"]["ema"] == 4 * check["student_params"]
    counts = data["param_counts"]["tiny"]
    p = counts["student"]
    for row in data["rows"]:
        b = row["bytes"]
        head = counts["stage1_head" if row["stage"] == "stage1_vae_align" else "stage2_projector"]
        assert (b["weights"], b["gradients"], b["adamw"], b["ema"]) == (4 * p, 4 * p, 8 * p, 4 * p)
        assert b["projector"] == (12 if row["stage"] == "stage2_after_stop" else 16) * head
        assert b["ddp_buckets"] == 4 * (p + head)  # 8 GPUs by default
        states = sum(b[k] for k in ("weights", "gradients", "adamw", "ema", "teacher_weights", "projector",
                                    "ddp_buckets"))
        assert b["peak"] == pytest.approx(states + max(b["activations"], b["optimizer_step_transient"]))
        assert math.isclose(row["gib"]["peak"], b["peak"] / 2**30)


def test_depth_extrapolation_matches_a_full_depth_step(smoke):
    _, _, data = smoke
    checks = data["checks"]["depth_extrapolation"]
    assert len(checks) == 4 and {c["depth"] for c in checks} == {3}
    for check in checks:
        assert abs(check["relative_error"]) < 0.05, check


def test_tracker_counts_allocations_not_views(bench):
    tracker = bench.LiveStorageTracker()
    with tracker:
        tracker.mark("a")
        x = torch.ones(1000)  # 4000 bytes
        view = x[10:]  # no new storage
        y = x * 2  # 4000 bytes, freed below
        x.add_(1)  # in place: nothing new
        del y
        tracker.mark("b")
    curve = tracker.live_curve(set(), "a", "b")
    assert (curve["peak"], curve["end"]) == (8000, 4000)
    assert tracker.key_of(view) == tracker.key_of(x) is not None


def test_bad_flags(bench):
    with pytest.raises(ValueError, match="--batch"):
        bench.main(["--smoke", "--batch", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--presets", "SiT-S/2"])

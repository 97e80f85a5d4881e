"""Smoke test of benchmarks/teacher_precision.py: one tiny in-process run, then checks on what it measured and wrote."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "teacher_precision.py"
W_KEYS = {"1.0", "5.0", "30.0"}


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "benchmark_teacher_precision")


@pytest.fixture(scope="module")
def smoke_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_precision")
    threads = torch.get_num_threads()
    returned = bench.main(["--smoke", "--output_dir", str(out)])
    assert torch.get_num_threads() == threads  # main() restores the caller's thread count
    return out, returned, json.loads((out / "results.json").read_text())


def test_files_and_rows(bench, smoke_run):
    out, returned, data = smoke_run
    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    assert data["command"] == "python benchmarks/teacher_precision.py --smoke --output_dir OUTPUT_DIR"
    assert data["torch"] == torch.__version__ and data["device"] == "cpu" and data["smoke"] is True
    assert {float(w) for w in W_KEYS} == set(data["guidance_scales"])
    measured = [r for r in data["teachers"] if r["comparison"] is not None]
    assert [(r["label"], r["weights"]) for r in measured] == [
        ("tiny", "trained"), ("tiny", "random"), ("SiT-B/2 stand-in (smoke)", "random")]
    unavailable = [r for r in data["teachers"] if r["comparison"] is None]
    assert len(unavailable) == 1 and unavailable[0]["weights"] == "trained" and "random only" in unavailable[0]["note"]
    assert measured[0]["training"]["steps"] == bench.SMOKE_TRAIN_STEPS
    for row in measured:
        c = row["comparison"]
        assert set(c["precisions"]) == {"fp32_repeat", "bf16_autocast", "bf16_weights"}
        assert set(c["loss_fp32"]) == W_KEYS and all(v > 0 for v in c["loss_fp32"].values())
        assert c["feature_shape"] == [row["batch"], row["num_tokens"], row["hidden_size"]]
        for entry in c["precisions"].values():
            assert set(entry["per_w"]) == W_KEYS
    assert returned["teachers"][0]["comparison"]["norm_f_c"] == data["teachers"][0]["comparison"]["norm_f_c"]


def test_errors_are_real(smoke_run):
    _, _, data = smoke_run
    assert data["self_check_fp32_repeat_max_error"] == 0.0  # the fp32 pass is deterministic on a CPU
    for row in (r for r in data["teachers"] if r["comparison"] is not None):
        c = row["comparison"]
        assert all(v == 0.0 for k, v in c["precisions"]["fp32_repeat"].items() if k.startswith("rel_err"))
        assert c["contrast"] > 0  # f_c != f_u: the null class changes the features
        for precision in ("bf16_autocast", "bf16_weights"):
            entry = c["precisions"][precision]
            assert 0 < entry["rel_err_f_c"] < 0.1 and math.isfinite(entry["rel_err_f_c_minus_f_u"])
            for w, per in entry["per_w"].items():
                assert 0 < per["rel_err_f_g"] < 1 and math.isfinite(per["rel_err_loss"])
                assert 0 < per["rel_err_grad"] < 1
            # w = 1 is f_c itself: its f_g error is f_c's error
            assert math.isclose(entry["per_w"]["1.0"]["rel_err_f_g"], entry["rel_err_f_c"], rel_tol=1e-4)


def test_report_has_no_machine_paths(smoke_run):
    out, _, data = smoke_run
    markers = {str(out), str(ROOT), os.path.expanduser("~"), "/tmp/", "/work/", "/home/"} - {"", "/"}
    for name in ("results.json", "results.md"):
        text = (out / name).read_text()
        assert not [m for m in markers if m in text], name
    md = (out / "results.md").read_text()
    assert "| tiny | trained | fp32 weights + bf16 autocast |" in md and "random only" in md
    assert data["reading"] in md and "w = 30" in data["reading"]


def test_one_teacher_pass_per_precision(bench, tiny_sit):
    """Every w reuses the one pass; a second pass (different inputs) is counted, so the check can fail."""
    n, c, s = 3, tiny_sit.config.in_channels, tiny_sit.config.sample_size
    gen = torch.Generator().manual_seed(0)
    inputs = {"x_t": torch.randn(n, c, s, s, generator=gen), "t": torch.full((n,), 0.5),
              "labels": torch.tensor([1, 2, 3]),
              "student_features": torch.randn(n, (s // tiny_sit.config.patch_size) ** 2, 32, generator=gen)}
    method = bench.build_alignment("self_transcendence", tiny_sit.config, teacher=tiny_sit, projector_dim=16)
    result = bench.run_precision("fp32", tiny_sit, inputs, method.projector.state_dict(), 16, torch.device("cpu"))
    f_c, f_u = result["f_c"], result["f_u"]
    for w, per in result["per_w"].items():
        torch.testing.assert_close(per["f_g"], f_u + w * (f_c - f_u))
    guide = bench.OnePassGuide(method.guide)
    method._hold_frozen("guide", guide)
    method.guiding_features(inputs["x_t"], inputs["t"], inputs["labels"])
    method.guiding_features(inputs["x_t"], inputs["t"], inputs["labels"])
    assert guide.passes == 1
    method.guiding_features(inputs["x_t"] + 1, inputs["t"], inputs["labels"])
    assert guide.passes == 2

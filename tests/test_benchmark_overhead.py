"""Smoke test of benchmarks/overhead.py: one tiny in-process run, then checks on what it measured and wrote."""

import json
import math
from pathlib import Path

import pytest
import torch

from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
STEP_KINDS = ("vanilla", "st_guided", "st_after_stop", "stage1_vae_align")


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "benchmark_overhead")


@pytest.fixture(scope="module")
def smoke_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    threads = torch.get_num_threads()
    returned = bench.main(["--smoke", "--output_json", str(out)])
    assert torch.get_num_threads() == threads  # main() restores the caller's thread count
    return returned, json.loads(out.read_text())


def test_smoke_json_steps(bench, smoke_run):
    returned, data = smoke_run
    assert data["command"].endswith("--smoke --output_json " + data["command"].split()[-1])
    assert data["device"] == "cpu" and data["dtype"] == "fp32"
    assert (data["warmup"], data["repeats"]) == (bench.SMOKE_WARMUP, bench.SMOKE_REPEATS)
    assert data["model_config"]["num_layers"] == bench.SMOKE_CONFIG["num_layers"]
    steps = data["steps"]
    assert set(steps) == set(STEP_KINDS)
    vanilla = steps["vanilla"]["median_ms"]
    total_steps = data["warmup"] + data["repeats"]
    for kind in STEP_KINDS:
        entry = steps[kind]
        assert len(entry["times_ms"]) == data["repeats"]
        assert all(t > 0 for t in entry["times_ms"])
        assert entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
        assert math.isclose(entry["ratio_vs_vanilla"], entry["median_ms"] / vanilla, rel_tol=1e-12)
        assert math.isclose(entry["throughput_vs_vanilla"], vanilla / entry["median_ms"], rel_tol=1e-12)
        assert entry["steps_run"] == total_steps
    assert steps["vanilla"]["ratio_vs_vanilla"] == 1.0
    # The guided phase ran ONE batched teacher pass per step (warmups included); after the stop, none at all.
    assert steps["st_guided"]["teacher_forwards"] == total_steps
    assert steps["st_guided"]["teacher_released"] is False
    assert steps["st_after_stop"]["teacher_forwards"] == 0
    assert steps["st_after_stop"]["teacher_released"] is True
    assert steps["st_after_stop"]["trainable_alignment_params"] == 0  # the projector is frozen at the stop
    assert steps["st_guided"]["trainable_alignment_params"] > 0
    assert steps["vanilla"]["teacher_forwards"] is None and steps["stage1_vae_align"]["teacher_forwards"] is None
    assert returned["steps"]["st_guided"]["median_ms"] == steps["st_guided"]["median_ms"]


def test_smoke_reference_matched(smoke_run):
    _, data = smoke_run
    ref = data["reference"]
    assert ref["outputs_match"] is True and ref["grads_match"] is True
    assert ref["output_max_rel_diff"] <= ref["tolerance_rel"] and ref["grad_max_rel_diff"] <= ref["tolerance_rel"]
    assert ref["ours"]["median_ms"] > 0 and ref["reference"]["median_ms"] > 0
    assert math.isclose(ref["ratio_ours_vs_reference"], ref["ours"]["median_ms"] / ref["reference"]["median_ms"],
                        rel_tol=1e-12)
    assert "| ST stage 2, guided phase |" in data["markdown"] and "ours / reference" in data["markdown"]


def test_reference_sit_is_independent_but_equal(bench, tiny_sit_config):
    """Same weights -> same velocity; a perturbed weight -> a different one (the check can fail)."""
    from diffusers_selftrans import SiTTransformer2DModel

    config = dict(tiny_sit_config, qk_norm=True)
    ours = bench.randomize_(SiTTransformer2DModel(**config), torch.Generator().manual_seed(0)).eval()
    reference = bench.ReferenceSiT(config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    y, drop = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0])
    with torch.no_grad():
        expected = ours(x, t, y, force_drop_ids=drop).sample
        torch.testing.assert_close(reference(x, t, y, force_drop_ids=drop), expected, rtol=1e-5, atol=1e-5)
        reference.blocks[0].mlp.fc2.bias.add_(0.1)
        assert not torch.allclose(reference(x, t, y, force_drop_ids=drop), expected, atol=1e-3)


def test_bad_flags(bench):
    with pytest.raises(ValueError, match="CUDA only"):
        bench.main(["--smoke", "--dtype", "bf16", "--device", "cpu"])
    with pytest.raises(ValueError, match="contradicts"):
        bench.main(["--model_config", '{"num_layers": 2, "sample_size": 8}', "--latent_size", "16"])
    with pytest.raises(ValueError, match="Not SiTTransformer2DModel config fields"):
        bench.main(["--model_config", '{"depth": 2}'])
    with pytest.raises(ValueError, match="plain SiT only"):
        bench.ReferenceSiT({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "use_rope": True})

"""Smoke test of benchmarks/memory_t2i.py: one tiny in-process run of the four families into tmp_path, then checks
on what it wrote (files, no absolute paths, the published parameter counts, the model-state arithmetic, the
activation extrapolation) and on the pieces it is built from (weight-copy tracking, width and depth plans)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "memory_t2i.py"
FAMILIES = ("SD3.5-medium", "PixArt-Sigma-XL", "Sana-1.6B", "Flux.1-dev")
STAGES = ("stage1", "stage2_guided", "stage2_after_stop")
STATE_KEYS = ("weights", "gradients", "adamw", "ema", "buffers", "projector", "ddp_buckets", "fsdp_working_set",
              "teacher_weights", "vae")


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "benchmark_memory_t2i")


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_t2i")
    threads = torch.get_num_threads()
    returned = bench.main(["--smoke", "--output_dir", str(out)])
    assert torch.get_num_threads() == threads  # main() restores the caller's thread count
    return out, returned, json.loads((out / "results.json").read_text())


def test_files_and_no_absolute_paths(smoke):
    out, returned, data = smoke
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert returned["rows"] == data["rows"]
    assert data["command"] == "python benchmarks/memory_t2i.py --smoke --output_dir '<output_dir>'"
    for name in ("results.json", "results.md"):
        text = (out / name).read_text()
        for path in {str(out), str(out.parent), str(REPO), os.getcwd(), os.path.expanduser("~"), "/tmp/", "/work/"}:
            assert path not in text, f"{name} contains the absolute path {path}"
    md = (out / "results.md").read_text()
    for heading in ("## Model states", "## Sizes", "## The arithmetic for one row", "## Checks", "## Caveats"):
        assert heading in md
    assert data["family_order"] == list(FAMILIES)
    assert len(data["rows"]) == len(FAMILIES) * 2 * len(STAGES) * 2  # families x modes x stages x checkpointing


def test_published_parameter_counts(smoke):
    """The real configs (meta device, also under --smoke) match the published sizes."""
    _, _, data = smoke
    checks = {c["family"]: c for c in data["checks"]["published"]}
    assert set(checks) == set(FAMILIES)
    for c in checks.values():
        assert c["ok"] and abs(c["relative_difference"]) <= 0.05, c
        assert c["stored"] == c["parameters"] + c["persistent_buffers"]
    # exact counts of diffusers 0.42's classes with the published configs
    assert checks["Flux.1-dev"]["parameters"] == 11_901_408_320
    assert checks["SD3.5-medium"]["parameters"] == 2_243_171_520
    assert checks["SD3.5-medium"]["persistent_buffers"] == 384 * 384 * 1536  # the positional embedding
    assert checks["PixArt-Sigma-XL"]["parameters"] == 610_856_096
    assert checks["Sana-1.6B"]["parameters"] == 1_604_462_752
    enc = data["encoder_params"]
    assert 4.7e9 < enc["T5-v1.1-XXL encoder"] < 4.8e9 and 2.5e9 < enc["Gemma-2-2B (decoder, no LM head)"] < 2.7e9


def test_model_state_arithmetic_adds_up(smoke):
    _, _, data = smoke
    (check,) = [c for c in data["checks"]["model_states"] if c["family"] == "SD3.5-medium"]
    assert all(c["equal"] for c in data["checks"]["model_states"]), data["checks"]["model_states"]
    assert check["measured_bytes"]["adamw"] == 8 * check["trainable_params"]
    assert check["measured_bytes"]["teacher_weights"] == 2 * check["student_params"]  # bf16, same architecture
    n = data["setting"]["num_gpus"]
    for r in data["rows"]:
        c = data["families"][r["family"]]["counts"]
        st, p = r["states"], c["student"]
        head = c["stage1_head" if r["stage"] == "stage1" else "stage2_projector"]
        shard = n if r["mode"] == "fsdp2" else 1
        assert st["weights"] == pytest.approx(4 * p / shard) and st["adamw"] == pytest.approx(8 * p / shard)
        assert st["ema"] == pytest.approx(4 * p / shard) and st["gradients"] == pytest.approx(4 * p / shard)
        assert st["projector"] == pytest.approx((12 if r["stage"] == "stage2_after_stop" else 16) * head / shard)
        assert st["ddp_buckets"] == (4 * (p + head) if r["mode"] == "ddp" else 0)
        assert (st["fsdp_working_set"] > 0) == (r["mode"] == "fsdp2")
        assert st["teacher_weights"] == (2 * (c["teacher"] + c["buffers"]) if r["stage"] == "stage2_guided" else 0)
        assert set(st) == set(STATE_KEYS)
        assert r["state_bytes"] == pytest.approx(sum(st.values()))
        # the script's optimizer: fused AdamW under DDP (no parameter-sized temporaries), foreach under FSDP2
        trainable = (p + (0 if r["stage"] == "stage2_after_stop" else head)) / shard
        if r["mode"] == "fsdp2":
            assert r["optimizer_step_transient"] == pytest.approx(4 * trainable, rel=0.01)
        else:
            assert r["optimizer_step_transient"] <= 0.01 * 4 * trainable
        for batch, e in r["batches"].items():
            assert e["peak"] == pytest.approx(r["state_bytes"] + max(e["activations"], r["optimizer_step_transient"]))
            assert math.isclose(e["gib"], e["peak"] / 2**30)
            a = r["activations"][e["peak_phase"]]
            assert e["activations"] == pytest.approx(a["batch_independent_bytes"] + int(batch) * a["per_sample_bytes"])


def test_activations_measured_and_extrapolated(smoke):
    _, _, data = smoke
    rows = {(r["family"], r["mode"], r["stage"], r["gradient_checkpointing"]): r for r in data["rows"]}
    for (family, mode, stage, ckpt), r in rows.items():
        phase = r["batches"]["32"]["peak_phase"]
        assert r["activations"][phase]["per_sample_bytes"] > 0
        assert (r["batches"]["32"]["activations"] >= r["batches"]["1"]["activations"])
        if mode == "ddp":  # FSDP2's bf16 parameters: no autocast weight copies
            fsdp2 = rows[(family, "fsdp2", stage, ckpt)]
            assert r["batches"]["1"]["activations"] > fsdp2["batches"]["1"]["activations"]
        if ckpt:
            plain = rows[(family, mode, stage, False)]
            assert r["batches"]["32"]["activations"] < plain["batches"]["32"]["activations"]
    for c in data["checks"]["weight_copies"]:  # ddp's batch-independent part: bf16 copies of the matmul weights
        assert c["batch_independent_bytes"] == pytest.approx(c["expected_bytes"], rel=0.5)
    for probe in data["probes"]["PixArt-Sigma-XL"]["heads1"]["checkpointing_false"]["stage2_guided"].values():
        assert probe["teacher_forwards"] == 1 and probe["teacher_released"] is False
        assert probe["teacher_transient_bytes"] > 0 and probe["weight_copy_bytes"] > 0
    for probe in data["probes"]["PixArt-Sigma-XL"]["heads1"]["checkpointing_false"]["stage2_after_stop"].values():
        assert probe["teacher_forwards"] == 0 and probe["teacher_released"] is True


def test_checks_ran(smoke):
    _, _, data = smoke
    width, depth = data["checks"]["width"], data["checks"]["depth"]
    assert {c["family"] for c in width} == {"PixArt-Sigma-XL"} and len(width) == 2 * 2 * 4  # ckpt x variants x points
    assert {c["family"] for c in depth} == {"SD3.5-medium"} and len(depth) == 4
    for c in width + depth:
        assert c["measured_bytes"] > 0 and abs(c["relative_error"]) < 0.15, c  # tiny models: small fixed tensors
    ratios = [c["ratio"] for c in data["checks"]["batch_linearity"] if c["variant"] == "fsdp2"]
    assert ratios and all(1.5 < r <= 2.05 for r in ratios)


def test_tracker_counts_weight_copies_at_the_target_size(bench):
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    tracker = bench.WeightCopyTracker({layer.weight.untyped_storage().data_ptr(): 10.0})
    with tracker:
        tracker.mark("a")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)  # bf16 copies of x (3 x 8) and of the weight (4 x 8), output 3 x 4
        tracker.mark("b")
    assert list(tracker.copies.values()) == [10.0]
    plain = tracker.live_curve(set(), "a", "b")["peak"]
    scaled = tracker.live_curve(set(), "a", "b", scale=tracker.copies)["peak"]
    assert scaled - plain == 9 * 4 * 8 * 2  # the weight copy (64 bytes) counted 10 times
    del y


def test_width_and_depth_plans(bench):
    sd3, flux = bench.FAMILIES["SD3.5-medium"], bench.FAMILIES["Flux.1-dev"]
    plan = bench.depth_plan(sd3, sd3.config)
    assert plan.counts == {"joint": 9, "dual": 13} and plan.real_layers == {"stage1": 4, "guided_layer": 12,
                                                                             "guiding_layer": 16}
    plan = bench.depth_plan(flux, flux.config)
    assert plan.counts == {"double": 18, "single": 37}
    assert plan.layers == {"stage1": 1, "guided_layer": 2, "guiding_layer": 2}  # real 10 (double), 29 / 38 (single)
    assert [bench.FAMILIES[f].image_tokens for f in FAMILIES] == [4096, 4096, 1024, 4096]
    sana = bench.at_heads(bench.FAMILIES["Sana-1.6B"], 14)
    assert sana["num_cross_attention_heads"] == 4 and sana["cross_attention_dim"] == 14 * 32
    assert bench.width_fit({2: 10.0, 4: 20.0}, 24) == pytest.approx(120.0)


def test_bad_flags(bench):
    with pytest.raises(ValueError, match="--batches"):
        bench.main(["--smoke", "--batches", "0", "1"])
    with pytest.raises(SystemExit):
        bench.main(["--families", "SDXL"])


def test_committed_results_are_consistent():
    """benchmarks/results/memory_t2i as committed: the real sizes, the checks within a few percent, the arithmetic."""
    folder = REPO / "benchmarks" / "results" / "memory_t2i"
    data = json.loads((folder / "results.json").read_text())
    assert data["command"] == "python benchmarks/memory_t2i.py" and data["smoke"] is False
    assert data["family_order"] == list(FAMILIES) and data["setting"]["batches"] == [32, 1]
    assert all(c["ok"] for c in data["checks"]["published"]) and all(c["equal"] for c in data["checks"]["model_states"])
    assert data["checks"]["width"] and all(abs(c["relative_error"]) < 0.05 for c in data["checks"]["width"])
    assert data["checks"]["depth"] and all(abs(c["relative_error"]) < 0.05 for c in data["checks"]["depth"])
    for r in data["rows"]:
        for e in r["batches"].values():
            assert e["peak"] == pytest.approx(r["state_bytes"] + max(e["activations"], r["optimizer_step_transient"]))
    for name in ("results.json", "results.md", "README.md"):
        text = (folder / name).read_text()
        assert "/work/" not in text and "/tmp/" not in text and str(REPO) not in text

"""benchmarks/timing.py (the benchmarks' shared timing helpers) and benchmarks/bench_sampling.py --compare_repa: one tiny
CPU run, checked through the JSON it writes."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def timing():
    return load("timing")


@pytest.fixture(scope="module")
def bench():
    return load("bench_sampling")


# --- benchmarks/timing.py ------------------------------------------------------------------------------------------
def test_timed_runs_warmup_untimed_and_returns_one_time_per_repeat(timing, monkeypatch):
    clock = iter(range(0, 1000, 1))  # perf_counter advances 1 s per reading
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    calls = []
    times = timing.timed(lambda: calls.append(1), "cpu", warmup=2, repeats=3)
    assert len(calls) == 5
    assert times == [1000.0, 1000.0, 1000.0]  # ms, one per repeat


def test_interleaved_timing_rotates_the_order(timing):
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = timing.interleaved_timing(fns, "cpu", warmup=1, repeats=2)
    assert order == list("abc" "bca" "cab")  # round 0 (warm-up, untimed), then rotated rounds
    assert {name: len(t) for name, t in times.items()} == {"a": 2, "b": 2, "c": 2}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_summarize_and_bad_counts(timing):
    summary = timing.summarize([3.0, 1.0, 10.0, 2.0])
    assert (summary["median_ms"], summary["min_ms"], summary["max_ms"]) == (2.5, 1.0, 10.0)
    assert summary["times_ms"] == [3.0, 1.0, 10.0, 2.0]
    with pytest.raises(ValueError, match="at least one time"):
        timing.summarize([])
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timing.timed(lambda: None, "cpu", warmup=0, repeats=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        timing.interleaved_timing({"a": lambda: None}, "cpu", warmup=-1, repeats=1)


def test_benchmarks_share_the_timing_helpers():
    for name in ("bench_model", "bench_sampling", "overhead"):
        text = (BENCHMARKS / f"{name}.py").read_text()
        assert "from timing import" in text, name
        assert "perf_counter" not in text, f"{name}.py times things itself"


# --- bench_sampling.py --compare_repa ------------------------------------------------------------------------------
TINY = ["--preset", "SiT-S/8", "--resolution", "64", "--batch", "2", "--device", "cpu", "--samplers", "euler",
        "--steps_scale", "0.06", "--repeats", "2", "--guidance_high", "0.7", "--num_classes", "10"]


@pytest.fixture(scope="module")
def compare_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_sampling") / "sampling.json"
    rows = bench.main(bench.parse_args(TINY + ["--compare_repa", "--output_json", str(out)]))
    return rows, json.loads(out.read_text())


def test_compare_repa_rows_and_ratios(compare_run):
    rows, data = compare_run
    compared = [row for row in data["rows"] if row["sampler"] == "euler_vs_repa"]
    assert [row["guidance_scale"] for row in compared] == [1.0, 1.8]
    for row in compared:
        assert row["steps"] == 3 and row["guidance_interval"] == [0.0, 0.7]
        assert row["max_rel_diff_vs_repa"] <= 1e-5  # the same samples (float32 vs float64 state)
        for side in ("pipeline", "repa"):
            assert len(row[side]["times_ms"]) == 2 and row[side]["min_ms"] > 0
        assert math.isclose(row["ratio_vs_repa"], row["pipeline"]["median_ms"] / row["repa"]["median_ms"])
        assert math.isclose(row["ratio_vs_repa_min"], row["pipeline"]["min_ms"] / row["repa"]["min_ms"])
    assert data["ratio_vs_repa"] == {"no_cfg": compared[0]["ratio_vs_repa"], "cfg": compared[1]["ratio_vs_repa"]}
    # the other rows are still there, and what main() returns is what it wrote
    assert [row["sampler"] for row in data["rows"]] == ["euler", "euler", "euler_vs_repa", "euler_vs_repa",
                                                        "vae_decode"]
    assert json.loads(json.dumps(rows)) == data["rows"]


def test_flags(bench, tmp_path):
    assert bench.parse_args(TINY).compare_repa is False
    assert bench.parse_args(TINY + ["--samplers", "--compare_repa"]).samplers == []
    with pytest.raises(SystemExit):  # no sampler and no comparison: nothing to time
        bench.parse_args(TINY + ["--samplers"])


def test_repa_loop_matches_the_pipeline_only_when_it_should(bench):
    """The reference loop is REPA's: with a different CFG interval it must produce a different sample."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_selftrans import SiTPipeline, SiTTransformer2DModel

    torch.manual_seed(0)
    model = bench._randomize_(SiTTransformer2DModel.from_preset("SiT-S/8", sample_size=8, num_classes=10), 1).eval()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    pipe = SiTPipeline(model, None, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(class_labels=y.tolist(), guidance_scale=3.0, guidance_interval=(0.0, 0.5), num_inference_steps=4,
                latents=noise, output_type="latent").images
    with torch.no_grad():
        same = bench.repa_euler_sampler(model, noise, y, 4, 3.0, 0.0, 0.5, null_class=10)
        other = bench.repa_euler_sampler(model, noise, y, 4, 3.0, 0.0, 1.0, null_class=10)
    torch.testing.assert_close(ours.double(), same, atol=1e-5, rtol=1e-5)
    assert (other - same).abs().max() > 1e-3


def test_compare_repa_refuses_different_work(bench, monkeypatch):
    monkeypatch.setattr(bench, "repa_euler_sampler", lambda model, latents, *a, **k: latents.double() + 1.0)
    with pytest.raises(AssertionError, match="different work"):
        bench.main(bench.parse_args(TINY + ["--compare_repa", "--repeats", "1", "--samplers"]))  # no sampler rows


def test_timing_module_is_importable_when_a_script_is_loaded_by_path(bench):
    assert "timing" in sys.modules and Path(sys.modules["timing"].__file__) == BENCHMARKS / "timing.py"


# --- SiTPipeline's loop: no per-step rebuilding of loop invariants --------------------------------------------------
def test_pipeline_builds_loop_invariants_once(monkeypatch):
    """The [y, null] labels and the transformer dtype (a parameter walk) are built once per call, not per step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_selftrans import SiTPipeline, SiTTransformer2DModel

    lookups = []

    class CountingSiT(SiTTransformer2DModel):
        @property
        def dtype(self):
            lookups.append(1)
            return super().dtype

    model = CountingSiT.from_preset("SiT-S/8", sample_size=8, num_classes=10).eval()
    pipe = SiTPipeline(model, None, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    label_cats = []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        if not tensors[0].is_floating_point():
            label_cats.append(1)
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", counting_cat)
    steps = 6  # t = 1, 5/6, ..., 1/6: guided at 1/2, 1/3, 1/6
    pipe(class_labels=[1, 2], guidance_scale=2.0, guidance_interval=(0.0, 0.5), num_inference_steps=steps,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    assert len(label_cats) == 1
    assert len(lookups) == 1

"""Smoke test of benchmarks/lora_cost.py (issue 28, item 4): one tiny in-process run into tmp_path, then checks on
what it wrote (files, keys, no absolute paths; the teacher's own bytes of each scheme: a whole transformer for full
fine-tuning, the stage-1 adapter for ours, nothing with the base as the teacher; the memory and FLOP orderings; the
FLOP bound's arithmetic), and that the snapshot-and-copy baseline computes our guiding features and puts the
student's adapter back."""

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from script_loader import load_script  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "lora_cost.py"
SCHEMES = ("full", "lora_plain", "lora_adapter_teacher", "lora_base_teacher", "lora_snapshot_copy")
LORA = SCHEMES[1:]


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "benchmark_lora_cost")


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_cost")
    threads = torch.get_num_threads()
    returned = bench.main(["--smoke", "--output_dir", str(out)])
    assert torch.get_num_threads() == threads  # main() restores the caller's thread count
    return out, returned, json.loads((out / "results.json").read_text())


def test_files_keys_and_no_absolute_paths(smoke):
    out, returned, data = smoke
    assert returned["rows"] == data["rows"]
    assert data["command"] == "python benchmarks/lora_cost.py --smoke --output_dir '<output_dir>'"
    assert data["smoke"] is True and data["machine"] == os.uname().machine and data["torch"] == torch.__version__
    assert data["schemes"] == list(SCHEMES) and set(data["rows"]) == set(SCHEMES)
    s = data["settings"]
    assert s["batch"] == 1 and s["rank"] == 4 and s["dtype"] == "float32" and s["repeats"] == 2
    assert s["alignment"]["guided_layer"] < s["alignment"]["guiding_layer"] <= s["config"]["num_layers"]
    tables = (out / "results.md").read_text()
    readme = (out / "README.md").read_text()
    assert "## Peak memory" in tables and "## Step time" in tables and tables.strip() in readme
    for text in (json.dumps(data), tables, readme):
        assert str(out) not in text and str(REPO) not in text and "/tmp/" not in text


def test_teacher_own_memory(smoke):
    _, _, data = smoke
    rows, adapter = data["rows"], data["settings"]["adapter_bytes"]
    resident = {name: rows[name]["memory"]["resident_bytes"] for name in SCHEMES}
    own = {name: r["teacher_own"] for name, r in resident.items()}
    base = resident["full"]["transformer"]
    assert own["full"] == base  # a second transformer of the same config, its buffers included
    assert 0 < adapter < base / 5
    assert own["lora_adapter_teacher"] == adapter  # the stage-1 adapter: same rank and targets as the student's
    assert own["lora_base_teacher"] == own["lora_plain"] == 0
    assert own["lora_snapshot_copy"] == adapter  # the snapshot of the stage-1 adapter
    for name in LORA:  # the teacher's own bytes are not counted twice
        assert resident[name]["transformer"] == base + adapter


def test_memory_peaks(smoke):
    _, _, data = smoke
    rows = data["rows"]
    for name in SCHEMES:
        m = rows[name]["memory"]
        r = m["resident_bytes"]
        assert r["total"] == sum(v for k, v in r.items() if k != "total")
        assert m["step_peak_bytes"] > 0 and m["peak_bytes"] == r["total"] + m["step_peak_bytes"]
        assert m["mib"]["peak"] == pytest.approx(m["peak_bytes"] / 2**20)
        assert ("teacher_pass_transient_bytes" in m) == (name != "lora_plain")
        assert rows[name].get("teacher_forwards") == (2 if name in SCHEMES[:1] + LORA[1:3] else None)
    assert all(rows["full"]["memory"]["peak_bytes"] > rows[name]["memory"]["peak_bytes"] for name in LORA)
    full = rows["full"]["memory"]["resident_bytes"]
    assert full["adamw"] >= 2 * full["ema"] and full["ema"] > 0  # two moments per trained weight
    assert rows["lora_plain"]["memory"]["resident_bytes"]["ema"] == data["settings"]["adapter_bytes"]


def test_flops_and_the_flop_bound(smoke):
    _, _, data = smoke
    rows = data["rows"]
    flops = {name: rows[name]["flops_per_step"] for name in SCHEMES}
    # the teacher pass adds FLOPs; the stage-1 adapter's matmuls add to the base's; two full-depth passes more still
    order = ("lora_plain", "lora_base_teacher", "lora_adapter_teacher", "lora_snapshot_copy")
    assert all(flops[a] < flops[b] for a, b in zip(order, order[1:])), flops
    assert flops["full"] > flops["lora_adapter_teacher"]  # weight gradients of every layer
    assert "time" not in rows["full"]
    plain = rows["lora_plain"]["time"]["median_s"]
    for name in LORA:
        r = rows[name]
        t = r["time"]
        assert len(t["repeats_s"]) == 2 and t["min_s"] <= t["median_s"] <= t["max_s"]
        assert r["flops_vs_plain"] == pytest.approx(flops[name] / flops["lora_plain"])
        assert r["flop_bound_s"] == pytest.approx(plain * r["flops_vs_plain"])
        assert r["time_vs_flop_bound"] == pytest.approx(t["median_s"] / r["flop_bound_s"])
        assert r["time_vs_plain"] == pytest.approx(t["median_s"] / plain)


def test_snapshot_baseline_computes_our_guiding_features(bench, tmp_path):
    s = bench.settings(bench.parse_args(["--smoke"]))
    stage1 = bench.write_stage1_adapter(s, str(tmp_path / "stage1"), seed=0)
    ours = bench.build_scheme("lora_adapter_teacher", s, stage1, seed=0)
    snap = bench.build_scheme("lora_snapshot_copy", s, stage1, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the same (non-zero) student adapter in both
        for p, q in zip(bench.L.adapter_parameters(ours.model, "student"),
                        bench.L.adapter_parameters(snap.model, "student")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            q.copy_(p)
    student = [p.clone() for p in bench.L.adapter_parameters(snap.model, "student")]
    x_t, cond = bench.make_batch(s, 2)
    t = torch.tensor([0.3, 0.7])
    expected = ours.method.guiding_features(x_t, t, conditioning=cond)
    got = snap.snapshot.guiding_features(x_t, t, cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(student, bench.L.adapter_parameters(snap.model, "student")))
    loss = bench.train_step(snap, s)  # the whole step runs, the method's own teacher call restored after it
    assert torch.isfinite(loss) and "guiding_features" not in vars(snap.method)


def test_bad_flags(bench):
    with pytest.raises(ValueError, match="--batch"):
        bench.main(["--smoke", "--batch", "0"])

"""`benchmarks/convergence.py --smoke`: every method trains, every checkpoint is scored, JSON + PNG + table."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import convergence  # noqa: E402


def test_convergence_smoke_writes_curves_plot_and_table(tmp_path):
    out = tmp_path / "conv"
    result = convergence.main(["--smoke", "--output_dir", str(out), "--max_real", "200"])
    saved = json.loads((out / "curves.json").read_text())
    methods = ["vanilla", "vae_align", "self_transcendence", "sra", "layersync", "dispersive"]
    assert sorted(saved["curves"]) == sorted(methods)
    for method in methods:
        points = saved["curves"][method]["0"]
        assert [p["step"] for p in points] == [2, 4]
        assert all(np.isfinite(p["fid"]) and 0 <= p["accuracy"] <= 1 for p in points)
        assert points[0]["train_seconds"] < points[1]["train_seconds"]
    # Self-Transcendence pays for its guiding model: its clock starts after the whole stage 1
    stage1_total = saved["curves"]["vae_align"]["0"][-1]["train_seconds"]
    assert saved["curves"]["self_transcendence"]["0"][0]["train_seconds"] > stage1_total
    summary = result["summary"]["vanilla"][-1]
    assert summary["seeds"] == 1 and summary["fid_std"] == 0.0
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert Image.open(out / "convergence.png").size[0] > 500

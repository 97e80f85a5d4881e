"""`benchmarks/convergence.py --smoke`: every method trains, every checkpoint is scored, JSON + PNG + table."""

import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import convergence  # noqa: E402

# An absolute path: a "/" that starts a path (not one inside it, as in runs/seed0) before a folder name and a "/".
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/[\w.~-]+/")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def assert_no_machine_paths(folder: Path, *machine_folders: Path):
    """The files a benchmark writes into its output folder (what is committed; the run folders below it are the
    training scripts') record no absolute path, and none of `machine_folders` (the test's tmp folders) at all."""
    files = [f for f in sorted(folder.iterdir()) if f.is_file()]
    assert files
    for f in files:
        data = f.read_bytes()
        for machine in machine_folders:
            assert str(machine).encode() not in data, f"{f} records {machine}"
        if f.suffix in (".json", ".jsonl", ".md"):
            found = ABSOLUTE_PATH.findall(data.decode())
            assert not found, f"{f} records absolute paths: {found[:5]}"


def test_recorded_path_is_relative(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "runs" / "seed0").mkdir(parents=True)
    assert convergence.recorded_path(out, out) == "OUTPUT_DIR"
    assert convergence.recorded_path(out / "runs" / "seed0", str(out)) == "runs/seed0"
    vae = convergence.ROOT / "examples" / "assets" / "digits-vae"
    assert convergence.recorded_path(str(vae), out) == "examples/assets/digits-vae"
    assert convergence.recorded_path(tmp_path / "my_images", out) == ".../my_images"  # elsewhere: its name only
    monkeypatch.chdir(tmp_path)  # a relative path is the caller's (from its working directory)
    assert convergence.recorded_path("out/runs", "out") == "runs"
    for not_a_path in (None, "SiT-B/2", "org/some-vae", {"num_layers": 6}):
        assert convergence.recorded_path(not_a_path, out) == not_a_path


def test_committed_results_record_no_machine_paths():
    for name in ("convergence", "convergence-400steps", "convergence_t2i", "evidence"):
        assert_no_machine_paths(RESULTS / name)


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
    assert summary["seeds"] == 1 and summary["fid_std"] is None  # one seed: no spread
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert Image.open(out / "convergence.png").size[0] > 500
    # no folder of this machine in what is written: paths relative to the output folder or the repository
    assert_no_machine_paths(out, tmp_path)
    settings = saved["settings"]
    assert (settings["output_dir"], settings["model"], settings["vae_name_or_path"]) == (
        "OUTPUT_DIR", "smoke_model.json", "examples/assets/digits-vae")

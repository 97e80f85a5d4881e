"""Smoke test of benchmarks/data_throughput.py: one tiny in-process run (JPEGs and latent shards through the real
TrainDataStream with 0 and 1 workers), then checks on what it measured and wrote."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data_throughput.py"
REPO_ROOT = SCRIPT.parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "benchmark_data_throughput")


@pytest.fixture(scope="module")
def smoke_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("data_throughput")
    work = tmp_path_factory.mktemp("data_throughput_work")
    threads = torch.get_num_threads()
    returned = bench.main(["--smoke", "--output_dir", str(out), "--work_dir", str(work)])
    assert torch.get_num_threads() == threads  # main() restores the caller's thread count
    return returned, out, work


def test_files_and_command(bench, smoke_run):
    returned, out, work = smoke_run
    data = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert json.loads(json.dumps(returned)) == data
    assert data["command"].startswith("python benchmarks/data_throughput.py --smoke")
    assert data["settings"]["smoke"] is True and data["settings"]["num_workers"] == list(bench.SMOKE["workers"])
    # the benchmark's own data really was written and read: JPEGs sized like ImageNet's, preprocess_latents shards
    images, latents = data["data"]["images"], data["data"]["latents"]
    assert images["count"] == bench.SMOKE["num_images"] and len(list(work.rglob("*.jpg"))) == images["count"]
    assert images["jpeg_quality"] == 90 and 60 < images["mean_kb"] < 200
    assert latents["shape"] == [4, 32, 32] and latents["with_flip"] is True
    assert latents["item_kb"] == pytest.approx(4 * 4 * 32 * 32 * 4 / 1e3 + 0.008)  # four float32 moments + label
    # a row owns its memory (the library copies it out of the shard): nothing else travels to a worker's consumer
    assert latents["item_storage_kb"] == pytest.approx(latents["item_kb"])
    assert (work / "latents" / "stats.json").is_file()
    env = data["environment"]
    for key in ("python", "torch", "pillow", "cpu_model", "logical_cpus"):
        assert env[key], key
    assert f"{data['jpeg']['cores_per_gpu']:.2f}" in md and f"{data['latents']['cores_per_gpu']:.2f}" in md


def test_rates_and_cores_per_gpu(bench, smoke_run):
    _, out, _ = smoke_run
    data = json.loads((out / "results.json").read_text())
    assert data["target_images_per_sec"] == pytest.approx(214.08)  # 6.69 it/s x 256 / 8 GPUs (paper §4.5)
    for name in ("jpeg", "latents"):
        block = data[name]
        rows = block["stream"]
        assert [row["num_workers"] for row in rows] == list(bench.SMOKE["workers"])
        for row in rows:
            assert row["img_per_s"] > 0 and row["timed_images"] > 0 and row["worker_cpu_s"] > 0
            assert math.isclose(row["img_per_s"], row["timed_images"] / row["timed_seconds"], rel_tol=1e-9)
            assert math.isclose(row["wall_img_per_s_per_worker"], row["img_per_s"] / max(row["num_workers"], 1),
                                rel_tol=1e-9)
            # per worker: images per CPU-second of the workers (0 workers: of the training process)
            assert math.isclose(row["per_worker_img_per_s"], row["timed_images"] / row["worker_cpu_s"], rel_tol=1e-9)
            if row["num_workers"] == 0:
                assert row["worker_cpu_source"] == "training process"
            else:
                assert row["worker_cpu_source"] in ("/proc", "wall time")
        # the sizing row: 0 workers when reading in the training process costs it less than receiving from a worker,
        # else the best worker row; cores per GPU = R / its per-worker rate, all from the JSON's own numbers
        in_process, with_workers = rows[0], rows[1:]
        if in_process["main_process_cpu_ms_per_image"] < min(r["main_process_cpu_ms_per_image"] for r in with_workers):
            best = in_process
        else:
            best = max(with_workers, key=lambda row: row["per_worker_img_per_s"])
        assert block["per_worker_img_per_s"] == best["per_worker_img_per_s"] > 0
        assert block["per_worker_from_num_workers"] == best["num_workers"]
        assert math.isclose(block["cores_per_gpu"], data["target_images_per_sec"] / block["per_worker_img_per_s"],
                            rel_tol=1e-9)
        assert data["cores_per_gpu"][name] == block["cores_per_gpu"]
    stages = data["jpeg"]["stages"]
    assert set(stages["stages"]) == {"read_and_decode", "to_rgb", "adm_center_crop", "to_tensor", "flip"}
    assert stages["whole"]["cpu_ms"] > 0 and stages["stages"]["read_and_decode"]["wall_ms"] > 0
    assert math.isclose(stages["img_per_cpu_s"], 1e3 / stages["whole"]["cpu_ms"], rel_tol=1e-9)


def test_no_absolute_paths_in_the_files(smoke_run):
    _, out, work = smoke_run
    for name in ("results.json", "results.md"):
        text = (out / name).read_text()
        for path in (str(out), str(work), str(REPO_ROOT), str(Path.home())):
            assert path not in text, (name, path)
        assert not re.search(r"(?<![\w.<])/(?:tmp|home|work|root|Users|var)/", text), name


def test_target_rate_flag_and_bad_sizes(bench):
    args = bench.parse_args(["--smoke", "--target_images_per_sec", "500"])
    assert args.target_images_per_sec == 500 and args.num_images == bench.SMOKE["num_images"]
    assert bench.parse_args(["--smoke", "--num_workers", "2"]).num_workers == [2]  # explicit flags win over --smoke
    assert bench.parse_args([]).target_images_per_sec == bench.PAPER_IMAGES_PER_SEC_PER_GPU
    with pytest.raises(SystemExit):
        bench.parse_args(["--num_images", "10"])  # fewer than warm-up + one timed batch
    with pytest.raises(SystemExit):
        bench.parse_args(["--target_images_per_sec", "0"])


def test_sizing_row_rule(bench, smoke_run):
    def row(workers, main_ms, per_worker):
        return {"num_workers": workers, "main_process_cpu_ms_per_image": main_ms, "per_worker_img_per_s": per_worker}

    # JPEG-like: a worker takes the decode off the training process -> the best worker row
    jpeg = [row(0, 5.0, 200.0), row(1, 1.5, 180.0), row(2, 1.6, 170.0)]
    assert bench.per_worker_figure(jpeg) == {"per_worker_img_per_s": 180.0, "per_worker_from_num_workers": 1}
    # latent-like: receiving an item costs the training process more than reading it -> 0 workers
    latents = [row(0, 0.2, 4000.0), row(1, 2.5, 150.0)]
    assert bench.per_worker_figure(latents) == {"per_worker_img_per_s": 4000.0, "per_worker_from_num_workers": 0}
    assert bench.per_worker_figure([row(2, 1.0, 90.0)])["per_worker_from_num_workers"] == 2  # only what was measured
    # measured: a latent item handed over by a worker costs the training process more than reading it (~10x here)
    _, out, _ = smoke_run
    assert json.loads((out / "results.json").read_text())["latents"]["per_worker_from_num_workers"] == 0

"""benchmarks/gpu_check.py: its FLOPs formula against the paper and a FLOP counter, its parts' bookkeeping, and one
`--smoke` run on the CPU (every part, subprocesses included) checked through the JSON it writes."""

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
PARTS = ("tolerance", "overhead_B2", "overhead_XL2", "sampling_XL2", "train_assets", "train_compile_off",
         "train_compile_on")
# The README's stage-2 command, and the only flags gpu_check may add (shrink the run / point at local files).
README_FLAGS = {"--model", "--mixed_precision", "--guiding_model_name_or_path", "--guiding_autocast", "--output_dir",
                "--torch_compile"}
ALLOWED_EXTRA_FLAGS = {"--latents_dir", "--vae_name_or_path", "--max_train_steps", "--report_to",
                       "--checkpointing_steps", "--validation_steps",
                       # --smoke only: a tiny run on the CPU
                       "--resolution", "--train_batch_size", "--logging_steps", "--validation_num_inference_steps",
                       "--no-progress", "--torch_compile_backend"}  # --smoke: eager (dynamo traces, no codegen)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gc():
    return load_script()


def sit_config(name, **extra):
    from diffusers_selftrans.models.transformer_sit import parse_preset

    return dict(parse_preset(name), sample_size=32, in_channels=4, num_classes=1000, **extra)


# --- FLOPs ----------------------------------------------------------------------------------------------------------
def test_flops_formula_gives_the_papers_figures(gc):
    # DiT/SiT papers: SiT-B/2 23 "Gflops" (multiply-accumulates) per 256 px image, SiT-XL/2 118.6.
    assert gc.sit_forward_macs(sit_config("SiT-B/2")) == pytest.approx(23.0e9, rel=0.01)
    assert gc.sit_forward_macs(sit_config("SiT-XL/2")) == pytest.approx(118.6e9, rel=0.01)
    b2 = gc.training_flops_per_image(sit_config("SiT-B/2"))
    assert b2 == 6 * gc.sit_forward_macs(sit_config("SiT-B/2"))  # 3 x forward, 2 FLOPs per MAC
    # The paper's 8xA800 SiT-B/2 run: ~297 img/s per GPU is ~13 % of the A800's (= A100's) 312e12 bf16 peak.
    peak, _ = gc.device_peak_flops("NVIDIA A800-SXM4-80GB")
    assert gc.mfu(297, b2, peak) == pytest.approx(0.13, abs=0.005)


@pytest.mark.parametrize("extra, blocks", [({}, None), ({}, 2), ({"mlp_type": "swiglu", "learn_sigma": True}, None)])
def test_flops_formula_equals_the_counted_matmuls(gc, extra, blocks):
    """torch's FlopCounterMode on a real forward (math attention, so QK^T and AV are counted as matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_selftrans import SiTTransformer2DModel

    config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, num_attention_heads=2,
                  attention_head_dim=16, num_classes=10, **extra)
    model = SiTTransformer2DModel(**config).eval()
    n = 3
    x, t, y = torch.randn(n, 4, 8, 8), torch.rand(n), torch.randint(0, 10, (n,))
    kwargs = {} if blocks is None else {"output_hidden_states": [blocks], "stop_at_layer": blocks}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, **kwargs)
    assert counter.get_total_flops() == n * 2 * gc.sit_forward_macs(config, num_blocks=blocks)


def test_flops_formula_rejects_a_bad_depth(gc):
    with pytest.raises(ValueError, match="num_blocks"):
        gc.sit_forward_macs(sit_config("SiT-B/2"), num_blocks=13)


def test_device_peak_table(gc):
    assert gc.device_peak_flops("NVIDIA H200")[0] == 989.4e12
    assert gc.device_peak_flops("NVIDIA H100 80GB HBM3")[0] == 989.4e12  # the SXM part's name
    assert gc.device_peak_flops("NVIDIA A100-SXM4-40GB")[0] == 312e12
    peak, note = gc.device_peak_flops("NVIDIA H100 PCIe")  # a different peak, not in the table
    assert peak is None and "H100 PCIe" in note and "null" in note
    assert gc.mfu(100.0, 1e9, None) is None and gc.mfu(None, 1e9, 1e12) is None
    assert gc.mfu(100.0, 1e9, 1e12) == pytest.approx(0.1)


# --- loss_log.jsonl -> img/s ----------------------------------------------------------------------------------------
def write_log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_throughput_skips_warmup_rows_per_phase(gc, tmp_path):
    rows = []
    for step in range(1, 61):
        row = {"step": step, "loss": 1.0}
        if step <= 30:
            row["loss_guide"] = 0.5
        if step % 10 == 0:
            row["images_per_sec"] = {10: 1.0, 20: 100.0, 30: 300.0, 40: 5.0, 50: 400.0, 60: 400.0}[step]
        rows.append(row)
    write_log(tmp_path / "loss_log.jsonl", rows)
    result = gc.throughput_from_loss_log(tmp_path / "loss_log.jsonl")
    assert result["logged_rows"] == 6
    assert result["guided"]["steps"] == [20, 30]
    assert result["guided"]["images_per_sec"] == pytest.approx(2 / (1 / 100 + 1 / 300))  # images / seconds
    assert result["after_guide_stop"]["steps"] == [50, 60]
    assert result["after_guide_stop"]["images_per_sec"] == pytest.approx(400.0)
    assert gc.throughput_from_loss_log(tmp_path / "loss_log.jsonl", warmup_rows=0)["guided"]["steps"] == [10, 20, 30]


def test_throughput_errors(gc, tmp_path):
    with pytest.raises(FileNotFoundError, match="first step"):
        gc.throughput_from_loss_log(tmp_path / "missing.jsonl")
    write_log(tmp_path / "bad.jsonl", [{"step": s, "images_per_sec": v} for s, v in ((1, 5.0), (2, 0.0))])
    with pytest.raises(ValueError, match="non-positive"):
        gc.throughput_from_loss_log(tmp_path / "bad.jsonl")


# --- Parts: failures are recorded, the run goes on --------------------------------------------------------------
def test_a_failing_part_is_recorded_and_the_next_one_runs(gc, tmp_path):
    report = {"parts": {}}
    path = tmp_path / "r.json"
    runner = gc.Runner(report, path, total_budget_s=100)

    def boom(limit):
        raise RuntimeError("the device fell over")

    def partial(limit):
        raise gc.PartFailed("ran out of time", {"images_per_sec": 12.5}, timed_out=True)

    assert runner.part("first", 50, boom) is None
    assert runner.part("second", 50, partial) is None
    assert runner.part("third", 50, lambda limit: {"value": limit})["value"] == 50
    runner.deadline = time.monotonic() + 1  # less than MIN_PART_S left
    assert runner.part("fourth", 50, lambda limit: {"value": 1}) is None
    data = json.loads(path.read_text())
    parts = data["parts"]
    assert parts["first"]["status"] == "error" and parts["first"]["error"] == "RuntimeError: the device fell over"
    assert parts["second"]["status"] == "timeout" and parts["second"]["images_per_sec"] == 12.5
    assert parts["third"] == {**parts["third"], "status": "ok", "value": 50, "budget_s": 50}
    assert parts["fourth"]["status"] == "skipped" and "value" not in parts["fourth"]


def test_run_command_kills_the_whole_process_group_on_timeout(gc, tmp_path):
    """accelerate launch runs the training in a grandchild: a budget overrun must not leave it on the GPU."""
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); print(p.pid, flush=True); time.sleep(120)")
    run = gc.run_command([sys.executable, "-c", code], tmp_path / "log.txt", limit_s=3)
    assert run["timed_out"] and run["returncode"] != 0
    grandchild = int(run["log_tail"].split()[0])
    for _ in range(50):  # the orphan is reaped by init shortly after the kill
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} survived the time-out")


def test_without_cuda_it_says_so(gc, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="--smoke"):
        gc.main(["--output_dir", str(tmp_path)])


# --- One --smoke run ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(gc, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    path = gc.main(["--smoke", "--output_dir", str(out), "--work_dir", str(tmp_path_factory.mktemp("gpu_check"))])
    return out, path, json.loads(Path(path).read_text())


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_writes_one_json_with_the_machine(smoke):
    out, path, data = smoke
    assert [p.name for p in out.iterdir()] == [Path(path).name]
    assert Path(path).name.startswith("gpu_check-cpu-") and Path(path).suffix == ".json"
    assert data["smoke"] is True and data["device"] == "cpu"
    assert data["torch"] == torch.__version__ and "cuda" in data
    assert data["peak_bf16_flops"] is None and "MFU is null" in data["peak_note"]
    assert "--smoke" in data["command"]
    assert set(data["parts"]) == set(PARTS)
    assert {name: p["status"] for name, p in data["parts"].items()} == {name: "ok" for name in PARTS}
    assert 0 < data["total_seconds"] <= data["total_budget_s"]


def test_smoke_records_every_command(smoke):
    _, _, data = smoke
    parts = data["parts"]
    commands = [parts[name]["command"] for name in PARTS if "command" in parts[name]]
    assert commands == data["commands"] and len(commands) == 5
    assert "benchmarks/overhead.py" in parts["overhead_B2"]["command"]
    sampling = parts["sampling_XL2"]["command"]
    for flag in ("--samplers sde", "--only_guided", "--guidance_scale 1.9", "--guidance_high 0.65"):
        assert flag in sampling
    for name in ("train_compile_off", "train_compile_on"):
        words = parts[name]["command"].split()
        assert "accelerate.commands.launch" in words and "examples/train_self_transcendence.py" in words
        flags = {w for w in words if w.startswith("--")}
        assert README_FLAGS - {"--torch_compile"} <= flags
        assert flags - README_FLAGS <= ALLOWED_EXTRA_FLAGS, flags - README_FLAGS - ALLOWED_EXTRA_FLAGS
        assert ("--torch_compile" in flags) == (name == "train_compile_on")
        assert words[words.index("--mixed_precision") + 1] == "bf16"
        assert words[words.index("--guiding_autocast") + 1] == "bf16"


def test_smoke_tolerance_is_computed(gc, smoke):
    _, _, data = smoke
    tol = data["parts"]["tolerance"]
    assert tol["guidance_scale"] == 30.0 and tol["tolerance"] == gc.GUIDE_AUTOCAST_REL_TOL
    assert positive(tol["rel_err_fp32_weights_bf16_autocast"]) and positive(tol["rel_err_bf16_weights"])
    assert tol["rel_err_fp32_weights_bf16_autocast"] < 1 and tol["rel_err_bf16_weights"] < 1
    assert tol["within_tolerance"] == (tol["rel_err_fp32_weights_bf16_autocast"] <= gc.GUIDE_AUTOCAST_REL_TOL)
    assert not any("h100" in key for key in tol)  # no reference figure without its result file


def test_smoke_figures_are_finite_and_positive(smoke, gc):
    _, _, data = smoke
    parts = data["parts"]
    for name in ("overhead_B2", "overhead_XL2"):
        assert positive(parts[name]["training_flops_per_image"])
        for kind in ("vanilla", "st_guided", "st_after_stop", "stage1_vae_align"):
            step = parts[name]["steps"][kind]
            assert positive(step["median_ms"]) and positive(step["images_per_sec"]) and step["mfu"] is None
        assert parts[name]["reference_outputs_match"] is True
    sampling = parts["sampling_XL2"]
    assert sampling["sampler"] == "sde" and sampling["guidance_interval"] == [0.0, 0.65]
    assert positive(sampling["ms_per_image"]) and positive(sampling["images_per_sec"])
    for name in ("train_compile_off", "train_compile_on"):
        run = parts[name]
        assert run["returncode"] == 0 and not run["timed_out"]
        assert positive(run["training_flops_per_image"]) and positive(run["teacher_flops_per_image"])
        for phase in ("guided", "after_guide_stop"):
            figures = run[phase]
            assert figures["steps"] and all(positive(v) for v in figures["images_per_sec_rows"])
            assert positive(figures["images_per_sec"]) and figures["mfu"] is None
        # the warm-up row of each phase is not in the figures
        assert min(run["guided"]["steps"]) > 2 and run["logged_rows"] == gc.SMOKE_TRAIN_STEPS // gc.SMOKE_LOGGING_STEPS

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""GPU readiness in one run (about 8 minutes on one GPU): every figure a first GPU session should bring back, in ONE JSON.

Parts, each with its own time budget; a part that fails or runs out of time is recorded with its error and the run goes
on (a GPU session cannot be repeated):

1. `tolerance`: the guiding model's f_g = f_u + w (f_c - f_u) at w = 30, computed by
   `SelfTranscendence.guiding_features` with fp32 weights in fp32, under bf16 autocast (what `--guiding_autocast bf16`
   does) and with bf16 weights; relative errors ||a - b|| / ||a|| against `GUIDE_AUTOCAST_REL_TOL`.
2. `overhead_B2`, `overhead_XL2`: `benchmarks/overhead.py` for SiT-B/2 (batch 64) and SiT-XL/2 (batch 32), bf16.
3. `sampling_XL2`: `benchmarks/bench_sampling.py`, SiT-XL/2, the FID setting (SDE sampler, 250 steps, CFG 1.9 on
   t in [0, 0.65], batch 64).
4. `train_compile_off`, `train_compile_on`: 200 steps of the README's stage-2 command
   (`accelerate launch examples/train_self_transcendence.py --model SiT-B/2 --mixed_precision bf16
   --guiding_model_name_or_path ... --guiding_autocast bf16 --output_dir ...`) on synthetic latent shards, a random
   guiding SiT-B/2 and a small offline `AutoencoderKL`, with `--torch_compile` off and on. img/s comes from the run's
   `loss_log.jsonl` (warm-up rows skipped), per phase (guided / after the guide stop), with the model FLOP utilisation
   MFU = img/s x training FLOPs per image / the device's dense bf16 peak.

    python benchmarks/gpu_check.py                              # CUDA; writes benchmarks/results/gpu/gpu_check-*.json
    python benchmarks/gpu_check.py --smoke --output_dir /tmp/gc  # the same code path on CPU, tiny configs, < 1 min

Nothing is downloaded: every model is random and every file is written here first (HF_HUB_OFFLINE=1 for the parts).
"""

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import (  # noqa: E402,F401  (shared with benchmarks/evidence.py; tests read them here)
    PAPER_MACS_PER_IMAGE,
    TRAINING_FLOPS_PER_FORWARD,
    sit_forward_macs,
    training_flops_per_image,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = ROOT / "benchmarks" / "results" / "gpu"

# --- Time -------------------------------------------------------------------------------------------------------------
# A GPU session of this project is 15 minutes, starting the machine included; the check must fit in 8 of them.
TOTAL_BUDGET_S = 480
# Per-part caps (seconds). Estimates, not measurements (no GPU run of this script has happened yet): model construction
# on the CPU dominates the benchmarks (SiT-XL/2 is built ~8 times by overhead.py), and the trainings are ~200 x 256
# images of SiT-B/2 plus start-up, export and, with --torch_compile, two compilations (the guide stop changes the graph).
# A training run stopped by its cap still reports the img/s rows it logged before.
PART_BUDGETS_S = {
    "tolerance": 20,
    "overhead_B2": 50,
    "overhead_XL2": 90,
    "sampling_XL2": 80,
    "train_assets": 20,
    "train_compile_off": 80,
    "train_compile_on": 140,
}
# --smoke: generous caps on a shared CPU; the whole smoke run takes well under a minute on an idle machine.
SMOKE_TOTAL_BUDGET_S = 300
SMOKE_PART_BUDGET_S = 120
# A part is not started with less than this left of the total budget (it could not even import torch).
MIN_PART_S = 10
# How much of a failed part's log goes into the JSON.
LOG_TAIL_CHARS = 3000

# --- The settings asked for (README / paper) -----------------------------------------------------------------------
OVERHEAD_RUNS = {"overhead_B2": ("SiT-B/2", 64), "overhead_XL2": ("SiT-XL/2", 32)}  # (preset, batch), bf16
# README "Evaluate": FID-50K with the SDE sampler, 250 steps, CFG 1.9 on t in [0, 0.65].
SAMPLING_PRESET, SAMPLING_BATCH = "SiT-XL/2", 64
FID_GUIDANCE_SCALE, FID_GUIDANCE_HIGH = 1.9, 0.65
# One timed call after the warm-up: an SDE-250 batch of SiT-XL/2 is ~10 s; more repeats do not fit the budget.
SAMPLING_REPEATS = 1
TRAIN_PRESET = "SiT-B/2"
TRAIN_STEPS = 200
# SD-VAE latents of 256 px ImageNet: 4 channels, downsampling 8, scaling factor 0.18215 (stabilityai/sd-vae-ft-ema).
LATENT_CHANNELS, VAE_DOWNSAMPLING, VAE_SCALING_FACTOR = 4, 8, 0.18215
RESOLUTION = 256
IMAGENET_CLASSES = 1000
# Synthetic shards: 5 batches of 256 per epoch, so the stage-2 default guide stop (20 epochs for 12 blocks) lands at
# step 100 of the 200: both phases are measured. The stream cycles epochs.
NUM_SYNTHETIC_LATENTS, SYNTHETIC_SHARD_SIZE = 1280, 640
# Posterior std of the synthetic latents: the order of SD-VAE posterior stds on ImageNet (the value does not
# change the step's cost; it only keeps z = mean + std * eps data-like).
SYNTHETIC_LATENT_STD = 0.1
# A small AutoencoderKL with the SD-VAE's latent interface (4 levels -> downsampling 8): only its config is checked
# against the shards (data.check_latent_stats), and it decodes the run's final sample grid.
TINY_VAE_CONFIG = dict(
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    scaling_factor=VAE_SCALING_FACTOR,
)
# loss_log.jsonl rows (one per --logging_steps) dropped at the start of each phase: the first guided row holds CUDA
# start-up and (with --torch_compile) the compilation; the first row after the guide stop may hold guided steps and
# the recompilation for the new graph (no hidden states requested).
WARMUP_ROWS_PER_PHASE = 1

# --- The tolerance check -----------------------------------------------------------------------------------------
# Bound on ||f_g(fp32) - f_g(fp32 weights, bf16 autocast)|| / ||f_g(fp32)||, w = 30. Measured with CPU bf16
# (benchmarks/results/teacher_precision/results.json): at most 0.040 under autocast on every teacher there (SiT-B/2
# random weights; tiny trained 0.030), 0.127 with bf16 weights. 0.05 passes the default setting and fails a teacher
# whose residual stream had silently become bf16.
GUIDE_AUTOCAST_REL_TOL = 0.05
TOLERANCE_BATCH = 16
TOLERANCE_SEED = 0

# --- FLOPs ---------------------------------------------------------------------------------------------------------
# Dense bf16 tensor-core peak FLOP/s (no sparsity), from NVIDIA's data sheets. Matched on torch.cuda.get_device_name();
# "NVIDIA H100 80GB HBM3" is the SXM part. A800 = A100 compute (the paper's machine). Other devices: MFU null.
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100 80GB HBM3", 989.4e12),
    ("H100 SXM", 989.4e12),
    ("A100", 312e12),
    ("A800", 312e12),
)
# --- --smoke: tiny configs on the CPU ---------------------------------------------------------------------------------
SMOKE_MODEL = dict(patch_size=2, num_layers=4, num_attention_heads=2, attention_head_dim=16, mlp_ratio=4.0)
SMOKE_RESOLUTION, SMOKE_CLASSES = 64, 10  # latents 4 x 8 x 8
# one batch of 8 per epoch: the default guide stop (20 epochs) lands at step 20 of 32: rows 2..20 guided, 22..32 not
SMOKE_NUM_LATENTS, SMOKE_SHARD_SIZE = 8, 8
SMOKE_TRAIN_STEPS, SMOKE_BATCH, SMOKE_LOGGING_STEPS = 32, 8, 2
SMOKE_TOLERANCE_BATCH = 4
# SiT-S/4 at 32 px: latents 4 x 4 x 4, one token; the SD-VAE-sized decoder at 32 px is the main cost.
SMOKE_SAMPLING = ["--preset", "SiT-S/4", "--resolution", "32", "--batch", "2", "--steps_scale", "0.02",
                  "--num_classes", "10"]


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs and MFU
# ----------------------------------------------------------------------------------------------------------------------
def device_peak_flops(device_name: str):
    """(dense bf16 peak FLOP/s or None, note) for a device name."""
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak, f"dense bf16 peak of {key}: {peak:.4g} FLOP/s"
    return None, f"no bf16 peak known for {device_name!r} (table: {[k for k, _ in PEAK_BF16_FLOPS]}): MFU is null"


def mfu(images_per_sec: Optional[float], flops_per_image: float, peak: Optional[float]) -> Optional[float]:
    if images_per_sec is None or peak is None:
        return None
    return images_per_sec * flops_per_image / peak


# ----------------------------------------------------------------------------------------------------------------------
# Running parts
# ----------------------------------------------------------------------------------------------------------------------
def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.update(extra or {})
    return env


def command_text(argv: List[str], env_extra: Optional[Dict[str, str]] = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env_extra or {}).items())
    return (prefix + " " if prefix else "") + shlex.join(str(a) for a in argv)


def run_command(argv: List[str], log_path: Path, limit_s: float, env_extra=None) -> Dict[str, Any]:
    """Run argv from the repository root in its own process group; on time-out kill the whole group (accelerate
    launch starts the training in a grandchild, which must not keep the GPU)."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=child_env(env_extra), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode, timed_out = proc.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode, timed_out = proc.wait(), True
    return {"returncode": returncode, "timed_out": timed_out, "seconds": time.monotonic() - start,
            "log": str(log_path), "log_tail": log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]}


class PartFailed(RuntimeError):
    """A part's error together with what it did measure (e.g. a training run stopped by its budget)."""

    def __init__(self, message: str, partial: Dict[str, Any], timed_out: bool = False):
        super().__init__(message)
        self.partial, self.timed_out = partial, timed_out


def check_finished(run: Dict[str, Any], what: str) -> None:
    if run["timed_out"]:
        raise TimeoutError(f"{what} ran past its {run['limit_s']:.0f} s budget; log tail:\n{run['log_tail']}")
    if run["returncode"] != 0:
        raise RuntimeError(f"{what} exited with {run['returncode']}; log tail:\n{run['log_tail']}")


class Runner:
    """Runs the parts in order within the total budget; records each part (result or error) and rewrites the JSON
    after every part, so whatever finished is on disk even if the session ends mid-run."""

    def __init__(self, report: Dict[str, Any], json_path: Path, total_budget_s: float):
        self.report, self.json_path = report, json_path
        self.deadline = time.monotonic() + total_budget_s
        self.start = time.monotonic()

    def part(self, name: str, budget_s: float, fn: Callable[[float], Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        remaining = self.deadline - time.monotonic()
        limit = min(budget_s, remaining)
        entry: Dict[str, Any] = {"budget_s": budget_s, "limit_s": round(limit, 1)}
        self.report["parts"][name] = entry
        if limit < MIN_PART_S:
            entry.update(status="skipped", error=f"only {remaining:.0f} s of the total budget left")
            print(f"[gpu_check] {name}: skipped ({entry['error']})", flush=True)
            self.write()
            return None
        print(f"[gpu_check] {name}: start (limit {limit:.0f} s, {remaining:.0f} s left in total)", flush=True)
        start = time.monotonic()
        try:
            entry.update(fn(limit))
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001  (recorded: the next part must still run)
            timed_out = isinstance(e, TimeoutError) or getattr(e, "timed_out", False)
            entry.update(getattr(e, "partial", {}))
            entry.update(status="timeout" if timed_out else "error",
                         error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-LOG_TAIL_CHARS:])
        entry["seconds"] = round(time.monotonic() - start, 2)
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']:.1f} s"
              + (f" ({entry['error'].splitlines()[0]})" if "error" in entry else ""), flush=True)
        self.write()
        return entry if entry["status"] == "ok" else None

    def write(self):
        self.report["total_seconds"] = round(time.monotonic() - self.start, 2)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, allow_nan=False, default=str))
        os.replace(tmp, self.json_path)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Tolerance of the bf16 teacher settings
# ----------------------------------------------------------------------------------------------------------------------
def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||a - b|| / ||a|| over the whole tensor (fp32)."""
    reference, other = reference.float(), other.float()
    return float(torch.linalg.vector_norm(reference - other) / torch.linalg.vector_norm(reference))


def tolerance_check(config: Dict[str, Any], device: torch.device, batch: int) -> Dict[str, Any]:
    """f_g at w = 30 from `SelfTranscendence.guiding_features`: fp32, fp32 weights + bf16 autocast, bf16 weights."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from overhead import randomize_  # every weight random: adaLN-Zero would make f_c == f_u

    from diffusers_selftrans import SiTTransformer2DModel
    from diffusers_selftrans.alignment.self_transcendence import GUIDANCE_SCALE_SIT, SelfTranscendence

    gen = torch.Generator().manual_seed(TOLERANCE_SEED)
    teacher = randomize_(SiTTransformer2DModel(**config), gen)
    n, c, s = batch, teacher.config.in_channels, teacher.config.sample_size
    x_t = torch.randn(n, c, s, s, generator=gen).to(device)
    t = torch.rand(n, generator=gen).to(device)
    labels = torch.randint(0, teacher.config.num_classes, (n,), generator=gen).to(device)

    def guide(model, **options):
        method = SelfTranscendence(config, model, guidance_scale=GUIDANCE_SCALE_SIT, **options)
        return method.guiding_features(x_t, t, labels)

    # TF32 off: the reference is true fp32.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reference = guide(copy.deepcopy(teacher))
        # --guiding_autocast bf16. On CUDA the method enters the autocast itself; on a CPU it keeps the caller's
        # context (bf16 autocast is slow there), so --smoke enters it here to run the same arithmetic.
        outer = torch.autocast("cpu", dtype=torch.bfloat16) if device.type == "cpu" else contextlib.nullcontext()
        with outer:
            autocast = guide(copy.deepcopy(teacher), teacher_autocast=torch.bfloat16)
        bf16_weights = guide(copy.deepcopy(teacher), teacher_dtype=torch.bfloat16)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    err_autocast = relative_error(reference, autocast)
    err_weights = relative_error(reference, bf16_weights)
    return {
        "guidance_scale": GUIDANCE_SCALE_SIT,
        "batch": n,
        "feature_shape": list(reference.shape),
        "rel_err_fp32_weights_bf16_autocast": err_autocast,
        "rel_err_bf16_weights": err_weights,
        "tolerance": GUIDE_AUTOCAST_REL_TOL,
        "within_tolerance": err_autocast <= GUIDE_AUTOCAST_REL_TOL,
        "reference_is_tf32_free": True,
    }


# ----------------------------------------------------------------------------------------------------------------------
# 2-3. overhead.py and bench_sampling.py (run as they are, with --output_json)
# ----------------------------------------------------------------------------------------------------------------------
def overhead_part(name, preset, batch, work: Path, smoke: bool, peak, commands: List[str]):
    def fn(limit):
        out = work / f"{name}.json"
        argv = [sys.executable, "benchmarks/overhead.py"]
        argv += ["--smoke", "--device", "cpu"] if smoke else ["--preset", preset, "--batch", str(batch),
                                                             "--device", "cuda", "--dtype", "bf16"]
        argv += ["--output_json", str(out)]
        commands.append(command_text(argv))
        run = dict(run_command(argv, work / f"{name}.log", limit), limit_s=limit)
        check_finished(run, "overhead.py")
        data = json.loads(out.read_text())
        flops = training_flops_per_image(data["model_config"])
        steps = {}
        for kind, entry in data["steps"].items():
            ips = data["batch"] / (entry["median_ms"] / 1e3)
            steps[kind] = {k: entry[k] for k in ("median_ms", "min_ms", "ratio_vs_vanilla", "throughput_vs_vanilla",
                                                 "paper_throughput_vs_vanilla")}
            steps[kind].update(images_per_sec=ips, mfu=mfu(ips, flops, peak))
        return {
            "command": command_text(argv), "preset": None if smoke else preset, "batch": data["batch"],
            "dtype": data["dtype"], "params": data["params"], "training_flops_per_image": flops,
            "steps": steps,
            "ours_vs_reference_sit": data["reference"]["ratio_ours_vs_reference"],
            "reference_outputs_match": data["reference"]["outputs_match"],
            "output_json": str(out), "log": run["log"],
        }

    return fn


def sampling_part(work: Path, smoke: bool, commands: List[str]):
    def fn(limit):
        out = work / "sampling.json"
        argv = [sys.executable, "benchmarks/bench_sampling.py"]
        argv += SMOKE_SAMPLING + ["--device", "cpu"] if smoke else [
            "--preset", SAMPLING_PRESET, "--resolution", str(RESOLUTION), "--batch", str(SAMPLING_BATCH),
            "--device", "cuda", "--dtype", "bf16"]
        argv += ["--samplers", "sde", "--only_guided", "--guidance_scale", str(FID_GUIDANCE_SCALE),
                 "--guidance_high", str(FID_GUIDANCE_HIGH), "--repeats", str(SAMPLING_REPEATS),
                 "--output_json", str(out)]
        commands.append(command_text(argv))
        run = dict(run_command(argv, work / "sampling.log", limit), limit_s=limit)
        check_finished(run, "bench_sampling.py")
        data = json.loads(out.read_text())
        sde = next(row for row in data["rows"] if row["sampler"] == "sde")
        decode = next(row for row in data["rows"] if row["sampler"] == "vae_decode")
        return {
            "command": command_text(argv), "preset": data["preset"], "batch": data["batch"], "dtype": data["dtype"],
            "sampler": "sde", "steps": sde["steps"], "nfe": sde["nfe"], "guidance_scale": sde["guidance_scale"],
            "guidance_interval": [0.0, data["guidance_high"]],
            "seconds_per_batch": sde["seconds_per_batch"], "ms_per_image": sde["ms_per_image"],
            "images_per_sec": 1e3 / sde["ms_per_image"],
            "vae_decode_ms_per_image": decode["ms_per_image"],
            "output_json": str(out), "log": run["log"],
        }

    return fn


# ----------------------------------------------------------------------------------------------------------------------
# 4. The stage-2 training command on synthetic latents
# ----------------------------------------------------------------------------------------------------------------------
def write_training_assets(work: Path, smoke: bool) -> Dict[str, Any]:
    """A small offline VAE, synthetic latent shards (as examples/preprocess_latents.py writes them) and a random
    guiding SiT saved as a transformer folder. Returns the paths and the student's model flag."""
    from diffusers import AutoencoderKL

    from diffusers_selftrans import SiTTransformer2DModel
    from diffusers_selftrans.data import (CROP_RECIPE, LATENT_FORMAT_VERSION, LATENT_STATS_FILE, latent_shard_name,
                                          save_latent_shard)
    from diffusers_selftrans.models.transformer_sit import parse_preset

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from overhead import randomize_

    resolution = SMOKE_RESOLUTION if smoke else RESOLUTION
    num_classes = SMOKE_CLASSES if smoke else IMAGENET_CLASSES
    count, shard_size = (SMOKE_NUM_LATENTS, SMOKE_SHARD_SIZE) if smoke else (NUM_SYNTHETIC_LATENTS,
                                                                               SYNTHETIC_SHARD_SIZE)
    latent = resolution // VAE_DOWNSAMPLING
    torch.manual_seed(0)

    # 1. The VAE: what --vae_name_or_path loads; its latent interface must match the shards'.
    vae_dir = work / "vae"
    vae = AutoencoderKL(**TINY_VAE_CONFIG, sample_size=resolution)
    if 2 ** (len(vae.config.block_out_channels) - 1) != VAE_DOWNSAMPLING:
        raise AssertionError("TINY_VAE_CONFIG does not downsample by VAE_DOWNSAMPLING.")
    vae.save_pretrained(vae_dir)

    # 2. Latent shards and stats.json (written last, as preprocess_latents.py does).
    latents_dir = work / "latents"
    latents_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    num_shards = math.ceil(count / shard_size)
    for shard in range(num_shards):
        rows = min(shard_size, count - shard * shard_size)
        tensors = {
            "latent_mean": torch.randn(rows, LATENT_CHANNELS, latent, latent, generator=gen),
            "latent_std": torch.full((rows, LATENT_CHANNELS, latent, latent), SYNTHETIC_LATENT_STD),
            "class_labels": torch.randint(0, num_classes, (rows,), generator=gen),
        }
        metadata = {"format_version": LATENT_FORMAT_VERSION, "world_size": 1, "rank": 0, "shard_size": shard_size,
                    "resolution": resolution, "vae_name_or_path": str(vae_dir), "vae_subfolder": None,
                    "flip": False, "max_samples": None, "shard_index": shard, "num_records": rows, "num_skipped": 0}
        save_latent_shard(str(latents_dir / latent_shard_name(shard, 0)), tensors, metadata)
    stats = {
        "format_version": LATENT_FORMAT_VERSION, "vae_name_or_path": str(vae_dir), "vae_subfolder": None,
        "scaling_factor": VAE_SCALING_FACTOR, "shift_factor": 0.0, "latent_channels": LATENT_CHANNELS,
        "latent_size": [latent, latent], "resolution": resolution, "crop": CROP_RECIPE, "flip": False,
        "num_classes": num_classes, "id2label": None, "count": count, "num_skipped": 0, "num_shards": num_shards,
        "world_size": 1, "shard_size": shard_size, "dtype": "float32", "dataset_name": "synthetic (gpu_check.py)",
        "train_data_dir": None, "dataset_split": None, "sanity_psnr": None,
    }
    (latents_dir / LATENT_STATS_FILE).write_text(json.dumps(stats, indent=2))

    # 3. The guiding model: a random SiT of the student's size (speed does not depend on the weights).
    if smoke:
        model_flag = str(work / "sit-smoke.json")
        Path(model_flag).write_text(json.dumps(SMOKE_MODEL))
        arch = dict(SMOKE_MODEL)
    else:
        model_flag, arch = TRAIN_PRESET, parse_preset(TRAIN_PRESET)
    # As the training script completes it (training.model_config, default flags: qk_norm on, dropout 0.1).
    student_config = dict(arch, sample_size=latent, in_channels=LATENT_CHANNELS, num_classes=num_classes,
                          qk_norm=True, class_dropout_prob=0.1)
    guiding_dir = work / "guiding"
    randomize_(SiTTransformer2DModel(**student_config), torch.Generator().manual_seed(1)).save_pretrained(guiding_dir)
    return {"vae": str(vae_dir), "latents_dir": str(latents_dir), "guiding": str(guiding_dir), "model": model_flag,
            "student_config": student_config, "resolution": resolution, "num_latents": count}


def training_argv(assets: Dict[str, Any], output_dir: Path, compile_on: bool, smoke: bool) -> List[str]:
    """The README's stage-2 command, plus only flags that shrink the run or point at local files."""
    steps = SMOKE_TRAIN_STEPS if smoke else TRAIN_STEPS
    argv = [sys.executable, "-m", "accelerate.commands.launch", "examples/train_self_transcendence.py",
            "--model", assets["model"], "--mixed_precision", "bf16",
            "--guiding_model_name_or_path", assets["guiding"], "--guiding_autocast", "bf16",
            "--output_dir", str(output_dir),
            # local files and a short run
            "--latents_dir", assets["latents_dir"], "--vae_name_or_path", assets["vae"],
            "--max_train_steps", str(steps), "--report_to", "none",
            "--checkpointing_steps", str(steps + 1), "--validation_steps", str(steps + 1)]
    if smoke:
        argv += ["--resolution", str(assets["resolution"]), "--train_batch_size", str(SMOKE_BATCH),
                 "--logging_steps", str(SMOKE_LOGGING_STEPS), "--validation_num_inference_steps", "2", "--no-progress"]
    if compile_on:
        argv.append("--torch_compile")
        if smoke:  # dynamo traces the step as on a GPU; the eager backend skips inductor's minutes of C++ codegen
            argv += ["--torch_compile_backend", "eager"]
    return argv


def throughput_from_loss_log(path: Path, warmup_rows: int = WARMUP_ROWS_PER_PHASE) -> Dict[str, Any]:
    """img/s per phase from loss_log.jsonl's `images_per_sec` rows.

    A row is in the guided phase when it logged a `loss_guide` term; the first `warmup_rows` rows of each phase are
    dropped (start-up / compilation; the first row after the stop may also hold guided steps). Per phase: the
    harmonic mean of the kept rows (= images / seconds over them, every row counting the same number of steps) and
    their median.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} was not written: the run did not reach its first step.")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "images_per_sec" in row:
                rows.append(row)
    phases = {"guided": [r for r in rows if "loss_guide" in r], "after_guide_stop": [r for r in rows if
                                                                                     "loss_guide" not in r]}
    result = {"logged_rows": len(rows), "warmup_rows_skipped_per_phase": warmup_rows}
    for phase, phase_rows in phases.items():
        kept = phase_rows[warmup_rows:]
        values = [float(r["images_per_sec"]) for r in kept]
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError(f"{path}: non-positive or non-finite images_per_sec in {values}.")
        result[phase] = {
            "steps": [r["step"] for r in kept],
            "images_per_sec_rows": values,
            "images_per_sec": len(values) / sum(1 / v for v in values) if values else None,
            "images_per_sec_median": sorted(values)[len(values) // 2] if values else None,
        }
    return result


def training_part(name, assets_box, work: Path, compile_on: bool, smoke: bool, peak, commands: List[str]):
    def fn(limit):
        if "assets" not in assets_box:
            raise RuntimeError("the training assets were not written (see the train_assets part).")
        assets = assets_box["assets"]
        out = work / name
        argv = training_argv(assets, out, compile_on, smoke)
        env = {}
        commands.append(command_text(argv, env))
        run = dict(run_command(argv, work / f"{name}.log", limit, env), limit_s=limit)
        entry = {"command": command_text(argv, env), "torch_compile": compile_on, "log": run["log"],
                 "returncode": run["returncode"], "timed_out": run["timed_out"]}
        if smoke and compile_on:
            entry["note"] = "smoke: --torch_compile_backend eager (dynamo traces the step; no inductor codegen)"
        failed = run["timed_out"] or run["returncode"] != 0
        if failed and not (out / "loss_log.jsonl").exists():
            check_finished(run, "the training run")  # raises, with the log tail
        # A run stopped by its budget still reports the rows it logged.
        figures = throughput_from_loss_log(out / "loss_log.jsonl")
        config = assets["student_config"]
        flops = training_flops_per_image(config)
        guiding_layer = json.loads((out / "args.json").read_text()).get("guiding_layer") if (
            out / "args.json").exists() else None
        from diffusers_selftrans.alignment.common import default_layers

        layer = guiding_layer or default_layers("self_transcendence", config["num_layers"])["guiding_layer"]
        # The guided step also runs the frozen teacher to its block 2n/3 on 2N inputs (cond + null): not model FLOPs.
        teacher_flops = 2 * 2.0 * sit_forward_macs(config, num_blocks=layer)
        for phase in ("guided", "after_guide_stop"):
            ips = figures[phase]["images_per_sec"]
            figures[phase]["mfu"] = mfu(ips, flops, peak)
            if phase == "guided":
                figures[phase]["mfu_incl_teacher"] = mfu(ips, flops + teacher_flops, peak)
        entry.update(figures, training_flops_per_image=flops, teacher_flops_per_image=teacher_flops)
        if failed:
            entry["figures_partial"] = True
            try:
                check_finished(run, "the training run")
            except (TimeoutError, RuntimeError) as e:  # the part's error, with the figures logged before it
                raise PartFailed(str(e), entry, timed_out=run["timed_out"]) from None
        return entry

    return fn


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT_DIR), help="Where the one JSON is written.")
    parser.add_argument("--work_dir", default=None,
                        help="Scratch space for latents, models, runs and logs (default: a new temporary folder).")
    parser.add_argument("--total_budget_s", type=float, default=None,
                        help=f"Default {TOTAL_BUDGET_S} ({SMOKE_TOTAL_BUDGET_S} with --smoke).")
    parser.add_argument("--smoke", action="store_true", help="The same parts on the CPU with tiny configs (tests).")
    args = parser.parse_args(argv)
    if args.total_budget_s is not None and args.total_budget_s <= 0:
        parser.error("--total_budget_s must be positive.")
    return args


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def main(argv=None) -> Path:
    args = parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device (torch.cuda.is_available() is False); "
                         "use --smoke for the CPU dry run.")
    device = torch.device("cpu" if smoke else "cuda")
    device_name = "cpu" if smoke else torch.cuda.get_device_name(device)
    peak, peak_note = (None, "CPU (--smoke): no bf16 peak, MFU is null") if smoke else device_peak_flops(device_name)
    now = datetime.datetime.now()
    json_path = Path(args.output_dir) / f"gpu_check-{device_slug(device_name)}-{now.strftime('%Y%m%d-%H%M%S')}.json"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    script = "benchmarks/gpu_check.py"
    commands: List[str] = []
    report: Dict[str, Any] = {
        "command": "python " + shlex.join([script] + (list(argv) if argv is not None else sys.argv[1:])),
        "smoke": smoke,
        "date": now.isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": platform.machine(),
        "peak_bf16_flops": peak,
        "peak_note": peak_note,
        "flops_formula": "training FLOPs/image = 3 x forward; forward = 2 x multiply-accumulates of all matmuls "
                         "(patch embed, per block qkv 3D^2 + proj D^2 + MLP 2Dh + attention 2TD per token, "
                         "adaLN 6D^2 per image, timestep MLP, final layer); MFU = img/s x that / peak_bf16_flops",
        "paper_reference": "SiT-B/2 23 GMACs forward (paper's '23 Gflops'); 8xA800 at ~297 img/s per GPU = ~13 % "
                           "of 312e12 bf16 peak",
        "work_dir": str(work),
        "total_budget_s": args.total_budget_s or (SMOKE_TOTAL_BUDGET_S if smoke else TOTAL_BUDGET_S),
        "commands": commands,
        "parts": {},
    }
    if peak is None and not smoke:
        print(f"[gpu_check] {peak_note}", flush=True)
    print(f"[gpu_check] {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}; JSON: {json_path}",
          flush=True)
    runner = Runner(report, json_path, report["total_budget_s"])
    budget = (lambda name: SMOKE_PART_BUDGET_S) if smoke else PART_BUDGETS_S.__getitem__

    # 1. Tolerance (seconds; in this process)
    def tolerance(limit):
        from diffusers_selftrans.models.transformer_sit import parse_preset

        if smoke:
            config = dict(SMOKE_MODEL, sample_size=SMOKE_RESOLUTION // VAE_DOWNSAMPLING,
                          in_channels=LATENT_CHANNELS, num_classes=SMOKE_CLASSES)
        else:
            config = dict(parse_preset(TRAIN_PRESET), sample_size=RESOLUTION // VAE_DOWNSAMPLING,
                          in_channels=LATENT_CHANNELS, num_classes=IMAGENET_CLASSES)
        try:
            return tolerance_check(config, device, SMOKE_TOLERANCE_BATCH if smoke else TOLERANCE_BATCH)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next parts are other processes

    runner.part("tolerance", budget("tolerance"), tolerance)

    # 2-3. The benchmarks
    for name, (preset, batch) in OVERHEAD_RUNS.items():
        runner.part(name, budget(name), overhead_part(name, preset, batch, work, smoke, peak, commands))
    runner.part("sampling_XL2", budget("sampling_XL2"), sampling_part(work, smoke, commands))

    # 4. Training, compile off and on
    assets_box: Dict[str, Any] = {}

    def assets(limit):
        assets_box["assets"] = write_training_assets(work / "train_assets", smoke)
        return {k: v for k, v in assets_box["assets"].items()}

    runner.part("train_assets", budget("train_assets"), assets)
    for name, compile_on in (("train_compile_off", False), ("train_compile_on", True)):
        runner.part(name, budget(name), training_part(name, assets_box, work, compile_on, smoke, peak, commands))

    runner.write()
    failed = [name for name, entry in report["parts"].items() if entry["status"] != "ok"]
    print(f"[gpu_check] done in {report['total_seconds']:.0f} s; "
          + (f"not ok: {failed}" if failed else "every part ok") + f"; wrote {json_path}", flush=True)
    return json_path


if __name__ == "__main__":
    main()

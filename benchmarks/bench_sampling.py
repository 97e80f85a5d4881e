# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Time per image of `SiTPipeline`'s samplers: Euler-50, Heun-50 and SDE-250 (REPA's evaluation sampler), with and
without classifier-free guidance.

Weights are random (a preset SiT and an SD-VAE-shaped `AutoencoderKL`), so nothing is downloaded; speed does not depend
on the weights. Sampling (`output_type="latent"`) and VAE decoding are timed separately.

    python benchmarks/bench_sampling.py --preset SiT-B/2 --resolution 256 --batch 64 --device cuda --dtype bf16
    # smoke run on a CPU:
    python benchmarks/bench_sampling.py --preset SiT-S/8 --resolution 64 --steps_scale 0.04 --batch 2 --device cpu
    # only the FID setting (SDE-250, CFG 1.9 on t in [0, 0.65]), as benchmarks/gpu_check.py runs it:
    python benchmarks/bench_sampling.py --preset SiT-XL/2 --batch 64 --dtype bf16 --samplers sde --only_guided \
        --guidance_scale 1.9 --guidance_high 0.65 --output_json sampling.json
    # only SiTPipeline vs a REPA-style Euler loop (same weights, noise, 10 steps, CFG 1.8 on t in [0, 0.7]), without
    # and with CFG, interleaved: `ratio_vs_repa` (benchmarks/results/sampling/bench_sampling_cpu.json)
    python benchmarks/bench_sampling.py --preset SiT-B/2 --resolution 32 --batch 8 --device cpu --samplers \
        --steps_scale 0.2 --guidance_high 0.7 --compare_repa --repeats 3 --output_json bench_sampling_cpu.json
"""

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from diffusers_selftrans import SiTEulerMaruyamaScheduler, SiTPipeline, SiTTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py, also when loaded by path (tests)
from timing import interleaved_timing, summarize, timed  # noqa: E402


# (name, scheduler class, steps): REPA `generate.py` defaults to ODE-50; its FID-50K numbers use SDE-250 (README).
SAMPLERS = (
    ("euler", FlowMatchEulerDiscreteScheduler, 50),
    ("heun", FlowMatchHeunDiscreteScheduler, 50),
    ("sde", SiTEulerMaruyamaScheduler, 250),
)
# The SD-VAE (`stabilityai/sd-vae-ft-mse`) architecture: downsampling 8, 4 latent channels, scaling 0.18215.
SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
VAE_DOWNSAMPLING = 8
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# One untimed call before the timed ones (kernels, allocator); for --compare_repa one untimed round.
WARMUP_CALLS = 1
# --compare_repa: SiTPipeline's Euler output must equal the REPA-style loop's up to float32 rounding (the pipeline keeps
# a float32 state, REPA a float64 one; tests/test_pipeline_sit.py::test_matches_repa_samplers allows 2e-5 on a tiny
# model), as max |ours - repa| / max |repa|; checked in fp32 only (bf16/fp16 weights round the two inputs differently).
REPA_MATCH_RTOL = 1e-4


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="SiT-B/2", help="SiT preset, e.g. SiT-B/2, SiT-XL/2.")
    parser.add_argument("--resolution", type=int, default=256, help="Image size; latents are resolution / 8.")
    parser.add_argument("--batch", type=int, default=16, help="Images per pipeline call.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Transformer and VAE dtype.")
    parser.add_argument("--steps_scale", type=float, default=1.0, help="Multiply every sampler's steps (smoke runs).")
    parser.add_argument("--guidance_scale", type=float, default=1.8, help="CFG scale of the guided rows (REPA: 1.8).")
    parser.add_argument("--guidance_high", type=float, default=1.0,
                        help="Guide only for t <= this (REPA: 0.7); 1.0 guides every step, the worst case.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed calls per row (after one warm-up call).")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", nargs="*", choices=[name for name, _, _ in SAMPLERS], default=None,
                        help="Time only these samplers (default: all; none, with --compare_repa: only the comparison).")
    parser.add_argument("--only_guided", action="store_true",
                        help="Skip the unguided (guidance_scale 1.0) row of each sampler.")
    parser.add_argument("--output_json", default=None, help="Also write the command, device and rows here.")
    parser.add_argument("--compare_repa", action="store_true",
                        help="Also time SiTPipeline's Euler sampler against a REPA-style reference loop (same weights, "
                             "noise, steps and CFG interval), interleaved, without and with CFG: `ratio_vs_repa`.")
    args = parser.parse_args(input_args)
    if args.resolution % VAE_DOWNSAMPLING:
        parser.error(f"--resolution must be divisible by {VAE_DOWNSAMPLING}.")
    if args.samplers == [] and not args.compare_repa:
        parser.error("--samplers without a sampler times nothing (only --compare_repa, if given).")
    if args.steps_scale <= 0 or args.repeats < 1 or args.batch < 1:
        parser.error("--steps_scale must be > 0, --repeats and --batch >= 1.")
    return args


def _seconds(fn, device, repeats):
    """Mean wall time (s) of `repeats` calls after one warm-up call (kernels, allocator)."""
    return statistics.mean(timed(fn, device, WARMUP_CALLS, repeats)) / 1e3


def repa_euler_sampler(model, latents, y, num_steps, cfg_scale, guidance_low, guidance_high, null_class):
    """REPA's `samplers.py::euler_sampler` (heun=False) as a plain loop: float64 state, uniform grid from t=1 to 0, CFG
    by batch concatenation [y, null] where guidance_low <= t <= guidance_high (data at t=0, velocity eps - x0)."""
    y_null = torch.full_like(y, null_class)
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64, device=latents.device)
    x_next = latents.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x_cur = x_next
        use_cfg = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        model_input = torch.cat([x_cur] * 2) if use_cfg else x_cur
        y_cur = torch.cat([y, y_null]) if use_cfg else y
        # REPA casts t to the model dtype; the pipeline (and our forward) keep t in float32, as here.
        time_input = torch.ones(model_input.shape[0], device=latents.device, dtype=torch.float64) * t_cur
        d_cur = model(model_input.to(model.dtype), time_input.to(torch.float32), y_cur, return_dict=False)[0]
        d_cur = d_cur.to(torch.float64)
        if use_cfg:
            d_cond, d_uncond = d_cur.chunk(2)
            d_cur = d_uncond + cfg_scale * (d_cond - d_uncond)
        x_next = x_cur + (t_next - t_cur) * d_cur
    return x_next


def _randomize_(model, seed):
    """Every weight random, fan-in scaled (the adaLN-Zero init gives velocity 0: the outputs would compare nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.02  # keeps the activations O(1)
            p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * std)
    return model


def compare_repa(transformer, vae, labels, args, steps) -> list:
    """SiTPipeline + FlowMatchEulerDiscreteScheduler vs `repa_euler_sampler`, without and with CFG: one row each, with
    the median/min/max times of both (interleaved, rotated every round) and `ratio_vs_repa` = ours / REPA (medians)."""
    model = _randomize_(copy.deepcopy(transformer), args.seed + 1)
    pipe = SiTPipeline(model, vae, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    cfg = model.config
    shape = (args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    y = labels.to(args.device)
    interval = (0.0, args.guidance_high)

    def ours(scale):
        return lambda: pipe(class_labels=labels.tolist(), guidance_scale=scale, guidance_interval=interval,
                            num_inference_steps=steps, latents=noise, output_type="latent").images

    def repa(scale):
        return torch.no_grad()(lambda: repa_euler_sampler(model, noise, y, steps, scale, *interval, cfg.num_classes))

    scales = (1.0, args.guidance_scale)
    fns = {}
    for scale in scales:
        fns[f"pipeline_cfg{scale}"], fns[f"repa_cfg{scale}"] = ours(scale), repa(scale)
    rows = []
    for scale in scales:  # 1. the same samples, or the timing would compare different work
        out, ref = fns[f"pipeline_cfg{scale}"](), fns[f"repa_cfg{scale}"]()
        diff = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if args.dtype == "fp32" and not diff <= REPA_MATCH_RTOL:
            raise AssertionError(f"SiTPipeline differs from the REPA loop at guidance {scale} (max relative difference "
                                 f"{diff:.2e} > {REPA_MATCH_RTOL}): the timing would compare different work.")
        rows.append(dict(sampler="euler_vs_repa", steps=steps, nfe=steps, guidance_scale=scale,
                         guidance_interval=list(interval), max_rel_diff_vs_repa=diff))
    times = interleaved_timing(fns, args.device, WARMUP_CALLS, args.repeats)  # 2. timing
    for row in rows:
        scale = row["guidance_scale"]
        row["pipeline"], row["repa"] = summarize(times[f"pipeline_cfg{scale}"]), summarize(times[f"repa_cfg{scale}"])
        row["ratio_vs_repa"] = row["pipeline"]["median_ms"] / row["repa"]["median_ms"]
        row["ratio_vs_repa_min"] = row["pipeline"]["min_ms"] / row["repa"]["min_ms"]
        row["seconds_per_batch"] = row["pipeline"]["median_ms"] / 1e3
        row["ms_per_image"] = row["pipeline"]["median_ms"] / args.batch
    return rows


def main(args) -> list:
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    transformer = SiTTransformer2DModel.from_preset(
        args.preset, sample_size=args.resolution // VAE_DOWNSAMPLING, num_classes=args.num_classes
    ).to(args.device).eval()
    vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=args.resolution).to(args.device).eval()
    if dtype != torch.float32:
        transformer, vae = transformer.to(dtype), vae.to(dtype)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=torch.Generator().manual_seed(args.seed))
    params = sum(p.numel() for p in transformer.parameters()) / 1e6
    command = f"python {' '.join(shlex.quote(a) for a in sys.argv)}"
    print(f"$ {command}")
    device_name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(f"{args.preset} ({params:.1f}M params) at {args.resolution}px, batch {args.batch}, {args.dtype}, "
          f"device {args.device} ({device_name})")
    print(f"{'sampler':<8}{'steps':>6}{'NFE':>6}{'cfg':>6}{'s/batch':>10}{'ms/image':>10}")

    results = []
    latents = None
    for name, scheduler_cls, base_steps in SAMPLERS:
        if args.samplers is not None and name not in args.samplers:
            continue
        steps = max(1, round(base_steps * args.steps_scale))
        pipe = SiTPipeline(transformer, vae, scheduler_cls())
        pipe.set_progress_bar_config(disable=True)
        for guidance_scale in (args.guidance_scale,) if args.only_guided else (1.0, args.guidance_scale):

            def sample():
                nonlocal latents
                latents = pipe(
                    class_labels=labels.tolist(), guidance_scale=guidance_scale,
                    guidance_interval=(0.0, args.guidance_high), num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(args.seed), output_type="latent",
                ).images

            seconds = _seconds(sample, args.device, args.repeats)
            nfe = 2 * steps - 1 if name == "heun" else steps
            row = dict(sampler=name, steps=steps, nfe=nfe, guidance_scale=guidance_scale, seconds_per_batch=seconds,
                       ms_per_image=1000 * seconds / args.batch)
            results.append(row)
            print(f"{name:<8}{steps:>6}{nfe:>6}{guidance_scale:>6.2f}{seconds:>10.3f}{row['ms_per_image']:>10.1f}")

    if args.compare_repa:
        euler_steps = next(base for name, _, base in SAMPLERS if name == "euler")
        steps = max(1, round(euler_steps * args.steps_scale))
        for row in compare_repa(transformer, vae, labels, args, steps):
            results.append(row)
            p, r = row["pipeline"], row["repa"]
            print(f"ratio_vs_repa euler-{steps} cfg {row['guidance_scale']:.2f}: {row['ratio_vs_repa']:.3f} (medians: "
                  f"pipeline {p['median_ms']:.1f} ms, repa {r['median_ms']:.1f} ms; of the minima "
                  f"{row['ratio_vs_repa_min']:.3f}; max relative output difference {row['max_rel_diff_vs_repa']:.1e})")

    @torch.no_grad()
    def decode():
        return vae.decode((latents / vae.config.scaling_factor).to(dtype)).sample

    if latents is not None:  # a sampler row ran
        seconds = _seconds(decode, args.device, args.repeats)
        results.append(dict(sampler="vae_decode", seconds_per_batch=seconds, ms_per_image=1000 * seconds / args.batch))
        print(f"{'decode':<8}{'':>6}{'':>6}{'':>6}{seconds:>10.3f}{1000 * seconds / args.batch:>10.1f}")
    if args.output_json:
        info = dict(command=command, device=str(args.device), device_name=device_name, torch=torch.__version__,
                    preset=args.preset, params_millions=params, resolution=args.resolution, batch=args.batch,
                    dtype=args.dtype, guidance_high=args.guidance_high, repeats=args.repeats, rows=results)
        if args.compare_repa:
            info["ratio_vs_repa"] = {("cfg" if row["guidance_scale"] != 1.0 else "no_cfg"): row["ratio_vs_repa"]
                                     for row in results if row["sampler"] == "euler_vs_repa"}
        with open(args.output_json, "w") as f:
            json.dump(info, f, indent=2)
    return results


if __name__ == "__main__":
    main(parse_args())

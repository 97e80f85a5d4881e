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
"""

import argparse
import json
import shlex
import sys
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from diffusers_selftrans import SiTEulerMaruyamaScheduler, SiTPipeline, SiTTransformer2DModel


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
    parser.add_argument("--samplers", nargs="+", choices=[name for name, _, _ in SAMPLERS], default=None,
                        help="Time only these samplers (default: all).")
    parser.add_argument("--only_guided", action="store_true",
                        help="Skip the unguided (guidance_scale 1.0) row of each sampler.")
    parser.add_argument("--output_json", default=None, help="Also write the command, device and rows here.")
    args = parser.parse_args(input_args)
    if args.resolution % VAE_DOWNSAMPLING:
        parser.error(f"--resolution must be divisible by {VAE_DOWNSAMPLING}.")
    if args.steps_scale <= 0 or args.repeats < 1 or args.batch < 1:
        parser.error("--steps_scale must be > 0, --repeats and --batch >= 1.")
    return args


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats):
    fn()  # warm-up: kernels, allocator
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats, out


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
                return pipe(
                    class_labels=labels.tolist(), guidance_scale=guidance_scale,
                    guidance_interval=(0.0, args.guidance_high), num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(args.seed), output_type="latent",
                ).images

            seconds, latents = _timed(sample, args.device, args.repeats)
            nfe = 2 * steps - 1 if name == "heun" else steps
            row = dict(sampler=name, steps=steps, nfe=nfe, guidance_scale=guidance_scale, seconds_per_batch=seconds,
                       ms_per_image=1000 * seconds / args.batch)
            results.append(row)
            print(f"{name:<8}{steps:>6}{nfe:>6}{guidance_scale:>6.2f}{seconds:>10.3f}{row['ms_per_image']:>10.1f}")

    @torch.no_grad()
    def decode():
        return vae.decode((latents / vae.config.scaling_factor).to(dtype)).sample

    seconds, _ = _timed(decode, args.device, args.repeats)
    results.append(dict(sampler="vae_decode", seconds_per_batch=seconds, ms_per_image=1000 * seconds / args.batch))
    print(f"{'decode':<8}{'':>6}{'':>6}{'':>6}{seconds:>10.3f}{1000 * seconds / args.batch:>10.1f}")
    if args.output_json:
        info = dict(command=command, device=str(args.device), device_name=device_name, torch=torch.__version__,
                    preset=args.preset, params_millions=params, resolution=args.resolution, batch=args.batch,
                    dtype=args.dtype, guidance_high=args.guidance_high, repeats=args.repeats, rows=results)
        with open(args.output_json, "w") as f:
            json.dump(info, f, indent=2)
    return results


if __name__ == "__main__":
    main(parse_args())

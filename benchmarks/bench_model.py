# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Micro-benchmark of SiTTransformer2DModel: one training step, a forward pass, and the early-exit teacher pass.

Prints plain `name value unit` lines preceded by the command that produced them, e.g.

    python benchmarks/bench_model.py --preset SiT-B/2 --batch 8 --resolution 32 --device cuda

Measured (median over `--repeats` after `--warmup` untimed runs, device synchronised around each run):
- train_step: forward + velocity MSE + backward + AdamW step (+ zero_grad), model in train mode (label dropout on);
- forward: `torch.no_grad()` forward in eval mode;
- stop_at_layer k for k = n/2 and floor(2n/3) (the Self-Transcendence student and guiding-teacher layers, method-notes §3.2):
  the teacher's feature pass, `no_grad`, eval mode;
- peak memory of the training step: `torch.cuda.max_memory_allocated` on GPU (tensors only, allocator cache excluded);
  on CPU the growth of the process's peak resident set size (`resource.getrusage(...).ru_maxrss`) across the training
  steps, a lower bound (the high-water mark only moves if the step needs more than anything before it).
"""

import argparse
import math
import platform
import resource
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_selftrans import SiTTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py, also when loaded by path (tests)
from timing import summarize, timed  # noqa: E402

# REPA/Self-Transcendence optimiser (REPA `train.py`: AdamW, lr 1e-4, betas (0.9, 0.999), weight decay 0).
LEARNING_RATE = 1e-4
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="SiT-B/2", help="SiT preset, e.g. SiT-B/2, SiT-XL/2.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32,
                        help="LATENT side length = the model's sample_size (32 for 256 px images with the SD-VAE, 64 for 512 px).")
    parser.add_argument("--in_channels", type=int, default=4)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--qk_norm", action="store_true", help="Self-Transcendence's q/k LayerNorm.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="Autocast dtype for the forward passes (weights and optimiser stay fp32).")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def median_min_max(fn, device, warmup, repeats):
    """Median, min and max wall time in milliseconds."""
    summary = summarize(timed(fn, device, warmup, repeats))
    return summary["median_ms"], summary["min_ms"], summary["max_ms"]


def main(argv=None):
    args = parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        raise ValueError("--repeats and --batch must be >= 1 and --warmup >= 0.")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    model = SiTTransformer2DModel.from_preset(
        args.preset, sample_size=args.resolution, in_channels=args.in_channels, num_classes=args.num_classes,
        qk_norm=args.qk_norm,
    ).to(device)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    depth = model.config.num_layers
    # n/2 and 2n/3 (floor; for XL, 28 -> 18, the paper's 18.67 is ambiguous between 18 and 19).
    stop_layers = sorted({max(1, depth // 2), max(1, 2 * depth // 3)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)

    n, c, s = args.batch, args.in_channels, args.resolution
    x0, eps = torch.randn(n, c, s, s, device=device), torch.randn(n, c, s, s, device=device)
    t = torch.rand(n, device=device)
    y = torch.randint(0, args.num_classes, (n,), device=device)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps  # data at t=0, velocity eps - x0

    def train_step():
        with autocast():
            pred = model(x_t, t, y).sample
        loss = F.mse_loss(pred.float(), eps - x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), autocast():
            model(x_t, t, y)

    def early_exit(k):
        def run():
            with torch.no_grad(), autocast():
                model(x_t, t, y, stop_at_layer=k)
        return run

    results = []
    # Training first: on CPU the ru_maxrss high-water mark then reflects the training step, not the lighter passes.
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    results.append(("train_step", median_min_max(train_step, device, args.warmup, args.repeats)))
    if device.type == "cuda":
        peak = ("peak_memory_train_step_cuda_max_allocated", torch.cuda.max_memory_allocated(device) / 2**20, "MiB")
    else:
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        peak = ("peak_memory_train_step_cpu_maxrss_growth", growth / 1024, "MiB")
    model.eval()
    results.append(("forward", median_min_max(forward, device, args.warmup, args.repeats)))
    for k in stop_layers:
        results.append((f"stop_at_layer_{k}_of_{depth}",
                        median_min_max(early_exit(k), device, args.warmup, args.repeats)))

    params = sum(p.numel() for p in model.parameters())
    print("# command: python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"# device: {device} ({name}), torch {torch.__version__}, dtype {args.dtype}, "
          f"warmup {args.warmup}, repeats {args.repeats}, tokens {(s // model.config.patch_size) ** 2}")
    print(f"params {params / 1e6:.1f} M")
    for label, (median, low, high) in results:
        print(f"{label}_ms {median:.2f}  (min {low:.2f}, max {high:.2f})")
        print(f"{label}_samples_per_s {n / median * 1e3:.1f}")
    print(f"{peak[0]} {peak[1]:.1f} {peak[2]}")
    return results


if __name__ == "__main__":
    main()

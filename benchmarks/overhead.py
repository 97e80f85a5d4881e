# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""What Self-Transcendence costs per training step, and what our SiT costs next to a plain PyTorch SiT.

One run (one process, one set of inputs, repeats interleaved across configurations, warmup, medians):

1. Training-step time of the scripts' real step (`compute_loss` of `examples/train_align.py` and
   `examples/train_self_transcendence.py`: transport draw, label-dropout draw,
   student forward, flow-matching MSE + alignment terms, backward, gradient clipping, AdamW step), without
   accelerate or data (random latents and labels), for
   - `vanilla`: `build_alignment("none")`;
   - `st_guided`: Self-Transcendence stage 2 in its guided phase (`guide_stop_step=10**9`): one batched 2N pass of a
     frozen same-size teacher to block 2n/3, the projector and the MSE;
   - `st_after_stop`: stage 2 after its early stop (`guide_stop_step=0`): no teacher, no projector;
   - `stage1_vae_align`: stage 1 (`vae_align`), for reference;
   reported as step-time ratios vs vanilla (and throughput = 1 / ratio). Paper reference (method-notes §7.4, 8xA800,
   SiT-B/2, batch 256): guided phase 0.72x vanilla throughput, stage 1 0.94x.
2. `SiTTransformer2DModel` forward + backward vs `ReferenceSiT`, an independent straightforward PyTorch SiT written
   below with the same parameter layout. Our weights (randomised, so every layer matters) are copied into it and the
   outputs and gradients must match before anything is timed, so both sides run the same computation.

    python benchmarks/overhead.py --preset SiT-B/2 --batch 64 --device cuda --dtype bf16 --output_json overhead.json
    python benchmarks/overhead.py --latent_size 8 --batch 64 --device cpu --threads 1 \
        --model_config '{"num_layers": 6, "num_attention_heads": 2, "attention_head_dim": 64}'
    python benchmarks/overhead.py --smoke          # a tiny model, seconds

Prints the command, the device and Markdown tables (median ms, ratios); `--output_json` gets the same numbers.
"""

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import train_align  # noqa: E402  (the training steps timed here are the scripts' own `compute_loss`)
import train_self_transcendence  # noqa: E402

from diffusers_selftrans import SiTTransformer2DModel  # noqa: E402
from diffusers_selftrans.alignment import build_alignment
from diffusers_selftrans.alignment.common import resolve_sit_config
from diffusers_selftrans.models.projector import DEFAULT_PROJECTOR_DIM
from diffusers_selftrans.models.transformer_sit import TIMESTEP_FREQUENCY_DIM, parse_preset
from diffusers_selftrans.cli import DEFAULT_LEARNING_RATE, DEFAULT_MAX_GRAD_NORM
from diffusers_selftrans.transport import Transport

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py, also when loaded by path (tests)
from timing import interleaved_timing, summarize  # noqa: E402

DEFAULT_PRESET = "SiT-B/2"
# SD-VAE latents of 256 px ImageNet images (the paper's setting).
DEFAULT_LATENT_SIZE = 32
DEFAULT_BATCH = 64
DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 10
# A guide stop far beyond any benchmark: the guided phase stays on for every timed step.
NEVER_STOP = 10**9
# --smoke: a model small enough for a CPU test that still has every piece (3 blocks: ST layers 2 -> 2, stage 1 block 1).
SMOKE_CONFIG = dict(num_layers=3, num_attention_heads=2, attention_head_dim=16, patch_size=2, num_classes=10)
SMOKE_LATENT_SIZE, SMOKE_BATCH, SMOKE_WARMUP, SMOKE_REPEATS = 8, 4, 1, 2
# One intra-op thread for --smoke: on a busy shared CPU, threads of tiny ops spend ~100x longer waiting on each other.
SMOKE_THREADS = 1
# Paper §4.5 via method-notes §7.4: images/s relative to vanilla SiT-B/2 (9.28 it/s); after the stop = vanilla speed.
PAPER_THROUGHPUT = {"vanilla": 1.0, "st_guided": 6.69 / 9.28, "st_after_stop": 1.0, "stage1_vae_align": 8.70 / 9.28}
STEP_KINDS = ("vanilla", "st_guided", "st_after_stop", "stage1_vae_align")
STEP_LABELS = {
    "vanilla": "vanilla SiT (`none`)",
    "st_guided": "ST stage 2, guided phase",
    "st_after_stop": "ST stage 2, after the guide stop",
    "stage1_vae_align": "ST stage 1 (`vae_align`)",
}
# Tolerance of the ours-vs-reference check (fp32), relative to the largest magnitude of the compared tensor.
MATCH_RTOL = 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- The independent reference SiT -----------------------------------------------------------------------------------
class _RefPatchEmbed(nn.Module):
    def __init__(self, patch, channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class _RefTimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=TIMESTEP_FREQUENCY_DIM, max_period=10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # DiT/SiT: cos first


class _RefLabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim, with_null):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null), dim)

    def forward(self, labels):
        return self.embedding_table(labels)


class _RefAttention(nn.Module):
    def __init__(self, dim, heads, head_dim, qk_norm):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, -1))


class _RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _RefBlock(nn.Module):
    def __init__(self, dim, heads, head_dim, mlp_ratio, qk_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _RefAttention(dim, heads, head_dim, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = _RefMlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + s2)


class _RefFinalLayer(nn.Module):
    def __init__(self, dim, out_features):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


def _ref_sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE/DiT 2-D sin-cos table (T, D): first half from the column index, second half from the row index."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angles = torch.outer(pos, omega)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class ReferenceSiT(nn.Module):
    """A minimal class-conditional SiT (DiT recipe) with the parameter names of `SiTTransformer2DModel`.

    Plain SiT only (LayerNorm, GELU-tanh MLP, no RoPE, data-at-0 time); `qk_norm` and `learn_sigma` are supported.
    """

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        cfg = resolve_sit_config(config)
        plain = {"norm_type": "layer_norm", "mlp_type": "gelu", "use_rope": False, "time_convention": "repa"}
        unsupported = {k: cfg[k] for k, value in plain.items() if cfg[k] != value}
        if unsupported:
            raise ValueError(f"ReferenceSiT implements plain SiT only; this config sets {unsupported}.")
        dim, p = cfg["hidden_size"], cfg["patch_size"]
        self.patch, self.num_classes, self.out_channels = p, cfg["num_classes"], cfg["out_channels"]
        final_channels = cfg["out_channels"] * (2 if cfg["learn_sigma"] else 1)
        self.x_embedder = _RefPatchEmbed(p, cfg["in_channels"], dim)
        self.t_embedder = _RefTimestepEmbedder(dim)
        self.y_embedder = _RefLabelEmbedder(cfg["num_classes"], dim, cfg["class_dropout_prob"] > 0)
        self.register_buffer("pos_embed", _ref_sincos_2d(dim, cfg["sample_size"] // p)[None], persistent=False)
        self.blocks = nn.ModuleList(
            _RefBlock(dim, cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["mlp_ratio"], cfg["qk_norm"])
            for _ in range(cfg["num_layers"])
        )
        self.final_layer = _RefFinalLayer(dim, p * p * final_channels)

    def forward(self, x, t, labels, force_drop_ids=None):
        n, _, h, w = x.shape
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.bool(), torch.full_like(labels, self.num_classes), labels)
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(labels)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)  # (N, T, p*p*C)
        p, gh, gw = self.patch, h // self.patch, w // self.patch
        out = out.reshape(n, gh, gw, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(n, -1, h, w)
        return out[:, : self.out_channels]


# --- Helpers -------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--preset", default=None, help=f"SiT preset (default {DEFAULT_PRESET}).")
    size.add_argument("--model_config", default=None,
                      help="SiTTransformer2DModel config as a JSON string or a JSON file (instead of --preset).")
    parser.add_argument("--batch", type=int, default=None, help=f"Per-step batch (default {DEFAULT_BATCH}).")
    parser.add_argument("--latent_size", type=int, default=None,
                        help=f"Latent side = sample_size (default {DEFAULT_LATENT_SIZE}, or --model_config's).")
    parser.add_argument("--warmup", type=int, default=None, help=f"Untimed rounds (default {DEFAULT_WARMUP}).")
    parser.add_argument("--repeats", type=int, default=None, help=f"Timed rounds (default {DEFAULT_REPEATS}).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="bf16: autocast on CUDA (weights, optimiser and losses fp32; teacher_autocast=bf16).")
    parser.add_argument("--projector_dim", type=int, default=DEFAULT_PROJECTOR_DIM, help="Projector MLP width.")
    parser.add_argument("--max_grad_norm", type=float, default=DEFAULT_MAX_GRAD_NORM, help="0 disables clipping.")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch.set_num_threads for this run (restored after it); --smoke: {SMOKE_THREADS}.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--smoke", action="store_true",
                        help=f"Tiny model, warmup {SMOKE_WARMUP}, repeats {SMOKE_REPEATS} (seconds; for tests).")
    return parser.parse_args(argv)


def resolve_setup(args) -> Dict[str, Any]:
    """Flags -> model config, batch, warmup, repeats (explicit flags win over --smoke's small defaults)."""
    if args.model_config is not None:
        text = args.model_config
        if os.path.isfile(text):
            with open(text) as f:
                text = f.read()
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_config is neither a JSON file nor a JSON object: {e}") from None
        if not isinstance(config, dict):
            raise ValueError("--model_config must be a JSON object of SiTTransformer2DModel fields.")
    elif args.preset is not None:
        config = parse_preset(args.preset)
    else:
        config = dict(SMOKE_CONFIG) if args.smoke else parse_preset(DEFAULT_PRESET)
    latent = args.latent_size or config.get("sample_size") or (SMOKE_LATENT_SIZE if args.smoke else DEFAULT_LATENT_SIZE)
    if "sample_size" in config and config["sample_size"] != latent:
        raise ValueError(f"--latent_size {latent} contradicts the model config's sample_size {config['sample_size']}.")
    config["sample_size"] = latent
    resolve_sit_config(config)  # unknown fields -> ValueError
    def pick(value, smoke, default):
        return value if value is not None else (smoke if args.smoke else default)

    setup = {
        "config": config,
        "threads": pick(args.threads, SMOKE_THREADS, None),
        "batch": pick(args.batch, SMOKE_BATCH, DEFAULT_BATCH),
        "warmup": pick(args.warmup, SMOKE_WARMUP, DEFAULT_WARMUP),
        "repeats": pick(args.repeats, SMOKE_REPEATS, DEFAULT_REPEATS),
    }
    if setup["batch"] < 1 or setup["repeats"] < 1 or setup["warmup"] < 0:
        raise ValueError("--batch and --repeats must be >= 1 and --warmup >= 0.")
    if args.dtype != "fp32" and args.device != "cuda":
        raise ValueError("--dtype bf16 (autocast) is benchmarked on CUDA only; use fp32 on CPU.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available.")
    return setup


def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every weight random (the adaLN-Zero init makes the output identically 0, which would compare nothing)."""
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.02  # fan-in scaling keeps activations O(1)
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def max_relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-12))


# --- 1. Training-step overhead -------------------------------------------------------------------------------------
def make_step(kind, config, teacher, base_state, args, device, x0, labels, autocast, seed):
    """One configuration of the training step: the scripts' own `compute_loss` (stage 1: `train_align.py`, stage 2:
    `train_self_transcendence.py`), backward, clipping and AdamW, with its own student (same initial weights)."""
    model = SiTTransformer2DModel(**config)
    model.load_state_dict(base_state)
    model.to(device).train()
    if kind == "vanilla":
        method = build_alignment("none", model.config)
    elif kind == "stage1_vae_align":
        method = build_alignment("vae_align", model.config, projector_dim=args.projector_dim)
    else:
        stop = NEVER_STOP if kind == "st_guided" else 0
        method = build_alignment("self_transcendence", model.config, teacher=teacher, guide_stop_step=stop,
                                 projector_dim=args.projector_dim,
                                 teacher_autocast=torch.bfloat16 if args.dtype == "bf16" else None)
    method.to(device)
    heads = method.trainable_modules()
    # As train(): the optimiser is built before the first is_active() call (a stopped projector simply gets no grads).
    params = list(model.parameters()) + [p for h in heads for p in h.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=DEFAULT_LEARNING_RATE)
    transport = Transport()
    dropout = model.config.class_dropout_prob
    compute_loss = (train_self_transcendence if kind.startswith("st_") else train_align).compute_loss
    state = {"step": 0}

    def step():
        # The same draws for every configuration in a given round (time, noise, label dropout): seeded by the round.
        torch.manual_seed(seed + state["step"])
        with autocast():
            loss, _, _ = compute_loss(model, method, x0, labels, transport, step=state["step"],
                                      class_dropout_prob=dropout)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

    return step, method, state


def bench_steps(config, args, setup, device, autocast) -> Dict[str, Any]:
    n, size = setup["batch"], config["sample_size"]
    cfg = resolve_sit_config(config)
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(n, cfg["in_channels"], size, size, generator=gen).to(device)
    labels = torch.randint(0, cfg["num_classes"], (n,), generator=gen).to(device)
    torch.manual_seed(args.seed)
    base_state = SiTTransformer2DModel(**config).state_dict()
    # The frozen guiding model: same size as the student (random weights; the cost does not depend on them).
    teacher = randomize_(SiTTransformer2DModel(**config), torch.Generator().manual_seed(args.seed + 1)).to(device)
    steps, methods, states = {}, {}, {}
    for kind in STEP_KINDS:
        steps[kind], methods[kind], states[kind] = make_step(kind, config, teacher, base_state, args, device, x0,
                                                             labels, autocast, args.seed)
    del teacher  # only the guided method still holds it
    times = interleaved_timing(steps, device, setup["warmup"], setup["repeats"])
    vanilla = statistics.median(times["vanilla"])
    results = {}
    for kind in STEP_KINDS:
        entry = summarize(times[kind])
        entry["ratio_vs_vanilla"] = entry["median_ms"] / vanilla
        entry["throughput_vs_vanilla"] = vanilla / entry["median_ms"]
        entry["paper_throughput_vs_vanilla"] = PAPER_THROUGHPUT[kind]
        entry["steps_run"] = states[kind]["step"]
        entry["teacher_forwards"] = getattr(methods[kind], "teacher_forwards", None)
        if kind.startswith("st_"):
            entry["teacher_released"] = methods[kind].teacher is None
        entry["trainable_alignment_params"] = sum(p.numel() for p in methods[kind].parameters() if p.requires_grad)
        results[kind] = entry
    return results


# --- 2. Our model vs the reference ---------------------------------------------------------------------------------
def bench_reference(config, args, setup, device, autocast) -> Dict[str, Any]:
    n, size = setup["batch"], config["sample_size"]
    ours = randomize_(SiTTransformer2DModel(**config), torch.Generator().manual_seed(args.seed + 2))
    reference = ReferenceSiT(config)
    reference.load_state_dict(ours.state_dict(), strict=True)  # the same parameter layout, name for name
    ours.to(device).train()
    reference.to(device).train()
    cfg = resolve_sit_config(config)
    gen = torch.Generator().manual_seed(args.seed + 3)
    x = torch.randn(n, cfg["in_channels"], size, size, generator=gen).to(device)
    t = torch.rand(n, generator=gen).to(device)
    labels = torch.randint(0, cfg["num_classes"], (n,), generator=gen).to(device)
    drop = (torch.rand(n, generator=gen) < cfg["class_dropout_prob"]).long().to(device)
    target = torch.randn(n, cfg["out_channels"], size, size, generator=gen).to(device)
    run_ours = lambda: ours(x, t, labels, force_drop_ids=drop).sample  # noqa: E731
    run_ref = lambda: reference(x, t, labels, force_drop_ids=drop)  # noqa: E731

    # 1. Equal computations: fp32 outputs and every parameter gradient must agree (TF32 off for the check).
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out_ours, out_ref = run_ours(), run_ref()
        out_ours.pow(2).mean().backward()
        out_ref.pow(2).mean().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    output_diff = max_relative_diff(out_ours.detach(), out_ref.detach())
    ref_params = dict(reference.named_parameters())
    grad_diff = max(max_relative_diff(p.grad, ref_params[name].grad) for name, p in ours.named_parameters())
    outputs_match = output_diff <= MATCH_RTOL
    grads_match = grad_diff <= MATCH_RTOL
    if not (outputs_match and grads_match):
        raise AssertionError(f"ReferenceSiT does not reproduce SiTTransformer2DModel (max relative difference: output "
                             f"{output_diff:.2e}, gradients {grad_diff:.2e}); the timing would compare different work.")
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)

    # 2. Timing: forward + MSE + backward, in the benchmark's dtype.
    def fwd_bwd(run, model):
        def fn():
            with autocast():
                pred = run()
            ((pred.float() - target) ** 2).mean().backward()
            model.zero_grad(set_to_none=True)
        return fn

    times = interleaved_timing({"ours": fwd_bwd(run_ours, ours), "reference": fwd_bwd(run_ref, reference)},
                               device, setup["warmup"], setup["repeats"])
    result = {"ours": summarize(times["ours"]), "reference": summarize(times["reference"])}
    result["ratio_ours_vs_reference"] = result["ours"]["median_ms"] / result["reference"]["median_ms"]
    result.update(outputs_match=outputs_match, grads_match=grads_match, output_max_rel_diff=output_diff,
                  grad_max_rel_diff=grad_diff, tolerance_rel=MATCH_RTOL)
    return result


# --- Report --------------------------------------------------------------------------------------------------------
def markdown_tables(steps: Dict[str, Any], reference: Dict[str, Any]) -> str:
    lines = [
        "| training step | median ms | min ms | step time vs vanilla | throughput vs vanilla | paper throughput "
        "| teacher forwards |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in STEP_KINDS:
        e = steps[kind]
        forwards = "-" if e["teacher_forwards"] is None else f"{e['teacher_forwards']} / {e['steps_run']} steps"
        lines.append(f"| {STEP_LABELS[kind]} | {e['median_ms']:.2f} | {e['min_ms']:.2f} | {e['ratio_vs_vanilla']:.3f}x "
                     f"| {e['throughput_vs_vanilla']:.3f}x | {e['paper_throughput_vs_vanilla']:.2f}x | {forwards} |")
    lines += [
        "",
        "| forward + backward | median ms | min ms | ours / reference |",
        "|---|---:|---:|---:|",
        f"| SiTTransformer2DModel (ours) | {reference['ours']['median_ms']:.2f} | {reference['ours']['min_ms']:.2f} "
        f"| {reference['ratio_ours_vs_reference']:.3f}x |",
        f"| ReferenceSiT (plain PyTorch) | {reference['reference']['median_ms']:.2f} "
        f"| {reference['reference']['min_ms']:.2f} | 1.000x |",
        "",
        f"Reference check (fp32, before timing): outputs match {reference['outputs_match']} "
        f"(max rel. diff {reference['output_max_rel_diff']:.1e}), gradients match {reference['grads_match']} "
        f"(max rel. diff {reference['grad_max_rel_diff']:.1e}), tolerance {reference['tolerance_rel']:.0e}.",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    setup = resolve_setup(args)
    threads = torch.get_num_threads()
    if setup["threads"]:
        torch.set_num_threads(setup["threads"])
    # The command as typed (or as a caller passed it to main(argv)), so a table can be reproduced.
    script, rest = (sys.argv[0], sys.argv[1:]) if argv is None else ("benchmarks/overhead.py", list(argv))
    command = "python " + " ".join(shlex.quote(a) for a in [script] + rest)
    try:
        return run(args, setup, command)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process


def run(args, setup, command: str) -> Dict[str, Any]:
    config = setup["config"]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    cfg = resolve_sit_config(config)
    header = (f"device: {device} ({device_name}), torch {torch.__version__}, dtype {args.dtype}, "
              f"batch {setup['batch']}, latent {cfg['sample_size']}, tokens {cfg['num_tokens']}, "
              f"depth {cfg['num_layers']}, width {cfg['hidden_size']}, warmup {setup['warmup']}, "
              f"repeats {setup['repeats']} (interleaved medians)")
    print(f"# command: {command}")
    print(f"# {header}", flush=True)

    reference = bench_reference(config, args, setup, device, autocast)
    steps = bench_steps(config, args, setup, device, autocast)
    table = markdown_tables(steps, reference)
    print(table)

    result = {
        "command": command,
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "model_config": config,
        "params": sum(p.numel() for p in SiTTransformer2DModel(**config).parameters()),
        "batch": setup["batch"],
        "latent_size": cfg["sample_size"],
        "warmup": setup["warmup"],
        "repeats": setup["repeats"],
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "projector_dim": args.projector_dim,
        "max_grad_norm": args.max_grad_norm,
        "steps": steps,
        "reference": reference,
        "markdown": table,
    }
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Model FLOPs of SiT training, computed from the configs (shared by `gpu_check.py` and `evidence.py`).

Forward cost: 2 FLOPs per multiply-accumulate of every matmul (as nanoGPT's estimate_mfu / PaLM appendix B), nothing
for norms, activations, softmax or adds. Training a module = 3 x its forward (the backward pass computes gradients for
activations and for weights, 2 x forward). A frozen module that is only run forward (the guiding model) costs 1 x.

Per training image:
- vanilla: 3 x forward FLOPs of the student;
- `vae_align` (stage 1): + 3 x the alignment projector and its head (trained);
- Self-Transcendence (stage 2), while the guide is active: + 3 x the projector + the frozen guiding model's forward
  up to its guiding block, twice (the true label and the null class, one batched pass); after the guide stop the step
  is a vanilla step.
"""

from typing import Any, Dict, Optional

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

# See the module docstring. The DiT/SiT papers' "Gflops" count multiply-accumulates (fvcore): SiT-B/2 23 G and
# SiT-XL/2 118.6 G per 256 px image, so forward FLOPs are twice those.
# Scale: the paper's 8xA800 run trained SiT-B/2 at ~297 img/s per GPU: 297 x 6 x 23e9 / 312e12 = ~13 % of peak.
TRAINING_FLOPS_PER_FORWARD = 3
FLOPS_PER_MAC = 2.0
PAPER_MACS_PER_IMAGE = {"SiT-B/2": 23.0e9, "SiT-XL/2": 118.6e9}
# The guiding model runs the conditional and the unconditional pass (f_c, f_u) on every training image.
GUIDE_PASSES = 2


# Counting FLOPs of a real step with `torch.utils.flop_counter.FlopCounterMode(custom_mapping=CPU_ATTENTION_FLOPS)`:
# the CPU flash-attention kernel (what SDPA runs on this machine) is not in its table; torch's own SDPA formulas.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def sit_forward_macs(config: Dict[str, Any], num_blocks: Optional[int] = None) -> int:
    """Multiply-accumulates of one image's forward pass through a SiT config (all matmuls, see the formula above).

    `num_blocks`: stop after that many blocks, without the final layer (the teacher's early exit).
    """
    from diffusers_selftrans.alignment.common import resolve_sit_config
    from diffusers_selftrans.models.transformer_sit import TIMESTEP_FREQUENCY_DIM

    cfg = resolve_sit_config(config)
    d, t, p = cfg["hidden_size"], cfg["num_tokens"], cfg["patch_size"]
    blocks = cfg["num_layers"] if num_blocks is None else num_blocks
    if not 0 <= blocks <= cfg["num_layers"]:
        raise ValueError(f"num_blocks must be in [0, {cfg['num_layers']}], got {num_blocks}.")
    hidden = int(d * cfg["mlp_ratio"])
    if cfg["mlp_type"] == "swiglu":
        mlp = 3 * d * int(2 * hidden / 3)  # w12: D -> 2h', w3: h' -> D (LightningDiT SwiGLUFFN)
    else:
        mlp = 2 * d * hidden  # fc1, fc2
    per_token_block = 3 * d * d + d * d + mlp + 2 * t * d  # qkv, out proj, MLP, QK^T and AV
    per_image_block = 6 * d * d  # adaLN modulation (per image, not per token)
    macs = t * p * p * cfg["in_channels"] * d  # patch embedding
    macs += TIMESTEP_FREQUENCY_DIM * d + d * d  # timestep MLP
    macs += blocks * (t * per_token_block + per_image_block)
    if num_blocks is None:
        final_channels = cfg["out_channels"] * (2 if cfg["learn_sigma"] else 1)
        macs += t * d * p * p * final_channels + 2 * d * d  # final linear, final adaLN
    return macs


def training_flops_per_image(config: Dict[str, Any]) -> float:
    """3 x forward FLOPs (2 FLOPs per multiply-accumulate): the student's model FLOPs per training image."""
    return TRAINING_FLOPS_PER_FORWARD * FLOPS_PER_MAC * sit_forward_macs(config)


def projector_macs(config: Dict[str, Any], projector_dim: int, out_features: int,
                   head_features: Optional[int] = None) -> int:
    """Per-image MACs of `AlignmentProjector` on every token: D -> P -> P -> out (+ the stage-1 head out -> head)."""
    from diffusers_selftrans.alignment.common import resolve_sit_config

    cfg = resolve_sit_config(config)
    d, t = cfg["hidden_size"], cfg["num_tokens"]
    per_token = d * projector_dim + projector_dim * projector_dim + projector_dim * out_features
    if head_features is not None:
        per_token += out_features * head_features
    return t * per_token


def method_flops_per_image(method: str, config: Dict[str, Any], *, projector_dim: int = 2048,
                           teacher_config: Optional[Dict[str, Any]] = None,
                           guiding_layer: Optional[int] = None) -> float:
    """Training FLOPs per image of one step of `method`: "vanilla", "vae_align" or "self_transcendence" (guided
    phase; after the guide stop use "vanilla")."""
    from diffusers_selftrans.alignment.common import resolve_sit_config

    student = training_flops_per_image(config)
    if method == "vanilla":
        return student
    cfg = resolve_sit_config(config)
    if method == "vae_align":
        # projector D -> P -> P -> D, then the head D -> p^2 C (the VAE-latent target per token)
        head = cfg["patch_size"] ** 2 * cfg["in_channels"]
        proj = projector_macs(config, projector_dim, cfg["hidden_size"], head_features=head)
        return student + TRAINING_FLOPS_PER_FORWARD * FLOPS_PER_MAC * proj
    if method == "self_transcendence":
        if teacher_config is None or guiding_layer is None:
            raise ValueError("self_transcendence FLOPs need teacher_config and guiding_layer.")
        tea = resolve_sit_config(teacher_config)
        proj = projector_macs(config, projector_dim, tea["hidden_size"])
        teacher = GUIDE_PASSES * FLOPS_PER_MAC * sit_forward_macs(teacher_config, num_blocks=guiding_layer)
        return student + TRAINING_FLOPS_PER_FORWARD * FLOPS_PER_MAC * proj + teacher
    raise ValueError(f"Unknown method {method!r}: vanilla, vae_align or self_transcendence.")

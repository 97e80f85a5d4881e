# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""What every alignment method shares: the base interface, depth-scaled layer defaults, `t_range` reduction.

Nothing here knows about a particular method's math; each method lives in its own module.
"""

import contextlib
import inspect
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.block_features import describe_transformer
from ..models.projector import AlignmentProjector
from ..models.transformer_sit import SiTTransformer2DModel

ALIGNMENT_METHODS = ("none", "vae_align", "self_transcendence", "repa", "sra", "layersync", "dispersive")

# Self-Transcendence `train_vaeloss.sh` / `train_selftrans.sh`: `--t-range 0.4 0.7` (both stages).
DEFAULT_T_RANGE = (0.4, 0.7)
# "code_compat": the released code's broadcasting, mean(L) * mean(mask) (method-notes §3.3); reproduces the paper.
# "per_sample": the evident intent, sum_i L_i * mask_i / N (see `reduce_over_batch`).
T_RANGE_MODES = ("per_sample", "code_compat")
DEFAULT_T_RANGE_MODE = "code_compat"

# --- Depth-scaled layer defaults (1-based block ids). Sources in method-notes §3-§4. -------------------------------
# ST stage 1 (`train_vaeloss.sh`, SiT-B/2): `--encoder-depth=2`, i.e. block 2 of 12; scaled by depth: n / 6
# (L: 4, XL: 28 / 6 = 4.67 -> 5). The L/XL value is not given anywhere [inferred].
VAE_ALIGN_REFERENCE = (2, 12)
# ST stage 2 (paper §4.1): guided layer n/2, guiding layer 2n/3 (B: 6 <- 8, matching `train_selftrans.sh`).
# XL: 2 * 28 / 3 = 18.67 is ambiguous (18 or 19); we round to the NEAREST block, 19. Pass `guiding_layer=18` for floor.
SELF_TRANSCENDENCE_GUIDED_FRACTION = 1 / 2
SELF_TRANSCENDENCE_GUIDING_FRACTION = 2 / 3
# REPA `train.py --encoder-depth 8` (README command, SiT-XL); kept at 8 for every depth (the B/L choice is not in
# the code), clamped to the model depth for tiny test models.
REPA_LAYER = 8
# SRA `train.py` defaults `block_out_s=4, block_out_t=8` (12-block models); its README uses 8 -> 20 for SiT-XL (28).
# Other depths: the 12-block values scaled by depth.
SRA_LAYERS = {12: (4, 8), 28: (8, 20)}
SRA_REFERENCE = (4, 8, 12)
# LayerSync README (SiT-XL/2, 28 blocks): `--encoder-depth 8 --gt-encoder-depth 16`; scaled by depth elsewhere.
LAYERSYNC_REFERENCE = (8, 16, 28)
# Dispersive loss: the `whaletech-ai/Disperse-Loss` fork applies it to `act[-1]`, the last block [unverified default].

# --- Text-to-image defaults (released T2I setting: an SD3-style MM-DiT of 24 blocks on MS-COCO) ----------------------
# `train_t2i_vaeloss.sh --encoder-depth=4`: block 4 of 24, i.e. the same n/6 rule as `VAE_ALIGN_REFERENCE`.
T2I_VAE_ALIGN_REFERENCE = (4, 24)
# `train_t2i_self_trans.sh --stu-depth=12 --tea-depth=16` of 24 blocks: n/2 and 2n/3, the SiT rule above.
T2I_SELF_TRANSCENDENCE_REFERENCE = (12, 16, 24)
# `train_t2i_self_trans.sh --cfg_guide=5.0` (SiT uses 30).
T2I_GUIDANCE_SCALE = 5.0
# Both T2I scripts pass no `--t-range`: the losses apply at every t.
T2I_T_RANGE = None
# Issue 16 (released T2I setting): the guide stops after 50K steps.
T2I_GUIDE_STOP_STEP = 50_000
# `--proj-coeff=0.5` in both T2I scripts (as for SiT).
T2I_WEIGHT = 0.5
# The released T2I stage 1 aligns through a time-modulated head (`projectors_final = FinalLayer(...)` called with the
# model's c, `models/mmdit_vaeloss.py`); the class-conditional stage 1's head is unmodulated (`FinalLayer_2`).
T2I_MODULATED_HEAD = True


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; depth rules want plain nearest-integer.
    return int(math.floor(x + 0.5))


def _clamp_layer(k: int, num_layers: int) -> int:
    return min(max(k, 1), num_layers)


def default_layers(method: str, num_layers: int) -> Dict[str, int]:
    """Depth-scaled default blocks of `method` for a `num_layers`-block student; keys are constructor kwargs.

    Examples (B = 12, L = 24, XL = 28 blocks):
        vae_align: {"layer": 2 | 4 | 5}; self_transcendence: {"guided_layer": 6 | 12 | 14, "guiding_layer": 8 | 16 | 19};
        repa: {"layer": 8}; sra: {"student_layer": 4 | 8 | 8, "teacher_layer": 8 | 16 | 20};
        layersync: {"weak_layer": 3 | 7 | 8, "target_layer": 7 | 14 | 16}; dispersive: {"layer": num_layers}.
    """
    if method not in ALIGNMENT_METHODS:
        raise ValueError(f"Unknown alignment method {method!r}; expected one of {ALIGNMENT_METHODS}.")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}.")
    n = num_layers
    if method == "none":
        return {}
    if method == "vae_align":
        layer, depth = VAE_ALIGN_REFERENCE
        return {"layer": _clamp_layer(_round_half_up(layer * n / depth), n)}
    if method == "self_transcendence":
        return {
            "guided_layer": _clamp_layer(_round_half_up(n * SELF_TRANSCENDENCE_GUIDED_FRACTION), n),
            "guiding_layer": _clamp_layer(_round_half_up(n * SELF_TRANSCENDENCE_GUIDING_FRACTION), n),
        }
    if method == "repa":
        return {"layer": _clamp_layer(REPA_LAYER, n)}
    if method == "sra":
        if n in SRA_LAYERS:
            student, teacher = SRA_LAYERS[n]
        else:
            s, t, depth = SRA_REFERENCE
            student, teacher = _round_half_up(s * n / depth), _round_half_up(t * n / depth)
        return {"student_layer": _clamp_layer(student, n), "teacher_layer": _clamp_layer(teacher, n)}
    if method == "layersync":
        weak, target, depth = LAYERSYNC_REFERENCE
        return {
            "weak_layer": _clamp_layer(_round_half_up(weak * n / depth), n),
            "target_layer": _clamp_layer(_round_half_up(target * n / depth), n),
        }
    return {"layer": n}  # dispersive


def default_t2i_options(method: str, num_layers: int) -> Dict[str, Any]:
    """The released T2I setting as `build_alignment` options for a `num_layers`-block diffusers transformer.

    vae_align: block n/6 (4 of 24), no t_range, weight 0.5, time-modulated head; self_transcendence: guided n/2 <- guiding 2n/3
    (12 <- 16 of 24), w = 5, no t_range, weight 0.5, guide stop after 50K steps.
    """
    if method == "vae_align":
        return {**default_layers(method, num_layers), "t_range": T2I_T_RANGE, "weight": T2I_WEIGHT,
                "modulated_head": T2I_MODULATED_HEAD}
    if method == "self_transcendence":
        return {**default_layers(method, num_layers), "guidance_scale": T2I_GUIDANCE_SCALE, "t_range": T2I_T_RANGE,
                "weight": T2I_WEIGHT, "guide_stop_step": T2I_GUIDE_STOP_STEP}
    raise ValueError(f"No T2I defaults for {method!r}; expected 'vae_align' or 'self_transcendence'.")


# --- Config handling -----------------------------------------------------------------------------------------------
_SIT_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(SiTTransformer2DModel.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}


def resolve_sit_config(model_config: Any) -> Dict[str, Any]:
    """A SiT config (a mapping, `model.config`, or the model itself) with every field filled with its default."""
    config = getattr(model_config, "config", model_config)
    if not isinstance(config, Mapping):
        raise ValueError(f"Expected a SiT config mapping or a SiTTransformer2DModel, got {type(model_config).__name__}.")
    unknown = {k for k in config if k not in _SIT_DEFAULTS and not k.startswith("_")}  # "_class_name" etc. are metadata
    if unknown:
        raise ValueError(f"Not SiTTransformer2DModel config fields: {sorted(unknown)}.")
    resolved = {**_SIT_DEFAULTS, **{k: v for k, v in config.items() if k in _SIT_DEFAULTS}}
    resolved["hidden_size"] = resolved["num_attention_heads"] * resolved["attention_head_dim"]
    resolved["num_tokens"] = (resolved["sample_size"] // resolved["patch_size"]) ** 2
    resolved["out_channels"] = resolved["out_channels"] or resolved["in_channels"]
    return resolved


def resolve_model_config(model_config: Any) -> Dict[str, Any]:
    """Sizes of a student/teacher for the heads: `resolve_sit_config` for SiT configs and models (unchanged), and
    `describe_transformer` for diffusers transformer INSTANCES (SD3, Flux, PixArt, Sana, DiT): `family`,
    `num_layers`, `hidden_size`, `patch_size`, `in_channels`, `sample_size`, `num_tokens` (None when not fixed)."""
    if isinstance(model_config, nn.Module) and not isinstance(
        getattr(model_config, "_orig_mod", model_config), SiTTransformer2DModel
    ):
        return describe_transformer(model_config)
    return {**resolve_sit_config(model_config), "family": "sit"}


def uses_lightningdit_options(config: Mapping[str, Any]) -> bool:
    """True when the SiT runs any LightningDiT piece (RMSNorm, SwiGLU or RoPE)."""
    return config["norm_type"] == "rms_norm" or config["mlp_type"] == "swiglu" or bool(config["use_rope"])


def check_layer(layer: int, num_layers: int, what: str) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= num_layers:
        raise ValueError(f"{what} must be a 1-based block id in [1, {num_layers}], got {layer!r}.")
    return layer


def make_projector(
    projector: Optional[AlignmentProjector],
    in_features: int,
    out_features: int,
    hidden_features: int,
    head_features: Optional[int] = None,
    modulation_features: Optional[int] = None,
) -> AlignmentProjector:
    """A fresh `AlignmentProjector`, or a given one (e.g. reloaded) checked against the expected widths."""
    if projector is None:
        return AlignmentProjector(in_features, out_features, hidden_features=hidden_features,
                                  head_features=head_features, modulation_features=modulation_features)
    cfg = projector.config
    got = (cfg.in_features, cfg.out_features, cfg.head_features, cfg.get("modulation_features"))
    want = (in_features, out_features, head_features, modulation_features)
    if got != want:
        raise ValueError(
            f"The projector maps (in, out, head, modulation) = {got} but this method needs {want} "
            "(student hidden size, target width, stage-1 head width, time-modulation width)."
        )
    return projector


# --- Frozen external networks (teachers, encoders) -----------------------------------------------------------------
def freeze(module: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """eval(), no gradients, optional dtype cast. Returned for chaining."""
    module.eval().requires_grad_(False)
    if dtype is not None:
        module.to(dtype)
    return module


def module_device_dtype(module: nn.Module) -> Tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def follow_device(module: nn.Module, device: torch.device) -> None:
    """Moves a frozen module that is held outside the method's module tree to the data's device (once)."""
    if module_device_dtype(module)[0] != device:
        module.to(device)


def frozen_forward_context(device: torch.device, dtype: torch.dtype, autocast_dtype: Optional[torch.dtype] = None):
    """Autocast on CUDA around a frozen net: `autocast_dtype` if given, else the weights' dtype when half precision.

    Otherwise (fp32 weights, or CPU, where bf16 autocast is slow) the caller's context is kept.
    """
    if device.type == "cuda":
        if autocast_dtype is not None:
            return torch.autocast("cuda", dtype=autocast_dtype)
        if dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# --- Shared math (always fp32) ------------------------------------------------------------------------------------
def check_t_range(t_range: Optional[Sequence[float]], t_range_mode: str) -> Optional[Tuple[float, float]]:
    if t_range_mode not in T_RANGE_MODES:
        raise ValueError(f"Unknown t_range_mode {t_range_mode!r}; expected one of {T_RANGE_MODES}.")
    if t_range is None:
        return None
    if len(t_range) != 2 or not 0.0 <= float(t_range[0]) <= float(t_range[1]) <= 1.0:
        raise ValueError(f"t_range must be (low, high) with 0 <= low <= high <= 1, got {t_range!r}.")
    return float(t_range[0]), float(t_range[1])


def reduce_over_batch(
    per_sample: torch.Tensor,
    t: Optional[torch.Tensor],
    t_range: Optional[Tuple[float, float]],
    t_range_mode: str = DEFAULT_T_RANGE_MODE,
) -> torch.Tensor:
    """Per-sample losses (N,) -> a scalar, restricted to `low <= t <= high` (inclusive) when `t_range` is set.

    - `"per_sample"`: `sum_i L_i * mask_i / N`. It divides by the batch size, not by the number of in-range samples:
      each in-range sample's gradient then does not depend on how many others happened to fall in range (no noisy
      re-weighting), the value is an unbiased estimate of E[L * 1{t in range}], and it equals `code_compat` when every
      t is in range. Out-of-range samples get no gradient.
    - `"code_compat"`: `mean(L) * mean(mask)`, what the released Self-Transcendence code computes through (B,) x
      (B,1,1,1) broadcasting (method-notes §3.3). Every sample gets gradient, scaled by the in-range fraction.
    Example: L = [10, 2, 3, 40], t = [.1, .5, .6, .9], range (0.4, 0.7): per_sample 1.25, code_compat 6.875.
    """
    per_sample = per_sample.float()
    if t_range is None:
        return per_sample.mean()
    if t is None:
        raise ValueError("t_range is set, so the batch times `t` are required.")
    t = torch.as_tensor(t, device=per_sample.device).float().reshape(-1)
    if t.shape != per_sample.shape:
        raise ValueError(f"t must have shape {tuple(per_sample.shape)}, got {tuple(t.shape)}.")
    mask = ((t >= t_range[0]) & (t <= t_range[1])).float()
    if t_range_mode == "per_sample":
        return (per_sample * mask).sum() / per_sample.shape[0]
    if t_range_mode == "code_compat":
        return per_sample.mean() * mask.mean()
    raise ValueError(f"Unknown t_range_mode {t_range_mode!r}; expected one of {T_RANGE_MODES}.")


def mean_negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA / LayerSync: -cos(prediction, target) per token (over the channel axis), mean over tokens and batch."""
    prediction, target = prediction.float(), target.float()
    return -(F.normalize(prediction, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1).mean()


def get_feature(features: Optional[Mapping[int, torch.Tensor]], layer: int, method: str) -> torch.Tensor:
    if features is None or layer not in features:
        have = sorted(features) if features else []
        raise ValueError(
            f"{method} needs the output of block {layer}; the student forward returned blocks {have}. "
            "Pass output_hidden_states=method.student_layers to the model."
        )
    return features[layer]


# --- The interface ------------------------------------------------------------------------------------------------
class AlignmentMethod(nn.Module):
    """Base class of the alignment methods (see the package docstring for the contract).

    Subclasses hold only their trainable parts as submodules (projectors, heads); frozen external networks
    (teachers, encoders) are kept out of the module tree, so `parameters()`, `state_dict()`, `train()` and DDP see
    the trainable parts only.
    """

    name: str = "none"
    requires_pixel_values: bool = False
    requires_teacher: bool = False
    # Attribute names of the trainable submodules, in the order of `trainable_modules()`.
    trainable_module_names: Tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.weights: Dict[str, float] = {}

    def trainable_modules(self) -> List[nn.Module]:
        """The trainable parts (projector / head), e.g. to hand each to `accelerator.prepare` on its own."""
        return [getattr(self, name) for name in self.trainable_module_names]

    def set_trainable_modules(self, modules: Sequence[nn.Module]) -> None:
        """Swaps in wrapped versions (e.g. the DDP modules `accelerator.prepare` returned); `forward` then calls them.

        A wrapped part that `forward` stops calling (ST after its early stop) takes no part in DDP's reduction.
        """
        modules = list(modules)
        if len(modules) != len(self.trainable_module_names):
            raise ValueError(f"{self.name} has {len(self.trainable_module_names)} trainable modules "
                             f"{self.trainable_module_names}, got {len(modules)}.")
        for name, module in zip(self.trainable_module_names, modules):
            setattr(self, name, module)

    @property
    def student_layers(self) -> Tuple[int, ...]:
        """1-based student blocks that `forward` needs in `features`; empty when inactive."""
        return ()

    def is_active(self, step: Optional[int] = None) -> bool:
        return True

    def forward(self, features: Optional[Mapping[int, torch.Tensor]], **batch) -> Dict[str, torch.Tensor]:
        return {}

    def _hold_frozen(self, name: str, module: Optional[nn.Module]) -> None:
        # Written to __dict__ directly: nn.Module.__setattr__ would register it as a submodule.
        self.__dict__[name] = module

    def extra_repr(self) -> str:
        return f"student_layers={self.student_layers}, weights={self.weights}"


class NoAlignment(AlignmentMethod):
    """Plain diffusion training: no features, no terms."""

    name = "none"

    def __init__(self, model_config: Any = None):
        super().__init__()

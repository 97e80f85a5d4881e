# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""The class-conditional SiT (Scalable Interpolant Transformer) in diffusers form.

Numerically the SiT of REPA's `models/sit.py`, which the Self-Transcendence code reuses, with:
- parameter names mapped 1:1 to REPA/SiT checkpoints (`x_embedder.proj`, `t_embedder.mlp`, `blocks.{i}.attn.qkv`, ...),
- explicit intermediate features (`output_hidden_states`) and early exit (`stop_at_layer`) instead of `(x, zs)` tuples,
- the null class at index `num_classes` (never a literal 1000),
- optional LightningDiT pieces (RMSNorm, SwiGLU, 2-D RoPE), off by default.

Time: the network sees raw t in [0, 1] with data at t=0 and noise at t=1 and predicts the velocity eps - x0.
A checkpoint trained with original SiT's reversed time (`time_convention="sit"`: data at t=1, velocity x - eps)
runs behind the same interface; the conversion happens in `forward`. The model knows nothing else about time:
the interpolant lives in `diffusers_selftrans.transport`.
"""

import math
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import LabelEmbedding, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


# name -> (num_layers, hidden size, heads); REPA `models/sit.py` configs (= willisma/SiT `models.py`).
SIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
SIT_PATCH_SIZES = (1, 2, 4, 8)
TIME_CONVENTIONS = ("repa", "sit")
# Frequencies of the sinusoidal timestep features (DiT/SiT/REPA `TimestepEmbedder.frequency_embedding_size`).
TIMESTEP_FREQUENCY_DIM = 256


@dataclass
class SiTTransformer2DModelOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(N, C, H, W)` or `None`):
            The predicted velocity (eps - x0, data at t=0). `None` when the forward stopped early (`stop_at_layer`).
        hidden_states (`Dict[int, torch.Tensor]` or `None`):
            Requested block outputs, keyed by 1-based block index; each is the raw residual stream `(N, T, D)`.
    """

    sample: Optional[torch.Tensor] = None
    hidden_states: Optional[Dict[int, torch.Tensor]] = None


def parse_preset(name: str) -> Dict[str, int]:
    """`"SiT-B/2"` -> config kwargs (`num_layers`, `num_attention_heads`, `attention_head_dim`, `patch_size`)."""
    match = re.fullmatch(r"SiT-(S|B|L|XL)/(\d+)", name.strip())
    if match is None or int(match.group(2)) not in SIT_PATCH_SIZES:
        valid = [f"SiT-{s}/{p}" for s in SIT_SIZES for p in SIT_PATCH_SIZES]
        raise ValueError(f"Unknown SiT preset {name!r}; expected one of {valid}.")
    num_layers, hidden, heads = SIT_SIZES[match.group(1)]
    return {
        "num_layers": num_layers,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "patch_size": int(match.group(2)),
    }


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of MAE/DiT/SiT, (grid_size**2, embed_dim), row-major tokens.

    Half the channels encode the column (w) and half the row (h), each as [sin(pos * w_i), cos(pos * w_i)] with
    w_i = 1 / 10000^(i / (D/4)) and integer positions (no rescaling, unlike diffusers' `base_size` variant).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"The hidden size must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}.")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    pos = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(pos, pos, indexing="ij")

    def embed_1d(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1).float()


def rope_angles_2d(head_dim: int, grid_size: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles of an axial 2-D rotary embedding (EVA / LightningDiT style), shape (grid_size**2, head_dim).

    The first half of each head rotates with the row position, the second half with the column position; inside
    each half, channel pairs (2i, 2i+1) share one frequency (interleaved layout).
    """
    if head_dim % 4 != 0:
        raise ValueError(f"`use_rope` needs attention_head_dim divisible by 4, got {head_dim}.")
    axis_dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    pos = torch.arange(grid_size, dtype=torch.float64)
    axis = torch.repeat_interleave(pos[:, None] * freqs[None], 2, dim=1)  # (g, axis_dim)
    rows = axis[:, None, :].expand(grid_size, grid_size, axis_dim)
    cols = axis[None, :, :].expand(grid_size, grid_size, axis_dim)
    return torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of `x` (N, H, T, Dh) by `angles` (T, Dh)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def make_norm(norm_type: str, dim: int) -> nn.Module:
    # eps 1e-6 as DiT/SiT; LightningDiT's RMSNorm has a learnable weight.
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    return nn.RMSNorm(dim, eps=1e-6)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a strided convolution (timm `PatchEmbed` without norm)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] -> (N, D): 256 sinusoidal features (cos first, no frequency shift) then an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCY_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # diffusers' defaults (shift 1, sin first) differ from SiT: flip_sin_to_cos=True, downscale_freq_shift=0.
        freq = get_timestep_embedding(t, TIMESTEP_FREQUENCY_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout) and optional q/k norm and RoPE."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: bool, norm_type: str):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=True)
        if qk_norm:
            # timm `Attention(qk_norm=True)` uses nn.LayerNorm(head_dim) with affine weights and eps 1e-5.
            norm = (lambda: nn.LayerNorm(head_dim)) if norm_type == "layer_norm" else (lambda: nn.RMSNorm(head_dim, eps=1e-6))
            self.q_norm, self.k_norm = norm(), norm()
        else:
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.proj = nn.Linear(inner, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (N, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, -1))


class FeedForward(nn.Module):
    """GELU(tanh) MLP (`fc1`, `fc2`) as timm `Mlp`, or LightningDiT's SwiGLU (`w12`, `w3`)."""

    def __init__(self, dim: int, mlp_ratio: float, mlp_type: str):
        super().__init__()
        self.mlp_type = mlp_type
        hidden = int(dim * mlp_ratio)
        if mlp_type == "gelu":
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        else:
            hidden = int(2 * hidden / 3)  # LightningDiT `SwiGLUFFN`: same parameter count as the GELU MLP
            self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_type == "gelu":
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class SiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning."""

    def __init__(self, dim, num_heads, head_dim, mlp_ratio, qk_norm, norm_type, mlp_type):
        super().__init__()
        self.norm1 = make_norm(norm_type, dim)
        self.attn = Attention(dim, num_heads, head_dim, qk_norm, norm_type)
        self.norm2 = make_norm(norm_type, dim)
        self.mlp = FeedForward(dim, mlp_ratio, mlp_type)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from each token to its patch of output channels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm_type: str):
        super().__init__()
        self.norm_final = make_norm(norm_type, dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W), the SiT/REPA `nhwpqc -> nchpwq` layout."""
    n, t, _ = x.shape
    g = int(math.isqrt(t))
    x = x.reshape(n, g, g, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, g * patch_size, g * patch_size)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, p*p*C), the inverse of `unpatchify`."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch_size) * (w // patch_size), -1)


class SiTTransformer2DModel(ModelMixin, ConfigMixin):
    r"""
    A class-conditional SiT as used by REPA and Self-Transcendence, with explicit block features.

    Parameters:
        sample_size (`int`, defaults to 32): latent height and width (SD-VAE latents of 256 px images).
        patch_size (`int`, defaults to 2): patch size of the embedding.
        in_channels (`int`, defaults to 4): latent channels.
        out_channels (`int`, *optional*): predicted channels, defaults to `in_channels`.
        num_layers (`int`, defaults to 28): number of transformer blocks (SiT-XL).
        num_attention_heads (`int`, defaults to 16), attention_head_dim (`int`, defaults to 72): hidden = heads * dim.
        mlp_ratio (`float`, defaults to 4.0): MLP width multiple.
        num_classes (`int`, defaults to 1000): number of classes; index `num_classes` is the null (unconditional) class.
        class_dropout_prob (`float`, defaults to 0.1): label dropout for classifier-free guidance, applied in train mode.
        qk_norm (`bool`, defaults to False): q/k normalisation (REPA: off; the Self-Transcendence release: on).
        learn_sigma (`bool`, defaults to False): original SiT's doubled output; the second half is dropped in `forward`.
        norm_type (`str`, defaults to `"layer_norm"`): `"layer_norm"` (SiT) or `"rms_norm"` (LightningDiT).
        mlp_type (`str`, defaults to `"gelu"`): `"gelu"` (SiT) or `"swiglu"` (LightningDiT).
        use_rope (`bool`, defaults to False): 2-D rotary embedding on q/k (LightningDiT), in addition to the sin-cos one.
        time_convention (`str`, defaults to `"repa"`): `"repa"` = data at t=0, velocity eps - x0 (this package);
            `"sit"` = weights trained with original SiT's reversed time; converted at the model boundary.
        id2label (`dict`, *optional*): class names from the training data (not used by the network); the pipeline
            resolves names through it. JSON turns the keys into strings; `SiTPipeline` turns them back.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SiTBlock"]
    _repeated_blocks = ["SiTBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        qk_norm: bool = False,
        learn_sigma: bool = False,
        norm_type: str = "layer_norm",
        mlp_type: str = "gelu",
        use_rope: bool = False,
        time_convention: str = "repa",
        id2label: Optional[Dict[int, str]] = None,
    ):
        super().__init__()
        if norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"norm_type must be 'layer_norm' or 'rms_norm', got {norm_type!r}.")
        if mlp_type not in ("gelu", "swiglu"):
            raise ValueError(f"mlp_type must be 'gelu' or 'swiglu', got {mlp_type!r}.")
        if time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention must be one of {TIME_CONVENTIONS}, got {time_convention!r}.")
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}.")
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels or in_channels
        grid = sample_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        # `num_classes + 1` rows when label dropout is on: the last row is the null class.
        self.y_embedder = LabelEmbedding(num_classes, dim, class_dropout_prob)
        # Fixed, recomputed from the config (not saved): a stale table in a checkpoint can never override it.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid)[None], persistent=False)
        if use_rope:
            self.register_buffer("rope", rope_angles_2d(attention_head_dim, grid), persistent=False)
        else:
            self.rope = None
        self.blocks = nn.ModuleList(
            SiTBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio, qk_norm, norm_type, mlp_type)
            for _ in range(num_layers)
        )
        final_channels = 2 * self.out_channels if learn_sigma else self.out_channels
        self.final_layer = FinalLayer(dim, patch_size, final_channels, norm_type)
        self.gradient_checkpointing = False
        self.initialize_weights()

    # `EMAModel.save_pretrained` stores its own state in the model's config.json (`checkpoint-N/transformer_ema/`).
    # Those keys are not SiT options: pass them through as unused kwargs (where `EMAModel.from_pretrained` reads
    # them back) without diffusers' "config attributes ... will be ignored" warning on every EMA load.
    _ema_config_keys = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup",
                        "inv_gamma", "power")

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        ema_state = {k: config_dict[k] for k in cls._ema_config_keys if k in config_dict}
        config_dict = {k: v for k, v in config_dict.items() if k not in ema_state}
        init_dict, unused_kwargs, hidden_config_dict = super().extract_init_dict(config_dict, **kwargs)
        return init_dict, {**ema_state, **unused_kwargs}, hidden_config_dict

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SiTTransformer2DModel":
        """Build a named SiT (`"SiT-S/2"` ... `"SiT-XL/8"`); any config field can be overridden."""
        return cls(**{**parse_preset(name), **overrides})

    @property
    def hidden_size(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def initialize_weights(self):
        """The reference initialisation (DiT/SiT/REPA `initialize_weights`)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def _check_inputs(self, hidden_states, class_labels, layers, stop_at_layer):
        cfg = self.config
        expected = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if hidden_states.ndim != 4 or tuple(hidden_states.shape[1:]) != expected:
            raise ValueError(
                f"hidden_states must have shape (N, {', '.join(map(str, expected))}) for this config, "
                f"got {tuple(hidden_states.shape)}."
            )
        if class_labels.shape != (hidden_states.shape[0],):
            raise ValueError(f"class_labels must have shape ({hidden_states.shape[0]},), got {tuple(class_labels.shape)}.")
        if class_labels.is_floating_point() or class_labels.is_complex():
            raise ValueError(f"class_labels must be integers, got dtype {class_labels.dtype}.")
        # Reading label values is free on the CPU but a host sync on an accelerator, so only CPU labels are checked
        # here (notebooks, tests, CPU runs); the training data is checked once at start-up (`data.py`) and the
        # pipeline resolves ids on the host.
        if class_labels.device.type == "cpu" and not torch.compiler.is_compiling() and class_labels.numel() > 0:
            lo, hi = int(class_labels.min()), int(class_labels.max())
            top = self.y_embedder.embedding_table.num_embeddings - 1  # num_classes (null) only when dropout is on
            if lo < 0 or hi > top:
                null = f" ({cfg.num_classes} is the null class)" if top == cfg.num_classes else " (no null class: class_dropout_prob is 0)"
                raise ValueError(f"class_labels must lie in [0, {top}]{null}, got values in [{lo}, {hi}].")
        for k in list(layers) + ([stop_at_layer] if stop_at_layer is not None else []):
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg.num_layers:
                raise ValueError(f"Block indices are 1-based in [1, {cfg.num_layers}], got {k!r}.")
        if stop_at_layer is not None and any(k > stop_at_layer for k in layers):
            raise ValueError(f"Requested features {sorted(layers)} lie beyond stop_at_layer={stop_at_layer}.")

    def _drop_labels(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Classifier-free-guidance dropout: labels -> null class (`num_classes`) where forced, or at random with
        `class_dropout_prob` in train mode only (the teacher must be in eval mode, or its labels get dropped)."""
        if force_drop_ids is None:
            if not (self.training and self.config.class_dropout_prob > 0):
                return labels
            drop = torch.rand(labels.shape[0], device=labels.device) < self.config.class_dropout_prob
        else:
            if self.config.class_dropout_prob <= 0:
                raise ValueError("force_drop_ids needs the null class, which exists only when class_dropout_prob > 0.")
            drop = force_drop_ids.to(labels.device).reshape(labels.shape).bool()
        return torch.where(drop, torch.full_like(labels, self.config.num_classes), labels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        class_labels: torch.LongTensor,
        *,
        output_hidden_states: Optional[Iterable[int]] = None,
        stop_at_layer: Optional[int] = None,
        force_drop_ids: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[SiTTransformer2DModelOutput, Tuple]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(N, C, H, W)`): noisy latents x_t.
            timestep (`torch.Tensor` of shape `(N,)` or a float): raw t in [0, 1], data at t=0.
            class_labels (`torch.LongTensor` of shape `(N,)`): class ids in [0, num_classes]; `num_classes` is null.
            output_hidden_states (`Iterable[int]`, *optional*): 1-based block indices whose outputs are returned.
            stop_at_layer (`int`, *optional*): run blocks 1..k only; `sample` is then `None`.
            force_drop_ids (`torch.Tensor` of shape `(N,)`, *optional*): 1 where the label is replaced by the null
                class; replaces the random train-mode dropout so a caller can share one dropout draw between models.
            return_dict (`bool`): return a `SiTTransformer2DModelOutput` instead of a `(sample, hidden_states)` tuple.
        """
        layers = set(output_hidden_states or ())
        self._check_inputs(hidden_states, class_labels, layers, stop_at_layer)
        if stop_at_layer is not None and not layers:
            layers = {stop_at_layer}
        n = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device, dtype=torch.float32)
        t = t.expand(n) if t.ndim == 0 else t.reshape(n)
        if self.config.time_convention == "sit":
            t = 1.0 - t  # original SiT: data at t=1

        # 1. Input
        x = self.x_embedder(hidden_states) + self.pos_embed.to(hidden_states.dtype)  # (N, T, D), T = H * W / p**2
        c = self.t_embedder(t) + self.y_embedder.embedding_table(self._drop_labels(class_labels, force_drop_ids))  # (N, D)
        c = c.to(x.dtype)

        # 2. Blocks
        features = {}
        last = stop_at_layer or self.config.num_layers
        for i, block in enumerate(self.blocks[:last], start=1):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, self.rope)
            else:
                x = block(x, c, self.rope)
            if i in layers:
                features[i] = x
        hidden = features if output_hidden_states is not None or stop_at_layer is not None else None
        if stop_at_layer is not None:
            return SiTTransformer2DModelOutput(sample=None, hidden_states=hidden) if return_dict else (None, hidden)

        # 3. Output
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        final_channels = self.final_layer.linear.out_features // self.config.patch_size**2
        sample = unpatchify(x, self.config.patch_size, final_channels)
        if self.config.learn_sigma:
            sample = sample[:, : self.out_channels]
        if self.config.time_convention == "sit":
            sample = -sample  # x - eps -> eps - x0
        if not return_dict:
            return (sample, hidden)
        return SiTTransformer2DModelOutput(sample=sample, hidden_states=hidden)

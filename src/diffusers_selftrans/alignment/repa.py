# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""REPA baseline: align a student block to a frozen external vision encoder (REPA `loss.py`, `train.py`).

The encoder is a `transformers` model (DINOv2 by default: `facebook/dinov2-base`, REPA's `dinov2-vit-b`). Raw
images in [-1, 1] -> [0, 1] -> ImageNet mean/std -> bicubic resize to `patch_size * g`, where g is the SiT token
grid side, so the encoder emits exactly one patch token per SiT token (REPA: 224 px for 256 px images; the HF Dinov2
embeddings interpolate their position table). Target: `last_hidden_state` (post-LayerNorm, REPA's
`x_norm_patchtokens`) without the CLS and register tokens. The student block goes through
`AlignmentProjector(D, 2048, E)`; loss = -cos per token, mean over tokens and batch.
"""

import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..models.projector import DEFAULT_PROJECTOR_DIM, AlignmentProjector
from .common import (
    AlignmentMethod,
    check_layer,
    default_layers,
    follow_device,
    freeze,
    frozen_forward_context,
    get_feature,
    make_projector,
    mean_negative_cosine,
    module_device_dtype,
    resolve_sit_config,
)

# REPA `train.py`: `--enc-type dinov2-vit-b` (torch.hub `dinov2_vitb14`), here its Hub twin.
DEFAULT_ENCODER = "facebook/dinov2-base"
# REPA `utils.py` preprocess_raw_image: timm IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# REPA `train.py --proj-coeff 0.5`.
REPA_WEIGHT = 0.5


def load_encoder(encoder: Union[str, nn.Module], **from_pretrained_kwargs) -> nn.Module:
    """A module, or a Hub id / local folder loaded with `transformers.AutoModel.from_pretrained`."""
    if isinstance(encoder, nn.Module):
        return encoder
    from transformers import AutoModel  # heavy import, only when loading by name

    return AutoModel.from_pretrained(encoder, **from_pretrained_kwargs)


class REPAAlignment(AlignmentMethod):
    r"""
    REPA representation alignment. Term: `"repa"`.

    Args:
        model_config: the student SiT's config (or the model).
        encoder (`str` or `nn.Module`, defaults to `"facebook/dinov2-base"`): a DINOv2-like `transformers` model or
            its id/folder (loaded with `AutoModel`). Frozen, kept out of the module tree, follows the data's device.
        layer (`int`, *optional*): student block; default 8 (clamped to the depth).
        weight (`float`, defaults to 0.5): λ (`--proj-coeff`).
        projector_dim (`int`, defaults to 2048), projector (`AlignmentProjector`, *optional*): as in `VAEAlignment`.
        encoder_dtype (`torch.dtype`, *optional*): cast the encoder (bf16 autocast on CUDA).
        encoder_kwargs (`dict`, *optional*): extra `from_pretrained` kwargs (e.g. `revision`, `cache_dir`).

    Per call: `features` with block `layer`, `pixel_values` (N, 3, H, W) in [-1, 1].
    """

    name = "repa"
    trainable_module_names = ("projector",)
    requires_pixel_values = True

    def __init__(
        self,
        model_config: Any,
        encoder: Union[str, nn.Module] = DEFAULT_ENCODER,
        *,
        layer: Optional[int] = None,
        weight: float = REPA_WEIGHT,
        projector_dim: int = DEFAULT_PROJECTOR_DIM,
        projector: Optional[AlignmentProjector] = None,
        encoder_dtype: Optional[torch.dtype] = None,
        encoder_kwargs: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        cfg = resolve_sit_config(model_config)
        self.layer = check_layer(
            default_layers(self.name, cfg["num_layers"])["layer"] if layer is None else layer, cfg["num_layers"], "layer"
        )
        encoder = load_encoder(encoder, **(encoder_kwargs or {}))
        enc_cfg = getattr(encoder, "config", None)
        if enc_cfg is None or not hasattr(enc_cfg, "patch_size") or not hasattr(enc_cfg, "hidden_size"):
            raise ValueError("The encoder must be a ViT-like transformers model with config.patch_size/hidden_size.")
        self.encoder_patch_size = int(enc_cfg.patch_size)
        self.num_prefix_tokens = 1 + int(getattr(enc_cfg, "num_register_tokens", 0) or 0)  # CLS + registers
        self.grid_size = math.isqrt(cfg["num_tokens"])
        self.encoder_resolution = self.encoder_patch_size * self.grid_size
        self.projector = make_projector(projector, cfg["hidden_size"], int(enc_cfg.hidden_size), projector_dim)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._hold_frozen("encoder", freeze(encoder, encoder_dtype))
        self.weights = {self.name: float(weight)}

    @property
    def student_layers(self) -> Tuple[int, ...]:
        return (self.layer,)

    def preprocess(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> ImageNet-normalised, bicubic-resized encoder input (fp32)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (N, 3, H, W) RGB in [-1, 1], got {tuple(pixel_values.shape)}.")
        x = (pixel_values.float() + 1) / 2
        x = (x - self.pixel_mean.to(x.device)) / self.pixel_std.to(x.device)
        size = (self.encoder_resolution, self.encoder_resolution)
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)

    @torch.no_grad()
    def encoder_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The target patch tokens (N, T, E) in fp32."""
        follow_device(self.encoder, pixel_values.device)
        _, dtype = module_device_dtype(self.encoder)
        x = self.preprocess(pixel_values).to(dtype)
        with frozen_forward_context(x.device, dtype):
            hidden = self.encoder(pixel_values=x).last_hidden_state
        return hidden[:, self.num_prefix_tokens :].float()

    def forward(
        self, features: Mapping[int, torch.Tensor], *, pixel_values: Optional[torch.Tensor] = None, **unused
    ) -> Dict[str, torch.Tensor]:
        if pixel_values is None:
            raise ValueError("repa needs `pixel_values` (raw images in [-1, 1]); a latent-only dataset cannot train it.")
        target = self.encoder_features(pixel_values)
        prediction = self.projector(get_feature(features, self.layer, self.name).float())
        if prediction.shape != target.shape:
            raise ValueError(f"Projected student tokens {tuple(prediction.shape)} vs encoder patch tokens "
                             f"{tuple(target.shape)}.")
        return {self.name: mean_negative_cosine(prediction, target)}

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Small MLP heads that the alignment losses put on top of a block's features.

Kept in their own `ModelMixin` (saved in their own folder) so that a generator's state dict stays identical to a
plain SiT's and loads anywhere a SiT loads.
"""

from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# REPA `build_mlp(hidden_size, projector_dim=2048, z_dim)`; Self-Transcendence reuses it for both stages.
DEFAULT_PROJECTOR_DIM = 2048


class AlignmentProjector(ModelMixin, ConfigMixin):
    r"""
    Per-token MLP `Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, out)`, optionally followed by
    the unconditioned head of Self-Transcendence stage 1 (`LayerNorm` without affine, then `Linear(out, head)`).

    Parameters:
        in_features (`int`): width of the block features (the SiT hidden size).
        out_features (`int`): width of the target features.
        hidden_features (`int`, defaults to 2048): the MLP width (REPA `projector_dim`).
        head_features (`int`, *optional*): if set, the stage-1 head maps to this many values per token
            (`patch_size**2 * latent_channels`, unpatchified by the caller).
        modulation_features (`int`, *optional*): if set, the head is time-modulated as the released text-to-image
            stage 1's `FinalLayer`: `LayerNorm` without affine, then `x (1 + scale) + shift` with (shift, scale) =
            `Linear(SiLU(c))` of the model's own conditioning vector c (width `modulation_features`), then the Linear.
    """

    @register_to_config
    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int = DEFAULT_PROJECTOR_DIM,
        head_features: Optional[int] = None,
        modulation_features: Optional[int] = None,
    ):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden_features),
            nn.SiLU(),
            nn.Linear(hidden_features, hidden_features),
            nn.SiLU(),
            nn.Linear(hidden_features, out_features),
        )
        if head_features is not None:
            # Self-Transcendence `FinalLayer_2`: no adaLN, no t/y conditioning; xavier init (not zeroed).
            self.head = nn.Sequential(nn.LayerNorm(out_features, elementwise_affine=False, eps=1e-6),
                                      nn.Linear(out_features, head_features))
        else:
            self.head = None
        if modulation_features is not None:
            if head_features is None:
                raise ValueError("modulation_features modulates the stage-1 head: set head_features too.")
            self.head_modulation = nn.Sequential(nn.SiLU(), nn.Linear(modulation_features, 2 * out_features))
        else:
            self.head_modulation = None
        for module in self.modules():
            if isinstance(module, nn.Linear):  # plain xavier, as REPA's projectors (not zero-initialised)
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)

    def forward(self, features: torch.Tensor, modulation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, T, D) -> (N, T, out) or (N, T, head_features); `modulation` (N, modulation_features) is the
        conditioning vector of a time-modulated head (required there, refused elsewhere)."""
        x = self.mlp(features)
        if self.head is None:
            return x
        if (modulation is None) != (self.head_modulation is None):
            raise ValueError("A time-modulated head needs `modulation` (the model's conditioning vector); an "
                             "unmodulated one takes none.")
        norm, linear = self.head
        x = norm(x)
        if self.head_modulation is not None:
            shift, scale = self.head_modulation(modulation.to(x.dtype)).chunk(2, dim=-1)
            x = x * (1 + scale[:, None]) + shift[:, None]
        return linear(x)

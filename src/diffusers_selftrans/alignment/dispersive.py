# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Dispersive loss baseline (Wang & He): an InfoNCE-L2 regulariser without positive pairs on one block.

    z = features.reshape(B, -1);  D_ij = ||z_i - z_j||^2 / dim(z);  L = log(mean_ij exp(-D_ij / tau))

The mean runs over the full B x B matrix, zero diagonal included, as the JAX version does (the PyTorch fork writes it
as `cat(pdist**2, pdist**2, zeros(B))`). It pushes samples of a batch apart; it has no trainable parts.
Defaults are the `whaletech-ai/Disperse-Loss` fork's (last block, λ = 0.25, τ = 1); the official repo's could not be
verified (method-notes §4.3) [unverified defaults].
"""

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .common import AlignmentMethod, check_layer, default_layers, get_feature, resolve_sit_config

# Fork: `loss += 0.25 * disp_loss(act[-1])` [unverified].
DISPERSIVE_WEIGHT = 0.25
# Fork: τ = 1 relative to the per-dimension squared distance [unverified].
DISPERSIVE_TEMPERATURE = 1.0


def dispersive_infonce_l2(features: torch.Tensor, temperature: float = DISPERSIVE_TEMPERATURE) -> torch.Tensor:
    """The loss above for (B, ...) features, in fp32."""
    z = features.float().reshape(features.shape[0], -1)
    b, dim = z.shape
    distances = torch.pdist(z).pow(2) / dim  # the B(B-1)/2 upper-triangle pairs
    # Full matrix: every pair twice plus B zeros on the diagonal -> B*B entries; logsumexp for stability.
    logits = torch.cat([distances, distances, distances.new_zeros(b)]) * (-1.0 / temperature)
    return torch.logsumexp(logits, dim=0) - math.log(logits.numel())


class DispersiveAlignment(AlignmentMethod):
    r"""
    Dispersive loss on block `layer`. Term: `"dispersive"`.

    Args:
        model_config: the student SiT's config (or the model).
        layer (`int`, *optional*): default the last block.
        temperature (`float`, defaults to 1.0): τ.
        weight (`float`, defaults to 0.25): λ.

    Per call: `features` with block `layer`.
    """

    name = "dispersive"

    def __init__(
        self,
        model_config: Any,
        *,
        layer: Optional[int] = None,
        temperature: float = DISPERSIVE_TEMPERATURE,
        weight: float = DISPERSIVE_WEIGHT,
    ):
        super().__init__()
        cfg = resolve_sit_config(model_config)
        n = cfg["num_layers"]
        self.layer = check_layer(default_layers(self.name, n)["layer"] if layer is None else layer, n, "layer")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature = float(temperature)
        self.weights = {self.name: float(weight)}

    @property
    def student_layers(self) -> Tuple[int, ...]:
        return (self.layer,)

    def forward(self, features: Mapping[int, torch.Tensor], **unused) -> Dict[str, torch.Tensor]:
        return {self.name: dispersive_infonce_l2(get_feature(features, self.layer, self.name), self.temperature)}

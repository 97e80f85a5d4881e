# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""LayerSync baseline: a weak block aligns to a deeper block of the SAME forward (LayerSync `transport.py`).

`L = mean over (B, T) of -cos(f_weak, stopgrad(f_target))` per token; no projector. The deeper features are detached,
so only the weak block (and everything below it) is pushed. Both features come from one forward, so LayerSync's
reversed SiT time convention does not matter here.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .common import AlignmentMethod, check_layer, default_layers, get_feature, mean_negative_cosine, resolve_sit_config

# LayerSync `train.py --reg-weight 0.2`.
LAYERSYNC_WEIGHT = 0.2


class LayerSyncAlignment(AlignmentMethod):
    r"""
    LayerSync self-alignment. Term: `"layersync"`.

    Args:
        model_config: the student SiT's config (or the model).
        weak_layer, target_layer (`int`, *optional*): the shallow block and the deeper, detached one; defaults
            8 -> 16 for 28 blocks (LayerSync README, SiT-XL/2), scaled by depth elsewhere.
        weight (`float`, defaults to 0.2): λ (`--reg-weight`).

    Per call: `features` with both blocks.
    """

    name = "layersync"

    def __init__(
        self,
        model_config: Any,
        *,
        weak_layer: Optional[int] = None,
        target_layer: Optional[int] = None,
        weight: float = LAYERSYNC_WEIGHT,
    ):
        super().__init__()
        cfg = resolve_sit_config(model_config)
        n = cfg["num_layers"]
        defaults = default_layers(self.name, n)
        self.weak_layer = check_layer(defaults["weak_layer"] if weak_layer is None else weak_layer, n, "weak_layer")
        self.target_layer = check_layer(defaults["target_layer"] if target_layer is None else target_layer, n,
                                        "target_layer")
        if self.weak_layer >= self.target_layer:
            raise ValueError(f"weak_layer ({self.weak_layer}) must be shallower than target_layer ({self.target_layer}).")
        self.weights = {self.name: float(weight)}

    @property
    def student_layers(self) -> Tuple[int, ...]:
        return (self.weak_layer, self.target_layer)

    def forward(self, features: Mapping[int, torch.Tensor], **unused) -> Dict[str, torch.Tensor]:
        weak = get_feature(features, self.weak_layer, self.name)
        target = get_feature(features, self.target_layer, self.name).detach()
        return {self.name: mean_negative_cosine(weak, target)}

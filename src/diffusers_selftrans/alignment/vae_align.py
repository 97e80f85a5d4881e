# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Self-Transcendence stage 1, "VAE-based alignment" (paper §3.2, Eq. 1; code `loss.py::vae_diffloss`).

A shallow block's tokens go through `AlignmentProjector(D, 2048, D, head_features=p*p*C)` (the MLP plus the
unconditioned LayerNorm/Linear head of `FinalLayer_2`), are unpatchified to the latent grid exactly as the model's
own output, and regress a latent-space target with MSE (mean over C, H, W per sample, then over the batch).

Target: the released code regresses the velocity `eps - x0` (`align_target="velocity"`, default, parity); paper Eq. 1
says the clean VAE latent z (`align_target="x0"`). method-notes §3.1.

Text-to-image (`default_t2i_options`): the released T2I stage 1 modulates the head with the model's own conditioning
vector (`modulated_head=True`: shift/scale from the timestep embedding, which SD3 and Flux sum with the pooled text),
read off the transformer by `BlockFeatures(..., return_time_embedding=True)`. Flux's tokens are its packed 2x2
latents: the head predicts the packed latents per token and the loss compares them with the packed target (the same
mean squared error as on the unpacked grid: a permutation of the same elements). Video transformers (Wan, patches
(pt, ph, pw)) predict a (pt, ph, pw) patch a token, unpatchified to the target's (N, C, F, H, W) as Wan's own output.
"""

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..models.projector import DEFAULT_PROJECTOR_DIM, AlignmentProjector
from ..models.transformer_sit import unpatchify
from .common import (
    DEFAULT_T_RANGE,
    DEFAULT_T_RANGE_MODE,
    AlignmentMethod,
    check_layer,
    check_t_range,
    default_layers,
    get_feature,
    make_projector,
    reduce_over_batch,
    resolve_model_config,
)

ALIGN_TARGETS = ("velocity", "x0")
# `train_vaeloss.sh --proj-coeff=0.5`.
VAE_ALIGN_WEIGHT = 0.5


class VAEAlignment(AlignmentMethod):
    r"""
    Stage-1 alignment of block `layer` to the latent target. Term: `"vae_align"`.

    Args:
        model_config: the student SiT's config (or the model), or a diffusers transformer instance (SD3, PixArt,
            Sana, DiT; features from `BlockFeatures`). T2I defaults: `default_t2i_options("vae_align", n)`.
        layer (`int`, *optional*): 1-based block; default `default_layers("vae_align", num_layers)` (B: 2).
        align_target (`str`, defaults to `"velocity"`): `"velocity"` (released code) or `"x0"` (paper Eq. 1).
        weight (`float`, defaults to 0.5): λ (`--proj-coeff`).
        t_range (`(float, float)` or `None`, defaults to `(0.4, 0.7)`): only samples with t in range count.
        t_range_mode (`str`, defaults to `"code_compat"`): see `reduce_over_batch`; `code_compat` reproduces the paper.
        projector_dim (`int`, defaults to 2048): MLP width.
        projector (`AlignmentProjector`, *optional*): a projector to reuse (e.g. reloaded); its widths are checked.
        modulated_head (`bool`, defaults to False): the released T2I head, modulated by the model's time embedding
            (SD3, Flux, PixArt, Sana; `default_t2i_options` turns it on); False: the class-conditional `FinalLayer_2`.

    Per call: `features` with block `layer`, `t`, and `target` (velocity) or `x0`; with `modulated_head`, also
    `time_embedding` (the student's, same call).
    """

    name = "vae_align"
    trainable_module_names = ("projector",)

    def __init__(
        self,
        model_config: Any,
        *,
        layer: Optional[int] = None,
        align_target: str = "velocity",
        weight: float = VAE_ALIGN_WEIGHT,
        t_range: Optional[Sequence[float]] = DEFAULT_T_RANGE,
        t_range_mode: str = DEFAULT_T_RANGE_MODE,
        projector_dim: int = DEFAULT_PROJECTOR_DIM,
        projector: Optional[AlignmentProjector] = None,
        modulated_head: bool = False,
    ):
        super().__init__()
        cfg = resolve_model_config(model_config)
        if modulated_head and not cfg.get("time_embedding"):
            raise ValueError(f"modulated_head needs the model's time embedding, which is read off SD3, Flux, PixArt "
                             f"and Sana transformers; not {cfg.get('family', 'a SiT')}.")
        if align_target not in ALIGN_TARGETS:
            raise ValueError(f"Unknown align_target {align_target!r}; expected one of {ALIGN_TARGETS}.")
        self.layer = check_layer(
            default_layers("vae_align", cfg["num_layers"])["layer"] if layer is None else layer,
            cfg["num_layers"], "layer",
        )
        self.align_target = align_target
        self.t_range = check_t_range(t_range, t_range_mode)
        self.t_range_mode = t_range_mode
        self.patch_size = cfg["patch_size"]  # an int, or a video model's (pt, ph, pw)
        patch_cells = math.prod(self.patch_size) if isinstance(self.patch_size, tuple) else self.patch_size**2
        self.latent_channels = cfg["in_channels"]
        self.packed = bool(cfg.get("packed"))
        self.modulated_head = modulated_head
        hidden = cfg["hidden_size"]
        # ST `build_mlp(D, 2048, D)` + `FinalLayer_2(D, p, C)` (T2I: `FinalLayer`, modulated by the model's c, as
        # wide as `describe_transformer` says: the hidden size, or less for Lumina 2 / Z-Image): p*p*C values a token.
        self.projector = make_projector(
            projector, hidden, hidden, projector_dim, head_features=patch_cells * self.latent_channels,
            modulation_features=(cfg.get("time_embedding_dim") or hidden) if modulated_head else None,
        )
        self.weights = {self.name: float(weight)}

    @property
    def student_layers(self) -> Tuple[int, ...]:
        return (self.layer,)

    @property
    def needs_time_embedding(self) -> bool:
        """Whether the student's call must return its time embedding (`BlockFeatures(return_time_embedding=True)`)."""
        return self.modulated_head

    def predict(self, features: Mapping[int, torch.Tensor], time_embedding: Optional[torch.Tensor] = None,
                grid: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Block `layer` tokens -> the head's prediction: the latent grid (N, C, H, W), Flux's packed latents
        (N, L, C) as the model's own output, or a video model's (N, C, F, H, W) (`grid`: its (F, H, W))."""
        tokens = get_feature(features, self.layer, self.name)
        if self.modulated_head and time_embedding is None:
            raise ValueError("vae_align with modulated_head needs `time_embedding` (the student's, from "
                             "BlockFeatures(..., return_time_embedding=True)).")
        head = self.projector(tokens.float(), time_embedding.float() if self.modulated_head else None)
        if self.packed:
            return head
        if isinstance(self.patch_size, tuple):
            if grid is None:
                raise ValueError("A video model's head needs the latent `grid` (F, H, W) to unpatchify.")
            return unpatchify_video(head, self.patch_size, self.latent_channels, grid)
        return unpatchify(head, self.patch_size, self.latent_channels)

    def forward(
        self,
        features: Mapping[int, torch.Tensor],
        *,
        t: Optional[torch.Tensor] = None,
        target: Optional[torch.Tensor] = None,
        x0: Optional[torch.Tensor] = None,
        time_embedding: Optional[torch.Tensor] = None,
        **unused,
    ) -> Dict[str, torch.Tensor]:
        goal = target if self.align_target == "velocity" else x0
        if goal is None:
            which = "target` (the velocity eps - x0)" if self.align_target == "velocity" else "x0` (the clean latents)"
            raise ValueError(f"vae_align with align_target={self.align_target!r} needs `{which}.")
        prediction = self.predict(features, time_embedding, grid=goal.shape[2:]).float()
        if prediction.shape != goal.shape:
            raise ValueError(f"The head predicts {tuple(prediction.shape)} but the target is {tuple(goal.shape)}.")
        per_sample = (prediction - goal.float()).pow(2).flatten(1).mean(dim=1)  # mean_flat over C, H, W (Flux: L, C)
        return {self.name: reduce_over_batch(per_sample, t, self.t_range, self.t_range_mode)}


def unpatchify_video(x: torch.Tensor, patch_size: Sequence[int], channels: int, grid: Sequence[int]) -> torch.Tensor:
    """(N, T, pt*ph*pw*C) -> (N, C, F, H, W) for the latent grid (F, H, W), in the layout of Wan's own output (tokens
    in (f, h, w) order, each a (pt, ph, pw, C) patch)."""
    (pt, ph, pw), (f, h, w) = patch_size, grid
    n = x.shape[0]
    x = x.reshape(n, f // pt, h // ph, w // pw, pt, ph, pw, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(n, channels, f, h, w)

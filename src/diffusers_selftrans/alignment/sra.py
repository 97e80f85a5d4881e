# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""SRA baseline: self-representation alignment to the EMA model at a less noisy time (SiT-SRA `loss.py`).

The teacher is the EMA copy of the student, passed per call, run without gradients. It sees the SAME x0 and the SAME
noise at `t_tea = clamp(t - t_max * U(0, 1), 0, 1)` (cleaner than the student's t), the student's post-dropout labels
(one shared `force_drop_ids` draw), and exits at block `teacher_layer`; its raw block output is the target. The
student's block `student_layer` goes through `SimpleHead = Linear(D, 2D) - SiLU - Linear(2D, D)`.

Losses:
- `"cos"` (current default of the code, weight 0.5): `1 - F.cosine_similarity(head, target)`, mean. The code calls it
  with the default `dim=1`, which on (N, T, D) tensors reduces over the TOKEN axis (method-notes §4.1). We keep that
  as the default (`cos_dim="tokens"`) because it is what produced SRA's reported numbers; `cos_dim="channels"` gives
  the per-token cosine that REPA/LayerSync use.
- `"smooth_l1"` (legacy `"sml1"`, β = 0.05), mean over all elements. The legacy weight schedule
  `2 * 0.1**((epoch - 149) / 1000 + 1 if epoch > 149 else 1)` is 0.2 up to epoch 149; we use that constant 0.2.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..transport import interpolate
from .common import AlignmentMethod, check_layer, default_layers, get_feature, module_device_dtype, resolve_sit_config

SRA_LOSSES = ("cos", "smooth_l1")
COS_DIMS = {"tokens": 1, "channels": -1}
# SRA `train.py`: `--t-max 0.2` (the teacher's time offset bound).
SRA_T_MAX = 0.2
# SRA `train.py`: 0.5 for "cos"; the legacy "sml1" schedule's value up to epoch 149: 2 * 0.1.
SRA_WEIGHTS = {"cos": 0.5, "smooth_l1": 0.2}
# SRA `loss.py`: `F.smooth_l1_loss(..., beta=0.05)`.
SRA_SMOOTH_L1_BETA = 0.05


class SimpleHead(nn.Module):
    """SRA `SimpleHead`: Linear(D, 2D) -> SiLU -> Linear(2D, D), per token."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        for module in self.net:
            if isinstance(module, nn.Linear):  # the SiT `initialize_weights` xavier pass covers the head [inferred]
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SRAAlignment(AlignmentMethod):
    r"""
    SRA self-alignment to the EMA teacher. Term: `"sra"`.

    Args:
        model_config: the student SiT's config (or the model).
        student_layer, teacher_layer (`int`, *optional*): defaults 4 and 8 for 12 blocks, 8 and 20 for 28.
        t_max (`float`, defaults to 0.2): bound of the teacher's time offset.
        loss_type (`str`, defaults to `"cos"`): `"cos"` or `"smooth_l1"`.
        cos_dim (`str`, defaults to `"tokens"`): the cosine axis, `"tokens"` (code parity) or `"channels"`.
        weight (`float`, *optional*): λ; default 0.5 for `"cos"`, 0.2 for `"smooth_l1"`.
        smooth_l1_beta (`float`, defaults to 0.05).

    Per call: `features` with `student_layer`, `x0`, `noise`, `t`, `class_labels`, `force_drop_ids` (the student's
    dropout draw; all False when nothing is dropped), `teacher` (the EMA SiT), optional `generator`.
    """

    name = "sra"
    trainable_module_names = ("head",)
    requires_teacher = True

    def __init__(
        self,
        model_config: Any,
        *,
        student_layer: Optional[int] = None,
        teacher_layer: Optional[int] = None,
        t_max: float = SRA_T_MAX,
        loss_type: str = "cos",
        cos_dim: str = "tokens",
        weight: Optional[float] = None,
        smooth_l1_beta: float = SRA_SMOOTH_L1_BETA,
    ):
        super().__init__()
        cfg = resolve_sit_config(model_config)
        if loss_type not in SRA_LOSSES:
            raise ValueError(f"Unknown SRA loss_type {loss_type!r}; expected one of {SRA_LOSSES}.")
        if cos_dim not in COS_DIMS:
            raise ValueError(f"Unknown cos_dim {cos_dim!r}; expected one of {tuple(COS_DIMS)}.")
        if not 0.0 <= t_max <= 1.0:
            raise ValueError(f"t_max must lie in [0, 1], got {t_max}.")
        defaults = default_layers(self.name, cfg["num_layers"])
        n = cfg["num_layers"]
        self.student_layer = check_layer(defaults["student_layer"] if student_layer is None else student_layer, n,
                                         "student_layer")
        # Checked against the teacher's depth at call time too; the EMA has the student's architecture.
        self.teacher_layer = check_layer(defaults["teacher_layer"] if teacher_layer is None else teacher_layer, n,
                                         "teacher_layer")
        self.t_max = float(t_max)
        self.loss_type = loss_type
        self.cos_dim = cos_dim
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.head = SimpleHead(cfg["hidden_size"])
        self.weights = {self.name: float(SRA_WEIGHTS[loss_type] if weight is None else weight)}
        self.teacher_forwards = 0  # teacher passes run eagerly (benchmarks, tests); a compiled step does not count

    @property
    def student_layers(self) -> Tuple[int, ...]:
        return (self.student_layer,)

    def teacher_time(self, t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t_tea = clamp(t - t_max * U(0, 1), 0, 1), one draw per sample: never noisier than the student's t."""
        u = torch.rand(t.shape, generator=generator, device=t.device, dtype=torch.float32)
        return (t.float() - self.t_max * u).clamp(0.0, 1.0)

    @torch.no_grad()
    def teacher_features(self, teacher: nn.Module, x0, noise, t_tea, class_labels, force_drop_ids) -> torch.Tensor:
        device, dtype = module_device_dtype(teacher)
        depth = teacher.config.num_layers
        if self.teacher_layer > depth:
            raise ValueError(f"teacher_layer {self.teacher_layer} exceeds the teacher's depth {depth}.")
        x_tea = interpolate(x0.float(), noise.float(), t_tea)
        out = teacher(x_tea.to(device=device, dtype=dtype), t_tea.to(device), class_labels.to(device),
                      stop_at_layer=self.teacher_layer, force_drop_ids=force_drop_ids.long().to(device))
        if not torch.compiler.is_compiling():  # a counter torch.compile would guard on (a recompile per step)
            self.teacher_forwards += 1
        return out.hidden_states[self.teacher_layer].float()

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction, target = prediction.float(), target.float()
        if self.loss_type == "smooth_l1":
            return F.smooth_l1_loss(prediction, target, beta=self.smooth_l1_beta)
        return (1 - F.cosine_similarity(prediction, target, dim=COS_DIMS[self.cos_dim])).mean()

    def forward(
        self,
        features: Mapping[int, torch.Tensor],
        *,
        x0: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        t: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        force_drop_ids: Optional[torch.Tensor] = None,
        teacher: Optional[nn.Module] = None,
        generator: Optional[torch.Generator] = None,
        **unused,
    ) -> Dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("sra needs `teacher` (the EMA model) on every call.")
        if x0 is None or noise is None or t is None or class_labels is None:
            raise ValueError("sra needs x0, noise, t and class_labels (the teacher re-noises the same x0 and noise).")
        if force_drop_ids is None:
            raise ValueError("sra needs `force_drop_ids`, the student's label-dropout draw, so the teacher sees the same "
                             "post-dropout labels (pass all False when no label is dropped).")
        t = torch.as_tensor(t, device=x0.device).float().reshape(-1)
        target = self.teacher_features(teacher, x0, noise, self.teacher_time(t, generator), class_labels,
                                       force_drop_ids)
        prediction = self.head(get_feature(features, self.student_layer, self.name).float())
        if prediction.shape != target.shape:
            raise ValueError(f"Student head output {tuple(prediction.shape)} vs teacher features {tuple(target.shape)}.")
        return {self.name: self.loss(prediction, target.to(prediction.device))}

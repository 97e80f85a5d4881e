# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Alignment losses that ride along the diffusion loss: one small module per method.

Methods (`ALIGNMENT_METHODS`): `"none"`, `"vae_align"` (Self-Transcendence stage 1), `"self_transcendence"` (stage 2),
and the baselines `"repa"`, `"sra"`, `"layersync"`, `"dispersive"`.

The interface (`AlignmentMethod`, an `nn.Module`):

- submodules = the trainable parts only (an `AlignmentProjector` or a small head; none for none/layersync/dispersive).
  Frozen networks (the ST guiding model, REPA's encoder) are held outside the module tree, so `parameters()`,
  `state_dict()`, `train()` and DDP never see them; they follow the data's device on first use. The SRA teacher (EMA)
  is passed per call.
- `student_layers`: tuple of 1-based student blocks the method needs (`output_hidden_states=`); empty when inactive.
- `weights`: `{term name: λ}`. The terms `forward` returns are UNWEIGHTED scalars; the caller sums `λ * term`.
- `is_active(step)`: False once a method has stopped for good (ST's `guide_stop_step`; the first such call also
  performs the stop). Call it before the student forward; when False, do not call the method at all.
- `forward(features, **batch) -> {term: scalar fp32 tensor}` (empty dict when inactive). `features` is the student's
  `out.hidden_states`. The batch keywords (each method takes what it needs and ignores the rest):
  `x0, noise, x_t, t, target` (from `Transport.sample`), `class_labels` (TRUE labels, before dropout),
  `force_drop_ids` (the one label-dropout draw the student used, bool (N,)), `step` (global step),
  `pixel_values` (raw images in [-1, 1], REPA only), `teacher` (EMA model, SRA only), `generator` (optional, SRA).
- flags `requires_pixel_values` (REPA) and `requires_teacher` (SRA) tell the data loader / script what to provide.
- every loss is computed in fp32 (features are cast with `.float()`), whatever the autocast or feature dtype.

A training step:

    align = build_alignment("self_transcendence", model.config, teacher=guiding_model, guide_stop_step=100_000)
    active = align.is_active(step)
    out = model(x_t, t, y, output_hidden_states=align.student_layers, force_drop_ids=drop.long())
    terms = align(out.hidden_states, x0=x0, noise=noise, x_t=x_t, t=t, target=v, class_labels=y,
                  force_drop_ids=drop, step=step) if active else {}
    loss = loss_diff + sum(align.weights[name] * value for name, value in terms.items())

Under accelerate/DDP, hand each of `align.trainable_modules()` (the projector or head; none for none/layersync/
dispersive) to `accelerator.prepare` and put the results back with `align.set_trainable_modules(prepared)`; the
method itself is never DDP-wrapped. After ST's early stop `forward` no longer calls its projector, and a DDP module
that is not called in an iteration expects no gradient: no unused-parameter error, no `find_unused_parameters`.
EMA / checkpoints should track those trainable modules, not the method object (the ST teacher hangs off it).
`accepted_options(name)` lists a method's constructor options (handy to filter generic CLI flags).

Depth-scaled layer defaults live in one place, `default_layers(method, num_layers)`.
"""

import inspect
from typing import Any, Tuple

from .common import (
    ALIGNMENT_METHODS,
    DEFAULT_T_RANGE,
    T_RANGE_MODES,
    AlignmentMethod,
    NoAlignment,
    default_layers,
    default_t2i_options,
    reduce_over_batch,
)
from .dispersive import DispersiveAlignment, dispersive_infonce_l2
from .layersync import LayerSyncAlignment
from .repa import REPAAlignment, load_encoder
from .self_transcendence import ClassConditionalGuide, PromptConditionalGuide, SelfTranscendence
from .sra import SimpleHead, SRAAlignment
from .vae_align import VAEAlignment

ALIGNMENT_CLASSES = {
    "none": NoAlignment,
    "vae_align": VAEAlignment,
    "self_transcendence": SelfTranscendence,
    "repa": REPAAlignment,
    "sra": SRAAlignment,
    "layersync": LayerSyncAlignment,
    "dispersive": DispersiveAlignment,
}


def build_alignment(name: str, model_config: Any, **options) -> AlignmentMethod:
    """`ALIGNMENT_CLASSES[name](model_config, **options)`; `model_config` is the student's config or the model.

    Required options: `teacher=` for `"self_transcendence"` (the guiding SiT); `encoder=` is optional for `"repa"`
    (default `facebook/dinov2-base`).
    """
    if name not in ALIGNMENT_CLASSES:
        raise ValueError(f"Unknown alignment method {name!r}; expected one of {ALIGNMENT_METHODS}.")
    if name == "none" and options:
        raise ValueError(f"The 'none' method takes no options, got {sorted(options)}.")
    return ALIGNMENT_CLASSES[name](model_config, **options)


def accepted_options(name: str) -> Tuple[str, ...]:
    """The keyword options `build_alignment(name, ...)` accepts, e.g. to filter generic CLI options per method."""
    if name not in ALIGNMENT_CLASSES:
        raise ValueError(f"Unknown alignment method {name!r}; expected one of {ALIGNMENT_METHODS}.")
    params = list(inspect.signature(ALIGNMENT_CLASSES[name].__init__).parameters.values())[2:]  # self, model_config
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


__all__ = [
    "ALIGNMENT_CLASSES",
    "ALIGNMENT_METHODS",
    "DEFAULT_T_RANGE",
    "T_RANGE_MODES",
    "AlignmentMethod",
    "ClassConditionalGuide",
    "DispersiveAlignment",
    "LayerSyncAlignment",
    "NoAlignment",
    "PromptConditionalGuide",
    "REPAAlignment",
    "SRAAlignment",
    "SelfTranscendence",
    "SimpleHead",
    "VAEAlignment",
    "accepted_options",
    "build_alignment",
    "default_layers",
    "default_t2i_options",
    "dispersive_infonce_l2",
    "load_encoder",
    "reduce_over_batch",
]

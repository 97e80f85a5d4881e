# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Self-Transcendence stage 2, "self-guided representation" (paper §3.3, Eqs. 3-4; code `loss.py::selftrans_Loss`).

A frozen guiding model (the stage-1 model, same architecture) sees the student's own `x_t` and `t` twice in ONE
batched pass, with the true labels and with the null class, and exits at block `guiding_layer`. Feature-space CFG
`f_g = f_u + w (f_c - f_u)` (fp32, not normalised) is the target; the student's block `guided_layer` goes through
`AlignmentProjector(D, 2048, D_teacher)` and regresses `f_g` with MSE (mean over tokens and channels per sample,
then over the batch, restricted to `t_range`).

Early stop (paper §4.1/§4.4, code `--stop-epoch` compared with the global step): from `guide_stop_step` on the method
is inactive, its teacher is never run again and is released, and the projector is frozen.

The loss is written once; only the teacher call is pluggable (`self.guide`, built from the teacher's type):
- `ClassConditionalGuide` (our SiT): labels `[y, null class]` (exactly the released class-conditional code);
- `PromptConditionalGuide` (diffusers transformers through `BlockFeatures`: SD3, Flux, PixArt, Sana, DiT): each
  conditioning keyword (`encoder_hidden_states`, `pooled_projections`, `encoder_attention_mask`, `class_labels`, ...)
  becomes `[caption's, empty prompt's broadcast to the batch]` (released T2I code: `empty_context.npy`), the time is
  converted with `model_timestep`, and the pass exits after the guiding block.

A teacher that shares the student's module (`lora.AdapterTeacher`: the stage-1 LoRA adapter, or the base with the
adapters off, on the student's own base weights) is neither frozen nor cast: its `model` is the module the guide runs,
inside its `context()` (which switches the adapter around the one no-grad pass and restores the student's).
"""

import contextlib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.block_features import BlockFeatures, model_inputs, model_timestep
from ..models.projector import DEFAULT_PROJECTOR_DIM, AlignmentProjector
from .common import (
    DEFAULT_T_RANGE,
    DEFAULT_T_RANGE_MODE,
    AlignmentMethod,
    check_layer,
    check_t_range,
    default_layers,
    follow_device,
    freeze,
    frozen_forward_context,
    get_feature,
    make_projector,
    module_device_dtype,
    T2I_GUIDANCE_SCALE,
    reduce_over_batch,
    resolve_model_config,
    uses_lightningdit_options,
)

# Paper §4.1: w = 30 for SiT and w = 10 for LightningDiT backbones (`train_selftrans.sh --cfg_guide=30.0`).
GUIDANCE_SCALE_SIT = 30.0
GUIDANCE_SCALE_LIGHTNINGDIT = 10.0
# Paper §4.3 / Table 5 and `train_selftrans.sh --proj-coeff 0.5`.
GUIDE_WEIGHT = 0.5


def check_same_classes(student_id2label: Optional[Mapping], teacher_id2label: Optional[Mapping]) -> None:
    """The teacher's label k must mean the student's label k: refuse `id2label`s that name other classes.

    A config without names cannot be checked and is accepted. Ids are compared as ints (JSON stores them as strings).
    """
    if not student_id2label or not teacher_id2label:
        return
    student = {int(k): v for k, v in student_id2label.items()}
    teacher = {int(k): v for k, v in teacher_id2label.items()}
    if student == teacher:
        return
    differ = sorted(k for k in set(student) | set(teacher) if student.get(k) != teacher.get(k))
    shown = ", ".join(f"{k}: {student.get(k)!r} vs {teacher.get(k)!r}" for k in differ[:5])
    raise ValueError(
        f"The guiding model's classes differ from the training data's in {len(differ)} of {len(student)} ids "
        f"(student vs teacher: {shown}{', ...' if len(differ) > 5 else ''}). Its f_c would guide towards other "
        f"classes. Train the guiding model on the same data, or pass --guiding_classes_correspond "
        f"(classes_correspond=True) if its class k really is the data's class k."
    )


class ClassConditionalGuide:
    """The SiT teacher call: one pass over `[x_t, x_t]` with labels `[y, null]`, exiting after the guiding block."""

    def __init__(self, null_class: int):
        self.null_class = null_class

    def check(self, *, class_labels: Optional[torch.Tensor] = None, **unused) -> None:
        if class_labels is None:
            raise ValueError("self_transcendence needs x_t, t and class_labels (the true, undropped labels).")
        # checked where reading the labels costs no host sync (CPU); see SiTTransformer2DModel.forward
        if (class_labels.device.type == "cpu" and not torch.compiler.is_compiling() and class_labels.numel()
                and int(class_labels.max()) >= self.null_class):
            raise ValueError(f"class_labels contain the null class {self.null_class}; pass the true labels (the "
                             "student's dropout goes through force_drop_ids, the teacher's branch is never dropped).")

    def __call__(self, teacher: nn.Module, x_t2: torch.Tensor, t2: torch.Tensor, layer: int, *,
                 class_labels: torch.Tensor, **unused) -> torch.Tensor:
        labels = torch.cat([class_labels, torch.full_like(class_labels, self.null_class)])
        return teacher(x_t2, t2, labels, stop_at_layer=layer).hidden_states[layer]

    def close(self) -> None:
        pass


def _broadcast_null(name: str, cond: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """The empty prompt's tensor (batch 1, or unbatched) expanded to the caption tensor's shape, or a clear error."""
    null = null.to(device=cond.device, dtype=cond.dtype)
    if null.ndim == cond.ndim - 1:
        null = null.unsqueeze(0)
    if null.ndim != cond.ndim or null.shape[0] != 1 or null.shape[1:] != cond.shape[1:]:
        raise ValueError(f"The empty prompt's {name} has shape {tuple(null.shape)}; it must be (1, *{tuple(cond.shape[1:])}) "
                         f"to broadcast to the caption's {tuple(cond.shape)} (pad both to the same length).")
    return null.expand_as(cond)


class PromptConditionalGuide:
    """The diffusers teacher call (through `BlockFeatures`): conditional = the caption's conditioning, unconditional
    = `null_conditioning` (the empty prompt's, batch 1) broadcast to the batch, same x_t and t, ONE batched pass
    `[cond, uncond]`, early exit after the guiding block.

    Per call: `conditioning` (dict of batched tensors, the keys of `null_conditioning`), optionally `shared_kwargs`
    (batched tensors the same in both halves, e.g. Flux `guidance`) and `model_kwargs` (passed unchanged, e.g. Flux
    `img_ids`/`txt_ids`, PixArt `added_cond_kwargs`).
    """

    def __init__(self, teacher: nn.Module, null_conditioning: Mapping[str, torch.Tensor]):
        if not null_conditioning:
            raise ValueError("A diffusers guiding model needs `null_conditioning`: the empty prompt's conditioning "
                             "(e.g. {'encoder_hidden_states': ..., 'pooled_projections': ...}, batch 1).")
        # per-sample lists (Z-Image's unpadded `cap_feats`) stay lists
        self.null_conditioning = {k: list(v) if isinstance(v, (list, tuple)) else torch.as_tensor(v)
                                  for k, v in null_conditioning.items()}
        self.features = BlockFeatures(teacher)
        self.teacher = teacher

    def check(self, *, conditioning: Optional[Mapping[str, torch.Tensor]] = None, **unused) -> None:
        if conditioning is None:
            raise ValueError("self_transcendence with a diffusers guiding model needs x_t, t and `conditioning` "
                             "(the caption's encoder_hidden_states, pooled_projections, ...).")
        if set(conditioning) != set(self.null_conditioning):
            raise ValueError(f"conditioning has keys {sorted(conditioning)} but the empty prompt's "
                             f"null_conditioning has {sorted(self.null_conditioning)}; they must match.")

    def __call__(self, teacher: nn.Module, x_t2: torch.Tensor, t2: torch.Tensor, layer: int, *,
                 conditioning: Mapping[str, torch.Tensor], shared_kwargs: Optional[Mapping[str, torch.Tensor]] = None,
                 model_kwargs: Optional[Mapping[str, Any]] = None, **unused) -> torch.Tensor:
        kwargs = dict(model_kwargs or {})
        for name, cond in conditioning.items():
            null = self.null_conditioning[name]
            if isinstance(cond, (list, tuple)):  # per-sample lists: the captions', then the empty prompt's
                kwargs[name] = list(cond) + [null[0].to(cond[0].device, cond[0].dtype)] * len(cond)
            else:
                kwargs[name] = torch.cat([cond, _broadcast_null(name, cond, null)])
        for name, value in (shared_kwargs or {}).items():
            kwargs[name] = torch.cat([value, value])
        # the family's latent and time arguments (Z-Image: per-sample latent lists and `t`)
        return self.features(**model_inputs(teacher, x_t2, t2), stop_at_layer=layer, **kwargs).hidden_states[layer]

    def close(self) -> None:
        self.features.close()
        self.features = self.teacher = None


class SelfTranscendence(AlignmentMethod):
    r"""
    Stage-2 self-guided representation alignment. Term: `"guide"`.

    Args:
        model_config: the student SiT's config (or the model), or a diffusers transformer instance (then `teacher`
            is one of the same class; T2I defaults: `default_t2i_options("self_transcendence", n)`).
        teacher (`SiTTransformer2DModel` or a diffusers transformer): the guiding model, loaded by the caller
            (stage-1 `model` weights; the T2I release loads the EMA). It is
            put in `eval()`, frozen and optionally cast to `teacher_dtype`. It is NOT a submodule: it stays out of
            `parameters()`, `state_dict()`, `train()`/`eval()` and DDP, and follows the data's device on first use.
            Or a `lora.AdapterTeacher` on the student's own transformer (the stage-1 LoRA adapter, or the base with
            its adapters off): not frozen or cast, its pass runs inside its `context()`; `teacher_dtype` is refused.
        guided_layer, guiding_layer (`int`, *optional*): student / teacher blocks; defaults n/2 and 2n/3 of the
            respective depths (`default_layers`; XL guiding = 19).
        guidance_scale (`float`, *optional*): w; default 30, or 10 when the student uses any LightningDiT option
            (`norm_type="rms_norm"`, `mlp_type="swiglu"` or `use_rope=True`), or 5 for a diffusers (T2I) student.
        weight (`float`, defaults to 0.5): λ_guide.
        t_range, t_range_mode: as in `VAEAlignment` (defaults `(0.4, 0.7)`, `"code_compat"`).
        guide_stop_step (`int`, *optional*): first global step without the guide loss (B: 20 epochs, L/XL: 10).
        teacher_dtype (`torch.dtype`, *optional*): cast the teacher's WEIGHTS (e.g. `torch.bfloat16`; bf16 autocast
            on CUDA). Its residual stream is then bf16 too, and w = 30 amplifies that rounding in `f_c - f_u`.
        teacher_autocast (`torch.dtype`, *optional*): run the teacher under this autocast on CUDA with its weights
            as loaded. `torch.bfloat16` with fp32 weights is as fast as bf16 weights but keeps the residual stream
            in fp32, so w = 30 amplifies less rounding (`benchmarks/gpu_check.py` measures the f_g error of both
            against fp32 on a GPU). The recommended setting. Ignored on CPU.
        projector_dim (`int`, defaults to 2048), projector (`AlignmentProjector`, *optional*): as in `VAEAlignment`.
        classes_correspond (`bool`, defaults to False): accept a teacher whose `id2label` names other classes than
            the student's (same count): its class k is then taken to mean the student's class k.
        null_conditioning (`dict`, *optional*): diffusers teacher only, required there: the empty prompt's
            conditioning keywords (batch 1), broadcast to the batch as the unconditional branch.

    Per call: `features` with block `guided_layer`, `x_t`, `t`, `step` (global step, for the early stop), and
    SiT: `class_labels` (the TRUE labels, never the dropped ones); diffusers: `conditioning` (the caption's,
    never dropped), optionally `shared_kwargs` and `model_kwargs` (see `PromptConditionalGuide`).
    """

    name = "self_transcendence"
    trainable_module_names = ("projector",)
    term = "guide"

    def __init__(
        self,
        model_config: Any,
        teacher: nn.Module,
        *,
        guided_layer: Optional[int] = None,
        guiding_layer: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        weight: float = GUIDE_WEIGHT,
        t_range: Optional[Sequence[float]] = DEFAULT_T_RANGE,
        t_range_mode: str = DEFAULT_T_RANGE_MODE,
        guide_stop_step: Optional[int] = None,
        teacher_dtype: Optional[torch.dtype] = None,
        teacher_autocast: Optional[torch.dtype] = None,
        projector_dim: int = DEFAULT_PROJECTOR_DIM,
        projector: Optional[AlignmentProjector] = None,
        classes_correspond: bool = False,
        null_conditioning: Optional[Mapping[str, torch.Tensor]] = None,
    ):
        super().__init__()
        student = resolve_model_config(model_config)
        if teacher is None or not hasattr(teacher, "config"):
            raise ValueError("self_transcendence needs the guiding model (a SiTTransformer2DModel) as `teacher`.")
        shared = getattr(teacher, "shares_student_weights", False)  # lora.AdapterTeacher
        if shared:
            if teacher_dtype is not None:
                raise ValueError("teacher_dtype casts the guiding model's weights, but this teacher shares them with "
                                 "the student; use teacher_autocast.")
            student_module = getattr(model_config, "_orig_mod", model_config)
            if isinstance(model_config, nn.Module) and student_module is not teacher.model:
                raise ValueError("The adapter teacher must live on the student's own transformer (the model passed "
                                 "here), not on a copy.")
        context, teacher = (teacher.context, teacher.model) if shared else (None, teacher)
        sit = student["family"] == "sit"
        tea = resolve_model_config(teacher.config if sit else teacher)
        if tea["family"] != student["family"]:
            raise ValueError(f"The guiding model is a {tea['family']} transformer but the student is a "
                             f"{student['family']} one; stage 2 guides a model with its own architecture's features.")

        # 1. Shapes: the teacher sees the student's x_t, and the projector maps student tokens to teacher tokens.
        for key in ("in_channels", "sample_size") if sit else ("in_channels", "sample_size", "patch_size"):
            if tea[key] != student[key]:
                raise ValueError(f"The teacher's {key} ({tea[key]}) differs from the student's ({student[key]}); "
                                 "it must take the student's x_t unchanged.")
        if tea["num_tokens"] != student["num_tokens"]:
            raise ValueError(f"Token counts differ: student {student['num_tokens']} vs teacher {tea['num_tokens']} "
                             f"(patch sizes {student['patch_size']} vs {tea['patch_size']}).")
        if sit:
            if tea["num_classes"] != student["num_classes"]:
                raise ValueError(f"num_classes differ: student {student['num_classes']} vs teacher {tea['num_classes']}.")
            if not classes_correspond:
                check_same_classes(student["id2label"], tea["id2label"])
            if not tea["class_dropout_prob"] > 0:
                raise ValueError("The teacher has no null class (class_dropout_prob == 0), so f_u cannot be computed.")
            if null_conditioning is not None:
                raise ValueError("null_conditioning is for diffusers guiding models; a SiT teacher uses its null class.")
        defaults_s = default_layers(self.name, student["num_layers"])
        defaults_t = default_layers(self.name, tea["num_layers"])
        self.guided_layer = check_layer(
            defaults_s["guided_layer"] if guided_layer is None else guided_layer, student["num_layers"], "guided_layer"
        )
        guiding = defaults_t["guiding_layer"] if guiding_layer is None else guiding_layer
        self.guiding_layer = check_layer(guiding, tea["num_layers"], "guiding_layer (a teacher block)")
        if guide_stop_step is not None and guide_stop_step < 0:
            raise ValueError(f"guide_stop_step must be >= 0 or None, got {guide_stop_step}.")

        # 2. Hyper-parameters.
        if guidance_scale is None and not sit:
            guidance_scale = T2I_GUIDANCE_SCALE
        elif guidance_scale is None:
            lightning = uses_lightningdit_options(student)
            guidance_scale = GUIDANCE_SCALE_LIGHTNINGDIT if lightning else GUIDANCE_SCALE_SIT
        self.guidance_scale = float(guidance_scale)
        self.t_range = check_t_range(t_range, t_range_mode)
        self.t_range_mode = t_range_mode
        self.guide_stop_step = guide_stop_step
        if teacher_autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"teacher_autocast must be None, torch.bfloat16 or torch.float16, got {teacher_autocast}.")
        self.teacher_autocast = teacher_autocast
        self.null_class = tea["num_classes"] if sit else None
        self.weights = {self.term: float(weight)}

        # 3. Parts: trainable projector (a submodule), frozen teacher (held outside the module tree) and its call.
        self.projector = make_projector(projector, student["hidden_size"], tea["hidden_size"], projector_dim)
        self._hold_frozen("teacher", teacher if shared else freeze(teacher, teacher_dtype))
        self._hold_frozen("teacher_context", context)
        guide = ClassConditionalGuide(self.null_class) if sit else PromptConditionalGuide(teacher, null_conditioning)
        self._hold_frozen("guide", guide)
        self.stopped = False
        self.teacher_forwards = 0  # teacher passes run eagerly (benchmarks, tests); a compiled step does not count

    @property
    def student_layers(self) -> Tuple[int, ...]:
        return () if self.stopped else (self.guided_layer,)

    def is_active(self, step: Optional[int] = None) -> bool:
        """False from `guide_stop_step` on. The first such call also performs the stop (see `stop`)."""
        if not self.stopped and step is not None and self.guide_stop_step is not None and step >= self.guide_stop_step:
            self.stop()
        return not self.stopped

    def stop(self) -> None:
        """Ends the guide phase for good: releases the teacher and freezes the projector.

        Under DDP the training script keeps the projector (this module) as its own accelerate-prepared module and
        simply stops calling it once `is_active(step)` is False: a DDP module whose forward is not run in an iteration
        expects no gradients for it, so neither `find_unused_parameters=True` nor a zero-weighted dummy term is
        needed (method-notes §6.9). Frozen parameters are also skipped by the optimizer, so later steps leave the
        projector as it was.
        """
        self.stopped = True
        self.projector.requires_grad_(False)
        self._hold_frozen("teacher", None)  # drop our reference so its memory can be freed
        self._hold_frozen("teacher_context", None)
        if self.guide is not None:
            self.guide.close()  # a diffusers teacher's hooks and the adapter's reference go too

    @torch.no_grad()
    def guiding_features(
        self, x_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None, **conditioning
    ) -> torch.Tensor:
        """f_g = f_u + w (f_c - f_u) in fp32, from ONE teacher pass over [x_t, x_t] with conditions [cond, uncond]
        (SiT: labels [y, null]; diffusers: `conditioning=` [caption, empty prompt], see `PromptConditionalGuide`)."""
        if self.teacher is None:
            raise RuntimeError("The guide phase has stopped; the teacher was released.")
        n = x_t.shape[0]
        follow_device(self.teacher, x_t.device)
        _, dtype = module_device_dtype(self.teacher)
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(n) if t.ndim == 0 else t.reshape(n)
        shared = self.teacher_context() if self.teacher_context is not None else contextlib.nullcontext()
        with shared, frozen_forward_context(x_t.device, dtype, self.teacher_autocast):
            features = self.guide(self.teacher, torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]),
                                  self.guiding_layer, class_labels=class_labels, **conditioning)
        if not torch.compiler.is_compiling():  # a counter torch.compile would guard on (a recompile per step)
            self.teacher_forwards += 1
        f_c, f_u = features.float().chunk(2)
        return f_u + self.guidance_scale * (f_c - f_u)

    def forward(
        self,
        features: Mapping[int, torch.Tensor],
        *,
        x_t: Optional[torch.Tensor] = None,
        t: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        conditioning: Optional[Mapping[str, torch.Tensor]] = None,
        shared_kwargs: Optional[Mapping[str, torch.Tensor]] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        step: Optional[int] = None,
        **unused,
    ) -> Dict[str, torch.Tensor]:
        if not self.is_active(step):
            return {}
        if x_t is None or t is None:
            self.guide.check()  # the guide's own message names what its teacher call needs
            raise ValueError("self_transcendence needs x_t and t.")
        self.guide.check(class_labels=class_labels, conditioning=conditioning)
        extra = {} if conditioning is None else dict(
            conditioning=conditioning, shared_kwargs=shared_kwargs, model_kwargs=model_kwargs)
        target = self.guiding_features(x_t, t, class_labels, **extra)
        prediction = self.projector(get_feature(features, self.guided_layer, self.name).float()).float()
        if prediction.shape != target.shape:
            raise ValueError(f"Projected student features {tuple(prediction.shape)} vs guiding features "
                             f"{tuple(target.shape)}.")
        per_sample = (prediction - target).pow(2).mean(dim=(1, 2))  # mean_flat over tokens and channels
        return {self.term: reduce_over_batch(per_sample, t, self.t_range, self.t_range_mode)}

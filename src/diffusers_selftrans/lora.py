# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""LoRA in both Self-Transcendence stages (issue 28), through `peft`, saved in diffusers' LoRA format.

- `add_lora(transformer, rank)`: a trainable adapter on the attention and feed-forward projections of every block
  (`DEFAULT_TARGET_MODULES`, per family); the base weights stay frozen.
- `save_lora(output_dir, pipeline_cls, transformer, adapter_name, ema=...)`: the adapter (or its EMA) as diffusers'
  `pytorch_lora_weights.safetensors` (the LoraConfig in its metadata), so `pipe.load_lora_weights(output_dir)` on the
  base pipeline loads it with only diffusers and peft, plus `selftrans_lora.json`: family, layout and a digest of the
  base weights the adapter was trained on.
- `load_lora(transformer, folder, adapter_name="guide")`: the stage-1 adapter as a second, frozen named adapter of the
  student's own module, after refusing one of another family, layout or base (`ValueError`s naming what differs).
- `AdapterTeacher(transformer, "guide")`: the stage-2 guiding model that costs nothing to hold. It is the student's own
  module with the stage-1 adapter active; `adapter_name=None` makes it the pretrained base itself (every adapter off:
  fine-tuning without a stage 1). Pass it as `teacher=` to `build_alignment("self_transcendence", transformer, ...)`:
  the teacher pass (one batched no-grad early-exit pass, caption and empty prompt) runs inside `AdapterTeacher.context`,
  which switches the adapter and restores the student's afterwards, on the same base tensors.
- `adapter_ema`, `adapter_state_dict`, `load_adapter_state_dict`: EMA and exact resume of the adapter weights alone.

Transformers whose class has diffusers' `PeftAdapterMixin` (SD3, Flux, Sana, ...) go through its `add_adapter`,
`set_adapter`, `disable_adapters` / `enable_adapters` and `load_lora_adapter`; PixArt and DiT, which lack it, through
peft's `inject_adapter_in_model` / `set_peft_model_state_dict` and its tuner layers' own `set_adapter` /
`enable_adapters` (what the mixin calls). Neither their transformers nor their pipelines can load a LoRA in diffusers
(no `load_lora_adapter` / `load_lora_weights`): `load_lora(pipe.transformer, output_dir)` here does.
"""

import contextlib
import json
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .models.block_features import transformer_family
from .provenance import check_provenance, sampled_values, tensors_digest

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE, what load_lora_weights reads
LORA_RECORD_NAME = "selftrans_lora.json"
LORA_PREFIX = "transformer"  # the pipeline component the weights file's keys are prefixed with

_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_JOINT_ATTENTION = _ATTENTION + ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_SELF_AND_CROSS = tuple(f"attn{i}.{name}" for i in (1, 2) for name in ("to_q", "to_k", "to_v", "to_out.0"))

# Per family (`TransformerFamily.name`): the attention and feed-forward projections, as paths inside a block (a name
# matches a module whose path in its block equals it or ends with "." + it). Only modules inside the numbered block
# lists are adapted (never the patch / text embedders or the final layer), and only `nn.Linear` / `nn.Conv2d` ones.
DEFAULT_TARGET_MODULES: Dict[str, tuple] = {
    # JointTransformerBlock (SD3.5's dual-attention blocks add attn2; the last block has no context feed-forward)
    "sd3": _JOINT_ATTENTION + tuple(f"attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0"))
    + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    # double-stream blocks as SD3; single-stream blocks: q/k/v, the MLP input and the joint output projection
    "flux": _JOINT_ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                "proj_mlp", "proj_out"),
    "pixart": _SELF_AND_CROSS + ("ff.net.0.proj", "ff.net.2"),
    # Sana's feed-forward is GLUMBConv: its 1x1 convolutions (the depthwise one is left out)
    "sana": _SELF_AND_CROSS + ("ff.conv_inverted", "ff.conv_point"),
    "dit": _SELF_AND_CROSS + ("ff.net.0.proj", "ff.net.2"),
    # double-stream blocks; single-stream blocks fuse q/k/v and the MLP input (to_qkv_mlp_proj) and their output
    "flux2": _JOINT_ATTENTION + ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                                 "attn.to_qkv_mlp_proj", "attn.to_out"),
    "qwenimage": _JOINT_ATTENTION + ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
    "lumina2": _ATTENTION + ("feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3"),
    "zimage": tuple(f"attention.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0"))
    + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "wan": _SELF_AND_CROSS + ("ffn.net.0.proj", "ffn.net.2"),
}
_ADAPTABLE = (nn.Linear, nn.Conv2d)
# What the record keeps of a LoraConfig: enough to rebuild it and to check the weights file against it.
_RECORDED_CONFIG = ("r", "lora_alpha", "target_modules", "use_dora", "lora_dropout")


def _unwrap(transformer: nn.Module) -> nn.Module:
    return getattr(transformer, "_orig_mod", transformer)  # torch.compile's OptimizedModule


def _has_peft_mixin(module: nn.Module) -> bool:
    from diffusers.loaders.peft import PeftAdapterMixin

    return isinstance(module, PeftAdapterMixin)


def _tuner_layers(module: nn.Module) -> List[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_of(parameter_name: str) -> Optional[str]:
    """The adapter a parameter belongs to (`...to_q.lora_A.student.weight` -> "student"), `None` for base weights."""
    parts = parameter_name.split(".")
    for part, following in zip(parts, parts[1:]):
        if part.startswith("lora_"):
            return following
    return None


def adapter_parameters(transformer: nn.Module, adapter_name: str) -> List[nn.Parameter]:
    """The parameters of one named adapter, in module order (the order `adapter_ema` and `save_lora` use)."""
    return [p for name, p in _unwrap(transformer).named_parameters() if adapter_of(name) == adapter_name]


def adapted_modules(transformer: nn.Module, adapter_name: str) -> List[str]:
    """The full names of the modules that carry the adapter `adapter_name`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in _unwrap(transformer).named_modules()
            if isinstance(m, BaseTunerLayer) and adapter_name in getattr(m, "lora_A", {})]


def active_adapters(transformer: nn.Module) -> List[str]:
    """The adapters the forward uses now (`[]` without adapters)."""
    layers = _tuner_layers(_unwrap(transformer))
    return list(layers[0].active_adapters) if layers else []


def _set_adapter(module: nn.Module, names) -> None:
    """Activates `names` (peft also marks them trainable and the others frozen: callers restore requires_grad)."""
    if _has_peft_mixin(module):
        module.set_adapter(names)
    else:
        for layer in _tuner_layers(module):
            layer.set_adapter(names)


def _enable_adapters(module: nn.Module, enabled: bool) -> None:
    if _has_peft_mixin(module):
        module.enable_adapters() if enabled else module.disable_adapters()
    else:
        for layer in _tuner_layers(module):
            layer.enable_adapters(enabled)


@contextlib.contextmanager
def _keep_requires_grad(module: nn.Module):
    """Restores every parameter's requires_grad on exit: peft's adapter switches set them."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _several_adapters_on_purpose():
    """Silences peft's warning that a model already has an adapter: two named adapters on one model is the design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        yield


def lora_target_modules(transformer: nn.Module, target_modules: Optional[Iterable[str]] = None) -> List[str]:
    """The full names of the modules an adapter targets: each name of `target_modules` (default: the family's
    `DEFAULT_TARGET_MODULES`) matched against the module paths inside each block (equal, or ending with "." + name),
    `nn.Linear` / `nn.Conv2d` only. A given name that matches nothing is an error (a typo would silently adapt less);
    the defaults may name modules a variant lacks (SD3's attn2)."""
    module = _unwrap(transformer)
    family = transformer_family(module)
    if target_modules is None:
        if family.name not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"No default LoRA target modules for {family.class_name}; pass target_modules.")
        names, strict = DEFAULT_TARGET_MODULES[family.name], False
    else:
        names, strict = tuple(target_modules), True
        if not names:
            raise ValueError("target_modules is empty.")
    from peft.tuners.tuners_utils import BaseTunerLayer

    found, used = [], set()
    for list_name in family.block_lists:
        for index, block in enumerate(getattr(module, list_name)):
            for path, sub in block.named_modules():
                parts = path.split(".")
                if not path or "base_layer" in parts or any(part.startswith("lora_") for part in parts):
                    continue  # peft's own submodules of an already adapted layer
                base = sub.get_base_layer() if isinstance(sub, BaseTunerLayer) else sub
                hits = [n for n in names if path == n or path.endswith("." + n)]
                if hits and isinstance(base, _ADAPTABLE):
                    found.append(f"{list_name}.{index}.{path}")
                    used.update(hits)
    unused = [n for n in names if n not in used]
    if (strict and unused) or not found:
        raise ValueError(f"LoRA target modules {unused or list(names)} match no Linear / Conv2d module inside the "
                         f"blocks of this {family.class_name} (block-relative paths, e.g. 'attn.to_q').")
    return found


def add_lora(transformer: nn.Module, rank: int, alpha: Optional[float] = None,
             target_modules: Optional[Sequence[str]] = None, use_dora: bool = False, adapter_name: str = "student",
             dropout: float = 0.0):
    """Adds a trainable LoRA adapter named `adapter_name` and makes it the active one; afterwards ONLY its parameters
    require grad (the base, and any other adapter, are frozen). `alpha` defaults to `rank` (scale 1); the adapter
    starts as the identity (peft's zero-initialised B). Returns its `peft.LoraConfig`."""
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"The LoRA rank must be a positive int, got {rank!r}.")
    module = _unwrap(transformer)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, use_dora=use_dora,
                        target_modules=lora_target_modules(module, target_modules), lora_dropout=dropout)
    if adapter_name in (getattr(module, "peft_config", None) or {}):
        raise ValueError(f"The transformer already has an adapter named {adapter_name!r}.")
    with _several_adapters_on_purpose():
        if _has_peft_mixin(module):
            module.add_adapter(config, adapter_name)
        else:
            inject_adapter_in_model(config, module, adapter_name)
            _set_adapter(module, adapter_name)
    for name, p in module.named_parameters():
        p.requires_grad_(adapter_of(name) == adapter_name)
    return config


def base_digest(transformer: nn.Module) -> str:
    """The identity of the base weights an adapter belongs to: `tensors_digest` of the state dict with every adapter
    left out and peft's `.base_layer` names read as the plain ones, so adding adapters does not change it, and of the
    class and config. Values are rounded to bf16 first, so the same checkpoint loaded in fp32 or bf16 digests alike."""
    module = _unwrap(transformer)

    def sampled(tensor):
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard: the digest is of the whole tensor
            tensor = tensor.full_tensor()
        flat = sampled_values(tensor.reshape(-1))
        return flat.to(torch.bfloat16) if flat.is_floating_point() else flat

    named = [(f"{name.replace('.base_layer.', '.')}{tuple(tensor.shape)}", sampled(tensor))
             for name, tensor in module.state_dict().items() if adapter_of(name) is None]
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    return tensors_digest(named, extra=[type(module).__name__, config])


def _config_dict(config) -> dict:
    """`LoraConfig.to_dict()` with sets as sorted lists (JSON, and what diffusers writes into the metadata)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def save_lora(output_dir, pipeline_cls, transformer: nn.Module, adapter_name: str = "student", *, ema=None,
              is_main_process: bool = True, weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Writes the adapter `adapter_name` (its EMA weights when `ema` is given: an `adapter_ema`, or anything whose
    `shadow_params` follow `adapter_parameters`, sharded or gathered whole) into `output_dir` in
    diffusers' LoRA format: `pipeline_cls.save_lora_weights` (keys `transformer.<module>.lora_A.weight`, the
    LoraConfig in the safetensors metadata), what `pipeline_cls.from_pretrained(base).load_lora_weights(output_dir)`
    loads. For a pipeline class without it (PixArt, DiT, or `None`) the same file is written with diffusers'
    `LoraBaseMixin.write_lora_layers` (what `load_lora_adapter(output_dir, prefix="transformer")` of a transformer
    with diffusers' PeftAdapterMixin reads; PixArt and DiT have none: use `load_lora`). Beside it
    `selftrans_lora.json` records the family, the layout and `base_digest`, which `load_lora` checks. Every process
    must call it under FSDP (the digest gathers); only the main one writes."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    module = _unwrap(transformer)
    if adapter_name not in (getattr(module, "peft_config", None) or {}):
        raise ValueError(f"The transformer has no adapter named {adapter_name!r}.")
    config = module.peft_config[adapter_name]
    named = [(name, p) for name, p in module.named_parameters() if adapter_of(name) == adapter_name]
    values = [p for _, p in named] if ema is None else list(ema.shadow_params)  # in `adapter_parameters` order
    if len(values) != len(named) or any(v.shape != p.shape for v, (_, p) in zip(values, named)):
        raise ValueError(f"The EMA holds {len(values)} tensors, not the {len(named)} of adapter {adapter_name!r} "
                         "(build it with adapter_ema, or on adapter_parameters).")
    # peft's key format from the adapter's own parameter names, values copied to CPU (FSDP2 shards gathered whole)
    full = {name: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu", copy=True).contiguous()
            for (name, _), v in zip(named, values)}
    state = get_peft_model_state_dict(module, state_dict=full, adapter_name=adapter_name)
    digest = base_digest(module)
    output_dir = Path(output_dir)
    if not is_main_process:
        return output_dir
    metadata = _config_dict(config)
    if hasattr(pipeline_cls, "save_lora_weights"):
        pipeline_cls.save_lora_weights(output_dir, transformer_lora_layers=state, weight_name=weight_name,
                                       transformer_lora_adapter_metadata=metadata)
    else:
        LoraBaseMixin.write_lora_layers(
            state_dict={f"{LORA_PREFIX}.{k}": v for k, v in state.items()}, save_directory=str(output_dir),
            is_main_process=True, weight_name=weight_name, save_function=None, safe_serialization=True,
            lora_adapter_metadata={f"{LORA_PREFIX}.{k}": v for k, v in metadata.items()})
    family = transformer_family(module)
    lora = {k: metadata[k] for k in _RECORDED_CONFIG}
    lora["target_modules"] = adapted_modules(module, adapter_name)  # peft may have shortened the config's list
    record = {"family": family.name, "transformer_class": type(module).__name__, "base_digest": digest,
              "weight_name": weight_name, "weights": "ema" if ema is not None else "trained", "lora": lora}
    (output_dir / LORA_RECORD_NAME).write_text(json.dumps(record, indent=1, sort_keys=True))
    return output_dir


def read_lora(folder):
    """(record, adapter state dict in peft's key format) of a `save_lora` folder; a clear error when it is none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / LORA_RECORD_NAME
    if not path.is_file():
        raise ValueError(f"{folder} has no {LORA_RECORD_NAME}: it was not written by save_lora, so the base model, "
                         "family and layout of its adapter cannot be checked.")
    record = json.loads(path.read_text())
    weights = folder / record["weight_name"]
    if not weights.is_file():
        raise ValueError(f"{folder}: {record['weight_name']}, the weights its {LORA_RECORD_NAME} names, is missing.")
    prefix = f"{LORA_PREFIX}."
    state = {k[len(prefix):]: v for k, v in load_file(weights).items() if k.startswith(prefix)}
    return record, state


def check_lora(transformer: nn.Module, folder, record: dict, state: Dict[str, torch.Tensor]) -> None:
    """Refuses (`ValueError`, `ProvenanceError` for the base) an adapter of another family, whose weights file does
    not hold the layout its record states (modules, rank), that does not fit this transformer's layers, or that was
    trained on other base weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    module = _unwrap(transformer)
    family = transformer_family(module)
    if (record["family"], record["transformer_class"]) != (family.name, type(module).__name__):
        raise ValueError(f"{folder} holds a LoRA adapter of a {record['transformer_class']} ({record['family']} "
                         f"family), not of this {type(module).__name__} ({family.name} family).")
    lora = record["lora"]
    down = {k[: -len(".lora_A.weight")]: v for k, v in state.items() if k.endswith(".lora_A.weight")}
    listed = set(lora["target_modules"])
    if set(down) != listed:
        only_file, only_record = sorted(set(down) - listed), sorted(listed - set(down))
        raise ValueError(f"{folder}: the weights file adapts other modules than its record lists (only in the file: "
                         f"{only_file[:3]}{'...' if len(only_file) > 3 else ''}; only in the record: "
                         f"{only_record[:3]}{'...' if len(only_record) > 3 else ''}).")
    ranks = sorted({int(v.shape[0]) for v in down.values()})
    if ranks != [int(lora["r"])]:
        raise ValueError(f"{folder}: the weights file holds rank {ranks} adapters but its record states rank "
                         f"{lora['r']}.")
    layers = dict(module.named_modules())
    misfits = []
    for name, a in down.items():
        layer = layers.get(name)
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
        b = state[f"{name}.lora_B.weight"]
        if not isinstance(base, _ADAPTABLE):
            misfits.append(f"{name}: no such Linear / Conv2d layer here")
        elif (a.shape[1], b.shape[0]) != (base.weight.shape[1], base.weight.shape[0]):
            misfits.append(f"{name}: adapter {a.shape[1]} -> {b.shape[0]} features, layer "
                           f"{base.weight.shape[1]} -> {base.weight.shape[0]}")
    if misfits:
        raise ValueError(f"{folder}: its adapter does not fit this transformer's layers ({len(misfits)} of "
                         f"{len(down)} modules; {'; '.join(misfits[:3])}).")
    check_provenance(f"the LoRA adapter in {folder}", {"base_digest": record["base_digest"]},
                     {"base_digest": base_digest(module)},
                     remedy="The adapter was trained on other base weights than this transformer's; load the base "
                            "checkpoint it was trained on.")


def load_lora(transformer: nn.Module, folder, adapter_name: str = "guide", *, trainable: bool = False):
    """Loads a `save_lora` folder into `transformer` as the named adapter `adapter_name`, after `check_lora`.

    The adapters active before stay active (with none, the loaded one becomes active); every parameter keeps its
    requires_grad, and the loaded adapter's are `trainable` (default frozen: a teacher). Returns its LoraConfig."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    module = _unwrap(transformer)
    if adapter_name in (getattr(module, "peft_config", None) or {}):
        raise ValueError(f"The transformer already has an adapter named {adapter_name!r}.")
    record, state = read_lora(folder)
    check_lora(module, folder, record, state)
    before = active_adapters(module)
    with _keep_requires_grad(module), _several_adapters_on_purpose():
        if _has_peft_mixin(module):
            module.load_lora_adapter(str(folder), prefix=LORA_PREFIX, adapter_name=adapter_name,
                                     weight_name=record["weight_name"])
        else:
            inject_adapter_in_model(LoraConfig(**record["lora"]), module, adapter_name)
            result = set_peft_model_state_dict(module, state, adapter_name)
            if result.unexpected_keys:
                raise ValueError(f"{folder}: weights the adapter has no place for: {result.unexpected_keys[:3]}.")
        if before:
            _set_adapter(module, before)
    for p in adapter_parameters(module, adapter_name):
        p.requires_grad_(trainable)
    return module.peft_config[adapter_name]


class AdapterTeacher:
    r"""
    The stage-2 guiding model on the student's OWN module: no second copy of the base, no parameters copied per step.

    `adapter_name` (default "guide"): the stage-1 adapter, loaded beside the student's by `load_lora`; the teacher
    pass runs with it active instead of the student's. `None`: the pretrained base itself is the teacher (every
    adapter disabled for the teacher pass; fine-tuning without a stage 1).

    Pass it as `teacher=` to `build_alignment("self_transcendence", transformer, ...)`: `SelfTranscendence` runs its
    one batched early-exit teacher pass (under `torch.no_grad`) inside `context()`, which switches the adapter, puts
    the module in eval mode, and on exit restores the active adapters, every requires_grad (peft's switches set them)
    and every submodule's train/eval mode. Gradients of the step thus reach the student's adapter only; the teacher's
    adapter stays frozen. The guide adapter's weights are never changed. The switch walks the module's layers and
    sets flags, so run the teacher pass eagerly (not inside a `torch.compile(fullgraph=True)` step).
    """

    shares_student_weights = True  # SelfTranscendence: do not freeze or cast this teacher, use `model` and `context`

    def __init__(self, transformer: nn.Module, adapter_name: Optional[str] = "guide"):
        module = _unwrap(transformer)
        adapters = getattr(module, "peft_config", None) or {}
        if not adapters:
            raise ValueError("The transformer has no adapter: add the student's with add_lora first (without one, the "
                             "base teacher would be the student itself).")
        if adapter_name is not None and adapter_name not in adapters:
            raise ValueError(f"The transformer has no adapter named {adapter_name!r} (it has {sorted(adapters)}); "
                             "load the stage-1 adapter with load_lora first.")
        self.model = module
        self.config = module.config
        self.adapter_name = adapter_name
        if adapter_name is not None:
            for p in adapter_parameters(module, adapter_name):
                p.requires_grad_(False)

    @contextlib.contextmanager
    def context(self):
        """The module as the teacher: the guide adapter active (or all adapters off), eval mode; restored on exit."""
        module = self.model
        before = active_adapters(module)
        if self.adapter_name in before:
            raise RuntimeError(f"The teacher's adapter {self.adapter_name!r} is the active (student's) one.")
        modes = [(m, m.training) for m in module.modules()]
        with _keep_requires_grad(module):
            module.eval()
            try:
                if self.adapter_name is None:
                    _enable_adapters(module, False)
                else:
                    _set_adapter(module, self.adapter_name)
                yield module
            finally:
                if self.adapter_name is None:
                    _enable_adapters(module, True)
                else:
                    _set_adapter(module, before)
                for m, mode in modes:
                    m.training = mode

    def __repr__(self) -> str:
        return f"AdapterTeacher({type(self.model).__name__}, adapter_name={self.adapter_name!r})"


def adapter_ema(transformer: nn.Module, adapter_name: str = "student", **ema_options):
    """`diffusers.training_utils.EMAModel` over the adapter's parameters (e.g. `decay=`, `foreach=True`): step it with
    `adapter_parameters(transformer, adapter_name)`; `save_lora(..., ema=...)` writes its weights."""
    from diffusers.training_utils import EMAModel

    return EMAModel(adapter_parameters(transformer, adapter_name), **ema_options)


def adapter_state_dict(transformer: nn.Module, adapter_name: str = "student") -> Dict[str, torch.Tensor]:
    """The adapter's weights alone (peft's key format, copies): what a LoRA checkpoint needs instead of the base."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(_unwrap(transformer), adapter_name=adapter_name)
    return {k: v.detach().clone() for k, v in state.items()}


def load_adapter_state_dict(transformer: nn.Module, state_dict: Dict[str, torch.Tensor],
                            adapter_name: str = "student") -> None:
    """Restores `adapter_state_dict`'s weights exactly; other keys or shapes (another rank or layout) are an error."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    module = _unwrap(transformer)
    current = get_peft_model_state_dict(module, adapter_name=adapter_name)
    missing, unexpected = sorted(set(current) - set(state_dict)), sorted(set(state_dict) - set(current))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} saved vs {tuple(v.shape)} here" for k, v in current.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"The saved state does not match adapter {adapter_name!r} (another rank or target layout?): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {shapes[:3]}.")
    with _keep_requires_grad(module):
        set_peft_model_state_dict(module, state_dict, adapter_name)


@contextlib.contextmanager
def ema_weights(transformer: nn.Module, ema, adapter_name: str = "student"):
    """The module with its adapter's EMA weights swapped in (`ema.store` / `copy_to`, then `restore`) and in eval
    mode, for previews: on exit the trained weights and every submodule's train/eval mode are back."""
    module = _unwrap(transformer)
    params = adapter_parameters(module, adapter_name)
    modes = [(m, m.training) for m in module.modules()]
    ema.store(params)
    ema.copy_to(params)
    module.eval()
    try:
        yield module
    finally:
        ema.restore(params)
        for m, mode in modes:
            m.training = mode


LORA_CHECKPOINT_NAME = "transformer_lora.safetensors"  # in each checkpoint: the adapter's trained weights
LORA_EMA_CHECKPOINT_NAME = "transformer_lora_ema.pt"  # and its EMA (shadow weights and counters)


def register_checkpoint_hooks(accelerator, ema, adapter_name: str = "student"):
    """`checkpointing.register_checkpoint_hooks` for a LoRA run: accelerate's `save_state` writes the adapter alone
    (`transformer_lora.safetensors`, `adapter_state_dict`) instead of the whole transformer, its EMA
    (`transformer_lora_ema.pt`) and an `AlignmentProjector` as `projector/`; `load_state` restores them exactly
    (`load_adapter_state_dict`; the EMA copied into its current tensors). The optimizer, scheduler and RNG states stay
    with accelerate. The base weights are not saved: a resume loads them from the pretrained model again."""
    import os

    from safetensors.torch import load_file, save_file

    from .models import AlignmentProjector

    def adapted(model) -> bool:
        return adapter_name in (getattr(model, "peft_config", None) or {})

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for i in reversed(range(len(models))):
            model = _unwrap(accelerator.unwrap_model(models[i]))
            if adapted(model):
                save_file({k: v.contiguous() for k, v in adapter_state_dict(model, adapter_name).items()},
                          os.path.join(output_dir, LORA_CHECKPOINT_NAME))
                weights.pop(i)
            elif isinstance(model, AlignmentProjector):
                model.save_pretrained(os.path.join(output_dir, "projector"))
                weights.pop(i)
        state = dict(ema.state_dict(), shadow_params=[p.detach().cpu() for p in ema.shadow_params])
        torch.save(state, os.path.join(output_dir, LORA_EMA_CHECKPOINT_NAME))

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            model = _unwrap(accelerator.unwrap_model(models[i]))
            if adapted(model):
                load_adapter_state_dict(model, load_file(os.path.join(input_dir, LORA_CHECKPOINT_NAME)),
                                        adapter_name)
                models.pop(i)
            elif isinstance(model, AlignmentProjector):
                loaded = type(model).from_pretrained(os.path.join(input_dir, "projector"))
                model.load_state_dict(loaded.state_dict())
                models.pop(i)
        path = os.path.join(input_dir, LORA_EMA_CHECKPOINT_NAME)
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state.pop("shadow_params")
        if [s.shape for s in saved] != [p.shape for p in ema.shadow_params]:
            raise ValueError(f"{path} holds the EMA of another adapter (rank or target modules) than this run's.")
        with torch.no_grad():
            for s, p in zip(saved, ema.shadow_params):
                p.copy_(s)
        ema.load_state_dict(state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Block features and early exit for diffusers' own transformers, without forking their classes.

`BlockFeatures(model)` wraps a transformer INSTANCE and calls its ordinary `forward`, returning the IMAGE-token
output of the requested 1-based blocks and, with `stop_at_layer=k`, running blocks 1..k only (a frozen teacher then
costs k / n of the block compute). Our `SiTTransformer2DModel` is delegated to its native `output_hidden_states` /
`stop_at_layer`; the diffusers families are handled by one mechanism:

- capture: a forward hook on every block, registered ONCE when the adapter is built (before any `torch.compile`,
  whose default `skip_nnmodule_hook_guards` ignores hooks added after compilation). It stores a block's image tokens
  only while a call asked for that block, and costs a set lookup otherwise. `close()` removes the hooks.
- early exit: for the duration of the call the model's block lists are swapped for cached prefixes (the same
  `nn.ModuleList` objects every call, so a compiled model sees stable modules), restored in a `finally` even when the
  forward raises. The truncated forward's final layer still runs (one norm + linear, negligible) and its output is
  discarded: `sample` is `None` after an early exit, as for SiT.

Block numbering (1-based, the number `layers` / `stop_at_layer` take):
- `SD3Transformer2DModel` (MM-DiT): `transformer_blocks` 1..n; the image stream of each `JointTransformerBlock`.
- `FluxTransformer2DModel`: double-stream blocks 1..D (`transformer_blocks`), then single-stream blocks D+1..D+S
  (`single_transformer_blocks`); for both, only the image tokens are returned (the single blocks' text tokens are
  split off, as the block itself returns them). Tokens are Flux's packed 2x2 latents.
- `PixArtTransformer2DModel`, `SanaTransformer2DModel`, `DiTTransformer2DModel`: `transformer_blocks` 1..n (image
  tokens only: these models keep text in cross-attention).

Time at the edge (`model_timestep`): our raw t in [0, 1] (x_t = (1 - t) x0 + t eps, data at t = 0) is the flow-matching
sigma. SD3, PixArt and DiT take `timestep = 1000 t` (what their pipelines pass with `FlowMatchEulerDiscreteScheduler`,
whose `timesteps = sigmas * num_train_timesteps`); Sana takes `1000 t * config.timestep_scale` (`pipeline_sana.py`);
Flux takes t itself (`FluxPipeline` passes `timestep / 1000` and `FluxTransformer2DModel.forward` multiplies by 1000);
SiT takes t. `model_velocity` reads the velocity eps - x0 off the model output: SD3/Flux/Sana/SiT predict it directly;
PixArt/DiT with learn_sigma-style doubled output channels (`out_channels == 2 * in_channels`) predict it in the first
half (the second half is unused in flow-matching training).
"""

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .transformer_sit import SiTTransformer2DModel

# FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000): `timesteps = sigmas * 1000` (and our
# `transport.model_to_scheduler_time` default); SD3/PixArt/Sana/DiT embed that scale.
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class TransformerFamily:
    """How to read one diffusers transformer class.

    name: short family name; block_lists: attribute names of its block `ModuleList`s, in execution order;
    image_output: index of the image tokens in a block's tuple output (`None`: the block returns a tensor);
    timestep_scale: `timestep = timestep_scale * t`; doubled_output: learn_sigma-style channels may be doubled;
    time_embedding: the module whose output modulates the model's final layer (the timestep embedding, with the
    pooled text for SD3 and Flux) and the index of that vector in its tuple output (`None`: a tensor); packed: the
    tokens are the latent grid packed 2x2 (Flux), so a per-token head predicts the packed latents.
    """

    name: str
    class_name: str
    block_lists: Tuple[str, ...]
    image_output: Optional[int]
    timestep_scale: float
    doubled_output: bool = False
    time_embedding: Optional[Tuple[str, Optional[int]]] = None
    packed: bool = False


FAMILIES = (
    TransformerFamily("sit", "SiTTransformer2DModel", ("blocks",), None, 1.0),
    # JointTransformerBlock returns (encoder_hidden_states, hidden_states); `norm_out(x, temb)`, temb from
    # `time_text_embed(timestep, pooled_projections)`.
    TransformerFamily("sd3", "SD3Transformer2DModel", ("transformer_blocks",), 1, float(NUM_TRAIN_TIMESTEPS),
                      time_embedding=("time_text_embed", None)),
    # FluxTransformerBlock and FluxSingleTransformerBlock both return (encoder_hidden_states, hidden_states).
    TransformerFamily("flux", "FluxTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"), 1, 1.0,
                      time_embedding=("time_text_embed", None), packed=True),
    # `adaln_single` and Sana's `time_embed` return (timestep, embedded_timestep); the final layer uses the second.
    TransformerFamily("pixart", "PixArtTransformer2DModel", ("transformer_blocks",), None, float(NUM_TRAIN_TIMESTEPS),
                      doubled_output=True, time_embedding=("adaln_single", 1)),
    TransformerFamily("sana", "SanaTransformer2DModel", ("transformer_blocks",), None, float(NUM_TRAIN_TIMESTEPS),
                      time_embedding=("time_embed", 1)),
    TransformerFamily("dit", "DiTTransformer2DModel", ("transformer_blocks",), None, float(NUM_TRAIN_TIMESTEPS),
                      doubled_output=True),
)
SUPPORTED_CLASSES = tuple(f.class_name for f in FAMILIES)


def _family_classes() -> List[Tuple[type, TransformerFamily]]:
    import diffusers

    return [(SiTTransformer2DModel if f.name == "sit" else getattr(diffusers, f.class_name), f) for f in FAMILIES]


def transformer_family(model: Any) -> TransformerFamily:
    """The `TransformerFamily` of a transformer instance (subclasses count); a clear error for anything else."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    for cls, family in _family_classes():
        if isinstance(model, cls):
            return family
    raise ValueError(f"Unsupported transformer {type(model).__name__}; block features are implemented for "
                     f"{', '.join(SUPPORTED_CLASSES)}.")


def describe_transformer(model: Any) -> Dict[str, Any]:
    """What the alignment methods need to size their heads: family, num_layers (all blocks, Flux: D + S),
    hidden_size (width of the block features), patch_size, in_channels (latent channels), sample_size and
    num_tokens (`None` when the config does not fix them, e.g. Flux)."""
    family = transformer_family(model)
    model = getattr(model, "_orig_mod", model)
    cfg = model.config
    num_layers = sum(len(getattr(model, name)) for name in family.block_lists)
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    sample_size = cfg.get("sample_size")
    patch_size = cfg.get("patch_size") or 1
    if isinstance(sample_size, (tuple, list)):
        sample_size = sample_size[0] if len(set(sample_size)) == 1 else None
    num_tokens = (sample_size // patch_size) ** 2 if sample_size else None
    return dict(family=family.name, num_layers=num_layers, hidden_size=hidden, patch_size=patch_size,
                in_channels=cfg.in_channels, sample_size=sample_size, num_tokens=num_tokens, packed=family.packed,
                time_embedding=family.time_embedding is not None)


def model_timestep(model: Any, t: torch.Tensor) -> torch.Tensor:
    """Our raw t in [0, 1] (noise level, data at 0) -> the `timestep` argument of `model`'s family (see module doc)."""
    family = transformer_family(model)
    t = torch.as_tensor(t)
    if t.is_floating_point() is False:
        raise ValueError(f"t must be a float tensor in [0, 1], got dtype {t.dtype}.")
    scale = family.timestep_scale
    if family.name == "sana":
        scale = scale * getattr(model, "_orig_mod", model).config.get("timestep_scale", 1.0)
    return t * scale


def model_velocity(model: Any, sample: torch.Tensor) -> torch.Tensor:
    """The model output's velocity eps - x0: the whole output, or the first half of learn_sigma-doubled channels."""
    family = transformer_family(model)
    in_channels = getattr(model, "_orig_mod", model).config.in_channels
    if family.doubled_output and sample.ndim == 4 and sample.shape[1] == 2 * in_channels:
        return sample[:, :in_channels]
    return sample


@dataclass
class BlockFeaturesOutput:
    """sample: the model output (`None` after an early exit); hidden_states: {1-based block: (N, T_image, D)};
    time_embedding: (N, D) the vector the model's final layer is modulated with, when asked for."""

    sample: Optional[torch.Tensor]
    hidden_states: Dict[int, torch.Tensor]
    time_embedding: Optional[torch.Tensor] = None


class BlockFeatures:
    r"""
    Image-token block outputs and early exit for a transformer instance (see the module docstring).

    Usage:
        feats = BlockFeatures(transformer)
        out = feats(x_t, timestep=model_timestep(transformer, t), encoder_hidden_states=..., layers=[4])
        out.sample, out.hidden_states[4]
        teacher_out = BlockFeatures(teacher)(x_t, timestep=..., ..., stop_at_layer=16)   # blocks 1..16 only

    All positional and keyword arguments other than `layers` / `stop_at_layer` go to the model's own `forward`.
    `model` may be a `torch.compile`d module, provided the adapter was built on the module before compiling
    (the hooks must exist when it is compiled) or is given the compiled wrapper itself.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = transformer_family(model)
        self._module = getattr(model, "_orig_mod", model)
        self._lists = [(name, getattr(self._module, name)) for name in self.family.block_lists]
        self.num_layers = sum(len(blocks) for _, blocks in self._lists)
        self._wanted: frozenset = frozenset()
        self._captured: Dict[int, torch.Tensor] = {}
        self._prefixes: Dict[int, List[nn.ModuleList]] = {}
        self._handles = []
        self._want_time_embedding = False
        if self.family.name != "sit":
            index = 0
            for _, blocks in self._lists:
                for block in blocks:
                    index += 1
                    self._handles.append(block.register_forward_hook(self._make_hook(index)))
            if self.family.time_embedding is not None:
                name, position = self.family.time_embedding
                self._handles.append(getattr(self._module, name).register_forward_hook(self._time_hook(position)))

    def _time_hook(self, position: Optional[int]):
        def hook(module, args, output):
            if self._want_time_embedding:
                self._captured["time_embedding"] = output if position is None else output[position]

        return hook

    def _make_hook(self, index: int):
        image_output = self.family.image_output

        def hook(module, args, output):
            if index in self._wanted:
                self._captured[index] = output if image_output is None else output[image_output]

        return hook

    def close(self) -> None:
        """Removes the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _check(self, layers: Iterable[int], stop_at_layer: Optional[int]) -> Tuple[frozenset, Optional[int]]:
        layers = frozenset(layers or ())
        for k in list(layers) + ([stop_at_layer] if stop_at_layer is not None else []):
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_layers:
                raise ValueError(f"Block ids are 1-based in [1, {self.num_layers}] for this "
                                 f"{self.family.class_name}, got {k!r}.")
        if stop_at_layer is not None and any(k > stop_at_layer for k in layers):
            raise ValueError(f"Requested features {sorted(layers)} lie beyond stop_at_layer={stop_at_layer}.")
        return layers, stop_at_layer

    def _prefix_lists(self, k: int) -> List[nn.ModuleList]:
        """The block lists cut after overall block k (cached: the same objects every call)."""
        if k not in self._prefixes:
            prefixes, remaining = [], k
            for _, blocks in self._lists:
                keep = min(remaining, len(blocks))
                prefixes.append(nn.ModuleList(list(blocks)[:keep]))
                remaining -= keep
            self._prefixes[k] = prefixes
        return self._prefixes[k]

    def __call__(self, *args, layers: Iterable[int] = (), stop_at_layer: Optional[int] = None,
                 return_time_embedding: bool = False, **kwargs) -> BlockFeaturesOutput:
        layers, stop_at_layer = self._check(layers, stop_at_layer)
        if return_time_embedding and self.family.time_embedding is None:
            raise ValueError(f"{self.family.class_name}: no time embedding to return (families with one: "
                             f"{', '.join(f.class_name for f in FAMILIES if f.time_embedding)}).")
        if self.family.name == "sit":
            out = self.model(*args, output_hidden_states=sorted(layers), stop_at_layer=stop_at_layer, **kwargs)
            return BlockFeaturesOutput(sample=out.sample, hidden_states=dict(out.hidden_states or {}))
        if self._handles == [] and self.num_layers:
            raise RuntimeError("This BlockFeatures was closed; build a new one.")
        wanted = layers | ({stop_at_layer} if stop_at_layer is not None else frozenset())
        truncate = stop_at_layer is not None and stop_at_layer < self.num_layers
        self._captured = {}
        self._wanted = wanted
        self._want_time_embedding = return_time_embedding
        try:
            if truncate:
                for (name, _), prefix in zip(self._lists, self._prefix_lists(stop_at_layer)):
                    setattr(self._module, name, prefix)
            out = self.model(*args, return_dict=True, **kwargs)
            features = dict(self._captured)
        finally:
            self._wanted = frozenset()
            self._want_time_embedding = False
            self._captured = {}
            if truncate:
                for name, blocks in self._lists:
                    setattr(self._module, name, blocks)
        time_embedding = features.pop("time_embedding", None)
        missing = wanted - set(features)
        if missing:
            raise RuntimeError(f"Blocks {sorted(missing)} did not run in this forward (skipped layers?).")
        if stop_at_layer is not None and not layers:
            layers = frozenset({stop_at_layer})
        return BlockFeaturesOutput(
            sample=None if stop_at_layer is not None else out.sample,
            hidden_states={k: features[k] for k in sorted(layers)},
            time_embedding=time_embedding,
        )

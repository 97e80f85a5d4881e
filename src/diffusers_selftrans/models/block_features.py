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
- `Flux2Transformer2DModel` (Flux.2): the same numbering as Flux; its single-stream blocks return ONE joint
  sequence [text, image], of which the tokens after the call's `encoder_hidden_states` are kept. Packed 2x2 tokens.
- `QwenImageTransformer2DModel`: `transformer_blocks` 1..n (MM-DiT, (text, image) tuples). Packed 2x2 tokens.
- `Lumina2Transformer2DModel`, `ZImageTransformer2DModel`: the main `layers` 1..n, the blocks the config's
  `num_layers` / `n_layers` counts. Their `noise_refiner` / `context_refiner` blocks (2 each in the released models)
  run before, on the image tokens alone and on the caption alone, and are NOT numbered: they always run, also after an
  early exit (a fixed preamble like the patch embedding). The main blocks see one joint sequence per sample: Lumina 2
  packs [the caption's unmasked tokens (`encoder_attention_mask`), image, padding], so the image tokens start at a
  per-sample offset; Z-Image packs [image, padding to 32, caption], so they are the first (F/pF)(H/p)(W/p).
- `WanTransformer3DModel` (video): `blocks` 1..n (text in cross-attention); tokens are the (F/pt)(H/ph)(W/pw) patches.
- `PixArtTransformer2DModel`, `SanaTransformer2DModel`, `DiTTransformer2DModel`: `transformer_blocks` 1..n (image
  tokens only: these models keep text in cross-attention).

Time at the edge (`model_timestep`): our raw t in [0, 1] (x_t = (1 - t) x0 + t eps, data at t = 0) is the flow-matching
sigma. SD3, PixArt and DiT take `timestep = 1000 t` (what their pipelines pass with `FlowMatchEulerDiscreteScheduler`,
whose `timesteps = sigmas * num_train_timesteps`); Sana takes `1000 t * config.timestep_scale` (`pipeline_sana.py`);
Flux, Flux.2 and Qwen-Image take t itself (their pipelines pass `timestep / 1000`; Flux/Flux.2 multiply by 1000 in
`forward`, Qwen-Image's `Timesteps(scale=1000)` does); Wan takes `1000 t` (`WanPipeline` passes the scheduler's
timesteps, 1000 sigma, truncated to integers by `UniPCMultistepScheduler`); Lumina 2 and Z-Image run time the other
way, data at 1: they take `1 - t` (`Lumina2Pipeline`: `1 - t / 1000`; `ZImagePipeline`: `(1000 - t) / 1000`, Z-Image
then multiplies by `t_scale`); SiT takes t. `model_velocity` reads the velocity eps - x0 off the model output:
SD3/Flux/Flux.2/Qwen-Image/Wan/Sana/SiT predict it directly; Lumina 2 and Z-Image predict x0 - eps (the velocity of
their reversed time; both pipelines negate it before the scheduler step), so it is negated; PixArt/DiT with
learn_sigma-style doubled output channels (`out_channels == 2 * in_channels`) predict it in the first half (the second
half is unused in flow-matching training). Z-Image takes and returns per-sample LISTS of (C, 1, H, W) latents and calls
its time argument `t`: `model_inputs(model, x_t, t)` builds the latent and time arguments of any family from the
(N, C, H, W) batch, and `model_velocity` stacks the list back.
"""

import inspect
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
    image_output: index of the image tokens when a block returns a tuple (a block returning a tensor returns its token
    stream itself; `None`: every block returns a tensor); timestep_scale, timestep_offset:
    `timestep = timestep_offset + timestep_scale * t`; doubled_output: learn_sigma-style channels may be doubled;
    time_embedding: the module whose output modulates the model's final layer (the timestep embedding, with the
    pooled text for SD3 and Flux) and the index of that vector in its tuple output (`None`: a tensor); packed: the
    tokens are the latent grid packed 2x2 outside the model (Flux, Flux.2, Qwen-Image), so a per-token head predicts
    the packed latents;
    token_layout: one entry per block list, where the image tokens sit in a block's token stream: `None` (the stream is
    the image tokens), "text_first" ([text: every position of the call's `encoder_hidden_states`, image]),
    "masked_text_first" ([each sample's unmasked text tokens, counted by the call's `encoder_attention_mask`, image,
    padding]: a per-sample offset), "image_first" ([image, padding, text]: the first (F/pF)(H/p)(W/p) tokens of the
    call's per-sample latents `x` (C, F, H, W) at its `patch_size` / `f_patch_size`); `()`: all `None`;
    velocity_sign: -1 where the model predicts x0 - eps (data at timestep 1); time_embedding_width: the time embedding
    is min(hidden, this) wide where the model caps it (`None`: the hidden size); timestep_argument: the name of
    `forward`'s time argument; sample_list: `forward` takes and returns per-sample lists of (C, 1, H, W) latents.
    """

    name: str
    class_name: str
    block_lists: Tuple[str, ...]
    image_output: Optional[int]
    timestep_scale: float
    doubled_output: bool = False
    time_embedding: Optional[Tuple[str, Optional[int]]] = None
    packed: bool = False
    token_layout: Tuple[Optional[str], ...] = ()
    timestep_offset: float = 0.0
    velocity_sign: float = 1.0
    time_embedding_width: Optional[int] = None
    timestep_argument: str = "timestep"
    sample_list: bool = False


TOKEN_LAYOUTS = (None, "text_first", "masked_text_first", "image_first")


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
    # Flux2TransformerBlock returns (encoder_hidden_states, hidden_states); Flux2SingleTransformerBlock, called with
    # encoder_hidden_states=None, returns the joint [text, image] tensor. Flux2Pipeline passes `timestep / 1000`, the
    # model multiplies by 1000; `norm_out(x, temb)`, temb = `time_guidance_embed(timestep, guidance)`.
    TransformerFamily("flux2", "Flux2Transformer2DModel", ("transformer_blocks", "single_transformer_blocks"), 1, 1.0,
                      time_embedding=("time_guidance_embed", None), packed=True, token_layout=(None, "text_first")),
    # QwenImageTransformerBlock returns (encoder_hidden_states, hidden_states); QwenImagePipeline passes
    # `timestep / 1000` (its Timesteps(scale=1000) rescales); `norm_out(x, temb)`, temb = `time_text_embed(...)`.
    TransformerFamily("qwenimage", "QwenImageTransformer2DModel", ("transformer_blocks",), 1, 1.0,
                      time_embedding=("time_text_embed", None), packed=True),
    # Lumina2TransformerBlock returns the joint tensor; reversed time (`1 - t / 1000`), output negated by the pipeline;
    # `norm_out(x, temb)`, temb = `time_caption_embed(...)[0]`, min(hidden_size, 1024) wide.
    TransformerFamily("lumina2", "Lumina2Transformer2DModel", ("layers",), None, -1.0, timestep_offset=1.0,
                      velocity_sign=-1.0, time_embedding=("time_caption_embed", 0), time_embedding_width=1024,
                      token_layout=("masked_text_first",)),
    # ZImageTransformerBlock returns the joint tensor; reversed time (`(1000 - t) / 1000`), output negated by the
    # pipeline; the final layer is modulated by `t_embedder(t * t_scale)`, min(dim, 256) wide (ADALN_EMBED_DIM).
    TransformerFamily("zimage", "ZImageTransformer2DModel", ("layers",), None, -1.0, timestep_offset=1.0,
                      velocity_sign=-1.0, time_embedding=("t_embedder", None), time_embedding_width=256,
                      token_layout=("image_first",), timestep_argument="t", sample_list=True),
    # WanTransformerBlock returns the image tokens; WanPipeline passes the scheduler's 1000-sigma timesteps; the
    # output's shift/scale are `scale_shift_table + temb`, temb = `condition_embedder(...)[0]`.
    TransformerFamily("wan", "WanTransformer3DModel", ("blocks",), None, float(NUM_TRAIN_TIMESTEPS),
                      time_embedding=("condition_embedder", 0)),
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


def _hidden_size(cfg) -> int:
    """The width of the block features: Lumina 2's `hidden_size`, Z-Image's `dim`, else heads x head width."""
    return cfg.get("hidden_size") or cfg.get("dim") or cfg.num_attention_heads * cfg.attention_head_dim


def describe_transformer(model: Any) -> Dict[str, Any]:
    """What the alignment methods need to size their heads: family, num_layers (all numbered blocks, Flux/Flux.2:
    D + S; not Lumina 2's / Z-Image's refiners), hidden_size (width of the block features), patch_size (the patch one
    token covers as the model itself patchifies: 1 for the packed families, whose tokens arrive packed 2x2; Z-Image's
    first `all_patch_size`; Wan's (pt, ph, pw) tuple), in_channels (the model's input channels: the packed token width
    for packed families), sample_size and num_tokens (`None` when the config does not fix them, e.g. Flux), packed,
    time_embedding (whether one is read) and time_embedding_dim (its width: the hidden size, or the family's cap)."""
    family = transformer_family(model)
    model = getattr(model, "_orig_mod", model)
    cfg = model.config
    num_layers = sum(len(getattr(model, name)) for name in family.block_lists)
    hidden = _hidden_size(cfg)
    sample_size = cfg.get("sample_size")
    patch_size = cfg.get("patch_size") or (cfg.get("all_patch_size") or (1,))[0]
    if isinstance(patch_size, (tuple, list)):  # Wan's (pt, ph, pw)
        patch_size = tuple(patch_size)
    if family.packed:
        patch_size = 1
    if isinstance(sample_size, (tuple, list)):
        sample_size = sample_size[0] if len(set(sample_size)) == 1 else None
    num_tokens = (sample_size // patch_size) ** 2 if sample_size and isinstance(patch_size, int) else None
    time_embedding_dim = None
    if family.time_embedding is not None:
        time_embedding_dim = min(hidden, family.time_embedding_width or hidden)
    return dict(family=family.name, num_layers=num_layers, hidden_size=hidden, patch_size=patch_size,
                in_channels=cfg.in_channels, sample_size=sample_size, num_tokens=num_tokens, packed=family.packed,
                time_embedding=family.time_embedding is not None, time_embedding_dim=time_embedding_dim)


def model_timestep(model: Any, t: torch.Tensor) -> torch.Tensor:
    """Our raw t in [0, 1] (noise level, data at 0) -> the time argument of `model`'s family (see module doc): the
    `timestep` (Z-Image: `t`) its own pipeline passes at flow-matching sigma t."""
    family = transformer_family(model)
    t = torch.as_tensor(t)
    if t.is_floating_point() is False:
        raise ValueError(f"t must be a float tensor in [0, 1], got dtype {t.dtype}.")
    scale = family.timestep_scale
    if family.name == "sana":
        scale = scale * getattr(model, "_orig_mod", model).config.get("timestep_scale", 1.0)
    return family.timestep_offset + t * scale  # the offset is 0 except for the reversed-time families


def model_velocity(model: Any, sample: Any) -> torch.Tensor:
    """The model output's velocity eps - x0: the whole output, the first half of learn_sigma-doubled channels, minus
    the output of the families that predict x0 - eps (Lumina 2, Z-Image); Z-Image's per-sample list of (C, 1, H, W)
    is stacked to (N, C, H, W) first, as `ZImagePipeline` does."""
    family = transformer_family(model)
    in_channels = getattr(model, "_orig_mod", model).config.in_channels
    if family.sample_list:
        sample = torch.stack(list(sample)).squeeze(2)
    if family.doubled_output and sample.ndim == 4 and sample.shape[1] == 2 * in_channels:
        sample = sample[:, :in_channels]
    return -sample if family.velocity_sign < 0 else sample


def model_inputs(model: Any, x: torch.Tensor, t: torch.Tensor) -> Dict[str, Any]:
    """The latent and time keyword arguments of `model`'s forward for the batch `x` at our raw t: `{"hidden_states": x,
    "timestep": model_timestep(model, t)}` for most families; Z-Image's `{"x": [(C, 1, H, W)] * N, "t": ...}` (the
    per-sample list `ZImagePipeline` passes, from x of shape (N, C, H, W))."""
    family = transformer_family(model)
    module = getattr(model, "_orig_mod", model)
    latent_argument = next(iter(inspect.signature(module.forward).parameters))
    if family.sample_list:
        if x.ndim != 4:
            raise ValueError(f"{family.class_name} takes images (N, C, H, W), got shape {tuple(x.shape)}.")
        x = list(x.unsqueeze(2).unbind(0))
    return {latent_argument: x, family.timestep_argument: model_timestep(model, t)}


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

    All positional and keyword arguments other than `layers` / `stop_at_layer` go to the model's own `forward`
    (`model_inputs(transformer, x_t, t)` gives its latent and time arguments, Z-Image's lists included).
    `model` may be a `torch.compile`d module, provided the adapter was built on the module before compiling
    (the hooks must exist when it is compiled) or is given the compiled wrapper itself.
    Families whose blocks see one joint text + image sequence (Flux.2's single-stream blocks, Lumina 2, Z-Image) have
    the image tokens cut out by the family's `token_layout`, from the call's own arguments (read before the forward).
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
        self._span: Dict[str, Any] = {}
        layouts = self.family.token_layout or (None,) * len(self._lists)
        if len(layouts) != len(self._lists) or any(layout not in TOKEN_LAYOUTS for layout in layouts):
            raise ValueError(f"{self.family.name}: token_layout {layouts} must give one of {TOKEN_LAYOUTS} per block "
                             f"list {self.family.block_lists}.")
        self._layouts = frozenset(layout for layout in layouts if layout is not None)
        self._signature = None if self.family.name == "sit" else inspect.signature(self._module.forward)
        if self.family.name != "sit":
            index = 0
            for (_, blocks), layout in zip(self._lists, layouts):
                for block in blocks:
                    index += 1
                    self._handles.append(block.register_forward_hook(self._make_hook(index, layout)))
            if self.family.time_embedding is not None:
                name, position = self.family.time_embedding
                self._handles.append(getattr(self._module, name).register_forward_hook(self._time_hook(position)))

    def _time_hook(self, position: Optional[int]):
        def hook(module, args, output):
            if self._want_time_embedding:
                self._captured["time_embedding"] = output if position is None else output[position]

        return hook

    def _make_hook(self, index: int, layout: Optional[str]):
        image_output = self.family.image_output

        def hook(module, args, output):
            if index in self._wanted:
                tokens = output[image_output] if isinstance(output, tuple) else output
                self._captured[index] = tokens if layout is None else self._image_tokens(layout, tokens)

        return hook

    def _image_tokens(self, layout: str, tokens: torch.Tensor) -> torch.Tensor:
        """The image tokens (N, T, D) of a joint-sequence block output, at the offsets this call's arguments give."""
        if layout == "text_first":
            return tokens[:, self._span["text_first"]:]
        if layout == "image_first":
            return tokens[:, : self._span["image_first"]]
        starts = self._span["masked_text_first"]  # per-sample: [unmasked text, image, padding]
        num_image = tokens.shape[1] - max(starts)
        if len(set(starts)) == 1:
            return tokens[:, starts[0]: starts[0] + num_image]
        return torch.stack([tokens[i, start: start + num_image] for i, start in enumerate(starts)])

    def _token_spans(self, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Where the image tokens start / end in the joint sequences of this call, from its arguments."""
        if not self._layouts:
            return {}
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        spans: Dict[str, Any] = {}
        if "text_first" in self._layouts:
            spans["text_first"] = arguments["encoder_hidden_states"].shape[1]
        if "masked_text_first" in self._layouts:
            mask = arguments["encoder_attention_mask"]
            spans["masked_text_first"] = [int(k) for k in mask.sum(dim=1).tolist()]
        if "image_first" in self._layouts:
            latents = arguments["x"]
            if any(isinstance(item, (list, tuple)) for item in latents):
                raise ValueError(f"{self.family.class_name}'s omni mode (nested latent lists) packs [caption, image, "
                                 "SigLIP] sequences; block features read the basic mode (one image per sample).")
            p, pf = arguments["patch_size"], arguments["f_patch_size"]
            counts = {(item.shape[1] // pf) * (item.shape[2] // p) * (item.shape[3] // p) for item in latents}
            if len(counts) != 1:
                raise ValueError(f"Block features of {self.family.class_name} need latents of one size per batch "
                                 f"(image token counts {sorted(counts)}).")
            spans["image_first"] = counts.pop()
        return spans

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
        self._span = self._token_spans(args, kwargs) if wanted else {}
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
            self._span = {}
            if truncate:
                for name, blocks in self._lists:
                    setattr(self._module, name, blocks)
        time_embedding = features.pop("time_embedding", None)
        if time_embedding is not None:
            latents = args[0] if args else kwargs.get(next(iter(self._signature.parameters)))
            if latents is not None and time_embedding.shape[0] != len(latents):
                raise RuntimeError(f"{self.family.class_name}'s time embedding has batch {time_embedding.shape[0]} "
                                   f"for {len(latents)} samples (e.g. Qwen-Image with zero_cond_t embeds a second, "
                                   "zero timestep); the final layer's vector cannot be read off it.")
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

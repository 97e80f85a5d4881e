# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""`SiTPipeline`: class-conditional sampling from a SiT with REPA's samplers (inference only).

Samplers (pick with the `scheduler` component):
- `FlowMatchEulerDiscreteScheduler` (shift 1): REPA `euler_sampler(heun=False)`, N model evaluations;
- `FlowMatchHeunDiscreteScheduler` (shift 1): REPA `euler_sampler(heun=True)`, Heun on every step but the last, 2N - 1;
- `SiTEulerMaruyamaScheduler`: REPA `euler_maruyama_sampler`, the SDE behind the published FIDs, N.
Both ODE schedulers run on REPA's grid `t = linspace(1, 0, N + 1)` (`set_repa_timesteps`), not diffusers' default
`linspace(1, 1/1000, N)`. The network sees raw t = timesteps / num_train_timesteps (data at t=0).

Classifier-free guidance follows REPA: one batched pass with labels `[y, null]` (null = `num_classes`), all latent
channels guided, and only while `guidance_interval[0] <= t <= guidance_interval[1]`; outside the interval a single
conditional pass is made. `legacy_cfg_channels=3` restores DiT/SiT's first-3-channels guidance for old FIDs.

The module imports only torch, numpy, diffusers and huggingface_hub from outside this package (its
package-relative imports are inlined by `diffusers_selftrans.pipelines.remote_code.write_remote_code`), so
`save_pretrained(..., save_remote_code=True)` can ship it as Hub remote code.
"""

import contextlib
import importlib
import inspect
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers import __version__ as diffusers_version
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, snapshot_download

from ..transport import scheduler_to_model_time
from .labels import build_label_index, normalise_id2label, resolve_label_ids
from .remote_code import BUILTIN_LIBRARIES as _BUILTIN_LIBRARIES  # libraries diffusers loads without remote code


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# A grid time equal to an end of `guidance_interval` counts as inside (REPA's `guidance_low <= t <= guidance_high` on a
# float64 grid); our float32 timesteps can miss such an end by ~1e-7, so compare with this slack.
GUIDANCE_INTERVAL_ATOL = 1e-6


def set_repa_timesteps(
    scheduler: SchedulerMixin, num_inference_steps: int, device: Union[str, torch.device, None] = None
) -> Tuple[SchedulerMixin, torch.Tensor]:
    """`(scheduler, timesteps)` on REPA's grid for `num_inference_steps` steps: step with the returned scheduler and
    give the network `timesteps / scheduler.config.num_train_timesteps`.

    - `FlowMatchEulerDiscreteScheduler`: `sigmas = linspace(1, 0, N + 1)[:-1]` through its `set_timesteps(sigmas=)`;
      its `shift` applies as there (1 = REPA).
    - `FlowMatchHeunDiscreteScheduler` has no `sigmas=`; its `set_timesteps(N)` spaces N sigmas from 1 down to its
      smallest training sigma, 1/num_train_timesteps. A copy configured with `num_train_timesteps=N`
      (`from_config`) therefore lays out exactly `1, (N-1)/N, ..., 1/N` with a trailing 0, and its stock `step` runs
      Heun on every interval but the last, which is Euler into t=0: REPA's `euler_sampler(heun=True)`. Needs
      `shift=1` (its `set_timesteps` would shift twice); a diffusers release laying out another grid is an error.
    - Any other scheduler (e.g. `SiTEulerMaruyamaScheduler`, whose own grid is REPA's SDE grid) uses `set_timesteps(N)`.
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if scheduler.config.use_dynamic_shifting:
            raise ValueError("SiTPipeline needs `use_dynamic_shifting=False` on FlowMatchEulerDiscreteScheduler.")
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1], device=device)
    elif isinstance(scheduler, FlowMatchHeunDiscreteScheduler):
        if scheduler.config.shift != 1.0:
            raise ValueError(f"REPA's Heun grid needs shift=1 on FlowMatchHeunDiscreteScheduler, got "
                             f"{scheduler.config.shift}.")
        scheduler = FlowMatchHeunDiscreteScheduler.from_config(scheduler.config, num_train_timesteps=num_inference_steps)
        scheduler.set_timesteps(num_inference_steps, device=device)
        grid = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
        first_order = scheduler.sigmas.cpu().double().unique_consecutive()
        if first_order.shape != grid.shape or not torch.allclose(first_order, grid, rtol=0, atol=1e-6):
            raise RuntimeError(
                f"diffusers {diffusers_version}: FlowMatchHeunDiscreteScheduler.set_timesteps no longer spaces its "
                "sigmas down to 1/num_train_timesteps, so REPA's Heun grid cannot be set; use a tested diffusers "
                "(see setup.py)."
            )
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler, scheduler.timesteps


class SiTPipeline(DiffusionPipeline):
    r"""
    Class-conditional image generation with a SiT (REPA / Self-Transcendence) and an `AutoencoderKL`.

    Args:
        transformer (`SiTTransformer2DModel`): predicts the velocity eps - x0 from (x_t, raw t, class label).
        vae (`AutoencoderKL`): decodes latents; `scaling_factor` and `shift_factor` are read from its config.
        scheduler (`SchedulerMixin`): `FlowMatchEulerDiscreteScheduler`, `FlowMatchHeunDiscreteScheduler` or
            `SiTEulerMaruyamaScheduler`.
        id2label (`Dict[int, str]`, *optional*): class names (ImageNet style, comma-separated synonyms); saved in
            `model_index.json` so `from_pretrained` restores it. Defaults to `transformer.config.id2label` if any.
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: ModelMixin,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        id2label: Optional[Dict[Union[int, str], str]] = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        if id2label is None and transformer is not None:
            # the transformer may carry its training data's class names in its config
            id2label = getattr(transformer.config, "id2label", None)
        id2label = normalise_id2label(id2label)
        self.register_to_config(id2label=id2label)
        self._name_to_ids = build_label_index(id2label or {})
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        self._interrupt = False

    # ------------------------------------------------------------------ labels

    @property
    def id2label(self) -> Optional[Dict[int, str]]:
        return self.config.id2label

    @property
    def labels(self) -> Dict[str, int]:
        """Every unambiguous lower-cased name and synonym -> class id."""
        return {name: ids[0] for name, ids in self._name_to_ids.items() if len(ids) == 1}

    def get_label_ids(self, label: Union[int, str, Sequence[Union[int, str]], torch.Tensor]) -> List[int]:
        """Resolve class ids and names to ids.

        A name matches the full `id2label` entry or any of its comma-separated synonyms, case-insensitively and with
        surrounding spaces ignored; a bare string is one label. Raises `ValueError` for unknown names (with close
        matches), ambiguous synonyms and ids outside [0, num_classes).
        """
        return resolve_label_ids(label, self.transformer.config.num_classes, self.id2label, self._name_to_ids)

    # ------------------------------------------------------------------ sampling

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def check_inputs(
        self,
        guidance_scale,
        guidance_interval,
        num_inference_steps,
        output_type,
        legacy_cfg_channels,
        callback_on_step_end_tensor_inputs,
    ):
        if (
            not isinstance(guidance_interval, (tuple, list))
            or len(guidance_interval) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in guidance_interval)
            or not 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0
        ):
            raise ValueError(
                f"guidance_interval must be (low, high) with 0 <= low <= high <= 1 (t units, data at t=0), "
                f"got {guidance_interval!r}."
            )
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        channels = self.transformer.config.in_channels
        if legacy_cfg_channels is not None and not (
            isinstance(legacy_cfg_channels, int) and 1 <= legacy_cfg_channels <= channels
        ):
            raise ValueError(
                f"legacy_cfg_channels must be None or an int in [1, {channels}], got {legacy_cfg_channels!r}."
            )
        if (
            not isinstance(guidance_scale, (int, float))
            or isinstance(guidance_scale, bool)
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}.")
        if guidance_scale != 1.0 and getattr(self.transformer.config, "class_dropout_prob", 1.0) <= 0:
            raise ValueError(
                f"guidance_scale {guidance_scale} (!= 1) needs the null class, but this transformer was built with "
                f"class_dropout_prob=0 and has no null-class embedding."
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}.")

    def _class_ids(self, class_labels, generator, latents) -> List[int]:
        if class_labels is not None:
            return self.get_label_ids(class_labels)
        if self.transformer.config.num_classes != 1:
            raise ValueError(
                "class_labels is required (ids or names); unconditional sampling is only implicit for a "
                "transformer with num_classes=1."
            )
        batch_size = latents.shape[0] if latents is not None else len(generator) if isinstance(generator, list) else 1
        return [0] * batch_size

    def _guide(self, velocity: torch.Tensor, guidance_scale: float, legacy_cfg_channels: Optional[int]) -> torch.Tensor:
        cond, uncond = velocity.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        if legacy_cfg_channels is None:
            return guided
        # DiT/SiT `forward_with_cfg`: only the first channels are guided, the rest follow the conditional branch.
        return torch.cat([guided[:, :legacy_cfg_channels], cond[:, legacy_cfg_channels:]], dim=1)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, str, List[Union[int, str]], torch.Tensor]] = None,
        guidance_scale: float = 1.0,
        guidance_interval: Tuple[float, float] = (0.0, 1.0),
        num_inference_steps: int = 50,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        legacy_cfg_channels: Optional[int] = None,
    ) -> Union[ImagePipelineOutput, Tuple]:
        r"""
        Args:
            class_labels (`int`, `str`, list of them, or a 1-D integer tensor): classes to draw, one image each; names
                are resolved through `id2label` (see `get_label_ids`). Required unless `num_classes == 1`.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance scale w in uncond + w (cond - uncond);
                any finite value (1 = conditional only, no extra pass; 0 = unconditional). NaN/inf are refused.
            guidance_interval (`Tuple[float, float]`, defaults to `(0.0, 1.0)`): guide only while low <= t <= high
                (t units, data at 0, noise at 1); REPA's `guidance_low`/`guidance_high`, e.g. `(0.0, 0.7)`.
            num_inference_steps (`int`, defaults to 50): N. Model evaluations: N (Euler, SDE) or 2N - 1 (Heun),
                doubled in batch size inside the guidance interval.
            generator (`torch.Generator` or a list of one per image, *optional*): source of the initial noise and of
                the SDE noise. A list makes every image independent of the batch it is drawn in.
            latents (`torch.Tensor` of shape `(N, C, H, W)`, *optional*): initial noise at t = 1.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (the sampled latents,
                in the transformer's scaled latent space).
            return_dict (`bool`, defaults to True): return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): `callback(pipe, i, t, callback_kwargs) -> dict` called
                after every scheduler step; it may replace the tensors named in `callback_on_step_end_tensor_inputs`.
            legacy_cfg_channels (`int`, *optional*): guide only the first k channels (DiT/SiT used 3); the others
                take the conditional prediction. `None` guides all channels (REPA / Self-Transcendence).

        Returns:
            `ImagePipelineOutput` (or `(images,)`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        self.check_inputs(
            guidance_scale, guidance_interval, num_inference_steps, output_type, legacy_cfg_channels,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        labels = self._class_ids(class_labels, generator, latents)
        batch_size = len(labels)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} class labels.")
        device = self._execution_device
        cfg = self.transformer.config
        # Every finite w follows uncond + w (cond - uncond); only w == 1 (the conditional prediction) skips the
        # null-class pass. 0 < w < 1 interpolates towards the unconditional model, w = 0 is unconditional.
        do_cfg = guidance_scale != 1.0
        class_ids = torch.tensor(labels, device=device, dtype=torch.long)
        null_ids = torch.full_like(class_ids, cfg.num_classes)  # the null class row of the label table

        # 2. Initial noise (the sampler state stays float32 whatever the transformer dtype)
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device=device, dtype=torch.float32)

        # 3. Timesteps
        scheduler, timesteps = set_repa_timesteps(self.scheduler, num_inference_steps, device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        self._num_timesteps = len(timesteps)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = generator
        num_train = scheduler.config.num_train_timesteps
        low, high = guidance_interval
        step_times = scheduler_to_model_time(timesteps.cpu(), num_train).tolist()  # host copy: no sync per step
        # Loop invariants, built once: every step's model time (float32, on the device), the [y, null] labels of a
        # guided step, and the transformer dtype (a walk over its parameters).
        model_times = scheduler_to_model_time(timesteps, num_train).to(device=device, dtype=torch.float32)
        guided_labels = torch.cat([class_ids, null_ids]) if do_cfg else None
        model_dtype = self.transformer.dtype

        # 4. Denoising loop (in eval mode: train-mode label dropout would silently replace labels by the null class)
        interval_t = None
        with _eval_mode(self.transformer), self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                # REPA tests the guidance interval at the start of the interval, also for Heun's corrector
                # evaluation (made at the interval's end): a second-order scheduler in its second stage reuses it.
                if getattr(scheduler, "state_in_first_order", True) or interval_t is None:
                    interval_t = step_times[i]
                guided = do_cfg and low - GUIDANCE_INTERVAL_ATOL <= interval_t <= high + GUIDANCE_INTERVAL_ATOL
                model_input = torch.cat([latents, latents]) if guided else latents
                velocity = self.transformer(
                    hidden_states=model_input.to(model_dtype),
                    timestep=model_times[i].expand(model_input.shape[0]),
                    class_labels=guided_labels if guided else class_ids,
                    return_dict=False,
                )[0].float()
                if guided:
                    velocity = self._guide(velocity, guidance_scale, legacy_cfg_channels)
                latents = scheduler.step(velocity, t, latents, return_dict=False, **step_kwargs)[0]
                latents = latents.float()

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:  # a loop, not a comprehension: locals() of this frame
                        callback_kwargs[k] = locals()[k]
                    # t in the units of the pipeline's scheduler config (Heun steps a copy with N train steps)
                    t_pipe = model_times[i] * self.scheduler.config.num_train_timesteps
                    callback_outputs = callback_on_step_end(self, i, t_pipe, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 5. Decode
        if output_type == "latent":
            image = latents
        else:
            shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
            z = latents / self.vae.config.scaling_factor + shift_factor
            image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "SiTPipeline":
        """Load from a local folder or a Hub repo id.

        A Hub id is first fetched whole with `huggingface_hub.snapshot_download` (`revision`, `token`, `cache_dir`,
        `force_download`, `local_files_only` go there), because diffusers' own download step rejects components whose
        library is neither diffusers nor transformers. The local folder is then loaded with diffusers' loader; a
        folder written with `save_remote_code` is loaded with the installed classes instead of its `.py` copies
        (components only: `torch_dtype` is honoured, device maps and variants are not).
        """
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            download_kwargs = {
                k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "force_download", "local_files_only")
                if k in kwargs
            }
            path = snapshot_download(path, **download_kwargs)
        config = cls.load_config(path)
        if isinstance(config.get("_class_name"), (list, tuple)):
            pipeline = cls._from_remote_code_folder(path, config, kwargs)
            if pipeline is not None:
                return pipeline
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def _from_remote_code_folder(cls, path: str, config: dict, kwargs: dict) -> Optional["SiTPipeline"]:
        """Build from a remote-code folder with the installed classes; `None` if they are not importable here."""
        components = {}
        for name, entry in config.items():
            if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None:
                continue
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            library, class_name = entry
            klass = _installed_class(library, class_name)
            if klass is None:
                return None
            load_kwargs = {"subfolder": name}
            if issubclass(klass, ModelMixin) and kwargs.get("torch_dtype") is not None:
                load_kwargs["torch_dtype"] = kwargs["torch_dtype"]
            components[name] = klass.from_pretrained(path, **load_kwargs)
        id2label = kwargs.pop("id2label", config.get("id2label"))
        return cls(**components, id2label=id2label)

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        save_remote_code: bool = False,
        **kwargs,
    ):
        """`DiffusionPipeline.save_pretrained`, plus `save_remote_code=True` to also write the remote-code files
        (see `save_remote_code`) before any `push_to_hub` upload."""
        if not save_remote_code:
            return super().save_pretrained(
                save_directory, safe_serialization=safe_serialization, variant=variant,
                max_shard_size=max_shard_size, push_to_hub=push_to_hub, **kwargs,
            )
        hub_keys = ("commit_message", "private", "create_pr", "token", "repo_id")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        super().save_pretrained(
            save_directory, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size,
            push_to_hub=False, **kwargs,
        )
        self.save_remote_code(save_directory)
        if push_to_hub:
            token = hub_kwargs.get("token")
            repo_id = hub_kwargs.get("repo_id", str(save_directory).rstrip(os.sep).split(os.sep)[-1])
            repo_id = create_repo(repo_id, exist_ok=True, private=hub_kwargs.get("private"), token=token).repo_id
            self._upload_folder(
                save_directory, repo_id, token=token, commit_message=hub_kwargs.get("commit_message"),
                create_pr=hub_kwargs.get("create_pr", False),
            )

    def save_remote_code(self, save_directory: Union[str, os.PathLike]):
        """Make a saved pipeline folder loadable with `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` where this package is not installed: `pipelines.remote_code.write_remote_code`."""
        # imported by name when called: a package-relative import at the top would be inlined into the remote code
        importlib.import_module("diffusers_selftrans.pipelines.remote_code").write_remote_code(self, save_directory)


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Run `module` in eval mode and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _installed_class(library: str, class_name: str):
    """The installed class behind a model_index entry, or `None`: diffusers classes, or ours when this module is the
    installed package (a remote-code copy of this module is not, and then loads through diffusers' remote code)."""
    if library in _BUILTIN_LIBRARIES:
        return getattr(importlib.import_module(library), class_name, None)
    try:
        package = importlib.import_module(__name__.split(".")[0])
    except ImportError:
        return None
    return getattr(package, class_name, None)


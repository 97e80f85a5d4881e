# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""The stochastic (Euler-Maruyama) sampler of SiT / REPA / Self-Transcendence as a diffusers scheduler.

diffusers has no Euler-Maruyama scheduler for flow-matching models. This one reproduces REPA's
`samplers.py::euler_maruyama_sampler` (the sampler behind REPA's and Self-Transcendence's FID-50K numbers),
which equals willisma/SiT's `sample_sde(diffusion_form="sigma", last_step="Mean", last_step_size=0.04)`:

- time grid `linspace(1, last_step_size, N)` followed by 0, with our convention (data at t=0, noise at t=1);
- N - 1 stochastic steps over [1, last_step_size] with diffusion w(t) = 2 t:
      score = -(x + (1 - t) v) / t,   drift d = v - w/2 * score,   x <- x + d dt + sqrt(w) sqrt(|dt|) noise;
- one deterministic "mean" step from last_step_size to 0 (same drift, no noise), so N model evaluations in all.

The model output is the velocity eps - x0, as for diffusers' FlowMatch schedulers, and `timesteps` follow the same
convention (`sigma * num_train_timesteps` with sigma == t), so a pipeline treats all three schedulers alike. Classifier-
free guidance applied to the velocity equals REPA's guidance on the drift, because the drift is affine in v.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..transport import score_from_velocity


# Size of the final deterministic step (willisma/SiT `train_utils.py` `--last-step-size`; REPA `samplers.py`
# `torch.linspace(1., 0.04, num_steps)`): the score -E[eps|x_t]/t blows up as t -> 0, so the SDE stops there.
DEFAULT_LAST_STEP_SIZE = 0.04


@dataclass
class SiTEulerMaruyamaSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor` of shape `(N, C, H, W)`): the sample at the next (less noisy) time.
    """

    prev_sample: torch.Tensor


class SiTEulerMaruyamaScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Euler-Maruyama sampler of the reverse SDE of the linear interpolant x_t = (1 - t) x0 + t eps (SiT / REPA).

    Parameters:
        num_train_timesteps (`int`, defaults to 1000): `timesteps = t * num_train_timesteps` (diffusers FlowMatch
            convention); the network itself sees raw t.
        last_step_size (`float`, defaults to 0.04): the last, noise-free step goes from this t to 0 (SiT/REPA).
        diffusion_scale (`float`, defaults to 1.0): multiplies the diffusion, w(t) = 2 * diffusion_scale * t
            (willisma/SiT `--diffusion-norm`); 1 is REPA's `compute_diffusion`, 0 turns the sampler into the
            probability-flow ODE solved with Euler on the same grid.
    """

    _compatibles = []
    order = 1
    init_noise_sigma = 1.0  # the SDE starts from pure N(0, I) noise at t = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        last_step_size: float = DEFAULT_LAST_STEP_SIZE,
        diffusion_scale: float = 1.0,
    ):
        if num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}.")
        if not 0.0 < last_step_size < 1.0:
            raise ValueError(f"last_step_size must lie in (0, 1), got {last_step_size}.")
        if diffusion_scale < 0:
            raise ValueError(f"diffusion_scale must be non-negative, got {diffusion_scale}.")
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> Optional[int]:
        """Index of the current timestep; increases by one after each `step`."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at `timesteps[begin_index]` (a pipeline calls this before the loop)."""
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None):
        """Build the grid: `sigmas = [linspace(1, last_step_size, N), 0]`, `timesteps = sigmas[:-1] * num_train`.

        N steps are N model evaluations: N - 1 stochastic ones and the final mean step.
        """
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        # float64 grid as REPA (`torch.linspace(..., dtype=torch.float64)`), stored in float32 as diffusers does.
        grid = torch.linspace(1.0, self.config.last_step_size, num_inference_steps, dtype=torch.float64)
        sigmas = torch.cat([grid, grid.new_zeros(1)]).to(torch.float32)
        self.num_inference_steps = num_inference_steps
        self.sigmas = sigmas.to(device)
        self.timesteps = (sigmas[:-1] * self.config.num_train_timesteps).to(device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: Union[float, torch.Tensor]) -> int:
        indices = (self.timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not in the schedule {self.timesteps.tolist()}.")
        return indices[0].item()

    def _init_step_index(self, timestep: Union[float, torch.Tensor]):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def diffusion_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = 2 t (REPA `compute_diffusion`; SiT `diffusion_form="sigma"` with norm 1), times `diffusion_scale`."""
        return 2.0 * self.config.diffusion_scale * t

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        return_dict: bool = True,
    ) -> Union[SiTEulerMaruyamaSchedulerOutput, Tuple]:
        """One Euler-Maruyama step from `timestep` to the next grid time.

        Args:
            model_output (`torch.Tensor`): the (guided) velocity eps - x0 at `sample`.
            timestep (`float` or `torch.Tensor`): one of `self.timesteps`.
            sample (`torch.Tensor`): x_t.
            generator (`torch.Generator` or a list of one per sample, *optional*): source of the step noise.
            return_dict (`bool`): return a `SiTEulerMaruyamaSchedulerOutput` instead of a tuple.
        """
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "Integer timesteps (e.g. indices from `enumerate(timesteps)`) are not supported; pass one of "
                "`scheduler.timesteps`."
            )
        if isinstance(generator, list) and len(generator) != sample.shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {sample.shape[0]} samples.")
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        if i >= len(self.timesteps):
            raise ValueError(f"The scheduler has already taken all {len(self.timesteps)} steps.")

        # Compute in at least float32 (diffusers schedulers upcast too); float64 input stays float64.
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(dtype)
        velocity = model_output.to(dtype)
        t = self.sigmas[i].to(device=x.device, dtype=dtype)
        dt = self.sigmas[i + 1].to(device=x.device, dtype=dtype) - t  # negative: time runs from noise to data
        w = self.diffusion_coefficient(t)
        drift = velocity - 0.5 * w * score_from_velocity(x, velocity, t)
        prev_sample = x + drift * dt
        is_last = i == len(self.timesteps) - 1
        if not is_last and self.config.diffusion_scale > 0:
            # Noise is drawn in float32 whatever the working dtype, so a seed gives the same path in fp32 and fp64.
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(dtype)
            prev_sample = prev_sample + torch.sqrt(w) * torch.sqrt(dt.abs()) * noise

        self._step_index += 1
        prev_sample = prev_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return SiTEulerMaruyamaSchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

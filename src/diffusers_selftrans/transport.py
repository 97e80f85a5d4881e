# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""The interpolant: the only module that knows what time means.

Convention (REPA / Self-Transcendence, `loss.py` `path_type="linear"`):

    x_t = (1 - t) * x0 + t * eps,   data at t = 0, noise at t = 1,   velocity v = dx_t/dt = eps - x0,

and the network sees the raw t in [0, 1]. Everything else converts at its edge with the helpers below:
- diffusers FlowMatch schedulers use sigma == t and `timesteps = sigma * num_train_timesteps` (`scheduler_to_model_time`);
- original SiT (willisma/SiT, LayerSync, LightningDiT) runs time backwards: t_sit = 1 - t, velocity x0 - eps
  (`to_sit_time`, `from_sit_time`, `sit_velocity`).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

# "uniform": t ~ U[0, 1) (REPA/ST default). "logit_normal": t = sigmoid(N(mean, std)), which is REPA's "lognormal"
# (sigma = exp(N(0, 1)), t = sigma / (1 + sigma)) and LightningDiT's default.
TIME_SAMPLING_MODES = ("uniform", "logit_normal")


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) or scalar t -> broadcastable against `like` (N, C, H, W), in `like`'s dtype."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    if t.ndim == 0:
        return t
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = expand_time(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target of the network: d x_t / d t = eps - x0."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v."""
    return x_t - expand_time(t, x_t) * velocity


def noise_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps = x_t + (1 - t) v."""
    return x_t + (1 - expand_time(t, x_t)) * velocity


def score_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x_t) = -E[eps | x_t] / t = -(x_t + (1 - t) v) / t (REPA `samplers.py` for the linear path).

    Undefined at t = 0; samplers never evaluate it there.
    """
    return -noise_from_velocity(x_t, velocity, t) / expand_time(t, x_t)


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x_t - x0) / t."""
    return (x_t - x0) / expand_time(t, x_t)


def velocity_from_noise(x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (eps - x_t) / (1 - t)."""
    return (noise - x_t) / (1 - expand_time(t, x_t))


def to_sit_time(t: torch.Tensor) -> torch.Tensor:
    """Our t (data at 0) -> original SiT time (data at 1)."""
    return 1 - t


def from_sit_time(t_sit: torch.Tensor) -> torch.Tensor:
    """Original SiT time (data at 1) -> our t (data at 0)."""
    return 1 - t_sit


def sit_velocity(velocity: torch.Tensor) -> torch.Tensor:
    """Our velocity (eps - x0) <-> original SiT's (x0 - eps); the map is its own inverse."""
    return -velocity


def scheduler_to_model_time(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers FlowMatch `timesteps` (sigma * num_train_timesteps) -> the raw t the network sees."""
    return timesteps / num_train_timesteps


def model_to_scheduler_time(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    return t * num_train_timesteps


def sample_time(
    batch_size: int,
    mode: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Training times t in [0, 1), shape (batch_size,). Reuses diffusers' SD3 density sampler."""
    if mode not in TIME_SAMPLING_MODES:
        raise ValueError(f"Unknown time sampling {mode!r}; expected one of {TIME_SAMPLING_MODES}.")
    return compute_density_for_timestep_sampling(
        weighting_scheme=mode,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        device=device if device is not None else "cpu",
        generator=generator,
    )


@dataclass
class Transport:
    """One training draw of the linear interpolant: `t, eps -> (x_t, velocity target)`.

    Args:
        time_sampling: `"uniform"` (REPA/Self-Transcendence) or `"logit_normal"`.
        logit_mean, logit_std: parameters of the logit-normal density (REPA "lognormal": 0 and 1).
    """

    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.time_sampling not in TIME_SAMPLING_MODES:
            raise ValueError(f"Unknown time sampling {self.time_sampling!r}; expected one of {TIME_SAMPLING_MODES}.")

    def sample(
        self, x0: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns `(t (N,), noise, x_t, target)` for clean latents `x0` (N, C, H, W)."""
        t = sample_time(
            x0.shape[0], self.time_sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
            device=x0.device, generator=generator,
        ).to(x0.dtype)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return t, noise, interpolate(x0, noise, t), velocity_target(x0, noise)

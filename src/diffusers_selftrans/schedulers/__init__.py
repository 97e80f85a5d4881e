"""Samplers. The ODE uses diffusers' own `FlowMatchEulerDiscreteScheduler` / `FlowMatchHeunDiscreteScheduler`;
this package adds the SDE sampler of SiT/REPA that diffusers lacks."""

from .scheduling_sit_euler_maruyama import (
    DEFAULT_LAST_STEP_SIZE,
    SiTEulerMaruyamaScheduler,
    SiTEulerMaruyamaSchedulerOutput,
)

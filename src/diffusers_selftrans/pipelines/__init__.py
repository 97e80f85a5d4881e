"""Inference pipelines."""

from .pipeline_sit import SiTPipeline, set_repa_timesteps

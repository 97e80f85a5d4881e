"""diffusers-selftrans: Self-Transcendence training of class-conditional SiT on diffusers + accelerate."""

__version__ = "0.1.0.dev0"

from .models import AlignmentProjector, SiTTransformer2DModel, SiTTransformer2DModelOutput
from .convert import convert_original_checkpoint
from .pipelines import SiTPipeline
from .schedulers import SiTEulerMaruyamaScheduler

"""Shared test set-up: offline Hub, deterministic torch, tiny configs."""

import os

# Hub env vars are read at import time: set them before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_SIT = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_classes=10,
)


@pytest.fixture
def tiny_sit_config():
    return dict(TINY_SIT)


@pytest.fixture
def tiny_sit():
    """A tiny SiT whose zero-initialised output layers are randomised, so outputs depend on every weight."""
    from diffusers_selftrans import SiTTransformer2DModel

    torch.manual_seed(0)
    model = SiTTransformer2DModel(**TINY_SIT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()

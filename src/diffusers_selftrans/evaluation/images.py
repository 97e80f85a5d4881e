# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Images for evaluation: one interchange format and the loaders of sample sets.

`to_uint8_nchw` accepts uint8 numpy NHWC, float numpy NHWC in [0, 1] (a pipeline's `output_type="np"`), uint8 torch
NCHW, float torch NCHW in [0, 1], or a list of PIL images. Float -> uint8 is `uint8(clamp(255 * x, 0, 255))`,
truncation, which equals REPA/ADM `generate.py` `clamp(255 * (x + 1) / 2, 0, 255).to(uint8)` for x in [-1, 1]
(diffusers' `numpy_to_pil` rounds instead). `load_images` reads an ADM `.npz` or a folder of image files.
"""

import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image


# ADM `evaluations/evaluator.py` reads the images of a sample batch from this key; guided-diffusion's
# `image_sample.py` stores the class labels as `arr_1`.
NPZ_IMAGES_KEY = "arr_0"
NPZ_LABELS_KEY = "arr_1"
# How float images in [0, 1] become uint8 (REPA/ADM `generate.py`: truncation, not rounding).
PIXEL_CONVERSION = "uint8(clamp(255 * x, 0, 255)), truncation as REPA/ADM generate.py"
# A float image whose minimum is below this was almost surely given in [-1, 1] instead of [0, 1].
_NEGATIVE_RANGE_HINT = -0.5
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

ImagesLike = Union[np.ndarray, torch.Tensor, Sequence[Image.Image]]


def _float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    if x.numel() and float(x.min()) < _NEGATIVE_RANGE_HINT:
        raise ValueError(
            f"Float images must be in [0, 1]; got a minimum of {float(x.min()):.3f}. "
            "Convert [-1, 1] images with (x + 1) / 2 first."
        )
    # Truncation, as REPA/ADM generate.py (`clamp(255 * (x + 1) / 2, 0, 255).to(uint8)`).
    return (x.float() * 255).clamp(0, 255).to(torch.uint8)


def to_uint8_nchw(images: ImagesLike) -> torch.Tensor:
    """Converts any supported image batch to a uint8 torch tensor `(N, C, H, W)`.

    Accepted: numpy `(N, H, W, C)` or `(N, H, W)` (uint8, or float in [0, 1]); torch `(N, C, H, W)` (uint8, or float in
    [0, 1]); a list of PIL images (converted to RGB). Numpy arrays are channel-last, tensors channel-first.
    """
    if isinstance(images, (list, tuple)):
        if not images or not isinstance(images[0], Image.Image):
            raise ValueError("A list of images must be a non-empty list of PIL images.")
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"Numpy images must be channel-last (N, H, W, C) with C in (1, 3) or (N, H, W); got {images.shape}."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Torch images must be channel-first (N, C, H, W) with C in (1, 3); got {tuple(images.shape)}."
            )
        tensor = images.detach().cpu()
    else:
        raise TypeError(f"Unsupported image type {type(images).__name__}.")
    if tensor.dtype == torch.uint8:
        return tensor.contiguous()
    if not tensor.is_floating_point():
        raise ValueError(f"Images must be uint8 or float in [0, 1]; got dtype {tensor.dtype}.")
    return _float_to_uint8(tensor).contiguous()


def to_uint8_nhwc(images: ImagesLike) -> np.ndarray:
    """Same conversion as `to_uint8_nchw`, returned as a numpy uint8 `(N, H, W, C)` array (the ADM layout)."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).numpy()


def load_images(path: str) -> np.ndarray:
    """Loads uint8 RGB images `(N, H, W, 3)` from an ADM `.npz` (`arr_0`) or a folder of image files (sorted names)."""
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if name.lower().endswith(_IMAGE_EXTENSIONS))
        if not names:
            raise FileNotFoundError(f"No image files ({', '.join(_IMAGE_EXTENSIONS)}) in {path}.")
        images = []
        for name in names:
            with Image.open(os.path.join(path, name)) as image:
                images.append(np.asarray(image.convert("RGB")))
        return np.stack(images)
    if path.endswith(".npz"):
        with np.load(path) as data:
            if NPZ_IMAGES_KEY not in data:
                raise ValueError(f"{path} has no `{NPZ_IMAGES_KEY}` array (keys: {list(data.keys())}).")
            images = data[NPZ_IMAGES_KEY]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"`{NPZ_IMAGES_KEY}` of {path} must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}."
            )
        return images
    raise ValueError(f"Expected a folder of images or an ADM .npz file, got {path}.")

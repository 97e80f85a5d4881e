"""Image decoding and preprocessing (REPA/ADM, method notes §2.1): any PIL mode to RGB, ADM center crop, no flip,
pixels in [-1, 1]."""

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image


# ADM / REPA crop (guided-diffusion `center_crop_arr`, REPA `dataset_tools.py` "center-crop-dhariwal").
CROP_RECIPE = "adm_center_crop"

# What PIL raises for undecodable or truncated files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_image(value: Any) -> Image.Image:
    """Open an image from a `datasets` `Image(decode=False)` value (`{"bytes", "path"}`), bytes, a path or a PIL image.

    The pixels are loaded here, so a truncated file raises now (OSError) rather than later.
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        data, path = None, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data = value
        elif isinstance(value, str):
            path = value
        else:
            raise ValueError(f"Unsupported image value of type {type(value).__name__}.")
        if data is not None:
            image = Image.open(io.BytesIO(data))
        elif path is not None and os.path.exists(path):
            image = Image.open(path)
        elif path is not None:
            # Remote path from a streamed dataset (`hf://`, `zip://...`): open it like datasets does.
            from datasets.utils.file_utils import xopen

            with xopen(path, "rb") as f:
                image = Image.open(io.BytesIO(f.read()))
        else:
            raise ValueError("Image value has neither bytes nor path.")
    image.load()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB.

    Grayscale, CMYK, 16-bit and palette images are converted with `Image.convert("RGB")` (as REPA/ADM do). Images with
    transparency (RGBA, LA, palette + transparency) are composited on WHITE: a bare `convert("RGB")` would expose the
    arbitrary colour stored under transparent pixels. ImageNet JPEGs carry no alpha, so this changes nothing there.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits first, PIL's convert would clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def adm_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM center crop: BOX-halve while the short side >= 2 * resolution, BICUBIC-resize the short side to
    `resolution`, then crop the center `resolution` x `resolution` square (REPA `center-crop-dhariwal`)."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    # Repeated 2x box downsampling avoids the aliasing of one big bicubic resize.
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    width, height = image.size
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL image -> float32 (3, H, W) in [-1, 1] (x / 127.5 - 1, as REPA feeds the VAE)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0).contiguous()


def preprocess_image(value: Any, resolution: int) -> torch.Tensor:
    """Open, convert to RGB, ADM-center-crop to `resolution` and scale to [-1, 1]: float32 (3, R, R)."""
    return image_to_tensor(adm_center_crop(to_rgb(open_image(value)), resolution))

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Assets of the CPU quickstart: a digits image folder and a tiny trained VAE, both made offline from scikit-learn.

- `write_digits_imagefolder`: scikit-learn's bundled `load_digits` (1,797 8x8 images, 10 classes, shipped with the
  package, no download), upsampled bicubically to `resolution` px and written as white-on-black grayscale PNGs in class
  folders `0/` ... `9/` (single digits, so string sort == numeric sort for `ClassLabel(names=sorted(...))`). This is
  the `--train_data_dir` of the quickstart.
- `train_digits_vae`: trains a real tiny `diffusers.AutoencoderKL` on those digits (32x32x3 -> 8x8x4 latents, L1
  reconstruction + a small KL term), sets `scaling_factor` to 1 / std of the posterior means over the training digits
  and saves it with `save_pretrained`. The held-out digits (`split_digits`) are never trained on.
- `load_digits_vae`: loads the committed VAE from `examples/assets/digits-vae/`.
- Any other data: `train-vae --train_data_dir FOLDER` trains the same recipe on an image-class folder (colour or
  grayscale, read with the training preprocessing at `--resolution`), holds out `HELD_OUT_FRACTION` of its images and
  reports their PSNR; `vae_metrics.json` next to the weights records it.

The committed VAE was made with

    python examples/quickstart_assets.py train-vae --output_dir examples/assets/digits-vae

(defaults: 1,000 steps at batch 64, seed 0) on the 2-core CPU of the project machine, shared with other jobs:
621 s, held-out PSNR 43.9 dB over 180 digits, scaling_factor 0.274, 0.95 MB of weights. Idle, the 2 cores run
~0.37 s/step (~6 min for 1,000 steps); `--steps 600` gives 41.9 dB in ~4 min. The scaled latents have mean -0.03 over
the dataset (per channel -0.4 to 1.1, like SD-VAE's), so `shift_factor` stays None.

Usage:
    python examples/quickstart_assets.py write-digits --output_dir data/digits --resolution 32
    python examples/quickstart_assets.py train-vae --output_dir examples/assets/digits-vae
    python examples/quickstart_assets.py train-vae --train_data_dir my_folders --resolution 32 --output_dir my-vae
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image


# scikit-learn's `load_digits` stores 8x8 images with integer intensities 0..16 (UCI optdigits).
DIGITS_SOURCE_SIZE = 8
DIGITS_MAX_VALUE = 16.0
DIGITS_NUM_IMAGES = 1797
DIGITS_NUM_CLASSES = 10
DEFAULT_RESOLUTION = 32
# 10 % of the digits are held out from VAE training to measure its reconstruction PSNR.
HELD_OUT_FRACTION = 0.1
DEFAULT_VAE_PATH = Path(__file__).resolve().parent / "assets" / "digits-vae"

# The tiny VAE: 3 encoder stages = 2 downsamplings (diffusers' last stage does not downsample), so 32x32 -> 8x8.
# RGB in/out so it drops into the usual RGB image pipelines; no mid-block attention to keep it small (< 1 MB).
VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)
VAE_LAYERS_PER_BLOCK = 1
VAE_NORM_NUM_GROUPS = 8
VAE_IMAGE_CHANNELS = 3
# Training defaults, picked on this CPU: 1,000 steps reach 43.9 dB held-out PSNR in ~10 min on 2 shared cores.
VAE_TRAIN_STEPS = 1000
VAE_BATCH_SIZE = 64
VAE_LEARNING_RATE = 2e-3
# Written next to a trained VAE: its held-out PSNR and scaling factor (read by benchmarks/evidence.py).
VAE_METRICS_FILE = "vae_metrics.json"
# Weight of the per-element KL against the per-pixel L1: small, as SD-VAE's, but large enough to keep the
# posterior means well conditioned for a diffusion model (none of the latent channels collapses or explodes).
VAE_KL_WEIGHT = 1e-4


def load_digit_images(resolution: int = DEFAULT_RESOLUTION) -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 `(N, resolution, resolution)` (white digit on black) and their labels `(N,)`."""
    from sklearn.datasets import load_digits

    if not isinstance(resolution, int) or resolution < DIGITS_SOURCE_SIZE:
        raise ValueError(f"resolution must be an integer >= {DIGITS_SOURCE_SIZE}, got {resolution!r}.")
    digits = load_digits()
    scaled = digits.images.astype(np.float32) * (255.0 / DIGITS_MAX_VALUE)
    images = np.empty((len(scaled), resolution, resolution), dtype=np.uint8)
    for i, image in enumerate(scaled):
        # Resize in float ("F" mode) so bicubic overshoot is clipped once, after interpolation.
        up = Image.fromarray(image, mode="F").resize((resolution, resolution), Image.BICUBIC)
        images[i] = np.clip(np.rint(np.asarray(up)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_digits(
    num_images: int = DIGITS_NUM_IMAGES, held_out_fraction: float = HELD_OUT_FRACTION, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """A fixed random split of digit indices into (train, held_out), both sorted."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}.")
    order = np.random.RandomState(seed).permutation(num_images)
    num_held_out = int(round(num_images * held_out_fraction))
    num_held_out = min(max(num_held_out, 1), num_images - 1)  # small folders: at least one image on each side
    return np.sort(order[num_held_out:]), np.sort(order[:num_held_out])


def _imagefolder_complete(root: Path, resolution: int) -> bool:
    files = sorted(root.glob("[0-9]/*.png"))
    if len(files) != DIGITS_NUM_IMAGES or len({f.parent.name for f in files}) != DIGITS_NUM_CLASSES:
        return False
    with Image.open(files[0]) as image, Image.open(files[-1]) as last:
        return image.size == (resolution, resolution) and last.size == (resolution, resolution)


def write_digits_imagefolder(output_dir, resolution: int = DEFAULT_RESOLUTION) -> Path:
    """Write the digits as `output_dir/{label}/{index:04d}.png` (grayscale) and return `output_dir`.

    `index` is the position in `load_digits()`, so `split_digits` indices map to file names. Does nothing when the
    folder already holds all 1,797 digits at this resolution; rewrites it when the resolution differs.
    """
    root = Path(output_dir)
    if _imagefolder_complete(root, resolution):
        return root
    images, labels = load_digit_images(resolution)
    for old in root.glob("[0-9]/*.png"):
        old.unlink()
    for label in range(DIGITS_NUM_CLASSES):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(root / str(int(label)) / f"{index:04d}.png")
    return root


def digits_to_tensor(images: np.ndarray, channels: int = VAE_IMAGE_CHANNELS):
    """uint8 `(N, H, W)` (grayscale, repeated to `channels`) or `(N, H, W, channels)` (colour) -> float
    `(N, channels, H, W)` in [-1, 1], the VAE's input range."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    if x.ndim == 4:
        if x.shape[-1] != channels:
            raise ValueError(f"Images have {x.shape[-1]} channels but the VAE takes {channels}.")
        return x.permute(0, 3, 1, 2).contiguous()
    if x.ndim != 3:
        raise ValueError(f"Expected uint8 images (N, H, W) or (N, H, W, C), got shape {tuple(x.shape)}.")
    return x[:, None].expand(-1, channels, -1, -1).contiguous()


def load_imagefolder_images(root, resolution: int) -> Tuple[np.ndarray, np.ndarray]:
    """Every image of an image-class folder (`root/<class>/<image>`) as uint8 RGB `(N, R, R, 3)` and its class index
    `(N,)` (classes sorted by name), through the training preprocessing (`diffusers_selftrans.data.preprocess_image`:
    RGB, ADM centre crop to `resolution`). Unreadable files are an error naming the file."""
    from diffusers_selftrans.data import preprocess_image

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--train_data_dir {root} is not a folder.")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>).")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted(p for p in (root / name).iterdir() if p.is_file()):
            try:
                x = preprocess_image(str(path), resolution)  # (3, R, R) in [-1, 1]
            except Exception as error:  # a clear error naming the file, not a silent skip
                raise ValueError(f"Cannot read image {path}: {error}") from error
            images.append(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
            labels.append(label)
    if len(images) < 2:
        raise ValueError(f"{root} holds {len(images)} image(s); the VAE needs at least 2 (one is held out).")
    return np.stack(images), np.array(labels, dtype=np.int64)


def build_digits_vae(resolution: int = DEFAULT_RESOLUTION, latent_channels: int = 4):
    """An untrained tiny `AutoencoderKL` for digits (downsampling x4)."""
    from diffusers import AutoencoderKL

    stages = len(VAE_BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        in_channels=VAE_IMAGE_CHANNELS,
        out_channels=VAE_IMAGE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=VAE_LAYERS_PER_BLOCK,
        latent_channels=latent_channels,
        norm_num_groups=VAE_NORM_NUM_GROUPS,
        sample_size=resolution,
        mid_block_add_attention=False,
        # fp32 weights; nothing to upcast.
        force_upcast=False,
    )


def encode_means(vae, x, batch_size: int = 256):
    """Posterior means of `x` in [-1, 1] (unscaled latents), batched, no grad."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(batch_size)])


def reconstruction_psnr(vae, images: np.ndarray, batch_size: int = 256) -> float:
    """PSNR (dB, [0, 1] range) of decode(posterior mean) over `images` (uint8 `(N, H, W)`), from the mean MSE."""
    import torch

    x = digits_to_tensor(images, vae.config.in_channels)
    with torch.no_grad():
        recon = torch.cat([vae.decode(z).sample for z in encode_means(vae, x, batch_size).split(batch_size)])
    mse = ((recon.clamp(-1, 1) - x) / 2).pow(2).mean().item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def train_digits_vae(
    output_dir,
    *,
    resolution: int = DEFAULT_RESOLUTION,
    latent_channels: int = 4,
    steps: int = VAE_TRAIN_STEPS,
    batch_size: int = VAE_BATCH_SIZE,
    learning_rate: float = VAE_LEARNING_RATE,
    kl_weight: float = VAE_KL_WEIGHT,
    seed: int = 0,
    split_seed: int = 0,
    log_every: Optional[int] = None,
    train_data_dir: Optional[str] = None,
) -> Dict[str, float]:
    """Train the tiny VAE on the non-held-out digits (or the images of `train_data_dir`, an image-class folder), set
    its `scaling_factor`, save it and `vae_metrics.json` to `output_dir`.

    Returns `{"held_out_psnr", "held_out_images", "scaling_factor", "latent_mean", "train_seconds", "steps", "data"}`.
    """
    import torch

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}.")
    if train_data_dir is None:
        images, _ = load_digit_images(resolution)
    else:
        images, _ = load_imagefolder_images(train_data_dir, resolution)
    train_idx, held_out_idx = split_digits(len(images), seed=split_seed)
    x_train = digits_to_tensor(images[train_idx])

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = build_digits_vae(resolution, latent_channels).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = x_train[torch.randint(len(x_train), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        # Per-element means, so kl_weight does not depend on the resolution or latent size.
        recon_loss = (recon - batch).abs().mean()
        kl_loss = posterior.kl().mean() / posterior.mean[0].numel()
        loss = recon_loss + kl_weight * kl_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step}/{steps}  l1 {recon_loss.item():.4f}  kl {kl_loss.item():.3f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    train_seconds = time.perf_counter() - start

    # Scale the latents to unit variance as SD-VAE's 0.18215 does; the mean stays (diffusers' shift_factor None).
    vae.eval()
    means = encode_means(vae, x_train)
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    held_out_psnr = reconstruction_psnr(vae, images[held_out_idx])
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(output_dir)
    metrics = {
        "held_out_psnr": held_out_psnr,
        "held_out_images": int(len(held_out_idx)),
        "scaling_factor": scaling_factor,
        "latent_mean": float(means.mean() * scaling_factor),
        "train_seconds": train_seconds,
        "steps": steps,
        "data": "scikit-learn digits" if train_data_dir is None else str(train_data_dir),
    }
    (Path(output_dir) / VAE_METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def load_digits_vae(path=DEFAULT_VAE_PATH):
    """The trained digits `AutoencoderKL` (committed under `examples/assets/digits-vae/`), in eval mode."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"No VAE at {path}; make one with `python examples/quickstart_assets.py train-vae --output_dir {path}`."
        )
    return AutoencoderKL.from_pretrained(path).eval()


def parse_args(input_args: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Make the CPU quickstart's digits folder and tiny VAE.")
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("write-digits", help="Write scikit-learn's digits as PNG class folders.")
    digits.add_argument("--output_dir", type=str, required=True)
    digits.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    vae = sub.add_parser("train-vae", help="Train the tiny digits AutoencoderKL and save it.")
    vae.add_argument("--output_dir", type=str, default=str(DEFAULT_VAE_PATH))
    vae.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    vae.add_argument("--latent_channels", type=int, default=4)
    vae.add_argument("--steps", type=int, default=VAE_TRAIN_STEPS)
    vae.add_argument("--batch_size", type=int, default=VAE_BATCH_SIZE)
    vae.add_argument("--learning_rate", type=float, default=VAE_LEARNING_RATE)
    vae.add_argument("--kl_weight", type=float, default=VAE_KL_WEIGHT)
    vae.add_argument("--seed", type=int, default=0)
    vae.add_argument("--split_seed", type=int, default=0)
    vae.add_argument("--log_every", type=int, default=100)
    vae.add_argument("--train_data_dir", type=str, default=None,
                     help="An image-class folder (colour or grayscale) to train on instead of the digits.")
    return parser.parse_args(input_args)


def main(args: argparse.Namespace) -> None:
    if args.command == "write-digits":
        print(write_digits_imagefolder(args.output_dir, args.resolution))
        return
    metrics = train_digits_vae(
        args.output_dir,
        resolution=args.resolution,
        latent_channels=args.latent_channels,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        kl_weight=args.kl_weight,
        seed=args.seed,
        split_seed=args.split_seed,
        log_every=args.log_every,
        train_data_dir=args.train_data_dir,
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main(parse_args())

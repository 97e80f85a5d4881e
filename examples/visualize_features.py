# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Render a SiT's block features the way the Self-Transcendence paper does.

(a) `pca_features.png` (paper Figs. 1, 9, 10): for each requested block, the tokens `(N*T, D)` of a few images noised to
    time t are projected onto their top-3 principal components, min-max normalised to RGB over all shown images,
    reshaped to the token grid and upscaled nearest; rows are images, the first column is the input, then one column
    per block.
(b) `tsne_features.png` (paper Fig. 2): a t-SNE of the mean-pooled tokens of one block, coloured by class.

Inputs are images from `--train_data_dir` (class sub-folders, labels = sorted folder names as in the training data
module), encoded with the VAE (posterior mean, then `(z - shift_factor) * scaling_factor`), or, without a data folder,
random Gaussian latents with random labels. Features come from `model(x_t, t, y, output_hidden_states=blocks)`.

    python examples/visualize_features.py --model_name_or_path out/pipeline --train_data_dir data/digits \
        --blocks 2 4 6 --timestep 0.5 --output_dir out/features
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib


matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Paper Fig. 10 visualises t = 0.5 (Fig. 9: 0.7, Fig. 2: 0.4); data at t=0, noise at t=1.
DEFAULT_TIMESTEP = 0.5
# How many evenly spaced blocks to show when --blocks is not given.
DEFAULT_NUM_BLOCKS = 4
PCA_COMPONENTS = 3  # one per RGB channel
DPI = 100
TITLE_PX = 30  # band above the PCA grid for column titles
TSNE_FIGURE_PX = 640
# A principal component whose spread is below this fraction of the largest |token| value is float32 rounding noise
# (identical tokens, rank < 3): it is drawn mid-grey instead of stretching the noise to [0, 1].
DEGENERATE_RELATIVE_SPREAD = 1e-5


def parse_args(input_args: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PCA and t-SNE pictures of a SiT's block features.")
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="A SiTTransformer2DModel folder, or a pipeline folder with a `transformer/` subfolder.")
    parser.add_argument("--vae_name_or_path", type=str, default=None,
                        help="AutoencoderKL folder; defaults to the pipeline's `vae/` when there is one.")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="Image folder with one sub-folder per class; random latents when omitted.")
    parser.add_argument("--blocks", type=int, nargs="+", default=None,
                        help=f"1-based blocks to show; default {DEFAULT_NUM_BLOCKS} evenly spaced blocks.")
    parser.add_argument("--tsne_block", type=int, default=None, help="Block of the t-SNE; default the last of --blocks.")
    parser.add_argument("--timestep", type=float, default=DEFAULT_TIMESTEP, help="Raw t in [0, 1], data at t=0.")
    parser.add_argument("--num_images", type=int, default=4, help="Rows of the PCA picture.")
    parser.add_argument("--num_tsne_images", type=int, default=500, help="Points of the t-SNE (capped by the data).")
    parser.add_argument("--cell_size", type=int, default=96, help="Pixels per PCA tile.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output_dir", type=str, default="feature_visualizations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(input_args)
    if not 0.0 <= args.timestep <= 1.0:
        raise ValueError(f"--timestep must lie in [0, 1] (data at 0, noise at 1), got {args.timestep}.")
    for name in ("num_images", "num_tsne_images", "cell_size", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.num_tsne_images < 2:
        raise ValueError("--num_tsne_images must be at least 2 for a t-SNE.")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def load_models(model_name_or_path: str, vae_name_or_path: Optional[str] = None):
    """(transformer, vae or None), both in eval mode; a pipeline folder supplies `transformer/` and `vae/`."""
    from diffusers import AutoencoderKL

    from diffusers_selftrans import SiTTransformer2DModel

    root = Path(model_name_or_path)
    is_pipeline = (root / "transformer" / "config.json").is_file()
    if is_pipeline:
        model = SiTTransformer2DModel.from_pretrained(root, subfolder="transformer")
    elif (root / "config.json").is_file() or not root.exists():
        model = SiTTransformer2DModel.from_pretrained(model_name_or_path)
    else:
        raise ValueError(f"{root} holds neither a SiTTransformer2DModel (config.json) nor a pipeline (transformer/).")
    vae = None
    if vae_name_or_path is not None:
        vae = AutoencoderKL.from_pretrained(vae_name_or_path)
    elif is_pipeline and (root / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    return model.eval(), (vae.eval() if vae is not None else None)


def list_image_folder(data_dir: str) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """[(file, label)] and class names; labels index the sorted class folder names (as `ClassLabel(names=sorted)`)."""
    root = Path(data_dir)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise ValueError(f"--train_data_dir {data_dir} must contain one sub-folder of images per class.")
    items = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not items:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {data_dir}.")
    return items, classes


def load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    """Centre-crop to a square, resize (bicubic) and map to [-1, 1]: (channels, resolution, resolution)."""
    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def vae_downsample_factor(vae) -> int:
    # diffusers' AutoencoderKL halves the resolution in every encoder stage but the last.
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Images in [-1, 1] -> model-space latents `(z - shift_factor) * scaling_factor` from the posterior mean."""
    shift = vae.config.shift_factor or 0.0
    latents = [vae.encode(chunk).latent_dist.mean for chunk in images.split(batch_size)]
    return (torch.cat(latents) - shift) * vae.config.scaling_factor


def default_blocks(num_layers: int, count: int = DEFAULT_NUM_BLOCKS) -> List[int]:
    """`count` evenly spaced 1-based blocks ending at the last one (e.g. 12 layers -> 3, 6, 9, 12)."""
    count = min(count, num_layers)
    return sorted({round(num_layers * (i + 1) / count) for i in range(count)})


# ---------------------------------------------------------------------------------------------------------------------
# Features and projections
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def block_features(
    model, latents: torch.Tensor, labels: torch.Tensor, blocks: Sequence[int], timestep: float,
    generator: torch.Generator, batch_size: int,
) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
    """Noise `latents` to x_t = (1 - t) x0 + t eps and return ({block: (N, T, D)} on CPU, x_t)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    x_t = (1.0 - timestep) * latents + timestep * noise
    device = next(model.parameters()).device
    features: Dict[int, List[torch.Tensor]] = {k: [] for k in blocks}
    for x, y in zip(x_t.split(batch_size), labels.split(batch_size)):
        t = torch.full((len(x),), timestep, device=device)
        out = model(x.to(device), t, y.to(device), output_hidden_states=blocks, stop_at_layer=max(blocks))
        for k in blocks:
            features[k].append(out.hidden_states[k].float().cpu())
    return {k: torch.cat(v) for k, v in features.items()}, x_t


def pca_rgb(tokens: torch.Tensor) -> np.ndarray:
    """(N, T, D) tokens -> (N, g, g, 3) RGB in [0, 1]: joint top-3 PCA over all N*T tokens, min-max per component.

    Components are sign-fixed (largest loading positive) for reproducible colours. A component without spread
    (identical tokens, D < 3) is drawn mid-grey instead of dividing by zero.
    """
    n, t, d = tokens.shape
    grid = int(round(t**0.5))
    if grid * grid != t:
        raise ValueError(f"Expected a square token grid, got T={t}.")
    flat = tokens.reshape(n * t, d).double()
    min_spread = DEGENERATE_RELATIVE_SPREAD * float(flat.abs().max())
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)  # rows of vh: principal directions
    components = vh[:PCA_COMPONENTS]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    projected = flat @ components.T  # (N*T, k), k <= 3
    rgb = torch.full((n * t, PCA_COMPONENTS), 0.5, dtype=torch.float64)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    spread = high - low
    for c in range(projected.shape[1]):
        if spread[c] > min_spread:
            rgb[:, c] = (projected[:, c] - low[c]) / spread[c]
    return rgb.reshape(n, grid, grid, PCA_COMPONENTS).numpy()


def tsne_embedding(features: torch.Tensor, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2) with scikit-learn's t-SNE (PCA init; perplexity capped below N as t-SNE requires)."""
    from sklearn.manifold import TSNE

    n = len(features)
    # sklearn's default perplexity 30 needs N > 30; smaller sets use (N - 1) / 3 (>= 1 point per side).
    perplexity = min(30.0, max(1.0, (n - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(features.double().numpy())


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------


def _to_display(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1]: images from [-1, 1]; latents (C != 1, 3) by min-max of channels 0..2."""
    if image.shape[0] in (1, 3):
        image = (image.float().clamp(-1, 1) + 1) / 2
    else:
        image = image[:3].float()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(torch.finfo(image.dtype).eps)
    return image.expand(3, -1, -1).permute(1, 2, 0).numpy()


def save_pca_grid(
    path: Path, inputs: torch.Tensor, maps: Dict[int, np.ndarray], cell_size: int,
    input_title: str = "input",
) -> Tuple[int, int]:
    """Rows = images, columns = input then one per block. Returns the PNG's (width, height) in pixels."""
    blocks = sorted(maps)
    rows, cols = len(inputs), len(blocks) + 1
    width, height = cols * cell_size, rows * cell_size + TITLE_PX
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    for r in range(rows):
        for c in range(cols):
            # Axes in figure fractions so every tile is exactly cell_size pixels.
            ax = fig.add_axes([c * cell_size / width, (rows - 1 - r) * cell_size / height,
                               cell_size / width, cell_size / height])
            picture = _to_display(inputs[r]) if c == 0 else maps[blocks[c - 1]][r]
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                title = input_title if c == 0 else f"block {blocks[c - 1]}"
                fig.text((c + 0.5) * cell_size / width, 1 - 0.5 * TITLE_PX / height, title,
                         ha="center", va="center", fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return width, height


def save_tsne(path: Path, points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str) -> None:
    size = TSNE_FIGURE_PX / DPI
    fig, ax = plt.subplots(figsize=(size, size), dpi=DPI)
    num_classes = len(class_names)
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo")
    colors = cmap(labels / max(num_classes - 1, 1)) if num_classes > 20 else cmap(labels % cmap.N)
    ax.scatter(points[:, 0], points[:, 1], c=colors, s=12, linewidths=0)
    if num_classes <= 20:
        for label in np.unique(labels):
            ax.scatter([], [], color=cmap(label % cmap.N), label=class_names[label], s=12)
        ax.legend(loc="best", fontsize=7, markerscale=1.2, frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Dict[str, str]:
    model, vae = load_models(args.model_name_or_path, args.vae_name_or_path)
    model.to(args.device)
    cfg = model.config
    blocks = sorted(set(args.blocks)) if args.blocks else default_blocks(cfg.num_layers)
    for k in blocks + ([args.tsne_block] if args.tsne_block is not None else []):
        if not 1 <= k <= cfg.num_layers:
            raise ValueError(f"Blocks are 1-based in [1, {cfg.num_layers}] for this model, got {k}.")
    tsne_block = args.tsne_block if args.tsne_block is not None else blocks[-1]
    generator = torch.Generator().manual_seed(args.seed)
    num_points = max(args.num_images, args.num_tsne_images)

    # 1. Data: model-space latents, labels, and what the first PCA column shows.
    if args.train_data_dir is not None:
        if vae is None:
            raise ValueError("--train_data_dir needs a VAE: pass --vae_name_or_path or a pipeline folder with vae/.")
        if vae.config.latent_channels != cfg.in_channels:
            raise ValueError(f"The VAE has {vae.config.latent_channels} latent channels, the model {cfg.in_channels}.")
        items, class_names = list_image_folder(args.train_data_dir)
        order = torch.randperm(len(items), generator=generator)[:num_points].tolist()
        resolution = cfg.sample_size * vae_downsample_factor(vae)
        vae.to(args.device)
        images = torch.stack([load_image(items[i][0], resolution, vae.config.in_channels) for i in order])
        labels = torch.tensor([items[i][1] for i in order])
        if int(labels.max()) >= cfg.num_classes:
            raise ValueError(f"{len(class_names)} class folders but the model has {cfg.num_classes} classes.")
        latents = encode_images(vae, images.to(args.device), args.batch_size).cpu().float()
        inputs, input_title = images, "image"
    else:
        class_names = [str(i) for i in range(cfg.num_classes)]
        shape = (num_points, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = torch.randn(shape, generator=generator)
        labels = torch.randint(cfg.num_classes, (num_points,), generator=generator)
        inputs, input_title = None, f"x_t, t={args.timestep:g}"

    # 2. Features at t of every requested block (and the t-SNE block).
    wanted = sorted(set(blocks) | {tsne_block})
    features, x_t = block_features(model, latents, labels, wanted, args.timestep, generator, args.batch_size)
    if inputs is None:
        inputs = x_t

    # 3. Pictures.
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = min(args.num_images, len(latents))
    maps = {k: pca_rgb(features[k][:rows]) for k in blocks}
    pca_path = output_dir / "pca_features.png"
    save_pca_grid(pca_path, inputs[:rows], maps, args.cell_size, input_title)

    pooled = features[tsne_block][: args.num_tsne_images].mean(dim=1)  # (N, D), mean over tokens
    points = tsne_embedding(pooled, args.seed)
    tsne_path = output_dir / "tsne_features.png"
    title = f"t-SNE of block {tsne_block} (mean-pooled), t={args.timestep:g}, {len(pooled)} images"
    save_tsne(tsne_path, points, labels[: len(pooled)].numpy(), class_names, title)

    with open(output_dir / "visualize_args.json", "w") as f:
        json.dump({**vars(args), "blocks": blocks, "tsne_block": tsne_block}, f, indent=2)
    print(f"Wrote {pca_path} and {tsne_path}")
    return {"pca": str(pca_path), "tsne": str(tsne_path)}


if __name__ == "__main__":
    main(parse_args())

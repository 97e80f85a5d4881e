"""examples/visualize_features.py: PCA maps and t-SNE of SiT block features, on tiny random models."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_module():
    spec = importlib.util.spec_from_file_location("visualize_features", EXAMPLES / "visualize_features.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["visualize_features"] = module
    spec.loader.exec_module(module)
    return module


vf = _load_module()


def _tiny_vae():
    """A random 3 -> 4 channel AutoencoderKL that downsamples x2 (8x8 latents from 16x16 images)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, mid_block_add_attention=False,
        scaling_factor=0.5, shift_factor=0.1,
    ).eval()


def _image_folder(root: Path, num_classes: int = 3, per_class: int = 5) -> Path:
    rng = np.random.RandomState(0)
    for c in range(num_classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            # Non-square, so the centre crop is exercised.
            array = (rng.rand(20, 24, 3) * 255).astype(np.uint8)
            Image.fromarray(array).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_pca_rgb_shape_range_and_sign_fixed():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 32)
    rgb = vf.pca_rgb(tokens)
    assert rgb.shape == (3, 4, 4, 3)
    assert rgb.min() == pytest.approx(0.0) and rgb.max() == pytest.approx(1.0)
    for c in range(3):  # each component spans the full [0, 1] over the shown images
        assert rgb[..., c].min() == pytest.approx(0.0) and rgb[..., c].max() == pytest.approx(1.0)
    # Colours depend on the tokens, not on SVD's arbitrary signs: negated tokens give the negative image, and
    # reordering the tokens reorders the picture.
    np.testing.assert_allclose(vf.pca_rgb(-tokens), 1.0 - rgb, atol=1e-9)
    perm = torch.randperm(16)
    np.testing.assert_allclose(vf.pca_rgb(tokens[:, perm]).reshape(3, 16, 3), rgb.reshape(3, 16, 3)[:, perm], atol=1e-9)


def test_pca_rgb_follows_the_dominant_direction():
    # Tokens vary along one direction only: the first component (red) is a linear ramp of the token value.
    values = torch.linspace(-1, 1, 16)
    direction = torch.randn(8)
    tokens = (values[:, None] * direction[None])[None]  # (1, 16, 8)
    rgb = vf.pca_rgb(tokens)
    red = rgb[0, ..., 0].reshape(-1)
    assert np.corrcoef(red, values.numpy())[0, 1] ** 2 == pytest.approx(1.0, abs=1e-9)
    # Green and blue carry no variance: mid-grey instead of noise.
    np.testing.assert_allclose(rgb[0, ..., 1:], 0.5)


def test_pca_rgb_degenerate_inputs():
    identical = torch.ones(2, 16, 8) * 3.0
    rgb = vf.pca_rgb(identical)
    assert rgb.shape == (2, 4, 4, 3) and np.isfinite(rgb).all()
    np.testing.assert_allclose(rgb, 0.5)
    narrow = vf.pca_rgb(torch.randn(1, 4, 2))  # D = 2 < 3 components
    assert narrow.shape == (1, 2, 2, 3) and np.isfinite(narrow).all()
    with pytest.raises(ValueError, match="square token grid"):
        vf.pca_rgb(torch.randn(1, 6, 4))


def test_default_blocks():
    assert vf.default_blocks(12) == [3, 6, 9, 12]
    assert vf.default_blocks(28) == [7, 14, 21, 28]
    assert vf.default_blocks(2) == [1, 2]


def test_visualize_random_latents_from_model_folder(tiny_sit, tmp_path):
    model_dir = tmp_path / "sit"
    tiny_sit.save_pretrained(model_dir)
    out = tmp_path / "viz"
    args = vf.parse_args([
        "--model_name_or_path", str(model_dir), "--blocks", "1", "3", "--timestep", "0.5", "--num_images", "3",
        "--num_tsne_images", "12", "--cell_size", "40", "--output_dir", str(out), "--seed", "1", "--device", "cpu",
    ])
    paths = vf.main(args)
    with Image.open(paths["pca"]) as image:
        # (input + 2 blocks) columns x 3 rows of 40 px tiles, plus the title band.
        assert image.size == (3 * 40, 3 * 40 + vf.TITLE_PX)
        pixels = np.asarray(image.convert("RGB"))
    # The PCA tiles are colourful (not a blank figure): a block column has many distinct colours.
    tile = pixels[vf.TITLE_PX:vf.TITLE_PX + 40, 40:80].reshape(-1, 3)
    assert len(np.unique(tile, axis=0)) >= 8
    with Image.open(paths["tsne"]) as image:
        assert image.size == (vf.TSNE_FIGURE_PX, vf.TSNE_FIGURE_PX)
    saved = json.loads((out / "visualize_args.json").read_text())
    assert saved["blocks"] == [1, 3] and saved["tsne_block"] == 3


def test_visualize_pipeline_folder_with_images(tiny_sit, tmp_path):
    pipe = tmp_path / "pipe"
    tiny_sit.save_pretrained(pipe / "transformer")
    _tiny_vae().save_pretrained(pipe / "vae")
    data = _image_folder(tmp_path / "images")
    out = tmp_path / "viz"
    paths = vf.main(vf.parse_args([
        "--model_name_or_path", str(pipe), "--train_data_dir", str(data), "--blocks", "2", "--tsne_block", "4",
        "--num_images", "2", "--cell_size", "32", "--output_dir", str(out), "--device", "cpu",
    ]))
    with Image.open(paths["pca"]) as image:
        assert image.size == (2 * 32, 2 * 32 + vf.TITLE_PX)
    assert Path(paths["tsne"]).is_file()


def test_image_latents_use_shift_and_scale(tmp_path):
    vae = _tiny_vae()
    data = _image_folder(tmp_path / "images", num_classes=2, per_class=1)
    items, classes = vf.list_image_folder(str(data))
    assert classes == ["class_0", "class_1"] and [label for _, label in items] == [0, 1]
    image = vf.load_image(items[0][0], 16, 3)
    assert image.shape == (3, 16, 16) and -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    latents = vf.encode_images(vae, image[None], batch_size=4)
    with torch.no_grad():
        mean = vae.encode(image[None]).latent_dist.mean
    torch.testing.assert_close(latents, (mean - 0.1) * 0.5)


def test_bad_inputs(tiny_sit, tmp_path):
    with pytest.raises(ValueError, match="timestep"):
        vf.parse_args(["--model_name_or_path", "m", "--timestep", "1.5"])
    model_dir = tmp_path / "sit"
    tiny_sit.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        vf.main(vf.parse_args(["--model_name_or_path", str(model_dir), "--blocks", "5", "--output_dir", str(tmp_path)]))
    with pytest.raises(ValueError, match="needs a VAE"):
        vf.main(vf.parse_args([
            "--model_name_or_path", str(model_dir), "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path),
        ]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        vf.load_models(str(tmp_path / "empty"))

"""The CPU quickstart's assets: the digits image folder and the committed tiny digits VAE."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Measured held-out PSNR of the committed VAE: 43.9 dB (see the module docstring); 3 dB of margin.
MIN_HELD_OUT_PSNR = 40.9


def _load_module():
    spec = importlib.util.spec_from_file_location("quickstart_assets", EXAMPLES / "quickstart_assets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quickstart_assets"] = module
    spec.loader.exec_module(module)
    return module


qa = _load_module()


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    return qa.write_digits_imagefolder(tmp_path_factory.mktemp("digits") / "d16", resolution=16)


def test_digits_imagefolder_layout(digits16):
    class_dirs = sorted(p.name for p in digits16.iterdir() if p.is_dir())
    assert class_dirs == [str(i) for i in range(10)]
    files = sorted(digits16.glob("*/*.png"))
    assert len(files) == 1797
    counts = [len(list((digits16 / c).glob("*.png"))) for c in class_dirs]
    assert min(counts) >= 170 and sum(counts) == 1797
    with Image.open(files[0]) as image:
        assert image.size == (16, 16) and image.mode == "L"
        pixels = np.asarray(image)
    # White digit on black: dark border on average (some strokes touch the edge), bright strokes.
    stack = np.stack([np.asarray(Image.open(f)) for f in files[::20]]).astype(float)
    border = np.concatenate([stack[:, 0], stack[:, -1], stack[:, :, 0], stack[:, :, -1]], axis=1)
    assert stack[:, 4:12, 4:12].mean() > 2 * border.mean() and pixels.max() > 200
    # File names are positions in load_digits(): the label folder matches sklearn's target.
    from sklearn.datasets import load_digits

    target = load_digits().target
    for f in files[::200]:
        assert target[int(f.stem)] == int(f.parent.name)


def test_digits_imagefolder_idempotent_and_resolution_change(digits16):
    marker = sorted(digits16.glob("3/*.png"))[0]
    before = marker.stat().st_mtime_ns
    qa.write_digits_imagefolder(digits16, resolution=16)
    assert marker.stat().st_mtime_ns == before  # complete folder: nothing rewritten
    qa.write_digits_imagefolder(digits16, resolution=24)
    files = list(digits16.glob("*/*.png"))
    assert len(files) == 1797
    with Image.open(files[0]) as image:
        assert image.size == (24, 24)
    qa.write_digits_imagefolder(digits16, resolution=16)  # back, for the other tests of this module


def test_split_is_deterministic_and_disjoint():
    train, held = qa.split_digits(1797, seed=0)
    assert len(held) == 180 and len(train) == 1617
    assert not set(train) & set(held)
    np.testing.assert_array_equal(held, qa.split_digits(1797, seed=0)[1])
    assert not np.array_equal(held, qa.split_digits(1797, seed=1)[1])
    with pytest.raises(ValueError, match="held_out_fraction"):
        qa.split_digits(10, held_out_fraction=1.5)


def test_committed_vae_config_and_latents():
    vae = qa.load_digits_vae()
    cfg = vae.config
    assert (cfg.in_channels, cfg.out_channels, cfg.latent_channels) == (3, 3, 4)
    assert tuple(cfg.block_out_channels) == qa.VAE_BLOCK_OUT_CHANNELS
    assert cfg.shift_factor is None
    assert 0.05 < cfg.scaling_factor < 20 and cfg.scaling_factor != 0.18215  # measured, not SD's default
    weights = qa.DEFAULT_VAE_PATH / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 2_000_000
    images, _ = qa.load_digit_images(32)
    _, held = qa.split_digits(len(images), seed=0)
    x = qa.digits_to_tensor(images[held[:64]])
    z = qa.encode_means(vae, x) * cfg.scaling_factor
    assert z.shape == (64, 4, 8, 8)
    # scaling_factor was set to 1 / std of the training latents: held-out latents are close to unit scale.
    assert 0.7 < float(z.std()) < 1.4


def test_committed_vae_reconstructs_held_out_digits():
    vae = qa.load_digits_vae()
    images, _ = qa.load_digit_images(32)
    _, held = qa.split_digits(len(images), seed=0)
    psnr = qa.reconstruction_psnr(vae, images[held])
    assert psnr > MIN_HELD_OUT_PSNR
    # A blank reconstruction scores far lower: the threshold is meaningful.
    blank = ((images[held].astype(np.float64) / 255) ** 2).mean()
    assert 10 * np.log10(1 / blank) < MIN_HELD_OUT_PSNR - 10


def test_load_digits_vae_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="train-vae"):
        qa.load_digits_vae(tmp_path / "nothing")


def test_tiny_vae_training_writes_loadable_folder(tmp_path):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = tmp_path / "vae"
    metrics = qa.train_digits_vae(out, resolution=16, steps=2, batch_size=8)
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(metrics["scaling_factor"])
    assert config["scaling_factor"] != 0.18215 and config["sample_size"] == 16
    vae = qa.load_digits_vae(out)
    images, _ = qa.load_digit_images(16)
    train, _ = qa.split_digits(len(images), seed=0)
    z = qa.encode_means(vae, qa.digits_to_tensor(images[train]))
    assert z.shape[1:] == (4, 4, 4)
    assert float(z.std()) * vae.config.scaling_factor == pytest.approx(1.0, rel=1e-3)
    assert metrics["steps"] == 2 and np.isfinite(metrics["held_out_psnr"])


def test_cli_parses_both_commands():
    args = qa.parse_args(["train-vae", "--output_dir", "x", "--steps", "5"])
    assert (args.command, args.output_dir, args.steps, args.resolution) == ("train-vae", "x", 5, 32)
    args = qa.parse_args(["write-digits", "--output_dir", "d"])
    assert (args.command, args.resolution) == ("write-digits", 32)
    with pytest.raises(SystemExit):
        qa.parse_args(["train-vae", "--stepz", "5"])


def _write_colour_folder(root, per_class=5, size=16):
    """Two classes: red-ish and blue-ish noise images (colour, so a grayscale-only recipe would fail)."""
    rng = np.random.RandomState(0)
    for c, name in ((0, "red"), (2, "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.randint(0, 80, (size, size, 3)).astype(np.uint8)
            image[..., c] = 200
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def test_train_vae_on_a_colour_folder(tmp_path):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    folder = _write_colour_folder(tmp_path / "colours")
    images, labels = qa.load_imagefolder_images(folder, 16)
    assert images.shape == (10, 16, 16, 3) and labels.tolist() == [0] * 5 + [1] * 5  # blue < red: sorted names
    assert images[labels == 0][..., 2].mean() > 150 and images[labels == 1][..., 0].mean() > 150  # colour kept
    x = qa.digits_to_tensor(images)
    assert x.shape == (10, 3, 16, 16) and torch.equal(x[:, 2], torch.from_numpy(images[..., 2]).float() / 127.5 - 1)
    out = tmp_path / "vae"
    qa.main(qa.parse_args(["train-vae", "--train_data_dir", str(folder), "--resolution", "16", "--steps", "2",
                           "--batch_size", "4", "--output_dir", str(out)]))
    metrics = json.loads((out / qa.VAE_METRICS_FILE).read_text())
    assert metrics["held_out_images"] == 1 and np.isfinite(metrics["held_out_psnr"])  # 10 % of 10 images
    assert metrics["data"] == str(folder)
    vae = qa.load_digits_vae(out)
    assert metrics["held_out_psnr"] == pytest.approx(qa.reconstruction_psnr(vae, images[qa.split_digits(10)[1]]),
                                                     abs=1e-3)


def test_train_vae_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        qa.load_imagefolder_images(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        qa.load_imagefolder_images(tmp_path / "empty", 16)
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    (bad / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="x.png"):
        qa.load_imagefolder_images(tmp_path / "bad", 16)
    with pytest.raises(ValueError, match="channels"):
        qa.digits_to_tensor(np.zeros((2, 4, 4, 1), np.uint8))

"""Latent pre-encoding (examples/preprocess_latents.py) and the latent-shard source of TrainDataStream."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_selftrans.data import (
    LatentSource,
    TrainDataStream,
    check_latent_stats,
    list_latent_shards,
    preprocess_image,
)


from test_data import _args, _no_stream_shutdown_sleep, make_imagefolder  # noqa: F401  (fixture re-used)


RES = 16
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "preprocess_latents.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("preprocess_latents", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


def _tiny_vae(latent_channels=4, scaling_factor=0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=RES,
        scaling_factor=scaling_factor,
    ).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    make_imagefolder(root / "folder")
    _tiny_vae().save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def plain_latents(setup, script):
    """4 records encoded without flips."""
    out = setup / "plain"
    script.main(script.parse_args(_argv(setup, out, "--max_samples", "4")))
    return out


def _argv(root, out, *extra):
    return [
        "--train_data_dir", str(root / "folder"), "--cache_dir", str(root / "cache"), "--resolution", str(RES),
        "--vae_name_or_path", str(root / "vae"), "--output_dir", str(out), "--batch_size", "2", "--shard_size", "3",
        "--num_sanity_images", "1", "--max_skip_fraction", "0.2", "--dataloader_num_workers", "0",
        *extra,  # the folder holds 1 corrupt image of 10
    ]  # fmt: skip


def test_max_skip_fraction_is_judged_from_the_first_read(setup, script):
    # 10 records, 1 corrupt: 10 % of the data; a 1 % limit stops at the corrupt file instead of writing latents
    argv = _argv(setup, setup / "strict", "--max_skip_fraction", "0.01")
    with pytest.raises(RuntimeError, match="skip"):
        script.main(script.parse_args(argv))
    assert not (setup / "strict" / "stats.json").exists()


def test_round_trip_and_latent_stream(setup, script, plain_latents, capsys):
    out = setup / "out"
    stats = script.main(script.parse_args(_argv(setup, out, "--with_flip")))
    assert "VAE reconstruction PSNR on 1 images" in capsys.readouterr().out

    # stats.json: everything the training scripts need.
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert stats["count"] == 9 and stats["num_skipped"] == 1  # 10 records, one corrupt
    assert stats["num_shards"] == 4  # 10 records / 3 per shard
    assert stats["latent_channels"] == 4 and stats["latent_size"] == [RES, RES]
    assert stats["scaling_factor"] == pytest.approx(0.18215) and stats["shift_factor"] == 0.0
    assert stats["crop"] == "adm_center_crop" and stats["flip"] is True and stats["resolution"] == RES
    assert stats["num_classes"] == 3 and stats["id2label"] == {"0": "cat", "1": "dog", "2": "fish"}
    assert stats["vae_name_or_path"] == str(setup / "vae") and isinstance(stats["sanity_psnr"], float)
    files = list_latent_shards(str(out))
    assert [os.path.basename(f) for f in files][0] == "latents-00000-rank000.safetensors"

    # Stored moments are the VAE posterior of the ADM-cropped image and of its mirror.
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(setup / "vae").eval()
    first = load_file(files[0])
    assert set(first) == {"latent_mean", "latent_std", "latent_mean_flip", "latent_std_flip", "class_labels"}
    x = preprocess_image(str(setup / "folder" / "cat" / "gray.png"), RES)[None]  # imagefolder order: cat/gray first
    with torch.no_grad():
        posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    torch.testing.assert_close(first["latent_mean"][0], posterior.mean[0])
    torch.testing.assert_close(first["latent_std"][0], posterior.std[0])
    torch.testing.assert_close(first["latent_mean_flip"][0], posterior.mean[1])
    assert first["class_labels"].tolist() == [0, 0, 0]

    # The stream reads the shards: moments, labels, flips picked per sample.
    args = _args("--latents_dir", out, "--resolution", RES, "--random_flip")
    stream = TrainDataStream(args, 3, seed=1, vae_config=vae.config)
    assert stream.is_latent and stream.num_classes == 3 and stream.id2label == {0: "cat", 1: "dog", 2: "fish"}
    assert stream.latent_stats["scaling_factor"] == pytest.approx(0.18215) and stream.num_examples == 9
    source = LatentSource(str(out))
    rows = {i: source.reader[i] for i in range(9)}
    batches = [b for _, b in zip(range(6), stream)]  # two epochs
    picked_flip = []
    for batch in batches:
        assert set(batch) == {"latent_mean", "latent_std", "class_labels"}
        assert batch["latent_mean"].shape == (3, 4, RES, RES) and batch["class_labels"].dtype == torch.long
        for mean, std, label in zip(batch["latent_mean"], batch["latent_std"], batch["class_labels"]):
            match = [
                (i, flip)
                for i, row in rows.items()
                for flip in (False, True)
                if torch.equal(mean, row["latent_mean_flip" if flip else "latent_mean"])
            ]
            assert len(match) == 1
            i, flip = match[0]
            assert torch.equal(std, rows[i]["latent_std_flip" if flip else "latent_std"])
            assert label == rows[i]["class_labels"]
            picked_flip.append(flip)
    assert 0 < sum(picked_flip) < len(picked_flip)

    # Exact resume on latents.
    resumed = TrainDataStream(args, 3, seed=1)
    fresh = TrainDataStream(args, 3, seed=1)
    it = iter(fresh)
    _ = [next(it) for _ in range(4)]
    resumed.load_state_dict(json.loads(json.dumps(fresh.state_dict())))
    for a, b in zip([b for _, b in zip(range(2), resumed)], batches[4:]):
        assert torch.equal(a["latent_mean"], b["latent_mean"]) and torch.equal(a["class_labels"], b["class_labels"])

    # Flips requested but not stored -> clear error.
    plain = plain_latents
    assert json.loads((plain / "stats.json").read_text())["count"] == 4
    with pytest.raises(ValueError, match="encoded without --with_flip"):
        TrainDataStream(_args("--latents_dir", plain, "--resolution", RES, "--random_flip"), 2)
    with pytest.raises(ValueError, match="encoded at 16"):
        TrainDataStream(_args("--latents_dir", plain, "--resolution", 32), 2)


def test_kill_and_resume_preprocessing(setup, script, monkeypatch):
    reference = setup / "reference"
    script.main(script.parse_args(_argv(setup, reference, "--max_samples", "8")))

    out = setup / "killed"
    real_save = script.save_latent_shard
    calls = []

    def dying_save(path, tensors, metadata):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(path)
        real_save(path, tensors, metadata)

    monkeypatch.setattr(script, "save_latent_shard", dying_save)
    with pytest.raises(KeyboardInterrupt):
        script.main(script.parse_args(_argv(setup, out, "--max_samples", "8")))
    assert not (out / "stats.json").exists()
    assert len(list_latent_shards(str(out))) == 2 and not list(out.glob("*.tmp*"))
    with pytest.raises(ValueError, match="not a finished"):
        TrainDataStream(_args("--latents_dir", out, "--resolution", RES), 2)
    mtimes = {p: os.stat(p).st_mtime_ns for p in calls}

    # Restart: completed shards are kept as they are, the rest is encoded; the result equals an uninterrupted run.
    written = []
    monkeypatch.setattr(script, "save_latent_shard", lambda p, t, m: (written.append(p), real_save(p, t, m)))
    stats = script.main(script.parse_args(_argv(setup, out, "--max_samples", "8")))
    assert {os.path.basename(p) for p in written} == {"latents-00002-rank000.safetensors"}
    assert all(os.stat(p).st_mtime_ns == t for p, t in mtimes.items())
    assert stats["count"] == 7 and stats["num_shards"] == 3  # 8 records, one corrupt
    ref_files, files = list_latent_shards(str(reference)), list_latent_shards(str(out))
    assert [os.path.basename(f) for f in ref_files] == [os.path.basename(f) for f in files]
    for a, b in zip(ref_files, files):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    # Settings that change the shard layout cannot resume into the same directory, nor another VAE encoder
    with pytest.raises(ValueError, match=r"shard_size: 3 \(there\) vs 4 \(this run\)"):
        script.main(script.parse_args(_argv(setup, out, "--max_samples", "8", "--shard_size", "4")))
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(setup / "vae")
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.01)
    other.save_pretrained(setup / "vae_retrained")  # e.g. a VAE retrained into the same folder
    with pytest.raises(ValueError, match=r"vae_encoder: .*encoder_digest.*\(there\) vs .*\(this run\)"):
        script.main(script.parse_args(_argv(setup, out, "--max_samples", "8") + ["--vae_name_or_path",
                                                                                 str(setup / "vae_retrained")]))


def test_latent_stats_mismatch_errors(plain_latents):
    stats = {"vae_name_or_path": "stabilityai/sd-vae-ft-ema", "scaling_factor": 0.18215, "shift_factor": None,
             "latent_channels": 4}  # fmt: skip
    same = dict(_tiny_vae().config, _name_or_path="stabilityai/sd-vae-ft-ema")
    check_latent_stats(stats, same)
    # Decoder-only fine-tunes share the encoder: accepted.
    check_latent_stats(stats, dict(same, _name_or_path="stabilityai/sd-vae-ft-mse"))
    with pytest.raises(ValueError, match="latent channels 4 \\(shards\\) vs 16 \\(VAE\\)"):
        check_latent_stats(stats, dict(same, latent_channels=16))
    with pytest.raises(ValueError, match="scaling_factor"):
        check_latent_stats(stats, dict(same, scaling_factor=0.3611, shift_factor=0.1159))
    with pytest.raises(ValueError, match="VAE 'stabilityai/sd-vae-ft-ema' \\(shards\\) vs 'black-forest-labs/FLUX"):
        check_latent_stats(stats, dict(same, _name_or_path="black-forest-labs/FLUX.1-dev"))
    # Through the stream: a VAE module with another latent width (the shards recorded their VAE encoder's identity)
    with pytest.raises(ValueError, match=r"vae_encoder: .*'latent_channels': 4.*\(there\) vs .*'latent_channels': 8"):
        args = _args("--latents_dir", plain_latents, "--resolution", RES)
        TrainDataStream(args, 1, vae_config=_tiny_vae(latent_channels=8))

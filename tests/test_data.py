"""Data module: decoding/cropping, the single `load_dataset` path on local data, sharding, skips and exact resume."""

import argparse
import dataclasses
import io
import json
import logging

import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_selftrans.data import (
    DataConfig,
    ImageSource,
    TrainDataStream,
    adm_center_crop,
    image_to_tensor,
    preprocess_image,
    to_rgb,
)
from diffusers_selftrans.cli import add_data_args


RES = 8
NUM_PARQUET = 12


@pytest.fixture(autouse=True)
def _no_stream_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s whenever a multi-shard shuffled parquet stream is closed (an Arrow thread-shutdown guard);
    harmless once per epoch in training, but it would dominate these tiny tests."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    argv = [str(a) for a in argv]
    if "--dataloader_num_workers" not in argv:  # the tests run alone on few cores (the default would start workers)
        argv += ["--dataloader_num_workers", "0"]
    return DataConfig.from_namespace(parser.parse_args(argv))


def _noise_image(seed, size=(20, 14), mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)


def make_imagefolder(root):
    """3 classes, 10 files: RGB, grayscale, palette, RGBA, CMYK JPEG and one corrupt file."""
    for name in ("cat", "dog", "fish"):
        (root / name).mkdir(parents=True)
    _noise_image(0).save(root / "cat" / "rgb0.png")
    _noise_image(1).convert("L").save(root / "cat" / "gray.png")
    _noise_image(2).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "cat" / "palette.png")
    _noise_image(3, mode="RGBA").save(root / "dog" / "rgba.png")
    _noise_image(4).convert("CMYK").save(root / "dog" / "cmyk.jpg")
    _noise_image(5).save(root / "dog" / "rgb1.png")
    for i in range(3):
        _noise_image(6 + i).save(root / "fish" / f"rgb{i + 2}.png")
    (root / "fish" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def make_parquet(root, num=NUM_PARQUET, corrupt=False):
    """A parquet file whose label i identifies example i (one class per example)."""
    import datasets

    images = [_noise_image(100 + i) for i in range(num)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i:02d}" for i in range(num)])}
    )
    data = {"image": images, "label": list(range(num))}
    if corrupt:
        data["image"][3] = {"bytes": b"not an image at all", "path": None}
    root.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(root / "train.parquet"))
    return root


@pytest.fixture
def imagefolder(tmp_path):
    return make_imagefolder(tmp_path / "folder")


@pytest.fixture
def parquet_dir(tmp_path):
    return make_parquet(tmp_path / "parquet")


def _stream(tmp_path, data_dir, *extra, batch_size=2, **kwargs):
    args = _args("--train_data_dir", data_dir, "--resolution", RES, "--cache_dir", tmp_path / "cache", *extra)
    return TrainDataStream(args, batch_size, **kwargs)


def _take(stream, n):
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing values
# ---------------------------------------------------------------------------------------------------------------------


def test_scale_to_minus_one_one():
    image = Image.new("RGB", (4, 4), (0, 51, 255))
    x = image_to_tensor(image)
    assert x.dtype == torch.float32 and x.shape == (3, 4, 4)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))


def test_adm_center_crop_takes_the_center_after_box_halving():
    # 3 vertical stripes (red | green | blue), 600 x 200: short side 200 >= 2*64 -> one BOX halving to 300 x 100,
    # bicubic to 192 x 64, crop columns [64, 128) = exactly the green stripe.
    array = np.zeros((200, 600, 3), dtype=np.uint8)
    array[:, :200, 0] = 255
    array[:, 200:400, 1] = 255
    array[:, 400:, 2] = 255
    out = adm_center_crop(Image.fromarray(array), 64)
    assert out.size == (64, 64)
    x = image_to_tensor(out)
    # Away from the stripe borders (bicubic support), the crop is pure green.
    inner = x[:, :, 4:60]
    torch.testing.assert_close(inner[1], torch.ones_like(inner[1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(inner[0], -torch.ones_like(inner[0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(inner[2], -torch.ones_like(inner[2]), atol=1e-6, rtol=0)

    # Tall image: the crop is vertically centred (top / bottom quarter black, middle white).
    tall = np.zeros((256, 64, 3), dtype=np.uint8)
    tall[96:160] = 255
    y = image_to_tensor(adm_center_crop(Image.fromarray(tall), 32))  # halve to 32 x 128, crop rows [48, 80)
    assert y.shape == (3, 32, 32)
    torch.testing.assert_close(y[:, 2:30], torch.ones_like(y[:, 2:30]), atol=1e-6, rtol=0)


def test_adm_center_crop_box_halving_matches_manual_recipe():
    image = _noise_image(7, size=(300, 260))
    expected = image.resize((150, 130), Image.BOX)  # 260 >= 2 * 64 -> halve once; 130 >= 128 -> halve again
    expected = expected.resize((75, 65), Image.BOX)
    expected = expected.resize((round(75 * 64 / 65), 64), Image.BICUBIC)
    left = (expected.size[0] - 64) // 2
    expected = expected.crop((left, 0, left + 64, 64))
    np.testing.assert_array_equal(np.asarray(adm_center_crop(image, 64)), np.asarray(expected))


def test_modes_convert_to_rgb():
    gray = Image.new("L", (4, 4), 100)
    assert np.all(np.asarray(to_rgb(gray)) == 100)
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.all(np.asarray(to_rgb(transparent)) == 255)  # composited on white
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert np.all(np.asarray(to_rgb(opaque)) == [10, 20, 30])
    palette = Image.new("RGB", (4, 4), (200, 40, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    np.testing.assert_array_equal(np.asarray(to_rgb(palette))[0, 0], [200, 40, 0])
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 0)).convert("CMYK").save(buffer, format="JPEG", quality=100)
    cmyk = preprocess_image(buffer.getvalue(), 8)
    assert cmyk.shape == (3, 8, 8)
    assert np.allclose((cmyk[:, 4, 4].numpy() + 1) * 127.5, [200, 40, 0], atol=6)
    with pytest.raises(OSError):
        preprocess_image(b"garbage", 8)


# ---------------------------------------------------------------------------------------------------------------------
# Local data through load_dataset
# ---------------------------------------------------------------------------------------------------------------------


def test_imagefolder_map_style_skips_and_counts(tmp_path, imagefolder, caplog):
    stream = _stream(tmp_path, imagefolder, "--max_skip_fraction", 0.2, batch_size=3)  # 1 broken of 10
    assert not stream.streaming and not stream.is_latent and stream.latent_stats is None
    assert stream.num_classes == 3 and stream.id2label == {0: "cat", 1: "dog", 2: "fish"}
    assert stream.num_examples == 10 and stream.batches_per_epoch == 3
    with caplog.at_level(logging.WARNING, logger="diffusers_selftrans.data"):
        batches = _take(stream, 3)  # 10 records, 9 decodable -> exactly 3 full batches in epoch 0
    assert stream.epoch == 0 and stream.samples_seen == 9
    assert stream.skips.num_skipped == 1 and stream.skips.num_read == 10
    assert any("corrupt.png" in r.message and "1 skipped" in r.message for r in caplog.records)
    labels = torch.cat([b["class_labels"] for b in batches])
    assert labels.dtype == torch.long and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for batch in batches:
        assert set(batch) == {"pixel_values", "class_labels"}
        x = batch["pixel_values"]
        assert x.shape == (3, 3, RES, RES) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1


def test_skip_fraction_threshold_stops(tmp_path, imagefolder):
    stream = _stream(tmp_path, imagefolder, "--max_skip_fraction", 0.05, batch_size=3, min_samples_for_skip_check=5)
    with pytest.raises(RuntimeError, match="could not be decoded"):
        _take(stream, 4)


def test_numeric_class_folders_warn(tmp_path, caplog):
    root = tmp_path / "numeric"
    for name in ("1", "2", "10"):
        (root / name).mkdir(parents=True)
        _noise_image(int(name)).save(root / name / "a.png")
    with caplog.at_level(logging.WARNING, logger="diffusers_selftrans.data"):
        stream = _stream(tmp_path, root)
    assert stream.id2label == {0: "1", 1: "10", 2: "2"}
    assert any("sorted as strings" in r.message for r in caplog.records)


def test_unconditional_data(tmp_path, imagefolder):
    # A single folder has no label column in imagefolder: one class, label 0.
    single = tmp_path / "single" / "only"
    single.mkdir(parents=True)
    for i in range(4):
        _noise_image(i).save(single / f"{i}.png")
    stream = _stream(tmp_path, tmp_path / "single", batch_size=2)
    assert stream.num_classes == 1 and stream.id2label is None
    assert _take(stream, 2)[1]["class_labels"].tolist() == [0, 0]
    # Labels present but ignored with --label_column none.
    forced = _stream(tmp_path, imagefolder, "--label_column", "none", "--max_skip_fraction", 0.2, batch_size=3)
    assert forced.num_classes == 1 and forced.id2label is None
    assert torch.cat([b["class_labels"] for b in _take(forced, 3)]).tolist() == [0] * 9


def test_bad_column_names_raise(tmp_path, parquet_dir):
    with pytest.raises(ValueError, match="--image_column 'pixels' not in"):
        _stream(tmp_path, parquet_dir, "--image_column", "pixels")
    with pytest.raises(ValueError, match="--label_column 'y' not in"):
        _stream(tmp_path, parquet_dir, "--label_column", "y")


@pytest.mark.parametrize("streaming", [False, True])
def test_two_processes_see_each_example_once_per_epoch(tmp_path, parquet_dir, streaming):
    flag = "--streaming" if streaming else "--no_streaming"
    streams = [
        _stream(tmp_path, parquet_dir, flag, batch_size=2, process_index=rank, num_processes=2, seed=3)
        for rank in range(2)
    ]
    assert all(s.streaming == streaming for s in streams)
    iterators = [iter(s) for s in streams]
    per_epoch = NUM_PARQUET // 2 // 2  # 12 examples, 2 processes, batch 2 -> 3 batches each
    epochs = []
    for _ in range(2):
        seen = [torch.cat([next(it)["class_labels"] for _ in range(per_epoch)]).tolist() for it in iterators]
        assert len(set(seen[0]) & set(seen[1])) == 0
        assert sorted(seen[0] + seen[1]) == list(range(NUM_PARQUET))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    next(iterators[0])
    assert streams[0].epoch == 2  # the counter advances when the next epoch starts


def test_map_style_drops_remainder_evenly(tmp_path):
    data = make_parquet(tmp_path / "odd", num=11)
    streams = [_stream(tmp_path, data, batch_size=2, process_index=r, num_processes=2) for r in range(2)]
    # 11 -> 10 used, 5 per process -> 2 full batches each, then epoch 1 starts.
    assert all(s.batches_per_epoch == 2 for s in streams)
    for s in streams:
        it = iter(s)
        _ = [next(it) for _ in range(2)]
        assert s.epoch == 0
        next(it)
        assert s.epoch == 1


@pytest.mark.parametrize("kind", ["parquet-map", "parquet-streaming", "imagefolder-map"])
def test_exact_resume_with_flips(tmp_path, kind):
    if kind.startswith("parquet"):
        data = make_parquet(tmp_path / "p", corrupt=True)
        extra = ["--streaming" if "streaming" in kind else "--no_streaming"]
    else:
        data, extra = make_imagefolder(tmp_path / "f"), []
    extra.extend(["--max_skip_fraction", 0.5])  # 1 broken file in 10-12: a 1 % limit would stop at the first read

    def make():
        return _stream(tmp_path, data, "--random_flip", *extra, batch_size=2, seed=5, num_processes=2, process_index=1)

    reference_stream = make()
    reference = _take(reference_stream, 8)  # crosses epoch boundaries (5 or fewer batches per epoch)

    first = make()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as saved in checkpoints
    assert state["epoch"] == first.epoch
    next(it)  # the live stream moves on; the snapshot does not
    assert first.state_dict() != state

    resumed = make()
    resumed.load_state_dict(state)
    tail = _take(resumed, 5)
    for a, b in zip(head + tail, reference):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
        assert torch.equal(a["class_labels"], b["class_labels"])
    assert resumed.samples_seen == reference_stream.samples_seen == 16
    assert resumed.epoch == reference_stream.epoch >= 1
    assert resumed.skips.num_skipped == reference_stream.skips.num_skipped

    # Flips happened, and every image is its unflipped crop or the mirror of it.
    base = _take(_stream(tmp_path, data, *extra, batch_size=2, seed=5, num_processes=2, process_index=1), 8)
    flipped = [
        not torch.equal(r["pixel_values"][i], b["pixel_values"][i])
        for r, b in zip(reference, base)
        for i in range(2)
    ]
    assert 0 < sum(flipped) < len(flipped)
    for r, b in zip(reference, base):
        for i in range(2):
            assert torch.equal(r["pixel_values"][i], b["pixel_values"][i]) or torch.equal(
                r["pixel_values"][i], b["pixel_values"][i].flip(-1)
            )


def test_save_and_load_state_files(tmp_path, parquet_dir):
    stream = _stream(tmp_path, parquet_dir, batch_size=2, process_index=1, num_processes=2)
    _take(stream, 2)
    path = stream.save_state(tmp_path / "ckpt")
    assert path.endswith("data_state_rank1.json")
    other = _stream(tmp_path, parquet_dir, batch_size=2, process_index=1, num_processes=2)
    other.load_state(tmp_path / "ckpt")
    assert other.state_dict() == stream.state_dict()
    with pytest.raises(ValueError, match="no data state for process 0"):
        _stream(tmp_path, parquet_dir, batch_size=2, process_index=0, num_processes=2).load_state(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------------------------------
# Settings: DataConfig (the library's input) mirrors add_data_args (the scripts' flags)
# ---------------------------------------------------------------------------------------------------------------------


def test_data_config_mirrors_the_flags():
    parser = add_data_args(argparse.ArgumentParser())
    fields = {field.name for field in dataclasses.fields(DataConfig)}
    # class-conditional data: every setting but the caption column is a flag
    assert {action.dest for action in parser._actions if action.dest != "help"} == fields - {"caption_column"}
    assert DataConfig.from_namespace(parser.parse_args([])) == DataConfig()  # same defaults
    # images with captions (the T2I script): --caption_column in place of the label flags and --latents_dir
    captions = add_data_args(argparse.ArgumentParser(), captions=True)
    assert {action.dest for action in captions._actions if action.dest != "help"} == fields - {
        "label_column", "num_classes", "latents_dir"}
    assert DataConfig.from_namespace(captions.parse_args([])) == DataConfig(caption_column="text")
    assert captions.parse_args(["--no-streaming"]).streaming is False  # the T2I script's old spelling still works
    args = parser.parse_args(["--train_data_dir", "d", "--resolution", "64", "--random_flip", "--no_streaming",
                              "--max_skip_fraction", "0.5", "--dataloader_num_workers", "2"])
    args.learning_rate = 1e-4  # a flag of the script, not of the data: ignored
    assert DataConfig.from_namespace(args) == DataConfig(train_data_dir="d", resolution=64, random_flip=True,
                                                         streaming=False, max_skip_fraction=0.5,
                                                         dataloader_num_workers=2)
    with pytest.raises(ValueError, match=r"lacks the data settings \[.*'resolution'.*add_data_args"):
        DataConfig.from_namespace(argparse.Namespace(dataset_name=None))


def test_library_takes_a_data_config_not_the_namespace(tmp_path, parquet_dir):
    args = add_data_args(argparse.ArgumentParser()).parse_args(["--train_data_dir", str(parquet_dir)])
    with pytest.raises(TypeError, match=r"DataConfig.from_namespace\(args\)"):
        TrainDataStream(args, 2)
    with pytest.raises(TypeError, match="Expected a DataConfig, got Namespace"):
        ImageSource(args)
    # A notebook builds the config directly and gets the batches of the equivalent flags.
    config = DataConfig(train_data_dir=str(parquet_dir), resolution=RES, cache_dir=str(tmp_path / "cache"))
    direct = _take(TrainDataStream(config, 3, seed=2), 2)
    flags = _take(_stream(tmp_path, parquet_dir, batch_size=3, seed=2), 2)
    for a, b in zip(direct, flags):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["class_labels"], b["class_labels"])


def test_decoding_workers_leave_the_global_rng_alone(tmp_path, parquet_dir):
    """A DataLoader draws its workers' base seed from the global RNG unless given a generator: a draw at every epoch
    start and at a resume (a fresh loader mid-epoch) would make a resumed run's noise differ from the straight run's."""
    stream = _stream(tmp_path, parquet_dir, "--dataloader_num_workers", 1, batch_size=2)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _take(stream, 7)  # crosses an epoch boundary: two loaders
    assert stream.epoch == 1
    assert torch.equal(torch.rand(3), expected)


def test_default_num_workers_reads_latents_in_process_and_leaves_a_core_for_training(monkeypatch):
    from diffusers_selftrans.data import default_num_workers
    from diffusers_selftrans.data.config import MAX_AUTO_NUM_WORKERS

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert default_num_workers(latents=True) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers(latents=False) == 3  # 32 cores / 8 processes - 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers(latents=False) == MAX_AUTO_NUM_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers(latents=False) == 1


def test_a_latent_row_owns_its_storage(tmp_path):
    """A row read from a shard is a copy: a view would carry (and ship to the training process) the whole shard."""
    from diffusers_selftrans.data import save_latent_shard
    from diffusers_selftrans.data.latents import _LatentReader

    shard = tmp_path / "latents-00000-rank000.safetensors"
    save_latent_shard(str(shard), {"latent_mean": torch.randn(50, 4, 8, 8), "latent_std": torch.rand(50, 4, 8, 8),
                                   "class_labels": torch.arange(50)}, {})
    item = _LatentReader([str(shard)], [0], has_flip=False)[7]
    assert item["latent_mean"].untyped_storage().nbytes() == 4 * 8 * 8 * 4 and int(item["class_labels"]) == 7

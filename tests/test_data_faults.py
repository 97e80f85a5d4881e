"""Silent data failures made loud (issue 14, items 1, 6, 14): stray files in an image folder, bad or missing labels,
and the skip count / --max_skip_fraction judged from the first read."""

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_selftrans.data import (
    MIN_SAMPLES_FOR_SKIP_CHECK,
    DataConfig,
    SkipCounter,
    TrainDataStream,
)
from diffusers_selftrans.cli import add_data_args


RES = 8
CLASSES = ("cat", "dog", "fish")
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n this is not an image"


@pytest.fixture(autouse=True)
def _no_stream_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s when a shuffled parquet stream is closed; irrelevant here (see test_data.py)."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    return DataConfig.from_namespace(parser.parse_args([str(a) for a in argv]))


def _stream(tmp_path, data_dir, *extra, batch_size=2, **kwargs):
    args = _args("--train_data_dir", data_dir, "--resolution", RES, "--cache_dir", tmp_path / "cache", *extra)
    return TrainDataStream(args, batch_size, **kwargs)


def _image(seed, size=(12, 10)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _folder(root, per_class=3, corrupt=0):
    """len(CLASSES) class folders with `per_class` images each; the first `corrupt` files (one per class in turn) are
    undecodable."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"{i}.png"
            if i * len(CLASSES) + c < corrupt:
                path.write_bytes(CORRUPT_PNG)
            else:
                _image(c * 100 + i).save(path)
    return root


def _parquet(root, labels, class_names=None):
    """A parquet file with one image per label; `class_names` makes the label column a ClassLabel."""
    import datasets

    label_feature = datasets.Value("int64") if class_names is None else datasets.ClassLabel(names=class_names)
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    data = {"image": [_image(i) for i in range(len(labels))], "label": list(labels)}
    root.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(root / "train.parquet"))
    return root


def _take(stream, n):
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# 1. Stray files next to the class folders
# ---------------------------------------------------------------------------------------------------------------------


def test_stray_root_image_is_skipped_and_the_class_folders_stay_the_labels(tmp_path, caplog):
    root = _folder(tmp_path / "data")
    _image(7).save(root / "readme.png")
    with caplog.at_level(logging.WARNING, logger="diffusers_selftrans.data"):
        stream = _stream(tmp_path, root, batch_size=3)
    assert stream.num_classes == 3 and stream.id2label == {0: "cat", 1: "dog", 2: "fish"}
    assert stream.num_examples == 9  # the stray file is not an example
    assert stream.source.stray_files == [str(root / "readme.png")]
    assert any("readme.png" in r.message and "1 file" in r.message for r in caplog.records)
    labels = torch.cat([b["class_labels"] for b in _take(stream, 3)])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_nested_below_a_class_folder_is_a_stray_too(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "dog" / "extra").mkdir()
    _image(8).save(root / "dog" / "extra" / "deep.png")
    stream = _stream(tmp_path, root)
    assert stream.num_classes == 3 and stream.num_examples == 9
    assert stream.source.stray_files == [str(root / "dog" / "extra" / "deep.png")]


def test_label_column_none_keeps_stray_files_unconditional(tmp_path):
    root = _folder(tmp_path / "data")
    _image(7).save(root / "readme.png")
    stream = _stream(tmp_path, root, "--label_column", "none")
    assert stream.num_classes == 1 and stream.num_examples == 10 and stream.source.stray_files == []


# ---------------------------------------------------------------------------------------------------------------------
# 6. Labels
# ---------------------------------------------------------------------------------------------------------------------


def test_stray_large_label_warns_about_empty_classes(tmp_path, caplog):
    data = _parquet(tmp_path / "p", [0, 1, 2, 0, 1, 999])
    with caplog.at_level(logging.WARNING, logger="diffusers_selftrans.data"):
        stream = _stream(tmp_path, data)
    assert stream.num_classes == 1000
    assert any("996 of the 1000 classes have no example" in r.message for r in caplog.records)


def test_label_outside_num_classes_is_an_error_at_start_up_naming_the_row(tmp_path):
    data = _parquet(tmp_path / "p", [0, 1, 2, 0, 1, 999])
    with pytest.raises(ValueError, match=r"row 5 .*label 999.*outside \[0, 3\)"):
        _stream(tmp_path, data, "--num_classes", 3)


def test_classlabel_with_unused_classes_warns(tmp_path, caplog):
    data = _parquet(tmp_path / "p", [0, 1, 0, 1], class_names=["a", "b", "c", "d", "e"])
    with caplog.at_level(logging.WARNING, logger="diffusers_selftrans.data"):
        stream = _stream(tmp_path, data)
    assert stream.num_classes == 5
    assert any("3 of the 5 classes have no example" in r.message and "'c'" in r.message for r in caplog.records)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_missing_integer_label_is_an_error_naming_the_row(tmp_path, num_classes):
    data = _parquet(tmp_path / "p", [0, 1, None, 2])
    extra = [] if num_classes is None else ["--num_classes", num_classes]
    with pytest.raises(ValueError, match=r"row 2 .*no label"):
        _stream(tmp_path, data, *extra)


def test_bad_label_error_names_the_image_file(tmp_path):
    # An imagefolder with a metadata file: plain integer labels, and each row knows its file.
    root = tmp_path / "files"
    root.mkdir()
    rows = []
    for i, label in enumerate([0, 7, 1]):
        _image(i).save(root / f"img{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "label": label}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"row \d \(.*img1\.png\) has label 7, outside \[0, 2\)"):
        _stream(tmp_path, root, "--num_classes", 2)


@pytest.mark.parametrize("bad", [999, None])
def test_streaming_bad_label_is_an_error_naming_the_record(tmp_path, bad):
    data = _parquet(tmp_path / "p", [0, 1, 2, 0, bad, 1])
    stream = _stream(tmp_path, data, "--streaming", "--num_classes", 3)
    with pytest.raises(ValueError, match=r"record \d+ of epoch 0 .*(outside \[0, 3\)|no label)"):
        _take(stream, 3)


# ---------------------------------------------------------------------------------------------------------------------
# 14. Skips: judged from the first read, counted in the loss log and the card
# ---------------------------------------------------------------------------------------------------------------------


def test_small_folder_with_broken_files_trips_a_one_percent_limit_at_the_first_bad_read(tmp_path):
    root = _folder(tmp_path / "data", per_class=13, corrupt=3)  # 39 images, 3 broken (7.7 %)
    stream = _stream(tmp_path, root, "--max_skip_fraction", 0.01, batch_size=4)
    assert stream.num_examples == 39
    with pytest.raises(RuntimeError, match=r"1 of the 39 images .*could not be decoded"):
        _take(stream, stream.batches_per_epoch)
    assert stream.skips.num_skipped == 1  # stopped at the first broken file, not after an epoch


def test_skip_rule_uses_the_dataset_size_when_known_and_a_minimum_sample_otherwise():
    # Known size: one bad file in the first batch of a huge dataset is far below 1 %.
    huge = SkipCounter(0.01, expected_per_epoch=1_281_167)
    huge.skip("#0", "OSError")
    for _ in range(3):
        huge.ok()
    assert huge.num_skipped == 1
    # Known size: 1 bad of 39 is already more than 1 % of the data.
    small = SkipCounter(0.01, expected_per_epoch=39)
    with pytest.raises(RuntimeError, match="could not be decoded"):
        small.skip("#0", "OSError")
    # Later epochs: the rate over everything read (the same bad file is skipped once per epoch).
    epochs = SkipCounter(0.2, expected_per_epoch=10)
    for _ in range(5):
        epochs.skip("#3", "OSError")
        for _ in range(9):
            epochs.ok()
    assert epochs.num_skipped == 5 and epochs.num_read == 50
    # Unknown size (streaming): nothing is judged before the minimum sample.
    limit = 0.5 / MIN_SAMPLES_FOR_SKIP_CHECK  # one bad file in the minimum sample is above it
    stream = SkipCounter(limit)
    stream.skip("<streamed record>", "OSError")  # 100 % of what was read, but too early to judge
    for _ in range(MIN_SAMPLES_FOR_SKIP_CHECK - 2):
        stream.ok()
    assert stream.num_read == MIN_SAMPLES_FOR_SKIP_CHECK - 1
    with pytest.raises(RuntimeError, match=f"1 of {MIN_SAMPLES_FOR_SKIP_CHECK} images could not be decoded"):
        stream.ok()
    # Unknown size, but a whole epoch was read: judged then, whatever the minimum sample.
    short = SkipCounter(0.01)
    short.skip("<streamed record>", "OSError")
    for _ in range(9):
        short.ok()
    with pytest.raises(RuntimeError, match="1 of 10 images could not be decoded"):
        short.end_of_epoch()


def test_streamed_parquet_skip_rate_is_judged_from_the_first_read(tmp_path):
    import datasets

    data = _parquet(tmp_path / "p", list(range(3)) * 4)
    table = datasets.Dataset.from_parquet(str(data / "train.parquet"))
    images = list(table.cast_column("image", datasets.Image(decode=False))["image"])
    images[5] = {"bytes": b"not an image", "path": None}
    features = table.features.copy()
    broken = datasets.Dataset.from_dict({"image": images, "label": table["label"]}, features=features)
    (tmp_path / "b").mkdir()
    broken.to_parquet(str(tmp_path / "b" / "train.parquet"))
    stream = _stream(tmp_path, tmp_path / "b", "--streaming", "--num_classes", 3, "--max_skip_fraction", 0.05)
    # the parquet footer gives the stream's size (12), so the broken record is judged against it at once; streams of
    # unknown size wait for MIN_SAMPLES_FOR_SKIP_CHECK or the end of an epoch (the SkipCounter tests above)
    assert stream.num_examples == 12
    iterator = iter(stream)
    with pytest.raises(RuntimeError, match=r"1 of the 12 images"):
        for _ in range(6):
            next(iterator)


def test_skip_count_reaches_the_loss_log_and_the_model_card(tmp_path):
    from diffusers import AutoencoderKL

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train_align

    data = _folder(tmp_path / "data", per_class=3, corrupt=1)  # 9 images, cat/0.png broken
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=8, sample_size=8,
    ).save_pretrained(tmp_path / "vae")
    (tmp_path / "model.json").write_text(json.dumps({"patch_size": 2, "num_layers": 2, "num_attention_heads": 2,
                                                     "attention_head_dim": 8}))
    out = tmp_path / "out"
    train_align.main([
        "--model", str(tmp_path / "model.json"), "--vae_name_or_path", str(tmp_path / "vae"),
        "--train_data_dir", str(data), "--cache_dir", str(tmp_path / "cache"), "--resolution", "8",
        "--train_batch_size", "4", "--max_train_steps", "3", "--checkpointing_steps", "100",
        "--validation_steps", "100", "--validation_num_inference_steps", "1", "--max_skip_fraction", "0.5",
        "--output_dir", str(out), "--report_to", "none", "--seed", "0", "--no-progress",
    ])
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    skipped = [r["data_skipped"] for r in rows]
    # 8 good images = 2 batches per epoch; step 3 starts epoch 1, so the broken file was read once or twice by then.
    assert skipped == sorted(skipped) and skipped[-1] in (1, 2)
    assert f"`data_skipped` = {skipped[-1]}" in (out / "README.md").read_text()

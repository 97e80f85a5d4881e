"""Images with captions through the shared data stream (issue 29, item 6; issue 27, item 3): the text-to-image
script's data are `TrainDataStream` batches `{"pixel_values", "captions"}`, with the decoding, checks, sharding and
exact resume of labelled data, and one caption picked at random per sample (seeded, part of the resumable state)."""

import argparse
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_selftrans.cli import add_data_args
from diffusers_selftrans.data import CaptionError, DataConfig, TrainDataStream, preprocess_image


RES = 8
NUM = 12
CAPTIONS_PER_IMAGE = 4
CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


@pytest.fixture(autouse=True)
def _no_stream_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s when a shuffled parquet stream is closed; irrelevant here (see test_data.py)."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _args(*argv):
    parser = add_data_args(argparse.ArgumentParser(), captions=True)
    argv = [str(a) for a in argv]
    if "--dataloader_num_workers" not in argv:  # the tests run alone on few cores
        argv += ["--dataloader_num_workers", "0"]
    return DataConfig.from_namespace(parser.parse_args(argv))


def _stream(tmp_path, data_dir, *extra, batch_size=2, **kwargs):
    config = _args("--train_data_dir", data_dir, "--resolution", RES, "--cache_dir", tmp_path / "cache", *extra)
    return TrainDataStream(config, batch_size, **kwargs)


def _take(stream, n):
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


def _image(i):
    rng = np.random.default_rng(1000 + i)
    return Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))


def _png(i):
    buffer = io.BytesIO()
    _image(i).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected_pixels(i):
    return preprocess_image({"bytes": _png(i), "path": None}, RES)


def _parquet(root, captions, corrupt=(), feature=None):
    """One image per entry of `captions` (image i: `_image(i)`, or undecodable for i in `corrupt`)."""
    import datasets

    if feature is None:
        feature = datasets.Sequence(datasets.Value("string")) if isinstance(captions[0], list) else datasets.Value(
            "string")
    features = datasets.Features({"image": datasets.Image(), "text": feature})
    images = [{"bytes": CORRUPT if i in corrupt else _png(i), "path": None} for i in range(len(captions))]
    root.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, "text": captions}, features=features).to_parquet(
        str(root / "train.parquet"))
    return root


def _several(num=NUM):
    """Record i has the captions 'r{i} c0' ... 'r{i} c3'."""
    return [[f"r{i} c{k}" for k in range(CAPTIONS_PER_IMAGE)] for i in range(num)]


def _record(caption):
    return int(caption.split()[0][1:])


def _imagefolder_with_metadata(root, num=6):
    """The T2I script's local format: images beside a metadata.jsonl with a `text` column."""
    root.mkdir(parents=True)
    rows = []
    for i in range(num):
        _image(i).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"r{i} only"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Captions come with their own images
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["imagefolder-metadata", "parquet-map", "parquet-streaming"])
def test_caption_data_yields_each_image_with_its_caption(tmp_path, kind):
    if kind == "imagefolder-metadata":
        data, extra, num = _imagefolder_with_metadata(tmp_path / "folder"), [], 6
    else:
        num = NUM
        data = _parquet(tmp_path / "p", [f"r{i} only" for i in range(num)])
        extra = ["--streaming" if "streaming" in kind else "--no_streaming"]
    stream = _stream(tmp_path, data, *extra, batch_size=3, seed=1)
    assert stream.caption_column == "text" and stream.num_classes is None and stream.id2label is None
    assert stream.num_examples == num
    batches = _take(stream, num // 3)  # one epoch
    seen = []
    for batch in batches:
        assert set(batch) == {"pixel_values", "captions"}
        assert batch["pixel_values"].shape == (3, 3, RES, RES) and isinstance(batch["captions"], list)
        for pixels, caption in zip(batch["pixel_values"], batch["captions"]):
            assert isinstance(caption, str) and caption.endswith(" only")
            torch.testing.assert_close(pixels, _expected_pixels(_record(caption)), rtol=0, atol=0)
            seen.append(_record(caption))
    assert sorted(seen) == list(range(num))


def test_caption_column_errors_name_the_column_or_the_conflict(tmp_path):
    data = _parquet(tmp_path / "p", [f"r{i}" for i in range(4)])
    with pytest.raises(ValueError, match=r"--caption_column 'caption' not in the dataset columns \['image', 'text'\]"):
        _stream(tmp_path, data, "--caption_column", "caption")
    config = DataConfig(train_data_dir=str(data), caption_column="text", label_column="label", resolution=RES,
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="labels or with captions, not both"):
        TrainDataStream(config, 2)
    with pytest.raises(ValueError, match="latent shards hold no captions"):
        TrainDataStream(DataConfig(latents_dir=str(tmp_path), caption_column="text"), 2)


# ---------------------------------------------------------------------------------------------------------------------
# Several captions per image: a seeded random choice per sample, resumed exactly
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_several_captions_are_picked_at_random_per_sample_and_resume_exactly(tmp_path, streaming):
    data = _parquet(tmp_path / "p", _several(), corrupt={5})
    extra = ["--streaming" if streaming else "--no_streaming", "--random_flip", "--max_skip_fraction", 0.5]

    def make(seed=5):
        return _stream(tmp_path, data, *extra, batch_size=2, seed=seed, num_processes=2, process_index=1)

    reference_stream = make()
    reference = _take(reference_stream, 10)  # crosses epoch boundaries (3 batches or fewer per epoch)
    assert reference_stream.epoch >= 2

    # Each caption is one of its image's own, and the choice varies across samples and across epochs.
    choices = {}
    for batch in reference:
        for pixels, caption in zip(batch["pixel_values"], batch["captions"]):
            record = _record(caption)
            assert caption in _several()[record]
            expected = _expected_pixels(record)
            assert torch.equal(pixels, expected) or torch.equal(pixels, expected.flip(-1))
            choices.setdefault(record, []).append(caption)
    picked = [c for cs in choices.values() for c in cs]
    assert len({c.split()[1] for c in picked}) >= 3  # not always the first caption (20 draws of 4)
    assert any(len(set(cs)) > 1 for cs in choices.values())  # a record read again may get another caption
    assert 5 not in choices  # the undecodable image is skipped

    # Seeded: the same seed gives the same captions, another seed other ones.
    assert [b["captions"] for b in _take(make(), 10)] == [b["captions"] for b in reference]
    assert [b["captions"] for b in _take(make(seed=6), 10)] != [b["captions"] for b in reference]

    # Save mid-epoch, resume in a new stream: the full sequence equals the uninterrupted one.
    first = make()
    iterator = iter(first)
    head = [next(iterator) for _ in range(4)]
    assert first.state_dict()["position"] > 0  # mid-epoch
    state_dir = tmp_path / "ckpt"
    first.save_state(state_dir)
    assert "caption_rng_state" in json.loads((state_dir / "data_state_rank1.json").read_text())
    next(iterator)  # the live stream moves on; the saved state does not
    resumed = make()
    resumed.load_state(state_dir)
    tail = _take(resumed, 6)
    for a, b in zip(head + tail, reference, strict=True):
        assert a["captions"] == b["captions"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert resumed.samples_seen == reference_stream.samples_seen
    assert resumed.skips.num_skipped == reference_stream.skips.num_skipped


def test_caption_choices_do_not_change_the_flips(tmp_path):
    """The caption choice has its own generator: the same images, flipped alike, with one or several captions."""
    one = _parquet(tmp_path / "one", [f"r{i} c0" for i in range(NUM)])
    several = _parquet(tmp_path / "several", _several())
    a = _take(_stream(tmp_path, one, "--random_flip", seed=3), 5)
    b = _take(_stream(tmp_path, several, "--random_flip", seed=3), 5)
    for x, y in zip(a, b):
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert [_record(c) for c in x["captions"]] == [_record(c) for c in y["captions"]]


# ---------------------------------------------------------------------------------------------------------------------
# Checks: bad captions are errors naming the record; undecodable images are skipped
# ---------------------------------------------------------------------------------------------------------------------


def test_a_column_of_numbers_is_an_error_naming_the_first_row(tmp_path):
    import datasets

    data = _parquet(tmp_path / "p", list(range(4)), feature=datasets.Value("int64"))
    with pytest.raises(CaptionError, match=r"row 0 \(#0\) has caption 0, not a string or a list of strings "
                                           r"\(the column holds int64 values\)"):
        _stream(tmp_path, data)


@pytest.mark.parametrize("bad, shown", [([], r"\[\]"), (None, "None"), (["ok", None], r"\['ok', None\]")])
def test_map_style_bad_caption_is_an_error_at_start_up_naming_the_row(tmp_path, bad, shown):
    captions = _several(6)
    captions[4] = bad
    data = _parquet(tmp_path / "p", captions)
    with pytest.raises(CaptionError, match=rf"Caption column 'text': row 4 \(#4\) has caption {shown}, not a string "
                                           r"or a non-empty list of strings"):
        _stream(tmp_path, data)


@pytest.mark.parametrize("bad, shown", [([], r"\[\]"), (None, "None")])
def test_streamed_bad_caption_is_an_error_naming_the_record(tmp_path, bad, shown):
    captions = _several(6)
    captions[4] = bad
    data = _parquet(tmp_path / "p", captions)
    stream = _stream(tmp_path, data, "--streaming", batch_size=2)
    with pytest.raises(ValueError, match=rf"Bad caption in record \d+ of epoch 0 read by process 0 .*has caption "
                                         rf"{shown}, not a string or a non-empty list of strings"):
        _take(stream, 3)


def test_int_caption_in_a_streamed_record_is_an_error_naming_the_record():
    """Records without a schema (any iterable of dicts): the per-record check."""
    from diffusers_selftrans.data.sources import _ImageReader

    reader = _ImageReader(None, "image", None, None, RES, caption_column="text")
    with pytest.raises(CaptionError, match=r"a\.png has caption 7, not a string or a non-empty list of strings"):
        reader[{"image": {"bytes": _png(0), "path": "a.png"}, "text": 7}]
    assert reader[{"image": {"bytes": _png(0), "path": "a.png"}, "text": ("x", "y")}]["captions"] == ["x", "y"]


@pytest.mark.parametrize("streaming", [False, True])
def test_undecodable_image_in_caption_data_is_skipped_and_counted(tmp_path, caplog, streaming):
    data = _parquet(tmp_path / "p", [f"r{i} only" for i in range(NUM)], corrupt={3})
    flag = "--streaming" if streaming else "--no_streaming"
    stream = _stream(tmp_path, data, flag, "--max_skip_fraction", 0.2, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="diffusers_selftrans.data"):
        batches = _take(stream, NUM - 1)  # one epoch: 11 decodable images
    assert sorted(_record(b["captions"][0]) for b in batches) == [i for i in range(NUM) if i != 3]
    assert stream.skips.num_skipped == 1 and stream.skips.num_read == NUM
    assert any("skipped undecodable image" in r.message for r in caplog.records)
    with pytest.raises(RuntimeError, match="could not be decoded"):  # the same limit as labelled data
        _take(_stream(tmp_path, data, flag, "--max_skip_fraction", 0.05, batch_size=1,
                      min_samples_for_skip_check=4), NUM)


# ---------------------------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_two_processes_read_disjoint_records(tmp_path, streaming):
    data = _parquet(tmp_path / "p", _several())
    flag = "--streaming" if streaming else "--no_streaming"
    streams = [_stream(tmp_path, data, flag, batch_size=2, process_index=rank, num_processes=2, seed=3)
               for rank in range(2)]
    per_epoch = NUM // 2 // 2
    seen = [[_record(c) for b in _take(s, per_epoch) for c in b["captions"]] for s in streams]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM))
    states = [s.state_dict() for s in streams]
    assert states[0]["caption_rng_state"] != states[1]["caption_rng_state"]  # a generator per process

"""README.md's training, preprocessing, conversion and sampling commands run AS WRITTEN.

The commands are read from the README's own fenced bash blocks marked `<!-- tested: tests/test_readme_commands.py -->`
and run as subprocesses (`accelerate launch examples/...`, `python -m ...`) in a temp dir. Only flags that shrink the
work are appended (`SHRINK_FLAGS`: a tiny model JSON instead of the preset, 16 px, a small global batch so an epoch is
a few steps, few samples / sampling steps, no tracker, no progress bar); nothing that bypasses the logic under test
(no --max_train_steps: the README relies on epochs, whose size comes from the dataset's metadata).

The network is replaced only at its boundary: a loopback Hub (tests/hub_server.py) behind `HF_ENDPOINT`, serving
stand-ins under the real ids: `ILSVRC/imagenet-1k` (parquet shards in the real layout, ClassLabel with 1,000 names,
the card's `dataset_info` YAML with the split sizes), `stabilityai/sd-vae-ft-ema` / `-mse` (a tiny random
AutoencoderKL), `facebook/dinov2-base` (a tiny random Dinov2Model), and for the text-to-image block
`stabilityai/stable-diffusion-3-medium-diffusers` (a tiny random StableDiffusion3Pipeline: the builder of
benchmarks/convergence_t2i.py, and a card with license fields) and `lambdalabs/naruto-blip-captions` (parquet shards
in the real layout: `image` JPEGs of varying sizes and a `text` caption, a plain card and `dataset_infos.json`). The
text-to-image script measures a run in steps (150K by default, no epochs), so its shrinking flags include
`--max_train_steps`.
"""

import argparse
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hub_server import HubServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TESTED_MARK = "<!-- tested: tests/test_readme_commands.py -->"
PYTHON_BIN = Path(sys.executable).parent

# The stand-in ImageNet: 4 classes x 6 train images (2 shards) and 4 x 2 validation images, 20 px (cropped to 16).
NUM_IMAGENET_CLASSES = 1000  # ImageNet-1k's ClassLabel has 1,000 names
STANDIN_CLASSES = 4
TRAIN_PER_CLASS = 6
TRAIN_SHARDS = 2
VALIDATION_PER_CLASS = 2
IMAGE_SIDE = 20
RESOLUTION = 16  # a 2-block VAE: 16 px -> 4 x 8 x 8 latents
# 24 train images // 16 = 1 step per epoch (a 1.5 that is not floored would show): stage 1's 40 epochs are 40 steps.
GLOBAL_BATCH = 16
TINY_MODEL = {"patch_size": 2, "num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 16}
NUM_SAMPLES = 4

# Flags appended to each README command, per program: they only shrink the work.
SHRINK_FLAGS = {
    "train_align.py": ["--model", "{tiny}", "--resolution", str(RESOLUTION), "--global_batch_size",
                       str(GLOBAL_BATCH), "--report_to", "none", "--validation_num_inference_steps", "2",
                       "--no-progress"],
    "preprocess_latents.py": ["--resolution", str(RESOLUTION), "--batch_size", str(GLOBAL_BATCH)],
    "sample_fid.py": ["--num_samples", str(NUM_SAMPLES), "--per_device_batch_size", str(NUM_SAMPLES),
                      "--num_inference_steps", "2"],
    "diffusers_selftrans.convert": ["--model", "{tiny_converted}"],
}
SHRINK_FLAGS["train_self_transcendence.py"] = SHRINK_FLAGS["train_align.py"]
# the tiny SD3 stand-in at 16 px, 2 steps of 4 images, a 2-step preview, a narrow alignment MLP
T2I_STEPS = 2
SHRINK_FLAGS["train_self_transcendence_t2i.py"] = [
    "--resolution", str(RESOLUTION), "--global_batch_size", "4", "--max_train_steps", str(T2I_STEPS),
    "--validation_num_inference_steps", "2", "--projector_dim", "16", "--report_to", "none", "--no-progress"]

# The text-to-image stand-ins: the pipeline and the captioned dataset the README's T2I block names.
SD3_REPO = "stabilityai/stable-diffusion-3-medium-diffusers"
SD3_LICENSE = {"license": "other", "license_name": "stabilityai-ai-community", "license_link": "LICENSE.md"}
CAPTIONS_REPO = "lambdalabs/naruto-blip-captions"
CAPTION_SHARDS = ("train-00000-of-00002-12944970063701d5.parquet", "train-00001-of-00002-cefa2f480689f147.parquet")
NUM_CAPTIONED = 12


# ---------------------------------------------------------------------------------------------------------------------
# README parsing


def readme_blocks(text: str):
    """(marked, commands) for every ```bash block; commands are joined over `\\` and stripped of comments."""
    blocks = []
    for match in re.finditer(r"(?:^(<!--[^\n]*-->)\n)?^```bash\n(.*?)^```", text, flags=re.M | re.S):
        marked = match.group(1) == TESTED_MARK
        joined = match.group(2).replace("\\\n", " ")
        commands = []
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
        blocks.append((marked, commands))
    return blocks


def readme_commands():
    return [cmd for marked, commands in readme_blocks(README.read_text()) if marked for cmd in commands]


def program(words):
    """The script or module a command runs: `accelerate launch examples/X.py` -> X.py, `python -m M` -> M."""
    if words[:2] == ["accelerate", "launch"]:
        return os.path.basename(next(w for w in words[2:] if w.endswith(".py")))
    if words[:2] == ["python", "-m"]:
        return words[2]
    raise AssertionError(f"README command of unknown form: {shlex.join(words)}")


def flag(words, name):
    return words[words.index(name) + 1] if name in words else None


# ---------------------------------------------------------------------------------------------------------------------
# Stand-in Hub repos


def _png(rng, label):
    pixels = (rng.random((IMAGE_SIDE, IMAGE_SIDE, 3)) * 60 + label * 60).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def imagenet_card(num_train, num_validation):
    """The dataset card: `dataset_info` (features, split sizes) and `configs` YAML, as on the real repo."""
    import yaml

    names = {str(i): f"class {i}" for i in range(NUM_IMAGENET_CLASSES)}
    meta = {
        "dataset_info": {
            "features": [{"name": "image", "dtype": "image"},
                         {"name": "label", "dtype": {"class_label": {"names": names}}}],
            "splits": [{"name": "train", "num_bytes": 0, "num_examples": num_train},
                       {"name": "validation", "num_bytes": 0, "num_examples": num_validation}],
        },
        "configs": [{"config_name": "default", "default": True, "data_files": [
            {"split": "train", "path": "data/train-*"}, {"split": "validation", "path": "data/validation-*"}]}],
    }
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# ImageNet-1k stand-in (tests)\n"


def write_parquet_split(folder, split, per_class, num_shards, rng):
    """Shards `{split}-0000i-of-0000N.parquet` with columns image {bytes, path} and a 1,000-name ClassLabel."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"class {i}" for i in range(NUM_IMAGENET_CLASSES)])})
    records = [(c, i) for i in range(per_class) for c in range(STANDIN_CLASSES)]
    for shard in range(num_shards):
        rows = records[shard::num_shards]
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": _png(rng, c), "path": f"{split}_{c}_{i}.png"} for c, i in rows],
             "label": [c for c, _ in rows]},
            features=features,
        )
        table.to_parquet(str(folder / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"))
    return len(records)


def write_captioned_dataset(repo: Path, rng) -> int:
    """`lambdalabs/naruto-blip-captions`' layout: `data/train-0000i-of-00002-<hash>.parquet` with an `image` (JPEG
    bytes, varying sizes) and a `text` caption column, `dataset_infos.json` (features, the train split's size) and a
    card without YAML metadata."""
    import datasets

    data = repo / "data"
    data.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = []
    for i in range(NUM_CAPTIONED):
        side = IMAGE_SIDE + 4 * (i % 3)
        buf = io.BytesIO()
        Image.fromarray((rng.random((side, IMAGE_SIDE, 3)) * 255).astype("uint8")).save(buf, format="JPEG")
        rows.append(({"bytes": buf.getvalue(), "path": None}, f"a ninja with {('red', 'blue', 'black')[i % 3]} hair"))
    for shard, name in enumerate(CAPTION_SHARDS):
        part = rows[shard::len(CAPTION_SHARDS)]
        datasets.Dataset.from_dict({"image": [r[0] for r in part], "text": [r[1] for r in part]},
                                   features=features).to_parquet(str(data / name))
    info = {"lambdalabs--naruto-blip-captions": {
        "features": {"image": {"decode": True, "id": None, "_type": "Image"},
                     "text": {"dtype": "string", "id": None, "_type": "Value"}},
        "splits": {"train": {"name": "train", "num_bytes": 0, "num_examples": NUM_CAPTIONED,
                             "dataset_name": "naruto-blip-captions"}}}}
    (repo / "dataset_infos.json").write_text(json.dumps(info))
    (repo / "README.md").write_text("# Dataset Card for Naruto BLIP captions (stand-in for tests)\n\n"
                                    "For each row the dataset contains `image` and `text` keys.\n")
    return NUM_CAPTIONED


def write_sd3_pipeline(repo: Path) -> None:
    """A tiny random StableDiffusion3Pipeline (the T2I tests' builder) with a card carrying the license fields."""
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import convergence_t2i

    convergence_t2i.write_tiny_t2i_pipeline(repo, "sd3")
    (repo / "README.md").write_text(f"---\n{yaml.safe_dump(SD3_LICENSE, sort_keys=False)}---\n\n"
                                    "# Stable Diffusion 3 Medium stand-in (tests)\n")


def build_hub(root: Path, *, with_card: bool = True) -> dict:
    """Write the stand-in repos under `root` (the HubServer layout); returns the numbers the tests check."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    rng = np.random.default_rng(0)
    data = root / "datasets" / "ILSVRC" / "imagenet-1k" / "data"
    data.mkdir(parents=True)
    num_train = write_parquet_split(data, "train", TRAIN_PER_CLASS, TRAIN_SHARDS, rng)
    num_validation = write_parquet_split(data, "validation", VALIDATION_PER_CLASS, 1, rng)
    if with_card:
        (data.parent / "README.md").write_text(imagenet_card(num_train, num_validation))
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=RESOLUTION)
    for name in ("sd-vae-ft-ema", "sd-vae-ft-mse"):
        vae.save_pretrained(root / "models" / "stabilityai" / name)
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=2, image_size=8))
    dino.save_pretrained(root / "models" / "facebook" / "dinov2-base")
    write_sd3_pipeline(root / "models" / SD3_REPO)
    num_captioned = write_captioned_dataset(root / "datasets" / CAPTIONS_REPO, rng)
    return {"num_train": num_train, "num_validation": num_validation, "num_captioned": num_captioned}


def hub_env(endpoint: str, hf_home: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_HOME=str(hf_home),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                                        env.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(PYTHON_BIN), env.get("PATH", "")]), OMP_NUM_THREADS="1")
    env.pop("HF_TOKEN", None)
    return env


# datasets sleeps SLEEP_TIME_ON_THREADS_SHUTDOWN (5 s) each time a parquet stream ends (apache/arrow#45214), i.e.
# once per streamed epoch: 40 + 80 + 40 epochs here. Not what is under test; the subprocesses set it to 0.
SITECUSTOMIZE = "import datasets.config\ndatasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0\n"


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: the Hub, then every marked README command in README order


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    numbers = build_hub(root)
    with HubServer(root) as server:
        yield server, numbers


def write_released_checkpoint(path: Path, tiny_config: Path):
    """A checkpoint in the released SiT format (`{"model", "ema", "opt", "args"}`, reference key names)."""
    from test_convert import TINY, reference_state_dict

    state = reference_state_dict("sit")
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(qk_norm=False)}, path)
    tiny_config.write_text(json.dumps(TINY))


@pytest.fixture(scope="module")
def readme_runs(hub, tmp_path_factory):
    """Run every marked command; returns {output_dir: (words run, CompletedProcess)} and the work dir."""
    server, _ = hub
    work = tmp_path_factory.mktemp("readme_cwd")
    (work / "examples").symlink_to(ROOT / "examples")
    tiny = work / "tiny-sit.json"
    tiny.write_text(json.dumps(TINY_MODEL))
    tiny_converted = work / "tiny-sit-converted.json"
    env = hub_env(server.endpoint, work / "hf_home")
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env["PYTHONPATH"] = os.pathsep.join([str(work / "site"), env["PYTHONPATH"]])
    runs = {}
    for words in readme_commands():
        name = program(words)
        if name == "diffusers_selftrans.convert":
            write_released_checkpoint(work / flag(words, "--checkpoint"), tiny_converted)
        extra = [w.format(tiny=tiny, tiny_converted=tiny_converted) for w in SHRINK_FLAGS[name]]
        argv = words + extra  # `python` and `accelerate` are the venv's: hub_env puts its bin/ first on PATH
        result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        runs[flag(words, "--output_dir")] = (argv, result)
        if result.returncode != 0:  # later commands depend on earlier outputs: stop at the first failure
            break
    return work, runs


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_readme_marks_runnable_blocks_without_placeholders():
    blocks = readme_blocks(README.read_text())
    marked = [cmd for is_marked, commands in blocks if is_marked for cmd in commands]
    programs = {program(words) for words in marked}
    # every kind of README command is under test: both stages, REPA, preprocessing, sampling, conversion, T2I
    assert {"train_align.py", "train_self_transcendence.py", "preprocess_latents.py", "sample_fid.py",
            "diffusers_selftrans.convert", "train_self_transcendence_t2i.py"} <= programs
    assert any(flag(words, "--alignment") == "repa" for words in marked)
    for words in marked:
        assert "..." not in words, f"placeholder in a tested block: {shlex.join(words)}"
        assert "--max_train_steps" not in words


def test_every_marked_command_exits_zero(readme_runs):
    _, runs = readme_runs
    for output_dir, (argv, result) in runs.items():
        assert result.returncode == 0, f"{shlex.join(argv)}\n--- stderr ---\n{result.stderr[-6000:]}"
    assert len(runs) == len(readme_commands())


def _trainings(readme_runs):
    work, runs = readme_runs
    for output_dir, (argv, result) in runs.items():
        if program(argv) in ("train_align.py", "train_self_transcendence.py") and result.returncode == 0:
            yield work / output_dir, argv


def test_training_steps_are_epochs_of_the_metadata_size(readme_runs, hub):
    """Stage 1 (40 epochs) and stage 2 (80) of the stand-in's 24 train images (its card says so) at batch 16."""
    _, numbers = hub
    from train_align import STAGE1_EPOCHS
    from train_self_transcendence import STAGE2_EPOCHS

    epochs = {"train_align.py": STAGE1_EPOCHS, "train_self_transcendence.py": STAGE2_EPOCHS}
    seen = set()
    for out, argv in _trainings(readme_runs):
        steps_per_epoch = numbers["num_train"] // GLOBAL_BATCH
        rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(1, epochs[program(argv)] * steps_per_epoch + 1)), out
        args = json.loads((out / "args.json").read_text())  # the resolved run: steps from the epochs, not a flag
        assert "--max_train_steps" not in args["launch_command"] and args["num_train_epochs"] == epochs[program(argv)]
        assert args["steps_per_epoch"] == steps_per_epoch
        assert args["max_train_steps"] == epochs[program(argv)] * steps_per_epoch
        seen.add(out.name)
    assert {"sit-b2-guiding", "sit-b2-selftrans"} <= seen


def test_trainings_write_complete_pipeline_folders(readme_runs):
    found = 0
    for out, argv in _trainings(readme_runs):
        found += 1
        index = json.loads((out / "model_index.json").read_text())
        assert index["_class_name"] == ["pipeline_sit", "SiTPipeline"]  # the remote code it carries by default
        for sub in ("transformer", "vae", "scheduler"):
            assert (out / sub).is_dir()
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        card = (out / "README.md").read_text()
        assert "accelerate launch examples/" in card
        config = json.loads((out / "transformer" / "config.json").read_text())
        assert config["num_layers"] == TINY_MODEL["num_layers"] and config["num_classes"] == NUM_IMAGENET_CLASSES
    assert found >= 4  # stage 1, stage 2, from latents, REPA


def test_preprocessed_latents_cover_the_train_split(readme_runs, hub):
    work, runs = readme_runs
    _, numbers = hub
    out = next(work / d for d, (argv, _) in runs.items() if program(argv) == "preprocess_latents.py")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["count"] == numbers["num_train"] and stats["num_classes"] == NUM_IMAGENET_CLASSES


def test_sampling_writes_the_npz(readme_runs):
    work, runs = readme_runs
    out = next(work / d for d, (argv, _) in runs.items() if program(argv) == "sample_fid.py")
    npz = list(out.glob("*.npz"))
    assert len(npz) == 1
    with np.load(npz[0]) as data:
        assert data["arr_0"].shape == (NUM_SAMPLES, RESOLUTION, RESOLUTION, 3) and data["arr_0"].dtype == np.uint8
    info = json.loads((out / "sampling_info.json").read_text())
    assert info["sampling"]["num_samples"] == NUM_SAMPLES and info["sampling"]["sampler"] == "SiTEulerMaruyamaScheduler"


def test_conversion_writes_a_loadable_transformer(readme_runs):
    from diffusers_selftrans import SiTTransformer2DModel

    work, runs = readme_runs
    out = next(work / d for d, (argv, _) in runs.items() if program(argv) == "diffusers_selftrans.convert")
    model = SiTTransformer2DModel.from_pretrained(out)
    assert model.config.learn_sigma is True and model.config.num_layers == 4


def test_t2i_stages_write_sd3_pipelines(readme_runs, hub):
    """The README's text-to-image block: stage 1 (the VAE-alignment term) then stage 2 guided by it, on the SD3
    stand-in and the captioned dataset, each ending as a StableDiffusion3Pipeline folder with the base's license."""
    work, runs = readme_runs
    outputs = {flag(argv, "--stage"): work / d for d, (argv, result) in runs.items()
               if program(argv) == "train_self_transcendence_t2i.py" and result.returncode == 0}
    assert set(outputs) == {"1", "2"}
    for stage, out in outputs.items():
        rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(1, T2I_STEPS + 1))
        term = "loss_vae_align" if stage == "1" else "loss_guide"
        assert all(np.isfinite(row["loss"]) and row[term] > 0 for row in rows), (stage, rows)
        args = json.loads((out / "args.json").read_text())
        assert (args["dataset_name"], args["caption_column"]) == (CAPTIONS_REPO, "text")
        assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        card = (out / "README.md").read_text()
        assert all(f"{key}: {value}" in card for key, value in SD3_LICENSE.items()), card[:600]
    assert json.loads((outputs["2"] / "args.json").read_text())["guiding_model_name_or_path"] == "t2i-stage1"


def test_hub_stand_in_was_used_for_every_repo(readme_runs, hub):
    """The commands really went through the loopback Hub (no silent local fallback) for data, VAE and encoder."""
    server, _ = hub
    paths = " ".join(path for _, path, status in server.requests if status in (200, 206))
    for repo in ("ILSVRC/imagenet-1k", "stabilityai/sd-vae-ft-ema", "facebook/dinov2-base", SD3_REPO, CAPTIONS_REPO):
        assert repo in paths
    assert any(status == 206 for _, _, status in server.requests)  # parquet read with Range requests


# ---------------------------------------------------------------------------------------------------------------------
# The epoch size from metadata, without the README (unit level)


def test_generator_stream_has_no_size_and_steps_from_epochs_names_the_flag():
    import datasets

    from diffusers_selftrans import training as T
    from diffusers_selftrans.data import streamed_num_examples

    def records():
        for i in range(5):
            yield {"image": {"bytes": b"", "path": f"{i}.png"}, "label": 0}

    stream = datasets.IterableDataset.from_generator(records)
    assert streamed_num_examples(stream, "train") is None
    with pytest.raises(ValueError, match="--max_train_steps"):
        T.steps_from_epochs(40, None, GLOBAL_BATCH, "--max_train_steps")
    assert T.steps_from_epochs(40, 24, GLOBAL_BATCH, "--max_train_steps") == 40  # floor(24 / 16) = 1 per epoch
    with pytest.raises(ValueError, match="fewer than one global batch"):
        T.steps_from_epochs(40, 8, GLOBAL_BATCH, "--max_train_steps")


def test_streamed_webdataset_without_metadata_is_an_error_naming_the_flag(hub, tmp_path):
    """A webdataset tar has no split sizes and no parquet footers: epochs cannot become steps, the error says why."""
    import tarfile

    import train_align

    server, _ = hub
    rng = np.random.default_rng(0)
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(4):
            for ext, payload in (("png", _png(rng, i % 2)), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    argv = ["--model", str(tmp_path / "tiny.json"), "--train_data_dir", str(tar_path), "--streaming",
            "--num_classes", "2", "--resolution", str(RESOLUTION), "--global_batch_size", "2",
            "--vae_name_or_path", str(server.root / "models" / "stabilityai" / "sd-vae-ft-ema"),
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--no-progress"]
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_MODEL))
    with pytest.raises(ValueError, match=r"dataset size is unknown.*--max_train_steps"):
        train_align.main(argv)


def test_streamed_parquet_without_card_counts_rows_in_the_footers(hub, tmp_path):
    """Local parquet shards (no card, no split sizes) streamed: num_examples is the footers' num_rows."""
    from diffusers_selftrans.data import DataConfig, ImageSource, parquet_num_rows

    server, numbers = hub
    data = server.root / "datasets" / "ILSVRC" / "imagenet-1k" / "data"
    shards = sorted(data.glob("train-*.parquet"))
    assert len(shards) == TRAIN_SHARDS
    assert sum(parquet_num_rows(str(f)) for f in shards) == numbers["num_train"]
    folder = tmp_path / "parquet"
    folder.mkdir()
    for f in shards:
        (folder / f.name).symlink_to(f)
    config = DataConfig(train_data_dir=str(folder), streaming=True, cache_dir=str(tmp_path / "cache"),
                        resolution=RESOLUTION)
    source = ImageSource(config)
    assert source.streaming and source.num_examples == numbers["num_train"]

"""Evaluation: balanced seeded plans, rank partitions, resumable PNG sampling, ADM npz, FID, classifier metrics."""

import json
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from PIL import Image

from diffusers_selftrans import evaluation
from diffusers_selftrans.evaluation import (
    class_accuracy,
    class_balanced_plan,
    compute_fid,
    create_npz_from_sample_folder,
    evaluate_samples,
    frechet_distance,
    generate_samples,
    load_images,
    partition_plan,
    precision_recall,
    sampling_info,
    to_uint8_nchw,
    to_uint8_nhwc,
    train_feature_classifier,
    write_sampling_info,
)


class FakePipeline:
    """Duck-typed SiTPipeline: each image depends only on its own generator and class label."""

    def __init__(self, size=8, channels=3):
        self.size, self.channels = size, channels
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        self.calls = []

    def __call__(self, class_labels, guidance_scale=1.0, guidance_interval=(0.0, 1.0), num_inference_steps=50,
                 generator=None, latents=None, output_type="pil", return_dict=True):
        assert isinstance(generator, list) and len(generator) == len(class_labels)
        self.calls.append(dict(labels=list(class_labels), guidance_scale=guidance_scale,
                               guidance_interval=guidance_interval, steps=num_inference_steps, output_type=output_type))
        images = [torch.rand(self.size, self.size, self.channels, generator=g) * 0.5 + label / 20.0
                  for label, g in zip(class_labels, generator)]
        return SimpleNamespace(images=torch.stack(images).clamp(0, 1).numpy())


class FlattenFeatures(torch.nn.Module):
    """A fixed random projection of the pixels: a feature extractor that needs no download."""

    def __init__(self, in_features, num_features=16):
        super().__init__()
        self.num_features = num_features
        self.proj = torch.nn.Linear(in_features, num_features)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return self.proj(images.float().flatten(1) / 255)


@pytest.fixture
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a busy shared CPU they run ~10x slower with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_folder(folder):
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------------------------------


def test_class_balanced_plan_is_exact_and_seeded():
    plan = class_balanced_plan(103, 10, seed=3)
    assert [e.index for e in plan] == list(range(103))
    counts = Counter(e.class_label for e in plan)
    assert sorted(counts) == list(range(10)) and sorted(counts.values()) == [10] * 7 + [11] * 3
    assert len({e.seed for e in plan}) == 103 and all(0 <= e.seed < 2**63 for e in plan)
    assert plan == class_balanced_plan(103, 10, seed=3)
    other = class_balanced_plan(103, 10, seed=4)
    assert [e.class_label for e in other] != [e.class_label for e in plan]
    assert {e.seed for e in other}.isdisjoint({e.seed for e in plan})
    # labels are shuffled, not sorted blocks
    assert [e.class_label for e in plan] != sorted(e.class_label for e in plan)
    # seeds depend on (seed, index) only: a longer plan with the same seed keeps them
    longer = class_balanced_plan(500, 10, seed=3)
    assert [e.seed for e in longer[:103]] == [e.seed for e in plan]
    with pytest.raises(ValueError, match="num_classes"):
        class_balanced_plan(10, 0, seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 40])
def test_partition_covers_every_index_once(world_size):
    plan = class_balanced_plan(37, 5, seed=0)
    parts = [partition_plan(plan, rank, world_size) for rank in range(world_size)]
    drawn = [e for part in parts for e in part]
    assert sorted(e.index for e in drawn) == list(range(37))
    assert {e.index: e for e in drawn} == {e.index: e for e in plan}  # same labels and seeds whatever the split
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        partition_plan(plan, world_size, world_size)


# ---------------------------------------------------------------------------------------------------------------------
# sampling, PNGs, npz, JSON
# ---------------------------------------------------------------------------------------------------------------------


def test_generate_samples_deterministic_across_batch_and_world_size_and_resumes(tmp_path):
    plan = class_balanced_plan(10, 4, seed=1)
    pipe = FakePipeline()
    written = generate_samples(pipe, plan, str(tmp_path / "a"), batch_size=4, guidance_scale=1.5,
                               guidance_interval=(0.1, 0.7), num_inference_steps=12, progress=False)
    assert sorted(written) == list(range(10))
    reference = read_folder(tmp_path / "a")
    assert sorted(reference) == [f"{i:06d}.png" for i in range(10)]
    assert all(img.shape == (8, 8, 3) and img.dtype == np.uint8 for img in reference.values())
    assert [len(c["labels"]) for c in pipe.calls] == [4, 4, 2]
    assert pipe.calls[0]["guidance_scale"] == 1.5 and tuple(pipe.calls[0]["guidance_interval"]) == (0.1, 0.7)
    assert pipe.calls[0]["steps"] == 12 and pipe.calls[0]["output_type"] == "np"
    assert [lab for c in pipe.calls for lab in c["labels"]] == [e.class_label for e in plan]

    # three ranks, batch 3, same images
    for rank in range(3):
        generate_samples(FakePipeline(), plan, str(tmp_path / "b"), batch_size=3, rank=rank, world_size=3,
                         guidance_scale=1.5, guidance_interval=(0.1, 0.7), num_inference_steps=12, progress=False)
    other = read_folder(tmp_path / "b")
    assert sorted(other) == sorted(reference)
    assert all(np.array_equal(other[name], reference[name]) for name in reference)

    # resume: only the missing files are drawn again, identical to before
    os.remove(tmp_path / "a" / "000003.png")
    os.remove(tmp_path / "a" / "000007.png")
    pipe = FakePipeline()
    written = generate_samples(pipe, plan, str(tmp_path / "a"), batch_size=4, guidance_scale=1.5,
                               guidance_interval=(0.1, 0.7), num_inference_steps=12, progress=False)
    assert written == [3, 7] and sum(len(c["labels"]) for c in pipe.calls) == 2
    resumed = read_folder(tmp_path / "a")
    assert all(np.array_equal(resumed[name], reference[name]) for name in reference)
    assert not [n for n in os.listdir(tmp_path / "a") if not n.endswith(".png") or len(n) != 10]  # no temp files left


def test_npz_and_sampling_info(tmp_path):
    plan = class_balanced_plan(6, 3, seed=0)
    folder = str(tmp_path / "samples")
    generate_samples(FakePipeline(size=4), plan, folder, batch_size=6, progress=False)
    labels = [e.class_label for e in plan]
    npz_path = create_npz_from_sample_folder(folder, 6, labels=labels)
    assert npz_path == str(tmp_path / "samples.npz")
    with np.load(npz_path) as data:
        assert data["arr_0"].shape == (6, 4, 4, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].tolist() == labels
        assert np.array_equal(data["arr_0"][2], np.asarray(Image.open(os.path.join(folder, "000002.png"))))
    assert np.array_equal(load_images(npz_path), load_images(folder))
    with pytest.raises(FileNotFoundError, match="1 of 7 samples are missing"):
        create_npz_from_sample_folder(folder, 7)

    for scheduler, nfe in ((FlowMatchEulerDiscreteScheduler(shift=1.0), 12), (FlowMatchHeunDiscreteScheduler(), 23)):
        info = sampling_info(SimpleNamespace(scheduler=scheduler), num_samples=6, num_classes=3, seed=0,
                             num_inference_steps=12, guidance_scale=1.8, guidance_interval=(0.0, 0.7))
        assert info["sampler"] == type(scheduler).__name__ and info["nfe"] == nfe
    path = write_sampling_info(npz_path, info, {"fid": 1.5})
    record = json.loads(open(path).read())
    assert path == str(tmp_path / "sampling_info.json") and record["npz"] == "samples.npz"
    assert record["metrics"] == {"fid": 1.5}
    assert record["sampling"]["guidance_interval"] == [0.0, 0.7] and record["sampling"]["guidance_scale"] == 1.8
    assert record["sampling"]["num_samples"] == 6 and record["sampling"]["seed"] == 0


def test_image_conversion():
    x = np.array([0.0, 0.5, 0.999, 1.0, 1.2, -0.1], dtype=np.float32).reshape(1, 1, 6, 1).repeat(3, -1)
    out = to_uint8_nhwc(x)
    assert out.dtype == np.uint8 and out[0, 0, :, 0].tolist() == [0, 127, 254, 255, 255, 0]  # truncation, clamped
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    assert torch.equal(to_uint8_nchw(nchw), to_uint8_nchw(x)) and to_uint8_nchw(nchw).shape == (1, 3, 1, 6)
    pil = [Image.fromarray(out[0])]
    assert np.array_equal(to_uint8_nhwc(pil), out)
    assert to_uint8_nchw(np.zeros((2, 5, 5), np.uint8)).shape == (2, 1, 5, 5)
    with pytest.raises(ValueError, match="channel-last"):
        to_uint8_nchw(np.zeros((2, 3, 5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        to_uint8_nchw(-torch.ones(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------


def test_fid_with_feature_module(one_thread):
    from scipy import linalg

    rng = np.random.default_rng(0)
    real = rng.integers(0, 200, size=(120, 6, 6, 3), dtype=np.uint8)
    shifted = (real.astype(np.int64) + 40).clip(0, 255).astype(np.uint8)
    extractor = FlattenFeatures(6 * 6 * 3)
    assert abs(compute_fid(real, real, feature_extractor=extractor, batch_size=50)) < 1e-6
    fid = compute_fid(real, shifted, feature_extractor=extractor, batch_size=50)

    # reference: the textbook formula with scipy
    with torch.no_grad():
        a = extractor(to_uint8_nchw(real)).double().numpy()
        b = extractor(to_uint8_nchw(shifted)).double().numpy()
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert fid > 1.0 and fid == pytest.approx(expected, rel=1e-4)
    # same images given as float NCHW tensors
    as_float = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255
    assert compute_fid(as_float, shifted, feature_extractor=extractor) == pytest.approx(fid, rel=1e-4)


def test_precision_recall_known_sets():
    real = torch.arange(0.0, 10.0).unsqueeze(1)  # 1-D points 0..9: k=1 balls of radius 1
    inside = torch.tensor([[0.0], [0.5], [1.0], [1.5]])  # k=1 balls of radius 0.5: cover real 0, 1, 2
    far = torch.tensor([[20.0], [21.0], [22.0], [23.0]])
    assert precision_recall(real, real, k=1) == {"precision": 1.0, "recall": 1.0}
    pr = precision_recall(real, inside, k=1)
    assert pr["precision"] == 1.0 and pr["recall"] == pytest.approx(0.3)
    assert precision_recall(real, far, k=1) == {"precision": 0.0, "recall": 0.0}
    torch.testing.assert_close(frechet_distance(real, real + 2.0), 4.0, rtol=1e-6, atol=1e-6)


def synthetic_digits(num_per_class, num_classes=4, size=16, seed=0):
    """Class c = a bright square in quadrant c, plus noise: separable, uint8 NHWC."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), num_per_class)
    images = rng.integers(0, 60, size=(len(labels), size, size, 3)).astype(np.uint8)
    half = size // 2
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, r * half : (r + 1) * half, c * half : (c + 1) * half] += 150
    return images, labels


def test_feature_classifier_trains_caches_and_evaluates(tmp_path, one_thread):
    images, labels = synthetic_digits(24)
    kwargs = dict(seed=0, cache_dir=str(tmp_path), epochs=6, batch_size=16, num_features=16, width=8)
    classifier = train_feature_classifier(images, labels, **kwargs)
    assert not classifier.loaded_from_cache and os.path.isfile(classifier.cache_path)
    test_images, test_labels = synthetic_digits(10, seed=1)
    assert class_accuracy(classifier, test_images, test_labels) >= 0.95
    assert classifier.train_accuracy >= 0.95
    mtime = os.path.getmtime(classifier.cache_path)

    again = train_feature_classifier(images, labels, **kwargs)
    assert again.loaded_from_cache and again.cache_path == classifier.cache_path
    assert os.path.getmtime(again.cache_path) == mtime and len(os.listdir(tmp_path)) == 1
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    # another hyper-parameter or other data: another cache entry
    changed = train_feature_classifier(images, labels, **{**kwargs, "epochs": 1})
    assert not changed.loaded_from_cache and changed.cache_path != classifier.cache_path

    # features: penultimate layer, any input size and channel count
    with torch.no_grad():
        assert classifier(to_uint8_nchw(test_images[:3])).shape == (3, 16)
        assert classifier(torch.rand(2, 1, 32, 32)).shape == (2, 16)

    result = evaluate_samples(images, labels, test_images, test_labels, classifier)
    assert result["num_real"] == 96 and result["num_fake"] == 40
    assert result["accuracy"] >= 0.95 and result["real_accuracy"] >= 0.95
    wrong = evaluate_samples(images, labels, test_images, (test_labels + 1) % 4, classifier)
    assert wrong["accuracy"] <= 0.05
    assert evaluate_samples(images, None, images, labels, classifier)["fid"] == pytest.approx(0.0, abs=1e-6)
    blank = np.zeros_like(test_images)
    assert evaluate_samples(images, labels, blank, test_labels, classifier)["fid"] > result["fid"]


def test_missing_inception_weights_error_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    images = np.zeros((2, 8, 8, 3), np.uint8)
    expected = os.path.join(
        str(tmp_path / "torch_home"), "hub", "checkpoints", "weights-inception-2015-12-05-6726825d.pth"
    )
    with pytest.raises(FileNotFoundError) as error:
        compute_fid(images, images)
    assert expected in str(error.value) and "pip install torch-fidelity" in str(error.value)
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        compute_fid(images, images, inception_weights=missing)
    # weights present but torch-fidelity absent: a clear ImportError naming the extra
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(evaluation.metrics, "_torch_fidelity_available", lambda: False)
    with pytest.raises(ImportError, match=r"diffusers-selftrans\[metrics\]"):
        compute_fid(images, images, inception_weights=str(weights))


# ---------------------------------------------------------------------------------------------------------------------
# examples/sample_fid.py end to end (tiny SiTPipeline, feature-classifier metrics, resume)
# ---------------------------------------------------------------------------------------------------------------------


def load_sample_fid_script():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "sample_fid.py")
    spec = importlib.util.spec_from_file_location("sample_fid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_fid_parse_args_validates():
    script = load_sample_fid_script()
    args = script.parse_args(["--pipeline_name_or_path", "p", "--output_dir", "o"])
    assert (args.sampler, args.num_inference_steps, args.num_samples) == ("sde", 250, 50_000)
    assert args.guidance_interval == [0.0, 1.0] and args.guidance_scale == 1.0 and not args.antialias
    with pytest.raises(ValueError, match="guidance_interval"):
        script.parse_args(["--pipeline_name_or_path", "p", "--output_dir", "o", "--guidance_interval", "0.8", "0.2"])
    with pytest.raises(SystemExit):
        script.parse_args(["--pipeline_name_or_path", "p", "--output_dir", "o", "--sampler", "dpm"])
    assert type(script.build_scheduler("heun")).__name__ == "FlowMatchHeunDiscreteScheduler"
    assert type(script.build_scheduler("sde")).__name__ == "SiTEulerMaruyamaScheduler"


def test_sample_fid_end_to_end_and_resume(tmp_path, tiny_sit, one_thread):
    from diffusers import AutoencoderKL

    from diffusers_selftrans import SiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16).eval()
    SiTPipeline(tiny_sit, vae, FlowMatchEulerDiscreteScheduler(shift=1.0)).save_pretrained(tmp_path / "pipe")

    # real images and a feature classifier (10 classes, as the tiny SiT)
    images, labels = synthetic_digits(3, num_classes=10)
    os.makedirs(tmp_path / "real")
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "real" / f"{i:03d}.png")
    classifier = train_feature_classifier(images, labels, num_classes=10, cache_dir=str(tmp_path / "clf"), epochs=1,
                                          batch_size=16, num_features=4, width=4)

    script = load_sample_fid_script()
    argv = ["--pipeline_name_or_path", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "eval"),
            "--num_samples", "5", "--per_device_batch_size", "2", "--sampler", "euler", "--num_inference_steps", "2",
            "--guidance_scale", "1.5", "--guidance_interval", "0.0", "0.7", "--seed", "3",
            "--ref_batch", str(tmp_path / "real"), "--feature_classifier", classifier.cache_path]
    script.main(script.parse_args(argv))

    with np.load(tmp_path / "eval" / "samples.npz") as data:
        arr, arr_labels = data["arr_0"], data["arr_1"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    assert arr_labels.tolist() == [e.class_label for e in class_balanced_plan(5, 10, seed=3)]
    record = json.loads((tmp_path / "eval" / "sampling_info.json").read_text())
    sampling, metrics = record["sampling"], record["metrics"]
    assert sampling["sampler"] == "FlowMatchEulerDiscreteScheduler" and sampling["nfe"] == 2
    assert sampling["guidance_scale"] == 1.5 and sampling["guidance_interval"] == [0.0, 0.7]
    assert sampling["num_samples"] == 5 and sampling["seed"] == 3 and sampling["num_classes"] == 10
    assert 0.0 <= metrics["class_accuracy"] <= 1.0 and metrics["feature_fid"] > 0
    assert metrics["num_fake"] == 5 and metrics["num_real"] == 30

    # one image drawn directly from the pipeline with the plan's seed matches the PNG
    entry = class_balanced_plan(5, 10, seed=3)[4]
    pipe = SiTPipeline.from_pretrained(tmp_path / "pipe")
    direct = pipe(class_labels=[entry.class_label], guidance_scale=1.5, guidance_interval=(0.0, 0.7),
                  num_inference_steps=2, generator=[torch.Generator().manual_seed(entry.seed)], output_type="np").images
    np.testing.assert_array_equal(to_uint8_nhwc(direct)[0], arr[4])

    # resume: existing PNGs are kept, a missing one is drawn again identically
    png = tmp_path / "eval" / "samples" / "000001.png"
    kept = tmp_path / "eval" / "samples" / "000000.png"
    mtime = os.path.getmtime(kept)
    os.remove(png)
    script.main(script.parse_args(argv))
    assert os.path.getmtime(kept) == mtime
    with np.load(tmp_path / "eval" / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], arr)
    # other sampling settings into the same folder are refused
    with pytest.raises(ValueError, match=r"guidance_scale: 1\.5 \(there\) vs 2\.0 \(this run\)"):
        script.main(script.parse_args(argv[:-4] + ["--guidance_scale", "2.0"]))
    # so is a model retrained into the same folder: its path is the same, its weights are not
    with torch.no_grad():
        next(tiny_sit.parameters()).add_(0.01)
    SiTPipeline(tiny_sit, vae, FlowMatchEulerDiscreteScheduler(shift=1.0)).save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"transformer_digest: \w+ \(there\) vs \w+ \(this run\)"):
        script.main(script.parse_args(argv))


def test_inception_extractor_uses_only_the_public_forward(tmp_path, monkeypatch):
    """torchmetrics' NoTrainInceptionV3 stood in for by a tiny net with the same public surface (forward returns the
    first listed feature; `fc` and `Mixed_6d.branch1x1` are layers): no private method is needed, and the logits are
    torch-fidelity's unbiased ones, `pool @ fc.weight.T`."""
    import torchmetrics.image.fid

    class TinyInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path, antialias):
            super().__init__()
            assert features_list == ["2048"] and not antialias
            self.Mixed_6d = torch.nn.Module()
            self.Mixed_6d.branch1x1 = torch.nn.Conv2d(3, 8, 1)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x):
            spatial = self.Mixed_6d.branch1x1(x.float())
            return spatial.mean(dim=(2, 3))[:, :4]

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", TinyInception)
    monkeypatch.setattr(evaluation.metrics, "_torch_fidelity_available", lambda: True)
    extractor = evaluation.InceptionFeatureExtractor(str(weights))
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = extractor(images)
    torch.testing.assert_close(out["logits"], out["pool"] @ extractor.net.fc.weight.T)
    assert out["pool"].shape == (2, 4) and out["spatial"].shape == (2, 7 * 6 * 6)

"""SiTPipeline: equality with REPA's samplers, guidance interval, labels, outputs, save/load, Hub and remote code."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from diffusers_selftrans import SiTEulerMaruyamaScheduler, SiTPipeline, SiTTransformer2DModel
from diffusers_selftrans.pipelines import pipeline_sit


ID2LABEL = {
    0: "tench, Tinca tinca",
    1: "goldfish, Carassius auratus",
    2: "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    3: "tiger shark, Galeocerdo cuvieri",
    4: "crane",
    5: "crane",  # ImageNet really has two "crane" classes (bird 134, machine 517)
    6: "stingray",
    7: "cock",
    8: "hen",
    9: "ostrich, Struthio camelus",
}
SCHEDULERS = {
    "euler": FlowMatchEulerDiscreteScheduler,
    "heun": FlowMatchHeunDiscreteScheduler,
    "sde": SiTEulerMaruyamaScheduler,
}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: threading only costs on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    config = dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    return AutoencoderKL(**{**config, **overrides}).eval()


def make_pipe(transformer, scheduler="euler", id2label=ID2LABEL, vae=None) -> SiTPipeline:
    scheduler = SCHEDULERS[scheduler]() if isinstance(scheduler, str) else scheduler
    pipe = SiTPipeline(transformer, vae or tiny_vae(), scheduler, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(batch, seed=0, size=8):
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


class RecordingTransformer(ModelMixin, ConfigMixin):
    """Velocity (label + 1) for a real class and 0 for the null class; records every call's times and labels."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 4, num_classes: int = 10, class_dropout_prob: float = 0.1):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, hidden_states, timestep, class_labels, return_dict=True):
        self.calls.append((timestep.clone(), class_labels.clone()))
        value = torch.where(class_labels == self.config.num_classes, 0.0, class_labels.float() + 1)
        return (value.reshape(-1, 1, 1, 1) * self.scale * torch.ones_like(hidden_states),)


# ----------------------------------------------------------------------------- REPA reference samplers
# Written from REPA `samplers.py` as summarised in method-notes §2.2: float64 state, CFG with labels [y, null] only
# when guidance_low <= t_cur <= guidance_high (also for Heun's corrector), SDE guidance applied to the drift.


def _model_fn(transformer):
    def fn(x, t, y):
        t_in = torch.full((x.shape[0],), float(t), dtype=torch.float32)
        return transformer(x.float(), t_in, y).sample.double()

    return fn


def repa_euler_sampler(model, latents, y, num_steps, heun, cfg_scale, guidance_low, guidance_high, null_class):
    y_null = torch.full_like(y, null_class)
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)

    def velocity(x, t, use_cfg):
        if not use_cfg:
            return model(x, t, y)
        cond, uncond = model(torch.cat([x, x]), t, torch.cat([y, y_null])).chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        use_cfg = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        d_cur = velocity(x_cur, t_cur, use_cfg)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_prime = velocity(x_next, t_next, use_cfg)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def repa_euler_maruyama_sampler(model, latents, y, num_steps, cfg_scale, guidance_low, guidance_high, null_class, generator):
    y_null = torch.full_like(y, null_class)
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x_next = latents.to(torch.float64)

    def drift(x, t):
        use_cfg = cfg_scale > 1.0 and guidance_low <= t <= guidance_high
        x_in = torch.cat([x, x]) if use_cfg else x
        v = model(x_in, t, torch.cat([y, y_null]) if use_cfg else y)
        score = (-(1 - t) * v - x_in) / t  # linear path: var_t = t
        d = v - 0.5 * (2 * t) * score
        if use_cfg:
            d_cond, d_uncond = d.chunk(2)
            d = d_uncond + cfg_scale * (d_cond - d_uncond)
        return d

    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        x_cur = x_next
        eps = torch.randn(x_cur.shape, generator=generator).to(torch.float64)  # REPA: randn_like per step
        x_next = x_cur + drift(x_cur, t_cur) * dt + torch.sqrt(2 * t_cur) * torch.sqrt(dt.abs()) * eps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur)  # deterministic mean step to 0


@pytest.mark.parametrize("name", ["euler", "heun", "sde"])
def test_matches_repa_samplers(tiny_sit, name):
    num_steps, cfg_scale, interval = 6, 3.0, (0.3, 0.7)  # grid t = 1, 5/6, ..., 1/6: CFG on for 2/3, 1/2, 1/3
    labels = torch.tensor([1, 3])
    latents = initial_latents(2)
    pipe = make_pipe(tiny_sit, name)
    out = pipe(
        class_labels=labels.tolist(), guidance_scale=cfg_scale, guidance_interval=interval,
        num_inference_steps=num_steps, latents=latents, generator=torch.Generator().manual_seed(42), output_type="latent",
    ).images
    model = _model_fn(tiny_sit)
    if name == "sde":
        ref = repa_euler_maruyama_sampler(
            model, latents, labels, num_steps, cfg_scale, *interval, null_class=10,
            generator=torch.Generator().manual_seed(42),
        )
    else:
        ref = repa_euler_sampler(model, latents, labels, num_steps, name == "heun", cfg_scale, *interval, null_class=10)
    # Equal up to float32 rounding: REPA keeps a float64 state, diffusers' schedulers step in float32.
    assert out.dtype == torch.float32 and out.shape == latents.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    # and the guidance really mattered at this scale
    unguided = pipe(class_labels=labels.tolist(), num_inference_steps=num_steps, latents=latents,
                    generator=torch.Generator().manual_seed(42), output_type="latent").images
    assert (unguided - out).abs().max() > 1e-3


# ----------------------------------------------------------------------------- guidance interval and NFE


@pytest.mark.parametrize(
    "name, expected_calls",
    [
        # Euler, N = 10, t = 1.0, 0.9, ..., 0.1; interval [0.2, 0.55]: guided at 0.5, 0.4, 0.3, 0.2
        ("euler", [(k / 10, k in (5, 4, 3, 2)) for k in range(10, 0, -1)]),
        # Heun: predictor at t_i, corrector at t_{i+1} guided iff t_i is inside (REPA); last interval Euler only
        ("heun", [(t / 10, k in (5, 4, 3, 2)) for k in range(10, 0, -1) for t in ([k, k - 1] if k > 1 else [k])]),
        # SDE, N = 10: t = linspace(1, 0.04, 10) -> 1.0, 0.893, ..., 0.253, 0.147, 0.04
        ("sde", [(t, 0.2 <= t <= 0.55) for t in np.linspace(1, 0.04, 10)]),
    ],
)
def test_guidance_interval_switches_cfg(name, expected_calls):
    transformer = RecordingTransformer()
    pipe = make_pipe(transformer, name, vae=tiny_vae())
    pipe(class_labels=[2, 5], guidance_scale=2.0, guidance_interval=(0.2, 0.55), num_inference_steps=10,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    assert len(transformer.calls) == len(expected_calls)  # NFE: N (Euler, SDE), 2N - 1 (Heun)
    for (t, labels), (t_expected, guided) in zip(transformer.calls, expected_calls):
        assert torch.allclose(t, torch.full_like(t, t_expected), atol=1e-6)
        if guided:  # one batched pass: [y, null]
            assert labels.tolist() == [2, 5, 10, 10]
        else:  # one conditional pass, no wasted compute
            assert labels.tolist() == [2, 5]


def test_guidance_scale_one_and_full_interval():
    transformer = RecordingTransformer()
    pipe = make_pipe(transformer, "heun")
    pipe(class_labels=[1], guidance_scale=1.0, num_inference_steps=4, output_type="latent")
    assert len(transformer.calls) == 7 and all(len(y) == 1 for _, y in transformer.calls)
    transformer.calls.clear()
    pipe(class_labels=[1], guidance_scale=1.5, guidance_interval=(0.0, 1.0), num_inference_steps=4, output_type="latent")
    assert len(transformer.calls) == 7 and all(y.tolist() == [1, 10] for _, y in transformer.calls)


def test_cfg_all_channels_and_legacy_three_channels():
    # One Euler step from t=1 to 0: x_out = x - v. Conditional velocity = label + 1, unconditional = 0.
    transformer = RecordingTransformer(sample_size=2)
    pipe = make_pipe(transformer, "euler")
    latents = torch.zeros(1, 4, 2, 2)
    kw = dict(class_labels=[3], guidance_scale=2.5, num_inference_steps=1, latents=latents, output_type="latent")
    out = pipe(**kw).images
    torch.testing.assert_close(out, torch.full_like(latents, -2.5 * 4))
    legacy = pipe(**kw, legacy_cfg_channels=3).images
    torch.testing.assert_close(legacy[:, :3], torch.full((1, 3, 2, 2), -2.5 * 4))
    torch.testing.assert_close(legacy[:, 3:], torch.full((1, 1, 2, 2), -4.0))  # conditional prediction



@pytest.mark.parametrize("scale", [0.5, 0.0, -1.0, 1.5])
def test_every_finite_guidance_scale_follows_the_cfg_formula(scale):
    # uncond + w (cond - uncond) for any finite w: 0 < w < 1 interpolates, 0 is unconditional, w < 0 extrapolates away.
    transformer = RecordingTransformer(sample_size=2)
    pipe = make_pipe(transformer, "euler")
    latents = torch.zeros(1, 4, 2, 2)
    out = pipe(class_labels=[3], guidance_scale=scale, num_inference_steps=1, latents=latents,
               output_type="latent").images
    torch.testing.assert_close(out, torch.full_like(latents, -scale * 4))  # cond velocity 4, uncond 0
    assert transformer.calls[0][1].tolist() == [3, 10]  # one batched [y, null] pass


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_scale_is_refused(tiny_sit, scale):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        make_pipe(tiny_sit)(class_labels=[1], guidance_scale=scale, num_inference_steps=1)


# ----------------------------------------------------------------------------- determinism, batches, outputs


def test_determinism_and_batch_equals_singles(tiny_sit):
    pipe = make_pipe(tiny_sit, "sde")
    kw = dict(guidance_scale=2.0, guidance_interval=(0.0, 0.7), num_inference_steps=4, output_type="latent")
    seeds, labels = (3, 4, 5), [0, 6, 9]
    batch = pipe(class_labels=labels, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    singles = torch.cat([
        pipe(class_labels=[y], generator=[torch.Generator().manual_seed(s)], **kw).images for y, s in zip(labels, seeds)
    ])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    again = pipe(class_labels=labels, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    assert torch.equal(batch, again)
    single_gen = pipe(class_labels=labels, generator=torch.Generator().manual_seed(3), **kw).images
    assert torch.equal(single_gen, pipe(class_labels=labels, generator=torch.Generator().manual_seed(3), **kw).images)
    assert not torch.allclose(single_gen, batch)


def test_samples_in_eval_mode_and_restores_train_mode(tiny_sit):
    pipe = make_pipe(tiny_sit, "euler")
    kw = dict(class_labels=[1, 2, 3, 4], num_inference_steps=2, output_type="latent")
    expected = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    tiny_sit.train()  # label dropout would replace some labels by the null class
    assert torch.equal(pipe(**kw, generator=torch.Generator().manual_seed(0)).images, expected)
    assert tiny_sit.training


def test_end_to_end_images_and_notebook_call(tiny_sit):
    pipe = make_pipe(tiny_sit, "euler")
    # the notebook path: names and ids mixed, CFG with an interval
    out = pipe(class_labels=["tench", 7], guidance_scale=4.0, guidance_interval=(0.0, 0.7), num_inference_steps=3,
               generator=torch.Generator().manual_seed(0))
    assert isinstance(out, ImagePipelineOutput) and len(out.images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) and im.mode == "RGB" for im in out.images)
    arrays = pipe(class_labels=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert arrays.shape == (1, 16, 16, 3) and 0 <= arrays.min() and arrays.max() <= 1
    (tensors,) = pipe(class_labels="goldfish", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="pt", return_dict=False)
    assert tensors.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(tensors.permute(0, 2, 3, 1).numpy(), arrays, atol=1e-6)  # same seed, same image


def test_decode_reads_scaling_and_shift_from_the_vae_config(tiny_sit):
    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.1)
    pipe = make_pipe(tiny_sit, "euler", vae=vae)
    kw = dict(class_labels=[2], num_inference_steps=2)
    latents = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    images = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pt").images
    with torch.no_grad():
        expected = vae.decode(latents / 0.5 + 0.1).sample
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_callback_on_step_end(tiny_sit):
    pipe = make_pipe(tiny_sit, "heun")
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        seen.append((i, float(t)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == p.num_timesteps - 1 else {}

    out = pipe(class_labels=[1], num_inference_steps=3, callback_on_step_end=callback, output_type="latent").images
    assert [i for i, _ in seen] == list(range(5))
    np.testing.assert_allclose([t for _, t in seen], [1000, 2000 / 3, 2000 / 3, 1000 / 3, 1000 / 3], rtol=1e-5)
    assert torch.equal(out, torch.zeros(1, 4, 8, 8))


# ----------------------------------------------------------------------------- labels and input errors


def test_label_resolution(tiny_sit):
    pipe = make_pipe(tiny_sit)
    assert pipe.get_label_ids("tench") == [0]  # a bare string is one label, not characters
    assert pipe.get_label_ids("  Tinca TINCA ") == [0]  # synonyms, case and spaces
    assert pipe.get_label_ids("tench, Tinca tinca") == [0]  # the full entry
    assert pipe.get_label_ids(["man-eater", 7, "Ostrich"]) == [2, 7, 9]
    assert pipe.get_label_ids(torch.tensor([3, 4])) == [3, 4]
    assert pipe.get_label_ids(np.int64(5)) == [5]
    assert pipe.labels["goldfish"] == 1 and "crane" not in pipe.labels
    with pytest.raises(ValueError, match=r"Unknown class name 'tenchh'.*Close matches: \['tench'"):
        pipe.get_label_ids(["tenchh"])
    with pytest.raises(ValueError, match=r"'crane' is ambiguous: it names 4 \('crane'\), 5 \('crane'\)"):
        pipe.get_label_ids("crane")
    with pytest.raises(ValueError, match=r"Class id 10 is outside \[0, 10\)"):
        pipe.get_label_ids([1, 10])
    with pytest.raises(ValueError, match="outside"):
        pipe.get_label_ids(-1)
    with pytest.raises(ValueError, match="ints or names"):
        pipe.get_label_ids([True])
    with pytest.raises(ValueError, match="non-empty"):
        pipe.get_label_ids([])
    with pytest.raises(ValueError, match="no `id2label`"):
        make_pipe(tiny_sit, id2label=None).get_label_ids("tench")
    with pytest.raises(ValueError, match="class_labels is required"):
        pipe(num_inference_steps=1)


def test_id2label_defaults_to_the_transformer_config(tiny_sit_config):
    transformer = SiTTransformer2DModel(**tiny_sit_config, id2label={str(k): v for k, v in ID2LABEL.items()}).eval()
    pipe = make_pipe(transformer, id2label=None)
    assert pipe.id2label == ID2LABEL and pipe.get_label_ids("Carassius auratus") == [1]
    assert make_pipe(transformer, id2label={0: "zero"}).id2label == {0: "zero"}  # an explicit one wins


def test_unconditional_model_needs_no_labels():
    transformer = RecordingTransformer(num_classes=1)
    pipe = make_pipe(transformer, id2label=None)
    out = pipe(num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1, 2)], output_type="latent")
    assert out.images.shape == (3, 4, 4, 4) and transformer.calls[0][1].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(guidance_interval=(0.8, 0.2)), "0 <= low <= high <= 1"),
        (dict(guidance_interval=(-0.1, 0.5)), "0 <= low <= high <= 1"),
        (dict(guidance_interval=(0.0, 1.2)), "0 <= low <= high <= 1"),
        (dict(guidance_interval=(0.5,)), "0 <= low <= high <= 1"),
        (dict(num_inference_steps=0), "positive integer"),
        (dict(output_type="jpg"), "output_type"),
        (dict(legacy_cfg_channels=5), "legacy_cfg_channels"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents must have shape \(1, 4, 8, 8\)"),
        (dict(generator=[torch.Generator()] * 2), "2 generators for 1 class labels"),
        (dict(callback_on_step_end_tensor_inputs=["velocity"]), "not in"),
    ],
)
def test_input_errors(tiny_sit, kwargs, message):
    pipe = make_pipe(tiny_sit)
    with pytest.raises(ValueError, match=message):
        pipe(class_labels=[1], num_inference_steps=kwargs.pop("num_inference_steps", 1), **kwargs)


def test_guidance_needs_a_null_class(tiny_sit_config):
    transformer = SiTTransformer2DModel(**{**tiny_sit_config, "class_dropout_prob": 0.0}).eval()
    with pytest.raises(ValueError, match="null class"):
        make_pipe(transformer)(class_labels=[1], guidance_scale=2.0, num_inference_steps=1)


# ----------------------------------------------------------------------------- saving and loading


def _latents_of(pipe, **kw):
    kw = {"class_labels": [1, "tiger shark"], "guidance_scale": 2.0, "guidance_interval": (0.0, 0.7),
          "num_inference_steps": 3, "output_type": "latent", "generator": torch.Generator().manual_seed(7), **kw}
    return pipe(**kw).images


def test_save_load_round_trip(tiny_sit, tmp_path):
    pipe = make_pipe(tiny_sit, SiTEulerMaruyamaScheduler(diffusion_scale=0.7))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "SiTPipeline"
    assert index["transformer"] == ["diffusers_selftrans.models.transformer_sit", "SiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers_selftrans.schedulers.scheduling_sit_euler_maruyama", "SiTEulerMaruyamaScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["id2label"]["0"] == "tench, Tinca tinca"  # JSON keys are strings

    loaded = SiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.id2label == ID2LABEL  # int keys again
    assert loaded.get_label_ids("Galeocerdo cuvieri") == [3]
    assert isinstance(loaded.scheduler, SiTEulerMaruyamaScheduler) and loaded.scheduler.config.diffusion_scale == 0.7
    assert isinstance(loaded.transformer, SiTTransformer2DModel)
    torch.testing.assert_close(_latents_of(loaded), _latents_of(pipe), atol=1e-6, rtol=1e-6)


def test_hub_id_goes_through_snapshot_download(tiny_sit, tmp_path):
    pipe = make_pipe(tiny_sit, "heun")
    pipe.save_pretrained(tmp_path)
    with mock.patch.object(pipeline_sit, "snapshot_download", return_value=str(tmp_path)) as fake:
        loaded = SiTPipeline.from_pretrained("someone/sit-tiny", revision="v1")
    fake.assert_called_once_with("someone/sit-tiny", revision="v1")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, FlowMatchHeunDiscreteScheduler) and loaded.id2label == ID2LABEL
    torch.testing.assert_close(_latents_of(loaded), _latents_of(pipe), atol=1e-6, rtol=1e-6)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "diffusers_selftrans":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, Block())
    try:
        import diffusers_selftrans  # noqa: F401
        raise SystemExit("diffusers_selftrans is importable: the test would prove nothing")
    except ModuleNotFoundError:
        pass

    import torch
    from diffusers import DiffusionPipeline

    folder, out_path = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert "diffusers_selftrans" not in sys.modules
    latents = pipe(class_labels=[1, "tiger shark"], guidance_scale=2.0, guidance_interval=(0.0, 0.7),
                   num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(7)).images
    torch.save({"latents": latents, "classes": [type(pipe).__name__, type(pipe.transformer).__name__,
                                                type(pipe.scheduler).__name__], "id2label": pipe.id2label}, out_path)
    """
)


def test_remote_code_loads_without_the_package(tiny_sit, tmp_path):
    folder = tmp_path / "pipe"
    pipe = make_pipe(tiny_sit, "sde")
    pipe.save_pretrained(folder, save_remote_code=True)

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_sit", "SiTPipeline"]
    assert index["transformer"] == ["transformer_sit", "SiTTransformer2DModel"]
    assert index["scheduler"] == ["scheduling_sit_euler_maruyama", "SiTEulerMaruyamaScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    # the transformer module ships verbatim; the others have their package-relative imports inlined
    source = (folder / "transformer" / "transformer_sit.py").read_text()
    assert source == open(sys.modules[SiTTransformer2DModel.__module__].__file__).read()
    for path in (folder / "pipeline_sit.py", folder / "scheduler" / "scheduling_sit_euler_maruyama.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and not node.module.startswith("diffusers_selftrans"), ast.dump(node)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("diffusers_selftrans") for a in node.names)

    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    out_path = tmp_path / "remote.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, str(script), str(folder), str(out_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(out_path)
    assert remote["classes"] == ["SiTPipeline", "SiTTransformer2DModel", "SiTEulerMaruyamaScheduler"]
    assert remote["id2label"] == ID2LABEL
    torch.testing.assert_close(remote["latents"], _latents_of(pipe), atol=1e-6, rtol=1e-6)

    # with the package installed, SiTPipeline loads the same folder with the installed classes, no remote code
    local = SiTPipeline.from_pretrained(folder)
    local.set_progress_bar_config(disable=True)
    assert type(local.transformer) is SiTTransformer2DModel and type(local.scheduler) is SiTEulerMaruyamaScheduler
    torch.testing.assert_close(_latents_of(local), _latents_of(pipe), atol=1e-6, rtol=1e-6)


def test_save_remote_code_then_push(tiny_sit, tmp_path, monkeypatch):
    uploaded = {}

    def fake_upload(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False):
        uploaded.update(repo_id=repo_id, files=sorted(os.listdir(working_dir)))

    monkeypatch.setattr(pipeline_sit, "create_repo", lambda repo_id, **kw: mock.Mock(repo_id=f"me/{repo_id}"))
    monkeypatch.setattr(SiTPipeline, "_upload_folder", fake_upload)
    make_pipe(tiny_sit).save_pretrained(tmp_path / "sit", save_remote_code=True, push_to_hub=True)
    assert uploaded["repo_id"] == "me/sit" and "pipeline_sit.py" in uploaded["files"]
    with pytest.raises(ValueError, match="save_pretrained"):
        make_pipe(tiny_sit).save_remote_code(tmp_path / "empty")

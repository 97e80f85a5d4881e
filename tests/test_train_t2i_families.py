"""`examples/train_self_transcendence_t2i.py` end to end on tiny offline Sana and Flux pipelines (issue 27, items 1 and
2; `benchmarks/convergence_t2i.py`'s builder: Sana with a random Gemma 2, its `AutoencoderDC` and flow DPM-Solver++;
Flux with CLIP + T5, a shifted and scaled `AutoencoderKL`, packed 2x2 latent tokens and embedded guidance): stage 1
then stage 2 on it, each output loaded into its diffusers pipeline and sampled, what the pipelines feed the
transformer at sampling time against what the script trains on (time, text, ids, guidance), and an exact resume."""

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence_t2i  # noqa: E402  (the tiny pipeline builder)
import train_self_transcendence_t2i as t2i  # noqa: E402
from test_train_t2i import NUM_IMAGES, assert_same_weights, flags, read_losses, weights  # noqa: E402

FAMILIES = ("sana", "flux")
PIPELINE_CLASS = {"sana": "SanaPipeline", "flux": "FluxPipeline"}
# SanaPipeline samples only sides divisible by 32 (its tiny AutoencoderDC: 4x down, 8 x 8 latents); Flux: 16 px.
RESOLUTION = {"sana": convergence_t2i.SANA_RESOLUTION, "flux": 16}
PROMPTS = ["a handwritten seven", "the digit 2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_family_assets")
    for family in FAMILIES:
        convergence_t2i.write_tiny_t2i_pipeline(root / f"pipe_{family}", family)
    data = root / "data"  # as test_train_t2i's: 20 px noise images, digit captions
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(NUM_IMAGES):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": convergence_t2i.caption_for(i % 3, i)}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def run_flags(assets, family, output_dir, **extra):
    return flags(assets, family, output_dir, **dict({"resolution": RESOLUTION[family]}, **extra))


@pytest.fixture(scope="module")
def stage1(assets):
    out = {}
    for family in FAMILIES:
        out[family] = assets / f"stage1_{family}"
        t2i.main(run_flags(assets, family, out[family], stage=1, validation_steps=4))
    return out


@pytest.fixture(scope="module")
def stage2(assets, stage1):
    out = {}
    for family in FAMILIES:
        out[family] = assets / f"stage2_{family}"
        t2i.main(run_flags(assets, family, out[family], guiding_model_name_or_path=stage1[family], guide_stop_step=2,
                           precompute_text_embeddings=True, validation_steps=2))
    return out


def sample_recording(family, folder):
    """The output folder through its pipeline (2 steps, CFG on for Sana), recording every transformer call's
    keywords."""
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASS[family]).from_pretrained(folder)
    calls = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({**kwargs, "hidden_states": args[0] if args else
                                                   kwargs["hidden_states"]}), with_kwargs=True)
    kwargs = {"use_resolution_binning": False} if family == "sana" else {}  # its bins start at 512 px
    images = pipe(prompt=PROMPTS, height=RESOLUTION[family], width=RESOLUTION[family], num_inference_steps=2,
                  guidance_scale=2.0, max_sequence_length=16, output_type="np",
                  generator=torch.Generator().manual_seed(0), **kwargs).images
    return pipe, images, calls


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_then_stage2_export_pipelines_that_sample(stage1, stage2, family):
    losses = read_losses(stage1[family])
    assert sorted(losses) == [1, 2, 3, 4]
    for row in losses.values():  # the VAE-alignment term, weight 0.5, at every step
        assert np.isfinite(row["loss"]) and row["loss_vae_align"] > 0
        assert row["loss"] == pytest.approx(row["loss_diff"] + 0.5 * row["loss_vae_align"], rel=1e-5)
    assert (stage1[family] / "samples.png").is_file()  # the final preview
    guided = read_losses(stage2[family])
    assert guided[1]["loss_guide"] > 0 and guided[2]["loss_guide"] > 0
    assert "loss_guide" not in guided[3] and "loss_guide" not in guided[4]
    assert (stage2[family] / "samples" / "step-0000002.png").is_file()  # a preview from the cached embeddings
    for out in (stage1[family], stage2[family]):
        assert_same_weights(out / "transformer", out / "checkpoint-4" / "transformer_ema")
        pipe, images, _ = sample_recording(family, out)
        assert type(pipe).__name__ == PIPELINE_CLASS[family]
        assert images.shape == (2, RESOLUTION[family], RESOLUTION[family], 3) and np.isfinite(images).all()
    assert str(stage1[family]) in (stage2[family] / "README.md").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_feeds_the_transformer_what_training_does(assets, stage1, family):
    """At sampling time each pipeline calls the transformer with our `model_timestep` of its sigma (Sana:
    1000 t * timestep_scale, truncated to an integer by DPM-Solver's int64 timesteps; Flux: t), the caption
    embeddings `encode_captions` trains on (Sana: instruction-prefixed prompts, the plain empty negative prompt:
    the script's `null`), and for Flux the packed tokens, `img_ids` / `txt_ids` of `static_kwargs` and the guidance
    value."""
    from diffusers_selftrans.models.block_features import model_timestep

    pipe, _, calls = sample_recording(family, stage1[family])
    sigmas = pipe.scheduler.sigmas[:2]
    assert len(calls) == 2
    for call, sigma in zip(calls, sigmas):
        expected = model_timestep(pipe.transformer, sigma.reshape(1)).expand(call["timestep"].shape)
        tolerance = pipe.transformer.config.timestep_scale if family == "sana" else 1e-6
        assert torch.all((call["timestep"].float() - expected).abs() < tolerance), (call["timestep"], expected)
    caps = t2i.encode_captions(family, pipe, PROMPTS, "cpu", 16)
    null = t2i.encode_captions(family, pipe, [""], "cpu", 16, negative=True)
    first = calls[0]
    n, c, h, w = 2, pipe.vae.config.latent_channels, 8, 8
    if family == "sana":  # CFG batch: [negative; prompts]
        expected = torch.cat([null["encoder_hidden_states"].expand(2, -1, -1), caps["encoder_hidden_states"]])
        torch.testing.assert_close(first["encoder_hidden_states"], expected)
        mask = torch.cat([null["encoder_attention_mask"].expand(2, -1), caps["encoder_attention_mask"]])
        assert torch.equal(first["encoder_attention_mask"], mask)
        assert first["hidden_states"].shape == (2 * n, c, h, w)
        plain = t2i.encode_captions(family, pipe, PROMPTS, "cpu", 16, negative=True)
        assert not torch.allclose(plain["encoder_hidden_states"], caps["encoder_hidden_states"])  # the instruction
    else:
        torch.testing.assert_close(first["encoder_hidden_states"], caps["encoder_hidden_states"])
        torch.testing.assert_close(first["pooled_projections"], caps["pooled_projections"])
        x0 = t2i.pack(family, torch.zeros(n, c, h, w))
        assert first["hidden_states"].shape == x0.shape == (n, h * w // 4, 4 * c)
        static = t2i.static_kwargs(family, pipe.transformer, (n, c, h, w), "cpu", torch.float32, 16)
        assert torch.equal(first["img_ids"], static["img_ids"]) and torch.equal(first["txt_ids"], static["txt_ids"])
        assert torch.equal(first["guidance"], torch.full((n,), 2.0))
        # training feeds the guidance value FluxPipeline samples with by default
        default = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
        assert t2i.parse_args(run_flags(assets, family, assets / "unused", stage=1)).flux_guidance_scale == default


def test_flux_stage1_resumes_exactly(assets, stage1, tmp_path):
    """Stopped at checkpoint 2 and resumed: the same losses (alignment term included) and final weights (transformer,
    EMA, the modulated packed-token head) as the straight run."""
    out = tmp_path / "resumed"
    t2i.main(run_flags(assets, "flux", out, stage=1, max_train_steps=2, validation_steps=4))
    t2i.main(run_flags(assets, "flux", out, stage=1, validation_steps=4, resume_from_checkpoint="latest"))
    straight, resumed = read_losses(stage1["flux"]), read_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in straight:
        for key in ("loss", "loss_diff", "loss_vae_align", "lr"):
            assert resumed[step][key] == straight[step][key], (step, key)
    for sub in ("transformer", "transformer_ema", "projector"):
        assert_same_weights(out / "checkpoint-4" / sub, stage1["flux"] / "checkpoint-4" / sub)
    assert_same_weights(out / "transformer", stage1["flux"] / "transformer")
    assert weights(out / "transformer").keys() == weights(stage1["flux"] / "transformer").keys()


def test_resolutions_the_pipelines_cannot_sample_are_refused_before_training(assets, tmp_path):
    with pytest.raises(ValueError, match="Flux packs 2x2 patches: use a multiple of 4"):
        t2i.main(run_flags(assets, "flux", tmp_path / "flux", stage=1, resolution=6))  # 3 x 3 latents
    with pytest.raises(ValueError, match="SanaPipeline samples only sides divisible by 32"):
        t2i.main(run_flags(assets, "sana", tmp_path / "sana", stage=1, resolution=16))

"""`examples/train_self_transcendence_t2i.py` end to end on tiny offline Sana, Flux, Lumina 2, Wan, Z-Image, Flux.2
[klein] and Qwen-Image pipelines (issue 27, items 1, 2 and 5; `benchmarks/convergence_t2i.py`'s builder: Sana with a
random Gemma 2, its `AutoencoderDC` and flow DPM-Solver++; Flux with CLIP + T5, a shifted and scaled `AutoencoderKL`,
packed 2x2 latent tokens and embedded guidance; Lumina 2 with a random Gemma 2 behind its system prompt, right-padded
caption masks, reversed time; Wan with UMT5 and `AutoencoderKLWan`, images as 1-frame videos; Z-Image with Qwen3 and
per-sample caption lists; Flux.2 [klein] with stacked Qwen3 layers, BatchNorm-normalised 2x2-patchified latents, 4-D
ids; Qwen-Image with a random Qwen2.5-VL behind its prompt template, captions padded with a mask,
`AutoencoderKLQwenImage` 1-frame latents packed 2x2, true CFG): stage 1 then stage 2 on it, each output loaded into its
diffusers pipeline and sampled, what the pipelines feed the transformer at sampling time against what the script trains
on (time, text, ids, guidance), and an exact resume."""

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence_t2i  # noqa: E402  (the tiny pipeline builder)
import train_self_transcendence_t2i as t2i  # noqa: E402
from test_train_t2i import (  # noqa: E402
    assert_same_weights, flags, read_losses, weights, write_captioned_images)

FAMILIES = ("sana", "flux", "lumina2", "wan", "zimage", "flux2", "qwenimage")
PIPELINE_CLASS = {"sana": "SanaPipeline", "flux": "FluxPipeline", "lumina2": "Lumina2Pipeline",
                  "wan": "WanPipeline", "zimage": "ZImagePipeline", "flux2": "Flux2KleinPipeline",
                  "qwenimage": "QwenImagePipeline"}
# SanaPipeline samples only sides divisible by 32 (its tiny AutoencoderDC: 4x down, 8 x 8 latents); Flux: 16 px;
# Lumina2Pipeline: sides divisible by 16 with an 8x VAE (4 x 4 latents); WanPipeline: sides divisible by 16 (1 x 4 x 4);
# QwenImagePipeline: sides divisible by 16 with its 8x VAE (1 x 4 x 4 latents at 32 px, 2 x 2 packed tokens).
RESOLUTION = {"sana": convergence_t2i.SANA_RESOLUTION, "flux": 16, "lumina2": convergence_t2i.LUMINA2_RESOLUTION,
              "wan": convergence_t2i.WAN_RESOLUTION, "zimage": 16, "flux2": 16,
              "qwenimage": convergence_t2i.QWENIMAGE_RESOLUTION}
# Text tokens: 16, except Lumina 2 whose system prompt alone is ~180 characters (character-level tokenizer)
TEXT_LENGTH = {"lumina2": convergence_t2i.TINY_LUMINA2_LENGTH, "zimage": convergence_t2i.TINY_ZIMAGE_LENGTH,
               "flux2": convergence_t2i.TINY_FLUX2_LENGTH, "qwenimage": convergence_t2i.TINY_QWENIMAGE_LENGTH}
# Transformer calls per sampling step: Lumina2Pipeline, WanPipeline, Flux2KleinPipeline and QwenImagePipeline (true
# CFG) run the conditional and unconditional branches separately.
CALLS_PER_STEP = {"lumina2": 2, "wan": 2, "flux2": 2, "qwenimage": 2}
PROMPTS = ["a handwritten seven", "the digit 2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_family_assets")  # each family's pipeline: written by `run_flags` when used
    write_captioned_images(root / "data")  # as test_train_t2i's: 20 px noise images, digit captions
    return root


class PerFamily(dict):
    """A family's runs, made the first time a test asks for them (`-k <family>` runs that family's only)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, family):
        self[family] = self.make(family)
        return self[family]


def run_flags(assets, family, output_dir, **extra):
    if not (assets / f"pipe_{family}").is_dir():
        convergence_t2i.write_tiny_t2i_pipeline(assets / f"pipe_{family}", family)
    return flags(assets, family, output_dir, **dict({"resolution": RESOLUTION[family],
                                                      "max_sequence_length": TEXT_LENGTH.get(family, 16)}, **extra))


@pytest.fixture(scope="module")
def stage1(assets):
    def run(family):
        t2i.main(run_flags(assets, family, assets / f"stage1_{family}", stage=1, validation_steps=4))
        return assets / f"stage1_{family}"

    return PerFamily(run)


@pytest.fixture(scope="module")
def stage2(assets, stage1):
    def run(family):
        t2i.main(run_flags(assets, family, assets / f"stage2_{family}", guiding_model_name_or_path=stage1[family],
                           guide_stop_step=2, precompute_text_embeddings=True, validation_steps=2))
        return assets / f"stage2_{family}"

    return PerFamily(run)


def sample_recording(family, folder):
    """The output folder through its pipeline (2 steps, CFG on for Sana), recording every transformer call's
    keywords."""
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASS[family]).from_pretrained(folder)
    calls = []  # every call's arguments by name (Z-Image's pipeline passes them positionally; its prompt list is
    # templated in place: a copy of PROMPTS)
    signature = inspect.signature(pipe.transformer.forward)
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(signature.bind(*args, **kwargs).arguments)), with_kwargs=True)
    kwargs = {"guidance_scale": 2.0}
    kwargs.update({"sana": {"use_resolution_binning": False},  # its bins start at 512 px
                   "wan": {"num_frames": 1},  # an image: a 1-frame video
                   # CFG: `true_cfg_scale` with a negative prompt (no embedded guidance)
                   "qwenimage": {"guidance_scale": None, "true_cfg_scale": 2.0, "negative_prompt": [""] * len(PROMPTS)},
                   }.get(family, {}))
    out = pipe(prompt=list(PROMPTS), height=RESOLUTION[family], width=RESOLUTION[family], num_inference_steps=2,
               max_sequence_length=TEXT_LENGTH.get(family, 16), output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return pipe, out.frames[:, 0] if family == "wan" else out.images, calls


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
    sigmas = pipe.scheduler.sigmas[:2].repeat_interleave(CALLS_PER_STEP.get(family, 1))
    assert len(calls) == len(sigmas)
    time_argument = "t" if family == "zimage" else "timestep"
    for call, sigma in zip(calls, sigmas):
        call["timestep"] = call[time_argument]
        expected = model_timestep(pipe.transformer, sigma.reshape(1)).expand(call["timestep"].shape)
        # DPM-Solver's and UniPC's timesteps are integers (truncated)
        tolerance = {"sana": pipe.transformer.config.get("timestep_scale"), "wan": 1.0}.get(family, 1e-6)
        assert torch.all((call["timestep"].float() - expected).abs() < tolerance), (call["timestep"], expected)
    length = TEXT_LENGTH.get(family, 16)
    caps = t2i.encode_captions(family, pipe, PROMPTS, "cpu", length)
    null = t2i.encode_captions(family, pipe, [""], "cpu", length, negative=True)
    first = calls[0]
    side = RESOLUTION[family] // t2i.T.vae_downsample_factor(pipe.vae)
    c = pipe.transformer.config.in_channels // (4 if family in ("flux", "flux2", "qwenimage") else 1)
    n, h, w = 2, side, side
    if family == "qwenimage":  # [caption] then [empty prompt] calls; the pipeline pads to the batch's longest caption
        # (no mask when nothing is padded), the script to the fixed length: same tokens, same transformer output
        mask = caps["encoder_hidden_states_mask"]
        lengths = mask.sum(dim=1)
        longest = int(lengths.max())
        assert caps["encoder_hidden_states"].shape[1] == mask.shape[1] == length > longest
        assert len(set(lengths.tolist())) == 2  # the captions' own lengths
        torch.testing.assert_close(first["encoder_hidden_states"], caps["encoder_hidden_states"][:, :longest])
        assert torch.equal(first["encoder_hidden_states_mask"], mask[:, :longest])
        assert not caps["encoder_hidden_states"][:, longest:].any() and not mask[:, longest:].any()
        # the empty prompt: the template's tokens after its system part (`prompt_template_encode_start_idx`)
        empty = len(pipe.tokenizer(pipe.prompt_template_encode.format("")).input_ids)
        empty -= pipe.prompt_template_encode_start_idx
        assert int(null["encoder_hidden_states_mask"].sum()) == empty == 5  # <|im_end|> \n <|im_start|> assistant \n
        assert calls[1]["encoder_hidden_states_mask"] is None
        torch.testing.assert_close(calls[1]["encoder_hidden_states"],
                                   null["encoder_hidden_states"][:, :empty].expand(2, -1, -1))
        padded_null = {k: v.expand(2, *v.shape[1:]) for k, v in null.items()}
        with torch.no_grad():
            for call, ours in ((first, caps), (calls[1], padded_null)):
                torch.testing.assert_close(pipe.transformer(**dict(call, **ours, return_dict=True)).sample,
                                           pipe.transformer(**dict(call, return_dict=True)).sample)
        x0 = t2i.VideoLatentEncoder(pipe.vae)({"pixel_values": torch.zeros(n, 3, RESOLUTION[family],
                                                                           RESOLUTION[family])}, "cpu")
        assert x0.shape == (n, c, 1, h, w)
        packed = t2i.pack(family, x0)
        assert first["hidden_states"].shape == packed.shape == (n, h * w // 4, 4 * c)
        unpacked = type(pipe)._unpack_latents(packed, RESOLUTION[family], RESOLUTION[family], pipe.vae_scale_factor)
        assert torch.equal(unpacked, x0)  # what the pipeline decodes (after undoing latents_mean / latents_std)
        static = t2i.static_kwargs(family, pipe.transformer, (n, c, h, w), "cpu", torch.float32, length)
        assert first["img_shapes"] == static["img_shapes"] == [[(1, h // 2, w // 2)]] * n
        assert first["guidance"] is None
    elif family == "flux2":  # [caption] then [empty prompt] calls on packed 2x2-patchified tokens, 4-D ids
        torch.testing.assert_close(first["encoder_hidden_states"], caps["encoder_hidden_states"])
        torch.testing.assert_close(calls[1]["encoder_hidden_states"], null["encoder_hidden_states"].expand(2, -1, -1))
        x0 = t2i.pack(family, t2i.Flux2LatentEncoder(pipe.vae)(
            {"pixel_values": torch.zeros(n, 3, RESOLUTION[family], RESOLUTION[family])}, "cpu"))
        assert first["hidden_states"].shape == x0.shape == (n, h * w // 4, 4 * c)
        static = t2i.static_kwargs(family, pipe.transformer, (n, c, h, w), "cpu", torch.float32, length)
        assert torch.equal(first["img_ids"], static["img_ids"]) and torch.equal(first["txt_ids"], static["txt_ids"])
        assert first["guidance"] is None
    elif family == "zimage":  # one CFG call: per-sample lists [captions, empty prompts] of unpadded features
        assert len(first["cap_feats"]) == len(first["x"]) == 2 * n
        for got, want in zip(first["cap_feats"], caps["cap_feats"] + null["cap_feats"] * n):
            torch.testing.assert_close(got, want)
        assert len({f.shape[0] for f in caps["cap_feats"]}) == 2  # each caption its own length
        assert all(x.shape == (c, 1, h, w) for x in first["x"])
    elif family == "wan":  # [caption] then [empty prompt] calls; 1-frame video latents
        torch.testing.assert_close(first["encoder_hidden_states"], caps["encoder_hidden_states"])
        torch.testing.assert_close(calls[1]["encoder_hidden_states"], null["encoder_hidden_states"].expand(2, -1, -1))
        assert first["hidden_states"].shape == (n, c, 1, h, w)
        x0 = t2i.VideoLatentEncoder(pipe.vae)({"pixel_values": torch.zeros(n, 3, RESOLUTION[family],
                                                                           RESOLUTION[family])}, "cpu")
        assert x0.shape == first["hidden_states"].shape
    elif family == "lumina2":  # [caption] then [empty prompt] calls; right-padded masks of the system-prefixed prompts
        torch.testing.assert_close(first["encoder_hidden_states"], caps["encoder_hidden_states"])
        assert torch.equal(first["encoder_attention_mask"], caps["encoder_attention_mask"])
        torch.testing.assert_close(calls[1]["encoder_hidden_states"], null["encoder_hidden_states"].expand(2, -1, -1))
        assert torch.equal(calls[1]["encoder_attention_mask"], null["encoder_attention_mask"].expand(2, -1))
        assert null["encoder_attention_mask"].sum() == 1  # <bos> alone: the negative prompt has no system prompt
        assert len(set(caps["encoder_attention_mask"].sum(dim=1).tolist())) == 2  # the captions' own lengths
        assert first["hidden_states"].shape == (n, c, h, w)
    elif family == "sana":  # CFG batch: [negative; prompts]
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


@pytest.mark.parametrize("family", ("flux", "lumina2", "wan", "zimage", "flux2", "qwenimage"))
def test_stage1_resumes_exactly(assets, stage1, tmp_path, family):
    """Stopped at checkpoint 2 and resumed: the same losses (alignment term included) and final weights (transformer,
    EMA, the modulated head: Flux's on packed tokens, Lumina 2's on its time embedding) as the straight run."""
    out = tmp_path / "resumed"
    t2i.main(run_flags(assets, family, out, stage=1, max_train_steps=2, validation_steps=4))
    t2i.main(run_flags(assets, family, out, stage=1, validation_steps=4, resume_from_checkpoint="latest"))
    straight, resumed = read_losses(stage1[family]), read_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in straight:
        for key in ("loss", "loss_diff", "loss_vae_align", "lr"):
            assert resumed[step][key] == straight[step][key], (step, key)
    for sub in ("transformer", "transformer_ema", "projector"):
        assert_same_weights(out / "checkpoint-4" / sub, stage1[family] / "checkpoint-4" / sub)
    assert_same_weights(out / "transformer", stage1[family] / "transformer")
    assert weights(out / "transformer").keys() == weights(stage1[family] / "transformer").keys()


def test_resolutions_the_pipelines_cannot_sample_are_refused_before_training(assets, tmp_path):
    with pytest.raises(ValueError, match="Flux packs 2x2 patches: use a multiple of 4"):
        t2i.main(run_flags(assets, "flux", tmp_path / "flux", stage=1, resolution=6))  # 3 x 3 latents
    with pytest.raises(ValueError, match="SanaPipeline samples only sides divisible by 32"):
        t2i.main(run_flags(assets, "sana", tmp_path / "sana", stage=1, resolution=16))


# LoRA through the script on the families whose diffusers pipelines load LoRA weights (SD3 and PixArt:
# tests/test_train_t2i_lora.py)
LORA_FAMILIES = ("flux", "sana", "qwenimage", "wan")


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_lora_both_stages_export_what_the_family_pipeline_loads(assets, family, tmp_path):
    """Stage 1 with `--lora_rank`, then stage 2 guided by that adapter on the same base; the stage-2 output loads with
    the family pipeline's own `load_lora_weights` (every saved tensor, unchanged) and changes what it samples."""
    import diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from diffusers_selftrans import lora as L

    lora = dict(lora_rank=4, max_train_steps=2, checkpointing_steps=100, learning_rate=1e-2, ema_decay=0.5)
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    t2i.main(run_flags(assets, family, s1, stage=1, **lora))
    t2i.main(run_flags(assets, family, s2, guiding_model_name_or_path=s1, guide_stop_step=2, **lora))
    assert read_losses(s1)[2]["loss_vae_align"] > 0 and read_losses(s2)[2]["loss_guide"] > 0
    assert json.loads((s2 / L.LORA_RECORD_NAME).read_text())["family"] == family

    def images(pipe):
        kwargs = {"wan": {"num_frames": 1}, "sana": {"use_resolution_binning": False}}.get(family, {})
        out = pipe(prompt=list(PROMPTS), height=RESOLUTION[family], width=RESOLUTION[family], num_inference_steps=2,
                   max_sequence_length=TEXT_LENGTH.get(family, 16), output_type="np",
                   generator=torch.Generator().manual_seed(0), **kwargs)
        return out.frames[:, 0] if family == "wan" else out.images

    pipe = getattr(diffusers, PIPELINE_CLASS[family]).from_pretrained(assets / f"pipe_{family}")
    pipe.set_progress_bar_config(disable=True)
    before = images(pipe)
    pipe.load_lora_weights(s2, adapter_name="selftrans")
    saved = load_file(s2 / L.LORA_WEIGHT_NAME)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="selftrans")
    assert {f"{L.LORA_PREFIX}.{k}" for k in loaded} == set(saved)
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[f"{L.LORA_PREFIX}.{key}"], rtol=0, atol=0)
    after = images(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4

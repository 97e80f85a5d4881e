"""BlockFeatures on diffusers transformers: features equal the blocks' real outputs, early exit runs k blocks,
the per-family timestep / velocity conventions match the families' own schedulers and pipelines."""

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Lumina2Transformer2DModel,
    QwenImageTransformer2DModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)

from diffusers_selftrans import SiTTransformer2DModel
from diffusers_selftrans.models.block_features import (
    SUPPORTED_CLASSES,
    BlockFeatures,
    describe_transformer,
    model_inputs,
    model_timestep,
    model_velocity,
)
from diffusers_selftrans.transport import interpolate, velocity_target
from tiny_transformers import LATENT_CHANNELS, SAMPLE_SIZE, TEXT_TOKENS, build, caption_lengths, conditioning, latents

FAMILIES = ("sd3", "flux", "pixart", "sana", "dit", "flux2", "qwenimage", "lumina2", "zimage", "wan")
NUM_LAYERS = 4
T = torch.tensor([0.25, 0.8])
IMAGE_TOKENS = (SAMPLE_SIZE // 2) ** 2  # 2x2 patches (or packed tokens) of the 8 x 8 latents


def blocks_in_order(model):
    """Every numbered block, 1-based order (Flux/Flux.2: double then single; Lumina 2 / Z-Image: the main `layers`,
    not the refiners), found independently of the adapter."""
    if isinstance(model, (Lumina2Transformer2DModel, ZImageTransformer2DModel)):
        return list(model.layers)
    if isinstance(model, WanTransformer3DModel):
        return list(model.blocks)
    return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))


def image_tokens(family, output):
    """A block output's image tokens, written out per family from the test inputs' known layout."""
    if isinstance(output, tuple):  # (encoder, image) for MM-DiT / Flux / Flux.2 double / Qwen-Image blocks
        return output[1]
    if family == "flux2":  # single-stream: [text (TEXT_TOKENS), image]
        return output[:, TEXT_TOKENS:]
    if family == "lumina2":  # per sample: [its unmasked caption tokens, image, padding]
        return torch.stack([output[i, k: k + IMAGE_TOKENS] for i, k in enumerate(caption_lengths(len(output)))])
    if family == "zimage":  # [image (16), padding to 32, caption]
        return output[:, :IMAGE_TOKENS]
    return output


def forward_args(model, family, x, t):
    """The latent and time arguments as the family's pipeline passes them (Z-Image: a list of (C, 1, H, W), `t`)."""
    if family == "zimage":
        return {"x": list(x.unsqueeze(2).unbind(0)), "t": model_timestep(model, t)}
    return {"hidden_states": x, "timestep": model_timestep(model, t)}


_CACHE = {}


def build_cache(family):
    """A model of `family` for the pure functions (model_timestep reads the family and config only)."""
    if family not in _CACHE:
        _CACHE[family] = build(family, num_layers=2)
    return _CACHE[family]


def as_tensor(sample):
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample


def reference_run(model, family, x, t, cond, static):
    """Full forward with our own hooks: every block's image-token output and the number of block calls."""
    outputs, handles = {}, []
    for i, block in enumerate(blocks_in_order(model), start=1):
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i: outputs.__setitem__(i, image_tokens(family, o))))
    try:
        with torch.no_grad():
            sample = model(**forward_args(model, family, x, t), **cond, **static).sample
    finally:
        for h in handles:
            h.remove()
    return sample, outputs


def count_block_calls(model):
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1)) for b in blocks_in_order(model)]
    return calls, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_features_equal_real_block_outputs_and_early_exit_runs_k_blocks(family):
    model = build(family, num_layers=NUM_LAYERS)
    x = latents(family, 2)
    cond, static = conditioning(family, 2)
    sample_ref, outputs = reference_run(model, family, x, T, cond, static)
    assert len(outputs) == NUM_LAYERS
    feats = BlockFeatures(model)
    assert feats.num_layers == NUM_LAYERS and describe_transformer(model)["num_layers"] == NUM_LAYERS
    with torch.no_grad():
        out = feats(**forward_args(model, family, x, T), layers=[1, 3, NUM_LAYERS], **cond, **static)
    torch.testing.assert_close(out.sample, sample_ref, rtol=0, atol=0)  # the hooks do not change the output
    assert sorted(out.hidden_states) == [1, 3, NUM_LAYERS]
    for k, f in out.hidden_states.items():
        torch.testing.assert_close(f, outputs[k], rtol=0, atol=0)
        assert f.shape[-1] == describe_transformer(model)["hidden_size"]
        # image tokens only (text cut off): the packed tokens or 2x2 patches; Sana's 1x1 patches; Wan's 2 frames
        assert f.shape[:2] == (2, {"sana": 4 * IMAGE_TOKENS, "wan": 2 * IMAGE_TOKENS}.get(family, IMAGE_TOKENS))

    calls, handles = count_block_calls(model)
    try:
        for k in (1, 3):  # Flux/Flux.2: 1 = a double block, 3 = the first single block
            calls.clear()
            with torch.no_grad():
                early = feats(**forward_args(model, family, x, T), stop_at_layer=k, **cond, **static)
            assert len(calls) == k
            assert early.sample is None and list(early.hidden_states) == [k]
            torch.testing.assert_close(early.hidden_states[k], outputs[k], rtol=0, atol=0)
    finally:
        for h in handles:
            h.remove()
    # the model is restored: a plain forward runs every block and gives the same output
    calls, handles = count_block_calls(model)
    with torch.no_grad():
        again = model(**forward_args(model, family, x, T), **cond, **static).sample
    for h in handles:
        h.remove()
    assert len(calls) == NUM_LAYERS
    torch.testing.assert_close(again, sample_ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ("flux2", "qwenimage", "lumina2", "zimage"))
def test_last_block_image_tokens_through_the_models_final_layer_give_its_output(family):
    """The tokens cut out of the joint sequences are exactly those the model's own final layer turns into its output:
    the last block's features, through `norm_out` / `proj_out` (Z-Image: its FinalLayer) and the family's
    unpatchify, equal `sample` (Lumina 2 with captions of different lengths, so per-sample offsets)."""
    model = build(family, num_layers=3)
    x = latents(family, 3)
    cond, static = conditioning(family, 3)
    with torch.no_grad():
        out = BlockFeatures(model)(**forward_args(model, family, x, T[:1].expand(3)), layers=[3],
                                   return_time_embedding=True, **cond, **static)
        f, c = out.hidden_states[3], out.time_embedding
        if family in ("flux2", "qwenimage"):  # packed tokens: the output is per token
            torch.testing.assert_close(model.proj_out(model.norm_out(f, c)), out.sample, rtol=0, atol=0)
            return
        head = model.norm_out(f, c) if family == "lumina2" else model.all_final_layer["2-1"](f, c=c)
    grid = torch.einsum("nhwpqc->nchpwq", head.reshape(3, 4, 4, 2, 2, LATENT_CHANNELS)).reshape(3, -1, 8, 8)
    sample = out.sample if family == "lumina2" else torch.stack(out.sample).squeeze(2)
    torch.testing.assert_close(grid, sample, rtol=1e-6, atol=1e-6)


def test_model_restored_when_the_forward_raises():
    model = build("sd3", num_layers=NUM_LAYERS)
    blocks = model.transformer_blocks
    feats = BlockFeatures(model)
    with pytest.raises(Exception):
        feats(latents("sd3", 2), timestep=torch.ones(2), stop_at_layer=2)  # no encoder_hidden_states
    assert model.transformer_blocks is blocks and len(model.transformer_blocks) == NUM_LAYERS
    assert feats._wanted == frozenset()


def test_gradients_reach_the_features_and_close_removes_hooks():
    model = build("pixart", num_layers=3).train()
    x = latents("pixart", 2)
    cond, static = conditioning("pixart", 2)
    feats = BlockFeatures(model)
    out = feats(x, timestep=model_timestep(model, T), layers=[2], **cond, **static)
    out.hidden_states[2].square().mean().backward()
    assert model.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert model.transformer_blocks[2].attn1.to_q.weight.grad is None  # after block 2: not in the graph
    feats.close()
    assert all(not b._forward_hooks for b in model.transformer_blocks)


def test_sit_delegates_to_native_features():
    model = SiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, num_attention_heads=2,
                                  attention_head_dim=16, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 2])
    feats = BlockFeatures(model)
    with torch.no_grad():
        native = model(x, T, y, output_hidden_states=[2])
        out = feats(x, model_timestep(model, T), y, layers=[2])
        early = feats(x, T, y, stop_at_layer=3)
    torch.testing.assert_close(out.sample, native.sample, rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states[2], native.hidden_states[2], rtol=0, atol=0)
    assert early.sample is None and list(early.hidden_states) == [3]
    torch.testing.assert_close(model_timestep(model, T), T)


def test_errors():
    with pytest.raises(ValueError, match="SD3Transformer2DModel.*FluxTransformer2DModel"):
        BlockFeatures(torch.nn.Linear(2, 2))
    assert "SanaTransformer2DModel" in SUPPORTED_CLASSES and "DiTTransformer2DModel" in SUPPORTED_CLASSES
    feats = BlockFeatures(build("dit", num_layers=2))
    with pytest.raises(ValueError, match=r"1-based in \[1, 2\]"):
        feats(latents("dit", 1), layers=[3])
    with pytest.raises(ValueError, match="beyond stop_at_layer"):
        feats(latents("dit", 1), layers=[2], stop_at_layer=1)


def test_joint_sequence_refusals():
    """Z-Image's omni mode ([caption, image, SigLIP] sequences) and a batch of different-size latents have no single
    image-token slice; Qwen-Image with zero_cond_t embeds a second (zero) timestep, so its time embedding is 2N long."""
    model = build("zimage", num_layers=2)
    feats = BlockFeatures(model)
    x = latents("zimage", 2)
    cond, _ = conditioning("zimage", 2)
    with pytest.raises(ValueError, match="one size per batch"):
        feats([x[0, :, None], x[1, :, None, :4]], t=T, layers=[1], **cond)
    with pytest.raises(ValueError, match="omni mode"):
        feats([[x[0, :, None]], [x[1, :, None]]], t=T, layers=[1], **cond)
    config = {k: v for k, v in build("qwenimage", num_layers=2).config.items() if not k.startswith("_")}
    qwen = QwenImageTransformer2DModel(**{**config, "zero_cond_t": True}).eval()
    cond, static = conditioning("qwenimage", 2)
    static["img_shapes"] = static["img_shapes"] * 2  # one entry per sample for its modulate_index
    x = latents("qwenimage", 2)
    qfeats = BlockFeatures(qwen)
    with torch.no_grad():
        assert qfeats(x, timestep=T, layers=[2], **cond, **static).hidden_states[2].shape == (2, IMAGE_TOKENS, 16)
        with pytest.raises(RuntimeError, match="time embedding has batch 4 for 2 samples"):
            qfeats(x, timestep=T, layers=[2], return_time_embedding=True, **cond, **static)


def test_describe_new_families():
    """Packed families report the packed token width and patch 1 (their tokens arrive packed 2x2); Z-Image its
    `all_patch_size`; Wan its (pt, ph, pw); Lumina 2 / Z-Image cap their time embedding at 1024 / 256 (checked on
    the released widths, built on the meta device against the models' own embedders)."""
    got = {f: describe_transformer(build(f, num_layers=2)) for f in ("flux2", "qwenimage", "lumina2", "zimage", "wan")}
    assert [(d["patch_size"], d["in_channels"], d["packed"], d["hidden_size"]) for d in got.values()] == [
        (1, 16, True, 16), (1, 16, True, 16), (2, 4, False, 32), (2, 4, False, 32), ((1, 2, 2), 4, False, 16)]
    assert got["lumina2"]["num_tokens"] == IMAGE_TOKENS and got["wan"]["num_tokens"] is None
    assert all(d["time_embedding"] and d["time_embedding_dim"] == d["hidden_size"] for d in got.values())
    with torch.device("meta"):
        lumina = Lumina2Transformer2DModel(hidden_size=2304, num_layers=1, num_refiner_layers=1,
                                           num_attention_heads=24, num_kv_heads=8)
        zimage = ZImageTransformer2DModel(n_layers=1, n_refiner_layers=1)  # dim 3840
    assert describe_transformer(lumina)["time_embedding_dim"] == 1024 == \
        lumina.time_caption_embed.timestep_embedder.linear_2.out_features
    assert describe_transformer(zimage)["time_embedding_dim"] == 256 == zimage.t_embedder.mlp[2].out_features
    assert (describe_transformer(lumina)["hidden_size"], describe_transformer(zimage)["hidden_size"]) == (2304, 3840)


@pytest.mark.parametrize("family", ("sd3", "zimage"))
def test_model_inputs_are_what_the_pipeline_passes(family):
    model = build_cache(family)
    x = latents(family, 2)
    got = model_inputs(model, x, T)
    want = forward_args(model, family, x, T)
    assert list(got) == list(want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if family == "zimage":  # ZImagePipeline: latents.unsqueeze(2), unbound into a list
        assert [v.shape for v in got["x"]] == [(LATENT_CHANNELS, 1, SAMPLE_SIZE, SAMPLE_SIZE)] * 2


# ------------------------------------------------------------------------------------------ timestep conventions
def flow_match_grid(shift=1.0):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)  # num_train_timesteps=1000, as SD3/Flux/Sana ship
    scheduler.set_timesteps(7)
    return scheduler, scheduler.sigmas[:-1], scheduler.timesteps


@pytest.mark.parametrize("family", ("sd3", "pixart", "sana", "dit"))
def test_timestep_is_what_a_flow_match_pipeline_passes(family):
    """Our t is the scheduler's sigma; SD3/PixArt/Sana/DiT pipelines pass `scheduler.timesteps` (= 1000 sigma)
    (Sana times `config.timestep_scale`, 1.0 here), and x_t is the scheduler's own noised sample."""
    model = build(family, num_layers=2)
    scheduler, sigmas, timesteps = flow_match_grid(shift=3.0)
    torch.testing.assert_close(model_timestep(model, sigmas), timesteps)
    x0, noise = latents(family, 1, seed=0), latents(family, 1, seed=1)
    for sigma, timestep in zip(sigmas, timesteps):
        x_t = interpolate(x0, noise, sigma.reshape(1))
        torch.testing.assert_close(x_t, scheduler.scale_noise(x0, timestep.reshape(1), noise))


def test_sana_timestep_scale_is_applied():
    model = build("sana", num_layers=2)
    model.register_to_config(timestep_scale=0.5)
    torch.testing.assert_close(model_timestep(model, torch.tensor([0.4])), torch.tensor([200.0]))


@pytest.mark.parametrize("family", ("flux", "flux2", "qwenimage"))
def test_flux_timestep_is_the_sigma_the_pipeline_passes(family):
    """Flux/Flux.2/Qwen-Image pipelines pass `timestep / 1000` (Flux/Flux.2 multiply by 1000 in forward, Qwen-Image's
    Timesteps(scale=1000) does): the model's argument is sigma = t."""
    model = build(family, num_layers=3)
    scheduler, sigmas, timesteps = flow_match_grid(shift=3.0)
    torch.testing.assert_close(model_timestep(model, sigmas), timesteps / 1000)
    x0, noise = latents(family, 1, seed=0), latents(family, 1, seed=1)
    x_t = interpolate(x0, noise, sigmas[2].reshape(1))
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, timesteps[2].reshape(1), noise))


@pytest.mark.parametrize("family", ("lumina2", "zimage"))
def test_reversed_time_families_take_one_minus_sigma(family):
    """Lumina2Pipeline passes `1 - t / num_train_timesteps`, ZImagePipeline `(1000 - t) / 1000`: data at 1."""
    model = build_cache(family)
    scheduler, sigmas, timesteps = flow_match_grid(shift=3.0)
    passed = 1 - timesteps / 1000 if family == "lumina2" else (1000 - timesteps) / 1000
    torch.testing.assert_close(model_timestep(model, sigmas), passed)
    torch.testing.assert_close(model_timestep(model, torch.tensor([0.0, 1.0])), torch.tensor([1.0, 0.0]))


def test_wan_timestep_is_the_unipc_flow_timestep():
    """WanPipeline passes UniPCMultistepScheduler's flow timesteps, 1000 sigma truncated to int64: ours is the
    un-truncated 1000 sigma (less than 1 above)."""
    model = build_cache("wan")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(7)
    ours = model_timestep(model, scheduler.sigmas[:-1])
    assert torch.all((ours - scheduler.timesteps >= 0) & (ours - scheduler.timesteps < 1))
    assert ours.floor().long().tolist() == scheduler.timesteps.tolist()


def model_output_for(family, v):
    """The raw output of a model of `family` whose prediction is exactly the velocity v = eps - x0."""
    if family in ("pixart", "dit"):  # learn_sigma-style doubled channels: the velocity is the first half
        return torch.cat([v, torch.full_like(v, 7.0)], dim=1)
    if family == "lumina2":  # predicts x0 - eps
        return -v
    if family == "zimage":  # a per-sample list of (C, 1, H, W), predicting x0 - eps
        return list((-v).unsqueeze(2).unbind(0))
    return v


def pipeline_noise_pred(family, raw):
    """What the family's pipeline hands to `scheduler.step`, written out from each pipeline's __call__."""
    if family in ("pixart", "dit"):  # learned sigma split off
        return raw.chunk(2, dim=1)[0]
    if family == "lumina2":  # Lumina2Pipeline: noise_pred = -noise_pred
        return -raw
    if family == "zimage":  # ZImagePipeline: stack, squeeze(2), negate
        return -torch.stack([o.float() for o in raw], dim=0).squeeze(2)
    return raw


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_is_the_flow_matching_target(family):
    """One Euler step of the family's scheduler with what its pipeline makes of the model output moves x_t along
    eps - x0: with the exact velocity as prediction, the step from sigma to sigma' lands on the interpolant at sigma';
    `model_velocity` reads that same velocity off the raw output."""
    model = build_cache(family)
    x0, noise = latents(family, 1, seed=0), latents(family, 1, seed=1)
    v = velocity_target(x0, noise)
    raw = model_output_for(family, v)
    torch.testing.assert_close(model_velocity(model, raw), v, rtol=0, atol=0)
    scheduler, sigmas, timesteps = flow_match_grid()
    x_t = interpolate(x0, noise, sigmas[1].reshape(1))
    stepped = scheduler.step(pipeline_noise_pred(family, raw), timesteps[1], x_t, return_dict=False)[0]
    torch.testing.assert_close(stepped, interpolate(x0, noise, sigmas[2].reshape(1)))


def test_wan_velocity_is_the_unipc_flow_prediction():
    """WanPipeline's UniPCMultistepScheduler(prediction_type="flow_prediction") reads x0 = x_t - sigma * output: its
    first step with the exact velocity lands on the interpolant at the next sigma."""
    model = build_cache("wan")
    x0, noise = latents("wan", 1, seed=0), latents("wan", 1, seed=1)
    v = velocity_target(x0, noise)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(7)
    x_t = interpolate(x0, noise, scheduler.sigmas[0].reshape(1))
    stepped = scheduler.step(model_velocity(model, v), scheduler.timesteps[0], x_t, return_dict=False)[0]
    torch.testing.assert_close(stepped, interpolate(x0, noise, scheduler.sigmas[1].reshape(1)))


def time_embedding_by_hand(model, family, x, timestep, cond):
    """The vector each new family's final layer is modulated with, from the model's own embedding modules."""
    if family == "flux2":  # Flux.2's forward multiplies by 1000; no guidance embedder in the tiny model
        return model.time_guidance_embed(timestep * 1000, None)
    if family == "qwenimage":  # Timesteps(scale=1000) inside; the second argument only gives the dtype
        return model.time_text_embed(timestep, x)
    if family == "lumina2":
        embed = model.time_caption_embed
        return embed.timestep_embedder(embed.time_proj(timestep))
    if family == "zimage":
        return model.t_embedder(timestep * model.config.t_scale)
    return model.condition_embedder(timestep, cond["encoder_hidden_states"])[0]  # wan: temb


@pytest.mark.parametrize("family", ("flux2", "qwenimage", "lumina2", "zimage", "wan"))
def test_block_features_return_the_models_time_embedding(family):
    model = build_cache(family)
    x = latents(family, 2)
    cond, static = conditioning(family, 2)
    args = forward_args(model, family, x, T)
    with torch.no_grad():
        out = BlockFeatures(model)(**args, layers=[1], return_time_embedding=True, **cond, **static)
        expected = time_embedding_by_hand(model, family, x, model_timestep(model, T), cond)
    assert out.time_embedding.shape == (2, describe_transformer(model)["time_embedding_dim"])
    torch.testing.assert_close(out.time_embedding, expected, rtol=0, atol=0)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("family", ("sd3", "flux", "pixart", "sana", "flux2", "qwenimage", "lumina2",
                                    "zimage", "wan"))
def test_gradient_checkpointing_gives_the_same_features_loss_and_gradients(family):
    """diffusers' gradient checkpointing recomputes each block in the backward pass, which calls its forward hooks
    again: the features, the loss and every gradient stay those of the run without checkpointing."""
    x = latents(family, 2)
    cond, static = conditioning(family, 2)
    results = []
    for checkpointing in (False, True):
        model = build(family, num_layers=NUM_LAYERS).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        assert model.is_gradient_checkpointing == checkpointing
        feats = BlockFeatures(model)
        out = feats(**forward_args(model, family, x, T), layers=[2, 3], return_time_embedding=True, **cond, **static)
        loss = as_tensor(out.sample).pow(2).mean() + out.hidden_states[2].pow(2).mean() \
            + out.hidden_states[3].abs().mean() + out.time_embedding.pow(2).mean()
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in out.hidden_states.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, feats_a, grads_a), (loss_b, feats_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for k in feats_a:
        torch.testing.assert_close(feats_a[k], feats_b[k])
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)

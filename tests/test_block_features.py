"""BlockFeatures on diffusers transformers: features equal the blocks' real outputs, early exit runs k blocks,
the per-family timestep / velocity conventions match the families' own schedulers and pipelines."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_selftrans import SiTTransformer2DModel
from diffusers_selftrans.models.block_features import (
    SUPPORTED_CLASSES,
    BlockFeatures,
    describe_transformer,
    model_timestep,
    model_velocity,
)
from diffusers_selftrans.transport import interpolate, velocity_target
from tiny_transformers import LATENT_CHANNELS, build, conditioning, latents

FAMILIES = ("sd3", "flux", "pixart", "sana", "dit")
NUM_LAYERS = 4
T = torch.tensor([0.25, 0.8])


def blocks_in_order(model):
    """Every block, 1-based order (Flux: double then single), found independently of the adapter."""
    return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))


def image_tokens(output):
    return output[1] if isinstance(output, tuple) else output  # (encoder, image) for MM-DiT / Flux blocks


def reference_run(model, x, t, cond, static):
    """Full forward with our own hooks: every block's image-token output and the number of block calls."""
    outputs, handles = {}, []
    for i, block in enumerate(blocks_in_order(model), start=1):
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, image_tokens(o))))
    try:
        with torch.no_grad():
            sample = model(x, timestep=model_timestep(model, t), **cond, **static).sample
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
    sample_ref, outputs = reference_run(model, x, T, cond, static)
    assert len(outputs) == NUM_LAYERS
    feats = BlockFeatures(model)
    assert feats.num_layers == NUM_LAYERS and describe_transformer(model)["num_layers"] == NUM_LAYERS
    with torch.no_grad():
        out = feats(x, timestep=model_timestep(model, T), layers=[1, 3, NUM_LAYERS], **cond, **static)
    torch.testing.assert_close(out.sample, sample_ref, rtol=0, atol=0)  # the hooks do not change the output
    assert sorted(out.hidden_states) == [1, 3, NUM_LAYERS]
    for k, f in out.hidden_states.items():
        torch.testing.assert_close(f, outputs[k], rtol=0, atol=0)
        assert f.shape[-1] == describe_transformer(model)["hidden_size"]
    if family == "flux":  # image tokens only, also for the single-stream blocks 3..4 (text split off)
        assert out.hidden_states[NUM_LAYERS].shape[1] == x.shape[1]

    calls, handles = count_block_calls(model)
    try:
        for k in (1, 3):  # Flux: 1 = a double block, 3 = the first single block
            calls.clear()
            with torch.no_grad():
                early = feats(x, timestep=model_timestep(model, T), stop_at_layer=k, **cond, **static)
            assert len(calls) == k
            assert early.sample is None and list(early.hidden_states) == [k]
            torch.testing.assert_close(early.hidden_states[k], outputs[k], rtol=0, atol=0)
    finally:
        for h in handles:
            h.remove()
    # the model is restored: a plain forward runs every block and gives the same output
    calls, handles = count_block_calls(model)
    with torch.no_grad():
        again = model(x, timestep=model_timestep(model, T), **cond, **static).sample
    for h in handles:
        h.remove()
    assert len(calls) == NUM_LAYERS
    torch.testing.assert_close(again, sample_ref, rtol=0, atol=0)


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


def test_flux_timestep_is_the_sigma_the_pipeline_passes():
    """FluxPipeline passes `timestep / 1000` and the model multiplies by 1000: the model's argument is sigma = t."""
    model = build("flux", num_layers=3)
    scheduler, sigmas, timesteps = flow_match_grid(shift=3.0)
    torch.testing.assert_close(model_timestep(model, sigmas), timesteps / 1000)
    x0, noise = latents("flux", 1, seed=0), latents("flux", 1, seed=1)
    x_t = interpolate(x0, noise, sigmas[2].reshape(1))
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, timesteps[2].reshape(1), noise))


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_is_the_flow_matching_target(family):
    """One Euler step of the family's scheduler with the model's velocity output moves x_t along eps - x0: with the
    exact velocity as output, the step from sigma to sigma' lands on the interpolant at sigma'."""
    model = build(family, num_layers=2)
    x0, noise = latents(family, 1, seed=0), latents(family, 1, seed=1)
    v = velocity_target(x0, noise)
    if family in ("pixart", "dit"):  # learn_sigma-style doubled channels: the velocity is the first half
        raw = torch.cat([v, torch.full_like(v, 7.0)], dim=1)
        assert raw.shape[1] == 2 * LATENT_CHANNELS
    else:
        raw = v
    velocity = model_velocity(model, raw)
    torch.testing.assert_close(velocity, v)
    scheduler, sigmas, timesteps = flow_match_grid()
    x_t = interpolate(x0, noise, sigmas[1].reshape(1))
    stepped = scheduler.step(velocity, timesteps[1], x_t, return_dict=False)[0]  # the pipelines' own update
    torch.testing.assert_close(stepped, interpolate(x0, noise, sigmas[2].reshape(1)))


@pytest.mark.parametrize("family", ("sd3", "flux", "pixart", "sana"))
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
        out = feats(x, timestep=model_timestep(model, T), layers=[2, 3], return_time_embedding=True, **cond, **static)
        loss = out.sample.pow(2).mean() + out.hidden_states[2].pow(2).mean() + out.hidden_states[3].abs().mean() \
            + out.time_embedding.pow(2).mean()
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

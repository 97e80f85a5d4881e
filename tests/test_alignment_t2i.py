"""Both Self-Transcendence stages on diffusers transformers, through the SAME loss modules as SiT: values against
hand computations (the models' real forwards + our own hooks), one batched early-exit teacher pass, gradients."""

import pytest
import torch

from diffusers_selftrans.alignment import build_alignment
from diffusers_selftrans.alignment.common import (
    T2I_SELF_TRANSCENDENCE_REFERENCE,
    T2I_VAE_ALIGN_REFERENCE,
    default_t2i_options,
)
from diffusers_selftrans.models.block_features import BlockFeatures, model_timestep
from diffusers_selftrans.transport import interpolate, velocity_target
from tiny_transformers import block_output, build, conditioning, latents, null_conditioning

SMALL_PROJ = 16  # projector width in tests (the real default is 2048)
W = 5.0


def batch(family, n=3, seed=0):
    x0, noise = latents(family, n, seed=seed), latents(family, n, seed=seed + 1)
    t = torch.linspace(0.1, 0.9, n)
    cond, static = conditioning(family, n)
    return dict(x0=x0, noise=noise, t=t, x_t=interpolate(x0, noise, t), target=velocity_target(x0, noise)), cond, static


def test_t2i_defaults_are_the_released_setting():
    assert default_t2i_options("vae_align", 24) == {"layer": 4, "t_range": None, "weight": 0.5,
                                                     "modulated_head": True}
    assert (4, 24) == T2I_VAE_ALIGN_REFERENCE
    st = default_t2i_options("self_transcendence", 24)
    assert (st["guided_layer"], st["guiding_layer"], 24) == T2I_SELF_TRANSCENDENCE_REFERENCE == (12, 16, 24)
    assert st["guidance_scale"] == 5.0 and st["t_range"] is None and st["weight"] == 0.5
    assert st["guide_stop_step"] == 50_000
    with pytest.raises(ValueError, match="No T2I defaults"):
        default_t2i_options("repa", 24)


@pytest.mark.parametrize("family", ("sd3", "pixart", "sana", "dit"))
def test_vae_align_value_on_diffusers_models(family):
    model = build(family, num_layers=3)
    b, cond, static = batch(family)
    method = build_alignment("vae_align", model, layer=2, t_range=None, projector_dim=SMALL_PROJ)
    out = BlockFeatures(model)(b["x_t"], timestep=model_timestep(model, b["t"]), layers=method.student_layers,
                               **cond, **static)
    loss = method(out.hidden_states, **b)["vae_align"]
    # by hand: the head on block 2's real output, unpatchified in the models' own nhwpqc -> nchpwq order
    tokens = block_output(model, 2, b["x_t"], b["t"], {**cond, **static})
    p, c = model.config.patch_size, model.config.in_channels
    head = method.projector(tokens).detach().reshape(3, 8 // p, 8 // p, p, p, c)
    grid = torch.einsum("nhwpqc->nchpwq", head).reshape(3, c, 8, 8)
    expected = (grid - b["target"]).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_vae_align_on_a_video_transformer_predicts_its_patches():
    """Wan (video, (1, 2, 2) patches, issue 27 item 5): the modulated head predicts a patch a token, unpatchified to
    the target's (N, C, F, H, W) in the layout of Wan's own output (token (f, h, w) holds pixels (pt, ph, pw, C))."""
    model = build("wan", num_layers=3)
    b, cond, static = batch("wan")
    method = build_alignment("vae_align", model, **dict(default_t2i_options("vae_align", 3), layer=2),
                             projector_dim=SMALL_PROJ)
    out = BlockFeatures(model)(b["x_t"], timestep=model_timestep(model, b["t"]), layers=method.student_layers,
                               return_time_embedding=True, **cond, **static)
    loss = method(out.hidden_states, time_embedding=out.time_embedding, **b)["vae_align"]
    head = method.projector(out.hidden_states[2], out.time_embedding).detach()
    n, c, f, h, w = b["target"].shape
    tokens = head.reshape(n, f, h // 2, w // 2, 1, 2, 2, c)
    video = torch.empty(n, c, f, h, w)
    for i in range(f):
        for j in range(h // 2):
            for k in range(w // 2):
                for q in range(2):
                    for r in range(2):
                        video[:, :, i, 2 * j + q, 2 * k + r] = tokens[:, i, j, k, 0, q, r]
    torch.testing.assert_close(loss.detach(), (video - b["target"]).pow(2).mean(), rtol=1e-5, atol=1e-6)
    assert method.predict(out.hidden_states, out.time_embedding, grid=(f, h, w)).shape == (n, c, f, h, w)


def time_embedding_by_hand(model, family, t, cond):
    """The vector each family's final layer is modulated with, from the model's own embedding modules."""
    timestep = model_timestep(model, t)
    with torch.no_grad():
        if family == "sd3":
            return model.time_text_embed(timestep, cond["pooled_projections"])
        if family == "flux":
            return model.time_text_embed(timestep * 1000, cond["pooled_projections"])  # Flux's forward scales by 1000
        if family == "pixart":
            return model.adaln_single(timestep, {"resolution": None, "aspect_ratio": None}, batch_size=t.shape[0],
                                      hidden_dtype=torch.float32)[1]
        return model.time_embed(timestep, batch_size=t.shape[0], hidden_dtype=torch.float32)[1]  # sana


@pytest.mark.parametrize("family", ("sd3", "flux", "pixart", "sana"))
def test_block_features_return_the_models_time_embedding(family):
    model = build(family, num_layers=3)
    b, cond, static = batch(family)
    feats = BlockFeatures(model)
    out = feats(b["x_t"], timestep=model_timestep(model, b["t"]), layers=[2], return_time_embedding=True,
                **cond, **static)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    assert out.time_embedding.shape == (3, hidden)
    torch.testing.assert_close(out.time_embedding.detach(), time_embedding_by_hand(model, family, b["t"], cond))
    assert feats(b["x_t"], timestep=model_timestep(model, b["t"]), layers=[2], **cond, **static).time_embedding is None
    with pytest.raises(ValueError, match="no time embedding"):
        BlockFeatures(build("dit", num_layers=3))(torch.zeros(1), layers=[1], return_time_embedding=True)


@pytest.mark.parametrize("family", ("sd3", "flux", "pixart", "sana"))
def test_modulated_stage1_head_value_and_gradient_into_the_time_embedding(family):
    """The released T2I head: LayerNorm (no affine) -> x (1 + scale) + shift, (shift, scale) = Linear(SiLU(c)) of the
    model's own c -> Linear; Flux compares packed tokens (the same MSE as on the unpacked grid)."""
    model = build(family, num_layers=3).train()
    b, cond, static = batch(family)
    method = build_alignment("vae_align", model, **dict(default_t2i_options("vae_align", 3), layer=2),
                             projector_dim=SMALL_PROJ)
    assert method.needs_time_embedding and method.projector.config.modulation_features is not None
    out = BlockFeatures(model)(b["x_t"], timestep=model_timestep(model, b["t"]), layers=method.student_layers,
                               return_time_embedding=True, **cond, **static)
    loss = method(out.hidden_states, time_embedding=out.time_embedding, **b)["vae_align"]
    with pytest.raises(ValueError, match="needs `time_embedding`"):
        method(out.hidden_states, **b)
    # by hand
    c = out.time_embedding.detach()
    x = method.projector.mlp(out.hidden_states[2].detach())
    shift, scale = method.projector.head_modulation(c).chunk(2, dim=-1)
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    head = method.projector.head[1](x)
    if family == "flux":  # unpack both the prediction and the target onto the 8 x 8 latent grid: the same loss
        def unpack(tokens):
            return tokens.reshape(3, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(3, 4, 8, 8)

        expected = (unpack(head) - unpack(b["target"])).pow(2).mean()
    else:
        p, ch = model.config.patch_size, model.config.in_channels
        grid = torch.einsum("nhwpqc->nchpwq", head.reshape(3, 8 // p, 8 // p, p, p, ch)).reshape(3, ch, 8, 8)
        expected = (grid - b["target"]).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # as in the released code, the head's loss reaches the model's own time embedding
    loss.backward()
    embedder = getattr(model, {"sd3": "time_text_embed", "flux": "time_text_embed", "pixart": "adaln_single",
                               "sana": "time_embed"}[family])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in embedder.parameters())


def test_modulated_head_needs_a_time_embedding_and_the_plain_head_stays_the_class_conditional_one():
    from diffusers_selftrans.models.projector import AlignmentProjector

    with pytest.raises(ValueError, match="modulated_head needs the model's time embedding"):
        build_alignment("vae_align", build("dit", num_layers=3), modulated_head=True)
    plain = build_alignment("vae_align", build("sd3", num_layers=3), layer=2, projector_dim=SMALL_PROJ)
    assert not plain.needs_time_embedding and plain.projector.head_modulation is None
    with pytest.raises(ValueError, match="set head_features"):
        AlignmentProjector(8, 8, hidden_features=8, modulation_features=8)
    with pytest.raises(ValueError, match="unmodulated one takes none"):
        plain.projector(torch.zeros(1, 4, 32), torch.zeros(1, 32))


def make_st(family, student_layers=3, teacher_layers=4, **options):
    student, teacher = build(family, seed=0, num_layers=student_layers), build(family, seed=1, num_layers=teacher_layers)
    method = build_alignment("self_transcendence", student, teacher=teacher, guided_layer=2, guiding_layer=3,
                             guidance_scale=W, t_range=None, projector_dim=SMALL_PROJ,
                             null_conditioning=null_conditioning(family), **options)
    return student, teacher, method


@pytest.mark.parametrize("family", ("sd3", "pixart", "sana", "dit", "flux", "qwenimage"))
def test_self_transcendence_value_against_separate_teacher_passes(family):
    student, teacher, method = make_st(family)
    b, cond, static = batch(family)
    feats = BlockFeatures(student)
    out = feats(b["x_t"], timestep=model_timestep(student, b["t"]), layers=method.student_layers, **cond, **static)
    loss = method(out.hidden_states, x_t=b["x_t"], t=b["t"], step=0, conditioning=cond,
                  model_kwargs=static)["guide"]

    # by hand: the caption pass and the empty-prompt pass, each a plain full forward of the teacher
    null = {k: v.expand(3, *v.shape[1:]) for k, v in null_conditioning(family).items()}
    f_c = block_output(teacher, 3, b["x_t"], b["t"], {**cond, **static})
    f_u = block_output(teacher, 3, b["x_t"], b["t"], {**null, **static})
    f_g = f_u + W * (f_c - f_u)
    prediction = method.projector(out.hidden_states[2]).detach()
    expected = (prediction - f_g).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert method.weights == {"guide": 0.5}


def test_self_transcendence_teacher_pass_with_per_sample_lists():
    """Z-Image (issue 27, item 5): latents, time and captions reach the teacher through `model_inputs` as per-sample
    lists; its one batched pass, the captions' lists then the empty prompt's, equals the two passes apart."""
    from diffusers_selftrans.models.block_features import model_inputs

    student, teacher, method = make_st("zimage")
    b, cond, _ = batch("zimage")
    out = BlockFeatures(student)(**model_inputs(student, b["x_t"], b["t"]), layers=method.student_layers, **cond)
    loss = method(out.hidden_states, x_t=b["x_t"], t=b["t"], step=0, conditioning=cond)["guide"]
    teacher_features = BlockFeatures(teacher)
    with torch.no_grad():
        f_c, f_u = (teacher_features(**model_inputs(teacher, b["x_t"], b["t"]), stop_at_layer=3,
                                     cap_feats=caps).hidden_states[3]
                    for caps in (cond["cap_feats"], null_conditioning("zimage")["cap_feats"] * 3))
    expected = (method.projector(out.hidden_states[2]).detach() - (f_u + W * (f_c - f_u))).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ("sd3", "pixart", "qwenimage"))
def test_one_batched_early_exit_teacher_pass_and_gradients(family):
    student, teacher, method = make_st(family)
    b, cond, static = batch(family)
    forwards, block_calls = [], []
    original = teacher.forward

    def recording(hidden_states, *args, **kwargs):
        forwards.append(hidden_states.shape[0])
        return original(hidden_states, *args, **kwargs)

    teacher.forward = recording
    for blk in teacher.transformer_blocks:
        blk.register_forward_pre_hook(lambda m, a: block_calls.append(1))
    student.train()
    feats = BlockFeatures(student)
    for step in range(2):
        out = feats(b["x_t"], timestep=model_timestep(student, b["t"]), layers=method.student_layers, **cond, **static)
        loss = method(out.hidden_states, x_t=b["x_t"], t=b["t"], step=step, conditioning=cond, model_kwargs=static)
        loss["guide"].backward()
    assert forwards == [6, 6]  # one pass per step over [cond, uncond]
    assert method.teacher_forwards == 2
    assert len(block_calls) == 2 * 3  # blocks 1..guiding_layer of 4, each step
    assert all(p.grad is None for p in teacher.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in method.projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.transformer_blocks[0].parameters())
    assert all(p.grad is None for p in student.transformer_blocks[2].parameters())  # after the guided block
    assert len(teacher.transformer_blocks) == 4  # the teacher's block list is restored


def test_guide_stop_releases_the_teacher_and_its_hooks():
    student, teacher, method = make_st("sd3", guide_stop_step=1)
    b, cond, static = batch("sd3")
    out = BlockFeatures(student)(b["x_t"], timestep=model_timestep(student, b["t"]), layers=[2], **cond)
    assert method.is_active(0) and method(out.hidden_states, x_t=b["x_t"], t=b["t"], step=0, conditioning=cond)
    assert method(out.hidden_states, x_t=b["x_t"], t=b["t"], step=1, conditioning=cond) == {}
    assert method.teacher is None and method.student_layers == ()
    assert all(not blk._forward_hooks for blk in teacher.transformer_blocks)
    assert not any(p.requires_grad for p in method.projector.parameters())


def test_t2i_construction_and_call_errors():
    student, teacher = build("sd3", num_layers=3), build("sd3", seed=1, num_layers=4)
    with pytest.raises(ValueError, match="null_conditioning"):
        build_alignment("self_transcendence", student, teacher=teacher)
    with pytest.raises(ValueError, match="pixart transformer but the student is a sd3"):
        build_alignment("self_transcendence", student, teacher=build("pixart"), null_conditioning={"x": 1})
    method = build_alignment("self_transcendence", student, teacher=teacher, null_conditioning=null_conditioning("sd3"),
                             projector_dim=SMALL_PROJ)
    assert (method.guided_layer, method.guiding_layer, method.guidance_scale) == (2, 3, 5.0)  # n/2, 2n/3, T2I w
    b, cond, _ = batch("sd3")
    feats = {2: torch.zeros(3, 16, 32)}
    with pytest.raises(ValueError, match="needs x_t, t and `conditioning`"):
        method(feats, x_t=b["x_t"], t=b["t"], step=0)
    with pytest.raises(ValueError, match="keys"):
        method(feats, x_t=b["x_t"], t=b["t"], step=0, conditioning={"encoder_hidden_states": cond["encoder_hidden_states"]})
    bad = build_alignment("self_transcendence", student, teacher=teacher, projector_dim=SMALL_PROJ,
                          null_conditioning={**null_conditioning("sd3"), "encoder_hidden_states": torch.zeros(1, 7, 12)})
    with pytest.raises(ValueError, match="empty prompt's encoder_hidden_states has shape"):
        bad(feats, x_t=b["x_t"], t=b["t"], step=0, conditioning=cond)

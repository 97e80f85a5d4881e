"""Alignment losses: values against independent hand computations, the ST teacher contract, early stop, errors."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusers_selftrans import AlignmentProjector, SiTTransformer2DModel
from diffusers_selftrans.alignment import (
    ALIGNMENT_METHODS,
    AlignmentMethod,
    accepted_options,
    build_alignment,
    default_layers,
    reduce_over_batch,
)

SMALL_PROJ = 16  # projector width in tests (the real default is 2048)


# ----------------------------------------------------------------------------------------------------------- helpers
def make_batch(config, n=3, seed=0, t=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, config["in_channels"], config["sample_size"], config["sample_size"])
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = torch.rand(n, generator=g) if t is None else torch.as_tensor(t, dtype=torch.float32)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    y = torch.randint(0, config["num_classes"], (n,), generator=g)
    return dict(x0=x0, noise=noise, t=t, x_t=x_t, target=noise - x0, class_labels=y)


def set_constant_output(module: nn.Module, bias: torch.Tensor, last: nn.Linear):
    """Zero every Linear of `module`, then give `last` the bias `bias`: the module outputs `bias` for every token."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        last.bias.copy_(bias)


def random_features(n, t, d, layers, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, t, d, generator=g).to(dtype) for k in layers}


def np_cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def record_forward(module):
    """Wrap `module.forward` and return the list of recorded (args, kwargs, output)."""
    calls = []
    original = module.forward

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    module.forward = recording
    return calls


class CallCounter(nn.Module):
    """Stands in for a DDP wrapper around a trainable part."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def student_model(config, seed=1, **overrides):
    torch.manual_seed(seed)
    model = SiTTransformer2DModel(**{**config, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


# -------------------------------------------------------------------------------------------------- factory, layers
def test_default_layers_table():
    assert default_layers("vae_align", 12) == {"layer": 2}
    assert default_layers("vae_align", 28) == {"layer": 5}
    assert default_layers("self_transcendence", 12) == {"guided_layer": 6, "guiding_layer": 8}
    assert default_layers("self_transcendence", 24) == {"guided_layer": 12, "guiding_layer": 16}
    assert default_layers("self_transcendence", 28) == {"guided_layer": 14, "guiding_layer": 19}
    assert default_layers("repa", 28) == {"layer": 8}
    assert default_layers("repa", 4) == {"layer": 4}
    assert default_layers("sra", 12) == {"student_layer": 4, "teacher_layer": 8}
    assert default_layers("sra", 28) == {"student_layer": 8, "teacher_layer": 20}
    assert default_layers("layersync", 28) == {"weak_layer": 8, "target_layer": 16}
    assert default_layers("dispersive", 12) == {"layer": 12}
    assert default_layers("none", 12) == {}
    with pytest.raises(ValueError, match="Unknown alignment method"):
        default_layers("repa2", 12)


def test_build_alignment_none_and_unknown(tiny_sit_config):
    none = build_alignment("none", tiny_sit_config)
    assert isinstance(none, AlignmentMethod)
    assert none.student_layers == () and none.weights == {} and none({}) == {}
    assert list(none.parameters()) == []
    with pytest.raises(ValueError, match="Unknown alignment method"):
        build_alignment("nope", tiny_sit_config)
    assert set(ALIGNMENT_METHODS) == {"none", "vae_align", "self_transcendence", "repa", "sra", "layersync", "dispersive"}
    assert accepted_options("layersync") == ("weak_layer", "target_layer", "weight")
    assert "guide_stop_step" in accepted_options("self_transcendence")
    with pytest.raises(TypeError):
        build_alignment("layersync", tiny_sit_config, t_range=(0.4, 0.7))  # options are never silently dropped


def test_trainable_modules_per_method(tiny_sit_config):
    cfg = tiny_sit_config
    vae = build_alignment("vae_align", cfg, projector_dim=SMALL_PROJ)
    assert vae.trainable_modules() == [vae.projector]
    sra = build_alignment("sra", cfg)
    assert sra.trainable_modules() == [sra.head] and sra.head.net[0].weight.shape == (64, 32)
    for name in ("none", "layersync", "dispersive"):
        method = build_alignment(name, cfg)
        assert method.trainable_modules() == [] and list(method.parameters()) == []
    with pytest.raises(ValueError, match="trainable modules"):
        vae.set_trainable_modules([])


# ---------------------------------------------------------------------------------------------------------- t_range
def test_t_range_modes_match_method_notes_example():
    losses = torch.tensor([10.0, 2.0, 3.0, 40.0])
    t = torch.tensor([0.1, 0.5, 0.6, 0.9])
    # The released code's broadcasting, reproduced independently with numpy: (B,) * (B,1,1,1) -> (B,1,1,B), mean.
    L, m = losses.numpy(), ((t.numpy() >= 0.4) & (t.numpy() <= 0.7)).astype(np.float64)
    code = float(np.mean(L * m.reshape(4, 1, 1, 1)))
    assert code == pytest.approx(6.875)
    assert reduce_over_batch(losses, t, (0.4, 0.7), "code_compat").item() == pytest.approx(code)
    assert reduce_over_batch(losses, t, (0.4, 0.7), "per_sample").item() == pytest.approx((2 + 3) / 4)
    assert reduce_over_batch(losses, t, None).item() == pytest.approx(55 / 4)
    with pytest.raises(ValueError, match="t_range_mode"):
        build_alignment("vae_align", {"num_layers": 4}, t_range_mode="bogus")


# -------------------------------------------------------------------------------------------------------- vae_align
@pytest.mark.parametrize("align_target", ["velocity", "x0"])
def test_vae_align_value_and_unpatchify_layout(tiny_sit_config, align_target):
    cfg = tiny_sit_config
    method = build_alignment("vae_align", cfg, align_target=align_target, t_range=None, projector_dim=SMALL_PROJ)
    p, c = cfg["patch_size"], cfg["in_channels"]
    assert method.student_layers == (1,) and method.weights == {"vae_align": 0.5}
    bias = torch.arange(p * p * c, dtype=torch.float32) / 10
    set_constant_output(method.projector, bias, method.projector.head[1])  # LayerNorm(0) = 0 -> head outputs bias
    batch = make_batch(cfg)
    features = random_features(3, 16, 32, [1])
    got = method(features, **batch)["vae_align"]

    goal = (batch["target"] if align_target == "velocity" else batch["x0"]).numpy().astype(np.float64)
    n, _, h, w = goal.shape
    b = bias.numpy().astype(np.float64)
    total = 0.0
    for i in range(n):
        for ch in range(c):
            for r in range(h):
                for col in range(w):
                    # token (r//p, col//p) holds its patch as (p_row, p_col, channel), row-major
                    pred = b[(r % p) * p * c + (col % p) * c + ch]
                    total += (pred - goal[i, ch, r, col]) ** 2
    assert got.item() == pytest.approx(total / goal.size, rel=1e-5)


@pytest.mark.parametrize("mode, expected", [("per_sample", 1.25), ("code_compat", 6.875)])
def test_vae_align_t_range_end_to_end(tiny_sit_config, mode, expected):
    cfg = tiny_sit_config
    method = build_alignment("vae_align", cfg, t_range=(0.4, 0.7), t_range_mode=mode, projector_dim=SMALL_PROJ)
    set_constant_output(method.projector, torch.zeros(16), method.projector.head[1])  # predicts 0
    per_sample = torch.tensor([10.0, 2.0, 3.0, 40.0])
    target = per_sample.sqrt().view(4, 1, 1, 1).expand(4, 4, 8, 8).contiguous()  # MSE against 0 = per_sample
    t = torch.tensor([0.1, 0.5, 0.6, 0.9])
    got = method(random_features(4, 16, 32, [1]), t=t, target=target)["vae_align"]
    assert got.item() == pytest.approx(expected)


def test_vae_align_missing_target_and_feature(tiny_sit_config):
    method = build_alignment("vae_align", tiny_sit_config, layer=2, t_range=None, projector_dim=SMALL_PROJ)
    with pytest.raises(ValueError, match="needs `target`"):
        method(random_features(2, 16, 32, [2]))
    with pytest.raises(ValueError, match="block 2"):
        method(random_features(2, 16, 32, [1]), target=torch.zeros(2, 4, 8, 8))


# ----------------------------------------------------------------------------------------------- self_transcendence
def test_self_transcendence_value_against_separate_teacher_passes(tiny_sit, tiny_sit_config):
    cfg = tiny_sit_config
    student = student_model(cfg)
    method = build_alignment("self_transcendence", student.config, teacher=tiny_sit, t_range=None,
                             projector_dim=SMALL_PROJ)
    assert (method.guided_layer, method.guiding_layer, method.guidance_scale) == (2, 3, 30.0)
    assert method.weights == {"guide": 0.5}
    c = torch.linspace(-1, 1, 32)
    set_constant_output(method.projector, c, method.projector.mlp[4])
    batch = make_batch(cfg)
    out = student(batch["x_t"], batch["t"], batch["class_labels"], output_hidden_states=method.student_layers)
    got = method(out.hidden_states, step=0, **batch)["guide"]

    with torch.no_grad():  # conditional and unconditional features from two separate teacher calls
        f_c = tiny_sit(batch["x_t"], batch["t"], batch["class_labels"], stop_at_layer=3).hidden_states[3]
        null = torch.full_like(batch["class_labels"], cfg["num_classes"])
        f_u = tiny_sit(batch["x_t"], batch["t"], null, stop_at_layer=3).hidden_states[3]
    f_c, f_u = f_c.numpy().astype(np.float64), f_u.numpy().astype(np.float64)
    f_g = f_u + 30.0 * (f_c - f_u)
    expected = np.mean((c.numpy().astype(np.float64)[None, None, :] - f_g) ** 2)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_student_forward_and_guide_loss_read_no_label_values_off_the_host(tiny_sit, tiny_sit_config):
    # On an accelerator, reading a label value (int(t.max())) is a host sync every step. Meta tensors stand in for a
    # device: any such read raises "cannot be called on meta tensors".
    cfg = tiny_sit_config
    student = student_model(cfg).to("meta")
    method = build_alignment("self_transcendence", student.config, teacher=tiny_sit.to("meta"),
                             projector_dim=SMALL_PROJ, t_range=None).to("meta")
    batch = {k: v.to("meta") for k, v in make_batch(cfg).items()}
    out = student(batch["x_t"], batch["t"], batch["class_labels"], output_hidden_states=method.student_layers)
    loss = method(out.hidden_states, step=0, **batch)["guide"]
    assert loss.device.type == "meta" and loss.shape == ()


def test_self_transcendence_one_batched_teacher_pass_per_step(tiny_sit, tiny_sit_config):
    cfg = tiny_sit_config
    student = student_model(cfg)
    method = build_alignment("self_transcendence", student.config, teacher=tiny_sit, projector_dim=SMALL_PROJ)
    calls = record_forward(tiny_sit)
    for step in range(2):
        batch = make_batch(cfg, seed=step)
        out = student(batch["x_t"], batch["t"], batch["class_labels"], output_hidden_states=method.student_layers)
        method(out.hidden_states, step=step, **batch)
        assert len(calls) == step + 1
        args, kwargs, _ = calls[-1]
        x, t, labels = args
        assert x.shape == (6, 4, 8, 8)
        torch.testing.assert_close(x, torch.cat([batch["x_t"], batch["x_t"]]))
        torch.testing.assert_close(t, torch.cat([batch["t"], batch["t"]]))
        assert labels.tolist() == batch["class_labels"].tolist() + [cfg["num_classes"]] * 3
        assert kwargs["stop_at_layer"] == method.guiding_layer
    assert method.teacher_forwards == 2
    assert not tiny_sit.training


def test_self_transcendence_teacher_gets_no_gradient_and_is_never_updated(tiny_sit, tiny_sit_config):
    cfg = tiny_sit_config
    student = student_model(cfg).train()
    method = build_alignment("self_transcendence", student.config, teacher=tiny_sit, t_range=None,
                             projector_dim=SMALL_PROJ)
    method.train()
    assert not tiny_sit.training  # the teacher is not a submodule: train() does not reach it
    assert all(k.startswith("projector.") for k in method.state_dict())
    teacher_before = {k: v.clone() for k, v in tiny_sit.state_dict().items()}
    proj_before = [p.detach().clone() for p in method.projector.parameters()]
    opt = torch.optim.AdamW(list(student.parameters()) + list(method.parameters()), lr=1e-2)
    batch = make_batch(cfg)
    drop = torch.tensor([False, True, False])
    out = student(batch["x_t"], batch["t"], batch["class_labels"], output_hidden_states=method.student_layers,
                  force_drop_ids=drop.long())
    terms = method(out.hidden_states, force_drop_ids=drop, step=0, **batch)
    loss = (out.sample - batch["target"]).pow(2).mean() + sum(method.weights[k] * v for k, v in terms.items())
    loss.backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in tiny_sit.parameters())
    for k, v in tiny_sit.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(proj_before, method.projector.parameters()))


def test_self_transcendence_early_stop(tiny_sit, tiny_sit_config):
    cfg = tiny_sit_config
    student = student_model(cfg).train()
    method = build_alignment("self_transcendence", student.config, teacher=tiny_sit, t_range=None,
                             guide_stop_step=2, projector_dim=SMALL_PROJ)
    calls = record_forward(tiny_sit)
    # As accelerate would: the projector wrapped on its own (a DDP stand-in that counts its calls) and swapped back.
    (projector,) = method.trainable_modules()
    wrapped = CallCounter(projector)
    method.set_trainable_modules([wrapped])
    opt = torch.optim.AdamW(list(student.parameters()) + list(method.parameters()), lr=1e-2)
    snapshots = {}
    for step in range(5):
        active = method.is_active(step)
        assert active == (step < 2)
        batch = make_batch(cfg, seed=step)
        out = student(batch["x_t"], batch["t"], batch["class_labels"], output_hidden_states=method.student_layers)
        terms = method(out.hidden_states, step=step, **batch) if active else {}
        assert bool(terms) == active
        loss = (out.sample - batch["target"]).pow(2).mean() + sum(method.weights[k] * v for k, v in terms.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        snapshots[step] = [p.detach().clone() for p in method.projector.parameters()]
    assert method.teacher_forwards == 2 and len(calls) == 2
    assert wrapped.calls == 2  # the (DDP-wrapped) projector is not called after the stop
    assert method.student_layers == () and method.teacher is None
    assert all(not p.requires_grad and p.grad is None for p in method.projector.parameters())
    for a, b in zip(snapshots[2], snapshots[4]):  # optimizer steps after the stop leave the projector unchanged
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))
    # Calling it anyway after the stop returns nothing and runs nothing.
    assert method({}, step=7) == {} and len(calls) == 2


def test_self_transcendence_construction_errors(tiny_sit, tiny_sit_config):
    cfg = tiny_sit_config
    with pytest.raises(ValueError, match="sample_size"):
        build_alignment("self_transcendence", cfg, teacher=SiTTransformer2DModel(**{**cfg, "sample_size": 16}))
    with pytest.raises(ValueError, match="Token counts differ"):
        build_alignment("self_transcendence", cfg, teacher=SiTTransformer2DModel(**{**cfg, "patch_size": 4}))
    with pytest.raises(ValueError, match="num_classes differ"):
        build_alignment("self_transcendence", cfg, teacher=SiTTransformer2DModel(**{**cfg, "num_classes": 7}))
    with pytest.raises(ValueError, match="null class"):
        build_alignment("self_transcendence", cfg,
                        teacher=SiTTransformer2DModel(**{**cfg, "class_dropout_prob": 0.0}))
    with pytest.raises(ValueError, match=r"guiding_layer .*\[1, 4\]"):
        build_alignment("self_transcendence", cfg, teacher=tiny_sit, guiding_layer=5)
    with pytest.raises(ValueError, match="projector maps"):  # teacher hidden 48 vs a projector to 32
        wide = SiTTransformer2DModel(**{**cfg, "attention_head_dim": 24})
        build_alignment("self_transcendence", cfg, teacher=wide, projector=AlignmentProjector(32, 32, SMALL_PROJ))
    with pytest.raises(ValueError, match="guiding model"):
        build_alignment("self_transcendence", cfg, teacher=None)
    with pytest.raises(ValueError, match="teacher_autocast"):
        build_alignment("self_transcendence", cfg, teacher=tiny_sit, teacher_autocast=torch.float64)
    method = build_alignment("self_transcendence", cfg, teacher=tiny_sit, projector_dim=SMALL_PROJ)
    batch = make_batch(cfg)
    batch["class_labels"] = torch.tensor([1, cfg["num_classes"], 2])
    with pytest.raises(ValueError, match="true labels"):
        method(random_features(3, 16, 32, [2]), **batch)


def test_self_transcendence_guidance_scale_from_config_and_bf16_teacher(tiny_sit, tiny_sit_config):
    cfg = tiny_sit_config
    lightning = build_alignment("self_transcendence", {**cfg, "norm_type": "rms_norm"},
                                teacher=SiTTransformer2DModel(**cfg), projector_dim=SMALL_PROJ)
    assert lightning.guidance_scale == 10.0
    assert build_alignment("self_transcendence", {**cfg, "use_rope": True}, teacher=SiTTransformer2DModel(**cfg),
                           projector_dim=SMALL_PROJ).guidance_scale == 10.0
    assert build_alignment("self_transcendence", cfg, teacher=SiTTransformer2DModel(**cfg), guidance_scale=5.0,
                           projector_dim=SMALL_PROJ).guidance_scale == 5.0

    method = build_alignment("self_transcendence", cfg, teacher=tiny_sit, teacher_dtype=torch.bfloat16,
                             t_range=None, projector_dim=SMALL_PROJ)
    assert all(p.dtype == torch.bfloat16 for p in tiny_sit.parameters())
    batch = make_batch(cfg)
    f_g = method.guiding_features(batch["x_t"], batch["t"], batch["class_labels"])
    assert f_g.dtype == torch.float32 and f_g.shape == (3, 16, 32) and torch.isfinite(f_g).all()
    loss = method(random_features(3, 16, 32, [2]), **batch)["guide"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------------------- REPA
def tiny_dinov2(image_size=28, registers=0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    kwargs = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14,
                  image_size=image_size)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)).eval()
    return Dinov2Model(Dinov2Config(**kwargs)).eval()


def test_repa_value_with_tiny_dinov2(tiny_sit_config):
    cfg = tiny_sit_config
    encoder = tiny_dinov2()  # 2x2 position table: the 4x4 token grid needs the interpolation path
    method = build_alignment("repa", cfg, encoder=encoder, projector_dim=SMALL_PROJ)
    assert method.student_layers == (4,) and method.weights == {"repa": 0.5} and method.requires_pixel_values
    assert all(k.startswith("projector.") for k in method.state_dict())
    c = torch.linspace(-1, 2, 32)
    set_constant_output(method.projector, c, method.projector.mlp[4])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    got = method(random_features(2, 16, 32, [4]), pixel_values=pixels)["repa"]

    # Independent target: manual [0,1] + ImageNet normalisation, 14 * 4 = 56 px bicubic, drop the CLS token.
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    x = torch.from_numpy(((pixels.numpy() + 1) / 2 - mean) / std).float()
    x = torch.nn.functional.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False)
    with torch.no_grad():
        target = encoder(pixel_values=x).last_hidden_state[:, 1:].numpy().astype(np.float64)
    assert target.shape == (2, 16, 32)
    cvec = c.numpy().astype(np.float64)
    expected = -np.mean([[np_cos(cvec, target[i, j]) for j in range(16)] for i in range(2)])
    assert got.item() == pytest.approx(expected, rel=1e-5)

    with pytest.raises(ValueError, match="pixel_values"):
        method(random_features(2, 16, 32, [4]))


def test_repa_loads_encoder_with_automodel_offline(tmp_path, tiny_sit_config):
    encoder = tiny_dinov2(image_size=56)
    encoder.save_pretrained(tmp_path / "enc")
    from_disk = build_alignment("repa", tiny_sit_config, encoder=str(tmp_path / "enc"), layer=2, projector_dim=SMALL_PROJ)
    assert type(from_disk.encoder).__name__ == "Dinov2Model" and not from_disk.encoder.training
    assert all(not p.requires_grad for p in from_disk.encoder.parameters())
    in_memory = build_alignment("repa", tiny_sit_config, encoder=encoder, layer=2, projector_dim=SMALL_PROJ)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(from_disk.encoder_features(pixels), in_memory.encoder_features(pixels))


def test_repa_strips_register_tokens(tiny_sit_config):
    encoder = tiny_dinov2(image_size=56, registers=2)
    method = build_alignment("repa", tiny_sit_config, encoder=encoder, projector_dim=SMALL_PROJ)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = method.encoder_features(pixels)
    with torch.no_grad():
        full = encoder(pixel_values=method.preprocess(pixels)).last_hidden_state
    assert full.shape[1] == 1 + 2 + 16 and feats.shape == (2, 16, 32)
    torch.testing.assert_close(feats, full[:, 3:])


# -------------------------------------------------------------------------------------------------------------- SRA
@pytest.mark.parametrize("loss_type, cos_dim", [("cos", "tokens"), ("cos", "channels"), ("smooth_l1", "tokens")])
def test_sra_teacher_inputs_and_value(tiny_sit, tiny_sit_config, loss_type, cos_dim):
    cfg = tiny_sit_config
    method = build_alignment("sra", cfg, student_layer=1, teacher_layer=3, loss_type=loss_type, cos_dim=cos_dim)
    assert method.student_layers == (1,) and method.requires_teacher
    assert method.weights == {"sra": 0.5 if loss_type == "cos" else 0.2}
    c = torch.linspace(-1, 1, 32)
    set_constant_output(method.head, c, method.head.net[2])
    calls = record_forward(tiny_sit)
    batch = make_batch(cfg, n=4, t=[0.05, 0.3, 0.6, 0.95])
    drop = torch.tensor([False, True, False, True])
    got = method(random_features(4, 16, 32, [1]), force_drop_ids=drop, teacher=tiny_sit, **batch)["sra"]

    assert len(calls) == 1 and method.teacher_forwards == 1
    (x_tea, t_tea, labels), kwargs, out = calls[0]
    t = batch["t"]
    assert bool((t_tea <= t).all()) and bool((t_tea >= (t - 0.2).clamp(min=0) - 1e-7).all())
    assert bool((t_tea >= 0).all())
    tt = t_tea.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_tea, (1 - tt) * batch["x0"] + tt * batch["noise"])  # same x0, same noise
    assert labels.tolist() == batch["class_labels"].tolist()
    assert kwargs["force_drop_ids"].tolist() == [0, 1, 0, 1] and kwargs["stop_at_layer"] == 3

    target = out.hidden_states[3].numpy().astype(np.float64)  # (4, 16, 32)
    pred = np.broadcast_to(c.numpy().astype(np.float64), target.shape)
    if loss_type == "smooth_l1":
        d = np.abs(pred - target)
        expected = np.mean(np.where(d < 0.05, 0.5 * d**2 / 0.05, d - 0.5 * 0.05))
    elif cos_dim == "tokens":  # cosine between the token columns of each channel
        expected = np.mean([[1 - np_cos(pred[i, :, k], target[i, :, k]) for k in range(32)] for i in range(4)])
    else:
        expected = np.mean([[1 - np_cos(pred[i, j], target[i, j]) for j in range(16)] for i in range(4)])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_sra_shared_post_dropout_labels_and_errors(tiny_sit, tiny_sit_config):
    cfg = tiny_sit_config
    method = build_alignment("sra", cfg, student_layer=1, teacher_layer=3)
    batch = make_batch(cfg, n=2)
    drop = torch.tensor([True, False])
    emb_calls = record_forward(tiny_sit.y_embedder.embedding_table)
    method(random_features(2, 16, 32, [1]), force_drop_ids=drop, teacher=tiny_sit, **batch)
    used = emb_calls[0][0][0]  # the label ids the teacher actually embedded
    assert used.tolist() == [cfg["num_classes"], int(batch["class_labels"][1])]
    with pytest.raises(ValueError, match="teacher"):
        method(random_features(2, 16, 32, [1]), force_drop_ids=drop, **batch)
    with pytest.raises(ValueError, match="force_drop_ids"):
        method(random_features(2, 16, 32, [1]), teacher=tiny_sit, **batch)
    with pytest.raises(ValueError, match="cos_dim"):
        build_alignment("sra", cfg, cos_dim="time")


# -------------------------------------------------------------------------------------------------------- LayerSync
def test_layersync_value_and_detached_target(tiny_sit_config):
    method = build_alignment("layersync", tiny_sit_config)
    assert method.student_layers == (1, 2) and method.weights == {"layersync": 0.2}
    weak = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [3.0, -1.0]]], requires_grad=True)
    deep = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]], [[0.0, 5.0], [1.0, 3.0]]], requires_grad=True)
    got = method({1: weak, 2: deep})["layersync"]
    # cosines: (1,0).(1,1) = 1/sqrt2; (1,1).(-1,-1) = -1; (0,2).(0,5) = 1; (3,-1).(1,3) = 0
    assert got.item() == pytest.approx(-(1 / math.sqrt(2) - 1 + 1 + 0) / 4)
    got.backward()
    assert weak.grad is not None and deep.grad is None
    with pytest.raises(ValueError, match="shallower"):
        build_alignment("layersync", tiny_sit_config, weak_layer=3, target_layer=2)


# ------------------------------------------------------------------------------------------------------- Dispersive
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dispersive_value_includes_diagonal(tiny_sit_config, temperature):
    method = build_alignment("dispersive", tiny_sit_config, temperature=temperature)
    assert method.student_layers == (4,) and method.weights == {"dispersive": 0.25}
    z = torch.tensor([[[0.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]], [[0.5, -1.0], [1.0, 2.0]]])
    got = method({4: z})["dispersive"]
    flat = z.reshape(3, -1).numpy().astype(np.float64)
    terms = [math.exp(-np.sum((flat[i] - flat[j]) ** 2) / 4 / temperature) for i in range(3) for j in range(3)]
    assert got.item() == pytest.approx(math.log(sum(terms) / 9), rel=1e-6)


def test_dispersive_gradient_finite_with_duplicate_samples(tiny_sit_config):
    method = build_alignment("dispersive", tiny_sit_config)
    z = torch.tensor([[[1.0, 2.0]], [[1.0, 2.0]], [[0.0, 1.0]]], requires_grad=True)
    method({4: z})["dispersive"].backward()
    assert torch.isfinite(z.grad).all()


# ------------------------------------------------------------------------------------------------ fp32 under bf16
def test_losses_are_fp32_under_bf16_features(tiny_sit_config):
    cfg = tiny_sit_config
    bf16 = random_features(3, 16, 32, [1, 2, 4], seed=3, dtype=torch.bfloat16)
    fp32 = {k: v.float() for k, v in bf16.items()}
    batch = make_batch(cfg)
    torch.manual_seed(0)
    methods = [
        build_alignment("layersync", cfg),
        build_alignment("dispersive", cfg),
        build_alignment("vae_align", cfg, t_range=None, projector_dim=SMALL_PROJ),
    ]
    for method in methods:
        low = method(bf16, **batch)
        high = method(fp32, **batch)
        for name, value in low.items():
            assert value.dtype == torch.float32, name
            torch.testing.assert_close(value, high[name], rtol=1e-6, atol=1e-7)

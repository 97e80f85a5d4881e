"""LoRA in both stages (issue 28, items 1-3): adapters on the tiny transformers of each family, the stage-2 teacher
that shares the student's base (the stage-1 adapter, or the base itself) against hand computations with separate
merged / plain teachers, gradients, refusals, diffusers-format save -> `load_lora_weights`, EMA and exact resume."""

import copy
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import diffusers  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from diffusers_selftrans import lora as L  # noqa: E402
from diffusers_selftrans.alignment import build_alignment  # noqa: E402
from diffusers_selftrans.models.block_features import BlockFeatures, model_timestep  # noqa: E402
from diffusers_selftrans.provenance import ProvenanceError, module_digest  # noqa: E402
from diffusers_selftrans.transport import interpolate  # noqa: E402
from tiny_transformers import block_output, build, conditioning, latents, null_conditioning  # noqa: E402

PIPELINES = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline,
             "pixart": diffusers.PixArtSigmaPipeline, "sana": diffusers.SanaPipeline}
W = 5.0
N = 2


def randomize(model, adapter_name, seed, std=0.2):
    """Random adapter weights (peft starts B at zero, so a fresh adapter would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in L.adapter_parameters(model, adapter_name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def merged_copy(base, adapted, adapter_name):
    """A separate plain model: `base`'s weights plus (alpha / r) B A of `adapted`'s adapter, merged by hand."""
    merged = copy.deepcopy(base)
    config = adapted.peft_config[adapter_name]
    scale = config.lora_alpha / config.r
    layers = dict(merged.named_modules())
    for name, module in adapted.named_modules():
        if adapter_name in getattr(module, "lora_A", {}):
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            with torch.no_grad():
                weight = layers[name].weight
                weight += scale * (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)
    return merged.eval()


def batch(family, seed=0):
    x0, noise = latents(family, N, seed=seed), latents(family, N, seed=seed + 1)
    t = torch.tensor([0.3, 0.7])
    cond, static = conditioning(family, N)
    return interpolate(x0, noise, t), t, cond, static


def stage1_folder(tmp_path, family, base, seed=1, rank=4, alpha=8.0):
    """What stage 1 leaves: an adapter trained on `base`, in diffusers' LoRA format."""
    stage1 = copy.deepcopy(base)
    L.add_lora(stage1, rank, alpha=alpha, adapter_name="student")
    randomize(stage1, "student", seed)
    folder = L.save_lora(tmp_path / f"stage1_{family}", PIPELINES.get(family), stage1, "student")
    return stage1, folder


def student_with_adapter(base, seed=2):
    student = copy.deepcopy(base)
    L.add_lora(student, 2, adapter_name="student")
    randomize(student, "student", seed, std=0.05)
    return student.train()


def guided_loss(student, teacher, family):
    method = build_alignment("self_transcendence", student, teacher=teacher, guided_layer=2, guiding_layer=3,
                             guidance_scale=W, t_range=None, projector_dim=16,
                             null_conditioning=null_conditioning(family))
    x_t, t, cond, static = batch(family)
    features = BlockFeatures(student)
    out = features(x_t, timestep=model_timestep(student, t), layers=[2], **cond, **static)
    features.close()
    loss = method(out.hidden_states, x_t=x_t, t=t, step=0, conditioning=cond, model_kwargs=static)["guide"]
    return method, out, loss


def expected_loss(method, out, plain_teacher, family):
    """The stage-2 loss by hand, with a separate plain model as the teacher: two full forwards."""
    x_t, t, cond, static = batch(family)
    null = {k: v.expand(N, *v.shape[1:]) for k, v in null_conditioning(family).items()}
    f_c = block_output(plain_teacher, 3, x_t, t, {**cond, **static})
    f_u = block_output(plain_teacher, 3, x_t, t, {**null, **static})
    prediction = method.projector(out.hidden_states[2]).detach()
    return (prediction - (f_u + W * (f_c - f_u))).pow(2).mean()


def student_output(model, family):
    x_t, t, cond, static = batch(family)
    with torch.no_grad():
        return model(x_t, timestep=model_timestep(model, t), **cond, **static).sample


def check_gradients(student, method, teacher_adapter):
    """Gradients reach the student's adapter and the projector only; flags are as before the teacher pass."""
    for name, p in student.named_parameters():
        owner = L.adapter_of(name)
        if owner == "student":
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in L.adapter_parameters(student, "student"))
    assert all(p.grad is not None for p in method.projector.parameters())
    assert L.active_adapters(student) == ["student"] and student.training
    if teacher_adapter is not None:
        assert all(not p.requires_grad for p in L.adapter_parameters(student, teacher_adapter))


# --- item 1: adapters ---------------------------------------------------------------------------------------------
BLOCK_ZERO = {  # the adapted modules of block 0 (of the first block list), by family
    "sd3": {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
            "ff_context.net.2"},
    "pixart": {f"attn{i}.{n}" for i in (1, 2) for n in ("to_q", "to_k", "to_v", "to_out.0")}
    | {"ff.net.0.proj", "ff.net.2"},
    "sana": {f"attn{i}.{n}" for i in (1, 2) for n in ("to_q", "to_k", "to_v", "to_out.0")}
    | {"ff.conv_inverted", "ff.conv_point"},
    "lumina2": {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "feed_forward.linear_1",
                "feed_forward.linear_2", "feed_forward.linear_3"},
}


@pytest.mark.parametrize("family", sorted(L.DEFAULT_TARGET_MODULES))
def test_default_targets_are_the_blocks_attention_and_feed_forward(family):
    model = build(family, num_layers=4)
    names = L.lora_target_modules(model)
    blocks = L.transformer_family(model).block_lists
    layers = dict(model.named_modules())
    assert all(name.split(".")[0] in blocks and isinstance(layers[name], (torch.nn.Linear, torch.nn.Conv2d))
               for name in names)
    first = {name.split(".", 2)[2] for name in names if name.startswith(f"{blocks[0]}.0.")}
    if family in BLOCK_ZERO:
        assert first == BLOCK_ZERO[family]
    else:
        assert any("to_q" in n or "qkv" in n for n in first) and len(first) >= 6
    if family == "flux":  # single-stream blocks: q/k/v, MLP in, joint out; never the final layer's proj_out
        single = {name.split(".", 2)[2] for name in names if name.startswith("single_transformer_blocks.0.")}
        assert single == {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"} and "proj_out" not in names
    assert len(names) == len(set(names))


@pytest.mark.parametrize("family", ("sd3", "pixart"))
def test_add_lora_trains_only_the_adapter_and_starts_as_the_base(family):
    base = build(family, num_layers=3)
    model = copy.deepcopy(base).train()
    config = L.add_lora(model, 4, alpha=2.0, target_modules=["to_q", "ff.net.2"])
    assert (config.r, config.lora_alpha) == (4, 2.0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(L.adapter_of(name) == "student" for name in trainable)
    lora_layers = L.adapted_modules(model, "student")
    assert sorted(lora_layers) == sorted(L.lora_target_modules(base, ["to_q", "ff.net.2"]))
    assert len(trainable) == 2 * len(lora_layers)
    torch.testing.assert_close(student_output(model, family), student_output(base, family))  # B = 0 at start
    x_t, t, cond, static = batch(family)
    model(x_t, timestep=model_timestep(model, t), **cond, **static).sample.pow(2).mean().backward()
    assert all(p.grad is None for name, p in model.named_parameters() if L.adapter_of(name) is None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in L.adapter_parameters(model, "student"))
    with pytest.raises(ValueError, match="'attn.to_qq'.*match no Linear"):
        L.add_lora(copy.deepcopy(base), 4, target_modules=["attn.to_qq"])
    with pytest.raises(ValueError, match="already has an adapter named 'student'"):
        L.add_lora(model, 4)
    with pytest.raises(ValueError, match="positive int"):
        L.add_lora(copy.deepcopy(base), 0)


def test_dora_option_builds_trains_its_magnitudes_and_saves(tmp_path):
    base = build("sd3", num_layers=3)
    model = copy.deepcopy(base)
    config = L.add_lora(model, 2, use_dora=True)
    assert config.use_dora
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names) and all(L.adapter_of(n) == "student" for n in names)
    torch.testing.assert_close(student_output(model, "sd3"), student_output(base, "sd3"))
    randomize(model, "student", 3, std=0.05)
    with torch.no_grad():  # magnitudes near the base's column norms, so the adapted model stays finite
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.abs_().add_(0.5)
    L.save_lora(tmp_path / "dora", PIPELINES["sd3"], model, "student")
    other = copy.deepcopy(base)
    assert L.load_lora(other, tmp_path / "dora", "guide").use_dora
    torch.testing.assert_close(student_output(other, "sd3"), student_output(model, "sd3"), rtol=0, atol=1e-6)


def test_base_digest_ignores_adapters_and_precision_but_not_weights():
    base = build("sd3", num_layers=3)
    digest = L.base_digest(base)
    adapted = copy.deepcopy(base)
    L.add_lora(adapted, 2)
    randomize(adapted, "student", 0)
    assert L.base_digest(adapted) == digest
    assert L.base_digest(copy.deepcopy(base).to(torch.bfloat16)) == digest
    with torch.no_grad():
        adapted.transformer_blocks[0].attn.to_q.base_layer.weight[0, 0] += 1.0
    assert L.base_digest(adapted) != digest
    assert module_digest(base) != module_digest(adapted)  # the plain digest sees peft's renamed layers


def test_digests_of_tensors_beyond_float32_integers():
    """SD3.5's positional buffer (226M values) crashed every digest: float32 indices rounded past the last value."""
    from diffusers_selftrans.provenance import DIGEST_VALUES_PER_TENSOR, sampled_values, tensors_digest

    big = torch.arange(2 ** 24 + 4, dtype=torch.float64)  # float32 rounds the last index, 2**24 + 3, up to 2**24 + 4
    with pytest.raises(IndexError):  # what the float32 indices did
        big[torch.linspace(0, big.numel() - 1, DIGEST_VALUES_PER_TENSOR).long()]
    values = sampled_values(big)
    assert len(values) == DIGEST_VALUES_PER_TENSOR and values[0] == 0 and values[-1] == 2 ** 24 + 3
    assert tensors_digest([("pos_embed", big)]) != tensors_digest([("pos_embed", big + 1)])
    small = torch.arange(5000, dtype=torch.float32)  # below 2**24: the indices (and recorded digests) as before
    expected = small[torch.linspace(0, 4999, DIGEST_VALUES_PER_TENSOR).long()]
    torch.testing.assert_close(sampled_values(small), expected, rtol=0, atol=0)


# --- item 2: the teacher on the student's own base -----------------------------------------------------------------
@pytest.mark.parametrize("family", ("sd3", "pixart", "flux"))
def test_stage2_loss_with_the_stage1_adapter_as_teacher_equals_a_merged_teacher(tmp_path, family):
    base = build(family, num_layers=4)
    stage1, folder = stage1_folder(tmp_path, family, base)
    student = student_with_adapter(base)
    before = student_output(student, family)
    assert L.load_lora(student, folder, "guide").r == 4
    teacher = L.AdapterTeacher(student, "guide")
    method, out, loss = guided_loss(student, teacher, family)
    expected = expected_loss(method, out, merged_copy(base, stage1, "student"), family)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    check_gradients(student, method, "guide")
    assert all(p.grad is None for p in L.adapter_parameters(student, "guide"))
    torch.testing.assert_close(student_output(student, family), before)  # the student's adapter is back
    # the guide stop releases the teacher's hooks and context, and leaves both adapters on the model
    method.stop()
    assert method.teacher is None and method.teacher_context is None
    assert all(not blk._forward_hooks for blk in student.transformer_blocks[1:])
    assert set(student.peft_config) == {"student", "guide"}


@pytest.mark.parametrize("family", ("sd3", "pixart"))
def test_base_as_teacher_equals_the_plain_base(family):
    base = build(family, num_layers=4)
    student = student_with_adapter(base)
    before = student_output(student, family)
    method, out, loss = guided_loss(student, L.AdapterTeacher(student, adapter_name=None), family)
    torch.testing.assert_close(loss.detach(), expected_loss(method, out, base, family), rtol=1e-4, atol=1e-6)
    loss.backward()
    check_gradients(student, method, None)
    torch.testing.assert_close(student_output(student, family), before)


def test_teacher_and_student_passes_run_on_the_same_base_tensors(tmp_path):
    base = build("sd3", num_layers=4)
    _, folder = stage1_folder(tmp_path, "sd3", base)
    student = student_with_adapter(base)
    L.load_lora(student, folder, "guide")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    adapters = sum(p.numel() for a in ("student", "guide") for p in L.adapter_parameters(student, a))
    assert count(student) == count(base) + adapters  # one base
    layer = student.transformer_blocks[0].attn.to_q
    layer.lora_A["student"].weight.requires_grad_(False)  # a frozen part of the student's adapter stays frozen
    calls = []
    layer.base_layer.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].shape[0], m.weight.data_ptr(), tuple(layer.active_adapters),
                                      torch.is_grad_enabled())))
    method, out, loss = guided_loss(student, L.AdapterTeacher(student, "guide"), "sd3")
    ptr = layer.base_layer.weight.data_ptr()
    assert calls == [(N, ptr, ("student",), True), (2 * N, ptr, ("guide",), False)]  # one batched no-grad pass
    assert method.teacher is student and method.teacher_forwards == 1
    trainable = [p for p in L.adapter_parameters(student, "student") if p.requires_grad]
    assert len(trainable) == len(L.adapter_parameters(student, "student")) - 1
    assert not layer.lora_A["student"].weight.requires_grad


# --- refusals ----------------------------------------------------------------------------------------------------
def test_refusals_name_what_differs(tmp_path):
    base = build("sd3", num_layers=4)
    _, folder = stage1_folder(tmp_path, "sd3", base)
    with pytest.raises(ValueError, match=r"SD3Transformer2DModel \(sd3 family\), not of this "
                                         r"PixArtTransformer2DModel \(pixart family\)"):
        L.load_lora(build("pixart", num_layers=4), folder)
    with pytest.raises(ProvenanceError, match="base_digest: .* \\(there\\) vs .* \\(this run\\).*other base weights"):
        L.load_lora(build("sd3", seed=7, num_layers=4), folder)
    with pytest.raises(ValueError, match="does not fit this transformer's layers"):
        L.load_lora(build("sd3", num_layers=3), folder)
    wide = build("sd3", num_layers=4)
    wide.transformer_blocks[0].attn.to_q = torch.nn.Linear(32, 64)
    with pytest.raises(ValueError, match="attn.to_q: adapter 32 -> 32 features, layer 32 -> 64"):
        L.load_lora(wide, folder)
    record_path = folder / L.LORA_RECORD_NAME
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "lora": {**record["lora"], "r": 8}}))
    with pytest.raises(ValueError, match=r"holds rank \[4\] adapters but its record states rank 8"):
        L.load_lora(copy.deepcopy(base), folder)
    targets = record["lora"]["target_modules"]
    record_path.write_text(json.dumps({**record, "lora": {**record["lora"], "target_modules": targets[1:]}}))
    with pytest.raises(ValueError, match="adapts other modules than its record lists"):
        L.load_lora(copy.deepcopy(base), folder)
    record_path.unlink()
    with pytest.raises(ValueError, match="not written by save_lora"):
        L.load_lora(copy.deepcopy(base), folder)
    # the teacher and its wiring into the stage-2 loss
    with pytest.raises(ValueError, match="no adapter: add the student's"):
        L.AdapterTeacher(copy.deepcopy(base), None)
    student = student_with_adapter(base)
    with pytest.raises(ValueError, match="no adapter named 'guide'"):
        L.AdapterTeacher(student, "guide")
    with pytest.raises(RuntimeError, match="is the active"):
        with L.AdapterTeacher(student, "student").context():
            pass
    options = dict(null_conditioning=null_conditioning("sd3"), projector_dim=16)
    with pytest.raises(ValueError, match="teacher_dtype casts"):
        build_alignment("self_transcendence", student, teacher=L.AdapterTeacher(student, None),
                        teacher_dtype=torch.bfloat16, **options)
    with pytest.raises(ValueError, match="student's own transformer"):
        build_alignment("self_transcendence", copy.deepcopy(student), teacher=L.AdapterTeacher(student, None),
                        **options)


# --- item 3: diffusers format, EMA, resume ----------------------------------------------------------------------
def test_saved_ema_adapter_loads_with_load_lora_weights_into_the_base_pipeline(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import convergence_t2i

    pipe_folder = convergence_t2i.write_tiny_t2i_pipeline(tmp_path / "pipe", "sd3")
    model = diffusers.SD3Transformer2DModel.from_pretrained(pipe_folder, subfolder="transformer")
    L.add_lora(model, 4, alpha=2.0)
    params = L.adapter_parameters(model, "student")
    ema = L.adapter_ema(model, "student", decay=0.5)
    for step in range(3):  # "training": new adapter weights, then an EMA step
        randomize(model, "student", step)
        ema.step(params)
    trained = [p.detach().clone() for p in params]
    L.save_lora(tmp_path / "out", diffusers.StableDiffusion3Pipeline, model, "student", ema=ema)
    assert all(torch.equal(p, q) for p, q in zip(params, trained))  # the trained weights are back

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(N, cfg.in_channels, 8, 8, generator=g), timestep=torch.tensor([300., 700.]),
                  encoder_hidden_states=torch.randn(N, 5, cfg.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(N, cfg.pooled_projection_dim, generator=g))
    ema.copy_to(params)  # what the output folder should hold: the EMA weights
    with torch.no_grad():
        expected = model(**inputs).sample
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(pipe_folder)
    with torch.no_grad():
        plain = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(tmp_path / "out")
        got = pipe.transformer(**inputs).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3  # the adapter changes the output


@pytest.mark.parametrize("family", ("flux", "sana"))
def test_load_lora_weights_of_other_families(tmp_path, family):
    base = build(family, num_layers=3)
    adapted, folder = stage1_folder(tmp_path, family, base)
    pipeline_cls = PIPELINES[family]
    components = {name: None for name in inspect.signature(pipeline_cls.__init__).parameters if name != "self"}
    pipe = pipeline_cls(**{**components, "transformer": copy.deepcopy(base)})  # the transformer is all it needs
    pipe.load_lora_weights(folder)
    torch.testing.assert_close(student_output(pipe.transformer, family), student_output(adapted, family),
                               rtol=0, atol=1e-6)


def test_exact_resume_of_adapter_and_ema():
    base = build("sd3", num_layers=3)
    model = copy.deepcopy(base)
    L.add_lora(model, 2)
    randomize(model, "student", 0)
    ema = L.adapter_ema(model, "student", decay=0.9, foreach=True)
    ema.step(L.adapter_parameters(model, "student"))
    state, ema_state = L.adapter_state_dict(model), copy.deepcopy(ema.state_dict())

    resumed = copy.deepcopy(base)
    L.add_lora(resumed, 2)
    L.load_adapter_state_dict(resumed, state)
    resumed_ema = L.adapter_ema(resumed, "student", decay=0.9, foreach=True)
    resumed_ema.load_state_dict(ema_state)
    assert all(torch.equal(p, q) for p, q in zip(L.adapter_parameters(model, "student"),
                                                 L.adapter_parameters(resumed, "student")))
    assert all(torch.equal(p, q) for p, q in zip(ema.shadow_params, resumed_ema.shadow_params))
    assert ema.optimization_step == resumed_ema.optimization_step == 1
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    torch.testing.assert_close(student_output(resumed, "sd3"), student_output(model, "sd3"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match adapter 'student'.*missing \\['transformer_blocks"):
        L.load_adapter_state_dict(resumed, {k: v for k, v in list(state.items())[1:]})
    other_rank = copy.deepcopy(base)
    L.add_lora(other_rank, 3)
    with pytest.raises(ValueError, match=r"another rank.*lora_A.weight: \(2, 32\) saved vs \(3, 32\) here"):
        L.load_adapter_state_dict(other_rank, state)
    assert isinstance(ema, EMAModel)


def test_ema_weights_swaps_the_ema_adapter_in_and_restores_weights_and_modes():
    model = build("sd3", num_layers=3)
    L.add_lora(model, 2)
    model.train()
    params = L.adapter_parameters(model, "student")
    ema = L.adapter_ema(model, "student", decay=0.5)
    randomize(model, "student", 0)
    ema.step(params)  # shadow = 0.5 (start) + 0.5 (randomized)
    trained = [p.detach().clone() for p in params]
    with L.ema_weights(model, ema) as module:
        assert module is model and not model.training and not model.transformer_blocks[0].training
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow_params))
        assert not all(torch.equal(p, q) for p, q in zip(params, trained))
    assert model.training and model.transformer_blocks[0].training
    assert all(torch.equal(p, q) for p, q in zip(params, trained))
    with pytest.raises(RuntimeError, match="sampling failed"):
        with L.ema_weights(model, ema):
            raise RuntimeError("sampling failed")
    assert model.training and all(torch.equal(p, q) for p, q in zip(params, trained))

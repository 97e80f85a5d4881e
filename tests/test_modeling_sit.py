"""SiTTransformer2DModel: config/safetensors round trip, presets, features and early exit, label dropout, gradient
checkpointing, time conventions, LightningDiT options, the fixed embeddings against independent references, and every
input check. CPU, tiny configs (the `tiny_sit` fixture from conftest.py)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusers_selftrans import SiTTransformer2DModel
from diffusers_selftrans.models import transformer_sit
from diffusers_selftrans.models.transformer_sit import (
    SIT_PATCH_SIZES,
    SIT_SIZES,
    apply_rope,
    parse_preset,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)

# Parameter counts of the reference SiT models (DiT/SiT papers: 130M, 458M, 675M), pos_embed excluded.
REFERENCE_PARAMS_M = {"SiT-B/2": 130.3, "SiT-L/2": 457.8, "SiT-XL/2": 674.8}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one thread is faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model, seed=0, scale=0.05):
    """Un-zero the adaLN-Zero and output layers so every weight reaches the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def make_inputs(config, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config["in_channels"], config["sample_size"], config["sample_size"], generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, config["num_classes"], (n,), generator=g)
    return x, t, y


def manual_blocks(model, x, t, y, upto):
    """Block outputs recomputed from the model's submodules, outside `forward`."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder.embedding_table(y)
    outs = {}
    for i, block in enumerate(model.blocks[:upto], start=1):
        h = block(h, c, model.rope)
        outs[i] = h
    return outs, c


def mae_pos_embed(dim, grid):
    """MAE `get_2d_sincos_pos_embed` re-derived in numpy: meshgrid(w, h), first half of the channels encode w."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


# ---------------------------------------------------------------------------------------------------------- config


def test_save_load_round_trip(tiny_sit, tmp_path):
    tiny_sit.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert "pos_embed" not in saved  # recomputed from the config, never stored
    assert "blocks.0.attn.qkv.weight" in saved and "t_embedder.mlp.2.weight" in saved  # REPA names
    loaded = SiTTransformer2DModel.from_pretrained(tmp_path).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(tiny_sit.config)
    x, t, y = make_inputs(dict(tiny_sit.config))
    with torch.no_grad():
        a = tiny_sit(x, t, y, output_hidden_states=[2])
        b = loaded(x, t, y, output_hidden_states=[2])
    assert torch.equal(a.sample, b.sample) and torch.equal(a.hidden_states[2], b.hidden_states[2])


@pytest.mark.parametrize("size", list(SIT_SIZES))
@pytest.mark.parametrize("patch", SIT_PATCH_SIZES)
def test_parse_preset(size, patch):
    depth, hidden, heads = SIT_SIZES[size]
    cfg = parse_preset(f"SiT-{size}/{patch}")
    assert cfg == dict(num_layers=depth, num_attention_heads=heads, attention_head_dim=hidden // heads, patch_size=patch)
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == hidden


def test_preset_values_and_errors():
    assert SIT_SIZES == {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for bad in ("SiT-XL/3", "SiT-H/2", "DiT-XL/2", "SiT-XL"):
        with pytest.raises(ValueError, match="Unknown SiT preset"):
            parse_preset(bad)


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS_M))
def test_real_parameter_counts_on_meta_device(name):
    with torch.device("meta"):
        model = SiTTransformer2DModel.from_preset(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == REFERENCE_PARAMS_M[name]
    assert model.hidden_size == SIT_SIZES[name.split("-")[1].split("/")[0]][1]


def test_sit_s2_builds_and_runs():
    model = SiTTransformer2DModel.from_preset("SiT-S/2", sample_size=8, num_classes=10).eval()
    assert model.hidden_size == 384 and len(model.blocks) == 12
    x, t, y = make_inputs(dict(model.config), n=2)
    with torch.no_grad():
        out = model(x, t, y, output_hidden_states=[6])
    assert out.sample.shape == (2, 4, 8, 8) and out.hidden_states[6].shape == (2, 16, 384)


@pytest.mark.parametrize("patch", SIT_PATCH_SIZES)
def test_output_shapes_per_patch_size(tiny_sit_config, patch):
    cfg = {**tiny_sit_config, "patch_size": patch}
    model = randomize(SiTTransformer2DModel(**cfg))
    x, t, y = make_inputs(cfg, n=2)
    with torch.no_grad():
        out = model(x, t, y, output_hidden_states=[1])
    tokens = (cfg["sample_size"] // patch) ** 2
    assert out.sample.shape == x.shape
    assert out.hidden_states[1].shape == (2, tokens, model.hidden_size)
    assert model.pos_embed.shape == (1, tokens, model.hidden_size)


def test_patchify_unpatchify_inverse():
    x = torch.randn(2, 4, 8, 8)
    for p in (1, 2, 4, 8):
        tokens = patchify(x, p)
        assert tokens.shape == (2, (8 // p) ** 2, p * p * 4)
        assert torch.equal(unpatchify(tokens, p, 4), x)
    # Token (0, 1) holds the patch at rows 0..1, columns 2..3 in (p, q, c) order (REPA `nchpwq->nhwpqc`).
    assert torch.equal(patchify(x, 2)[:, 1], x[:, :, 0:2, 2:4].permute(0, 2, 3, 1).reshape(2, -1))


# ----------------------------------------------------------------------------------------------- features / exit


def test_features_equal_block_outputs_and_sample_unchanged(tiny_sit):
    x, t, y = make_inputs(dict(tiny_sit.config))
    with torch.no_grad():
        plain = tiny_sit(x, t, y)
        out = tiny_sit(x, t, y, output_hidden_states=(1, 3, 4))
        manual, c = manual_blocks(tiny_sit, x, t, y, upto=4)
    assert plain.hidden_states is None
    assert sorted(out.hidden_states) == [1, 3, 4]
    for k in (1, 3, 4):
        torch.testing.assert_close(out.hidden_states[k], manual[k], rtol=0, atol=1e-6)
    assert torch.equal(out.sample, plain.sample)
    # The sample is the final layer on the last block's output.
    final = unpatchify(tiny_sit.final_layer(manual[4], c), 2, 4)
    torch.testing.assert_close(plain.sample, final, rtol=0, atol=1e-6)
    sample, hidden = tiny_sit(x, t, y, output_hidden_states=[2], return_dict=False)
    assert torch.equal(sample, plain.sample) and list(hidden) == [2]


def test_stop_at_layer_equals_truncated_forward(tiny_sit):
    x, t, y = make_inputs(dict(tiny_sit.config))
    with torch.no_grad():
        manual, _ = manual_blocks(tiny_sit, x, t, y, upto=2)
        early = tiny_sit(x, t, y, stop_at_layer=2)
        both = tiny_sit(x, t, y, stop_at_layer=3, output_hidden_states=[1, 2])
        full = tiny_sit(x, t, y, output_hidden_states=[2])
    assert early.sample is None and list(early.hidden_states) == [2]
    torch.testing.assert_close(early.hidden_states[2], manual[2], rtol=0, atol=1e-6)
    assert torch.equal(early.hidden_states[2], full.hidden_states[2])
    assert sorted(both.hidden_states) == [1, 2] and both.sample is None
    assert tiny_sit(x, t, y, stop_at_layer=1, return_dict=False)[0] is None


def test_stop_at_layer_runs_fewer_blocks(tiny_sit, monkeypatch):
    calls = []
    original = transformer_sit.SiTBlock.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformer_sit.SiTBlock, "forward", counting)
    x, t, y = make_inputs(dict(tiny_sit.config))
    counts = {}
    with torch.no_grad():
        for k in (1, 2, 3, None):
            calls.clear()
            tiny_sit(x, t, y, stop_at_layer=k)
            counts[k] = len(calls)
    assert counts == {1: 1, 2: 2, 3: 3, None: 4}


def test_timestep_scalar_and_tensor_agree(tiny_sit):
    x, _, y = make_inputs(dict(tiny_sit.config))
    with torch.no_grad():
        a = tiny_sit(x, 0.3, y).sample
        b = tiny_sit(x, torch.full((3,), 0.3), y).sample
        c = tiny_sit(x, torch.tensor(0.3), y).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- label dropout


def test_label_dropout_only_in_train_mode(tiny_sit_config):
    model = randomize(SiTTransformer2DModel(**{**tiny_sit_config, "class_dropout_prob": 1.0}))  # always drop in train
    x, t, y = make_inputs(tiny_sit_config)
    null = torch.full_like(y, tiny_sit_config["num_classes"])
    with torch.no_grad():
        cond = model(x, t, y).sample
        uncond = model(x, t, null).sample
        assert not torch.allclose(cond, uncond)
        model.train()
        torch.testing.assert_close(model(x, t, y).sample, uncond, rtol=0, atol=0)  # every label dropped
        # force_drop_ids replaces the random draw: zeros keep every label even at p=1.
        kept = model(x, t, y, force_drop_ids=torch.zeros_like(y)).sample
        torch.testing.assert_close(kept, cond, rtol=0, atol=0)
        model.eval()
        mixed = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1])).sample
    torch.testing.assert_close(mixed[[0, 2]], uncond[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1], cond[1], rtol=0, atol=0)


def test_train_mode_dropout_rate_is_partial(tiny_sit):
    # p=0.1 in train mode: some labels dropped, most kept (512 draws, seeded).
    tiny_sit.train()
    y = torch.arange(512) % 10
    torch.manual_seed(0)
    emb = tiny_sit.y_embedder(y)
    null_row = tiny_sit.y_embedder.embedding_table.weight[10]
    dropped = (emb == null_row).all(dim=1).float().mean().item()
    assert 0.05 < dropped < 0.15


# ------------------------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_same_grads(tiny_sit_config):
    torch.manual_seed(0)
    a = randomize(SiTTransformer2DModel(**tiny_sit_config)).train()
    b = SiTTransformer2DModel(**tiny_sit_config).train()
    b.load_state_dict(a.state_dict())
    b.enable_gradient_checkpointing()
    assert b.gradient_checkpointing
    calls = []
    inner = b._gradient_checkpointing_func
    b._gradient_checkpointing_func = lambda *args: calls.append(1) or inner(*args)
    x, t, y = make_inputs(tiny_sit_config)
    drop = torch.tensor([0, 1, 0])  # shared dropout draw, so both see the same labels
    grads = []
    for model in (a, b):
        out = model(x, t, y, force_drop_ids=drop, output_hidden_states=[2])
        (out.sample.square().mean() + out.hidden_states[2].mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == tiny_sit_config["num_layers"]
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)
    assert grads[0]["blocks.0.attn.qkv.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ time / outputs


def test_sit_time_convention_is_negated_output_at_one_minus_t(tiny_sit_config):
    repa = randomize(SiTTransformer2DModel(**tiny_sit_config))
    sit = SiTTransformer2DModel(**tiny_sit_config, time_convention="sit").eval()
    sit.load_state_dict(repa.state_dict())
    x, t, y = make_inputs(tiny_sit_config)
    with torch.no_grad():
        torch.testing.assert_close(sit(x, t, y).sample, -repa(x, 1 - t, y).sample, rtol=0, atol=0)
        # Features see the converted time too.
        torch.testing.assert_close(sit(x, t, y, stop_at_layer=2).hidden_states[2], repa(x, 1 - t, y, stop_at_layer=2).hidden_states[2])


def test_learn_sigma_keeps_first_half(tiny_sit_config):
    model = randomize(SiTTransformer2DModel(**tiny_sit_config, learn_sigma=True))
    assert model.final_layer.linear.out_features == 2 * 2 * 8
    x, t, y = make_inputs(tiny_sit_config)
    with torch.no_grad():
        out = model(x, t, y).sample
        manual, c = manual_blocks(model, x, t, y, upto=4)
        full = unpatchify(model.final_layer(manual[4], c), 2, 8)
    assert out.shape == (3, 4, 8, 8)
    torch.testing.assert_close(out, full[:, :4], rtol=0, atol=1e-6)


def test_invalid_config_values(tiny_sit_config):
    for field, value, msg in [("norm_type", "batch_norm", "norm_type"), ("mlp_type", "relu", "mlp_type"),
                              ("time_convention", "edm", "time_convention"), ("sample_size", 9, "not divisible")]:
        with pytest.raises(ValueError, match=msg):
            SiTTransformer2DModel(**{**tiny_sit_config, field: value})


# ----------------------------------------------------------------------------------------------- LightningDiT


def test_lightningdit_options_run_and_round_trip(tiny_sit_config, tmp_path):
    cfg = {**tiny_sit_config, "norm_type": "rms_norm", "mlp_type": "swiglu", "use_rope": True, "qk_norm": True}
    model = randomize(SiTTransformer2DModel(**cfg))
    block = model.blocks[0]
    assert isinstance(block.norm1, nn.RMSNorm) and isinstance(block.attn.q_norm, nn.RMSNorm)
    hidden = int(2 * int(32 * 4.0) / 3)  # LightningDiT SwiGLU width: 2/3 of the GELU MLP's
    assert block.mlp.w12.out_features == 2 * hidden and block.mlp.w3.in_features == hidden
    assert model.rope.shape == (16, 16)
    x, t, y = make_inputs(cfg)
    with torch.no_grad():
        out = model(x, t, y, output_hidden_states=[2]).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    loaded = SiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.use_rope and loaded.config.mlp_type == "swiglu"
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y).sample, out)
        # RoPE is a non-persistent buffer: the same weights without it give a different output.
        no_rope = SiTTransformer2DModel(**{**cfg, "use_rope": False}).eval()
        no_rope.load_state_dict(model.state_dict())
        assert not torch.allclose(no_rope(x, t, y).sample, out)


def test_rope_is_a_relative_rotation():
    angles = transformer_sit.rope_angles_2d(16, 4)
    q, k = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    rq, rk = apply_rope(q, angles), apply_rope(k, angles)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation
    # The same q/k content at every position: the score depends only on the 2-D offset.
    q_same, k_same = q[:, :, :1].expand_as(q), k[:, :, :1].expand_as(k)
    s = apply_rope(q_same, angles)[0, 0] @ apply_rope(k_same, angles)[0, 0].T  # (16, 16), tokens row-major on 4x4
    torch.testing.assert_close(s[0, 5], s[10, 15], rtol=1e-5, atol=1e-5)  # offset (+1, +1) from (0,0) and (2,2)
    torch.testing.assert_close(s[1, 4], s[6, 9], rtol=1e-5, atol=1e-5)  # offset (+1, -1)
    with pytest.raises(ValueError, match="divisible by 4"):
        transformer_sit.rope_angles_2d(18, 4)


# ------------------------------------------------------------------------------------------- fixed embeddings


@pytest.mark.parametrize("dim,grid", [(32, 1), (32, 4), (768, 16), (1152, 16)])
def test_sincos_table_equals_mae_reference(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)
    ref = torch.from_numpy(mae_pos_embed(dim, grid)).float()
    assert ours.shape == (grid * grid, dim)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, grid)


def test_model_pos_embed_is_the_table(tiny_sit):
    torch.testing.assert_close(tiny_sit.pos_embed[0], torch.from_numpy(mae_pos_embed(32, 4)).float(), rtol=0, atol=1e-6)
    assert "pos_embed" not in tiny_sit.state_dict()


def test_timestep_features_equal_glide_reference(tiny_sit):
    # GLIDE/DiT `timestep_embedding`: cos first, freqs exp(-ln(1e4) * i / 128) (shift 0), raw t (no x1000).
    t = torch.tensor([0.0, 0.013, 0.5, 0.999, 1.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = t.double()[:, None] * freqs[None]
    ref_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()
    mlp = tiny_sit.t_embedder.mlp
    with torch.no_grad():
        ref = mlp[2](torch.nn.functional.silu(mlp[0](ref_freq)))
        torch.testing.assert_close(tiny_sit.t_embedder(t), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- input checks


def test_input_errors(tiny_sit):
    x, t, y = make_inputs(dict(tiny_sit.config))
    cases = [
        (dict(output_hidden_states=[0]), r"1-based in \[1, 4\], got 0"),
        (dict(output_hidden_states=[5]), r"1-based in \[1, 4\], got 5"),
        (dict(stop_at_layer=0), "got 0"),
        (dict(stop_at_layer=5), "got 5"),
        (dict(output_hidden_states=[True]), "got True"),
        (dict(output_hidden_states=[1.0]), "got 1.0"),
        (dict(output_hidden_states=[1, 3], stop_at_layer=2), r"beyond stop_at_layer=2"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            tiny_sit(x, t, y, **kwargs)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\] \(10 is the null class\), got values in \[-1, 7\]"):
        tiny_sit(x, t, torch.tensor([-1, 7, 3]))
    with pytest.raises(ValueError, match=r"got values in \[0, 11\]"):
        tiny_sit(x, t, torch.tensor([0, 11, 3]))
    with torch.no_grad():
        tiny_sit(x, t, torch.tensor([10, 10, 3]))  # the null class is a valid label
    with pytest.raises(ValueError, match="class_labels must be integers"):
        tiny_sit(x, t, y.float())
    with pytest.raises(ValueError, match=r"class_labels must have shape \(3,\)"):
        tiny_sit(x, t, y[:2])
    for bad in (x[:, :3], x[:, :, :4, :4], x[0]):
        with pytest.raises(ValueError, match=r"hidden_states must have shape \(N, 4, 8, 8\)"):
            tiny_sit(bad, t, y)


def test_no_null_class_without_dropout(tiny_sit_config):
    model = SiTTransformer2DModel(**{**tiny_sit_config, "class_dropout_prob": 0.0}).eval()
    assert model.y_embedder.embedding_table.num_embeddings == 10
    x, t, _ = make_inputs(tiny_sit_config)
    with pytest.raises(ValueError, match=r"\[0, 9\] \(no null class"):
        model(x, t, torch.tensor([0, 10, 1]))


def test_ema_folder_loads_as_a_sit_without_warnings_and_keeps_the_ema_state(tiny_sit, tmp_path, monkeypatch):
    """`checkpoint-N/transformer_ema/` (what `EMAModel.save_pretrained` writes) is a SiT folder with EMA keys added."""
    from diffusers import configuration_utils
    from diffusers.training_utils import EMAModel

    ema = EMAModel(tiny_sit.parameters(), decay=0.99, min_decay=0.99, model_cls=SiTTransformer2DModel,
                   model_config=tiny_sit.config)
    for _ in range(3):
        ema.step(tiny_sit.parameters())
    ema.save_pretrained(tmp_path / "transformer_ema")
    warnings = []
    monkeypatch.setattr(configuration_utils.logger, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    loaded = SiTTransformer2DModel.from_pretrained(tmp_path / "transformer_ema")
    assert not [w for w in warnings if "not expected" in w], warnings
    assert "optimization_step" not in loaded.config and "decay" not in loaded.config
    restored = EMAModel.from_pretrained(tmp_path / "transformer_ema", SiTTransformer2DModel)
    assert restored.optimization_step == 3 and restored.decay == 0.99
    for a, b in zip(restored.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)


def test_forward_reads_no_label_values_off_the_host(tiny_sit_config):
    # CPU labels are range-checked (free); on an accelerator that read would be a host sync per step. Meta tensors stand
    # in for a device: any value read raises.
    model = SiTTransformer2DModel(**tiny_sit_config).to("meta")
    x, t = torch.randn(3, 4, 8, 8, device="meta"), torch.rand(3, device="meta")
    out = model(x, t, torch.zeros(3, dtype=torch.long, device="meta"), output_hidden_states=[1])
    assert out.sample.shape == (3, 4, 8, 8) and out.hidden_states[1].device.type == "meta"
    with pytest.raises(ValueError, match="class_labels must lie in"):  # still checked where it is free
        SiTTransformer2DModel(**tiny_sit_config)(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 99]))

"""Conversion of SiT / REPA / Self-Transcendence checkpoints (synthetic state dicts with the reference key names).

The converted model is compared with an independent functional forward written from the reference key names
(explicit softmax attention, GLIDE timestep features, the checkpoint's own pos_embed table), not with our modules.
"""

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers_selftrans import AlignmentProjector, SiTTransformer2DModel, convert_original_checkpoint
from diffusers_selftrans.convert import build_config, main

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, num_attention_heads=2, attention_head_dim=16, num_classes=10)
HIDDEN = 32
PROJECTOR_DIM = 48  # stands in for REPA's 2048
Z_DIM = 24  # stands in for DINOv2's 768
FLAVOR_CONFIG = {
    "sit": dict(learn_sigma=True, qk_norm=False),
    "repa": dict(learn_sigma=False, qk_norm=False),
    "self_transcendence": dict(learn_sigma=False, qk_norm=True),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one thread is faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mae_pos_embed(dim, grid):
    """MAE `get_2d_sincos_pos_embed`, re-derived in numpy: (grid*grid, dim), first half encodes the column."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # "xy": w first

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


def reference_state_dict(flavor, seed=0, legacy_encoder_depth=None):
    """Random weights under the reference names of `flavor`, including pos_embed and projector heads."""
    torch.manual_seed(seed)
    src = SiTTransformer2DModel(**TINY, **FLAVOR_CONFIG[flavor])
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in src.state_dict().items()}  # also un-zero the adaLN-Zero layers
    sd["pos_embed"] = torch.from_numpy(mae_pos_embed(HIDDEN, TINY["sample_size"] // TINY["patch_size"])).float()[None]
    mlp_shapes = {0: (PROJECTOR_DIM, HIDDEN), 2: (PROJECTOR_DIM, PROJECTOR_DIM)}
    if flavor == "repa":  # nn.ModuleList of build_mlp, one per target encoder
        for j in range(2):
            for i, shape in {**mlp_shapes, 4: (Z_DIM, PROJECTOR_DIM)}.items():
                sd[f"projectors.{j}.{i}.weight"], sd[f"projectors.{j}.{i}.bias"] = torch.randn(shape) * 0.1, torch.randn(shape[0]) * 0.1
    if flavor == "self_transcendence":  # build_mlp(D, 2048, D) and the stage-1 FinalLayer_2
        for i, shape in {**mlp_shapes, 4: (HIDDEN, PROJECTOR_DIM)}.items():
            sd[f"projectors.{i}.weight"], sd[f"projectors.{i}.bias"] = torch.randn(shape) * 0.1, torch.randn(shape[0]) * 0.1
        out = TINY["patch_size"] ** 2 * TINY["in_channels"]
        sd["projectors_final.linear.weight"], sd["projectors_final.linear.bias"] = torch.randn(out, HIDDEN) * 0.1, torch.randn(out) * 0.1
    if legacy_encoder_depth is not None:
        sd = {
            (f"decoder_blocks.{int(k.split('.')[1]) - legacy_encoder_depth}." + k.split(".", 2)[2])
            if k.startswith("blocks.") and int(k.split(".")[1]) >= legacy_encoder_depth else k: v
            for k, v in sd.items()
        }
    return sd


def linear(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def reference_forward(sd, x, t, y, *, qk_norm, learn_sigma, return_block=None):
    """SiT/REPA forward from the raw reference weights, in the reference's own time (no conversion)."""
    p, heads, c_in = TINY["patch_size"], TINY["num_attention_heads"], TINY["in_channels"]
    n = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # GLIDE: cos first
    c = linear(F.silu(linear(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}"
        sh1, sc1, g1, sh2, sc2, g2 = linear(F.silu(c), sd, f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        a = F.layer_norm(h, (HIDDEN,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = linear(a, sd, f"{b}.attn.qkv").reshape(n, -1, 3, heads, HIDDEN // heads).permute(2, 0, 3, 1, 4)
        if qk_norm:  # timm: LayerNorm(head_dim), eps 1e-5, affine
            q = F.layer_norm(q, (HIDDEN // heads,), sd[f"{b}.attn.q_norm.weight"], sd[f"{b}.attn.q_norm.bias"])
            k = F.layer_norm(k, (HIDDEN // heads,), sd[f"{b}.attn.k_norm.weight"], sd[f"{b}.attn.k_norm.bias"])
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // heads), dim=-1) @ v
        h = h + g1[:, None] * linear(attn.transpose(1, 2).reshape(n, -1, HIDDEN), sd, f"{b}.attn.proj")
        m = F.layer_norm(h, (HIDDEN,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        h = h + g2[:, None] * linear(F.gelu(linear(m, sd, f"{b}.mlp.fc1"), approximate="tanh"), sd, f"{b}.mlp.fc2")
        if return_block == i + 1:
            return h
    shift, scale = linear(F.silu(c), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = linear(F.layer_norm(h, (HIDDEN,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None], sd, "final_layer.linear")
    c_out = out.shape[-1] // p**2
    g = int(math.isqrt(out.shape[1]))
    img = torch.einsum("nhwpqc->nchpwq", out.reshape(n, g, g, p, p, c_out)).reshape(n, c_out, g * p, g * p)
    return img[:, :c_in] if learn_sigma else img


def reference_mlp(sd, prefix, x):
    x = F.silu(linear(x, sd, f"{prefix}0"))
    x = F.silu(linear(x, sd, f"{prefix}2"))
    return linear(x, sd, f"{prefix}4")


def inputs(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([0.05, 0.5, 0.9])[:n]
    y = torch.tensor([0, 7, 3])[:n]
    return x, t, y


@pytest.mark.parametrize("flavor", ["repa", "self_transcendence"])
def test_converted_outputs_equal_reference(flavor):
    sd = reference_state_dict(flavor)
    model, projectors = convert_original_checkpoint(dict(sd), model=TINY, flavor=flavor, return_projectors=True)
    assert model.config.qk_norm is FLAVOR_CONFIG[flavor]["qk_norm"] and model.config.learn_sigma is False
    assert not model.training
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y, output_hidden_states=[2])
        ref = reference_forward(sd, x, t, y, qk_norm=model.config.qk_norm, learn_sigma=False)
        ref_block2 = reference_forward(sd, x, t, y, qk_norm=model.config.qk_norm, learn_sigma=False, return_block=2)
        torch.testing.assert_close(out.sample, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.hidden_states[2], ref_block2, rtol=1e-4, atol=1e-5)
        assert out.sample.abs().mean() > 1e-2  # the comparison is not between two zero tensors
        feats = out.hidden_states[2]
        if flavor == "repa":
            assert len(projectors) == 2 and all(pr.head is None for pr in projectors)
            for j, pr in enumerate(projectors):
                assert (pr.config.in_features, pr.config.hidden_features, pr.config.out_features) == (HIDDEN, PROJECTOR_DIM, Z_DIM)
                torch.testing.assert_close(pr(feats), reference_mlp(sd, f"projectors.{j}.", feats))
        else:
            (pr,) = projectors
            assert pr.config.head_features == TINY["patch_size"] ** 2 * TINY["in_channels"]
            z = reference_mlp(sd, "projectors.", feats)
            head = linear(F.layer_norm(z, (HIDDEN,), eps=1e-6), sd, "projectors_final.linear")
            torch.testing.assert_close(pr(feats), head)


def test_sit_flavor_reversed_time_gives_same_velocity_field():
    sd = reference_state_dict("sit")
    model = convert_original_checkpoint(sd, model=TINY, flavor="sit")
    assert model.config.time_convention == "sit" and model.config.learn_sigma
    assert model.final_layer.linear.out_features == TINY["patch_size"] ** 2 * 8  # 2 x 4 channels
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y).sample
        # The SiT network sees s = 1 - t (data at s=1) and predicts x - eps; ours is eps - x0 at t.
        sit_ref = reference_forward(sd, x, 1 - t, y, qk_norm=False, learn_sigma=True)
    assert ours.shape == (3, 4, 8, 8)
    torch.testing.assert_close(ours, -sit_ref, rtol=1e-4, atol=1e-5)
    assert ours.abs().mean() > 1e-2


def test_projectors_dropped_unless_requested():
    model = convert_original_checkpoint(reference_state_dict("repa"), model=TINY, flavor="repa")
    assert isinstance(model, SiTTransformer2DModel)
    assert not any(k.startswith("projectors") for k in model.state_dict())


def test_training_checkpoint_ema_and_model_selection():
    ema, raw = reference_state_dict("repa", seed=0), reference_state_dict("repa", seed=1)
    ckpt = {"model": raw, "ema": ema, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2"), "steps": 10}
    w = "blocks.0.attn.qkv.weight"
    assert torch.equal(convert_original_checkpoint(ckpt, model=TINY).state_dict()[w], ema[w])
    assert torch.equal(convert_original_checkpoint(ckpt, model=TINY, use_ema=True).state_dict()[w], ema[w])
    assert torch.equal(convert_original_checkpoint(ckpt, model=TINY, use_ema=False).state_dict()[w], raw[w])
    # Default falls back to "model" when there is no EMA; an explicit use_ema=True does not.
    only_raw = {"model": raw, "steps": 10}
    assert torch.equal(convert_original_checkpoint(only_raw, model=TINY).state_dict()[w], raw[w])
    with pytest.raises(ValueError, match="use_ema=True but the checkpoint has no 'ema'"):
        convert_original_checkpoint(only_raw, model=TINY, use_ema=True)
    with pytest.raises(ValueError, match="use_ema=False but the checkpoint has no 'model'"):
        convert_original_checkpoint({"ema": ema}, model=TINY, use_ema=False)


def test_files_pt_with_namespace_and_safetensors(tmp_path):
    sd = reference_state_dict("self_transcendence")
    pt = tmp_path / "0200000.pt"
    torch.save({"model": sd, "ema": sd, "opt": {"state": {}}, "args": argparse.Namespace(qk_norm=True), "steps": 5}, pt)
    st = tmp_path / "weights.safetensors"
    save_file(sd, str(st))
    a = convert_original_checkpoint(str(pt), model=TINY, flavor="self_transcendence", use_ema=False)
    b = convert_original_checkpoint(st, model=TINY, flavor="self_transcendence")
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y).sample, b(x, t, y).sample, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        convert_original_checkpoint(tmp_path / "nope.pt", model=TINY)


def test_missing_and_unexpected_keys_are_named():
    sd = reference_state_dict("repa")
    del sd["blocks.3.mlp.fc2.bias"]
    sd["blocks.1.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        convert_original_checkpoint(sd, model=TINY, flavor="repa")
    msg = str(err.value)
    assert "Missing keys (1): blocks.3.mlp.fc2.bias" in msg
    assert "Unexpected keys (1): blocks.1.attn.extra.weight" in msg
    sd = reference_state_dict("repa")
    sd["blocks.4.mlp.fc1.weight"] = torch.zeros(1)  # a 5th block: a deeper model than the config
    with pytest.raises(ValueError, match=r"Unexpected keys \(1\): blocks\.4\.mlp\.fc1\.weight\nHints: .*num_layers=4"):
        convert_original_checkpoint(sd, model=TINY, flavor="repa")


def test_qk_norm_mismatch_is_an_error_not_silent():
    # A Self-Transcendence checkpoint read as REPA: q/k-norm weights left over (REPA/ST load with strict=False).
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.k_norm\.bias.*\n.*qk_norm=True") as err:
        convert_original_checkpoint(reference_state_dict("self_transcendence"), model=TINY, flavor="repa", return_projectors=True)
    # 16 q/k-norm tensors + the 8 ST head tensors, which are not REPA heads; the block count is right.
    assert "Unexpected keys (24)" in str(err.value) and "projector heads that flavor='repa' does not have" in str(err.value)
    assert "number of blocks" not in str(err.value)
    # A REPA checkpoint read as Self-Transcendence: the q/k-norm weights are missing.
    with pytest.raises(ValueError, match=r"Missing keys \(16\): blocks\.0\.attn\.k_norm\.bias"):
        convert_original_checkpoint(reference_state_dict("repa"), model=TINY, flavor="self_transcendence")


def test_shape_mismatch_is_named():
    # An original-SiT (learn_sigma) checkpoint read as REPA: 8 vs 4 output channels.
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight: checkpoint \(32, 32\) vs model \(16, 32\)"):
        convert_original_checkpoint(reference_state_dict("sit"), model=TINY, flavor="repa")
    with pytest.raises(ValueError, match=r"y_embedder\.embedding_table\.weight.*\n.*num_classes"):
        convert_original_checkpoint(reference_state_dict("repa"), model=TINY, flavor="repa", num_classes=12)


def test_wrong_pos_embed_raises():
    sd = reference_state_dict("repa")
    sd["pos_embed"] = sd["pos_embed"].flip(1)  # a transposed / reordered table
    with pytest.raises(ValueError, match="pos_embed differs from the 2-D sin-cos table"):
        convert_original_checkpoint(sd, model=TINY, flavor="repa")
    # Wrong resolution: the checkpoint has 16 tokens, the config expects 4x4 = 16 ... at sample_size 12: 36.
    with pytest.raises(ValueError, match=r"pos_embed shape \(1, 16, 32\).*\(1, 36, 32\).*sample_size=8"):
        convert_original_checkpoint(reference_state_dict("repa"), model=TINY, flavor="repa", sample_size=12)


def test_legacy_repa_decoder_blocks_and_wrapper_prefix():
    sd = reference_state_dict("repa")
    legacy = {"module." + k: v for k, v in reference_state_dict("repa", legacy_encoder_depth=2).items()}
    assert any(k.startswith("module.decoder_blocks.1.") for k in legacy)
    a = convert_original_checkpoint(sd, model=TINY).state_dict()
    b = convert_original_checkpoint(legacy, model=TINY).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_config_presets_and_overrides():
    cfg = build_config("SiT-XL/2", "self_transcendence", sample_size=64)
    assert cfg == dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, sample_size=64,
                       learn_sigma=False, time_convention="repa", qk_norm=True)
    assert build_config("SiT-B/4", "sit")["learn_sigma"] is True
    assert build_config("SiT-B/4", "sit", qk_norm=True)["qk_norm"] is True  # overrides win
    # A saved config dict (FrozenDict with private keys) is taken as it is.
    saved = dict(SiTTransformer2DModel(**TINY).config)
    assert build_config(saved, "self_transcendence")["qk_norm"] is False
    with pytest.raises(ValueError, match="flavor must be one of"):
        build_config("SiT-B/2", "dit")
    with pytest.raises(ValueError, match="Unknown SiT preset"):
        build_config("SiT-H/2", "repa")


def test_cli_writes_loadable_folder(tmp_path):
    sd = reference_state_dict("self_transcendence")
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "args": argparse.Namespace(qk_norm=True)}, ckpt)
    config = tmp_path / "tiny.json"  # --model takes a preset, or a config file for sizes without one
    config.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--model", str(config), "--flavor", "self_transcendence",
                 "--no_ema", "--output_dir", str(out), "--save_projectors"]) == 0
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SiTTransformer2DModel.from_pretrained(out).eval()
    projector = AlignmentProjector.from_pretrained(out / "projector").eval()
    assert loaded.config.qk_norm is True and projector.config.head_features == 16
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, reference_forward(sd, x, t, y, qk_norm=True, learn_sigma=False),
                                   rtol=1e-4, atol=1e-5)
        feats = loaded(x, t, y, stop_at_layer=2).hidden_states[2]
        z = reference_mlp(sd, "projectors.", feats)
        torch.testing.assert_close(projector(feats), linear(F.layer_norm(z, (HIDDEN,), eps=1e-6), sd, "projectors_final.linear"))

"""Training-script guards: EMA export, CFG-free training, guiding-model errors, guide-stop default."""

import json

import pytest
import torch
from safetensors.torch import load_file

from test_training import TINY_MODEL, assets, flags, read_losses, stage1, train_align, train_self_transcendence  # noqa: F401

from diffusers_selftrans import training as T


def _weights(folder):
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_exported_weights_are_the_updated_ema(assets, tmp_path):
    # EMA decay 0 makes the EMA equal to the trained weights after every update: the exported transformer must then
    # be the final training weights, not the initialisation (an EMA that is never updated exports the init).
    out = tmp_path / "ema0"
    train_align.main(flags(assets, out, ema_decay=0.0, validation_steps=100))
    exported, trained = _weights(out / "transformer"), _weights(out / "checkpoint-4" / "transformer")
    earlier = _weights(out / "checkpoint-2" / "transformer")
    assert exported.keys() == trained.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], trained[key], rtol=0, atol=0)
    assert any(not torch.equal(earlier[k], trained[k]) for k in trained)  # training moved the weights
    # a real decay averages: the exported weights differ from the last training weights
    out = tmp_path / "ema_half"
    train_align.main(flags(assets, out, ema_decay=0.5, validation_steps=100))
    exported, trained = _weights(out / "transformer"), _weights(out / "checkpoint-4" / "transformer")
    ema = load_file(out / "checkpoint-4" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(exported[k], trained[k]) for k in trained)
    for key in exported:
        torch.testing.assert_close(exported[key], ema[key], rtol=0, atol=0)


def test_class_dropout_zero_trains_without_cfg_dropout_and_stage2_refuses_it(assets, tmp_path):
    out = tmp_path / "no_dropout"
    train_align.main(flags(assets, out, class_dropout_prob=0, validation_steps=100))  # grids fall back to no CFG
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["class_dropout_prob"] == 0
    assert len(read_losses(out)) == 4
    weights = _weights(out / "transformer")
    assert weights["y_embedder.embedding_table.weight"].shape[0] == 3  # 3 classes, no null row
    with pytest.raises(ValueError, match="no null class"):
        train_self_transcendence.main(flags(assets, tmp_path / "s2", guiding_model_name_or_path=out,
                                            max_train_steps=1))

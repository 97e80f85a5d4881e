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


def test_guiding_model_paths_fail_with_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a local folder nor a reachable Hub id") as info:
        T.load_transformer(str(tmp_path / "no-such-guiding-model"))
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chain of Hub tracebacks
    with pytest.raises(ValueError, match="neither a local folder nor a reachable Hub id"):
        T.load_transformer("someone/missing-sit-repo")  # offline in the tests: not reachable
    raw = tmp_path / "last.pt"
    torch.save({"model": {}}, raw)
    with pytest.raises(ValueError, match=r"(?s)raw training checkpoint.*python -m diffusers_selftrans.convert "
                                         r"--checkpoint .*last\.pt"):
        T.load_transformer(str(raw))


def test_guiding_model_with_other_class_names_is_refused(assets, stage1, tmp_path):
    from diffusers_selftrans.alignment import build_alignment

    teacher = T.load_transformer(str(stage1))
    names = {int(k): v for k, v in teacher.config.id2label.items()}
    assert names == {0: "class0", 1: "class1", 2: "class2"}
    student = dict(teacher.config, id2label={0: "cat", 1: "dog", 2: "fish"})  # same count, other classes
    with pytest.raises(ValueError, match=r"differ from the training data's in 3 of 3 ids.*guiding_classes_correspond"):
        build_alignment("self_transcendence", student, teacher=teacher, projector_dim=8)
    build_alignment("self_transcendence", student, teacher=teacher, projector_dim=8, classes_correspond=True)
    build_alignment("self_transcendence", dict(teacher.config), teacher=teacher, projector_dim=8)  # same names
    # through the script: other class folders, same count
    other = tmp_path / "other"
    for name in ("cat", "dog", "fish"):
        (other / name).mkdir(parents=True)
        for i in range(8):
            (other / name / f"{i}.png").hardlink_to(assets / "data" / "class0" / f"{i}.png")
    with pytest.raises(ValueError, match="guiding_classes_correspond"):
        train_self_transcendence.main(flags(assets, tmp_path / "s2", train_data_dir=other,
                                            guiding_model_name_or_path=stage1, max_train_steps=1))


def test_guide_stop_default_counts_epochs_of_the_data(assets, stage1, tmp_path):
    # 24 images at batch 4: 6 steps per epoch, so 0.5 epochs stop the guide after step 3 whatever --max_train_steps
    # says (the old default took 0.5 / 80 of the run: step 1).
    out = tmp_path / "s2"
    train_self_transcendence.main(flags(assets, out, guiding_model_name_or_path=stage1, guide_stop_epochs=0.5,
                                        validation_steps=100))
    args = json.loads((out / "args.json").read_text())
    assert args["steps_per_epoch"] == 6 and args["guide_stop_step"] == 3
    losses = read_losses(out)
    assert [("loss_guide" in losses[s]) for s in (1, 2, 3, 4)] == [True, True, True, False]
    assert '"guide_stop_step": 3' in (out / "README.md").read_text()


def test_writing_a_checkpoint_does_not_change_the_run(assets, tmp_path):
    # Saving the EMA builds a model (random init) on the main process; that must not draw from the training RNG, or
    # a run that checkpoints every step trains on other noise than one that never does.
    every = tmp_path / "every_step"
    train_align.main(flags(assets, every, checkpointing_steps=1, validation_steps=100))
    once = tmp_path / "at_the_end"
    train_align.main(flags(assets, once, checkpointing_steps=4, validation_steps=100))
    a, b = read_losses(every), read_losses(once)
    assert [a[s]["loss"] for s in (1, 2, 3, 4)] == [b[s]["loss"] for s in (1, 2, 3, 4)]
    wa, wb = _weights(every / "transformer"), _weights(once / "transformer")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

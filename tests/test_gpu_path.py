"""The GPU path's defaults, as far as a CPU can check them (issue 26): the teacher is released at the guide stop, its
compute precision follows the run's mixed precision, and TF32 / fused AdamW are on by default with flags to turn
them off. (One host read per step: test_host_syncs.py.)"""

import gc
import weakref

import pytest
import torch

from test_training import assets, flags, stage1, train_align, train_self_transcendence  # noqa: F401

from diffusers_selftrans import training as T


def watch_teacher(monkeypatch, script, steps):
    """Wrap the script's `build_alignment` to hold a weak reference to the teacher it is given, and record at each
    logged step whether anything still keeps that teacher (or one of its parameters) alive."""
    refs, alive = {}, {}
    build = script.build_alignment

    def build_alignment(*args, **kwargs):
        teacher = kwargs["teacher"]
        refs["teacher"] = weakref.ref(teacher)
        refs["weight"] = weakref.ref(next(teacher.parameters()))
        return build(*args, **kwargs)

    log_step = T.StepLog.step

    def step(self, n, values, **host):
        if n in steps:
            gc.collect()
            alive[n] = refs["teacher"]() is not None or refs["weight"]() is not None
        return log_step(self, n, values, **host)

    monkeypatch.setattr(script, "build_alignment", build_alignment)
    monkeypatch.setattr(T.StepLog, "step", step)
    return alive


def test_the_teacher_is_freed_at_the_guide_stop(assets, stage1, tmp_path, monkeypatch):  # noqa: F811
    alive = watch_teacher(monkeypatch, train_self_transcendence, steps=(1, 2, 3))
    train_self_transcendence.main(flags(assets, tmp_path / "run", guiding_model_name_or_path=stage1, max_train_steps=3,
                                        guide_stop_step=2, checkpointing_steps=100, validation_steps=100))
    assert alive == {1: True, 2: True, 3: False}  # step 3 is the first one after the stop


def test_teacher_precision_follows_the_runs_mixed_precision():
    assert T.teacher_autocast_dtype("auto", "bf16") is torch.bfloat16
    assert T.teacher_autocast_dtype("auto", "fp16") is torch.float16
    assert T.teacher_autocast_dtype("auto", "no") is None
    assert T.teacher_autocast_dtype("no", "bf16") is None  # the released setting: fp32 (TF32 matmuls)
    assert T.teacher_autocast_dtype("bf16", "no") is torch.bfloat16


@pytest.mark.parametrize("mixed_precision, expected", [("bf16", torch.bfloat16), ("no", None)])
def test_stage2_builds_its_guide_with_the_runs_precision(assets, stage1, tmp_path, monkeypatch,  # noqa: F811
                                                         mixed_precision, expected):
    seen = {}
    build = train_self_transcendence.build_alignment

    def build_alignment(*args, **kwargs):
        method = build(*args, **kwargs)
        seen["autocast"] = method.teacher_autocast
        return method

    from accelerate.state import AcceleratorState

    monkeypatch.setattr(train_self_transcendence, "build_alignment", build_alignment)
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state fixes the precision once
    try:
        train_self_transcendence.main(flags(assets, tmp_path / "run", guiding_model_name_or_path=stage1,
                                            max_train_steps=1, checkpointing_steps=100, validation_steps=100,
                                            mixed_precision=mixed_precision))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen["autocast"] is expected


def test_tf32_and_fused_adamw_default_on_with_flags_to_turn_them_off(assets, tmp_path):  # noqa: F811
    default = train_align.parse_args(flags(assets, tmp_path))
    assert default.allow_tf32 is True and default.fused_adamw is True and default.dataloader_num_workers >= 0
    off = train_align.parse_args(flags(assets, tmp_path) + ["--no-allow_tf32", "--no-fused_adamw"])
    assert off.allow_tf32 is False and off.fused_adamw is False
    stage2 = train_self_transcendence.parse_args(flags(assets, tmp_path, guiding_model_name_or_path="g"))
    assert stage2.guiding_autocast == "auto"


# A torch.compile backend that records each graph dynamo hands it and runs it eagerly: the test sees what is compiled
# and how often, without the minutes inductor takes to generate code on this CPU.
GRAPHS = []


@torch._dynamo.register_backend
def recording_eager(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward


def test_torch_compile_compiles_stage1_forward_and_loss_as_one_graph(assets, tmp_path):  # noqa: F811
    torch._dynamo.reset()
    GRAPHS.clear()
    train_align.main(flags(assets, tmp_path / "run", max_train_steps=3, checkpointing_steps=100, validation_steps=100,
                           torch_compile=True, torch_compile_backend="recording_eager"))
    assert len(GRAPHS) == 1  # fullgraph=True: a graph break would have been an error; no recompile across steps
    ops = {str(n.target) for n in GRAPHS[0].graph.nodes if n.op == "call_function"}
    assert any("rand" in op for op in ops) and any("mse" in op or "pow" in op for op in ops)  # draw and loss inside


def test_torch_compile_compiles_the_guided_step_with_its_teacher_and_recompiles_once_at_the_stop(
        assets, stage1, tmp_path):  # noqa: F811
    torch._dynamo.reset()
    GRAPHS.clear()
    train_self_transcendence.main(flags(assets, tmp_path / "run", guiding_model_name_or_path=stage1, max_train_steps=4,
                                        guide_stop_step=2, checkpointing_steps=100, validation_steps=100,
                                        torch_compile=True, torch_compile_backend="recording_eager"))
    assert len(GRAPHS) == 2  # guided, then after the stop
    guided, after = (sum(1 for n in g.graph.nodes if n.op == "call_module" or n.op == "call_function") for g in GRAPHS)
    assert guided > after  # the teacher's early-exit pass and the projector are in the guided graph

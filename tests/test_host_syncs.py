"""At most one host read of a device value per optimizer step, issued once the step's backward is queued (issue 26,
item 2), in stage 1, stage 2 while guided and after the guide stop (the text-to-image script's loop is checked in
test_train_t2i.py, with its fixtures).

A GPU stalls the host whenever Python asks for a value that lives on it (`.item()`, `.tolist()`, `bool(t)`,
`float(t)`, `.cpu()`, ...). On this CPU nothing stalls, so `HostReads` (a `TorchFunctionMode`) follows where values
live instead: parameters and anything moved to or created on the run's device are device values, and so is anything
computed from one; a read of a device value is recorded with its stack. Host-made tensors (e.g. AdamW's step
counters, which torch makes with `device="cpu"`) and values already copied to the host are free, as on a GPU.
"""

import traceback
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode

from test_training import assets, flags, stage1, train_align, train_self_transcendence  # noqa: F401

from diffusers_selftrans import training as T

# Tensor methods that hand a value to Python or to the host.
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.cpu, torch.equal,
         torch.allclose, torch.is_nonzero}


class HostReads(TorchFunctionMode):
    """Records host reads of device values (see the module docstring) and the training loop's events."""

    def __init__(self):
        super().__init__()
        self.device_ids = set()  # ids of live device tensors (a finalizer drops each id with its tensor)
        self.events = []  # ("read", name, stack) / ("backward", None, None) / ("step", n, None)

    def on_device(self, value) -> bool:
        return isinstance(value, torch.nn.Parameter) or (isinstance(value, torch.Tensor) and id(value) in self.device_ids)

    def mark(self, value) -> None:
        if isinstance(value, torch.Tensor) and id(value) not in self.device_ids:
            self.device_ids.add(id(value))
            weakref.finalize(value, self.device_ids.discard, id(value))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = list(args) + list(kwargs.values())
        inputs = [a for a in flat if isinstance(a, torch.Tensor)]
        inputs += [t for a in flat if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        from_device = any(self.on_device(t) for t in inputs)
        to_host = func is torch.Tensor.to and any(isinstance(a, str) and a.startswith("cpu") for a in flat)
        if (func in READS or to_host) and from_device:
            self.events.append(("read", func.__name__, traceback.extract_stack()[:-1]))
        if func is torch.Tensor.backward:
            self.events.append(("backward", None, None))
        out = func(*args, **kwargs)
        if func in READS or to_host:
            # a host copy: on this CPU `.cpu()` returns the tensor itself, which from here on counts as the copy
            if isinstance(out, torch.Tensor):
                self.device_ids.discard(id(out))
            return out
        moved = func is torch.Tensor.cuda or (func is torch.Tensor.to and any(isinstance(a, torch.device)
                                                                           for a in flat))
        # made on the run's device: code that means "wherever the data is" passes a torch.device (`x.device`,
        # `accelerator.device`); code that means the host writes "cpu" (torch's AdamW step counters do)
        created = isinstance(kwargs.get("device"), torch.device) and not inputs
        if from_device or moved or created:
            for o in (out if isinstance(out, (list, tuple)) else [out]):
                self.mark(o)
        return out

    def per_step(self):
        """{optimizer step: [its events]}: what ran between the step log's rows (a step's whole loop body)."""
        steps, current = {}, None
        for kind, what, stack in self.events:
            if kind == "step":
                current = what
                steps[current] = []
            elif current is not None:
                steps[current].append((kind, what, stack))
        return steps


def make_recorder(monkeypatch) -> HostReads:
    """A `HostReads` that also records each row of the step log (the step boundaries)."""
    reads = HostReads()
    original = T.StepLog.step

    def step(self, n, values, **host):
        reads.events.append(("step", n, None))
        return original(self, n, values, **host)

    monkeypatch.setattr(T.StepLog, "step", step)
    return reads


@pytest.fixture
def recorder(monkeypatch):
    return make_recorder(monkeypatch)


def where(stack) -> str:
    return " <- ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in reversed(stack[-6:]))


# Reads that a GPU run never makes: `SiTTransformer2DModel._check_inputs` and the stage-2 guide's label check read
# label values only when the labels are on the CPU, where it is free (`test_label_checks_read_nothing_off_the_cpu`
# holds them to that).
# AdamW's step counters: torch keeps them on the host (non-fused, non-capturable AdamW reads them with `_get_value`)
# and the fused kernel (`--fused_adamw`, the default on CUDA) reads none. On this CPU a counter loaded from a
# checkpoint looks like a device value to `HostReads` (its storage is rebuilt with a torch.device), hence the entry.
CPU_ONLY = (("transformer_sit.py", "_check_inputs"), ("self_transcendence.py", "check"), ("optimizer.py", "_get_value"))


def cpu_only(stack) -> bool:
    return any(f.filename.endswith(file) and f.name == name for f in stack for file, name in CPU_ONLY)


def assert_one_read_after_backward(reads: HostReads, steps):
    by_step = reads.per_step()
    for n in steps:  # the loop body that ends with step n + 1's log row
        events = [(kind, what, stack) for kind, what, stack in by_step[n] if not (kind == "read" and cpu_only(stack))]
        found = [(what, stack) for kind, what, stack in events if kind == "read"]
        assert len(found) == 1, f"step {n + 1}: {len(found)} host reads:\n" + "\n".join(
            f"  {what}: {where(stack)}" for what, stack in found)
        what, stack = found[0]
        assert any(f.name == "check" and f.filename.endswith("training.py") for f in stack), where(stack)
        kinds = [kind for kind, _, _ in events]
        assert "backward" in kinds and kinds.index("backward") < kinds.index("read"), kinds


FAST = {"checkpointing_steps": 100, "validation_steps": 100}


def test_stage1_reads_the_device_once_per_step(assets, recorder):  # noqa: F811
    with recorder:
        train_align.main(flags(assets, assets / "syncs_stage1", max_train_steps=5, **FAST))
    assert_one_read_after_backward(recorder, steps=[1, 2, 3])


def test_stage2_reads_the_device_once_per_step_guided_and_after_the_stop(assets, stage1, recorder):  # noqa: F811
    with recorder:
        train_self_transcendence.main(flags(assets, assets / "syncs_stage2", max_train_steps=6, guide_stop_step=3,
                                            guiding_model_name_or_path=stage1, no_t_range=True, **FAST))
    assert_one_read_after_backward(recorder, steps=[1, 2, 3, 4])  # steps 2, 3 guided; 4 the stop; 5 after


def test_the_recorder_sees_a_read_of_a_device_value():
    """The instrument itself: a parameter's `.item()` and a value computed from it count, a host tensor does not."""
    reads = HostReads()
    p = torch.nn.Parameter(torch.ones(2))
    with reads:
        host = torch.zeros(1)
        host.item()
        (p * 2).sum().item()
        moved = torch.ones(1).to(torch.device("cpu"))
        bool(moved > 0)
    assert [what for kind, what, _ in reads.events if kind == "read"] == ["item", "__bool__"]


def test_label_checks_read_nothing_off_the_cpu(tiny_sit):
    from diffusers_selftrans.alignment.self_transcendence import ClassConditionalGuide

    reads, guide = HostReads(), ClassConditionalGuide(null_class=10)
    x = torch.zeros(2, 4, 8, 8, device="meta")
    with reads:
        meta_labels = torch.zeros(2, dtype=torch.long, device="meta")
        tiny_sit._check_inputs(x, meta_labels, (), None)
        guide.check(class_labels=meta_labels)
        cpu_labels = torch.tensor([1, 2], device=torch.device("cpu"))  # a device value, here on the CPU
        tiny_sit._check_inputs(torch.zeros(2, 4, 8, 8), cpu_labels, (), None)
        guide.check(class_labels=cpu_labels)
    assert [what for kind, what, _ in reads.events if kind == "read"] == ["__int__"] * 3  # the CPU calls only

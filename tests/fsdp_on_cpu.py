"""Runs a training script under accelerate's FSDP on CPU processes (gloo), for the tests.

accelerate 1.15 selects `DistributedType.FSDP` only for accelerator devices (in `AcceleratorState`, the FSDP branch
sits under MULTI_GPU / NPU / XPU / ...): a CPU launch with an FSDP config (`ACCELERATE_USE_CPU=1`) silently runs
DDP (MULTI_CPU). This shim switches the state to FSDP with the `FullyShardedDataParallelPlugin` accelerate builds
from the launcher's `FSDP_*` variables; the rest (`fully_shard`, DCP save / load, state dicts) is accelerate's and
torch's own code, as on GPUs.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file fsdp.yaml tests/fsdp_on_cpu.py SCRIPT [ARGS...]
"""

import os
import runpy
import sys

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_init = Accelerator.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState re-reads it from PartialState
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        self.state.distributed_type = DistributedType.FSDP


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} SCRIPT [ARGS...]")
    Accelerator.__init__ = _init_with_fsdp_on_cpu
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")

"""Run a training script (argv[1], with the rest of argv) and send a real signal to one process at one training step,
as a cluster scheduler would: `PREEMPT_SIGNAL` (e.g. SIGTERM) to the process of rank `PREEMPT_RANK` during its
`PREEMPT_AT_CALL`-th time draw (`Transport.sample`, once per micro-step). Used by test_cluster_safety.py under
`accelerate launch`."""

import os
import runpy
import signal
import sys

from diffusers_selftrans.transport import Transport

script = sys.argv[1]
sys.argv = sys.argv[1:]
signum = getattr(signal, os.environ["PREEMPT_SIGNAL"])
call, rank = int(os.environ["PREEMPT_AT_CALL"]), int(os.environ.get("PREEMPT_RANK", "0"))
original, calls = Transport.sample, {"n": 0}


def sample(self, x0, generator=None):
    calls["n"] += 1
    if calls["n"] == call and int(os.environ.get("RANK", "0")) == rank:
        os.kill(os.getpid(), signum)
    return original(self, x0, generator)


Transport.sample = sample
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")

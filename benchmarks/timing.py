# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Wall-clock timing shared by the benchmarks: a device sync, a timed call, interleaved timing, a summary.

Every time is in milliseconds, one per timed repeat, the device synchronised before and after each repeat (an
asynchronous CUDA launch would otherwise be timed instead of the work). The scripts import this file by name
(`from timing import ...`), with `benchmarks/` put on `sys.path` so that a test loading a script by path finds it too.
"""

import statistics
import time
from typing import Any, Callable, Dict, List, Union

import torch


def synchronize(device: Union[str, torch.device]) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU, which runs synchronously."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_counts(warmup: int, repeats: int) -> None:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")


def timed(fn: Callable[[], Any], device: Union[str, torch.device], warmup: int, repeats: int) -> List[float]:
    """`fn` run `warmup` times untimed (kernels, allocator, caches), then `repeats` times: each one's wall time (ms)."""
    _check_counts(warmup, repeats)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_timing(fns: Dict[str, Callable[[], Any]], device: Union[str, torch.device], warmup: int,
                       repeats: int) -> Dict[str, List[float]]:
    """Wall times (ms) of each fn, run round-robin so that drift in the machine's load affects all of them alike.

    The order is rotated every round so that no fn always follows the same one; the first `warmup` rounds are untimed.
    """
    _check_counts(warmup, repeats)
    if not fns:
        raise ValueError("interleaved_timing needs at least one function.")
    names = list(fns)
    times = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times: List[float]) -> Dict[str, Any]:
    """Median, min and max of per-repeat times (ms), and the times themselves."""
    if not times:
        raise ValueError("summarize needs at least one time.")
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "times_ms": list(times)}

# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""One run per output folder, and nothing lost on preemption.

- `lock_output_dir`: the folder belongs to one run while it lives. The lock is a file created with `O_CREAT | O_EXCL`
  (atomic on local filesystems, NFSv3+ and Lustre, which lack a working `flock`), holding host, process id, start time
  and run id. A second run refuses and names the holder; a lock whose process is gone (same host) is taken over with a
  warning; another host's lock is taken over only with `--break_run_lock` (its process cannot be checked from here).
- `check_fresh_output_dir`: a run that does not resume refuses a folder holding another run's outputs, and offers the
  two honest choices: resume it, or `--overwrite_output_dir`, which clears the folder first. A folder never mixes two
  runs' checkpoints.
- `Preemption`: SIGTERM (Slurm, Kubernetes), SIGUSR1 (Slurm's `--signal`) and SIGINT only set a flag; the training
  loop finishes the optimizer step on every process (the flag travels with the step's one collective, the loss guard's
  gather), writes a checkpoint and exits with status 128 + the signal (143 for SIGTERM). A second SIGINT interrupts at
  once; `latest` is never damaged either way (checkpoints are renamed into place only when complete).
"""

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

from .checkpointing import resolve_resume_checkpoint

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
# Written first by every training run: a folder without it holds no run of ours, and is never cleared.
RUN_ARGS_NAME = "args.json"
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
# Exit status of a process that learnt of the preemption from another process (it received no signal itself).
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class OutputDirInUse(RuntimeError):
    """The output folder is locked by another run, or holds another run's outputs."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_lock(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged


def _describe(holder: dict) -> str:
    return (f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')})")


class RunLock:
    """The lock file of one output folder, held by this process (see `lock_output_dir`)."""

    def __init__(self, output_dir, run_id: str):
        self.path = Path(output_dir) / LOCK_NAME
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _stale_reason(self, holder: dict, break_lock: bool) -> Optional[str]:
        """Why the holder's lock may be taken over, or None."""
        if holder.get("host") == self.record["host"]:
            pid = int(holder.get("pid", -1))
            if pid == os.getpid():  # a run of this very process that ended without releasing (e.g. an exception)
                return "it was left by an earlier run of this process"
            if not _pid_alive(pid):
                return f"its process {pid} is gone"
            return None
        if break_lock:
            return f"--break_run_lock was passed (its host {holder.get('host')} cannot be checked from here)"
        return None

    def acquire(self, break_lock: bool = False) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                atexit.register(self.release)  # crashes and exits release it too; only a kill -9 leaves it
                return self
            holder = _read_lock(self.path)
            if holder is None:  # released meanwhile
                continue
            reason = self._stale_reason(holder, break_lock)
            if reason is None:
                raise OutputDirInUse(
                    f"{self.path.parent} is in use by {_describe(holder)}: two runs in one folder overwrite each "
                    f"other's checkpoints, log and model. Use another --output_dir (a job array: one per task). If "
                    f"that run is dead on another host, pass --break_run_lock."
                )
            # Take over by renaming the stale lock away (atomic: of two runs doing this at once, one succeeds).
            stale = self.path.with_name(f"{LOCK_NAME}.stale-{self.record['host']}-{os.getpid()}")
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                continue
            if _read_lock(stale) != holder:  # another run took it over first and we moved ITS lock: give it back
                os.replace(stale, self.path)
                continue
            os.remove(stale)
            logger.warning("Taking over the lock of %s in %s: %s.", _describe(holder), self.path.parent, reason)
        raise OutputDirInUse(f"Could not lock {self.path.parent}: other runs keep taking it.")

    def release(self) -> None:
        if self.held:
            self.held = False
            if _read_lock(self.path) == self.record:  # ours still (a resumed run shares the run id: compare all)
                self.path.unlink(missing_ok=True)


def folder_run_id(output_dir) -> Optional[str]:
    """The run id recorded in `output_dir/args.json`, if any."""
    try:
        return json.loads((Path(output_dir) / RUN_ARGS_NAME).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def lock_output_dir(accelerator, output_dir, run_id: str, break_lock: bool = False) -> RunLock:
    """The main process locks `output_dir` for run `run_id`. Every process calls this: all raise together if the
    folder is taken. `release()` the returned lock at the end (a no-op on the other processes)."""
    from accelerate.utils import broadcast_object_list

    lock, error = RunLock(output_dir, run_id), None
    if accelerator.is_main_process:
        try:
            lock.acquire(break_lock)
        except OutputDirInUse as err:
            error = str(err)
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise OutputDirInUse(error)
    return lock


def run_outputs(output_dir) -> list:
    """The entries of `output_dir` (names), the lock left out."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(LOCK_NAME))


def check_fresh_output_dir(accelerator, output_dir, *, overwrite: bool, resume_requested: bool = False) -> None:
    """A run that starts from scratch needs an empty folder; `overwrite` clears a run folder (one with `args.json`)
    first. `resume_requested` (`--resume_from_checkpoint latest` found no checkpoint): a folder whose run never
    reached a checkpoint nor an exported model (a requeued job preempted early) holds nothing to lose, and the run
    starts again in it."""
    found = run_outputs(output_dir)
    if found:
        _refuse_or_clear(accelerator, Path(output_dir), found, overwrite, resume_requested)
    accelerator.wait_for_everyone()  # every process has looked before the main process writes into the folder


def _refuse_or_clear(accelerator, root: Path, found: list, overwrite: bool, resume_requested: bool) -> None:
    if resume_requested and not any(n.startswith("checkpoint-") or n == "model_index.json" for n in found):
        logger.warning("%s holds no checkpoint nor model of its run: starting it again from step 0.", root)
        return
    shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
    if not overwrite:
        raise OutputDirInUse(
            f"{root} holds the outputs of another run ({shown}) and this run does not resume it: starting here would "
            f"overwrite its model and mix two runs' checkpoints. Either resume it (--resume_from_checkpoint latest, "
            f"with its flags), or pass --overwrite_output_dir to delete those outputs first, or use another "
            f"--output_dir."
        )
    if not (root / RUN_ARGS_NAME).is_file() and not any(n.startswith("checkpoint-") for n in found):
        raise OutputDirInUse(
            f"{root} holds files that are not a training run's ({shown}; no {RUN_ARGS_NAME}): --overwrite_output_dir "
            f"clears only run folders. Nothing was deleted; use another --output_dir."
        )
    accelerator.wait_for_everyone()  # every process has looked before the main process deletes
    if accelerator.is_main_process:
        logger.warning("--overwrite_output_dir: deleting %s from %s.", shown, root)
        for name in found:
            path = root / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    accelerator.wait_for_everyone()


def claim_output_dir(accelerator, output_dir, *, resume_from_checkpoint: Optional[str], allow_inexact: bool,
                     overwrite: bool, break_lock: bool):
    """Everything a training script does with its `--output_dir` before it writes there: lock it for this run, find
    the checkpoint to resume from (`checkpointing.resolve_resume_checkpoint`) and, when there is none, make sure the
    folder holds no other run. Returns `(run id, lock, checkpoint or None)`; a resumed run keeps its run id."""
    run_id = (resume_from_checkpoint and folder_run_id(output_dir)) or new_run_id()
    lock = lock_output_dir(accelerator, output_dir, run_id, break_lock=break_lock)
    resume = resolve_resume_checkpoint(resume_from_checkpoint, output_dir, num_processes=accelerator.num_processes,
                                       allow_inexact=allow_inexact)
    if resume is None:
        check_fresh_output_dir(accelerator, output_dir, overwrite=overwrite,
                               resume_requested=bool(resume_from_checkpoint))
    return run_id, lock, resume


class Preemption:
    """SIGTERM / SIGUSR1 / SIGINT set `signum` instead of killing the process (see the module docstring); `restore`
    puts the previous handlers back. A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signum: Optional[int] = None
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: signals cannot be caught here
                    pass

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("Received %s: finishing this step, then writing a checkpoint and exiting.",
                       signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else PREEMPTED_EXIT_CODE


class Preempted(SystemExit):
    """Raised (a SystemExit: a non-zero exit status) once the checkpoint of a preempted run is written."""


def exit_preempted(preemption: Preemption, step: int, checkpoint, lock: Optional[RunLock] = None):
    """After the checkpoint of a preempted run: restore the signal handlers, release the folder, exit non-zero."""
    preemption.restore()
    if lock is not None:
        lock.release()
    logger.warning("Preempted at step %d: %s holds everything; rerun the same command with "
                   "--resume_from_checkpoint latest to continue exactly.", step, checkpoint)
    raise Preempted(preemption.exit_code())


def finish_run(accelerator, lock: Optional[RunLock] = None) -> None:
    """The end of a run, on every process: wait until the main process has exported, then end the run together (the
    trackers, the process group) and release the folder. A process that tore down its process group while another
    still exported could abort at exit (seen on gloo under load), failing a finished run."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if lock is not None:
        lock.release()

"""Stopping cleanly before a SLURM time limit or pre-emption, and going back in the queue.

SLURM sends SIGTERM (and, with ``--signal=USR1@T``, SIGUSR1 T seconds earlier) before it
kills a job. A stage that fills a store in blocks checks :class:`StopSignals` between
blocks, so the block in progress is written whole, and then calls :func:`slurm_requeue`:
the requeued task resumes from the store's completion records.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading


class StopSignals:
    """While alive, SIGTERM and SIGUSR1 set ``.signal`` (the signal number) instead of
    ending the process; ``restore()`` puts the previous handlers back. Only the main thread
    can install handlers: elsewhere (a notebook's worker thread) it listens to nothing and
    ``.signal`` stays None."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def slurm_requeue() -> None:
    """Put this SLURM task (array task included) back in the queue with ``scontrol requeue``;
    outside SLURM (no ``SLURM_JOB_ID``) nothing happens. Prints one line on stderr saying
    whether it worked."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    msg = "requeued" if r.returncode == 0 else f"could not requeue ({r.stderr.strip()})"
    print(f"promptshift: SLURM job {job} {msg}", file=sys.stderr, flush=True)


__all__ = ["StopSignals", "slurm_requeue"]

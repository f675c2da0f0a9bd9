"""One `promptshift extract` process per device (``extract --devices cuda:0,cuda:1``)."""

from __future__ import annotations

import subprocess
import sys


def launch_per_device(devices: list[str], argv: list[str]) -> int:
    """Run ``promptshift extract ARGV`` once per device, process i filling shard i of
    len(devices) on ``devices[i]``, and wait for all; returns the largest exit code (0 when
    every process succeeded). The processes share the store safely: each shard owns whole
    storage chunks (docs/STORE.md). ``argv``: the extract command line, with or without
    its ``--devices`` option (dropped here)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--devices":
            skip = True
            continue
        if a.startswith("--devices="):
            continue
        args.append(a)
    procs = [subprocess.Popen([sys.executable, "-m", "promptshift.cli", *args, "--shard", f"{i}/{len(devices)}",
                               "--device", d]) for i, d in enumerate(devices)]
    return max([p.wait() for p in procs], default=0)


__all__ = ["launch_per_device"]

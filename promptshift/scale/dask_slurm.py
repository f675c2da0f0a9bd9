"""Dask workers as SLURM jobs (dask-jobqueue), for `promptshift metrics --slurm-workers N`."""

from __future__ import annotations

import os

from promptshift.errors import PromptShiftError


def start_slurm_cluster(n_workers: int, *, cores: int = 1, memory: str = "4GB", walltime: str = "01:00:00",
                        queue: str | None = None, timeout: float = 300.0):
    """Start ``n_workers`` single-process dask workers as SLURM jobs and wait for them."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as e:
        raise PromptShiftError("--slurm-workers needs dask-jobqueue: pip install 'promptshift[slurm]'") from e
    from distributed import Client

    kw = {}
    if os.environ.get("PROMPTSHIFT_SLURM_LOCAL"):  # single-node test clusters: keep traffic on loopback
        kw["scheduler_options"] = {"host": "127.0.0.1"}
    cluster = SLURMCluster(cores=cores, processes=1, memory=memory, walltime=walltime,
                           queue=queue or os.environ.get("PROMPTSHIFT_SLURM_PARTITION"),
                           job_extra_directives=["--output=/dev/null"], **kw)
    cluster.scale(jobs=n_workers)
    client = Client(cluster)
    try:
        client.wait_for_workers(n_workers, timeout=timeout)
    except Exception as e:
        client.close()
        cluster.close()
        raise PromptShiftError(f"dask workers did not start through SLURM within {timeout:.0f} s: {e}") from e
    client.close()
    return cluster

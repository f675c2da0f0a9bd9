"""`promptshift slurm` on a real single-node Slurm (started by .ci/run through
scripts/slurm/start_local_slurm.sh): the chain, resubmission after scancel, and metrics
through dask-jobqueue's SLURMCluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from promptshift.store import open_store
from tests.extract.test_processes import assert_same_arrays, cli, model_dir, run_ok, sweep  # noqa: F401

pytestmark = pytest.mark.slurm

if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
    if os.environ.get("CI"):
        pytest.fail("CI must start Slurm (scripts/slurm/start_local_slurm.sh) before the tests", pytrace=False)
    pytest.skip("no running Slurm here (scripts/slurm/start_local_slurm.sh starts one)", allow_module_level=True)


def wait_jobs(ids, timeout=900):
    ids = [str(i) for i in ids if i]
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"], capture_output=True, text=True)
        if not r.stdout.strip():
            return
        if "DependencyNeverSatisfied" in r.stdout:
            raise AssertionError(f"a dependency failed: {r.stdout}")
        time.sleep(1)
    raise AssertionError(f"jobs {ids} still queued after {timeout} s")


def jobs_of(store):
    return json.loads((store.parent / (store.name + ".slurm") / "jobs.json").read_text())


@pytest.fixture(scope="module")
def reference(sweep, tmp_path_factory):  # noqa: F811
    ref = tmp_path_factory.mktemp("slref") / "ref.zarr"
    run_ok("extract", sweep, "--store", ref, "--no-progress")
    run_ok("metrics", ref, "--out", ref.parent / "results")
    return ref


def _tables_equal(a, b):
    import pandas as pd

    names = sorted(p.name for p in a.glob("*.parquet"))
    assert names and names == sorted(p.name for p in b.glob("*.parquet"))
    for n in names:
        pd.testing.assert_frame_equal(pd.read_parquet(a / n), pd.read_parquet(b / n))


def test_chain_matches_single_process(sweep, reference, tmp_path):  # noqa: F811
    store = tmp_path / "s.zarr"
    out = run_ok("slurm", sweep, "--store", store, "--tasks", "3")
    assert "array=0-2" in out
    j = jobs_of(store)
    wait_jobs([j["plan"], j["extract"], j["verify"], j["metrics"]])
    assert open_store(store).complete
    assert_same_arrays(reference, store)
    _tables_equal(reference.parent / "results", tmp_path / "results")
    assert (tmp_path / "results" / "report.html").is_file()
    # nothing left to do: a rerun submits no extract tasks
    out = run_ok("slurm", sweep, "--store", store, "--tasks", "3")
    assert "array=none" in out
    wait_jobs(list(jobs_of(store).values())[:2])
    p = cli("slurm", sweep, "--store", store, "--tasks", "4")
    o, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "split into 3 SLURM tasks" in o


def test_dry_run_prints_the_sbatch_lines_that_submit_the_chain(sweep, reference, tmp_path):  # noqa: F811
    """The lines `--dry-run` prints, pasted into a shell, submit the same chain."""
    store = tmp_path / "s.zarr"
    out = run_ok("slurm", sweep, "--store", store, "--tasks", "2", "--dry-run")
    lines = out.split("# ---- the chain", 1)[1].splitlines()[1:]
    assert [ln.split("=", 1)[0] for ln in lines] == ["PLAN_JOB", "EXTRACT_JOB", "VERIFY_JOB", "METRICS_JOB"]
    assert not store.exists() and not (store.parent / "s.zarr.slurm" / "jobs.json").exists()  # nothing submitted
    script = "set -e\n" + "\n".join(lines) + "\necho $PLAN_JOB $EXTRACT_JOB $VERIFY_JOB $METRICS_JOB\n"
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    wait_jobs(r.stdout.split())
    assert open_store(store).complete
    assert_same_arrays(reference, store)
    _tables_equal(reference.parent / "results", tmp_path / "results")


def test_scancel_one_task_then_only_it_is_resubmitted(sweep, reference, tmp_path):  # noqa: F811
    store = tmp_path / "s.zarr"
    run_ok("slurm", sweep, "--store", store, "--tasks", "3")
    j = jobs_of(store)
    wait_jobs([j["plan"]])
    # cancel task 1 as soon as it runs (or while it is still pending)
    t0 = time.time()
    while time.time() - t0 < 300:
        r = subprocess.run(["squeue", "-h", "-r", "-j", j["extract"], "-o", "%K %T"], capture_output=True, text=True)
        states = dict(line.split() for line in r.stdout.strip().splitlines() if line.strip())
        if states.get("1") in ("RUNNING", "PENDING"):
            subprocess.run(["scancel", f"{j['extract']}_1"], check=True)
            break
        time.sleep(0.2)
    wait_jobs([j["extract"]])
    st = open_store(store)
    missing = [i for i in range(3) if not all(st.done()[b] for b in st.plan.shard_blocks(i, 3))]
    assert missing == [1], missing
    out = run_ok("slurm", sweep, "--store", store, "--tasks", "3")
    assert "array=1 " in out
    j2 = jobs_of(store)
    wait_jobs([j2["extract"], j2["verify"], j2["metrics"]])
    assert_same_arrays(reference, store)


def test_metrics_through_dask_jobqueue(reference, tmp_path):
    p = cli("metrics", reference, "--out", tmp_path / "r", "--slurm-workers", "1",
            env={"PROMPTSHIFT_SLURM_LOCAL": "1"})
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out
    _tables_equal(reference.parent / "results", tmp_path / "r")


def test_usr1_before_time_limit_requeues_and_resumes(sweep, reference, tmp_path):  # noqa: F811
    """SLURM's warning signal (USR1): the task finishes its block, records it, requeues
    itself, and the requeued run completes the shard; the store is still identical."""
    from tests.extract.test_processes import _wait_for_blocks

    store = tmp_path / "s.zarr"
    run_ok("slurm", sweep, "--store", store, "--tasks", "1")
    j = jobs_of(store)

    class _Alive:  # _wait_for_blocks polls a process; the job stands in for it here
        def poll(self):
            r = subprocess.run(["squeue", "-h", "-j", j["extract"]], capture_output=True, text=True)
            return None if r.stdout.strip() else 0

    _wait_for_blocks(store, 1, _Alive())
    assert not open_store(store).complete, "the task finished before it could be signalled"
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{j['extract']}_0"], check=True)
    wait_jobs([j["extract"], j["verify"], j["metrics"]])
    log = "".join(p.read_text() for p in (store.parent / (store.name + ".slurm") / "logs").glob("extract-*"))
    assert "stopped by signal" in log and "requeued" in log, log[-2000:]
    assert_same_arrays(reference, store)


def test_causal_job_in_the_chain(sweep, reference, tmp_path):  # noqa: F811
    """`--causal` adds a causal job between verify and metrics; on a complete store the
    chain is verify -> causal -> metrics, and the results hold the causal tables."""
    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    out = run_ok("slurm", sweep, "--store", store, "--tasks", "1", "--causal",
                 "--causal-args", "--analysis knockout --analysis steering --users 2")
    assert "causal=" in out and "array=none" in out
    j = jobs_of(store)
    wait_jobs([j["verify"], j["causal"], j["metrics"]])
    assert open_store(store).causal_analyses() == ["knockout", "steering"]
    curve = (tmp_path / "results" / "causal_knockout_curve.parquet")
    assert curve.is_file() and (tmp_path / "results" / "causal_steering_curve.parquet").is_file()
    # resubmitted, the causal job finds both analyses done and returns at once
    run_ok("slurm", sweep, "--store", store, "--tasks", "1", "--causal",
           "--causal-args", "--analysis knockout --analysis steering --users 2")
    j = jobs_of(store)
    wait_jobs([j["verify"], j["causal"], j["metrics"]])
    log = next((store.parent / (store.name + ".slurm") / "logs").glob(f"causal-{j['causal']}.out")).read_text()
    assert "knockout, steering already done" in log

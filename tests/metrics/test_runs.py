"""How metrics runs: worker counts, an external dask cluster, other store backends, no
torch, and an interrupted run followed by a rerun. Tables must not change with any of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

import promptshift.metrics as metrics
from promptshift.errors import MetricsError
from promptshift.store.core import open_store
from tests.metrics import synth

PY = sys.executable
BIN = Path(sys.executable).parent


def assert_same_tables(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def assert_same_files(d1: Path, d2: Path) -> None:
    f1 = sorted(p.name for p in d1.iterdir())
    f2 = sorted(p.name for p in d2.iterdir())
    assert f1 == f2
    for name in f1:
        if name == "provenance.json":  # holds the store path, which differs between copies
            continue
        assert (d1 / name).read_bytes() == (d2 / name).read_bytes(), name


def test_workers_one_and_two_give_identical_tables(synth_store, synth_tables, tmp_path):
    path = synth_store[0]
    t1 = metrics.compute(path, tmp_path / "w1", workers=1, n_boot=200, progress=False)
    t2 = metrics.compute(path, tmp_path / "w2", workers=2, n_boot=200, progress=False)
    assert_same_tables(t1, t2)
    assert_same_tables(t1, synth_tables[0])  # and equal to the in-process run
    assert_same_files(tmp_path / "w1", tmp_path / "w2")


def test_external_scheduler(synth_store, synth_tables, tmp_path):
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error"}
    sched = subprocess.Popen([str(BIN / "dask"), "scheduler", "--port", "0", "--no-dashboard",
                              "--scheduler-file", str(sched_file)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        import json

        address = json.loads(sched_file.read_text())["address"]
        worker = subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                   "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = metrics.compute(synth_store[0], tmp_path / "ext", scheduler=address, n_boot=200, progress=False)
        assert_same_tables(t, synth_tables[0])
        # the scheduler file (what a SLURM job script passes around) works as well
        t = metrics.compute(synth_store[0], tmp_path / "ext2", scheduler=str(sched_file), n_boot=200, progress=False)
        assert_same_tables(t, synth_tables[0])
    finally:
        for p in (worker, sched):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


@pytest.mark.parametrize("fmt", ["hdf5", "memory"])
def test_other_backends_give_identical_tables(fmt, synth_store, synth_tables, tok, tmp_path):
    path = None if fmt == "memory" else tmp_path / "s.h5"
    store, _ = synth.build(path, fmt="hdf5" if fmt == "hdf5" else "zarr", tok=tok)
    assert store.plan.hash() == open_store(synth_store[0]).plan.hash()
    t = metrics.compute(store if fmt == "memory" else path, tmp_path / "out", workers=0, n_boot=200, progress=False)
    assert_same_tables(t, synth_tables[0])
    if fmt == "memory":
        with pytest.raises(MetricsError, match="workers=0"):
            metrics.compute(store, tmp_path / "o2", workers=1, progress=False)


def test_runs_without_torch(synth_store, synth_tables, tmp_path):
    """A meta path finder (in sitecustomize, so dask's worker processes get it too) makes
    torch and transformers unimportable; metrics still runs, on a local cluster."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(f"{name} is blocked in this test")
                return None
        sys.meta_path.insert(0, _Block())
    """))
    code = textwrap.dedent(f"""
        import sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable: the blocker is not active")
        import promptshift.metrics as m
        m.compute({str(synth_store[0])!r}, {str(tmp_path / 'out')!r}, workers=1, n_boot=200, progress=False)
        bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers')]
        assert not bad, bad
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).resolve().parents[2])])}
    r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert_same_tables(metrics.load_results(tmp_path / "out"),
                       {k: v for k, v in metrics.load_results(synth_tables[1]).items()})


def test_interrupted_run_then_rerun(synth_store, synth_tables, tmp_path, monkeypatch):
    path, ref_dir = synth_store[0], synth_tables[1]
    out = tmp_path / "out"
    # 1. a run that dies while writing: some tables written, a temporary left behind
    calls = {"n": 0}
    orig = pd.DataFrame.to_parquet

    def dying(self, p, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            Path(p).write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
        return orig(self, p, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", dying)
    with pytest.raises(KeyboardInterrupt):
        metrics.compute(path, out, workers=0, n_boot=200, progress=False)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", orig)
    assert not (out / "summary.json").exists()
    (out / ".component_change.parquet.tmp-99999").write_bytes(b"stale")
    with pytest.raises(MetricsError, match="no finished metrics run"):
        metrics.load_results(out)
    metrics.compute(path, out, workers=0, n_boot=200, progress=False)
    assert_same_files(out, ref_dir)

    # 2. a real kill (SIGKILL) of a metrics process at some point of its run, then a rerun
    out2 = tmp_path / "out2"
    code = (f"import promptshift.metrics as m; m.compute({str(path)!r}, {str(out2)!r}, workers=0, n_boot=200, "
            "progress=False)")
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out2.exists() and any(out2.iterdir()):
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    metrics.compute(path, out2, workers=0, n_boot=200, progress=False)
    assert_same_files(out2, ref_dir)


def test_incomplete_store_is_refused(tok, tmp_path):
    from promptshift.store.core import Store
    from promptshift.sweep.plan import build_plan

    plan = build_plan(synth.sweep_config(), tok, synth.DIMS)
    Store.create(tmp_path / "s.zarr", plan, provenance={})
    with pytest.raises(Exception, match="incomplete"):
        metrics.compute(tmp_path / "s.zarr", tmp_path / "out", workers=0, progress=False)

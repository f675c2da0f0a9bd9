"""Real processes through the CLI: SIGKILL then resume, and concurrent shards, must both
give arrays byte-identical to one uninterrupted process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from promptshift.store import open_store
from tests.conftest import REPO, tiny_llama, write_sweep


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_llama(tok, n_layers=2, seed=3).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sweep(model_dir, tmp_path_factory):
    users = [{"id": f"u{i}", "text": f"Question number {i}: what is {i} plus {i * 3}?", "category": "reasoning"}
             for i in range(12)]
    return write_sweep(tmp_path_factory.mktemp("sw") / "proc.yaml", users=users, model=str(model_dir),
                       block_prompts=2, max_new_tokens=4, top_k=8, lens_top_k=3)


def cli(*args, env=None) -> subprocess.Popen:
    e = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "promptshift.cli", *map(str, args)], cwd=REPO, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_ok(*args):
    p = cli(*args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def assert_same_arrays(a: Path, b: Path):
    sa, sb = open_store(a), open_store(b)
    assert sa.names() == sb.names()
    for name in sa.names():
        x, y = np.asarray(sa.array(name)[...]), np.asarray(sb.array(name)[...])
        if x.dtype == object or x.dtype.kind in "TU":
            assert list(x) == list(y), name
        else:
            assert x.tobytes() == y.tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def reference(sweep, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_ok("extract", sweep, "--store", ref, "--no-progress")
    assert open_store(ref).complete
    return ref


def _wait_for_blocks(store: Path, n: int, proc, timeout=300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = list((store / "block_done" / "c").glob("*")) if store.exists() else []
        if len(done) >= n or proc.poll() is not None:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("kill_after", [1, 4])
def test_sigkill_then_resume_is_byte_identical(sweep, reference, tmp_path, kill_after):
    store = tmp_path / "s.zarr"
    p = cli("extract", sweep, "--store", store, "--no-progress")
    _wait_for_blocks(store, kill_after, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = open_store(store)
    assert not st.complete, "the run finished before it could be killed; the test proves nothing"
    run_ok("extract", sweep, "--store", store, "--no-progress")
    assert_same_arrays(reference, store)


def test_concurrent_shards_equal_one_process(sweep, reference, tmp_path):
    store = tmp_path / "s.zarr"
    procs = [cli("extract", sweep, "--store", store, "--shard", f"{i}/2", "--no-progress") for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    assert open_store(store).complete
    assert_same_arrays(reference, store)
    out = run_ok("verify", store)
    assert "OK" in out


def test_verify_flags_incomplete_store(sweep, tmp_path):
    store = tmp_path / "s.zarr"
    run_ok("extract", sweep, "--store", store, "--shard", "0/3", "--no-progress")
    p = cli("verify", store)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1 and "incomplete" in out


def test_hdf5_backend_matches_zarr(sweep, reference, tmp_path):
    h5 = tmp_path / "s.h5"
    run_ok("extract", sweep, "--store", h5, "--format", "hdf5", "--no-progress")
    assert_same_arrays(reference, h5)
    # and exporting zarr -> hdf5 gives the same arrays too
    run_ok("export", reference, "--to", tmp_path / "e.h5")
    assert_same_arrays(reference, tmp_path / "e.h5")


def test_sigterm_finishes_the_current_block_then_resumes(sweep, reference, tmp_path):
    store = tmp_path / "s.zarr"
    p = cli("extract", sweep, "--store", store, "--no-progress")
    _wait_for_blocks(store, 1, p)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "stopped by signal" in out
    st = open_store(store)
    assert 0 < st.done().sum() < st.done().size
    run_ok("extract", sweep, "--store", store, "--no-progress")
    assert_same_arrays(reference, store)


def test_one_process_per_device(sweep, reference, tmp_path):
    store = tmp_path / "s.zarr"
    run_ok("extract", sweep, "--store", store, "--devices", "cpu,cpu", "--no-progress")
    assert_same_arrays(reference, store)


def test_sigkill_at_random_points_ten_trials(sweep, reference, tmp_path):
    """Fault trials: SIGKILL at a random moment (during start-up, mid-block or between
    blocks), restart, and the store must end identical to the uninterrupted one."""
    import random

    rng = random.Random(1234)
    store = tmp_path / "s.zarr"
    outcomes = []
    for trial in range(10):
        if store.exists():
            import shutil

            shutil.rmtree(store)
        p = cli("extract", sweep, "--store", store, "--no-progress")
        target = rng.randint(0, 10)  # kill once this many blocks are done (0: during start-up)
        if target:
            _wait_for_blocks(store, target, p)
        else:
            time.sleep(rng.uniform(0.5, 6.0))
        time.sleep(rng.uniform(0, 0.05))
        p.send_signal(signal.SIGKILL)
        p.wait()
        done = int(open_store(store).done().sum()) if store.exists() else -1
        run_ok("extract", sweep, "--store", store, "--no-progress")
        assert_same_arrays(reference, store)
        outcomes.append(done)
    print("blocks done at kill time per trial:", outcomes)
    assert len(set(outcomes)) > 2, outcomes  # the kills really landed at different points

"""Synthetic stores (built once per session) and the tables computed from them in-process."""

from __future__ import annotations

import pytest

from tests.metrics import synth


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory, tok):
    """(zarr store path, truth) with keep=suffix."""
    d = tmp_path_factory.mktemp("synth")
    store, truth = synth.build(d / "s.zarr", keep="suffix", tok=tok)
    return d / "s.zarr", truth


@pytest.fixture(scope="session")
def synth_tables(synth_store, tmp_path_factory):
    """Tables of the synthetic store computed in this process (workers=0), and their dir."""
    import promptshift.metrics as metrics

    out = tmp_path_factory.mktemp("out") / "local"
    return metrics.compute(synth_store[0], out, workers=0, n_boot=200, progress=False), out

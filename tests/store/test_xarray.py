"""Every store the tool writes opens with xarray as one labelled dataset: the shape of the
`make run` store (extraction, then every causal analysis), each `keep`, opted-in full
patterns, a run without continuations, and the HDF5 export (through h5netcdf). Each
variable carries the store's dimension names and the store's values."""

from __future__ import annotations

import numpy as np
import pytest

from promptshift.causal import CausalConfig, run_causal
from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.store import open_store
from promptshift.store.verify import export_store
from promptshift.sweep.config import load_sweep
from tests.conftest import tiny_llama, write_sweep

xr = pytest.importorskip("xarray")


def _assert_same(ds, st) -> None:
    """Every stored array is a variable of ``ds`` with the store's dims and values."""
    names = st.backend.names()
    assert sorted(ds.data_vars) == sorted(names)
    for name in names:
        v, a = ds[name], st.backend.array(name)
        assert v.dims == st.backend.dims(name), name
        got, want = v.values, np.asarray(a[...])
        if want.dtype.kind in "OTU":
            assert [str(x) for x in got.ravel()] == [str(x) for x in want.ravel()], name
        else:
            assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), name


def _open_both(path, tmp_path):
    """The zarr store through ``xarray.open_zarr`` and its HDF5 export through h5netcdf."""
    pytest.importorskip("h5netcdf")
    st = open_store(path)
    with xr.open_zarr(path, consolidated=False) as ds:
        _assert_same(ds, st)
    h5 = tmp_path / (path.stem + ".h5")
    export_store(path, h5)
    with xr.open_dataset(h5, engine="h5netcdf") as ds:
        _assert_same(ds, open_store(h5))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, n_layers=2, seed=4)


def test_make_run_store_with_every_causal_analysis(tok, model, tmp_path):
    """The case: two or more causal analyses each stored a `meta_byte` dimension of its own
    length. The same kind, not named: one analysis rerun on fewer user prompts than the
    others (its `pair` and `user` dimensions change length)."""
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", max_new_tokens=3, top_k=8, lens_top_k=3))
    path = tmp_path / "run.zarr"
    fill_shard(sweep, ExtractConfig(store=str(path), progress=False), model=model, tok=tok)
    run_causal(sweep, CausalConfig(store=str(path), users=2, max_new_tokens=4, progress=False), model=model, tok=tok)
    st = open_store(path)
    assert st.causal_analyses() == ["continuation", "knockout", "multiturn", "patching", "phrases", "steering"]
    run_causal(sweep, CausalConfig(store=str(path), analyses=("patching",), users=1, progress=False), model=model,
               tok=tok)
    st = open_store(path)
    assert st.array("causal_patching_kl").shape[0] != st.array("causal_knockout_kl").shape[0]
    _open_both(path, tmp_path)


@pytest.mark.parametrize("keep,extra", [("last", {}), ("all", {"full_attention_layers": [1]}),
                                        ("suffix", {"max_new_tokens": 0, "components": ["attn_out", "resid_post"]})])
def test_every_keep(tok, model, tmp_path, keep, extra):
    settings = {"max_new_tokens": 2, "top_k": 4, "lens_top_k": 2, **extra}
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", keep=keep, **settings))
    path = tmp_path / f"{keep}.zarr"
    fill_shard(sweep, ExtractConfig(store=str(path), progress=False), model=model, tok=tok)
    _open_both(path, tmp_path)

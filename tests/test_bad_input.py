"""Bad input and faults during extraction: each ends in a clear, typed error, and never in
a partial or corrupt store (see also tests/sweep/test_config_plan.py, tests/test_models.py,
tests/store/test_store.py for the sweep-, model- and store-level cases)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from promptshift.errors import ExtractError, StoreError
from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.store import open_store
from promptshift.sweep.config import load_sweep
from tests.conftest import tiny_llama, write_sweep


@pytest.fixture()
def sweep(tmp_path):
    return write_sweep(tmp_path / "s.yaml", block_prompts=3, max_new_tokens=2, top_k=4, lens_top_k=2)


def _run(sweep, tok, model, store, **kw):
    return fill_shard(load_sweep(sweep, **kw.pop("sweep_kw", {})), ExtractConfig(store=store, progress=False, **kw),
                      model=model, tok=tok)


def test_layer_out_of_range_leaves_no_store(sweep, tok, tiny_model, tmp_path):
    store = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="layer 99, but the model has layers 0..2"):
        _run(sweep, tok, tiny_model, str(store), sweep_kw={"full_attention_layers": [99]})
    assert not store.exists() and not list(tmp_path.glob(".s.zarr.tmp*"))


def test_read_only_output_directory(sweep, tok, tiny_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits; emulate with a non-directory parent
            target = tmp_path / "file_not_dir"
            target.write_text("x")
            with pytest.raises(StoreError, match="cannot create store"):
                _run(sweep, tok, tiny_model, str(target / "s.zarr"))
        else:
            with pytest.raises(StoreError, match="not writable"):
                _run(sweep, tok, tiny_model, str(ro / "s.zarr"))
    finally:
        ro.chmod(0o755)


def test_disk_full_during_write_then_resume(sweep, tok, tiny_model, tmp_path, monkeypatch):
    from promptshift.store.core import Store

    ref = _run(sweep, tok, tiny_model, str(tmp_path / "ref.zarr"))
    orig = Store.write_block
    calls = {"n": 0}

    def full(self, block, data, selfcheck=float("nan")):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, block, data, selfcheck)

    monkeypatch.setattr(Store, "write_block", full)
    store = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="No space left on device.*rerun the same command to resume"):
        _run(sweep, tok, tiny_model, str(store))
    st = open_store(store)
    assert 0 < st.done().sum() < st.done().size  # the failed block is not marked done
    monkeypatch.setattr(Store, "write_block", orig)
    _run(sweep, tok, tiny_model, str(store))
    st = open_store(store)
    for name in ref.names():
        x, y = np.asarray(ref.array(name)[...]), np.asarray(st.array(name)[...])
        assert list(x) == list(y) if x.dtype.kind in "OTU" else x.tobytes() == y.tobytes(), name


def test_nan_activations_are_an_error_not_data(sweep, tok, tmp_path):
    """NaN from every token on: refused by the probe before a store exists."""
    model = tiny_llama(tok, n_layers=2, seed=5)
    h = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: o * float("nan"))
    store = tmp_path / "s.zarr"
    try:
        with pytest.raises(ExtractError, match="NaN or inf"):
            _run(sweep, tok, model, str(store))
    finally:
        h.remove()
    assert not store.exists()


# Non-finite activations are named as such, with their cause and the fix, before anything
# else can misread them (a residual-chain comparison sees NaN != NaN as a changed stream).
@pytest.mark.parametrize("components", [None, ["attn_out"]])
def test_float16_overflow_to_inf_is_the_non_finite_error_first(sweep, tok, tmp_path, components):
    """The case: a float16 run whose residual stream overflows to inf."""
    import torch

    model = tiny_llama(tok, n_layers=2, seed=7).half()
    with torch.no_grad():
        # finite weights (at most ~3.2e4), an MLP output of ~1.2e5: finite in float32, inf in float16
        model.model.layers[0].mlp.up_proj.weight.mul_(30)
        model.model.layers[0].mlp.down_proj.weight.mul_(4e5)
    kw = {"sweep_kw": {"components": components}} if components else {}
    with pytest.raises(ExtractError) as e:
        _run(sweep, tok, model, str(tmp_path / "s.zarr"), **kw)
    msg = str(e.value)
    assert "contains NaN or inf" in msg and "float16 computation overflowed" in msg and "--dtype float32" in msg
    assert "changes the residual stream" not in msg
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("components", [None, ["attn_out"]])
def test_a_nan_weight_is_named(sweep, tok, tmp_path, components):
    """The case: a float32 model with one NaN weight; the error names the tensor."""
    import torch

    model = tiny_llama(tok, n_layers=2, seed=8)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
    kw = {"sweep_kw": {"components": components}} if components else {}
    with pytest.raises(ExtractError, match=r"resid_post of layer 1 .*contains NaN or inf.*weights hold NaN or inf "
                                           r"\(model\.layers\.1\.self_attn\.o_proj\.weight\)"):
        _run(sweep, tok, model, str(tmp_path / "s.zarr"), **kw)
    assert not (tmp_path / "s.zarr").exists()


def test_non_finite_values_of_some_prompts_only(sweep, tok, tmp_path):
    """The same kind where the probe cannot see it: one token's embedding is NaN (only the
    prompts holding it go non-finite), or only the output side is (a NaN in the final norm:
    every activation finite, the logits not); float32 storage, one component kept.
    Refused with the prompt named; the block is not done."""
    import torch

    word = tok.encode(" France", add_special_tokens=False)[0]
    for where, match in (("embed", r"mlp_out of prompt \d+ \(.*, capital\) contains NaN or inf.*embed_tokens"),
                         ("norm", r"the logits of prompt \d+ .* contains NaN or inf.*model\.norm\.weight")):
        model = tiny_llama(tok, n_layers=2, seed=9)
        with torch.no_grad():
            if where == "embed":
                model.model.embed_tokens.weight[word, 0] = float("nan")
            else:
                model.model.norm.weight[0] = float("nan")
        store = tmp_path / f"{where}.zarr"
        with pytest.raises(ExtractError, match=match):
            _run(sweep, tok, model, str(store), sweep_kw={"components": ["mlp_out"], "storage_dtype": "float32"})
        assert not open_store(store).done().all()


def test_float16_overflow_names_the_fix(sweep, tok, tmp_path):
    model = tiny_llama(tok, n_layers=2, seed=6)
    h = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: o * 1e9)
    try:
        with pytest.raises(ExtractError, match="storage_dtype: float32"):
            _run(sweep, tok, model, None)
        st = _run(sweep, tok, model, None, sweep_kw={"storage_dtype": "float32"})
        assert np.abs(st.array("mlp_out")[...]).max() > 65504
    finally:
        h.remove()


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    bad = tmp_path / "bad.yaml"
    bad.write_text("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}]\nbaseline: nope\n")
    for args in (["plan", str(bad)], ["extract", str(bad), "--store", str(tmp_path / "s.zarr")],
                 ["extract", "default", "--store", str(tmp_path / "t.zarr"), "--shard", "3/2"],
                 ["info", str(tmp_path / "missing.zarr")]):
        r = subprocess.run([sys.executable, "-m", "promptshift.cli", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_any_failure_is_one_line_and_the_store_resumes(tok, tmp_path, monkeypatch, capsys):
    """A failure that is not a mistake in the input (here an injected RuntimeError from the
    model's forward pass, then from a causal analysis) ends `extract` and `causal` with one
    line on stderr and exit code 1, and the store stays resumable: rerunning the same
    command, without --overwrite, completes it, byte-identical to an uninterrupted run."""
    from promptshift.causal.runner import Runner
    from promptshift.cli import main
    from promptshift.extract.engine import Engine

    model_dir = tmp_path / "model"
    tiny_llama(tok, n_layers=2, seed=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sw = write_sweep(tmp_path / "s.yaml", model=str(model_dir), block_prompts=3, max_new_tokens=2, top_k=4,
                     lens_top_k=2)

    def cli(*args) -> tuple[int, str]:
        """Exit code, and the error line: the last line on stderr (above it, only progress bars)."""
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([*map(str, args), "--no-progress"])
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.endswith("\n"), err
        lines = err.splitlines()
        assert sum(line.startswith("error:") for line in lines) == (e.value.code != 0), err
        return e.value.code, lines[-1] if lines else ""

    ref, store = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    assert cli("extract", sw, "--store", ref)[0] == 0

    def failing(orig, after: int):
        calls = {"n": 0}

        def fn(self, *a, **k):
            calls["n"] += 1
            if calls["n"] > after:
                raise RuntimeError("injected failure\nin the forward pass")
            return orig(self, *a, **k)

        return fn

    monkeypatch.setattr(Engine, "extract_batch", failing(Engine.extract_batch, 2))
    code, err = cli("extract", sw, "--store", store)
    assert code == 1, err
    assert err.startswith("error: extract failed: RuntimeError: injected failure in the forward pass; what finished is "
                          "kept: rerun the same command to resume"), err
    assert 0 < open_store(store).done().sum() < open_store(store).done().size
    monkeypatch.undo()
    assert cli("extract", sw, "--store", store)[0] == 0
    a, b = open_store(ref), open_store(store)
    for name in a.names():
        x, y = np.asarray(a.array(name)[...]), np.asarray(b.array(name)[...])
        assert list(x) == list(y) if x.dtype.kind in "OTU" else x.tobytes() == y.tobytes(), name

    monkeypatch.setattr(Runner, "_batch", failing(Runner._batch, 3))
    code, err = cli("causal", sw, "--store", store, "--users", "2")
    assert code == 1 and err.startswith("error: causal failed: RuntimeError: injected failure"), err
    monkeypatch.undo()
    code, err = cli("causal", sw, "--store", store, "--users", "2")
    assert code == 0, err
    assert open_store(store).causal_analyses() == ["continuation", "knockout", "multiturn", "patching", "phrases",
                                                   "steering"]

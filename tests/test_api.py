"""The Python interface (`import promptshift as ps`): sweeps from Python objects, the
one-pair `compare` against a sweep's store, the store as an xarray dataset, and the whole
pipeline from a prompt file."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

import promptshift as ps
from promptshift.errors import SweepError
from tests.conftest import REPO, tiny_llama, write_sweep


def test_import_promptshift_does_not_import_torch():
    code = "import sys, promptshift as ps; ps.Sweep; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cli_start_does_not_import_pandas_or_torch():
    """The CLI's start (``--help``, argument errors) loads none of the heavy libraries: each
    command imports what it runs (pandas was ~80% of the start's import time)."""
    code = ("import sys, promptshift.cli; "
            "print(*[m in sys.modules for m in ('pandas', 'torch', 'transformers', 'zarr')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False"] * 4


def test_stages_are_callable_and_stay_subpackages():
    """`ps.extract` runs the stage even after `promptshift.extract.worker` was imported (which
    binds the name to the subpackage), and its submodules stay reachable."""
    import promptshift.extract.worker  # noqa: F401
    import promptshift.metrics.io  # noqa: F401

    for name in ("extract", "causal", "metrics", "report"):
        stage = getattr(ps, name)
        assert callable(stage) and stage.__name__ == f"promptshift.{name}"
        assert inspect.signature(stage) == inspect.signature(getattr(stage, name))
    assert ps.extract.worker.ExtractConfig and ps.metrics.io.StoreRef


def test_sweep_from_python_objects():
    s = ps.Sweep.from_prompts({"brief": "Be brief.", "pirate": {"text": "You are a pirate.", "tags": ["persona"]}},
                              ["What is 2 + 2?", "Name a colour."], baseline="no_system_turn", max_new_tokens=4)
    assert [x.name for x in s.system_prompts] == ["brief", "pirate"]
    assert s.system_prompts[1].tags == ("persona",)
    assert [(u.id, u.text) for u in s.user_prompts] == [("user_0", "What is 2 + 2?"), ("user_1", "Name a colour.")]
    assert (s.baseline, s.max_new_tokens) == ("no_system_turn", 4)
    s2 = ps.Sweep.from_prompts(["Be brief."], {"q": "Why?"})
    assert (s2.system_prompts[0].name, s2.user_prompts[0].id) == ("system_0", "q")
    s3 = ps.Sweep.from_prompts(s.system_prompts, [{"id": "cap", "text": "Capital of France?", "expected": "Paris"}])
    assert s3.user_prompts[0].expected == "Paris"


@pytest.mark.parametrize("kwargs, message", [
    (dict(system_prompts={"a": "x"}, user_prompts=["q"], keep="everything"), "`keep` must be one of"),
    (dict(system_prompts={"a": "x"}, user_prompts=["q"], colour="red"), "unknown sweep setting"),
    (dict(system_prompts=[{"name": "a", "txt": "x"}], user_prompts=["q"]), "unknown key"),
    (dict(system_prompts=42, user_prompts=["q"]), "must be a dict, a list"),
    (dict(system_prompts={}, user_prompts=["q"]), "no system prompts"),
])
def test_sweep_from_python_objects_errors_name_the_problem(kwargs, message):
    with pytest.raises(SweepError, match=message):
        ps.Sweep.from_prompts(**kwargs)


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, tok, tiny_model):
    """A 3 x 3 sweep extracted with the tiny model (float32 storage), and its metrics."""
    d = tmp_path_factory.mktemp("api")
    sweep = ps.Sweep.from_file(write_sweep(d / "s.yaml", storage_dtype="float32", max_new_tokens=6))
    st = ps.extract(sweep, d / "store.zarr", model=tiny_model, tokenizer=tok, progress=False)
    res = ps.metrics(d / "store.zarr", d / "results", workers=0, n_boot=20, progress=False)
    return sweep, st, res


def test_compare_equals_the_store_for_the_same_pair(sweep_store, tok, tiny_model):
    """`compare` runs a one-pair sweep in memory; its numbers equal the full sweep's store
    for that pair up to float32 rounding (the two runs batch the prompts differently), and
    its centred cosine is the only column that depends on the sweep (its own mean)."""
    sweep, st, res = sweep_store
    system = next(s for s in sweep.system_prompts if s.name == "pirate")
    user = next(u for u in sweep.user_prompts if u.id == "capital")
    c = ps.compare("", system.text, user.text, model=tiny_model, tokenizer=tok, storage_dtype="float32",
                   max_new_tokens=6)
    cc = res.tables["component_change"]
    ref = cc[(cc["system"] == "pirate") & (cc["user_id"] == "capital") & cc["position"].isin(["last", "suffix_mean"])]
    cols = ["cosine", "l2", "rel_change", "norm_variant", "norm_baseline"]
    got = c.layers.set_index(["layer", "component", "position"])[cols].sort_index()
    want = ref.set_index(["layer", "component", "position"])[cols].sort_index()
    assert got.index.equals(want.index) and len(got) == 3 * 4 * 2
    # float32 activations of a 3-layer model computed in two batch layouts: differences are
    # sums' rounding, a few ulps of the values (tests/tolerance.py); 1e-4 relative is far
    # above that and far below any real difference (another pair changes values by > 1%)
    scale = np.maximum(np.abs(want.to_numpy()), 1.0)
    assert np.all(np.abs(got.to_numpy() - want.to_numpy()) <= 1e-4 * scale)
    oc = res.tables["output_change"]
    o = oc[(oc["system"] == "pirate") & (oc["user_id"] == "capital")].iloc[0]
    assert c.output["top1_changed"] == o["top1_changed"]
    assert abs(c.output["kl"] - o["kl"]) <= 1e-4 * max(1.0, o["kl"])
    # the comparison holds the pair's own store: the same variant text and tokens
    pv = c.store.plan.pairs.iloc[0]["variant"]
    assert system.text in c.store.prompts.iloc[pv]["text"]


def test_compare_baselines(tok, tiny_model):
    none = ps.compare(None, "Be brief.", "Why?", model=tiny_model, tokenizer=tok, max_new_tokens=0)
    empty = ps.compare("", "Be brief.", "Why?", model=tiny_model, tokenizer=tok, max_new_tokens=0)
    named = ps.compare("Be long.", "Be brief.", "Why?", model=tiny_model, tokenizer=tok, max_new_tokens=0)
    assert (none.store.plan.meta["baseline"], empty.store.plan.meta["baseline"],
            named.store.plan.meta["baseline"]) == ("no_system_turn", "empty_system", "a")
    with pytest.raises(SweepError, match="non-empty"):
        ps.compare(None, "  ", "Why?", model=tiny_model, tokenizer=tok)


def test_store_to_xarray_assembles_derived_components(sweep_store):
    _, st, _ = sweep_store
    ds = ps.open(st.path).to_xarray()
    assert ds["resid_post"].dims == ("token", "layer", "hidden")
    assert ds["resid_pre"].dims == ("token", "layer", "hidden")
    assert np.array_equal(ds["resid_pre"].values, np.asarray(st.array("resid_pre")[...]))
    assert np.array_equal(ds["attn_out"].values, np.asarray(st.array("attn_out")[...]))
    assert json.loads(ds.attrs["provenance"])["weights_sha256"] == st.provenance["weights_sha256"]


def test_run_a_prompt_file_end_to_end(tmp_path, tok):
    """`ps.run` on a notebook-format prompt file with a model saved to a local folder
    (loaded by path like any user model): store, causal results, tables and report."""
    model_dir = tmp_path / "model"
    tiny_llama(tok, n_layers=2, seed=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = {
        "metadata": {"purpose": "api test"},
        "test_prompts": {"factual": [{"id": "cap", "prompt": "Capital of France?", "expected": "Paris"},
                                     {"id": "sum", "prompt": "What is 2 + 3?", "expected": "5"}]},
        "system_prompts": {"none": {"text": ""}, "brief": {"text": "Be brief."},
                           "pirate": {"text": "You are a pirate."}},
    }
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    lines = []
    res = ps.run(ps.Sweep.from_file(tmp_path / "p.json", max_new_tokens=4), out=tmp_path / "out",
                 model=str(model_dir), causal_users=2, workers=0, echo=lines.append)
    assert isinstance(res, ps.Results) and res.report.is_file()
    assert set(res.tables["output_change"]["system"]) == {"brief", "pirate"}
    assert "causal_patching" in res.tables
    assert any(line.startswith("[4/4] report") for line in lines)
    st = ps.open(tmp_path / "out" / "store.zarr")
    assert st.plan.meta["baseline"] == "no_system_turn"  # the notebook format's baseline
    assert st.complete


def test_run_with_one_causal_user_skips_steering_with_a_note(tmp_path, tok):
    """Steering vectors are tested on held-out user prompts: with a causal scope of one user
    prompt `ps.run` runs the other analyses, says that steering was skipped, and reports."""
    model_dir = tmp_path / "model"
    tiny_llama(tok, n_layers=2, seed=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sweep = ps.Sweep.from_prompts({"pirate": "You are a pirate."}, ["What is 2 + 3?", "Name a colour."],
                                  max_new_tokens=2)
    lines = []
    res = ps.run(sweep, out=tmp_path / "out", model=str(model_dir), causal_users=1, workers=0, progress=False,
                 echo=lines.append)
    assert any("steering skipped" in line for line in lines), lines
    assert "causal_patching" in res.tables and "causal_knockout" in res.tables
    assert "causal_steering" not in res.tables and res.report.is_file()
    assert "steering" not in ps.open(tmp_path / "out" / "store.zarr").causal_analyses()


def test_run_from_the_command_line_is_the_same_pipeline(tmp_path, tok, monkeypatch):
    """The CLI's `run` is a thin shell: it calls `promptshift.api.run` with its options."""
    from promptshift import api, cli

    seen = {}
    monkeypatch.setattr(api, "run", lambda *a, **k: seen.update(args=a, kwargs=k))
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--sweep", "quick", "--out", str(tmp_path), "--causal-users", "3", "--no-causal",
                  "--device", "cpu", "--dtype", "float32", "--keep", "suffix", "--no-progress"])
    assert e.value.code == 0
    assert seen["args"][0] == "quick" and seen["kwargs"]["causal"] is False and seen["kwargs"]["causal_users"] == 3
    k = seen["kwargs"]
    assert (k["device"], k["dtype"], k["keep"], k["progress"]) == ("cpu", "float32", "suffix", False)
    assert "chat_template" not in k and "trust_remote_code" not in k  # not given: the sweep's own

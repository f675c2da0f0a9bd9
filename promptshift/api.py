"""The Python interface: the whole pipeline (:func:`run`), the single-pair look
(:func:`compare`), :func:`plan`, :func:`open` and :class:`Sweep`, for notebooks and scripts.

``import promptshift as ps`` gives these and the four stages, each defined in its own
subpackage and callable as it (:mod:`promptshift.stage`): ``ps.extract`` (=
``promptshift.extract.extract``), ``ps.causal``, ``ps.metrics``, ``ps.report``. The
``promptshift`` command line is a thin shell over them. Importing this module costs no
torch: what runs a model imports it when called, and ``ps.metrics``, ``ps.report`` and
``ps.open`` never do, so a store can be re-analysed on a machine without torch.

A notebook session::

    import promptshift as ps
    sweep = ps.Sweep.from_prompts({"pirate": "You are a pirate."}, ["What is 2 + 2?", "Name a colour."])
    res = ps.run(sweep, out="runs/nb")          # plan -> extract -> causal -> metrics -> report
    res.tables["component_change"]              # pandas DataFrames, docs/RESULTS.md
    ds = ps.open("runs/nb/store.zarr").to_xarray()
    ps.compare(None, "You are a pirate.", "What is 2 + 2?").layers   # one pair, in memory
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from promptshift.sweep.config import SweepConfig, load_sweep

# A sweep: what to run (prompts, model, baseline, what to keep). ``Sweep.from_file``,
# ``Sweep.builtin`` and ``Sweep.from_prompts`` build one; every stage also takes a path or
# a built-in name where it takes a sweep.
Sweep = SweepConfig

if TYPE_CHECKING:  # pandas (~1 s to import) only where a stage that makes tables runs
    import pandas as pd


def _sweep(sweep: SweepConfig | str | Path | None, **overrides: Any) -> SweepConfig:
    if isinstance(sweep, SweepConfig):
        if not any(v is not None for v in overrides.values()):
            return sweep
        import dataclasses

        return dataclasses.replace(sweep, **{k: v for k, v in overrides.items() if v is not None})
    return load_sweep(sweep, **overrides)


def plan(sweep: SweepConfig | str | Path | None = None, **overrides: Any):
    """Render, pair and align every prompt of ``sweep`` with the model's tokenizer (no weights).

    Returns a :class:`promptshift.sweep.plan.Plan`: ``.prompts`` and ``.pairs`` DataFrames,
    ``.summary()``, ``.estimate_bytes(keep)`` (store size in bytes). Raises SweepError /
    TemplateError for prompts the template cannot render or label exactly."""
    from promptshift.sweep.plan import build_plan, load_plan_inputs

    s = _sweep(sweep, **overrides)
    tok, dims = load_plan_inputs(s)
    return build_plan(s, tok, dims)


def open(path: str | Path):  # noqa: A001 - ps.open(PATH), like zarr.open / xarray.open_dataset
    """An existing store, read-only: ``.prompts``, ``.pairs`` (DataFrames),
    ``.component(name, prompt)`` ((kept tokens, layers, hidden) array), ``.to_xarray()``
    (a labelled dataset with every component, ``resid_pre`` assembled), ``.plan``."""
    from promptshift.store import open_store

    return open_store(path)


def run(sweep: SweepConfig | str | Path | None = "quick", out: str | Path = "runs/default", *, model: str | None = None,
        causal: bool = True, causal_users: int | None = None, workers: int | None = None, overwrite: bool = False,
        baseline: str | None = None, device: str | None = None, dtype: str | None = None, progress: bool = True,
        echo: Callable[[str], None] | None = None, **sweep_overrides: Any):
    """The whole pipeline: plan -> extract -> causal analyses -> metrics -> report.

    Writes ``out/store.zarr``, ``out/results/`` and ``out/report.html`` and returns the
    :class:`Results` (``.report`` is the HTML path). ``causal_users=N`` runs the causal
    analyses on N user prompts spread over the sweep (default all; steering, which tests
    on held-out user prompts, is skipped with a note below 2); a rerun keeps what an
    earlier run finished (extraction blocks, causal analyses). ``device`` / ``dtype`` as for
    extract (default: auto); ``sweep_overrides``: sweep fields (``keep``,
    ``chat_template``, ``trust_remote_code``, ``max_new_tokens``, ...). ``echo`` receives one
    line per stage (default: stderr). Errors: SweepError / TemplateError for the sweep,
    ExtractError, CausalError, MetricsError from the stages."""
    from promptshift.causal import CausalConfig, missing_analyses, run_causal, scope_users
    from promptshift.extract.worker import ExtractConfig
    from promptshift.extract.worker import fill_shard
    from promptshift.metrics import metrics
    from promptshift.report import report

    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    s = _sweep(sweep if sweep is not None else "quick", model=model, baseline=baseline,
               **sweep_overrides)  # bad input: nothing written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "store.zarr"
    n = 4 if causal else 3
    t0 = time.perf_counter()
    say(f"[1/{n}] extract {s.name}: {len(s.variants)} system x {len(s.user_prompts)} user prompts -> {store_path}")
    st = fill_shard(s, ExtractConfig(store=str(store_path), overwrite=overwrite, device=device, dtype=dtype,
                                     progress=progress))
    t1 = time.perf_counter()
    say(f"      done in {t1 - t0:.0f} s")
    if causal:
        todo = missing_analyses(st, s, causal_users)  # a rerun keeps what an earlier run finished
        if "steering" in todo and len(scope_users(s, causal_users)) < 2:
            todo = tuple(a for a in todo if a != "steering")
            say("      steering skipped: it tests on held-out user prompts, and the causal scope has fewer than 2")
        say(f"[2/{n}] causal analyses: {', '.join(todo) or 'all already in the store'}")
        if todo:
            run_causal(s, CausalConfig(store=str(store_path), analyses=tuple(todo), users=causal_users,
                                       device=device, dtype=dtype, progress=progress))
        say(f"      done in {time.perf_counter() - t1:.0f} s")
    t2 = time.perf_counter()
    results_dir = out / "results"
    say(f"[{n - 1}/{n}] metrics -> {results_dir}")
    # judged with the sweep's checks as given
    res = metrics(str(store_path), results_dir, workers=workers, sweep=s, progress=progress)
    t3 = time.perf_counter()
    say(f"      done in {t3 - t2:.0f} s")
    say(f"[{n}/{n}] report")
    report(res, out / "report.html")
    say(f"      done in {time.perf_counter() - t3:.0f} s")
    say(f"\nstore:   {store_path}\nresults: {results_dir}\nreport:  {res.report}")
    return res


@dataclass
class Comparison:
    """One (baseline, variant) pair computed in memory by :func:`compare`.

    ``layers``: one row per layer × component × position (``last``, ``suffix_mean``) with
    the columns of ``component_change`` (cosine, cosine_centered, l2, rel_change, norms;
    docs/RESULTS.md); ``output``: the pair's ``output_change`` row as a dict (full- and
    top-k distances, top-1 change, continuations); ``tables``: every table of the one-pair
    metrics run; ``store``: the in-memory store (``.component(name, prompt)``, ``.plan``)."""

    layers: pd.DataFrame
    output: dict
    tables: dict[str, pd.DataFrame] = field(repr=False)
    store: Any = field(repr=False)

    def __repr__(self) -> str:
        last = self.layers[(self.layers["position"] == "last") & (self.layers["component"] == "resid_post")]
        worst = last.loc[last["cosine"].idxmin()] if len(last) else None
        where = f", least similar resid_post at layer {int(worst['layer'])} (cos {worst['cosine']:.3f})" \
            if worst is not None else ""
        return f"Comparison({len(self.layers)} rows{where})"


def compare(system_a: str | None, system_b: str, user: str, *, model=None, tokenizer=None,
            **settings: Any) -> Comparison:
    """The single-pair look: how ``system_b`` changes the model on ``user`` against ``system_a``.

    ``system_a`` is the baseline: a text, ``""`` (a system turn with empty text) or None (no
    system turn at all: whatever the template does; some templates inject a default).
    ``system_b`` is the variant's system text. ``model``: a model spec (HF id, folder,
    .gguf; None = the embedded SmolLM2) or a loaded HF model with its ``tokenizer``.
    ``settings``: sweep fields (``components``, ``keep``, ``max_new_tokens``,
    ``chat_template``, ...). Runs the same extraction and metrics code as a sweep, on a
    one-pair sweep in memory, so every number equals the store's for that pair, except
    ``cosine_centered``, whose mean μ is this pair's own (a sweep's μ is over all its prompts)."""
    from promptshift.errors import SweepError
    from promptshift.extract import extract
    from promptshift.metrics import compute
    from promptshift.sweep.config import SystemPrompt, UserPrompt

    if not isinstance(system_b, str) or not system_b.strip():
        raise SweepError("`system_b` (the variant) must be a non-empty system prompt text")
    systems = [SystemPrompt(name="b", text=system_b)]
    if system_a is None:
        baseline = "no_system_turn"
    elif not system_a.strip():
        baseline = "empty_system"
    else:
        baseline = "a"
        systems.append(SystemPrompt(name="a", text=system_a))
    spec = model if isinstance(model, (str, type(None))) else None
    s = SweepConfig(name="compare", source="python:compare", system_prompts=systems,
                    user_prompts=[UserPrompt(id="user", text=user)], baseline=baseline,
                    **({"model": spec} | settings))
    if spec is None and model is None:
        model, tokenizer = _cached_model(None, s)
    elif spec is not None:
        model, tokenizer = _cached_model(spec, s)
    st = extract(s, None, model=model, tokenizer=tokenizer, progress=False, selfcheck=False)
    tables = compute(st, None, workers=0, n_boot=1, progress=False)
    cc = tables["component_change"]
    layers = cc[~cc["is_control"] & cc["position"].isin(["last", "suffix_mean"])].reset_index(drop=True)
    oc = tables["output_change"]
    output = oc.iloc[0].to_dict() if len(oc) else {}
    return Comparison(layers=layers, output=output, tables=tables, store=st)


_MODELS: dict[tuple, tuple] = {}


def _cached_model(spec: str | None, sweep: SweepConfig):
    """Load (once per process) the model and tokenizer ``compare`` runs: a notebook that
    compares many pairs pays for loading once."""
    key = (spec, sweep.chat_template, sweep.trust_remote_code)
    if key not in _MODELS:
        from promptshift.models import load_model, load_tokenizer

        _MODELS[key] = (load_model(spec, trust_remote_code=sweep.trust_remote_code),
                        load_tokenizer(spec, sweep.chat_template, sweep.trust_remote_code))
    return _MODELS[key]


__all__ = ["Comparison", "Sweep", "compare", "open", "plan", "run"]

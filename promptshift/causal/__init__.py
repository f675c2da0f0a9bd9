"""`promptshift causal`: interventions that test which internal changes *cause* the output
change, run with the model and written into the activation store next to the sweep.

Analyses (docs/CAUSAL.md explains each, and what ``promptshift metrics`` derives):

* ``patching``: the variant's residual stream patched into the baseline, per layer;
* ``knockout``: attention to the system prompt blocked from layer l on, per l;
* ``phrases``: each phrase of each system prompt left out; token attribution;
* ``steering``: mean residual difference added to held-out baselines, per layer;
* ``multiturn``: attention to the system prompt and rule adherence over dialogue turns.

Each analysis is stored as ``causal_<name>_*`` arrays with a JSON ``causal_<name>_meta``
written last; rerunning an analysis replaces it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from promptshift.causal.analyses import CausalError, Refs, Scope, knockout, patching, phrases, steering
from promptshift.store.core import Store, open_store
from promptshift.sweep.config import SweepConfig, load_sweep

ANALYSES = ("patching", "knockout", "phrases", "steering", "multiturn")


@dataclass
class CausalConfig:
    store: str | Store  # path, or an open store (tests, notebooks)
    analyses: tuple[str, ...] = ANALYSES
    users: int | None = None  # N user prompts spread evenly over the sweep (default: all); see scope_users
    suite: str = "multiturn"  # multi-turn suite for `multiturn`
    max_new_tokens: int = 16  # reply length for the multi-turn adherence check
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    progress: bool = True
    token_budget: int = 4096

    def __post_init__(self):
        if isinstance(self.analyses, str):
            self.analyses = (self.analyses,)
        names = []
        for a in self.analyses:
            names += list(ANALYSES) if a == "all" else [a]
        bad = [a for a in names if a not in ANALYSES]
        if bad:
            raise CausalError(f"unknown analysis {bad[0]!r}; choose from {', '.join(ANALYSES)} or all")
        self.analyses = tuple(dict.fromkeys(names))
        if self.users is not None and (not isinstance(self.users, int) or self.users < 1):
            raise CausalError(f"`--users` must be a positive integer, got {self.users!r}")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 512:
            raise CausalError(f"`--max-new-tokens` must be an integer in [1, 512], got {self.max_new_tokens!r}")


def run_causal(sweep: str | SweepConfig | None, cfg: CausalConfig, *, model=None, tok=None) -> dict[str, float]:
    """Run the configured analyses on the store's sweep; returns seconds per analysis."""
    from promptshift.causal.runner import Runner
    from promptshift.extract.run import provenance
    from promptshift.sweep.plan import build_plan, load_plan_inputs

    if not isinstance(sweep, SweepConfig):
        sweep = load_sweep(sweep)
    store = cfg.store if isinstance(cfg.store, Store) else open_store(cfg.store, mode="r+")
    plan = store.plan
    if tok is None:
        tok, dims = load_plan_inputs(sweep)
    else:
        from promptshift.sweep.plan import ModelDims

        dims = ModelDims.from_config(model.config)
    if build_plan(sweep, tok, dims).hash() != store.attrs.get("plan_hash"):
        raise CausalError(f"the store {cfg.store} holds a different sweep (or model or settings) than the one given; "
                          "pass the sweep the store was extracted with")
    if model is None:
        from promptshift.models import load_model

        model = load_model(sweep.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=sweep.trust_remote_code,
                           allow_pickle=cfg.allow_pickle)
    sha = provenance(model, tok, sweep, plan)["weights_sha256"]
    if sha != store.provenance.get("weights_sha256"):
        raise CausalError(f"the model's weights (sha256 {sha[:16]}) are not the ones the store was extracted with "
                          f"({str(store.provenance.get('weights_sha256'))[:16]}); load the same model")
    scope = Scope(users=scope_users(sweep, cfg.users), progress=cfg.progress)
    runner = Runner(model, token_budget=cfg.token_budget)
    timings: dict[str, float] = {}
    refs = None
    try:
        for name in cfg.analyses:
            t0 = time.perf_counter()
            if name == "multiturn":
                arrays, meta = _multiturn(model, tok, sweep, cfg)
            else:
                if refs is None:
                    refs = Refs(runner, plan, scope)
                fn = {"patching": patching, "knockout": knockout, "steering": steering}.get(name)
                arrays, meta = (fn(runner, plan, scope, refs) if fn else phrases(runner, plan, scope, refs, tok=tok))
            meta = {**meta, "analysis": name, "weights_sha256": sha, "seconds": time.perf_counter() - t0,
                    "n_layers": runner.L}
            store.write_causal(name, arrays, meta)
            timings[name] = time.perf_counter() - t0
            if cfg.progress:
                print(f"causal {name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)
    finally:
        runner.close()
    return timings


def scope_users(sweep: SweepConfig, n: int | None) -> list[str]:
    """The user prompts the analyses cover: all, or ``n`` of them spread evenly over the
    sweep's order (every k-th), so that a subset of a sweep ordered by category still
    covers every category."""
    ids = [u.id for u in sweep.user_prompts]
    if n is None or n >= len(ids):
        return ids
    pick = np.unique(np.round(np.linspace(0, len(ids) - 1, n)).astype(int))
    return [ids[i] for i in pick]


def missing_analyses(store: Store, sweep: SweepConfig, users: int | None = None) -> tuple[str, ...]:
    """The analyses not yet in ``store`` for this scope (an analysis run on other user
    prompts counts as missing), in the order they run."""
    want = scope_users(sweep, users)
    done = set(store.causal_analyses())
    out = []
    for name in ANALYSES:
        if name in done:
            _, meta = store.read_causal(name)
            if name == "multiturn" or meta.get("users") == want:
                continue
        out.append(name)
    return tuple(out)


def _multiturn(model, tok, sweep: SweepConfig, cfg: CausalConfig):
    from promptshift.causal.multiturn import load_multiturn, multiturn
    from promptshift.extract.engine import Engine
    from promptshift.models import eos_ids

    suite = load_multiturn(cfg.suite)
    engine = Engine(model, components=(), top_k=1, lens_top_k=1, token_budget=cfg.token_budget)
    try:
        return multiturn(engine, tok, suite, max_new_tokens=cfg.max_new_tokens, eos_ids=eos_ids(model, tok),
                         progress=cfg.progress)
    finally:
        engine.remove_hooks()


__all__ = ["ANALYSES", "CausalConfig", "CausalError", "missing_analyses", "run_causal", "scope_users"]


# `promptshift.causal(...)` runs the stage (promptshift.api.causal); the subpackage stays as it is
from promptshift.stage import callable_stage  # noqa: E402

callable_stage(__name__)

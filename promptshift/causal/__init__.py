"""`promptshift causal`: interventions that test which internal changes *cause* the output
change, run with the model and written into the activation store next to the sweep.

Analyses (docs/CAUSAL.md explains each, and what ``promptshift metrics`` derives):

* ``patching``: the variant's residual stream patched into the baseline, per layer;
* ``knockout``: attention to the system prompt blocked from layer l on, per l;
* ``phrases``: each phrase of each system prompt left out; token attribution;
* ``steering``: mean residual difference added to held-out baselines, per layer;
* ``multiturn``: attention to the system prompt and rule adherence over dialogue turns;
* ``continuation``: patching as above, scored on the variant's whole greedy reply
  (teacher-forced mean log-probability) instead of the first answer token.

Each analysis is stored as ``causal_<name>_*`` arrays with a JSON ``causal_<name>_meta``
written last; rerunning an analysis replaces it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from promptshift.causal.analyses import CausalError, Refs, Scope, knockout, patching, phrases, steering
from promptshift.stage import callable_stage
from promptshift.store.core import Store, open_store
from promptshift.sweep.config import SweepConfig, load_sweep

ANALYSES = ("patching", "knockout", "phrases", "steering", "multiturn", "continuation")


@dataclass
class CausalConfig:
    store: str | Store  # path, or an open store (tests, notebooks)
    analyses: tuple[str, ...] = ANALYSES
    users: int | None = None  # N user prompts spread evenly over the sweep (default: all); see scope_users
    suite: str = "multiturn"  # multi-turn suite for `multiturn`
    max_new_tokens: int = 16  # reply length for the multi-turn adherence check
    continuation_tokens: int = 16  # first tokens of the variant's stored reply that `continuation` scores
    model: str | None = None  # load the weights from here instead of the sweep's model (checked by sha256)
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False  # allow the model repository's own code (also if the sweep allows it)
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
        if not isinstance(self.continuation_tokens, int) or not 1 <= self.continuation_tokens <= 512:
            raise CausalError(f"`--continuation-tokens` must be an integer in [1, 512], got "
                              f"{self.continuation_tokens!r}")


def run_causal(sweep: str | SweepConfig | None, cfg: CausalConfig, *, model=None, tok=None) -> dict[str, float]:
    """Run the configured analyses on the store's sweep; returns seconds per analysis.

    The sweep and the model come from the store (its plan holds the resolved sweep, its
    provenance the weights' and chat template's sha256). ``sweep`` is optional: when
    given, it must describe the same content as the store's (checked key by key, without
    rebuilding the plan); ``cfg.model`` or ``model`` (an in-memory model, with ``tok``)
    replace where the weights come from, and must hash to the store's weights."""
    from promptshift.causal.runner import Runner
    from promptshift.extract.worker import provenance
    from promptshift.models import chat_template_hash, load_tokenizer

    store = cfg.store if isinstance(cfg.store, Store) else open_store(cfg.store, mode="r+")
    plan = store.plan
    if sweep is not None:
        check_sweep(sweep if isinstance(sweep, SweepConfig) else load_sweep(sweep), plan.sweep, store.path)
    sweep = plan.sweep
    spec = cfg.model if cfg.model is not None else sweep.model
    trust = sweep.trust_remote_code or cfg.trust_remote_code
    if tok is None:
        tok = load_tokenizer(spec, sweep.chat_template, trust)
    want = store.provenance.get("chat_template_sha256")
    if want is not None and chat_template_hash(tok) != want:
        raise CausalError(f"the chat template of model {spec!r} is not the one the store {store.path} was rendered "
                          "with; load the same model (and --chat-template)")
    check_rendering(plan, tok, store.path)
    if model is None:
        from promptshift.models import load_model

        model = load_model(spec, device=cfg.device, dtype=cfg.dtype, trust_remote_code=trust,
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
                arrays, meta = _multiturn(model, tok, sweep, cfg, plan)
            else:
                if refs is None:
                    refs = Refs(runner, plan, scope)
                fn = {"patching": patching, "knockout": knockout, "steering": steering}.get(name)
                if name == "continuation":
                    arrays, meta = _continuation(runner, plan, scope, refs, store, cfg.continuation_tokens)
                else:
                    arrays, meta = (fn(runner, plan, scope, refs) if fn else
                                    phrases(runner, plan, scope, refs, tok=tok))
            meta = {**meta, "analysis": name, "weights_sha256": sha, "seconds": time.perf_counter() - t0,
                    "n_layers": runner.L}
            store.write_causal(name, arrays, meta)
            timings[name] = time.perf_counter() - t0
            if cfg.progress:
                print(f"causal {name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)
    finally:
        runner.close()
    return timings


def _continuation(runner, plan, scope, refs, store, n_tokens: int):
    from promptshift.causal.continuation import continuation

    if not store.backend.has("gen_ids"):
        raise CausalError(f"the store {store.path} holds no continuations (the sweep's max_new_tokens is 0), so "
                          "`continuation` has nothing to score; drop it or extract with max_new_tokens > 0")
    return continuation(runner, plan, scope, refs, np.asarray(store.array("gen_ids")[...]),
                        np.asarray(store.array("gen_len")[...]), n_tokens)


def check_sweep(given: SweepConfig, stored: SweepConfig, where) -> None:
    """Refuse a sweep whose content (prompts, baseline, what is kept: everything that
    decides the plan, except where the model is loaded from, which the weights' hash
    checks) differs from the one the store was extracted with; names the first difference."""
    from promptshift.sweep.config import content_dict
    from promptshift.sweep.plan import EXECUTION_ONLY

    def content(s: SweepConfig) -> dict:
        return {k: v for k, v in content_dict(s.to_dict()).items() if k not in EXECUTION_ONLY and k != "model"}

    a, b = content(given), content(stored)
    diff = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None)
    if diff is not None:
        raise CausalError(f"the store {where} holds a different sweep than the one given (`{diff}` differs); pass the "
                          "sweep the store was extracted with, or none (the store's own is used)")


def check_rendering(plan, tok, where) -> None:
    """The analyses re-render prompts (phrase ablation, multi-turn): the tokenizer and
    template must render the store's prompts as they did at plan time. The first pair's
    variant is re-rendered, at the plan's template clock (so a store planned before midnight
    stays valid after it); another tokenizer version or template is refused by name."""
    from promptshift.sweep.chat import conversation, render

    if not len(plan.pairs):
        return
    pair = plan.pairs.iloc[0]
    system = next(s for s in plan.sweep.system_prompts if s.name == pair.system)
    user = next(u for u in plan.sweep.user_prompts if u.id == pair.user_id)
    clock = plan.template_clock()
    r = render(tok, conversation(tok, system.text, user.text, no_system_role=plan.sweep.no_system_role, clock=clock),
               clock=clock)
    v = int(pair.variant)
    if r.text != plan.prompts.text[v]:
        why = "the chat template renders it differently (another template or template version)"
    elif not np.array_equal(r.ids, plan.prompt_tokens(v)):
        why = ("the tokenizer splits it differently (another tokenizer or tokenizers version; the store's provenance "
               "records the versions it was planned with)")
    else:
        return
    raise CausalError(f"prompt {v} ({pair.system}, {pair.user_id}) of the store {where} does not render as it did "
                      f"when it was planned: {why}")


def scope_users(sweep: SweepConfig, n: int | None) -> list[str]:
    """The user prompts the analyses cover: all, or ``n`` of them spread evenly over the
    sweep's order (every k-th), so that a subset of a sweep ordered by category still
    covers every category."""
    ids = [u.id for u in sweep.user_prompts]
    if n is None or n >= len(ids):
        return ids
    pick = np.unique(np.round(np.linspace(0, len(ids) - 1, n)).astype(int))
    return [ids[i] for i in pick]


def missing_analyses(store: Store, sweep: SweepConfig | None = None, users: int | None = None) -> tuple[str, ...]:
    """The analyses not yet in ``store`` for this scope (an analysis run on other user
    prompts counts as missing), in the order they run; ``sweep`` defaults to the store's."""
    want = scope_users(sweep if sweep is not None else store.plan.sweep, users)
    done = set(store.causal_analyses())
    out = []
    for name in ANALYSES:
        if name in done:
            _, meta = store.read_causal(name)
            if name == "multiturn" or meta.get("users") == want:
                continue
        out.append(name)
    return tuple(out)


def _multiturn(model, tok, sweep: SweepConfig, cfg: CausalConfig, plan):
    from promptshift.causal.multiturn import load_multiturn, multiturn
    from promptshift.extract.engine import Engine
    from promptshift.models import eos_ids

    suite = load_multiturn(cfg.suite)
    engine = Engine(model, components=(), top_k=1, lens_top_k=1, token_budget=cfg.token_budget)
    try:
        return multiturn(engine, tok, suite, max_new_tokens=cfg.max_new_tokens, eos_ids=eos_ids(model, tok),
                         progress=cfg.progress, no_system_role=sweep.no_system_role, clock=plan.template_clock(),
                         context=plan.dims.max_positions)
    finally:
        engine.remove_hooks()


__all__ = ["ANALYSES", "CausalConfig", "CausalError", "check_rendering", "check_sweep", "missing_analyses",
           "run_causal", "scope_users"]


def causal(store, analyses: str | tuple[str, ...] | list[str] = "all", *, sweep=None, model=None,
           tokenizer=None, **options) -> dict[str, float]:
    """Causal analyses (activation patching, system-span knockout, phrase ablation, steering,
    multi-turn decay; docs/CAUSAL.md) on an extracted store, written into it.

    ``store``: a path or an open :class:`Store`. ``sweep``: optional, checked against the
    sweep the store records (which is the one used). ``model``/``tokenizer``: an already
    loaded HF model and its tokenizer (their weights must be the store's). ``options``: the
    fields of :class:`CausalConfig` (``users=N`` to cover N user prompts, ...). Returns
    seconds per analysis. Calling the subpackage, ``promptshift.causal(...)``, runs this."""
    names = (analyses,) if isinstance(analyses, str) else tuple(analyses)
    cfg = CausalConfig(store=store if isinstance(store, Store) else str(store), analyses=names, **options)
    return run_causal(sweep, cfg, model=model, tok=tokenizer)


callable_stage(__name__)  # promptshift.causal(...) runs causal(...)

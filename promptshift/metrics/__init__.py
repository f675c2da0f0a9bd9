"""`promptshift metrics`: tidy tables from a complete store, with dask; no torch, no model.

Steps (each a function in its own module, run here in this order):

1. the sweep mean μ of every component (a dask reduction; ``components.sweep_means``),
2. tasks, submitted together: component change per (block of pairs, component)
   (``components.component_task``), attention tables per store block of prompts
   (``attention.attention_task``), attention change and output/lens change per block of
   pairs (``attention.attention_change_task``, ``output.output_task``),
3. analyses with crossed bootstrap CIs over system and user prompts (``analyses``), on the
   driver,
4. atomic writes: every file goes to a temporary name and is renamed into place, and
   ``summary.json`` is written last and removed first, so it marks a complete run.

Scheduling: ``scheduler="tcp://host:port"`` (or the path of a scheduler file) uses an
existing dask cluster, e.g. from dask-jobqueue on SLURM; otherwise ``workers`` (default 1)
local worker processes are started in a ``distributed.LocalCluster``; ``workers=0`` runs
everything in this process (a thread pool and dask's threaded scheduler): no cluster
start-up, and the only mode for in-memory stores.
Every task is a pure function of the store and returns rows that the driver concatenates
in task order and sorts, so the tables are identical for any number of workers.

Size: the stage's driver (tasks, scheduler, atomic writes, the reader of a finished run)
and nothing else; the work itself is in the modules named above.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from promptshift.errors import MetricsError
from promptshift.jsonsafe import dumps as _json_dumps
from promptshift.metrics import analyses as an
from promptshift.metrics import parts as pt
from promptshift.metrics.attention import (
    ATTENTION_TABLES,
    PairAttnTask,
    PromptBlock,
    attention_change_task,
    attention_part,
    attention_shares,
)
from promptshift.metrics.behaviour import BEHAVIOUR_OUTPUTS, behaviour_summary, behaviour_tables
from promptshift.metrics.causal import causal_tables
from promptshift.metrics.components import component_task, plan_tasks, sweep_means
from promptshift.metrics.io import StoreRef
from promptshift.metrics.output import PairOutTask, output_task
from promptshift.progress import progress
from promptshift.stage import callable_stage
from promptshift.store.core import Store, open_store
from promptshift.sweep.plan import pair_placement
from promptshift.vocabulary import CAUSAL_TABLES, PLACEMENT_TABLES, PROVENANCE, REGIONS, SUMMARY, TABLES


@dataclass
class MetricsConfig:
    """Options of one metrics run; saved (minus where it ran) into provenance.json."""

    store: str | None
    out: str | None = None
    scheduler: str | None = None
    workers: int | None = None
    n_boot: int = 1000
    seed: int = 0
    progress: bool = True
    recent_k: int = 5  # "recent tokens": the last k keys of the last query's row (attention_layers)

    def __post_init__(self):
        if not isinstance(self.recent_k, int) or isinstance(self.recent_k, bool) or self.recent_k < 1:
            raise MetricsError(f"`--recent-k` must be a positive integer, got {self.recent_k!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise MetricsError(f"`--workers` must be an integer >= 0, got {self.workers!r}")
        if not isinstance(self.n_boot, int) or self.n_boot < 1:
            raise MetricsError(f"`--n-boot` must be a positive integer, got {self.n_boot!r}")
        if self.scheduler is not None:
            sch = str(self.scheduler)
            if not (Path(sch).is_file() or ":" in sch):
                raise MetricsError(f"`--scheduler` must be a dask scheduler address like tcp://host:8786 or a "
                                   f"scheduler file written by `dask scheduler --scheduler-file`, got {sch!r}")


class _Runner:
    """Runs lists of (function, args) calls and dask collections on the chosen scheduler."""

    def __init__(self, cfg: MetricsConfig, ref: StoreRef):
        self.cfg, self.client, self.cluster = cfg, None, None
        local = cfg.scheduler is None and cfg.workers == 0
        if ref.path is None and not local:
            raise MetricsError("an in-memory store can only be processed with workers=0 (in this process)")
        if cfg.scheduler is not None:
            from distributed import Client

            sch = str(cfg.scheduler)
            try:
                self.client = (Client(scheduler_file=sch, timeout="30s") if Path(sch).is_file()
                               else Client(sch, timeout="30s"))
            except (OSError, TimeoutError) as e:
                raise MetricsError(f"cannot connect to the dask scheduler at {cfg.scheduler}: {e}; check the address "
                                   "(or scheduler file) and that the scheduler is running") from e
        elif not local:
            from distributed import Client, LocalCluster

            self.cluster = LocalCluster(n_workers=cfg.workers or 1, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR)
            self.client = Client(self.cluster)

    def close(self):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def compute(self, collections: list):
        if self.client is not None:
            return self.client.gather(self.client.compute(collections))
        import dask

        return list(dask.compute(*collections, scheduler="threads"))

    def map(self, calls: list[tuple], desc: str) -> list:
        """Results of ``fn(*args)`` for each call, in call order."""
        bar = progress(len(calls), f"metrics: {desc}", unit="task", enabled=self.cfg.progress)
        try:
            if self.client is not None:
                from distributed import as_completed

                run = uuid.uuid4().hex[:12]  # keys must not collide with another run on a shared scheduler
                futs = [self.client.submit(fn, *args, key=f"promptshift-{fn.__name__}-{run}-{i}", pure=False)
                        for i, (fn, *args) in enumerate(calls)]
                for f in as_completed(futs):
                    if f.status == "error":
                        f.result()  # raises the task's exception here
                    bar.update(1)
                return self.client.gather(futs)
            from concurrent.futures import ThreadPoolExecutor

            # a few threads: each component task holds up to ~0.5 GB of float64 rows
            with ThreadPoolExecutor(max_workers=max(1, min(len(calls), os.cpu_count() or 1, 4))) as ex:
                futs = [ex.submit(fn, *args) for fn, *args in calls]
                out = []
                for f in futs:
                    out.append(f.result())
                    bar.update(1)
                return out
        finally:
            bar.close()


def _concat(frames: list[pd.DataFrame | None]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _user_attributes(plan) -> pd.DataFrame:
    """One row per user prompt (index user_id), one column per attribute of the sweep's
    user prompts (the prompt file's extra fields), as text; missing values are None."""
    from promptshift.sweep.config import attribute_text

    users = plan.sweep.user_prompts
    names = list(dict.fromkeys(k for u in users for k in u.attributes))
    return pd.DataFrame({n: [attribute_text(u.attributes.get(n)) for u in users] for n in names},
                        index=pd.Index([u.id for u in users], name="user_id"), dtype=object)


def _pair_meta(plan) -> pd.DataFrame:
    """pair, system, user_id, category (with instruction prefixes: placement and
    instruction) and the user prompt's attributes for pairs and controls (control c is pair
    -1-c)."""
    cols = ["pair", "system", "user_id", "category"]
    if "placement" in plan.pairs.columns:  # only plans with instruction prefixes carry them
        cols += ["placement", "instruction"]
    pairs = plan.pairs[cols]
    pr = plan.prompts
    cat = {u.id: u.category for u in plan.sweep.user_prompts}
    ctrl = plan.controls
    cm = pd.DataFrame({
        "pair": (-1 - ctrl["control"].to_numpy()).astype(np.int64),
        "system": "__control__",
        "user_id": pr["user_id"].to_numpy()[ctrl["prompt_a"].to_numpy()] if len(ctrl) else [],
    })
    cm["category"] = cm["user_id"].map(cat)
    meta = pd.concat([pairs, cm], ignore_index=True)
    attrs = _user_attributes(plan)
    return meta.join(attrs, on="user_id") if len(attrs.columns) else meta


def _with_pairs(df: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    """Insert the common pair columns (and any user prompt attributes) after ``pair``."""
    if df.empty:
        return df
    m = meta.set_index("pair").reindex(df["pair"].to_numpy())
    clash = sorted(set(m.columns) & set(df.columns))
    if clash:  # an attribute named like a column this table has (the sweep check lists the known ones)
        raise MetricsError(f"user prompt attribute(s) {clash} have the names of result columns; rename them in the "
                           "prompt file")
    out = df.copy()
    for i, c in enumerate(m.columns):
        out.insert(1 + i, c, m[c].to_numpy())
    return out


def _systems(plan) -> pd.DataFrame:
    """One row per system prompt compared: length in tokens and words, declared tags, the
    keyword features of its text (``kw_*``, :mod:`promptshift.metrics.features`), and the
    share of the last token's visible keys its tokens hold (the uniform-attention reference
    for attention to the system region)."""
    from promptshift.metrics.features import FEATURES, keyword_features, n_words

    pr = plan.prompts[plan.prompts["kind"] == "variant"]
    ntok = pr.groupby("system")["n_system_tokens"].median()
    uniform = (pr["n_system_tokens"] / pr["n_tokens"]).groupby(pr["system"]).mean()
    rows = []
    for s in plan.sweep.variants:
        kw = keyword_features(s.text)
        rows.append(dict(name=s.name, n_system_tokens=int(ntok.get(s.name, 0)), n_words=n_words(s.text),
                         family=s.family, level=s.level, tags=",".join(s.tags), tag_list=tuple(s.tags),
                         **{f"kw_{k}": kw[k] for k in FEATURES}, kw_list=tuple(k for k in FEATURES if kw[k]),
                         system_uniform=float(uniform.get(s.name, np.nan))))
    cols = ["name", "n_system_tokens", "n_words", "family", "level", "tags", "tag_list",
            *(f"kw_{k}" for k in FEATURES), "kw_list", "system_uniform"]
    return pd.DataFrame(rows, columns=cols)


def _index_regions(plan) -> dict[int, str]:
    """Aligned index from the end -> the region most pairs' tokens at that index have."""
    from promptshift.metrics.components import pair_tokens

    pairs = pair_placement(plan.pairs)
    pairs = pairs[pairs["placement"] == "system"]
    if pairs.empty:
        return {}
    t = pair_tokens(plan, pairs)
    counts = np.zeros((int(t["from_end"].max()) + 1, len(REGIONS)), np.int64)
    np.add.at(counts, (t["from_end"], t["region"].astype(np.int64)), 1)
    return {i: REGIONS[int(np.argmax(c))] for i, c in enumerate(counts) if c.sum()}


def _component_order(df: pd.DataFrame, comps) -> pd.DataFrame:
    """Stable final order: pairs then controls; component in store order; layer; position."""

    if df.empty:
        return df
    pos = {p: i for i, p in enumerate(("last", "suffix_mean", *REGIONS))}
    key = pd.DataFrame({
        "c": df["is_control"].astype(int),
        "p": np.where(df["is_control"], -1 - df["pair"], df["pair"]),
        "comp": df["component"].map({c: i for i, c in enumerate(comps)}),
        "layer": df["layer"], "pos": df["position"].map(pos),
    })
    order = np.lexsort([key[k].to_numpy() for k in ("pos", "layer", "comp", "p", "c")])
    return df.iloc[order].reset_index(drop=True)


def _pair_blocks(plan) -> list[pd.DataFrame]:
    """Pairs grouped by the store block of their variant prompt."""
    pairs = plan.pairs.sort_values("pair", kind="stable")
    if pairs.empty:
        return []
    blk = plan.prompts["block"].to_numpy()[pairs["variant"].to_numpy()]
    return [pairs[blk == b] for b in np.unique(blk)]


def _tasks(plan, ref: StoreRef, mu: dict[str, np.ndarray], recent_k: int, parts: str) -> dict[str, list[tuple]]:
    """Every task of the run by kind, each a (function, *args) call; the attention tasks
    write their tables as parts under ``parts``."""
    pr = plan.prompts
    kind, system, user = (pr[c].to_numpy() for c in ("kind", "system", "user_id"))
    comps = list(plan.sweep.components)
    off = pr["token_offset"].to_numpy(np.int64)
    ntok = pr["n_tokens"].to_numpy(np.int64)
    kst = pr["key_start"].to_numpy(np.int64)
    regions = lambda p: plan.token_region[off[p] : off[p] + ntok[p]]  # noqa: E731
    comp_calls = [(component_task, ref, c, t, mu[c]) for t in plan_tasks(plan) for c in comps]
    attn_calls = []
    for _, b in plan.blocks.iterrows():
        p0, p1 = int(b.prompt_start), int(b.prompt_end)
        if p1 > p0:
            ps = np.arange(p0, p1)
            blk = PromptBlock(p0, p1, kst[ps], ntok[ps], [regions(p) for p in ps], recent_k,
                              role=kind[p0:p1], system=system[p0:p1], user_id=user[p0:p1])
            attn_calls.append((attention_part, ref, blk, parts, len(attn_calls)))
    pair_calls, out_calls = [], []
    has_gen = plan.sweep.max_new_tokens > 0
    for g in _pair_blocks(plan):
        v, b = g["variant"].to_numpy(), g["baseline"].to_numpy()
        pair_calls.append((attention_change_task, ref, PairAttnTask(
            pairs=g["pair"].to_numpy(), variant=v, baseline=b,
            v_start=kst[v] + g["v_suffix_start"].to_numpy(), b_start=kst[b] + g["b_suffix_start"].to_numpy(),
            n_al=g["suffix_len"].to_numpy(), v_keys=kst[v], b_keys=kst[b],
            regions={int(p): regions(p) for p in np.unique(np.concatenate([v, b]))},
        )))
        out_calls.append((output_task, ref, PairOutTask(g["pair"].to_numpy(), v, b, has_gen,
                                                        plan.sweep.max_new_tokens)))
    return {"components": comp_calls, "attention": attn_calls, "attention_change": pair_calls, "output": out_calls}


def compute(store_path, out_dir=None, *, scheduler: str | None = None, workers: int | None = None,
            n_boot: int = 1000, seed: int = 0, progress: bool = True, recent_k: int = 5,
            sweep=None) -> pt.ResultTables:
    """Compute every table of docs/RESULTS.md from a complete store; write them to ``out_dir``
    (default: ``<store>_results`` beside a store on disk; nothing is written for an
    in-memory store unless ``out_dir`` is given) and return them, by name.

    The per-prompt attention tables are written by the tasks themselves and streamed into
    their files (:mod:`promptshift.metrics.parts`); the returned mapping reads them from
    there when first asked for, so the driver's memory does not grow with them.

    ``sweep`` (a SweepConfig or anything ``load_sweep`` takes): judge replies with its
    declared checks, matchers and behaviour settings instead of the ones stored with the
    store; it must describe the same prompts and settings (only judging may differ)."""
    store = store_path if isinstance(store_path, Store) else open_store(store_path)
    cfg = MetricsConfig(store=None if store.path is None else str(store.path),
                        out=None if out_dir is None else str(out_dir), scheduler=scheduler, workers=workers,
                        n_boot=n_boot, seed=seed, progress=progress, recent_k=recent_k)
    store.require_complete()
    plan = store.read_plan(text=False)  # no table reads the prompts' texts (a million of them on cluster sweeps)
    judging = _judging_sweep(plan, sweep)
    if out_dir is None and store.path is not None:
        p = Path(store.path)
        out_dir = p.with_name(f"{p.stem}_results")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _begin(out)
        parts = pt.new_parts_dir(out)
    else:  # an in-memory store without an output directory: the parts go to a temporary one
        import tempfile

        parts = Path(tempfile.mkdtemp(prefix="promptshift-parts-"))
    try:
        return _compute(store, plan, judging, cfg, out, parts)
    finally:
        pt.remove(parts)


def _compute(store: Store, plan, judging, cfg: MetricsConfig, out: Path | None, parts: Path) -> pt.ResultTables:
    n_boot, seed, recent_k, progress = cfg.n_boot, cfg.seed, cfg.recent_k, cfg.progress
    ref = StoreRef.of(store)
    comps = list(plan.sweep.components)
    runner = _Runner(cfg, ref)
    try:
        valid = np.asarray(store.array("token_prompt")[...]) >= 0  # (T,) kept rows that belong to a prompt
        mu = sweep_means(ref, comps, valid, runner.compute)
        calls = _tasks(plan, ref, mu, recent_k, str(parts))
        # one submission for every task: workers never idle between kinds of tasks
        kinds = {kind: len(cs) for kind, cs in calls.items()}
        res = runner.map([c for cs in calls.values() for c in cs], "tasks")
        del calls
    finally:
        runner.close()

    # each kind's results are taken off ``res`` as its table is built, so that the tasks'
    # frames and the table made of them are not held together
    def take(kind: str) -> list:
        n = kinds[kind]
        out, res[:n] = res[:n], []
        return out

    meta = _pair_meta(plan)
    tables: dict[str, pd.DataFrame] = {}
    comp_res = take("components")
    pos_sums = _concat([r[1] for r in comp_res])
    cc = _concat([r[0] for r in comp_res])
    del comp_res
    tables["component_change"] = _with_pairs(_component_order(cc, comps), meta)
    del cc
    attn_res = take("attention")  # per-prompt sums for the summary: the tables themselves are parts
    ach_res = take("attention_change")
    ach = _concat(ach_res)
    del ach_res
    tables["attention_change"] = _with_pairs(
        ach.sort_values(["pair", "layer"], kind="stable").reset_index(drop=True) if len(ach) else ach, meta)
    del ach
    out_res = take("output")
    oc = _concat([r[0] for r in out_res])
    lc = _concat([r[1] for r in out_res])
    del out_res
    tables["output_change"] = _with_pairs(oc.sort_values("pair", kind="stable").reset_index(drop=True)
                                          if len(oc) else oc, meta)
    tables["lens_change"] = _with_pairs(lc.sort_values(["pair", "layer"], kind="stable").reset_index(drop=True)
                                        if len(lc) else lc, meta)

    users = [u.id for u in plan.sweep.user_prompts]
    pairs = pair_placement(plan.pairs)
    sys_pairs = pairs[pairs["placement"] == "system"]
    ctx = an.Context.draw(users, sys_pairs[["pair", "system", "user_id", "category"]].copy(), _systems(plan),
                          "resid_post" if "resid_post" in comps else comps[-1], n_boot, seed,
                          strata=[u.category for u in plan.sweep.user_prompts])
    # the analyses below are about system prompts: instruction-prefix pairs have their own
    # (placement_*), and are left out of these, of the controls' comparison and of the summary
    sys_tables = _system_only(tables, sys_pairs, plan)
    if pos_sums is not None and len(pos_sums) and len(sys_pairs) < len(pairs):
        pos_sums = pos_sums[pos_sums["pair"].isin(sys_pairs["pair"])]
    cct = sys_tables["component_change"]
    imp = an.pair_impact(cct, sys_tables["output_change"], ctx, sys_tables["attention_change"])
    tables["layer_ranking"] = an.layer_ranking(cct, ctx)
    tables["length_impact"], tables["length_tests"] = an.length_tables(imp, ctx)
    tables["tag_impact"] = an.tag_impact(imp, ctx)
    tables["position_change"] = an.position_change(cct, pos_sums, _index_regions(plan), ctx)
    tables["internal_vs_output"] = an.internal_vs_output(cct, imp, ctx)
    if len(pairs) > len(sys_pairs):
        tables.update(_placement_tables(tables, pairs, plan.sweep, ctx))
    model = store.provenance.get("model_id") or plan.sweep.model or "embedded"
    # the attention summary over the system-prompt pairs' variants (every variant without prefixes)
    variants = plan.prompts.index[plan.prompts["kind"].to_numpy() == "variant"].to_numpy()
    if len(sys_pairs) < len(pairs):
        variants = np.intersect1d(variants, sys_pairs["variant"].to_numpy())
    summ = an.summary({**tables, **sys_tables}, ctx, len(plan.controls), model,
                      attention_shares(attn_res, variants))
    causal, summ["causal"] = causal_tables(store, sys_pairs, n_boot, seed)
    if len(sys_pairs) < len(pairs) and "placement_compare" in tables:
        from promptshift.metrics import placement as pl
        from promptshift.sweep.plan import prefix_label

        curves, rows = pl.placement_causal(store, pairs, plan.sweep.placements(), prefix_label, n_boot, seed)
        if len(curves):
            tables["placement_causal"] = curves
            tables["placement_compare"] = pd.concat([tables["placement_compare"], rows], ignore_index=True)
    tables.update(causal)
    # behaviour of every pair, system prompts and instruction prefixes alike: per label, the
    # user prompts are resampled (each label held fixed, as in the placement tables); pooled
    # over the system prompts (not the prefixes), both are resampled (crossed, ``ctx``)
    labels = pd.DataFrame({"name": list(dict.fromkeys(pairs["system"]))})
    lab_ctx = an.Context(w=ctx.w, users=ctx.users, pairs=pairs[["pair", "system", "user_id", "category"]].copy(),
                         systems=labels, impact_component=ctx.impact_component, seed=ctx.seed)
    tables.update(behaviour_tables(
        store, plan, judging, lambda df, keys, value: an.grouped_ci(df, keys, value, lab_ctx),
        pooled_ci=lambda df, keys, value: an.grouped_ci(df, keys, value, ctx), pooled_pairs=sys_pairs["pair"]))
    pb = tables["behaviour_pairs"]
    pb_sys = pb[pb["pair"].isin(sys_pairs["pair"])]
    tables["internal_vs_behaviour"] = an.internal_vs(cct, pb_sys, ctx, BEHAVIOUR_OUTPUTS)
    summ["behaviour"] = behaviour_summary(tables, lambda o: an.held_out_strongest(
        tables["internal_vs_behaviour"][tables["internal_vs_behaviour"]["output"] == o], cct, pb_sys, ctx))

    prov = None
    if out is not None:
        # the store's provenance as is (model, sweep, versions, ...), plus the plan and this run
        prov = {
            **store.provenance,
            "plan_hash": store.attrs.get("plan_hash"),
            "plan_meta": plan.meta,
            "store_path": cfg.store,
            "metrics": {"n_boot": n_boot, "seed": seed,
                        "resampling": "crossed" if ctx.ws is not None else "user prompts",
                        "impact_component": ctx.impact_component, "recent_k": recent_k,
                        "versions": _versions()},
        }
    order = ["component_change", *ATTENTION_TABLES, *tables]
    if out is None:  # nothing to keep: the part tables are combined beside their parts and read back
        files = _combine_parts(parts, parts, csv=False)
        return pt.ResultTables(tables, files, order).load()
    files = _finish(out, tables, summ, prov, parts)
    if progress:
        print(f"metrics: wrote {len(tables) + len(files)} tables, {SUMMARY} and {PROVENANCE} to {out}",
              file=sys.stderr)
    return pt.ResultTables(tables, files, order)


def _system_only(tables: dict[str, pd.DataFrame], sys_pairs: pd.DataFrame, plan) -> dict[str, pd.DataFrame]:
    """The per-pair tables restricted to system-prompt pairs (and controls): the same tables
    when the sweep has no instruction prefixes."""
    names = ("component_change", "attention_change", "output_change", "lens_change")
    if len(sys_pairs) == len(plan.pairs):
        return {k: tables[k] for k in names}
    keep = set(sys_pairs["pair"].tolist())
    out = {}
    for k in names:
        t = tables[k]
        out[k] = t[t["pair"].isin(keep) | (t["pair"] < 0)] if len(t) else t
    return out


def _placement_tables(tables: dict[str, pd.DataFrame], pairs: pd.DataFrame, sweep, sys_ctx) -> dict:
    """placement_layers and placement_compare (promptshift/metrics/placement.py) over every
    pair, system and prefix placements alike."""
    from promptshift.metrics import placement as pl
    from promptshift.sweep.plan import prefix_label

    # every instruction label is a "system" of its own here, held fixed: per-instruction
    # estimates resample user prompts (the system-prompt analyses' user resamples)
    labels = pd.DataFrame({"name": list(dict.fromkeys(pairs["system"]))})
    ctx = an.Context(w=sys_ctx.w, users=sys_ctx.users, pairs=pairs[["pair", "system", "user_id", "category"]].copy(),
                     systems=labels, impact_component=sys_ctx.impact_component, seed=sys_ctx.seed)
    cc = tables["component_change"]
    imp = an.pair_impact(cc, tables["output_change"], ctx, tables["attention_change"])
    # the last token's attention to the instruction's own tokens: the system prompt's, or the prefix's
    ach = tables["attention_change"]
    per = ach.groupby("pair")[["mass_system_variant", "mass_prefix_variant"]].mean()
    is_pre = pairs.set_index("pair")["placement"].reindex(per.index) == "prefix"
    attn = per["mass_system_variant"].where(~is_pre, per["mass_prefix_variant"])
    imp["attn_instruction"] = imp["pair"].map(attn)
    return {"placement_layers": pl.placement_layers(cc, pairs, ctx),
            "placement_compare": pl.placement_compare(cc, imp, sweep.placements(), prefix_label, ctx)}


def _judging_sweep(plan, sweep):
    """The sweep whose behaviour declarations judge the replies: the store's own, or the
    given one when it holds the same content (prompts and every setting that changes the
    store; only checks, matchers and judging settings may differ)."""
    if sweep is None:
        return plan.sweep
    from promptshift.sweep.config import SweepConfig, content_dict, load_sweep
    from promptshift.sweep.plan import EXECUTION_ONLY

    s = sweep if isinstance(sweep, SweepConfig) else load_sweep(sweep)
    strip = lambda x: {k: v for k, v in content_dict(x.to_dict()).items() if k not in EXECUTION_ONLY}  # noqa: E731
    if strip(s) != strip(plan.sweep):
        a, b = strip(s), strip(plan.sweep)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise MetricsError(f"the sweep given to judge replies differs from the store's beyond its checks and "
                           f"matchers (in {', '.join(diff)}); give the sweep the store was extracted with")
    return s


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("promptshift", "dask", "distributed", "numpy", "pandas", "scipy", "pyarrow", "zarr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _begin(out: Path) -> None:
    """Unmark the directory as complete and drop temporaries left by an interrupted run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MetricsError(f"cannot create the output directory {out}: {e.strerror}") from e
    if not os.access(out, os.W_OK):
        raise MetricsError(f"cannot write to {out}: directory is not writable")
    (out / SUMMARY).unlink(missing_ok=True)
    for name in CAUSAL_TABLES + PLACEMENT_TABLES:  # a store without them must not show a past run's
        for ext in ("parquet", "csv"):
            (out / f"{name}.{ext}").unlink(missing_ok=True)
    for f in out.glob(".*.tmp-*"):  # files, and the part directories of an interrupted run
        if f.is_dir():
            pt.remove(f)
        else:
            f.unlink(missing_ok=True)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finish(out: Path, tables: dict[str, pd.DataFrame], summ: dict, prov: dict, parts: Path) -> dict[str, Path]:
    """Write every table (those in memory, and those the tasks wrote as parts), then the
    provenance and, last, the summary. -> the Parquet file of each part table."""
    for name, df in tables.items():
        _write_table(out, name, df)
    files = _combine_parts(parts, out, csv=True)
    _atomic(out / PROVENANCE, lambda p: p.write_text(_json_dumps(prov)))
    _atomic(out / SUMMARY, lambda p: p.write_text(_json_dumps(summ)))  # last: marks the run complete
    return files


def _write_table(out: Path, name: str, df: pd.DataFrame, csv: bool = True) -> None:
    _atomic(out / f"{name}.parquet", lambda p: df.to_parquet(p, index=False))
    if csv:
        _atomic(out / f"{name}.csv", lambda p: _write_csv(df, p))


def _combine_parts(parts: Path, out: Path, csv: bool) -> dict[str, Path]:
    """Each table the tasks wrote as parts, streamed into ``out`` (an empty table when no
    task had rows). -> its Parquet file by name."""
    files = {}
    for name in ATTENTION_TABLES:
        if pt.part_files(parts, name):
            def both(p, name=name):  # the CSV is written beside the Parquet file, then both renamed
                tmp_csv = out / f".{name}.csv.tmp-{os.getpid()}"
                try:
                    pt.combine(parts, name, p, tmp_csv if csv else None)
                    if csv:
                        os.replace(tmp_csv, out / f"{name}.csv")
                finally:
                    tmp_csv.unlink(missing_ok=True)
            _atomic(out / f"{name}.parquet", both)
        else:
            _write_table(out, name, pd.DataFrame(), csv)
        files[name] = out / f"{name}.parquet"
    return files


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    """CSV copy through Arrow's writer: exact float round trip (shortest repr), and about
    15x faster than pandas' formatter on the multi-million-row attention tables."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.Table.from_pandas(df, preserve_index=False), str(path))


def load_results(out_dir) -> dict[str, pd.DataFrame]:
    """The tables of a finished metrics run (what the report reads)."""
    out = Path(out_dir)
    if not (out / SUMMARY).is_file():
        raise MetricsError(f"{out} holds no finished metrics run (no {SUMMARY}); run `promptshift metrics` again")
    missing = [t for t in TABLES if not (out / f"{t}.parquet").is_file()]
    if missing:
        raise MetricsError(f"{out} is missing {', '.join(missing)}; rerun `promptshift metrics`")
    names = list(TABLES) + [t for t in CAUSAL_TABLES + PLACEMENT_TABLES if (out / f"{t}.parquet").is_file()]
    return {t: pd.read_parquet(out / f"{t}.parquet") for t in names}


def load_summary(out_dir) -> dict:
    out = Path(out_dir)
    if not (out / SUMMARY).is_file():
        raise MetricsError(f"{out} holds no finished metrics run (no {SUMMARY}); run `promptshift metrics` again")
    return json.loads((out / SUMMARY).read_text())


def cli_main(store, out=None, scheduler=None, workers=None, n_boot: int = 1000, seed: int = 0,
             progress: bool = True, recent_k: int = 5, sweep=None) -> Path:
    """Thin entry for the CLI: compute, then return where the outputs went."""
    compute(store, out, scheduler=scheduler, workers=workers, n_boot=n_boot, seed=seed, progress=progress,
            recent_k=recent_k, sweep=sweep)
    if out is None:
        p = Path(store)
        out = p.with_name(f"{p.stem}_results")
    return Path(out)


def metrics(store, out: str | Path | None = None, **options):  # -> promptshift.results.Results
    """Tables, analyses and ``summary.json`` from a complete store (dask; no torch).

    ``out``: the results directory (default ``<store>_results`` beside a store on disk; a
    temporary directory for a store in memory). ``options``: ``workers`` (local dask
    worker processes; 0 runs in this process), ``scheduler`` (address of a running dask
    cluster), ``n_boot``, ``seed``, ``progress``, ``sweep`` (judge replies with this sweep's checks
    and matchers: same prompts and settings as the store's). Returns the results
    (:class:`promptshift.results.Results`: ``.tables``, ``.summary``, ``.report``).
    Calling the subpackage, ``promptshift.metrics(...)``, runs this."""
    from promptshift.results import Results  # the reader of a results directory

    if isinstance(store, Store) and store.path is None:  # in memory: computed in this process
        options.setdefault("workers", 0)
        if out is None:
            import tempfile

            out = tempfile.mkdtemp(prefix="promptshift-results-")
    out_dir = cli_main(store, None if out is None else str(out), **options)
    load_summary(out_dir)  # raises MetricsError unless the run finished
    return Results(out_dir)


callable_stage(__name__)  # promptshift.metrics(...) runs metrics(...)

__all__ = ["CAUSAL_TABLES", "MetricsConfig", "PLACEMENT_TABLES", "TABLES", "cli_main", "compute", "load_results",
           "load_summary", "metrics"]

"""Component change: for every pair, layer and component, how far the variant's activation
moved from the baseline's at the aligned suffix tokens and at the last prompt token.

Work is split into tasks of pairs (grouped by the store block of the variant prompt, so a
task reads whole chunks that no other task needs) and one task per component for the
control pairs. Each task opens the store itself, gathers the rows it needs once, and
returns small DataFrames; the driver concatenates them in task order and sorts, so the
tables do not depend on how many workers ran the tasks.

All arithmetic is float64 on float16/float32 storage: float32 dot products over thousands
of hidden units carry ~1e-6 relative error, as large as the cosine differences between
unrelated prompts (anisotropy puts raw cosines near 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from promptshift.metrics.io import StoreRef, read_rows
from promptshift.vocabulary import REGIONS

METRICS = ("cosine", "cosine_centered", "l2", "rel_change", "norm_variant", "norm_baseline")
_TASK_BYTES = 256 << 20  # float64 rows one task holds at once
_SLICE_BYTES = 32 << 20  # float64 (tokens, L, H) temporaries per vectorised step


@dataclass
class CompTask:
    """The tokens one task compares: token t pairs variant kept row ``v_rows[t]`` with
    baseline kept row ``b_rows[t]``; tokens are grouped by pair, in aligned order."""

    pairs: np.ndarray  # (n,) pair id (controls: -1 - control)
    tok_pair: np.ndarray  # (N,) index into ``pairs``, non-decreasing
    from_end: np.ndarray  # (N,) aligned index from the end; 0 = last prompt token
    region: np.ndarray  # (N,) region code of the aligned token (variant's labelling)
    v_rows: np.ndarray  # (N,) int64 kept rows of the variant prompt
    b_rows: np.ndarray  # (N,) int64 kept rows of the baseline prompt
    is_control: bool
    suffix: bool  # emit suffix_mean / region / position rows (False when only `last` is kept)

    @property
    def n_rows(self) -> int:
        return int(np.union1d(self.v_rows, self.b_rows).size)


def _kept_row(prompts: pd.DataFrame, p: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Kept-token row of absolute position ``pos`` in prompt ``p`` (CSR: kept_start + pos - keep_start)."""
    return (prompts["kept_start"].to_numpy(np.int64)[p] + pos - prompts["keep_start"].to_numpy(np.int64)[p])


def pair_tokens(plan, pairs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every compared token of ``pairs``: the aligned suffix positions kept in both prompts."""
    pr = plan.prompts
    keep_v = pr["keep_start"].to_numpy(np.int64)[pairs["variant"].to_numpy()]
    keep_b = pr["keep_start"].to_numpy(np.int64)[pairs["baseline"].to_numpy()]
    vs, bs = pairs["v_suffix_start"].to_numpy(np.int64), pairs["b_suffix_start"].to_numpy(np.int64)
    n_al = pairs["suffix_len"].to_numpy(np.int64)
    j0 = np.maximum(0, np.maximum(keep_v - vs, keep_b - bs))  # (n,) first aligned index kept in both
    j0 = np.minimum(j0, n_al - 1)  # the last token is always kept
    counts = n_al - j0  # (n,)
    local = np.repeat(np.arange(len(pairs)), counts)  # (N,)
    j = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(j0, counts)  # (N,)
    v_pos = vs[local] + j
    b_pos = bs[local] + j
    v = pairs["variant"].to_numpy()[local]
    b = pairs["baseline"].to_numpy()[local]
    region = plan.token_region[pr["token_offset"].to_numpy(np.int64)[v] + v_pos]
    return dict(local=local, from_end=(n_al[local] - 1 - j).astype(np.int32), region=region.astype(np.int8),
                v_rows=_kept_row(pr, v, v_pos), b_rows=_kept_row(pr, b, b_pos))


def plan_tasks(plan) -> list[CompTask]:
    """Pair tasks grouped by the variant's store block, split so each holds about
    ``_TASK_BYTES`` of float64 rows; then one task for all controls."""
    pairs = plan.pairs.sort_values("pair", kind="stable")
    suffix = plan.sweep.keep != "last"
    row_bytes = plan.dims.n_layers * plan.dims.hidden * 8
    budget = max(1, _TASK_BYTES // row_bytes)
    tasks: list[CompTask] = []
    if len(pairs):
        t = pair_tokens(plan, pairs)
        if not suffix:  # only the last token is stored: compare it alone
            keep = t["from_end"] == 0
            t = {k: v[keep] for k, v in t.items()}
        blocks = plan.prompts["block"].to_numpy()[pairs["variant"].to_numpy()]
        order = np.argsort(blocks, kind="stable")  # pairs of one variant block together
        pair_ids = pairs["pair"].to_numpy()
        starts = np.searchsorted(t["local"], np.arange(len(pairs)))
        ends = np.searchsorted(t["local"], np.arange(len(pairs)), side="right")
        group: list[int] = []
        rows: set[int] = set()

        def flush():
            if not group:
                return
            idx = np.concatenate([np.arange(starts[i], ends[i]) for i in group])
            lut = np.full(len(pairs), -1, np.int64)
            lut[group] = np.arange(len(group))
            tasks.append(CompTask(
                pairs=pair_ids[group].astype(np.int64),
                tok_pair=lut[t["local"][idx]],
                from_end=t["from_end"][idx], region=t["region"][idx],
                v_rows=t["v_rows"][idx], b_rows=t["b_rows"][idx], is_control=False, suffix=suffix,
            ))

        cur_block = None
        for i in order:
            new = set(t["v_rows"][starts[i]:ends[i]].tolist()) | set(t["b_rows"][starts[i]:ends[i]].tolist())
            if group and (blocks[i] != cur_block or len(rows | new) > budget):
                flush()
                group, rows = [], set()
            group.append(int(i))
            rows |= new
            cur_block = blocks[i]
        flush()
    ctrl = plan.controls
    if len(ctrl):
        pr = plan.prompts
        last = (pr["kept_start"] + pr["n_kept"] - 1).to_numpy(np.int64)  # (P,) kept row of the last token
        a, b = ctrl["prompt_a"].to_numpy(), ctrl["prompt_b"].to_numpy()
        n = len(ctrl)
        last_tok = (pr["token_offset"] + pr["n_tokens"] - 1).to_numpy(np.int64)  # (P,) flat plan index
        tasks.append(CompTask(
            pairs=(-1 - ctrl["control"].to_numpy()).astype(np.int64), tok_pair=np.arange(n),
            from_end=np.zeros(n, np.int32), region=plan.token_region[last_tok[a]].astype(np.int8),
            v_rows=last[a], b_rows=last[b], is_control=True, suffix=False,
        ))
    return tasks


def _masked_sum(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(1, L, H) float64 sum of the rows of one chunk that belong to a prompt."""
    return x[valid[:, 0, 0]].sum(axis=0, dtype=np.float64)[None]


def sweep_means(ref: StoreRef, components, valid: np.ndarray, compute) -> dict[str, np.ndarray]:
    """μ per component: (layer, hidden) float64 mean over every kept token of every prompt.

    One partial sum per storage-aligned chunk (upcast inside the sum, so no float64 copy
    of the chunk exists), then a sum over the partials: a fixed reduction order, whatever
    the scheduler. Padding rows between blocks (``token_prompt`` = -1) are excluded."""
    import dask.array as da

    from promptshift.metrics.io import lazy

    n = int(valid.sum())
    sums = []
    for c in components:
        x = lazy(ref, c)  # (T, L, H) storage dtype
        m = da.from_array(valid[:, None, None], chunks=(x.chunks[0], 1, 1))  # (T, 1, 1)
        parts = da.map_blocks(_masked_sum, x, m, dtype=np.float64,
                              chunks=((1,) * x.numblocks[0], x.chunks[1], x.chunks[2]))  # (n_chunks, L, H)
        sums.append(parts.sum(axis=0, split_every=max(2, parts.numblocks[0])))  # (L, H): one sum, in chunk order
    out = compute(sums)
    return {c: np.asarray(s) / max(n, 1) for c, s in zip(components, out)}


def _group(keys: np.ndarray, values: np.ndarray, reduce: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (or sum) of ``values`` (N, ...) per distinct key: (unique keys, means, counts).
    The sum order is the token order within a group, fixed by the task: deterministic."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
    sums = np.add.reduceat(values[order], starts, axis=0)
    counts = np.diff(np.concatenate([starts, [len(k)]]))
    if reduce == "sum":
        return k[starts], sums, counts
    return k[starts], sums / counts.reshape(-1, *([1] * (values.ndim - 1))), counts


def token_metrics(X: np.ndarray, iv: np.ndarray, ib: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Per-token metrics (N, L, 6) in METRICS order, comparing rows X[iv] with X[ib].

    X (R, L, H) float64 holds each needed row once; per-row norms and μ-projections are
    computed once and shared by every pair that uses the row (a baseline serves all the
    system prompts of its user prompt)."""
    N, L = len(iv), X.shape[1]
    xx = np.einsum("rlh,rlh->rl", X, X)  # (R, L)
    mx = np.einsum("rlh,lh->rl", X, mu)  # (R, L)
    mm = np.einsum("lh,lh->l", mu, mu)  # (L,)
    vb = np.empty((N, L))
    dd = np.empty((N, L))
    step = max(1, _SLICE_BYTES // max(1, L * X.shape[2] * 8))
    for s in range(0, N, step):
        v = X[iv[s : s + step]]  # (n, L, H)
        b = X[ib[s : s + step]]
        vb[s : s + step] = np.einsum("nlh,nlh->nl", v, b)
        np.subtract(v, b, out=v)
        dd[s : s + step] = np.einsum("nlh,nlh->nl", v, v)
    nv, nb = np.sqrt(xx[iv]), np.sqrt(xx[ib])  # (N, L)
    cv = vb - mx[iv] - mx[ib] + mm  # (v-μ)·(b-μ)
    ncv = np.sqrt(np.maximum(xx[iv] - 2 * mx[iv] + mm, 0.0))
    ncb = np.sqrt(np.maximum(xx[ib] - 2 * mx[ib] + mm, 0.0))
    l2 = np.sqrt(dd)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.stack([vb / (nv * nb), cv / (ncv * ncb), l2, l2 / nb, nv, nb], axis=-1)  # (N, L, 6)
    return out


def component_task(ref: StoreRef, component: str, task: CompTask, mu: np.ndarray):
    """Rows of component_change, and per-pair position sums, for one task and component."""
    store = ref.open()
    rows = np.union1d(task.v_rows, task.b_rows)  # (R,) sorted unique kept rows
    X = read_rows(store, component, rows, dtype=np.float64)  # (R, L, H)
    iv, ib = np.searchsorted(rows, task.v_rows), np.searchsorted(rows, task.b_rows)
    m = token_metrics(X, iv, ib, mu)  # (N, L, 6)
    del X
    L = m.shape[1]

    parts = []  # (pair index, position code, metrics (g, L, 6)); position code: -2 last, -1 suffix_mean, r region
    last = np.flatnonzero(task.from_end == 0)
    parts.append((task.tok_pair[last], np.full(len(last), -2), m[last]))
    if task.suffix:
        k, means, _ = _group(task.tok_pair, m)
        parts.append((k, np.full(len(k), -1), means))
        R = len(REGIONS)
        k, means, _ = _group(task.tok_pair * R + task.region.astype(np.int64), m)
        parts.append((k // R, k % R, means))
    loc = np.concatenate([p[0] for p in parts])
    pos = np.concatenate([p[1] for p in parts])
    vals = np.concatenate([p[2] for p in parts])  # (G, L, 6)
    order = np.lexsort((pos, loc))
    loc, pos, vals = loc[order], pos[order], vals[order]
    names = np.asarray(["last", "suffix_mean", *REGIONS], dtype=object)
    pos_names = names[np.where(pos == -2, 0, np.where(pos == -1, 1, pos + 2))]
    G = len(loc)
    df = pd.DataFrame({
        "pair": np.repeat(task.pairs[loc], L),
        "layer": np.tile(np.arange(L, dtype=np.int64), G),
        "component": component,
        "position": np.repeat(pos_names, L),
        **{name: vals[:, :, i].reshape(-1) for i, name in enumerate(METRICS)},
        "is_control": task.is_control,
    })

    pos_df = None
    if task.suffix:
        # rel_change per (aligned index from the end, pair): each pair has one token per
        # index; the analyses sum these per (system prompt, user prompt) cell for the
        # crossed bootstrap
        n = len(task.pairs)
        key = task.from_end.astype(np.int64) * n + task.tok_pair
        k, sums, counts = _group(key, m[:, :, 3], reduce="sum")  # (g, L)
        G = len(k)
        pos_df = pd.DataFrame({
            "component": component,
            "layer": np.tile(np.arange(L, dtype=np.int64), G),
            "from_end": np.repeat(k // n, L),
            "pair": np.repeat(task.pairs[k % n], L),
            "sum": sums.reshape(-1),
            "count": np.repeat(counts, L).astype(np.int64),
        })
    return df, pos_df


__all__ = ["CompTask", "METRICS", "component_task", "pair_tokens", "plan_tasks", "sweep_means",
           "token_metrics"]

"""Attention tables from the statistics extraction reduced inside each layer.

Two scopes per prompt: ``last`` is the last query row (the position that produces the next
token), read from ``attn_last`` over every key; ``all`` averages every real query, from
``attn_region_mass`` (mean over the queries of each query region) weighted by how many
queries each region has. Each scope carries its own uniform reference: under uniform
attention the last query gives a region (keys in region)/(keys), while a causal query at
position i sees only keys 0..i, so the ``all`` reference averages that share over queries.
Without these references a long system prompt would look "attended" merely for being long.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from promptshift.metrics.io import StoreRef, read_range, read_rows
from promptshift.vocabulary import REGION_CODE, REGIONS

R = len(REGIONS)  # stores written before the `prefix` region have one fewer (the first R - 1 names)
SINK_THRESHOLD = 0.3  # a head "sinks" when more than this share of its attention goes to token 0
SCOPES = ("last", "all")


@dataclass
class PromptBlock:
    """Prompts [p0, p1) of one store block and the region code of each of their tokens."""

    p0: int
    p1: int
    key_start: np.ndarray  # (n,) first attn_last row of each prompt
    n_tokens: np.ndarray  # (n,)
    regions: list[np.ndarray]  # n arrays (n_tokens_i,) of region codes
    recent_k: int = 5  # "recent tokens": the last k keys of the last query's row
    role: np.ndarray | None = None  # (n,) "variant" / "baseline": the columns each table row names its prompt by
    system: np.ndarray | None = None  # (n,)
    user_id: np.ndarray | None = None  # (n,)


def _onehot(reg: np.ndarray, n_regions: int = R) -> np.ndarray:
    return (reg[:, None] == np.arange(n_regions)[None, :]).astype(np.float64)  # (n, R)


def _row_entropy(p: np.ndarray, axis: int = 0) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis)


def prompt_stats(last: np.ndarray, rm: np.ndarray, ent: np.ndarray, reg: np.ndarray):
    """One prompt's per-scope tables.

    last (n, L, NH) last-query row; rm (L, NH, R, R) mean mass from each query region to
    each key region; ent (L, NH, R) mean row entropy per query region; reg (n,) regions.
    Returns mass, mass_nosink (2, L, NH, R), uniform (2, R), entropy (2, L, NH)."""
    n = len(reg)
    O = _onehot(reg, rm.shape[-1])  # (n, R): R as stored
    counts = O.sum(0)  # (R,) queries (= keys) per region
    mass_last = np.einsum("nlh,nr->lhr", last, O)  # (L, NH, R)
    mass_all = np.einsum("lhqk,q->lhk", np.nan_to_num(rm), counts) / n  # (L, NH, R)
    mass = np.stack([mass_last, mass_all])  # (2, L, NH, R)
    sink = mass[..., REGION_CODE["sink"]][..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        nosink = mass / (1.0 - sink)
    nosink[..., REGION_CODE["sink"]] = np.nan
    seen = np.cumsum(O, axis=0) / np.arange(1, n + 1)[:, None]  # (n, R) share of visible keys per region
    uniform = np.stack([counts / n, seen.mean(0)])  # (2, R)
    e_last = _row_entropy(last, 0)  # (L, NH)
    e_all = np.einsum("lhq,q->lh", np.nan_to_num(ent), counts) / n
    return mass, nosink, uniform, np.stack([e_last, e_all])


def attention_task(ref: StoreRef, blk: PromptBlock):
    """(attention_regions, attention_heads, attention_layers) rows for one block of prompts."""
    store = ref.open()
    rm_all = read_range(store, "attn_region_mass", blk.p0, blk.p1).astype(np.float64)  # (n, L, NH, R, R)
    ent_all = read_range(store, "attn_entropy", blk.p0, blk.p1).astype(np.float64)  # (n, L, NH, R)
    sink = read_range(store, "attn_sink", blk.p0, blk.p1).astype(np.float64)  # (n, L, NH)
    k0 = int(blk.key_start[0])
    k1 = int(blk.key_start[-1] + blk.n_tokens[-1])
    rows = read_range(store, "attn_last", k0, k1).astype(np.float64)  # (keys, L, NH)
    n, L, NH = sink.shape
    R = rm_all.shape[-1]  # regions as the store holds them
    names = np.asarray(REGIONS[:R], dtype=object)
    mass = np.empty((n, 2, L, NH, R))
    nosink = np.empty((n, 2, L, NH, R))
    uniform = np.empty((n, 2, R))
    entropy = np.empty((n, 2, L, NH))
    recent = np.empty((n, L, NH))
    recent_uniform = np.empty(n)
    for j in range(n):
        a = int(blk.key_start[j]) - k0
        last = rows[a : a + int(blk.n_tokens[j])]  # (n_tokens, L, NH)
        mass[j], nosink[j], uniform[j], entropy[j] = prompt_stats(last, rm_all[j], ent_all[j], blk.regions[j])
        k = min(blk.recent_k, len(last))
        recent[j] = last[len(last) - k :].sum(0)  # (L, NH) mass on the last k keys (the query itself included)
        recent_uniform[j] = k / len(last)

    idx = np.indices((n, 2, L, NH, R)).reshape(5, -1)  # (5, n*2*L*NH*R) prompt, scope, layer, head, region
    heads = pd.DataFrame({
        "prompt": (blk.p0 + idx[0]).astype(np.int64),
        "scope": np.asarray(SCOPES, dtype=object)[idx[1]],
        "layer": idx[2].astype(np.int64),
        "head": idx[3].astype(np.int64),
        "region": names[idx[4]],
        "mass": mass.reshape(-1),
        "mass_nosink": nosink.reshape(-1),
        "uniform": np.broadcast_to(uniform[:, :, None, None, :], mass.shape).reshape(-1),
        "entropy": np.broadcast_to(entropy[..., None], mass.shape).reshape(-1),
    })
    # attention_regions: every measure averaged over heads
    ri = np.indices((n, 2, L, R)).reshape(4, -1)
    m_h = mass.mean(3)  # (n, 2, L, R)
    regions = pd.DataFrame({
        "prompt": (blk.p0 + ri[0]).astype(np.int64),
        "scope": np.asarray(SCOPES, dtype=object)[ri[1]],
        "layer": ri[2].astype(np.int64),
        "region": names[ri[3]],
        "mass": m_h.reshape(-1),
        "mass_nosink": nosink.mean(3).reshape(-1),
        "uniform": np.broadcast_to(uniform[:, :, None, :], m_h.shape).reshape(-1),
        "entropy": np.broadcast_to(entropy.mean(3)[..., None], m_h.shape).reshape(-1),
    })
    with np.errstate(invalid="ignore"):
        rate = np.where(np.isnan(sink), np.nan, (sink > SINK_THRESHOLD).astype(np.float64)).mean(-1)  # (n, L)
    li = np.indices((n, L)).reshape(2, -1)
    layers = pd.DataFrame({
        "prompt": (blk.p0 + li[0]).astype(np.int64),
        "layer": li[1].astype(np.int64),
        "sink_rate": rate.reshape(-1),
        "sink_mass": sink.mean(-1).reshape(-1),
        "entropy": entropy[:, 1].mean(-1).reshape(-1),
        "entropy_last": entropy[:, 0].mean(-1).reshape(-1),
        "recent_mass": recent.mean(-1).reshape(-1),
        "recent_uniform": np.repeat(recent_uniform, L),
    })
    return regions, heads, layers


ATTENTION_TABLES = ("attention_regions", "attention_heads", "attention_layers")


@dataclass
class PromptShares:
    """What the summary needs of the attention tables, per prompt of one block: the sums
    and counts (over layers, NaN left out) of the head-averaged mass of the last query on
    each region, and of the mass on the last ``recent_k`` keys."""

    prompts: np.ndarray  # (n,) prompt ids
    mass_sum: np.ndarray  # (n, R) sum over layers of attention_regions.mass, scope last
    mass_n: np.ndarray  # (n, R) layers with a finite mass
    recent_sum: np.ndarray  # (n,) sum over layers of attention_layers.recent_mass
    recent_n: np.ndarray  # (n,)


def attention_part(ref: StoreRef, blk: PromptBlock, parts: str, index: int) -> PromptShares:
    """:func:`attention_task` for one block, its three tables (with the prompts' ``role``,
    ``system`` and ``user_id`` after ``prompt``) written as part ``index`` of each table
    under ``parts`` (:mod:`promptshift.metrics.parts`); returns only what the summary needs."""
    from promptshift.metrics.parts import write_part

    regions, heads, layers = attention_task(ref, blk)
    for name, df in zip(ATTENTION_TABLES, (regions, heads, layers)):
        j = df["prompt"].to_numpy() - blk.p0
        for i, (col, v) in enumerate((("role", blk.role), ("system", blk.system), ("user_id", blk.user_id))):
            df.insert(1 + i, col, np.asarray(v, dtype=object)[j])
        write_part(parts, name, index, df)
    n, nr = blk.p1 - blk.p0, len(regions["region"].unique()) if len(regions) else 0
    last = regions[regions["scope"] == "last"]
    m = last["mass"].to_numpy().reshape(n, -1, nr) if n and nr else np.zeros((n, 0, 0))  # (n, L, R)
    rec = layers["recent_mass"].to_numpy().reshape(n, -1)  # (n, L)
    return PromptShares(prompts=np.arange(blk.p0, blk.p1), mass_sum=np.nansum(m, 1), mass_n=np.isfinite(m).sum(1),
                        recent_sum=np.nansum(rec, 1), recent_n=np.isfinite(rec).sum(1))


def attention_shares(shares: list[PromptShares], prompts: np.ndarray) -> dict[str, float | None]:
    """The summary's ``attention_shares``: per region (sink, system, user, gen_prompt,
    template), the mean over the given prompts and their layers of the last query's
    head-averaged attention mass, and ``recent``, the mean mass on the last keys."""
    from promptshift.jsonsafe import number

    keep = [np.isin(s.prompts, prompts) for s in shares]
    out = {}
    if shares and shares[0].mass_sum.shape[1]:
        tot = sum(s.mass_sum[k].sum(0) for s, k in zip(shares, keep))
        cnt = sum(s.mass_n[k].sum(0) for s, k in zip(shares, keep))
    else:
        tot = cnt = np.zeros(len(REGIONS))
    for reg in ("sink", "system", "user", "gen_prompt", "template"):
        r = REGION_CODE[reg]
        out[reg] = number(tot[r] / cnt[r]) if r < len(cnt) and cnt[r] else None
    rs = sum(float(s.recent_sum[k].sum()) for s, k in zip(shares, keep))
    rn = sum(int(s.recent_n[k].sum()) for s, k in zip(shares, keep))
    out["recent"] = number(rs / rn) if rn else None
    return out


@dataclass
class PairAttnTask:
    pairs: np.ndarray  # (n,) pair ids
    variant: np.ndarray  # (n,) prompt
    baseline: np.ndarray
    v_start: np.ndarray  # (n,) attn_last row of the first aligned variant key
    b_start: np.ndarray
    n_al: np.ndarray  # (n,) aligned keys
    v_keys: np.ndarray  # (n,) attn_last row of the variant's key 0
    b_keys: np.ndarray
    regions: dict[int, np.ndarray]  # prompt -> (n_tokens,) regions


def attention_change_task(ref: StoreRef, t: PairAttnTask) -> pd.DataFrame:
    """Per pair x layer: how the last query's attention over the aligned keys moved.

    ``tv_aligned`` compares the rows restricted to the aligned suffix keys, each
    renormalised, so a variant that spends mass on its system prompt is not counted as
    changed for that alone; the absolute masses sit beside it."""
    store = ref.open()
    spans = []
    for p, k in ((t.variant, t.v_keys), (t.baseline, t.b_keys)):
        for pi, ki in zip(p, k):
            spans.append(np.arange(ki, ki + len(t.regions[int(pi)])))
    rows = np.unique(np.concatenate(spans)) if spans else np.zeros(0, np.int64)
    A = read_rows(store, "attn_last", rows, dtype=np.float64)  # (keys, L, NH)
    out = []
    sys_c, usr_c, pre_c = REGION_CODE["system"], REGION_CODE["user"], REGION_CODE["prefix"]
    for i in range(len(t.pairs)):
        n = int(t.n_al[i])
        vi = np.searchsorted(rows, t.v_start[i])
        bi = np.searchsorted(rows, t.b_start[i])
        pv, pb = A[vi : vi + n], A[bi : bi + n]  # (n_al, L, NH)
        with np.errstate(invalid="ignore", divide="ignore"):
            tv = 0.5 * np.abs(pv / pv.sum(0) - pb / pb.sum(0)).sum(0)  # (L, NH)
        rv, rb = t.regions[int(t.variant[i])], t.regions[int(t.baseline[i])]
        v0 = np.searchsorted(rows, t.v_keys[i])
        b0 = np.searchsorted(rows, t.b_keys[i])
        fv, fb = A[v0 : v0 + len(rv)], A[b0 : b0 + len(rb)]  # (n_tokens, L, NH) full last rows
        out.append(pd.DataFrame({
            "pair": int(t.pairs[i]),
            "layer": np.arange(tv.shape[0], dtype=np.int64),
            "tv_aligned": tv.mean(-1),
            "mass_system_variant": fv[rv == sys_c].sum(0).mean(-1),
            "mass_user_variant": fv[rv == usr_c].sum(0).mean(-1),
            "mass_user_baseline": fb[rb == usr_c].sum(0).mean(-1),
            "mass_prefix_variant": fv[rv == pre_c].sum(0).mean(-1),
        }))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


__all__ = ["ATTENTION_TABLES", "PairAttnTask", "PromptBlock", "PromptShares", "SINK_THRESHOLD", "attention_change_task",
           "attention_part", "attention_shares", "attention_task", "prompt_stats"]

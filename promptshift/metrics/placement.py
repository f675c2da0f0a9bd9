"""Instruction placement: the same instruction as a system prompt and as a prefix of the
user turn (a sweep's ``instruction_prefixes``), compared pair by pair.

Both placements are variants of the same baseline (the user prompt under the sweep's
baseline condition), and each matched instruction has one pair per user prompt in each
placement, so the comparison is paired by user prompt: a resample of user prompts draws
the system pair and the prefix pair of a user prompt together, and the interval of a
difference (prefix − system) is the percentile interval of the resampled differences. The
rows ``all`` (the mean over matched instructions) resample the instructions too, as the
crossed bootstrap of the system-prompt analyses resamples system prompts.

Tables (docs/RESULTS.md):

* ``placement_layers``: per instruction (every system prompt and every prefix, with its
  ``placement``) × component × layer, the mean relative change at the last prompt token
  with its CI: where in depth each instruction moves the residual stream;
* ``placement_compare``: per matched instruction (and ``all``: their mean) × measure, the
  system value, the prefix value and their difference with a CI. Measures: ``impact``,
  ``kl``, ``top1_changed`` (how much each placement changes the output), ``attn_instruction``
  (the last token's attention to the instruction's own tokens), and per component
  ``peak_layer:<component>`` (the layer of largest mean relative change) and
  ``depth:<component>`` (the change-weighted mean layer, Σ l·m_l / Σ m_l: a steadier
  summary of where in depth the change sits than the argmax).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from promptshift.metrics.analyses import Context, grouped_ci
from promptshift.metrics.bootstrap import mean_ci, percentile_ci, user_weights

OUTPUT_MEASURES = ("impact", "kl", "top1_changed", "attn_instruction")
LAYER_COLS = ["system", "placement", "instruction", "component", "layer", "mean", "ci_low", "ci_high", "n_pairs"]
COMPARE_COLS = ["system_prompt", "prefix", "measure", "component", "system_value", "prefix_value", "diff", "ci_low",
                "ci_high", "n_users"]


def placement_layers(cc: pd.DataFrame, pairs: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """Mean rel_change at `last` per instruction label × component × layer (CI over users)."""
    last = cc[~cc["is_control"] & (cc["position"] == "last")]
    if last.empty:
        return pd.DataFrame(columns=LAYER_COLS)
    t = grouped_ci(last, ["system", "component", "layer"], "rel_change", ctx)
    info = pairs.drop_duplicates("system").set_index("system")[["placement", "instruction"]]
    t = t.join(info, on="system")
    return t[LAYER_COLS].sort_values(["placement", "instruction", "component", "layer"],
                                     kind="stable").reset_index(drop=True)


def _per_user(values: pd.DataFrame, label: str, col: str, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """(sums, counts) (U,) of ``col`` over the pairs of one instruction label, per user prompt."""
    d = values[(values["system"] == label) & np.isfinite(values[col].astype(np.float64))]
    u = ctx.user_index(d["user_id"])
    U = len(ctx.users)
    return (np.bincount(u, weights=d[col].astype(np.float64), minlength=U),
            np.bincount(u, minlength=U).astype(np.float64))


def _layer_means(last: pd.DataFrame, label: str, comp: str, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """Mean rel_change per layer (L,) and its resampled values (L, B) for one label and component."""
    d = last[(last["system"] == label) & (last["component"] == comp)]
    L = int(last["layer"].max()) + 1
    U = len(ctx.users)
    S, N = np.zeros((L, U)), np.zeros((L, U))
    u = ctx.user_index(d["user_id"])
    lay = d["layer"].to_numpy(np.int64)
    v = d["rel_change"].to_numpy(np.float64)
    ok = np.isfinite(v)
    np.add.at(S, (lay[ok], u[ok]), v[ok])
    np.add.at(N, (lay[ok], u[ok]), 1.0)
    return mean_ci(S, N, ctx.w)


def _depths(mean: np.ndarray, boot: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """peak layer and change-weighted mean layer of a per-layer profile and of its resamples."""
    layers = np.arange(len(mean), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cen = float((layers * mean).sum() / mean.sum())
        cen_b = (layers[:, None] * boot).sum(0) / boot.sum(0)
    peak = float(np.nanargmax(mean)) if np.isfinite(mean).any() else np.nan
    ok = np.isfinite(boot).all(0)
    peak_b = np.full(boot.shape[1], np.nan)
    peak_b[ok] = np.argmax(boot[:, ok], axis=0)
    return {"peak_layer": (peak, peak_b), "depth": (cen, cen_b)}


def placement_compare(cc: pd.DataFrame, imp: pd.DataFrame, matches: list[tuple[str, str]], prefix_label,
                      ctx: Context) -> pd.DataFrame:
    """System vs prefix placement of each matched instruction (``matches``: (system prompt,
    prefix) names), paired by user prompt; plus ``all`` rows: the mean over matched
    instructions. ``imp`` holds per pair impact, kl, top1_changed and attn_instruction."""
    if not matches:
        return pd.DataFrame(columns=COMPARE_COLS)
    last = cc[~cc["is_control"] & (cc["position"] == "last")]
    comps = list(dict.fromkeys(last["component"]))
    rows, collect = [], {}
    for sys_name, pre_name in matches:
        labels = (sys_name, prefix_label(pre_name))
        stats: dict[tuple[str, str | None], tuple] = {}
        for m in OUTPUT_MEASURES:
            (ms, bs), (mp, bp) = (mean_ci(*(x[None] for x in _per_user(imp, lab, m, ctx)), ctx.w) for lab in labels)
            n = int(min(_per_user(imp, lab, m, ctx)[1].astype(bool).sum() for lab in labels))
            stats[(m, None)] = (float(ms[0]), float(mp[0]), bs[0], bp[0], n)
        for comp in comps:
            ds, dp = (_depths(*_layer_means(last, lab, comp, ctx)) for lab in labels)
            n = int(last[(last["system"] == labels[0]) & (last["component"] == comp)]["user_id"].nunique())
            for k in ("peak_layer", "depth"):
                stats[(f"{k}:{comp}", comp)] = (ds[k][0], dp[k][0], ds[k][1], dp[k][1], n)
        for (m, comp), (vs, vp, bs, bp, n) in stats.items():
            lo, hi = percentile_ci(bp - bs)
            rows.append(dict(system_prompt=sys_name, prefix=pre_name, measure=m, component=comp, system_value=vs,
                             prefix_value=vp, diff=vp - vs, ci_low=float(lo), ci_high=float(hi), n_users=n))
            collect.setdefault((m, comp), []).append((vs, vp, bs, bp, n))
    if len(matches) > 1:
        # the mean over matched instructions: instructions and user prompts both resampled
        # (pigeonhole, as the system-prompt analyses), a resample's value the mean of its
        # drawn instructions' paired differences
        wm = user_weights(len(matches), len(ctx.w), [ctx.seed, 4])  # (B, M)
        for (m, comp), xs in collect.items():
            vs = float(np.mean([x[0] for x in xs]))
            vp = float(np.mean([x[1] for x in xs]))
            d = np.stack([x[3] - x[2] for x in xs], axis=1)  # (B, M) per-instruction resampled differences
            with np.errstate(invalid="ignore"):
                boot = np.nansum(wm * d, axis=1) / np.where(np.isfinite(d), wm, 0).sum(1)
            lo, hi = percentile_ci(boot)
            rows.append(dict(system_prompt="all", prefix="all", measure=m, component=comp, system_value=vs,
                             prefix_value=vp, diff=vp - vs, ci_low=float(lo), ci_high=float(hi),
                             n_users=int(min(x[4] for x in xs))))
    return pd.DataFrame(rows, columns=COMPARE_COLS)





CAUSAL_COLS = ["system_prompt", "prefix", "placement", "analysis", "site", "value", "ci_low", "ci_high", "n_users"]


def _label_sums(kl: np.ndarray, den: np.ndarray, pair_ids: np.ndarray, users_of: dict, pairs_of: list[int],
                users: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per user prompt (U, M) sums of a curve's numerator ``kl`` (n, M) and denominator
    ``den`` (n,) over the pairs ``pairs_of`` of one instruction label."""
    U, M = len(users), kl.shape[1]
    num, dd = np.zeros((U, M)), np.zeros((U, M))
    row = {int(p): i for i, p in enumerate(pair_ids)}
    for p in pairs_of:
        if p not in row:
            continue
        u = users.index(users_of[p])
        num[u] += np.nan_to_num(kl[row[p]])
        dd[u] += np.nan_to_num(den[row[p]])
    return num, dd


def placement_causal(store, pairs: pd.DataFrame, matches: list[tuple[str, str]], prefix_label, n_boot: int,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Causal curves of both placements of each matched instruction, and their onsets.

    From the store's ``patching`` (modes ``suffix`` and ``last``: recovered share
    1 − Σ KL(v ‖ patched) / Σ KL(v ‖ b) per site) and ``knockout`` (effect left
    Σ KL(v ‖ knocked from l) / Σ KL(v ‖ knocked from 0)), each over the pairs of one
    instruction label, with a bootstrap over user prompts (a user prompt's system and prefix
    pairs drawn together). The onsets (first site recovering half; first layer from which
    the knockout's effect left stays at or below 0.1, the thresholds of
    :mod:`promptshift.metrics.causal`) are found again in every resample; the compare rows
    (``onset:patching_<mode>``, ``stops_mattering:knockout``) give system, prefix and the
    paired difference with its interval."""
    from promptshift.metrics.causal import KNOCKOUT_LEFT, RECOVER_AT, _first, _stays_below

    done = set(store.causal_analyses())
    curves, rows = [], []
    users_of = dict(zip(pairs["pair"].astype(int), pairs["user_id"]))
    by_label = pairs.groupby("system")["pair"].apply(lambda x: [int(v) for v in x]).to_dict()
    for name in ("patching", "knockout"):
        if name not in done or not matches:
            continue
        arrays, meta = store.read_causal(name)
        users = list(meta["users"])
        w = user_weights(len(users), n_boot, seed)  # (B, U)
        ids = arrays["pair"].astype(np.int64)
        kl = arrays["kl"].astype(np.float64)
        den = arrays["kl_vb"].astype(np.float64)
        modes = list(meta["modes"]) if name == "patching" else [None]
        for k, mode in enumerate(modes):
            kl_m = kl[:, k, :] if name == "patching" else kl  # (n, sites)
            analysis = f"patching_{mode}" if name == "patching" else "knockout"
            for sys_name, pre_name in matches:
                found = {}
                for placement, label in (("system", sys_name), ("prefix", prefix_label(pre_name))):
                    num, dd = _label_sums(kl_m, den, ids, users_of, by_label.get(label, []), users)
                    n_users = int((dd[:, 0] > 0).sum())
                    with np.errstate(invalid="ignore", divide="ignore"):
                        frac = num.sum(0) / dd.sum(0)  # (sites,)
                        frac_b = (w @ num) / (w @ dd)  # (B, sites)
                    if name == "patching":
                        value, boot = 1.0 - frac, 1.0 - frac_b
                        point = _first(value[None], lambda x: x >= RECOVER_AT)[0]
                        at_b = _first(boot, lambda x: x >= RECOVER_AT)
                    else:
                        with np.errstate(invalid="ignore", divide="ignore"):
                            value, boot = frac / frac[0], frac_b / frac_b[:, :1]
                        point = _stays_below(value[None], KNOCKOUT_LEFT)[0]
                        at_b = _stays_below(boot, KNOCKOUT_LEFT)
                    lo, hi = percentile_ci(boot.T)
                    curves.append(pd.DataFrame({
                        "system_prompt": sys_name, "prefix": pre_name, "placement": placement, "analysis": analysis,
                        "site": np.arange(len(value)), "value": value, "ci_low": lo, "ci_high": hi,
                        "n_users": n_users}))
                    found[placement] = (point, at_b, n_users)
                (ps, bs, ns), (pp, bp, npre) = found["system"], found["prefix"]
                lo, hi = percentile_ci(bp - bs)
                measure = f"onset:{analysis}" if name == "patching" else "stops_mattering:knockout"
                rows.append(dict(system_prompt=sys_name, prefix=pre_name, measure=measure, component=None,
                                 system_value=float(ps), prefix_value=float(pp), diff=float(pp - ps),
                                 ci_low=float(lo), ci_high=float(hi), n_users=min(ns, npre)))
    curves = pd.concat(curves, ignore_index=True)[CAUSAL_COLS] if curves else pd.DataFrame(columns=CAUSAL_COLS)
    return curves, pd.DataFrame(rows, columns=COMPARE_COLS)


__all__ = ["CAUSAL_COLS", "COMPARE_COLS", "LAYER_COLS", "OUTPUT_MEASURES", "placement_causal", "placement_compare",
           "placement_layers"]

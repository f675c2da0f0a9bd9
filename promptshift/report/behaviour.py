"""The report's behaviour section: adherence to each system prompt's declared checks and
correctness of the expected answers, with and without the system prompt, with their 95%
intervals (table ``behaviour_systems``, docs/RESULTS.md), and which internal change
predicts the change in behaviour (summary.json ``behaviour.strongest_internal`` beside
``strongest_internal_output``, the next-token KL's).

Every number is one cell of ``behaviour_systems`` or one value of summary.json, formatted
as the findings format it (``pct`` for shares, ``pp`` for changes in percentage points,
``fmt`` otherwise). A results directory without the behaviour tables gets a note instead.
"""

from __future__ import annotations

import html

import pandas as pd

from promptshift.jsonsafe import is_number
from promptshift.report.findings import fmt, pct, pp
from promptshift.results import NotAvailable, Results

ALL = "__all__"  # behaviour_systems rows pooled over the system prompts
# figures drawn in this section (each after its table), not in the report's list of figures
BEHAVIOUR_FIGURES = ("fig-behaviour", "fig-behaviour-internal")
# (label, measure prefix, formatter of the values, formatter of the change, unit of the change)
COLUMNS = (("adherence: declared checks passed", "adherence", pct, pp, " pp"),
           ("correct: expected answer given", "correct", pct, pp, " pp"),
           ("reply length (words)", "words", fmt, fmt, ""))
OUTPUT_LABELS = {"adherence_change": "adherence change", "correct_change": "correctness change",
                 "words_change": "reply length change"}


def _cells(sy: pd.DataFrame) -> dict[tuple[str, str], pd.Series]:
    return {(str(r["system"]), str(r["measure"])): r for _, r in sy.iterrows()}


def _interval(r: pd.Series | None, f) -> str:
    if r is None or not is_number(r["mean"]):
        return "–"
    text = f(r["mean"])
    if is_number(r["ci_low"]) and is_number(r["ci_high"]):
        text += f" [{f(r['ci_low'])}, {f(r['ci_high'])}]"
    return text


def system_rows(sy: pd.DataFrame) -> list[dict]:
    """One dict per row of the section's table (system prompts in table order, the pooled row
    last): ``system``, ``checks``, and per measure prefix ``<m>_baseline``, ``<m>_variant``
    (the value) and ``<m>_change`` (value and 95% interval) as printed, ``<m>_n`` (pairs
    judged). Raises NotAvailable when the table lacks a needed column."""
    need = ["system", "measure", "mean", "ci_low", "ci_high", "n_pairs"]
    missing = [c for c in need if c not in sy.columns]
    if missing:
        raise NotAvailable(f"`behaviour_systems.parquet` lacks column(s) {', '.join(missing)}")
    sy = sy.assign(system=sy["system"].astype(str), measure=sy["measure"].astype(str),
                   **{c: pd.to_numeric(sy[c], errors="coerce").astype(float)
                      for c in ("mean", "ci_low", "ci_high", "n_pairs")})
    cells = _cells(sy)
    names = [s for s in dict.fromkeys(sy["system"]) if s != ALL] + ([ALL] if ALL in set(sy["system"]) else [])
    checks = sy.drop_duplicates("system").set_index("system")["checks"] if "checks" in sy.columns else {}
    rows = []
    for name in names:
        row = {"system": name, "checks": "" if name == ALL else str(checks.get(name, "") or "")}
        for _, m, f, fc, unit in COLUMNS:
            b, v, c = (cells.get((name, f"{m}_{k}")) for k in ("baseline", "variant", "change"))
            row[f"{m}_baseline"] = f(b["mean"]) if b is not None and is_number(b["mean"]) else "–"
            row[f"{m}_variant"] = f(v["mean"]) if v is not None and is_number(v["mean"]) else "–"
            row[f"{m}_change"] = _interval(c, fc) + (unit if c is not None and is_number(c["mean"]) else "")
            row[f"{m}_n"] = int(c["n_pairs"]) if c is not None and is_number(c["n_pairs"]) else 0
        rows.append(row)
    return rows


def _strongest_rows(summary: dict) -> list[tuple[str, dict]]:
    d = summary.get("behaviour")
    st = d.get("strongest_internal") if isinstance(d, dict) else None
    out = [(OUTPUT_LABELS.get(o, o), v) for o, v in (st.items() if isinstance(st, dict) else ())]
    nxt = summary.get("strongest_internal_output")
    if isinstance(nxt, dict):
        out.append((f"next token ({nxt.get('output', 'kl')}), for comparison", nxt))
    return out


def behaviour_section(res: Results, figures: dict[str, str] | None = None) -> str:
    """The section's HTML (``<section id="behaviour">``): the per-system-prompt table, then
    ``figures["fig-behaviour"]``, the internal-vs-behaviour table, then
    ``figures["fig-behaviour-internal"]`` (``figures``: figure id -> its rendered
    ``<figure>``; absent ones are left out). Without ``behaviour_systems`` a note takes the
    tables' place."""
    e = html.escape
    fig = figures or {}
    parts = ['<section id="behaviour"><h2>Behaviour</h2>']
    try:
        rows = system_rows(res.table("behaviour_systems"))
    except NotAvailable as err:
        parts.append(f'<div class="na">not available: {e(str(err))} (a sweep without continuations, '
                     "<code>max_new_tokens: 0</code>, has no replies to judge)</div>")
        parts.extend(fig[f] for f in BEHAVIOUR_FIGURES if f in fig)
        parts.append("</section>")
        return "\n".join(parts)
    sample = res.summary.get("sample") if isinstance(res.summary.get("sample"), dict) else {}
    pooled_unit = ("crossed bootstrap over system prompts and user prompts" if sample.get("resampling") == "crossed"
                   else "bootstrap over user prompts")
    n = (f"{sample['n_systems']} system prompts × {sample['n_users']} user prompts"
         if is_number(sample.get("n_systems")) and is_number(sample.get("n_users")) else "the sweep")
    parts.append(
        '<p class="sub">Each system prompt\'s greedy replies judged by its declared checks and each user prompt\'s '
        "expected answer, without the system prompt (baseline, same user prompts, same checks) → with it; the "
        "change with its 95% interval in brackets (percentage points for shares), and the pairs judged. Intervals "
        f"of one system prompt: bootstrap over user prompts; the last row, all system prompts ({e(n)}): "
        f"{e(pooled_unit)}, the only interval that speaks for system prompts in general. Table "
        "<code>behaviour_systems</code>; figures: <a href=\"#fig-behaviour\">adherence and correctness</a>, "
        "<a href=\"#fig-behaviour-internal\">internal vs behaviour change</a>.</p>")
    head = "".join(f'<th colspan="3">{e(label)}</th>' for label, *_ in COLUMNS)
    sub = "<th>without → with</th><th>change [95% CI]</th><th>pairs</th>" * len(COLUMNS)
    parts.append('<table class="prov behaviour" id="behaviour-systems"><thead>'
                  f'<tr><th rowspan="2">system prompt</th><th rowspan="2">checks</th>{head}</tr><tr>{sub}</tr>'
                  "</thead><tbody>")
    for r in rows:
        name = "all system prompts" if r["system"] == ALL else f"<code>{e(r['system'])}</code>"
        tds = "".join(f"<td>{e(r[f'{m}_baseline'])} → {e(r[f'{m}_variant'])}</td><td>{e(r[f'{m}_change'])}</td>"
                      f"<td>{r[f'{m}_n']}</td>" for _, m, *_ in COLUMNS)
        parts.append(f'<tr data-system="{e(r["system"])}"><td>{name}</td><td>{e(r["checks"])}</td>{tds}</tr>')
    parts.append("</tbody></table>")
    if BEHAVIOUR_FIGURES[0] in fig:
        parts.append(fig[BEHAVIOUR_FIGURES[0]])
    strongest = _strongest_rows(res.summary)
    if strongest:
        parts.append("<h3>Internal change vs behaviour change</h3>"
                     '<p class="sub">Per behaviour, the layer and component whose relative change at the last prompt '
                     "token best predicts the pair's change (Pearson r across pairs), chosen on one half of the user "
                     "prompts and measured on the other (<code>same</code>: too few to split, optimistic); 95% "
                     f"interval: {e(pooled_unit)}.</p>")
        parts.append('<table class="prov" id="behaviour-internal"><thead><tr><th>predicts</th><th>component</th>'
                     "<th>layer</th><th>r [95% CI]</th><th>pairs</th><th>selection</th></tr></thead><tbody>")
        for label, st in strongest:
            if not isinstance(st, dict) or not is_number(st.get("r")):
                parts.append(f"<tr><td>{e(label)}</td><td colspan=\"5\">undefined (no pair with a defined change "
                             "and spread)</td></tr>")
                continue
            c = st.get("ci")
            r = fmt(st["r"]) + (f" [{fmt(c[0])}, {fmt(c[1])}]" if isinstance(c, (list, tuple)) and len(c) == 2
                                and all(is_number(x) for x in c) else "")
            parts.append(f"<tr><td>{e(label)}</td><td><code>{e(str(st.get('component')))}</code></td>"
                         f"<td>{int(st['layer']) if is_number(st.get('layer')) else '–'}</td><td>{e(r)}</td>"
                         f"<td>{int(st['n_pairs']) if is_number(st.get('n_pairs')) else '–'}</td>"
                         f"<td>{e(str(st.get('selection', '–')))}</td></tr>")
        parts.append("</tbody></table>")
    if BEHAVIOUR_FIGURES[1] in fig:
        parts.append(fig[BEHAVIOUR_FIGURES[1]])
    parts.append("</section>")
    return "\n".join(parts)


__all__ = ["BEHAVIOUR_FIGURES", "behaviour_section", "system_rows"]

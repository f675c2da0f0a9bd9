"""The report's behaviour section and figures print and draw the numbers of
`behaviour_systems` and `internal_vs_behaviour`: the HTML table is read back cell by cell,
the figures from their matplotlib artists, and both are compared with the Parquet files
read here with plain pandas. Values pass through matplotlib as float64 unchanged (exact);
printed values must be the table's values rounded as printed."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pandas as pd

from promptshift.report import build_report, figure

from .conftest import make_fake_results

ROW = re.compile(r'<tr data-system="([^"]*)">(.*?)</tr>', re.S)
TD = re.compile(r"<td>(.*?)</td>", re.S)


def _section(page: str) -> str:
    return page.split('<section id="behaviour">', 1)[1].split("</section>", 1)[0]


def _systems_table(results) -> pd.DataFrame:
    return pd.read_parquet(results / "behaviour_systems.parquet")


def _share(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{100 * x:.1f}%"


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def test_behaviour_section_prints_each_system_prompts_adherence_and_correctness(built_report, fake_results):
    page = built_report.read_text(encoding="utf-8")
    assert '<a href="#behaviour">Behaviour</a>' in page
    sec = _section(page)
    sy = _systems_table(fake_results)
    cell = {(r.system, r.measure): r for r in sy.itertuples()}
    rows = ROW.findall(sec)
    names = list(dict.fromkeys(sy["system"]))
    assert [n for n, _ in rows] == [n for n in names if n != "__all__"] + ["__all__"]  # pooled row last
    for name, body in rows:
        tds = [html.unescape(re.sub(r"<[^>]+>", "", t)) for t in TD.findall(body)]
        assert len(tds) == 2 + 3 * 3, (name, tds)
        for k, m in ((2, "adherence"), (5, "correct")):
            b, v, c = (cell[(name, f"{m}_{x}")] for x in ("baseline", "variant", "change"))
            assert tds[k] == f"{_share(b.mean)} → {_share(v.mean)}", (name, m, tds[k])
            if np.isfinite(c.mean):
                assert tds[k + 1] == f"{_points(c.mean)} [{_points(c.ci_low)}, {_points(c.ci_high)}] pp", (name, m)
            else:
                assert tds[k + 1] == "–"
            assert tds[k + 2] == str(int(c.n_pairs))
        assert tds[1] == ("" if name == "__all__" else str(cell[(name, "adherence_change")].checks or ""))
    # a system prompt without declared checks has no adherence, one with checks has a change
    assert any(r.checks == "" and not np.isfinite(r.mean) for r in sy[sy.measure == "adherence_change"].itertuples())
    summary = json.loads((fake_results / "summary.json").read_text())
    n = f"all system prompts ({summary['sample']['n_systems']} system prompts × {summary['sample']['n_users']} user " \
        "prompts): crossed bootstrap over system prompts and user prompts"
    assert n in sec
    # the behaviour figures are drawn in this section, each once, not in the list of figures
    figs = page.split('<section id="figures">', 1)[1]
    for fid in ("fig-behaviour", "fig-behaviour-internal"):
        assert f'<figure id="{fid}">' in sec and page.count(f'<figure id="{fid}">') == 1
        assert f'<figure id="{fid}">' not in figs
    assert sec.index('id="behaviour-systems"') < sec.index('<figure id="fig-behaviour">') \
        < sec.index('id="behaviour-internal"') < sec.index('<figure id="fig-behaviour-internal">')


def test_behaviour_section_names_the_layer_that_predicts_behaviour(built_report, fake_results):
    sec = _section(built_report.read_text(encoding="utf-8"))
    summary = json.loads((fake_results / "summary.json").read_text())
    internal = sec.split('id="behaviour-internal"', 1)[1]
    for label, o in (("adherence change", "adherence_change"), ("correctness change", "correct_change"),
                     ("reply length change", "words_change")):
        st = summary["behaviour"]["strongest_internal"][o]
        row = re.search(rf"<tr><td>{label}</td>(.*?)</tr>", internal).group(1)
        tds = [re.sub(r"<[^>]+>", "", t) for t in TD.findall(row)]
        assert tds[0] == st["component"] and tds[1] == str(st["layer"]) and tds[3] == str(st["n_pairs"])
        r = float(tds[2].split(" [")[0])
        lo, hi = (float(x) for x in tds[2].split(" [")[1].rstrip("]").split(", "))
        # printed with 3 significant digits: within half a unit of the third digit
        for got, want in ((r, st["r"]), (lo, st["ci"][0]), (hi, st["ci"][1])):
            assert abs(got - want) <= 5e-3 * max(abs(want), 1e-3) + 1e-12, (o, got, want)
    assert "next token (kl), for comparison" in internal


def _dot_rows(ax) -> dict[float, tuple[float, bool]]:
    """y -> (x, filled) of every single-point marker line of the axis."""
    out = {}
    for ln in ax.get_lines():
        x, y = np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)
        if ln.get_marker() == "o" and len(x) == 1:
            out[round(float(y[0]), 6)] = (float(x[0]), ln.get_markerfacecolor() != "white")
    return out


def test_behaviour_figure_draws_the_systems_table(fake_results):
    sy = _systems_table(fake_results)
    mean = {(r.system, r.measure): (r.mean, r.ci_low, r.ci_high) for r in sy.itertuples()}
    fig = figure(fake_results, "behaviour")
    axes = [ax for ax in fig.axes if ax.get_title() in ("declared checks passed", "expected answer given")]
    assert [ax.get_title() for ax in axes] == ["declared checks passed", "expected answer given"]
    for ax, what in zip(axes, ("adherence", "correct")):
        dots = _dot_rows(ax)
        ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
        systems = {s for s, m in mean if m == f"{what}_change" and np.isfinite(mean[(s, m)][0]) and s != "__all__"}
        seen = set()
        for y, label in ticks.items():
            name = "__all__" if label.startswith("all system prompts") else label.split("  [")[0]
            seen.add(name)
            for side, dy, filled in (("variant", 0.14, True), ("baseline", -0.14, False)):
                m, lo, hi = mean[(name, f"{what}_{side}")]
                x, is_filled = dots[round(y + dy, 6)]
                assert x == m and is_filled == filled, (what, name, side)
                bars = [ln for ln in ax.get_lines() if ln.get_marker() in ("None", "", None)
                        and np.allclose(ln.get_ydata(), [y + dy] * 2)]
                assert len(bars) == 1 and list(bars[0].get_xdata()) == [lo, hi], (what, name, side)
        assert seen == systems | {"__all__"}, what
    # the change sorts the rows: the adherence panel reads top-down by decreasing change
    ax = axes[0]
    order = [t.get_text().split("  [")[0] for t in sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])]
    changes = [mean[(s, "adherence_change")][0] for s in order[:-1]]
    assert changes == sorted(changes, reverse=True)
    summary = json.loads((fake_results / "summary.json").read_text())
    scope = fig.get_suptitle()
    assert f"n = {summary['sample']['n_systems']} system prompts × {summary['sample']['n_users']} user prompts" in scope
    assert "bootstrap over user prompts (each system prompt)" in scope
    assert "crossed bootstrap over system prompts and user prompts" in scope


def test_behaviour_internal_figure_draws_the_correlations(fake_results):
    iv = pd.read_parquet(fake_results / "internal_vs_behaviour.parquet")
    iv = iv[(iv.measure == "rel_change") & (iv.method == "pearson")]
    summary = json.loads((fake_results / "summary.json").read_text())
    fig = figure(fake_results, "behaviour-internal")
    panels = {o: ax for ax in fig.axes for o, t in (("adherence_change", "adherence change"),
                                                    ("correct_change", "correctness change"),
                                                    ("words_change", "reply length change")) if
              ax.get_title().startswith(t)}
    assert set(panels) == {"adherence_change", "correct_change", "words_change"}
    for o, ax in panels.items():
        lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        for comp, g in iv[iv.output == o].groupby("component"):
            g = g.sort_values("layer")
            ln = lines[comp]
            assert list(ln.get_xdata()) == list(g["layer"]) and list(ln.get_ydata()) == list(g["r"]), (o, comp)
        st = summary["behaviour"]["strongest_internal"][o]
        stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
        assert len(stars) == 1 and (stars[0].get_xdata()[0], stars[0].get_ydata()[0]) == (st["layer"], st["r"])
        assert f"{st['component']} L{st['layer']}: held-out r = {st['r']:.2f}" in ax.get_title()
    assert "crossed bootstrap over system prompts and user prompts" in fig.get_suptitle()


def test_without_behaviour_tables_the_section_is_a_note(tmp_path):
    res = make_fake_results(tmp_path / "r", n_systems=6, n_users=3, n_layers=3, causal=False,
                            omit=("behaviour_systems", "internal_vs_behaviour"))
    page = build_report(res, strict=True).read_text(encoding="utf-8")
    sec = _section(page)
    assert '<div class="na">not available: `behaviour_systems.parquet` is not in' in sec
    assert "<table" not in sec
    for fid in ("fig-behaviour", "fig-behaviour-internal"):
        block = page.split(f'<figure id="{fid}">', 1)[1].split("</figure>", 1)[0]
        assert '<div class="na">not available:' in block and ".parquet" in block

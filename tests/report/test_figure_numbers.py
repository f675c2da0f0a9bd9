"""The notebook's views in the report draw the numbers of the results tables: each figure is
read back from its matplotlib artists (heatmap cells and their labels, scatter points,
lines, error bars) and compared with the same quantity computed here from the Parquet
files with plain pandas. The values pass through matplotlib as float64 unchanged, so
they must agree to float64 rounding of a mean (rtol 1e-12); printed labels must be the
values rounded as printed."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

from promptshift.report import figure

from .conftest import CONTROL, make_fake_results

matplotlib.use("Agg")
RTOL = 1e-12  # float64 means of the same float64 values, possibly summed in another order


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Few layers, so the heatmaps print their numbers in the cells."""
    return make_fake_results(tmp_path_factory.mktemp("numbers"), n_systems=8, n_users=5, n_layers=6, seed=3)


@pytest.fixture(scope="module")
def prefixed(small, tmp_path_factory):
    """The same results with instruction-prefix pairs added, as a sweep with
    `instruction_prefixes` writes them (`placement` column; per-prompt tables label a prefix
    variant `prefix:<name>`), with values far from every system prompt's: the system-prompt
    figures must leave them out, as the metrics analyses and summary.json do."""
    import shutil

    d = tmp_path_factory.mktemp("prefixed") / "r"
    shutil.copytree(small, d)
    cc = pd.read_parquet(d / "component_change.parquet")
    first = cc.loc[~cc.is_control, "system"].iloc[0]
    pre = cc[cc.system == first].assign(system="prefix:far", placement="prefix", pair=lambda x: x["pair"] + 10_000)
    pre["rel_change"], pre["cosine"] = 50.0, 0.01
    cc["placement"] = np.where(cc.is_control, None, "system")
    pd.concat([cc, pre], ignore_index=True).to_parquet(d / "component_change.parquet")
    for name, col in (("attention_layers", "recent_mass"), ("attention_regions", "mass")):
        t = pd.read_parquet(d / f"{name}.parquet")
        pre = t[(t.system == first) & (t.role == "variant")].assign(system="prefix:far",
                                                                     prompt=lambda x: x["prompt"] + 10_000)
        pre[col] = 0.99
        pd.concat([t, pre], ignore_index=True).to_parquet(d / f"{name}.parquet")
    return d


def _system_only(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df.system.astype(str).str.startswith("prefix:")]


def _title(ax) -> str:
    return " ".join(ax.get_title(loc) for loc in ("left", "center", "right") if ax.get_title(loc))


def _axis(fig, title_part: str):
    hits = [ax for ax in fig.axes if title_part in _title(ax)]
    assert len(hits) == 1, (title_part, [_title(ax) for ax in fig.axes])
    return hits[0]


def _user_mean(df: pd.DataFrame, by: list[str], value: str) -> pd.Series:
    """Mean over user prompts of each user prompt's mean (the report's unit is the user prompt)."""
    return df.groupby(by + ["user_id"])[value].mean().groupby(by).mean()


@pytest.mark.parametrize("which", ["small", "prefixed"])
def test_system_layer_heatmap_cells_are_the_table_means(request, which):
    small = request.getfixturevalue(which)
    cc = _system_only(pd.read_parquet(small / "component_change.parquet"))
    comp = json.loads((small / "summary.json").read_text())["impact_component"]
    last = cc[(cc.position == "last") & (cc.component == comp)]
    var, ctrl = last[~last.is_control], last[last.is_control]
    assert (ctrl.system == CONTROL).all() and len(var) and len(ctrl)
    fig = figure(small, "system-layer")
    labelled = _axis(fig, "relative change")  # the two panels share the y axis; the left one names the rows
    for part, value, digits in (("relative change", "rel_change", 2), ("raw cosine", "cosine", 3)):
        ax = _axis(fig, part)
        want = var.groupby(["system", "layer"])[value].mean().unstack("layer")  # (systems, layers)
        order = list(var.groupby("system")["rel_change"].mean().sort_values(ascending=False).index)
        want = want.loc[order]
        want.loc["[control: other user prompt]"] = ctrl.groupby("layer")[value].mean()
        assert ax.get_shared_y_axes().joined(ax, labelled)
        rows = [t.get_text() for t in labelled.get_yticklabels()]
        assert rows == list(want.index)  # sorted by mean relative change, the control row last
        got = np.asarray(ax.collections[0].get_array(), dtype=float).reshape(want.shape)
        np.testing.assert_allclose(got, want.to_numpy(), rtol=RTOL)
        # the numbers printed in the cells, row by row
        assert [t.get_text() for t in ax.texts] == [f"{v:.{digits}f}" for v in want.to_numpy().ravel()]


def test_length_views_plot_each_system_prompt_and_the_metrics_correlation(small):
    li = pd.read_parquet(small / "length_impact.parquet")
    li = li[li.system != CONTROL]
    lt = pd.read_parquet(small / "length_tests.parquet")
    fig = figure(small, "length-output-attention")
    for part, col, target in (("top-1 change rate", "top1_change_rate", "top1_changed"),
                              ("attention from the last token", "attn_system", "attn_system")):
        ax = _axis(fig, part)
        pts = np.asarray(ax.collections[0].get_offsets(), dtype=float)  # (n systems, 2)
        np.testing.assert_array_equal(pts, li[["n_system_tokens", col]].to_numpy(float))
        # the least-squares line over the points, against scipy's
        from scipy.stats import linregress

        fit = linregress(li["n_system_tokens"].astype(float), li[col].astype(float))
        line = ax.lines[0]
        np.testing.assert_allclose(line.get_ydata(), fit.intercept + fit.slope * np.asarray(line.get_xdata()),
                                   rtol=1e-9, atol=1e-12)  # two least-squares solvers: ~1e-15 relative apart
        # the title's r is the metrics stage's, over all system prompts
        row = lt[(lt.family == "all") & (lt.target == target) & (lt.method == "pearson")].iloc[0]
        assert f"Pearson r = {row.r:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]" in _title(ax)
        if col == "attn_system":  # the uniform-attention share beside each point
            hollow = np.asarray(ax.collections[1].get_offsets(), dtype=float)
            np.testing.assert_array_equal(hollow, li[["n_system_tokens", "attn_system_uniform"]].to_numpy(float))


@pytest.mark.parametrize("k, which", [(5, "small"), (3, "small"), (5, "prefixed")])
def test_recent_tokens_panel_draws_attention_layers_and_names_k(request, tmp_path, k, which):
    import shutil

    small = request.getfixturevalue(which)
    d = tmp_path / "r"
    shutil.copytree(small, d)
    prov = json.loads((d / "provenance.json").read_text())
    prov["metrics"]["recent_k"] = k  # what `metrics --recent-k` records
    (d / "provenance.json").write_text(json.dumps(prov))
    al = _system_only(pd.read_parquet(d / "attention_layers.parquet"))
    fig = figure(d, "attention-regions")
    ax = _axis(fig, "→ recent")
    assert ax.get_title() == f"→ recent (last {k})"
    variant, baseline, uniform = ax.lines[:3]
    for line, role in ((variant, "variant"), (baseline, "baseline")):
        want = _user_mean(al[al.role == role], ["layer"], "recent_mass")
        np.testing.assert_array_equal(line.get_xdata(), want.index.to_numpy())
        np.testing.assert_allclose(line.get_ydata(), want.to_numpy(), rtol=RTOL)
    want = al[al.role == "variant"].groupby("layer")["recent_uniform"].mean()
    np.testing.assert_allclose(uniform.get_ydata(), want.to_numpy(), rtol=RTOL)
    # beside the template regions: the system panel from attention_regions at scope `last`
    ar = _system_only(pd.read_parquet(d / "attention_regions.parquet"))
    sys_ = ar[(ar.scope == "last") & (ar.region == "system") & (ar.uniform != 0)]
    ax = _axis(fig, "→ system")
    np.testing.assert_allclose(ax.lines[0].get_ydata(), _user_mean(sys_[sys_.role == "variant"], ["layer"], "mass"),
                               rtol=RTOL)


def test_placement_figure_draws_both_placements_and_their_paired_differences(small):
    pl = pd.read_parquet(small / "placement_layers.parquet")
    pc = pd.read_parquet(small / "placement_compare.parquet")
    comp = json.loads((small / "summary.json").read_text())["impact_component"]
    matches = list(dict.fromkeys(zip(pc.system_prompt, pc.prefix)))
    assert len(matches) == 2
    fig = figure(small, "placement")
    ax = _axis(fig, "relative change of")
    # one solid line per instruction as a system prompt, one dashed as a prefix, side by side
    lines = [ln for ln in ax.lines if len(ln.get_xdata())]
    assert len(lines) == 2 * len(matches)
    for (sys_name, pre_name), solid, dashed in zip(matches, lines[::2], lines[1::2]):
        for line, label, style in ((solid, sys_name, "-"), (dashed, f"prefix:{pre_name}", "--")):
            want = pl[(pl.system == label) & (pl.component == comp)].sort_values("layer")
            assert line.get_linestyle() == style
            np.testing.assert_allclose(line.get_ydata(), want["mean"], rtol=RTOL)
    # prefix − system per measure, each point with its interval
    for part, measure in (("next-token KL", "kl"), ("top-1 change rate", "top1_changed"),
                          ("depth of the change", f"depth:{comp}"), ("onset, suffix patching", "onset:patching_suffix"),
                          ("knockout stops mattering", "stops_mattering:knockout")):
        ax = _axis(fig, part)
        want = pc[pc.measure == measure].set_index(["system_prompt", "prefix"]).loc[matches]
        assert len(ax.containers) == len(matches)
        for k, (cont, (_, r)) in enumerate(zip(ax.containers, want.iterrows())):
            data_line, _, (bars,) = cont.lines
            assert data_line.get_xdata()[0] == pytest.approx(r["diff"], rel=RTOL)
            assert data_line.get_ydata()[0] == k
            (lo, _), (hi, _) = bars.get_segments()[0]
            assert (lo, hi) == (pytest.approx(r.ci_low, rel=1e-9, abs=1e-12), pytest.approx(r.ci_high, rel=1e-9,
                                                                                            abs=1e-12))


def test_tag_figure_shows_keyword_features_next_to_declared_tags(small):
    ti = pd.read_parquet(small / "tag_impact.parquet")
    ti = ti[ti.target == "impact"]
    assert set(ti.source) == {"tag", "keyword"}
    fig = figure(small, "tag-impact")
    ax = _axis(fig, "impact: with tag")
    names = [t.get_text().split("  (")[0] for t in ax.get_yticklabels()]  # "persona (keyword)  (3 vs 9)"
    got = {}
    for cont in ax.containers:
        data_line = cont.lines[0]
        for x, y in zip(data_line.get_xdata(), data_line.get_ydata()):
            got[names[int(y)]] = x
    want = {f"{r.tag} ({r.source})": r["diff"] for _, r in ti.iterrows()}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=RTOL)

"""The report on a fake results directory: every figure present, embedded and written as
PNG + SVG; missing tables become notes; the report stage stays free of torch."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import matplotlib.image as mpimg
import pandas as pd
import pytest

from promptshift.errors import PromptShiftError
from promptshift.report import FIGURE_IDS, ReportError, Results, ResultsError, build_report

from .conftest import (BEHAVIOUR_TABLE_NAMES, CAUSAL_TABLE_NAMES, PLACEMENT_TABLE_NAMES, TABLE_NAMES,
                       make_fake_results)

CAUSAL_FIGURES = ("fig-causal-patching", "fig-causal-continuation", "fig-causal-knockout", "fig-causal-phrases",
                  "fig-causal-steering", "fig-multiturn")
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*data-figure="([^"]+)"')


def _figure_block(html: str, fid: str) -> str:
    start = html.index(f'<figure id="{fid}">')
    return html[start:html.index("</figure>", start)]


def test_every_figure_is_embedded_and_written(built_report, fake_results):
    html = built_report.read_text(encoding="utf-8")
    assert built_report == fake_results / "report.html"
    assert len(FIGURE_IDS) == 21 and len(set(FIGURE_IDS)) == 21
    assert FIGURE_IDS[15:] == CAUSAL_FIGURES  # after the existing ones, in this order
    assert FIGURE_IDS[:2] == ("fig-behaviour", "fig-behaviour-internal")  # drawn in the behaviour section
    assert {"fig-system-layer", "fig-length-output-attention"} <= set(FIGURE_IDS)  # the notebook's views
    assert "fig-placement" in FIGURE_IDS
    from promptshift.vocabulary import PLACEMENT_TABLES

    assert set(PLACEMENT_TABLE_NAMES) == set(PLACEMENT_TABLES)
    assert html.count("<img") == len(FIGURE_IDS)
    found = IMG.findall(html)
    assert [fid for _, fid in found] == list(FIGURE_IDS)
    for b64, fid in found:
        png = base64.b64decode(b64)
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), fid
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.05, fid
        assert f'<figure id="{fid}">' in html
        assert "not available" not in _figure_block(html, fid)
        assert (fake_results / "figures" / f"{fid}.png").read_bytes() == png
        svg = (fake_results / "figures" / f"{fid}.svg").read_text(encoding="utf-8")
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert '<section id="findings">' in html and '<section id="provenance">' in html


SCOPE = re.compile(r'<figcaption><span class="scope">(.*?)</span>')
UNITS = ("crossed bootstrap over system prompts and user prompts", "bootstrap over user prompts",
         "bootstrap over conversations", "SE across user prompts", "no interval")


def test_every_figure_states_its_n_and_resampling_unit(built_report, fake_results):
    """Each caption opens with the figure's sample size and the unit its intervals resample."""
    html = built_report.read_text(encoding="utf-8")
    summary = json.loads((fake_results / "summary.json").read_text())
    design = f"n = {summary['sample']['n_systems']} system prompts × {summary['sample']['n_users']} user prompts"
    for fid in FIGURE_IDS:
        m = SCOPE.search(_figure_block(html, fid))
        assert m, fid
        scope = m.group(1)
        assert scope.startswith("n = ") and any(u in scope for u in UNITS), (fid, scope)
        if not fid.startswith(("fig-causal", "fig-multiturn")):
            assert scope.startswith(design), (fid, scope)
    # alone (a notebook), a figure carries its title, n and unit above it
    from promptshift.report import figure

    fig = figure(fake_results, "length-impact")
    assert fig.get_suptitle().startswith("Does a longer system prompt change more?\n" + design)
    block = _figure_block(html, "fig-component-layer")
    assert "crossed bootstrap over system prompts and user prompts" in SCOPE.search(block).group(1)
    assert "bootstrap over conversations" in SCOPE.search(_figure_block(html, "fig-multiturn")).group(1)


def test_report_is_self_contained(built_report):
    html = built_report.read_text(encoding="utf-8")
    # nothing that a browser would fetch: every src is a data URI, every href an anchor
    assert re.findall(r'\b(?:src|href)="(?!data:|#)[^"]*"', html) == []
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert "http://" not in html and "https://" not in html
    assert "data-images-loaded" in html and "<script>" in html


def test_provenance_and_findings_in_html(built_report, fake_results):
    html = built_report.read_text(encoding="utf-8")
    prov = json.loads((fake_results / "provenance.json").read_text())
    summary = json.loads((fake_results / "summary.json").read_text())
    for value in (prov["model_id"], prov["weights_sha256"], prov["dtype"], prov["device"], prov["sweep"]["name"],
                  prov["baseline"], prov["versions"]["transformers"], prov["metrics"]["versions"]["dask"],
                  prov["plan_hash"]):
        assert value in html
    assert "baseline carries a default system prompt" in html and "yes: the template injects" in html
    assert "1000 resamples over system prompts and user prompts (crossed), seed 0" in html
    layer = summary["most_affected_layer"]["resid_post"]["layer"]
    assert f"<code>resid_post</code> changes most at layer {layer}:" in html


def _all_but(*keep: str) -> tuple[str, ...]:
    return tuple(t for t in TABLE_NAMES + CAUSAL_TABLE_NAMES + PLACEMENT_TABLE_NAMES + BEHAVIOUR_TABLE_NAMES
                 if t not in keep)


def test_missing_tables_become_notes_and_fallbacks_draw(tmp_path):
    # only the per-pair tables: figures that have a fallback aggregate them here (and say
    # so), the others say why they are not available. Few figures keep the test fast.
    d = make_fake_results(tmp_path / "res", omit=_all_but("component_change", "output_change", "length_impact"))
    (d / "figures").mkdir()
    (d / "figures" / "fig-lens.png").write_bytes(b"stale")  # from an earlier run: must not survive
    html = build_report(d, strict=True).read_text(encoding="utf-8")
    drawn = {"fig-component-layer", "fig-component-system", "fig-system-layer", "fig-length-impact",
             "fig-length-output-attention", "fig-internal-output"}
    for fid in FIGURE_IDS:
        block = _figure_block(html, fid)
        if fid in drawn:
            assert "<img" in block and "not available" not in block, fid
            assert (d / "figures" / f"{fid}.png").is_file() and (d / "figures" / f"{fid}.svg").is_file()
        else:
            assert "not available:" in block and "<img" not in block, fid
            assert not (d / "figures" / f"{fid}.png").exists()
    assert html.count("<img") == len(drawn)
    assert "<code>lens_change.parquet</code> is not in" in _figure_block(html, "fig-lens")
    # a fallback says so under its figure
    assert "<code>layer_ranking.parquet</code> is missing" in _figure_block(html, "fig-component-layer")
    assert "<code>internal_vs_output.parquet</code> is missing" in _figure_block(html, "fig-internal-output")
    assert "<code>length_tests.parquet</code> is missing" in _figure_block(html, "fig-length-impact")


def test_empty_and_malformed_tables(tmp_path):
    d = make_fake_results(tmp_path / "res", omit=_all_but("component_change", "tag_impact", "lens_change")
                          + ("summary",))
    cc = pd.read_parquet(d / "component_change.parquet")
    cc.iloc[:0].to_parquet(d / "component_change.parquet")  # empty, with the right columns
    pd.DataFrame({"tag": ["x"]}).to_parquet(d / "tag_impact.parquet")  # wrong columns
    lens = pd.read_parquet(d / "lens_change.parquet")
    lens.loc[lens.index % 3 == 0, "kl_lens"] = float("nan")  # undefined values are dropped, not plotted as 0
    lens.to_parquet(d / "lens_change.parquet")
    html = build_report(d, strict=True).read_text(encoding="utf-8")
    assert "<code>component_change.parquet</code> is empty" in _figure_block(html, "fig-component-system")
    assert "lacks column(s) ci_low, ci_high, diff" in _figure_block(html, "fig-tag-impact")
    assert "not available: <code>summary.json</code> is missing" in html
    assert "<img" in _figure_block(html, "fig-lens") and html.count("<img") == 1


def test_empty_results_dir_gives_a_report_of_notes(tmp_path):
    out = build_report(tmp_path, tmp_path / "sub" / "r.html", strict=True)
    html = out.read_text(encoding="utf-8")
    assert out == tmp_path / "sub" / "r.html"
    assert "<img" not in html
    assert html.count("not available:") == len(FIGURE_IDS) + 3  # + findings + behaviour + provenance


def test_unusable_inputs_raise_typed_errors(tmp_path):
    with pytest.raises(ResultsError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ResultsError, match="is a file"):
        build_report(tmp_path / "f.txt")
    with pytest.raises(ReportError, match="must end in .html"):
        build_report(tmp_path, tmp_path / "report.pdf")
    assert issubclass(ReportError, PromptShiftError) and issubclass(ResultsError, PromptShiftError)


def test_provenance_flat_or_nested_reads_the_same(tmp_path):
    from promptshift.report.tables import flat_provenance, system_info

    d = make_fake_results(tmp_path / "res", omit=TABLE_NAMES, causal=False)
    doc = json.loads((d / "provenance.json").read_text())  # the form docs/RESULTS.md describes
    extras = {k: doc[k] for k in ("plan_hash", "plan_meta", "store_path", "metrics")}
    store = {k: v for k, v in doc.items() if k not in extras}
    nested = {"store": store, **extras}  # the store's provenance under `store`: an earlier form
    flat = flat_provenance(doc)
    assert flat == flat_provenance(nested)
    assert flat["model_id"] == store["model_id"] and flat["metrics_seed"] == 0 and "plan_meta" not in flat
    assert flat_provenance(store) == store  # a bare copy of the store's provenance passes through
    info = system_info(flat)  # length families come from the sweep when a table lacks them
    assert set(info.loc[info["family"] == "concise", "level"]) == {"short", "medium", "long"}
    (d / "provenance.json").write_text(json.dumps(nested))
    html = build_report(d, strict=True).read_text(encoding="utf-8")
    assert store["weights_sha256"] in html and "versions (metrics)" in html and "plan_meta" not in html


def test_results_reads_csv_when_parquet_is_missing(tmp_path):
    d = make_fake_results(tmp_path / "res", csv=True)
    (d / "output_change.parquet").unlink()
    res = Results(d)
    assert len(res.table("output_change", ["pair", "kl"])) == len(pd.read_csv(d / "output_change.csv"))


def test_report_imports_no_torch_and_errors_in_one_line(tmp_path):
    # one interpreter for both checks: importing pandas/matplotlib/seaborn costs seconds
    code = (
        "import sys, promptshift.report\n"
        "bad = [m for m in ('torch', 'transformers', 'accelerate', 'dask', 'zarr') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "from promptshift.report.__main__ import main\n"
        f"sys.exit(main([{str(tmp_path / 'missing')!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().startswith("error: results directory") and "Traceback" not in r.stderr


def test_causal_figures_mark_the_summary_and_say_how_they_were_cut(built_report):
    html = built_report.read_text(encoding="utf-8")
    # the onsets and the knockout layer of summary.json are in the legends (SVG text), the phrase cut is a note
    summary = json.loads((built_report.parent / "summary.json").read_text())["causal"]
    svg = (built_report.parent / "figures" / "fig-causal-patching.svg").read_text(encoding="utf-8")
    for mode in ("suffix", "last"):
        assert f"{mode}: onset at site {summary['patching']['modes'][mode]['onset']['site']}" in svg
    svg = (built_report.parent / "figures" / "fig-causal-knockout.svg").read_text(encoding="utf-8")
    assert f"stops mattering from layer {summary['knockout']['stops_mattering']['site']}" in svg
    assert "6 of the 20 system prompts split into more than one phrase are shown" in \
        _figure_block(html, "fig-causal-phrases")
    assert "site l = input of layer l" in html and "Activation patching" in html


def test_results_without_causal_tables_get_notes_for_the_causal_figures(tmp_path):
    # a store without `promptshift causal`: no causal tables, no `causal` in summary.json
    d = make_fake_results(tmp_path / "res", causal=False, omit=_all_but("lens_change"))
    assert "causal" not in json.loads((d / "summary.json").read_text())
    html = build_report(d, strict=True).read_text(encoding="utf-8")
    expected = {"fig-causal-patching": "causal_patching_curve", "fig-causal-knockout": "causal_knockout_curve",
                "fig-causal-phrases": "causal_phrase_rank", "fig-causal-steering": "causal_steering_curve",
                "fig-multiturn": "multiturn_turns"}
    for fid, table in expected.items():
        block = _figure_block(html, fid)
        assert f"not available: <code>{table}.parquet</code> is not in" in block and "<img" not in block, fid
        assert not (d / "figures" / f"{fid}.png").exists()
    assert "<img" in _figure_block(html, "fig-lens") and html.count("<img") == 1
    start = html.index('<section id="findings">')
    found = html[start:html.index("</section>", start)]
    assert "<li>" in found  # the other findings are there,
    assert "Activation patching" not in found and "Multi-turn" not in found  # the causal ones are not


def test_causal_figures_without_summary_section_or_with_one_phrase_prompts(tmp_path):
    d = make_fake_results(tmp_path / "res", n_systems=4, n_layers=5,
                          omit=_all_but("causal_patching_curve", "causal_knockout_curve", "causal_phrase_rank",
                                        "causal_steering_curve", "causal_steering_norms", "multiturn_turns"))
    summary = json.loads((d / "summary.json").read_text())
    del summary["causal"]  # tables from the causal analyses, summary from an older metrics run
    (d / "summary.json").write_text(json.dumps(summary))
    rank = pd.read_parquet(d / "causal_phrase_rank.parquet")
    rank[rank["n_phrases"] == 1].to_parquet(d / "causal_phrase_rank.parquet")  # no prompt split into phrases
    turns = pd.read_parquet(d / "multiturn_turns.parquet")
    turns.drop(columns=["sys_mass", "sys_mass_ci_low", "sys_mass_ci_high"]).to_parquet(d / "multiturn_turns.parquet")
    html = build_report(d, strict=True).read_text(encoding="utf-8")
    for fid in ("fig-causal-patching", "fig-causal-knockout", "fig-causal-steering", "fig-multiturn"):
        assert "<img" in _figure_block(html, fid), fid
    assert "has no <code>causal.patching</code> section" in _figure_block(html, "fig-causal-patching")
    assert "has no <code>causal.knockout.stops_mattering</code>" in _figure_block(html, "fig-causal-knockout")
    assert "no system prompt in <code>causal_phrase_rank.parquet</code> has more than one phrase" in \
        _figure_block(html, "fig-causal-phrases")

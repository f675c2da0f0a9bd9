"""`build_report`: results directory -> figures/ (PNG + SVG) and one self-contained report.html.

The HTML carries everything inline (CSS, base64 PNGs, a few lines of JS), so it opens
offline, can be mailed or attached to a ticket, and makes no network request. Each figure
is drawn independently: a missing table, or a figure that fails, puts a "not available"
note in its place and the rest of the report is still written.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from promptshift.report.behaviour import BEHAVIOUR_FIGURES, behaviour_section
from promptshift.report.figures import FIGURES, FigureSpec
from promptshift.report.findings import findings
from promptshift.report.style import RC
from promptshift.report.tables import ReportError
from promptshift.results import NotAvailable, Results

# PNG/SVG metadata without dates: the same tables give the same files.
_PNG_META = {"Software": "promptshift"}
_SVG_META = {"Date": None, "Creator": "promptshift"}


@dataclass
class ReportConfig:
    """Settings of the report stage.

    `strict` re-raises an unexpected error in a figure instead of writing a note: the tests
    use it so a bug cannot hide behind "not available".
    """

    results_dir: Path
    out_html: Path | None = None
    dpi: int = 130
    strict: bool = False

    def __post_init__(self):
        self.results_dir = Path(self.results_dir)
        self.out_html = Path(self.out_html) if self.out_html is not None else self.results_dir / "report.html"
        if not isinstance(self.dpi, int) or not 50 <= self.dpi <= 600:
            raise ReportError(f"`dpi` must be an integer between 50 and 600, got {self.dpi!r}")
        if self.out_html.suffix.lower() not in (".html", ".htm"):
            raise ReportError(f"`out_html` must end in .html, got {self.out_html}")


@dataclass
class DrawnFigure:
    """One figure of the report as drawn: its PNG, or why it is missing, and its notes."""

    spec: FigureSpec
    png: bytes | None = None
    width_px: int = 0  # CSS width at 96 px per inch, the figure's intended size
    missing: str | None = None  # why the figure is not available
    notes: tuple[str, ...] = ()  # said under the figure, e.g. that a fallback was used
    scope: str | None = None  # n and the resampling unit, said first in the caption


def build_report(results_dir: str | Path, out_html: str | Path | None = None, *, dpi: int = 130,
                 strict: bool = False) -> Path:
    """Write `report.html` (default `results_dir/report.html`) and `results_dir/figures/*.{png,svg}`.

    Returns the path of the HTML file. Raises ReportError only when the results directory
    itself is unusable; anything missing inside it becomes a note in the report.
    """
    cfg = ReportConfig(Path(results_dir), Path(out_html) if out_html is not None else None, dpi, strict)
    res = Results(cfg.results_dir)
    fig_dir = cfg.results_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rendered = [_render(spec, res, fig_dir, cfg) for spec in FIGURES]
    page = render_html(res, rendered, cfg)
    cfg.out_html.parent.mkdir(parents=True, exist_ok=True)
    cfg.out_html.write_text(page, encoding="utf-8")
    return cfg.out_html


def figure(results, name: str):
    """One figure of the report as a matplotlib Figure (notebooks show it inline).

    ``results``: a results directory or :class:`Results`; ``name``: a figure id of
    ``promptshift.report.FIGURE_IDS``, with or without its ``fig-`` prefix. Raises
    NotAvailable (saying what is missing) when the results cannot give it, KeyError for an
    unknown name. Outside the report there is no caption, so the figure's title and its
    n and resampling unit are drawn above it."""
    res = results if isinstance(results, Results) else Results(results)
    want = name if name.startswith("fig-") else f"fig-{name}"
    spec = next((f for f in FIGURES if f.id == want), None)
    if spec is None:
        raise KeyError(f"no figure {name!r}; figures: {', '.join(f.id for f in FIGURES)}")
    with matplotlib.rc_context(RC):
        fig = spec.draw(res)
        scope = getattr(fig, "promptshift_scope", None)
        fig.suptitle(spec.title + (f"\n{scope}" if scope else ""), fontsize=9.5)
        return fig


def _render(spec: FigureSpec, res: Results, fig_dir: Path, cfg: ReportConfig) -> DrawnFigure:
    for stale in (fig_dir / f"{spec.id}.png", fig_dir / f"{spec.id}.svg"):
        stale.unlink(missing_ok=True)  # a figure that is no longer available must not linger from a past run
    try:
        with matplotlib.rc_context(RC), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tight/constrained-layout chatter on tiny tables
            fig = spec.draw(res)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=cfg.dpi, metadata=_PNG_META)
            fig.set_layout_engine("none")  # keep the layout just computed: the SVG need not solve it again
            fig.savefig(fig_dir / f"{spec.id}.svg", format="svg", metadata=_SVG_META)
            width = int(round(fig.get_figwidth() * 96))
            notes = tuple(getattr(fig, "promptshift_notes", ()))
            scope = getattr(fig, "promptshift_scope", None)
    except NotAvailable as e:
        return DrawnFigure(spec, missing=str(e))
    except Exception as e:  # noqa: BLE001 - one broken figure must not cost the whole report
        if cfg.strict:
            raise
        return DrawnFigure(spec, missing=f"the figure failed to draw ({type(e).__name__}: {e}); "
                                      "this is a bug in promptshift.report, please report it")
    png = buf.getvalue()
    (fig_dir / f"{spec.id}.png").write_bytes(png)
    return DrawnFigure(spec, png=png, width_px=width, notes=notes, scope=scope)


# ---------------------------------------------------------------------------------------
# HTML


def _md(text: str) -> str:
    """Escape, then turn `name` into <code>name</code> (the findings quote table names so)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


_CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#e3e3e3; --accent:#0072B2; --warn:#b35c00; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.55 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color:var(--fg); background:#fafafa; }
main { max-width:1240px; margin:0 auto; padding:28px 32px 60px; background:#fff; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:20px; margin:36px 0 12px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h3 { font-size:16px; margin:0 0 8px; }
.sub { color:var(--muted); margin:0 0 18px; }
nav ol { columns:2; margin:6px 0 0; padding-left:22px; }
nav a, a { color:var(--accent); text-decoration:none; }
ul.findings li { margin:6px 0; }
code { font-family:"DejaVu Sans Mono", Menlo, Consolas, monospace; font-size:0.9em; background:#f3f3f3;
       padding:1px 4px; border-radius:3px; word-break:break-all; }
figure { margin:26px 0 34px; padding:18px 18px 14px; border:1px solid var(--line); border-radius:8px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto 10px; }
figcaption { color:#333; font-size:14px; max-width:1000px; }
.na { padding:14px 16px; background:#fff6ec; border-left:4px solid var(--warn); color:#6b3a00; border-radius:4px; }
.fignote { color:var(--warn); margin:6px 0 0; }
.scope { font-weight:600; }
.warn { padding:10px 14px; background:#fff6ec; border-left:4px solid var(--warn); margin:10px 0; }
table.prov { border-collapse:collapse; width:100%; font-size:14px; }
table.prov th { text-align:left; width:240px; color:var(--muted); font-weight:600; vertical-align:top; }
table.prov th, table.prov td { padding:6px 10px; border-bottom:1px solid var(--line); }
table.behaviour { font-size:12px; }
table.behaviour th { width:auto; vertical-align:bottom; }
table.behaviour th, table.behaviour td { padding:4px 6px; white-space:nowrap; }
footer { margin-top:40px; color:var(--muted); font-size:13px; }
"""

# Sets data-images-loaded="N/M" on <body> once the page has loaded: how many of the M
# images decoded to a real size. The headless-browser test reads it back from the DOM.
_JS = """
(function () {
  function check() {
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
    }
    document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  }
  if (document.readyState === 'complete') { check(); } else { window.addEventListener('load', check); }
})();
"""


def _provenance_rows(prov: dict) -> list[tuple[str, str]]:
    sweep = prov.get("sweep") if isinstance(prov.get("sweep"), dict) else {}
    rows: list[tuple[str, str]] = []

    def add(label, value):
        if value not in (None, "", {}, []):
            rows.append((label, str(value)))

    add("model", prov.get("model_id"))
    if prov.get("model_source") or prov.get("model_location"):
        add("model source", " · ".join(str(v) for v in (prov.get("model_source"), prov.get("model_location")) if v))
    add("model type", prov.get("model_type"))
    add("weights sha256", prov.get("weights_sha256"))
    add("compute dtype", prov.get("dtype"))
    add("storage dtype", prov.get("storage_dtype"))
    add("device", prov.get("device"))
    add("attention", prov.get("attn_implementation"))
    add("chat template sha256", prov.get("chat_template_sha256"))
    add("sweep", sweep.get("name"))
    if sweep.get("system_prompts") is not None or sweep.get("user_prompts") is not None:
        add("sweep size", f"{len(sweep.get('system_prompts') or [])} system prompts × "
                          f"{len(sweep.get('user_prompts') or [])} user prompts")
    add("baseline", prov.get("baseline") or sweep.get("baseline"))
    carries = prov.get("baseline_carries_default")
    if carries is not None:
        text = "yes" if carries else "no"
        if carries and prov.get("injected_system"):
            text += f": the template injects {prov['injected_system']!r}"
        rows.append(("baseline carries a default system prompt", text))
    for key, label in (("versions", "versions (extract)"), ("metrics_versions", "versions (metrics)")):
        versions = prov.get(key)
        if isinstance(versions, dict) and versions:
            add(label, ", ".join(f"{k} {v}" for k, v in versions.items()))
    if prov.get("metrics_n_boot") is not None:
        unit = ("system prompts and user prompts (crossed)" if prov.get("metrics_resampling") == "crossed"
                else "user prompts")
        add("bootstrap", f"{prov['metrics_n_boot']} resamples over {unit}, seed {prov.get('metrics_seed')}")
    add("impact component", prov.get("metrics_impact_component"))
    shown = {"model_id", "model_source", "model_location", "model_type", "weights_sha256", "dtype", "storage_dtype",
             "device", "attn_implementation", "chat_template_sha256", "baseline", "baseline_carries_default",
             "injected_system", "versions", "sweep", "metrics_versions", "metrics_n_boot", "metrics_seed",
             "metrics_resampling",
             "metrics_impact_component"}
    for k in sorted(set(prov) - shown):
        v = prov[k]
        add(k.replace("_", " "), v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)[:400])
    return rows


def render_html(res: Results, rendered: list[DrawnFigure], cfg: ReportConfig) -> str:
    summary, prov = res.summary, res.provenance
    sweep = prov.get("sweep") if isinstance(prov.get("sweep"), dict) else {}
    model = prov.get("model_id") or summary.get("model") or "unknown model"
    sweep_name = sweep.get("name")
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="promptshift.report">',
        f'<meta name="promptshift-report-config" content="{e(json.dumps(_config_dict(cfg)))}">',
        f"<title>promptshift report: {e(str(sweep_name or cfg.results_dir.name))} on {e(str(model))}</title>",
        f"<style>{_CSS}</style>", "</head>", '<body data-images-loaded="pending">', "<main>",
        "<header>", "<h1>Why does the system prompt change what the model does?</h1>",
    ]
    sub = [f"model <b>{e(str(model))}</b>"] + ([f"sweep <b>{e(str(sweep_name))}</b>"] if sweep_name else [])
    if isinstance(summary.get("n_pairs"), int):
        sub.append(f"{summary['n_pairs']} pairs")
    if prov.get("baseline"):
        sub.append(f"baseline <code>{e(str(prov['baseline']))}</code>")
    parts.append(f'<p class="sub">{" · ".join(sub)}</p>')
    parts.append("</header>")
    for w in res.warnings:
        parts.append(f'<div class="warn">{_md(w)}</div>')

    parts.append('<nav><b>Contents</b><ol><li><a href="#findings">Findings</a></li>'
                 '<li><a href="#behaviour">Behaviour</a></li>')
    for r in rendered:
        parts.append(f'<li><a href="#{r.spec.id}">{e(r.spec.title)}</a>'
                     + (" <small>(not available)</small>" if r.png is None else "") + "</li>")
    parts.append('<li><a href="#provenance">Provenance</a></li></ol></nav>')

    parts.append('<section id="findings"><h2>Findings</h2>')
    lines = findings(summary)
    if lines:
        parts.append('<ul class="findings">' + "".join(f"<li>{_md(s)}</li>" for s in lines) + "</ul>")
        parts.append('<p class="sub">Every sentence and number above is generated from <code>summary.json</code>.</p>')
    else:
        parts.append('<div class="na">not available: <code>summary.json</code> is missing or holds no findings</div>')
    parts.append("</section>")
    blocks = {r.spec.id: _figure_html(i, r) for i, r in enumerate(rendered, 1)}
    parts.append(behaviour_section(res, blocks))  # takes the behaviour figures

    parts.append('<section id="figures"><h2>Figures</h2>')
    parts.extend(blocks[r.spec.id] for r in rendered if r.spec.id not in BEHAVIOUR_FIGURES)
    parts.append("</section>")

    parts.append('<section id="provenance"><h2>Provenance</h2>')
    rows = _provenance_rows(prov)
    if rows:
        parts.append('<table class="prov">' + "".join(
            f"<tr><th>{e(k)}</th><td>{_prov_value(k, v)}</td></tr>" for k, v in rows) + "</table>")
    else:
        parts.append('<div class="na">not available: <code>provenance.json</code> is missing or empty</div>')
    parts.append("</section>")

    parts.append(f'<footer>Generated by <code>promptshift.report</code> from <code>{e(str(cfg.results_dir))}</code>. '
                 f'Figures as PNG and SVG: <code>{e(str(cfg.results_dir / "figures"))}</code>.</footer>')
    parts.append("</main>")
    parts.append(f"<script>{_JS}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _figure_html(i: int, r: DrawnFigure) -> str:
    """One `<figure>`: number and title, the PNG inline (or why it is not available), the
    caption headed by the figure's n and resampling unit, and its notes."""
    e = html.escape
    parts = [f'<figure id="{r.spec.id}"><h3>{i}. {e(r.spec.title)}</h3>']
    if r.png is None:
        parts.append(f'<div class="na">not available: {_md(r.missing or "unknown reason")}</div>')
    else:
        b64 = base64.b64encode(r.png).decode("ascii")
        parts.append(f'<img src="data:image/png;base64,{b64}" alt="{e(r.spec.title)}" '
                     f'style="width:{r.width_px}px" data-figure="{r.spec.id}">')
    notes = "".join(f'<p class="fignote">Note: {_md(n)}</p>' for n in r.notes)
    scope = f'<span class="scope">{_md(r.scope)}.</span> ' if r.scope else ""
    parts.append(f"<figcaption>{scope}{_md(r.spec.caption)}{notes}</figcaption></figure>")
    return "\n".join(parts)


def _config_dict(cfg: ReportConfig) -> dict:
    """The stage config, saved inside the output it produced (STYLE.md 2)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def _prov_value(key: str, value: str) -> str:
    if "sha256" in key or key in ("baseline",):
        return f"<code>{html.escape(value)}</code>"
    return html.escape(value)

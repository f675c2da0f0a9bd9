"""Report stage: results tables -> figures and one self-contained HTML report.

Reads only the results directory written by `promptshift metrics` (docs/RESULTS.md) and
imports only pandas, numpy, matplotlib and seaborn, so it runs where there is no model,
no GPU and no torch.
"""

from pathlib import Path

from promptshift.report.build import ReportConfig, build_report, figure, render_html
from promptshift.report.figures import FIGURES, FigureSpec
from promptshift.report.findings import findings
from promptshift.report.tables import ReportError
from promptshift.results import NotAvailable, Results, ResultsError
from promptshift.stage import callable_stage

FIGURE_IDS = tuple(f.id for f in FIGURES)

__all__ = ["FIGURES", "FIGURE_IDS", "FigureSpec", "NotAvailable", "ReportConfig", "ReportError", "Results", "ResultsError",
           "build_report", "figure", "findings", "render_html", "report"]


def report(results, out: str | Path | None = None) -> Path:
    """Figures and one self-contained HTML report from a results directory (or
    :class:`Results`, whose ``.report`` it sets); returns the HTML path (default
    ``RESULTS/report.html``). Calling the subpackage, ``promptshift.report(...)``, runs this."""
    html = Path(build_report(results.dir if isinstance(results, Results) else results, out))
    if isinstance(results, Results):
        results.report = html
    return html


callable_stage(__name__)  # promptshift.report(...) runs report(...)

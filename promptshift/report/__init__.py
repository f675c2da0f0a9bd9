"""Report stage: results tables -> figures and one self-contained HTML report.

Reads only the results directory written by `promptshift metrics` (docs/RESULTS.md) and
imports only pandas, numpy, matplotlib and seaborn, so it runs where there is no model,
no GPU and no torch.
"""

from promptshift.report.build import ReportConfig, build_report, figure, render_html
from promptshift.report.figures import FIGURES, FigureSpec
from promptshift.report.findings import findings
from promptshift.report.tables import NotAvailable, ReportError, Results

FIGURE_IDS = tuple(f.id for f in FIGURES)

__all__ = ["FIGURES", "FIGURE_IDS", "FigureSpec", "NotAvailable", "ReportConfig", "ReportError", "Results",
           "build_report", "figure", "findings", "render_html"]


# `promptshift.report(...)` runs the stage (promptshift.api.report); the subpackage stays as it is
from promptshift.stage import callable_stage  # noqa: E402

callable_stage(__name__)

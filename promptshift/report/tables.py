"""Helpers the figures use to pick rows and columns from the results tables.

The results directory itself is read by :class:`promptshift.results.Results` (re-exported
here with :class:`NotAvailable`, which a figure raises with a sentence the report prints in
its place, so the report never crashes on a partial results directory).
"""

from __future__ import annotations

import pandas as pd

from promptshift.errors import PromptShiftError
from promptshift.results import CONTROL, NotAvailable, Results, ResultsError, flat_provenance, without_prefixes


class ReportError(PromptShiftError):
    """The report's own options are unusable (dpi, output path)."""


def pick(df: pd.DataFrame, candidates: tuple[str, ...], table: str, what: str) -> str:
    """The first of `candidates` that is a column of `df`.

    Used where docs/RESULTS.md names a quantity but not its column (e.g. the position bin
    of `position_change`), so the report keeps working whichever spelling metrics chose.
    """
    for c in candidates:
        if c in df.columns:
            return c
    raise NotAvailable(f"`{table}.parquet` has no {what} column (looked for {', '.join(candidates)}; "
                       f"has: {', '.join(map(str, df.columns))})")


def not_control(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of real pairs: control rows carry `is_control`, `system == "__control__"` or `pair < 0`."""
    keep = pd.Series(True, index=df.index)
    if "is_control" in df.columns:
        keep &= ~df["is_control"].fillna(False).astype(bool)
    if "system" in df.columns:
        keep &= df["system"].astype(str) != CONTROL
    if "pair" in df.columns:
        keep &= pd.to_numeric(df["pair"], errors="coerce").fillna(0) >= 0
    return df[keep]


def only_control(df: pd.DataFrame) -> pd.DataFrame:
    keep = pd.Series(False, index=df.index)
    if "is_control" in df.columns:
        keep |= df["is_control"].fillna(False).astype(bool)
    if "system" in df.columns:
        keep |= df["system"].astype(str) == CONTROL
    return df[keep]


def at_position(df: pd.DataFrame, position: str = "last") -> pd.DataFrame:
    """Rows at `position` when the table has a `position` column (tables without one hold `last` only)."""
    if "position" in df.columns:
        return df[df["position"].astype(str) == position]
    return df


def system_info(provenance: dict) -> pd.DataFrame:
    """Per system prompt from the resolved sweep in provenance: tags, family, level, text.

    The length-family of a system prompt is a property of the sweep, not a measurement,
    so it is read from the sweep when the results table does not carry it.
    """
    sweep = provenance.get("sweep") or {}
    rows = []
    for s in sweep.get("system_prompts") or []:
        if isinstance(s, dict) and "name" in s:
            rows.append(dict(system=str(s["name"]), family=s.get("family"), level=s.get("level"),
                             tags=tuple(s.get("tags") or ()), text=s.get("text", "")))
    return pd.DataFrame(rows, columns=["system", "family", "level", "tags", "text"])


__all__ = ["CONTROL", "NotAvailable", "ReportError", "Results", "ResultsError", "at_position", "flat_provenance",
           "not_control", "only_control", "pick", "system_info", "without_prefixes"]

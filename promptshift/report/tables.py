"""Reading the results directory written by `promptshift metrics` (docs/RESULTS.md).

Every figure asks for the tables and columns it needs through :class:`Results`; a missing
file, an empty table or a missing column raises :class:`NotAvailable` with a sentence the
report prints in place of the figure. The report never crashes on a partial results
directory: a sweep without attention or without generation still gets the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from promptshift.errors import PromptShiftError

CONTROL = "__control__"

# Table names are the file stems in the results directory (docs/RESULTS.md).
TABLES = (
    "component_change", "attention_regions", "attention_heads", "attention_layers", "attention_change",
    "output_change", "lens_change", "layer_ranking", "length_impact", "length_tests", "tag_impact",
    "position_change", "internal_vs_output",
)

# Written by the metrics stage only when the sweep has instruction prefixes.
PLACEMENT_TABLES = ("placement_layers", "placement_compare", "placement_causal")

# Written by the metrics stage only when the store holds the causal analyses
# (`promptshift causal`); a results directory without them gets notes for their figures.
CAUSAL_TABLES = (
    "causal_patching", "causal_patching_curve", "causal_knockout", "causal_knockout_curve", "causal_steering",
    "causal_steering_curve", "causal_steering_norms", "causal_phrases", "causal_phrase_rank", "causal_tokens",
    "multiturn", "multiturn_attention", "multiturn_turns", "causal_continuation", "causal_continuation_curve",
)


# Per-pair and per-prompt tables: with instruction prefixes they also hold the prefix pairs
# (`placement == "prefix"`; per-prompt tables label a prefix variant's `system` as
# `prefix:<name>`). The system-prompt figures read them without those rows, as the metrics
# analyses and summary.json do; the prefixes are compared in fig-placement.
PAIR_TABLES = ("component_change", "attention_change", "output_change", "lens_change", "attention_regions",
               "attention_heads", "attention_layers")
PREFIX_LABEL = "prefix:"


def without_prefixes(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of system-prompt pairs (and of their variant and baseline prompts) only."""
    if "placement" in df.columns:
        return df[df["placement"].astype(str) != "prefix"]
    if {"role", "system"} <= set(df.columns):
        return df[~((df["role"].astype(str) == "variant") & df["system"].astype(str).str.startswith(PREFIX_LABEL))]
    return df


class ReportError(PromptShiftError):
    """The results directory cannot be reported on at all (it does not exist, or is not a folder)."""


class NotAvailable(Exception):
    """One figure cannot be drawn; the message is shown in the report in its place."""


class Results:
    """Lazy, cached access to one results directory (what ``promptshift.metrics`` returns).

    ``.tables`` (every table as a DataFrame), ``results["name"]``, ``.table(name, columns)``
    (raises NotAvailable naming what is missing), ``.summary`` (``summary.json``),
    ``.provenance``, ``.report`` (the HTML report, once drawn).

    Parquet is read first; the CSV copy is the fallback so that a directory that was
    copied around as CSV only still gets a report.
    """

    def __init__(self, results_dir: str | Path):
        self.dir = Path(results_dir)
        if not self.dir.exists():
            raise ReportError(f"results directory {self.dir} does not exist; run `promptshift metrics STORE --out "
                              f"{self.dir}` first")
        if not self.dir.is_dir():
            raise ReportError(f"{self.dir} is a file; pass the results directory written by `promptshift metrics`")
        self._cache: dict[str, pd.DataFrame | None] = {}
        self._json: dict[str, dict] = {}
        self._report: Path | None = None
        self.warnings: list[str] = []

    # -- tables ---------------------------------------------------------------------------
    def raw(self, name: str) -> pd.DataFrame | None:
        """The table, or None when neither `name.parquet` nor `name.csv` exists."""
        if name not in self._cache:
            pq, csv = self.dir / f"{name}.parquet", self.dir / f"{name}.csv"
            if pq.is_file():
                df = pd.read_parquet(pq)
            elif csv.is_file():
                df = pd.read_csv(csv)
            else:
                df = None
            self._cache[name] = df
        return self._cache[name]

    def table(self, name: str, columns: tuple[str, ...] | list[str] = (),
              finite: tuple[str, ...] | list[str] = (), prefixes: bool = False) -> pd.DataFrame:
        """The table with at least `columns`, without the rows where a `finite` column is NaN
        or infinite (an undefined metric, e.g. a relative change against a zero norm), and,
        for the per-pair and per-prompt tables (PAIR_TABLES), without instruction-prefix
        pairs unless `prefixes`; raises NotAvailable saying what is missing."""
        df = self.raw(name)
        if df is None:
            raise NotAvailable(f"`{name}.parquet` is not in {self.dir.name}/ (the metrics stage did not write it)")
        if name in PAIR_TABLES and not prefixes:
            df = without_prefixes(df)
        if df.empty:
            raise NotAvailable(f"`{name}.parquet` is empty")
        missing = [c for c in (*columns, *finite) if c not in df.columns]
        if missing:
            raise NotAvailable(f"`{name}.parquet` lacks column(s) {', '.join(dict.fromkeys(missing))} "
                               f"(has: {', '.join(map(str, df.columns))})")
        if finite:
            ok = np.logical_and.reduce([np.isfinite(pd.to_numeric(df[c], errors="coerce").astype(float))
                                        for c in finite])
            df = df[ok]
            if df.empty:
                raise NotAvailable(f"`{name}.parquet` has no finite values of {', '.join(finite)}")
        return df

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the directory (docs/RESULTS.md), by name, read on first access."""
        names = [n for n in (*TABLES, *CAUSAL_TABLES) if self.raw(n) is not None]
        extra = sorted(p.stem for p in self.dir.glob("*.parquet") if p.stem not in names)
        return {n: self.raw(n) for n in (*names, *extra)}

    def __getitem__(self, name: str) -> pd.DataFrame:
        df = self.raw(name)
        if df is None:
            raise KeyError(f"no table {name!r} in {self.dir}")
        return df

    @property
    def report(self) -> Path | None:
        """The HTML report of these results: the one drawn from them in this session
        (``promptshift.report``/``run`` set it), else ``report.html`` in the directory."""
        if self._report is not None:
            return self._report
        p = self.dir / "report.html"
        return p if p.is_file() else None

    @report.setter
    def report(self, path: str | Path | None) -> None:
        self._report = None if path is None else Path(path)

    def __repr__(self) -> str:
        return f"Results({str(self.dir)!r})"

    def has(self, name: str) -> bool:
        df = self.raw(name)
        return df is not None and not df.empty

    # -- json -----------------------------------------------------------------------------
    def json(self, name: str) -> dict:
        """`name.json` as a dict; {} (and a warning in the report) when absent or unreadable."""
        if name not in self._json:
            path = self.dir / f"{name}.json"
            data: dict = {}
            if not path.is_file():
                self.warnings.append(f"`{name}.json` is not in {self.dir.name}/")
            else:
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    self.warnings.append(f"`{name}.json` is not valid JSON ({e})")
                if not isinstance(data, dict):
                    self.warnings.append(f"`{name}.json` holds a {type(data).__name__}, not an object")
                    data = {}
            self._json[name] = data
        return self._json[name]

    @property
    def summary(self) -> dict:
        return self.json("summary")

    @property
    def provenance(self) -> dict:
        return flat_provenance(self.json("provenance"))


def flat_provenance(prov: dict) -> dict:
    """The store's provenance as one flat dict, whichever form provenance.json has.

    docs/RESULTS.md: the store's provenance (model_id, dtype, sweep, versions, ...) at the
    top level, plus `plan_hash`, `plan_meta`, `store_path` and `metrics` (n_boot, seed,
    versions, ...). A file with the store's provenance nested under `store` (an earlier
    form) reads the same. What metrics adds is flattened to `metrics_<key>`; the baseline
    fields fall back to `plan_meta` when the store's provenance lacks them.
    """
    if not isinstance(prov, dict):
        return {}
    extras = {"store", "plan_meta", "metrics"}
    out = dict(prov["store"]) if isinstance(prov.get("store"), dict) else \
        {k: v for k, v in prov.items() if k not in extras}
    meta = prov.get("plan_meta") if isinstance(prov.get("plan_meta"), dict) else {}
    for k in ("baseline", "injected_system", "baseline_carries_default"):
        if out.get(k) is None and meta.get(k) is not None:
            out[k] = meta[k]
    for k in ("plan_hash", "store_path"):
        if prov.get(k) is not None:
            out[k] = prov[k]
    metrics = prov.get("metrics") if isinstance(prov.get("metrics"), dict) else {}
    for k, v in metrics.items():
        out[f"metrics_{k}"] = v
    return out


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

"""The results directory written by `promptshift metrics` (docs/RESULTS.md), read back.

:class:`Results` is what ``promptshift.metrics`` returns and what the report draws from:
every table as a DataFrame, ``summary.json`` and ``provenance.json``. It sits below both
stages (the format of their hand-over, as :mod:`promptshift.store` is for activations), so
neither imports the other. A missing file, an empty table or a missing column raises
:class:`NotAvailable` with a sentence the report prints in place of a figure; a results
directory that is partial (a sweep without attention or without generation) still reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from promptshift.errors import PromptShiftError
from promptshift.vocabulary import ALL_TABLES

CONTROL = "__control__"

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


class ResultsError(PromptShiftError):
    """The path is not a results directory at all (it does not exist, or is a file)."""


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
            raise ResultsError(f"results directory {self.dir} does not exist; run `promptshift metrics STORE --out "
                              f"{self.dir}` first")
        if not self.dir.is_dir():
            raise ResultsError(f"{self.dir} is a file; pass the results directory written by `promptshift metrics`")
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
        names = [n for n in ALL_TABLES if self.raw(n) is not None]
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


__all__ = ["CONTROL", "NotAvailable", "PAIR_TABLES", "PREFIX_LABEL", "Results", "ResultsError", "flat_provenance",
           "without_prefixes"]

"""Tables that never pass through the metrics driver: each task writes its rows as one
Parquet part, and the driver streams the parts, one at a time, into the table's final
Parquet and CSV files.

The per-prompt attention tables grow with prompts x layers x heads x regions
(``attention_heads`` holds 1.1 M rows at 10,000 pairs of a 4-layer, 2-head model, and
~500 rows per prompt for SmolLM2's 30 x 9 heads); gathered into the driver, they alone
made its memory grow with the sweep. Written by the workers instead, the driver holds
one part at a time. Parts live in a hidden directory of the results directory (so a
dask worker on another node writes them to the shared filesystem the store is on) and
are named by task, so the combined table has the rows in task order, exactly as if the
tasks' frames had been concatenated.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

PARTS_PREFIX = ".parts.tmp-"  # hidden and matched by the results directory's clean-up of temporaries


def new_parts_dir(out: Path) -> Path:
    """A fresh directory for the parts of one run inside ``out``."""
    d = out / f"{PARTS_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    return d


def _arrow(df: pd.DataFrame):
    """``df`` as an Arrow table with text columns typed as strings (a part whose column is
    all None would otherwise be typed null) and no pandas metadata (it records per-part
    details that would make the parts' schemas differ)."""
    import pyarrow as pa

    def typ(dt):
        return pa.from_numpy_dtype(dt) if isinstance(dt, np.dtype) and dt.kind in "biuf" else pa.string()

    fields = [pa.field(c, typ(df[c].dtype)) for c in df.columns]
    return pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False).replace_schema_metadata(None)


def write_part(parts: str | Path, table: str, index: int, df: pd.DataFrame) -> None:
    """Write the rows ``df`` of task ``index`` of ``table`` (nothing for no rows); atomic,
    so a part that exists is whole."""
    import pyarrow.parquet as pq

    if df is None or df.empty:
        return
    d = Path(parts) / table
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{index:09d}.parquet"
    tmp = d / f".{index:09d}.{uuid.uuid4().hex[:8]}"
    pq.write_table(_arrow(df), tmp)
    os.replace(tmp, path)


def part_files(parts: str | Path, table: str) -> list[Path]:
    """The parts of ``table`` in task order."""
    d = Path(parts) / table
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def combine(parts: str | Path, table: str, parquet: Path, csv: Path | None) -> int:
    """Stream the parts of ``table`` (there must be some) into ``parquet`` (and ``csv``),
    one part in memory at a time. -> the number of rows written."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    files = part_files(parts, table)
    if not files:
        raise ValueError(f"no parts of {table} in {parts}")
    schema = pq.read_schema(files[0])
    rows = 0
    with pq.ParquetWriter(parquet, schema) as pw:
        cw = pacsv.CSVWriter(str(csv), schema) if csv is not None else None
        try:
            for f in files:
                t = pq.read_table(f, schema=schema)
                pw.write_table(t)
                if cw is not None:
                    cw.write_table(t)
                rows += t.num_rows
        finally:
            if cw is not None:
                cw.close()
    return rows


def remove(parts: str | Path | None) -> None:
    if parts is not None:
        shutil.rmtree(parts, ignore_errors=True)


class ResultTables(Mapping):
    """The tables of a metrics run by name: those the driver computed, held in memory, and
    those written from parts, read from their Parquet file when first asked for (so the
    run itself never loads them)."""

    def __init__(self, frames: dict[str, pd.DataFrame], files: dict[str, Path], order: list[str]):
        self._frames, self._files = dict(frames), dict(files)
        self._order = [k for k in order if k in self._frames or k in self._files]
        self._order += [k for k in list(self._frames) + list(self._files) if k not in self._order]

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._frames:
            if name not in self._files:
                raise KeyError(name)
            self._frames[name] = pd.read_parquet(self._files[name])
        return self._frames[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def load(self) -> ResultTables:
        """Read every table into memory now (e.g. before its files are removed)."""
        for k in self._order:
            self[k]
        self._files = {}
        return self

    def __repr__(self) -> str:
        return f"ResultTables({', '.join(self._order)})"


__all__ = ["PARTS_PREFIX", "ResultTables", "combine", "new_parts_dir", "part_files", "remove", "write_part"]

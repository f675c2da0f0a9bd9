"""Tables written by the metrics tasks as Parquet parts: streamed into one file in task
order, equal to the concatenated frames (Parquet and CSV), and never gathered by the driver."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

import promptshift.metrics as metrics
from promptshift.metrics import parts as pt
from promptshift.metrics.attention import ATTENTION_TABLES, PromptShares


def _frame(i: int, rng) -> pd.DataFrame:
    n = int(rng.integers(1, 5))
    return pd.DataFrame({
        "prompt": np.arange(n, dtype=np.int64) + 10 * i,
        "role": "baseline" if i % 3 == 0 else "variant",
        "system": [None] * n if i % 3 == 0 else [f"s{i}"] * n,  # a part whose text column is all None
        "layer": rng.integers(0, 4, n).astype(np.int64),
        "mass": rng.random(n),
    })


def test_parts_stream_into_the_concatenated_table(tmp_path):
    """Twelve parts written out of order (one empty, some with an all-None text column)
    combine into exactly the frames concatenated in task order, Parquet and CSV alike."""
    rng = np.random.default_rng(0)
    frames = [_frame(i, rng) for i in range(12)]
    frames[5] = frames[5].iloc[:0]
    for i in rng.permutation(12):  # workers finish in any order
        pt.write_part(tmp_path / "parts", "t", int(i), frames[i])
    assert len(pt.part_files(tmp_path / "parts", "t")) == 11  # no part for no rows
    rows = pt.combine(tmp_path / "parts", "t", tmp_path / "t.parquet", tmp_path / "t.csv")
    whole = pd.concat(frames, ignore_index=True)
    assert rows == len(whole)
    got = pd.read_parquet(tmp_path / "t.parquet")
    text = {"role": object, "system": object}  # pandas reads text as its string dtype
    assert all(pd.api.types.is_string_dtype(got[c]) for c in text)
    as_text = lambda d: d.astype(text).where(d.notna(), None)  # noqa: E731 (one missing value: None)
    pd.testing.assert_frame_equal(as_text(got), as_text(whole))
    ref = tmp_path / "ref.csv"
    pacsv.write_csv(pa.Table.from_pandas(whole, preserve_index=False), str(ref))
    assert (tmp_path / "t.csv").read_bytes() == ref.read_bytes()


def test_driver_gathers_sums_not_attention_tables(synth_store, synth_tables, tmp_path, monkeypatch):
    """The attention tasks hand the driver per-prompt sums only; the tables reach the
    results directory through their parts (equal to the in-process reference run), and no
    part directory is left behind."""
    seen = []
    orig = metrics._Runner.map

    def spy(self, calls, desc):
        out = orig(self, calls, desc)
        seen.extend(out)
        return out

    monkeypatch.setattr(metrics._Runner, "map", spy)
    out = tmp_path / "out"
    tables = metrics.compute(synth_store[0], out, workers=0, n_boot=200, progress=False)
    shares = [r for r in seen if isinstance(r, PromptShares)]
    assert sum(len(r.prompts) for r in shares) == len(tables["attention_layers"]["prompt"].unique())
    # the per-pair tasks return frames of pairs; no result carries a per-prompt table
    assert not [r for r in seen if isinstance(r, pd.DataFrame) and "prompt" in r.columns]
    ref = synth_tables[0]
    for name in ATTENTION_TABLES:
        pd.testing.assert_frame_equal(tables[name], ref[name])
        assert (out / f"{name}.csv").read_bytes() == (synth_tables[1] / f"{name}.csv").read_bytes()
    assert not list(out.glob(f"{pt.PARTS_PREFIX}*"))
    assert list(tables)[:4] == ["component_change", *ATTENTION_TABLES]

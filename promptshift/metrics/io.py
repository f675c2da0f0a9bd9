"""Reading the store from metrics tasks: a picklable reference that each dask worker opens
itself, row gathers that touch every storage chunk once, and lazy dask arrays.

Tasks receive a :class:`StoreRef` (a path) rather than an open store: zarr and HDF5 handles
do not survive pickling to another process, and opening inside the task lets a
``dask-jobqueue`` worker on another node read the same shared-filesystem store. In-memory
stores (tests, notebooks) travel as the object itself and therefore need the in-process
scheduler (``workers=0``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptshift.errors import MetricsError, StoreError
from promptshift.store.core import Store, open_store

_cache: dict[str, Store] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class StoreRef:
    """Where a task finds the store: a path (zarr directory or HDF5 file), or, for a
    memory store, the store itself (only usable in the calling process)."""

    path: str | None
    memory: Store | None = None

    @classmethod
    def of(cls, store: Store) -> StoreRef:
        if store.path is None:
            return cls(None, store)
        return cls(str(Path(store.path).resolve()))

    @property
    def format(self) -> str:
        return "memory" if self.path is None else self.open().backend.format

    def open(self) -> Store:
        """The store, opened once per process (and per file identity) and then reused."""
        if self.path is None:
            return self.memory
        st = os.stat(self.path)
        key = f"{self.path}:{st.st_ino}:{st.st_mtime_ns}"
        with _lock:
            s = _cache.get(key)
            if s is None:
                s = open_store(self.path)
                _cache.clear()  # a rebuilt store at the same path must not be served from cache
                _cache[key] = s
        return s

    def __reduce__(self):
        if self.path is None:
            raise MetricsError(
                "an in-memory store cannot be sent to dask worker processes; use workers=0 (in-process "
                "scheduler) or save the store to zarr first"
            )
        return (StoreRef, (self.path,))


def row_spans(rows: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) spans covering sorted unique ``rows`` such that each storage chunk
    is read (and decompressed) at most once: rows whose chunks touch or neighbour each
    other share one span."""
    if rows.size == 0:
        return []
    c = rows // chunk  # (n,) chunk index of each row
    breaks = np.flatnonzero(np.diff(c) > 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return [(int(rows[s]), int(rows[e - 1]) + 1) for s, e in zip(starts, ends)]


def read_rows(store: Store, name: str, rows: np.ndarray, dtype=None) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of array ``name`` along its first axis, in that order."""
    arr = store.array(name)
    rows = np.asarray(rows, dtype=np.int64)
    chunk = int(store.chunks(name)[0]) or 1
    parts = []
    for lo, hi in row_spans(rows, chunk):
        block = np.asarray(arr[lo:hi])  # (hi - lo, ...) whole chunks decompressed once
        sel = rows[(rows >= lo) & (rows < hi)] - lo
        parts.append(block[sel])
    if not parts:
        shape = tuple(arr.shape[1:])
        return np.empty((0, *shape), dtype=dtype or arr.dtype)
    out = np.concatenate(parts, axis=0)
    return out.astype(dtype, copy=False) if dtype is not None else out


def read_range(store: Store, name: str, lo: int, hi: int) -> np.ndarray:
    return np.asarray(store.array(name)[lo:hi])


def as_str(a) -> np.ndarray:
    """Variable-length strings from any backend (zarr StringDType, HDF5 object, numpy) as object."""
    return np.asarray([str(x) for x in np.asarray(a).tolist()], dtype=object)


class _H5Source:
    """A lazily opened HDF5 dataset: picklable (path + name), so dask workers open it
    themselves instead of receiving an h5py handle they cannot use."""

    def __init__(self, path: str, name: str, shape, dtype):
        self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        return np.asarray(StoreRef(self.path).open().array(self.name)[key])


def lazy(ref: StoreRef, name: str, target_bytes: int = 64 << 20):
    """``name`` as a dask array whose chunks are whole multiples of the storage chunks
    along the first axis (about ``target_bytes`` each), so no chunk is read twice."""
    import dask.array as da

    store = ref.open()
    arr = store.array(name)
    shape = tuple(arr.shape)
    storage = store.chunks(name)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize or 1
    c0 = max(1, int(storage[0]))
    mult = max(1, target_bytes // max(1, row_bytes * c0))
    rows = min(max(shape[0], 1), c0 * mult)
    if name in store.derived:  # resid_pre of a schema-2 store: layer 0, then resid_post shifted by one layer
        d = store.derived[name]
        layer0 = _lazy_rows(ref, store, d["layer0"], rows)[:, None, :]
        post = _lazy_rows(ref, store, d["from_layer1"], rows)
        return da.concatenate([layer0, post[:, :-1]], axis=1).rechunk({1: -1})  # one chunk per row range
    return _lazy_rows(ref, store, name, rows)


def _lazy_rows(ref: StoreRef, store: Store, name: str, rows: int):
    """Stored array ``name`` as a dask array of ``rows`` rows per chunk."""
    import dask.array as da

    arr = store.array(name)
    shape = tuple(arr.shape)
    chunks = (rows, *shape[1:])
    fmt = store.backend.format
    if fmt == "zarr":
        return da.from_zarr(ref.path, component=name, chunks=chunks)
    if fmt == "hdf5":
        src = _H5Source(ref.path, name, shape, arr.dtype)
        return da.from_array(src, chunks=chunks, asarray=True, lock=False, meta=np.empty((0,) * len(shape), arr.dtype))
    if fmt == "memory":
        return da.from_array(np.asarray(arr), chunks=chunks)
    raise StoreError(f"unknown store backend {fmt!r}")


__all__ = ["StoreRef", "as_str", "lazy", "read_range", "read_rows", "row_spans"]

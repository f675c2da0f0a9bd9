"""Storage backends behind one small interface: arrays with named dimensions, and
JSON attributes on the root. Zarr v3 is the default and the only one that several
processes may fill at once; HDF5 is for single-writer runs and export; memory is for
tests and in-process use.

Size: three backends (zarr, HDF5, memory) behind one interface, each about a hundred lines;
kept together so the interface and its implementations are read side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from promptshift.errors import StoreError
from promptshift.store.directio import write_file


class Backend:
    """Arrays are returned as objects with numpy-style ``__getitem__``/``__setitem__``."""

    format: str = ""
    concurrent_create: bool = False  # arrays may be created from several threads at once

    def create_array(self, name, shape, dtype, chunks, dims, fill_value=0) -> Any: ...
    def array(self, name: str) -> Any: ...
    def has(self, name: str) -> bool: ...
    def names(self) -> list[str]: ...
    def dims(self, name: str) -> tuple[str, ...]: ...
    def chunks(self, name: str) -> tuple[int, ...]: ...
    @property
    def attrs(self) -> dict: ...
    def set_attrs(self, attrs: dict) -> None: ...
    def remove(self, name: str) -> None: ...
    def close(self) -> None: ...

    def write(self, name: str, lo: int, value: np.ndarray) -> None:
        """``array(name)[lo : lo + len(value)] = value``; backends may do it faster."""
        self.array(name)[lo : lo + len(value)] = value


class ZarrBackend(Backend):
    format = "zarr"
    concurrent_create = True

    def __init__(self, path: str | Path, mode: str = "r"):
        import zarr

        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"no promptshift store at {path}: {e}") from e

    def create_array(self, name, shape, dtype, chunks, dims, fill_value=0):
        import zarr

        kw: dict[str, Any] = {}
        if dtype is str:
            kw["fill_value"] = ""
        else:
            kw["fill_value"] = fill_value
            # float activations barely compress (measured: 3% on SmolLM2's float16 residuals)
            # and compressing them competes with the model for the CPU; everything else does
            bulk = dims and dims[0] in ("token", "key", "pattern") and np.dtype(dtype).kind == "f"
            kw["compressors"] = None if bulk else zarr.codecs.ZstdCodec(level=1)
        return self.group.create_array(
            name, shape=tuple(int(s) for s in shape), chunks=tuple(int(c) for c in chunks),
            dtype=dtype, dimension_names=list(dims), **kw
        )

    def array(self, name):
        return self.group[name]

    def has(self, name):
        return name in self.group

    def names(self):
        return sorted(self.group.array_keys())

    def dims(self, name):
        return tuple(self.group[name].metadata.dimension_names or ())

    def chunks(self, name):
        return tuple(self.group[name].chunks)

    @property
    def attrs(self):
        return dict(self.group.attrs)

    def set_attrs(self, attrs):
        self.group.attrs.update(attrs)

    def remove(self, name):
        if name in self.group:
            del self.group[name]

    def write(self, name, lo, value):
        """Whole chunks of uncompressed arrays are written to the store as they are (their
        encoded form is the raw little-endian bytes), skipping zarr's per-chunk encoding
        pipeline, which cost ~5x the file write itself (docs/BENCHMARKS.md) and competes
        with the model for the CPU. Partial chunks, and any array with a codec, go through
        zarr's own writes."""
        arr = self.group[name]
        hi = lo + len(value)
        c0 = arr.chunks[0]
        first, last = -(-lo // c0), hi // c0  # the whole chunks inside [lo, hi)
        if last * c0 > arr.shape[0]:  # the array's last chunk is an edge chunk: zarr pads it
            last -= 1
        put = _raw_chunk_writer(arr, value) if last > first else None
        if put is None:
            arr[lo:hi] = value
            return
        if lo < first * c0:
            arr[lo : first * c0] = value[: first * c0 - lo]
        for i in range(first, last):
            put(i, value[i * c0 - lo : (i + 1) * c0 - lo])
        if last * c0 < hi:
            arr[last * c0 : hi] = value[last * c0 - lo :]

    def close(self):
        pass


def _raw_chunk_writer(arr, value: np.ndarray):
    """A function writing one whole chunk (index along the first axis) of ``arr`` straight
    to its store, or None when the array's chunks are not plain bytes of this value's
    dtype or do not span the other axes."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync
    except ImportError:  # another zarr layout: use its own writes
        return None
    codecs = getattr(arr.metadata, "codecs", ())
    endian = getattr(codecs[0], "endian", None) if len(codecs) == 1 else None
    plain = len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
    little = endian is None or getattr(endian, "value", endian) == "little"
    dt = np.dtype(value.dtype)
    if not (plain and little and dt == arr.dtype and dt.byteorder in ("=", "<", "|") and np.little_endian
            and tuple(arr.chunks[1:]) == tuple(arr.shape[1:]) and tuple(value.shape[1:]) == tuple(arr.shape[1:])):
        return None
    store, path, buffer = arr.store_path.store, arr.store_path.path, default_buffer_prototype().buffer

    def key(i: int) -> str:  # the store key of whole chunk i along the first axis
        k = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
        return f"{path}/{k}" if path else k

    local = _local_root(store)
    if local is not None:
        # a local store: the chunk file is written here, in the writer thread, as zarr's
        # LocalStore writes it (a temporary file renamed into place), without the hop to
        # zarr's event-loop thread and its copy (~5% of the zarr run's time at 276 pairs)
        def put_local(i: int, chunk: np.ndarray) -> None:
            dst = local / key(i)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(f".{uuid.uuid4().hex}.partial")
            try:
                write_file(tmp, memoryview(np.ascontiguousarray(chunk)).cast("B"))  # past the page cache
                os.replace(tmp, dst)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        return put_local

    def put(i: int, chunk: np.ndarray) -> None:
        sync(store.set(key(i), buffer.from_bytes(np.ascontiguousarray(chunk).view(np.uint8).reshape(-1))))

    return put


def _local_root(store) -> Path | None:
    """The directory of a writable zarr LocalStore, else None."""
    try:
        from zarr.storage import LocalStore
    except ImportError:
        return None
    if type(store) is not LocalStore or getattr(store, "read_only", False):
        return None
    return Path(str(store.root))


class _H5Array:
    """h5py dataset wrapper: variable-length strings come back as str, not bytes."""

    def __init__(self, ds, is_str: bool):
        self.ds, self.is_str = ds, is_str

    @property
    def shape(self):
        return self.ds.shape

    @property
    def dtype(self):
        return np.dtype(object) if self.is_str else self.ds.dtype

    def __getitem__(self, key):
        out = self.ds[key]
        if self.is_str:
            out = np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else b, otypes=[object])(out)
        return out

    def __setitem__(self, key, value):
        if self.is_str:
            value = np.asarray(value, dtype=object)
        self.ds[key] = value


# netCDF-4's mark for a dimension that has no coordinate variable (its dimension scale's NAME)
_NC_DIM_NAME = "This is a netCDF dimension but not a netCDF variable.%10d"


class HDF5Backend(Backend):
    """One HDF5 file. Every dimension name is also a netCDF-4 dimension (an HDF5 dimension
    scale of that name, attached to each array's axes), so ``xarray.open_dataset(PATH,
    engine="h5netcdf")`` gives the same labelled dataset as ``xarray.open_zarr`` does for
    zarr. The scales are not arrays of the store: :meth:`names` leaves them out."""

    format = "hdf5"

    def __init__(self, path: str | Path, mode: str = "r"):
        import h5py

        self.path = Path(path)
        if mode == "r" and not self.path.is_file():
            raise StoreError(f"no promptshift store at {path}")
        self.file = h5py.File(str(path), {"w": "w", "r": "r", "r+": "r+", "a": "a"}[mode])

    def create_array(self, name, shape, dtype, chunks, dims, fill_value=0):
        import h5py

        is_str = dtype is str
        # HDF5 chunks may not exceed the array (zarr's may: a store smaller than one block)
        kw = dict(shape=tuple(shape),
                  chunks=tuple(max(1, min(int(c), int(n))) for c, n in zip(chunks, shape)) if all(shape) else None)
        if is_str:
            ds = self.file.create_dataset(name, dtype=h5py.string_dtype("utf-8"), **kw)
        else:
            ds = self.file.create_dataset(name, dtype=np.dtype(dtype), fillvalue=fill_value, compression="gzip",
                                          compression_opts=1, **kw)
        ds.attrs["_dims"] = json.dumps(list(dims))
        ds.attrs["_is_str"] = is_str
        for i, d in enumerate(dims):
            ds.dims[i].attach_scale(self._scale(d, int(shape[i])))
        return _H5Array(ds, is_str)

    def _scale(self, dim: str, n: int):
        """The dimension scale of ``dim`` (length ``n``), created on first use; a dimension
        whose arrays are all gone may come back with another length."""
        ds = self.file.get(dim)
        if ds is not None and not self._is_scale(ds):
            raise StoreError(f"HDF5 store {self.path}: dimension {dim!r} has the name of an array")
        if ds is not None and ds.shape != (n,):
            raise StoreError(f"HDF5 store {self.path}: dimension {dim!r} has length {ds.shape[0]}, an array "
                             f"needs {n}; a dimension name must mean one length in a store")
        if ds is None:  # never written: HDF5 allocates no space for it
            ds = self.file.create_dataset(dim, shape=(n,), dtype="f4")
            ds.make_scale(_NC_DIM_NAME % n)
        return ds

    @staticmethod
    def _is_scale(ds) -> bool:
        cls = ds.attrs.get("CLASS")
        return (cls.decode() if isinstance(cls, bytes) else cls) == "DIMENSION_SCALE"

    def array(self, name):
        ds = self.file[name]
        return _H5Array(ds, bool(ds.attrs.get("_is_str", False)))

    def has(self, name):
        return name in self.file and not self._is_scale(self.file[name])

    def names(self):
        return sorted(k for k, v in self.file.items() if not self._is_scale(v))

    def dims(self, name):
        return tuple(json.loads(self.file[name].attrs["_dims"]))

    def chunks(self, name):
        return tuple(self.file[name].chunks or self.file[name].shape)

    @property
    def attrs(self):
        raw = self.file.attrs.get("promptshift")
        return json.loads(raw) if raw is not None else {}

    def set_attrs(self, attrs):
        cur = self.attrs
        cur.update(attrs)
        self.file.attrs["promptshift"] = json.dumps(cur)

    def remove(self, name):
        if not self.has(name):
            return
        ds = self.file[name]
        dims = json.loads(ds.attrs["_dims"])
        for i, d in enumerate(dims):
            if d in self.file and ds.dims[i]:
                ds.dims[i].detach_scale(self.file[d])
        del self.file[name]
        used = {d for n in self.names() for d in json.loads(self.file[n].attrs["_dims"])}
        for d in set(dims) - used:  # a dimension no array uses any more
            if d in self.file:
                del self.file[d]

    def flush(self):
        self.file.flush()

    def close(self):
        try:
            self.file.close()
        except Exception:
            pass


class MemoryBackend(Backend):
    format = "memory"

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}
        self._dims: dict[str, tuple] = {}
        self._chunks: dict[str, tuple] = {}
        self._attrs: dict = {}

    def create_array(self, name, shape, dtype, chunks, dims, fill_value=0):
        if dtype is str:
            a = np.full(shape, "", dtype=object)
        else:
            a = np.full(shape, fill_value, dtype=dtype)
        self._arrays[name], self._dims[name], self._chunks[name] = a, tuple(dims), tuple(chunks)
        return a

    def array(self, name):
        return self._arrays[name]

    def has(self, name):
        return name in self._arrays

    def names(self):
        return sorted(self._arrays)

    def dims(self, name):
        return self._dims[name]

    def chunks(self, name):
        return self._chunks[name]

    @property
    def attrs(self):
        return dict(self._attrs)

    def set_attrs(self, attrs):
        self._attrs.update(json.loads(json.dumps(attrs)))

    def remove(self, name):
        for d in (self._arrays, self._dims, self._chunks):
            d.pop(name, None)

    def close(self):
        pass


class _Discard:
    """An array that accepts writes and keeps nothing: extraction "to nowhere", used by
    the benchmark to price the store."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(object if dtype is str else dtype)

    def __setitem__(self, key, value):
        pass

    def __getitem__(self, key):
        raise NotImplementedError("a null store keeps no activations")


class NullBackend(MemoryBackend):
    """Small per-prompt and per-block arrays are kept (completion records, plan); the
    token- and key-axis arrays, which are the bulk of a store, are discarded."""

    format = "null"

    def create_array(self, name, shape, dtype, chunks, dims, fill_value=0):
        if dims and dims[0] in ("token", "key"):
            a = _Discard(shape, dtype)
            self._arrays[name], self._dims[name], self._chunks[name] = a, tuple(dims), tuple(chunks)
            return a
        return super().create_array(name, shape, dtype, chunks, dims, fill_value)


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir() and (p / "zarr.json").is_file():
        return "zarr"
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(8) == b"\x89HDF\r\n\x1a\n":
                return "hdf5"
        raise StoreError(f"{p} is a file but not an HDF5 store")
    if p.exists():
        raise StoreError(f"{p} exists but is not a promptshift store (no zarr.json)")
    raise StoreError(f"no promptshift store at {p}; create one with `promptshift extract SWEEP --store {p}`")


def open_backend(path: str | Path, mode: str = "r", fmt: str | None = None) -> Backend:
    fmt = fmt or detect_format(path)
    if fmt == "zarr":
        return ZarrBackend(path, mode)
    if fmt == "hdf5":
        return HDF5Backend(path, mode)
    raise StoreError(f"unknown store format {fmt!r}; use zarr or hdf5")


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        os.remove(path)

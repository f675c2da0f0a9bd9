"""The activation store: schema, creation from a plan, block writes, and the reader API.

Layout contract (docs/STORE.md is the public version of this):

* dims ``token`` (kept positions, flat, CSR via ``token_start``/``n_tokens``), ``prompt``,
  ``key`` (every position of every prompt, for the last attention row), ``block``,
  ``layer``, ``hidden``, ``head``, ``qregion``/``kregion``, ``k``, ``lens_k``, ``gen``.
* each block of the plan owns whole chunks of every array it writes, so concurrent
  workers on different blocks never touch the same chunk file;
* ``block_done[b]`` is written after block ``b``'s data: it is the completion record.

Size: the store's schema, creation, block writes and reader API are one contract (every
reader method matches a writer); the backends, verification and direct I/O are apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from promptshift.errors import StoreError
from promptshift.store.backends import Backend, MemoryBackend, NullBackend, open_backend, remove_path
from promptshift.vocabulary import REGIONS

# 2: resid_pre stored at layer 0 only when resid_post is stored (``resid_pre_0``)
# 3: attn_last and attn_pattern in the storage dtype; causal dimensions named <analysis>_<dim>;
#    HDF5 dimensions as netCDF-4 dimension scales (xarray opens every store as one dataset)
# 4: the plan column by column (plan version 2: tables as arrays, texts as UTF-8 bytes)
SCHEMA_VERSION = 4
N_REGIONS = len(REGIONS)


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    dims: tuple[str, ...]
    fill_value: Any = 0
    static: bool = False  # written once at creation (from the plan), never by workers


def resid_pre_derived(plan) -> bool:
    """Whether this plan's store keeps ``resid_pre`` at layer 0 only (``resid_pre_0``) and
    reads layers 1.. from ``resid_post`` (plans of schema-1 stores keep every layer)."""
    return bool(plan.meta.get("resid_pre_layer0_only", False))


def stored_name(plan, component: str) -> str:
    """The array that holds ``component`` in this plan's store."""
    return "resid_pre_0" if component == "resid_pre" and resid_pre_derived(plan) else component


def check_layout(plan) -> None:
    """The plan's settings that the schema cannot hold, refused before anything runs."""
    L = plan.dims.n_layers
    for layer in plan.sweep.full_attention_layers:
        if not 0 <= layer < L:
            raise StoreError(f"full_attention_layers has layer {layer}, but the model has layers 0..{L - 1}")


def array_specs(plan) -> list[ArraySpec]:
    """Every array in a store for this plan: the schema, in one place."""
    s, d = plan.sweep, plan.dims
    L, H, NH, R = d.n_layers, d.hidden, d.n_heads, N_REGIONS
    P, T, K, B = plan.n_prompts, plan.kept_size, plan.key_size, plan.n_blocks
    cp, ct, ck = s.block_prompts, plan.meta["token_chunk"], plan.meta["key_chunk"]
    sd = np.float16 if s.storage_dtype == "float16" else np.float32
    # Arrays from the plan are written once, whole, when the store is created (never by
    # workers), so their chunks need not be a block's: ~1M entries (a multiple of the block
    # chunk), not the block chunk, which would make 200,000 files per array on a
    # million-pair sweep; never more than the array (HDF5 refuses a chunk past its shape).
    sp, st = min(cp * -(-(1 << 20) // cp), max(1, P)), min(ct * -(-(1 << 20) // ct), max(1, T))
    specs = [
        # static, from the plan
        ArraySpec("token_start", (P,), np.int64, (sp,), ("prompt",), -1, True),
        ArraySpec("n_tokens", (P,), np.int32, (sp,), ("prompt",), 0, True),
        ArraySpec("prompt_len", (P,), np.int32, (sp,), ("prompt",), 0, True),
        ArraySpec("key_start", (P,), np.int64, (sp,), ("prompt",), -1, True),
        ArraySpec("token_prompt", (T,), np.int32, (st,), ("token",), -1, True),
        ArraySpec("token_pos", (T,), np.int32, (st,), ("token",), -1, True),
        ArraySpec("token_region", (T,), np.int8, (st,), ("token",), -1, True),
        ArraySpec("token_id", (T,), np.int32, (st,), ("token",), -1, True),
        # per block
        ArraySpec("block_done", (B,), np.uint8, (1,), ("block",), 0),
        ArraySpec("block_selfcheck", (B,), np.float32, (1,), ("block",), np.nan),
        # activations at kept positions
        *[ArraySpec(c, (T, L, H), sd, (ct, L, H), ("token", "layer", "hidden"), 0)
          if stored_name(plan, c) == c else ArraySpec(stored_name(plan, c), (T, H), sd, (ct, H), ("token", "hidden"), 0)
          for c in s.components],
        # attention statistics, reduced inside each layer
        ArraySpec("attn_region_mass", (P, L, NH, R, R), np.float32, (cp, L, NH, R, R),
                  ("prompt", "layer", "head", "qregion", "kregion"), np.nan),
        ArraySpec("attn_entropy", (P, L, NH, R), np.float32, (cp, L, NH, R),
                  ("prompt", "layer", "head", "qregion"), np.nan),
        ArraySpec("attn_sink", (P, L, NH), np.float32, (cp, L, NH), ("prompt", "layer", "head"), np.nan),
        ArraySpec("attn_last", (K, L, NH), sd, (ck, L, NH), ("key", "layer", "head"), 0),
        # output side at the last prompt position
        ArraySpec("logits_topk_ids", (P, s.top_k), np.int32, (cp, s.top_k), ("prompt", "k"), -1),
        ArraySpec("logits_topk_logprobs", (P, s.top_k), np.float32, (cp, s.top_k), ("prompt", "k"), np.nan),
        ArraySpec("logits_entropy", (P,), np.float32, (cp,), ("prompt",), np.nan),
        ArraySpec("logits_lse", (P,), np.float32, (cp,), ("prompt",), np.nan),
        *([ArraySpec("logits_logprobs", (P, d.vocab), np.float32, (cp, d.vocab), ("prompt", "vocab"), np.nan)]
          if s.full_logprobs else []),
        ArraySpec("lens_topk_ids", (P, L, s.lens_top_k), np.int32, (cp, L, s.lens_top_k),
                  ("prompt", "layer", "lens_k"), -1),
        ArraySpec("lens_topk_logprobs", (P, L, s.lens_top_k), np.float32, (cp, L, s.lens_top_k),
                  ("prompt", "layer", "lens_k"), np.nan),
        ArraySpec("lens_entropy", (P, L), np.float32, (cp, L), ("prompt", "layer"), np.nan),
        ArraySpec("lens_final_top1_logprob", (P, L), np.float32, (cp, L), ("prompt", "layer"), np.nan),
    ]
    if s.gen_tokens > 0:
        G = s.gen_tokens
        specs += [
            ArraySpec("gen_ids", (P, G), np.int32, (cp, G), ("prompt", "gen"), -1),
            ArraySpec("gen_len", (P,), np.int32, (cp,), ("prompt",), -1),
            ArraySpec("gen_text", (P,), str, (cp,), ("prompt",), ""),
        ]
    check_layout(plan)
    if s.full_attention_layers:
        NFL, cq = len(s.full_attention_layers), plan.meta["pattern_chunk"]
        specs += [
            ArraySpec("pattern_start", (P,), np.int64, (sp,), ("prompt",), -1, True),
            ArraySpec("attn_pattern", (plan.pattern_size, NFL, NH), sd, (cq, NFL, NH),
                      ("pattern", "pattern_layer", "head"), 0),
        ]
    return specs


def empty_block(plan, block: int) -> dict[str, np.ndarray]:
    """Buffers for everything a worker writes for one block, at the block's sizes and
    filled with each array's fill value: the schema decides shapes and dtypes, once."""
    b = plan.blocks.iloc[block]
    n = {"prompt": int(b.prompt_end - b.prompt_start), "token": int(b.kept_end - b.kept_start),
         "key": int(b.key_end - b.key_start)}
    if "pattern_end" in b:
        n["pattern"] = int(b.pattern_end - b.pattern_start)
    out = {}
    for sp in array_specs(plan):
        if sp.static or sp.dims[0] not in n:
            continue
        shape = (n[sp.dims[0]],) + sp.shape[1:]
        out[sp.name] = np.full(shape, "", dtype=object) if sp.dtype is str else np.full(shape, sp.fill_value, sp.dtype)
    return out


def _static_values(plan) -> dict[str, np.ndarray]:
    """The arrays a store gets from the plan at creation: per prompt, its kept rows' offsets
    and lengths, and per kept row its prompt, position, region and token id (vectorised:
    a plan of a million prompts has tens of millions of kept rows)."""
    pr = plan.prompts
    T = plan.kept_size
    out = {
        "token_start": pr["kept_start"].to_numpy(np.int64),
        "n_tokens": pr["n_kept"].to_numpy(np.int32),
        "prompt_len": pr["n_tokens"].to_numpy(np.int32),
        "key_start": pr["key_start"].to_numpy(np.int64),
        "pattern_start": pr["pattern_start"].to_numpy(np.int64),
    }
    n = pr["n_kept"].to_numpy(np.int64)  # (P,)
    keep0, kept0, off0 = (pr[c].to_numpy(np.int64) for c in ("keep_start", "kept_start", "token_offset"))
    tp, tpos = np.full(T, -1, np.int32), np.full(T, -1, np.int32)
    treg, tid = np.full(T, -1, np.int8), np.full(T, -1, np.int32)
    for a in range(0, len(n), 1 << 14):  # bounded temporaries: tens of millions of kept rows in all
        nc = n[a : a + (1 << 14)]
        p = a + np.repeat(np.arange(len(nc), dtype=np.int64), nc)  # (kept,) prompt of each kept row
        local = np.arange(len(p), dtype=np.int64) - np.repeat(np.cumsum(nc) - nc, nc)  # (kept,) index within it
        pos = keep0[p] + local  # (kept,) absolute position
        row = kept0[p] + local  # (kept,) row in the token axis
        flat = off0[p] + pos  # (kept,) index into the plan's token arrays
        tp[row], tpos[row] = p, pos
        treg[row], tid[row] = plan.token_region[flat], plan.token_ids[flat]
    out.update(token_prompt=tp, token_pos=tpos, token_region=treg, token_id=tid)
    return out


def _plan_dim(name: str) -> str:
    """Dimension of a stored plan column: ``plan_prompt`` for ``plan_prompts__*``, ...; a text
    column's offsets and bytes have their own (``plan_prompts__text__offsets``: one more
    than the prompts)."""
    table, _, rest = name[len("plan_"):].partition("__")
    if rest.endswith("__offsets"):
        return f"plan_{table}_text_offset"
    if rest.endswith("__bytes"):
        return f"plan_{table}_text_byte"
    return "plan_" + table[:-1]


class Store:
    """An activation store on disk (zarr or HDF5) or in memory.

    Open existing stores with :func:`open`; extraction creates them with :meth:`create`."""

    def __init__(self, backend: Backend, path: Path | None = None, mode: str = "r"):
        self.backend, self.path, self.mode = backend, path, mode
        attrs = backend.attrs
        if "schema_version" not in attrs:
            raise StoreError(f"{path} is not a promptshift store (no schema_version attribute)")
        v = attrs["schema_version"]
        if not isinstance(v, int) or v > SCHEMA_VERSION:
            raise StoreError(
                f"store {path} has schema version {v}, newer than this promptshift understands "
                f"({SCHEMA_VERSION}); upgrade promptshift to read it"
            )
        self.attrs = attrs

    # --- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path | None, plan, provenance: dict, fmt: str = "zarr",
               overwrite: bool = False) -> Store:
        """Create the store with every array at final size, atomically.

        Built in a temporary sibling and renamed into place, so a concurrent worker sees
        either no store or a complete one; a loser of that race opens the winner's store
        and checks that it holds the same plan."""
        specs = array_specs(plan)
        from promptshift.sweep.plan import PLAN_VERSION

        # a new store is written with the current plan format and records its hash (the
        # columns are encoded once: hashed, then written)
        columns = plan.columns()
        plan_hash = plan.hash(PLAN_VERSION, columns=columns)
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "plan_hash": plan_hash,
            "provenance": provenance,
            "regions": list(REGIONS),
            "components": list(plan.sweep.components),
            "keep": plan.sweep.keep,
            "n_blocks": plan.n_blocks,
            # components not stored whole: name -> how a reader assembles it
            "derived": {"resid_pre": {"layer0": "resid_pre_0", "from_layer1": "resid_post"}}
            if resid_pre_derived(plan) else {},
        }
        if path is None or fmt == "null":
            be = NullBackend() if fmt == "null" else MemoryBackend()
            cls._fill(be, specs, plan, attrs, columns)
            return cls(be, None, "r+")
        path = Path(path)
        if path.exists():
            if overwrite:
                remove_path(path)
            else:
                existing = open_store(path)
                # a store planned with an older plan format recorded that format's hash
                v = existing.plan_version
                if existing.attrs.get("plan_hash") != (plan_hash if v == PLAN_VERSION else plan.hash(v)):
                    try:
                        why = existing.plan.difference(plan) or "another sweep, model or settings"
                    except Exception:  # an unreadable plan: say what is certain
                        why = "another sweep, model or settings"
                    raise StoreError(
                        f"{path} holds a different plan ({why}); pass --overwrite to replace it, or choose another "
                        "--store path"
                    )
                return open_store(path, mode="r+")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store at {path}: {e.strerror} ({e.filename})") from e
        if not os.access(path.parent, os.W_OK):
            raise StoreError(f"cannot write the store: directory {path.parent} is not writable")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        remove_path(tmp)
        try:
            be = open_backend(tmp, "w", fmt)
            cls._fill(be, specs, plan, attrs, columns)
            be.close()
            os.rename(tmp, path)
        except OSError as e:
            remove_path(tmp)
            if path.exists():  # another worker created it first
                return cls.create(path, plan, provenance, fmt, overwrite=False)
            raise StoreError(f"cannot create store at {path}: {e}") from e
        except BaseException:
            remove_path(tmp)
            raise
        return open_store(path, mode="r+")

    @staticmethod
    def _fill(be: Backend, specs, plan, attrs, columns=None) -> None:
        static = _static_values(plan)
        blob = np.frombuffer(json.dumps(plan.header()).encode("utf-8"), dtype=np.uint8)
        jobs = [(sp.name, sp.shape, sp.dtype, sp.chunks, sp.dims, sp.fill_value,
                 static[sp.name] if sp.static and sp.shape[0] else None) for sp in specs]
        jobs.append(("plan_json", blob.shape, np.uint8, (max(1, blob.size),), ("plan_byte",), 0, blob))
        # the plan's tables, column by column (docs/STORE.md, "The plan")
        for name, a in (plan.columns() if columns is None else columns).items():
            jobs.append((name, a.shape, a.dtype, (max(1, min(a.size, 1 << 20)),), (_plan_dim(name),), 0, a))
        for name, a in (("plan_token_ids", plan.token_ids), ("plan_token_region", plan.token_region),
                        ("plan_token_turn", plan.token_turn)):
            jobs.append((name, a.shape, a.dtype, (max(1, min(a.size, 1 << 20)),), ("plan_token",), 0, a))
        # what `verify` rechecks the regions from: each token's character span, each content's span
        for name, a, dims in (("plan_token_offsets", plan.token_offsets, ("plan_token", "plan_edge")),
                              ("plan_spans", plan.spans, ("plan_span", "plan_span_field"))):
            if a is not None:
                jobs.append((name, a.shape, a.dtype, (max(1, min(len(a), 1 << 19)), a.shape[1]), dims, 0, a))

        def make(job):
            name, shape, dtype, chunks, dims, fill, value = job
            arr = be.create_array(name, shape, dtype, chunks, dims, fill)
            if value is None:
                return
            # whole chunks at a time, ~4M entries: the backend's encoding buffers stay bounded
            # (arrays of tens of millions of tokens on million-pair plans, 8 written at once)
            n = len(value) if value.ndim else 0
            step = chunks[0] * max(1, (1 << 22) // max(1, int(np.prod(chunks))))
            if value.ndim == 0 or n <= step:
                arr[...] = value
                return
            for a in range(0, n, step):
                arr[a : a + step] = value[a : a + step]

        del static  # the jobs hold the static arrays now: each is freed once written
        # arrays past 64 MB (a million-pair plan's tokens) one at a time, after the rest: the
        # backend encodes their chunks in parallel itself, and their encoding buffers never add up
        large = [j for j in jobs if j[6] is not None and j[6].nbytes > 64 << 20]
        jobs = [j for j in jobs if j[6] is None or j[6].nbytes <= 64 << 20]
        if be.concurrent_create:  # each array is its own files: create them side by side (I/O latency)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(make, jobs))
        else:
            for job in jobs:
                make(job)
        while large:
            make(large.pop(0))
        be.set_attrs(attrs)

    # --- reading --------------------------------------------------------------------------
    @cached_property
    def _plan_header(self) -> dict:
        blob = np.asarray(self.backend.array("plan_json")[...], dtype=np.uint8).tobytes()
        return json.loads(blob.decode("utf-8"))

    @property
    def plan_version(self) -> int:
        """The format the plan is stored in (1: one JSON document; 2: column by column)."""
        return int(self._plan_header.get("plan_version", 1))

    @cached_property
    def plan(self):
        return self.read_plan()

    def read_plan(self, *, text: bool = True):
        """The store's plan (:attr:`plan` is this, read once). Its token arrays are read when
        first used; ``text=False`` leaves the prompt texts out, for readers that never use
        them on sweeps of millions of prompts (the metrics)."""
        from promptshift.sweep.plan import Plan

        head = self._plan_header
        read = lambda name: self.backend.array(name)[...]  # noqa: E731
        if head.get("plan_version") == 1:  # one JSON document (stores planned before plan version 2)
            names = set(self.names())
            extra = {k: read(name) for k, name in (("token_offsets", "plan_token_offsets"), ("spans", "plan_spans"))
                     if name in names}
            return Plan.from_json(head, read("plan_token_ids"), read("plan_token_region"), read("plan_token_turn"),
                                  **extra)
        return Plan.from_store(head, read, self.names(), text=text)

    @property
    def provenance(self) -> dict:
        return self.attrs.get("provenance", {})

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.attrs["components"])

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(self.attrs["regions"])

    @property
    def prompts(self) -> pd.DataFrame:
        pr = self.plan.prompts
        return pr[["prompt", "kind", "system", "user_id", "text", "n_tokens", "suffix_start", "keep_start",
                   "n_kept", "kept_start", "n_system_tokens", "block"]].rename(columns={"kind": "role"})

    @property
    def pairs(self) -> pd.DataFrame:
        return self.plan.pairs.copy()

    @property
    def derived(self) -> dict:
        """Components assembled on read (schema 2: ``resid_pre`` from ``resid_pre_0`` and
        ``resid_post``); empty for stores that keep every component whole."""
        return dict(self.attrs.get("derived", {}))

    def array(self, name: str):
        if name in self.derived:
            d = self.derived[name]
            return ShiftedResidual(self.array(d["layer0"]), self.array(d["from_layer1"]))
        if not self.backend.has(name):
            raise StoreError(f"no array {name!r} in store {self.path}; arrays: {', '.join(self.backend.names())}")
        return self.backend.array(name)

    def names(self) -> list[str]:
        return self.backend.names()

    def dims(self, name: str) -> tuple[str, ...]:
        if name in self.derived:
            return self.backend.dims(self.derived[name]["from_layer1"])
        return self.backend.dims(name)

    def chunks(self, name: str) -> tuple[int, ...]:
        if name in self.derived:
            return self.backend.chunks(self.derived[name]["from_layer1"])
        return self.backend.chunks(name)

    def done(self) -> np.ndarray:
        return np.asarray(self.array("block_done")[...]).astype(bool)

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def require_complete(self) -> None:
        d = self.done()
        if not d.all():
            missing = np.flatnonzero(~d)
            raise StoreError(
                f"store {self.path} is incomplete: {missing.size} of {d.size} blocks missing "
                f"(first: {missing[:5].tolist()}); rerun `promptshift extract` with the same sweep to finish it"
            )

    def component(self, name: str, prompt: int) -> np.ndarray:
        """(n_kept, layer, hidden) float32 activations of one prompt at its kept positions."""
        if name not in self.components:
            raise StoreError(f"unknown component {name!r}; this store has {', '.join(self.components)}")
        r = self.plan.prompts.iloc[prompt]
        k0, n = int(r.kept_start), int(r.n_kept)
        return np.asarray(self.array(name)[k0 : k0 + n], dtype=np.float32)

    def kept_positions(self, prompt: int) -> np.ndarray:
        return self.plan.kept_positions(prompt)

    def attn_last_row(self, prompt: int) -> np.ndarray:
        """(n_tokens, layer, head) attention of the last query over every key of one prompt."""
        r = self.plan.prompts.iloc[prompt]
        k0, n = int(r.key_start), int(r.n_tokens)
        return np.asarray(self.array("attn_last")[k0 : k0 + n], dtype=np.float32)

    def attn_pattern(self, prompt: int) -> np.ndarray:
        """(n_full_layers, head, query, key) full attention pattern of one prompt, for the
        layers listed in the sweep's ``full_attention_layers``."""
        if not self.backend.has("attn_pattern"):
            raise StoreError("this store has no full attention patterns; list layers under "
                             "`full_attention_layers` in the sweep to keep them")
        r = self.plan.prompts.iloc[prompt]
        n, q0 = int(r.n_tokens), int(r.pattern_start)
        flat = np.asarray(self.array("attn_pattern")[q0 : q0 + n * n], dtype=np.float32)  # (n*n, NFL, NH)
        return flat.reshape(n, n, *flat.shape[1:]).transpose(2, 3, 0, 1)

    # --- writing (extraction workers) -----------------------------------------------------
    def write_block(self, block: int, data: dict[str, np.ndarray], selfcheck: float = float("nan")) -> None:
        """Write one block's arrays, then its completion record.

        ``data`` holds, per array, the block's whole slice along its first axis (prompt,
        token or key range); every slice covers whole chunks, so concurrent workers on
        other blocks never share a chunk."""
        b = self.plan.blocks.iloc[block]
        ranges = {
            "prompt": (int(b.prompt_start), int(b.prompt_end)),
            "token": (int(b.kept_start), int(b.kept_end)),
            "key": (int(b.key_start), int(b.key_end)),
            "pattern": (int(b.pattern_start), int(b.pattern_end)),
        }
        for name, value in data.items():
            dim0 = self.dims(name)[0]
            lo, hi = ranges[dim0]
            if value.shape[0] != hi - lo:
                raise StoreError(f"block {block}: {name} has {value.shape[0]} rows, expected {hi - lo}")
            self.backend.write(name, lo, value)
        self.array("block_selfcheck")[block : block + 1] = np.asarray([selfcheck], dtype=np.float32)
        if hasattr(self.backend, "flush"):
            self.backend.flush()
        self.array("block_done")[block : block + 1] = np.ones(1, np.uint8)
        if hasattr(self.backend, "flush"):
            self.backend.flush()

    # --- causal analyses (`promptshift causal`) --------------------------------------------
    def write_causal(self, analysis: str, arrays: dict[str, tuple[np.ndarray, tuple[str, ...]]], meta: dict) -> None:
        """Replace one causal analysis's results: arrays ``causal_<analysis>_<name>`` with
        their dimension names, then ``causal_<analysis>_meta`` (JSON) last, which marks the
        analysis complete. A rerun first removes the old meta, so an interrupted rewrite is
        never read as complete.

        Dimension names are stored as ``<analysis>_<dim>`` (``patching_pair``,
        ``knockout_meta_byte``): a name means one length in a whole store (xarray opens the
        store as one dataset), and two analyses can cover different pairs or users."""
        if not analysis or "_" in analysis:
            raise StoreError(f"causal analysis name {analysis!r}: a word without underscores (it prefixes its dims)")
        prefix = f"causal_{analysis}_"
        self.backend.remove(prefix + "meta")
        for name in [n for n in self.names() if n.startswith(prefix)]:
            self.backend.remove(name)
        for name, (value, dims) in arrays.items():
            value = np.asarray(value)
            if value.ndim != len(dims):
                raise StoreError(f"causal array {name}: {value.ndim} dimensions but {len(dims)} names")
            chunks = tuple(max(1, s) for s in value.shape)
            dims = tuple(f"{analysis}_{d}" for d in dims)
            self.backend.create_array(prefix + name, value.shape, value.dtype, chunks, dims)[...] = value
        blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        self.backend.create_array(prefix + "meta", blob.shape, np.uint8, (max(1, blob.size),),
                                  (f"{analysis}_meta_byte",))[...] = blob
        if hasattr(self.backend, "flush"):
            self.backend.flush()

    def causal_analyses(self) -> list[str]:
        """Names of the causal analyses stored complete in this store."""
        return sorted(n[len("causal_") : -len("_meta")] for n in self.names()
                      if n.startswith("causal_") and n.endswith("_meta"))

    def read_causal(self, analysis: str) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays by name, meta) of one complete causal analysis."""
        prefix = f"causal_{analysis}_"
        if not self.backend.has(prefix + "meta"):
            raise StoreError(f"store {self.path} has no complete causal analysis {analysis!r}; run "
                             f"`promptshift causal SWEEP --store {self.path} --analysis {analysis}`")
        meta = json.loads(np.asarray(self.backend.array(prefix + "meta")[...], dtype=np.uint8).tobytes().decode())
        arrays = {n[len(prefix):]: np.asarray(self.backend.array(n)[...]) for n in self.names()
                  if n.startswith(prefix) and n != prefix + "meta"}
        return arrays, meta

    def close(self) -> None:
        self.backend.close()

    def to_xarray(self):
        """The store as a lazy, labelled ``xarray.Dataset`` (dask-backed; nothing is read until
        computed), for any backend (zarr, HDF5, memory). Unlike ``xarray.open_zarr(PATH)``,
        derived components appear whole: ``resid_pre`` is (token, layer, hidden) with layer 0
        from ``resid_pre_0`` and layer l from ``resid_post`` layer l - 1. A dimension name that
        two arrays use with different lengths is renamed ``<array>__<dim>`` for the later one.
        Attributes: the store's (schema version, provenance, plan hash, ...)."""
        import dask.array as da
        import xarray as xr

        sizes: dict[str, int] = {}
        data = {}
        for name in self.backend.names():
            arr = self.backend.array(name)
            dims = []
            for dim, n in zip(self.backend.dims(name), arr.shape):
                dim = dim if sizes.setdefault(dim, n) == n else f"{name}__{dim}"
                sizes.setdefault(dim, n)
                dims.append(dim)
            data[name] = (tuple(dims), da.from_array(arr, chunks=self.backend.chunks(name) or arr.shape))
        for name, d in self.derived.items():
            dims, post = data[d["from_layer1"]]
            layer0 = data[d["layer0"]][1]
            data[name] = (dims, da.concatenate([layer0[:, None], post[:, :-1]], axis=1))
        return xr.Dataset(data, attrs={k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                       for k, v in self.attrs.items()})


class ShiftedResidual:
    """``resid_pre`` of a schema-2 store, read only: layer 0 from ``resid_pre_0`` (token,
    hidden) and layer l > 0 from ``resid_post`` layer l - 1 (token, layer, hidden), which the
    extractor checked to be bit for bit equal. Indexable like the stored arrays; only the
    rows asked for are read."""

    def __init__(self, layer0, post):
        self.layer0, self.post = layer0, post
        self.shape, self.dtype = tuple(post.shape), post.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key[1:]) or len(key) > self.ndim:
            raise IndexError("resid_pre (derived) takes an index along tokens, then plain indices")
        first = slice(None) if key[0] is Ellipsis else key[0]
        rest = key[1:] if key[0] is not Ellipsis else ()
        if isinstance(first, (int, np.integer)):
            return self[first : first + 1 if first != -1 else None][(0, *rest)]
        if not isinstance(first, slice):
            raise IndexError("resid_pre (derived) takes a slice or an integer along tokens")
        lo, hi, step = first.indices(self.shape[0])
        post = np.asarray(self.post[lo:hi])
        out = np.empty_like(post)
        out[:, 0] = np.asarray(self.layer0[lo:hi])
        out[:, 1:] = post[:, :-1]
        out = out[::step] if step != 1 else out
        return out[(slice(None), *rest)] if rest else out


def open_store(path: str | Path, mode: str = "r") -> Store:
    """Open a store (zarr directory or HDF5 file), checking its schema version."""
    path = Path(path)
    be = open_backend(path, mode)
    return Store(be, path, mode)


open = open_store  # noqa: A001  -- `promptshift.store.open(PATH)` is the documented entry point

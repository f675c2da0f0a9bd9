"""The plan: every unique rendered prompt, every pair, the aligned suffixes, and the
block layout of the store, all computed from the tokenizer before any model runs.

Because token counts are known here, every store array is created at its final size
and every block owns a fixed, chunk-aligned region; extraction workers never create or
edit metadata, so any number of them can fill one store at once.

Size: the plan is one data structure with its construction (tables, alignment, block
layout), its columnar storage and its hash, which must change together (the store's
schema depends on all three); composed rendering is apart in :mod:`promptshift.sweep.compose`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from promptshift.errors import ShardSpecError, SweepError, TemplateError
from promptshift.sweep.chat import (Rendered, TemplateClock, conversation, injected_default_system, render,
                                    template_reads_clock)
from promptshift.sweep.config import SweepConfig, content_dict
from promptshift.vocabulary import REGION_CODE, REGIONS

# 2: the tables are stored column by column (numbers as arrays, names as codes into a list,
# prompt texts as one UTF-8 buffer); 1: one JSON document with every row of every table
PLAN_VERSION = 2
EXECUTION_ONLY = ("token_budget", "source")
_TARGET_CHUNK_BYTES = 8 << 20
TABLES = ("prompts", "pairs", "controls", "blocks")
TEXT_COLUMNS = {"prompts": ("text",)}  # stored as UTF-8 bytes + offsets, not as codes into a list of names


@dataclass
class ModelDims:
    """What the plan needs of the model to size arrays; read from its config (no weights)."""

    n_layers: int
    hidden: int
    n_heads: int
    vocab: int
    max_positions: int | None = None

    @classmethod
    def from_config(cls, cfg) -> ModelDims:
        get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)  # noqa: E731
        text = getattr(cfg, "text_config", None) or cfg
        g = lambda *n: get(*n) if text is cfg else next(  # noqa: E731
            (getattr(text, k) for k in n if getattr(text, k, None) is not None), None
        )
        return cls(
            n_layers=int(g("num_hidden_layers", "n_layer", "num_layers")),
            hidden=int(g("hidden_size", "n_embd", "d_model")),
            n_heads=int(g("num_attention_heads", "n_head")),
            vocab=int(g("vocab_size")),
            max_positions=g("max_position_embeddings", "n_positions"),
        )


class _OnFirstUse:
    """A plan array that may be given as a loader (a function of no arguments) and is then
    read when first used: a plan read from a store holds millions of tokens of which many
    readers (metrics, report) use none or one array."""

    def __init__(self, *default):
        self.default = default  # () for a required field, (value,) for an optional one

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:  # dataclasses ask the class for a field's default
            if self.default:
                return self.default[0]
            raise AttributeError(self.slot)
        value = obj.__dict__[self.slot]
        if callable(value):
            value = obj.__dict__[self.slot] = value()
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


@dataclass
class Plan:
    """Tables (pandas) plus flat token arrays; see docs/STORE.md for every column."""

    sweep: SweepConfig
    dims: ModelDims
    prompts: pd.DataFrame  # one row per unique rendered prompt, in store order
    pairs: pd.DataFrame  # one row per (user prompt, variant system prompt)
    controls: pd.DataFrame  # (prompt_a, prompt_b): two unrelated user prompts, both baseline
    blocks: pd.DataFrame  # block layout: prompt range, kept-token range, key range
    token_ids: np.ndarray = _OnFirstUse()  # (all tokens,) every token of every prompt, CSR by prompts.token_offset
    token_region: np.ndarray = _OnFirstUse()
    token_turn: np.ndarray = _OnFirstUse()
    meta: dict[str, Any] = field(default_factory=dict)
    # What `verify` rechecks the labels from (not part of the hash: both follow from the
    # text and the tokenizer); None for stores written before they were kept.
    token_offsets: np.ndarray | None = _OnFirstUse(None)  # (all tokens, 2) int32 character span of each token
    spans: np.ndarray | None = _OnFirstUse(None)  # (n_spans, 4) int32 rows (prompt, region code, start, end)
    version: int = PLAN_VERSION  # the stored format it was read from (1: the whole plan as one JSON document)

    # --- derived sizes -------------------------------------------------------------------
    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def kept_size(self) -> int:
        return int(self.blocks["kept_end"].iloc[-1]) if len(self.blocks) else 0

    @property
    def pattern_size(self) -> int:
        return int(self.blocks["pattern_end"].iloc[-1]) if len(self.blocks) else 0

    @property
    def key_size(self) -> int:
        return int(self.blocks["key_end"].iloc[-1]) if len(self.blocks) else 0

    def prompt_tokens(self, p: int) -> np.ndarray:
        r = self.prompts.iloc[p]
        return self.token_ids[r.token_offset : r.token_offset + r.n_tokens]

    def template_clock(self) -> TemplateClock | None:
        """The time the chat template saw when the plan was made (recorded only for
        templates that read the clock); every later rendering of this sweep uses it."""
        t = self.meta.get("template_time")
        return TemplateClock.from_iso(t) if t else None

    def prompt_regions(self, p: int) -> np.ndarray:
        r = self.prompts.iloc[p]
        return self.token_region[r.token_offset : r.token_offset + r.n_tokens]

    def kept_positions(self, p: int) -> np.ndarray:
        r = self.prompts.iloc[p]
        return np.arange(r.keep_start, r.n_tokens)

    def shard_blocks(self, shard: int, n_shards: int) -> list[int]:
        """Contiguous block ranges balanced by token count; deterministic in (plan, n)."""
        if not 0 <= shard < n_shards:
            raise ShardSpecError(f"shard {shard}/{n_shards} is out of range: use 0 <= I < N")
        cost = self.blocks["n_tokens_total"].to_numpy(dtype=np.float64)
        cum = np.concatenate([[0.0], np.cumsum(cost)])
        total = cum[-1]
        bounds = [int(np.searchsorted(cum, total * k / n_shards, side="left")) for k in range(n_shards + 1)]
        bounds[0], bounds[-1] = 0, len(cost)
        return list(range(bounds[shard], bounds[shard + 1]))

    def estimate_bytes(self, keep: str | None = None) -> int:
        keep = keep or self.sweep.keep
        n = self.prompts["n_tokens"].to_numpy()
        if keep == "last":
            kept = len(n)
        elif keep == "all":
            kept = int(n.sum())
        else:
            kept = int((n - self.prompts["suffix_start"].to_numpy()).sum())
        bytes_per = 2 if self.sweep.storage_dtype == "float16" else 4
        comps = self.sweep.components
        layers = self.dims.n_layers * len(comps)
        if self.meta.get("resid_pre_layer0_only"):
            layers -= self.dims.n_layers - 1  # resid_pre: layer 0 only, the rest is resid_post
        acts = kept * layers * self.dims.hidden * bytes_per
        attn = len(n) * self.dims.n_layers * self.dims.n_heads * (len(REGIONS) ** 2 + 2 * len(REGIONS) + 4) * 4
        last_rows = int(n.sum()) * self.dims.n_layers * self.dims.n_heads * 2
        logprobs = len(n) * self.dims.vocab * 4 if self.sweep.full_logprobs else 0
        return int(acts + attn + last_rows + logprobs)

    def hash(self, version: int | None = None, columns: dict[str, np.ndarray] | None = None) -> str:
        """Identity of what the store holds; execution-only settings (batch budget, how the
        sweep was named on the command line) do not change it.

        ``version``: the plan format whose hash to compute (default: the one this plan was
        read from). Version 2 hashes the stored columns' bytes; version 1 hashed one JSON
        document of every row, which is what stores planned before version 2 recorded.
        ``columns``: :meth:`columns`, when the caller has them already (a store's creation
        writes them too)."""
        version = self.version if version is None else version
        h = hashlib.sha256()
        if version == 1:
            d = self.to_json()
            d["plan_version"] = 1
            d["sweep"] = {k: v for k, v in content_dict(d["sweep"]).items() if k not in EXECUTION_ONLY}
            h.update(json.dumps(d, sort_keys=True).encode())
        else:
            head, arrays = self.header(), (self.columns() if columns is None else columns)
            head["sweep"] = {k: v for k, v in content_dict(head["sweep"]).items() if k not in EXECUTION_ONLY}
            h.update(json.dumps(head, sort_keys=True).encode())
            for name in sorted(arrays):
                a = np.ascontiguousarray(arrays[name])
                h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
                h.update(a.data)  # the buffer itself: no copy of a million prompts' bytes
        for a in (self.token_ids, self.token_region, self.token_turn):
            h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()

    def difference(self, other: Plan) -> str | None:
        """What makes ``other`` a different plan, in words (None: the same hash). A sweep that
        did not change but renders differently points at what drifted: the chat template or
        its clock, or the tokenizer (another version splits the same text differently)."""
        if self.hash() == other.hash(self.version):
            return None
        sa, sb = ({k: v for k, v in content_dict(x.sweep.to_dict()).items() if k not in EXECUTION_ONLY}
                  for x in (self, other))
        if sa != sb:
            keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
            return f"another sweep (it differs in {', '.join(keys)})"
        if self.dims.__dict__ != other.dims.__dict__:
            return "another model (its dimensions differ)"
        ta, tb = self.meta.get("template_time"), other.meta.get("template_time")
        if ta != tb:
            return f"the chat template's clock: planned at {ta}, now {tb}"
        pa, pb = self.prompts, other.prompts
        for p in range(min(len(pa), len(pb))):
            what = f"prompt {p} ({pa.system[p]}, {pa.user_id[p]})"
            if pa.text[p] != pb.text[p]:
                return f"the chat template renders {what} differently (another template or template version)"
            if not np.array_equal(self.prompt_tokens(p), other.prompt_tokens(p)):
                return (f"the tokenizer splits {what} differently (another tokenizer or tokenizers version; the "
                        "store's provenance records the versions it was planned with)")
            if not np.array_equal(self.prompt_regions(p), other.prompt_regions(p)):
                return f"the regions of {what} differ (a promptshift version that labels tokens differently)"
        return "other plan settings" if len(pa) == len(pb) else "another set of prompts"

    # --- serialisation (the store persists these) -----------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The whole plan but its token arrays as one JSON document, every row of every table
        (what `promptshift plan --out FILE` writes; stores keep :meth:`header` and
        :meth:`columns` instead)."""
        return {
            "plan_version": PLAN_VERSION,
            "sweep": self.sweep.to_dict(),
            "dims": self.dims.__dict__,
            "prompts": self.prompts.to_dict(orient="list"),
            "pairs": self.pairs.to_dict(orient="list"),
            "controls": self.controls.to_dict(orient="list"),
            "blocks": self.blocks.to_dict(orient="list"),
            "meta": self.meta,
        }

    def header(self) -> dict[str, Any]:
        """What a store keeps as JSON (``plan_json``): the sweep, model dimensions, meta, and
        each table's columns (name, how stored, dtype, and the names a coded column holds);
        the rows are in :meth:`columns`."""
        return {"plan_version": PLAN_VERSION, "sweep": self.sweep.to_dict(), "dims": self.dims.__dict__,
                "meta": self.meta, "tables": {t: _table_spec(t, getattr(self, t)) for t in TABLES}}

    def columns(self) -> dict[str, np.ndarray]:
        """Every table column as a flat array, named ``plan_<table>__<column>`` (a text column
        as ``__<column>__offsets`` (rows + 1,) int64 and ``__<column>__bytes`` UTF-8)."""
        out = {}
        for t in TABLES:
            df = getattr(self, t)
            for c in _table_spec(t, df)["columns"]:
                out.update(_encode_column(t, df[c["name"]], c))
        return out

    @classmethod
    def from_store(cls, header: dict[str, Any], read, names, *, text: bool = True) -> Plan:
        """A plan from a store's ``plan_json`` (``header``), ``read(name)`` (a stored array as
        numpy) and ``names`` (the store's array names). The token arrays are read when first
        used; ``text=False`` leaves the prompt texts out (the metrics never read them)."""
        v = header.get("plan_version")
        if v != PLAN_VERSION:
            raise SweepError(f"plan version {v} is not supported (expected {PLAN_VERSION} or 1)")
        tables = {}
        for t in TABLES:
            spec = header["tables"][t]
            cols = {c["name"]: _decode_column(t, c, read, spec["rows"]) for c in spec["columns"]
                    if text or c["name"] not in TEXT_COLUMNS.get(t, ())}
            tables[t] = pd.DataFrame(cols, index=pd.RangeIndex(spec["rows"]))
        has = set(names)
        return cls(
            sweep=SweepConfig.from_dict(header["sweep"]),
            dims=ModelDims(**header["dims"]),
            **tables,
            token_ids=lambda: np.asarray(read("plan_token_ids")),
            token_region=lambda: np.asarray(read("plan_token_region")),
            token_turn=lambda: np.asarray(read("plan_token_turn")),
            meta=header.get("meta", {}),
            token_offsets=(lambda: np.asarray(read("plan_token_offsets"))) if "plan_token_offsets" in has else None,
            spans=(lambda: np.asarray(read("plan_spans"))) if "plan_spans" in has else None,
        )

    @classmethod
    def from_json(cls, d: dict[str, Any], token_ids, token_region, token_turn, token_offsets=None,
                  spans=None) -> Plan:
        """A plan from :meth:`to_json` and its token arrays; also the plan of a store written
        with plan version 1 (whose hash it keeps computing the version 1 way)."""
        if d.get("plan_version") not in (1, PLAN_VERSION):
            raise SweepError(f"plan version {d.get('plan_version')} is not supported (expected {PLAN_VERSION} or 1)")
        return cls(
            sweep=SweepConfig.from_dict(d["sweep"]),
            dims=ModelDims(**d["dims"]),
            prompts=pd.DataFrame(d["prompts"]),
            pairs=pd.DataFrame(d["pairs"]),
            controls=pd.DataFrame(d["controls"]),
            blocks=pd.DataFrame(d["blocks"]),
            token_ids=np.asarray(token_ids),
            token_region=np.asarray(token_region),
            token_turn=np.asarray(token_turn),
            meta=d.get("meta", {}),
            token_offsets=None if token_offsets is None else np.asarray(token_offsets),
            spans=None if spans is None else np.asarray(spans),
            version=int(d["plan_version"]),
        )

    def summary(self) -> str:
        n = self.prompts["n_tokens"]
        lines = [
            f"sweep {self.sweep.name!r}: {len(self.sweep.variants)} system prompts"
            + (f" + {len(self.sweep.instruction_prefixes)} instruction prefixes" if self.sweep.instruction_prefixes
               else "")
            + f" x {len(self.sweep.user_prompts)} user prompts = {len(self.pairs)} pairs (+{len(self.controls)} "
            "control pairs)",
            *(["same instruction in both places: "
               + ", ".join(f"{a} (system) / {b} (prefix)" for a, b in self.sweep.placements())]
              if self.sweep.placements() else []),
            f"baseline: {self.meta['baseline']}"
            + (f" (template injects default system prompt: {self.meta['injected_system']!r})"
               if self.meta.get("baseline_carries_default") else ""),
            f"unique prompts: {self.n_prompts}, tokens: {int(n.sum())} (max {int(n.max())}, mean {n.mean():.1f})",
            f"blocks: {self.n_blocks} of <= {self.sweep.block_prompts} prompts",
            "estimated store size: "
            + ", ".join(f"keep={k}: {_human(self.estimate_bytes(k))}" for k in ("last", "suffix", "all")),
        ]
        return "\n".join(lines)


def _table_spec(table: str, df: pd.DataFrame) -> dict[str, Any]:
    """How each column of a plan table is stored: ``array`` (numbers, as they are), ``text``
    (UTF-8 bytes + offsets) or ``coded`` (int32 codes into ``names``, for the few distinct
    names a column repeats: kinds, system prompts, user prompt ids, categories)."""
    cols = []
    for name in df.columns:
        col = df[name]
        if name in TEXT_COLUMNS.get(table, ()):
            cols.append({"name": name, "stored": "text"})
        elif pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype):
            cols.append({"name": name, "stored": "array", "dtype": np.dtype(col.dtype).str})
        else:
            codes, names = pd.factorize(col, use_na_sentinel=True)
            cols.append({"name": name, "stored": "coded", "dtype": str(col.dtype),
                         "names": [None if pd.isna(x) else str(x) for x in names]})
    return {"rows": len(df), "columns": cols}


def _encode_column(table: str, col: pd.Series, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    key = f"plan_{table}__{spec['name']}"
    if spec["stored"] == "array":
        return {key: col.to_numpy(dtype=np.dtype(spec["dtype"]))}
    if spec["stored"] == "coded":
        codes, _ = pd.factorize(col, use_na_sentinel=True)  # the same order as _table_spec's names
        return {key: codes.astype(np.int32)}
    import pyarrow as pa

    # the Arrow buffers of pandas' string column as they are (no Python string per row)
    arr = pa.array(col, type=pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        raise SweepError(f"plan column {table}.{spec['name']} holds a missing text")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]] if len(arr) else \
        np.zeros(0, np.uint8)
    return {key + "__offsets": offsets - offsets[0], key + "__bytes": data}


def _decode_column(table: str, spec: dict[str, Any], read, rows: int):
    key = f"plan_{table}__{spec['name']}"
    if spec["stored"] == "array":
        return np.asarray(read(key), dtype=np.dtype(spec["dtype"]))
    if spec["stored"] == "coded":
        names = np.asarray(list(spec["names"]) + [None], dtype=object)
        return pd.Series(names[np.asarray(read(key), dtype=np.int64)], dtype=spec["dtype"])
    import pyarrow as pa

    offsets = np.asarray(read(key + "__offsets"), dtype=np.int64)
    data = np.asarray(read(key + "__bytes"), dtype=np.uint8)
    arr = pa.LargeStringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(data))
    return pd.Series(arr, dtype="str")  # the Arrow buffers as they are: no Python string per row


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _common_suffix_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    eq = a[len(a) - n :][::-1] == b[len(b) - n :][::-1]
    return int(n if eq.all() else np.argmin(eq))


def _token_chunk(keep: str, dims: ModelDims, block_prompts: int, storage_dtype: str) -> int:
    if keep == "last":
        return block_prompts
    per_token = dims.n_layers * dims.hidden * (2 if storage_dtype == "float16" else 4)
    c = 16
    while c * 2 * per_token <= _TARGET_CHUNK_BYTES and c < 4096:
        c *= 2
    return c


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        a, b = str(spec).split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ShardSpecError(f"bad shard spec {spec!r}: use I/N with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ShardSpecError(f"bad shard spec {spec!r}: need N >= 1 and 0 <= I < N")
    return i, n


def generated_tokens(sweep: SweepConfig) -> int:
    """How many tokens extraction generates after each prompt."""
    return max(sweep.max_new_tokens, sweep.behaviour.max_new_tokens or 0)


def build_plan(sweep: SweepConfig, tok, dims: ModelDims, *, clock: TemplateClock | None = None,
               compose: bool = True) -> Plan:
    """Render every unique prompt once, pair them, align suffixes and lay out blocks.

    ``clock``: the time a chat template that reads the clock sees (default: now); the plan
    records it, and a store's plan is rebuilt with the one it recorded (``Plan.template_clock``).
    ``compose``: take each system-prompt variant from one rendering per system prompt and one
    per user prompt where that is provably the same prompt (:mod:`promptshift.sweep.compose`;
    a million-pair sweep plans in minutes instead of hours); False renders every prompt alone.
    Both give the same plan. Raises SweepError for a prompt that, with the generated tokens,
    does not fit the model's context (``dims.max_positions``: learned positions crash past
    it, rotary ones leave the trained range), TemplateError for a template whose regions
    cannot be labelled."""
    from promptshift.sweep.compose import Composer, Item

    clock = clock or TemplateClock.now()
    injected = injected_default_system(tok, clock)
    baseline = sweep.baseline
    n_new = generated_tokens(sweep)

    def conv(system_text: str | None, empty: bool, user: str, prefix: str | None = None):
        return conversation(tok, system_text, user, no_system_role=sweep.no_system_role, empty_system=empty,
                            clock=clock, prefix=prefix, prefix_separator=sweep.prefix_separator)

    def baseline_conv(user: str, prefix: str | None = None):
        if baseline == "no_system_turn":
            return conv(None, False, user, prefix)
        if baseline == "empty_system":
            return conv(None, True, user, prefix)
        named = next(s for s in sweep.system_prompts if s.name == baseline)
        return conv(named.text, False, user, prefix)

    users = sweep.user_prompts
    U = len(users)
    acc = _Prompts(n_new, dims.max_positions, [u.id for u in users])
    for j, u in enumerate(users):
        acc.alone("baseline", baseline, j, render(tok, baseline_conv(u.text), clock=clock))
    base = np.arange(U)  # prompt (before dedup) of each user prompt's baseline
    # variants: one item per system prompt, then one per instruction prefix (label
    # `prefix:<name>`: a prefix may share its name with the system prompt that holds the same
    # instruction), each paired with every user prompt; items are (label, instruction,
    # placement, text)
    items = [(s.name, s.name, "system", s.text) for s in sweep.variants]
    items += [(prefix_label(x.name), x.name, "prefix", x.text) for x in sweep.instruction_prefixes]
    n_sys = len(sweep.variants)
    # system prompts are composed; prefixes change the user turn and are rendered alone
    composer = (Composer(tok, clock, [it[3] for it in items[:n_sys]], [u.text for u in users],
                         lambda s, u: conv(s, False, u)) if compose and n_sys else None)
    first_variant = acc.n
    for i, (label, _, placement, text) in enumerate(items):
        if placement == "system" and composer is not None and composer.shape is not None:
            it = composer.item(i)
        else:
            messages = ((lambda u, t=text: conv(t, False, u.text)) if placement == "system"
                        else (lambda u, t=text: baseline_conv(u.text, t)))
            it = Item(-1, np.full(U, -1, np.int64), [None] * U,
                      {j: render(tok, messages(u), clock=clock) for j, u in enumerate(users)})
        acc.item("variant", label, it, composer)
    keep, index = acc.dedup()  # identical renderings are computed once
    variant = index[first_variant:].reshape(len(items), U)  # (items, U) prompt of each pair's variant
    baseline_of = index[base]  # (U,)
    pairs = acc.pairs(items, variant, baseline_of, keep, users, placement=bool(sweep.instruction_prefixes))

    prompts, token_cols, spans = acc.table(keep)
    prompts, blocks, (tchunk, kchunk, pchunk) = layout(prompts, sweep, dims)

    # Controls: each user prompt's baseline against the next user prompt's (cyclic).
    base_list = baseline_of.tolist()
    ctrl = [dict(control=i, prompt_a=base_list[i], prompt_b=base_list[(i + 1) % len(base_list)])
            for i in range(len(base_list)) if len(base_list) > 1]
    meta = dict(
        baseline=baseline,
        injected_system=injected,
        baseline_carries_default=bool(injected) and baseline == "no_system_turn",
        token_chunk=tchunk,
        key_chunk=kchunk,
        pattern_chunk=pchunk,
        regions=list(REGIONS),
        bos_token_id=tok.bos_token_id,
        # resid_pre of layer l > 0 is resid_post of layer l - 1 (the engine checks this bit
        # for bit before extracting): the store keeps layer 0 only and derives the rest
        resid_pre_layer0_only="resid_pre" in sweep.components and "resid_post" in sweep.components,
    )
    if template_reads_clock(tok):  # what the template saw, so that every later rendering matches
        meta["template_time"] = clock.iso()
    if meta["baseline_carries_default"]:
        warnings.warn(
            f"baseline `no_system_turn` carries the template's default system prompt {injected!r}; "
            "use `baseline: empty_system` to compare against no system text",
            stacklevel=2,
        )
    return Plan(
        sweep=sweep,
        dims=dims,
        prompts=prompts,
        pairs=pairs,
        controls=pd.DataFrame(ctrl, columns=["control", "prompt_a", "prompt_b"]),
        blocks=blocks,
        token_ids=token_cols["ids"],
        token_region=token_cols["regions"],
        token_turn=token_cols["turns"],
        meta=meta,
        token_offsets=token_cols["offsets"],
        spans=spans,
    )


class _Prompts:
    """Every prompt of a plan in the order the planner meets them (baselines, then the
    variants of each item), before identical renderings are merged. A prompt is one or two
    *parts* (:class:`promptshift.sweep.compose.Part`: tokens, labels, offsets and spans of a
    piece of text) from a pool: a rendering of its own, or a shared prefix and suffix; its
    columns are kept as arrays, so a million prompts cost a few numbers each."""

    def __init__(self, n_new: int, context: int | None, user_ids: list[str]):
        from promptshift.sweep.compose import whole

        self.whole, self.n_new, self.context, self.user_ids = whole, n_new, context, user_ids
        self.parts: list = []  # the pool
        self.part_of: dict[int, int] = {}  # id(shared Part) -> pool index
        self.cols: dict[str, list[np.ndarray]] = {k: [] for k in (
            "kind", "label", "user", "n_tokens", "suffix_start", "n_system", "a", "b", "shift")}
        self.labels: list[str] = []
        self.texts: list = []  # Arrow arrays, one per batch of prompts
        self.digests: list[bytes] = []
        self.n = 0

    def _pool(self, part) -> int:
        k = self.part_of.get(id(part))
        if k is None:
            k = self.part_of[id(part)] = len(self.parts)
            self.parts.append(part)
        return k

    def _label(self, label: str) -> int:
        if not self.labels or self.labels[-1] != label:
            self.labels.append(label)
        return len(self.labels) - 1

    def _push(self, texts: list[str], **cols) -> None:
        import hashlib

        import pyarrow as pa

        for k, v in cols.items():
            self.cols[k].append(np.asarray(v, np.int64).reshape(-1))
        self.texts.append(pa.array(texts, type=pa.large_string()))
        self.digests += [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]
        self.n += len(texts)

    def _check(self, n_tokens: int, label: str, j: int) -> None:
        check_context(n_tokens, self.n_new, self.context, f"prompt ({label}, {self.user_ids[j]})")

    def alone(self, kind: str, label: str, j: int, r: Rendered) -> None:
        """A prompt rendered on its own."""
        self._check(len(r.ids), label, j)
        span = _last_user_span(r)
        if span is None:
            raise TemplateError(f"no user prompt found when rendering ({label}, {self.user_ids[j]}): the "
                               "template renders an empty user message differently from a non-empty one")
        self._push([r.text], kind=kind == "variant", label=self._label(label), user=j, n_tokens=len(r.ids),
                    suffix_start=span[0], n_system=int((r.regions == REGION_CODE["system"]).sum()),
                    a=self._pool(self.whole(r)), b=-1, shift=0)

    def item(self, kind: str, label: str, it, composer) -> None:
        """The variants of one item, composed or rendered alone, in user prompt order."""
        U = len(it.suffix)
        comp = it.suffix >= 0
        n_tok = np.zeros(U, np.int64)
        for j in range(U):  # in order, so that the first prompt that does not fit is the one named
            n_tok[j] = (len(composer.prefixes[it.prefix]) + len(composer.suffixes[j]) if comp[j]
                        else len(it.alone[j].ids))
            self._check(int(n_tok[j]), label, j)
        cols = {k: np.zeros(U, np.int64) for k in ("suffix_start", "n_system", "a", "b", "shift")}
        texts = []
        if comp.any():
            p = composer.prefixes[it.prefix]
            a = self._pool(p)
        for j in range(U):
            if comp[j]:
                s = composer.suffixes[j]
                cols["suffix_start"][j] = len(p) + s.first_user
                cols["n_system"][j] = p.n_system + s.n_system
                cols["a"][j], cols["b"][j], cols["shift"][j] = a, self._pool(s), len(p.text)
                texts.append(it.texts[j])
            else:
                r = it.alone[j]
                span = _last_user_span(r)
                if span is None:
                    raise TemplateError(f"no user prompt found when rendering ({label}, {self.user_ids[j]}): the "
                               "template renders an empty user message differently from a non-empty one")
                cols["suffix_start"][j] = span[0]
                cols["n_system"][j] = int((r.regions == REGION_CODE["system"]).sum())
                cols["a"][j], cols["b"][j], cols["shift"][j] = self._pool(self.whole(r)), -1, 0
                texts.append(r.text)
        self._push(texts, kind=np.full(U, kind == "variant"), label=np.full(U, self._label(label)),
                   user=np.arange(U), n_tokens=n_tok, **cols)

    def col(self, name: str) -> np.ndarray:
        c = self.cols[name]
        if len(c) > 1:
            self.cols[name] = c = [np.concatenate(c)]
        return c[0] if c else np.zeros(0, np.int64)

    def dedup(self) -> tuple[np.ndarray, np.ndarray]:
        """(kept: the prompts that are first with their text, index: the plan prompt of each
        prompt met), merging identical renderings (by a 128-bit digest of the text, and the
        texts compared)."""
        d = np.frombuffer(b"".join(self.digests), dtype="V16")
        _, first, inv = np.unique(d, return_index=True, return_inverse=True)
        head = first[inv.reshape(-1)]  # (n,) first prompt with the same digest
        keep = np.flatnonzero(head == np.arange(self.n))
        rank = np.full(self.n, -1, np.int64)
        rank[keep] = np.arange(len(keep))
        dup = np.flatnonzero(head != np.arange(self.n))
        if dup.size:
            texts = self.all_texts()
            for k in dup:
                if texts[int(k)].as_py() != texts[int(head[k])].as_py():
                    raise SweepError("two different prompts have the same 128-bit digest; report this")
        return keep, rank[head]

    def all_texts(self):
        import pyarrow as pa

        if len(self.texts) > 1:
            self.texts = [pa.concat_arrays(self.texts)]
        return self.texts[0] if self.texts else pa.array([], type=pa.large_string())

    def tokens(self, p: int) -> np.ndarray:
        """Token ids of prompt ``p`` (before dedup)."""
        a, b = int(self.col("a")[p]), int(self.col("b")[p])
        return np.concatenate([self.parts[a].ids, self.parts[b].ids if b >= 0 else self.parts[a].ids[:0]])

    def pairs(self, items, variant: np.ndarray, baseline_of: np.ndarray, first_of: np.ndarray, users, *,
              placement: bool = False) -> pd.DataFrame:
        """One row per (item, user prompt), with the aligned suffix of variant and baseline.
        ``items``: (label, instruction, placement, text) per item; ``first_of``: the prompt met
        first with each plan prompt's text; ``placement``: add the ``placement`` and
        ``instruction`` columns (only sweeps with instruction prefixes have them, so the plan
        and hash of other sweeps stay as they were)."""
        U = len(users)
        if not len(items) or not U:
            return pd.DataFrame()
        n_tok, sst = self.col("n_tokens"), self.col("suffix_start")
        bases = [int(first_of[baseline_of[j]]) for j in range(U)]
        b_tail = [self.tokens(k)[int(sst[k]):] for k in bases]  # (U,) baseline from its user tokens
        cache: dict[int, int | None] = {}  # pool index of a suffix part -> aligned length with its baseline
        b_col, shift = self.col("b"), self.col("shift")
        out = {k: [] for k in ("v_suffix_start", "b_suffix_start", "suffix_len")}
        for i, (label, *_) in enumerate(items):
            for j in range(U):
                v, b = int(first_of[variant[i, j]]), bases[j]
                n_al = None
                if b_col[v] >= 0 and shift[v] > 0:  # composed: its user part is shared by the user's variants
                    key = (int(b_col[v]), j)
                    if key not in cache:
                        tail = self.tokens(v)[int(sst[v]):]
                        cache[key] = len(tail) if np.array_equal(tail, b_tail[j]) else None
                    n_al = cache[key]
                if n_al is None:
                    tv, tb = self.tokens(v), self.tokens(b)
                    lv, lb = len(tv) - int(sst[v]), len(tb) - int(sst[b])
                    if lv == lb and np.array_equal(tv[int(sst[v]):], tb[int(sst[b]):]):
                        n_al = lv
                    else:  # tokenization merged across the user boundary: align the common tail
                        n_al = min(_common_suffix_len(tv, tb), lv, lb)
                        if n_al == 0:
                            raise TemplateError(f"variant and baseline of ({label}, {users[j].id}) share no suffix "
                                                "tokens")
                out["v_suffix_start"].append(int(n_tok[v]) - n_al)
                out["b_suffix_start"].append(int(n_tok[b]) - n_al)
                out["suffix_len"].append(n_al)
        n_items = len(items)
        per_item = lambda k: pd.Series(np.repeat(np.asarray([it[k] for it in items], dtype=object), U),  # noqa: E731
                                       dtype="str")
        extra = {"placement": per_item(2), "instruction": per_item(1)} if placement else {}
        return pd.DataFrame({
            "pair": np.arange(n_items * U, dtype=np.int64),
            "user_id": pd.Series(np.tile(np.asarray([u.id for u in users], dtype=object), n_items), dtype="str"),
            "system": per_item(0),
            "variant": variant.reshape(-1).astype(np.int64),
            "baseline": np.tile(baseline_of, n_items).astype(np.int64),
            "v_suffix_start": np.asarray(out["v_suffix_start"], np.int64),
            "b_suffix_start": np.asarray(out["b_suffix_start"], np.int64),
            "suffix_len": np.asarray(out["suffix_len"], np.int64),
            "category": pd.Series(np.tile(np.asarray([u.category for u in users], dtype=object), n_items),
                                  dtype="str"),
            **extra,
        })

    def table(self, keep: np.ndarray, chunk: int = 4096):
        """(prompts table, token arrays, content spans) of the kept prompts, in order."""
        labels = np.asarray(self.labels, dtype=object)
        texts = self.all_texts()
        if len(keep) < len(texts):
            texts = texts.take(keep)
        self.texts = []  # the prompts table holds them now
        prompts = pd.DataFrame({
            "prompt": np.arange(len(keep), dtype=np.int64),
            "kind": pd.Series(np.where(self.col("kind")[keep] == 1, "variant", "baseline").astype(object),
                              dtype="str"),
            "system": pd.Series(labels[self.col("label")[keep]], dtype="str"),
            "user_id": pd.Series(np.asarray(self.user_ids, dtype=object)[self.col("user")[keep]], dtype="str"),
            "text": pd.Series(texts, dtype="str"),
            "n_tokens": self.col("n_tokens")[keep],
            "suffix_start": self.col("suffix_start")[keep],
            "n_system_tokens": self.col("n_system")[keep],
        })
        # the pool, flat: every part's tokens and spans one after the other, in the plan's dtypes
        parts = self.parts
        lens = np.asarray([len(p) for p in parts], np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        dtypes = {"ids": np.int32, "regions": np.int8, "turns": np.int16, "offsets": np.int32}
        pool = {k: np.concatenate([getattr(p, k) for p in parts]).astype(dt) if parts else np.zeros(0, dt)
                for k, dt in dtypes.items()}
        pool["offsets"] = pool["offsets"].reshape(-1, 2)
        n_sp = np.asarray([len(p.spans) for p in parts], np.int64)
        sp_starts = np.concatenate([[0], np.cumsum(n_sp)[:-1]]).astype(np.int64)
        sp_pool = np.concatenate([p.spans for p in parts]).astype(np.int32) if parts else np.zeros((0, 3), np.int32)
        a, b, shift = self.col("a")[keep], self.col("b")[keep], self.col("shift")[keep]
        # (prompt, piece): piece 0 the prompt's first part, piece 1 its suffix (none: a part of length 0)
        part = np.stack([a, np.where(b >= 0, b, 0)], 1).reshape(-1)  # (2P,)
        used = np.stack([np.ones_like(a, bool), b >= 0], 1).reshape(-1)
        shifts = np.stack([np.zeros_like(shift), shift], 1).reshape(-1)
        n = np.where(used, lens[part], 0)  # (2P,) tokens of each piece
        m = np.where(used, n_sp[part], 0)  # (2P,) spans of each piece
        out = {k: np.empty((int(n.sum()),) + pool[k].shape[1:], pool[k].dtype) for k in pool}
        spans = np.empty((int(m.sum()), 4), np.int32)
        to, so = np.concatenate([[0], np.cumsum(n)]), np.concatenate([[0], np.cumsum(m)])
        for c0 in range(0, len(part), 2 * chunk):  # bounded temporaries on plans of millions of prompts
            c1 = min(c0 + 2 * chunk, len(part))
            pc, nc, mc, sc = part[c0:c1], n[c0:c1], m[c0:c1], shifts[c0:c1]
            idx = np.repeat(starts[pc] - np.cumsum(nc) + nc, nc) + np.arange(nc.sum())  # (tokens,) into the pool
            for k in ("ids", "regions", "turns"):
                out[k][to[c0] : to[c1]] = pool[k][idx]
            out["offsets"][to[c0] : to[c1]] = pool["offsets"][idx] + np.repeat(sc, nc).astype(np.int32)[:, None]
            sidx = np.repeat(sp_starts[pc] - np.cumsum(mc) + mc, mc) + np.arange(mc.sum())
            dst = spans[so[c0] : so[c1]]
            dst[:, 0] = np.repeat(np.arange(c0, c1) // 2, mc)
            dst[:, 1:] = sp_pool[sidx]
            dst[:, 2:] += np.repeat(sc, mc).astype(np.int32)[:, None]
        return prompts, out, spans


def layout(prompts: pd.DataFrame, sweep: SweepConfig, dims: ModelDims):
    """Kept positions, token offsets and the block layout of the store, for prompts in store
    order (columns prompt .. n_system_tokens): every block of ``block_prompts`` consecutive
    prompts starts its kept tokens, keys and pattern entries chunk-aligned, so it owns whole
    chunks of every array it writes. Returns (prompts with the layout columns, blocks,
    (token_chunk, key_chunk, pattern_chunk)); vectorised over prompts and blocks."""
    n_tok = prompts["n_tokens"].to_numpy(np.int64)
    if sweep.keep == "last":
        prompts["keep_start"] = n_tok - 1
    elif sweep.keep == "all":
        prompts["keep_start"] = np.zeros(len(n_tok), np.int64)
    else:
        prompts["keep_start"] = prompts["suffix_start"].to_numpy(np.int64)
    # prefix_len: tokens before the user turn; identical for all prompts of one system
    # prompt when the template is prefix-stable (extract checks token equality before reuse).
    prompts["prefix_len"] = prompts["suffix_start"].to_numpy(np.int64)
    prompts["token_offset"] = np.concatenate([[0], np.cumsum(n_tok)[:-1]]).astype(np.int64)

    tchunk = _token_chunk(sweep.keep, dims, sweep.block_prompts, sweep.storage_dtype)
    kchunk = 1024
    pchunk = 1 << 16
    n_kept = n_tok - prompts["keep_start"].to_numpy(np.int64)
    sizes = {"kept": (n_kept, tchunk), "key": (n_tok, kchunk),
             "pattern": (n_tok**2 if sweep.full_attention_layers else np.zeros_like(n_tok), pchunk)}
    P, bp = len(n_tok), sweep.block_prompts
    block = np.arange(P, dtype=np.int64) // bp  # (P,)
    p0 = np.arange(0, P, bp, dtype=np.int64)  # (B,) first prompt of each block
    blocks = {"block": np.arange(len(p0), dtype=np.int64), "prompt_start": p0,
              "prompt_end": np.minimum(p0 + bp, P)}
    starts = {}
    for name, (n, chunk) in sizes.items():
        within = np.cumsum(n) - n  # (P,) before each prompt, from the sweep's start
        used = np.add.reduceat(n, p0) if P else n[:0]  # (B,) per block
        # a block starts where the previous one ended, rounded up to a whole chunk
        b0 = np.concatenate([[0], np.cumsum(-(-used // chunk) * chunk)[:-1]]).astype(np.int64)
        starts[name] = b0[block] + within - within[p0][block]
        blocks[f"{name}_start"], blocks[f"{name}_end"] = b0, b0 + -(-used // chunk) * chunk
    prompts["block"] = block
    prompts["kept_start"] = starts["kept"]
    prompts["key_start"] = starts["key"]
    prompts["pattern_start"] = starts["pattern"]
    prompts["n_kept"] = n_kept
    blocks["n_tokens_total"] = np.add.reduceat(n_tok, p0) if P else n_tok[:0]
    order = ["block", "prompt_start", "prompt_end", "kept_start", "kept_end", "key_start", "key_end", "pattern_start",
             "pattern_end", "n_tokens_total"]
    return prompts, pd.DataFrame({k: blocks[k] for k in order}), (tchunk, kchunk, pchunk)


def check_context(n_tokens: int, n_new: int, context: int | None, what: str) -> None:
    """Refuse a prompt that, with ``n_new`` generated tokens, needs more positions than the
    model's context (None: unknown, not checked). Generation is not clipped: a shorter
    continuation for some prompts would bias the output-change measures."""
    if context and n_tokens + n_new > context:
        room = context - n_tokens
        fix = (f"lower `max_new_tokens` to at most {room} or shorten the prompt" if room > 0
               else "shorten it")
        raise SweepError(
            f"{what} has {n_tokens} tokens and generation adds {n_new}: {n_tokens + n_new} positions, more than the "
            f"model's context of {context}; {fix}, or drop it with `select`"
        )


def _last_user_span(r: Rendered) -> tuple[int, int] | None:
    """Token span of the last user message's content (the aligned suffix starts here). An
    empty user prompt has no tokens: its span is empty, at the first token after its place
    in the rendering (None when the template left no place for it)."""
    is_user = r.regions == REGION_CODE["user"]
    if is_user.any():
        last_turn = r.turns[is_user].max()
        idx = np.flatnonzero(is_user & (r.turns == last_turn))
        return int(idx[0]), int(idx[-1]) + 1
    users = [a for a in r.anchors if a.region == "user"]
    if not users:
        return None
    at = users[-1].start
    after = np.flatnonzero(r.offsets[:, 1] > at)  # first token that carries text at or after the place
    first = int(after[0]) if after.size else len(r.ids)
    return first, first


def prefix_label(name: str) -> str:
    """The `system` label of an instruction prefix's pairs and prompts in the plan and in
    every table: distinct from a system prompt of the same name."""
    return f"prefix:{name}"


def pair_placement(pairs: pd.DataFrame) -> pd.DataFrame:
    """``pairs`` with ``placement`` (system or prefix) and ``instruction`` (the system
    prompt's or prefix's name) columns; plans without instruction prefixes lack them (their
    plan hash predates them), and every pair of such a plan is a system pair."""
    out = pairs.copy()
    if "placement" not in out.columns:
        out["placement"] = "system"
        out["instruction"] = out["system"] if "system" in out.columns else []
    return out


def load_plan_inputs(sweep: SweepConfig):
    """Tokenizer and model dims for a sweep, without loading weights."""
    from transformers import AutoConfig

    from promptshift.models import load_tokenizer, materialize, resolve_source

    tok = load_tokenizer(sweep.model, sweep.chat_template, sweep.trust_remote_code)
    loc = materialize(resolve_source(sweep.model))
    cfg = AutoConfig.from_pretrained(loc, trust_remote_code=sweep.trust_remote_code)
    return tok, ModelDims.from_config(cfg)

"""The plan: every unique rendered prompt, every pair, the aligned suffixes, and the
block layout of the store, all computed from the tokenizer before any model runs.

Because token counts are known here, every store array is created at its final size
and every block owns a fixed, chunk-aligned region; extraction workers never create or
edit metadata, so any number of them can fill one store at once.
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
from promptshift.sweep.chat import (REGION_CODE, REGIONS, Rendered, TemplateClock, conversation,
                                    injected_default_system, render, template_reads_clock)
from promptshift.sweep.config import SweepConfig, content_dict

PLAN_VERSION = 1
EXECUTION_ONLY = ("token_budget", "source")
_TARGET_CHUNK_BYTES = 8 << 20


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


@dataclass
class Plan:
    """Tables (pandas) plus flat token arrays; see docs/STORE.md for every column."""

    sweep: SweepConfig
    dims: ModelDims
    prompts: pd.DataFrame  # one row per unique rendered prompt, in store order
    pairs: pd.DataFrame  # one row per (user prompt, variant system prompt)
    controls: pd.DataFrame  # (prompt_a, prompt_b): two unrelated user prompts, both baseline
    blocks: pd.DataFrame  # block layout: prompt range, kept-token range, key range
    token_ids: np.ndarray  # (all tokens,) every token of every prompt, CSR by prompts.token_offset
    token_region: np.ndarray
    token_turn: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    # What `verify` rechecks the labels from (not part of the hash: both follow from the
    # text and the tokenizer); None for stores written before they were kept.
    token_offsets: np.ndarray | None = None  # (all tokens, 2) int32 character span of each token in its prompt's text
    spans: np.ndarray | None = None  # (n_spans, 4) int32 rows (prompt, region code, start, end): message contents

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

    def hash(self) -> str:
        """Identity of what the store holds; execution-only settings (batch budget, how the
        sweep was named on the command line) do not change it."""
        d = self.to_json()
        d["sweep"] = {k: v for k, v in content_dict(d["sweep"]).items() if k not in EXECUTION_ONLY}
        h = hashlib.sha256()
        h.update(json.dumps(d, sort_keys=True).encode())
        for a in (self.token_ids, self.token_region, self.token_turn):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def difference(self, other: Plan) -> str | None:
        """What makes ``other`` a different plan, in words (None: the same hash). A sweep that
        did not change but renders differently points at what drifted: the chat template or
        its clock, or the tokenizer (another version splits the same text differently)."""
        if self.hash() == other.hash():
            return None
        a, b = (self.to_json(), other.to_json())
        sa, sb = ({k: v for k, v in content_dict(x["sweep"]).items() if k not in EXECUTION_ONLY} for x in (a, b))
        if sa != sb:
            keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
            return f"another sweep (it differs in {', '.join(keys)})"
        if a["dims"] != b["dims"]:
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

    @classmethod
    def from_json(cls, d: dict[str, Any], token_ids, token_region, token_turn, token_offsets=None,
                  spans=None) -> Plan:
        if d.get("plan_version") != PLAN_VERSION:
            raise SweepError(f"plan version {d.get('plan_version')} is not supported (expected {PLAN_VERSION})")
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
        )

    def summary(self) -> str:
        n = self.prompts["n_tokens"]
        lines = [
            f"sweep {self.sweep.name!r}: {len(self.sweep.variants)} system prompts"
            + (f" + {len(self.sweep.instruction_prefixes)} instruction prefixes" if self.sweep.instruction_prefixes
               else "")
            + f" x {len(self.sweep.user_prompts)} user prompts = {len(self.pairs)} pairs (+{len(self.controls)} "
            "control pairs)",
            *([f"same instruction in both places: "
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


def build_plan(sweep: SweepConfig, tok, dims: ModelDims, *, clock: TemplateClock | None = None) -> Plan:
    """Render every unique prompt once, pair them, align suffixes and lay out blocks.

    ``clock``: the time a chat template that reads the clock sees (default: now); the plan
    records it, and a store's plan is rebuilt with the one it recorded (``Plan.template_clock``).
    Raises SweepError for a prompt that, with the generated tokens, does not fit the model's
    context (``dims.max_positions``: learned positions crash past it, rotary ones leave the
    trained range), TemplateError for a template whose regions cannot be labelled."""
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

    rows: list[dict[str, Any]] = []
    rendered: list[Rendered] = []
    by_text: dict[str, int] = {}

    def add(kind: str, system: str, user_id: str, messages) -> int:
        r = render(tok, messages, clock=clock)
        if r.text in by_text:  # identical renderings are computed once
            return by_text[r.text]
        check_context(len(r.ids), n_new, dims.max_positions, f"prompt ({system}, {user_id})")
        user_span = _last_user_span(r)
        if user_span is None:
            raise TemplateError(f"no user prompt found when rendering ({system}, {user_id}): the template renders an "
                                "empty user message differently from a non-empty one")
        idx = len(rows)
        by_text[r.text] = idx
        rows.append(
            dict(prompt=idx, kind=kind, system=system, user_id=user_id, text=r.text, n_tokens=len(r.ids),
                 suffix_start=user_span[0], n_system_tokens=int((r.regions == REGION_CODE["system"]).sum()))
        )
        rendered.append(r)
        return idx

    base_of: dict[str, int] = {}
    for u in sweep.user_prompts:
        base_of[u.id] = add("baseline", baseline, u.id, baseline_conv(u.text))
    pair_rows = []
    # system prompts, then instruction prefixes (label `prefix:<name>`: a prefix may share its
    # name with the system prompt that holds the same instruction)
    variants = [(s.name, s.name, "system", lambda u, s=s: conv(s.text, False, u.text)) for s in sweep.variants]
    variants += [(prefix_label(x.name), x.name, "prefix", lambda u, x=x: baseline_conv(u.text, x.text))
                 for x in sweep.instruction_prefixes]
    for label, instruction, placement, messages in variants:
        for u in sweep.user_prompts:
            v = add("variant", label, u.id, messages(u))
            b = base_of[u.id]
            rv, rb = rendered[v], rendered[b]
            sv, sb = rows[v]["suffix_start"], rows[b]["suffix_start"]
            lv, lb = len(rv.ids) - sv, len(rb.ids) - sb
            if lv == lb and np.array_equal(rv.ids[sv:], rb.ids[sb:]):
                n_al = lv
            else:  # tokenization merged across the user boundary: align the common tail
                n_al = min(_common_suffix_len(rv.ids, rb.ids), lv, lb)
                if n_al == 0:
                    raise TemplateError(f"variant and baseline of ({label}, {u.id}) share no suffix tokens")
            row = dict(pair=len(pair_rows), user_id=u.id, system=label, variant=v, baseline=b,
                       v_suffix_start=len(rv.ids) - n_al, b_suffix_start=len(rb.ids) - n_al, suffix_len=n_al,
                       category=u.category)
            if sweep.instruction_prefixes:  # only then: the plan (and hash) of other sweeps stays as it was
                row.update(placement=placement, instruction=instruction)
            pair_rows.append(row)
    prompts = pd.DataFrame(rows)
    if sweep.keep == "last":
        prompts["keep_start"] = prompts["n_tokens"] - 1
    elif sweep.keep == "all":
        prompts["keep_start"] = 0
    else:
        prompts["keep_start"] = prompts["suffix_start"]
    # prefix_len: tokens before the user turn; identical for all prompts of one system
    # prompt when the template is prefix-stable (extract checks token equality before reuse).
    prompts["prefix_len"] = prompts["suffix_start"]
    n_tok = prompts["n_tokens"].to_numpy()
    prompts["token_offset"] = np.concatenate([[0], np.cumsum(n_tok)[:-1]]).astype(np.int64)

    # Blocks: consecutive prompts; each block's kept tokens and keys start chunk-aligned.
    tchunk = _token_chunk(sweep.keep, dims, sweep.block_prompts, sweep.storage_dtype)
    kchunk = 1024
    pchunk = 1 << 16
    full = bool(sweep.full_attention_layers)
    n_kept = (prompts["n_tokens"] - prompts["keep_start"]).to_numpy()
    block_rows, kept_pos, key_pos, pat_pos = [], 0, 0, 0
    prompts["block"] = 0
    prompts["kept_start"] = 0
    prompts["key_start"] = 0
    prompts["pattern_start"] = 0
    bp = sweep.block_prompts
    for b, p0 in enumerate(range(0, len(prompts), bp)):
        p1 = min(p0 + bp, len(prompts))
        k0, y0, q0 = kept_pos, key_pos, pat_pos
        for p in range(p0, p1):
            prompts.at[p, "block"] = b
            prompts.at[p, "kept_start"] = kept_pos
            prompts.at[p, "key_start"] = key_pos
            prompts.at[p, "pattern_start"] = pat_pos
            kept_pos += int(n_kept[p])
            key_pos += int(n_tok[p])
            pat_pos += int(n_tok[p]) ** 2 if full else 0
        kept_pos = -(-kept_pos // tchunk) * tchunk
        key_pos = -(-key_pos // kchunk) * kchunk
        pat_pos = -(-pat_pos // pchunk) * pchunk
        block_rows.append(dict(block=b, prompt_start=p0, prompt_end=p1, kept_start=k0, kept_end=kept_pos,
                               key_start=y0, key_end=key_pos, pattern_start=q0, pattern_end=pat_pos,
                               n_tokens_total=int(n_tok[p0:p1].sum())))
    prompts["n_kept"] = n_kept

    # Controls: each user prompt's baseline against the next user prompt's (cyclic).
    base_list = [base_of[u.id] for u in sweep.user_prompts]
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
    cat = lambda attr: np.concatenate([getattr(r, attr) for r in rendered])  # noqa: E731
    return Plan(
        sweep=sweep,
        dims=dims,
        prompts=prompts,
        pairs=pd.DataFrame(pair_rows),
        controls=pd.DataFrame(ctrl, columns=["control", "prompt_a", "prompt_b"]),
        blocks=pd.DataFrame(block_rows),
        token_ids=cat("ids").astype(np.int32),
        token_region=cat("regions").astype(np.int8),
        token_turn=cat("turns").astype(np.int16),
        meta=meta,
        token_offsets=cat("offsets").astype(np.int32).reshape(-1, 2),
        spans=np.asarray([(p, REGION_CODE[sp.region], sp.start, sp.end) for p, r in enumerate(rendered)
                          for sp in r.spans], dtype=np.int32).reshape(-1, 4),
    )


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

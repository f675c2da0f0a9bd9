"""The intervention runner behind every causal analysis: batched forward passes that run
only a *tail* of each prompt on top of a key/value cache of its untouched *head*, with
per-row edits of the residual stream and per-row attention knockout.

Sites: site ``l < L`` is the input of layer ``l`` (``resid_pre``), site ``L`` is the output
of the last layer (``resid_post[L-1]``, before the final norm). An edit replaces or adds
vectors at given tail positions of one row at one site.

Why tails: an intervention at position ``t`` cannot change anything before ``t`` (causal
attention), so the head's keys and values are computed once and shared by every row that
starts from it; patching the last position runs one token per row, not the whole prompt.
Rows with different heads share a batch (each head padded at the start of the key axis,
:func:`promptshift.extract.kvcache.prefilled_cache`), and a row whose every tail position
is replaced at a site runs only the layers from that site on (``Row.start``): the layers
below would compute what the replacement overwrites.

Interventions reach the model through the two openings extraction offers and nothing
else: named hook points (:meth:`promptshift.extract.arch.Arch.hook`) for the residual
stream and mask hooks (:func:`promptshift.extract.attention.register_mask_hook`) for
attention.

Size: one batched intervention runner (heads cached, tails run from their site, edits,
knockout, capture); every causal analysis goes through it, so it is kept whole.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from promptshift.extract.arch import bind_model
from promptshift.extract.attention import install, register_mask_hook
from promptshift.extract.batching import plan_batches
from promptshift.extract.engine import unembed
from promptshift.extract.kvcache import KV, plain_layers, prefilled_cache

# Memory caps of one batch (bytes), as the extraction engine's: the padded head key/value
# cache of all layers, one layer's attention probabilities, the (rows, vocab) float32
# log-probabilities of the output; and of the heads kept between batches and analyses
# (all layers; the analyses share many: a variant's head serves its reference run, its
# knockout and its patching).
_KV_BYTES_BUDGET = 1 << 30
_ATTN_BYTES_BUDGET = 1 << 29
_OUT_BYTES_BUDGET = 1 << 28
_HEADS_BYTES_BUDGET = 1 << 29
# positions whose final hidden states are unembedded together (at most 256 MiB of float32
# log-probabilities for a 128k vocabulary)
_UNEMBED_ROWS = 512
# a batch of fewer (padded) tokens waits to run together with the small batches of the next
# first layers (:meth:`Runner.stream`)
_BAND_TOKENS = 256


@dataclass
class Edit:
    """Change the residual stream of one row at one site: ``positions`` index the tail."""

    site: int
    positions: np.ndarray  # (n,) tail positions
    values: np.ndarray | torch.Tensor  # (n, H)
    add: bool = False  # add instead of replace


@dataclass
class Row:
    """One forward pass: ``head`` (run once per distinct head, cached) then ``tail``."""

    head: np.ndarray  # (P,) token ids, P >= 1
    tail: np.ndarray  # (S,) token ids, S >= 1
    edits: list[Edit] = field(default_factory=list)
    knockout_keys: np.ndarray | None = None  # (P + S,) bool: keys hidden from tail queries
    knockout_start: int | None = None  # first knocked-out layer
    capture: np.ndarray | None = None  # tail positions whose residuals to return (default: the last)
    start: int = 0  # first layer to run on the tail (below it the tail's states are never read): needs
    # replace edits covering every tail position at one site >= start, and no capture
    targets: np.ndarray | None = None  # (m,) token ids scored teacher-forced: the last m tail positions
    # predict them (position len(tail) - m + j predicts targets[j]); their log-probs land in Out.target_logprobs


@dataclass
class Out:
    logprobs: torch.Tensor | None  # (V,) float32 log-softmax of the last position's logits
    resid: torch.Tensor | None = None  # (L+1, H) last-position residual at every site, if captured;
    # (n, L+1, H) at the row's ``capture`` positions when it names them
    target_logprobs: torch.Tensor | None = None  # (m,) log p(targets[j]) under this run, for a row with targets
    # final hidden states (after the final norm) waiting for their unembedding (internal):
    final: torch.Tensor | None = field(default=None, repr=False)  # (H,) the last position's
    target_final: torch.Tensor | None = field(default=None, repr=False)  # (m, H) the positions predicting targets
    targets: torch.Tensor | None = field(default=None, repr=False)  # (m,) their target ids


class _Unembedding:
    """Outputs of several batches waiting for one unembedding: the final hidden states of
    every row's last position (and of the positions predicting its targets) are stacked
    and multiplied by the unembedding matrix together once they are ``_UNEMBED_ROWS``
    (a batch of patched rows often has only a few dozen, and the (rows, H) x (H, V)
    product of so few runs at a third of the matmul peak: 31 against 86 GFLOP/s for 28
    against 868 rows of SmolLM2 on 2 cores). Each row's values are those of its own
    product: rows of a matrix product do not mix."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.waiting: list[tuple[int, Out]] = []
        self.n = 0  # positions to unembed

    def add(self, idx: list[int], outs: list[Out]) -> None:
        for i, o in zip(idx, outs):
            self.waiting.append((i, o))
            self.n += 1 + (0 if o.target_final is None else len(o.target_final))

    def full(self) -> bool:
        return self.n >= _UNEMBED_ROWS

    def flush(self, progress=None) -> Iterator[tuple[int, Out]]:
        """Unembed everything waiting (in chunks of at most ``_UNEMBED_ROWS`` positions) and
        yield ``(row index, Out)`` in the order the rows were added."""
        if not self.waiting:
            return
        waiting, self.waiting, self.n = self.waiting, [], 0
        parts = []  # (the Out, whether its targets' positions, (n, H) hidden states)
        for _, o in waiting:
            parts.append((o, False, o.final[None]))
            if o.target_final is not None:
                parts.append((o, True, o.target_final))
        with torch.inference_mode():
            while parts:  # chunks of whole parts, at most _UNEMBED_ROWS positions (or one larger part)
                k, n = 0, 0
                while k < len(parts) and (k == 0 or n + len(parts[k][2]) <= _UNEMBED_ROWS):
                    n += len(parts[k][2])
                    k += 1
                chunk, parts = parts[:k], parts[k:]
                lp = self.runner.logprobs(torch.cat([h for _, _, h in chunk]))  # (n, V)
                at = 0
                for o, is_target, h in chunk:
                    part = lp[at : at + len(h)]
                    at += len(h)
                    if is_target:
                        o.target_logprobs = part.gather(1, o.targets[:, None])[:, 0].float().cpu()  # (m,)
                        o.target_final = o.targets = None
                    else:
                        o.logprobs = part[0].clone() if part.device.type == "cpu" else part[0].cpu()  # not a view of lp
                        o.final = None
                del lp
        if progress is not None:
            progress.update(len(waiting))
        yield from waiting


@dataclass
class Knockout:
    """Attention knockout: in every layer ``>= start[b]``, the queries of row ``b`` cannot
    attend to the keys where ``keys[b]`` is true (an additive -inf on those keys)."""

    keys: torch.Tensor  # (B, Sk) bool
    start: torch.Tensor  # (B,) long: first knocked-out layer of each row (n_layers: none)

    def __call__(self, module, mask: torch.Tensor) -> torch.Tensor:
        """A mask hook (:func:`promptshift.extract.attention.register_mask_hook`): the
        additive mask (B, 1, Sq, Sk) with this layer's knocked-out keys at -inf."""
        rows = (self.start <= module.layer_idx).to(mask.device)  # (B,)
        hide = (self.keys.to(mask.device) & rows[:, None])[:, None, None, : mask.shape[-1]]  # (B, 1, 1, Sk)
        return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


def _replaces_tail(row: Row, start: int, n: int) -> bool:
    """Whether the replace edits of ``row`` at one site ``>= start`` together cover all ``n``
    tail positions (so the layers below ``start`` are never read)."""
    covered: dict[int, set[int]] = {}
    for e in row.edits:
        if e.site >= start and not e.add:
            covered.setdefault(e.site, set()).update(np.asarray(e.positions).tolist())
    return any(c >= set(range(n)) for c in covered.values())


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


class Runner:
    """Runs :class:`Row` batches on a Hugging Face causal LM (any architecture in
    ``promptshift.extract.arch``)."""

    def __init__(self, model, token_budget: int = 4096):
        install(model)
        bind_model(self, model)
        self.token_budget = token_budget
        cfg = self.cfg
        self.NH = cfg.num_attention_heads
        self._nkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self._hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._dtype = next(model.parameters()).dtype
        self._kv_bytes = 2 * self.L * self._nkv * self._hd * self._dtype.itemsize  # per cached token
        self._layer_dev = [next(layer.parameters()).device for layer in self.arch.layers]
        # heads of different lengths share a batch only where no layer has a sliding window
        # (the padding between a short head and its tail would shift the window)
        self.mixed_heads = plain_layers(model.config) and not any(
            getattr(c, "sliding_window", None) for c in (cfg, model.config))
        self._edits: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]] = {}
        self._capture: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tail positions) to keep
        self._captured: list[torch.Tensor | None] = []
        self._knockout: Knockout | None = None
        self._head_cache: OrderedDict[bytes, KV] = OrderedDict()  # least recently used first
        self._head_bytes = 0
        self._handles = [self.arch.hook("resid_pre", i, lambda h, i=i: self._apply(i, h)) for i in range(self.L)]
        self._handles.append(self.arch.hook("resid_post", self.L - 1, lambda h: self._apply(self.L, h)))
        attn = self.arch.spec.attn_module
        self._handles += [register_mask_hook(getattr(layer, attn), self._mask) for layer in self.arch.layers]
        self.can_skip = self._layers_return_hidden()

    # --- hooks ----------------------------------------------------------------------------
    def _apply(self, site: int, h: torch.Tensor) -> torch.Tensor:
        edits = self._edits.get(site)
        if edits:
            h = h.clone()
            for b, s, v, add in edits:
                if add:
                    h[b, s] += v.to(h.dtype)
                else:
                    h[b, s] = v.to(h.dtype)
        if self._capture is not None:
            self._captured[site] = h[self._capture].float()  # (N, H)
        return h

    def _mask(self, module, mask: torch.Tensor) -> torch.Tensor:
        return mask if self._knockout is None else self._knockout(module, mask)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._head_cache.clear()
        self._head_bytes = 0

    @torch.inference_mode()
    def _layers_return_hidden(self) -> bool:
        """Whether a decoder layer's output is the hidden-state tensor itself, so that a
        skipped layer can pass its input through (:meth:`_skip`); checked on one token."""
        seen = []
        h = self.arch.layers[0].register_forward_hook(lambda m, a, out: seen.append(isinstance(out, torch.Tensor)))
        try:
            self.base(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)
        finally:
            h.remove()
        return bool(seen and seen[0])

    @contextmanager
    def _skip(self, start: int):
        """Layers below ``start`` pass their input through (every layer keeps its index,
        its cache slot and its own settings, so this holds for every architecture)."""
        skipped = list(self.arch.layers[:start])
        for layer in skipped:
            layer.forward = _identity
        try:
            yield
        finally:
            for layer in skipped:
                del layer.forward

    # --- running --------------------------------------------------------------------------
    def logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the logits of final hidden states ``h`` (..., H) (after the final norm)."""
        return torch.log_softmax(unembed(self.lm_head, self.softcap, h), dim=-1)

    @torch.inference_mode()
    def heads(self, heads: list[np.ndarray]) -> list[KV]:
        """Keys and values of every layer for each head, (1, NKV, P, D) per layer: the heads
        run as right-padded batches under the token budget (one at a time for models with
        sliding windows)."""
        from transformers import DynamicCache

        out: list[KV | None] = [None] * len(heads)
        lengths = [len(h) for h in heads]
        # a sliding-window layer keeps only its window of a padded batch's keys: one head at a time there
        batches = plan_batches(lengths, self.token_budget) if self.mixed_heads else [[i] for i in range(len(heads))]
        for batch in batches:
            B, S = len(batch), max(lengths[i] for i in batch)
            ids = torch.zeros(B, S, dtype=torch.long)
            mask = torch.zeros(B, S, dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, : lengths[i]] = torch.as_tensor(heads[i])
                mask[b, : lengths[i]] = 1
            pos = torch.arange(S).unsqueeze(0).expand(B, S)
            # a config-less cache: every layer keeps every key (a sliding-window layer's own
            # cache would keep only its window of the head, which later tails still index)
            o = self.base(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=pos.to(self.device), cache=DynamicCache(), use_cache=True)
            for b, i in enumerate(batch):
                n = lengths[i]
                out[i] = [(la.keys[b : b + 1, :, :n].clone(), la.values[b : b + 1, :, :n].clone())
                          for la in o.cache.layers]  # (1, NKV, n, D) each
        return out

    def _cached_heads(self, heads: list[np.ndarray], keys: list[bytes]) -> list[KV]:
        """:meth:`heads`, computing only those not kept from earlier calls; keeps what fits
        in the budget, dropping the least recently used (never those of this call)."""
        missing = [i for i, k in enumerate(keys) if k not in self._head_cache]
        for i, kv in zip(missing, self.heads([heads[i] for i in missing])):
            self._head_cache[keys[i]] = kv
            self._head_bytes += len(heads[i]) * self._kv_bytes
        for k in keys:
            self._head_cache.move_to_end(k)
        out = [self._head_cache[k] for k in keys]
        mine = set(keys)
        while self._head_bytes > _HEADS_BYTES_BUDGET:
            old = next((k for k in self._head_cache if k not in mine), None)
            if old is None:
                break
            kv = self._head_cache.pop(old)
            self._head_bytes -= kv[0][0].shape[-2] * self._kv_bytes
        return out

    def stream(self, rows: list[Row], capture: bool = False, progress=None) -> Iterator[tuple[int, Out]]:
        """Run every row; yields ``(row index, Out)`` batch by batch, so that a caller
        reducing each output at once never holds all the (V,) log-probabilities.

        Rows are split into chunks of distinct heads whose keys and values fit in memory
        together (heads sorted by first use); in each chunk the heads run once (or come
        from an earlier call), then the
        rows of each first layer (``Row.start``) run in batches that mix heads where the
        model allows (:func:`promptshift.extract.batching.plan_batches`, tails and heads as
        contexts). A batch of fewer than ``_BAND_TOKENS`` tokens (the one-token rows of
        last-position patching: a few dozen per site) waits for those of the next first
        layers and runs with them from the smallest first layer: a row that starts later
        computes a few layers whose output its own edit overwrites (its start guarantees
        that every tail position is replaced there), instead of every small batch paying the
        per-layer cost of a whole pass. The last positions' (and the targets') final hidden states of several
        batches are unembedded together (:class:`_Unembedding`): the (rows, H) x (H, V)
        product of a few dozen rows runs at a fraction of the matmul peak."""
        keys = [r.head.astype(np.int64).tobytes() for r in rows]
        head_of: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            head_of.setdefault(k, i)
        chunk: list[bytes] = []
        used = 0
        chunks = []
        for k, i in head_of.items():
            size = len(rows[i].head) * self._kv_bytes
            if chunk and used + size > _HEADS_BYTES_BUDGET:
                chunks.append(chunk)
                chunk, used = [], 0
            chunk.append(k)
            used += size
        if chunk:
            chunks.append(chunk)
        by_head: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            by_head.setdefault(k, []).append(i)
        pending = _Unembedding(self)
        for chunk in chunks:
            kv = dict(zip(chunk, self._cached_heads([rows[head_of[k]].head for k in chunk], chunk)))
            groups: dict[tuple[int, bytes], list[int]] = {}
            for k in chunk:
                for i in by_head[k]:
                    start = rows[i].start if self.can_skip else 0
                    groups.setdefault((start, b"" if self.mixed_heads else k), []).append(i)
            for idx in self._batches(groups, rows):
                pending.add(idx, self._batch([rows[i] for i in idx], [kv[keys[i]] for i in idx], capture,
                                             min(rows[i].start for i in idx) if self.can_skip else 0))
                if pending.full():
                    yield from pending.flush(progress)
            del kv
        yield from pending.flush(progress)

    def _batches(self, groups: dict[tuple[int, bytes], list[int]], rows: list[Row]) -> Iterator[list[int]]:
        """The batches (row indices) of ``groups`` (rows by first layer and head key), in
        order: each group's batches under the budgets (:meth:`_plan`), except that batches
        of fewer than ``_BAND_TOKENS`` tokens wait and run together with those of the next
        first layers (same head key) once they are that many."""
        def planned(idx: list[int]) -> Iterator[list[int]]:
            return ([idx[j] for j in b] for b in self._plan([rows[i] for i in idx]))

        small: list[int] = []
        last_key = None
        for (start, k), group in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
            if small and k != last_key:
                yield from planned(small)
                small = []
            last_key = k
            for idx in planned(group):
                if len(idx) * max(len(rows[i].tail) for i in idx) < _BAND_TOKENS:
                    small += idx
                else:
                    yield idx
            if sum(len(rows[i].tail) for i in small) >= _BAND_TOKENS:
                yield from planned(small)
                small = []
        yield from planned(small) if small else ()

    def compute(self, rows: list[Row], capture: bool = False, progress=None) -> list[Out]:
        """Every row's :class:`Out`, in the order of ``rows``."""
        outs: list[Out | None] = [None] * len(rows)
        for i, o in self.stream(rows, capture, progress):
            outs[i] = o
        return outs

    def _plan(self, rows: list[Row]) -> list[list[int]]:
        """Batches of ``rows`` under the token budget and the memory caps."""
        V = int(self.lm_head.weight.shape[0])
        max_rows = max(1, _OUT_BYTES_BUDGET // (4 * V))
        out = []
        for b in plan_batches([len(r.tail) for r in rows], self.token_budget, contexts=[len(r.head) for r in rows],
                              bytes_per_qk=4 * self.NH, qk_budget=_ATTN_BYTES_BUDGET,
                              bytes_per_context=self._kv_bytes, context_budget=_KV_BYTES_BUDGET):
            out += [b[k : k + max_rows] for k in range(0, len(b), max_rows)]
        return out

    @torch.inference_mode()
    def _batch(self, rows: list[Row], kvs: list[KV], capture: bool, start: int = 0) -> list[Out]:
        B, dev = len(rows), self.device
        plen = [len(r.head) for r in rows]
        lens = [len(r.tail) for r in rows]
        P, S = max(plen), max(lens)
        ids = torch.zeros(B, S, dtype=torch.long)
        mask = torch.zeros(B, P + S, dtype=torch.long)  # head keys (padded to P), then the tail's
        for b, r in enumerate(rows):
            ids[b, : lens[b]] = torch.as_tensor(r.tail)
            mask[b, : plen[b]] = 1
            mask[b, P : P + lens[b]] = 1
        pos = (torch.as_tensor(plen)[:, None] + torch.arange(S)[None, :]).to(dev)  # (B, S)
        cache = prefilled_cache(self.model.config, kvs, plen, S, n_kv_heads=self._nkv, head_dim=self._hd,
                                dtype=self._dtype, layer_devices=self._layer_dev)
        last = torch.as_tensor([n - 1 for n in lens], device=dev)
        self._edits = {}
        for b, r in enumerate(rows):
            for e in r.edits:
                if not 0 <= e.site <= self.L:
                    raise ValueError(f"site {e.site} is outside 0..{self.L}")
                s = torch.as_tensor(np.asarray(e.positions), dtype=torch.long, device=dev)
                v = torch.as_tensor(e.values, device=dev)
                self._edits.setdefault(e.site, []).append((torch.full_like(s, b), s, v, e.add))
        ko = None
        if any(r.knockout_keys is not None for r in rows):
            keys = torch.zeros(B, P + S, dtype=torch.bool)
            ko_start = torch.full((B,), self.L, dtype=torch.long)
            for b, r in enumerate(rows):
                if r.knockout_keys is not None:
                    k = torch.as_tensor(np.asarray(r.knockout_keys, dtype=bool))
                    keys[b, : plen[b]] = k[: plen[b]]
                    keys[b, P : P + lens[b]] = k[plen[b] : plen[b] + lens[b]]
                    ko_start[b] = r.knockout_start
            ko = Knockout(keys.to(dev), ko_start.to(dev))
        if capture:
            want = [np.asarray(r.capture if r.capture is not None else [lens[b] - 1]) for b, r in enumerate(rows)]
            self._capture = (torch.as_tensor(np.concatenate([np.full(len(w), b) for b, w in enumerate(want)]),
                                             dtype=torch.long, device=dev),
                             torch.as_tensor(np.concatenate(want), dtype=torch.long, device=dev))
        self._captured = [None] * (self.L + 1)
        if start:
            for b, r in enumerate(rows):
                if capture or not _replaces_tail(r, start, lens[b]):
                    raise ValueError(f"a row starting at layer {start} must replace every tail position at a site "
                                     ">= its start, and cannot capture the layers it skips")
        self._knockout = ko
        try:
            with self._skip(start):
                out = self.base(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos, cache=cache,
                                use_cache=True)
        finally:
            self._knockout = None
            self._edits = {}
            self._capture = None
        h = out.last_hidden_state[torch.arange(B, device=dev), last]  # (B, H): unembedded by the caller
        outs = [Out(None, final=h[b]) for b in range(B)]
        for b, r in enumerate(rows):  # teacher-forced scores: the positions predicting the targets
            if r.targets is not None and len(r.targets):
                m = len(r.targets)
                if m > lens[b]:
                    raise ValueError(f"a row scores {m} targets but its tail has {lens[b]} positions")
                outs[b].target_final = out.last_hidden_state[b, lens[b] - m : lens[b]].clone()  # (m, H)
                outs[b].targets = torch.as_tensor(np.asarray(r.targets), dtype=torch.long, device=h.device)
        if capture:
            flat = torch.stack(self._captured, dim=1).cpu()  # (N, L+1, H)
            parts = torch.split(flat, [len(w) for w in want])
            for b, r in enumerate(rows):
                outs[b].resid = parts[b] if r.capture is not None else parts[b][0]
        self._captured = []
        return outs

    @torch.inference_mode()
    def residuals(self, ids: np.ndarray, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole prompt: its residual stream (n, L+1, H) float32 at ``positions`` at every
        site, and the log-probabilities (V,) at its last position."""
        dev = self.device
        x = torch.as_tensor(ids, dtype=torch.long, device=dev)[None]
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.long, device=dev)
        self._capture = (torch.zeros_like(pos), pos)
        self._captured = [None] * (self.L + 1)
        try:
            out = self.base(input_ids=x, use_cache=False)
            grabbed = torch.stack(self._captured, dim=1).cpu()  # (n, L+1, H)
        finally:
            self._capture = None
            self._captured = []
        return grabbed, self.logprobs(out.last_hidden_state[0, -1]).cpu()


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) in nats from log-probabilities (..., V), exact over the vocabulary."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


__all__ = ["Edit", "Knockout", "Out", "Row", "Runner", "kl"]

"""The intervention runner behind every causal analysis: batched forward passes that run
only a *tail* of each prompt on top of a key/value cache of its untouched *head*, with
per-row edits of the residual stream and per-row attention knockout.

Sites: site ``l < L`` is the input of layer ``l`` (``resid_pre``), site ``L`` is the output
of the last layer (``resid_post[L-1]``, before the final norm). An edit replaces or adds
vectors at given tail positions of one row at one site.

Why tails: an intervention at position ``t`` cannot change anything before ``t`` (causal
attention), so the head's keys and values are computed once and shared by every row that
starts from it; patching the last position runs one token per row, not the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from promptshift.extract.arch import bind_model
from promptshift.extract.attention import install, register_mask_hook
from promptshift.extract.engine import unembed


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
        hide = (self.keys.to(mask.device) & rows[:, None])[:, None, None, :mask.shape[-1]]  # (B, 1, 1, Sk)
        return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


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
    start: int = 0  # first layer to run on the tail (below it the tail's states are never read): needs a
    # replace edit of every tail position at a site >= start, and no capture


@dataclass
class Out:
    logprobs: torch.Tensor  # (V,) float32 log-softmax of the last position's logits
    resid: torch.Tensor | None = None  # (L+1, H) last-position residual at every site, if captured;
    # (n, L+1, H) at the row's ``capture`` positions when it names them


class Runner:
    """Runs :class:`Row` batches on a Hugging Face causal LM (any architecture in
    ``promptshift.extract.arch``), on the fused attention path unless a knockout is set."""

    def __init__(self, model, token_budget: int = 4096):
        install(model)
        bind_model(self, model)
        self.token_budget = token_budget
        self._edits: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]] = {}
        self._capture: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tail positions) to keep
        self._captured: list[torch.Tensor | None] = []
        self._heads: dict[bytes, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._knockout: Knockout | None = None
        self._handles = [self.arch.hook("resid_pre", i, lambda h, i=i: self._apply(i, h)) for i in range(self.L)]
        self._handles.append(self.arch.hook("resid_post", self.L - 1, lambda h: self._apply(self.L, h)))
        attn = self.arch.spec.attn_module
        self._handles += [register_mask_hook(getattr(layer, attn), self._mask) for layer in self.arch.layers]
        # Skipping the layers below a row's start runs the base model on a shorter layer list;
        # every layer keeps its own layer_idx (cache slot). Only where the model's layer loop
        # does not pick per-layer settings by list index (all layer types equal), and the
        # layers live at `model.layers`; elsewhere rows run every layer (same results, slower).
        types = getattr(self.cfg, "layer_types", None)
        self._layer_owner = self.base if self.arch.spec.layers == "model.layers" and hasattr(self.base, "layers") else None
        self.can_skip = self._layer_owner is not None and (not types or len(set(types)) == 1)

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

    # --- running --------------------------------------------------------------------------
    def logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the logits of final hidden states ``h`` (..., H) (after the final norm)."""
        return torch.log_softmax(unembed(self.lm_head, self.softcap, h), dim=-1)

    def _head_kv(self, head: np.ndarray):
        key = head.astype(np.int64).tobytes()
        kv = self._heads.get(key)
        if kv is None:
            if len(self._heads) >= 4:  # rows arrive grouped by head: a small cache is enough
                self._heads.pop(next(iter(self._heads)))
            ids = torch.as_tensor(head, dtype=torch.long, device=self.device)[None]
            with torch.inference_mode():
                out = self.base(input_ids=ids, use_cache=True)
            kv = [(layer.keys, layer.values) for layer in out.cache.layers]
            self._heads[key] = kv
        return kv

    def run(self, rows: list[Row], capture: bool = False, progress=None) -> list[Out]:
        """Run every row; rows with the same head are batched under the token budget."""
        outs: list[Out | None] = [None] * len(rows)
        groups: dict[tuple[bytes, int], list[int]] = {}
        for i, r in enumerate(rows):
            start = r.start if self.can_skip else 0
            groups.setdefault((r.head.astype(np.int64).tobytes(), start), []).append(i)
        for (_, start), idx in groups.items():
            idx = sorted(idx, key=lambda i: -len(rows[i].tail))  # similar lengths together: little padding
            head = rows[idx[0]].head
            k = 0
            while k < len(idx):
                size = max(1, self.token_budget // (len(head) + len(rows[idx[k]].tail)))
                chunk = idx[k : k + size]
                k += size
                for i, o in zip(chunk, self._batch(head, [rows[i] for i in chunk], capture, start)):
                    outs[i] = o
                if progress is not None:
                    progress.update(len(chunk))
        return outs

    @torch.inference_mode()
    def _batch(self, head: np.ndarray, rows: list[Row], capture: bool, start: int = 0) -> list[Out]:
        from transformers import DynamicCache

        B, P, dev = len(rows), len(head), self.device
        lens = [len(r.tail) for r in rows]
        S = max(lens)
        ids = torch.zeros(B, S, dtype=torch.long)
        real = torch.zeros(B, S, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : lens[b]] = torch.as_tensor(r.tail)
            real[b, : lens[b]] = 1
        mask = torch.cat([torch.ones(B, P, dtype=torch.long), real], dim=1).to(dev)
        pos = (P + torch.arange(S)).unsqueeze(0).expand(B, S).to(dev)
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(self._head_kv(head)):
            cache.update(k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:]), i)
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
                    keys[b, : P + lens[b]] = torch.as_tensor(r.knockout_keys[: P + lens[b]])
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
                full = [e for e in r.edits if e.site >= start and not e.add and len(e.positions) == lens[b]]
                if not full or capture:
                    raise ValueError(f"a row starting at layer {start} must replace every tail position at a site "
                                     ">= its start, and cannot capture the layers it skips")
        layers = self._layer_owner.layers if start else None
        self._knockout = ko
        try:
            if start:
                self._layer_owner.layers = layers[start:]
            out = self.base(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos, cache=cache,
                            use_cache=True)
        finally:
            if start:
                self._layer_owner.layers = layers
            self._knockout = None
            self._edits = {}
            self._capture = None
        h = out.last_hidden_state[torch.arange(B, device=dev), last]  # (B, H)
        lp = self.logprobs(h).cpu()
        outs = [Out(lp[b]) for b in range(B)]
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
        grabbed: list[torch.Tensor | None] = [None] * (self.L + 1)

        def grab(site):
            def hook(mod, args, kwargs, out=None):
                h = out if out is not None else (args[0] if args else kwargs["hidden_states"])
                h = h[0] if isinstance(h, tuple) else h
                grabbed[site] = h[0, pos].float()

            return hook

        hs = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(self.arch.layers)]
        hs.append(self.arch.layers[-1].register_forward_hook(grab(self.L), with_kwargs=True))
        try:
            out = self.base(input_ids=x, use_cache=False)
        finally:
            for h in hs:
                h.remove()
        return torch.stack(grabbed, dim=1).cpu(), self.logprobs(out.last_hidden_state[0, -1]).cpu()


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) in nats from log-probabilities (..., V), exact over the vocabulary."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


__all__ = ["Edit", "Out", "Row", "Runner", "kl"]

"""Key/value caches that rows of one batch continue: each row its own cached head (a shared
prefix for extraction, the untouched start of a prompt for causal interventions), padded
to the longest at the start of the key axis, the padding hidden by the attention mask.

Used by the extraction engine (:class:`promptshift.extract.engine.Engine`) and the causal
runner (:class:`promptshift.causal.runner.Runner`) alike.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from promptshift.extract.attention import get_packing

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, NKV, P, D) keys and values


def prefilled_cache(config, kvs: list[KV | None], lengths: list[int], S: int, *, n_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, layer_devices: list[torch.device]):
    """A ``DynamicCache`` whose row ``b`` holds ``kvs[b]`` (``lengths[b]`` cached tokens;
    None: nothing) at the start of its key axis, padded to P = max(lengths).

    Every layer gets a :class:`Prefilled` buffer with room for the batch's own ``S``
    tokens, so the forward pass writes its keys after the prefix instead of concatenating
    them in every layer. Rows that share one ``kvs`` object are written together.
    Sliding-window layers too keep every key (their own cache layer would keep only the
    last window of a padded layout, cutting the prefix wherever padding sits): their
    window comes from the mask, which must then measure it in positions where padding
    sits between a row's keys (:class:`promptshift.extract.attention.Positions`). The
    caller's attention mask must hide key slots ``lengths[b]..P-1`` of row ``b``."""
    from transformers import DynamicCache

    B, P = len(kvs), max(lengths)
    cache = DynamicCache(config=config)
    rows: dict[int, list[int]] = {}  # kv object -> its rows
    for b, kv in enumerate(kvs):
        if kv is not None:
            rows.setdefault(id(kv), []).append(b)
    groups = []
    for bs in rows.values():
        idx = slice(bs[0], bs[-1] + 1) if bs == list(range(bs[0], bs[-1] + 1)) else torch.as_tensor(bs)
        groups.append((idx, kvs[bs[0]], lengths[bs[0]]))
    for i in range(len(cache.layers)):
        kb = torch.zeros(B, n_kv_heads, P + S, head_dim, dtype=dtype, device=layer_devices[i])  # zeros: masked
        vb = torch.zeros_like(kb)  # slots must be finite
        for idx, kv, n in groups:
            k, v = kv[i]
            kb[idx, :, :n] = k
            vb[idx, :, :n] = v
        cache.layers[i] = Prefilled(kb, vb, P)
    return cache


def plain_layers(config) -> bool:
    """Whether every layer of this model's cache is a plain (unbounded) one: no sliding
    windows, so that a mask by slot index (transformers' own) is right even where rows
    with prefixes of different lengths share a batch."""
    from transformers import DynamicCache

    return all(type(la) is DynamicLayer for la in DynamicCache(config=config).layers)


class Prefilled(DynamicLayer):
    """A layer's key/value cache whose prefix is already in a buffer with room for the
    batch's own tokens: the forward pass writes its keys into the buffer instead of
    concatenating (one copy of the prefix per batch rather than three). Beyond the buffer
    (decoding) it grows by concatenation, like any dynamic layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._kbuf, self._vbuf = keys, values  # (B, NKV, T, D)
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        pk = get_packing()  # a packed batch's keys are (1, NKV, N, D): they go to its padded slots
        n0 = self.keys.shape[-2]
        n1 = n0 + (pk.S if pk is not None else key_states.shape[-2])
        if self._kbuf is not None and n1 <= self._kbuf.shape[-2]:
            if pk is not None:
                self._kbuf[pk.b, :, n0 + pk.s] = key_states[0].transpose(0, 1)  # (N, NKV, D)
                self._vbuf[pk.b, :, n0 + pk.s] = value_states[0].transpose(0, 1)
            else:
                self._kbuf[:, :, n0:n1] = key_states
                self._vbuf[:, :, n0:n1] = value_states
            self.keys, self.values = self._kbuf[:, :, :n1], self._vbuf[:, :, :n1]
            return self.keys, self.values
        self._kbuf = self._vbuf = None
        return super().update(key_states, value_states, *args, **kwargs)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (long): a decode batch drops its finished rows."""
        n = self.keys.shape[-2]
        if self._kbuf is not None:
            rows = rows.to(self._kbuf.device)
            self._kbuf, self._vbuf = self._kbuf.index_select(0, rows), self._vbuf.index_select(0, rows)
            self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]
        else:
            rows = rows.to(self.keys.device)
            self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)


__all__ = ["KV", "Prefilled", "plain_layers", "prefilled_cache"]

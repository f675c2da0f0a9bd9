"""Greedy continuations on the extraction's own key/value caches: no second prefill.

The prompts of a block are decoded together, one step for all of them (the weights are
read once per step whatever the number of rows). What a step reads besides the weights is
the key/value cache, and most of it is shared: every prompt of a system prompt continues
the same prefix. So the cache of a decode batch keeps

- each shared prefix once (its keys and values per layer, as the prefix pass left them),
  attended by all its rows together (:class:`promptshift.extract.attention.Decoding`), and
- each row's own keys (its tokens after the prefix, then the tokens it generates) in a
  buffer with room for every new token (:class:`promptshift.extract.kvcache.Prefilled`),

instead of every row's whole padded prompt. Rows that have produced an end-of-sequence
token are dropped from the batch once they are a quarter of it (their caches are
compacted), so the remaining steps run on the rows still generating.

Greedy continuations equal the model's own ``generate`` token for token (tested against
Hugging Face ``generate``) up to float rounding: batch shapes change the order of float
sums, as they do between any two batchings, so a near-tie between two tokens may
resolve differently; the tokens are the exact argmax of the logits computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from promptshift.extract.attention import Decoding, set_decoding
from promptshift.extract.kvcache import Prefilled

# compact the batch when this share of its rows has finished (their steps are wasted)
_COMPACT_SHARE = 0.25


@dataclass
class Pending:
    """Rows of one forward batch waiting for their continuation."""

    own: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, NKV, S, D): row b's own tokens at slots 0..lens[b]-1
    lens: list[int]  # own tokens per row (after its prefix)
    prefixes: list  # per row its shared Prefix (keys and values per layer), or None
    final_h: torch.Tensor  # (B, H) last-position hidden state after the final norm
    next_pos: list[int]  # absolute position of each row's first generated token


def own_keys(cache, P: int, pad: list[int], lens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's own keys and values out of a forward batch's cache, whose key axis holds
    a (padded) prefix of ``P`` slots, then row b's ``lens[b]`` tokens from slot
    ``P + pad[b]``: per layer (B, NKV, S, D), row b's at slots 0..lens[b]-1 (copies, so the
    batch's padded cache is freed)."""
    S = max(lens)
    out = []
    shifted = any(pad)
    for layer in cache.layers:
        k, v = layer.keys, layer.values  # (B, NKV, P + S', D)
        if shifted:  # left padding: row b's tokens start at P + pad[b]
            idx = torch.stack([P + p + torch.arange(S) for p in pad]).clamp(max=k.shape[2] - 1).to(k.device)  # (B, S)
            idx = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            out.append((k.gather(2, idx), v.gather(2, idx)))
        else:
            out.append((k[:, :, P : P + S].clone(), v[:, :, P : P + S].clone()))
    return out


def _merge(batches: list[Pending], room: int, windows, device):
    """One decode batch of all ``batches``' rows: a cache whose layers hold the rows' own
    keys with ``room`` free slots (S = the longest own part, then the new tokens at slots
    S, S + 1, ...), and the :class:`Decoding` with each distinct prefix once."""
    from transformers import DynamicCache

    lens = [n for b in batches for n in b.lens]
    prefixes = [p for b in batches for p in b.prefixes]
    next_pos = [n for b in batches for n in b.next_pos]
    B, S = len(lens), max(lens)
    T = S + room
    cache = DynamicCache()
    for i in range(len(batches[0].own)):
        k0 = batches[0].own[i][0]
        kb = k0.new_zeros(B, k0.shape[1], T, k0.shape[3])  # (B, NKV, T, D); zeros: padding must be finite
        vb = torch.zeros_like(kb)
        r = 0
        for bt in batches:
            k, v = bt.own[i]
            kb[r : r + k.shape[0], :, : k.shape[2]] = k
            vb[r : r + k.shape[0], :, : k.shape[2]] = v
            r += k.shape[0]
        cache.layers.append(Prefilled(kb, vb, S))
    groups: dict[int, int] = {}  # id(prefix) -> group
    uniq = []
    for p in prefixes:
        if p is not None and id(p) not in groups:
            groups[id(p)] = len(uniq)
            uniq.append(p)
    group = torch.as_tensor([groups[id(p)] if p is not None else -1 for p in prefixes], dtype=torch.long)
    Pm = max((p.length for p in uniq), default=0)
    prefix_kv = []
    for i in range(len(batches[0].own)):
        if not uniq:
            prefix_kv.append(None)
            continue
        k0 = uniq[0].kv[i][0]
        kp = k0.new_zeros(len(uniq), k0.shape[1], Pm, k0.shape[3])  # (G, NKV, Pmax, D)
        vp = torch.zeros_like(kp)
        for g, p in enumerate(uniq):
            kp[g, :, : p.length] = p.kv[i][0][0]
            vp[g, :, : p.length] = p.kv[i][1][0]
        prefix_kv.append((kp, vp))
    # absolute position of every key slot: prefix slots 0..P_g-1, own prompt tokens after
    # them, then the generated tokens; -1 for padding
    key_pos = torch.full((B, Pm + T), -1, dtype=torch.long)
    for b, (p, n, q) in enumerate(zip(prefixes, lens, next_pos)):
        o = p.length if p is not None else 0
        key_pos[b, :o] = torch.arange(o)
        key_pos[b, Pm : Pm + n] = o + torch.arange(n)
        key_pos[b, Pm + S :] = q + torch.arange(room)
    dec = Decoding(prefix_kv, group, key_pos, windows)
    return cache, dec, torch.as_tensor(next_pos, dtype=torch.long, device=device)


def _compact(cache, dec: Decoding, keep: torch.Tensor) -> Decoding:
    """Keep rows ``keep`` (long, on the CPU) of the decode batch: their own keys, and the
    prefixes they still use."""
    for layer in cache.layers:
        layer.select_rows(keep)
    group = dec.group[keep]
    used = torch.unique(group[group >= 0])  # sorted
    remap = torch.full((dec.G + 1,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    group = torch.where(group >= 0, remap[group.clamp(min=0)], group)
    prefix_kv = [None if kv is None or not len(used) else
                 (kv[0].index_select(0, used.to(kv[0].device)), kv[1].index_select(0, used.to(kv[1].device)))
                 for kv in dec.prefix_kv]
    return Decoding(prefix_kv, group, dec.key_pos[keep], dec.windows)


@torch.inference_mode()
def greedy(engine, batches: list[Pending], max_new_tokens: int, eos_ids) -> list[np.ndarray]:
    """Greedy continuations of every row of ``batches``, decoded as one batch; each up to
    and including its first token of ``eos_ids``, at most ``max_new_tokens`` tokens.

    Rows are right-padded, each row's next token goes to its own position (``position_ids``)
    and the mask hides the slots between its prompt and its generated tokens: the same
    arithmetic as left padding, with the gap in the middle; sliding-window layers measure
    their window in positions, so the gap never counts as distance."""
    t0 = time.perf_counter()
    dev = engine.device
    final_h = torch.cat([b.final_h for b in batches])  # (B, H)
    B = final_h.shape[0]
    tok = engine.greedy_token(final_h).to(dev)  # (B,)
    out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=dev)
    out[:, 0] = tok
    eos = torch.as_tensor(list(eos_ids) or [-1], device=dev)
    done = torch.isin(tok, eos)
    if max_new_tokens > 1 and not bool(done.all()):
        cache, dec, pos = _merge(batches, max_new_tokens - 1, engine.windows, dev)
        rows = torch.arange(B, device=dev)  # the rows still in the batch
        placeholder = torch.zeros(1, 1, 1, 1, device=dev)  # 4D: transformers passes it on; the attention builds its own masks
        try:
            for t in range(1, max_new_tokens):
                n_done = int(done.sum())
                if n_done == len(rows):
                    break
                if n_done and n_done >= _COMPACT_SHARE * len(rows):
                    keep = (~done).nonzero()[:, 0]
                    dec = _compact(cache, dec, keep.cpu())
                    rows, tok, pos, done = rows[keep], tok[keep], pos[keep], done[keep]
                dec.step(pos)
                # work done, for pricing decode steps (scripts/bench_extract.py): rows through
                # the model, and keys they attend (positions 0..pos of each row)
                engine.decode_rows += len(rows)
                engine.decode_keys += int(pos.sum()) + len(rows)
                set_decoding(dec)
                try:
                    o = engine.base(input_ids=tok[:, None], attention_mask=placeholder, position_ids=pos[:, None],
                                    cache=cache, use_cache=True)
                finally:
                    set_decoding(None)
                pos = pos + 1
                tok = engine.greedy_token(o.last_hidden_state[:, -1]).to(dev)
                out[rows, t] = tok
                done |= torch.isin(tok, eos)
        finally:
            del cache
    gen = out.cpu().numpy()  # (B, T); -1 after a row stopped
    engine.decode_seconds += time.perf_counter() - t0
    eos_set = set(int(e) for e in eos_ids)
    res = []
    for row in gen:
        n = len(row)
        for j, t in enumerate(row):
            if t < 0 or int(t) in eos_set:
                n = j + (t >= 0)
                break
        res.append(row[:n].astype(np.int32))
    return res


__all__ = ["Pending", "greedy", "own_keys"]

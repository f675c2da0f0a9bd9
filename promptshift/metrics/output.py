"""Output change: next-token distributions, logit lens and generated text, per pair.

Exact distances
---------------
A store made with ``full_logprobs`` (the default) keeps every prompt's whole next-token
log-probability vector at its last position, and each pair gets KL(P || Q), JS(P, Q) and
the cosine of the two logit vectors over the full vocabulary (:func:`full_distances`):
``kl_full``, ``js_full``, ``logit_cosine``. The top-k columns below stay, for stores
without the full vectors and for the logit lens.

KL and JS from top-k supports
-----------------------------
The store keeps each prompt's top-k log-probabilities, not the full next-token
distribution (a 50k-256k vocabulary per prompt would outweigh the activations). Each
distribution is therefore known exactly on its own top-k and only bounded elsewhere: a
token outside P's top-k has P-probability at most P's k-th probability ``p_k``, and all
such tokens share P's rest mass ``r_P = 1 - sum(top-k)``.

We compare P (variant) and Q (baseline) on the buckets "union of the two top-k id sets"
plus one "rest" bucket. A union token missing from P's top-k gets

    p_est = min(p_k, r_P / (m_P + 1))

where ``m_P`` is the number of union tokens missing from P's top-k: never more than the
bound ``p_k``, and never so much that the m_P estimates use up the rest mass (the +1 leaves
at least a share r_P/(m_P + 1) for the rest bucket, which stands for every token outside
the union). The rest bucket holds what is left, ``r_P - m_P * p_est``. The same for Q.
Bucket probabilities are floored at 1e-12 so that a top-k that rounds to mass 1 cannot
produce an infinite KL.

When the top-k covers most of the mass (the default k = 64 does for chat models, whose
next-token entropy is low) this is close to the exact KL: the test compares it with the
exact KL of synthetic full distributions. It is coarser for the logit lens (default
``lens_top_k`` = 10) at early layers, whose distributions are flat; treat ``kl_lens``
there as an ordering, not as nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from promptshift.metrics.io import StoreRef, as_str, read_rows

_FLOOR = 1e-12


def topk_buckets(ids_p, lp_p, ids_q, lp_q) -> tuple[np.ndarray, np.ndarray]:
    """Bucket probabilities (N, kp + kq + 1) of P and Q: P's top-k slots, then Q's top-k
    slots not in P's, then the rest bucket (see the module docstring)."""
    ids_p, ids_q = np.asarray(ids_p), np.asarray(ids_q)
    p = np.exp(np.asarray(lp_p, dtype=np.float64))  # (N, kp)
    q = np.exp(np.asarray(lp_q, dtype=np.float64))  # (N, kq)
    match = ids_p[:, :, None] == ids_q[:, None, :]  # (N, kp, kq)
    p_in_q = match.any(2)  # (N, kp)
    q_only = ~match.any(1)  # (N, kq) Q's tokens missing from P's top-k
    m_p = q_only.sum(1)  # (N,) union tokens P does not know
    m_q = (~p_in_q).sum(1)  # (N,) union tokens Q does not know
    r_p = np.clip(1.0 - p.sum(1), 0.0, 1.0)
    r_q = np.clip(1.0 - q.sum(1), 0.0, 1.0)
    est_p = np.minimum(p.min(1), r_p / (m_p + 1))  # (N,)
    est_q = np.minimum(q.min(1), r_q / (m_q + 1))
    q_known = (match * q[:, None, :]).sum(2)  # (N, kp) Q's probability of P's tokens where known
    P = np.concatenate([p, np.where(q_only, est_p[:, None], 0.0), (r_p - m_p * est_p)[:, None]], axis=1)
    Q = np.concatenate([np.where(p_in_q, q_known, est_q[:, None]), np.where(q_only, q, 0.0),
                        (r_q - m_q * est_q)[:, None]], axis=1)
    used = np.concatenate([np.ones_like(p, bool), q_only, np.ones((len(p), 1), bool)], axis=1)
    P = np.where(used, np.maximum(P, _FLOOR), 0.0)
    Q = np.where(used, np.maximum(Q, _FLOOR), 0.0)
    return P, Q


def _kl(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(P > 0, P * (np.log(P) - np.log(Q)), 0.0).sum(-1)


def topk_kl_js(ids_p, lp_p, ids_q, lp_q) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) and JS(P, Q) in nats from top-k ids/log-probs, rows (N, k) -> (N,)."""
    ids_p, ids_q = np.asarray(ids_p), np.asarray(ids_q)
    lp_p, lp_q = np.asarray(lp_p, dtype=np.float64), np.asarray(lp_q, dtype=np.float64)
    N = len(ids_p)
    kl, js = np.zeros(N), np.zeros(N)
    step = max(1, (1 << 24) // max(1, ids_p.shape[1] * ids_q.shape[1]))  # rows per (rows, kp, kq) comparison
    for s in range(0, N, step):
        P, Q = topk_buckets(ids_p[s : s + step], lp_p[s : s + step], ids_q[s : s + step], lp_q[s : s + step])
        M = 0.5 * (P + Q)
        kl[s : s + step] = _kl(P, Q)
        js[s : s + step] = 0.5 * _kl(P, M) + 0.5 * _kl(Q, M)
    bad = ~(np.isfinite(lp_p).all(1) & np.isfinite(lp_q).all(1))
    kl[bad] = np.nan
    js[bad] = np.nan
    return kl, js


def full_distances(lp_p, lp_q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact KL(P || Q), JS(P, Q) in nats and the cosine of the logit vectors, from whole
    log-probability rows (N, V) -> (N,) each, in float64.

    The logit cosine is taken after centring each row over the vocabulary: logits are
    defined up to a constant (softmax ignores it), and log-probs are the logits minus their
    log-sum-exp, so centred log-probs are the centred logits. A row with a non-finite entry
    (a token the model gives probability 0, e.g. a masked vocabulary slot) has a NaN cosine;
    KL and JS treat 0 log 0 as 0 (and KL is inf where Q gives 0 to a token P does not)."""
    lp_p, lp_q = np.asarray(lp_p), np.asarray(lp_q)
    N, V = lp_p.shape
    kl, js, cos = np.empty(N), np.empty(N), np.empty(N)
    step = max(1, (1 << 21) // max(V, 1))  # rows per chunk: a few (rows, V) float64 temporaries of 16 MB
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for s in range(0, N, step):
            a = lp_p[s : s + step].astype(np.float64)  # (n, V)
            b = lp_q[s : s + step].astype(np.float64)
            p, q = np.exp(a), np.exp(b)
            kl[s : s + step] = np.where(p > 0, p * (a - b), 0.0).sum(1)
            lm = np.log(0.5 * (p + q))  # (n, V) log of the mixture
            js[s : s + step] = 0.5 * (np.where(p > 0, p * (a - lm), 0.0).sum(1)
                                       + np.where(q > 0, q * (b - lm), 0.0).sum(1))
            ca = a - a.mean(1, keepdims=True)
            cb = b - b.mean(1, keepdims=True)
            cos[s : s + step] = (ca * cb).sum(1) / np.sqrt((ca * ca).sum(1) * (cb * cb).sum(1))
    bad = ~(np.isfinite(lp_p).all(1) & np.isfinite(lp_q).all(1))
    cos[bad] = np.nan
    return kl, js, cos


def edit_distance(a, b) -> int:
    """Levenshtein distance between two token id sequences."""
    a, b = list(a), list(b)
    if not a or not b:
        return len(a) + len(b)
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def first_divergence(a, b) -> int:
    """Index of the first differing token (the shorter length if one is a prefix of the
    other), -1 when identical."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    if diff.size:
        return int(diff[0])
    return -1 if len(a) == len(b) else n


@dataclass
class PairOutTask:
    pairs: np.ndarray  # (n,)
    variant: np.ndarray  # (n,) prompt
    baseline: np.ndarray
    has_gen: bool
    n_gen: int = 0  # continuation tokens the distance columns compare (the sweep's max_new_tokens)


def output_task(ref: StoreRef, t: PairOutTask) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(output_change, lens_change) rows for a block of pairs."""
    store = ref.open()
    prompts = np.unique(np.concatenate([t.variant, t.baseline]))
    get = lambda name, dtype=None: read_rows(store, name, prompts, dtype)  # noqa: E731
    iv, ib = np.searchsorted(prompts, t.variant), np.searchsorted(prompts, t.baseline)
    ids, lp = get("logits_topk_ids"), get("logits_topk_logprobs", np.float64)  # (n, k)
    ent = get("logits_entropy", np.float64)  # (n,)
    kl, js = topk_kl_js(ids[iv], lp[iv], ids[ib], lp[ib])
    k = ids.shape[1]
    overlap = np.asarray([np.intersect1d(ids[a], ids[b]).size / k for a, b in zip(iv, ib)], dtype=np.float64)
    out = pd.DataFrame({
        "pair": t.pairs.astype(np.int64),
        "kl": kl, "js": js,
        "top1_changed": ids[iv, 0] != ids[ib, 0],
        "topk_overlap": overlap,
        "entropy_variant": ent[iv], "entropy_baseline": ent[ib],
    })
    if store.backend.has("logits_logprobs"):
        full = get("logits_logprobs")  # (n, V) float32
        out["kl_full"], out["js_full"], out["logit_cosine"] = full_distances(full[iv], full[ib])
    else:  # a store made without full_logprobs (or before it existed)
        out["kl_full"] = out["js_full"] = out["logit_cosine"] = np.nan
    if t.has_gen:
        gid, glen, gtext = get("gen_ids"), get("gen_len"), as_str(get("gen_text"))
        # the first n_gen tokens: a longer continuation kept for behaviour does not change these
        seqs = [gid[i, : min(max(int(glen[i]), 0), t.n_gen)] for i in range(len(prompts))]
        ed, fd = [], []
        for a, b in zip(iv, ib):
            m = max(len(seqs[a]), len(seqs[b]))
            ed.append(edit_distance(seqs[a], seqs[b]) / m if m else 0.0)
            fd.append(first_divergence(seqs[a], seqs[b]))
        out["gen_edit_distance"] = np.asarray(ed, dtype=np.float64)
        out["first_divergence"] = np.asarray(fd, dtype=np.int64)
        out["len_change"] = np.asarray([len(seqs[a]) - len(seqs[b]) for a, b in zip(iv, ib)], dtype=np.int64)
        out["gen_variant"], out["gen_baseline"] = gtext[iv], gtext[ib]
    else:
        out["gen_edit_distance"] = np.nan
        out["first_divergence"] = -1
        out["len_change"] = 0
        out["gen_variant"], out["gen_baseline"] = "", ""

    lids, llp = get("lens_topk_ids"), get("lens_topk_logprobs", np.float64)  # (n, L, lk)
    final = get("lens_final_top1_logprob", np.float64)  # (n, L)
    n, L = len(t.pairs), lids.shape[1]
    lk = lids.shape[2]
    kl_l, _ = topk_kl_js(lids[iv].reshape(n * L, lk), llp[iv].reshape(n * L, lk),
                         lids[ib].reshape(n * L, lk), llp[ib].reshape(n * L, lk))
    t1v, t1b = lids[iv, :, 0], lids[ib, :, 0]  # (n, L)
    lens = pd.DataFrame({
        "pair": np.repeat(t.pairs.astype(np.int64), L),
        "layer": np.tile(np.arange(L, dtype=np.int64), n),
        "kl_lens": kl_l,
        "top1_lens_variant": t1v.reshape(-1).astype(np.int64),
        "top1_lens_baseline": t1b.reshape(-1).astype(np.int64),
        "top1_agree": (t1v == t1b).reshape(-1),
        "final_top1_logprob_variant": final[iv].reshape(-1),
        "final_top1_logprob_baseline": final[ib].reshape(-1),
    })
    return out, lens


__all__ = ["PairOutTask", "edit_distance", "first_divergence", "full_distances", "output_task", "topk_buckets",
           "topk_kl_js"]

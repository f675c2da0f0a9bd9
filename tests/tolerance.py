"""Tolerances for comparing two computations of one quantity, derived from the rounding of
that quantity, never from what one machine happened to give.

Two float32 computations of the same value that differ only in the order of their sums
(another batch shape, packing, a cached prefix, another library's kernels: CPUs pick
matmul kernels by shape, and some round differently with the batch size) differ by at most
the rounding of those sums. A sum of n terms, in any order, is within
``gamma_(n-1) * sum|x_i| ~ (n - 1) * u * sum|x_i|`` of the exact sum (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., 2002, section 4.2), ``u = 2**-24`` the unit
roundoff of float32. A model's value is a chain of such sums: through each decoder layer,
the query/key/value projections (``hidden`` terms), the scores (``head_dim``), the weighted
values (one term per key), the output projection (``heads * head_dim``), the MLP
(``hidden``, then ``intermediate``) and the norms (``hidden``); the residual stream carries
each layer's difference on to the next, so the bounds add up over layers.

The bounds below take ``sum|x_i|`` as the magnitude of the compared values (``scale``).
They are worst cases (every rounding error of one sign); real differences grow like
``sqrt(n) * u`` and sit one to three orders of magnitude lower, so a bound holds on any
machine, while a real fault (a wrong mask, position or cache slot) changes values by a
fraction of their own size, far above it.
"""

from __future__ import annotations

import math
import os

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32: round-to-nearest is within u * |x| of x
U16 = 2.0**-11  # unit roundoff of float16


def _dim(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return int(v)
    if default is None:
        raise AttributeError(f"config has none of {names}")
    return int(default)


def layer_terms(cfg, n_keys: int) -> int:
    """The float32 terms summed along one path through one decoder layer of the model of
    ``cfg`` (a transformers config), with ``n_keys`` keys per query."""
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    h = _dim(cfg, "hidden_size", "n_embd")
    nh = _dim(cfg, "num_attention_heads", "n_head")
    hd = _dim(cfg, "head_dim", default=h // nh)
    inter = _dim(cfg, "intermediate_size", "n_inner", default=4 * h)
    return h + hd + n_keys + nh * hd + h + inter + 2 * h  # qkv, scores, values, o_proj, up, down, two norms


def forward_bound(cfg, n_keys: int, scale: float, n_layers: int | None = None, *, statistical: bool = False) -> float:
    """Largest difference between two float32 runs of ``n_layers`` layers (default: all)
    of the model of ``cfg`` for a value of magnitude ``scale`` (see the module docstring).

    ``statistical``: for deep real models, where the worst case (``n u``, every error of
    one sign) is hundreds of times what rounding does: rounding errors of random sign add
    like a random walk, standard deviation ``sqrt(n / 3) u`` for n errors uniform in
    ``[-u, u]`` (Higham 2002, section 2.8); the bound is 10 standard deviations."""
    c = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = _dim(c, "num_hidden_layers", "n_layer") if n_layers is None else n_layers
    n = n_layers * layer_terms(cfg, n_keys)
    return (10.0 * math.sqrt(n / 3.0) if statistical else n) * U32 * float(scale)


def logsoftmax_rounding(lp_abs: float, vocab: int) -> float:
    """Rounding of one float32 log-probability computed as ``(z - max) - log(sum exp(z - max))``
    (torch's log_softmax): the subtraction ``z - max`` (``u * |lp|`` at most), the sum of
    ``vocab`` exponentials, summed in a cascade (``log2(vocab) * u`` relative, which the log
    turns into an absolute error), the log itself (``u * ln(vocab)``) and the final
    subtraction (``u * |lp|``)."""
    return U32 * (2.0 * lp_abs + math.log(vocab) + math.ceil(math.log2(vocab)))


def logprob_bound(cfg, n_keys: int, logit_scale: float, lp_abs: float, vocab: int) -> float:
    """Largest difference between one token's float32 log-probabilities from two runs:
    twice the logits' difference (the token's own, and the log-sum-exp's, which moves by at
    most the largest logit difference), one more sum of ``hidden`` terms for the
    unembedding, and each run's own log-softmax rounding."""
    c = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    dz = forward_bound(cfg, n_keys, logit_scale) + _dim(c, "hidden_size", "n_embd") * U32 * logit_scale
    return 2.0 * dz + 2.0 * logsoftmax_rounding(lp_abs, vocab)


def kl_floor(entropy: float, vocab: int, dz: float = 0.0) -> float:
    """The largest KL(P || Q), in nats, between two float32 log-probability vectors of one
    distribution P that went through different kernels.

    KL is computed as ``sum_i p_i (a_i - b_i)``. The difference of the logits enters only
    at second order (the log-sum-exp moves by ``sum_i p_i dz_i`` to first order, which
    cancels the first-order term exactly): at most ``dz**2 / 2`` for logits that differ by
    at most ``dz``. What is left is each run's own log-softmax rounding averaged under P;
    ``|lp_i|`` averages to the entropy ``H(P)``, so ``2 * u * (2 H(P) + ln V + ceil(log2 V))``,
    e.g. 5.8e-6 nats for a near-uniform distribution over 49,152 tokens (what tiny random
    models give)."""
    return 2.0 * logsoftmax_rounding(float(entropy), vocab) + 0.5 * float(dz) ** 2


def entropy_of(logprobs) -> float:
    """H(P) in nats of a vector of log-probabilities (numpy or torch)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    return float(-(np.exp(lp) * lp).sum())


def assert_within(got, want, bound, what: str = "") -> None:
    """``|got - want| <= bound`` everywhere (NaN where both are NaN); ``bound`` a scalar or an
    array broadcasting against the values. With ``PROMPTSHIFT_TOLERANCE_REPORT=FILE`` the
    largest ratio of difference to bound is appended to FILE (how close a machine came)."""
    x, y = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert x.shape == y.shape, (what, x.shape, y.shape)
    assert np.array_equal(np.isnan(x), np.isnan(y)), f"{what}: NaN in different places"
    diff = np.nan_to_num(np.abs(x - y))
    b = np.broadcast_to(np.asarray(bound, np.float64), diff.shape)
    report = os.environ.get("PROMPTSHIFT_TOLERANCE_REPORT")
    if report and diff.size:
        ratio = float(np.max(diff / np.maximum(b, 1e-300)))
        with open(report, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{what}\t{ratio:.3g}\n")
    bad = diff > b
    if bad.any():
        i = np.unravel_index(np.argmax(diff - b), diff.shape)
        raise AssertionError(f"{what}: |difference| {diff[i]:.3g} exceeds the float rounding bound {b[i]:.3g} "
                             f"at {tuple(int(j) for j in i)} ({int(bad.sum())} of {diff.size} values)")


def assert_below(value, bound, what: str = "") -> None:
    """``value <= bound`` everywhere (a distance that should be zero up to rounding)."""
    assert_within(np.asarray(value, np.float64), np.zeros_like(np.asarray(value, np.float64)), bound, what)


# store arrays (and the engine PromptResult fields that become them) by the kind of value they hold
_ACTIVATIONS = {"resid_pre", "attn_out", "mlp_out", "resid_post", "resid_pre_0"}
_PROBABILITIES = {"attn_region_mass", "attn_sink", "attn_last", "attn_pattern", "region_mass", "sink", "last_row",
                  "pattern"}
_ATTN_ENTROPY = {"attn_entropy", "entropy"}
_LOGPROBS = {"logits_topk_logprobs", "lens_topk_logprobs", "lens_final_top1_logprob", "topk_logprobs",
             "lens_logprobs", "lens_final_top1", "logits_lse", "lse", "logits_logprobs", "logprobs"}
_OUT_ENTROPY = {"logits_entropy", "lens_entropy", "entropy_out"}


def array_bound(name: str, ref, cfg, n_keys: int, *, vocab: int, logit_scale: float, float16: bool = False):
    """The float rounding bound for array ``name`` (a store array or an engine PromptResult field)
    between two extractions of the same prompts that differ in batching, packing or prefix
    sharing; ``ref`` one side's values, ``n_keys`` the longest prompt, ``logit_scale`` an
    upper bound on |logits| (``|lse| + |log-prob|`` of the compared tokens), ``float16``:
    the values were stored as float16 (two float32 values within the bound may round to
    neighbouring float16 values: one more float16 spacing, ``2 * u16 * |x|``).

    - activations: :func:`forward_bound` at the array's own magnitude;
    - attention probabilities (scale 1): the softmax moves a probability by at most twice
      the largest score difference;
    - attention entropies: ``-sum p log p`` moves by ``2 max|d score| (1 + H)``, H <= ln(keys);
    - log-probs and log-sum-exp: :func:`logprob_bound`;
    - output entropies: ``|dH| <= max|d lp| (1 + H)`` (``dp = p d lp``), H <= ln(vocab)."""
    ref = np.asarray(ref, np.float64)
    if name in _ACTIVATIONS:
        b = forward_bound(cfg, n_keys, np.nanmax(np.abs(ref)) if ref.size else 0.0)
    elif name in _PROBABILITIES:
        b = 2 * forward_bound(cfg, n_keys, 1.0)
    elif name in _ATTN_ENTROPY:
        b = 2 * forward_bound(cfg, n_keys, 1.0) * (1 + math.log(n_keys))
    elif name in _LOGPROBS:
        lp_abs = float(np.nanmax(np.abs(ref))) if ref.size else 0.0
        b = logprob_bound(cfg, n_keys, logit_scale, lp_abs, vocab)
    elif name in _OUT_ENTROPY:
        b = logprob_bound(cfg, n_keys, logit_scale, logit_scale, vocab) * (1 + math.log(vocab))
    else:
        raise KeyError(f"no rounding bound for {name!r}")
    return b + (2 * U16 * np.abs(ref) if float16 else 0.0)


def logit_scale_of(store) -> float:
    """An upper bound on |logit| of the tokens a store compares: ``z = lp + lse``."""
    lse = np.abs(np.asarray(store.array("logits_lse")[...], np.float64))
    lp = np.abs(np.asarray(store.array("lens_topk_logprobs")[...], np.float64))
    lp0 = np.abs(np.asarray(store.array("logits_topk_logprobs")[...], np.float64))
    if "logits_logprobs" in store.names():  # every token's log-prob, not only the top-k
        lp0 = np.abs(np.asarray(store.array("logits_logprobs")[...], np.float64))
    return float(np.nanmax(lse) + max(np.nanmax(lp), np.nanmax(lp0)))

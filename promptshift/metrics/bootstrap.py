"""Bootstrap intervals and p-values for a crossed design (system prompts × user prompts).

A sweep crosses every system prompt with every user prompt, and both are samples: a
claim about system prompts in general ("longer system prompts change the model more",
"the effect peaks at layer 16") must hold over other system prompts as well as other user
prompts. Pairs of one user prompt share its baseline and wording, pairs of one system
prompt share its text, so neither the pair nor one factor alone is the unit.

**Crossed (pigeonhole) bootstrap.** One resample draws the system prompts with
replacement and, independently, the user prompts with replacement; the resampled sweep
is every (drawn system, drawn user) cell, so a cell (s, u) appears ``ws[s] * wu[u]`` times
(Owen, A. B. (2007). "The pigeonhole bootstrap". *Annals of Applied Statistics* 1(2),
386-411). Its variance of a mean covers the system, user and interaction variance
components (slightly conservatively: Owen, section 3). Multiplicities are drawn once from
the seed (``crossed_weights``) and shared by every table, so each resample is one sweep
for all of them; each statistic is then a matrix product of per-cell sums with the
weights, with no Python loop over resamples.

Which unit to resample follows the claim: an estimate that averages or correlates over
system prompts (means over pairs, length, tags, text features, placement, internal vs
output change) resamples both; an estimate for one system prompt (its mean over user
prompts) resamples user prompts only (``mean_ci`` with ``wu``); in ``crossed_mean`` and
``group_diff`` the system weights of a group holding one system prompt cancel anyway.

**p-values agree with the intervals.** ``boot_p`` is the smallest two-sided level at which
the percentile interval of the same resamples contains the null value, so ``p < 0.05``
exactly when the 95% interval excludes it (Efron & Tibshirani (1993), *An Introduction to
the Bootstrap*, ch. 15-16: a p-value as the inverted percentile interval). Both say the
same thing about the same unit; no t-test that assumes independent pairs.

**Selected maxima** (the most changed layer, the best-predicting layer and component)
are chosen on one half of the user prompts and measured on the other: ``split_users``
draws the halves once from the seed, ``estimate_weights`` the resamples of the measured
half. Halves split the user prompts only: system prompts are shared, so the crossed
interval on the measured half, not the split, carries their variation.

How to call it (shapes: S system prompts, U user prompts, B resamples)::

    ws, wu = crossed_weights(S, U, n_boot, seed)            # (B, S), (B, U)
    mean, boot = crossed_mean(sums, counts, ws, wu)          # sums, counts (M, S, U) -> (M,), (M, B)
    lo, hi = percentile_ci(boot); p = boot_p(boot)           # 95% interval and its p
    res = corr_ci(X, y, pair_weights(ws, wu, s_idx, u_idx))  # across pairs: X (M, n), y (n,)
    res = across_corr(x, sums, counts, ws, wu)               # across system prompts: x (S,), sums (S, U)
    diff, boot = group_diff(sums, counts, member, ws, wu)    # system prompts with vs without a property
    mean, boot = mean_ci(sums_su, counts_su, wu)             # one system prompt: user prompts resampled
    totals = crossed_sums(sums, ws, wu)                      # (M, B) resampled totals, for ratios of sums

Size: the crossed bootstrap and everything derived from its one set of resamples (means,
correlations, group differences, held-out halves): one method, one module.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CI = (2.5, 97.5)
LEVEL = 0.95
SMALL = 8  # fewer system prompts (or user prompts) than this is named a small sample
_CHUNK = 1 << 24  # float64 elements of one (m, S, B) temporary in crossed_mean
_PAIR_CHUNK = 1 << 21  # float64 elements of one (b, n) resamples x pairs temporary in corr_ci (16 MB)

Seed = int | Sequence[int]


def user_weights(n_units: int, n_boot: int, seed: Seed) -> np.ndarray:
    """(n_boot, n_units) multiplicities of each unit in each resample: a plain bootstrap over
    units (user prompts, conversations), drawn from ``numpy.random.default_rng(seed)``.

    One unit has no variation to resample: its weights are NaN, so every statistic of the
    resamples, its interval and its p-value are undefined (NaN) rather than an interval of
    zero width (a crossed statistic too: it is to speak for other units of both kinds)."""
    if n_units == 1:
        return np.full((n_boot, 1), np.nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_units, size=(n_boot, n_units))  # (B, U)
    w = np.zeros((n_boot, n_units))
    np.add.at(w, (np.repeat(np.arange(n_boot), n_units), draws.reshape(-1)), 1.0)
    return w


def crossed_weights(n_systems: int, n_users: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicities of system prompts (B, S) and of user prompts (B, U) in each resample
    of the pigeonhole bootstrap, drawn independently. The user weights are
    ``user_weights(n_users, n_boot, seed)``, so a user-only analysis run with the same seed
    sees the same user resamples."""
    wu = user_weights(n_users, n_boot, seed)
    ws = user_weights(n_systems, n_boot, [seed, 1])
    return ws, wu


@dataclass(frozen=True)
class PairWeights:
    """The (B, n) multiplicities of n pairs in each crossed resample, ``ws[:, s_idx] *
    wu[:, u_idx]``, built a few resamples at a time (:meth:`rows`) rather than whole: at
    100,000 pairs and 1,000 resamples the whole matrix is 800 MB, and every statistic of
    the pairs (:func:`corr_ci`) reads it one block of resamples after another."""

    ws: np.ndarray  # (B, S) system-prompt multiplicities
    wu: np.ndarray  # (B, U) user-prompt multiplicities
    s_idx: np.ndarray  # (n,) column of ws of each pair
    u_idx: np.ndarray  # (n,) column of wu of each pair

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ws), len(self.s_idx)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo, n) multiplicities in resamples lo..hi-1."""
        return self.ws[lo:hi, self.s_idx] * self.wu[lo:hi, self.u_idx]

    @classmethod
    def given(cls, w: np.ndarray) -> PairWeights:
        """Weights already built as a (B, n) matrix (e.g. ``w[:, users]``), read the same way."""
        w = np.asarray(w, np.float64)
        n = w.shape[1]
        return cls(w, np.ones((len(w), 1)), np.arange(n), np.zeros(n, np.int64))

    def take(self, keep: np.ndarray) -> PairWeights:
        """The pairs where the boolean mask ``keep`` (n,) is True."""
        return PairWeights(self.ws, self.wu, self.s_idx[keep], self.u_idx[keep])

    def dense(self) -> np.ndarray:
        return self.rows(0, len(self.ws))


def pair_weights(ws: np.ndarray, wu: np.ndarray, s_idx: np.ndarray, u_idx: np.ndarray) -> PairWeights:
    """The multiplicity of each of n pairs, whose system and user prompts are ``s_idx``,
    ``u_idx`` (n,) (indices into the columns of ``ws`` (B, S), ``wu`` (B, U)), as a lazy
    (B, n) :class:`PairWeights`."""
    return PairWeights(ws, wu, np.asarray(s_idx, np.int64), np.asarray(u_idx, np.int64))


def _resample_blocks(B: int, n: int) -> list[tuple[int, int]]:
    """[lo, hi) blocks of resamples whose (hi - lo, n) temporaries hold ~_PAIR_CHUNK floats each."""
    step = max(1, min(B, _PAIR_CHUNK // max(n, 1)))
    return [(lo, min(B, lo + step)) for lo in range(0, B, step)]


def split_users(n_users: int, seed: int, strata: Sequence | None = None) -> np.ndarray:
    """(U,) bool: True for the user prompts of the selection half, False for the half a
    selected quantity is measured on. Seeded; within each stratum (e.g. the user prompt's
    category, in order of first appearance) the prompts are shuffled and dealt alternately
    to the two halves, continuing across strata, so the halves differ in size by at most
    one and share the categories. Fewer than 2 user prompts: every prompt selects."""
    sel = np.zeros(n_users, bool)
    if n_users < 2:
        sel[:] = True
        return sel
    rng = np.random.default_rng([seed, 3])
    strata = np.zeros(n_users, np.int64) if strata is None else np.asarray(strata)
    _, first = np.unique(strata, return_index=True)
    turn = 0
    for key in strata[np.sort(first)]:
        idx = rng.permutation(np.flatnonzero(strata == key))
        for i in idx:
            sel[i] = turn % 2 == 0
            turn += 1
    return sel


def estimate_weights(select: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(B, U) user multiplicities of a bootstrap over the measured half only (``~select``):
    zero for every user prompt of the selection half."""
    est = np.flatnonzero(~np.asarray(select, bool))
    w = np.zeros((n_boot, len(select)))
    if est.size:
        w[:, est] = user_weights(est.size, n_boot, [seed, 2])
    return w


def percentile_ci(boot: np.ndarray, axis: int = -1, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval, ignoring resamples where the statistic is undefined (e.g. a
    resample that holds no pair of some group)."""
    q = (50 * (1 - level), 50 * (1 + level))
    boot = np.asarray(boot, dtype=np.float64)
    if not np.isnan(boot).any():
        lo, hi = np.percentile(boot, q, axis=axis)
        return lo, hi
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(boot, q, axis=axis)
    return lo, hi


def boot_p(boot: np.ndarray, null: float = 0.0) -> np.ndarray:
    """Two-sided bootstrap p-value of ``statistic == null`` from resamples ``boot`` (..., B):
    the smallest alpha whose percentile interval (``np.percentile``'s linear interpolation,
    as in ``percentile_ci``) still contains ``null``, so ``p < 1 - level`` exactly when the
    interval excludes it. 0 when every resample lies on one side (report it as
    ``p < 1 / B``); NaN without defined resamples. Undefined (NaN) resamples are ignored,
    as in ``percentile_ci``."""
    boot = np.asarray(boot, dtype=np.float64)
    flat = boot.reshape(-1, boot.shape[-1]) - null
    out = np.full(len(flat), np.nan)
    for i, row in enumerate(flat):
        v = np.sort(row[np.isfinite(row)])
        n = v.size
        if n == 0:
            continue
        if n == 1:
            out[i] = 1.0 if v[0] == 0 else 0.0
            continue
        # h_plus: the largest quantile position with Q(h) <= 0; h_minus: the smallest with Q(h) >= 0
        j = np.searchsorted(v, 0.0, side="right") - 1  # last index with v <= 0
        if j < 0:
            h_plus = -np.inf
        elif j == n - 1:
            h_plus = n - 1.0
        else:
            h_plus = j + (0.0 - v[j]) / (v[j + 1] - v[j])
        k = np.searchsorted(v, 0.0, side="left")  # first index with v >= 0
        if k >= n:
            h_minus = np.inf
        elif k == 0:
            h_minus = 0.0
        else:
            h_minus = (k - 1) + (0.0 - v[k - 1]) / (v[k] - v[k - 1])
        p = 2.0 * min(h_plus / (n - 1), 1.0 - h_minus / (n - 1))
        out[i] = float(np.clip(p, 0.0, 1.0))
    return out.reshape(boot.shape[:-1]) if boot.ndim > 1 else out[0]


def mean_ci(sums: np.ndarray, counts: np.ndarray, w: np.ndarray):
    """Bootstrap over one factor: sums, counts (M, U) per statistic and unit -> mean (M,),
    boot (M, B), with w (B, U) the units' multiplicities. For one system prompt's mean over
    user prompts, and for conversations."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums.sum(1) / counts.sum(1)
        boot = (sums @ w.T) / (counts @ w.T)  # (M, B)
    return mean, boot


def crossed_sums(sums: np.ndarray, ws: np.ndarray, wu: np.ndarray) -> np.ndarray:
    """Resampled totals: sums (M, S, U) per statistic and cell -> (M, B), resample b's total
    ``sum_su ws[b, s] wu[b, u] sums[m, s, u]``. Works in chunks of rows, so memory stays
    bounded for thousands of rows (layers × tokens)."""
    sums = np.asarray(sums, np.float64)
    M, S, U = sums.shape
    B = len(wu)
    out = np.empty((M, B))
    step = max(1, _CHUNK // max(1, S * B))
    for i in range(0, M, step):
        m = min(step, M - i)
        t = (sums[i : i + m].reshape(m * S, U) @ wu.T).reshape(m, S, B)  # (m, S, B) user-weighted
        out[i : i + m] = np.einsum("msb,bs->mb", t, ws)
    return out


def crossed_mean(sums: np.ndarray, counts: np.ndarray, ws: np.ndarray, wu: np.ndarray):
    """Mean over pairs and its pigeonhole resamples: sums, counts (M, S, U) per statistic,
    system prompt and user prompt -> mean (M,), boot (M, B). A resample's mean is
    ``sum_su ws[s] wu[u] sums[m, s, u] / sum_su ws[s] wu[u] counts[m, s, u]``; NaN where the
    resample holds no pair of row m."""
    sums = np.asarray(sums, np.float64)
    counts = np.asarray(counts, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums.sum((1, 2)) / counts.sum((1, 2))
        boot = crossed_sums(sums, ws, wu) / crossed_sums(counts, ws, wu)
    return mean, boot


def crossed_mean_long(row: np.ndarray, s_idx: np.ndarray, u_idx: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                      n_rows: int, ws: np.ndarray, wu: np.ndarray):
    """:func:`crossed_mean` for entries in long form: entry i adds ``sums[i]``, ``counts[i]``
    to cell (``s_idx[i]``, ``u_idx[i]``) of statistic ``row[i]`` (0..n_rows-1) -> mean
    (n_rows,), boot (n_rows, B). Dense (m, S, U) blocks are built a few rows at a time, so
    memory is bounded whatever the number of rows (tokens × layers × components)."""
    row = np.asarray(row, np.int64)
    S, U, B = ws.shape[1], wu.shape[1], len(wu)
    order = np.argsort(row, kind="stable")
    row, s_idx, u_idx = row[order], np.asarray(s_idx)[order], np.asarray(u_idx)[order]
    sums, counts = np.asarray(sums, np.float64)[order], np.asarray(counts, np.float64)[order]
    mean, boot = np.full(n_rows, np.nan), np.full((n_rows, B), np.nan)
    step = max(1, min(_CHUNK // max(1, S * B), _CHUNK // max(1, S * U)))
    for i in range(0, n_rows, step):
        m = min(step, n_rows - i)
        a, b = np.searchsorted(row, [i, i + m])
        ds, dc = np.zeros((m, S, U)), np.zeros((m, S, U))
        key = (row[a:b] - i, s_idx[a:b], u_idx[a:b])
        np.add.at(ds, key, sums[a:b])
        np.add.at(dc, key, counts[a:b])
        mean[i : i + m], boot[i : i + m] = crossed_mean(ds, dc, ws, wu)
    return mean, boot


def group_diff(sums: np.ndarray, counts: np.ndarray, member: np.ndarray, ws: np.ndarray, wu: np.ndarray):
    """Mean over pairs of system prompts with a property (``member`` (S,) bool) minus the mean
    over those without; sums, counts (S, U). -> diff (float), boot (B,); a resample that
    draws no system prompt of one side is NaN."""
    member = np.asarray(member, bool)
    s = np.stack([np.where(member[:, None], sums, 0.0), np.where(member[:, None], 0.0, sums)])  # (2, S, U)
    c = np.stack([np.where(member[:, None], counts, 0.0), np.where(member[:, None], 0.0, counts)])
    mean, boot = crossed_mean(s, c, ws, wu)
    return float(mean[0] - mean[1]), boot[0] - boot[1]


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson r of x, y (n,) or (B, n) under weights w (B, n) -> (B,)."""
    sw = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (w * x).sum(-1) / sw
        my = (w * y).sum(-1) / sw
        dx = x - mx[:, None]
        dy = y - my[:, None]
        cov = (w * dx * dy).sum(-1)
        r = cov / np.sqrt((w * dx * dx).sum(-1) * (w * dy * dy).sum(-1))
    return np.clip(r, -1.0, 1.0)  # rounding can step past ±1 when a resample is nearly collinear


def weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mid-ranks of x (n,) within each weighted resample w (B, n) -> (B, n): the rank x_i
    would have in the sample that repeats item i w_i times (ties averaged).

    Works on the transpose (n, B) so that sorting, tie-group sums and cumulative sums run
    along contiguous rows."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ws = np.ascontiguousarray(w.T[order])  # (n, B) in sorted order
    new = np.concatenate([[True], xs[1:] != xs[:-1]])
    if new.all():  # no ties: each item is its own group
        mid = np.cumsum(ws, axis=0) - ws + (ws + 1.0) / 2.0  # (n, B)
    else:
        starts = np.flatnonzero(new)
        group = np.cumsum(new) - 1  # (n,) tie group of each sorted item
        wg = np.add.reduceat(ws, starts, axis=0)  # (G, B) weight of each tie group
        mid = (np.cumsum(wg, axis=0) - wg + (wg + 1.0) / 2.0)[group]  # (n, B)
    ranks = np.empty_like(mid)
    ranks[order] = mid
    return ranks.T


def weighted_ranks_rows(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Like :func:`weighted_ranks` when the values change with the resample too: y, w
    (B, n) -> weighted mid-ranks (B, n) of each row's values under its own weights."""
    B, n = y.shape
    order = np.argsort(y, axis=1, kind="stable")
    ys = np.take_along_axis(y, order, 1)
    wsrt = np.take_along_axis(w, order, 1)
    new = np.concatenate([np.ones((B, 1), bool), ys[:, 1:] != ys[:, :-1]], axis=1)
    gid = np.cumsum(new, axis=1) - 1  # (B, n) tie group within the row
    gw = np.zeros((B, n))
    np.add.at(gw, (np.repeat(np.arange(B), n), gid.reshape(-1)), wsrt.reshape(-1))
    gmid = np.cumsum(gw, axis=1) - gw + (gw + 1.0) / 2.0  # (B, G<=n)
    mid = np.take_along_axis(gmid, gid, 1)
    ranks = np.empty_like(mid)
    np.put_along_axis(ranks, order, mid, 1)
    return ranks


def _r(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row of x (M, n) with y (n,), vectorised over rows."""
    dx = x - x.mean(1, keepdims=True)
    dy = y - y.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dx @ dy) / np.sqrt((dx * dx).sum(1) * (dy @ dy))
    return np.clip(r, -1.0, 1.0)


def corr_r(X: np.ndarray, y: np.ndarray, method: str = "pearson") -> np.ndarray:
    """Point estimate only: Pearson or Spearman r of each row of X (M, n) with y (n,), over
    the observations where y and every row of X are finite (NaN for a constant row)."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y) & np.isfinite(X).all(0)
    X, y = X[:, ok], y[ok]
    if X.shape[1] < 3 or np.ptp(y) == 0:
        return np.full(len(X), np.nan)
    if method == "spearman":
        X, y = stats.rankdata(X, axis=1), stats.rankdata(y)
    r = _r(X, y)
    return np.where(np.ptp(X, axis=1) == 0, np.nan, r)


def corr_ci(X: np.ndarray, y: np.ndarray, wp: PairWeights | np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Pearson and Spearman r of each row of X (M, n) with y (n,) across n pairs, with a
    bootstrap CI and p-value (``boot_p``) from the resampled pairs' weights ``wp`` (B, n)
    (``pair_weights(ws, wu, ...)`` for the crossed bootstrap; an array such as
    ``w[:, users]`` for user prompts only). -> {"pearson": {...}, "spearman": {...}}, each
    with arrays (M,) ``r``, ``p``, ``ci_low``, ``ci_high``, ``n``.

    Observations where y or any row of X is not finite are dropped for all rows (rows are
    layers of one component: they are defined for the same pairs). The resamples are
    taken a block at a time (``_PAIR_CHUNK`` weights per block), so memory does not grow
    with resamples x pairs; each resample's r is computed as if all were taken at once."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y) & np.isfinite(X).all(0)
    X, y = X[:, ok], y[ok]
    wp = (wp if isinstance(wp, PairWeights) else PairWeights.given(wp)).take(ok)
    M, n = X.shape
    B = wp.shape[0]
    nan = np.full(M, np.nan)
    empty = dict(r=nan, p=nan, ci_low=nan, ci_high=nan, n=np.full(M, n))
    if n < 3 or np.ptp(y) == 0:
        return {"pearson": dict(empty), "spearman": dict(empty)}
    const = np.ptp(X, axis=1) == 0  # (M,) r undefined
    XY, XX, YY = X * y, X * X, y * y
    pear, spear = np.empty((M, B)), np.empty((M, B))
    for lo, hi in _resample_blocks(B, n):
        w = wp.rows(lo, hi)  # (b, n)
        # Pearson: every weighted moment is a matrix product with the resample weights
        sw = w.sum(1)  # (b,)
        with np.errstate(invalid="ignore", divide="ignore"):
            mx = (X @ w.T) / sw  # (M, b)
            my = (w @ y) / sw  # (b,)
            cxy = (XY @ w.T) / sw - mx * my
            cxx = (XX @ w.T) / sw - mx * mx
            cyy = (w @ YY) / sw - my * my
            pear[:, lo:hi] = cxy / np.sqrt(np.maximum(cxx, 0) * np.maximum(cyy, 0))
        # Spearman: ranks depend on the resample, so one row at a time. Weighted mid-ranks of a
        # resample of total weight W always have weighted mean (W + 1) / 2, which saves the means.
        mid = ((sw + 1.0) / 2.0)[:, None]  # (b, 1)
        ry = weighted_ranks(y, w) - mid  # (b, n) centred
        wry = w * ry
        vy = np.einsum("bn,bn->b", wry, ry)
        with np.errstate(invalid="ignore", divide="ignore"):
            for m in range(M):
                rx = weighted_ranks(X[m], w) - mid
                spear[m, lo:hi] = np.einsum("bn,bn->b", wry, rx) / np.sqrt(vy * np.einsum("bn,bn,bn->b", w, rx, rx))
    out = {}
    boot = np.clip(pear, -1.0, 1.0)
    lo, hi = percentile_ci(boot)
    out["pearson"] = dict(r=_r(X, y), p=boot_p(boot), ci_low=lo, ci_high=hi, n=np.full(M, n))
    boot = np.clip(spear, -1.0, 1.0)
    lo, hi = percentile_ci(boot)
    out["spearman"] = dict(r=_r(stats.rankdata(X, axis=1), stats.rankdata(y)), p=boot_p(boot), ci_low=lo,
                           ci_high=hi, n=np.full(M, n))
    for d in out.values():
        for k in ("r", "p", "ci_low", "ci_high"):
            d[k] = np.where(const, np.nan, d[k])
    return out


def across_corr(x: np.ndarray, sums: np.ndarray, counts: np.ndarray, ws: np.ndarray, wu: np.ndarray) -> dict:
    """Correlation across system prompts of a fixed property x (S,) (length, a text
    feature) with each system prompt's mean over its pairs (sums, counts (S, U)), under the
    crossed bootstrap: a resample recomputes each system prompt's mean over the resampled
    user prompts and correlates across the resampled system prompts (weights ``ws``).
    -> {"pearson": {...}, "spearman": {...}}, each with floats ``r`` (scipy's, on the sweep),
    ``p`` (``boot_p``), ``ci_low``, ``ci_high`` and ints ``n`` (system prompts), ``n_users``.
    A system prompt without pairs, or x not finite, is left out."""
    x = np.asarray(x, np.float64)
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = sums.sum(1) / counts.sum(1)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    n_users = int((counts[ok].sum(0) > 0).sum())
    out = {}
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        for m in ("pearson", "spearman"):
            out[m] = dict(r=np.nan, p=np.nan, ci_low=np.nan, ci_high=np.nan, n=n, n_users=n_users)
        return out
    x, y, sums, counts, ws = x[ok], y[ok], sums[ok], counts[ok], ws[:, ok]
    with np.errstate(invalid="ignore", divide="ignore"):
        yb = ((sums @ wu.T) / (counts @ wu.T)).T  # (B, n) each system prompt's mean in each resample
    wb = np.where(np.isfinite(yb), ws, 0.0)  # a system prompt none of whose users was drawn drops out
    yb = np.nan_to_num(yb)
    xb = np.broadcast_to(x, yb.shape)
    bp = weighted_pearson(xb, yb, wb)
    rx = weighted_ranks(x, wb)
    ry = weighted_ranks_rows(yb, wb)
    bs = weighted_pearson(rx, ry, wb)
    for m, res, boot in (("pearson", stats.pearsonr(x, y), bp), ("spearman", stats.spearmanr(x, y), bs)):
        lo, hi = percentile_ci(boot)
        out[m] = dict(r=float(res.statistic), p=float(boot_p(boot)), ci_low=float(lo), ci_high=float(hi), n=n,
                      n_users=n_users)
    return out


def excludes(ci, null: float = 0.0) -> bool:
    """Whether an interval (lo, hi) lies entirely on one side of ``null`` (False when
    either end is undefined)."""
    lo, hi = (float(v) if v is not None else np.nan for v in ci)
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > null or hi < null))


__all__ = ["CI", "LEVEL", "PairWeights", "SMALL", "across_corr", "boot_p", "corr_ci", "corr_r", "crossed_mean",
           "crossed_mean_long", "crossed_sums", "crossed_weights", "estimate_weights", "excludes", "group_diff",
           "mean_ci", "pair_weights", "percentile_ci", "split_users", "user_weights", "weighted_pearson",
           "weighted_ranks", "weighted_ranks_rows"]

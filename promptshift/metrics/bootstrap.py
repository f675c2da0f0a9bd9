"""Bootstrap confidence intervals over user prompts, as matrix products.

The unit of resampling is the user prompt: pairs of one user prompt share its baseline and
its wording, so they are not independent, and a CI over pairs would be too narrow. One
resample is a vector of multiplicities ``w`` (n_boot, n_users) drawn once from the seed and
shared by every analysis; a resampled mean over pairs is then ``(w @ sums) / (w @ counts)``
with per-user sums and counts, and a resampled correlation uses the same weights on the
pairs. No Python loop over resamples, and the same resamples for every table.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

CI = (2.5, 97.5)


def user_weights(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_users) multiplicities of each user prompt in each resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_users, size=(n_boot, n_users))  # (B, U)
    w = np.zeros((n_boot, n_users))
    np.add.at(w, (np.repeat(np.arange(n_boot), n_users), draws.reshape(-1)), 1.0)
    return w


def percentile_ci(boot: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval, ignoring resamples where the statistic is undefined (e.g. a
    resample that holds no pair of some group)."""
    boot = np.asarray(boot, dtype=np.float64)
    if not np.isnan(boot).any():
        lo, hi = np.percentile(boot, CI, axis=axis)
        return lo, hi
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(boot, CI, axis=axis)
    return lo, hi


def mean_ci(sums: np.ndarray, counts: np.ndarray, w: np.ndarray):
    """sums, counts (M, U) per statistic and user prompt -> mean (M,), boot (M, B)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums.sum(1) / counts.sum(1)
        boot = (sums @ w.T) / (counts @ w.T)  # (M, B)
    return mean, boot


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
    return r


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


def _r_p(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r of each row of x (M, n) with y (n,) and its two-sided p-value (the t test
    scipy.stats.pearsonr and spearmanr use), vectorised over rows."""
    n = x.shape[1]
    dx = x - x.mean(1, keepdims=True)
    dy = y - y.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dx @ dy) / np.sqrt((dx * dx).sum(1) * (dy @ dy))
        r = np.clip(r, -1.0, 1.0)
        t = r * np.sqrt((n - 2) / np.maximum(1.0 - r * r, 1e-300))
    p = 2.0 * stats.t.sf(np.abs(t), n - 2)
    return r, p


def corr_ci(X: np.ndarray, y: np.ndarray, users: np.ndarray, w: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Pearson and Spearman r of each row of X (M, n) with y (n,), p-values and bootstrap
    CIs over user prompts; ``users`` (n,) is each observation's index into ``w`` (B, U).

    Observations where y or any row of X is not finite are dropped for all rows (rows are
    layers of one component: they are defined for the same pairs)."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y) & np.isfinite(X).all(0)
    X, y, users = X[:, ok], y[ok], users[ok]
    M, n = X.shape
    nan = np.full(M, np.nan)
    empty = dict(r=nan, p=nan, ci_low=nan, ci_high=nan, n=np.full(M, n))
    if n < 3 or np.ptp(y) == 0:
        return {"pearson": dict(empty), "spearman": dict(empty)}
    const = np.ptp(X, axis=1) == 0  # (M,) r undefined
    wp = w[:, users]  # (B, n)
    out = {}
    # Pearson: every weighted moment is a matrix product with the resample weights
    sw = wp.sum(1)  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (X @ wp.T) / sw  # (M, B)
        my = (wp @ y) / sw  # (B,)
        cxy = ((X * y) @ wp.T) / sw - mx * my
        cxx = ((X * X) @ wp.T) / sw - mx * mx
        cyy = (wp @ (y * y)) / sw - my * my
        boot = cxy / np.sqrt(np.maximum(cxx, 0) * np.maximum(cyy, 0))
    r, p = _r_p(X, y)
    lo, hi = percentile_ci(boot)
    out["pearson"] = dict(r=r, p=p, ci_low=lo, ci_high=hi, n=np.full(M, n))
    # Spearman: ranks depend on the resample, so one row at a time. Weighted mid-ranks of a
    # resample of total weight W always have weighted mean (W + 1) / 2, which saves the means.
    mid = ((sw + 1.0) / 2.0)[:, None]  # (B, 1)
    ry = weighted_ranks(y, wp) - mid  # (B, n) centred
    wry = wp * ry
    vy = np.einsum("bn,bn->b", wry, ry)
    boot = np.empty((M, len(wp)))
    with np.errstate(invalid="ignore", divide="ignore"):
        for m in range(M):
            rx = weighted_ranks(X[m], wp) - mid
            boot[m] = np.einsum("bn,bn->b", wry, rx) / np.sqrt(vy * np.einsum("bn,bn,bn->b", wp, rx, rx))
    r, p = _r_p(stats.rankdata(X, axis=1), stats.rankdata(y))
    lo, hi = percentile_ci(boot)
    out["spearman"] = dict(r=r, p=p, ci_low=lo, ci_high=hi, n=np.full(M, n))
    for d in out.values():
        for k in ("r", "p", "ci_low", "ci_high"):
            d[k] = np.where(const, np.nan, d[k])
    return out


def across_ci(x: np.ndarray, y_boot: np.ndarray, y: np.ndarray) -> dict:
    """Correlation across units (e.g. system prompts) of fixed x (n,) with y (n,), whose
    resampled values are y_boot (n, B) (each unit's mean over resampled user prompts)."""
    ok = np.isfinite(x) & np.isfinite(y)
    out = {}
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        for m in ("pearson", "spearman"):
            out[m] = dict(r=np.nan, p=np.nan, ci_low=np.nan, ci_high=np.nan, n=n)
        return out
    x, y, yb = x[ok].astype(np.float64), y[ok].astype(np.float64), y_boot[ok].T  # yb (B, n)
    ones = np.ones_like(yb)
    bp = weighted_pearson(np.broadcast_to(x, yb.shape), yb, ones)
    rx = stats.rankdata(x)
    finite = np.isfinite(yb).all(1)
    ry = np.full_like(yb, np.nan)
    ry[finite] = stats.rankdata(yb[finite], axis=1)
    bs = weighted_pearson(np.broadcast_to(rx, yb.shape), ry, ones)
    for m, res, boot in (("pearson", stats.pearsonr(x, y), bp), ("spearman", stats.spearmanr(x, y), bs)):
        lo, hi = percentile_ci(boot)
        out[m] = dict(r=float(res.statistic), p=float(res.pvalue), ci_low=float(lo), ci_high=float(hi), n=n)
    return out


__all__ = ["across_ci", "corr_ci", "mean_ci", "percentile_ci", "user_weights", "weighted_pearson",
           "weighted_ranks"]

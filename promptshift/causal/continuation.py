"""Activation patching scored on the continuation (``continuation``): which site carries
the behaviour, not only the first answer token.

``patching`` measures the next-token distribution at the last prompt position. A system
prompt's effect on behaviour (answer in French, be brief, reply in JSON) shows over the
reply, and the first token can miss it (a French reply may open with "Paris"). Here every
run is scored on the variant's own greedy continuation ``y`` (the one extraction stored,
its first ``n_tokens`` tokens), teacher-forced: the run continues with ``y`` and

    score = mean over t of log p(y_t | prompt, y_<t)

is the average log-probability the run gives the variant's reply. Per pair:

* ``lp_v``: the variant itself (the most a patched baseline can reach);
* ``lp_b``: the baseline prompt continued with ``y`` (how likely the reply is without the
  system prompt);
* ``lp[mode, site]``: the baseline with the variant's residual stream patched in at one site,
  at every aligned suffix position (``suffix``) or at the last prompt position only
  (``last``), as in ``patching``; the continuation tokens themselves are not patched (they
  read the patched positions through attention in the layers above the site).

Below its site a patched row's reply positions are the baseline's own run (they read the
unpatched prompt there): the baseline continued with ``y`` runs first with its reply's
residuals captured, and every patched row then starts at its site with all its tail
positions replaced (:attr:`Row.start`), which halves the layers run. A row whose patched
values are the baseline's own (site 0 of ``suffix`` and ``last`` in a model without position
embeddings) is the baseline continued with ``y`` and scores ``lp_b`` without running.

``promptshift metrics`` derives ``recovered_cont(site) = sum (lp - lp_b) / sum (lp_v - lp_b)``
over pairs and the onset (first site recovering half), next to the first-token onset of
``patching``. Fixed point: ``suffix`` at site 0 patches identical token embeddings, so it
scores ``lp_b`` exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from promptshift.causal.analyses import PATCH_MODES, PATCHED, Refs, Scope, unpatched
from promptshift.causal.runner import Edit, Row, Runner
from promptshift.progress import progress

# Memory cap (bytes) of the reply residuals kept at once (float32, (len(y) - 1, L+1, H) per
# pair): the pairs run in chunks that fit, each chunk's baselines first.
_CONT_RESID_BYTES_BUDGET = 1 << 28


def continuation_rows(plan, refs: Refs, L: int, y: np.ndarray, r, cont_resid=None) -> tuple[list[Row], list[tuple]]:
    """The rows of one pair: the variant and the baseline continued with ``y``, and the
    patched baseline at every site in both modes. Returns (rows, keys) with keys
    ``("v",)``, ``("b",)`` or ``(mode index, site)``; the ``("b",)`` row captures its
    reply's residuals (tail positions of ``y[:-1]``).

    ``cont_resid`` (len(y) - 1, L+1, H) float32: the residual stream of the fed-back reply in
    the baseline's own run (the ``("b",)`` row's capture). Given, each patched row starts at
    its site: below the site the reply's positions are the baseline's run and the patched
    prompt positions are overwritten, so the row runs only the layers from its site on, with
    every tail position replaced there (the variant's residuals at the patched positions,
    the baseline's at the reply's). Without it, every patched row runs all layers."""
    v, b = int(r.variant), int(r.baseline)
    v_ids, b_ids = plan.prompt_tokens(v), plan.prompt_tokens(b)
    cont = np.asarray(y[:-1], dtype=v_ids.dtype)  # the reply fed back in; its last token is only predicted
    bs = int(r.b_suffix_start)
    src = refs.resid[v][int(r.v_suffix_start) - refs.first[v] :]  # (n_al, L+1, H) the variant's residuals
    h = max(1, min(refs.first[v], len(v_ids) - 1))  # the variant's head in its reference run (cached there)
    rows = [Row(v_ids[:h], np.concatenate([v_ids[h:], cont]), targets=y),
            Row(b_ids[:bs], np.concatenate([b_ids[bs:], cont]), targets=y,
                capture=len(b_ids) - bs + np.arange(len(cont)))]
    keys: list[tuple] = [("v",), ("b",)]
    for site in range(L + 1):
        for m, (head, tail, patched) in enumerate([(b_ids[:bs], b_ids[bs:], src[PATCHED[0], site]),  # suffix
                                                   (b_ids[:-1], b_ids[-1:], src[PATCHED[1], site])]):  # last
            n = len(tail)
            edits = [Edit(site, np.arange(n), patched)]
            start = 0
            if cont_resid is not None:  # the reply's positions replaced too: skip the layers below the site
                edits.append(Edit(site, n + np.arange(len(cont)), cont_resid[:, site]))  # (len(cont), H) a view
                start = min(site, L - 1)
            rows.append(Row(head, np.concatenate([tail, cont]), edits, targets=y, start=start))
            keys.append((m, site))
    return rows, keys


def continuation(runner: Runner, plan, scope: Scope, refs: Refs, gen_ids: np.ndarray, gen_len: np.ndarray,
                 n_tokens: int = 16):
    """Patching scored on the variant's continuation (module docstring): per pair the mean
    log-probability of its first ``n_tokens`` continuation tokens under the variant, the
    baseline and the patched baseline at every site and mode. ``gen_ids`` (P, G) and
    ``gen_len`` (P,): the store's greedy continuations. Pairs whose variant generated
    nothing get NaN.

    Pairs run in chunks whose reply residuals fit ``_CONT_RESID_BYTES_BUDGET``: per chunk the
    baselines continued with ``y`` (capturing the reply's residuals), then the variants and
    every patched row, each from its site (:func:`continuation_rows`)."""
    refs = refs or Refs(runner, plan, scope)
    L = runner.L
    n = len(refs.pairs)
    lp = np.full((n, len(PATCH_MODES), L + 1), np.nan, np.float32)
    lp_v = np.full(n, np.nan, np.float32)
    lp_b = np.full(n, np.nan, np.float32)
    n_cont = np.zeros(n, np.int32)
    pairs = list(refs.pairs.itertuples())
    ys: dict[int, np.ndarray] = {}
    for i, r in enumerate(pairs):
        v = int(r.variant)
        y = np.asarray(gen_ids[v, : min(max(int(gen_len[v]), 0), n_tokens)], dtype=np.int64)
        n_cont[i] = len(y)
        if len(y):
            ys[i] = y
    per_token = (L + 1) * int(runner.cfg.hidden_size) * 4  # bytes of one reply position's residuals
    chunks: list[list[int]] = []
    used = 0
    for i, y in ys.items():
        size = (len(y) - 1) * per_token
        if not chunks or used + size > _CONT_RESID_BYTES_BUDGET:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += size

    def record(i, k, o):
        score = float(o.target_logprobs.double().mean())
        if k == ("v",):
            lp_v[i] = score
        elif k == ("b",):
            lp_b[i] = score
        else:
            lp[i, k[0], k[1]] = score

    bar = progress(len(ys) * (2 + 2 * (L + 1)), "continuation patching", unit="row", enabled=scope.progress,
                   leave=False)
    for chunk in chunks:
        base = [continuation_rows(plan, refs, L, ys[i], pairs[i])[0][1] for i in chunk]
        cont_resid = {}
        for j, o in runner.stream(base, capture=True, progress=bar):
            record(chunk[j], ("b",), o)
            cont_resid[chunk[j]] = o.resid  # (len(y) - 1, L+1, H): the reply's residuals in the baseline's run
        rows, where = [], []
        for i in chunk:
            rs, keys = continuation_rows(plan, refs, L, ys[i], pairs[i], cont_resid[i])
            r = pairs[i]
            own = unpatched(refs, int(r.baseline), int(r.b_suffix_start))
            src = refs.resid[int(r.variant)][int(r.v_suffix_start) - refs.first[int(r.variant)] :]
            for row, k in zip([rs[0], *rs[2:]], [keys[0], *keys[2:]]):
                if k != ("v",) and own is not None and torch.equal(src[PATCHED[k[0]], k[1]], own[PATCHED[k[0]], k[1]]):
                    lp[i, k[0], k[1]] = lp_b[i]  # the baseline's own values: the baseline continued with y
                    bar.update(1)
                    continue
                rows.append(row)
                where.append((i, k))
        for j, o in runner.stream(rows, progress=bar):
            record(*where[j], o)
        del cont_resid, rows
    bar.close()
    arrays = {
        "pair": (refs.pairs["pair"].to_numpy(np.int32), ("pair",)),
        "n_tokens": (n_cont, ("pair",)),
        "lp_v": (lp_v, ("pair",)),
        "lp_b": (lp_b, ("pair",)),
        "lp": (lp, ("pair", "mode", "site")),
    }
    meta = {"modes": list(PATCH_MODES), "n_sites": L + 1, "users": scope.users, "max_tokens": n_tokens,
            "score": "mean log-probability of the variant's greedy continuation (first max_tokens tokens, "
                     "teacher-forced)"}
    return arrays, meta


__all__ = ["continuation", "continuation_rows"]

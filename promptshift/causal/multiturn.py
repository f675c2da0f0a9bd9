"""Multi-turn decay: does the system prompt keep its grip as the dialogue grows?

A multi-turn suite (``promptshift/sweep/suites/multiturn.yaml``) holds one automatically
checkable rule (a system prompt plus a check such as "the reply starts with Ahoy") and
scripted conversations. For every conversation and turn t, the conversation up to the
t-th user message is rendered under three conditions:

* ``system``: the rule as system prompt, the scripted history as written (every scripted
  reply obeys the rule);
* ``system_plain``: the rule as system prompt, the scripted replies with the rule's marker
  removed, so the history does not demonstrate the rule and only the system prompt asks
  for it;
* ``no_system``: an empty system turn (the sweep's ``empty_system`` baseline, so a template
  that injects a default system prompt when there is none does not), the history as
  written: what imitation of the history alone produces.

Per row: attention of the last prompt token to the system region at every layer (mean over
heads; the sink token excluded and the rest renormalised), the share uniform attention
would give, and whether the model's greedy reply obeys the rule.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import yaml

from promptshift.errors import SweepError
from promptshift.progress import progress as progress_bar
from promptshift.sweep.behaviour import Check, evaluate, parse_check
from promptshift.sweep.chat import TemplateClock, dialogue, render
from promptshift.vocabulary import REGION_CODE

CONDITIONS = ("system", "system_plain", "no_system")
# rules whose marker can be taken out of a scripted reply (`system_plain`)
CHECKS = ("startswith", "contains", "regex")


def load_multiturn(arg: str | Path) -> dict:
    """A multi-turn suite by built-in name or path, validated."""
    from promptshift.sweep.config import builtin_suites

    path = Path(str(arg))
    if not path.exists():
        suites = builtin_suites()
        if str(arg) not in suites:
            raise SweepError(f"unknown multi-turn suite {arg!r}; built-in: multiturn, or give a YAML path")
        path = suites[str(arg)]
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"cannot read multi-turn suite {path}: {e}") from e
    where = f"multi-turn suite {path}"
    if not isinstance(d, dict) or "rule" not in d or "conversations" not in d:
        raise SweepError(f"{where} needs `rule` (system, check) and `conversations`")
    rule = d["rule"]
    if not isinstance(rule, dict) or not str(rule.get("system", "")).strip():
        raise SweepError(f"{where}: `rule.system` must be a non-empty system prompt")
    check = parse_check(rule.get("check"), f"{where}: `rule.check`")
    if check.type not in CHECKS:
        raise SweepError(f"{where}: `rule.check` must be one of {', '.join(CHECKS)} (a marker the history can drop), "
                         f"got {check.type}")
    convs = d["conversations"]
    if not isinstance(convs, list) or not convs:
        raise SweepError(f"{where}: `conversations` must be a non-empty list")
    for i, c in enumerate(convs):
        turns = c.get("turns") if isinstance(c, dict) else None
        if not c.get("id") or not isinstance(turns, list) or not turns:
            raise SweepError(f"{where}: conversations[{i}] needs `id` and a non-empty `turns` list")
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or not str(t.get("user", "")).strip():
                raise SweepError(f"{where}: conversations[{i}].turns[{j}] needs a non-empty `user`")
            if j < len(turns) - 1 and not str(t.get("assistant", "")).strip():
                raise SweepError(f"{where}: conversations[{i}].turns[{j}] needs an `assistant` reply (only the "
                                 "last turn may leave it out)")
    return {"name": d.get("name", path.stem), "rule": {**rule, "check": check.to_dict()}, "check": check,
            "conversations": convs, "path": str(path)}


def obeys(reply: str, check: Check | dict) -> bool:
    """Whether a reply satisfies the rule's check (:func:`promptshift.sweep.behaviour.evaluate`,
    the same judgement as the sweep's declared checks; the reply is taken as finished)."""
    check = check if isinstance(check, Check) else parse_check(check, "a multi-turn rule")
    return evaluate(check, reply, finished=True) is True


def plain(reply: str, check: Check | dict) -> str:
    """A scripted reply with the rule's marker removed."""
    check = check if isinstance(check, Check) else parse_check(check, "a multi-turn rule")
    value = str(check.value)
    if check.type == "startswith" and reply.strip().startswith(value):
        rest = reply.strip()[len(value) :].lstrip(" ,!.:;-")
        return rest[:1].upper() + rest[1:]
    if check.type == "contains":
        return re.sub(r"\s+", " ", reply.replace(value, "")).strip()
    if check.type == "regex":
        return re.sub(r"\s+", " ", re.sub(value, "", reply)).strip()
    return reply


def messages(suite: dict, conv: dict, t: int, condition: str) -> list[dict]:
    """Messages of ``conv`` up to and including its t-th user message (t from 1)."""
    rule = suite["rule"]
    out = [{"role": "system", "content": "" if condition == "no_system" else str(rule["system"])}]
    for j, turn in enumerate(conv["turns"][:t]):
        out.append({"role": "user", "content": str(turn["user"])})
        if j < t - 1:
            reply = str(turn["assistant"])
            out.append({"role": "assistant",
                        "content": plain(reply, suite["check"]) if condition == "system_plain" else reply})
    return out


def template_messages(tok, suite: dict, conv: dict, t: int, condition: str, *, no_system_role: str = "error",
                      clock: TemplateClock | None = None) -> list[dict]:
    """:func:`messages` under the template's abilities: a template without a system role
    gets the rule folded into the first user message (``no_system_role: prepend_to_user``)
    or is refused, as in the sweep."""
    msgs = messages(suite, conv, t, condition)
    system = msgs[0]["content"]
    return dialogue(tok, system or None, msgs[1:], no_system_role=no_system_role, empty_system=not system,
                    clock=clock)


def multiturn(engine, tok, suite: dict, *, max_new_tokens: int = 16, eos_ids=(), progress: bool = True,
              no_system_role: str = "error", clock: TemplateClock | None = None, context: int | None = None):
    """Run every (condition, conversation, turn) with attention statistics and a greedy
    reply; returns ``(arrays, meta)`` for :meth:`Store.write_causal`.

    ``no_system_role`` and ``clock`` are the sweep's policy and its plan's template clock, so
    the dialogues render like the sweep's prompts; ``context`` (the model's positions) refuses
    a dialogue that, with its reply, would not fit. Where the template puts the system text
    is recorded per row (``system_after_turns``: user turns rendered before it; Mistral v0.3
    puts it into the last user turn, so attention to it is not measured across the dialogue)."""
    from promptshift.causal.analyses import _common_prefix
    from promptshift.extract.engine import Item
    from promptshift.sweep.plan import check_context

    check = suite["check"]
    rows = []
    for cond in CONDITIONS:
        for ci, conv in enumerate(suite["conversations"]):
            for t in range(1, len(conv["turns"]) + 1):
                r = render(tok, template_messages(tok, suite, conv, t, cond, no_system_role=no_system_role,
                                                  clock=clock), clock=clock)
                check_context(len(r.ids), max_new_tokens, context,
                              f"multi-turn conversation {conv['id']!r} at turn {t} ({cond})")
                rows.append((cond, ci, t, r))
    L = engine.L
    n = len(rows)
    sys_mass = np.full((n, L), np.nan, np.float32)
    share = np.full(n, np.nan, np.float32)
    obey = np.zeros(n, np.uint8)
    replies = []
    # the turns of one conversation under one condition share their start (system prompt,
    # first user message, assistant header): computed once, as a prefix every turn continues
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (cond, ci, _, _) in enumerate(rows):
        groups.setdefault((cond, ci), []).append(i)
    specs, prefix_of = [], [0] * n
    for g, idx in enumerate(groups.values()):
        seqs = [rows[i][3].ids for i in idx]
        h = max(1, min(_common_prefix(seqs), min(len(x) for x in seqs) - 1))
        specs.append((seqs[0][:h], rows[idx[0]][3].regions[:h], h))  # nothing of the prefix is kept
        for i in idx:
            prefix_of[i] = g
    prefixes = engine.compute_prefixes(specs)
    offs = [prefixes[prefix_of[i]].length for i in range(n)]
    order = engine.batches([len(r[3].ids) - o for r, o in zip(rows, offs)], contexts=offs)
    bar = progress_bar(n, "multi-turn", unit="turn", enabled=progress, leave=False)
    results = [None] * n
    for batch in order:
        items = [Item(prompt=i, ids=rows[i][3].ids, regions=rows[i][3].regions, keep_start=len(rows[i][3].ids))
                 for i in batch]
        # replies are decoded for all batches together at the end (one decode step costs about
        # the same for many rows as for few)
        outs = engine.extract_batch(items, prefix=[prefixes[prefix_of[i]] for i in batch],
                                    max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), defer_decode=True)
        for i, res in zip(batch, outs):
            results[i] = res
        bar.update(len(batch))
    engine.flush_decode(max_new_tokens, tuple(eos_ids))
    bar.close()
    sys_code, sink = REGION_CODE["system"], REGION_CODE["sink"]
    after = np.full(n, -1, np.int16)
    for i, (cond, ci, t, r) in enumerate(rows):
        res = results[i]
        reply = tok.decode([int(x) for x in res.gen_ids if int(x) not in set(eos_ids)], skip_special_tokens=True)
        replies.append(reply)
        obey[i] = obeys(reply, check)
        is_sys = r.regions == sys_code
        sys_span = next((sp for sp in r.spans if sp.region == "system"), None)
        if sys_span is not None:
            after[i] = sum(1 for sp in r.spans if sp.region == "user" and sp.end <= sys_span.start)
        if is_sys.any():
            row = res.last_row.astype(np.float64)  # (n_tokens, L, NH)
            # the mass off the sink, summed directly: as 1 - sink mass it would cancel to rounding
            # noise for a head that puts all but ~1e-6 on the sink (float32 probabilities near 1
            # carry ~6e-8 of rounding), and the ratio below would be noise over noise
            rest = row[r.regions != sink].sum(0)  # (L, NH)
            with np.errstate(invalid="ignore", divide="ignore"):
                # (L, NH) renormalised without the sink; undefined for a head that looks only at the sink
                m = np.where(rest > 1e-6, row[is_sys].sum(0) / rest, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a layer whose heads all look at the sink
                sys_mass[i] = np.nanmean(m, axis=-1)
            share[i] = is_sys.sum() / max(1, len(r.ids) - 1)
    arrays = {
        "condition": (np.asarray([CONDITIONS.index(c) for c, *_ in rows], np.int8), ("row",)),
        "conversation": (np.asarray([ci for _, ci, _, _ in rows], np.int16), ("row",)),
        "turn": (np.asarray([t for _, _, t, _ in rows], np.int16), ("row",)),
        "n_tokens": (np.asarray([len(r.ids) for *_, r in rows], np.int32), ("row",)),
        "sys_mass": (sys_mass, ("row", "layer")),
        "uniform_share": (share, ("row",)),
        "obeys": (obey, ("row",)),
        "system_after_turns": (after, ("row",)),
    }
    meta = {"conditions": list(CONDITIONS), "conversations": [c["id"] for c in suite["conversations"]],
            "rule": suite["rule"], "suite": suite["name"], "replies": replies, "max_new_tokens": max_new_tokens,
            "system_after_turns": "user turns the template renders before the system text (-1: none)"}
    return arrays, meta


__all__ = ["CONDITIONS", "load_multiturn", "messages", "multiturn", "obeys", "plain", "template_messages"]

"""Split a system prompt into the phrases that phrase ablation leaves out one at a time.

A phrase is a sentence (ending in ``.``, ``!`` or ``?`` before whitespace or the end, so
"e.g." inside a word or "{...}" inside a quoted example does not end one); a sentence of
more than ``long_words`` words is split further into clauses before ``;`` and before a
coordinating ", and", ", but", ", or", ", then", ", so", keeping pieces of at least
``min_words`` words (shorter ones join their neighbour). Spans are character offsets into
the original text, so leaving a phrase out keeps every other character exactly as written.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]}]*(?=\s|$)|\n+")
_CLAUSE_BREAK = re.compile(r";\s+|,\s+(?=(?:and|but|or|then|so)\s)")


def _words(s: str) -> int:
    return len(s.split())


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _sentences(text: str) -> list[tuple[int, int]]:
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append((start, m.end()))
        start = m.end()
    out.append((start, len(text)))
    return [sp for sp in (_trim(text, a, b) for a, b in out) if sp[1] > sp[0]]


def split_phrases(text: str, long_words: int = 12, min_words: int = 4) -> list[tuple[int, int]]:
    """[start, end) character spans of the phrases of ``text``, in order, whitespace trimmed."""
    spans: list[tuple[int, int]] = []
    for s, e in _sentences(text):
        if _words(text[s:e]) <= long_words:
            spans.append((s, e))
            continue
        cuts = [s] + [m.end() for m in _CLAUSE_BREAK.finditer(text, s, e)] + [e]
        pieces: list[tuple[int, int]] = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            if pieces and (_words(text[a:b]) < min_words or _words(text[slice(*pieces[-1])]) < min_words):
                pieces[-1] = (pieces[-1][0], b)  # too short to stand alone: join the previous piece
            else:
                pieces.append((a, b))
        spans += [sp for sp in (_trim(text, a, b) for a, b in pieces) if sp[1] > sp[0]]
    return spans


def without(text: str, span: tuple[int, int]) -> str:
    """``text`` with one phrase left out (and the whitespace run it leaves collapsed)."""
    a, b = span
    left, right = text[:a].rstrip(), text[b:].lstrip()
    if not left:
        return right
    if not right:
        return left
    return left + " " + right


__all__ = ["split_phrases", "without"]

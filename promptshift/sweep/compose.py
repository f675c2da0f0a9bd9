"""Shared rendering: a sweep's system-prompt variants composed from one rendering per system
prompt and one per user prompt, verified prompt by prompt.

A crossed sweep of S system prompts x U user prompts has S x U variants, but only S system
texts and U user texts. :func:`promptshift.sweep.chat.render` (four template renderings, a
tokenization and per-character labelling per prompt) is run on the S + U - 1 variants
``(s, u0)`` and ``(s0, u)``; every other variant ``(s, u)`` takes its tokens, regions, turns,
token offsets and content spans from the part of ``(s, u0)`` before a cut and the part of
``(s0, u)`` after it. The cut is where the user turn's scaffolding starts with an added
token (``<|im_start|>`` in ``<|im_start|>user\\n``): the fast tokenizers split the text at
added tokens before anything else (normalisation, pre-tokenisation and the model see each
piece alone), so the tokens on either side of such a cut do not depend on the other side.

What is checked, so that a composed prompt is exactly what ``render`` gives:

* the **text**: every variant is rendered by the chat template (one batched
  ``apply_chat_template`` call per system prompt) and must equal the prefix text of
  ``(s, u0)`` followed by the suffix text of ``(s0, u)``; a template whose rendering of one
  message depends on another (not shape-stable) fails this for the prompts it affects;
* the **content spans**: the rendered text is matched against the template's skeleton with
  ``chat``'s own matcher (``_match``), as ``render`` does, and the system and user spans
  must be those of the two parts; a token's region and turn depend only on these spans and
  on its own characters, so equal spans give equal labels;
* the **tokens** at the cut: the added token there must be matched on the raw text
  (``normalized=False``), must not absorb whitespace to its left (``lstrip``) when the
  prefix ends with some, nor be a ``single_word`` token, and no added token may straddle
  the cut (a prefix ending ``t[:k]`` with a suffix starting ``t[k:]``, for any added token
  ``t``), and the tokenizer must not split special tokens;
* every prefix and every suffix once in a second context: the prefix of ``(s, u0)`` joined
  with the suffix of ``(s0, u0)`` must reproduce ``(s, u0)`` exactly (token ids, offsets,
  regions, turns, spans), and the prefix of ``(s0, u0)`` joined with the suffix of
  ``(s0, u)`` must reproduce ``(s0, u)``.

A variant that fails any check, and every prompt of a shape without such a cut (templates
that fold the system text into the user turn, Llama 2's ``[INST] <<SYS>>``), is rendered
on its own by ``render``, exactly as before. Baselines (one per user prompt) are always
rendered on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from promptshift.errors import TemplateError
from promptshift.sweep.chat import (Rendered, TemplateClock, _apply, _cut, _locate, _match, _pinned_clock,
                                    _placeholder_messages, _segments, render)
from promptshift.vocabulary import REGION_CODE

USER = REGION_CODE["user"]
SYSTEM = REGION_CODE["system"]


@dataclass
class Part:
    """The tokens of one side of a cut in one rendering: offsets and spans relative to the
    part's own text (a suffix part starts at the cut)."""

    text: str
    ids: np.ndarray  # (n,) int64
    regions: np.ndarray  # (n,) int8
    turns: np.ndarray  # (n,) int16
    offsets: np.ndarray  # (n, 2) int64 character spans in ``text``
    spans: np.ndarray  # (m, 3) int64 rows (region code, start, end) in ``text``
    match: tuple[int, int, int]  # the content's (start in text, first and end character of its source text)
    first_user: int = -1  # suffix parts: index of the first user token
    n_system: int = 0  # tokens labelled system

    def __len__(self) -> int:
        return len(self.ids)


def whole(r: Rendered) -> Part:
    """A rendering as a part of its own (a prompt that is not composed)."""
    spans = np.asarray([(REGION_CODE[s.region], s.start, s.end) for s in r.spans], np.int64).reshape(-1, 3)
    return Part(r.text, np.asarray(r.ids, np.int64), r.regions, r.turns, np.asarray(r.offsets, np.int64), spans,
                (0, 0, 0), n_system=int((r.regions == SYSTEM).sum()))


def split(r: Rendered, cut: int, match: tuple[tuple[int, int, int], tuple[int, int, int]]) -> tuple[Part, Part] | None:
    """(prefix, suffix) parts of a rendering at character ``cut``; None when a token or a
    content span crosses it. ``match``: the (start, a, b) of the system and the user content."""
    off = np.asarray(r.offsets, np.int64)
    nonempty = off[:, 1] > off[:, 0]
    after = np.flatnonzero(nonempty & (off[:, 0] >= cut))
    if not after.size:
        return None
    k = int(after[0])
    if (off[:k, 1] > cut).any() or (off[k:, 0] < cut)[nonempty[k:]].any() or int(off[k, 0]) != cut:
        return None
    spans = [(REGION_CODE[s.region], s.start, s.end) for s in r.spans]
    if any(a < cut < b for _, a, b in spans):
        return None
    pre = np.asarray([s for s in spans if s[2] <= cut], np.int64).reshape(-1, 3)
    suf = np.asarray([(g, a - cut, b - cut) for g, a, b in spans if a >= cut], np.int64).reshape(-1, 3)
    regions, turns = r.regions, r.turns
    user = np.flatnonzero(regions[k:] == USER)
    if (regions[:k] == USER).any() or not user.size:
        return None
    (s0, sa, sb), (u0, ua, ub) = match
    p = Part(r.text[:cut], np.asarray(r.ids[:k], np.int64), regions[:k], turns[:k], off[:k], pre, (s0, sa, sb),
             n_system=int((regions[:k] == SYSTEM).sum()))
    s = Part(r.text[cut:], np.asarray(r.ids[k:], np.int64), regions[k:], turns[k:], off[k:] - cut, suf,
             (u0 - cut, ua, ub), first_user=int(user[0]), n_system=int((regions[k:] == SYSTEM).sum()))
    return p, s


def same(a: Part | Rendered, b: Part) -> bool:
    """Whether a rendering (or part) and a composed part hold the same tokens, labels and spans."""
    if isinstance(a, Rendered):
        a = whole(a)
    return (a.text == b.text and np.array_equal(a.ids, b.ids) and np.array_equal(a.regions, b.regions)
            and np.array_equal(a.turns, b.turns) and np.array_equal(a.offsets, b.offsets)
            and np.array_equal(a.spans, b.spans))


def join(p: Part, s: Part) -> Part:
    shift = len(p.text)
    return Part(p.text + s.text, np.concatenate([p.ids, s.ids]), np.concatenate([p.regions, s.regions]),
                np.concatenate([p.turns, s.turns]), np.concatenate([p.offsets, s.offsets + shift]),
                np.concatenate([p.spans, s.spans + np.asarray([0, shift, shift])]), p.match)


def render_texts(tok, conversations: list[list[dict]], clock: TemplateClock | None) -> list[str] | None:
    """The chat template's rendering of many conversations in one call (transformers renders
    each exactly as a call of its own would); None when the template refuses one of them
    (each is then rendered alone, which names the failing one)."""
    try:
        with _pinned_clock(tok, clock):
            out = tok.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 -- per-prompt rendering reports it precisely
        return None
    return list(out) if len(conversations) != 1 or isinstance(out, list) else [out]


@dataclass
class Shape:
    """What is common to every variant ``[system s, user u]`` of a template: the skeleton's
    pieces around the two contents and the cut in the piece between them (``tail``: from the
    cut to the user content). ``tail`` is None when variants cannot be composed."""

    pieces: list[str]
    tail: str | None
    cut_token: object = None  # the AddedToken that starts the tail
    added: list[str] = field(default_factory=list)  # contents of every added token

    @classmethod
    def of(cls, tok, clock: TemplateClock | None) -> Shape:
        msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        segs = _segments(msgs)
        skel = _apply(tok, _placeholder_messages(msgs, segs, True), True, clock)
        order = _locate(skel, segs, msgs, [0, 1])
        pieces = _cut(skel, order)
        added = {t.content: t for t in tok.added_tokens_decoder.values() if t.content}
        shape = cls(pieces, None, None, sorted(added))
        if order != [0, 1] or getattr(tok, "split_special_tokens", False):
            return shape  # the system text after the user's, or special tokens split as text
        between = pieces[1]
        starts = [(i, c) for c in added for i in _find_all(between, c)]
        if not starts:
            return shape  # nothing in the scaffolding between system and user text is an added token
        at, content = max(starts, key=lambda x: (x[0], len(x[1])))
        t = added[content]
        if t.normalized or t.single_word:
            return shape
        shape.tail, shape.cut_token = between[at:], t
        return shape

    def ends(self, prefix_text: str) -> frozenset:
        """(added token, k) such that the text ends with the token's first k characters."""
        return frozenset((c, k) for c in self.added for k in range(1, len(c)) if prefix_text.endswith(c[:k]))

    def starts(self, suffix_text: str) -> frozenset:
        """(added token, k) such that the text starts with the token's characters from k on."""
        return frozenset((c, k) for c in self.added for k in range(1, len(c)) if suffix_text.startswith(c[k:]))

    def prefix_ok(self, prefix_text: str) -> bool:
        return not (self.cut_token.lstrip and prefix_text[-1:].isspace())


def _find_all(text: str, sub: str) -> list[int]:
    out, i = [], text.find(sub)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def match_spans(shape: Shape, r: Rendered) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """(start, a, b) of the system and the user content in a variant's rendering, from its
    spans (as ``render`` found them)."""
    sys_ = [s for s in r.spans if s.region == "system" and s.message == 0]
    usr = [s for s in r.spans if s.region == "user" and s.message == 1]
    if len(sys_) != 1 or len(usr) != 1:
        return None
    s, u = sys_[0], usr[0]
    return ((s.start, s.source_start, s.source_start + s.end - s.start),
            (u.start, u.source_start, u.source_start + u.end - u.start))


def cut_of(shape: Shape, r: Rendered, match) -> int | None:
    """Character position of the cut in a variant's rendering (None: not where expected)."""
    (s0, sa, sb), (u0, _, _) = match
    c = u0 - len(shape.tail)
    return c if c >= s0 + sb - sa and r.text.startswith(shape.tail, c) else None


@dataclass
class Item:
    """The variants of one system prompt: per user prompt either a composed prompt (its
    ``suffix`` part index, the text as rendered) or a rendering of its own (``alone``)."""

    prefix: int  # index into Composer.prefixes (-1: none of this item's variants is composed)
    suffix: np.ndarray  # (U,) index into Composer.suffixes, -1 where rendered alone
    texts: list[str | None]  # (U,) rendered text of each composed variant
    alone: dict[int, Rendered]  # user index -> rendering of a variant not composed


class Composer:
    """Variants ``[system s_i, user u_j]`` of a crossed sweep, composed where every check of
    the module docstring holds. ``conv(system_text, user_text)`` builds the messages the plan
    renders (it must give ``[system, user]`` for the composed path to be used at all)."""

    def __init__(self, tok, clock: TemplateClock | None, systems: list[str], users: list[str], conv):
        self.tok, self.clock, self.conv = tok, clock, conv
        self.systems, self.users = systems, users
        self.prefixes: list[Part | None] = [None] * len(systems)
        self.suffixes: list[Part | None] = [None] * len(users)
        self.reps: dict[tuple[int, int], Rendered] = {}  # (i, j) -> the renderings the parts come from
        self.ends = [frozenset()] * len(systems)  # per prefix: added-token beginnings it ends with
        self.starts = [frozenset()] * len(users)  # per suffix: added-token ends it starts with
        self.shape = None
        ok_users = [j for j, u in enumerate(users) if u.strip()]
        if not systems or not ok_users:
            return
        i0, j0 = 0, ok_users[0]
        probe = conv(systems[i0], users[j0])
        if probe != [{"role": "system", "content": systems[i0]}, {"role": "user", "content": users[j0]}]:
            return  # e.g. no system role: the system text is folded into the user turn
        try:
            shape = Shape.of(tok, clock)
        except TemplateError:
            return
        if shape.tail is None:
            return
        self.shape = shape
        r00 = self._rep(i0, j0)
        parts00 = self._split(r00)
        if parts00 is None:
            return
        p0, s0 = parts00
        for i in range(len(systems)):
            parts = parts00 if i == i0 else self._split(self._rep(i, j0))
            if parts is not None and shape.prefix_ok(parts[0].text) and same(self.reps[(i, j0)], join(parts[0], s0)):
                self.prefixes[i] = parts[0]
        for j in ok_users:
            parts = parts00 if j == j0 else self._split(self._rep(i0, j))
            if parts is not None and same(self.reps[(i0, j)], join(p0, parts[1])):
                self.suffixes[j] = parts[1]
        self.ends = [shape.ends(p.text) if p is not None else frozenset() for p in self.prefixes]
        self.starts = [shape.starts(s.text) if s is not None else frozenset() for s in self.suffixes]

    def _rep(self, i: int, j: int) -> Rendered:
        if (i, j) not in self.reps:
            self.reps[(i, j)] = render(self.tok, self.conv(self.systems[i], self.users[j]), clock=self.clock)
        return self.reps[(i, j)]

    def _split(self, r: Rendered):
        m = match_spans(self.shape, r)
        c = None if m is None else cut_of(self.shape, r, m)
        return None if c is None else split(r, c, m)

    def item(self, i: int) -> Item:
        """The variants of system prompt ``i`` with every user prompt."""
        U = len(self.users)
        suffix = np.full(U, -1, np.int64)
        texts: list[str | None] = [None] * U
        alone: dict[int, Rendered] = {}
        p = self.prefixes[i]
        todo = [j for j in range(U) if p is not None and self.suffixes[j] is not None]
        rendered = render_texts(self.tok, [self.conv(self.systems[i], self.users[j]) for j in todo], self.clock) \
            if todo else []
        if rendered is None:
            rendered, todo = [], []
        for j, text in zip(todo, rendered):
            s = self.suffixes[j]
            found = None
            if (len(text) == len(p.text) + len(s.text) and text.startswith(p.text) and text.endswith(s.text)
                    and not (self.ends[i] & self.starts[j])):
                found = _match(self.shape.pieces, [self.systems[i], self.users[j]], [False, False], text)
            u0, ua, ub = s.match
            if found == [p.match, (len(p.text) + u0, ua, ub)]:
                suffix[j], texts[j] = j, text
        for j in range(U):
            if suffix[j] < 0:
                alone[j] = self.reps.get((i, j)) or render(self.tok, self.conv(self.systems[i], self.users[j]),
                                                            clock=self.clock)
        return Item(i if (suffix >= 0).any() else -1, suffix, texts, alone)


__all__ = ["Composer", "Item", "Part", "Shape", "cut_of", "join", "match_spans", "render_texts", "same", "split",
           "whole"]

"""Render conversations with the model's chat template and label every token's region.

Regions come from the template itself, not from tokenizing the parts separately: each
message content is replaced by a private-use placeholder, the template is rendered once
with placeholders and once with the real text, and the two renderings must agree on the
scaffolding around the contents. That gives exact character spans for every content,
wherever the template puts it (its own turn, folded into the first or the last user turn),
and whatever whitespace the template trims from each message (Llama 3 trims every
content, Gemma 3 only the user's, Llama 2 the ends of the first user turn). The
tokenizer's offset mapping carries the spans to tokens: a token is labelled by the content
it carries, i.e. by its first non-whitespace content character, so a token such as ``ĠHi``
or ``▁Hi`` that starts with the template's space before the system text ``Hi`` is a
``system`` token. A template that rewrites content beyond trimming whitespace, drops it or
repeats it is refused rather than labelled approximately.

Templates that read the clock (Llama 3.2, Mistral Small 3.x: ``strftime_now``) render with a
:class:`TemplateClock` fixed once per plan, so every task, resume and later analysis
renders the same text.

Size: rendering and labelling are one algorithm (placeholders, the two renderings, the
spans, the labels) and its refusals; split, each half would need the other's internals.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from promptshift.errors import TemplateError
from promptshift.vocabulary import REGION_CODE, SCAFFOLD_REGIONS

_ROLE_REGION = {"system": "system", "user": "user", "assistant": "assistant"}


def _ph(i: int) -> str:
    # Private-use code points: no tokenizer merges them with neighbours in a way that
    # matters here, and no real prompt contains them.
    return f"\ue000{i}\ue001"


def _cut(skel: str, order: list[int]) -> list[str]:
    """The scaffolding of a placeholder rendering: the text before, between and after the
    placeholders of messages ``order`` (in the order they appear), len(order) + 1 pieces."""
    pieces, pos = [], 0
    for k in order:
        at = skel.index(_ph(k))
        pieces.append(skel[pos:at])
        pos = at + len(_ph(k))
    pieces.append(skel[pos:])
    return pieces


def is_content(region: str) -> bool:
    """Whether a region holds message content (as opposed to template scaffolding)."""
    return region not in SCAFFOLD_REGIONS


# --- the clock a template sees ---------------------------------------------------------------
@dataclass(frozen=True)
class TemplateClock:
    """The moment a chat template reads through ``strftime_now`` (transformers' template
    global; Llama 3.2 writes "Today Date: ..." into the system turn with it, Mistral Small 3.x
    "The current date is ..." into its default system prompt).

    A plan fixes one clock and records it (``plan.meta["template_time"]``), so a task that
    starts after midnight, a resume the next day and the causal analyses render the same
    text as the plan did. ``at`` is local wall-clock time, as transformers' own clock."""

    at: datetime

    @classmethod
    def now(cls) -> TemplateClock:
        return cls(datetime.now())

    @classmethod
    def from_iso(cls, text: str) -> TemplateClock:
        return cls(datetime.fromisoformat(text))

    def iso(self) -> str:
        return self.at.isoformat()


def template_reads_clock(tok) -> bool:
    """Whether the tokenizer's chat template calls ``strftime_now`` (its rendering then
    depends on when it runs unless a :class:`TemplateClock` is given)."""
    return "strftime_now" in (getattr(tok, "chat_template", None) or "")


_CLOCK_LOCK = threading.RLock()


@contextmanager
def _pinned_clock(tok, clock: TemplateClock | None):
    """Make transformers' ``strftime_now`` report ``clock.at`` while the template renders.

    transformers builds ``strftime_now`` inside its sandboxed environment and rebuilds any
    callable passed as a template variable into an inert string, so the clock cannot be
    handed to the template; its ``strftime_now`` reads ``datetime.now()`` from the
    ``transformers.utils.chat_template_utils`` module at call time, which is what is pinned
    here (under a lock, restored afterwards). :func:`_check_clock_pin` proves on first use
    that this transformers version honours it."""
    if clock is None or not template_reads_clock(tok):
        yield
        return
    import transformers.utils.chat_template_utils as ctu

    at = clock.at

    class _Pinned(datetime):
        @classmethod
        def now(cls, tz=None):
            return at if tz is None else at.astimezone(tz)

    with _CLOCK_LOCK:
        _check_clock_pin(ctu, tok)
        saved = ctu.datetime
        ctu.datetime = _Pinned
        try:
            yield
        finally:
            ctu.datetime = saved


_PIN_CHECKED: list[bool] = []


def _check_clock_pin(ctu, tok) -> None:
    if _PIN_CHECKED:
        return
    probe = datetime(2001, 2, 3, 4, 5, 6, 789012)

    class _Probe(datetime):
        @classmethod
        def now(cls, tz=None):
            return probe

    saved = ctu.datetime
    ctu.datetime = _Probe
    try:
        out = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                      chat_template="{{ strftime_now('%Y-%m-%d %H:%M:%S.%f') }}")
    finally:
        ctu.datetime = saved
    if out != "2001-02-03 04:05:06.789012":
        raise TemplateError(
            "the chat template reads the clock (strftime_now) and this transformers version does not let "
            "promptshift fix the time it sees; its renderings would change with the date (install the "
            "transformers version in pyproject.toml, or pass a template without strftime_now)"
        )
    _PIN_CHECKED.append(True)


# --- rendering -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """Where one message content landed in the rendered text.

    ``start``/``end`` are character offsets into :attr:`Rendered.text`; the rendered text of
    the span is ``source[source_start : source_start + end - start]`` of the message's text
    (a template that trims whitespace shows less than the whole text). ``message`` indexes
    the conversation's messages (-1: a default system prompt the template added)."""

    region: str
    turn: int
    message: int
    start: int
    end: int
    source_start: int = 0


@dataclass
class Rendered:
    text: str
    ids: np.ndarray  # (S,) int64
    regions: np.ndarray  # (S,) int8, codes into REGIONS
    turns: np.ndarray  # (S,) int16, conversation turn, -1 outside turns
    injected_system: str | None = None  # default system text the template added by itself
    offsets: np.ndarray = field(default=None, repr=False)  # (S, 2) character span of each token in text
    spans: list[Span] = field(default_factory=list, repr=False)  # content spans, in rendered order
    # where every content sits, an empty one included (start == end): an empty user prompt
    # has no tokens, but the tokens after its place are still the aligned suffix
    anchors: list[Span] = field(default_factory=list, repr=False)

    def region_slice(self, region: str) -> tuple[int, int] | None:
        """[first, last+1) token range of a region (None if absent)."""
        idx = np.flatnonzero(self.regions == REGION_CODE[region])
        return (int(idx[0]), int(idx[-1]) + 1) if idx.size else None

    def decode_region(self, tok, region: str) -> str:
        return tok.decode(self.ids[self.regions == REGION_CODE[region]].tolist())


def _apply(tok, messages: list[dict], add_generation_prompt: bool, clock: TemplateClock | None = None) -> str:
    try:
        with _pinned_clock(tok, clock):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError:
        raise
    except Exception as e:  # jinja's raise_exception (e.g. "System role not supported")
        raise TemplateError(f"the chat template failed to render {[m['role'] for m in messages]}: {e}") from e


_HAS_SYSTEM_ROLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tok -> {(template, clock): bool}


def template_has_system_role(tok, clock: TemplateClock | None = None) -> bool:
    """True when a system message's content appears in the rendering (in its own turn or
    folded into a user turn). Remembered per tokenizer, chat template and clock (every
    prompt of a plan asks: a million renderings of the probe otherwise); a template that
    reads the clock is asked again each time when no clock is given."""
    template = getattr(tok, "chat_template", None)
    key = (template if isinstance(template, str) else repr(template), None if clock is None else clock.iso())
    cacheable = clock is not None or not template_reads_clock(tok)
    try:
        known = _HAS_SYSTEM_ROLE.setdefault(tok, {}) if cacheable else {}
    except TypeError:  # a tokenizer that cannot be weakly referenced: not remembered
        known = {}
    if key not in known:
        try:
            text = _apply(tok, [{"role": "system", "content": _ph(0)}, {"role": "user", "content": _ph(1)}], True,
                          clock)
            known[key] = _ph(0) in text
        except TemplateError:
            known[key] = False
    return known[key]


def injected_default_system(tok, clock: TemplateClock | None = None) -> str | None:
    """The system text the template inserts when the conversation has none (SmolLM2,
    Qwen2.5 and Mistral Small 3.x do this), or None. Found by comparing the scaffolding
    around an explicit system placeholder with the rendering of a user-only conversation."""
    if not template_has_system_role(tok, clock):
        return None
    with_sys = _apply(tok, [{"role": "system", "content": _ph(0)}, {"role": "user", "content": _ph(1)}], True, clock)
    without = _apply(tok, [{"role": "user", "content": _ph(1)}], True, clock)
    if with_sys.index(_ph(0)) > with_sys.index(_ph(1)) or _ph(1) not in without:
        return None
    prefix = with_sys[: with_sys.index(_ph(0))]
    between = with_sys[with_sys.index(_ph(0)) + len(_ph(0)) : with_sys.index(_ph(1))]
    pre = without[: without.index(_ph(1))]
    if pre.startswith(prefix) and pre.endswith(between) and len(pre) > len(prefix) + len(between):
        return pre[len(prefix) : len(pre) - len(between)]
    return None


def _segments(messages: list[dict]) -> list[tuple[int, str, str]]:
    """(message index, region, text) for every content segment. A content may be a plain
    string or a list of (region, text) segments (used to fold a system prompt into the
    user turn for templates without a system role)."""
    out = []
    for mi, m in enumerate(messages):
        c = m["content"]
        if isinstance(c, str):
            out.append((mi, _ROLE_REGION.get(m["role"], "template"), c))
        else:
            for region, text in c:
                out.append((mi, region, text))
    return out


def _placeholder_messages(messages: list[dict], segs, keep_empty: bool = True) -> list[dict]:
    """Messages whose contents are placeholders; with ``keep_empty=False`` an empty content
    stays empty, for templates that render an empty message differently (Phi-3.5 leaves out
    an empty system turn)."""
    out = [dict(m) for m in messages]
    k = 0
    for mi, m in enumerate(messages):
        c = m["content"]
        parts = [c] if isinstance(c, str) else [t for _, t in c]
        if keep_empty or "".join(parts):
            out[mi]["content"] = "".join(_ph(k + j) for j in range(len(parts)))
        k += len(parts)
    return out


def _real_messages(messages: list[dict]) -> list[dict]:
    return [
        {**m, "content": m["content"] if isinstance(m["content"], str) else "".join(t for _, t in m["content"])}
        for m in messages
    ]


def _locate(skel: str, segs, messages, present: list[int]) -> list[int]:
    """Segment indices in the order their placeholders appear in the skeleton; refuses a
    template that drops or repeats a content."""
    where = []
    roles = [m["role"] for m in messages]
    for k in present:
        n = skel.count(_ph(k))
        mi, region, _ = segs[k]
        what = f"the {messages[mi]['role']} message's content (message {mi} of {roles})"
        if n == 0:
            raise TemplateError(f"the chat template drops {what}; its tokens cannot be labelled")
        if n > 1:
            raise TemplateError(f"the chat template renders {what} {n} times; promptshift labels each content once "
                                "and refuses templates that repeat one")
        where.append((skel.index(_ph(k)), k))
    return [k for _, k in sorted(where)]


def _match(pieces: list[str], texts: list[str], exact: list[bool], real: str):
    """Find where each content lands in ``real`` = pieces[0] + c0 + pieces[1] + c1 + ...,
    where each rendered content c_k is ``texts[k][a:b]`` with only whitespace cut off at
    either end (any per-message trimming: left, right, both or none). Returns a list of
    (start, a, b) per content, or the index of the first content that cannot be matched.
    Depth-first, trying the fullest text first; failed (content, position) pairs are
    remembered, so the search is linear in practice."""
    n = len(texts)
    failed: set[tuple[int, int]] = set()
    furthest = [0]

    def options(k: int, cur: int):
        t = texts[k]
        if exact[k]:
            if real.startswith(t, cur):
                yield 0, len(t)
            return
        core = t.strip()
        if not core:  # whitespace only (or empty): any run of it may be kept
            for a in range(len(t) + 1):
                for b in range(len(t), a - 1, -1):
                    if real.startswith(t[a:b], cur):
                        yield a, b
            return
        lead = len(t) - len(t.lstrip())
        tail = len(t.rstrip())
        for a in range(lead + 1):
            if not real.startswith(t[a:tail], cur):
                continue
            for b in range(len(t), tail - 1, -1):
                if real.startswith(t[tail:b], cur + tail - a):
                    yield a, b

    def solve(k: int, cur: int):
        # cur: position right after pieces[k]
        if k == n:
            return [] if cur == len(real) else None
        if (k, cur) in failed:
            return None
        furthest[0] = max(furthest[0], k)
        for a, b in options(k, cur):
            nxt = cur + b - a
            if real.startswith(pieces[k + 1], nxt):
                rest = solve(k + 1, nxt + len(pieces[k + 1]))
                if rest is not None:
                    return [(cur, a, b)] + rest
        failed.add((k, cur))
        return None

    if not real.startswith(pieces[0]):
        return 0
    found = solve(0, len(pieces[0]))
    return found if found is not None else min(furthest[0], max(n - 1, 0))


def render(tok, messages: list[dict], add_generation_prompt: bool = True, *,
           clock: TemplateClock | None = None) -> Rendered:
    """Render and tokenize ``messages`` once, labelling each token's region and turn.

    ``clock``: the time a template that reads the clock sees (None: the current time).
    Raises TemplateError when the template drops, repeats or rewrites a content."""
    segs = _segments(messages)
    real = _apply(tok, _real_messages(messages), add_generation_prompt, clock)
    # Empty contents get placeholders too (their scaffolding keeps its turn); a template
    # that renders an empty message differently is matched with the empty contents left empty.
    last_error = None
    for keep_empty in (True, False) if any(not t for _, _, t in segs) else (True,):
        present = [k for k, (_, _, t) in enumerate(segs) if keep_empty or t]
        skel = _apply(tok, _placeholder_messages(messages, segs, keep_empty), add_generation_prompt, clock)
        try:
            order = _locate(skel, segs, messages, present)
        except TemplateError as e:
            last_error = e
            continue
        pieces = _cut(skel, order)
        found = _match(pieces, [segs[k][2] for k in order], [not is_content(segs[k][1]) for k in order], real)
        if isinstance(found, list):
            break
        mi = segs[order[found]][0] if order else 0
        last_error = TemplateError(
            f"the chat template changes the {messages[mi]['role']} message's content (message {mi}) beyond trimming "
            "whitespace; promptshift cannot label token regions exactly for it (pass a plain template with "
            "--chat-template)"
        )
    else:
        raise last_error

    n = len(real)
    char_region = np.full(n, REGION_CODE["template"], dtype=np.int8)
    char_turn = np.full(n, -1, dtype=np.int16)
    char_content = np.zeros(n, dtype=bool)
    # turn index: number of user messages seen so far - 1 (system stays -1)
    msg_turn, t = [], -1
    for m in messages:
        if m["role"] == "user":
            t += 1
        msg_turn.append(-1 if m["role"] == "system" else max(t, 0))
    spans: list[Span] = []
    anchors: list[Span] = []
    cursor, seen_turn = 0, False
    for j, (k, (start, a, b)) in enumerate(zip(order, found)):
        mi, region, _ = segs[k]
        end = start + b - a
        turn = msg_turn[mi]
        # scaffolding before a content belongs to that content's turn; before a system text
        # that the template placed inside the dialogue, to the turn it was placed in
        scaffold_turn = turn
        if turn < 0 and seen_turn:
            scaffold_turn = next((msg_turn[segs[q][0]] for q in order[j + 1 :] if msg_turn[segs[q][0]] >= 0), turn)
        char_turn[cursor:start] = scaffold_turn
        char_region[start:end] = REGION_CODE[region]
        char_turn[start:end] = turn
        if is_content(region) and end > start:
            char_content[start:end] = True
            spans.append(Span(region, int(turn), mi, start, end, a))
        if is_content(region):
            anchors.append(Span(region, int(turn), mi, start, end, a))
        seen_turn |= turn >= 0
        cursor = end
    char_turn[cursor:] = msg_turn[-1] if msg_turn else -1

    injected = None
    if not any(m["role"] == "system" for m in messages) and messages and messages[0]["role"] == "user":
        injected = injected_default_system(tok, clock)
        if injected:
            at = real.find(injected)
            if 0 <= at and at + len(injected) <= (spans[0].start if spans else n):
                char_region[at : at + len(injected)] = REGION_CODE["system"]
                char_turn[at : at + len(injected)] = -1
                char_content[at : at + len(injected)] = True
                spans.insert(0, Span("system", -1, -1, at, at + len(injected), 0))

    gen_from = n  # first character of the generation prompt
    if add_generation_prompt:
        # What add_generation_prompt adds after the conversation; a template may also drop
        # something it writes otherwise (Phi-3.5 ends a conversation without one with EOS)
        nogen = _apply(tok, _placeholder_messages(messages, segs, keep_empty), False, clock)
        same = len(os.path.commonprefix([skel, nogen]))
        if "\ue000" in skel[same:]:
            raise TemplateError("the chat template's generation prompt is not at the end of the conversation")
        gen_from = n - (len(skel) - same)

    enc = tok(real, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    bos = tok.bos_token_id
    if bos is not None and tok.bos_token and not real.startswith(tok.bos_token):
        # The template does not write BOS; add it only where the tokenizer itself would.
        default = tok("x", add_special_tokens=True)["input_ids"]
        if default and default[0] == bos:
            ids = [bos] + ids
            offsets = [(0, 0)] + offsets
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise TemplateError("rendering produced a double BOS token; the template and tokenizer both add it")

    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if gen_from < n:
        # a token that straddles the start of the generation prompt belongs to it (the
        # common prefix of the two renderings can end inside a control token's text)
        cut = np.flatnonzero((off[:, 0] < gen_from) & (off[:, 1] > gen_from))
        floor = max((sp.end for sp in spans), default=0)
        if cut.size:
            gen_from = max(int(off[cut[0], 0]), floor)
        char_region[gen_from:] = REGION_CODE["gen_prompt"]
    at = label_chars(off, char_content, np.fromiter((c.isspace() for c in real), dtype=bool, count=n))
    has = at >= 0
    regions = np.full(len(ids), REGION_CODE["template"], dtype=np.int8)
    turns = np.full(len(ids), -1, dtype=np.int16)
    regions[has] = char_region[at[has]]
    turns[has] = char_turn[at[has]]
    if len(ids):
        regions[0] = REGION_CODE["sink"]
    return Rendered(text=real, ids=np.asarray(ids, dtype=np.int64), regions=regions, turns=turns,
                    injected_system=injected, offsets=off, spans=spans, anchors=anchors)


def label_chars(offsets: np.ndarray, content: np.ndarray, space: np.ndarray) -> np.ndarray:
    """The character that decides each token's label: the first non-whitespace content
    character the token carries, else its first content character, else its first
    character; -1 for tokens without characters (a BOS the tokenizer adds).

    ``offsets`` (S, 2) token character spans; ``content``, ``space`` (n_chars,) bool: the
    character belongs to a message content / is whitespace (``str.isspace``). This is the
    rule that labels ``ĠHi`` (the template's space, then the system text "Hi") ``system``."""
    n = len(content)
    s, e = offsets[:, 0], offsets[:, 1]
    out = np.where(e > s, s, -1)

    def next_true(mask):  # (n + 1,) index of the first True at or after each position, n if none
        idx = np.where(mask, np.arange(n), n)
        return np.concatenate([np.minimum.accumulate(idx[::-1])[::-1], [n]]) if n else np.zeros(1, np.int64)

    s_ok = np.clip(s, 0, n)
    for mask in (content, content & ~space):  # the stronger rule last, so it wins
        first = next_true(mask)[s_ok]
        out = np.where((e > s) & (first < e), first, out)
    return out


def conversation(
    tok, system: str | None, user: str, *, no_system_role: str = "error", empty_system: bool = False,
    clock: TemplateClock | None = None, prefix: str | None = None, prefix_separator: str = "\n\n",
) -> list[dict]:
    """Messages for one (system, user) pair under the template's abilities.

    ``system=None`` means no system turn at all; ``empty_system`` means a system turn with
    empty text. Templates with no system role either raise or, with the opt-in policy
    ``prepend_to_user``, carry the system text at the start of the user turn (its tokens
    are still labelled ``system``). ``prefix``: an instruction written at the start of the
    user turn, ``prefix + prefix_separator + user``; the instruction and the separator are
    labelled ``prefix``, so the prefix region holds exactly what the prefix adds to the
    conversation without it."""
    content = user if prefix is None else [("prefix", prefix + prefix_separator), ("user", user)]
    return dialogue(tok, system, [{"role": "user", "content": content}], no_system_role=no_system_role,
                    empty_system=empty_system, clock=clock)


def dialogue(
    tok, system: str | None, turns: list[dict], *, no_system_role: str = "error", empty_system: bool = False,
    clock: TemplateClock | None = None,
) -> list[dict]:
    """Messages for a system prompt followed by ``turns`` (user/assistant messages, the
    first a user message), under the template's abilities: as :func:`conversation`, for
    multi-turn dialogues (``prepend_to_user`` folds the system text into the first user
    message)."""
    has_role = template_has_system_role(tok, clock)
    turns = [dict(m) for m in turns]
    if system is None and not empty_system:
        return turns
    text = "" if empty_system else system
    if has_role:
        return [{"role": "system", "content": text}] + turns
    if no_system_role == "prepend_to_user":
        if not text:
            return turns
        first = turns[0]
        c = first["content"]
        turns[0] = {**first, "content": [("system", text), ("template", "\n\n"),
                                         *([("user", c)] if isinstance(c, str) else c)]}
        return turns
    raise TemplateError(
        "the chat template has no system role; set `no_system_role: prepend_to_user` in the sweep to put the "
        "system prompt at the start of the user turn (recorded in the store), or use a template with one"
    )

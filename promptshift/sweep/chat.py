"""Render conversations with the model's chat template and label every token's region.

Regions come from the template itself, not from tokenizing the parts separately: each
message content is replaced by a private-use placeholder, the template is rendered once
with placeholders and once with the real text, and the two renderings must agree on the
scaffolding around the contents. That gives exact character spans for every content,
which the tokenizer's offset mapping carries to tokens. A template that rewrites content
(other than trimming whitespace) is refused rather than labelled approximately.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from promptshift.errors import TemplateError

REGIONS = ("sink", "template", "system", "user", "assistant", "gen_prompt")
REGION_CODE = {r: i for i, r in enumerate(REGIONS)}
PAD_REGION = -1

_ROLE_REGION = {"system": "system", "user": "user", "assistant": "assistant"}


def _ph(i: int) -> str:
    # Private-use code points: no tokenizer merges them with neighbours in a way that
    # matters here, and no real prompt contains them.
    return f"\ue000{i}\ue001"


@dataclass
class Rendered:
    text: str
    ids: np.ndarray  # (S,) int64
    regions: np.ndarray  # (S,) int8, codes into REGIONS
    turns: np.ndarray  # (S,) int16, conversation turn, -1 outside turns
    injected_system: str | None = None  # default system text the template added by itself
    offsets: np.ndarray = field(default=None, repr=False)  # (S, 2)

    def region_slice(self, region: str) -> tuple[int, int] | None:
        """[first, last+1) token range of a region (None if absent)."""
        idx = np.flatnonzero(self.regions == REGION_CODE[region])
        return (int(idx[0]), int(idx[-1]) + 1) if idx.size else None

    def decode_region(self, tok, region: str) -> str:
        return tok.decode(self.ids[self.regions == REGION_CODE[region]].tolist())


def _apply(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's raise_exception (e.g. "System role not supported")
        raise TemplateError(f"the chat template failed to render {[m['role'] for m in messages]}: {e}") from e


def template_has_system_role(tok) -> bool:
    """True when a system message's content appears in the rendering."""
    try:
        text = tok.apply_chat_template(
            [{"role": "system", "content": _ph(0)}, {"role": "user", "content": _ph(1)}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:
        return False
    return _ph(0) in text


def injected_default_system(tok) -> str | None:
    """The system text the template inserts when the conversation has none (SmolLM2 and
    Qwen2.5 do this), or None. Found by comparing the scaffolding around an explicit
    system placeholder with the rendering of a user-only conversation."""
    if not template_has_system_role(tok):
        return None
    with_sys = _apply(tok, [{"role": "system", "content": _ph(0)}, {"role": "user", "content": _ph(1)}], True)
    without = _apply(tok, [{"role": "user", "content": _ph(1)}], True)
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


def _placeholder_messages(messages: list[dict], segs) -> list[dict]:
    out = [dict(m) for m in messages]
    k = 0
    for mi, m in enumerate(messages):
        c = m["content"]
        n = 1 if isinstance(c, str) else len(c)
        out[mi]["content"] = "".join(_ph(k + j) for j in range(n))
        k += n
    return out


def _real_messages(messages: list[dict]) -> list[dict]:
    return [
        {**m, "content": m["content"] if isinstance(m["content"], str) else "".join(t for _, t in m["content"])}
        for m in messages
    ]


def render(tok, messages: list[dict], add_generation_prompt: bool = True) -> Rendered:
    """Render and tokenize ``messages`` once, labelling each token's region and turn."""
    segs = _segments(messages)
    skel = _apply(tok, _placeholder_messages(messages, segs), add_generation_prompt)
    real = _apply(tok, _real_messages(messages), add_generation_prompt)

    # Split the skeleton into scaffolding pieces around the placeholders.
    pieces, pos = [], 0
    for k in range(len(segs)):
        at = skel.find(_ph(k), pos)
        if at < 0 or skel.count(_ph(k)) != 1:
            raise TemplateError(
                f"the chat template drops or repeats message content (segment {k} of "
                f"{[m['role'] for m in messages]}); regions cannot be labelled exactly"
            )
        pieces.append(skel[pos:at])
        pos = at + len(_ph(k))
    pieces.append(skel[pos:])

    def build(texts):
        return "".join(p + t for p, t in zip(pieces, texts + [""]))

    texts = [t for _, _, t in segs]
    if build(texts) != real:
        texts = [t.strip() for t in texts]  # templates such as Llama 3's trim contents
        if build(texts) != real:
            raise TemplateError(
                "the chat template changes message content beyond trimming whitespace; promptshift cannot "
                "label token regions exactly for it (pass a plain template with --chat-template)"
            )

    n = len(real)
    char_region = np.full(n, REGION_CODE["template"], dtype=np.int8)
    char_turn = np.full(n, -1, dtype=np.int16)
    # turn index: number of user messages seen so far - 1 (system stays -1)
    msg_turn, t = [], -1
    for m in messages:
        if m["role"] == "user":
            t += 1
        msg_turn.append(-1 if m["role"] == "system" else max(t, 0))
    cursor = 0
    for k, (mi, region, _) in enumerate(segs):
        start = cursor + len(pieces[k])
        end = start + len(texts[k])
        # scaffolding before a content belongs to that content's turn
        char_turn[cursor:start] = msg_turn[mi]
        char_region[start:end] = REGION_CODE[region]
        char_turn[start:end] = msg_turn[mi]
        cursor = end
    char_turn[cursor:] = msg_turn[-1] if msg_turn else -1

    injected = None
    if not any(m["role"] == "system" for m in messages) and messages and messages[0]["role"] == "user":
        injected = injected_default_system(tok)
        if injected:
            at = real.find(injected)
            if at >= 0 and at < len(pieces[0]):
                char_region[at : at + len(injected)] = REGION_CODE["system"]
                char_turn[at : at + len(injected)] = -1

    if add_generation_prompt:
        nogen = _apply(tok, _placeholder_messages(messages, segs), False)
        if not skel.startswith(nogen):
            raise TemplateError("the chat template's generation prompt is not a suffix of the conversation")
        gp = len(skel) - len(nogen)
        if gp:
            char_region[n - gp :] = REGION_CODE["gen_prompt"]

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

    regions = np.empty(len(ids), dtype=np.int8)
    turns = np.empty(len(ids), dtype=np.int16)
    for i, (s, e) in enumerate(offsets):
        if e > s:
            regions[i] = char_region[s]
            turns[i] = char_turn[s]
        else:
            regions[i] = REGION_CODE["template"]
            turns[i] = -1
    if len(ids):
        regions[0] = REGION_CODE["sink"]
    return Rendered(
        text=real,
        ids=np.asarray(ids, dtype=np.int64),
        regions=regions,
        turns=turns,
        injected_system=injected,
        offsets=np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
    )


def conversation(
    tok, system: str | None, user: str, *, no_system_role: str = "error", empty_system: bool = False
) -> list[dict]:
    """Messages for one (system, user) pair under the template's abilities.

    ``system=None`` means no system turn at all; ``empty_system`` means a system turn with
    empty text. Templates with no system role either raise or, with the opt-in policy
    ``prepend_to_user``, carry the system text at the start of the user turn (its tokens
    are still labelled ``system``)."""
    has_role = template_has_system_role(tok)
    if system is None and not empty_system:
        return [{"role": "user", "content": user}]
    text = "" if empty_system else system
    if has_role:
        return [{"role": "system", "content": text}, {"role": "user", "content": user}]
    if no_system_role == "prepend_to_user":
        if not text:
            return [{"role": "user", "content": user}]
        return [{"role": "user", "content": [("system", text), ("template", "\n\n"), ("user", user)]}]
    raise TemplateError(
        "the chat template has no system role; set `no_system_role: prepend_to_user` in the sweep to put the "
        "system prompt at the start of the user turn (recorded in the store), or use a template with one"
    )

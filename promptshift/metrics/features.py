"""Text features of an instruction (a system prompt or an instruction prefix), computed
from its text alone, beside the tags a sweep declares.

The keyword features are of the kind the notebook this project grew out of uses (does the
text set a persona, ask for a format, ask for step-by-step thinking, state a hard
constraint, ask for brevity). They are deliberately simple, listed here in full and in
docs/RESULTS.md, so that a reader can check which prompts carry which feature: a feature
is present when any of its patterns matches the lower-cased text. Patterns start at a word
boundary and match word stems (``\\bstep`` matches "step", "steps", "step-by-step"), so
"reason" does not fire inside "treason" but does on "reasoning".
"""

from __future__ import annotations

import re

# feature -> patterns (regular expressions on the lower-cased text)
KEYWORDS: dict[str, tuple[str, ...]] = {
    "persona": (r"\byou are\b", r"\byou're\b", r"\bact as\b", r"\bact like\b", r"\bpretend to be\b",
                r"\bplay the role\b", r"\byour role\b", r"\byou speak as\b"),
    "format": (r"\bformat", r"\bstructur", r"\bjson\b", r"\bmarkdown\b", r"\bbullet", r"\bnumbered list",
               r"\btable\b", r"\byaml\b", r"\bheadings?\b"),
    "thinking": (r"\bstep", r"\bthink", r"\breason", r"\bexplain your\b", r"\bshow your work\b"),
    "constraint": (r"\bmust\b", r"\balways\b", r"\bnever\b", r"\bonly\b", r"\bdo not\b", r"\bdon't\b",
                   r"\bunder no circumstances\b", r"\bat most\b", r"\bexactly\b"),
    "brevity": (r"\bconcise", r"\bbrief", r"\bshort\b", r"\bshorter\b", r"\bsuccinct", r"\bterse",
                r"\bone sentence\b", r"\bfew words\b", r"\bone word\b"),
}
FEATURES = tuple(KEYWORDS)
_COMPILED = {k: re.compile("|".join(v)) for k, v in KEYWORDS.items()}


def n_words(text: str) -> int:
    """Whitespace-separated words, as the notebook counts them."""
    return len(text.split())


def keyword_features(text: str) -> dict[str, bool]:
    """``{feature: present}`` for every feature of :data:`KEYWORDS`."""
    low = text.lower()
    return {k: bool(rx.search(low)) for k, rx in _COMPILED.items()}


def keyword_list(text: str) -> tuple[str, ...]:
    """The features present in ``text``, in :data:`FEATURES` order."""
    f = keyword_features(text)
    return tuple(k for k in FEATURES if f[k])


__all__ = ["FEATURES", "KEYWORDS", "keyword_features", "keyword_list", "n_words"]

"""Text features of an instruction (promptshift/metrics/features.py): the keyword table in
docs/RESULTS.md is the code's, entry by entry; patterns match at word starts; the summary
falls back to keyword features when a sweep declares no tags."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from promptshift.metrics.analyses import tags_summary
from promptshift.metrics.features import FEATURES, KEYWORDS, keyword_features, keyword_list, n_words
from tests.conftest import REPO


def _documented() -> dict[str, list[str]]:
    """feature -> its entries, from the keyword table of docs/RESULTS.md."""
    text = (REPO / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    section = text[text.index("**Keyword features**"):]
    section = section[section.index("| feature | patterns |"):]
    section = section[: section.index("\n\n")]  # the table ends at the first blank line
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|$", section, flags=re.MULTILINE)
    return {f: [e.strip() for e in entries.split(",")] for f, entries in rows}


def test_results_doc_lists_every_pattern_as_the_code_matches_it():
    doc = _documented()
    assert list(doc) == list(FEATURES)
    for feature, entries in doc.items():
        words = []
        for e in entries:
            if e.endswith("(s)"):  # "heading(s)": both spellings, one pattern
                words.append((e[:-3], False))
                words.append((e[:-3] + "s", False))
            else:
                words.append((e.rstrip("…"), e.endswith("…")))  # "format…": a stem
        # one documented entry per pattern (the "(s)" entry covers one pattern)
        assert len(entries) == len(KEYWORDS[feature]), feature
        for word, stem in words:
            assert keyword_features(word)[feature], (feature, word)
            assert keyword_features(word.upper())[feature], (feature, word)  # on the lower-cased text
            # a stem matches longer words; a whole word does not
            assert keyword_features(word + "zz")[feature] == stem, (feature, word)
            # at a word start only
            assert not keyword_features("zz" + word)[feature], (feature, word)


@pytest.mark.parametrize("text, present", [
    ("You are a pirate. Speak like one.", {"persona"}),
    ("Think step-by-step and show your reasoning.", {"thinking"}),
    ("This sentence mentions treason and a shortlist.", set()),
    ("Answer in JSON only, as a bulleted table.", {"format", "constraint"}),
    ("Be brief: one word, never explain.", {"brevity", "constraint"}),
    ("", set()),
])
def test_keyword_features_of_example_texts(text, present):
    assert set(keyword_list(text)) == present
    assert keyword_list(text) == tuple(f for f in FEATURES if f in present)  # in FEATURES order


def test_word_count_is_whitespace_split():
    assert n_words("  Be\tbrief.\n\nAnswer  in one word. ") == 6
    assert n_words("") == 0


def _tag_rows(source: str, tags: list[str], target: str = "impact") -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = len(tags)
    diff = rng.normal(0, 1, n)
    return pd.DataFrame(dict(source=source, tag=tags, target=target, diff=diff, ci_low=diff - 1, ci_high=diff + 1,
                             ci_low_simultaneous=diff - 2, ci_high_simultaneous=diff + 2, p=0.5, p_adjusted=1.0,
                             n_systems_with=2, n_systems_without=3))


def test_summary_uses_keyword_features_when_no_tags_are_declared():
    kw = _tag_rows("keyword", ["persona", "brevity"])
    s = tags_summary(kw)
    assert s["source"] == "keyword" and [t["tag"] for t in s["items"]] == ["persona", "brevity"]
    assert s["items"][1]["diff"] == pytest.approx(float(kw["diff"].iloc[1]))
    assert s["level"] == pytest.approx(1 - 0.05 / 2)  # Bonferroni over the 2 features
    both = pd.concat([kw, _tag_rows("tag", ["tone", "safety", "format"])], ignore_index=True)
    s = tags_summary(both)
    assert s["source"] == "tag" and s["n_tags"] == 3  # declared tags win; the keyword rows stay in the table

"""Judging replies: declared checks, correctness matchers, reply features. Expected values
are written out by hand for each case (what a reader decides looking at the text)."""

from __future__ import annotations

import math

import pytest

from promptshift.errors import SweepError
from promptshift.sweep.behaviour import (
    Check, correct, count_words, detect_language, evaluate, has_refusal, is_json, normalise, parse_check,
    parse_checks,
)


def test_parse_both_syntaxes():
    assert parse_check({"max_words": 20}, "w") == Check("max_words", 20)
    assert parse_check({"type": "startswith", "value": "Ahoy"}, "w") == Check("startswith", "Ahoy")
    assert parse_check({"type": "json"}, "w") == Check("json", True)
    assert parse_check({"language": " FR "}, "w") == Check("language", "fr")
    assert parse_check({"contains": 42}, "w") == Check("contains", "42")
    assert [c.label for c in parse_checks([{"json": True}, {"language": "fr"}], "w")] == ["json", "language:fr"]
    assert parse_checks(None, "w") == ()
    assert parse_checks({"regex": "^- "}, "w") == (Check("regex", "^- "),)


@pytest.mark.parametrize("obj, msg", [
    ({"max_word": 3}, "unknown check 'max_word'"),
    ({"max_words": 0}, "positive integer"),
    ({"max_words": True}, "positive integer"),
    ({"regex": "("}, "not a valid regular expression"),
    ({"json": False}, "json: true"),
    ({"language": "french"}, "ISO 639"),
    ({"language": "xx"}, "not among the languages"),
    ({"startswith": ""}, "non-empty text"),
    ({"startswith": "a", "contains": "b"}, "one key"),
    ("max_words: 3", "must be a mapping"),
])
def test_parse_errors(obj, msg):
    with pytest.raises(SweepError, match=msg):
        parse_check(obj, "system prompt `x`")


def test_duplicate_checks_refused():
    with pytest.raises(SweepError, match="twice"):
        parse_checks([{"max_words": 3}, {"max_words": 3}], "w")


def test_language_outside_default_set_allowed_when_listed():
    assert parse_check({"language": "sw"}, "w", languages=("en", "sw")) == Check("language", "sw")
    assert parse_check({"language": "sw"}, "w", languages=None) == Check("language", "sw")


@pytest.mark.parametrize("check, reply, finished, want", [
    (Check("startswith", "Ahoy"), "  Ahoy, matey!", True, True),
    (Check("startswith", "Ahoy"), "Hello, Ahoy", True, False),
    (Check("startswith", "Ahoy"), "Aho", False, None),  # could still become "Ahoy"
    (Check("startswith", "Ahoy"), "Hello", False, False),  # cannot
    (Check("contains", "Answer:"), "so 12.\nAnswer: 12", True, True),
    (Check("contains", "Answer:"), "Let me think step by step", False, None),
    (Check("contains", "Answer:"), "Let me think step by step", True, False),
    (Check("contains", "Answer:"), "answer: 12", True, False),  # case-sensitive
    (Check("regex", "(?m)^- "), "Points:\n- one\n- two", True, True),
    (Check("regex", "(?m)^- "), "Points: one, two", True, False),
    (Check("max_words", 3), "Paris.", True, True),
    (Check("max_words", 3), "The capital is Paris.", True, False),
    (Check("max_words", 3), "The capital is Paris.", False, False),  # already too long
    (Check("max_words", 3), "Paris is", False, None),  # may go on
    (Check("json", True), '{"answer": "Paris"}', True, True),
    (Check("json", True), ' {"answer": "Paris"}\n', True, True),
    (Check("json", True), '```json\n{"answer": "Paris"}\n```', True, False),
    (Check("json", True), '{"answer": "Par', True, False),
    (Check("json", True), '{"answer": "Par', False, None),
    (Check("json", True), 'Sure! {"answer": 1}', False, False),  # cannot become one JSON value
    (Check("language", "fr"), "La capitale de la France est Paris.", True, True),
    (Check("language", "fr"), "The capital of France is Paris.", True, False),
    (Check("language", "fr"), "", True, False),
])
def test_evaluate(check, reply, finished, want):
    assert evaluate(check, reply, finished) is want


def test_features():
    assert count_words("  The capital\nis  Paris. ") == 4 and count_words("") == 0
    assert is_json("[1, 2]") and is_json(" 3 ") and not is_json("{'a': 1}") and not is_json("")
    assert has_refusal("I’m sorry, but I can’t help with that.")
    assert has_refusal("As an AI, I have no opinion")
    assert not has_refusal("The capital of France is Paris.")


# short model-like replies in several languages (4+ words: the range where identification is
# reliable); written for this test, labelled by the language they are written in
SENTENCES = {
    "en": ["Jupiter is the largest planet in our solar system.", "Water boils at 100 degrees Celsius at sea level.",
           "Ahoy matey, the capital be Paris!"],
    "fr": ["La capitale de la France est Paris.", "L'eau bout à 100 degrés Celsius au niveau de la mer.",
           "Il était une fois un petit robot qui avait perdu son chemin."],
    "es": ["La capital de Francia es París.", "El agua hierve a 100 grados Celsius al nivel del mar.",
           "Había una vez un pequeño robot que se perdió."],
    "de": ["Die Hauptstadt von Frankreich ist Paris.", "Wasser kocht auf Meereshöhe bei 100 Grad Celsius.",
           "Es war einmal ein kleiner Roboter, der sich verirrt hatte."],
    "it": ["La capitale della Francia è Parigi.", "Giove è il pianeta più grande del sistema solare."],
    "pt": ["A capital da França é Paris.", "Júpiter é o maior planeta do sistema solar."],
}


def test_language_identification():
    for lang, texts in SENTENCES.items():
        for t in texts:
            code, p = detect_language(t)
            assert code == lang, (t, code)
            assert 0.0 < p <= 1.0
    assert detect_language("12 + 5 = 17") == (None, pytest.approx(math.nan, nan_ok=True))
    # the full label set is available on request (and takes regional varieties into account)
    assert detect_language("La capital de Francia es París.", languages=None)[0] in ("es", "ext", "an", "oc", "gl")


def test_normalise():
    assert normalise("  H₂O!  ") == "h2o"
    assert normalise("París, FRANCE") == "paris france"
    assert normalise("snake_case-word") == "snake case word"


@pytest.mark.parametrize("reply, expected, match, finished, want", [
    ("The capital of France is Paris.", "Paris", "contains", True, True),
    ("La capital de Francia es París.", "Paris", "contains", True, True),  # accents removed
    ("The formula is H₂O.", "H2O", "contains", True, True),
    ("There are 120 of them", "12", "contains", True, False),  # whole words only
    ("7 plus 5 is 12.", "12", "contains", True, True),
    ("Yesterday was fine", "yes", "contains", True, False),
    ("Let me think about 7 plus", "12", "contains", False, None),  # not given yet, may come
    ("blue sky", "Blue sky", "exact", True, True),
    ("Blue sky, indeed", "blue sky", "exact", True, False),
    ("Blue", "blue sky", "exact", False, None),
    ("HELLO", "^hello$", "regex", True, True),
    ("7 plus 5 makes 12.", "12", "number", True, True),
    ("7 plus 5 makes 12.", "7", "number", True, False),  # the last number counts
    ("It is 1,000.5 exactly", "1000.5", "number", True, True),
    ("The answer is 12", "12", "number", False, None),  # more numbers may follow
    ("No number here", "3", "number", True, False),
])
def test_correct(reply, expected, match, finished, want):
    assert correct(reply, expected, match, finished) is want

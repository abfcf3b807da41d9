"""MMAU's matching rule against a direct, independent implementation of the rule's text."""

import pytest

from avrl.rules.mmau import mmau_match
from tests.support.helpers import mmau_reference

CASES = [
    ("Man", "Man", ["Man", "Woman"]),  # shared word? no: 'woman' is its own token
    ("Woman", "Man", ["Man", "Woman"]),
    ("a man speaking", "Man speaking", ["Man speaking", "Man singing", "Woman speaking"]),
    ("man singing", "Man speaking", ["Man speaking", "Man singing", "Woman speaking"]),
    ("Man speaking and singing", "Man speaking", ["Man speaking", "Man singing"]),
    ("", "Dog", ["Dog", "Cat"]),
    ("   ", "Dog", ["Dog", "Cat"]),
    ("<think>it is not a cat</think> dog", "Dog", ["Dog", "Cat"]),  # a think block naming a wrong choice
    ("dog", "Dog", ["Dog", "Cat"]),
    ("(B) 120 bpm", "120 bpm", ["90 bpm", "120 bpm", "150 bpm", "60 bpm", "100 bpm", "110 bpm", "130 bpm", "140 bpm"]),
    ("120", "120 bpm", ["90 bpm", "120 bpm", "150 bpm", "60 bpm", "100 bpm", "110 bpm", "130 bpm", "140 bpm"]),
    ("Yes", "Yes", ["Yes", "No"]),
    ("yes, no doubt", "Yes", ["Yes", "No"]),
    ("Piano", "Piano", ["Piano", "Grand piano"]),  # answer tokens a subset of another choice's
    ("grand piano", "Piano", ["Piano", "Grand piano"]),
    ("Grand piano", "Grand piano", ["Piano", "Grand piano"]),
]


@pytest.mark.parametrize("prediction,answer,choices", CASES)
def test_matches_mmau_reference(prediction, answer, choices):
    assert mmau_match(prediction, answer, choices) == mmau_reference(prediction, answer, choices)


def test_known_outcomes():
    assert mmau_match("Woman", "Man", ["Man", "Woman"]) is False
    assert mmau_match("a man speaking", "Man speaking", ["Man speaking", "Man singing"]) is True
    assert mmau_match("", "Dog", ["Dog", "Cat"]) is False
    assert mmau_match("<think>it is not a cat</think> dog", "Dog", ["Dog", "Cat"]) is False
    assert mmau_match("grand piano", "Piano", ["Piano", "Grand piano"]) is False

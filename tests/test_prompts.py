import pytest

from avrl.prompts import PromptSpec, extract_answer, parse_letter, predicted_text, render_question, target_answer
from tests.support.helpers import ITEM, spec


def test_r1_aqa_no_think_wording():
    assert render_question(spec("no_think"), ITEM) == (
        "What is making the sound in the audio? Please choose the answer from the following options: "
        "['dog', 'car horn', 'rain']. Output the final answer in <answer> </answer>."
    )


def test_r1_aqa_think_wording():
    assert render_question(spec("think"), ITEM).endswith(
        "['dog', 'car horn', 'rain']. Output the thinking process in <think> </think> and final answer in "
        "<answer> </answer>."
    )


def test_echoink_wording_letters_and_target():
    echo = spec("echoink")
    text = render_question(echo, ITEM)
    assert text.startswith("What is making the sound in the audio? Options:\nA. dog\nB. car horn\nC. rain\n")
    assert text.endswith(
        "Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
    )
    assert target_answer(echo, ITEM) == "B"
    assert target_answer(spec("no_think"), ITEM) == "car horn"


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<answer>dog</answer>", "dog"),
        ("<think>maybe <answer>rain</answer>?</think><answer> car horn </answer>", "car horn"),  # the last block counts
        ("<answer>\nline one\nline two\n</answer>", "line one\nline two"),
        ("the answer is dog", None),
        ("<answer>dog", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("B", 1),
        ("(B)", 1),
        ("B.", 1),
        ("B)", 1),
        ("B. car horn", 1),
        ("car horn", 1),
        ("Car Horn", 1),
        ("a", None),  # EchoInk's parser read the word "a" as option A
        ("A dog", None),  # nor is an article at the start of a sentence
        ("b", None),
        ("D", None),
        ("", None),
        ("AB", None),
    ],
)
def test_parse_letter(answer, expected):
    assert parse_letter(answer, ITEM.choices) == expected


def test_predicted_text_maps_letters_to_choice_text():
    assert predicted_text(spec("echoink"), "<think>x</think><answer>C</answer>", ITEM.choices) == "rain"
    assert predicted_text(spec("echoink"), "<answer>a</answer>", ITEM.choices) == ""
    assert predicted_text(spec("no_think"), "<answer>rain</answer>", ITEM.choices) == "rain"
    assert predicted_text(spec("no_think"), "no tags", ITEM.choices) == ""


def test_prompt_spec_rejects_unknown_answer_style():
    with pytest.raises(ValueError, match="answer_style"):
        PromptSpec(name="x", template="{question}", answer_style="number")

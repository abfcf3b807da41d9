import functools

import pytest
import torch

from avrl.data.items import QAItem
from avrl.rewards import accuracy_reward, format_reward, score
from tests.support.helpers import ITEM, spec


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<answer>car horn</answer>", 1.0),
        ("  <answer>car horn</answer>\n", 1.0),
        ("<answer>\ncar\nhorn\n</answer>", 1.0),  # across lines
        ("I think <answer>car horn</answer>", 0.0),  # text outside the tags
        ("<think>x</think><answer>car horn</answer>", 0.0),
        ("<answer>car horn", 0.0),
    ],
)
def test_format_answer_only(completion, expected):
    assert format_reward([completion], [ITEM], spec("no_think")) == [expected]


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>it honks</think><answer>car horn</answer>", 1.0),
        ("<think>\nline\nline\n</think>\n\n<answer>B</answer>", 1.0),
        ("<answer>car horn</answer>", 0.0),
        ("<think>x</think>", 0.0),
        ("<think>x</think> then <answer>y</answer>", 0.0),
    ],
)
def test_format_think(completion, expected):
    assert format_reward([completion], [ITEM], spec("think")) == [expected]


def test_accuracy_text_and_letter():
    texts = ["<answer>car horn</answer>", "<answer>dog</answer>", "no answer", "<answer>horn of a car</answer>"]
    assert accuracy_reward(texts, [ITEM] * 4, spec("no_think")) == [1.0, 0.0, 0.0, 1.0]
    letters = ["<answer>B</answer>", "<answer>b</answer>", "<answer>A</answer>", "<answer>car horn</answer>"]
    assert accuracy_reward(letters, [ITEM] * 4, spec("echoink")) == [1.0, 0.0, 0.0, 1.0]


def test_weighted_sum_keeps_each_function():
    fns = {
        "accuracy": accuracy_reward,
        "format": format_reward,
        "length": functools.partial(lambda c, i, p, k: [k * len(x) for x in c], k=0.5),
    }
    texts = ["<answer>car horn</answer>", "maybe <answer>dog</answer>"]
    total, each = score(fns, {"accuracy": 2.0, "format": 0.5, "length": 0.0}, texts, [ITEM] * 2, spec("no_think"))
    assert torch.equal(each["accuracy"], torch.tensor([1.0, 0.0]))
    assert torch.equal(each["format"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(total, torch.tensor([2.5, 0.0]))
    with pytest.raises(ValueError, match="no weight"):
        score(fns, {"accuracy": 1.0}, texts, [ITEM] * 2, spec("no_think"))


def test_user_reward_by_target(tmp_path):
    from avrl.train import reward_functions
    from tests.support import compose

    cfg = compose(
        [
            "+reward.functions.brevity._target_=tests.test_rewards.brevity",
            "+reward.functions.brevity._partial_=true",
            "+reward.weights.brevity=0.1",
        ]
    )
    fns, weights = reward_functions(cfg)
    total, each = score(fns, weights, ["<answer>dog</answer>"], [ITEM], spec("no_think"))
    assert each["brevity"].tolist() == [1.0] and weights["brevity"] == 0.1
    assert total.item() == pytest.approx(0.0 + 1.0 + 0.1)


def brevity(completions, items, prompt):
    return [1.0 if len(c) < 40 else 0.0 for c in completions]


def test_item_answer_property():
    assert QAItem(id="x", question="q", choices=["a", "b"], answer_index=1).answer == "b"

"""Keyed sampling draws from the right distribution and does not depend on batching."""

import math

import torch

from avrl.sampling import KeyedSampler, row_key, top_p_filter, uniforms


def draw(logits_row, keys, temperature=1.0, top_p=1.0, position=0):
    sampler = KeyedSampler(keys, prompt_length=5, temperature=temperature, top_p=top_p)
    scores = sampler(torch.zeros(len(keys), 5 + position, dtype=torch.long), logits_row.expand(len(keys), -1).clone())
    assert torch.isfinite(scores).sum(dim=1).eq(1).all()  # one finite score per row: greedy emits the draw
    return scores.argmax(dim=1)


def test_draws_follow_softmax_of_tempered_logits():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    keys = [row_key(0, 0, f"item{i}", 0) for i in range(n)]
    for temperature in (1.0, 0.5):
        counts = torch.bincount(draw(probs.log(), keys, temperature), minlength=4).double()
        want = torch.softmax(probs.log() / temperature, dim=0).double()
        # chi-square with 3 degrees of freedom: 16.3 is the 0.999 quantile
        chi2 = float(((counts - n * want) ** 2 / (n * want)).sum())
        assert chi2 < 16.3, (temperature, counts / n, want)


def test_uniforms_are_uniform_and_independent_across_positions():
    keys = torch.tensor([row_key(1, 2, f"i{i}", 0) for i in range(500)])
    u0, u1 = uniforms(keys, 0, 200), uniforms(keys, 1, 200)
    assert 0 < float(u0.min()) and float(u0.max()) < 1
    assert abs(float(u0.mean()) - 0.5) < 0.005 and abs(float(u0.var()) - 1 / 12) < 0.002
    assert abs(float(torch.corrcoef(torch.stack([u0.flatten(), u1.flatten()]))[0, 1])) < 0.01


def test_a_row_draws_the_same_whatever_the_batch_around_it():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    keys = [row_key(3, 7, f"q{i}", g) for i in range(3) for g in range(2)]
    whole = KeyedSampler(keys, 0)(torch.zeros(6, 2, dtype=torch.long), logits.clone()).argmax(1)
    halves = torch.cat(
        [
            KeyedSampler(keys[:4], 0)(torch.zeros(4, 2, dtype=torch.long), logits[:4].clone()).argmax(1),
            KeyedSampler(keys[4:], 0)(torch.zeros(2, 2, dtype=torch.long), logits[4:].clone()).argmax(1),
        ]
    )
    assert torch.equal(whole, halves)
    torch.manual_seed(123)  # the global generator plays no part
    again = KeyedSampler(keys, 0)(torch.zeros(6, 2, dtype=torch.long), logits.clone()).argmax(1)
    assert torch.equal(whole, again)


def test_keys_differ_by_seed_step_item_and_index():
    base = row_key(0, 0, "a", 0)
    assert len({base, row_key(1, 0, "a", 0), row_key(0, 1, "a", 0), row_key(0, 0, "b", 0), row_key(0, 0, "a", 1)}) == 5


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    keys = [row_key(0, 0, f"x{i}", 0) for i in range(2000)]
    assert set(draw(probs.log(), keys, top_p=0.75).tolist()) == {0, 1}


def test_rollouts_take_the_algorithms_repetition_penalty_and_min_p():
    from avrl.rollout import HFRollout, sampling_settings
    from tests.support import compose

    algo = compose(["algorithm.repetition_penalty=1.2", "algorithm.min_p=0.1", "algorithm.top_k=7"]).algorithm
    settings = sampling_settings(algo)
    assert {k: settings[k] for k in ("repetition_penalty", "min_p", "top_k")} == dict(
        repetition_penalty=1.2, min_p=0.1, top_k=7
    )
    assert HFRollout(algo).settings == settings
    defaults = sampling_settings(compose([]).algorithm)
    assert (defaults["repetition_penalty"], defaults["min_p"]) == (1.0, 0.0)  # off

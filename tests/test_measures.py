"""avrl/measures.py against independent references: pass@k by enumerating every k-subset (float64) and by exact
rational arithmetic; the KL estimators against the exact KL of small categorical distributions (tolerances from
the estimator's own standard error, checked to be smaller than the KL itself); parameter change and update norm
on hand-built state dicts; majority vote, sample spread and matched accuracy on hand-built cases."""

import itertools
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch

from avrl import measures

# ----------------------------------------------------------------------------------------------------- pass@k


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The share of k-subsets of the samples holding at least one correct sample, by enumeration."""
    subsets = list(itertools.combinations(outcomes, k))
    return float(np.mean(np.array([any(s) for s in subsets], dtype=np.float64)))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 11])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n):
    rng = np.random.default_rng(n)
    for c in range(n + 1):
        outcomes = list(rng.permutation([True] * c + [False] * (n - c)))
        curve = measures.pass_at_k_curve(n, c)
        for k in range(1, n + 1):
            assert curve[k - 1] == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_the_binomials_overflow_floats():
    """n = 2000: C(n, k) overflows float64 beyond k ~ 170; the exact rational value is the reference."""
    n = 2000
    for c, k in [(1, 1), (1, 1000), (3, 700), (50, 16), (1990, 5), (0, 10)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert measures.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (c, k)


def test_pass_at_1_is_the_share_correct_and_mean_pass_at_k_averages_items():
    assert measures.pass_at_k(16, 5, 1) == pytest.approx(5 / 16, abs=1e-15)
    table = [[True, False, False, False], [False, False, False, False], [True, True, True, True]]
    got = measures.mean_pass_at_k(table, [1, 2, 4])
    for k in (1, 2, 4):
        assert got[k] == pytest.approx(np.mean([brute_pass_at_k(row, k) for row in table]), abs=1e-12)


def test_pass_at_k_metrics_from_scored_results():
    """score_batch's results (correct_per_sample); an unscored item (NaN) is left out."""
    rows = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
    results = [{"correct_per_sample": r} for r in rows] + [{"correct_per_sample": [math.nan] * 4}]
    got = measures.pass_at_k_metrics(results, [1, 2, 4], prefix="final")
    assert set(got) == {"final/pass_at_1", "final/pass_at_2", "final/pass_at_4"}
    for k in (1, 2, 4):
        assert got[f"final/pass_at_{k}"] == pytest.approx(
            np.mean([brute_pass_at_k([c > 0 for c in r], k) for r in rows])
        )
    with pytest.raises(ValueError):
        measures.pass_at_k_metrics(results, [5])
    assert measures.pass_at_k_metrics(results[3:], [1]) == {}


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        measures.pass_at_k(n, c, k)


# ------------------------------------------------------------------------------------------- KL(base || tuned)

BASE = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
TUNED = np.array([0.25, 0.35, 0.2, 0.05, 0.15])
CLOSE = BASE * np.exp(0.1 * np.array([1.0, -1.0, 0.5, -0.5, 0.0]))
CLOSE = CLOSE / CLOSE.sum()


def exact_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def sample_tokens(rng, p, q, shape):
    """Tokens drawn from p; their log-probs under p (the base) and q (the tuned model)."""
    tokens = rng.choice(len(p), size=shape, p=p)
    return np.log(p)[tokens], np.log(q)[tokens]


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("tuned", [TUNED, CLOSE], ids=["far", "close"])
def test_kl_estimators_match_the_exact_kl_of_categoricals(estimator, tuned):
    """One-token sequences: per token = per sequence = the categorical KL, within 3 standard errors, and the
    standard error is small enough that the check can tell the KL from 0 (k1 on close models needs the 200,000
    samples: its variance is what k3 removes)."""
    rng = np.random.default_rng(0)
    base_logps, tuned_logps = sample_tokens(rng, BASE, tuned, (200_000, 1))
    exact = exact_kl(BASE, tuned)
    for kind, est in measures.forward_kl(base_logps, tuned_logps, np.ones_like(base_logps), estimator).items():
        assert 3 * est.se < 0.25 * exact, (kind, est, exact)  # the tolerance is narrower than the effect
        assert abs(est.mean - exact) < 3 * est.se, (kind, est, exact)
        assert est.n == 200_000


def test_kl_per_token_with_varying_lengths_and_padding():
    """Two positions with their own distributions; a sequence stops after the first with probability 1/2. Per
    token the exact value is (KL1 + P(L = 2) KL2) / (1 + P(L = 2)); per sequence KL1 + P(L = 2) KL2. Padded
    positions carry -inf log-probs, which the mask must keep out."""
    rng = np.random.default_rng(1)
    n = 20_000
    b1, t1 = sample_tokens(rng, BASE, TUNED, n)
    b2, t2 = sample_tokens(rng, TUNED, BASE, n)
    two = rng.random(n) < 0.5
    mask = np.stack([np.ones(n), two.astype(float)], axis=1)
    base = np.stack([b1, np.where(two, b2, -np.inf)], axis=1)
    tuned = np.stack([t1, np.where(two, t2, -np.inf)], axis=1)
    kl1, kl2 = exact_kl(BASE, TUNED), exact_kl(TUNED, BASE)
    exact = {"per_token": (kl1 + 0.5 * kl2) / 1.5, "per_sequence": kl1 + 0.5 * kl2}
    for estimator in ("k1", "k3"):
        out = measures.forward_kl(torch.tensor(base), torch.tensor(tuned), torch.tensor(mask), estimator)
        for kind, est in out.items():
            assert np.isfinite(est.mean) and 3 * est.se < 0.25 * exact[kind]
            assert abs(est.mean - exact[kind]) < 3 * est.se, (estimator, kind, est, exact[kind])


def test_kl_standard_error_is_the_spread_of_repeated_estimates():
    """300 repetitions of a 200-sequence estimate: the mean reported standard error matches the standard deviation
    of the estimates, within 4 standard errors of a sample standard deviation (1 / sqrt(2 (R - 1)) relative). The
    tokens of a sequence are strongly dependent (one token repeated over its 1-5 positions), so a standard error
    taken over tokens, as if they were independent, would come out ~1.6x too small and fail."""
    rng = np.random.default_rng(2)
    reps, n = 300, 200
    for estimator in ("k1", "k3"):
        means, ses = [], []
        for _ in range(reps):
            lengths = rng.integers(1, 6, n)
            mask = (np.arange(5)[None, :] < lengths[:, None]).astype(float)
            base, tuned = (np.repeat(x, 5, axis=1) for x in sample_tokens(rng, BASE, TUNED, (n, 1)))
            est = measures.forward_kl(base, tuned, mask, estimator)["per_token"]
            means.append(est.mean)
            ses.append(est.se)
        relative = 4 / math.sqrt(2 * (reps - 1))
        assert np.mean(ses) == pytest.approx(np.std(means, ddof=1), rel=relative), estimator


def test_k3_has_the_lower_variance_when_the_models_are_close_and_is_never_negative():
    rng = np.random.default_rng(3)
    base, tuned = sample_tokens(rng, BASE, CLOSE, (5_000, 1))
    ones = np.ones_like(base)
    k1, k3 = (measures.forward_kl(base, tuned, ones, e)["per_token"] for e in ("k1", "k3"))
    assert k3.se < 0.5 * k1.se
    log_r = tuned - base
    assert (np.expm1(log_r) - log_r >= 0).all()  # each k3 term, as the docstring says


def test_kl_of_a_model_with_itself_is_zero_and_bad_inputs_are_refused():
    rng = np.random.default_rng(4)
    base, _ = sample_tokens(rng, BASE, BASE, (10, 4))
    for est in measures.forward_kl(base, base, np.ones_like(base)).values():
        assert est.mean == 0.0 and est.se == 0.0
    with pytest.raises(ValueError):
        measures.forward_kl(base, base, np.ones_like(base), "k2")
    with pytest.raises(ValueError):
        measures.forward_kl(base[:1], base[:1], np.ones_like(base[:1]))
    with pytest.raises(ValueError):
        measures.forward_kl(base, base[:, :2], np.ones_like(base))


# --------------------------------------------------------------------------------------- parameters changed


def hand_built():
    before = {
        "tower.w": torch.zeros(2, 3),
        "tower.b": torch.ones(3),
        "lm.w": torch.full((4,), 2.0),
        "lm.steps": torch.zeros(2, dtype=torch.long),  # an integer buffer: skipped
    }
    after = {k: v.clone() for k, v in before.items()}
    after["tower.w"][0, 0] += 3.0
    after["tower.w"][1, 2] -= 4.0  # tower: 2 of 9 changed, norm 5
    after["lm.w"][0] += 12.0
    after["lm.w"][1] += 1e-6  # below the 1e-5 threshold
    after["lm.steps"] += 7
    return before, after


def test_parameter_change_counts_and_norms_by_hand():
    before, after = hand_built()
    out = measures.parameter_change(before, after)
    assert out["params_changed"] == pytest.approx(3 / 13)
    assert out["params_changed/tower"] == pytest.approx(2 / 9)
    assert out["params_changed/lm"] == pytest.approx(1 / 4)
    assert out["update_norm/tower"] == pytest.approx(5.0, rel=1e-12)
    assert out["update_norm/lm"] == pytest.approx(math.sqrt(144 + 1e-12), rel=1e-6)
    assert out["update_norm"] == pytest.approx(math.sqrt(25 + 144 + 1e-12), rel=1e-6)
    assert measures.parameter_change(before, after, threshold=0.0)["params_changed"] == pytest.approx(4 / 13)
    assert measures.parameter_change(before, after, threshold=3.5)["params_changed"] == pytest.approx(2 / 13)
    whole = measures.parameter_change(before, after, depth=2)
    assert whole["params_changed/tower.w"] == pytest.approx(2 / 6) and whole["params_changed/tower.b"] == 0.0


def test_parameter_change_of_an_untouched_model_is_zero():
    before, _ = hand_built()
    out = measures.parameter_change(before, {k: v.clone() for k, v in before.items()}, threshold=0.0)
    assert out["params_changed"] == 0.0 and out["update_norm"] == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parameter_change_refuses_half_precision(dtype):
    before, after = hand_built()
    after["tower.w"] = after["tower.w"].to(dtype)
    with pytest.raises(ValueError, match="fp32"):
        measures.parameter_change(before, after)


def test_parameter_change_refuses_mismatched_state_dicts():
    before, after = hand_built()
    with pytest.raises(ValueError, match="keys"):
        measures.parameter_change(before, {k: v for k, v in after.items() if k != "lm.w"})
    after["lm.w"] = torch.zeros(5)
    with pytest.raises(ValueError, match="shape"):
        measures.parameter_change(before, after)


# ------------------------------------------------------------------------------- majority vote, sample spread


def test_majority_vote():
    assert measures.majority_vote(["a", "b", "b", None, None, None]) == "b"  # unparsable never wins
    assert measures.majority_vote(["b", "a", "a", "b"]) == "b"  # a tie: the first seen among the tied
    assert measures.majority_vote([None, None]) is None
    preds = [["a", "a", "b"], ["c", None, None], [None, None, None]]
    assert measures.majority_accuracy(preds, ["a", "b", "a"]) == pytest.approx(1 / 3)


def test_sample_accuracy_is_the_mean_and_sd_of_each_samples_accuracy():
    rng = np.random.default_rng(5)
    table = rng.random((40, 6)) < 0.6
    per_sample = [sum(bool(row[j]) for row in table) / len(table) for j in range(6)]
    mean, sd = measures.sample_accuracy(table)
    assert mean == pytest.approx(statistics.fmean(per_sample), abs=1e-12)
    assert sd == pytest.approx(statistics.stdev(per_sample), abs=1e-12)
    assert measures.sample_accuracy(table[:, :1]) == (pytest.approx(per_sample[0]), 0.0)


# ---------------------------------------------------------------------------------------- matched accuracy


def test_matched_accuracy_reads_each_arm_at_its_first_step_reaching_x():
    histories = {
        "grpo": {0: 0.5, 100: 0.6, 200: 0.92, 300: 1.0},
        "sft": {0: 0.5, 300: 0.95, 100: 0.9},  # unsorted steps
        "lora": {0: 0.5, 100: 0.52, 200: 0.5},
    }
    measures_by_arm = {
        "grpo": {"kl": {100: 0.01, 200: 0.02, 300: 0.05}, "retention": {200: -0.01}},
        "sft": {"kl": {100: 0.3, 300: 0.9}, "retention": {300: -0.2}},
        "lora": {"kl": {100: 0.1}},
    }
    out = measures.at_matched_accuracy(histories, measures_by_arm, 0.9)
    assert out["grpo"] == {"step": 200, "target": 0.92, "kl": 0.02, "retention": -0.01}
    assert out["sft"] == {"step": 100, "target": 0.9, "kl": 0.3, "retention": None}  # not recorded at step 100
    assert out["lora"] == {"step": None, "target": None, "kl": None}
    assert measures.first_step_reaching(histories["sft"], 0.95) == 300
    assert measures.first_step_reaching({}, 0.5) is None

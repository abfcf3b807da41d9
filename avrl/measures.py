"""What training costs, measured: pure functions over samples, log-probs, state dicts and metric histories.

- `pass_at_k`, `pass_at_k_curve`, `mean_pass_at_k`, `pass_at_k_metrics`: the unbiased pass@k of Chen et al. 2021
  from n samples with c correct, for k = 1..n (does training widen what the model can do at large k, or only
  sharpen it at k = 1?).
- `forward_kl`: KL(base || tuned) per token on held-out prompts, from the per-token log-probs of completions
  sampled from the base (Shenfeld et al. 2025: forgetting tracks this KL), with its standard error over sequences.
- `parameter_change`: the share of parameters changed by more than a stated threshold between two fp32 state
  dicts, and the update norm, overall and per top-level module (Mukherjee et al. 2025; bf16 weights distort the
  count, so anything but fp32/fp64 is refused).
- `majority_vote`, `majority_accuracy`, `sample_accuracy`: majority over k samples; mean ± sd of accuracy over
  samples.
- `first_step_reaching`, `at_matched_accuracy`: the first step where each arm reaches X on the target, and the
  other measures read at that step ("at matched accuracy").

Nothing here imports the rest of avrl: the callers (final evaluation, the sweep report) bring the numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), the probability that a
    k-subset drawn without replacement from the n samples holds at least one correct one (Chen et al. 2021).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k / i), a product of numbers in [0, 1]: no huge binomials, no
    cancellation (C(n-c, k) / C(n, k) = prod_{j=0..k-1} (n-c-j) / (n-j) rearranged)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def pass_at_k_curve(n: int, c: int) -> np.ndarray:
    """pass@k for k = 1..n (index k - 1)."""
    return np.array([pass_at_k(n, c, k) for k in range(1, n + 1)])


def mean_pass_at_k(correct: Sequence[Sequence[bool]] | np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """The mean over items of pass@k, for each k in `ks`; `correct` holds, per item, its n samples' correctness
    (every item the same n)."""
    table = np.asarray(correct, dtype=bool)
    if table.ndim != 2 or table.shape[0] == 0:
        raise ValueError(f"correct must be (items, samples) with at least one item, got shape {table.shape}")
    n = table.shape[1]
    counts = table.sum(axis=1)
    return {k: float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks}


def pass_at_k_metrics(results: Sequence[Mapping], ks: Sequence[int], prefix: str = "final") -> dict[str, float]:
    """`<prefix>/pass_at_<k>` (MLflow takes no "@" in a metric's name) from scored results that carry every
    sample's correctness under "correct_per_sample" (avrl/scoring.py's score_batch with samples=n): the mean over
    items of the unbiased pass@k. Items with any unscored sample (NaN: no gold answer) are left out; k larger than
    the samples is refused."""
    table = [r["correct_per_sample"] for r in results if not any(np.isnan(c) for c in r["correct_per_sample"])]
    if not table:
        return {}
    n = min(len(row) for row in table)
    if n != max(len(row) for row in table) or max(ks) > n:
        raise ValueError(f"pass@k needs the same n >= k samples per item; got n in {sorted({len(r) for r in table})}")
    return {f"{prefix}/pass_at_{k}": v for k, v in mean_pass_at_k(np.array(table) > 0.5, ks).items()}


# ------------------------------------------------------------------------------------------- KL(base || tuned)


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error, and how many independent units (sequences) it rests on."""

    mean: float
    se: float
    n: int


def forward_kl(base_logps, tuned_logps, mask, estimator: str = "k3") -> dict[str, Estimate]:
    """KL(base || tuned) from completions sampled from the *base* model on held-out prompts.

    Inputs (sequences, tokens): the log-prob of each sampled token under the base and under the tuned model (at
    the same temperature, e.g. `Policy.completion_logps`), and the completion mask (1 up to and including the stop
    token). With log r_t = tuned_logp_t - base_logp_t, the per-token estimators (Schulman, "Approximating KL
    divergence", 2020) are

    - k1 = -log r_t: unbiased, high variance, can be negative on a single token;
    - k3 = (r_t - 1) - log r_t: unbiased (E_base[r_t] = 1 given the prefix), never negative, low variance while
      the two models are close (the estimator of GRPO's own KL penalty, here in the forward direction).

    Given its prefix, each token's estimate is unbiased for the KL of the two next-token distributions at that
    position, so its sum over a completion is unbiased for the sequence-level KL(base || tuned) (chain rule).
    Returned, for the chosen estimator:

    - "per_token": sum of the estimates over all tokens / number of tokens (a ratio estimator of the KL per
      generated token); its standard error by the delta method over sequences, the independent units:
      se = sqrt(sum_i (S_i - R L_i)^2 / (n (n - 1))) / mean(L), S_i and L_i the sequence's sum and length;
    - "per_sequence": the mean over sequences of S_i, se = sd(S_i) / sqrt(n).

    Tokens within a sequence are not independent, so no standard error is taken over tokens.
    """
    if estimator not in ("k1", "k3"):
        raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")
    base, tuned, weights = _float64(base_logps), _float64(tuned_logps), _float64(mask)
    if not base.shape == tuned.shape == weights.shape or base.ndim != 2:
        raise ValueError(f"expected three (sequences, tokens) arrays, got {base.shape}, {tuned.shape}, {weights.shape}")
    keep = weights > 0  # masked positions (padding, possibly -inf log-probs) contribute 0
    log_r = np.where(keep, tuned, 0.0) - np.where(keep, base, 0.0)
    per_token = -log_r if estimator == "k1" else np.expm1(log_r) - log_r
    sums, lengths = (per_token * weights).sum(axis=1), weights.sum(axis=1)
    n = len(sums)
    if n < 2 or lengths.sum() == 0:
        raise ValueError("the KL's standard error needs at least 2 sequences with tokens")
    ratio = sums.sum() / lengths.sum()
    ratio_se = np.sqrt(((sums - ratio * lengths) ** 2).sum() / (n * (n - 1))) / lengths.mean()
    return {
        "per_token": Estimate(float(ratio), float(ratio_se), n),
        "per_sequence": Estimate(float(sums.mean()), float(sums.std(ddof=1) / np.sqrt(n)), n),
    }


def _float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------- parameters changed

DEFAULT_THRESHOLD = 1e-5  # absolute, in the parameter's own units (fp32 weights)


def parameter_change(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    threshold: float = DEFAULT_THRESHOLD,
    depth: int = 1,
) -> dict[str, float]:
    """How much of the model an update changed, from two state dicts of the same model (fp32 or fp64).

    - "params_changed": the share of parameter elements with |after - before| > `threshold` (absolute; 0 counts
      any change at all), over every floating-point element of the state dicts;
    - "update_norm": the L2 norm of after - before over all of them;
    - "params_changed/<module>", "update_norm/<module>": the same per top-level module, the first `depth`
      dot-separated components of the key (depth=2 for a state dict whose keys carry a wrapper's prefix).

    Both dicts must hold the same keys and shapes. Integer buffers are skipped. Half-precision tensors (bf16,
    fp16) are refused: rounding to their grid hides small updates and invents others (Mukherjee et al. 2025),
    so count on the fp32 master weights."""
    if set(before) != set(after):
        missing, extra = sorted(set(before) - set(after)), sorted(set(after) - set(before))
        raise ValueError(f"the state dicts differ in keys: only before {missing[:5]}, only after {extra[:5]}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    changed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    squares: dict[str, float] = {}
    for key in sorted(before):
        a, b = before[key], after[key]
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} before, {tuple(b.shape)} after")
        if not (a.is_floating_point() and b.is_floating_point()):
            continue
        for t in (a, b):
            if t.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"{key} is {t.dtype}: count changed parameters on fp32 weights, not {t.dtype}")
        delta = b.detach().to(torch.float64).cpu() - a.detach().to(torch.float64).cpu()
        group = ".".join(key.split(".")[:depth])
        changed[group] += int((delta.abs() > threshold).sum())
        total[group] += delta.numel()
        squares[group] = squares.get(group, 0.0) + float((delta**2).sum())
    if not total:
        raise ValueError("no floating-point parameters to compare")
    out = {
        "params_changed": sum(changed.values()) / sum(total.values()),
        "update_norm": float(np.sqrt(sum(squares.values()))),
    }
    for group in sorted(total):
        out[f"params_changed/{group}"] = changed[group] / total[group]
        out[f"update_norm/{group}"] = float(np.sqrt(squares[group]))
    return out


# ------------------------------------------------------------------------------- majority vote, sample spread


def majority_vote(predictions: Sequence[Hashable | None]) -> Hashable | None:
    """The answer most of the k samples give; None (unparsable) never wins unless nothing else was answered. A tie
    goes to the tied answer that appeared first among the samples (deterministic, no random draw)."""
    counts = Counter(p for p in predictions if p is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(p for p in predictions if p is not None and counts[p] == best)


def majority_accuracy(predictions: Sequence[Sequence[Hashable | None]], answers: Sequence[Hashable]) -> float:
    """The share of items whose majority vote over their samples is the gold answer."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"{len(predictions)} items of predictions for {len(answers)} answers")
    return float(np.mean([majority_vote(p) == a for p, a in zip(predictions, answers)]))


def sample_accuracy(correct: Sequence[Sequence[bool]] | np.ndarray) -> tuple[float, float]:
    """Mean ± sd over samples of the accuracy: `correct` is (items, samples); sample j's accuracy is the mean of
    column j over items; returns (mean, sd with ddof=1) of those k accuracies (sd 0.0 for one sample)."""
    table = np.asarray(correct, dtype=np.float64)
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"correct must be (items, samples), got shape {table.shape}")
    per_sample = table.mean(axis=0)
    return float(per_sample.mean()), float(per_sample.std(ddof=1)) if len(per_sample) > 1 else 0.0


# ---------------------------------------------------------------------------------------- matched accuracy


def first_step_reaching(history: Mapping[int, float], x: float) -> int | None:
    """The first step at which the target accuracy is >= x (None: never)."""
    return next((step for step in sorted(history) if history[step] >= x), None)


def at_matched_accuracy(
    histories: Mapping[str, Mapping[int, float]],
    measures: Mapping[str, Mapping[str, Mapping[int, float]]],
    x: float,
) -> dict[str, dict[str, float | int | None]]:
    """Per arm (or run): the first step where its target accuracy reaches x, and each of its other measures read
    at exactly that step. `histories[arm]` maps step -> target accuracy; `measures[arm][name]` maps step -> value.
    An arm that never reaches x gets step None and every measure None; a measure not recorded at that step is None
    (never taken from another step: the point is to compare at the same accuracy)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for arm, history in histories.items():
        step = first_step_reaching(history, x)
        row: dict[str, float | int | None] = {"step": step, "target": None if step is None else history[step]}
        for name, series in measures.get(arm, {}).items():
            row[name] = None if step is None else series.get(step)
        out[arm] = row
    return out

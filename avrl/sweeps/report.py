"""The ablation report of a sweep, written at the end of every multirun (avrl/sweeps/parent_run.py) and again with
`python -m avrl.sweeps.report SWEEP_DIR` (the tracking URI is the one the sweep recorded in its folder).

Into the sweep folder and onto the parent MLflow run (artifacts under report/):
- report.md: one row per arm — the runs that differ only by seed (`seeds=N`, or `seed=1,2,3`), one FINISHED run per
  arm and seed (the newest; failed, killed, running and superseded runs are listed apart) — with the mean and a
  95% t-interval over seeds of the final model's accuracy in distribution (val), out of distribution (val_ood),
  with the audio muted (val_muted), the audio reliance (val - muted) and the accuracy per category; then paired
  comparisons of every arm with the first on the same evaluation items (a bootstrap over seeds and items of the
  difference in seed-averaged correctness: a difference whose 95% interval holds 0 is reported as not
  significant); then one row per run.
- val_accuracy.png: val/accuracy against step, one line per arm (the mean over seeds) in a band (the table's
  interval); accuracy_reward.png, format_reward.png, completion_length.png: the RL runs' training curves (EchoInk-R1's
  figure), drawn the same way; optuna_trials.png for an Optuna study: the objective by trial and the best so far.
- what training cost (docs/sweeps.md): KL(base || tuned), pass@k, completion tokens, parameters changed and update
  norm as columns; the sweep's base row (avrl/sweeps/base_row.py, on the parent run) as its own table and
  retention (each benchmark's change from it); run-level measures compared by Welch t-intervals over seeds; the
  table at matched accuracy (the first validation where each run reaches final_eval.matched_accuracy);
  kl_vs_target.png and retention_vs_target.png;
- on the parent run, the arm table as metrics, sweep/<metric>/<arm> mean, ... mean lower95, ... mean upper95 (the
  interval's bounds; fractions, as the runs log them): the MLflow UI charts the comparison on the collapsed sweep,
  a section per column of the table; on each child, tag in_report (true: one of the runs the statistics use).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import Metric
from omegaconf import OmegaConf
from scipy.stats import t

from avrl import measures
from avrl.atomic import write_atomic  # noqa: E402
from avrl.final_eval import FILE
from avrl.sweeps.base_row import BASE_ARM, base_metrics
from avrl.tracking import PARENT_RUN_FILE, TRACKING_URI_FILE  # noqa: E402
from avrl.versions import TAG_PREFIX  # noqa: E402

CURVES = {  # file: (metric, y axis, scale to its unit)
    "val_accuracy.png": ("val/accuracy", "val/accuracy, greedy (% of items correct)", 100),
    "accuracy_reward.png": ("train/rewards/accuracy/mean", "accuracy reward (mean over completions)", 1),
    "format_reward.png": ("train/rewards/format/mean", "format reward (mean over completions)", 1),
    "completion_length.png": ("train/completions/mean_length", "completion length (tokens, mean)", 1),
}
STEP_AXIS = "training step (optimizer updates)"
COLUMNS = (
    ("val/accuracy", "in-distribution"),
    ("val_ood/accuracy", "out-of-distribution"),
    ("val_muted/accuracy", "audio muted"),
    ("val/audio_reliance", "audio reliance"),
)
BOOTSTRAP_SAMPLES = 10_000
# A benchmark the final evaluation scored (avrl/final_eval.py): its official figure, or MMAU-Pro's string rule.
BENCHMARK_COLUMN = re.compile(r"^eval/([^/]+)/(string_rule/|official/)?accuracy$")


def child_runs(client, parent_id: str):
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return parent, sorted(runs, key=lambda r: r.info.start_time)


def arm_of(run) -> str:
    return run.data.tags.get("arm") or run.info.run_name


def seed_of(run) -> str:
    return run.data.tags.get("seed") or run.data.params.get("seed", "")


def one_run_per_cell(runs) -> tuple[list, list[tuple[object, str]]]:
    """The runs the statistics use — one FINISHED run per cell (arm and seed), the newest when a cell was run again —
    and the others with why they are left out (their status, or superseded): a failed attempt, a pruned trial or a
    re-run is never pooled as one more seed."""
    newest: dict[tuple[str, str], object] = {}
    for r in runs:
        if r.info.status == "FINISHED":
            cell = (arm_of(r), seed_of(r))
            if cell not in newest or r.info.start_time >= newest[cell].info.start_time:
                newest[cell] = r
    kept = {r.info.run_id for r in newest.values()}
    left_out = []
    for r in runs:
        if r.info.run_id in kept:
            continue
        if r.info.status == "FINISHED":
            why = f"superseded by {newest[(arm_of(r), seed_of(r))].info.run_name} (newer)"
        else:  # (SCHEDULED: stopped by a signal, to be resumed)
            why = {"RUNNING": "still running", "SCHEDULED": "waiting to resume"}.get(r.info.status, "did not finish")
            why += f" (Optuna: {r.data.tags['optuna_state']})" if "optuna_state" in r.data.tags else ""
        left_out.append((r, why))
    return [r for r in runs if r.info.run_id in kept], left_out


def arms(runs) -> dict[str, list]:
    """Runs grouped by their `arm` tag (what they are but the seed), in order of first appearance."""
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(arm_of(r), []).append(r)
    return groups


def arm_labels(groups: dict[str, list]) -> dict[str, str]:
    """Each arm's label without the parts every arm shares (e.g. the prompt, or sweep=rl_vs_sft in an older run's
    overrides): what tells them apart. Labels are "a · b · c" (avrl/tracking.py), older ones overrides."""
    sep = " · " if all(" · " in arm or "=" not in arm for arm in groups) else " "
    parts = {arm: arm.split(sep) for arm in groups}
    common = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    return {arm: sep.join(p for p in parts[arm] if p not in common) or arm for arm in groups}


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Column:
    """One column of the arm table: a run's value (a metric, or one derived from it and the base row), its header,
    the factor to its unit (100: fractions shown in %) and the digits shown."""

    key: str
    header: str
    scale: float = 100
    digits: int = 2


# What training cost (avrl/final_eval.py, final/...), each a column when a run logged it.
COST_COLUMNS = (
    Column("final/kl_k3", "KL(base‖tuned)/token (k3)", 1, 4),
    Column("final/completion_tokens", "completion tokens", 1, 1),
    Column("final/params_changed_share", "params changed (%)", 100, 2),
    Column("final/update_norm", "update norm", 1, 4),
)
PASS_AT_K = re.compile(r"^final/pass_at_(\d+)$")
OOD_SHIFT = re.compile(r"^val_ood_([^/]+)/accuracy$")  # final_eval.ood_shifts: one OOD split per shift


def run_values(run, base=None) -> dict[str, float]:
    """A run's metrics and the values derived from them and the base row: `retention/<benchmark>`, the change of
    the benchmark's accuracy from the base's on the same items (negative: forgotten), and `retention`, their mean
    over the benchmarks (each weighted equally)."""
    values = dict(run.data.metrics)
    if base is None:
        return values
    changes = []
    for key, before in base.data.metrics.items():
        match = BENCHMARK_COLUMN.match(key)
        if match and values.get(key) is not None and values[key] == values[key]:
            values[f"retention/{match.group(1)}"] = values[key] - before
            changes.append(values[key] - before)
    if changes:
        values["retention"] = statistics.fmean(changes)
    return values


def arm_columns(runs, base=None) -> list[Column]:
    """The arm table's columns: the conditions, val/accuracy per category, what training cost (KL, pass@1 and
    pass@k at the largest k, completion length, parameters changed, update norm; where logged), then one per
    benchmark the final evaluation ran (`final_eval.benchmarks`): its official figure `eval/<benchmark>/accuracy`,
    or MMAU-Pro's closed-ended accuracy (`eval/mmau_pro/official/accuracy` by its embedding matcher, or
    `eval/mmau_pro/string_rule/accuracy`, headed "not official"); with a base row, the retention on each benchmark
    (the change from the base) and their mean."""
    keys = {k for r in runs for k in r.data.metrics}
    categories = sorted({k.split("/")[-1] for k in keys if k.startswith("val/accuracy/")})
    benchmarks = sorted(k for k in keys if BENCHMARK_COLUMN.match(k))
    ks = sorted(int(m.group(1)) for k in keys if (m := PASS_AT_K.match(k)))
    costs = [c for c in COST_COLUMNS if c.key in keys]
    passes = [Column(f"final/pass_at_{k}", f"pass@{k}") for k in dict.fromkeys([ks[0], ks[-1]] if ks else [])]
    retained = []
    if base is not None:
        names = [BENCHMARK_COLUMN.match(k).group(1) for k in benchmarks if k in base.data.metrics]
        retained = [Column(f"retention/{n}", f"retention {n} (Δ vs base)") for n in names]
        retained += [Column("retention", "retention (mean Δ)")] if len(names) > 1 else []
    shifts = sorted(m.group(1) for k in keys if (m := OOD_SHIFT.match(k)))
    return [
        *(Column(key, label) for key, label in COLUMNS[:2]),
        *(c for s in shifts for c in _shift_columns(s, keys)),
        *(Column(key, label) for key, label in COLUMNS[2:]),
        *(Column(f"val/accuracy/{c}", c) for c in categories),
        *costs[:1],
        *passes,
        *costs[1:],
        *(Column(k, benchmark_header(k)) for k in benchmarks),
        *retained,
    ]


def _shift_columns(shift: str, keys: set[str]) -> list[Column]:
    """An OOD shift's accuracy and, where scored, its format rate beside it (a shift that breaks the answer format
    measures format collapse, not generalisation: docs/toy_world.md)."""
    columns = [Column(f"val_ood_{shift}/accuracy", f"OOD {shift}")]
    if f"val_ood_{shift}/format" in keys:
        columns.append(Column(f"val_ood_{shift}/format", f"OOD {shift} format"))
    return columns


def benchmark_header(key: str) -> str:
    name, rule = BENCHMARK_COLUMN.match(key).groups()
    return f"{name} (string rule, not official)" if rule == "string_rule/" else name


def arm_statistics(groups: dict[str, list], base=None) -> dict[str, dict[str, dict]]:
    """arm -> column key -> {mean, ci_low, ci_high, seeds} over the arm's runs that logged it (no bounds for a
    single seed)."""
    columns = arm_columns([r for rs in groups.values() for r in rs], base)
    out: dict[str, dict[str, dict]] = {}
    for arm, rs in groups.items():
        out[arm] = {}
        values_of = [run_values(r, base) for r in rs]
        for column in columns:
            values = [v for vs in values_of if (v := vs.get(column.key)) is not None and v == v]
            if not values:
                continue
            mean, half = mean_interval(values)
            bounds = {} if half is None else {"ci_low": mean - half, "ci_high": mean + half}
            out[arm][column.key] = {"mean": mean, **bounds, "seeds": len(values)}
    return out


def _cell(stat: dict | None, scale: float = 100, digits: int = 2) -> str:
    if not stat:
        return ""
    if "ci_low" not in stat:
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * (stat['ci_high'] - stat['mean']):.{digits}f}"


def arm_table(groups: dict[str, list], base=None) -> str:
    """One row per arm: mean ± 95% t-interval over seeds (with a base row, its retention columns too)."""
    columns = arm_columns([r for rs in groups.values() for r in rs], base)
    lines = _header(columns)
    labels, stats = arm_labels(groups), arm_statistics(groups, base)
    for arm, rs in groups.items():
        tags = rs[0].data.tags
        cells = [labels[arm], tags.get("algorithm", ""), tags.get("prompt", ""), str(len(rs))]
        cells += [_cell(stats[arm].get(c.key), c.scale, c.digits) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def base_table(groups: dict[str, list], base) -> str:
    """The base row under the arm table's columns: one greedy evaluation (no interval, no cost against itself)."""
    columns = arm_columns([r for rs in groups.values() for r in rs], base)
    cells = ["base (not trained)", "—", base.data.tags.get("prompt", ""), "—"]
    cells += [_cell({"mean": v}, c.scale, c.digits) if (v := base.data.metrics.get(c.key)) is not None else ""
              for c in columns]  # fmt: skip
    return "\n".join([*_header(columns), "| " + " | ".join(cells) + " |"]) + "\n"


def _header(columns: list[Column]) -> list[str]:
    header = ["arm", "method", "prompt", "seeds", *(c.header for c in columns)]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def parent_metrics(groups: dict[str, list], base=None) -> dict[str, float]:
    """The arm table as metrics for the parent run: sweep/<metric>/<arm> mean, ... mean lower95, ... mean upper95,
    and the base row's values as sweep/<metric>/base. The MLflow UI puts the charts of keys that share all but their
    last part in one section (one per column of the report), in the order of their names (an arm's mean, then its
    bounds)."""
    labels, out = arm_labels(groups), {}
    names = {"mean": "mean", "ci_low": "mean lower95", "ci_high": "mean upper95"}
    for arm, by_metric in arm_statistics(groups, base).items():
        name = re.sub(r"[^\w.\- :]", "", labels[arm].replace(" · ", " "))  # the characters MLflow takes in a key
        for key, stat in by_metric.items():
            out.update({f"sweep/{key}/{name} {names[s]}": stat[s] for s in names if s in stat})
    if base is not None:
        keys = {c.key for c in arm_columns([r for rs in groups.values() for r in rs], base)}
        out.update({f"sweep/{k}/{BASE_ARM}": v for k, v in base.data.metrics.items() if k in keys})
    return out


def left_out_table(left_out) -> str:
    """Markdown: the runs the statistics leave out, with why."""
    lines = ["| run | arm | seed | status | left out because |", "|---|---|---|---|---|"]
    for r, why in left_out:
        lines.append(f"| {r.info.run_name} | {arm_of(r)} | {seed_of(r)} | {r.info.status} | {why} |")
    return "\n".join(lines) + "\n"


def run_table(runs, prefix: str = "val") -> str:
    """Markdown: one row per run, accuracy per category (in %) and the average over all items."""
    categories = sorted({k.split("/")[-1] for r in runs for k in r.data.metrics if k.startswith(f"{prefix}/accuracy/")})
    header = ["run", "method", "prompt", "seed", *categories, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        m, t = r.data.metrics, r.data.tags
        cells = [r.info.run_name, t.get("algorithm", ""), t.get("prompt", ""), seed_of(r)]
        cells += [_pct(m.get(f"{prefix}/accuracy/{c}")) for c in categories]
        cells.append(_pct(m.get(f"{prefix}/accuracy")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment_table(runs) -> str:
    """Markdown: the versions each run recorded (avrl/versions.py), one row per package; where the runs disagree
    the row lists each value with its number of runs, marked, since their figures may not be comparable."""
    names = sorted(
        {k[len(TAG_PREFIX) :] for r in runs for k in r.data.tags if k.startswith(TAG_PREFIX)},
        key=lambda n: ({"python": 0, "avrl": 1}.get(n, 2), n),
    )
    if not names:
        return ""
    lines = ["| package | version |", "|---|---|"]
    for name in names:
        counts: dict[str, int] = {}
        for r in runs:
            value = r.data.tags.get(TAG_PREFIX + name, "absent")
            counts[value] = counts.get(value, 0) + 1
        cell = (
            next(iter(counts))
            if len(counts) == 1
            else "**differs:** " + ", ".join(f"{value} ({n} runs)" for value, n in counts.items())
        )
        lines.append(f"| {name} | {cell} |")
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def paired_bootstrap(a: list[dict[str, float]], b: list[dict[str, float]], seed: int = 0) -> dict | None:
    """Arm b minus arm a on the items every run of both scored, each arm given as its runs' {item: correct}.
    The mean difference of the seed-averaged correctness, and its 95% percentile interval from a two-level
    bootstrap: each resample draws every arm's seeds (with replacement) and the items (with replacement), so the
    interval holds both the item sampling and the seed-to-seed variation. One seed per arm: items only."""
    if not a or not b:
        return None
    items = sorted(set.intersection(*(set(run) for run in a + b)))
    if len(items) < 2:
        return None
    A = np.array([[run[i] for i in items] for run in a])  # (seeds of a, items)
    B = np.array([[run[i] for i in items] for run in b])
    rng = np.random.default_rng(seed)
    S, n = BOOTSTRAP_SAMPLES, len(items)
    a_means = A[rng.integers(0, len(A), size=(S, len(A)))].mean(axis=1)  # (S, items): seeds resampled
    b_means = B[rng.integers(0, len(B), size=(S, len(B)))].mean(axis=1)
    pick = rng.integers(0, n, size=(S, n))
    means = (np.take_along_axis(b_means, pick, 1) - np.take_along_axis(a_means, pick, 1)).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "items": n,
        "seeds": [len(A), len(B)],
        "difference": float((B.mean(0) - A.mean(0)).mean()),
        "low": float(low),
        "high": float(high),
        "significant": bool(low > 0 or high < 0),
    }


def per_item(client, run) -> dict[str, dict[str, float]]:
    """The run's final_eval.json (condition -> item id -> correct), or {} when it has none."""
    local = Path(run.data.tags.get("output_dir", "")) / FILE
    if local.exists():
        return json.loads(local.read_text())
    try:  # (MLflow draws a progress bar per file downloaded from a server: one per run, in the sweep's console)
        with tempfile.TemporaryDirectory() as tmp, _without_progress_bar():
            return json.loads(Path(client.download_artifacts(run.info.run_id, FILE, tmp)).read_text())
    except Exception:  # an older run, or one that failed before its final evaluation
        return {}


@contextlib.contextmanager
def _without_progress_bar():
    """MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=0 for the duration (MLflow reads it at each download)."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


PAIRED_CONDITIONS = (
    ("val", "in-distribution"),
    ("val_ood", "out-of-distribution"),
    ("val_muted", "audio muted"),
)
# Run-level measures (one number per run, no items to pair on): compared over seeds.
WELCH_COLUMNS = (
    Column("final/kl_k3", "KL(base‖tuned)/token (k3)", 1, 4),
    Column("final/completion_tokens", "completion tokens", 1, 1),
    Column("final/params_changed_share", "params changed (%)", 100, 2),
    Column("final/update_norm", "update norm", 1, 4),
)


def paired_conditions(files: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """The per-item conditions of final_eval.json the report compares: val, OOD (and each OOD shift), muted audio,
    each benchmark (its accuracy difference is the retention difference: both arms' changes are from the same
    base) and pass@k."""
    keys = {k for runs in files.values() for f in runs for k in f}
    found = [(c, label) for c, label in PAIRED_CONDITIONS[:2] if c in keys]
    found += [(k, f"OOD {k.removeprefix('val_ood_')}") for k in sorted(keys) if k.startswith("val_ood_")]
    found += [(c, label) for c, label in PAIRED_CONDITIONS[2:] if c in keys]
    found += [(k, f"retention {k.removeprefix('eval/')}") for k in sorted(keys) if k.startswith("eval/")]
    ks = sorted(int(k.removeprefix("pass_at_")) for k in keys if re.fullmatch(r"pass_at_\d+", k))
    return found + [(f"pass_at_{k}", f"pass@{k}") for k in ks]


def comparisons(client, groups: dict[str, list]) -> tuple[str, list[dict]]:
    names, labels = list(groups), arm_labels(groups)
    files = {arm: [per_item(client, r) for r in runs] for arm, runs in groups.items()}  # each read once

    def items(arm: str, condition: str) -> list[dict[str, float]]:
        """The arm's runs' {item: correct} for a condition (runs without a final evaluation are left out)."""
        return [f[condition] for f in files[arm] if f.get(condition)]

    lines, rows = [], []
    for condition, label in paired_conditions(files):
        for other in names[1:]:
            result = paired_bootstrap(items(names[0], condition), items(other, condition))
            if result is None:
                continue
            rows.append({"condition": condition, "a": names[0], "b": other, **result})
            verdict = "significant" if result["significant"] else "not significant"
            lines.append(
                f"| {label} | {labels[other]} − {labels[names[0]]} | {result['items']} | "
                f"{'/'.join(map(str, result['seeds']))} | {100 * result['difference']:+.2f} | "
                f"[{100 * result['low']:+.2f}, {100 * result['high']:+.2f}] | {verdict} |"
            )
    if not lines:
        return "", rows
    head = [
        "| items | comparison | n items | seeds | difference (points) | 95% interval (paired bootstrap over "
        "seeds and items) | at 5% |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n", rows


def welch_interval(a: list[float], b: list[float]) -> dict | None:
    """mean(b) - mean(a) and its 95% Welch t-interval (unequal variances, Welch-Satterthwaite degrees of freedom);
    None without two values on each side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference = statistics.fmean(b) - statistics.fmean(a)
    if va + vb == 0:
        return {"difference": difference, "low": difference, "high": difference, "df": math.inf,
                "significant": difference != 0}  # fmt: skip
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(t.ppf(0.975, df)) * math.sqrt(va + vb)
    low, high = difference - half, difference + half
    return {"difference": difference, "low": low, "high": high, "df": df, "significant": bool(low > 0 or high < 0)}


def run_level_comparisons(groups: dict[str, list]) -> tuple[str, list[dict]]:
    """Each arm against the first on the measures that are one number per run (KL, completion length, parameters
    changed, update norm): the difference of the seed means and its Welch t-interval over seeds."""
    names, labels = list(groups), arm_labels(groups)
    lines, rows = [], []
    for column in WELCH_COLUMNS:
        per_arm = {arm: [v for r in rs if (v := r.data.metrics.get(column.key)) is not None and v == v]
                   for arm, rs in groups.items()}  # fmt: skip
        for other in names[1:]:
            result = welch_interval(per_arm[names[0]], per_arm[other])
            if result is None:
                continue
            rows.append({"measure": column.key, "a": names[0], "b": other, **result})
            s, d = column.scale, column.digits
            lines.append(
                f"| {column.header} | {labels[other]} − {labels[names[0]]} | "
                f"{len(per_arm[names[0]])}/{len(per_arm[other])} | {s * result['difference']:+.{d}f} | "
                f"[{s * result['low']:+.{d}f}, {s * result['high']:+.{d}f}] | "
                f"{'significant' if result['significant'] else 'not significant'} |"
            )
    if not lines:
        return "", rows
    head = [
        "| measure | comparison | seeds | difference | 95% interval (Welch t over seeds) | at 5% |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n", rows


def save_figure(fig, ax, path: Path) -> None:
    """Every report plot's ending: the legend, a tight layout, the PNG at 100 dpi (the caller closes the figure)."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot(client, groups: dict[str, list], metric: str, ylabel: str, scale: float, path: Path) -> list[str]:
    """One line per arm: the mean over its seeds at each step, in a band of the 95% t-interval (the arm table's).
    The legend's labels; none (and no file) when no run logged `metric`."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    labels, drawn = arm_labels(groups), []
    for arm, runs in groups.items():
        at_step: dict[int, list[float]] = {}
        for r in runs:
            last = {
                h.step: h.value
                for h in sorted(client.get_metric_history(r.info.run_id, metric), key=lambda h: (h.step, h.timestamp))
            }
            for step, value in last.items():
                if value == value:
                    at_step.setdefault(step, []).append(value)
        if not at_step:
            continue
        steps = sorted(at_step)
        stats = [mean_interval(at_step[s]) for s in steps]
        mean = scale * np.array([m for m, _ in stats])
        half = scale * np.array([np.nan if h is None else h for _, h in stats])
        seeds = max(len(v) for v in at_step.values())
        drawn.append(f"{labels[arm]} ({seeds} seed{'s' * (seeds > 1)})")
        (line,) = ax.plot(steps, mean, marker=".", label=drawn[-1])
        ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
    if drawn:
        ax.set(xlabel=STEP_AXIS, ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title("mean over seeds; band: 95% t-interval over seeds", fontsize=9)
        save_figure(fig, ax, path)
    plt.close(fig)
    return drawn


# The measures read at validation steps (avrl/cost_callback.py logs them during training) and at the end
# (avrl/final_eval.py): (history during training, final metric). A benchmark's accuracy: val_eval/<b>/accuracy
# during training, eval/<b>/accuracy at the end.
KL_SERIES = ("val/kl_k3", "final/kl_k3")
TARGET = "val/accuracy"


def history(client, run, metric: str) -> dict[int, float]:
    """step -> the metric's last value logged at that step (NaN left out)."""
    points = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda h: (h.step, h.timestamp))
    return {h.step: h.value for h in points if h.value == h.value}


def series(client, run, during: str, final: str) -> dict[int, float]:
    """A measure by step: its values at validations, the final evaluation's at the last step."""
    return {**history(client, run, during), **history(client, run, final)}


def retention_series(client, run, base) -> dict[int, float]:
    """step -> the mean over the base row's benchmarks of (accuracy - the base's): retention at each step where
    every benchmark was scored."""
    names = [m.group(1) for k in base.data.metrics if (m := BENCHMARK_COLUMN.match(k)) and not m.group(2)]
    if not names:
        return {}
    per = [series(client, run, f"val_eval/{n}/accuracy", f"eval/{n}/accuracy") for n in names]
    steps = set.intersection(*(set(p) for p in per))
    return {
        s: statistics.fmean(p[s] - base.data.metrics[f"eval/{n}/accuracy"] for p, n in zip(per, names, strict=True))
        for s in sorted(steps)
    }


def run_series(client, groups: dict[str, list], base=None) -> dict[str, dict[str, dict[int, float]]]:
    """run id -> {target, kl, retention, ood}: each a step -> value map, read once for the plots and the matched
    table."""
    out = {}
    for runs in groups.values():
        for r in runs:
            out[r.info.run_id] = {
                "target": history(client, r, TARGET),
                "kl": series(client, r, *KL_SERIES),
                "retention": retention_series(client, r, base) if base is not None else {},
                "ood": history(client, r, "val_ood/accuracy"),
            }
    return out


def plot_versus(groups: dict[str, list], per_run: dict, measure: str, ylabel: str, scale: float, path: Path) -> list:
    """Per arm, the measure against the target accuracy at each step where both were logged (the mean over seeds
    at that step), a line in step order: how far each arm moved (KL) or what it forgot (retention) for what it
    learnt. Returns the arms drawn; none (and no file) when no run logged the measure."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    labels, drawn = arm_labels(groups), []
    for arm, runs in groups.items():
        at_step: dict[int, list[tuple[float, float]]] = {}
        for r in runs:
            target, values = per_run[r.info.run_id]["target"], per_run[r.info.run_id][measure]
            for step in sorted(set(target) & set(values)):
                at_step.setdefault(step, []).append((target[step], values[step]))
        if not at_step:
            continue
        steps = sorted(at_step)
        x = [100 * statistics.fmean(p[0] for p in at_step[s]) for s in steps]
        y = [scale * statistics.fmean(p[1] for p in at_step[s]) for s in steps]
        ax.plot(x, y, marker="o", label=f"{labels[arm]} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        drawn.append(labels[arm])
    if drawn:
        ax.set(xlabel="target: val/accuracy (%)", ylabel=ylabel)
        ax.set_title("mean over seeds at each validation step (line in step order)", fontsize=9)
        save_figure(fig, ax, path)
    plt.close(fig)
    return drawn


def matched_accuracy(groups: dict[str, list], per_run: dict, x: float) -> tuple[dict, list]:
    """At matched accuracy: per arm, the runs that reached val/accuracy >= x at a validation, with the first such
    step and the measures read at exactly that step (measures.at_matched_accuracy); the runs that never reached it,
    listed (never imputed). Returns (arm -> {reached, runs, step, <measure>: {mean, ci_low, ci_high, seeds}}, the
    (arm, run) pairs that never reached x)."""
    table, never = {}, []
    names = ("target", "kl", "retention", "ood")
    for arm, runs in groups.items():
        found = measures.at_matched_accuracy(
            {r.info.run_id: per_run[r.info.run_id]["target"] for r in runs},
            {r.info.run_id: {n: per_run[r.info.run_id][n] for n in names[1:]} for r in runs},
            x,
        )
        reached = [row for row in found.values() if row["step"] is not None]
        never += [(arm, r) for r in runs if found[r.info.run_id]["step"] is None]
        stats = {"reached": len(reached), "runs": len(runs)}
        for name in ("step", *names):
            values = [float(row[name]) for row in reached if row.get(name) is not None]
            if values:
                mean, half = mean_interval(values)
                stats[name] = {"mean": mean, "seeds": len(values)}
                if half is not None:
                    stats[name].update(ci_low=mean - half, ci_high=mean + half)
        table[arm] = stats
    return table, never


def matched_table(groups: dict[str, list], table: dict, never: list, x: float) -> str:
    """Markdown: the matched-accuracy table (mean ± 95% t over the runs that reached x) and the runs that did not."""
    labels = arm_labels(groups)
    header = ["arm", "runs at X", "first step", "val/accuracy there", "KL(base‖tuned)/token (k3)",
              "retention (mean Δ)", "out-of-distribution"]  # fmt: skip
    lines = [f"X = {100 * x:g}% val/accuracy.\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, stats in table.items():
        cells = [labels[arm], f"{stats['reached']} of {stats['runs']}", _cell(stats.get("step"), 1, 0)]
        cells += [_cell(stats.get("target")), _cell(stats.get("kl"), 1, 4), _cell(stats.get("retention"))]
        cells.append(_cell(stats.get("ood")))
        lines.append("| " + " | ".join(cells) + " |")
    if never:
        lines.append("\nNever reached X (left out of this table, not imputed): ")
        lines[-1] += ", ".join(f"{r.info.run_name} ({labels[arm]})" for arm, r in never)
    return "\n".join(lines) + "\n"


def plot_study(runs, direction: str, path: Path) -> list[tuple[int, float]]:
    """An Optuna study's runs (param `trial`, tag optuna_state): each completed trial's objective, the pruned ones'
    value when they stopped, and the best so far, which it returns as (trial, value in the axis' unit); none (and
    no file) without a completed trial."""
    trials = sorted((int(r.data.params["trial"]), r) for r in runs if r.data.params.get("trial", "None") != "None")
    objective = next((r.data.params.get("objective") for _, r in trials), None) or "val/accuracy"
    scale, unit = (100, "%") if objective.endswith("accuracy") else (1, "as logged")

    def points(state: str):
        found = [
            (n, scale * r.data.metrics[objective])
            for n, r in trials
            if r.data.tags.get("optuna_state") == state and objective in r.data.metrics
        ]
        return [n for n, _ in found], [v for _, v in found]

    done, pruned = points("COMPLETE"), points("PRUNED")
    if not done[0]:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(*done, "o", label="completed trial")
    if pruned[0]:
        ax.plot(*pruned, "x", color="grey", label="pruned trial (value when stopped)")
    best = (np.maximum if direction == "maximize" else np.minimum).accumulate(done[1])
    ax.step(done[0], best, where="post", label=f"best so far ({direction})")
    ax.set(xlabel="trial number", ylabel=f"{objective} ({unit})")
    ax.set_title("Optuna study: the objective of each trial's final model", fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    save_figure(fig, ax, path)
    plt.close(fig)
    return list(zip(done[0], best.tolist(), strict=True))


def study_direction(sweep_dir: Path) -> str:
    """The study's direction, from the sweep's multirun.yaml (Optuna's default, maximize, without it)."""
    path = sweep_dir / "multirun.yaml"
    return str(OmegaConf.load(path).hydra.sweeper.get("direction", "maximize")) if path.exists() else "maximize"


def base_row(parent):
    """The sweep's base row (avrl/sweeps/base_row.py: the base model's metrics on the parent run, base/<metric>) as
    a run-like record with the metrics under a trained run's names, or None when the sweep has none."""
    metrics = base_metrics(parent)
    if not metrics:
        return None
    tags = {"prompt": parent.data.tags.get("base_prompt", ""), "model": parent.data.tags.get("base_model", "")}
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags=tags, params={}))


def matched_x(sweep_dir: Path) -> float:
    """final_eval.matched_accuracy from the sweep's multirun.yaml (0.9 without it)."""
    path = sweep_dir / "multirun.yaml"
    found = OmegaConf.select(OmegaConf.load(path), "final_eval.matched_accuracy") if path.exists() else None
    return 0.9 if found is None else float(found)


def write_report(sweep_dir: str | Path, tracking_uri: str | None = None, matched: float | None = None) -> list[Path]:
    sweep_dir = Path(sweep_dir)
    id_file = sweep_dir / PARENT_RUN_FILE
    if not id_file.exists():
        raise FileNotFoundError(f"{id_file} not found: is {sweep_dir} the folder of a multirun logged to MLflow?")
    client = mlflow.tracking.MlflowClient(tracking_uri or recorded_tracking_uri(sweep_dir))
    parent, every_run = child_runs(client, id_file.read_text().strip())
    if not every_run:
        raise ValueError(f"the sweep's parent run {parent.info.run_id} has no child runs")
    base = base_row(parent)
    runs, left_out = one_run_per_cell(every_run)
    groups = arms(runs)
    paired, rows = comparisons(client, groups)
    run_level, welch_rows = run_level_comparisons(groups)
    x = matched if matched is not None else matched_x(sweep_dir)
    per_run = run_series(client, groups, base)
    matched_stats, never = matched_accuracy(groups, per_run, x)
    text = [
        f"# {parent.info.run_name}\n",
        "Final model of each run; mean ± 95% t-interval over seeds (%). One "
        "FINISHED run per arm and seed (the newest); the others are listed under *Runs left out*.\n",
        arm_table(groups, base),
        "\nColumns (docs/sweeps.md): accuracies and pass@k in %; KL(base‖tuned) per token by Schulman's k3 "
        "estimator on completions sampled from the base (final/kl_k3, each run's standard error in final/kl_k3_se); "
        "params changed: share of fp32 parameter elements with |trained - base| above final_eval.params.threshold; "
        "retention: the change of a benchmark's accuracy from the base row's on the same items"
        + ("" if base is not None else " (no base row in this sweep: no retention)")
        + ".\n",
    ]
    if base is not None:
        text += [
            "\n## The base model (not trained): the base row\n",
            "Evaluated once per sweep (greedy; avrl/sweeps/base_row.py); retention is measured from it.\n",
            base_table(groups, base),
        ]
    if left_out:
        text += [
            "\n## Runs left out (not FINISHED, or superseded by a newer run of the same arm and seed)\n",
            left_out_table(left_out),
        ]
    if paired:
        text += ["\n## Paired comparisons (same items)\n", paired]
    if run_level:
        text += ["\n## Run-level measures against the first arm\n", run_level]
    if any(stats["reached"] for stats in matched_stats.values()) or never:
        text += ["\n## At matched accuracy: the first validation where each run reaches X\n",
                 matched_table(groups, matched_stats, never, x)]  # fmt: skip
    text += ["\n## Runs\n", run_table(runs)]
    environment = environment_table(runs)
    if environment:
        text += ["\n## Environment (the runs' version tags)\n", environment]
    report = sweep_dir / "report.md"
    write_atomic(report, "\n".join(text))
    labels = arm_labels(groups)
    summary = {
        "arms": {labels[arm]: stats for arm, stats in arm_statistics(groups, base).items()},
        "base": None if base is None else dict(base.data.metrics),
        "comparisons": rows,
        "run_level_comparisons": welch_rows,
        "matched_accuracy": {
            "x": x,
            "arms": {labels[arm]: stats for arm, stats in matched_stats.items()},
            "never_reached": [{"arm": labels[arm], "run_name": r.info.run_name} for arm, r in never],
        },
        "left_out": [
            {"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status, "reason": why}
            for r, why in left_out
        ],
    }
    write_atomic(sweep_dir / "report.json", json.dumps(summary, indent=2))
    written = [report, sweep_dir / "report.json"]
    for name, (metric, label, scale) in CURVES.items():
        if plot(client, groups, metric, label, scale, sweep_dir / name):
            written.append(sweep_dir / name)
    versus = {
        "kl_vs_target.png": ("kl", "KL(base‖tuned) per token (k3)", 1),
        "retention_vs_target.png": ("retention", "retention: mean Δ accuracy vs base (points)", 100),
    }
    for name, (measure, label, scale) in versus.items():
        if plot_versus(groups, per_run, measure, label, scale, sweep_dir / name):
            written.append(sweep_dir / name)
    if "optuna_study" in parent.data.tags and plot_study(
        every_run, study_direction(sweep_dir), sweep_dir / "optuna_trials.png"
    ):
        written.append(sweep_dir / "optuna_trials.png")
    log_parent_metrics(client, parent.info.run_id, parent_metrics(groups, base))
    # The MLflow UI's Group by pools every child of an arm; filtering on tags.in_report = "true" gives it the
    # report's runs.
    for run, flag in [*((r, "true") for r in runs), *((r, "false") for r, _ in left_out)]:
        if run.data.tags.get("in_report") != flag:
            client.set_tag(run.info.run_id, "in_report", flag)
    for path in written:
        client.log_artifact(parent.info.run_id, str(path), "report")
    return written


def log_parent_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    now = int(time.time() * 1000)
    items = [Metric(key, value, now, 0) for key, value in metrics.items()]
    for start in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=items[start : start + 1000])


def recorded_tracking_uri(sweep_dir: Path) -> str:
    """The tracking URI the sweep logged to (recorded in its folder when it started); else the environment's."""
    path = sweep_dir / TRACKING_URI_FILE
    if path.exists():
        return path.read_text().strip()
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--tracking-uri", help="default: the one the sweep recorded in its folder")
    parser.add_argument("--matched-accuracy", type=float, help="X; default: final_eval.matched_accuracy of the sweep")
    args = parser.parse_args()
    for path in write_report(args.sweep_dir, args.tracking_uri, args.matched_accuracy):
        print(path)


if __name__ == "__main__":
    main()

"""The ablation report of a sweep, written at the end of every multirun (avrl/sweeps/parent_run.py) and again with
`python -m avrl.sweeps.report SWEEP_DIR` (the tracking URI is the one the sweep recorded in its folder).

Into the sweep folder and onto the parent MLflow run (artifacts under report/):
- report.md: one row per arm — the runs that differ only by seed (`seeds=N`, or `seed=1,2,3`) — with the mean and a
  95% t-interval over seeds of the final model's accuracy in distribution (val), out of distribution (val_ood),
  with the audio muted (val_muted), the audio reliance (val - muted) and the accuracy per category; then paired
  comparisons of every arm with the first on the same evaluation items (a bootstrap over seeds and items of the
  difference in seed-averaged correctness: a difference whose 95% interval holds 0 is reported as not
  significant); then one row per run.
- val_accuracy.png: val/accuracy against step for every run; accuracy_reward.png, format_reward.png,
  completion_length.png: the RL runs' training curves (EchoInk-R1's figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from avrl.sweeps.parent_run import PARENT_RUN_FILE, TRACKING_URI_FILE  # noqa: E402
from avrl.versions import TAG_PREFIX  # noqa: E402

CURVES = {
    "val_accuracy.png": ("val/accuracy", "val/accuracy (greedy)"),
    "accuracy_reward.png": ("train/rewards/accuracy/mean", "accuracy reward"),
    "format_reward.png": ("train/rewards/format/mean", "format reward"),
    "completion_length.png": ("train/completions/mean_length", "completion length (tokens)"),
}
COLUMNS = (("val/accuracy", "in-distribution"), ("val_ood/accuracy", "out-of-distribution"),
           ("val_muted/accuracy", "audio muted"), ("val/audio_reliance", "audio reliance"))
BOOTSTRAP_SAMPLES = 10_000


def child_runs(client, parent_id: str):
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return parent, sorted(runs, key=lambda r: r.info.start_time)


def arms(runs) -> dict[str, list]:
    """Runs grouped by their `arm` tag (their overrides without the seed), in order of first appearance."""
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r.data.tags.get("arm") or r.info.run_name, []).append(r)
    return groups


def arm_labels(groups: dict[str, list]) -> dict[str, str]:
    """Each arm's overrides without those every arm shares (e.g. sweep=rl_vs_sft): what tells them apart."""
    parts = {arm: arm.split() for arm in groups}
    common = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    return {arm: " ".join(p for p in parts[arm] if p not in common) or arm for arm in groups}


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def _cell(values: list[float], scale: float = 100) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return ""
    mean, half = mean_interval(values)
    return f"{scale * mean:.2f}" if half is None else f"{scale * mean:.2f} ± {scale * half:.2f}"


def arm_table(groups: dict[str, list]) -> str:
    runs = [r for rs in groups.values() for r in rs]
    categories = sorted({k.split("/")[-1] for r in runs for k in r.data.metrics if k.startswith("val/accuracy/")})
    header = ["arm", "method", "prompt", "seeds", *(label for _, label in COLUMNS), *categories]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    labels = arm_labels(groups)
    for arm, rs in groups.items():
        tags = rs[0].data.tags
        cells = [labels[arm], tags.get("algorithm", ""), tags.get("prompt", ""), str(len(rs))]
        cells += [_cell([r.data.metrics.get(key) for r in rs]) for key, _ in COLUMNS]
        cells += [_cell([r.data.metrics.get(f"val/accuracy/{c}") for r in rs]) for c in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_table(runs, prefix: str = "val") -> str:
    """Markdown: one row per run, accuracy per category (in %) and the average over all items."""
    categories = sorted({k.split("/")[-1] for r in runs for k in r.data.metrics if k.startswith(f"{prefix}/accuracy/")})
    header = ["run", "method", "prompt", "seed", *categories, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        m, t = r.data.metrics, r.data.tags
        cells = [r.info.run_name, t.get("algorithm", ""), t.get("prompt", ""), r.data.params.get("seed", "")]
        cells += [_pct(m.get(f"{prefix}/accuracy/{c}")) for c in categories]
        cells.append(_pct(m.get(f"{prefix}/accuracy")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment_table(runs) -> str:
    """Markdown: the versions each run recorded (avrl/versions.py), one row per package; where the runs disagree
    the row lists each value with its number of runs, marked, since their figures may not be comparable."""
    names = sorted({k[len(TAG_PREFIX):] for r in runs for k in r.data.tags if k.startswith(TAG_PREFIX)},
                   key=lambda n: ({"python": 0, "avrl": 1}.get(n, 2), n))
    if not names:
        return ""
    lines = ["| package | version |", "|---|---|"]
    for name in names:
        counts: dict[str, int] = {}
        for r in runs:
            value = r.data.tags.get(TAG_PREFIX + name, "absent")
            counts[value] = counts.get(value, 0) + 1
        cell = next(iter(counts)) if len(counts) == 1 else "**differs:** " + ", ".join(
            f"{value} ({n} runs)" for value, n in counts.items())
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
    return {"items": n, "seeds": [len(A), len(B)], "difference": float((B.mean(0) - A.mean(0)).mean()),
            "low": float(low), "high": float(high), "significant": bool(low > 0 or high < 0)}


def per_item(client, run) -> dict[str, dict[str, float]]:
    """The run's final_eval.json (condition -> item id -> correct), or {} when it has none."""
    from avrl.final_eval import FILE

    local = Path(run.data.tags.get("output_dir", "")) / FILE
    if local.exists():
        return json.loads(local.read_text())
    try:  # (MLflow draws a progress bar per file downloaded from a server: one per run, in the sweep's console)
        no_bar = mock.patch.dict(os.environ, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="0")
        with tempfile.TemporaryDirectory() as tmp, no_bar:
            return json.loads(Path(client.download_artifacts(run.info.run_id, FILE, tmp)).read_text())
    except Exception:  # an older run, or one that failed before its final evaluation
        return {}


def comparisons(client, groups: dict[str, list]) -> tuple[str, list[dict]]:
    names, labels = list(groups), arm_labels(groups)
    files = {arm: [per_item(client, r) for r in runs] for arm, runs in groups.items()}  # each read once

    def items(arm: str, condition: str) -> list[dict[str, float]]:
        """The arm's runs' {item: correct} for a condition (runs without a final evaluation are left out)."""
        return [f[condition] for f in files[arm] if f.get(condition)]

    lines, rows = [], []
    for condition, label in (("val", "in-distribution"), ("val_ood", "out-of-distribution")):
        for other in names[1:]:
            result = paired_bootstrap(items(names[0], condition), items(other, condition))
            if result is None:
                continue
            rows.append({"condition": condition, "a": names[0], "b": other, **result})
            verdict = "significant" if result["significant"] else "not significant"
            lines.append(f"| {label} | {labels[other]} − {labels[names[0]]} | {result['items']} | "
                         f"{'/'.join(map(str, result['seeds']))} | {100 * result['difference']:+.2f} | "
                         f"[{100 * result['low']:+.2f}, {100 * result['high']:+.2f}] | {verdict} |")
    if not lines:
        return "", rows
    head = ["| items | comparison | n items | seeds | difference (points) | 95% interval (paired bootstrap over "
            "seeds and items) | at 5% |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines) + "\n", rows


def plot(client, runs, metric: str, ylabel: str, path: Path) -> bool:
    """One line per run that logged `metric`; False (and no file) when none did."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for r in runs:
        history = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda h: h.step)
        if history:
            ax.plot([h.step for h in history], [h.value for h in history], label=r.info.run_name, marker=".")
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_report(sweep_dir: str | Path, tracking_uri: str | None = None) -> list[Path]:
    sweep_dir = Path(sweep_dir)
    id_file = sweep_dir / PARENT_RUN_FILE
    if not id_file.exists():
        raise FileNotFoundError(f"{id_file} not found: is {sweep_dir} the folder of a multirun logged to MLflow?")
    client = mlflow.tracking.MlflowClient(tracking_uri or recorded_tracking_uri(sweep_dir))
    parent, runs = child_runs(client, id_file.read_text().strip())
    if not runs:
        raise ValueError(f"the sweep's parent run {parent.info.run_id} has no child runs")
    groups = arms(runs)
    paired, rows = comparisons(client, groups)
    text = [f"# {parent.info.run_name}\n", "Final model of each run; mean ± 95% t-interval over seeds (%).\n",
            arm_table(groups)]
    if paired:
        text += ["\n## Paired comparisons (same items)\n", paired]
    text += ["\n## Runs\n", run_table(runs)]
    environment = environment_table(runs)
    if environment:
        text += ["\n## Environment (the runs' version tags)\n", environment]
    report = sweep_dir / "report.md"
    report.write_text("\n".join(text))
    (sweep_dir / "report.json").write_text(json.dumps({"comparisons": rows}, indent=2))
    written = [report, sweep_dir / "report.json"]
    for name, (metric, label) in CURVES.items():
        if plot(client, runs, metric, label, sweep_dir / name):
            written.append(sweep_dir / name)
    for path in written:
        client.log_artifact(parent.info.run_id, str(path), "report")
    return written


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
    args = parser.parse_args()
    for path in write_report(args.sweep_dir, args.tracking_uri):
        print(path)


if __name__ == "__main__":
    main()

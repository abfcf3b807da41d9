"""The ablation report of a sweep: `python -m avrl.sweeps.report SWEEP_DIR` (the folder of a `python run.py -m ...`).

Reads the sweep's parent MLflow run and its children and writes, into the sweep folder and as artifacts of the
parent run, `report.md` — one row per run in the shape of R1-AQA's table (method, prompt, accuracy per category,
average) — and PNG plots of the training dynamics EchoInk-R1 shows (accuracy reward, format reward, completion
length over steps, one line per run).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402

from avrl.sweeps.parent_run import PARENT_RUN_FILE  # noqa: E402

CURVES = {
    "accuracy_reward.png": ("train/rewards/accuracy/mean", "accuracy reward"),
    "format_reward.png": ("train/rewards/format/mean", "format reward"),
    "completion_length.png": ("train/completions/mean_length", "completion length (tokens)"),
}


def child_runs(client, parent_id: str):
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return parent, sorted(runs, key=lambda r: r.info.start_time)


def table(runs, prefix: str = "val") -> str:
    """Markdown: one row per run, accuracy per category (in %) and the average over all items."""
    categories = sorted({k.split("/")[-1] for r in runs for k in r.data.metrics if k.startswith(f"{prefix}/accuracy/")})
    header = ["run", "method", "prompt", *categories, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        m, t = r.data.metrics, r.data.tags
        cells = [r.info.run_name, t.get("algorithm", ""), t.get("prompt", "")]
        cells += [_pct(m.get(f"{prefix}/accuracy/{c}")) for c in categories]
        cells.append(_pct(m.get(f"{prefix}/accuracy")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def plot(client, runs, metric: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        history = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda h: h.step)
        if history:
            ax.plot([h.step for h in history], [h.value for h in history], label=r.info.run_name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(sweep_dir: str | Path, tracking_uri: str) -> list[Path]:
    sweep_dir = Path(sweep_dir)
    id_file = sweep_dir / PARENT_RUN_FILE
    if not id_file.exists():
        raise FileNotFoundError(f"{id_file} not found: is {sweep_dir} the folder of a multirun logged to MLflow?")
    client = mlflow.tracking.MlflowClient(tracking_uri)
    parent, runs = child_runs(client, id_file.read_text().strip())
    if not runs:
        raise ValueError(f"the sweep's parent run {parent.info.run_id} has no child runs")
    report = sweep_dir / "report.md"
    report.write_text(f"# {parent.info.run_name}\n\n{table(runs)}")
    written = [report]
    for name, (metric, label) in CURVES.items():
        plot(client, runs, metric, label, sweep_dir / name)
        written.append(sweep_dir / name)
    for path in written:
        client.log_artifact(parent.info.run_id, str(path), "report")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db"))
    args = parser.parse_args()
    for path in write_report(args.sweep_dir, args.tracking_uri):
        print(path)


if __name__ == "__main__":
    main()

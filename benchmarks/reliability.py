"""What crash safety costs a training step: `python benchmarks/reliability.py [--out benchmarks/reliability.json]`
(or `python -m benchmarks.reliability`).

- checkpoint: one save of a checkpoint as Lightning writes it (TorchCheckpointIO: into memory, then into the file
  through fsspec) and as avrl does (SafeCheckpointIO: beside the target, fsynced, renamed, the previous kept), for
  the tiny default model's full training state (weights + AdamW moments, ~4 MB) and a 256 MB state; per step at
  the default checkpoint_every_n_steps (50).
- logging: one `log_metrics` of a step's ~20 metrics into a SQLite MLflow store, through MLflow's client and
  through avrl's SpoolingClient (server up), and the cost of spooling a call to disk while the server is away.

Medians over repetitions; the machine is printed with the figures. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPEATS = 15


def median_ms(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def training_state(parameters: int) -> dict:
    moments = {"exp_avg": torch.randn(parameters), "exp_avg_sq": torch.rand(parameters)}
    return {
        "state_dict": {"w": torch.randn(parameters)},
        "global_step": 1,
        "optimizer_states": [{"state": {0: moments}}],
    }


def bench_checkpoint(folder: Path) -> dict:
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from safetensors.torch import load_file

    from avrl.checkpoints import SafeCheckpointIO
    from avrl.config import asset_path

    tiny = sum(t.numel() for t in load_file(Path(asset_path("tiny_qwen2_audio")) / "model.safetensors").values())
    rows = {}
    for name, parameters in (("tiny default model", tiny), ("256 MB state", 256 * 2**20 // 12)):
        state = training_state(parameters)
        row = {"parameters": parameters, "megabytes": round(3 * parameters * 4 / 2**20, 1)}
        for io_name, io in (("lightning_ms", TorchCheckpointIO()), ("avrl_safe_ms", SafeCheckpointIO())):
            row[io_name] = round(median_ms(lambda io=io: io.save_checkpoint(state, folder / "last.ckpt")), 2)
        row["extra_per_step_ms_at_every_50"] = round((row["avrl_safe_ms"] - row["lightning_ms"]) / 50, 3)
        rows[name] = row
    return rows


class ServerAway:
    """An MLflow client whose server has gone: every write fails as an unreachable server's does (reads, such as
    the logger's run look-up, still answer)."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def log_batch(self, *args, **kwargs):
        raise ConnectionError("Connection refused")


def bench_logging(folder: Path) -> dict:
    from lightning.pytorch.loggers import MLFlowLogger

    from avrl import spool

    metrics = {f"train/metric_{k}": float(k) for k in range(20)}
    uri = f"sqlite:///{folder}/mlruns.db"
    direct, spooled, away = (MLFlowLogger(experiment_name="bench", tracking_uri=uri) for _ in range(3))
    spool.attach(spooled, folder / "up", uri)
    away.experiment  # the run exists before the server goes (the logger creates it on first use)
    away._mlflow_client = ServerAway(away._mlflow_client)  # (Lightning's attribute, as spool.attach uses it)
    spool.attach(away, folder / "away", uri)
    steps = iter(range(10**6))
    row = {
        "mlflow_client_ms": median_ms(lambda: direct.log_metrics(metrics, step=next(steps))),
        "spooling_client_up_ms": median_ms(lambda: spooled.log_metrics(metrics, step=next(steps))),
        # the first write finds the server away; the next ones go to the spool without asking it (for 30 s)
        "spooled_to_disk_ms": median_ms(lambda: away.log_metrics(metrics, step=next(steps))),
    }
    return {key: round(value, 2) for key, value in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpus": torch.get_num_threads(),
                "processor": platform.processor() or platform.machine(),
            },
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python benchmarks/reliability.py", *sys.argv[1:]]),
            "checkpoint": bench_checkpoint(Path(tmp)),
            "logging": bench_logging(Path(tmp)),
        }
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Training goes on while the MLflow server is away: what a run sends to it waits on local disk, in order, and is
sent when the server is back, each call once.

`SpoolingClient` stands in for the MlflowClient of a job's logger (avrl/tracking.py). A write (metrics, params,
tags, artifacts, the run's status) that fails because the server cannot be reached is appended to
`<output_dir>/mlflow_spool/calls.jsonl` (an artifact is copied beside it) instead of raising; from then on writes
go straight to the spool, and every PROBE_EVERY_S the server's /health is asked (a 2 s timeout): once it answers,
the spool is sent in order and writes go to the server again. The client's own retries are cut to seconds (an
unreachable server costs a step a few seconds once, not minutes). A run whose server never comes back completes;
`train` then prints where the spool is and the command that sends it:

    python -m avrl.spool <output_dir>/mlflow_spool [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Metric, Param, RunTag

from avrl.atomic import write_atomic
from avrl.redaction import redact
from avrl.tracking import unanswered

log = logging.getLogger(__name__)
WRITES = (
    "log_batch",
    "log_metric",
    "log_param",
    "set_tag",
    "log_artifact",
    "log_table",
    "set_terminated",
    "update_run",
    "delete_tag",
)
PROBE_EVERY_S = 30.0
FOLDER = "mlflow_spool"
CALLS = "calls.jsonl"
# An unreachable server fails a call after ~3 s (2 retries, backoff 1 s) instead of MLflow's 7 retries (minutes).
FAST_FAILING = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def unreachable(error: BaseException) -> bool:
    """Whether an MLflow call failed because the server could not be reached (not because it refused the call)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
            return True
        text = str(seen)
        if "Max retries exceeded" in text or "Connection refused" in text or "Failed to establish" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class SpoolingClient:
    def __init__(self, client, folder: str | Path, tracking_uri: str):
        self._client, self.folder, self.tracking_uri = client, Path(folder), tracking_uri
        self._offline_since: float | None = None
        self._next_probe = 0.0
        if tracking_uri.startswith(("http://", "https://")):
            for key, value in FAST_FAILING.items():
                os.environ.setdefault(key, value)

    @property
    def calls(self) -> Path:
        return self.folder / CALLS

    def pending(self) -> int:
        return sum(1 for _ in self.calls.open()) if self.calls.exists() else 0

    def __getattr__(self, name: str):
        real = getattr(self._client, name)
        if name not in WRITES:
            return real

        def write(*args, **kwargs):
            if self._offline_since is not None and not self._back():
                return self._spool(name, args, kwargs)
            try:
                return real(*args, **kwargs)
            except Exception as error:
                if not unreachable(error):
                    raise
                if self._offline_since is None:
                    self._offline_since = time.monotonic()
                    self._next_probe = self._offline_since + PROBE_EVERY_S
                    log.warning(
                        "MLflow server %s unreachable: training goes on, its logging waits in %s",
                        redact(self.tracking_uri),
                        self.folder,
                    )
                return self._spool(name, args, kwargs)

        return write

    def _back(self) -> bool:
        """Offline: whether the server answers again (asked at most every PROBE_EVERY_S); if so, the spool is
        sent first."""
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_EVERY_S
        if not healthy(self.tracking_uri):
            return False
        sent = replay(self.folder, self._client)
        self._offline_since = None
        log.warning("MLflow server %s is back: %d spooled calls sent", redact(self.tracking_uri), sent)
        return True

    def flush(self) -> bool:
        """At the end of a run: send what is spooled if the server answers; whether nothing is left."""
        if not self.calls.exists():
            return True
        self._next_probe = 0.0
        return self._back() or not self.calls.exists()

    def _spool(self, name: str, args, kwargs) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if name == "log_artifact":  # the file may be gone (a temporary folder) by the time the server is back
            args, kwargs = _keep_artifact(self.folder, list(args), dict(kwargs))
        record = {"call": name, "args": [encode(a) for a in args], "kwargs": {k: encode(v) for k, v in kwargs.items()}}
        with self.calls.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def healthy(tracking_uri: str, timeout: float = 2.0) -> bool:
    return unanswered(tracking_uri, timeout) is None


def encode(value):
    """A call argument as JSON: MLflow's entities by their fields."""
    if isinstance(value, Metric):
        return {"__metric__": [value.key, value.value, value.timestamp, value.step]}
    if isinstance(value, Param):
        return {"__param__": [value.key, value.value]}
    if isinstance(value, RunTag):
        return {"__tag__": [value.key, value.value]}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def _keep_artifact(folder: Path, args: list, kwargs: dict) -> tuple[list, dict]:
    """log_artifact(run_id, local_path, artifact_path=None) with local_path copied into the spool."""
    source = Path(kwargs.pop("local_path") if "local_path" in kwargs else args.pop(1))
    kept = folder / "files" / str(len(list((folder / "files").glob("*"))) if (folder / "files").exists() else 0)
    kept.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, kept / source.name)
    else:
        shutil.copy2(source, kept / source.name)
    return [args[0], str(kept / source.name), *args[1:]], kwargs


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "__metric__" in value:
            return Metric(*value["__metric__"])
        if "__param__" in value:
            return Param(*value["__param__"])
        if "__tag__" in value:
            return RunTag(*value["__tag__"])
        return {k: decode(v) for k, v in value.items()}
    return value


def replay(folder: Path, client) -> int:
    """Send the spooled calls in order; the count sent is recorded after each, so that a replay cut short sends
    the rest next time and none twice. The spool is removed once all are sent."""
    calls, sent_file = folder / CALLS, folder / "sent"
    if not calls.exists():
        return 0
    records = [json.loads(line) for line in calls.read_text().splitlines() if line.strip()]
    sent = int(sent_file.read_text()) if sent_file.exists() else 0
    for k in range(sent, len(records)):
        getattr(client, records[k]["call"])(*decode(records[k]["args"]), **decode(records[k]["kwargs"]))
        write_atomic(sent_file, str(k + 1))
    shutil.rmtree(folder, ignore_errors=True)
    return len(records) - sent


def main() -> None:
    parser = argparse.ArgumentParser(description="Send a run's spooled MLflow calls (avrl/spool.py)")
    parser.add_argument("spool", help="the run's <output_dir>/mlflow_spool folder")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    args = parser.parse_args()

    client = mlflow.tracking.MlflowClient(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    print(f"sent {replay(Path(args.spool), client)} calls")


if __name__ == "__main__":
    main()


def attach(logger, out_dir: Path, tracking_uri: str) -> None:
    """Route the logger's MLflow writes through a SpoolingClient kept in the run's output folder."""
    if logger is not None and not isinstance(logger._mlflow_client, SpoolingClient):  # (Lightning's attribute)
        logger._mlflow_client = SpoolingClient(logger._mlflow_client, Path(out_dir) / FOLDER, tracking_uri)


def finish(logger) -> None:
    """At the end of a run: send what waits; if the server is still away, say where it waits and how to send it."""
    client = getattr(logger, "_mlflow_client", None)
    if not isinstance(client, SpoolingClient) or client.flush():
        return
    uri = redact(client.tracking_uri)
    print(
        f"MLflow server {uri} still unreachable: {client.pending()} calls of this run wait in {client.folder}\n"
        f"  send them when it is back: python -m avrl.spool {client.folder} --tracking-uri {uri}"
    )

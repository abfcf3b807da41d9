"""An MLflow server that goes away mid-run: the calls wait on disk in order and are sent once each when it is back."""

from pathlib import Path

import pytest
import requests
from mlflow.entities import Metric

from avrl import spool


class Server:
    """An MlflowClient stand-in whose server can be down (its calls then fail as requests' do)."""

    def __init__(self):
        self.up, self.received, self.fail_at = True, [], None

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._arrive(("log_batch", run_id, [(m.key, m.value, m.step) for m in metrics]))

    def set_tag(self, run_id, key, value):
        self._arrive(("set_tag", run_id, key, value))

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self._arrive(("log_artifact", run_id, Path(local_path).read_text(), artifact_path))

    def get_run(self, run_id):
        return "a read, never spooled"

    def _arrive(self, call):
        if not self.up or (self.fail_at is not None and len(self.received) == self.fail_at):
            raise requests.exceptions.ConnectionError("Max retries exceeded (Connection refused)")
        self.received.append(call)


@pytest.fixture
def server(monkeypatch):
    server = Server()
    monkeypatch.setattr(spool, "healthy", lambda uri, timeout=2.0: server.up)
    monkeypatch.setattr(spool, "PROBE_EVERY_S", 0.0)
    return server


def metric(step):
    return [Metric("train/loss", float(step), 0, step)]


def test_calls_wait_on_disk_in_order_and_are_sent_once_when_the_server_is_back(tmp_path, server):
    client = spool.SpoolingClient(server, tmp_path / "mlflow_spool", "http://127.0.0.1:1")
    client.log_batch("r", metrics=metric(0))
    server.up = False
    client.log_batch("r", metrics=metric(1))
    artifact = tmp_path / "final_eval.json"
    artifact.write_text("{}")
    client.log_artifact("r", str(artifact))
    artifact.unlink()  # written in a temporary folder that is gone before the server is back
    client.set_tag("r", "best_checkpoint", str(tmp_path))  # a path as a value stays a value
    client.log_batch("r", metrics=metric(2))
    assert client.pending() == 4 and len(server.received) == 1
    assert client.get_run("r") == "a read, never spooled"
    server.up = True
    client.log_batch("r", metrics=metric(3))

    def batch(step):
        return ("log_batch", "r", [("train/loss", float(step), step)])

    assert server.received == [
        batch(0),
        batch(1),
        ("log_artifact", "r", "{}", None),
        ("set_tag", "r", "best_checkpoint", str(tmp_path)),
        batch(2),
        batch(3),
    ]
    assert not (tmp_path / "mlflow_spool").exists() and client.flush()


def test_a_replay_cut_short_sends_the_rest_next_time_and_none_twice(tmp_path, server):
    client = spool.SpoolingClient(server, tmp_path / "mlflow_spool", "http://127.0.0.1:1")
    server.up = False
    for step in range(3):
        client.log_batch("r", metrics=metric(step))
    server.up, server.fail_at = True, 1  # the server fails again after the first replayed call
    with pytest.raises(requests.exceptions.ConnectionError):
        spool.replay(tmp_path / "mlflow_spool", server)
    server.fail_at = None
    assert spool.replay(tmp_path / "mlflow_spool", server) == 2
    assert [call[2][0][2] for call in server.received] == [0, 1, 2]


def test_a_refused_call_is_an_error_not_an_outage(tmp_path, server):
    from mlflow.exceptions import MlflowException

    class Refusing(Server):
        def set_tag(self, run_id, key, value):
            raise MlflowException("INVALID_PARAMETER_VALUE: tag too long")

    client = spool.SpoolingClient(Refusing(), tmp_path / "mlflow_spool", "http://127.0.0.1:1")
    with pytest.raises(MlflowException, match="tag too long"):
        client.set_tag("r", "k", "v")
    assert client.pending() == 0


@pytest.mark.slow
def test_a_run_outlives_its_mlflow_server_going_away_and_coming_back_on_the_same_port(tmp_path):
    """The server is stopped after step 2 and started again (same port, same store) at step 5: the run finishes,
    FINISHED in MLflow, every step of every metric there once, nothing left in the spool."""
    import subprocess
    import sys
    import time

    import mlflow

    from tests.support import finish, start_cli
    from tests.support.services import free_port

    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def serve():
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{tmp_path}/server.db",
                "--serve-artifacts",
                "--artifacts-destination",
                str(tmp_path / "art"),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while not spool.healthy(uri):
            assert server.poll() is None, "mlflow server exited at start"
            time.sleep(0.2)
        return server

    def held(marker, run):
        while not marker.exists():
            assert run.poll() is None, finish(run, check=False)[-3000:]
            time.sleep(0.2)

    server = serve()
    holds = [
        f"+callbacks.{name}.{key}={value}"
        for name, step in (("away", 2), ("back", 5))
        for key, value in (
            ("_target_", "tests.support.hold.HoldAt"),
            ("marker", tmp_path / f"{name}.held"),
            ("release", tmp_path / f"{name}.go"),
            ("step", step),
        )
    ]
    run = start_cli(
        f"hydra.run.dir={tmp_path}/run",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "data.val_size=4",
        "data.batch_size=2",
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=8",
        "trainer.enable_progress_bar=false",
        *holds,
        env={"MLFLOW_TRACKING_URI": uri},
        log=tmp_path / "run.log",
    )
    try:
        held(tmp_path / "away.held", run)
        server.terminate()
        server.wait()
        (tmp_path / "away.go").touch()
        held(tmp_path / "back.held", run)
        server = serve()
        (tmp_path / "back.go").touch()
        console = finish(run)
        client = mlflow.tracking.MlflowClient(uri)
        (found,) = client.search_runs([client.get_experiment_by_name("avrl").experiment_id])
        assert found.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(found.info.run_id, "train/loss"))
        assert steps == list(range(8)), steps
        for key in found.data.metrics:
            history = [m.step for m in client.get_metric_history(found.info.run_id, key)]
            assert len(history) == len(set(history)), key
        assert "unreachable: training goes on" in console and not (tmp_path / "run/mlflow_spool").exists()
    finally:
        server.terminate()
        server.wait()

"""Test support: running the CLI as a user does, reading its MLflow store, composing configs, a real MLflow server.

The support modules (test modules import these; conftest.py holds only pytest hooks and fixtures):
- tests.support           the CLI, MLflow and config helpers below
- tests.support.helpers   shared test data and independent references (AVQA records, MMAU's official rule)
- tests.support.hold      callbacks that hold a run at a step so that a test can kill or signal it there
- tests.support.services  real PostgreSQL and SLURM on localhost
- tests.support.deepspeed_checks  DeepSpeed bodies shared by the CPU and the GPU tiers
- tests.support.load      the artificial CPU load under which the suite is shown not to race the clock
- tests/support/cpu_stubs a sitecustomize that stubs CUDA-only pieces for CPU runs
"""

import contextlib
import os
from pathlib import Path

import avrl.config  # noqa: F401  (registers resolvers)

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
# How long a test waits for a subprocess before calling it hung. Only a guard against hangs: no test's outcome may
# depend on how fast the machine is, and a busy 2-core machine runs the slowest CLI test in well under this.
HANG_GUARD = 1800


def cli_env(tmp_path: Path | None = None, pythonpath: Path | None = None, env: dict | None = None) -> dict:
    """The environment of a CLI run in a test: offline; with `tmp_path` its MLflow store is tmp_path/mlruns.db;
    `pythonpath` is put first on the path; `env` adds (or replaces) variables."""
    out = dict(os.environ, HF_HUB_OFFLINE="1")
    if tmp_path is not None:
        out["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlruns.db"
    if pythonpath is not None:
        out["PYTHONPATH"] = os.pathsep.join([str(pythonpath), out.get("PYTHONPATH", "")])
    out.update(env or {})
    return out


def run_cli(
    *args: str,
    tmp_path: Path | None = None,
    pythonpath: Path | None = None,
    check: bool = True,
    env: dict | None = None,
    module: str | None = None,
):
    """`python run.py ARGS` (or `python -m MODULE ARGS`) in a fresh process, as a user runs it (offline; the
    environment as `cli_env` makes it); with `check` a non-zero exit fails the test with the end of its console."""
    import subprocess
    import sys

    command = ["-m", module] if module else ["run.py"]
    out = subprocess.run(
        [sys.executable, *command, *args],
        cwd=ROOT,
        env=cli_env(tmp_path, pythonpath, env),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def start_cli(*args: str, log: Path, tmp_path: Path | None = None, env: dict | None = None):
    """`python run.py ARGS` in the background (environment as `cli_env`), in its own process group so that a test
    can kill it whole; its console goes to `log` (a pipe nobody reads could fill up). Wait for it with `finish`."""
    import subprocess
    import sys

    with open(log, "w") as console:
        process = subprocess.Popen(
            [sys.executable, "run.py", *args],
            cwd=ROOT,
            env=cli_env(tmp_path, env=env),
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process.log = Path(log)
    return process


def finish(process, check: bool = True, timeout: float = HANG_GUARD) -> str:
    """Wait for a `start_cli` run; its console. With `check` a non-zero exit fails the test with its end."""
    process.wait(timeout=timeout)
    text = process.log.read_text()
    if check:
        assert process.returncode == 0, text[-4000:]
    return text


def kill_when_held(process, marker: Path) -> None:
    """SIGKILL a `start_cli` run once it has written `marker` (support/hold.py: it then waits to be killed, so it cannot
    have finished, however the machine schedules the two processes); wait for it to be gone."""
    import signal
    import time

    while not marker.exists():
        assert process.poll() is None, "the run ended before it was held:\n" + finish(process, check=False)[-3000:]
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    finish(process, check=False, timeout=60)
    assert process.returncode == -signal.SIGKILL


def mlflow_runs(store: Path | str):
    """(client, runs) of the "avrl" experiment in an MLflow store: a tracking URI, or a folder holding mlruns.db."""
    import mlflow

    uri = f"sqlite:///{store}/mlruns.db" if isinstance(store, Path) else store
    client = mlflow.tracking.MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name("avrl").experiment_id])


def final_weights_of_cli_run(run_dir: Path, *overrides, pythonpath: Path | None = None) -> dict:
    """`python run.py` into run_dir (a fresh process, as a user runs it); the saved final model's weights."""
    from safetensors.torch import load_file

    run_cli(f"hydra.run.dir={run_dir}", *overrides, pythonpath=pythonpath)
    return load_file(run_dir / "final_model/model.safetensors")


def assert_same_trained_weights(got: dict, want: dict) -> None:
    """`want` moved most of the tiny model's weights, and `got` holds the same values (float tolerance)."""
    import torch
    from safetensors.torch import load_file

    base = load_file(ROOT / "avrl/assets/tiny_qwen2_audio/model.safetensors")
    assert sum(not torch.equal(want[name], base[name]) for name in want) > len(want) // 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def compose(overrides=(), output_dir="/tmp/avrl-test"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=[f"output_dir={output_dir}", *overrides])


def write_wav(path: Path, seconds: float = 1.0, freq: float = 440.0, sr: int = 16000) -> Path:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"), sr)
    return path


@contextlib.contextmanager
def mlflow_server(tmp_path: Path, *args: str, backend: str | None = None):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store in tmp_path (or the `backend` store URI), serving
    its artifacts (kept in tmp_path/art) over HTTP; yields its URI once /health answers.
    No clock decides: it waits as long as the server process lives (a slow start on a busy machine is fine), and
    a server that exits at start (its port taken between choosing it and binding it) is started again elsewhere."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    for attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = tmp_path / f"mlflow-server-{attempt}.log"
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
                backend or f"sqlite:///{tmp_path}/server.db",
                "--serve-artifacts",
                "--artifacts-destination",
                str(tmp_path / "art"),
                "--workers",
                "1",
                *args,
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        uri = f"http://127.0.0.1:{port}"
        try:
            while server.poll() is None:
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=5)
                    break
                except OSError:
                    time.sleep(0.2)
            if server.poll() is None:
                yield uri
                return
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    raise RuntimeError(f"mlflow server did not start; see {log}:\n{log.read_text()[-3000:]}")

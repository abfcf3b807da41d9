import os
from pathlib import Path

import pytest

import avrl.config  # noqa: F401  (registers resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub


def final_weights_of_cli_run(run_dir: Path, *overrides, pythonpath: Path | None = None) -> dict:
    """`python run.py` into run_dir (a fresh process, as a user runs it); the saved final model's weights."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
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


@pytest.fixture
def cfg_factory(tmp_path, monkeypatch):
    """Compose a config whose outputs and MLflow store live in this test's tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")

    def make(*overrides):
        return compose(list(overrides), output_dir=str(tmp_path / "out"))

    return make


def write_wav(path: Path, seconds: float = 1.0, freq: float = 440.0, sr: int = 16000) -> Path:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"), sr)
    return path

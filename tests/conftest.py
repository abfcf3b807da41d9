import os
from pathlib import Path

import pytest

import avrl.config  # noqa: F401  (registers resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub


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

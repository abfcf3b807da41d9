"""pytest hooks and fixtures only; the helpers that test modules import live in tests/support."""

import os

import pytest

from tests.support import compose

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub


FAST_EXCLUDES = ("slow", "services", "gpu")


def pytest_collection_modifyitems(config, items):
    """`-m fast` is the inner-loop tier (every test not marked slow, services or gpu; the same set as
    `-m "not slow and not services"` on a machine without CUDA). GPU checks (`-m gpu`) are skipped, saying why,
    on a machine without CUDA: never counted as passing there."""
    import torch

    for item in items:
        if not any(item.get_closest_marker(name) for name in FAST_EXCLUDES):
            item.add_marker(pytest.mark.fast)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (a GPU check: pytest -m gpu on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a parametrize id such as trainer=gpu
            item.add_marker(skip)


@pytest.fixture
def cfg_factory(tmp_path, monkeypatch):
    """Compose a config whose outputs and MLflow store live in this test's tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")

    def make(*overrides):
        return compose(list(overrides), output_dir=str(tmp_path / "out"))

    return make


@pytest.fixture
def restored_environment():
    """Lightning sets MASTER_PORT & co. in this pytest process for DeepSpeed, whose process group keeps that port
    (and is reused by the next in-process run: DeepSpeed cannot start a second one). Later tests that start ranks
    of their own must not inherit the variables, or they would find the port taken."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

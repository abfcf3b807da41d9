"""Crash-safe files: atomic writes, the kept previous checkpoint, the torn-checkpoint fallback, a full disk, and a
resumed run's metrics logged once per step."""

import errno
import logging
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch

from avrl import checkpoints
from avrl.atomic import NoSpaceError, write_atomic
from avrl.checkpoints import SafeCheckpointIO
from avrl.resume import log_each_step_once


def state(step: int, size: int = 1000) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((size,), float(step))}}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_an_atomic_write_that_fails_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "summary.json", '{"a": 1}')
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(NoSpaceError, match=f"no space left in {tmp_path}: summary.json needs 8 bytes"):
        write_atomic(path, '{"a": 2}')
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_text() == '{"a": 1}' and leftovers(tmp_path) == []


def test_the_previous_checkpoint_is_kept_and_a_torn_last_one_falls_back_to_it(tmp_path, caplog):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(state(3), path)
    io.save_checkpoint(state(6), path)
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 6
    assert torch.load(f"{path}.prev", weights_only=True)["global_step"] == 3 and leftovers(tmp_path) == []
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # torn
    with caplog.at_level(logging.WARNING, logger="avrl.checkpoints"):
        assert io.load_checkpoint(path, weights_only=True)["global_step"] == 3
    assert f"checkpoint {path} cannot be read" in caplog.text and f"previous one, {path}.prev" in caplog.text
    Path(f"{path}.prev").unlink()
    with pytest.raises(RuntimeError, match=f"checkpoint {path} cannot be read .* no previous one"):
        io.load_checkpoint(path, weights_only=True)
    io.save_checkpoint(state(9), tmp_path / "best.ckpt")
    io.save_checkpoint(state(12), tmp_path / "best.ckpt")
    io.remove_checkpoint(tmp_path / "best.ckpt")  # Lightning removing an old best: its previous goes too
    assert not (tmp_path / "best.ckpt").exists() and not (tmp_path / "best.ckpt.prev").exists()


def test_a_write_failing_mid_checkpoint_leaves_the_good_one(tmp_path, monkeypatch):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(state(3), path)
    real_save = torch.save

    def save_then_fail(obj, f):  # half a checkpoint reaches the disk, then it is full
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", save_then_fail)
    with pytest.raises(NoSpaceError, match=f"no space left in {tmp_path}: the checkpoint last.ckpt needs"):
        io.save_checkpoint(state(6), path)
    monkeypatch.undo()
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 3 and leftovers(tmp_path) == []


def test_a_really_full_disk_stops_the_save_naming_the_folder_and_keeps_the_checkpoint(tmp_path):
    """On a real filesystem too small for a second checkpoint (a 2 MiB tmpfs; root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root and mount permission")
    try:
        io, path = SafeCheckpointIO(), disk / "last.ckpt"
        io.save_checkpoint(state(3, size=200_000), path)  # 0.8 MiB of tensors: fits once with its metadata room
        with pytest.raises(NoSpaceError, match=f"no space left in {disk}: the checkpoint last.ckpt needs 1.8 MiB"):
            io.save_checkpoint(state(6, size=200_000), path)
        assert io.load_checkpoint(path, weights_only=True)["global_step"] == 3 and leftovers(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_resumed_run_logs_each_step_once(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    first = MLFlowLogger(experiment_name="avrl", tracking_uri=uri)
    for step in range(6):  # logged before the kill; the checkpoint was at step 3
        first.log_metrics({"loss": float(step), **({"val": 0.5} if step == 4 else {})}, step=step)
    resumed = MLFlowLogger(experiment_name="avrl", tracking_uri=uri, run_id=first.run_id)
    assert log_each_step_once(resumed) == 2
    for step in range(3, 9):  # replays 3-5 (the same values, resume being exact), then goes on
        resumed.log_metrics({"loss": float(step) + 0.5 * (step < 6), "val": 0.75}, step=step)
    client = mlflow.tracking.MlflowClient(uri)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "loss"))
    assert loss == [(s, float(s)) for s in range(9)]  # every step once, the first attempt's values kept
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "val")) == [4, 5, 6, 7, 8]

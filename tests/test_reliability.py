"""Faults a long run meets: undecodable media found at the item, NaN losses, an unreachable tracking server,
secrets in the config."""

import http.server
import json
import socket
import threading

import pytest
import torch

from avrl.data.items import DataError
from avrl.data.readers import read_avqa, read_avqa_r1
from avrl.datamodule import PromptCollator
from avrl.models import load_processor
from avrl.prompts import prompt_spec
from avrl.train import train
from tests.support import compose, mlflow_runs, write_wav
from tests.support.deepspeed_checks import check_skipped_update, nan_on_calls
from tests.support.helpers import avqa_record, write_jsonl

FAST = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "data.val_size=2",
    "data.batch_size=2",
    "algorithm.num_generations=2",
    "algorithm.max_completion_length=8",
    "trainer.enable_progress_bar=false",
    "save_final_model=false",
]


def broken_media(folder):
    """A good clip and the media faults a reader cannot see up front (the files exist and are not empty)."""
    good = write_wav(folder / "good.wav", seconds=1.0)
    data = good.read_bytes()
    (folder / "not_audio.wav").write_text("this is a text file, not audio " * 20)
    (folder / "header_only.wav").write_bytes(data[:30])
    (folder / "cut.wav").write_bytes(data[: len(data) // 2])  # the header declares 1 s, the file holds 0.5 s
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg" * 10)
    return ["not_audio.wav", "header_only.wav", "cut.wav"]


@pytest.fixture
def collate():
    cfg = compose()
    return lambda on_error: PromptCollator(load_processor(cfg.model), prompt_spec(cfg), 30, on_error)


@pytest.mark.parametrize(
    "name, message",
    [
        ("not_audio.wav", "cannot read audio file"),
        ("header_only.wav", "cannot read audio file"),
        ("cut.wav", "is truncated: its header declares 32044 bytes, the file has 16022"),
    ],
)
def test_undecodable_audio_names_file_and_line_or_is_skipped(tmp_path, collate, name, message):
    broken_media(tmp_path / "audio")
    path = write_jsonl(
        tmp_path / "train.jsonl", [avqa_record(1, audio="audio/good.wav"), avqa_record(2, audio=f"audio/{name}")]
    )
    # The reader finds these from the header (tests/test_bad_input.py); here its check is off to test the loader's.
    items, skipped = read_avqa(path, check_audio=False)
    assert len(items) == 2 and not skipped
    with pytest.raises(DataError, match=r"train.jsonl:2: ") as error:
        collate("raise")(items)
    assert name in str(error.value) and message in str(error.value)
    batch = collate("skip")(items)
    assert [it.id for it in batch["items"]] == ["1"] and batch["input_ids"].shape[0] == 1
    (record,) = batch["skipped"]
    assert record["source"].endswith("train.jsonl:2") and message in record["reason"]


def test_unreadable_image_names_the_item_or_is_skipped(tmp_path, collate):
    broken_media(tmp_path)
    record = {
        "problem_id": 7,
        "problem": "Which?",
        "options": ["A. x", "B. y"],
        "solution": "<answer>B</answer>",
        "path": {"image": "bad.jpg", "audio": "good.wav"},
    }
    (tmp_path / "train.json").write_text(json.dumps([record]))
    items, _ = read_avqa_r1(tmp_path / "train.json")
    with pytest.raises(DataError, match=r"train.json\[item 0, id 7\]: cannot read image file .*bad.jpg"):
        collate("raise")(items)
    batch = collate("skip")(items)
    assert batch["items"] == [] and len(batch["skipped"]) == 1  # a batch with nothing left is skipped whole


def test_a_run_skips_undecodable_items_lists_and_counts_them(cfg_factory, tmp_path):
    bad = broken_media(tmp_path / "audio")
    records = [avqa_record(i, audio="audio/good.wav") for i in range(4)]
    records += [avqa_record(10 + i, audio=f"audio/{name}") for i, name in enumerate(bad)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = cfg_factory(
        *FAST,
        "data=avqa",
        f"data.train_path={path}",
        f"data.val_path={path}",
        "data.on_error=skip",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
    )
    train(cfg)
    listed = json.loads((tmp_path / "out/skipped_items.json").read_text())
    assert sorted(r["source"].rsplit(":", 1)[1] for r in listed) == ["5", "6", "7"]
    client, (run,) = mlflow_runs(cfg.logger.tracking_uri)
    assert run.data.metrics["data/skipped"] == 3


ZERO2_ONE_PROCESS = [
    "trainer=deepspeed_zero2",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
]


@pytest.mark.parametrize("strategy", [[], ZERO2_ONE_PROCESS], ids=["plain", "zero2"])
def test_a_nan_loss_skips_the_update_and_is_counted(cfg_factory, monkeypatch, strategy, restored_environment):
    if strategy:
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    nan_on_calls(monkeypatch, {1})
    cfg = cfg_factory(
        *FAST,
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "algorithm.num_generations=4",
        "algorithm.temperature=1.5",
        *strategy,
    )
    seen = []
    from avrl.algorithms.grpo import GRPOModule

    real_step = GRPOModule.training_step

    def step(self, batch, batch_idx):  # the weights before and after each batch
        before = [p.detach().clone() for p in self.model.parameters()]
        real_step(self, batch, batch_idx)
        seen.append(all(torch.equal(a, b) for a, b in zip(before, self.model.parameters())))

    monkeypatch.setattr(GRPOModule, "training_step", step)
    train(cfg)
    # The NaN batch (the second) left every weight as it was; the skip did not count as a step: 4 batches for 3
    # updates, and the updates moved the weights.
    assert len(seen) == 4 and seen[1] and not all(seen)
    client, (run,) = mlflow_runs(cfg.logger.tracking_uri)
    history = client.get_metric_history(run.info.run_id, "train/skipped_steps")
    assert max(m.value for m in history) == 1 and run.info.status == "FINISHED"


@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_a_skipped_update_under_deepspeed_leaves_no_gradient_behind(
    cfg_factory, monkeypatch, tmp_path, stage, restored_environment
):
    """On CPU processes (gloo); the same on a GPU is in tests/test_gpu.py."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed here")
    check_skipped_update(cfg_factory, monkeypatch, tmp_path, stage, "cpu")


def test_nan_losses_in_a_row_stop_the_run_with_a_clear_message(cfg_factory, monkeypatch):
    nan_on_calls(monkeypatch, set(range(100)))
    cfg = cfg_factory(*FAST, "optim.max_skipped_in_row=2")
    with pytest.raises(FloatingPointError, match="2 updates in a row had a non-finite loss or gradient"):
        train(cfg)
    client, (run,) = mlflow_runs(cfg.logger.tracking_uri)
    assert run.info.status == "FAILED" and "FloatingPointError" in run.data.tags["error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_reported_before_the_model_loads(cfg_factory, monkeypatch):
    import avrl.train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(avrl.train, "load_processor", no_model)
    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}"
    cfg = cfg_factory(f"logger.tracking_uri={uri}")
    unreachable = r"MLflow tracking server http://alice:\*\*\*@127.0.0.1:\d+ is unreachable"
    with pytest.raises(ConnectionError, match=unreachable) as e:
        train(cfg)
    assert "hunter2" not in str(e.value)  # (no clock here: load_processor above fails the test if reached)


def test_a_server_that_answers_with_an_error_status_counts_as_reachable():
    from avrl.tracking import check_reachable

    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


def test_secrets_never_reach_params_or_the_config_artifact(cfg_factory, tmp_path):
    cfg = cfg_factory(
        *FAST, "+hub_token=hf_abcdef", "+db.password=pw123", "+notes=see postgresql://bob:pw456@db.example/optuna"
    )
    train(cfg)
    client, (run,) = mlflow_runs(cfg.logger.tracking_uri)
    assert run.data.params["hub_token"] == "***" and run.data.params["db.password"] == "***"
    assert run.data.params["notes"] == "see postgresql://bob:***@db.example/optuna"
    config = tmp_path / "config.yaml"
    client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    text = config.read_text()
    assert "hf_abcdef" not in text and "pw123" not in text and "pw456" not in text and "hub_token: '***'" in text


def test_trust_remote_code_is_off_unless_asked():
    for model in ("tiny_qwen2_audio", "qwen2_audio_7b", "qwen2_5_omni_7b"):
        assert compose([f"model={model}"]).model.trust_remote_code is False

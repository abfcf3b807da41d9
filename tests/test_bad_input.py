"""Bad input found when the data is read, before training starts: text encodings (a byte-order mark, bytes that are
not UTF-8), audio headers (not audio, no samples, truncated), and skip counts that are right across DDP ranks and
after a resume."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from avrl.data import readers
from avrl.data.items import DataError
from avrl.data.media import check_audio_header
from avrl.data.readers import read_avqa, read_mmau
from avrl.datamodule import SKIPPED_FILE, AudioQADataModule, SkippedItems
from avrl.resume import EpochSampler
from tests.support import compose, mlflow_runs, run_cli, write_wav
from tests.support.helpers import avqa_record, write_jsonl

BOM = b"\xef\xbb\xbf"


def mmau_record(i, **extra):
    return {
        "id": f"m{i}",
        "audio_id": f"audio/m{i}.wav",
        "question": "Who speaks?",
        "choices": ["Man", "Woman"],
        "answer": "Man",
        "task": "speech",
        "difficulty": "easy",
        **extra,
    }


# --------------------------------------------------------------------------------------------- text encodings
def test_a_utf8_bom_is_accepted_and_lines_keep_their_numbers(tmp_path):
    write_wav(tmp_path / "audio/1.wav")
    lines = [json.dumps(avqa_record(1)), '{"id": 2, "question_text": ', json.dumps(avqa_record(3))]
    path = tmp_path / "train.jsonl"
    path.write_bytes(BOM + "\n".join(lines).encode() + b"\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: malformed JSON line"):
        read_avqa(path)
    items, skipped = read_avqa(path, on_error="skip")
    assert [it.id for it in items] == ["1", "3"]  # the first record, after the mark, is read
    assert [r["source"] for r in skipped] == [f"{path}:2"]

    write_wav(tmp_path / "audio/m0.wav")
    (tmp_path / "mmau.json").write_bytes(BOM + json.dumps([mmau_record(0)], indent=2).encode())
    (item,), skipped = read_mmau(tmp_path / "mmau.json")
    assert item.id == "m0" and skipped == []


def test_a_utf16_file_is_refused_naming_the_encoding(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(avqa_record(1)) + "\n", encoding="utf-16")  # PowerShell 5's `>`
    for on_error in ("raise", "skip"):  # the whole file is unreadable: the policy cannot skip it
        with pytest.raises(DataError, match=r"train.jsonl:1: the file is UTF-16 or UTF-32 .*save it as UTF-8"):
            read_avqa(path, on_error=on_error)


def test_bytes_that_are_not_utf8_name_the_file_line_and_column_of_a_jsonl_and_can_be_skipped(tmp_path):
    write_wav(tmp_path / "audio/1.wav")
    latin1 = json.dumps(avqa_record(2, question_text="Which caf\u00e9 is heard?"), ensure_ascii=False)
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b"\n".join(
            [json.dumps(avqa_record(1)).encode(), latin1.encode("latin-1"), json.dumps(avqa_record(3)).encode(), b""]
        )
    )
    column = latin1.index("\u00e9") + 1
    expected = f"{path}:2: not UTF-8 text: byte 0xe9 at column {column} "
    with pytest.raises(DataError) as error:
        read_avqa(path)
    assert str(error.value).startswith(expected) and "Latin-1" in str(error.value)
    items, skipped = read_avqa(path, on_error="skip")
    assert [it.id for it in items] == ["1", "3"]
    assert len(skipped) == 1 and skipped[0]["source"] == f"{path}:2" and skipped[0]["reason"].startswith(expected)


def test_bytes_that_are_not_utf8_in_a_json_list_stop_the_file_naming_the_line(tmp_path):
    text = json.dumps(
        [mmau_record(0), mmau_record(1, question="Wer spricht, Mann oder Fr\u00f6sch?")], indent=2, ensure_ascii=False
    )
    line = text[: text.index("\u00f6")].count("\n") + 1
    assert line > 10  # the line of the byte, not of the item or the file's start
    (tmp_path / "mmau.json").write_bytes(text.encode("cp1252"))
    for on_error in ("raise", "skip"):  # a list that cannot be decoded cannot be split into items
        with pytest.raises(DataError, match=rf"mmau.json:{line}: not UTF-8 text: byte 0xf6 at column \d+"):
            read_mmau(tmp_path / "mmau.json", on_error=on_error)


# ---------------------------------------------------------------------------------------------- audio headers
def bad_clips(folder: Path) -> dict[str, str]:
    """Clips that exist and are not empty but are no use, each with what the reader must say about it."""
    good = write_wav(folder / "good.wav", seconds=1.0).read_bytes()
    (folder / "not_audio.wav").write_text("this is a text file, not audio " * 20)
    (folder / "header_only.wav").write_bytes(good[:30])
    sf.write(folder / "silent.wav", np.zeros(0, "float32"), 16000)  # a 44-byte header and no samples
    (folder / "cut.wav").write_bytes(good[: len(good) // 2])  # the data chunk promises 1 s, the file holds 0.5 s
    return {
        "not_audio.wav": "is not audio (libsndfile cannot read its header: Format not recognised.)",
        "header_only.wav": "is not audio (libsndfile cannot read its header: Error in WAV file. No 'data' chunk",
        "silent.wav": "holds no samples",
        "cut.wav": "is truncated: its header declares 32044 bytes, the file has 16022 (7989 of 16000 sample frames)",
        "missing.wav": "audio file not found",
    }


@pytest.mark.parametrize("name", ["not_audio.wav", "header_only.wav", "silent.wav", "cut.wav", "missing.wav"])
def test_audio_headers_are_checked_when_the_data_is_read(tmp_path, name):
    message = bad_clips(tmp_path / "audio")[name]
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            avqa_record(1, audio="audio/good.wav"),
            avqa_record(2, audio=f"audio/{name}"),
            avqa_record(3, audio="audio/good.wav"),
        ],
    )
    with pytest.raises(DataError) as error:
        read_avqa(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)
    assert str(tmp_path / "audio" / name) in str(error.value)
    items, skipped = read_avqa(path, on_error="skip")
    assert [it.id for it in items] == ["1", "3"]
    (record,) = skipped
    assert record["source"] == f"{path}:2" and message in record["reason"]


def test_json_list_readers_name_the_item_of_a_bad_clip(tmp_path):
    bad_clips(tmp_path / "audio")
    write_wav(tmp_path / "audio/m0.wav")
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps([mmau_record(0), mmau_record(1, audio_id="audio/cut.wav")]))
    with pytest.raises(DataError, match=r"mmau.json\[item 1, id m1\]: audio file .*cut.wav is truncated"):
        read_mmau(path)
    items, skipped = read_mmau(path, on_error="skip")
    assert [it.id for it in items] == ["m0"] and [r["source"] for r in skipped] == [f"{path}[item 1, id m1]"]


def test_a_clip_named_by_many_records_is_read_once_and_each_record_is_skipped(tmp_path, monkeypatch):
    bad_clips(tmp_path / "audio")
    calls = []
    monkeypatch.setattr(readers, "check_audio_header", lambda p: calls.append(p) or check_audio_header(p))
    records = [avqa_record(i, audio="audio/good.wav" if i % 2 else "audio/cut.wav") for i in range(6)]
    items, skipped = read_avqa(write_jsonl(tmp_path / "train.jsonl", records), on_error="skip")
    assert [it.id for it in items] == ["1", "3", "5"]
    assert [r["source"].rsplit(":", 1)[1] for r in skipped] == ["1", "3", "5"]  # the lines of records 0, 2, 4
    assert sorted(Path(p).name for p in calls) == ["cut.wav", "good.wav"]


def test_the_check_reads_headers_and_decodes_nothing(tmp_path, monkeypatch):
    import librosa

    def no_decoding(*args, **kwargs):
        raise AssertionError("a clip was decoded")

    for i in range(3):
        write_wav(tmp_path / f"audio/{i}.wav")
    monkeypatch.setattr(sf, "read", no_decoding)
    monkeypatch.setattr(librosa, "load", no_decoding)
    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    records = [avqa_record(i, audio=f"audio/{i}.wav") for i in range(3)]
    items, skipped = read_avqa(write_jsonl(tmp_path / "train.jsonl", records))
    assert len(items) == 3 and skipped == []


def test_what_a_header_does_not_settle_is_left_to_loading(tmp_path):
    good = write_wav(tmp_path / "good.wav").read_bytes()
    streamed = bytearray(good)  # a streaming writer's placeholders: length unknown, not a promise
    streamed[4:8] = streamed[40:44] = b"\xff\xff\xff\xff"
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    # All samples present; a LIST chunk after them, cut: the RIFF size is short of the promise, the data is whole.
    tail = b"LIST" + (100).to_bytes(4, "little") + b"INFO" + b"x" * 6
    cut_tail = bytearray(good + tail)
    cut_tail[4:8] = (len(good) + 8 + 100 - 8).to_bytes(4, "little")
    (tmp_path / "cut_tail.wav").write_bytes(bytes(cut_tail))
    (tmp_path / "clip.m4a").write_text("not audio, in a container librosa hands to audioread when loading")
    for name in ("streamed.wav", "cut_tail.wav", "clip.m4a"):
        assert check_audio_header(str(tmp_path / name)) is None, name
    (tmp_path / "clip.wav").write_bytes(b"RIFF" + bytes(100))  # a format libsndfile reads, and cannot: not audio
    assert check_audio_header(str(tmp_path / "clip.wav")).startswith("is not audio")


# ------------------------------------------------------------------------------------------------ skip counts
def skipping_data(tmp_path) -> Path:
    bad_clips(tmp_path / "audio")
    records = [
        avqa_record(1, audio="audio/good.wav"),
        avqa_record(2, audio="audio/cut.wav"),
        "{not json",
        avqa_record(4, audio="audio/good.wav"),
    ]
    return write_jsonl(tmp_path / "train.jsonl", records)


def test_a_file_read_for_two_splits_counts_its_skips_once_and_rank_zero_alone_writes_them(tmp_path, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    path = skipping_data(tmp_path)
    cfg = compose(["data=avqa", f"data.train_path={path}", f"data.val_path={path}", "data.on_error=skip"])
    datamodule = AudioQADataModule(cfg.data, None, None, splits=("train", "val"))
    datamodule.setup()
    assert [r["source"] for r in datamodule.skipped] == [f"{path}:2", f"{path}:3"]
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert datamodule.write_skipped(tmp_path / "rank1") is None
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    (tmp_path / "rank0").mkdir()
    written = datamodule.write_skipped(tmp_path / "rank0")
    assert json.loads(written.read_text()) == datamodule.skipped
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [SKIPPED_FILE]  # no partial file left


class Recorder:
    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics["data/skipped"]))


def skipped(*names):
    return {"skipped": [{"source": n, "reason": f"{n}: cannot read audio file"} for n in names]}


READ_TIME = {"source": "train.jsonl:9", "reason": "train.jsonl:9: malformed JSON line"}
# What each of two ranks' collators skipped, batch by batch: the training batches differ, the validation batch
# (every rank validates every item) is the same on both.
RANK_BATCHES = {0: [skipped("A"), skipped(), skipped()], 1: [skipped(), skipped("B", "C"), skipped()]}


def datamodule_with(records):
    datamodule = AudioQADataModule(OmegaConf.create({"max_audio_seconds": 30, "on_error": "skip"}), None, None)
    datamodule.skipped = [dict(r) for r in records]
    return datamodule


def _rank(rank: int, init_file: str, tmp: str) -> None:
    """One rank of a 2-process gloo group, driving SkippedItems as Lightning does (the same hooks in lockstep)."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = Path(tmp) / f"rank{rank}"
        out.mkdir()
        callback = SkippedItems(datamodule_with([READ_TIME]), out)
        logger = Recorder() if rank == 0 else None
        trainer = SimpleNamespace(world_size=2, is_global_zero=rank == 0, logger=logger, strategy=DDPStrategy())
        module = SimpleNamespace(device=torch.device("cpu"))
        for step, batch in enumerate(RANK_BATCHES[rank], start=1):
            trainer.global_step = step
            callback.on_train_batch_end(trainer, module, None, batch, step - 1)
        callback.on_validation_batch_end(trainer, module, None, skipped("V"), 0)
        (Path(tmp) / f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "held": [r["source"] for r in callback.datamodule.skipped],
                    "logged": logger.metrics if logger else None,
                    "state": callback.state_dict(),
                }
            )
        )
    finally:
        dist.destroy_process_group()


def test_collator_skips_are_counted_once_across_two_ddp_ranks_and_survive_a_resume(tmp_path):
    import torch.multiprocessing as mp

    # fork: the ranks start with this process's imports (spawning two fresh interpreters costs ~10 s of imports),
    # unless an earlier in-process DeepSpeed run left this process in a process group that a fork would inherit.
    method = "spawn" if torch.distributed.is_initialized() else "fork"
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method=method)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = ["train.jsonl:9", "A", "B", "C", "V"]
    assert ranks[0]["held"] == ranks[1]["held"] == everything  # each rank holds every rank's skips, V once
    assert ranks[0]["logged"] == [[1, 2], [2, 4], [3, 5]]  # rank 0 logs the total: 1 + A, + B + C, + V
    listed = json.loads((tmp_path / "rank0" / SKIPPED_FILE).read_text())
    assert [r["source"] for r in listed] == everything
    assert not (tmp_path / "rank1" / SKIPPED_FILE).exists()  # rank 1 never writes (it would overwrite rank 0's)

    # Resume: the checkpoint (loaded as avrl loads it, weights_only) gives the collator's skips back; the readers'
    # are found again when the data is read.
    torch.save({"callbacks": {"SkippedItems": ranks[0]["state"]}}, tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["SkippedItems"]
    out = tmp_path / "resumed"
    out.mkdir()
    datamodule = datamodule_with([READ_TIME])
    datamodule.write_skipped(out)  # what train() writes before the checkpoint is loaded: the readers' skips only
    callback = SkippedItems(datamodule, out)
    callback.load_state_dict(state)
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, logger=Recorder(), global_step=3)
    callback.on_train_start(trainer, None)
    assert [r["source"] for r in json.loads((out / SKIPPED_FILE).read_text())] == everything
    assert trainer.logger.metrics == [(3, 5)]
    trainer.global_step = 4
    callback.on_train_batch_end(trainer, None, None, skipped("B"), 0)  # replayed after the checkpoint: known
    callback.on_train_batch_end(trainer, None, None, skipped("D"), 1)
    assert trainer.logger.metrics == [(3, 5), (4, 6)] and len(datamodule.skipped) == 6


# ------------------------------------------------------------------------------------- end to end, two ranks
SEED = 42  # conf/config.yaml's seed, which seeds the EpochSampler's order


def rank_batches(epoch: int) -> list[list[list[int]]]:
    """Each rank's training batches (indices into 8 records) in an epoch: 2 ranks, batches of 2."""
    batches = []
    for rank in (0, 1):
        sampler = EpochSampler(8, 2, SEED, rank, 2)
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches.append([order[i : i + 2] for i in range(0, len(order), 2)])
    return batches


def ddp_skipping_data(tmp_path) -> tuple[Path, Path, list[str]]:
    """8 training records: the first of each batch of epoch 0 (2 per rank) names a clip that only loading finds bad
    (the run turns the header check off), so that each rank skips two records of its own."""
    bad_clips(tmp_path / "audio")
    bad = {batch[0] for rank in rank_batches(0) for batch in rank}
    # The step after the resume (each rank's first batch of epoch 1; of epoch 2 while a resume from an epoch's last
    # batch skips the next epoch, avrl/resume.py at 3f79543) meets fewer than the 4, and no batch is all bad (a rank
    # with an empty batch would not take part in the update's collectives).
    for epoch in (1, 2):
        again = [len(set(rank[0]) & bad) for rank in rank_batches(epoch)]
        assert sum(again) < 4 and max(again) < 2
    records = [avqa_record(i, audio="audio/cut.wav" if i in bad else "audio/good.wav") for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [avqa_record(10, audio="audio/good.wav")])
    return train, val, sorted(str(i + 1) for i in bad)  # their lines


@pytest.mark.slow
def test_a_two_process_ddp_run_counts_each_ranks_skips_once_and_keeps_them_across_a_resume(tmp_path):
    train, val, bad_lines = ddp_skipping_data(tmp_path)
    assert len(bad_lines) == 4
    assert compose().seed == SEED
    run = [
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "checkpoint_every_n_steps=2",
        "algorithm.num_generations=2",
        "algorithm.max_completion_length=8",
        "data=avqa",
        f"data.train_path={train}",
        f"data.val_path={val}",
        "data.batch_size=2",
        "data.on_error=skip",
        "data.check_audio=false",
        "save_final_model=false",
    ]
    run_cli(*run, "trainer.max_steps=2", tmp_path=tmp_path)

    def listed():
        return sorted(r["source"].rsplit(":", 1)[1] for r in json.loads((tmp_path / "run" / SKIPPED_FILE).read_text()))

    _, (mlflow_run,) = mlflow_runs(tmp_path)
    assert listed() == bad_lines and mlflow_run.data.metrics["data/skipped"] == 4  # 2 per rank, both counted
    # One step more from the checkpoint: epoch 1's first batches meet some of the 4 again (fewer than 4); the others
    # were skipped before the checkpoint, and are still counted.
    run_cli(*run, "trainer.max_steps=3", "ckpt_path=last", tmp_path=tmp_path)
    _, (mlflow_run,) = mlflow_runs(tmp_path)
    assert listed() == bad_lines and mlflow_run.data.metrics["data/skipped"] == 4

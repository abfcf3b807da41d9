"""Readers on files in the published formats, bad input in both policies, and the real MMAU metadata."""

import json

import pytest

from avrl.data.items import DataError
from avrl.data.readers import read_avqa, read_avqa_r1, read_mmau
from tests.support import SHARED, write_wav
from tests.support.helpers import avqa_record, write_jsonl


def test_avqa(tmp_path):
    write_wav(tmp_path / "audio/1.wav")
    items, skipped = read_avqa(write_jsonl(tmp_path / "train.jsonl", [avqa_record(1), avqa_record(2)]))
    assert skipped == [] and len(items) == 2
    it = items[0]
    assert it.question == "What is the man in the audio playing?"  # 'video' read as 'audio', as R1-AQA does
    assert it.answer == "piano" and it.audio == str(tmp_path / "audio/1.wav") and it.category == "Come From"


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"id": 3, "question_text": ', "train.jsonl:2: malformed JSON"),
        (avqa_record(3, answer=4), "train.jsonl:2: answer 4 is not an index"),
        (avqa_record(3, multi_choice=[]), "train.jsonl:2: empty or missing choice list"),
        (avqa_record(3, audio="audio/missing.wav"), "train.jsonl:2: audio file not found"),
        (avqa_record(3, audio="audio/empty.wav"), "train.jsonl:2: audio file is empty"),
    ],
)
def test_avqa_bad_input_names_file_and_line(tmp_path, bad, message):
    write_wav(tmp_path / "audio/1.wav")
    (tmp_path / "audio/empty.wav").write_bytes(b"")
    path = write_jsonl(tmp_path / "train.jsonl", [avqa_record(1), bad, avqa_record(2)])
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_avqa(path)
    items, skipped = read_avqa(path, on_error="skip")
    assert [it.id for it in items] == ["1", "2"]
    assert len(skipped) == 1 and skipped[0]["source"].endswith("train.jsonl:2")
    assert message.split(": ", 1)[1][:12] in skipped[0]["reason"]


def test_avqa_r1(tmp_path):
    split = tmp_path / "train"
    write_wav(split / "audio/a.wav")
    from PIL import Image

    (split / "image").mkdir()
    Image.new("RGB", (32, 32)).save(split / "image/a.jpg")
    record = {
        "problem_id": 7,
        "problem": "Which instrument is heard?",
        "data_type": "image_audio",
        "problem_type": "multiple choice",
        "options": ["A. violin", "B. cello", "C. drum"],
        "solution": "<answer>B</answer>",
        "path": {"image": "image/a.jpg", "audio": "audio/a.wav"},
        "data_source": "AVQA",
    }
    (split / "train.json").write_text(json.dumps([record]))
    (it,), _ = read_avqa_r1(split / "train.json")
    assert it.choices == ["violin", "cello", "drum"] and it.answer_index == 1
    assert it.image == str(split / "image/a.jpg") and it.audio == str(split / "audio/a.wav")
    bad = dict(record, solution="<answer>D</answer>")
    (split / "bad.json").write_text(json.dumps([record, bad]))
    with pytest.raises(DataError, match=r"bad.json\[item 1, id 7\]: solution"):
        read_avqa_r1(split / "bad.json")


def mmau_record(i, answer="Man", choices=("Man", "Woman")):
    return {
        "id": f"m{i}",
        "audio_id": f"./test-mini-audios/m{i}.wav",
        "question": "Who speaks?",
        "choices": list(choices),
        "answer": answer,
        "dataset": "x",
        "task": "speech",
        "split": "test-mini",
        "category": "c",
        "sub-category": "s",
        "difficulty": "easy",
    }


def test_mmau_bad_answer_and_empty_choices(tmp_path):
    write_wav(tmp_path / "test-mini-audios/m0.wav")
    write_wav(tmp_path / "test-mini-audios/m1.wav")
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps([mmau_record(0), mmau_record(1, answer="Child")]))
    with pytest.raises(DataError, match=r"mmau.json\[item 1, id m1\]: answer 'Child' is not among the choices"):
        read_mmau(path)
    path.write_text(json.dumps([mmau_record(0), mmau_record(1, choices=())]))
    with pytest.raises(DataError, match=r"\[item 1, id m1\]: empty or missing choice list"):
        read_mmau(path)
    path.write_text("[{")
    with pytest.raises(DataError, match=r"mmau.json:1: malformed JSON"):
        read_mmau(path)


@pytest.mark.skipif(not (SHARED / "data/mmau-test-mini.json").exists(), reason="needs ../shared beside the checkout")
def test_real_mmau_metadata_with_stand_in_audio(tmp_path):
    records = json.loads((SHARED / "data/mmau-test-mini.json").read_text())
    assert len(records) == 1000
    for r in records:  # stand-in audio: 0.1 s files, so that the reader's existence checks pass
        write_wav(tmp_path / r["audio_id"], seconds=0.1)
    items, skipped = read_mmau(SHARED / "data/mmau-test-mini.json", root=tmp_path)
    assert len(items) == 1000 and not skipped
    assert {it.category for it in items} == {"sound", "music", "speech"}
    assert all(it.choices[it.answer_index] == r["answer"] for it, r in zip(items, records))
    assert 2 <= min(len(it.choices) for it in items) and max(len(it.choices) for it in items) <= 8

"""Readers on files in the published formats, bad input in both policies, and the real MMAU metadata."""

import json

import pytest

from avrl.data.items import DataError
from avrl.data.readers import read_avqa, read_avqa_r1, read_mmar, read_mmau, read_mmau_pro, read_mmsu
from tests.support import SHARED, write_wav
from tests.support.helpers import avqa_record, mmar_record, mmau_pro_record, mmsu_record, write_jsonl, write_parquet


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


def audio_for(folder, records, key="audio_path"):
    for r in records:
        for clip in [r[key]] if isinstance(r[key], str) else r[key]:
            write_wav(folder / clip, seconds=0.1)


def test_mmar_jsonl_as_published(tmp_path):
    records = [mmar_record(i) for i in range(3)]
    audio_for(tmp_path, records)
    items, skipped = read_mmar(write_jsonl(tmp_path / "MMAR-meta.jsonl", records))
    assert not skipped and [it.id for it in items] == ["r0", "r1", "r2"]
    assert items[0].audio == str(tmp_path / "audio/r0.wav") and items[0].answer == "Open Grassland"
    assert items[1].meta["sub-category"] == "Counting and Statistics" and items[1].category == "speech"
    bad = mmar_record(3, answer="Desert")
    write_wav(tmp_path / "audio/r3.wav", seconds=0.1)
    path = write_jsonl(tmp_path / "bad.jsonl", [*records, bad])
    with pytest.raises(DataError, match=r"bad.jsonl:4: answer 'Desert' is not among the choices"):
        read_mmar(path)


@pytest.mark.parametrize("layout", ["json_list", "jsonl"])
def test_mmsu_reads_a_json_list_or_jsonl(tmp_path, layout):
    records = [mmsu_record(i) for i in range(3)]
    records[2] = {**records[2], "choice_c": None, "choice_d": None, "answer_gt": "happy"}  # a two-choice task
    audio_for(tmp_path, records)
    path = tmp_path / "mmsu.jsonl"  # the name the official inference script gives its JSON list
    path.write_text(json.dumps(records)) if layout == "json_list" else write_jsonl(path, records)
    items, _ = read_mmsu(path)
    assert [it.choices for it in items][1:] == [["happy", "sad", "angry", "neutral"], ["happy", "sad"]]
    assert [it.answer for it in items] == ["sad", "happy", "happy"] and items[0].category == "emotion_recognition"
    gap = {**mmsu_record(3), "choice_c": None}
    write_wav(tmp_path / "audio/s3.wav", seconds=0.1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([*records, gap])) if layout == "json_list" else write_jsonl(bad, [*records, gap])
    where = r"bad.jsonl\[item 3, id s3\]" if layout == "json_list" else r"bad.jsonl:4"
    with pytest.raises(DataError, match=where + ": choices must be"):
        read_mmsu(bad)


def test_mmau_pro_parquet_with_clip_lists_and_open_items(tmp_path):
    records = [mmau_pro_record(i) for i in range(5)]
    audio_for(tmp_path, records)
    items, skipped = read_mmau_pro(write_parquet(tmp_path / "test.parquet", records))
    assert not skipped and len(items) == 5
    assert items[3].audio == str(tmp_path / "audio/p3.wav")
    assert items[3].meta["audio_path"] == ["audio/p3.wav", "audio/p3b.wav"]
    assert items[3].audio_paths == [str(tmp_path / "audio/p3.wav"), str(tmp_path / "audio/p3b.wav")]  # every clip
    assert items[0].more_audio == ()
    assert items[0].answer == "A cat meowing" and items[0].category == "sound"
    assert {it.category for it in items if it.answer_index is None} == {"open", "instruction following"}
    (tmp_path / "audio/p3b.wav").unlink()  # the second clip of a multi-clip item missing: that item, named
    with pytest.raises(DataError, match=r"test.parquet\[row 3, id p3\]: audio file not found"):
        read_mmau_pro(tmp_path / "test.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        read_mmau_pro(tmp_path / "junk.parquet")


def test_mmau_test_split_without_answers_is_read_for_prediction(tmp_path):
    records = [{k: v for k, v in mmau_record(i).items() if k != "answer"} for i in range(2)]
    audio_for(tmp_path, records, key="audio_id")
    (tmp_path / "mmau-test.json").write_text(json.dumps(records))
    items, _ = read_mmau(tmp_path / "mmau-test.json")
    assert [it.answer_index for it in items] == [None, None]
    with pytest.raises(DataError, match="no answer"):
        items[0].answer

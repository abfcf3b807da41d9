"""`task=eval data=mmsu prompt=mmsu`: MMSU's own prompt, its bare replies judged by avrl's protocol and written to
predictions.jsonl so that MMSU's scorer reads from each the letter it reads from the model's reply. The model's
replies are set (Policy.decode) to cover every case of mmsu_evaluation.py's reading; the references below are written
from that script's text."""

import json

import pytest

from avrl.evaluation import evaluate
from avrl.policy import Policy
from tests.support import write_wav
from tests.support.helpers import mmsu_record

REPLIES = ["B", "The answer is A.", "I cannot tell", "D", "b", "(C)", "A.", "C"]  # one per item, in order


def official_letter(response: str):
    """mmsu_evaluation.py:35-52: "" for an empty or "None" reply (the previous record's letter is used), None
    where the record is skipped."""
    predict = response.strip().replace("\n", "")
    if predict == "None" or not predict:
        return ""
    if predict[0] in "ABCD":
        return predict[0]
    return predict[-2] if len(predict) > 1 and predict[-2] in "ABCD" else None


def test_mmsu_prompt_replies_scored_end_to_end(cfg_factory, tmp_path, monkeypatch):
    records = [mmsu_record(i) for i in range(len(REPLIES))]
    for i, r in enumerate(records):
        write_wav(tmp_path / "mmsu" / r["audio_path"], seconds=0.5, freq=200 + 50 * i)
    (tmp_path / "mmsu/mmsu.jsonl").write_text(json.dumps(records))  # a JSON list, as MMSU's scripts read it
    replies = iter(REPLIES)
    monkeypatch.setattr(Policy, "decode", lambda self, ids, mask: [next(replies) for _ in range(ids.shape[0])])
    metrics = evaluate(
        cfg_factory(
            "task=eval",
            "data=mmsu",
            "prompt=mmsu",
            f"data.test_path={tmp_path}/mmsu/mmsu.jsonl",
            "data.eval_batch_size=4",
            "eval.max_new_tokens=2",
            "logger=none",
        )  # fmt: skip
    )
    rows = [json.loads(line) for line in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert [r["model_raw_output"] for r in rows] == REPLIES
    # The written `response` reads, for MMSU's scorer, as the letter the model's own reply reads as.
    assert [official_letter(r["response"]) for r in rows] == [official_letter(reply) for reply in REPLIES]
    gold = {r["id"]: r["answer_gt"] for r in records}
    right = [
        official_letter(reply) not in (None, "") and r[f"choice_{official_letter(reply).lower()}"] == gold[r["id"]]
        for r, reply in zip(rows, REPLIES, strict=True)
    ]
    scored = [official_letter(reply) is not None for reply in REPLIES]
    assert (sum(right), sum(scored)) == (2, 6)  # by hand: B and A right; two replies dropped
    assert metrics["eval/mmsu/accuracy"] == pytest.approx(sum(right) / sum(scored))  # dropped replies left out
    assert metrics["eval/mmsu/accuracy_strict"] == pytest.approx(sum(right) / len(REPLIES))
    assert metrics["eval/accuracy"] == pytest.approx(sum(right) / len(REPLIES))  # avrl's protocol: dropped = wrong

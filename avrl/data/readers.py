"""Readers for the published data formats (field names from the R1-AQA, EchoInk-R1 and MMAU releases).

Each reader validates every record before training starts and checks that each media file exists and is not
empty. A bad record raises `DataError` naming the file and the line or item, or, with `on_error="skip"`, is left
out and reported in the returned list of skipped records (never dropped silently).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from avrl.data.items import DataError, QAItem
from avrl.prompts import LETTERS

Skipped = list[dict[str, str]]


def _media_path(value: Any, root: Path, source: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{source}: no {what} path")
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise DataError(f"{source}: {what} file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{source}: {what} file is empty: {path}")
    return str(path)


def _choices(value: Any, source: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: empty or missing choice list")
    return [str(c) for c in value]


def _records_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as e:
                yield source, DataError(f"{source}: malformed JSON line: {e.msg}")


def _records_json_list(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of items")
    for index, record in enumerate(records):
        key = record.get("id", record.get("problem_id", index)) if isinstance(record, dict) else index
        yield f"{path}[item {index}, id {key}]", record


def _read(path, records, parse: Callable[[dict, str], QAItem], on_error: str) -> tuple[list[QAItem], Skipped]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    if not Path(path).is_file():
        raise DataError(f"data file not found: {path}")
    items, skipped = [], []
    for source, record in records:
        try:
            if isinstance(record, Exception):
                raise record
            if not isinstance(record, dict):
                raise DataError(f"{source}: expected a JSON object")
            items.append(parse(record, source))
        except (DataError, KeyError, TypeError, ValueError) as e:
            error = e if isinstance(e, DataError) else DataError(f"{source}: bad record ({type(e).__name__}: {e})")
            if on_error == "raise":
                raise error from None
            skipped.append({"source": source, "reason": str(error)})
    if not items:
        raise DataError(f"{path}: no usable items" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return items, skipped


def read_avqa(path: str | Path, root: str | Path | None = None, on_error: str = "raise"):
    """R1-AQA's AVQA jsonl: {id, question_text, multi_choice, answer: <index>, audio_path, ...}."""
    path = Path(path)
    base = Path(root) if root else path.parent

    def parse(r: dict, source: str) -> QAItem:
        choices = _choices(r["multi_choice"], source)
        answer = r["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{source}: answer {answer!r} is not an index into the {len(choices)} choices")
        # AVQA questions were written for video; R1-AQA reads them as questions about the audio, with a plain
        # str.replace (src/dataset/dataset.py): "videos" becomes "audios" too.
        question = str(r["question_text"]).replace("video", "audio")
        return QAItem(
            id=str(r["id"]), question=question, choices=choices, answer_index=answer,
            audio=_media_path(r["audio_path"], base, source, "audio"),
            category=r.get("question_type"), source=source, meta=r,
        )

    return _read(path, _records_jsonl(path), parse, on_error)


_OPTION = re.compile(r"^\s*([A-Z])[.)]\s*(.*)$", re.DOTALL)
_SOLUTION = re.compile(r"<answer>\s*([A-Z])\s*</answer>")


def read_avqa_r1(path: str | Path, root: str | Path | None = None, on_error: str = "raise"):
    """EchoInk-R1's AVQA-R1 json list: {problem_id, problem, options: ["A. ..", ..], solution: "<answer>B</answer>",
    path: {image, audio}}, media paths relative to the split folder."""
    path = Path(path)
    base = Path(root) if root else path.parent

    def parse(r: dict, source: str) -> QAItem:
        options = _choices(r["options"], source)
        choices = []
        for i, option in enumerate(options):
            m = _OPTION.match(option)
            if not m or m.group(1) != LETTERS[i]:
                raise DataError(f"{source}: option {i} {option!r} is not lettered {LETTERS[i]}")
            choices.append(m.group(2).strip())
        solution = _SOLUTION.search(str(r["solution"]))
        if not solution or LETTERS.index(solution.group(1)) >= len(choices):
            raise DataError(f"{source}: solution {r['solution']!r} does not name one of the {len(choices)} options")
        media = r["path"]
        return QAItem(
            id=str(r["problem_id"]), question=str(r["problem"]), choices=choices,
            answer_index=LETTERS.index(solution.group(1)),
            audio=_media_path(media.get("audio"), base, source, "audio"),
            image=_media_path(media.get("image"), base, source, "image") if media.get("image") else None,
            category=r.get("data_source"), source=source, meta=r, options_text=[str(o) for o in options],
        )

    return _read(path, _records_json_list(path), parse, on_error)


def read_mmau(path: str | Path, root: str | Path | None = None, on_error: str = "raise"):
    """MMAU test-mini json list: {id, audio_id: "./test-mini-audios/<id>.wav", question, choices, answer: <text>,
    task, difficulty, ...}."""
    path = Path(path)
    base = Path(root) if root else path.parent

    def parse(r: dict, source: str) -> QAItem:
        choices = _choices(r["choices"], source)
        if r["answer"] not in choices:
            raise DataError(f"{source}: answer {r['answer']!r} is not among the choices {choices}")
        return QAItem(
            id=str(r["id"]), question=str(r["question"]), choices=choices, answer_index=choices.index(r["answer"]),
            audio=_media_path(r["audio_id"], base, source, "audio"),
            category=r.get("task"), difficulty=r.get("difficulty"), source=source, meta=r,
        )

    return _read(path, _records_json_list(path), parse, on_error)


READERS = {"avqa": read_avqa, "avqa_r1": read_avqa_r1, "mmau": read_mmau}

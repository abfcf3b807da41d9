"""Readers for the published data formats (field names from the R1-AQA, EchoInk-R1, MMAU, MMAR, MMSU and MMAU-Pro
releases). A record without its answer key (MMAU's test set) is read for prediction only (`answer_index` None).

Each reader validates every record before training starts: its text must be UTF-8 (a leading byte-order mark is
accepted), its fields well formed, each media file must exist and not be empty, and each audio file's header must
show audio with samples and, for a WAV, no data cut off (`media.check_audio_header`; no clip is decoded here). A bad
record raises `DataError` naming the file and the line or item, or, with `on_error="skip"`, is left out and
reported in the returned list of skipped records (never dropped silently). What stops a whole file (not found, not
a JSON list, a JSON list that is not UTF-8) raises whatever the policy. `check_audio=False` (`data.check_audio=false`)
leaves the audio checks to the moment each clip is loaded (e.g. where reading every header up front is slow).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from avrl.data.items import LETTERS, DataError, QAItem
from avrl.data.media import check_audio_header

Skipped = list[dict[str, str]]
BOM = b"\xef\xbb\xbf"


class _Media:
    """Resolves and checks the media paths of one read; an audio file's header is read once however many records
    name it (AVQA and MMAU ask several questions about one clip)."""

    def __init__(self, root: Path, check_audio: bool):
        self.root, self.check_audio = root, check_audio
        self.audio_problems: dict[str, str | None] = {}

    def __call__(self, value: Any, source: str, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise DataError(f"{source}: no {what} path")
        path = Path(value) if Path(value).is_absolute() else self.root / value
        if not path.is_file():
            raise DataError(f"{source}: {what} file not found: {path}")
        if path.stat().st_size == 0:
            raise DataError(f"{source}: {what} file is empty: {path}")
        if what == "audio" and self.check_audio:
            key = str(path)
            if key not in self.audio_problems:
                self.audio_problems[key] = check_audio_header(key)
            if self.audio_problems[key]:
                raise DataError(f"{source}: audio file {path} {self.audio_problems[key]}")
        return str(path)


def _not_utf8(error: UnicodeDecodeError, data: bytes, offset: int = 0) -> str:
    """Where and what the first byte that is not UTF-8 is: "L: not UTF-8 text: byte 0x.. at column C (...)", the
    line L and column C (in bytes) counted from 1 in `data`, the file's bytes; `offset`: where the decoded part starts
    (the error's positions are relative to it)."""
    at = offset + error.start
    line_start = data.rfind(b"\n", 0, at) + 1
    line, column = data.count(b"\n", 0, at) + 1, at - line_start + 1
    return (
        f"{line}: not UTF-8 text: byte 0x{data[at]:02x} at column {column} (in bytes; is the file in another "
        f"encoding, such as Latin-1 or Windows-1252? save it as UTF-8)"
    )


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, without a UTF-8 byte-order mark. Editors and tools on Windows (Notepad, PowerShell's
    Out-File -Encoding utf8, Excel's "CSV UTF-8") start UTF-8 files with one; it is an encoding marker, not data,
    so it is accepted silently, as Python's utf-8-sig codec does. UTF-16/32 (PowerShell 5's default for `>`) is
    refused, naming the encoding."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    data = path.read_bytes()
    if data.startswith(BOM):
        return data[len(BOM) :]
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:4] == b"\x00\x00\xfe\xff":
        raise DataError(
            f"{path}:1: the file is UTF-16 or UTF-32 (it starts with that byte-order mark); save it as UTF-8"
        )
    return data


def _choices(value: Any, source: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: empty or missing choice list")
    return [str(c) for c in value]


def _records_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(source "file:line", record or the DataError of that line): a line that is not UTF-8 or not JSON is a bad
    record like any other (the skip policy applies to it)."""
    data, offset = _read_bytes(path), 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        source = f"{path}:{number}"
        start, offset = offset, offset + len(raw) + 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield source, DataError(f"{path}:{_not_utf8(e, data, start)}")
            continue
        if not line.strip():
            continue
        try:
            yield source, json.loads(line)
        except json.JSONDecodeError as e:
            yield source, DataError(f"{source}: malformed JSON line: {e.msg}")


def _records_json_list(path: Path) -> Iterator[tuple[str, Any]]:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # the whole list is unreadable: a file-level error, whatever the policy
        raise DataError(f"{path}:{_not_utf8(e, data)}") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of items")
    for index, record in enumerate(records):
        key = record.get("id", record.get("problem_id", index)) if isinstance(record, dict) else index
        yield f"{path}[item {index}, id {key}]", record


def _records_json_or_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON list when the file's first non-blank character is `[`, else JSONL (MMSU publishes a JSON list in
    files it names .jsonl)."""
    data = _read_bytes(path)
    return _records_json_list(path) if data.lstrip()[:1] == b"[" else _records_jsonl(path)


def _records_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    """A parquet's rows as plain Python records (pyarrow: lists stay lists), each named "file[row i, id X]"."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    for index, record in enumerate(rows):
        yield f"{path}[row {index}, id {record.get('id', index)}]", record


def _answer_index(record: dict, key: str, choices: list[str], source: str) -> int | None:
    """The answer's index among the choices; None when the record has no answer key (prediction only)."""
    if key not in record:
        return None
    if record[key] not in choices:
        raise DataError(f"{source}: {key} {record[key]!r} is not among the choices {choices}")
    return choices.index(record[key])


def _read(path, records, parse: Callable[[dict, str], QAItem], on_error: str) -> tuple[list[QAItem], Skipped]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
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


def read_avqa(path: str | Path, root: str | Path | None = None, on_error: str = "raise", check_audio: bool = True):
    """R1-AQA's AVQA jsonl: {id, question_text, multi_choice, answer: <index>, audio_path, ...}."""
    path = Path(path)
    media_path = _Media(Path(root) if root else path.parent, check_audio)

    def parse(r: dict, source: str) -> QAItem:
        choices = _choices(r["multi_choice"], source)
        answer = r["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{source}: answer {answer!r} is not an index into the {len(choices)} choices")
        # AVQA questions were written for video; R1-AQA reads them as questions about the audio, with a plain
        # str.replace (src/dataset/dataset.py): "videos" becomes "audios" too.
        question = str(r["question_text"]).replace("video", "audio")
        return QAItem(
            id=str(r["id"]),
            question=question,
            choices=choices,
            answer_index=answer,
            audio=media_path(r["audio_path"], source, "audio"),
            category=r.get("question_type"),
            source=source,
            meta=r,
        )

    return _read(path, _records_jsonl(path), parse, on_error)


_OPTION = re.compile(r"^\s*([A-Z])[.)]\s*(.*)$", re.DOTALL)
_SOLUTION = re.compile(r"<answer>\s*([A-Z])\s*</answer>")


def read_avqa_r1(path: str | Path, root: str | Path | None = None, on_error: str = "raise", check_audio: bool = True):
    """EchoInk-R1's AVQA-R1 json list: {problem_id, problem, options: ["A. ..", ..], solution: "<answer>B</answer>",
    path: {image, audio}}, media paths relative to the split folder."""
    path = Path(path)
    media_path = _Media(Path(root) if root else path.parent, check_audio)

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
            id=str(r["problem_id"]),
            question=str(r["problem"]),
            choices=choices,
            answer_index=LETTERS.index(solution.group(1)),
            audio=media_path(media.get("audio"), source, "audio"),
            image=media_path(media.get("image"), source, "image") if media.get("image") else None,
            category=r.get("data_source"),
            source=source,
            meta=r,
            options_text=[str(o) for o in options],
        )

    return _read(path, _records_json_list(path), parse, on_error)


def read_mmau(path: str | Path, root: str | Path | None = None, on_error: str = "raise", check_audio: bool = True):
    """MMAU json list: {id, audio_id: "./test-mini-audios/<id>.wav", question, choices, answer: <text>, task,
    difficulty, sub-category, ...}. The test set has no `answer`: its items are read for prediction only."""
    path = Path(path)
    media_path = _Media(Path(root) if root else path.parent, check_audio)

    def parse(r: dict, source: str) -> QAItem:
        choices = _choices(r["choices"], source)
        return QAItem(
            id=str(r["id"]),
            question=str(r["question"]),
            choices=choices,
            answer_index=_answer_index(r, "answer", choices, source),
            audio=media_path(r["audio_id"], source, "audio"),
            category=r.get("task"),
            difficulty=r.get("difficulty"),
            source=source,
            meta=r,
        )

    return _read(path, _records_json_list(path), parse, on_error)


def read_mmar(path: str | Path, root: str | Path | None = None, on_error: str = "raise", check_audio: bool = True):
    """MMAR's MMAR-meta.jsonl: {id, audio_path: "./audio/<id>.wav", question, choices (2-6 texts), answer: <text>,
    modality, category, sub-category, ...}. QAItem.category: the modality."""
    path = Path(path)
    media_path = _Media(Path(root) if root else path.parent, check_audio)

    def parse(r: dict, source: str) -> QAItem:
        choices = _choices(r["choices"], source)
        return QAItem(
            id=str(r["id"]),
            question=str(r["question"]),
            choices=choices,
            answer_index=_answer_index(r, "answer", choices, source),
            audio=media_path(r["audio_path"], source, "audio"),
            category=r.get("modality"),
            source=source,
            meta=r,
        )

    return _read(path, _records_jsonl(path), parse, on_error)


MMSU_CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


def read_mmsu(path: str | Path, root: str | Path | None = None, on_error: str = "raise", check_audio: bool = True):
    """MMSU's records, a JSON list or JSONL: {id, audio_path, question, choice_a..choice_d (C and D may be absent
    or null), answer_gt: <text>, task_name, category, sub-category, ...}. QAItem.category: the task_name."""
    path = Path(path)
    media_path = _Media(Path(root) if root else path.parent, check_audio)

    def parse(r: dict, source: str) -> QAItem:
        present = [r.get(k) is not None for k in MMSU_CHOICES]
        count = present.index(False) if False in present else len(present)
        if count < 2 or any(present[count:]):
            raise DataError(f"{source}: choices must be choice_a, choice_b and optionally _c, _d, without gaps")
        choices = [str(r[k]) for k in MMSU_CHOICES[:count]]
        return QAItem(
            id=str(r["id"]),
            question=str(r["question"]),
            choices=choices,
            answer_index=_answer_index(r, "answer_gt", choices, source),
            audio=media_path(r["audio_path"], source, "audio"),
            category=r.get("task_name"),
            source=source,
            meta=r,
        )

    return _read(path, _records_json_or_jsonl(path), parse, on_error)


def read_mmau_pro(path: str | Path, root: str | Path | None = None, on_error: str = "raise", check_audio: bool = True):
    """MMAU-Pro's parquet: {id, audio_path: [<clip>, ...], question, choices (none for `open` and `instruction
    following`), answer: <text>, category, ...}. Every clip is checked; QAItem.audio is the first, the others are
    QAItem.more_audio, in the record's order (all of them go in the prompt). An answer that is not among the
    choices (or an item without choices) leaves answer_index None: such items are scored by their own rules
    (avrl/rules/mmau_pro.py), not by the choice."""
    path = Path(path)
    media_path = _Media(Path(root) if root else path.parent, check_audio)

    def parse(r: dict, source: str) -> QAItem:
        clips = r["audio_path"]
        clips = [clips] if isinstance(clips, str) else clips
        if not isinstance(clips, list) or not clips:
            raise DataError(f"{source}: audio_path must be a non-empty list of clips")
        audio = [media_path(c, source, "audio") for c in clips]
        choices = [str(c) for c in (r.get("choices") or [])]
        answer = r.get("answer")
        return QAItem(
            id=str(r["id"]) if "id" in r else source,
            question=str(r["question"]),
            choices=choices,
            answer_index=choices.index(answer) if answer in choices else None,
            audio=audio[0],
            more_audio=tuple(audio[1:]),
            category=r.get("category"),
            source=source,
            meta=r,
        )

    return _read(path, _records_parquet(path), parse, on_error)


READERS = {
    "avqa": read_avqa,
    "avqa_r1": read_avqa_r1,
    "mmau": read_mmau,
    "mmar": read_mmar,
    "mmsu": read_mmsu,
    "mmau_pro": read_mmau_pro,
}

"""Secrets never reach MLflow params, tags or run names, artifacts, logs, sweep summaries, or the files Hydra
writes into the output folders (.hydra/*.yaml, multirun.yaml).

What counts as a secret:
- the password of a URI (postgresql://user:secret@host), and the whole user part of an http(s) URI, where a
  token sits (https://TOKEN@host);
- the value of a query parameter or setting whose name says so (?password=..., hub_token=..., db.password: ...).
  A name says so when one of its words (split at . _ - /) is password, passwd, pwd, token, secret, credential(s),
  auth, authorization, apikey, or when it ends in the word key (api_key, hf_key, access_key); not when it ends
  in id, count, length, type, file or path (pad_token_id, token_count, token_file).
"""

from __future__ import annotations

import re
from pathlib import Path

from avrl.atomic import write_atomic

SECRET_WORDS = {
    "password",
    "passwd",
    "pwd",
    "token",
    "secret",
    "secrets",
    "credential",
    "credentials",
    "auth",
    "authorization",
    "apikey",
    "api_key",
}
MASK = "***"
_WORD = r"[A-Za-z0-9]+"

# Hydra writes an override's colons escaped (https\://...), once or twice over in YAML and JSON: both forms.
_ESC = r"(?:\\{1,2})?"
_PASSWORD_IN_URI = re.compile(rf"(//[^:/@\s\\]+{_ESC}:)[^@\s/]+@")  # scheme://user:PASSWORD@host
_TOKEN_IN_HTTP_URI = re.compile(rf"(https?{_ESC}://)[^:/@\s\\]+@")  # https://TOKEN@host
_NAMED = r"[+~]{0,2}[A-Za-z0-9_.\-/]+"
_ASSIGNMENT = re.compile(rf"(?P<name>{_NAMED})(?P<sep>=|: )(?P<value>'[^']*'|\"[^\"]*\"|[^\s,&'\"]+)")


def is_secret_name(name: str) -> bool:
    """Whether a setting's name says it holds a secret (pad_token_id, max_new_tokens and token counts do not)."""
    words = [w.lower() for w in re.findall(_WORD, name)]
    if not words or words[-1] in ("id", "ids", "count", "length", "len", "type", "file", "path"):
        return False
    return any(w in SECRET_WORDS for w in words) or words[-1] == "key" or "api_key" in name.lower()


def redact(value: object) -> object:
    """A string with every secret in it masked (other values are returned as they are)."""
    if not isinstance(value, str):
        return value
    text = _PASSWORD_IN_URI.sub(rf"\1{MASK}@", value)
    text = _TOKEN_IN_HTTP_URI.sub(rf"\1{MASK}@", text)

    def assignment(match: re.Match) -> str:
        name, sep, value = match["name"], match["sep"], match["value"]
        if not is_secret_name(name):  # its value may still hold one: url=https://h/?token=...
            return f"{name}{sep}{_ASSIGNMENT.sub(assignment, value)}"
        return match[0] if value.strip("'\"") in ("", MASK, "null", "None") else f"{name}{sep}{MASK}"

    return _ASSIGNMENT.sub(assignment, text)


def redact_param(key: str, value: object) -> object:
    """A param whose name says it holds a secret is never logged; strings lose the secrets in them."""
    secret = is_secret_name(key) and value not in (None, "")
    return MASK if secret and not isinstance(value, (dict, list)) else redact(value)


def redacted(data: object, key: str = "") -> object:
    """A resolved config container with every secret redacted (for the config.yaml artifact)."""
    if isinstance(data, dict):
        return {k: redacted(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v, key) for v in data]
    return redact_param(key, data)


def _written_by_hydra_or_avrl(path: Path) -> bool:
    """The files where overrides land: Hydra's .hydra/*.yaml and multirun.yaml, job and submitit logs, avrl's
    summaries. Never a model's files (a tokenizer's vocabulary may hold anything)."""
    return (
        path.parent.name == ".hydra"
        or path.name in ("multirun.yaml", "sweep_summary.json", "report.md")
        or path.suffix in (".log", ".out", ".err")
    )


def scrub(folder: str | Path, pickles: bool = False) -> list[Path]:
    """Rewrite, atomically, each file under `folder` where overrides land (see above) that holds a secret; with
    `pickles`, remove the pickles of submitit's finished jobs too (they hold the job's overrides; a re-run of the
    sweep submits afresh). The files changed."""
    changed = []
    paths = sorted(Path(folder).rglob("*"))
    finished = {p.parent for p in paths if p.name.endswith("_result.pkl")}  # (a running job's pickle stays: a
    for path in paths:  # requeue reads it)
        if pickles and path.suffix == ".pkl" and ".submitit" in path.parts:
            if path.parent in finished:
                path.unlink(missing_ok=True)
                changed.append(path)
            continue
        if not path.is_file() or not _written_by_hydra_or_avrl(path):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        clean = redact(text)
        if clean != text:
            write_atomic(path, clean)
            changed.append(path)
    return changed

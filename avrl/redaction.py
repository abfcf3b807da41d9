"""Secrets never reach MLflow params, artifacts, logs or sweep summaries: passwords in URIs and params whose names
say they hold one are redacted."""

from __future__ import annotations

import re

_SECRET_IN_URI = re.compile(r"(//[^:/@]+:)[^@]+@")


def redact(value: object) -> object:
    """Passwords in URIs (postgresql://user:secret@host) never reach params or logs."""
    return _SECRET_IN_URI.sub(r"\1***@", value) if isinstance(value, str) else value


_SECRET_KEYS = ("token", "password", "passwd", "secret", "api_key", "apikey", "credential")


def redact_param(key: str, value: object) -> object:
    """A param whose name says it holds a secret is never logged; URIs lose their passwords."""
    secret = any(word in key.lower() for word in _SECRET_KEYS) and value not in (None, "")
    return "***" if secret and not isinstance(value, (dict, list)) else redact(value)


def redacted(data: object, key: str = "") -> object:
    """A resolved config container with every secret redacted (for the config.yaml artifact)."""
    if isinstance(data, dict):
        return {k: redacted(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v, key) for v in data]
    return redact_param(key, data)

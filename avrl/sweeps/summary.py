"""The end of a multirun: one line per job (status, objective, overrides, error) printed as a table and written
to <sweep dir>/sweep_summary.json, and the exception that gives the sweep a non-zero exit when jobs failed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from avrl.atomic import write_atomic
from avrl.redaction import redact

log = logging.getLogger(__name__)
SUMMARY_FILE = "sweep_summary.json"


class SweepFailed(SystemExit):
    """Raised after every job of a sweep has run when some of them failed: the message goes to stderr and the
    process exits with status 1, without a traceback of the sweeper (the jobs' own errors are in their logs)."""


def job_row(
    job: int, status: str, overrides: list[str], value=None, error: BaseException | str | None = None, **extra
) -> dict:
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    return {
        "job": job,
        "status": status,
        "value": value,
        "overrides": [redact(o) for o in overrides],
        "error": redact(error) if error else None,
        **extra,
    }


def write_summary(sweep_dir: str | Path, rows: list[dict], objective: str) -> Path:
    """Log the table of jobs (overrides shared by all jobs once, then what differs per job) and save it as JSON
    in the sweep folder."""
    path = Path(sweep_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"objective": objective, "jobs": rows}, indent=2, default=str))
    common = [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows)] if len(rows) > 1 else []
    done = sum(r["status"] in ("COMPLETED", "COMPLETE") for r in rows)
    lines = [f"sweep summary: {done} of {len(rows)} jobs completed; {objective} per job"]
    if common:
        lines.append(f"  all jobs: {' '.join(common)}")
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        own = [o for o in r["overrides"] if o not in common]
        lines.append(f"  #{r['job']:<3} {r['status']:<9} {value:>8}  {' '.join(own)}")
        if r["error"]:
            lines.append(f"        {r['error'].splitlines()[0][:300]}")
    lines.append(f"  written to {path}")
    log.info("\n".join(lines))
    return path

"""The software a run's numbers depend on: Python, the packages that compute them, and avrl's own commit.

Every MLflow run carries these as `version.<name>` tags (avrl/tracking.py) and the sweep report prints them
(avrl/sweeps/report.py), so a figure can be re-run in the environment that produced it (docs/dependencies.md).
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

# The distributions whose versions change what a run computes; those not installed (vllm, deepspeed) are left out.
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "lightning",
    "deepspeed",
    "trl",
    "vllm",
    "accelerate",
    "tokenizers",
    "numpy",
)
TAG_PREFIX = "version."
REPO = Path(__file__).resolve().parents[1]


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def avrl_commit() -> str:
    """The commit of avrl's checkout, with "-dirty" where tracked files differ from it; "unknown" outside a checkout
    (an installed wheel)."""
    if not (REPO / ".git").exists():
        return "unknown"

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    """{name: version} for python, each installed package of PACKAGES, and avrl (its commit)."""
    found = {"python": platform.python_version()}
    found.update({name: v for name in PACKAGES if (v := installed(name)) is not None})
    found["avrl"] = avrl_commit()
    return found


def version_tags() -> dict[str, str]:
    return {TAG_PREFIX + name: value for name, value in versions().items()}

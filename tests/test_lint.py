"""The lint step of CI (settings in pyproject.toml), over the package, the plugins, the benchmarks and the tests:
ruff's checks (pyflakes' unused and undefined names, pycodestyle, import order), ruff's formatter, and
import-linter's contracts (no import cycle, avrl's layers)."""

import subprocess
import sys
from pathlib import Path

from tests.support import HANG_GUARD, ROOT

PATHS = ["avrl", "hydra_plugins", "benchmarks", "tests", "run.py", ".ci"]


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD
    )


def test_ruff_finds_nothing():
    out = run("ruff", "check", *PATHS)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]


def test_the_code_is_ruff_formatted():
    out = run("ruff", "format", "--check", "--diff", *PATHS)
    assert out.returncode == 0, "run `ruff format` (the diff below)\n" + out.stdout[-5000:] + out.stderr[-2000:]


def test_imports_go_one_way():
    """pyproject.toml's [tool.importlinter]: no package imports a sibling that imports it back, and the layers of the
    README's code map hold, counting imports inside functions."""
    lint_imports = Path(sys.executable).with_name("lint-imports")  # import-linter's command (the dev extra)
    out = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]

"""The lint step of CI (ruff, settings in pyproject.toml): pyflakes' unused and undefined names, pycodestyle, import
order, over the package, the plugins and the tests."""

import subprocess
import sys

from tests.support import HANG_GUARD, ROOT


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "avrl", "hydra_plugins", "tests", "run.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]

"""The software versions every run records, and the sweep report's environment table."""

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

from avrl import versions
from avrl.sweeps.report import environment_table


def test_versions_name_python_the_installed_packages_and_avrls_commit(monkeypatch):
    monkeypatch.setattr(versions, "PACKAGES", ("transformers", "torch", "not-a-package-avrl-knows"))
    found = versions.versions()
    head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], text=True).strip()
    assert found["python"] == platform.python_version()
    assert found["transformers"] == metadata.version("transformers") and found["torch"] == metadata.version("torch")
    assert "not-a-package-avrl-knows" not in found  # absent packages (vllm on most machines) are left out
    assert found["avrl"] in (head, head + "-dirty")
    assert versions.version_tags()["version.python"] == platform.python_version()


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(versions, "REPO", tmp_path)
    assert versions.avrl_commit() == "unknown"


def run(**tags):
    return SimpleNamespace(data=SimpleNamespace(tags={f"version.{k}": v for k, v in tags.items()}))


def test_the_report_lists_each_version_once_and_flags_runs_that_disagree():
    runs = [
        run(python="3.11.7", transformers="5.25.0", avrl="abc"),
        run(python="3.11.7", transformers="5.25.0", avrl="abc"),
        run(python="3.11.7", transformers="5.24.0", avrl="abc"),
    ]
    rows = environment_table(runs).splitlines()[2:]
    assert rows == [
        "| python | 3.11.7 |",
        "| avrl | abc |",
        "| transformers | **differs:** 5.25.0 (2 runs), 5.24.0 (1 runs) |",
    ]
    assert environment_table([SimpleNamespace(data=SimpleNamespace(tags={}))]) == ""


def test_the_lock_pins_every_dependency_within_pyprojects_ranges():
    """constraints.txt (written by .ci/latest from a passing run) and pyproject.toml's ranges agree: a range moved
    past the lock, or a dependency added without re-locking, fails here instead of on a user's machine."""
    import sys

    import tomllib
    from packaging.requirements import Requirement

    root = Path(__file__).parents[1]
    sys.path.insert(0, str(root / ".ci"))
    try:
        import lock
    finally:
        sys.path.remove(str(root / ".ci"))
    pinned = lock.pins((root / "constraints.txt").read_text())
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    required = [Requirement(r) for r in (*project["dependencies"], *extras["dev"], *extras["deepspeed"])]
    checked = [r for r in required if r.name not in lock.LEFT_OUT]
    assert len(checked) > 15
    for requirement in checked:
        name = requirement.name.lower().replace("_", "-")
        assert name in pinned, f"{requirement.name} is not in constraints.txt: run bash .ci/latest"
        assert requirement.specifier.contains(pinned[name]), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}"
        )

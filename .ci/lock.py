"""constraints.txt: the exact package set the suite last passed with (docs/dependencies.md).

    python .ci/lock.py write constraints.txt FREEZE   # FREEZE: `pip freeze --exclude-editable` of that environment
    python .ci/lock.py diff constraints.txt FREEZE    # what moved since the lock

torch is left out: the install commands name it (torch==2.13.0 for the CPU quick start; a GPU user keeps a CUDA
build), and a pin here would replace it.
"""

from __future__ import annotations

import datetime
import platform
import re
import sys
from pathlib import Path

LEFT_OUT = {"torch"}
HEADER = """# The exact set of packages avrl's test suite last passed with, on CPython {python} ({machine}), {date}.
# Written by `bash .ci/latest` (docs/dependencies.md); used as `pip install -c constraints.txt ...` by the quick
# start and CI. torch is not pinned here: the install commands name it.
"""


def pins(text: str) -> dict[str, str]:
    """{normalised name: version} of `name==version` lines (comments, URLs and editable installs skipped)."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def write(lock: Path, freeze: Path) -> None:
    found = {k: v for k, v in pins(freeze.read_text()).items() if k not in LEFT_OUT}
    header = HEADER.format(
        python=platform.python_version(),
        machine=f"{sys.platform}, {platform.machine()}",
        date=datetime.date.today().isoformat(),
    )
    lock.write_text(header + "".join(f"{name}=={version}\n" for name, version in sorted(found.items())))


def diff(lock: Path, freeze: Path) -> None:
    old = pins(lock.read_text()) if lock.exists() else {}
    new = {k: v for k, v in pins(freeze.read_text()).items() if k not in LEFT_OUT}
    moved = [
        f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]
    print(f"{len(moved)} packages differ from {lock}" + (":\n" + "\n".join(moved) if moved else ""))


if __name__ == "__main__":
    command, lock, freeze = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    {"write": write, "diff": diff}[command](lock, freeze)

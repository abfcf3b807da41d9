"""tests/support/load.py, the artificial CPU load under which the suite is shown not to race the clock."""

import json
import sys

from tests.support.load import main


def test_runs_the_command_under_load_and_stops_at_the_first_failure(tmp_path):
    out = tmp_path / "runs.json"
    assert main(["--workers", "1", "--runs", "2", "--out", str(out), "--", sys.executable, "-c", "pass"]) == 0
    assert [r["exit_code"] for r in json.loads(out.read_text())["runs"]] == [0, 0]
    assert main(["--workers", "1", "--runs", "3", "--out", str(out), "--", sys.executable, "-c", "exit(3)"]) == 3
    assert [r["exit_code"] for r in json.loads(out.read_text())["runs"]] == [3]

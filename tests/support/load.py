"""Run a command under an artificial CPU load, to show that the tests do not race the clock on a busy machine.

    python -m tests.support.load -- python -m pytest               # the suite once, with one busy process per core
    python -m tests.support.load --runs 3 -- python -m pytest -m slow  # three times in a row; stops at the first fail

The load is `--workers` processes (default: one per core) spinning in pure Python at normal priority, so the
command's processes get about half the CPU they would get on an idle machine. They are started before the first
run and stopped after the last, also on failure or Ctrl-C. Each run's exit status and wall time are printed and, with
`--out`, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time


def spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="busy processes (default: one per core)")
    parser.add_argument("--runs", type=int, default=1, help="run the command this many times in a row")
    parser.add_argument("--out", help="write the runs' figures to this JSON file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    stop = mp.Event()
    workers = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.workers)]
    for w in workers:
        w.start()
    runs = []
    try:
        for i in range(args.runs):
            start = time.perf_counter()
            code = subprocess.call(command)
            runs.append({"run": i + 1, "exit_code": code, "seconds": round(time.perf_counter() - start, 1)})
            print(
                f"[load: {args.workers} busy processes] run {i + 1}/{args.runs}: exit {code} "
                f"after {runs[-1]['seconds']:.0f} s",
                flush=True,
            )
            if code != 0:
                break
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command, "workers": args.workers, "runs": runs}, f, indent=2)
    return max((r["exit_code"] for r in runs), key=abs, default=0)


if __name__ == "__main__":
    sys.exit(main())

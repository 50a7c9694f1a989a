"""Run the multi-process tests (DDP, FSDP2, the sharded projection, train_edit.py on two ranks) again and again
while CPU-bound processes run beside them, as CI's two shared cores do, and count how each run ended.

    python tests/utils/stress_multiprocess.py --runs 100 [--burners 1] [--tests tests/test_ddp.py ...]

Each run is a fresh `pytest` process over the tests; a failed run keeps its output in --log_dir. It prints one
table row per test and exits non-zero if any run failed, so a race that fires once in a hundred is seen.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
MULTI_PROCESS_TESTS = ["tests/test_ddp.py", "tests/test_job.py::test_train_edit_under_two_cpu_ranks"]


def burn() -> None:
    """A CPU-bound loop: the load of the rest of the suite."""
    while True:
        pass


def outcomes(report: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped, from pytest's JUnit XML."""
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        states = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[name] = states[0] if states else "passed"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="how many times to run the tests")
    parser.add_argument("--burners", type=int, default=1, help="CPU-bound processes beside the tests")
    parser.add_argument("--tests", nargs="+", default=MULTI_PROCESS_TESTS, help="pytest node ids to run")
    parser.add_argument("--log_dir", default=None, help="where failed runs' output is kept (default: a temp dir)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="stress_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for burner in burners:
        burner.start()
    counts: dict[str, Counter] = {}
    failed_runs, finished, started = 0, 0, time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: still report what ran
    try:
        for run in range(1, args.runs + 1):
            report = log_dir / "report.xml"
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args.tests],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            )
            for test, state in outcomes(report).items():
                counts.setdefault(test, Counter())[state] += 1
            if done.returncode != 0:
                failed_runs += 1
                (log_dir / f"run{run}.log").write_text(done.stdout + done.stderr)
            finished = run
            print(
                f"run {run}/{args.runs}: {'ok' if done.returncode == 0 else 'FAILED'} "
                f"({time.monotonic() - started:.0f} s so far)",
                flush=True,
            )
    finally:
        for burner in burners:
            burner.terminate()
        print(
            f"\n{finished} of {args.runs} runs finished beside {args.burners} CPU-bound process(es), "
            f"{time.monotonic() - started:.0f} s\n"
        )
        print("| test | passed | failed | error |\n|---|---|---|---|")
        for test, count in sorted(counts.items()):
            print(f"| {test} | {count['passed']} | {count['failure']} | {count['error']} |")
        print(f"\nfailed runs: {failed_runs}" + (f" (their output: {log_dir})" if failed_runs else ""), flush=True)
    sys.exit(1 if failed_runs else 0)


if __name__ == "__main__":
    main()

"""What the bench scripts measure with: peak memory, and runs in a fresh process (a worker) that
report back a JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import torch


MARK = "RESULT "


class PeakMemory:
    """Inside `with PeakMemory() as memory:`, `memory.peak` becomes the bytes in use above the start:
    peak GPU memory allocated on CUDA, else peak resident memory (sampled every 2 ms, a thread that
    takes some CPU, so time the work in runs of its own where that matters). Resident memory only
    grows where the allocator has no freed memory to reuse: measure in a fresh process
    (`run_worker`)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, self.process.memory_info().rss - self.start)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()


def print_result(result: dict) -> None:
    """Worker side of `run_worker`: report the result on stdout."""
    print(MARK + json.dumps(result), flush=True)


def run_worker(script: str, *args: str) -> dict:
    """The result that `script *args` reports (`print_result`) from a fresh process: its timing and
    its peak memory are its own, not shaped by what an earlier run left in the allocator."""
    done = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])

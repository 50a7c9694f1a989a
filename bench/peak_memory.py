"""Peak memory of a block of work, as the bench tables report it."""

from __future__ import annotations

import threading
import time

import psutil
import torch


class PeakMemory:
    """Inside `with PeakMemory() as memory:`, `memory.peak` becomes the bytes in use above the start:
    peak GPU memory allocated on CUDA, else peak resident memory (sampled every 2 ms, a thread that
    takes some CPU, so time the work in runs of its own where that matters)."""

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

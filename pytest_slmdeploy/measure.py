"""Process measurements shared by the stages: peak RSS of this process while a block runs."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psutil


def rss_bytes() -> int:
    """This process's resident set size now."""
    return int(psutil.Process().memory_info().rss)


class PeakRss:
    """Sample this process's RSS in a thread; ``peak`` is the highest value seen.

    psutil, not ``psutil.virtual_memory()``: system-wide "used" memory says
    nothing about the model (ONNX Runtime GenAI's own benchmark mixes the two up).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slmdeploy-rss", daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, int(process.memory_info().rss))

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class Stopwatch:
    """Elapsed seconds since construction (monotonic)."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0

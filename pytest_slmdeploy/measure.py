"""Process measurements shared by the stages: peak RSS of this process while a block runs, and a deployed model
measured alone in a process of its own."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import psutil

from pytest_slmdeploy.errors import SlmDeployError
from pytest_slmdeploy.settings import allowed_cpus, auto_threads


def rss_bytes() -> int:
    """This process's resident set size now."""
    return int(psutil.Process().memory_info().rss)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (*_MALLINFO2_FIELDS, "keepcost")]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


def malloc_in_use_bytes() -> int:
    """Bytes the C allocator has handed out and not had back, over all its arenas (glibc's ``mallinfo2``): a
    leak of native memory adds to it at once, while pages the allocator keeps, reuses or returns between calls
    do not move it. 0 where the allocator cannot tell (then only RSS is evidence). Python's small objects live
    in arenas of their own, outside it."""
    info = _mallinfo2()
    if info is None:
        return 0
    result = info()
    return int(result.uordblks + result.hblkhd)


def cpus_busy_elsewhere(seconds: float = 0.3) -> float:
    """How many CPUs' worth of work other processes did over the next ``seconds`` on the CPUs this process may
    use (its own use left out): a background job, another CI step."""
    own = psutil.Process()
    own.cpu_percent(None)
    per_cpu = psutil.cpu_percent(interval=seconds, percpu=True)
    total = sum(per_cpu[i] for i in allowed_cpus() if i < len(per_cpu)) / 100
    return max(0.0, total - own.cpu_percent(None) / 100)


def free_cpus(share: int, cpus: int, busy_elsewhere: float) -> int:
    """Threads for this process's own CPU-bound work: its ``share`` of the ``cpus`` it may use (see
    :func:`~pytest_slmdeploy.settings.auto_threads`), fewer when other processes already keep some busy; at
    least 1."""
    return max(1, min(share, math.floor(cpus - busy_elsewhere + 0.5)))


def threads_free_now() -> tuple[int, str]:
    """:func:`free_cpus` for this process now (its share of the CPUs, less the busy ones), and the words for a
    progress line ("1 thread (of 2 CPUs; other processes use 2.0 CPUs)")."""
    cpus = len(allowed_cpus())
    busy = cpus_busy_elsewhere()
    threads = free_cpus(auto_threads(), cpus, busy)
    why = f"; other processes use {busy:.1f} CPUs" if busy >= 0.5 else ""
    return threads, f"{threads} thread{'s' if threads != 1 else ''} (of {cpus} CPUs{why})"


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op threads for the work inside (GPTQ, the source's references): ``threads``, never more
    than PyTorch's own setting (one per physical core, or the user's ``OMP_NUM_THREADS``); restored afterwards.
    PyTorch's OpenMP threads wait for each other at every small operation: with more threads than free cores
    they wait on threads the OS has put aside (SmolLM2's GPTQ beside two busy processes: 338 s on 2 threads,
    144 s on 1, 59 s on 2 on a quiet machine; beside another pytest-xdist worker's checks, 695 s on 2)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(threads, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class OtherLoad:
    """Other processes' CPU use, in CPUs on average: the machine's busy time less this process's own and its
    descendants' (pytest-xdist's workers, the model-alone child, and what they ran). Measured over the spans
    between :meth:`resume` and :meth:`pause` (the timed tests) when there were any, else since it was made (an
    xdist controller, whose workers time)."""

    def __init__(self) -> None:
        self._start = self._snapshot()
        self._span: tuple[float, float, float] | None = None
        self._wall = self._others = 0.0

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        machine = psutil.cpu_times()
        # Linux counts guest time inside user and nice already; idle and iowait are not work.
        busy = sum(machine) - machine.idle - sum(getattr(machine, f, 0.0) for f in ("iowait", "guest", "guest_nice"))
        process = psutil.Process()
        times = process.cpu_times()
        own = times.user + times.system + times.children_user + times.children_system  # and its ended children
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                own += child_times.user + child_times.system + child_times.children_user + child_times.children_system
        return time.monotonic(), busy, own

    @staticmethod
    def _between(first: tuple[float, float, float], last: tuple[float, float, float]) -> tuple[float, float]:
        """(wall seconds, other processes' CPU seconds) from ``first`` to ``last``."""
        return last[0] - first[0], max(0.0, (last[1] - first[1]) - (last[2] - first[2]))

    def resume(self) -> None:
        self._span = self._snapshot()

    def pause(self) -> None:
        if self._span is not None:
            wall, others = self._between(self._span, self._snapshot())
            self._wall, self._others, self._span = self._wall + wall, self._others + others, None

    def cpus(self) -> float:
        wall, others = (self._wall, self._others) if self._wall > 0 else self._between(self._start, self._snapshot())
        return others / wall if wall > 0 else 0.0


def in_use_rss_bytes() -> int:
    """RSS once the C allocator has handed its free pages back (glibc's ``malloc_trim``): what is left is
    memory in use, so a small leak shows at once instead of first filling pages freed earlier (a leak of 24 kB
    per generation stayed invisible for dozens of generations in plain RSS). Slower than :func:`rss_bytes`;
    the same as it where the allocator has no trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return rss_bytes()


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


# The deployed model alone in a fresh process: its peak RSS is the model's, not that of the pytest process
# (which holds Olive, torch and the fp32 source for the fidelity references, 575 MB for a 0.3 MB model).
_ALONE = """
import json, resource, sys, time
from pathlib import Path
from statistics import median
def peak_bytes():
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would be the parent's peak.
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS

from pytest_slmdeploy.checklist.lengths import prompt_of_tokens
from pytest_slmdeploy.runtime import open_model
entry, prompt_tokens, new, rounds, threads, spinning, seconds, max_rounds = sys.argv[1:]
model = open_model("ort-genai", Path(entry), cache_root=Path(entry), model_name="alone", threads=int(threads),
                   spinning={"on": True, "off": False}.get(spinning))
backend = model.backend
prompt = prompt_of_tokens(int(prompt_tokens), lambda text: len(backend.encode(backend.render(text))))
def one():
    return model.generate(prompt, max_new_tokens=int(new), min_new_tokens=int(new))
one()
runs = [one() for _ in range(int(rounds))]
start = time.perf_counter()
while time.perf_counter() - start < float(seconds) and len(runs) < int(max_rounds):
    runs.append(one())
cpu = [1e6 * r.decode_cpu_s / max(1, r.new_tokens - 1) for r in runs]
print(json.dumps({
    "decode_tps": round(median(r.decode_tokens_per_s for r in runs), 2),
    "ttft_ms": round(median(r.ttft_s for r in runs) * 1000, 2),
    "decode_cpu_us": round(min(cpu), 2),
    "rounds": len(runs),
    "tokens": sum(r.new_tokens - 1 for r in runs),
    "peak_rss_mb": round(peak_bytes() / 1e6, 1),
}))
"""
# CPU microseconds per decoded token on one thread that does not spin: the work the model does. Other processes
# lengthen the wall time, not this; the host's own noise (other tenants on a shared core) only adds to a round, so
# the least round is the figure: on this project's 2-core VM the tiny model read 39.7-41.8 us in 12 processes
# (medians 41.7-66.7 us) and 39.7-40.9 us beside two CPU-bound processes; SmolLM2 int8 10.1-10.5 ms in both.
CPU_PROMPT_TOKENS = 16
CPU_SECONDS = 2.0


def model_alone(
    entry_dir: Path,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    rounds: int = 5,
    *,
    threads: int,
    spinning: bool | None = None,
    seconds: float = 0.0,
    max_rounds: int = 1000,
) -> dict[str, float]:
    """Median decode tok/s and TTFT, the least CPU microseconds per decoded token of a round (``decode_cpu_us``:
    the model's work per token when ``threads`` is 1 and ``spinning`` off), and the peak RSS (VmHWM) of a fresh
    process that loads only this model (ONNX Runtime GenAI) and generates with it: ``peak_rss_mb`` wherever it is
    reported. One warm-up, then ``rounds`` generations, and more for ``seconds`` (at most ``max_rounds``)."""
    spin = "default" if spinning is None else ("on" if spinning else "off")
    args = [entry_dir, prompt_tokens, new_tokens, rounds, threads, spin, seconds, max_rounds]
    done = subprocess.run([sys.executable, "-c", _ALONE, *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlmDeployError(f"measuring {entry_dir} in a process of its own failed: {last}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures

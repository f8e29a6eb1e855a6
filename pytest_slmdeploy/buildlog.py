"""A build's output: what Olive and the libraries it loads print or log goes to the build's log file, and
nothing of the build stays attached to that file (or to anything else) once the build is over.

Libraries bind a stream when they set up logging: Olive's ``__init__`` adds ``StreamHandler(sys.stdout)``,
torch and transformers ``StreamHandler(sys.stderr)``, Olive adds one more per run for onnxruntime and a file
handler in its cache. Set up during a build, those streams are the build's log, closed when the build ends:
the next build's Olive messages then went to a closed file, Python reported each as a ``--- Logging error ---``
traceback into the new log, and its ``ValueError: I/O operation on closed file.`` hid Olive's real reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from pytest_slmdeploy.errors import describe, first_line

_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")
# Python's report of a handler that failed to write (logging.Handler.handleError): about that handler, not the build.
_LOGGING_ERROR_START = "--- Logging error ---"
_LOGGING_ERROR_END = "Arguments:"


class Records(logging.Handler):
    """Keep Olive's log records so a failure can name Olive's own reason."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def reason(self, log_path: Path | None = None) -> str:
        """Olive's own reason: the exception under its last error ("Pass run failed." says nothing), else the
        last exception line in the log, else its last error or warning."""
        errors = [r for r in self.records if r.levelno >= logging.ERROR]
        for record in reversed(errors):
            cause = _innermost(record.exc_info[1]) if record.exc_info else None
            if cause is not None:
                return f"{first_line(record.getMessage())} {describe(cause)}"
        raised = last_exception_line(log_path) if log_path is not None else None
        if errors:
            return f"{first_line(errors[-1].getMessage())} {raised}" if raised else first_line(errors[-1].getMessage())
        if raised:
            return raised
        messages = [first_line(r.getMessage()) for r in self.records if r.getMessage().strip()]
        for i, message in enumerate(messages):
            if "Invalid config" in message and i > 0:
                return messages[i - 1]
        warnings = [r.getMessage().strip() for r in self.records if r.levelno == logging.WARNING]
        return warnings[0] if warnings else "no output model produced"


def _innermost(exc: BaseException | None) -> BaseException | None:
    while exc is not None and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def last_exception_line(log_path: Path) -> str | None:
    """The last ``SomeError: message`` line of a traceback in the build log (logging's own errors aside)."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    found = None
    in_logging_error = False
    for line in lines:
        text = line.strip()
        if text == _LOGGING_ERROR_START:
            in_logging_error = True
        elif in_logging_error:
            in_logging_error = not text.startswith(_LOGGING_ERROR_END)
        elif match := _EXCEPTION_LINE.match(text):
            found = f"{match.group(1)}: {match.group(2)}"
    return found


def _all_loggers() -> list[logging.Logger]:
    named = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return [logging.getLogger(), *named]


def _handlers() -> set[tuple[str, int]]:
    return {(lg.name, id(h)) for lg in _all_loggers() for h in lg.handlers}


def _detach_new_stream_handlers(before: set[tuple[str, int]]) -> None:
    """Remove and close the stream and file handlers set up during the build: each writes to the build's log
    (closed next) or to a file in Olive's cache (deleted next). Libraries whose handler goes log through
    ``logging.lastResort`` afterwards: the current ``sys.stderr``, warnings and worse."""
    for lg in _all_loggers():
        for handler in list(lg.handlers):
            if (lg.name, id(handler)) not in before and isinstance(handler, logging.StreamHandler):
                lg.removeHandler(handler)
                handler.close()


@contextlib.contextmanager
def _no_tqdm_monitor() -> Iterator[None]:
    """tqdm's monitor thread outlives the bars of a build and holds them (and their stream): not started."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - Olive depends on tqdm
        yield
        return
    saved = tqdm.monitor_interval
    tqdm.monitor_interval = 0
    try:
        yield
    finally:
        tqdm.monitor_interval = saved


@contextlib.contextmanager
def output_to_log(log_path: Path, logger_name: str = "olive") -> Iterator[None]:
    """Send everything the build prints or logs (progress bars included) to ``log_path``; leave nothing behind.

    Three levels, because each tool writes at its own: file descriptors (native code), ``sys.stdout`` and
    ``sys.stderr`` (print, tqdm; pytest may have replaced them), and the logger ``logger_name``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    olive_logger = logging.getLogger(logger_name)
    before = _handlers()
    with log_path.open("a", encoding="utf-8", errors="replace") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter(_FORMAT))
        olive_logger.addHandler(handler)
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _no_tqdm_monitor():
                yield
        finally:
            olive_logger.removeHandler(handler)
            _detach_new_stream_handlers(before)
            log.flush()
            with contextlib.suppress(ValueError, OSError):  # a stream the build replaced may be closed
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)

"""How a run ends: signals, one line per expected failure, a traceback and a request for a report
for a bug; and the log lines' format."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

from omnicache_export.errors import UserError

PROG = "omnicache-export"
BUG = (f"this is a bug in {PROG}; please report it with the command and the traceback")
_ORT_ERRORS = "onnxruntime.capi.onnxruntime_pybind11_state"


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread so that every `finally` and every temporary
    folder's cleanup runs (a BaseException: `except Exception` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _exit_at_once(signum, frame):
    """A second signal while the first one's cleanup runs: stop now (the next run to the output
    removes what is left, as after SIGKILL)."""
    os.write(2, f"{PROG}: error: interrupted again by {signal.Signals(signum).name}: stopped at once\n".encode())
    os._exit(128 + signum)


def _raise_interrupted(signum, frame):
    for s in (signal.SIGINT, signal.SIGTERM):  # the cleanup the exception triggers is not interrupted by Python
        signal.signal(s, _exit_at_once)
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _subject(args: argparse.Namespace) -> str:
    """What the verb works on, to name in a failure that names nothing itself."""
    for name in ("model", "folder", "output"):
        value = getattr(args, name, None)
        if value is not None:
            return str(value)
    return PROG


def _scheduler_frame(exc: BaseException) -> str | None:
    """The diffusers scheduler class where `exc` was raised from inside diffusers' schedulers."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename).as_posix()
        if "/diffusers/schedulers/" in path:
            owner = tb.tb_frame.f_locals.get("self")
            found = type(owner).__name__ if owner is not None else Path(path).stem
        elif found is not None and "/diffusers/" not in path:
            found = None  # raised further down, outside diffusers: not the scheduler's
        tb = tb.tb_next
    return found


def _oserror(exc: OSError, args: argparse.Namespace) -> str:
    name = exc.filename if exc.filename is not None else getattr(args, "output", None) or _subject(args)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"writing {name}: no space left on the device (or over the quota); nothing was kept"
    if exc.errno == errno.EFBIG:
        return f"writing {name}: file too large for the file system or the size limit; nothing was kept"
    text = f"{name}: {exc.strerror or _one_line(exc)}"
    return f"{text} (-> {exc.filename2})" if exc.filename2 else text


def describe(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The one line for an expected failure; None for a bug."""
    if isinstance(exc, UserError):
        return _one_line(exc)
    if type(exc).__module__ == _ORT_ERRORS:
        return f"{_subject(args)}: ONNX Runtime failed: {_one_line(exc)}"
    if isinstance(exc, OSError):
        return _oserror(exc, args)
    scheduler = _scheduler_frame(exc)
    if scheduler is not None and isinstance(exc, (ValueError, IndexError, KeyError, TypeError, RuntimeError)):
        return f"the diffusers scheduler {scheduler} refused the settings: {_one_line(exc) or type(exc).__name__}"
    return None


def error(line: str) -> None:
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


def report(exc: BaseException, args: argparse.Namespace) -> int:
    """Print how the run failed; returns the exit status."""
    verbose = getattr(args, "verbose", False)
    if isinstance(exc, Interrupted):
        error(f"interrupted by {exc.name}; temporary files removed")
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):  # SIGINT outside our handler
        error("interrupted by SIGINT; temporary files removed")
        return 128 + signal.SIGINT
    line = describe(exc, args)
    if line is None:
        traceback.print_exception(exc, file=sys.stderr)
        error(BUG)
        return 1
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    error(line)
    return 2


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        text = f"{PROG}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


@contextlib.contextmanager
def logging_to_stderr(verbose: bool, quiet: bool) -> Iterator[None]:
    """Log lines on stderr while the verb runs: notes with -v, warnings by default, errors with -q."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)

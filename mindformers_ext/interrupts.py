"""SIGTERM / SIGINT / SIGHUP as an exception, so that ``finally`` / ``except`` clean-up (temporary
files of a conversion or a preprocessing run) happens before the process ends."""
from __future__ import annotations

import contextlib
import os
import signal
import threading

__all__ = ["Interrupted", "raise_on_signals", "SIGNALS"]

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(SystemExit):
    """Stopped by a signal; the exit status is 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


@contextlib.contextmanager
def raise_on_signals():
    """Within the block, SIGTERM / SIGINT / SIGHUP raise :class:`Interrupted` (main thread only, where
    handlers can be set; a signal ignored on entry, e.g. SIGHUP under nohup, stays ignored). The
    previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {}
    for sig in SIGNALS:
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            continue
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (the owner of a temporary output, say)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True

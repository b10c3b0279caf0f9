"""A wall-clock limit on one label (``label.timeout``): a calculation that hangs becomes a failed label.

A DFT code that never converges and never gives up (or waits on a dead licence server) would
otherwise hold the label step, and the whole run, for ever on a workstation; on a cluster the
job's time limit kills every label of the step at once. With a limit, the task that exceeds it is
recorded as failed (reason "timed out", in ``failures.json``), the other labels go on, and
``--retry-failed`` (a retried label job) tries it again.

The limit is a ``SIGALRM`` timer in the labeler's main thread. Its handler first terminates the
processes started during the label and their descendants (SIGTERM, SIGKILL after a grace
period: the DFT code an ASE calculator runs through a shell or mpirun, while they are still
findable below the labeler), then raises :class:`LabelTimeout` in the calculation, again every
second until it gives up. A calculation stuck inside one call of native code without returning
to Python is interrupted when that call returns. Elsewhere than the main thread, or without
``setitimer``, no limit applies (with a warning).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError


class LabelTimeout(BaseException):
    """A label took longer than ``label.timeout`` (a ``BaseException``, like ``KeyboardInterrupt``,
    so that a calculator's ``except Exception`` cannot swallow it)."""


def checked_seconds(timeout: float | None, key: str = "label.timeout") -> float | None:
    """A limit in seconds (> 0, finite) as a float, or None (no limit); anything else is a ConfigError naming ``key``."""
    if timeout is None:
        return None
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"must be a number of seconds > 0 (or null: no limit), got {timeout!r}", key=key)
    return seconds


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (Linux); [] where /proc does not list them."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    found: list[int] = []
    todo = _children(pid)
    while todo:
        p = todo.pop(0)
        if p not in found:
            found.append(p)
            todo += _children(p)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def kill_descendants(spare: set[int] = frozenset(), grace_s: float = 3.0) -> list[int]:
    """Terminate every descendant of this process but ``spare`` (SIGTERM, then SIGKILL after ``grace_s``); returns their pids."""
    pids = [p for p in descendants(os.getpid()) if p not in spare]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    return pids


REPEAT_S = 1.0  # after the first alarm, raise again this often until the calculation gives up


def running_children() -> set[int]:
    """The processes below this one now (those a :func:`time_limit` passed them as ``spare`` leaves alone)."""
    return set(descendants(os.getpid()))


@contextmanager
def time_limit(seconds: float | None, spare: set[int] | None = None) -> Iterator[None]:
    """Raise :class:`LabelTimeout` in the block after ``seconds`` of wall-clock time (None or 0: no limit).

    At the alarm, before raising, the processes started in the block (and their children) are
    killed, so a calculator waiting on them (``subprocess.run``, ``Popen.wait``, a socket server's
    ``close``) is released; processes that were running before are left alone. ``spare``
    (from :func:`running_children`) names those processes instead: an oracle MD limits each
    step but, when one hangs, also kills a code server that its first step started. The exception
    derives from ``BaseException`` (a calculator's ``except Exception`` does not swallow it), and
    it is raised again every ``REPEAT_S`` seconds until it leaves the block.
    """
    if not seconds:
        yield
        return
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        warnings.warn(f"label.timeout ({seconds:g} s) needs the main thread and setitimer; no limit applies here", RuntimeWarning, stacklevel=3)
        yield
        return
    armed = [True]
    before = running_children() if spare is None else spare

    def on_alarm(signum, frame):
        if not armed[0]:
            return
        signal.setitimer(signal.ITIMER_REAL, 0.0)  # no alarm while killing
        kill_descendants(spare=before)
        signal.setitimer(signal.ITIMER_REAL, REPEAT_S)
        raise LabelTimeout(f"no result after {seconds:g} s (label.timeout)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)

"""Atomic checkpoint files: a whole payload written to a temporary file in the target's
folder, flushed to disk, then renamed over the target, so a reader sees the old file or the
new one, never a torn one.

The temporary file is ``.<target name>.<pid>.<random>.cahfp-tmp``. It is removed on every
path Python sees (an exception, ``KeyboardInterrupt``, ``SystemExit``). A process killed
mid-write (SIGKILL, power loss) cannot clean up; the next save to the same target removes
the temporary files of processes that no longer exist, so strays never accumulate, and
:func:`load_checkpoint` reads only the target, so strays never affect it.
"""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import threading
from typing import Any

import torch

_SUFFIX = ".cahfp-tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_strays(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files that killed saves to ``path`` left behind (those of
    processes that no longer exist); returns what was removed."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    removed = []
    for stray in glob.glob(os.path.join(glob.escape(folder), glob.escape(f".{name}.") + "*" + _SUFFIX)):
        middle = os.path.basename(stray)[len(name) + 2 : -len(_SUFFIX)]
        pid = middle.split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.unlink(stray)
                removed.append(stray)
            except FileNotFoundError:  # another saver got there first
                pass
    return removed


def save_atomic(payload: Any, path: str | os.PathLike) -> None:
    """``torch.save(payload)`` to ``path`` atomically (the temporary file is removed on failure,
    an interrupt included: SIGINT's handler is deferred while the file is made, so there is no
    moment when it exists and nothing would remove it)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    remove_strays(path)
    fd, tmp = None, None
    held = _hold_interrupts()
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{os.getpid()}.", suffix=_SUFFIX)
        _release(held)  # an interrupt that came meanwhile is raised here, with tmp known
        held = None
        with os.fdopen(fd, "wb") as f:
            fd = None  # the file object owns it now
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _release(held)
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise


def _hold_interrupts() -> tuple[Any, list] | None:
    """Defer SIGINT's Python handler: until :func:`_release`, an interrupt is only recorded.
    Returns ``(previous handler, recorded interrupts)``, or None off the main thread (the only
    one that may set handlers, and where Python runs them). Deferring the handler, not the
    signal, is what holds in a process with other threads: a blocked SIGINT is delivered to
    one of them (a torch worker), and Python still runs its handler on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    recorded: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: recorded.append((signum, frame)))
    return previous, recorded


def _release(held: tuple[Any, list] | None) -> None:
    """Put back the handler :func:`_hold_interrupts` replaced, then act on an interrupt that
    came meanwhile as that handler would have (Python's raises ``KeyboardInterrupt`` here)."""
    if held is None:
        return
    previous, recorded = held
    signal.signal(signal.SIGINT, previous)
    if not recorded or previous == signal.SIG_IGN:
        return
    came = recorded[0]
    recorded.clear()  # acted on once, also when the caller releases again on its way out
    if callable(previous):
        previous(*came)
    else:  # the default action (or a handler set outside Python): the signal again, undeferred
        os.kill(os.getpid(), signal.SIGINT)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """What :func:`save_atomic` wrote (tensors and plain containers only: ``weights_only``)."""
    return torch.load(os.fspath(path), weights_only=True)

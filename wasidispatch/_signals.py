"""Signals that cancel a running guest, also while it runs in native code (stdlib only).

Python runs a signal handler only between bytecodes, so a guest looping inside an engine's
call would never see one. `cancel_on_signals` makes the C-level handler write the signal's
number to a wakeup fd at once; a watcher thread reads it and fires the `Cancel`. Used by
``wasidispatch run`` and by a container process that is its pid namespace's init (the kernel
only delivers the signals such a process catches).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from wasidispatch.engines import Cancel

__all__ = ["cancel_on_signals"]


def cancel_on_signals(
    cancel: Cancel, signums: Iterable[int], *, install: bool = False
) -> Callable[[], None]:
    """Fire ``cancel`` with the number of the first of ``signums`` to arrive; returns the
    function that undoes it. The wakeup fd only sees signals that have a Python handler:
    ``install`` sets a do-nothing one for each of ``signums`` (otherwise the caller's own
    handlers are relied on). Main thread only."""
    wanted = {int(s) for s in signums}
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(w, False)
    if install:
        for signum in wanted:
            signal.signal(signum, lambda number, frame: None)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        while data := os.read(r, 64):
            for signum in data:
                if signum in wanted:
                    cancel.cancel(signum)

    watcher = threading.Thread(target=watch, name="wasidispatch-signals", daemon=True)
    watcher.start()

    def unwatch() -> None:
        signal.set_wakeup_fd(old_fd)
        os.close(w)  # the watcher reads EOF and ends
        watcher.join()
        os.close(r)

    return unwatch

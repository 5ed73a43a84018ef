"""Run control (deadline and `Cancel`) and the plumbing for stdio an engine cannot take as a
plain path (stdlib only).

wasmtime takes stdio only as paths it opens itself (``wasi_config_set_stdin_file`` and
friends), which is wrong for a descriptor (a socket cannot be opened by path; an output
opened by path is truncated and loses the descriptor's offset) and unsafe for a FIFO (the
open blocks until the other end appears, and a blocked read or write is out of reach of the
epoch interruption that enforces ``Limits.timeout``). So stdio of kind ``"fd"``, and a
``"file"`` that is a FIFO or a socket, go through `Plumbing`: a pipe per stream, whose
engine-side end the engine opens by its ``/proc/self/fd`` path, and one pump thread per run
that moves the bytes between the pipe and the caller's descriptor with ``poll``. The pump
stops at the run's deadline or when its `Cancel` fires: it then closes its pipe ends, so a
guest blocked on stdin reads end-of-file and one blocked on stdout gets ``EPIPE``, and the
engine's own interruption ends the guest. Regular files, character devices and the other
kinds take no thread: the hot path is unchanged.

The caller's descriptors are never closed, and never read or written after `Plumbing.finish`
returns (bytes the guest wrote are delivered first, within the deadline).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import stat
import threading
import time
from dataclasses import dataclass, field

from wasidispatch.engines._api import (
    TRAP_EXIT_CODE,
    Cancel,
    ExitReason,
    Stdio,
    cancelled_result,
)
from wasidispatch.errors import EngineError

__all__ = ["CHUNK", "Plumbing", "RunControl", "needs_plumbing", "write_all"]

#: Bytes moved per read.
CHUNK = 64 * 1024
_PIPE_BUF = getattr(select, "PIPE_BUF", 4096)
_RETRY = 0.01  # seconds between attempts to open a FIFO that has no reader yet


class RunControl:
    """One run's deadline and `Cancel`, and a wake-up pipe for threads waiting on I/O.

    ``expired`` turns true when plumbing stopped at the deadline. The wake-up pipe is made
    on first use only (a run without plumbing never makes one).
    """

    def __init__(self, timeout: float | None, cancel: Cancel | None) -> None:
        usable = isinstance(timeout, int | float) and not isinstance(timeout, bool)
        self.deadline = (
            time.monotonic() + timeout
            if usable and timeout is not None and 0 < timeout < 1e9
            else None
        )
        self.cancel = cancel
        self.expired = False
        #: set by `end`: the guest is gone, stdin readers stop (outputs are still delivered)
        self.ended = False
        self._wake: tuple[int, int] | None = None
        self._unsubscribe: object = None
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        """Whether the run's `Cancel` fired."""
        return self.cancel is not None and self.cancel.cancelled

    def outcome(
        self, exit_code: int, reason: ExitReason, message: str | None, timeout: float | None
    ) -> tuple[int, ExitReason, str | None]:
        """The run's ``(exit_code, reason, message)``: the engine's own, unless the `Cancel`
        fired (128+N, cancelled) or the plumbing stopped at the deadline (137, timed out)."""
        if self.cancel is not None and self.cancel.cancelled:
            return cancelled_result(self.cancel)
        if self.expired:
            return TRAP_EXIT_CODE, ExitReason.TIMED_OUT, f"timed out after {timeout}s"
        return exit_code, reason, message

    def stopped(self) -> bool:
        """Whether the run must stop now: cancelled, or past its deadline (``expired``)."""
        if self.cancelled:
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.expired = True
            return True
        return False

    def poll_ms(self, cap: float | None = None) -> int:
        """Milliseconds a ``poll`` may wait before the deadline (-1: forever), at most ``cap``
        seconds when given."""
        wait: float | None = None
        if self.deadline is not None:
            wait = max(0.0, self.deadline - time.monotonic())
        if cap is not None:
            wait = cap if wait is None else min(wait, cap)
        return -1 if wait is None else math.ceil(wait * 1000)

    def wake_fd(self) -> int:
        """The read end of a pipe that becomes readable when the run's `Cancel` fires or
        `wake` is called."""
        with self._lock:
            if self._wake is None:
                r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._wake = (r, w)
                if self.cancel is not None:
                    self._unsubscribe = self.cancel.subscribe(self.wake)
            return self._wake[0]

    def wake(self) -> None:
        """Wake every thread polling `wake_fd`."""
        with self._lock:
            if self._wake is not None:
                with contextlib.suppress(OSError):
                    os.write(self._wake[1], b"x")

    def end(self) -> None:
        """The guest is gone: a `read_chunk` in any thread returns ``None`` now, so nothing
        more is read from the caller's stdin after the run."""
        self.ended = True
        self.wake()

    def close(self) -> None:
        """Release the wake-up pipe and the subscription (idempotent)."""
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if callable(unsubscribe):
            unsubscribe()
        with self._lock:
            wake, self._wake = self._wake, None
        if wake is not None:
            for fd in wake:
                os.close(fd)


def needs_plumbing(stdio: Stdio) -> bool:
    """Whether ``stdio`` must go through `Plumbing` (a descriptor, a FIFO or a socket)."""
    if stdio.kind == "fd":
        return True
    if stdio.kind != "file" or stdio.path is None:
        return False
    try:
        mode = os.stat(stdio.path).st_mode
    except (OSError, ValueError):
        return False  # missing (an output creates it) or bad: the engine reports it
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def check_fd(stdio: Stdio, stream: str) -> int:
    """The descriptor of a ``Stdio.fd``, checked to be open (`EngineError` otherwise)."""
    fd = stdio.descriptor
    if fd is None:
        raise EngineError(f"{stream} is Stdio.fd without a descriptor")
    try:
        os.fstat(fd)
    except OSError as exc:
        raise EngineError(f"{stream} descriptor {fd} is not open: {exc.strerror}") from exc
    return fd


def write_all(fd: int, data: bytes | memoryview, control: RunControl) -> bool:
    """Write ``data`` to ``fd`` (blocking or not) unless the run stops first; False when it
    stopped or the reader went away. Waits for ``fd`` with ``poll`` and writes at most
    ``PIPE_BUF`` bytes per call to a descriptor that is not a regular file, so that a full
    pipe never blocks past the deadline."""
    view = memoryview(data)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
    wake = control.wake_fd() if control.deadline is not None or control.cancel else None
    while view:
        if control.stopped():
            return False
        if not regular:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if wake is not None:
                poller.register(wake, select.POLLIN)
            ready = dict(poller.poll(control.poll_ms()))
            if fd not in ready:
                _idle(ready, wake)
                continue
            if ready[fd] & (select.POLLERR | select.POLLNVAL):
                return False
        try:
            n = os.write(fd, view if regular else view[:_PIPE_BUF])
        except BlockingIOError:
            continue
        except OSError:
            return False
        view = view[n:]
    return True


def read_chunk(fd: int, control: RunControl) -> bytes | None:
    """Up to `CHUNK` bytes from ``fd`` once it is readable (``b""`` at end of file), or
    ``None`` when the run stopped first (deadline or cancel)."""
    wake = control.wake_fd()
    while True:
        if control.ended or control.stopped():
            return None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        ready = dict(poller.poll(control.poll_ms()))
        if fd not in ready:
            _idle(ready, wake)
            continue
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EIO):
                return b""
            raise


def _idle(ready: dict[int, int], wake: int | None) -> None:
    """After a poll that found only the wake-up pipe readable: it stays readable (the pump
    drains it, other waiters must not steal its byte), so pause briefly instead of spinning
    until the descriptor is ready or the run stops."""
    if wake is not None and wake in ready:
        time.sleep(_RETRY)


def open_input(stdio: Stdio, stream: str) -> tuple[int, bool]:
    """``(descriptor, owned)`` to read ``stdio`` from: the caller's descriptor, or a FIFO
    opened here (non-blocking, so the open never waits for a writer)."""
    if stdio.kind == "fd":
        return check_fd(stdio, stream), False
    assert stdio.path is not None
    try:
        return os.open(stdio.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), True
    except OSError as exc:
        raise EngineError(f"cannot open {stream} {stdio.path}: {exc.strerror}") from exc


def open_output(stdio: Stdio, stream: str, control: RunControl) -> int | None:
    """The descriptor to write ``stdio`` to: the caller's one, or a FIFO opened here once it
    has a reader (``None`` when the run stops first). `EngineError` when it cannot be."""
    if stdio.kind == "fd":
        return check_fd(stdio, stream)
    assert stdio.path is not None
    while True:
        try:
            return os.open(stdio.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: a FIFO nobody reads yet
                raise EngineError(f"cannot open {stream} {stdio.path}: {exc.strerror}") from exc
        if control.stopped():
            return None
        poller = select.poll()
        wake = control.wake_fd()
        poller.register(wake, select.POLLIN)
        _idle(dict(poller.poll(control.poll_ms(_RETRY))), wake)


@dataclass
class _Channel:
    stream: str
    stdio: Stdio
    #: our end of the engine's pipe: its write end for stdin, its read end for outputs
    pipe: int
    #: the caller's side (None: an output FIFO not opened yet)
    host: int | None = None
    owned: bool = False
    buf: bytes = b""
    eof: bool = False
    done: bool = False
    opened: list[int] = field(default_factory=list)


class Plumbing:
    """The pipes and the pump thread of one run (see the module docstring).

    Usage: ``path = plumbing.stdin(stdio)`` / ``plumbing.output(stdio, "stdout")`` give the
    paths the engine opens; `started` once the engine has opened them (our copies of the
    engine's ends are closed then and the thread starts); `finish` once the engine has
    closed them (the guest's store is gone). `close` releases everything, always.
    """

    def __init__(self, control: RunControl) -> None:
        self.control = control
        self._channels: list[_Channel] = []
        self._engine_ends: list[int] = []
        self._thread: threading.Thread | None = None
        self._finishing = False
        self.error: BaseException | None = None

    def stdin(self, stdio: Stdio) -> str:
        """A path the engine opens as the guest's stdin."""
        host, owned = open_input(stdio, "stdin")
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)
        self._engine_ends.append(r)
        self._channels.append(_Channel("stdin", stdio, w, host, owned))
        return f"/proc/self/fd/{r}"

    def output(self, stdio: Stdio, stream: str) -> str:
        """A path the engine opens as the guest's ``stream`` (stdout or stderr)."""
        host = check_fd(stdio, stream) if stdio.kind == "fd" else None
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        self._engine_ends.append(w)
        self._channels.append(_Channel(stream, stdio, r, host, owned=False))
        return f"/proc/self/fd/{w}"

    def started(self) -> None:
        """The engine opened its ends: close ours and start pumping."""
        ends, self._engine_ends = self._engine_ends, []
        for fd in ends:
            os.close(fd)
        self._thread = threading.Thread(target=self._run, name="wasidispatch-stdio", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """The guest is gone: stop feeding stdin, deliver what it wrote, join the thread."""
        self._finishing = True
        thread = self._thread
        if thread is not None:
            self.control.wake()
            thread.join()
            self._thread = None
        if self.error is not None:
            raise EngineError(f"the stdio plumbing failed: {self.error!r}") from self.error

    def close(self) -> None:
        """Stop the pump (if running) and close every descriptor opened here."""
        if self._thread is not None:
            self._finishing = True
            self.control.wake()
            self._thread.join()
            self._thread = None
        for fd in self._engine_ends:
            os.close(fd)
        self._engine_ends = []
        for chan in self._channels:
            self._close_channel(chan)
        self._channels = []

    # -- the pump ------------------------------------------------------------------------

    @staticmethod
    def _close_channel(chan: _Channel) -> None:
        chan.done = True
        if chan.pipe >= 0:
            os.close(chan.pipe)
            chan.pipe = -1
        if chan.owned and chan.host is not None:
            os.close(chan.host)
        chan.host = None
        chan.owned = False

    def _run(self) -> None:
        try:
            self._pump()
        except BaseException as exc:  # reported by the engine; never kills the process
            self.error = exc
        finally:
            for chan in self._channels:
                if not chan.done:
                    self._close_channel(chan)

    def _pump(self) -> None:
        control = self.control
        wake = control.wake_fd()
        while True:
            live = [c for c in self._channels if not c.done]
            if not live:
                return
            if control.stopped():
                return  # _run closes every channel: EOF / EPIPE for the guest
            masks: dict[int, int] = {wake: select.POLLIN}
            waiting_open = False
            for chan in live:
                want = self._wants(chan)
                if want is None:
                    waiting_open = waiting_open or (chan.host is None and not chan.done)
                    continue
                fd, mask = want
                masks[fd] = masks.get(fd, 0) | mask  # one descriptor may serve two streams
            if len(masks) == 1 and not waiting_open:
                continue  # every channel closed just now
            poller = select.poll()
            for fd, mask in masks.items():
                poller.register(fd, mask)
            ready = dict(poller.poll(control.poll_ms(_RETRY if waiting_open else None)))
            if wake in ready:
                with contextlib.suppress(OSError):
                    os.read(wake, 64)
            for chan in live:
                if not chan.done:
                    self._step(chan, ready)

    def _wants(self, chan: _Channel) -> tuple[int, int] | None:
        """What ``chan`` waits for: ``(descriptor, poll mask)``, or None (closed now, or an
        output FIFO that has no reader yet)."""
        if chan.stream == "stdin":
            if self._finishing:
                self._close_channel(chan)  # the guest is gone
                return None
            if chan.buf:
                return chan.pipe, select.POLLOUT
            if chan.eof:
                self._close_channel(chan)  # the guest reads end of file
                return None
            assert chan.host is not None
            return chan.host, select.POLLIN
        if chan.host is None:
            fd = self._open_later(chan)
            if fd is None:
                return None
            chan.host, chan.owned = fd, True
        if chan.buf:
            return chan.host, select.POLLOUT
        if chan.eof:
            self._close_channel(chan)
            return None
        return chan.pipe, select.POLLIN

    def _open_later(self, chan: _Channel) -> int | None:
        assert chan.stdio.path is not None
        try:
            return os.open(chan.stdio.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise

    def _step(self, chan: _Channel, ready: dict[int, int]) -> None:
        src, dst = (chan.host, chan.pipe) if chan.stream == "stdin" else (chan.pipe, chan.host)
        if src is None or dst is None:
            return  # an output FIFO with no reader yet
        readable = ready.get(src, 0) & (select.POLLIN | select.POLLHUP | select.POLLERR)
        if not chan.buf and not chan.eof and readable:
            try:
                data = os.read(src, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                chan.buf = data
            else:
                chan.eof = True
        events = ready.get(dst, 0)
        if chan.buf and events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            if events & (select.POLLERR | select.POLLNVAL):
                self._close_channel(chan)  # nobody reads any more
                return
            try:
                regular = stat.S_ISREG(os.fstat(dst).st_mode)
                n = os.write(dst, chan.buf if regular else chan.buf[:_PIPE_BUF])
            except BlockingIOError:
                return
            except OSError:
                self._close_channel(chan)
                return
            chan.buf = chan.buf[n:]

"""Exit statuses of a shim's children, collected in one place.

A shim is a child subreaper: runc's container init and a Wasm container process are
re-parented to it when their parents exit, and it must reap them to learn their exit codes.
Any code that waits on its own children (``subprocess``, ``os.waitpid(pid)``) races with a
reaper of "every child" and loses the status (``subprocess`` then reports 0), so a shim spawns
every command through the one `Reaper` of its process and asks it for the status.

The reaper is a thread that sleeps in ``poll(2)`` on a pidfd per watched process and, when
started with ``reap_all=True`` from the main thread, on a ``SIGCHLD`` wakeup fd (re-parented
orphans nobody asked for are reaped too, so no zombie stays). An exit is recorded as `Exit`
(the code, or 128+N for death by signal N, and the time it was reaped) until `forget`.

Example::

    >>> reaper = Reaper()
    >>> reaper.start()
    >>> reaper.run(["sh", "-c", "echo hi; exit 3"]).code
    3
    >>> reaper.close()
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from wasidispatch.errors import ShimError

__all__ = ["Completed", "Exit", "Reaper", "exit_code"]

# Signals a spawned command gets back at their default action (an ignored signal stays
# ignored across exec otherwise; handled ones are reset by exec anyway).
_DEFAULT_SIGNALS = frozenset(
    s
    for s in (
        signal.SIGPIPE,
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGCHLD,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGXFSZ,
        signal.SIGTTOU,
        signal.SIGTTIN,
        signal.SIGTSTP,
    )
)
_UNCLAIMED_TTL_NS = 120 * 1_000_000_000


def exit_code(status: int) -> int:
    """A ``waitpid`` status as a container exit code: the code, or 128+N for signal N.

    >>> exit_code(3 << 8), exit_code(9)
    (3, 137)
    """
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Exit(NamedTuple):
    """A reaped process: ``status`` (exit code, 128+N for signal N), ``at_ns`` (wall clock,
    ``time.time_ns()``, when it was reaped) and its ``pid``."""

    status: int
    at_ns: int
    pid: int


class Completed(NamedTuple):
    """A command run to completion by `Reaper.run`."""

    code: int
    stdout: bytes
    stderr: bytes


class Reaper:
    """Collects the exit statuses of this process's children and re-parented orphans.

    Use one per process (`default`); spawn every child through it (`spawn`, `run`), or
    `watch` a pid it did not spawn (a process re-parented to this subreaper), then `wait`.
    """

    _default: Reaper | None = None
    _default_lock = threading.Lock()

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._exits: dict[int, Exit] = {}
        self._watched: set[int] = set()
        self._pidfds: dict[int, int] = {}
        self._reap_all = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sig_r: int | None = None
        self._sig_w: int | None = None

    @classmethod
    def default(cls) -> Reaper:
        """The process's reaper (created on first use, not started)."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    # -------------------------------------------------------------------------------- life

    def start(self, *, reap_all: bool = False) -> None:
        """Start the reaper thread (idempotent). ``reap_all`` (main thread only) installs a
        ``SIGCHLD`` wakeup and reaps every child, watched or not: what a subreaper daemon
        needs; without it only spawned and watched pids are waited for, so a test process
        can use a reaper beside ``subprocess``."""
        with self._cond:
            if self._closed:
                raise ShimError("the reaper is closed")
            if reap_all and not self._reap_all:
                if threading.current_thread() is not threading.main_thread():
                    raise ShimError("Reaper.start(reap_all=True) must run in the main thread")
                self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                signal.signal(signal.SIGCHLD, _on_sigchld)
                signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
                self._reap_all = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
                self._thread.start()
        self._wake()

    def close(self) -> None:
        """Stop the thread and release its fds (pending waiters get no status)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._reap_all:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w, self._sig_r, self._sig_w, *self._pidfds.values()):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfds.clear()

    # -------------------------------------------------------------------------------- spawn

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
        fds: Mapping[int, int] | None = None,
    ) -> int:
        """Start ``argv`` (found on ``PATH``) with ``posix_spawn`` and watch it; returns its
        pid. ``stdin``/``stdout``/``stderr`` are fds (``None``: ``/dev/null``); ``fds`` maps
        a target fd number in the child to a source fd here (e.g. ``{3: sock}``); every
        other fd is closed-on-exec as Python opens them. Signals are unblocked and the usual
        ones reset to their default action in the child."""
        if not argv:
            raise ShimError("empty command", code=3)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            sources = {0: stdin, 1: stdout, 2: stderr}
            mapping: dict[int, int] = {t: (null if s is None else s) for t, s in sources.items()}
            mapping.update(fds or {})
            actions = _dup_actions(mapping)
            with self._cond:
                if self._closed:
                    raise ShimError("the reaper is closed")
                try:
                    pid = os.posix_spawnp(
                        argv[0],
                        list(argv),
                        dict(os.environ if env is None else env),
                        file_actions=actions,
                        setsigmask=(),
                        setsigdef=_DEFAULT_SIGNALS,
                    )
                except OSError as exc:
                    raise ShimError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
                # a child just spawned has no earlier exit: a record under its pid is a
                # previous process's that nobody consumed
                self._exits.pop(pid, None)
                self._watch_locked(pid)
        finally:
            os.close(null)
        self._wake()
        return pid

    def watch(self, pid: int) -> None:
        """Wait for ``pid`` from now on (a process this one did not spawn: re-parented to it
        as a subreaper, or forked). Its exit may already be recorded; that is kept."""
        with self._cond:
            self._watch_locked(pid)
        self._wake()

    def _watch_locked(self, pid: int) -> None:
        self._watched.add(pid)
        if pid in self._pidfds or pid in self._exits:
            return
        # already reaped by us (then recorded) or gone: the loop settles it
        with contextlib.suppress(OSError):
            self._pidfds[pid] = os.pidfd_open(pid)

    # -------------------------------------------------------------------------------- wait

    def poll(self, pid: int) -> Exit | None:
        """The recorded exit of ``pid``, or ``None`` while it runs."""
        with self._cond:
            return self._exits.get(pid)

    def wait(self, pid: int, timeout: float | None = None) -> Exit:
        """Block until ``pid`` (spawned or watched) has exited; any number of threads may
        wait. Raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._exits.get(pid)
                if found is not None:
                    return found
                if self._closed:
                    raise ShimError(f"the reaper closed before process {pid} exited")
                if pid not in self._watched:
                    raise ShimError(f"process {pid} is not watched by this reaper")
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"process {pid} still running after {timeout}s")
                    self._cond.wait(left)

    def forget(self, pid: int) -> None:
        """Drop what is known about ``pid`` (after its exit was consumed)."""
        with self._cond:
            self._exits.pop(pid, None)
            self._watched.discard(pid)
            fd = self._pidfds.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        fds: Mapping[int, int] | None = None,
    ) -> Completed:
        """Run a command to completion, capturing stderr (and stdout unless ``stdout`` is
        given). ``input`` is written to its stdin. Past ``timeout`` the command is killed
        and `ShimError` (code 4, deadline exceeded) raised."""
        out_r = out_w = in_r = in_w = None
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            if stdout is None:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
            if input is not None:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
            pid = self.spawn(
                argv,
                stdin=in_r if in_r is not None else stdin,
                stdout=out_w if out_w is not None else stdout,
                stderr=err_w,
                env=env,
                fds=fds,
            )
        except BaseException:
            for fd in (out_r, out_w, in_r, in_w, err_r, err_w):
                if fd is not None:
                    os.close(fd)
            raise
        for fd in (out_w, in_r, err_w):
            if fd is not None:
                os.close(fd)
        deadline = time.monotonic() + timeout
        readers = [fd for fd in (out_r, err_r) if fd is not None]
        try:
            captured = _communicate(in_w, input or b"", readers, deadline)  # closes in_w
        finally:
            for fd in readers:
                os.close(fd)
        try:
            done = self.wait(pid, max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.wait(pid, 10)
            self.forget(pid)
            raise ShimError(f"{argv[0]} timed out after {timeout:g}s", code=4) from None
        self.forget(pid)
        return Completed(
            done.status,
            captured.get(out_r, b"") if out_r is not None else b"",
            captured.get(err_r, b""),
        )

    # -------------------------------------------------------------------------------- loop

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                fds = [self._wake_r, *self._pidfds.values()]
                if self._sig_r is not None:
                    fds.append(self._sig_r)
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            with contextlib.suppress(InterruptedError):
                poller.poll(1000)
            _drain(self._wake_r)
            if self._sig_r is not None:
                _drain(self._sig_r)
            self._reap()

    def _reap(self) -> None:
        now = time.time_ns()
        found: list[tuple[int, int]] = []
        if self._reap_all:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
                if pid == 0:
                    break
                found.append((pid, status))
        else:
            with self._cond:
                watched = [p for p in self._watched if p not in self._exits]
            for pid in watched:
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    # not (yet) our child: a grandchild whose parent still lives, or gone
                    continue
                if got == pid:
                    found.append((pid, status))
        with self._cond:
            for pid, status in found:
                self._exits[pid] = Exit(exit_code(status), now, pid)
                fd = self._pidfds.pop(pid, None)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            # a pidfd that says "exited" for a process that is not our child would spin the
            # loop: stop polling it (SIGCHLD or the next wake-up settles it)
            for pid, fd in list(self._pidfds.items()):
                if _readable(fd) and pid not in self._exits:
                    del self._pidfds[pid]
                    with contextlib.suppress(OSError):
                        os.close(fd)
            stale = [
                p
                for p, e in self._exits.items()
                if p not in self._watched and now - e.at_ns > _UNCLAIMED_TTL_NS
            ]
            for pid in stale:
                del self._exits[pid]
            if found:
                self._cond.notify_all()


def _on_sigchld(signum: int, frame: object) -> None:
    """The wakeup fd does the work; the handler only has to exist."""


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 4096):
            pass


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _dup_actions(mapping: Mapping[int, int]) -> list[tuple[int, ...]]:
    """``posix_spawn`` file actions placing each source fd at its target number: every
    source is first copied above all the numbers involved (so no dup2 clobbers a source
    still needed, and a source already at its target loses FD_CLOEXEC), then onto its
    target, then the copies are closed."""
    actions: list[tuple[int, ...]] = []
    high = max([*mapping.keys(), *mapping.values(), 2]) + 1
    items = sorted(mapping.items())
    for i, (_, source) in enumerate(items):
        actions.append((os.POSIX_SPAWN_DUP2, source, high + i))
    for i, (target, _) in enumerate(items):
        actions.append((os.POSIX_SPAWN_DUP2, high + i, target))
    for i in range(len(items)):
        actions.append((os.POSIX_SPAWN_CLOSE, high + i))
    return actions


def _communicate(
    in_w: int | None, data: bytes, readers: list[int], deadline: float
) -> dict[int, bytes]:
    """Write ``data`` to ``in_w`` (closed here, always) and read ``readers`` to EOF, until
    ``deadline``."""
    chunks: dict[int, list[bytes]] = {fd: [] for fd in readers}
    poller = select.poll()
    open_readers = set(readers)
    for fd in readers:
        poller.register(fd, select.POLLIN)
    view = memoryview(data)
    if in_w is not None:
        if view:
            os.set_blocking(in_w, False)
            poller.register(in_w, select.POLLOUT)
        else:
            os.close(in_w)
            in_w = None
    while open_readers or in_w is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            events = poller.poll(int(left * 1000) + 1)
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == in_w:
                try:
                    n = os.write(fd, view[:65536])
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    n = len(view)
                view = view[n:]
                if not view:
                    poller.unregister(fd)
                    os.close(fd)
                    in_w = None
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    continue
                chunk = b""
            if chunk:
                chunks[fd].append(chunk)
            else:
                poller.unregister(fd)
                open_readers.discard(fd)
    if in_w is not None:
        with contextlib.suppress(OSError):
            os.close(in_w)
    return {fd: b"".join(parts) for fd, parts in chunks.items()}

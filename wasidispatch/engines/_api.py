"""The engine contract: what to run (`Workload`), how it ended (`RunResult`), and `Engine`.

This module is stdlib-only and imports no engine: executors, the cache and third-party engines
build on it without pulling in wasmtime or Wasmer.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "TRAP_EXIT_CODE",
    "Cancel",
    "Capabilities",
    "Engine",
    "ExitReason",
    "Limits",
    "Preopen",
    "RunResult",
    "Stdio",
    "Timings",
    "Verdict",
    "Workload",
]

#: Exit code reported for a trap, a timeout, running out of memory or fuel, as runwasi does
#: (the code a container killed by SIGKILL has: 128 + 9).
TRAP_EXIT_CODE = 137

StdioKind = Literal["inherit", "null", "capture", "file", "bytes", "fd"]


@dataclass(frozen=True, slots=True)
class Stdio:
    """Where one of stdin/stdout/stderr goes.

    Use the constructors: ``Stdio.inherit()`` (the host process's own descriptor),
    ``Stdio.null()``, ``Stdio.capture()`` (stdout/stderr only: bytes land in the
    `RunResult`), ``Stdio.file(path)`` (stdin reads it; stdout/stderr truncate and write a
    regular file; a FIFO or a character device is opened and used as it is),
    ``Stdio.from_bytes(b"...")`` (stdin only), ``Stdio.fd(n)`` (an open host descriptor of
    any kind: pipe, FIFO, socket, tty, regular file; the caller keeps it, the engine never
    closes it).

    Example::

        >>> Stdio.from_bytes(b"hi").kind
        'bytes'
    """

    kind: StdioKind
    path: Path | None = None
    data: bytes | None = None
    descriptor: int | None = None

    @classmethod
    def inherit(cls) -> Stdio:
        """Share the host process's descriptor."""
        return cls("inherit")

    @classmethod
    def null(cls) -> Stdio:
        """Empty input, discarded output."""
        return cls("null")

    @classmethod
    def capture(cls) -> Stdio:
        """Collect output into `RunResult.stdout` / `RunResult.stderr`."""
        return cls("capture")

    @classmethod
    def file(cls, path: str | Path) -> Stdio:
        """Read stdin from, or write stdout/stderr to, a host file."""
        return cls("file", path=Path(path))

    @classmethod
    def from_bytes(cls, data: bytes) -> Stdio:
        """Feed these bytes as stdin."""
        return cls("bytes", data=bytes(data))

    @classmethod
    def fd(cls, fd: int) -> Stdio:
        """Use the open host descriptor ``fd`` (pipe, FIFO, socket, tty or regular file):
        stdin reads from it, stdout/stderr write to it (at its current offset, never
        truncating). The caller keeps ownership: the engine never closes ``fd``, and stops
        using it when `Engine.run` returns. `EngineError` for anything but an int >= 0."""
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            from wasidispatch.errors import EngineError

            raise EngineError(f"Stdio.fd takes a descriptor number >= 0, got {fd!r}")
        return cls("fd", descriptor=fd)


class Cancel:
    """A thread-safe handle that stops an in-process run from another thread.

    Give it to a run as `Workload.cancel` (or ``workload.with_cancel(cancel)``); call
    `cancel` from any thread, before or while the guest runs. The run then stops promptly
    and returns ``RunResult(exit_code=128 + signum, reason=ExitReason.CANCELLED,
    message="cancelled by signal N")``. Only the first `cancel` counts; a handle stays
    cancelled (use a new one per run). A run that already ended is not affected.

    Example::

        >>> c = Cancel()
        >>> c.cancelled, c.signum
        (False, None)
        >>> c.cancel(15)
        >>> c.cancelled, c.signum
        (True, 15)
    """

    __slots__ = ("_callbacks", "_lock", "_signum")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signum: int | None = None
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self, signum: int = signal.SIGKILL) -> None:
        """Ask the run to stop, as if by signal ``signum`` (an int from 1 to 127; the
        exit code is ``128 + signum``). Idempotent: later calls change nothing."""
        if isinstance(signum, bool) or not isinstance(signum, int) or not 0 < signum < 128:
            from wasidispatch.errors import EngineError

            raise EngineError(f"Cancel.cancel takes a signal number 1..127, got {signum!r}")
        with self._lock:
            if self._signum is not None:
                return
            self._signum = int(signum)
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            # One engine's failing wake-up (e.g. a loop already closed) must neither skip
            # the others nor reach the cancelling thread (a signal watcher, a shim's Kill).
            try:
                callback()
            except Exception:
                import logging

                logging.getLogger("wasidispatch.engines").exception("a Cancel callback failed")

    @property
    def cancelled(self) -> bool:
        """Whether `cancel` was called."""
        return self._signum is not None

    @property
    def signum(self) -> int | None:
        """The signal `cancel` was called with, or ``None``."""
        return self._signum

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """For engines: call ``callback`` (once, from the cancelling thread) when the handle
        is cancelled, at once if it already is. Returns a function that unsubscribes."""
        with self._lock:
            if self._signum is None:
                self._callbacks.append(callback)
                return lambda: self._unsubscribe(callback)
        callback()
        return _nothing

    def _unsubscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def __repr__(self) -> str:
        return f"Cancel(signum={self._signum})"


def _nothing() -> None:
    return None


def cancelled_result(cancel: Cancel) -> tuple[int, ExitReason, str]:
    """``(exit_code, reason, message)`` of a run stopped by ``cancel`` (for engines)."""
    signum = cancel.signum or signal.SIGKILL
    return 128 + signum, ExitReason.CANCELLED, f"cancelled by signal {signum}"


@dataclass(frozen=True, slots=True)
class Preopen:
    """A host directory visible to the guest at ``guest`` (``readonly`` refuses writes).

    Example::

        >>> Preopen("/srv/data", "/data", readonly=True).guest
        '/data'
    """

    host: Path | str
    guest: str
    readonly: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits for one run; ``None`` means unlimited.

    ``memory_bytes`` caps linear memory (and tables) per store; ``timeout`` is wall-clock
    seconds; ``fuel`` is a count of engine fuel units (wasmtime); ``max_wasm_stack`` is the
    guest stack in bytes (engines refuse values that could abort the interpreter).
    """

    memory_bytes: int | None = None
    timeout: float | None = None
    fuel: int | None = None
    max_wasm_stack: int | None = None


@dataclass(frozen=True)
class Workload:
    """What to run, engine-neutral.

    ``wasm`` is the Wasm binary or a path to it. ``precompiled`` is an artifact made by the
    same engine's :meth:`Engine.precompile` (bytes, or a path the engine may map); callers
    must only pass artifacts they wrote and verified (the precompile cache does this).
    Bytes are verified in full by the engine. A path is not re-hashed: the engine checks
    that the file is an artifact of this engine and configuration and is whole, then maps
    it, so a path must name a file whose content the caller has verified and that only
    trusted users can write (`PrecompileCache` hands out exactly such paths).
    ``env`` is the guest's whole environment: the host environment never leaks in.
    ``entry`` names an export to call instead of the WASI command entry (``_start`` for
    modules, ``wasi:cli/run`` for components). ``cancel`` is a `Cancel` handle that stops
    the run from another thread. `with_stdio` and `with_cancel` make a per-run copy of a
    prepared (possibly precompiled) workload.

    Example::

        >>> w = Workload(wasm=b"\\0asm\\1\\0\\0\\0", argv=("app.wasm", "--x"), env={"A": "1"})
        >>> w.argv[0]
        'app.wasm'
    """

    wasm: bytes | Path
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    preopens: tuple[Preopen, ...] = ()
    cwd: str | None = None
    stdin: Stdio = field(default_factory=Stdio.inherit)
    stdout: Stdio = field(default_factory=Stdio.inherit)
    stderr: Stdio = field(default_factory=Stdio.inherit)
    entry: str | None = None
    limits: Limits = field(default_factory=Limits)
    precompiled: bytes | Path | None = None
    cancel: Cancel | None = None

    def with_stdio(
        self,
        *,
        stdin: Stdio | None = None,
        stdout: Stdio | None = None,
        stderr: Stdio | None = None,
    ) -> Workload:
        """This workload with the given stdio streams (``None`` keeps the current one)."""
        for name, value in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            if value is not None and not isinstance(value, Stdio):
                from wasidispatch.errors import EngineError

                raise EngineError(f"with_stdio: {name} must be a Stdio, got {value!r}")
        if stdin is None and stdout is None and stderr is None:
            return self
        return dataclasses.replace(
            self,
            stdin=self.stdin if stdin is None else stdin,
            stdout=self.stdout if stdout is None else stdout,
            stderr=self.stderr if stderr is None else stderr,
        )

    def with_cancel(self, cancel: Cancel | None) -> Workload:
        """This workload with ``cancel`` as its cancel handle (``None`` removes it)."""
        if cancel is not None and not isinstance(cancel, Cancel):
            from wasidispatch.errors import EngineError

            raise EngineError(f"with_cancel takes a Cancel or None, got {cancel!r}")
        return dataclasses.replace(self, cancel=cancel)

    def wasm_bytes(self) -> bytes:
        """The Wasm binary, read from disk when ``wasm`` is a path."""
        if isinstance(self.wasm, Path):
            return self.wasm.read_bytes()
        return self.wasm


class ExitReason(enum.Enum):
    """Why a guest stopped."""

    EXITED = "exited"
    TRAPPED = "trapped"
    TIMED_OUT = "timed-out"
    OUT_OF_MEMORY = "out-of-memory"
    OUT_OF_FUEL = "out-of-fuel"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent per phase of one run (``compile`` is 0 when a precompiled artifact or a
    prepared module was used)."""

    compile: float = 0.0
    instantiate: float = 0.0
    run: float = 0.0

    @property
    def total(self) -> float:
        """Sum of all phases."""
        return self.compile + self.instantiate + self.run


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended: exit code plus why.

    Exit codes follow runwasi: the WASI exit code as is; 137 for a trap, timeout, or running
    out of memory or fuel; 128 + N for a run cancelled by signal N (`Cancel`).
    ``stdout``/``stderr`` hold bytes only when captured.

    Example::

        >>> RunResult(exit_code=0, reason=ExitReason.EXITED).ok
        True
    """

    exit_code: int
    reason: ExitReason
    message: str | None = None
    stdout: bytes | None = None
    stderr: bytes | None = None
    timings: Timings = field(default_factory=Timings)

    @property
    def ok(self) -> bool:
        """True when the guest exited with status 0."""
        return self.reason is ExitReason.EXITED and self.exit_code == 0


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine can do; a workload needing something absent is refused, not ignored."""

    modules: bool = True
    components: bool = False
    precompile: bool = False
    preopens: bool = True
    readonly_preopens: bool = True
    cwd: bool = True
    stdio_file: bool = True
    memory_limit: bool = False
    timeout: bool = False
    fuel: bool = False
    entry_export: bool = False
    fast_instantiate: bool = False
    cancel: bool = False
    stdio_fd: bool = False

    def names(self) -> list[str]:
        """The names of the capabilities that are present, for display."""
        return [name for name in self.__dataclass_fields__ if getattr(self, name)]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Answer of :meth:`Engine.can_handle`: truthy when the engine takes the workload,
    otherwise ``reason`` says why not.

    Example::

        >>> bool(Verdict.no("components are not supported"))
        False
    """

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> Verdict:
        """The engine takes the workload."""
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> Verdict:
        """The engine refuses the workload, for ``reason``."""
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.ok


@runtime_checkable
class Engine(Protocol):
    """A Wasm engine behind one small contract (after runwasi's engine/compiler split).

    ``run`` returns a `RunResult` for everything the guest does (exit, trap, timeout, memory
    cap); it raises only for what is not the guest's fault: `CompileError` for bytes that are
    not valid Wasm, `IncompatibleArtifact` for a foreign precompiled artifact, `CantHandle`
    for a workload the engine cannot honour (see `can_handle`), `EngineError` otherwise.
    """

    @property
    def name(self) -> str:
        """Registry name, e.g. ``"wasmtime"``."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What this engine can do."""
        ...

    def version(self) -> str:
        """Version of the underlying engine library."""
        ...

    def fingerprint(self) -> str:
        """Everything that makes precompiled artifacts of this engine incompatible:
        engine name and version, compile-relevant configuration, target CPU."""
        ...

    def can_handle(self, workload: Workload) -> Verdict:
        """Whether `run` would honour every part of ``workload``."""
        ...

    def precompile(self, wasm: bytes) -> bytes | None:
        """Ahead-of-time compile ``wasm``; ``None`` when the engine has no precompilation."""
        ...

    def run(self, workload: Workload) -> RunResult:
        """Run ``workload`` to completion."""
        ...

"""The engine contract: what to run (`Workload`), how it ended (`RunResult`), and `Engine`.

This module is stdlib-only and imports no engine: executors, the cache and third-party engines
build on it without pulling in wasmtime or Wasmer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "TRAP_EXIT_CODE",
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

StdioKind = Literal["inherit", "null", "capture", "file", "bytes"]


@dataclass(frozen=True, slots=True)
class Stdio:
    """Where one of stdin/stdout/stderr goes.

    Use the constructors: ``Stdio.inherit()`` (the host process's own descriptor),
    ``Stdio.null()``, ``Stdio.capture()`` (stdout/stderr only: bytes land in the
    `RunResult`), ``Stdio.file(path)`` (stdin reads it; stdout/stderr truncate and write it),
    ``Stdio.from_bytes(b"...")`` (stdin only).

    Example::

        >>> Stdio.from_bytes(b"hi").kind
        'bytes'
    """

    kind: StdioKind
    path: Path | None = None
    data: bytes | None = None

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
    modules, ``wasi:cli/run`` for components).

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
    out of memory or fuel. ``stdout``/``stderr`` hold bytes only when captured.

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

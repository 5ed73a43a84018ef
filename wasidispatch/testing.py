"""A one-call runner for test harnesses (in the spirit of runwasi's ``WasiTestBuilder``).

`run_wasm` runs some Wasm on a chosen engine with the given stdin, arguments, environment,
directories and limits, and returns exit code, reason, stdout, stderr and timings together.
Its arguments follow the WASI test-suite specification (WebAssembly/wasi-testsuite): ``args``
are the arguments *after* the program name (``argv[0]`` is the file's name, or ``argv0``),
``env`` is the whole environment, and each entry of ``dirs`` is preopened under the same
name it has in the list (or, in a mapping, guest name -> host directory). stdout and stderr
are always captured. `WasiRun` is the same as a small builder.

``wasm`` may be the WebAssembly text format too, as `wasidispatch.detect.sniff` recognises it
(``wasm-text``): a ``str`` or ``bytes`` holding a ``(module ...)`` / ``(component ...)``, or a
path to such a file. It is assembled with ``wasmtime.wat2wasm`` first (`CompileError` when
it does not assemble). Any other ``str`` is a path.

Example::

    >>> import wasmtime
    >>> from wasidispatch.testing import run_wasm
    >>> wat = '''(module (import "wasi_snapshot_preview1" "proc_exit" (func $e (param i32)))
    ...   (memory (export "memory") 1) (func (export "_start") (call $e (i32.const 3))))'''
    >>> run_wasm(bytes(wasmtime.wat2wasm(wat))).exit_code
    3
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from wasidispatch.engines._api import ExitReason, Limits, Preopen, Stdio, Timings, Workload
from wasidispatch.errors import CompileError, EngineError

__all__ = ["HarnessResult", "WasiRun", "run_wasm"]

Dirs = Mapping[str, "str | Path"] | Iterable["str | Path"]


@dataclass(frozen=True, slots=True)
class HarnessResult:
    """Everything a harness checks after one run.

    Example::

        >>> HarnessResult(0, ExitReason.EXITED, b"hi\\n", b"", Timings()).stdout_text
        'hi\\n'
    """

    exit_code: int
    reason: ExitReason
    stdout: bytes
    stderr: bytes
    timings: Timings
    message: str | None = None
    engine: str = ""

    @property
    def stdout_text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """True when the guest exited with status 0."""
        return self.reason is ExitReason.EXITED and self.exit_code == 0


def _preopens(dirs: Dirs, readonly: bool) -> tuple[Preopen, ...]:
    if isinstance(dirs, Mapping):
        return tuple(Preopen(Path(host), str(guest), readonly) for guest, host in dirs.items())
    return tuple(Preopen(Path(d), str(d), readonly) for d in dirs)


def _assemble(text: bytes, where: str) -> bytes:
    try:
        import wasmtime
    except ImportError as exc:  # pragma: no cover - wasmtime is a dependency
        raise CompileError(f"assembling {where} needs the wasmtime package") from exc
    try:
        return bytes(wasmtime.wat2wasm(text.decode("utf-8")))
    except UnicodeDecodeError as exc:
        raise CompileError(f"{where} is not UTF-8 WebAssembly text: {exc}") from exc
    except wasmtime.WasmtimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise CompileError(f"{where} does not assemble: {first}") from exc


def _binary(wasm: bytes | str | Path) -> tuple[bytes | Path, str | None]:
    """``(bytes or path to run, the file name for argv[0])``: WAT (text, bytes or a file, as
    `wasidispatch.detect.sniff` tells it) assembled, a binary or its path kept as it is."""
    from wasidispatch.detect import PREFIX_SIZE, sniff

    if isinstance(wasm, str):
        if sniff(wasm[:PREFIX_SIZE].encode("utf-8", "replace")).format == "wasm-text":
            return _assemble(wasm.encode("utf-8", "surrogatepass"), "the WAT text"), None
        wasm = Path(wasm)
    if isinstance(wasm, Path):
        try:
            with open(wasm, "rb") as f:
                head = f.read(PREFIX_SIZE)
                if sniff(head).format != "wasm-text":
                    return wasm, wasm.name
                text = head + f.read()
        except OSError:
            return wasm, wasm.name  # the engine reports an unreadable file
        return _assemble(text, str(wasm)), wasm.name
    data = bytes(wasm)
    if sniff(data[:PREFIX_SIZE]).format == "wasm-text":
        return _assemble(data, "the WAT text"), None
    return data, None


def run_wasm(
    wasm: bytes | str | Path,
    *,
    engine: str = "wasmtime",
    args: Iterable[str] = (),
    argv0: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | str | Path = b"",
    dirs: Dirs = (),
    readonly_dirs: Dirs = (),
    cwd: str | None = None,
    limits: Limits | None = None,
    entry: str | None = None,
    precompiled: bytes | Path | None = None,
) -> HarnessResult:
    """Run ``wasm`` (a binary or WAT: bytes, text or a path) on ``engine`` and collect the
    result.

    ``stdin`` is bytes, or a path (`Path`) to read it from; a ``str`` is encoded as UTF-8.
    ``dirs`` are preopened read-write, ``readonly_dirs`` read-only. Raises what `Engine.run` raises
    (`CantHandle` when the engine cannot honour the request, `CompileError`, ...), and
    `EngineUnavailable` when the engine is not installed.
    """
    from wasidispatch import engines

    binary, name = _binary(wasm)
    if argv0 is None:
        argv0 = name or "main.wasm"
    if isinstance(stdin, Path):
        stdin_io = Stdio.file(stdin)
    else:
        stdin_io = Stdio.from_bytes(stdin.encode() if isinstance(stdin, str) else stdin)
    workload = Workload(
        wasm=binary,
        argv=(argv0, *args),
        env=dict(env or {}),
        preopens=_preopens(dirs, False) + _preopens(readonly_dirs, True),
        cwd=cwd,
        stdin=stdin_io,
        stdout=Stdio.capture(),
        stderr=Stdio.capture(),
        entry=entry,
        limits=limits or Limits(),
        precompiled=precompiled,
    )
    eng = engines.get(engine)
    result = eng.run(workload)
    if result.stdout is None or result.stderr is None:
        raise EngineError(f"engine {engine!r} did not capture stdout/stderr as asked")
    return HarnessResult(
        exit_code=result.exit_code,
        reason=result.reason,
        stdout=result.stdout,
        stderr=result.stderr,
        timings=result.timings,
        message=result.message,
        engine=eng.name,
    )


@dataclass(frozen=True)
class WasiRun:
    """A builder over `run_wasm`: each method returns a new, changed copy. ``wasm`` is a
    binary or WAT, as `run_wasm` takes it.

    Example::

        >>> import wasmtime
        >>> wat = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'
        >>> WasiRun(bytes(wasmtime.wat2wasm(wat))).with_timeout(5).run().reason.value
        'trapped'
    """

    wasm: bytes | str | Path
    engine: str = "wasmtime"
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes | str | Path = b""
    dirs: Mapping[str, str | Path] = field(default_factory=dict)
    readonly_dirs: Mapping[str, str | Path] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    argv0: str | None = None
    cwd: str | None = None
    entry: str | None = None
    precompiled: bytes | Path | None = None

    def on(self, engine: str) -> WasiRun:
        """Run on ``engine`` (a registry name)."""
        return replace(self, engine=engine)

    def with_args(self, *args: str) -> WasiRun:
        """Arguments after the program name."""
        return replace(self, args=args)

    def with_env(self, **env: str) -> WasiRun:
        """Add environment variables."""
        return replace(self, env={**self.env, **env})

    def with_stdin(self, data: bytes | str | Path) -> WasiRun:
        """Bytes (or text, or a file to read) for stdin."""
        return replace(self, stdin=data)

    def with_dir(
        self, host: str | Path, guest: str | None = None, *, readonly: bool = False
    ) -> WasiRun:
        """Preopen ``host`` as ``guest`` (default: the host path as given)."""
        name = guest if guest is not None else str(host)
        if readonly:
            return replace(self, readonly_dirs={**self.readonly_dirs, name: host})
        return replace(self, dirs={**self.dirs, name: host})

    def with_argv0(self, argv0: str) -> WasiRun:
        """The program name the guest sees as ``argv[0]``."""
        return replace(self, argv0=argv0)

    def with_cwd(self, cwd: str) -> WasiRun:
        """The guest's working directory (a guest path under a preopen)."""
        return replace(self, cwd=cwd)

    def with_entry(self, export: str) -> WasiRun:
        """Call this export instead of the WASI command entry."""
        return replace(self, entry=export)

    def with_precompiled(self, artifact: bytes | Path) -> WasiRun:
        """Load this artifact of the engine's `precompile` instead of compiling."""
        return replace(self, precompiled=artifact)

    def with_limits(self, limits: Limits) -> WasiRun:
        """Replace the limits."""
        return replace(self, limits=limits)

    def with_timeout(self, seconds: float) -> WasiRun:
        """Set a wall-clock timeout."""
        return replace(self, limits=replace(self.limits, timeout=seconds))

    def with_memory_limit(self, nbytes: int) -> WasiRun:
        """Cap linear memory."""
        return replace(self, limits=replace(self.limits, memory_bytes=nbytes))

    def run(self) -> HarnessResult:
        """Run it."""
        return run_wasm(
            self.wasm,
            engine=self.engine,
            args=self.args,
            env=self.env,
            stdin=self.stdin,
            dirs=self.dirs,
            readonly_dirs=self.readonly_dirs,
            limits=self.limits,
            argv0=self.argv0,
            cwd=self.cwd,
            entry=self.entry,
            precompiled=self.precompiled,
        )

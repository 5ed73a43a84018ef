"""The Wasmer engine, on ``wasmer-sdk`` (Wasmer's maintained Python SDK, 0.5.x).

``wasmer-sdk`` runs a WASI module as the command of an in-memory package inside a sandbox
with its own in-memory filesystem, from bytes and offline. Its API is async; this engine
bridges it with one private event loop on one daemon thread per engine instance (made on
first use, stopped and joined by `WasmerEngine.close`, at garbage collection or at exit),
so it works the same from plain and from async callers and leaks no loop.

What the SDK cannot do is declared in `capabilities` and refused with `CantHandle` by
`can_handle`/`run`, never ignored: host directories (no preopens, so no read-only flag and
no cwd), components, precompilation, memory caps, fuel, another entry export, and sharing
the host's stdin. What it can do differently is translated:

- each run gets a fresh sandbox (guests never see each other's files) and the command is
  named after ``argv[0]``, which is how the SDK sets ``argv[0]``;
- stdout/stderr are always captured by the SDK; ``inherit`` writes them to this process's
  descriptors 1/2 when the guest ends (not while it runs), ``file`` writes the file,
  ``null`` drops them;
- a trap surfaces as an SDK error with the trap's text: it becomes a ``TRAPPED`` result.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import threading
import time
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

import wasmer_sdk

from wasidispatch.engines._api import (
    TRAP_EXIT_CODE,
    Capabilities,
    ExitReason,
    RunResult,
    Stdio,
    Timings,
    Verdict,
    Workload,
)
from wasidispatch.engines._support import wasm_kind
from wasidispatch.errors import CantHandle, CompileError, EngineError

__all__ = ["WasmerEngine"]

T = TypeVar("T")

_CAPABILITIES = Capabilities(
    modules=True,
    components=False,
    precompile=False,
    preopens=False,
    readonly_preopens=False,
    cwd=False,
    stdio_file=True,
    memory_limit=False,
    timeout=True,
    fuel=False,
    entry_export=False,
    fast_instantiate=False,
)

# Package command names the SDK accepts (argv[0] becomes the command name).
_COMMAND_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


class _LoopThread:
    """One asyncio loop running on one daemon thread; `call` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="wasidispatch-wasmer", daemon=True
        )
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, client: wasmer_sdk.Wasmer | None) -> None:
        if not self.loop.is_closed():
            if client is not None and self.thread.is_alive():
                with contextlib.suppress(Exception):
                    self.call(client.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self.thread:
                self.thread.join()
            self.loop.close()


def _shutdown(state: dict[str, Any]) -> None:
    loop: _LoopThread | None = state.pop("loop", None)
    if loop is not None:
        loop.stop(state.pop("client", None))


class WasmerEngine:
    """Runs WASI preview 1 modules on Wasmer through ``wasmer-sdk``.

    ``output_bytes`` bounds what the SDK keeps of each of stdout and stderr (more is cut
    and the result's message says so).

    Example::

        >>> from wasidispatch.engines.wasmer import WasmerEngine
        >>> WasmerEngine().capabilities.preopens
        False
    """

    def __init__(self, *, output_bytes: int = 64 * 1024 * 1024) -> None:
        if output_bytes < 0:
            raise EngineError(f"output_bytes must not be negative, got {output_bytes}")
        self._output_bytes = output_bytes
        self._lock = threading.Lock()
        # Shared with the finalizer, which must not keep `self` alive.
        self._state: dict[str, Any] = {}
        self._finalizer = weakref.finalize(self, _shutdown, self._state)

    # -- the Engine protocol -------------------------------------------------------------

    @property
    def name(self) -> str:
        """``"wasmer"``."""
        return "wasmer"

    @property
    def capabilities(self) -> Capabilities:
        """Modules, timeout, stdio files; no preopens, components, limits or precompile."""
        return _CAPABILITIES

    def version(self) -> str:
        """The installed wasmer-sdk version."""
        from importlib.metadata import version

        return version("wasmer-sdk")

    def fingerprint(self) -> str:
        """Engine name and SDK version (Wasmer has no precompiled artifacts here)."""
        return hashlib.sha256(f"{self.name}\0{self.version()}".encode()).hexdigest()

    def can_handle(self, workload: Workload) -> Verdict:
        """Refuses whatever the SDK cannot honour, saying what."""
        reason = _refusal(workload)
        return Verdict.no(reason) if reason else Verdict.yes()

    def precompile(self, wasm: bytes) -> None:
        """Wasmer-sdk has no precompiled artifacts: always ``None``."""
        return None

    def run(self, workload: Workload) -> RunResult:
        """Run ``workload`` in a fresh sandbox and wait for it."""
        reason = _refusal(workload)
        if reason:
            raise CantHandle(reason)
        try:
            wasm = workload.wasm_bytes()
        except OSError as exc:
            raise CompileError(f"cannot read the Wasm binary: {exc}") from exc
        if wasm_kind(wasm) == "component":
            raise CantHandle("wasmer-sdk does not run components")
        stdin: bytes | None = None
        if workload.stdin.kind == "bytes":
            stdin = workload.stdin.data or b""
        elif workload.stdin.kind == "file":
            assert workload.stdin.path is not None
            try:
                stdin = workload.stdin.path.read_bytes()
            except OSError as exc:
                raise EngineError(f"cannot read stdin file: {exc}") from exc
        return self._loop().call(self._run(workload, wasm, stdin))

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the SDK client and stop the private event loop (idempotent; a later run
        starts them again)."""
        with self._lock:
            _shutdown(self._state)

    def _loop(self) -> _LoopThread:
        with self._lock:
            loop: _LoopThread | None = self._state.get("loop")
            if loop is None:
                loop = self._state["loop"] = _LoopThread()
            return loop

    async def _client(self) -> wasmer_sdk.Wasmer:
        # Only ever called on the loop thread, so no lock is needed around the check.
        client: wasmer_sdk.Wasmer | None = self._state.get("client")
        if client is None:
            try:
                client = wasmer_sdk.Wasmer(output_bytes=self._output_bytes)
            except wasmer_sdk.WasmerError as exc:
                raise EngineError(f"cannot start wasmer-sdk: {exc}") from exc
            self._state["client"] = client
        return client

    # -- running -------------------------------------------------------------------------

    async def _run(self, workload: Workload, wasm: bytes, stdin: bytes | None) -> RunResult:
        client = await self._client()
        command_name = workload.argv[0]
        t0 = time.perf_counter()
        try:
            package = await client.packages.create(
                wasmer_sdk.PackageDefinition(
                    modules={"main": wasm},
                    commands={command_name: wasmer_sdk.PackageCommandDefinition(module="main")},
                    entrypoint=command_name,
                )
            )
        except wasmer_sdk.WasmerError as exc:
            raise _load_error(exc) from exc
        t1 = time.perf_counter()
        try:
            sandbox = await client.sandboxes.create(packages=[package])
        except wasmer_sdk.WasmerError as exc:
            raise _load_error(exc) from exc
        t2 = time.perf_counter()
        try:
            command = sandbox.command(package, list(workload.argv[1:]), env=dict(workload.env))
            output = await command.run(stdin=stdin, timeout=workload.limits.timeout, check=False)
        except wasmer_sdk.WasmerError as exc:
            if exc.code == "EXECUTION_ERROR":
                t3 = time.perf_counter()
                return RunResult(
                    exit_code=TRAP_EXIT_CODE,
                    reason=ExitReason.TRAPPED,
                    message=_trap_message(str(exc)),
                    stdout=b"" if workload.stdout.kind == "capture" else None,
                    stderr=b"" if workload.stderr.kind == "capture" else None,
                    timings=Timings(compile=t1 - t0, instantiate=t2 - t1, run=t3 - t2),
                )
            raise _load_error(exc) from exc
        finally:
            with contextlib.suppress(wasmer_sdk.WasmerError):
                await sandbox.close()
        t3 = time.perf_counter()
        # The SDK compiles lazily, inside the first run: compile time is counted as run.
        timings = Timings(compile=t1 - t0, instantiate=t2 - t1, run=t3 - t2)
        return self._result(workload, output, timings)

    @staticmethod
    def _result(workload: Workload, output: wasmer_sdk.Output, timings: Timings) -> RunResult:
        notes: list[str] = []
        if output.reason is wasmer_sdk.ExitReason.EXITED:
            exit_code, reason = output.exit_code, ExitReason.EXITED
        elif output.reason is wasmer_sdk.ExitReason.TIMEOUT:
            exit_code, reason = TRAP_EXIT_CODE, ExitReason.TIMED_OUT
            notes.append(f"timed out after {workload.limits.timeout}s")
        else:
            exit_code, reason = TRAP_EXIT_CODE, ExitReason.TRAPPED
            notes.append(f"wasmer reported the process {output.reason.value}")
        streams: dict[str, bytes | None] = {}
        for name, fd, stdio, captured in (
            ("stdout", 1, workload.stdout, output.stdout),
            ("stderr", 2, workload.stderr, output.stderr),
        ):
            if captured.truncated:
                notes.append(f"{name} was cut at {len(captured.bytes)} bytes")
            streams[name] = _deliver(stdio, fd, captured.bytes)
        return RunResult(
            exit_code=exit_code,
            reason=reason,
            message="; ".join(notes) or None,
            stdout=streams["stdout"],
            stderr=streams["stderr"],
            timings=timings,
        )


def _refusal(workload: Workload) -> str | None:
    """Why wasmer-sdk cannot run ``workload`` as asked, or ``None``."""
    try:
        if wasm_kind(_header(workload)) == "component":
            return "wasmer-sdk does not run components"
    except (CompileError, OSError):
        pass  # run() reports an unreadable or invalid binary itself
    lim = workload.limits
    checks = (
        (bool(workload.preopens), "wasmer-sdk cannot map host directories (preopens)"),
        (workload.cwd is not None, "wasmer-sdk cannot set a working directory on a host dir"),
        (workload.entry is not None, "wasmer-sdk only runs a module's _start"),
        (workload.precompiled is not None, "wasmer-sdk has no precompiled artifacts"),
        (lim.memory_bytes is not None, "wasmer-sdk has no memory limit"),
        (lim.fuel is not None, "wasmer-sdk has no fuel metering"),
        (lim.max_wasm_stack is not None, "wasmer-sdk cannot set the Wasm stack size"),
        (workload.stdin.kind == "inherit", "wasmer-sdk cannot share the host's stdin"),
        (workload.stdin.kind == "capture", "stdin cannot be captured"),
        (workload.stdout.kind == "bytes", "stdout cannot be fed bytes"),
        (workload.stderr.kind == "bytes", "stderr cannot be fed bytes"),
        (not workload.argv, "wasmer-sdk needs argv[0] (it names the command)"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    if lim.timeout is not None and not lim.timeout > 0:
        return f"limits.timeout must be a positive number, got {lim.timeout}"
    if not _COMMAND_NAME.fullmatch(workload.argv[0]):
        return (
            f"wasmer-sdk sets argv[0] from a command name; {workload.argv[0]!r} is not one "
            "(letters, digits, '_', '.', '+', '-')"
        )
    return None


def _header(workload: Workload) -> bytes:
    if isinstance(workload.wasm, bytes):
        return workload.wasm[:8]
    with open(workload.wasm, "rb") as f:
        return f.read(8)


def _deliver(stdio: Stdio, fd: int, data: bytes) -> bytes | None:
    if stdio.kind == "capture":
        return data
    if stdio.kind == "file":
        assert stdio.path is not None
        try:
            stdio.path.write_bytes(data)
        except OSError as exc:
            raise EngineError(f"cannot write {stdio.path}: {exc}") from exc
    elif stdio.kind == "inherit":
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    return None


def _trap_message(text: str) -> str:
    # "command execution failed: RuntimeError: unreachable\n    at ..." -> keep it whole,
    # minus the SDK's prefix, so the trap's kind and location both survive.
    prefix = "command execution failed: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _load_error(exc: wasmer_sdk.WasmerError) -> Exception:
    text = str(exc)
    if "_start" in text:
        return CantHandle(f"module has no _start export: {text}")
    if "component" in text.lower():
        return CantHandle(text)
    if exc.code in ("PACKAGE_LOAD_FAILED", "INVALID_PACKAGE", "COMPILE_ERROR"):
        return CompileError(f"wasmer cannot load the module: {text.splitlines()[0]}")
    return EngineError(f"wasmer-sdk failed ({exc.code}): {text.splitlines()[0]}")

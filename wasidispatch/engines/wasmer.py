"""The Wasmer engine, on ``wasmer-sdk`` (Wasmer's maintained Python SDK, 0.5.x).

``wasmer-sdk`` runs a WASI module as the command of an in-memory package inside a sandbox
with its own in-memory filesystem, from bytes and offline. Its API is async; this engine
bridges it with one private event loop on one daemon thread per engine instance (made on
first use, stopped and joined by `WasmerEngine.close`, at garbage collection or at exit),
so it works the same from plain and from async callers and leaks no loop.

What the SDK's sandbox looks like to a WASI guest (measured on wasmer-sdk 0.5.0): the
preopens are fixed (``/``, ``.`` and ``/`` again; wasi-libc resolves relative paths through
the last ``/``, so relative paths always start at the root, whatever ``cwd`` the SDK is
given); ``/workspace`` is the one place whose files the host can put in and read back
(``Sandbox.fs`` refuses every other path); everything else in the root is a copy-on-write
view per process: a guest's writes there succeed and vanish when it exits. No mode bits,
no read-only mount, no host directory mapping exist in the SDK.

So host directories (preopens) are *mirrored*, within a size cap:

- a writable preopen at or under ``/workspace`` is copied into the sandbox before the run
  and the guest's changes are copied back afterwards (new and changed files written
  atomically, removed ones removed, only ever inside the host directory, never through a
  host symlink);
- any other preopen (read-only ones anywhere, writable ones elsewhere) cannot be honoured:
  the guest would see its writes succeed and they would never reach the host. It is
  refused, unless the engine was made with ``discard_writes=True``: then it is copied into
  the guest's copy-on-write root, the guest reads it and its writes are discarded at exit
  (the host never changes). That opt-in is what lets OCI bundles (the rootfs preopened as
  ``/``) run on Wasmer; it is not read-only semantics and the capabilities do not claim it.

``argv[0]`` is exactly the workload's: a command named after it when it is a valid package
command name, otherwise the ``exec-name`` of the WASI runner, set through a ``wasmer.toml``
package. ``cwd`` is honoured when it is ``/`` (the only directory relative paths resolve
against). What the SDK cannot do otherwise is declared in `capabilities` and refused with
`CantHandle` by `can_handle`/`run`, never ignored: components, precompilation, memory caps,
fuel, another entry export. What it does differently is
translated:

- each run gets a fresh sandbox (guests never see each other's files);
- stdio is streamed while the guest runs (``Command.spawn`` with pipes): stdin is fed
  chunk by chunk from bytes, a file, a FIFO, a descriptor or this process's own stdin
  (``inherit``), and the SDK's stdin pipe holds about 64 KiB, so nothing is read ahead
  beyond one chunk; a read waiting on a FIFO obeys the timeout and the `Cancel`. Outputs
  go to this process's descriptors 1/2 (``inherit``), a file, a FIFO, a descriptor, or are
  captured (up to ``output_bytes``) or dropped;
- a `Cancel` kills the SDK process (the result is ``CANCELLED``);
- a trap surfaces as an SDK error with the trap's text: it becomes a ``TRAPPED`` result,
  and what the guest wrote to stdout/stderr before it is kept;
  an import the sandbox does not provide (the guest never started) is `CantHandle`, as on
  the wasmtime engines.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import gc
import hashlib
import os
import posixpath
import re
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import wasmer_sdk

from wasidispatch.engines._api import (
    TRAP_EXIT_CODE,
    Capabilities,
    ExitReason,
    Preopen,
    RunResult,
    Stdio,
    Timings,
    Verdict,
    Workload,
    cancelled_result,
)
from wasidispatch.engines._stdio import (
    CHUNK,
    RunControl,
    check_fd,
    needs_plumbing,
    open_input,
    open_output,
    read_chunk,
    write_all,
)
from wasidispatch.engines._support import (
    c_string_refusal,
    check_preopens,
    check_stdin_file,
    timeout_refusal,
    wasm_kind,
)
from wasidispatch.errors import CantHandle, CompileError, EngineError

__all__ = ["MIRROR_LIMIT", "WasmerEngine"]

T = TypeVar("T")

_CAPABILITIES = Capabilities(
    modules=True,
    components=False,
    precompile=False,
    # Only under /workspace (or with discard_writes): not the general capability.
    preopens=False,
    readonly_preopens=False,
    # Only cwd "/" (relative paths resolve against the root whatever the SDK is told).
    cwd=False,
    stdio_file=True,
    memory_limit=False,
    timeout=True,
    fuel=False,
    entry_export=False,
    fast_instantiate=False,
    cancel=True,
    stdio_fd=True,
)

#: Default cap on the bytes of host files mirrored into one sandbox (all preopens together).
MIRROR_LIMIT = 256 * 1024 * 1024

# Package command names the SDK accepts; another argv[0] goes through exec-name.
_COMMAND_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_WORKSPACE = "/workspace"
_PACKAGE_CACHE = 16


_LIVE: weakref.WeakValueDictionary[int, WasmerEngine] = weakref.WeakValueDictionary()
_exit_hook_registered = False
_exit_lock = threading.Lock()


def _register_exit_hook() -> None:
    """Register `_close_all_at_exit` once, when the first event loop starts: atexit runs
    hooks last-registered-first, so it runs before the hooks of modules imported earlier
    (wasmtime's among them), while the interpreter is whole."""
    global _exit_hook_registered
    with _exit_lock:
        if not _exit_hook_registered:
            atexit.register(_close_all_at_exit)
            _exit_hook_registered = True


def _close_all_at_exit() -> None:
    """Close every live engine (SDK client, then its loop thread) and free the SDK's objects.

    Left to interpreter finalization, wasmer-sdk's native threads could call back into
    Python (the continuation of an async call) while the interpreter is being torn down:
    such a thread is ended by Python in the middle of Rust frames, which aborts the whole
    process ("FATAL: exception not rethrown", SIGABRT) or crashes it (SIGSEGV) at exit.
    """
    for engine in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            engine.close()
    gc.collect()  # the SDK's native objects are freed now, not during finalization


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


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wasidispatch" / "wasmer"


def _shutdown(state: dict[str, Any]) -> None:
    state.pop("packages", None)
    loop: _LoopThread | None = state.pop("loop", None)
    if loop is not None:
        loop.stop(state.pop("client", None))


class WasmerEngine:
    """Runs WASI preview 1 modules on Wasmer through ``wasmer-sdk``.

    ``output_bytes`` bounds what the SDK keeps of each of stdout and stderr (more is cut
    and the result's message says so). ``discard_writes=True`` accepts the preopens Wasmer
    cannot write back (read-only ones, and writable ones outside ``/workspace``): they are
    mirrored into the guest's copy-on-write root, where its writes succeed and are
    discarded at exit (see the module docstring). ``mirror_limit`` caps the bytes of host
    files mirrored per run (more is refused with `CantHandle`). ``cache_root`` is where
    Wasmer keeps compiled modules (default: ``$XDG_CACHE_HOME/wasidispatch/wasmer``).

    Example::

        >>> from wasidispatch.engines.wasmer import WasmerEngine
        >>> WasmerEngine().capabilities.readonly_preopens
        False
    """

    def __init__(
        self,
        *,
        output_bytes: int = 64 * 1024 * 1024,
        discard_writes: bool = False,
        mirror_limit: int = MIRROR_LIMIT,
        cache_root: str | os.PathLike[str] | None = None,
    ) -> None:
        if output_bytes < 0:
            raise EngineError(f"output_bytes must not be negative, got {output_bytes}")
        if mirror_limit < 0:
            raise EngineError(f"mirror_limit must not be negative, got {mirror_limit}")
        self._output_bytes = output_bytes
        self._discard_writes = discard_writes
        self._mirror_limit = mirror_limit
        self._cache_root = Path(cache_root) if cache_root is not None else _default_cache_root()
        self._lock = threading.Lock()
        # Shared with the finalizer, which must not keep `self` alive.
        self._state: dict[str, Any] = {}
        self._finalizer = weakref.finalize(self, _shutdown, self._state)
        _LIVE[id(self)] = self

    # -- the Engine protocol -------------------------------------------------------------

    @property
    def name(self) -> str:
        """``"wasmer"``."""
        return "wasmer"

    @property
    def capabilities(self) -> Capabilities:
        """Modules, timeout, stdio files; preopens only as the module docstring says; no
        components, memory cap, fuel or precompile."""
        return _CAPABILITIES

    @property
    def discard_writes(self) -> bool:
        """Whether preopens that cannot be written back are mirrored with discarded writes."""
        return self._discard_writes

    def version(self) -> str:
        """The installed wasmer-sdk version."""
        from importlib.metadata import version

        return version("wasmer-sdk")

    def fingerprint(self) -> str:
        """Engine name and SDK version (Wasmer has no precompiled artifacts here)."""
        return hashlib.sha256(f"{self.name}\0{self.version()}".encode()).hexdigest()

    def can_handle(self, workload: Workload) -> Verdict:
        """Refuses whatever the SDK cannot honour, saying what (preopens are measured, not
        read: a missing host directory is left for `run` to report)."""
        reason = _refusal(workload, self._discard_writes)
        if reason is None:
            try:
                _measure(workload.preopens, self._mirror_limit)
            except CantHandle as exc:
                reason = str(exc)
            except (EngineError, OSError):
                pass
        return Verdict.no(reason) if reason else Verdict.yes()

    def precompile(self, wasm: bytes) -> None:
        """Wasmer-sdk has no precompiled artifacts: always ``None``."""
        return None

    def run(self, workload: Workload) -> RunResult:
        """Run ``workload`` in a fresh sandbox and wait for it."""
        reason = _refusal(workload, self._discard_writes)
        if reason:
            raise CantHandle(reason)
        check_preopens(workload.preopens)
        try:
            wasm = workload.wasm_bytes()
        except OSError as exc:
            raise CompileError(f"cannot read the Wasm binary: {exc}") from exc
        if wasm_kind(wasm) == "component":
            raise CantHandle("wasmer-sdk does not run components")
        cancel = workload.cancel
        if cancel is not None and cancel.cancelled:
            return RunResult(*cancelled_result(cancel))
        control = RunControl(workload.limits.timeout, cancel)
        try:
            with contextlib.ExitStack() as stack:
                stdin = stack.enter_context(_stdin_source(workload.stdin))
                outputs = {
                    name: stack.enter_context(_Sink.open(stdio, name, control, self._output_bytes))
                    for name, stdio in (("stdout", workload.stdout), ("stderr", workload.stderr))
                }
                t0 = time.perf_counter()
                layout = _Layout.build(workload.preopens, self._mirror_limit)
                mirror_in = time.perf_counter() - t0
                return self._loop().call(
                    self._run(workload, wasm, stdin, outputs, control, layout, mirror_in)
                )
        finally:
            control.close()

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
                _register_exit_hook()
                loop = self._state["loop"] = _LoopThread()
            return loop

    async def _client(self) -> wasmer_sdk.Wasmer:
        # Only ever called on the loop thread, so no lock is needed around the check.
        client: wasmer_sdk.Wasmer | None = self._state.get("client")
        if client is None:
            try:
                client = wasmer_sdk.Wasmer(
                    cache_root=self._cache_root, output_bytes=self._output_bytes
                )
            except wasmer_sdk.WasmerError as exc:
                raise EngineError(f"cannot start wasmer-sdk: {exc}") from exc
            self._state["client"] = client
        return client

    async def _package(
        self, client: wasmer_sdk.Wasmer, wasm: bytes, argv0: str
    ) -> wasmer_sdk.Package:
        """The package whose command runs ``wasm`` with ``argv0`` as argv[0] (cached)."""
        cache: collections.OrderedDict[tuple[bytes, str], wasmer_sdk.Package]
        cache = self._state.setdefault("packages", collections.OrderedDict())
        key = (hashlib.sha256(wasm).digest(), argv0)
        package = cache.get(key)
        if package is not None:
            cache.move_to_end(key)
            return package
        named = _COMMAND_NAME.fullmatch(argv0) is not None
        command = argv0 if named else "main"
        try:
            # Creating from a definition validates the module (and its _start) up front.
            package = await client.packages.create(
                wasmer_sdk.PackageDefinition(
                    modules={"main": wasm},
                    commands={command: wasmer_sdk.PackageCommandDefinition(module="main")},
                    entrypoint=command,
                )
            )
            if not named:
                package = await _exec_name_package(client, wasm, argv0)
        except wasmer_sdk.WasmerError as exc:
            raise _load_error(exc) from exc
        cache[key] = package
        while len(cache) > _PACKAGE_CACHE:
            cache.popitem(last=False)
        return package

    # -- running -------------------------------------------------------------------------

    async def _run(
        self,
        workload: Workload,
        wasm: bytes,
        stdin: _Source,
        outputs: dict[str, _Sink],
        control: RunControl,
        layout: _Layout,
        mirror_in: float,
    ) -> RunResult:
        client = await self._client()
        t0 = time.perf_counter()
        package = await self._package(client, wasm, workload.argv[0])
        packages = [package]
        try:
            if layout.package_files:
                # Files outside /workspace can only come from a package: one more package
                # whose sole purpose is to carry them.
                packages.append(
                    await client.packages.create(
                        wasmer_sdk.PackageDefinition(
                            modules={"main": wasm},
                            commands={
                                "wasidispatch-files": wasmer_sdk.PackageCommandDefinition(
                                    module="main"
                                )
                            },
                            files=layout.package_files,
                        )
                    )
                )
        except wasmer_sdk.WasmerError as exc:
            raise _load_error(exc) from exc
        t1 = time.perf_counter()
        try:
            sandbox = await client.sandboxes.create(packages=packages, files=layout.sandbox_files)
        except wasmer_sdk.WasmerError as exc:
            raise _load_error(exc) from exc
        try:
            try:
                for directory in layout.sandbox_dirs:
                    await sandbox.fs.mkdir(directory, recursive=True)
            except wasmer_sdk.WasmerError as exc:
                raise EngineError(f"cannot mirror a preopen into the sandbox: {exc}") from exc
            t2 = time.perf_counter()
            error: wasmer_sdk.WasmerError | None = None
            output: wasmer_sdk.Output | None = None
            try:
                command = sandbox.command(package, list(workload.argv[1:]), env=dict(workload.env))
                output = await _spawn_and_wait(
                    command, _sdk_timeout(workload.limits.timeout), stdin, outputs, control
                )
            except wasmer_sdk.WasmerError as exc:
                if exc.code != "EXECUTION_ERROR":
                    raise _load_error(exc) from exc
                if "unknown import" in str(exc):  # it never started: as the wasmtime engines
                    first = str(exc).strip().splitlines()[0]
                    raise CantHandle(f"cannot link the guest: {first}") from exc
                error = exc
            # Written back whatever way the guest ended: a killed process's writes stay too.
            notes = await layout.write_back(sandbox)
        finally:
            with contextlib.suppress(wasmer_sdk.WasmerError):
                await sandbox.close()
        t3 = time.perf_counter()
        # The SDK compiles lazily, inside the first run: compile time is counted as run.
        # Mirroring in counts as instantiation, writing back as run.
        timings = Timings(compile=t1 - t0, instantiate=mirror_in + t2 - t1, run=t3 - t2)
        return self._result(workload, output, error, outputs, control, timings, notes)

    @staticmethod
    def _result(
        workload: Workload,
        output: wasmer_sdk.Output | None,
        error: wasmer_sdk.WasmerError | None,
        outputs: dict[str, _Sink],
        control: RunControl,
        timings: Timings,
        notes: list[str],
    ) -> RunResult:
        notes = list(notes)
        message: str | None
        if control.cancelled:
            assert workload.cancel is not None
            exit_code, reason, message = cancelled_result(workload.cancel)
            notes.insert(0, message)
        elif output is None:
            assert error is not None
            exit_code, reason = TRAP_EXIT_CODE, ExitReason.TRAPPED
            notes.insert(0, _trap_message(str(error)))
        elif output.reason is wasmer_sdk.ExitReason.TIMEOUT or control.expired:
            exit_code, reason = TRAP_EXIT_CODE, ExitReason.TIMED_OUT
            notes.append(f"timed out after {workload.limits.timeout}s")
        elif output.reason is wasmer_sdk.ExitReason.EXITED:
            exit_code, reason = output.exit_code, ExitReason.EXITED
        else:
            exit_code, reason = TRAP_EXIT_CODE, ExitReason.TRAPPED
            notes.append(f"wasmer reported the process {output.reason.value}")
        for name, sink in outputs.items():
            if sink.truncated:
                notes.append(f"{name} was cut at {sink.limit} bytes")
            if sink.lost:
                notes.append(f"{name}: {sink.lost}")
        return RunResult(
            exit_code=exit_code,
            reason=reason,
            message="; ".join(notes) or None,
            stdout=outputs["stdout"].captured(),
            stderr=outputs["stderr"].captured(),
            timings=timings,
        )


async def _exec_name_package(
    client: wasmer_sdk.Wasmer, wasm: bytes, argv0: str
) -> wasmer_sdk.Package:
    """A package whose WASI command has ``exec-name = argv0``: the only way the SDK offers
    to give the guest an argv[0] that is not a command name (such as ``/app.wasm``).
    Only a ``wasmer.toml`` package on disk can say it; the SDK reads it whole on load."""
    manifest = (
        '[package]\nname = "wasidispatch/guest"\nversion = "0.0.0"\n\n'
        '[[module]]\nname = "main"\nsource = "main.wasm"\nabi = "wasi"\n\n'
        '[[command]]\nname = "main"\nmodule = "main"\nrunner = "wasi"\n\n'
        f"[command.annotations.wasi]\nexec-name = {_toml_string(argv0)}\n"
    )
    with tempfile.TemporaryDirectory(prefix="wasidispatch-wasmer-") as tmp:
        Path(tmp, "main.wasm").write_bytes(wasm)
        Path(tmp, "wasmer.toml").write_text(manifest, encoding="utf-8")
        return await client.packages.load(Path(tmp))


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string (control characters escaped, the rest as is)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# -- refusals ----------------------------------------------------------------------------


def _refusal(workload: Workload, discard_writes: bool) -> str | None:
    """Why wasmer-sdk cannot run ``workload`` as asked, or ``None``."""
    try:
        if wasm_kind(_header(workload)) == "component":
            return "wasmer-sdk does not run components"
    except (CompileError, OSError):
        pass  # run() reports an unreadable or invalid binary itself
    lim = workload.limits
    checks = (
        (workload.entry is not None, "wasmer-sdk only runs a module's _start"),
        (workload.precompiled is not None, "wasmer-sdk has no precompiled artifacts"),
        (lim.memory_bytes is not None, "wasmer-sdk has no memory limit"),
        (lim.fuel is not None, "wasmer-sdk has no fuel metering"),
        (lim.max_wasm_stack is not None, "wasmer-sdk cannot set the Wasm stack size"),
        (workload.stdin.kind == "capture", "stdin cannot be captured"),
        (workload.stdout.kind == "bytes", "stdout cannot be fed bytes"),
        (workload.stderr.kind == "bytes", "stderr cannot be fed bytes"),
        (not workload.argv, "wasmer-sdk always gives the guest an argv[0]; argv is empty"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    unrepresentable = c_string_refusal(workload)
    if unrepresentable is not None:
        return unrepresentable
    timeout_reason = timeout_refusal(lim.timeout)
    if timeout_reason is not None:
        return timeout_reason
    if not _encodable(workload.argv[0]):
        return f"argv[0] {workload.argv[0]!r} is not valid Unicode"
    if workload.cwd is not None and posixpath.normpath(workload.cwd) != "/":
        return (
            f"wasmer-sdk cannot set the working directory {workload.cwd!r}: it fixes the "
            "guest's preopens (/, ., /) and a WASI guest resolves relative paths through them "
            "from /, whatever cwd the SDK's Command is given (measured on wasmer-sdk 0.5)"
        )
    for pre in workload.preopens:
        refused = _preopen_refusal(pre, discard_writes)
        if refused:
            return refused
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _guest_path(guest: str) -> str | None:
    """The absolute guest path of a preopen (a relative name such as ``fs-tests.dir`` is
    reached from the root, where the sandbox resolves relative paths), or ``None`` when it
    uses ``..``."""
    if ".." in guest.split("/"):
        return None
    return posixpath.normpath("/" + guest.lstrip("/")) if guest not in ("", ".") else "/"


def _under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def _preopen_refusal(pre: Preopen, discard_writes: bool) -> str | None:
    guest = _guest_path(pre.guest)
    if guest is None:
        return f"preopen guest path {pre.guest!r} must not contain '..'"
    if not _encodable(guest):
        return f"preopen guest path {pre.guest!r} is not valid Unicode"
    if discard_writes:
        return None
    if pre.readonly:
        return (
            f"wasmer-sdk has no read-only directories: the guest's writes to the read-only "
            f"preopen {guest} would succeed (discard_writes=True mirrors it and discards them)"
        )
    if not _under(guest, _WORKSPACE):
        return (
            f"wasmer-sdk keeps a guest's writes only under {_WORKSPACE}: writes to the preopen "
            f"{guest} could not reach the host (discard_writes=True mirrors it and discards "
            "them)"
        )
    return None


# -- mirroring host directories -----------------------------------------------------------


@dataclass
class _Tree:
    """What one host directory holds, by ``/``-separated path relative to it."""

    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    #: host symlinks to a file inside the directory: mirrored as that file, never written
    links: set[str] = field(default_factory=set)
    #: entries not mirrored (symlinks leaving the directory or to directories, devices...)
    skipped: list[str] = field(default_factory=list)
    size: int = 0


def _scan(host: Path, budget: int, *, read: bool) -> _Tree:
    """Walk ``host`` without following symlinks out of it; refuse above ``budget`` bytes."""
    tree = _Tree()
    root = os.path.realpath(host)
    stack = [(os.fspath(host), "")]
    while stack:
        path, rel = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if not _encodable(entry.name):
                    raise CantHandle(
                        f"wasmer-sdk cannot mirror {entry.path!r}: its name is not UTF-8"
                    )
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    inside = os.path.commonpath([root, target]) == root
                    if not (inside and os.path.isfile(target)):
                        tree.skipped.append(child)
                        continue
                    tree.links.add(child)
                    tree.size += os.stat(target).st_size
                    source = target
                elif entry.is_dir(follow_symlinks=False):
                    tree.dirs.add(child)
                    stack.append((entry.path, child))
                    continue
                elif entry.is_file(follow_symlinks=False):
                    tree.size += entry.stat(follow_symlinks=False).st_size
                    source = entry.path
                else:
                    tree.skipped.append(child)
                    continue
                if tree.size > budget:
                    raise CantHandle(
                        f"preopen {host} holds more than the {budget} bytes wasmer-sdk may "
                        "mirror into its sandbox (raise mirror_limit, or use another engine)"
                    )
                if read:
                    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with open(fd, "rb") as f:
                        tree.files[child] = f.read()
                else:
                    tree.files[child] = b""
    return tree


def _measure(preopens: tuple[Preopen, ...], limit: int) -> None:
    """Raise `CantHandle` when the preopens hold more than ``limit`` bytes (stat only)."""
    budget = limit
    for pre in preopens:
        budget -= _scan(Path(pre.host), budget, read=False).size


@dataclass
class _Mirror:
    host: Path
    guest: str
    tree: _Tree
    write_back: bool
    #: guest paths of deeper preopens inside this one (theirs, not this one's)
    nested: tuple[str, ...] = ()


@dataclass
class _Layout:
    """Where each preopen's files go in the sandbox, and how changes come back."""

    mirrors: list[_Mirror] = field(default_factory=list)
    sandbox_files: dict[str, bytes] = field(default_factory=dict)
    sandbox_dirs: list[str] = field(default_factory=list)
    package_files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def build(cls, preopens: tuple[Preopen, ...], limit: int) -> _Layout:
        layout = cls()
        budget = limit
        placed: list[tuple[Preopen, str]] = []
        for pre in preopens:
            guest = _guest_path(pre.guest)
            assert guest is not None  # _refusal checked it
            placed.append((pre, guest))
        # Shallow first, so that a deeper preopen's files win where they overlap.
        placed.sort(key=lambda item: item[1].count("/") if item[1] != "/" else 0)
        for pre, guest in placed:
            try:
                tree = _scan(Path(pre.host), budget, read=True)
            except OSError as exc:
                raise EngineError(f"cannot mirror preopen {pre.host}: {exc}") from exc
            budget -= tree.size
            nested = tuple(g for p, g in placed if g != guest and _under(g, guest) and p is not pre)
            in_workspace = _under(guest, _WORKSPACE) and guest != "/"
            layout.mirrors.append(
                _Mirror(Path(pre.host), guest, tree, in_workspace and not pre.readonly, nested)
            )
            for rel in ("", *sorted(tree.dirs)):
                path = _join(guest, rel)
                if _under(path, _WORKSPACE) and path != "/":
                    layout.sandbox_dirs.append(path)
            for rel, data in tree.files.items():
                path = _join(guest, rel)
                if _under(path, _WORKSPACE) and path != "/":
                    layout.sandbox_files[path] = data
                else:
                    layout.package_files[path] = data
        return layout

    async def write_back(self, sandbox: wasmer_sdk.Sandbox) -> list[str]:
        """Apply the guest's changes to each writable mirror's host directory; notes."""
        notes: list[str] = []
        for mirror in self.mirrors:
            if mirror.write_back:
                try:
                    current = await _read_sandbox_tree(sandbox, mirror.guest, mirror.nested)
                except wasmer_sdk.WasmerError as exc:
                    raise EngineError(
                        f"cannot read back preopen {mirror.guest} from the sandbox: {exc}"
                    ) from exc
                notes.extend(_apply(mirror, current))
        return notes


def _join(guest: str, rel: str) -> str:
    if not rel:
        return guest
    return f"{guest.rstrip('/')}/{rel}"


async def _read_sandbox_tree(
    sandbox: wasmer_sdk.Sandbox, guest: str, nested: tuple[str, ...]
) -> _Tree:
    tree = _Tree()
    stack = [""]
    while stack:
        rel = stack.pop()
        for entry in await sandbox.fs.read_dir(_join(guest, rel)):
            child = f"{rel}/{entry.name}" if rel else entry.name
            path = _join(guest, child)
            if any(_under(path, n) for n in nested):
                continue  # another preopen's files
            if entry.kind == "directory":
                tree.dirs.add(child)
                stack.append(child)
            else:
                tree.files[child] = await sandbox.fs.read(path)
    return tree


def _apply(mirror: _Mirror, current: _Tree) -> list[str]:
    """Make ``mirror.host`` reflect the guest's changes (``current`` vs the snapshot)."""
    before, notes, failures = mirror.tree, [], []
    host = os.fspath(mirror.host)

    def attempt(what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except OSError as exc:
            failures.append(f"{what}: {exc}")

    for rel in sorted(set(before.files) - set(current.files)):
        if rel in before.links:
            notes.append(f"{mirror.guest}/{rel} not removed on the host (a host symlink)")
        else:
            attempt(f"remove {rel}", _host_remove, host, rel, False)
    for rel in sorted(before.dirs - current.dirs, key=lambda r: -r.count("/")):
        attempt(f"remove {rel}/", _host_remove, host, rel, True)
    for rel in sorted(current.dirs - before.dirs, key=lambda r: r.count("/")):
        attempt(f"create {rel}/", _host_mkdir, host, rel)
    for rel, data in sorted(current.files.items()):
        if before.files.get(rel) == data and rel in before.files:
            continue
        if rel in before.links:
            notes.append(f"{mirror.guest}/{rel} not written back (a host symlink)")
            continue
        attempt(f"write {rel}", _host_write, host, rel, data)
    if failures:
        raise EngineError(
            f"could not write the guest's changes back to {mirror.host}: " + "; ".join(failures)
        )
    return notes


def _host_parent(root: str, rel: str) -> str:
    """The host directory holding ``rel`` under ``root``, refusing any symlink on the way."""
    parent = root
    for part in rel.split("/")[:-1]:
        parent = os.path.join(parent, part)
        st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(f"{parent} is not a directory (or is a symlink)")
    return parent


def _host_remove(root: str, rel: str, directory: bool) -> None:
    parent = _host_parent(root, rel)
    target = os.path.join(parent, rel.rsplit("/", 1)[-1])
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if directory and stat.S_ISDIR(st.st_mode):
        os.rmdir(target)
    elif not directory and stat.S_ISREG(st.st_mode):
        os.unlink(target)


def _host_mkdir(root: str, rel: str) -> None:
    parent = _host_parent(root, rel)
    target = os.path.join(parent, rel.rsplit("/", 1)[-1])
    with contextlib.suppress(FileExistsError):
        os.mkdir(target, 0o755)
    if not stat.S_ISDIR(os.lstat(target).st_mode):
        raise OSError(f"{target} exists and is not a directory")


def _host_write(root: str, rel: str, data: bytes) -> None:
    """Replace ``root/rel`` atomically (a temporary file renamed over it)."""
    parent = _host_parent(root, rel)
    target = os.path.join(parent, rel.rsplit("/", 1)[-1])
    mode = 0o644
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(target)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(f"{target} is a directory")
        if stat.S_ISREG(st.st_mode):
            mode = stat.S_IMODE(st.st_mode)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".wasidispatch-")
    try:
        with open(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _header(workload: Workload) -> bytes:
    if isinstance(workload.wasm, bytes):
        return workload.wasm[:8]
    with open(workload.wasm, "rb") as f:
        return f.read(8)


# -- streaming stdio ------------------------------------------------------------------------


@dataclass
class _Source:
    """Where the guest's stdin comes from: bytes, or a descriptor (owned: closed after)."""

    data: bytes | None = None
    fd: int | None = None
    regular: bool = False


@contextlib.contextmanager
def _stdin_source(stdio: Stdio) -> Iterator[_Source]:
    if stdio.kind == "bytes":
        yield _Source(data=stdio.data or b"")
        return
    if stdio.kind == "null":
        yield _Source(data=b"")
        return
    if stdio.kind == "inherit":
        yield _Source(fd=check_fd(Stdio.fd(0), "stdin (inherited)"))
        return
    if stdio.kind == "fd":
        yield _Source(fd=check_fd(stdio, "stdin"))
        return
    assert stdio.kind == "file"
    assert stdio.path is not None
    check_stdin_file(stdio.path)
    fd, _ = open_input(stdio, "stdin")  # non-blocking: a FIFO's open never waits
    try:
        yield _Source(fd=fd, regular=stat.S_ISREG(os.fstat(fd).st_mode))
    finally:
        os.close(fd)


class _Sink:
    """Where one of the guest's outputs goes, fed chunk by chunk while it runs."""

    def __init__(
        self, stdio: Stdio, stream: str, control: RunControl, limit: int, fd: int | None
    ) -> None:
        self.stdio = stdio
        self.stream = stream
        self.control = control
        self.limit = limit
        self.fd = fd
        self.buf = bytearray() if stdio.kind == "capture" else None
        self.truncated = False
        self.lost = ""

    @classmethod
    @contextlib.contextmanager
    def open(cls, stdio: Stdio, stream: str, control: RunControl, limit: int) -> Iterator[_Sink]:
        fd: int | None = None
        owned = False
        if stdio.kind == "inherit":
            fd = 1 if stream == "stdout" else 2
        elif stdio.kind == "fd":
            fd = check_fd(stdio, stream)
        elif stdio.kind == "file" and not needs_plumbing(stdio):
            assert stdio.path is not None
            try:
                fd = os.open(
                    stdio.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
                )
            except OSError as exc:
                raise EngineError(f"cannot open {stream} file {stdio.path}: {exc}") from exc
            owned = True
        sink = cls(stdio, stream, control, limit, fd)
        try:
            yield sink
        finally:
            if owned or sink._fifo:
                assert sink.fd is not None
                os.close(sink.fd)

    _fifo = False

    def write(self, data: bytes) -> None:
        """Deliver ``data`` (called on a worker thread: it may block until the deadline)."""
        if self.buf is not None:
            room = self.limit - len(self.buf)
            if len(data) > room:
                self.truncated = True
                data = data[: max(room, 0)]
            self.buf.extend(data)
            return
        if self.stdio.kind == "null" or self.lost:
            return
        if self.fd is None:  # a FIFO: opened once it has a reader
            self.fd = open_output(self.stdio, self.stream, self.control)
            if self.fd is None:
                self.lost = "the FIFO had no reader before the run stopped"
                return
            self._fifo = True
        if not write_all(self.fd, data, self.control):
            self.lost = "the reader went away or the run stopped; the rest was dropped"

    def captured(self) -> bytes | None:
        return bytes(self.buf) if self.buf is not None else None


async def _feed(process: wasmer_sdk.Process, source: _Source, control: RunControl) -> None:
    """Stream ``source`` into the guest's stdin, one chunk at a time (the SDK's pipe holds
    about 64 KiB: a guest that does not read stops the feeding, nothing piles up here)."""
    assert process.stdin is not None
    try:
        if source.data is not None:
            view = memoryview(source.data)
            for start in range(0, len(view), CHUNK):
                await process.stdin.write(bytes(view[start : start + CHUNK]))
        elif source.fd is not None:
            fd = source.fd
            while True:
                if source.regular:
                    chunk: bytes | None = await asyncio.to_thread(os.read, fd, CHUNK)
                else:
                    chunk = await asyncio.to_thread(read_chunk, fd, control)
                if not chunk:  # end of file, or the run stopped
                    break
                await process.stdin.write(chunk)
        await process.stdin.close()
    except wasmer_sdk.WasmerError:
        pass  # the guest closed its stdin or exited: nothing more to feed
    except OSError:
        with contextlib.suppress(wasmer_sdk.WasmerError):
            await process.stdin.close()


async def _drain(stream: Any, sink: _Sink) -> None:
    if stream is None:
        return
    async for chunk in stream:
        if sink.buf is not None or sink.stdio.kind == "null":
            sink.write(chunk)
        else:
            await asyncio.to_thread(sink.write, chunk)


async def _spawn_and_wait(
    command: wasmer_sdk.Command,
    timeout: float | None,
    stdin: _Source,
    outputs: dict[str, _Sink],
    control: RunControl,
) -> wasmer_sdk.Output:
    """Run ``command`` with streamed stdio; kill it when the run's `Cancel` fires."""
    process = await command.spawn(timeout=timeout, stdin="pipe", stdout="pipe", stderr="pipe")
    loop = asyncio.get_running_loop()
    unsubscribe: Any = None
    if control.cancel is not None:

        def kill() -> None:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(_kill(process)))

        unsubscribe = control.cancel.subscribe(kill)
    feeder = asyncio.ensure_future(_feed(process, stdin, control))
    drains = [
        asyncio.ensure_future(_drain(process.stdout, outputs["stdout"])),
        asyncio.ensure_future(_drain(process.stderr, outputs["stderr"])),
    ]
    output: wasmer_sdk.Output | None = None
    try:
        output = await process.wait(check=False)
    finally:
        if unsubscribe is not None:
            unsubscribe()
        feeder.cancel()
        control.end()  # a stdin read waiting on a FIFO returns now, and reads no more
        # The SDK ends the output streams when the guest exits or traps, but never after a
        # kill or a timeout: then only what is already buffered is taken.
        ended = output is None or output.reason is wasmer_sdk.ExitReason.EXITED
        _, pending = await asyncio.wait(drains, timeout=_DRAIN_GRACE if ended else 0.1)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(feeder, *drains, return_exceptions=True)
    for result in results[1:]:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise EngineError(f"wasmer-sdk output stream failed: {result}") from result
    return output


#: Seconds the output streams of a guest that exited may take to deliver their last bytes.
_DRAIN_GRACE = 10.0


async def _kill(process: wasmer_sdk.Process) -> None:
    with contextlib.suppress(wasmer_sdk.WasmerError):
        await process.kill()


#: Longest timeout handed to the SDK (about 31 years), which refuses one beyond ~1.8e19 s.
_MAX_TIMEOUT = 1e9


def _sdk_timeout(timeout: float | None) -> float | None:
    """``timeout`` as the SDK takes it: a longer one than it can represent is no limit."""
    return None if timeout is None else min(timeout, _MAX_TIMEOUT)


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

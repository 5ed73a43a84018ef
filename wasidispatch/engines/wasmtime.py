"""The wasmtime engine (wasmtime-py 50.x): WASI preview 1 modules and preview 2 components.

Mostly translation between a `Workload` and wasmtime's `WasiConfig`/`Store`, and between
wasmtime's exceptions and `RunResult`/wasidispatch errors. How the odd parts are done:

- **Timeout**: epoch interruption. Every configuration compiles with epoch checks; a
  per-engine ticker thread increments the epoch every `TICK` seconds while at least one run
  with a timeout is in flight (so concurrent runs do not cut each other short), and stops
  and is joined when the last one ends. A run's deadline is its timeout in ticks, so it is
  honoured to within one tick. Runs without a timeout get a deadline that never comes.
- **Memory cap**: store limits (`Store.set_limits(memory_size=...)`): a `memory.grow`
  beyond the cap returns -1 to the guest. What the guest does then is its business (wasmtime
  does not tell the embedder that a grow was refused); when it *traps* while one of its
  exported memories holds at least three quarters of the cap, the run is classified
  `OUT_OF_MEMORY` (the message keeps the trap): a heuristic, documented as such. An initial
  memory above the cap fails instantiation and is `OUT_OF_MEMORY` too.
- **Fuel** needs fuel-metering code, and a ``max_wasm_stack`` a differently configured
  wasmtime engine: such workloads run on a second wasmtime engine made on first use, compiled
  from ``wasm`` (a precompiled artifact is made for the default configuration only).
- **max_wasm_stack**: wasmtime aborts the whole process for 0 or above its 2 MiB async stack,
  so `can_handle` refuses those values before wasmtime sees them.
- **Precompiled artifacts** carry wasidispatch's envelope trailer (fingerprint, kind, length,
  SHA-256) after wasmtime's own bytes. Bytes are verified in full before `Module.deserialize`;
  a path (as `PrecompileCache` hands out, its sha256 already checked) has its trailer and
  size checked and is then mapped by `Module.deserialize_file`, without re-hashing the
  payload (see `wasidispatch.engines._support.open_envelope_file` for why that is sound).
- **stdin bytes** go through a temporary file (wasmtime-py exposes no in-memory stdin); it is
  removed when the run ends. Captured stdout/stderr use wasmtime's custom output callbacks.
- **cwd**: see `wasidispatch.engines._support.cwd_preopen`.
- **Descriptors, FIFOs and sockets** as stdio (``Stdio.fd``, a ``Stdio.file`` that is a FIFO)
  go through `wasidispatch.engines._stdio.Plumbing`: wasmtime opens a pipe, one pump thread
  per such run moves the bytes, and stops at the deadline or on cancel.
- **Cancel**: a run with a `Cancel` gets an epoch deadline of one tick and a deadline
  callback that, every tick, either extends it by one tick or ends the guest (cancelled, or
  past its timeout). Runs without one are unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
import wasmtime.component as wtc

from wasidispatch.engines._api import (
    Cancel,
    Capabilities,
    ExitReason,
    RunResult,
    Stdio,
    Timings,
    Verdict,
    Workload,
    cancelled_result,
)
from wasidispatch.engines._stdio import Plumbing, RunControl, needs_plumbing
from wasidispatch.engines._support import (
    ENVELOPE_FORMAT,
    LIMIT_MAX,
    NEVER,
    TICK,
    WASMTIME_MAX_WASM_STACK,
    Outcome,
    TrapKind,
    WasmKind,
    check_preopens,
    check_stdin_file,
    classify_trap,
    cpu_flags,
    cwd_preopen,
    deadline_ticks,
    first_line,
    instantiate_failure,
    open_envelope,
    open_envelope_file,
    seal_envelope,
    wasm_kind,
    wasmtime_refusal,
)
from wasidispatch.errors import CantHandle, CompileError, EngineError, IncompatibleArtifact

__all__ = ["MAX_WASM_STACK", "TICK", "WasmtimeEngine"]

#: Largest ``Limits.max_wasm_stack`` accepted: wasmtime aborts the process above its async
#: stack size (2 MiB by default) instead of raising.
MAX_WASM_STACK = WASMTIME_MAX_WASM_STACK

_COMMAND_RUN = "wasi:cli/run@0.2"

_CAPABILITIES = Capabilities(
    modules=True,
    components=True,
    precompile=True,
    preopens=True,
    readonly_preopens=True,
    cwd=True,
    stdio_file=True,
    memory_limit=True,
    timeout=True,
    fuel=True,
    entry_export=True,
    fast_instantiate=False,
    cancel=True,
    stdio_fd=True,
)


@dataclass(frozen=True, slots=True)
class _Profile:
    """The compile-relevant part of a wasmtime configuration."""

    fuel: bool = False
    max_wasm_stack: int | None = None


class _EpochTicker:
    """Increments one wasmtime engine's epoch while someone needs it; joins its thread after."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._users = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(TICK):
            self._engine.increment_epoch()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._stop,), name="wasidispatch-epoch", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            thread: threading.Thread | None = None
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._stop is not None:
                    self._stop.set()
                    thread, self._thread, self._stop = self._thread, None, None
            if thread is not None:
                thread.join()


class _Runtime:
    """One wasmtime engine with its linkers and ticker."""

    def __init__(self, config: wasmtime.Config) -> None:
        self.engine = wasmtime.Engine(config)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        self.ticker = _EpochTicker(self.engine)
        self._component_linker: wtc.Linker | None = None
        self._lock = threading.Lock()

    @property
    def component_linker(self) -> wtc.Linker:
        with self._lock:
            if self._component_linker is None:
                linker = wtc.Linker(self.engine)
                linker.add_wasip2()
                self._component_linker = linker
            return self._component_linker


_LIVE_ENGINES: weakref.WeakSet[WasmtimeEngine] = weakref.WeakSet()


@atexit.register
def _release_at_exit() -> None:
    # Free compiled modules and engines while wasmtime's ctypes bindings still exist; at
    # interpreter teardown their finalizers would otherwise find them gone and complain.
    for engine in list(_LIVE_ENGINES):
        engine.close()


class WasmtimeEngine:
    """Runs WASI preview 1 modules and preview 2 components on wasmtime-py.

    ``opt_level`` is Cranelift's (``"none"``, ``"speed"``, ``"speed_and_size"``); it is part
    of the `fingerprint`. ``parallel_compilation=False`` compiles on the calling thread (no
    thread pool is left behind: a process about to enter a container sandbox needs that). The
    last ``cache_size`` compiled binaries are kept in memory by SHA-256, so running the same
    Wasm again skips compilation (``Timings.compile`` is then only the hashing).

    Example::

        >>> from wasidispatch.engines.wasmtime import WasmtimeEngine
        >>> WasmtimeEngine().capabilities.components
        True
    """

    def __init__(
        self, *, opt_level: str = "speed", cache_size: int = 16, parallel_compilation: bool = True
    ) -> None:
        if opt_level not in ("none", "speed", "speed_and_size"):
            raise EngineError(f"unknown Cranelift opt_level {opt_level!r}")
        if cache_size < 0:
            raise EngineError(f"cache_size must not be negative, got {cache_size}")
        self._opt_level = opt_level
        self._parallel = parallel_compilation
        self._cache_size = cache_size
        # Compiled modules/components by (profile, SHA-256 of the Wasm), most recent last.
        self._compiled: OrderedDict[tuple[_Profile, bytes], wasmtime.Module | wtc.Component] = (
            OrderedDict()
        )
        self._runtimes: dict[_Profile, _Runtime] = {}
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        _LIVE_ENGINES.add(self)

    def close(self) -> None:
        """Drop compiled modules and wasmtime engines (idempotent; later runs rebuild them)."""
        with self._lock:
            self._compiled.clear()
            self._runtimes.clear()

    # -- the Engine protocol -------------------------------------------------------------

    @property
    def name(self) -> str:
        """``"wasmtime"``."""
        return "wasmtime"

    @property
    def capabilities(self) -> Capabilities:
        """Everything: modules, components, precompile, limits, fuel, timeout."""
        return _CAPABILITIES

    def version(self) -> str:
        """The installed wasmtime-py version."""
        from importlib.metadata import version

        return version("wasmtime")

    def fingerprint(self) -> str:
        """SHA-256 over engine name and version, the compile-relevant configuration, the
        target (machine and CPU features) and the envelope format: the key of precompiled
        artifacts."""
        if self._fingerprint is None:
            doc = {
                "engine": self.name,
                "version": self.version(),
                "config": {"opt_level": self._opt_level, "epoch": True, "fuel": False},
                "envelope": ENVELOPE_FORMAT,
                "target": {"machine": platform.machine(), "cpu": cpu_flags()},
            }
            blob = json.dumps(doc, sort_keys=True).encode()
            self._fingerprint = hashlib.sha256(blob).hexdigest()
        return self._fingerprint

    def can_handle(self, workload: Workload) -> Verdict:
        """Refuses only settings that could abort the interpreter or are meaningless."""
        reason = wasmtime_refusal(workload)
        return Verdict.no(reason) if reason else Verdict.yes()

    def precompile(self, wasm: bytes) -> bytes:
        """Compile ``wasm`` (module or component) for this engine's default configuration,
        wrapped in a verified envelope for `Workload.precompiled`."""
        kind = wasm_kind(wasm)
        runtime = self._runtime(_Profile())
        compiled = self._compile(runtime, kind, wasm)
        return seal_envelope(self.fingerprint(), kind, bytes(compiled.serialize()))

    def run(self, workload: Workload) -> RunResult:
        """Run ``workload`` to completion; see the module docstring for the details."""
        verdict = self.can_handle(workload)
        if not verdict:
            raise CantHandle(verdict.reason)
        check_preopens(workload.preopens)
        cwd = cwd_preopen(workload)
        cancel = workload.cancel
        if cancel is not None and cancel.cancelled:
            return RunResult(*cancelled_result(cancel))
        profile = _Profile(
            fuel=workload.limits.fuel is not None, max_wasm_stack=workload.limits.max_wasm_stack
        )
        runtime = self._runtime(profile)

        t0 = time.perf_counter()
        kind, compiled = self._load(runtime, profile, workload)
        t_compile = time.perf_counter() - t0

        lim = workload.limits
        plumbed = any(needs_plumbing(s) for s in (workload.stdin, workload.stdout, workload.stderr))
        control = RunControl(lim.timeout, cancel) if plumbed or cancel is not None else None
        with contextlib.ExitStack() as stack:
            if control is not None:
                stack.callback(control.close)  # after the plumbing's close (LIFO)
            plumbing: Plumbing | None = None
            if plumbed:
                assert control is not None
                plumbing = Plumbing(control)
                stack.callback(plumbing.close)
            wasi, captured = self._wasi_config(workload, cwd, stack, plumbing)
            if plumbing is not None:
                plumbing.started()
            store = wasmtime.Store(runtime.engine)
            store.set_wasi(wasi)
            if lim.memory_bytes is not None:
                store.set_limits(memory_size=min(lim.memory_bytes, LIMIT_MAX))
            if lim.fuel is not None:
                store.set_fuel(min(lim.fuel, LIMIT_MAX))
            watch: _Watch | None = None
            if cancel is not None:
                assert control is not None
                watch = _Watch(cancel, control)
                watch.install(store)
                stack.enter_context(runtime.ticker.running())
            elif lim.timeout is not None:
                store.set_epoch_deadline(deadline_ticks(lim.timeout))
                stack.enter_context(runtime.ticker.running())
            else:
                store.set_epoch_deadline(NEVER)
            try:
                if kind == "module":
                    assert isinstance(compiled, wasmtime.Module)
                    result = self._run_module(runtime, store, compiled, workload)
                else:
                    assert isinstance(compiled, wtc.Component)
                    result = self._run_component(runtime, store, compiled, workload)
            finally:
                store.close()  # closes the guest's stdio: the plumbing sees end of file
                if watch is not None:
                    watch.uninstall()
            if plumbing is not None:
                plumbing.finish()
        exit_code, reason, message, t_inst, t_run = result
        if control is not None:
            exit_code, reason, message = control.outcome(exit_code, reason, message, lim.timeout)
        return RunResult(
            exit_code=exit_code,
            reason=reason,
            message=message,
            stdout=bytes(captured["stdout"]) if "stdout" in captured else None,
            stderr=bytes(captured["stderr"]) if "stderr" in captured else None,
            timings=Timings(compile=t_compile, instantiate=t_inst, run=t_run),
        )

    # -- compiling and loading -----------------------------------------------------------

    def _runtime(self, profile: _Profile) -> _Runtime:
        with self._lock:
            runtime = self._runtimes.get(profile)
            if runtime is None:
                config = wasmtime.Config()
                config.epoch_interruption = True
                config.consume_fuel = profile.fuel
                config.cranelift_opt_level = self._opt_level
                config.wasm_component_model = True
                config.parallel_compilation = self._parallel
                if profile.max_wasm_stack is not None:
                    # Range-checked in can_handle: wasmtime aborts the process on a bad value.
                    config.max_wasm_stack = profile.max_wasm_stack
                runtime = self._runtimes[profile] = _Runtime(config)
            return runtime

    @staticmethod
    def _compile(runtime: _Runtime, kind: WasmKind, wasm: bytes) -> wasmtime.Module | wtc.Component:
        try:
            if kind == "module":
                return wasmtime.Module(runtime.engine, wasm)
            return wtc.Component(runtime.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise CompileError(f"invalid WebAssembly {kind}: {_first_line(exc)}") from exc

    def _load(
        self, runtime: _Runtime, profile: _Profile, workload: Workload
    ) -> tuple[WasmKind, wasmtime.Module | wtc.Component]:
        if workload.precompiled is not None and profile == _Profile():
            return self._load_precompiled(runtime, workload.precompiled)
        try:
            wasm = workload.wasm_bytes()
        except OSError as exc:
            raise CompileError(f"cannot read the Wasm binary: {exc}") from exc
        kind = wasm_kind(wasm)
        key = (profile, hashlib.sha256(wasm).digest())
        with self._lock:
            cached = self._compiled.get(key)
            if cached is not None:
                self._compiled.move_to_end(key)
                return kind, cached
        compiled = self._compile(runtime, kind, wasm)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return kind, compiled

    def _load_precompiled(
        self, runtime: _Runtime, precompiled: bytes | Path
    ) -> tuple[WasmKind, wasmtime.Module | wtc.Component]:
        """Load an artifact of `precompile`: a path is checked by its trailer and mapped by
        ``deserialize_file``; bytes are verified in full (see `_support`)."""
        fingerprint = self.fingerprint()
        try:
            if isinstance(precompiled, Path):
                with open_envelope_file(precompiled, fingerprint) as art:
                    if art.kind == "module":
                        return "module", wasmtime.Module.deserialize_file(runtime.engine, art.path)
                    return "component", wtc.Component.deserialize_file(runtime.engine, art.path)
            opened = open_envelope(precompiled, fingerprint)
            # wasmtime-py copies what it is given; the whole envelope saves copying the
            # payload out first (wasmtime ignores the bytes after its artifact, the trailer).
            data = (
                precompiled if isinstance(precompiled, bytes | bytearray) else bytes(opened.payload)
            )
            if opened.kind == "module":
                return "module", wasmtime.Module.deserialize(runtime.engine, data)
            return "component", wtc.Component.deserialize(runtime.engine, data)
        except wasmtime.WasmtimeError as exc:
            raise IncompatibleArtifact(
                f"wasmtime refused the precompiled artifact: {_first_line(exc)}"
            ) from exc

    # -- WASI context ----------------------------------------------------------------------

    @staticmethod
    def _wasi_config(
        workload: Workload, cwd: Any, stack: contextlib.ExitStack, plumbing: Plumbing | None
    ) -> tuple[wasmtime.WasiConfig, dict[str, bytearray]]:
        wasi = wasmtime.WasiConfig()
        wasi.argv = list(workload.argv)
        wasi.env = [(k, v) for k, v in workload.env.items()]
        for pre in (cwd, *workload.preopens) if cwd is not None else workload.preopens:
            try:
                wasi.preopen_dir(str(pre.host), pre.guest, not pre.readonly)
            except wasmtime.WasmtimeError as exc:
                raise EngineError(f"cannot preopen {pre.host} as {pre.guest}: {exc}") from exc

        stdin = workload.stdin
        try:
            if plumbing is not None and needs_plumbing(stdin):
                wasi.stdin_file = plumbing.stdin(stdin)
            elif stdin.kind == "inherit":
                wasi.inherit_stdin()
            elif stdin.kind == "file":
                assert stdin.path is not None
                check_stdin_file(stdin.path)
                wasi.stdin_file = stdin.path
            elif stdin.kind == "bytes":
                path = stack.enter_context(_temp_file(stdin.data or b""))
                wasi.stdin_file = path
        except wasmtime.WasmtimeError as exc:
            raise EngineError(f"cannot set up stdin: {exc}") from exc

        captured: dict[str, bytearray] = {}
        for stream in ("stdout", "stderr"):
            stdio: Stdio = getattr(workload, stream)
            try:
                if plumbing is not None and needs_plumbing(stdio):
                    setattr(wasi, f"{stream}_file", plumbing.output(stdio, stream))
                elif stdio.kind == "inherit":
                    getattr(wasi, f"inherit_{stream}")()
                elif stdio.kind == "file":
                    assert stdio.path is not None
                    setattr(wasi, f"{stream}_file", str(stdio.path))
                elif stdio.kind == "capture":
                    buf = captured[stream] = bytearray()
                    setattr(wasi, f"{stream}_custom", buf.extend)
            except wasmtime.WasmtimeError as exc:
                raise EngineError(f"cannot open {stream} file {stdio.path}: {exc}") from exc
        return wasi, captured

    # -- running ---------------------------------------------------------------------------

    def _run_module(
        self, runtime: _Runtime, store: wasmtime.Store, module: wasmtime.Module, workload: Workload
    ) -> tuple[int, ExitReason, str | None, float, float]:
        entry = workload.entry or "_start"
        t0 = time.perf_counter()
        try:
            instance = runtime.linker.instantiate(store, module)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            t_inst = time.perf_counter() - t0
            outcome = _instantiate_failure(exc, workload)
            return (*outcome, t_inst, 0.0)
        t1 = time.perf_counter()
        func = _export(instance, store, entry)
        if not isinstance(func, wasmtime.Func):
            hint = " (a library/reactor module? name one with Workload.entry)"
            raise CantHandle(
                f"module has no function export {entry!r}" + ("" if workload.entry else hint)
            )
        if func.type(store).params:
            raise CantHandle(f"export {entry!r} takes parameters; only () -> ... can be run")
        try:
            func(store)
            outcome = (0, ExitReason.EXITED, None)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            outcome = _classify(exc, workload, lambda: _memory_sizes(instance, store))
        t2 = time.perf_counter()
        return (*outcome, t1 - t0, t2 - t1)

    def _run_component(
        self,
        runtime: _Runtime,
        store: wasmtime.Store,
        component: wtc.Component,
        workload: Workload,
    ) -> tuple[int, ExitReason, str | None, float, float]:
        if workload.entry is not None:
            raise CantHandle("components are run through wasi:cli/run; Workload.entry must be None")
        run_name = next(
            (n for n in component.type.exports(runtime.engine) if n.startswith(_COMMAND_RUN)), None
        )
        if run_name is None:
            raise CantHandle("component does not export wasi:cli/run@0.2.x (not a command)")
        t0 = time.perf_counter()
        try:
            instance = runtime.component_linker.instantiate(store, component)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            t_inst = time.perf_counter() - t0
            outcome = _instantiate_failure(exc, workload)
            return (*outcome, t_inst, 0.0)
        t1 = time.perf_counter()
        iface = instance.get_export_index(store, run_name)
        index = instance.get_export_index(store, "run", iface) if iface is not None else None
        func = instance.get_func(store, index) if index is not None else None
        if func is None:
            raise CantHandle(f"component's {run_name} has no function 'run'")
        try:
            value = func(store)
            if getattr(value, "tag", "ok") == "err":
                outcome = (1, ExitReason.EXITED, "wasi:cli/run returned an error")
            else:
                outcome = (0, ExitReason.EXITED, None)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            outcome = _classify(exc, workload)
        t2 = time.perf_counter()
        return (*outcome, t1 - t0, t2 - t1)


def _deadline_callback_types() -> tuple[Any, Any]:
    """The ctypes types wasmtime-py declares for the epoch-deadline callback and finalizer."""
    from wasmtime import _ffi as ffi

    argtypes = ffi.dll.wasmtime_store_epoch_deadline_callback.argtypes
    return argtypes[1], argtypes[3]


class _Watch:
    """The epoch-deadline callback of a run with a `Cancel`: every tick it extends the
    deadline by one tick, or ends the guest when the run was cancelled or is past its
    timeout (marked on the `RunControl`, which the run's result is read from)."""

    def __init__(self, cancel: Cancel, control: RunControl) -> None:
        self._cancel = cancel
        self._control = control
        callback_type, finalizer_type = _deadline_callback_types()
        self._callback = callback_type(self._on_deadline)
        self._finalizer = finalizer_type(0)

    def _on_deadline(self, _ctx: int, _data: int, delta: Any, kind: Any) -> int:
        try:
            if self._control.stopped():
                from wasmtime import _ffi as ffi

                err = ffi.wasmtime_error_new(b"wasidispatch: the run was stopped")
                return ctypes.cast(err, ctypes.c_void_p).value or 0
            delta[0] = 1
            kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
            return 0
        except BaseException:  # never raise through wasmtime's frames
            delta[0] = 1
            kind[0] = 0
            return 0

    def install(self, store: wasmtime.Store) -> None:
        from wasmtime import _ffi as ffi

        ffi.wasmtime_store_epoch_deadline_callback(
            store.ptr(), self._callback, None, self._finalizer
        )
        store.set_epoch_deadline(1)

    def uninstall(self) -> None:
        """Keep the callback alive until here: the store (closed first) may call it."""
        self._callback = None


_TRAP_KINDS: dict[wasmtime.TrapCode, TrapKind] = {
    wasmtime.TrapCode.INTERRUPT: "interrupt",
    wasmtime.TrapCode.OUT_OF_FUEL: "out_of_fuel",
}


def _classify(
    exc: Exception, workload: Workload, memory_sizes: Callable[[], Iterable[int]] = tuple
) -> Outcome:
    """The outcome of a run that raised ``exc``: an exit, or a trap (see `classify_trap`)."""
    if isinstance(exc, wasmtime.ExitTrap):
        return exc.code, ExitReason.EXITED, None
    code = exc.trap_code if isinstance(exc, wasmtime.Trap) else None
    kind = _TRAP_KINDS.get(code, "other") if code is not None else "other"
    return classify_trap(str(exc), kind, workload.limits, memory_sizes)


def _instantiate_failure(exc: Exception, workload: Workload) -> Outcome:
    """The outcome of an instantiation that raised ``exc`` (a trapping start function is a
    trap; see `instantiate_failure` for the rest)."""
    if isinstance(exc, wasmtime.Trap | wasmtime.ExitTrap):
        return _classify(exc, workload)
    return instantiate_failure(str(exc), workload.limits)


def _export(instance: wasmtime.Instance, store: wasmtime.Store, name: str) -> object:
    """One export by name. `Instance.exports` wraps every export first (tens of ms for a
    module with thousands), so look the one up through the C API when it is reachable."""
    try:
        import ctypes

        from wasmtime import _ffi as ffi
        from wasmtime._extern import wrap_extern

        item = ffi.wasmtime_extern_t()
        raw = name.encode("utf-8")
        found = ffi.wasmtime_instance_export_get(
            store._context(), ctypes.byref(instance._instance), raw, len(raw), ctypes.byref(item)
        )
        return wrap_extern(item) if found else None
    except (ImportError, AttributeError, TypeError):  # bindings changed: take the slow path
        return instance.exports(store).get(name)


def _memory_sizes(instance: wasmtime.Instance, store: wasmtime.Store) -> list[int]:
    exports = instance.exports(store).by_index
    return [m.data_len(store) for m in exports if isinstance(m, wasmtime.Memory)]


def _first_line(exc: BaseException) -> str:
    return first_line(str(exc), type(exc).__name__)


@contextlib.contextmanager
def _temp_file(data: bytes) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="wasidispatch-stdin-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

"""`FastWasmtime` and `PreparedModule`: a fresh, isolated instance per request at native speed.

The shape follows wasmtime's own advice for per-request instantiation: compile once, resolve
imports once (``InstancePre``), then per request make a store, instantiate, call, and drop
the store. Here every per-request step is one cffi call into the wheel's libwasmtime (cffi
releases the GIL for each), with no Python wrapper objects in between.

**Ownership.** A store and every handle that belongs to it (instance, function, extern)
live in local variables of one method call, and the store is deleted in that call's
``finally``. Nothing store-bound is ever returned or kept: results are Python numbers and a
`RunResult`/`CallResult`. Using a handle after its store is gone would make wasmtime abort
the whole process, and the public API has no way to reach one. Engines, modules, linkers and
``InstancePre`` are shared, thread-safe objects freed when their last Python reference goes
(a call in progress holds its own references, so `close` never frees memory in use).

**Per request, in numbers** (``benchmarks/bench_instantiate.py``): ~4 us for a fresh
instance and call of a tiny export (libwasmtime itself takes ~3 us of it), ~28 us for a WASI
command with captured stdout on the pooling allocator. What keeps it there: out-parameters and
value arrays are allocated once per thread and written through typed views; captured output
goes to a per-thread memfd (wasmtime's output callback would re-enter Python from a worker
thread on every write); the epoch ticker for timeouts outlives its last user briefly instead
of being started and joined per request.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from wasidispatch.engines._api import (
    Cancel,
    ExitReason,
    Limits,
    Preopen,
    RunResult,
    Stdio,
    Timings,
    cancelled_result,
)
from wasidispatch.engines._stdio import Plumbing, RunControl, needs_plumbing
from wasidispatch.engines._support import (
    ENVELOPE_FORMAT,
    LIMIT_MAX,
    NEVER,
    TICK,
    Artifact,
    ArtifactFile,
    Outcome,
    TrapKind,
    check_preopens,
    check_stdin_file,
    classify_trap,
    cpu_flags,
    deadline_ticks,
    instantiate_failure,
    limits_refusal,
    open_envelope,
    open_envelope_file,
    seal_envelope,
    wasm_kind,
)
from wasidispatch.engines._wasmtime_cffi import _native
from wasidispatch.engines._wasmtime_cffi._lib import Loaded, load
from wasidispatch.engines._wasmtime_cffi._native import (
    WASM_F32,
    WASM_F64,
    WASM_I32,
    WASM_I64,
    WASMTIME_EXTERN_FUNC,
    WASMTIME_EXTERN_MEMORY,
    CData,
    EngineConfig,
    FuncSig,
)
from wasidispatch.errors import CantHandle, EngineError

__all__ = ["TICK", "CallResult", "FastWasmtime", "PreparedModule", "WasmValue"]

_FUEL_UNLIMITED = LIMIT_MAX
_MAX_VALS = 16  # per-thread scratch holds this many params/results; more are allocated

WasmValue = int | float
_FIELD = {WASM_I32: "i32", WASM_I64: "i64", WASM_F32: "f32", WASM_F64: "f64"}


class CallResult(NamedTuple):
    """How one `PreparedModule.call` ended: the function's results, or why there are none.

    ``reason`` and ``exit_code`` follow `RunResult`: ``EXITED`` with code 0 when the function
    returned (``values`` holds its results), the WASI exit code when the guest called
    ``proc_exit``, 137 for a trap, timeout, or running out of memory or fuel (``message``
    says what happened).

    Example::

        >>> r = CallResult((5,))
        >>> r.ok, r.value
        (True, 5)
    """

    values: tuple[WasmValue, ...]
    exit_code: int = 0
    reason: ExitReason = ExitReason.EXITED
    message: str | None = None

    @property
    def ok(self) -> bool:
        """True when the function returned normally."""
        return self.reason is ExitReason.EXITED and self.exit_code == 0

    @property
    def value(self) -> WasmValue | None:
        """The only result (``None`` for a function without results); `EngineError` when the
        call did not return normally or returned several values."""
        if not self.ok:
            raise EngineError(f"the call did not return: {self.reason.value} ({self.message})")
        if len(self.values) > 1:
            raise EngineError(f"the function returned {len(self.values)} values")
        return self.values[0] if self.values else None


class _EpochTicker:
    """Increments one engine's epoch every `TICK` while runs with a timeout are in flight.

    The thread outlives its last user by `_IDLE_TICKS` ticks instead of being joined, so a
    stream of requests with timeouts neither waits for a join nor starts a thread each time.
    """

    _IDLE_TICKS = 200  # one second at the default tick

    def __init__(self, loaded: Loaded, engine: CData) -> None:
        self._increment = loaded.lib.wasmtime_engine_increment_epoch
        self._engine = engine
        self._lock = threading.Lock()
        self._users = 0
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        idle = 0
        while True:
            time.sleep(TICK)
            self._increment(self._engine)
            with self._lock:
                if self._users:
                    idle = 0
                    continue
                idle += 1
                if idle > self._IDLE_TICKS:
                    self._thread = None
                    return

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="wasidispatch-fast-epoch", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1


class FastWasmtime:
    """A wasmtime engine driven through the cffi fast path (core modules, WASI preview 1).

    ``pooling`` switches on wasmtime's pooling instance allocator (slots for ``pool_size``
    concurrent instances are reserved up front, so instantiation maps no memory; wasmtime-py
    cannot reach it). ``epoch_interruption`` is needed for ``Limits.timeout``,
    ``consume_fuel`` for ``Limits.fuel`` (it slows guest code); ``max_wasm_stack`` is the
    guest stack in bytes (1 B .. 2 MiB). All of them are in `fingerprint`;
    ``parallel_compilation`` (off: no compile thread pool) is not, as it changes no code.

    The engine is thread-safe; so is every `PreparedModule` it makes. Raises
    `EngineUnavailable` when the installed wasmtime wheel is not the 50.x release this
    binding was written and checked for.

    Example::

        >>> import wasmtime
        >>> fast = FastWasmtime(pooling=True)
        >>> add = fast.prepare(wasmtime.wat2wasm(
        ...     '(module (func (export "add") (param i32 i32) (result i32)'
        ...     ' local.get 0 local.get 1 i32.add))'), wasi=False)
        >>> add.call("add", 2, 3).value
        5
    """

    def __init__(
        self,
        *,
        pooling: bool = False,
        pool_size: int = 128,
        epoch_interruption: bool = True,
        consume_fuel: bool = False,
        max_wasm_stack: int | None = None,
        parallel_compilation: bool = True,
    ) -> None:
        self._config = EngineConfig(
            pooling=pooling,
            pool_size=pool_size,
            epoch_interruption=epoch_interruption,
            consume_fuel=consume_fuel,
            max_wasm_stack=max_wasm_stack,
            parallel_compilation=parallel_compilation,
        )
        self._loaded = load()
        self._engine: CData = _native.new_engine(self._loaded, self._config)
        self._ticker = _EpochTicker(self._loaded, self._engine)
        self._fingerprint: str | None = None

    @property
    def config(self) -> EngineConfig:
        """The settings this engine was made with."""
        return self._config

    def version(self) -> str:
        """The installed wasmtime package version (the library it ships)."""
        return self._loaded.version

    def fingerprint(self) -> str:
        """SHA-256 (hex) over ``wasmtime-fast``, the wasmtime version, every compile- or
        allocation-relevant setting, the machine and its CPU features, and the envelope
        format."""
        if self._fingerprint is None:
            import hashlib
            import json
            import platform

            cfg = self._config
            doc = {
                "engine": "wasmtime-fast",
                "envelope": ENVELOPE_FORMAT,
                "version": self.version(),
                "config": {
                    "pooling": cfg.pooling,
                    "epoch": cfg.epoch_interruption,
                    "fuel": cfg.consume_fuel,
                    "max_wasm_stack": cfg.max_wasm_stack,
                },
                "target": {"machine": platform.machine(), "cpu": cpu_flags()},
            }
            blob = json.dumps(doc, sort_keys=True).encode()
            self._fingerprint = hashlib.sha256(blob).hexdigest()
        return self._fingerprint

    def precompile(self, wasm: bytes | bytearray) -> bytes:
        """Compile a core module ahead of time, in wasidispatch's verified envelope (for
        `prepare`'s ``precompiled`` or `Workload.precompiled` on ``wasmtime-fast``)."""
        if wasm_kind(bytes(wasm[:8])) != "module":
            raise CantHandle("the wasmtime fast path runs core modules only, not components")
        module = _native.compile_module(self._loaded, self._engine, wasm)
        payload = _native.serialize_module(self._loaded, module)
        return seal_envelope(self.fingerprint(), "module", payload)

    def prepare(
        self,
        wasm: bytes | bytearray | Path | None = None,
        *,
        precompiled: bytes | Path | None = None,
        wasi: bool = True,
    ) -> PreparedModule:
        """Compile ``wasm`` (or load ``precompiled``, made by `precompile` of an engine with
        the same fingerprint) and resolve its imports once.

        ``precompiled`` bytes are verified in full (trailer and sha256) and deserialized from
        memory; a ``precompiled`` path has its trailer and size checked and is then mapped
        with ``wasmtime_module_deserialize_file``, without hashing the payload: pass only
        paths you wrote and verified, as `wasidispatch.cache.PrecompileCache` hands out (see
        `wasidispatch.engines._support.open_envelope_file`).

        ``wasi`` links WASI preview 1; without it the module may import nothing. Raises
        `CompileError` (not a valid core module), `CantHandle` (a component, or an import
        that cannot be satisfied), `IncompatibleArtifact` (an artifact from elsewhere).
        """
        if (wasm is None) == (precompiled is None):
            raise EngineError("pass exactly one of wasm and precompiled")
        loaded = self._loaded
        if precompiled is not None:
            if isinstance(precompiled, Path):
                with open_envelope_file(precompiled, self.fingerprint()) as art:
                    return self._prepare_artifact(art, wasi=wasi)
            return self._prepare_artifact(open_envelope(precompiled, self.fingerprint()), wasi=wasi)
        assert wasm is not None
        code = _native.read_path(wasm) if isinstance(wasm, Path) else wasm
        if wasm_kind(bytes(code[:8])) != "module":
            raise CantHandle("the wasmtime fast path runs core modules only, not components")
        module = _native.compile_module(loaded, self._engine, code)
        return PreparedModule(self, module, wasi=wasi)

    def _prepare_artifact(self, art: Artifact | ArtifactFile, *, wasi: bool) -> PreparedModule:
        """`prepare` from an opened envelope (see `_load_artifact`)."""
        return PreparedModule(self, self._load_artifact(art), wasi=wasi)

    def _load_artifact(self, art: Artifact | ArtifactFile) -> CData:
        """The native module of an opened envelope: verified bytes are deserialized from
        memory, a checked file (still open: call this inside `open_envelope_file`'s block)
        is mapped with ``wasmtime_module_deserialize_file``."""
        if art.kind != "module":
            raise CantHandle("the wasmtime fast path runs core modules only")
        if isinstance(art, ArtifactFile):
            return _native.deserialize_module_file(self._loaded, self._engine, art.path)
        return _native.deserialize_module(self._loaded, self._engine, art.payload)


class _Scratch:
    """Per-thread out-parameters and value arrays, allocated once and reused by every call
    the thread makes (a thread runs one call at a time, and nothing here outlives a call).

    ``views`` are typed views of ``args``, indexed by `_Slot`: writing an i32 through an
    ``int32_t *`` view is several times cheaper than going through the union's attributes.
    ``rviews`` are the same views of ``results``.
    """

    __slots__ = ("args", "block", "func", "inst", "item", "results", "rviews", "trapp", "views")

    def __init__(self, ffi: Any) -> None:
        self.block = ffi.new("wd_call_scratch_t *")
        self.inst = ffi.addressof(self.block, "instance")
        self.item = ffi.addressof(self.block, "item")
        self.func = ffi.addressof(self.block.item.of, "func")
        self.trapp = ffi.addressof(self.block, "trap")
        self.args = ffi.new("wasmtime_val_t[]", _MAX_VALS)
        self.results = ffi.new("wasmtime_val_t[]", _MAX_VALS)
        self.views = _views(ffi, self.args)
        self.rviews = _views(ffi, self.results)


_VIEW_TYPES = ("uint8_t *", "int32_t *", "int64_t *", "float *", "double *")
_VIEW_OF_KIND = {WASM_I32: 1, WASM_I64: 2, WASM_F32: 3, WASM_F64: 4}


def _views(ffi: Any, vals: CData) -> tuple[Any, ...]:
    return tuple(ffi.cast(t, vals) for t in _VIEW_TYPES)


class _Slot(NamedTuple):
    """Where value ``i`` of kind ``kind`` lives in an array of ``wasmtime_val_t``: its kind
    byte at ``kind_index`` of the ``uint8_t`` view, its payload at ``pos`` of view
    ``view`` (the union starts 8 bytes into the 32-byte struct)."""

    kind: int
    kind_index: int
    view: int
    pos: int

    @classmethod
    def make(cls, ffi: Any, i: int, kind: int) -> _Slot:
        size = ffi.sizeof("wasmtime_val_t")
        offset = ffi.offsetof("wasmtime_val_t", "of")
        view = _VIEW_OF_KIND[kind]
        width = ffi.sizeof(_VIEW_TYPES[view][:-2])
        return cls(kind, i * size, view, (i * size + offset) // width)


class _Export(NamedTuple):
    """A callable export, ready for the hot loop (unpacked there, hence a plain tuple)."""

    name: bytes
    sig: FuncSig
    params: tuple[_Slot, ...]
    results: tuple[_Slot, ...]
    fits: bool  # params and results fit the per-thread scratch arrays


class PreparedModule:
    """A compiled module with its imports resolved once: every `call` or `run_wasi` gets a
    fresh store and instance, which are gone when the method returns.

    Thread-safe: any number of threads may call one `PreparedModule` at once (each thread
    gets its own store per call). `close` releases this object's references to the native
    module (idempotent); later calls raise `EngineError`. Make one with
    `FastWasmtime.prepare`.
    """

    def __init__(self, engine: FastWasmtime, module: CData, *, wasi: bool) -> None:
        loaded = engine._loaded
        ffi = loaded.ffi
        self._fast = engine
        self._loaded = loaded
        self._lib = loaded.lib
        self._null = ffi.NULL
        self._engine = engine._engine
        self._epoch = engine.config.epoch_interruption
        self._fuel = engine.config.consume_fuel
        self._wasi = wasi
        funcs, memories = _native.module_exports(loaded, module)
        self._funcs = funcs
        self._exports: dict[str, _Export] = {}
        for name, sig in funcs.items():
            if sig.params is not None and sig.results is not None:
                self._exports[name] = _Export(
                    name.encode("utf-8"),
                    sig,
                    tuple(_Slot.make(ffi, i, k) for i, k in enumerate(sig.params)),
                    tuple(_Slot.make(ffi, i, k) for i, k in enumerate(sig.results)),
                    len(sig.params) <= _MAX_VALS and len(sig.results) <= _MAX_VALS,
                )
        self._memories = tuple(name.encode("utf-8") for name in memories)
        # Host functions of WASI reach for the store's WASI context, and wasmtime aborts the
        # process when there is none: a `call` into a module that imports anything (with
        # wasi=True, WASI is all the linker has) gets an empty context in its store.
        self._call_needs_wasi = wasi and bool(_native.import_modules(loaded, module))
        linked = _native.link(loaded, engine._engine, module, wasi=wasi)
        self._module: CData | None = module
        self._linker: CData | None = linked.linker
        self._pre: CData | None = linked.pre
        self._tls = threading.local()
        lib = loaded.lib
        self._hot = (
            lib.wasmtime_store_new,
            lib.wasmtime_store_context,
            lib.wasmtime_context_set_epoch_deadline,
            lib.wasmtime_instance_pre_instantiate,
            lib.wasmtime_instance_export_get,
            lib.wasmtime_func_call,
            lib.wasmtime_store_delete,
        )

    # -- introspection -------------------------------------------------------------------

    @property
    def functions(self) -> dict[str, str]:
        """Exported functions and their signatures, e.g. ``{"add": "(i32, i32) -> (i32)"}``."""
        return {name: sig.describe() for name, sig in self._funcs.items()}

    @property
    def closed(self) -> bool:
        """True after `close`."""
        return self._pre is None

    def serialize(self) -> bytes:
        """This module as a precompiled artifact in wasidispatch's envelope (for
        `FastWasmtime.prepare`'s ``precompiled`` on an engine with the same fingerprint)."""
        module = self._module
        if module is None:
            raise EngineError("the prepared module is closed")
        payload = _native.serialize_module(self._loaded, module)
        return seal_envelope(self._fast.fingerprint(), "module", payload)

    def close(self) -> None:
        """Drop the native module, linker and ``InstancePre`` (freed once no call in
        progress uses them). Idempotent."""
        self._pre = None
        self._linker = None
        self._module = None

    def __enter__(self) -> PreparedModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- per request ---------------------------------------------------------------------

    def _scratch(self) -> _Scratch:
        try:
            scratch: _Scratch = self._tls.scratch
        except AttributeError:
            scratch = self._tls.scratch = _Scratch(self._loaded.ffi)
        return scratch

    def _export(self, name: str) -> _Export:
        export = self._exports.get(name)
        if export is not None:
            return export
        if name in self._funcs:
            raise EngineError(
                f"export {name!r} {self._funcs[name].describe()}: the fast path converts "
                "i32, i64, f32 and f64 values only (no v128 or references)"
            )
        raise EngineError(f"the module exports no function {name!r}")

    def call(self, name: str, *args: WasmValue, limits: Limits | None = None) -> CallResult:
        """Instantiate afresh, call export ``name`` with ``args``, drop the instance.

        Parameters and results are i32/i64 (int) and f32/f64 (float). A module that imports
        WASI sees an empty WASI context (no arguments, environment, files; stdio discarded):
        use `run_wasi` with ``entry`` for more. A trap, an exit, a timeout or a memory cap
        are a `CallResult`, not an exception; `EngineError` is
        raised for a missing export, wrong arguments, or a closed module, `CantHandle` for
        limits this engine's configuration cannot enforce.
        """
        pre = self._pre
        if pre is None:
            raise EngineError("the prepared module is closed")
        export = self._exports.get(name)
        if export is None:
            export = self._export(name)  # raises
        name_b, sig, params, results, fits = export
        if len(args) != len(params):
            raise EngineError(f"{name!r} takes {len(params)} arguments, got {len(args)}")
        try:
            scratch: _Scratch = self._tls.scratch
        except AttributeError:
            scratch = self._scratch()
        if fits:
            vals, out, views, rviews = scratch.args, scratch.results, scratch.views, scratch.rviews
        else:
            ffi = self._loaded.ffi
            vals = ffi.new("wasmtime_val_t[]", max(1, len(params)))
            out = ffi.new("wasmtime_val_t[]", max(1, len(results)))
            views, rviews = _views(ffi, vals), _views(ffi, out)
        kinds = views[0]
        try:
            for (kind, kind_index, view, pos), arg in zip(params, args):  # noqa: B905
                kinds[kind_index] = kind
                views[view][pos] = arg
        except (TypeError, OverflowError) as exc:
            raise EngineError(f"bad argument for {name!r} {sig.describe()}: {exc}") from exc

        if limits is not None:
            outcome = self._execute(
                pre, scratch, name_b, vals, len(params), out, len(results), limits, None
            )
            if outcome is not None:
                return CallResult((), *outcome)
            return _new_result(CallResult, (_read(rviews, results), 0, _EXITED, None))

        # The hot loop, inlined: one store, one instance, one call, gone in `finally`.
        null = self._null
        (store_new, store_context, set_deadline, instantiate, export_get, func_call,
         store_delete) = self._hot  # fmt: skip
        store = store_new(self._engine, null, null)
        if store == null:
            raise EngineError("wasmtime could not create a store")
        try:
            ctx = store_context(store)
            if self._call_needs_wasi:
                self._set_empty_wasi(ctx)
            if self._epoch:
                set_deadline(ctx, NEVER)
            if self._fuel:
                self._set_fuel(ctx, _FUEL_UNLIMITED)
            trapp = scratch.trapp
            trapp[0] = null
            err = instantiate(pre, ctx, scratch.inst, trapp)
            if err != null or trapp[0] != null:
                return CallResult((), *self._instantiate_failure(err, trapp[0], None))
            item = scratch.item
            if not export_get(ctx, scratch.inst, name_b, len(name_b), item):
                raise EngineError(f"export {name!r} is missing from the instance")
            if item.kind != WASMTIME_EXTERN_FUNC:  # never for a function export; kept as a guard
                self._lib.wasmtime_extern_delete(item)
                raise EngineError(f"export {name!r} is not a function")
            err = func_call(ctx, scratch.func, vals, len(params), out, len(results), trapp)
            if err != null:
                message, exit_status = _native.error_info(self._loaded, err)
                if exit_status is not None:
                    return CallResult((), exit_status, ExitReason.EXITED, None)
                return CallResult((), *self._classify(message, None, None, None, None))
            if trapp[0] != null:
                message, code = _native.trap_info(self._loaded, trapp[0])
                return CallResult((), *self._classify(message, code, None, None, None))
            if len(results) == 1:
                _, _, view, pos = results[0]
                return _new_result(CallResult, ((rviews[view][pos],), 0, _EXITED, None))
            return _new_result(CallResult, (_read(rviews, results), 0, _EXITED, None))
        finally:
            store_delete(store)

    def run_wasi(
        self,
        *,
        argv: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        stdin: Stdio | None = None,
        stdout: Stdio | None = None,
        stderr: Stdio | None = None,
        preopens: Sequence[Preopen] = (),
        entry: str | None = None,
        limits: Limits | None = None,
        cancel: Cancel | None = None,
    ) -> RunResult:
        """Run the module as a WASI command on a fresh instance: ``argv`` and ``env`` exactly
        as given (the host environment never leaks in), ``preopens`` (read-only ones refuse
        writes), stdio as in `Stdio` (stdin defaults to empty, stdout/stderr to the host's;
        descriptors and FIFOs go through `wasidispatch.engines._stdio.Plumbing`), ``entry``
        instead of ``_start``. ``cancel`` stops the run from another thread (`Cancel`).

        The guest's fate is the `RunResult`; `EngineError` is raised for host-side problems
        (a missing preopen directory or stdio file), `CantHandle` for a missing entry or
        limits this engine's configuration cannot enforce.
        """
        pre = self._pre
        if pre is None:
            raise EngineError("the prepared module is closed")
        if not self._wasi:
            raise EngineError("this module was prepared with wasi=False")
        entry_name = entry or "_start"
        sig = self._funcs.get(entry_name)
        if sig is None:
            raise CantHandle(
                f"module has no function export {entry_name!r}"
                + ("" if entry else " (a library/reactor module? name one with entry=...)")
            )
        if sig.params != ():
            raise CantHandle(f"export {entry_name!r} takes parameters; only () -> ... can be run")
        export = self._exports.get(entry_name)
        if export is None or len(export.results) > _MAX_VALS:
            raise CantHandle(f"export {entry_name!r} returns values the fast path cannot take")
        if cancel is not None and cancel.cancelled:
            return RunResult(*cancelled_result(cancel))
        scratch = self._scratch()
        captured: dict[str, Callable[[], bytes]] = {}
        keep: list[Any] = []  # buffers and handles the WASI config points into
        streams = (stdin or _NULL_STDIO, stdout or _INHERIT_STDIO, stderr or _INHERIT_STDIO)
        plumbed = any(needs_plumbing(s) for s in streams)
        control: RunControl | None = None
        plumbing: Plumbing | None = None
        timeout = limits.timeout if limits is not None else None
        if plumbed or cancel is not None:
            control = RunControl(timeout, cancel)
        timings: list[float] = []
        try:
            if plumbed:
                assert control is not None
                plumbing = Plumbing(control)
            wasi = _wasi_config(
                self._loaded, argv, env or {}, *streams, preopens, captured, keep, plumbing
            )
            if plumbing is not None:
                plumbing.started()
            outcome = self._execute(
                pre,
                scratch,
                export.name,
                self._null,
                0,
                scratch.results,
                len(export.results),
                limits,
                wasi,
                timings,
                control if cancel is not None else None,
            )
            if plumbing is not None:
                plumbing.finish()  # the store is gone: the guest's stdio is closed
        finally:
            if plumbing is not None:
                plumbing.close()
            if control is not None:
                control.close()
        exit_code, reason, message = outcome or (0, ExitReason.EXITED, None)
        if control is not None:
            exit_code, reason, message = control.outcome(exit_code, reason, message, timeout)
        read_out = captured.get("stdout")
        read_err = captured.get("stderr")
        return RunResult(
            exit_code=exit_code,
            reason=reason,
            message=message,
            stdout=read_out() if read_out is not None else None,
            stderr=read_err() if read_err is not None else None,
            timings=Timings(
                instantiate=timings[0] if timings else 0.0,
                run=timings[1] if len(timings) > 1 else 0.0,
            ),
        )

    # -- the store's whole life ----------------------------------------------------------

    def _execute(
        self,
        pre: CData,
        scratch: _Scratch,
        name: bytes,
        args: CData,
        n_args: int,
        results: CData,
        n_results: int,
        limits: Limits | None,
        wasi: CData | None,
        timings: list[float] | None = None,
        control: RunControl | None = None,
    ) -> Outcome | None:
        """Make a store, instantiate, call ``name``, classify, delete the store.

        ``None`` means the function returned (its results are in ``results``). ``wasi`` is
        consumed (the store owns it from the first line on, even on error). ``control``
        (runs with a `Cancel`) installs an epoch-deadline callback that ends the guest when
        it is cancelled or past its deadline, checked every tick.
        """
        loaded = self._loaded
        ffi, lib = loaded.ffi, loaded.lib
        fast = self._fast
        store = lib.wasmtime_store_new(fast._engine, ffi.NULL, ffi.NULL)
        if store == ffi.NULL:
            if wasi is not None:
                lib.wasi_config_delete(wasi)
            raise EngineError("wasmtime could not create a store")
        try:
            ctx = lib.wasmtime_store_context(store)
            if wasi is None and self._call_needs_wasi:
                self._set_empty_wasi(ctx)
            if wasi is not None:
                err = lib.wasmtime_context_set_wasi(ctx, wasi)  # takes wasi, even on error
                wasi = None
                if err != ffi.NULL:
                    message, _ = _native.error_info(loaded, err)
                    raise EngineError(f"wasmtime refused the WASI configuration: {message}")
            if control is not None:
                self._arm(store, ctx, limits or _NO_LIMITS)
                if not fast._config.epoch_interruption:
                    raise CantHandle("a Cancel needs an engine with epoch_interruption=True")
                handle = ffi.new_handle(control)
                lib.wasmtime_store_epoch_deadline_callback(
                    store, _deadline_callback(loaded), handle, ffi.NULL
                )
                lib.wasmtime_context_set_epoch_deadline(ctx, 1)
                with fast._ticker.running():
                    return self._run_in_store(
                        pre, ctx, scratch, name, args, n_args, results, n_results, limits, timings
                    )
            if limits is None or limits == _NO_LIMITS:
                if fast._config.epoch_interruption:
                    lib.wasmtime_context_set_epoch_deadline(ctx, NEVER)
                if fast._config.consume_fuel:
                    self._set_fuel(ctx, _FUEL_UNLIMITED)
            elif self._arm(store, ctx, limits):
                with fast._ticker.running():
                    return self._run_in_store(
                        pre, ctx, scratch, name, args, n_args, results, n_results, limits, timings
                    )
            return self._run_in_store(
                pre, ctx, scratch, name, args, n_args, results, n_results, limits, timings
            )
        finally:
            lib.wasmtime_store_delete(store)

    def _run_in_store(
        self,
        pre: CData,
        ctx: CData,
        scratch: _Scratch,
        name: bytes,
        args: CData,
        n_args: int,
        results: CData,
        n_results: int,
        limits: Limits | None,
        timings: list[float] | None,
    ) -> Outcome | None:
        """Instantiate and call inside a live store (``ctx``); the caller deletes the store."""
        loaded = self._loaded
        ffi, lib = loaded.ffi, loaded.lib
        trapp = scratch.trapp
        trapp[0] = ffi.NULL
        t0 = time.perf_counter() if timings is not None else 0.0
        err = lib.wasmtime_instance_pre_instantiate(pre, ctx, scratch.inst, trapp)
        if err != ffi.NULL or trapp[0] != ffi.NULL:
            if timings is not None:
                timings += (time.perf_counter() - t0, 0.0)
            return self._instantiate_failure(err, trapp[0], limits)
        item = scratch.item
        if not lib.wasmtime_instance_export_get(ctx, scratch.inst, name, len(name), item):
            raise EngineError(f"export {name.decode()!r} is missing from the instance")
        if item.kind != WASMTIME_EXTERN_FUNC:  # never for a function export; kept as a guard
            lib.wasmtime_extern_delete(item)
            raise EngineError(f"export {name.decode()!r} is not a function")
        t1 = time.perf_counter() if timings is not None else 0.0
        err = lib.wasmtime_func_call(ctx, scratch.func, args, n_args, results, n_results, trapp)
        if timings is not None:
            timings += (t1 - t0, time.perf_counter() - t1)
        if err != ffi.NULL:
            message, exit_status = _native.error_info(loaded, err)
            if exit_status is not None:
                return exit_status, ExitReason.EXITED, None
            return self._classify(message, None, limits, ctx, scratch)
        if trapp[0] != ffi.NULL:
            message, code = _native.trap_info(loaded, trapp[0])
            return self._classify(message, code, limits, ctx, scratch)
        return None

    def _set_empty_wasi(self, ctx: CData) -> None:
        """Give the store a WASI context with no arguments, environment, files or stdio."""
        loaded = self._loaded
        wasi = loaded.lib.wasi_config_new()
        if wasi == loaded.ffi.NULL:
            raise EngineError("wasmtime could not allocate a WASI configuration")
        err = loaded.lib.wasmtime_context_set_wasi(ctx, wasi)  # takes wasi, even on error
        if err != loaded.ffi.NULL:
            message, _ = _native.error_info(loaded, err)
            raise EngineError(f"wasmtime refused the WASI configuration: {message}")

    def _set_fuel(self, ctx: CData, fuel: int) -> None:
        loaded = self._loaded
        err = loaded.lib.wasmtime_context_set_fuel(ctx, fuel)
        if err != loaded.ffi.NULL:
            message, _ = _native.error_info(loaded, err)
            raise EngineError(f"wasmtime refused to set fuel: {message}")

    def _arm(self, store: CData, ctx: CData, limits: Limits) -> bool:
        """Apply ``limits`` to a fresh store; True when the run needs the epoch ticker."""
        lib = self._loaded.lib
        cfg = self._fast._config
        refusal = limits_refusal(limits)
        if refusal is not None:
            raise EngineError(refusal)
        if limits.max_wasm_stack is not None and limits.max_wasm_stack != cfg.max_wasm_stack:
            raise CantHandle("limits.max_wasm_stack needs an engine made with that max_wasm_stack")
        if limits.memory_bytes is not None:
            memory = min(limits.memory_bytes, LIMIT_MAX)
            lib.wasmtime_store_limiter(store, memory, -1, -1, -1, -1)
        if limits.fuel is not None:
            if not cfg.consume_fuel:
                raise CantHandle("limits.fuel needs an engine made with consume_fuel=True")
            self._set_fuel(ctx, min(limits.fuel, _FUEL_UNLIMITED))
        elif cfg.consume_fuel:
            self._set_fuel(ctx, _FUEL_UNLIMITED)
        if limits.timeout is None:
            if cfg.epoch_interruption:
                lib.wasmtime_context_set_epoch_deadline(ctx, NEVER)
            return False
        if not cfg.epoch_interruption:
            raise CantHandle("limits.timeout needs an engine with epoch_interruption=True")
        lib.wasmtime_context_set_epoch_deadline(ctx, deadline_ticks(limits.timeout))
        return True

    def _instantiate_failure(self, err: CData, trap: CData, limits: Limits | None) -> Outcome:
        loaded = self._loaded
        if trap != loaded.ffi.NULL:  # the start function trapped
            message, code = _native.trap_info(loaded, trap)
            return self._classify(message, code, limits, None, None)
        message, exit_status = _native.error_info(loaded, err)
        if exit_status is not None:
            return exit_status, ExitReason.EXITED, None
        return instantiate_failure(message, limits)

    def _classify(
        self,
        message: str,
        code: int | None,
        limits: Limits | None,
        ctx: CData | None,
        scratch: _Scratch | None,
    ) -> Outcome:
        """A trap's outcome (`classify_trap`); the instance's memories are measured only
        when ``ctx`` and ``scratch`` hold a live instance."""
        kind = _TRAP_KINDS.get(code, "other") if code is not None else "other"
        if ctx is None or scratch is None:
            return classify_trap(message, kind, limits)
        return classify_trap(message, kind, limits, lambda: self._memory_sizes(ctx, scratch))

    def _memory_sizes(self, ctx: CData, scratch: _Scratch) -> list[int]:
        lib = self._loaded.lib
        ffi = self._loaded.ffi
        sizes: list[int] = []
        item = ffi.new("wasmtime_extern_t *")
        for name in self._memories:
            if lib.wasmtime_instance_export_get(ctx, scratch.inst, name, len(name), item):
                if item.kind == WASMTIME_EXTERN_MEMORY:
                    sizes.append(
                        int(lib.wasmtime_memory_data_size(ctx, ffi.addressof(item.of, "memory")))
                    )
                lib.wasmtime_extern_delete(item)
        return sizes


_NO_LIMITS = Limits()
_callbacks: dict[int, Any] = {}  # the epoch-deadline callback, per loaded library


def _deadline_callback(loaded: Loaded) -> Any:
    """The one cffi callback for runs with a `Cancel` (its data is the run's `RunControl`):
    extend the deadline by a tick, or end the guest when the run must stop."""
    cached = _callbacks.get(id(loaded))
    if cached is not None:
        return cached[0]
    ffi, lib = loaded.ffi, loaded.lib
    stopped_message = ffi.new("char[]", b"wasidispatch: the run was stopped")

    def on_deadline(_ctx: Any, data: Any, delta: Any, kind: Any) -> Any:
        control: RunControl = ffi.from_handle(data)
        if control.stopped():
            return lib.wasmtime_error_new(stopped_message)
        delta[0] = 1
        kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
        return ffi.NULL

    def on_error(*_exc: object) -> None:
        return None  # never raise through wasmtime's frames (the guest goes on)

    callback = ffi.callback(
        "wasmtime_error_t *(wasmtime_context_t *, void *, uint64_t *, "
        "wasmtime_update_deadline_kind_t *)",
        on_deadline,
        onerror=on_error,
    )
    _callbacks[id(loaded)] = (callback, stopped_message)
    return _callbacks[id(loaded)][0]


_TRAP_KINDS: dict[int, TrapKind] = {
    _native.TRAP_CODE_INTERRUPT: "interrupt",
    _native.TRAP_CODE_OUT_OF_FUEL: "out_of_fuel",
}
_EXITED = ExitReason.EXITED
_new_result = tuple.__new__  # CallResult without the NamedTuple constructor's Python frame


def _read(rviews: tuple[Any, ...], results: tuple[_Slot, ...]) -> tuple[WasmValue, ...]:
    return tuple([rviews[view][pos] for _, _, view, pos in results])


_NULL_STDIO = Stdio.null()
_INHERIT_STDIO = Stdio.inherit()


class _CaptureFiles:
    """One thread's memfds that captured stdout/stderr go to (closed with the thread)."""

    _BIG = 1 << 20

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.fds = {name: os.memfd_create(f"wasidispatch-{name}") for name in _STREAMS}
        self.paths = {name: f"/proc/self/fd/{fd}".encode() for name, fd in self.fds.items()}
        self.readers: dict[str, Callable[[], bytes]] = {
            name: self._reader(fd) for name, fd in self.fds.items()
        }

    @classmethod
    def _reader(cls, fd: int) -> Callable[[], bytes]:
        def read() -> bytes:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            if size > cls._BIG:
                os.ftruncate(fd, 0)  # give the memory back now, not at the next run
            return data

        return read

    def __del__(self) -> None:
        for fd in getattr(self, "fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)


_STREAMS = ("stdout", "stderr")
_capture_local = threading.local()
_memfd_usable: bool | None = None


def _capture_files() -> _CaptureFiles | None:
    """This thread's capture memfds, or None where memfds or /proc are unavailable."""
    global _memfd_usable
    try:
        files: _CaptureFiles = _capture_local.files
        if files.pid == os.getpid():
            return files
        # A forked child shares its parent's memfds: it must not capture into them.
        del _capture_local.files
    except AttributeError:
        pass
    if _memfd_usable is False:
        return None
    try:
        files = _CaptureFiles()
        _memfd_usable = all(os.path.exists(p) for p in files.paths.values())
    except (AttributeError, OSError):  # no os.memfd_create, or the kernel refuses it
        _memfd_usable = False
        return None
    if not _memfd_usable:
        return None
    _capture_local.files = files
    return files


def _cstr(ffi: Any, text: str, what: str, keep: list[Any]) -> Any:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EngineError(f"{what} is not valid UTF-8: {text!r}") from exc
    if b"\0" in data:
        raise EngineError(f"{what} contains a NUL character: {text!r}")
    buf = ffi.new("char[]", data)
    keep.append(buf)
    return buf


def _wasi_config(
    loaded: Loaded,
    argv: Sequence[str],
    env: Mapping[str, str],
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    preopens: Sequence[Preopen],
    captured: dict[str, Callable[[], bytes]],
    keep: list[Any],
    plumbing: Plumbing | None = None,
) -> CData:
    """A ``wasi_config_t`` for one run; the caller hands it to a store (which owns it)."""
    ffi, lib = loaded.ffi, loaded.lib
    wasi = lib.wasi_config_new()
    if wasi == ffi.NULL:
        raise EngineError("wasmtime could not allocate a WASI configuration")
    try:
        if argv:
            ptrs = ffi.new("char *[]", [_cstr(ffi, a, "an argument", keep) for a in argv])
            if not lib.wasi_config_set_argv(wasi, len(argv), ptrs):
                raise EngineError("wasmtime refused the arguments")
        if env:
            for name in env:
                if not name or "=" in name:
                    raise EngineError(f"an env name must be non-empty and without '=': {name!r}")
            names = ffi.new("char *[]", [_cstr(ffi, k, "an env name", keep) for k in env])
            values = ffi.new(
                "char *[]", [_cstr(ffi, v, "an env value", keep) for v in env.values()]
            )
            if not lib.wasi_config_set_env(wasi, len(env), names, values):
                raise EngineError("wasmtime refused the environment")
        check_preopens(preopens)
        for pre in preopens:
            ok = lib.wasi_config_preopen_dir(
                wasi,
                _cstr(ffi, str(pre.host), "a preopen path", keep),
                _cstr(ffi, pre.guest, "a preopen guest path", keep),
                not pre.readonly,
            )
            if not ok:
                raise EngineError(f"cannot preopen {pre.host} as {pre.guest}")
        if plumbing is not None and needs_plumbing(stdin):
            stdin = Stdio.file(plumbing.stdin(stdin))
        _set_stdin(loaded, wasi, stdin, keep)
        for stream, stdio in (("stdout", stdout), ("stderr", stderr)):
            if plumbing is not None and needs_plumbing(stdio):
                stdio = Stdio.file(plumbing.output(stdio, stream))
            _set_output(loaded, wasi, stream, stdio, captured, keep)
    except BaseException:
        lib.wasi_config_delete(wasi)
        raise
    return wasi


def _set_stdin(loaded: Loaded, wasi: CData, stdin: Stdio, keep: list[Any]) -> None:
    ffi, lib = loaded.ffi, loaded.lib
    if stdin.kind == "inherit":
        lib.wasi_config_inherit_stdin(wasi)
    elif stdin.kind == "file":
        assert stdin.path is not None
        check_stdin_file(stdin.path)
        if not lib.wasi_config_set_stdin_file(wasi, _cstr(ffi, str(stdin.path), "a path", keep)):
            raise EngineError(f"cannot open stdin file {stdin.path}")
    elif stdin.kind == "bytes":
        data = stdin.data or b""
        vec = ffi.new("wasm_byte_vec_t *")
        lib.wasm_byte_vec_new(vec, len(data), ffi.from_buffer(data))
        lib.wasi_config_set_stdin_bytes(wasi, vec)  # takes the vector's contents
        lib.wasm_byte_vec_delete(vec)  # now empty; deleting it is a no-op kept for symmetry
    elif stdin.kind == "capture":
        raise CantHandle("stdin cannot be captured; use Stdio.from_bytes or a file")
    elif stdin.kind == "fd":
        raise CantHandle("Stdio.fd needs the stdio plumbing")
    # "null": no stdin configured means an empty one


def _set_output(
    loaded: Loaded,
    wasi: CData,
    stream: str,
    stdio: Stdio,
    captured: dict[str, Callable[[], bytes]],
    keep: list[Any],
) -> None:
    ffi, lib = loaded.ffi, loaded.lib
    if stdio.kind == "inherit":
        getattr(lib, f"wasi_config_inherit_{stream}")(wasi)
    elif stdio.kind == "file":
        assert stdio.path is not None
        path = _cstr(ffi, str(stdio.path), "a path", keep)
        if not getattr(lib, f"wasi_config_set_{stream}_file")(wasi, path):
            raise EngineError(f"cannot open {stream} file {stdio.path}")
    elif stdio.kind == "capture":
        files = _capture_files()
        if files is not None:
            # wasmtime opens (and truncates) this thread's memfd by its /proc path; the
            # bytes are read back after the store is gone. Several times cheaper per run
            # than wasmtime's custom-output callback, which reaches Python from a foreign
            # thread on every write.
            if not getattr(lib, f"wasi_config_set_{stream}_file")(wasi, files.paths[stream]):
                raise EngineError(f"cannot open the {stream} capture file")
            captured[stream] = files.readers[stream]
        else:
            buf = bytearray()
            handle = ffi.new_handle(buf)
            keep.append(handle)
            getattr(lib, f"wasi_config_set_{stream}_custom")(wasi, loaded.sink, handle, ffi.NULL)
            captured[stream] = functools.partial(bytes, buf)
    elif stdio.kind == "bytes":
        raise CantHandle(f"{stream} cannot be fed bytes; use capture or a file")
    # "null": no output configured means discarded

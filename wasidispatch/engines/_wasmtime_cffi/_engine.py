"""``wasmtime-fast``: the cffi fast path behind the `Engine` protocol.

It runs what the ``wasmtime`` engine runs for core modules, the same way (the same
`Workload` -> `RunResult` mapping, the same envelope for precompiled artifacts (bytes verified
in full; a path checked by its trailer and mapped with ``wasmtime_module_deserialize_file``),
the same
handling of ``cwd``, limits and stdio; see `wasidispatch.engines.wasmtime`), but every run
instantiates a cached `PreparedModule` in a fresh store. Differences: components are refused
(`can_handle` says so: the ``wasmtime`` engine runs them), stdin bytes go straight to
wasmtime (no temporary file), captured output goes through a per-thread memfd, and
``pooling=True`` uses wasmtime's pooling allocator.

Configurations: fuel metering and a ``max_wasm_stack`` need differently compiled code, so
such workloads run on a second native engine made on first use, compiled from ``wasm`` (a
precompiled artifact is made for, and accepted by, the default configuration only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from wasidispatch.engines._api import Capabilities, RunResult, Verdict, Workload
from wasidispatch.engines._support import (
    check_preopens,
    cwd_preopen,
    open_envelope,
    open_envelope_file,
    wasm_kind,
    wasmtime_refusal,
)
from wasidispatch.engines._wasmtime_cffi._fast import FastWasmtime, PreparedModule
from wasidispatch.errors import CantHandle, CompileError

__all__ = ["FastWasmtimeEngine"]

_CAPABILITIES = Capabilities(
    modules=True,
    components=False,
    precompile=True,
    preopens=True,
    readonly_preopens=True,
    cwd=True,
    stdio_file=True,
    memory_limit=True,
    timeout=True,
    fuel=True,
    entry_export=True,
    fast_instantiate=True,
    cancel=True,
    stdio_fd=True,
)

_Profile = tuple[bool, int | None]  # (fuel, max_wasm_stack)
_DEFAULT: _Profile = (False, None)


class FastWasmtimeEngine:
    """The ``wasmtime-fast`` engine: WASI preview 1 core modules on the cffi fast path.

    Compiled modules are kept (up to ``cache_size``, least recently used first out), keyed
    by the SHA-256 of their bytes, so running the same Wasm again costs one instantiation.
    ``pooling`` selects wasmtime's pooling allocator (``pool_size`` concurrent instances).
    ``parallel_compilation=False`` compiles on the calling thread (no thread pool is left
    behind). Raises `EngineUnavailable` when the installed wasmtime is not the supported 50.x.

    Example::

        >>> from wasidispatch.engines._wasmtime_cffi import FastWasmtimeEngine
        >>> engine = FastWasmtimeEngine()
        >>> engine.name, engine.capabilities.components
        ('wasmtime-fast', False)
    """

    def __init__(
        self,
        *,
        pooling: bool = False,
        pool_size: int = 128,
        cache_size: int = 32,
        parallel_compilation: bool = True,
    ) -> None:
        self._pooling = pooling
        self._parallel = parallel_compilation
        self._pool_size = pool_size
        self._cache_size = max(1, cache_size)
        self._lock = threading.Lock()
        self._engines: dict[_Profile, FastWasmtime] = {}
        self._prepared: OrderedDict[tuple[_Profile, bytes], PreparedModule] = OrderedDict()
        self._fast(_DEFAULT)  # load and check the library now: fail at construction

    # -- the Engine protocol -------------------------------------------------------------

    @property
    def name(self) -> str:
        """``"wasmtime-fast"``."""
        return "wasmtime-fast"

    @property
    def capabilities(self) -> Capabilities:
        """Modules with every limit and precompilation; no components."""
        return _CAPABILITIES

    def version(self) -> str:
        """The installed wasmtime package version."""
        return self._fast(_DEFAULT).version()

    def fingerprint(self) -> str:
        """SHA-256 over ``wasmtime-fast``, the wasmtime version, pooling, the compile-relevant
        configuration (epoch interruption, fuel, stack) and the target CPU."""
        return self._fast(_DEFAULT).fingerprint()

    def can_handle(self, workload: Workload) -> Verdict:
        """Refuses components, and settings that could abort the interpreter or are
        meaningless (the same limits checks as the ``wasmtime`` engine)."""
        if _is_component(workload):
            return Verdict.no(
                "the wasmtime fast path runs core modules only; "
                "components run on the 'wasmtime' engine"
            )
        reason = wasmtime_refusal(workload)
        return Verdict.no(reason) if reason else Verdict.yes()

    def precompile(self, wasm: bytes) -> bytes:
        """Compile a core module for the default configuration, in the verified envelope.
        `CantHandle` for a component."""
        return self._fast(_DEFAULT).precompile(wasm)

    def run(self, workload: Workload) -> RunResult:
        """Run ``workload`` on a fresh instance of its (cached) prepared module."""
        verdict = self.can_handle(workload)
        if not verdict:
            raise CantHandle(verdict.reason)
        check_preopens(workload.preopens)  # before cwd_preopen, which looks inside them
        cwd = cwd_preopen(workload)
        profile: _Profile = (workload.limits.fuel is not None, workload.limits.max_wasm_stack)
        t0 = time.perf_counter()
        prepared = self._prepare(profile, workload)
        t_compile = time.perf_counter() - t0
        preopens = (cwd, *workload.preopens) if cwd is not None else workload.preopens
        result = prepared.run_wasi(
            argv=workload.argv,
            env=workload.env,
            stdin=workload.stdin,
            stdout=workload.stdout,
            stderr=workload.stderr,
            preopens=preopens,
            entry=workload.entry,
            limits=workload.limits,
            cancel=workload.cancel,
        )
        return dataclasses.replace(
            result, timings=dataclasses.replace(result.timings, compile=t_compile)
        )

    # -- engines and the prepared-module cache ---------------------------------------------

    def _fast(self, profile: _Profile) -> FastWasmtime:
        with self._lock:
            fast = self._engines.get(profile)
            if fast is None:
                fuel, stack = profile
                fast = self._engines[profile] = FastWasmtime(
                    pooling=self._pooling,
                    pool_size=self._pool_size,
                    epoch_interruption=True,
                    consume_fuel=fuel,
                    max_wasm_stack=stack,
                    parallel_compilation=self._parallel,
                )
            return fast

    def _prepare(self, profile: _Profile, workload: Workload) -> PreparedModule:
        fast = self._fast(profile)
        if workload.precompiled is not None and profile == _DEFAULT:
            data = workload.precompiled
            # Prepared modules are kept by the artifact's sha256: verified for bytes, and for
            # a path the one its trailer records (paths come checked, see open_envelope_file),
            # so a hit costs one trailer read and no hashing.
            # A component's artifact is refused by _prepare_artifact (nothing is cached).
            if isinstance(data, Path):
                with open_envelope_file(data, fast.fingerprint()) as art:
                    key = (profile, b"artifact:" + art.sha256)
                    return self._cached(key, lambda: fast._prepare_artifact(art, wasi=True))
            opened = open_envelope(data, fast.fingerprint())  # verify before anything else
            key = (profile, b"artifact:" + opened.sha256)
            return self._cached(key, lambda: fast._prepare_artifact(opened, wasi=True))
        try:
            wasm = workload.wasm_bytes()
        except OSError as exc:
            raise CompileError(f"cannot read the Wasm binary: {exc}") from exc
        if wasm_kind(wasm) != "module":
            raise CantHandle(
                "the wasmtime fast path runs core modules only; "
                "components run on the 'wasmtime' engine"
            )
        key = (profile, hashlib.sha256(wasm).digest())
        return self._cached(key, lambda: fast.prepare(wasm))

    def _cached(
        self, key: tuple[_Profile, bytes], make: Callable[[], PreparedModule]
    ) -> PreparedModule:
        with self._lock:
            prepared = self._prepared.get(key)
            if prepared is not None:
                self._prepared.move_to_end(key)
                return prepared
        prepared = make()  # compile outside the lock; a racing duplicate is harmless
        with self._lock:
            self._prepared[key] = prepared
            self._prepared.move_to_end(key)
            while len(self._prepared) > self._cache_size:
                # Dropping the reference is enough: a run in progress keeps its own.
                self._prepared.popitem(last=False)
        return prepared


def _is_component(workload: Workload) -> bool:
    """Whether the workload's Wasm is a component (unreadable or invalid bytes are left for
    `run` to report as `CompileError`)."""
    wasm = workload.wasm
    try:
        if isinstance(wasm, Path):
            with open(wasm, "rb") as f:
                head = f.read(8)
        else:
            head = bytes(wasm[:8])
        return wasm_kind(head) == "component"
    except (OSError, CompileError):
        return False

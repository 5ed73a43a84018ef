"""The cffi fast path to the ``_libwasmtime.so`` that the ``wasmtime`` wheel ships.

`FastWasmtime` compiles, `PreparedModule` instantiates afresh per request (`call` for an
exported function, `run_wasi` for a WASI command) and `FastWasmtimeEngine` puts the same
machinery behind the `Engine` protocol as ``wasmtime-fast``. Core modules only: components
go to the ``wasmtime`` engine.

Importing this package is cheap: cffi and the native library are loaded on first use (by
`FastWasmtime()`), and a wasmtime release other than the one the binding was checked for
gives `EngineUnavailable` there, never a wrong memory read.

Layout: ``_build.py`` (the cdef; generates ``_ffi.py``), ``_ffi.py`` (generated out-of-line
ABI module), ``_lib.py`` (locate, version/size/ABI checks, load), ``_native.py`` (the thin
typed layer), ``_fast.py`` (`FastWasmtime`, `PreparedModule`, `CallResult`),
``_engine.py`` (`FastWasmtimeEngine`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["CallResult", "FastWasmtime", "FastWasmtimeEngine", "PreparedModule"]

_EXPORTS = {
    "CallResult": "wasidispatch.engines._wasmtime_cffi._fast",
    "FastWasmtime": "wasidispatch.engines._wasmtime_cffi._fast",
    "PreparedModule": "wasidispatch.engines._wasmtime_cffi._fast",
    "FastWasmtimeEngine": "wasidispatch.engines._wasmtime_cffi._engine",
}

if TYPE_CHECKING:
    from wasidispatch.engines._wasmtime_cffi._engine import FastWasmtimeEngine
    from wasidispatch.engines._wasmtime_cffi._fast import CallResult, FastWasmtime, PreparedModule


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

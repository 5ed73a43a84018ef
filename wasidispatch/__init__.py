"""wasidispatch: run WebAssembly next to Linux containers, decided by the entrypoint's bytes.

The public names are re-exported here lazily (PEP 562): ``import wasidispatch`` is cheap, and
``wasidispatch.sniff`` imports only the stdlib-only detector, never pydantic or an engine.

Example::

    >>> import wasidispatch
    >>> wasidispatch.sniff(b"\\0asm\\x01\\0\\0\\0").format
    'wasm-module'
"""

from __future__ import annotations

import importlib

# Not `from typing import ...`: typing costs more to import than the whole detector, and mypy
# treats a module-level TYPE_CHECKING = False like typing.TYPE_CHECKING.
TYPE_CHECKING = False

__version__ = "0.1.0"

# public name -> module that defines it. Add a line here and in the TYPE_CHECKING block below.
_EXPORTS: dict[str, str] = {
    # errors
    "CacheError": "wasidispatch.errors",
    "CantHandle": "wasidispatch.errors",
    "CompileError": "wasidispatch.errors",
    "DetectionError": "wasidispatch.errors",
    "EngineError": "wasidispatch.errors",
    "EngineUnavailable": "wasidispatch.errors",
    "ExecutorError": "wasidispatch.errors",
    "IncompatibleArtifact": "wasidispatch.errors",
    "RegistryError": "wasidispatch.errors",
    "AlreadyExistsError": "wasidispatch.errors",
    "FailedPreconditionError": "wasidispatch.errors",
    "InvalidArgumentError": "wasidispatch.errors",
    "NotFoundError": "wasidispatch.errors",
    "ShimError": "wasidispatch.errors",
    "TtrpcError": "wasidispatch.errors",
    "UnimplementedError": "wasidispatch.errors",
    "SpecError": "wasidispatch.errors",
    "WasiDispatchError": "wasidispatch.errors",
    # format detection
    "Detected": "wasidispatch.detect",
    "ElfInfo": "wasidispatch.detect",
    "ScriptInfo": "wasidispatch.detect",
    "WasmInfo": "wasidispatch.detect",
    "resolve_in_root": "wasidispatch.detect",
    "sniff": "wasidispatch.detect",
    "sniff_file": "wasidispatch.detect",
    "sniff_path": "wasidispatch.detect",
    # engine contract
    "Cancel": "wasidispatch.engines._api",
    "Capabilities": "wasidispatch.engines._api",
    "Engine": "wasidispatch.engines._api",
    "ExitReason": "wasidispatch.engines._api",
    "Limits": "wasidispatch.engines._api",
    "Preopen": "wasidispatch.engines._api",
    "RunResult": "wasidispatch.engines._api",
    "Stdio": "wasidispatch.engines._api",
    "Timings": "wasidispatch.engines._api",
    "Verdict": "wasidispatch.engines._api",
    "Workload": "wasidispatch.engines._api",
    # engines
    "EngineInfo": "wasidispatch.engines",
    "WasmerEngine": "wasidispatch.engines.wasmer",
    "WasmtimeEngine": "wasidispatch.engines.wasmtime",
    # the cffi fast path (wasmtime-fast)
    "CallResult": "wasidispatch.engines._wasmtime_cffi._fast",
    "FastWasmtime": "wasidispatch.engines._wasmtime_cffi._fast",
    "FastWasmtimeEngine": "wasidispatch.engines._wasmtime_cffi._engine",
    "PreparedModule": "wasidispatch.engines._wasmtime_cffi._fast",
    # test harness helper
    "HarnessResult": "wasidispatch.testing",
    "WasiRun": "wasidispatch.testing",
    "run_wasm": "wasidispatch.testing",
    # precompile cache
    "CacheEntry": "wasidispatch.cache",
    "CacheStats": "wasidispatch.cache",
    "CachedArtifact": "wasidispatch.cache",
    "PrecompileCache": "wasidispatch.cache",
    # executors
    "BundleLike": "wasidispatch.executor",
    "Decision": "wasidispatch.executor",
    "DispatchExecutor": "wasidispatch.executor",
    "Evidence": "wasidispatch.executor",
    "Executor": "wasidispatch.executor",
    "LinuxExecutor": "wasidispatch.executor",
    "WasmExecutor": "wasidispatch.executor",
    "decide": "wasidispatch.executor",
    # OCI models, layouts, bundles, registries (pydantic is imported on first use)
    "Bundle": "wasidispatch.oci.bundle",
    "Descriptor": "wasidispatch.oci.image",
    "Digest": "wasidispatch.oci.image",
    "ImageConfig": "wasidispatch.oci.image",
    "ImageLayout": "wasidispatch.oci.layout",
    "Index": "wasidispatch.oci.image",
    "Manifest": "wasidispatch.oci.image",
    "Platform": "wasidispatch.oci.image",
    "Process": "wasidispatch.oci.runtime",
    "Spec": "wasidispatch.oci.runtime",
    "WasmConfig": "wasidispatch.oci.wasm",
    "WasmLayer": "wasidispatch.oci.layout",
    "pack_image": "wasidispatch.oci.layout",
    "pack_wasm": "wasidispatch.oci.layout",
    "pull": "wasidispatch.oci.registry",
    "push": "wasidispatch.oci.registry",
    "wasm_layers": "wasidispatch.oci.layout",
    # images classified before scheduling
    "Classifier": "wasidispatch.classify",
    "ImageDecision": "wasidispatch.classify",
    "classify": "wasidispatch.classify",
    # node set-up (containerd's config)
    "InstallResult": "wasidispatch.node",
    "install_runtime": "wasidispatch.node",
    "runtime_class": "wasidispatch.node",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from typing import Any

    from wasidispatch.cache import CachedArtifact, CacheEntry, CacheStats, PrecompileCache
    from wasidispatch.classify import Classifier, ImageDecision, classify
    from wasidispatch.detect import Detected as Detected
    from wasidispatch.detect import ElfInfo as ElfInfo
    from wasidispatch.detect import ScriptInfo as ScriptInfo
    from wasidispatch.detect import WasmInfo as WasmInfo
    from wasidispatch.detect import resolve_in_root as resolve_in_root
    from wasidispatch.detect import sniff as sniff
    from wasidispatch.detect import sniff_file as sniff_file
    from wasidispatch.detect import sniff_path as sniff_path
    from wasidispatch.engines import EngineInfo
    from wasidispatch.engines._api import (
        Cancel,
        Capabilities,
        Engine,
        ExitReason,
        Limits,
        Preopen,
        RunResult,
        Stdio,
        Timings,
        Verdict,
        Workload,
    )
    from wasidispatch.engines._wasmtime_cffi._engine import FastWasmtimeEngine
    from wasidispatch.engines._wasmtime_cffi._fast import (
        CallResult,
        FastWasmtime,
        PreparedModule,
    )
    from wasidispatch.engines.wasmer import WasmerEngine
    from wasidispatch.engines.wasmtime import WasmtimeEngine
    from wasidispatch.errors import (
        AlreadyExistsError,
        CacheError,
        CantHandle,
        CompileError,
        DetectionError,
        EngineError,
        EngineUnavailable,
        ExecutorError,
        FailedPreconditionError,
        IncompatibleArtifact,
        InvalidArgumentError,
        NotFoundError,
        RegistryError,
        ShimError,
        SpecError,
        TtrpcError,
        UnimplementedError,
        WasiDispatchError,
    )
    from wasidispatch.executor import BundleLike as BundleLike
    from wasidispatch.executor import Decision as Decision
    from wasidispatch.executor import DispatchExecutor as DispatchExecutor
    from wasidispatch.executor import Evidence as Evidence
    from wasidispatch.executor import Executor as Executor
    from wasidispatch.executor import LinuxExecutor as LinuxExecutor
    from wasidispatch.executor import WasmExecutor as WasmExecutor
    from wasidispatch.executor import decide as decide
    from wasidispatch.node import InstallResult, install_runtime, runtime_class
    from wasidispatch.oci.bundle import Bundle
    from wasidispatch.oci.image import (
        Descriptor,
        Digest,
        ImageConfig,
        Index,
        Manifest,
        Platform,
    )
    from wasidispatch.oci.layout import (
        ImageLayout,
        WasmLayer,
        pack_image,
        pack_wasm,
        wasm_layers,
    )
    from wasidispatch.oci.registry import pull, push
    from wasidispatch.oci.runtime import Process, Spec
    from wasidispatch.oci.wasm import WasmConfig
    from wasidispatch.testing import HarnessResult, WasiRun, run_wasm


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wasidispatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

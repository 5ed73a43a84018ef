"""The thin typed layer over the raw cffi functions: owned native objects and error text.

Every function here either returns a Python value or an *owned* pointer wrapped with
``ffi.gc`` (freed when the last Python reference goes), and deletes every error, trap and
byte vector it receives. Only objects that do not belong to a store pass through here
(engine, module, linker, ``InstancePre``): they may be shared across threads. Store-bound
handles (instances, functions, externs) never leave the functions in ``_fast.py`` that
create their store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from wasidispatch.engines._support import WASMTIME_MAX_WASM_STACK
from wasidispatch.engines._wasmtime_cffi._lib import Loaded
from wasidispatch.errors import CantHandle, CompileError, EngineError, IncompatibleArtifact

__all__ = [
    "EngineConfig",
    "FuncSig",
    "Linked",
    "compile_module",
    "deserialize_module",
    "deserialize_module_file",
    "error_info",
    "import_modules",
    "module_exports",
    "new_engine",
    "serialize_module",
    "trap_info",
]

CData = Any  # a cffi pointer; never escapes this package

# wasm.h value kinds and the wasmtime_val_t kinds / union fields the fast path converts.
WASM_I32, WASM_I64, WASM_F32, WASM_F64 = 0, 1, 2, 3
KIND_NAMES = {WASM_I32: "i32", WASM_I64: "i64", WASM_F32: "f32", WASM_F64: "f64"}
WASM_EXTERN_FUNC, WASM_EXTERN_MEMORY = 0, 3
WASMTIME_EXTERN_FUNC, WASMTIME_EXTERN_MEMORY = 0, 3

# wasmtime/trap.h codes that are not plain traps.
TRAP_CODE_INTERRUPT = 10
TRAP_CODE_OUT_OF_FUEL = 11

#: Largest ``max_wasm_stack`` accepted: wasmtime aborts the process (it cannot return an
#: error from engine creation) for 0 or values above its 2 MiB async stack.
MAX_WASM_STACK = WASMTIME_MAX_WASM_STACK


class EngineConfig(NamedTuple):
    """The compile- and allocation-relevant settings of one native engine."""

    pooling: bool = False
    pool_size: int = 128
    epoch_interruption: bool = True
    consume_fuel: bool = False
    max_wasm_stack: int | None = None
    #: compile on a thread pool (not a codegen setting: not in the fingerprint); off leaves
    #: no thread behind, which a process about to enter a container sandbox needs
    parallel_compilation: bool = True

    def validate(self) -> None:
        """Raise `EngineError` for settings wasmtime would abort the process on."""
        if self.max_wasm_stack is not None and not 0 < self.max_wasm_stack <= MAX_WASM_STACK:
            raise EngineError(
                f"max_wasm_stack must be between 1 and {MAX_WASM_STACK} bytes, "
                f"got {self.max_wasm_stack}"
            )
        if self.pooling and not 1 <= self.pool_size <= 10_000:
            raise EngineError(f"pool_size must be between 1 and 10000, got {self.pool_size}")


class FuncSig(NamedTuple):
    """Parameter and result kinds (``wasm_valkind_t``) of an exported function; ``None``
    when the signature has a kind the fast path does not convert (v128, references)."""

    params: tuple[int, ...] | None
    results: tuple[int, ...] | None

    def describe(self) -> str:
        """``(i32, i32) -> (i32)``, or ``unsupported`` for v128/reference signatures."""
        if self.params is None or self.results is None:
            return "unsupported"
        p = ", ".join(KIND_NAMES[k] for k in self.params)
        r = ", ".join(KIND_NAMES[k] for k in self.results)
        return f"({p}) -> ({r})"


def _vec_text(ffi: Any, vec: CData) -> str:
    data = ffi.unpack(ffi.cast("char *", vec.data), vec.size) if vec.size else b""
    return data.rstrip(b"\0").decode("utf-8", "replace")


def _take_message(
    loaded: Loaded, obj: CData, *, code: tuple[str, str], message: str, delete: str
) -> tuple[str, int | None]:
    """Read the message (and the optional code, through ``code = (C type, getter)``) of an
    error or trap ``obj``, then delete it and the message vector."""
    ffi, lib = loaded.ffi, loaded.lib
    try:
        ctype, getter = code
        out = ffi.new(ctype)
        value = int(out[0]) if getattr(lib, getter)(obj, out) else None
        vec = ffi.new("wasm_byte_vec_t *")
        getattr(lib, message)(obj, vec)
        try:
            text = _vec_text(ffi, vec)
        finally:
            lib.wasm_byte_vec_delete(vec)
        return text, value
    finally:
        getattr(lib, delete)(obj)


def error_info(loaded: Loaded, err: CData) -> tuple[str, int | None]:
    """``(message, exit status or None)`` of a ``wasmtime_error_t``, which is deleted."""
    return _take_message(
        loaded,
        err,
        code=("int *", "wasmtime_error_exit_status"),
        message="wasmtime_error_message",
        delete="wasmtime_error_delete",
    )


def trap_info(loaded: Loaded, trap: CData) -> tuple[str, int | None]:
    """``(message, wasmtime trap code or None)`` of a ``wasm_trap_t``, which is deleted."""
    return _take_message(
        loaded,
        trap,
        code=("wasmtime_trap_code_t *", "wasmtime_trap_code"),
        message="wasm_trap_message",
        delete="wasm_trap_delete",
    )


def _raise_error(loaded: Loaded, err: CData, cls: type[Exception], what: str) -> NoReturn:
    message, _ = error_info(loaded, err)
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    raise cls(f"{what}: {first}")


def new_engine(loaded: Loaded, config: EngineConfig) -> CData:
    """A ``wasm_engine_t`` for ``config`` (owned, freed with its last reference)."""
    config.validate()
    ffi, lib = loaded.ffi, loaded.lib
    cfg = lib.wasm_config_new()
    if cfg == ffi.NULL:
        raise EngineError("wasmtime could not allocate a configuration")
    try:
        lib.wasmtime_config_epoch_interruption_set(cfg, config.epoch_interruption)
        lib.wasmtime_config_consume_fuel_set(cfg, config.consume_fuel)
        if not config.parallel_compilation:
            lib.wasmtime_config_parallel_compilation_set(cfg, False)
        if config.max_wasm_stack is not None:
            lib.wasmtime_config_max_wasm_stack_set(cfg, config.max_wasm_stack)
        if config.pooling:
            pool = lib.wasmtime_pooling_allocation_config_new()
            if pool == ffi.NULL:
                raise EngineError("wasmtime could not allocate a pooling configuration")
            try:
                n = config.pool_size
                lib.wasmtime_pooling_allocation_config_total_core_instances_set(pool, n)
                lib.wasmtime_pooling_allocation_config_total_memories_set(pool, n)
                lib.wasmtime_pooling_allocation_config_total_tables_set(pool, n)
                lib.wasmtime_pooling_allocation_config_total_stacks_set(pool, n)
                lib.wasmtime_pooling_allocation_config_total_component_instances_set(pool, n)
                lib.wasmtime_pooling_allocation_strategy_set(cfg, pool)  # copies `pool`
            finally:
                lib.wasmtime_pooling_allocation_config_delete(pool)
    except BaseException:
        lib.wasm_config_delete(cfg)
        raise
    engine = lib.wasm_engine_new_with_config(cfg)  # consumes cfg, whatever happens
    if engine == ffi.NULL:
        raise EngineError("wasmtime could not create an engine for this configuration")
    return ffi.gc(engine, lib.wasm_engine_delete)


def compile_module(loaded: Loaded, engine: CData, wasm: bytes | bytearray | memoryview) -> CData:
    """Compile a core module; `CompileError` for invalid Wasm."""
    ffi, lib = loaded.ffi, loaded.lib
    out = ffi.new("wasmtime_module_t **")
    data = ffi.from_buffer("uint8_t[]", wasm)
    err = lib.wasmtime_module_new(engine, data, len(data), out)
    if err != ffi.NULL:
        _raise_error(loaded, err, CompileError, "invalid WebAssembly module")
    return ffi.gc(out[0], lib.wasmtime_module_delete)


def deserialize_module(loaded: Loaded, engine: CData, artifact: bytes | memoryview) -> CData:
    """Load a module serialized by this engine configuration; `IncompatibleArtifact` when
    wasmtime refuses it. Only verified, self-made artifacts may reach this function."""
    ffi, lib = loaded.ffi, loaded.lib
    out = ffi.new("wasmtime_module_t **")
    data = ffi.from_buffer("uint8_t[]", artifact)
    err = lib.wasmtime_module_deserialize(engine, data, len(data), out)
    if err != ffi.NULL:
        _raise_error(loaded, err, IncompatibleArtifact, "wasmtime refused the precompiled artifact")
    return ffi.gc(out[0], lib.wasmtime_module_delete)


def deserialize_module_file(loaded: Loaded, engine: CData, path: str) -> CData:
    """Map and load a module serialized by this engine configuration from a file
    (``wasmtime_module_deserialize_file``: the code is mapped, not copied). Bytes after
    wasmtime's artifact (wasidispatch's trailer) are ignored by wasmtime. `IncompatibleArtifact`
    when wasmtime refuses the file. Only checked, self-made artifacts may reach this function."""
    ffi, lib = loaded.ffi, loaded.lib
    out = ffi.new("wasmtime_module_t **")
    err = lib.wasmtime_module_deserialize_file(engine, os.fsencode(path), out)
    if err != ffi.NULL:
        _raise_error(loaded, err, IncompatibleArtifact, "wasmtime refused the precompiled artifact")
    return ffi.gc(out[0], lib.wasmtime_module_delete)


def serialize_module(loaded: Loaded, module: CData) -> bytes:
    """The module's native artifact (``wasmtime_module_serialize``)."""
    ffi, lib = loaded.ffi, loaded.lib
    vec = ffi.new("wasm_byte_vec_t *")
    err = lib.wasmtime_module_serialize(module, vec)
    if err != ffi.NULL:
        _raise_error(loaded, err, EngineError, "wasmtime could not serialize the module")
    try:
        return bytes(ffi.buffer(vec.data, vec.size))
    finally:
        lib.wasm_byte_vec_delete(vec)


def _kinds(loaded: Loaded, vec: CData) -> tuple[int, ...] | None:
    lib = loaded.lib
    kinds = tuple(int(lib.wasm_valtype_kind(vec.data[i])) for i in range(vec.size))
    return kinds if all(k in KIND_NAMES for k in kinds) else None


def module_exports(loaded: Loaded, module: CData) -> tuple[dict[str, FuncSig], tuple[str, ...]]:
    """``(function exports with their signatures, names of exported memories)``."""
    ffi, lib = loaded.ffi, loaded.lib
    vec = ffi.new("wasm_exporttype_vec_t *")
    lib.wasmtime_module_exports(module, vec)
    funcs: dict[str, FuncSig] = {}
    memories: list[str] = []
    try:
        for i in range(vec.size):
            export = vec.data[i]
            name_vec = lib.wasm_exporttype_name(export)
            name = bytes(ffi.buffer(name_vec.data, name_vec.size)).decode("utf-8", "replace")
            ty = lib.wasm_exporttype_type(export)
            kind = lib.wasm_externtype_kind(ty)
            if kind == WASM_EXTERN_FUNC:
                ft = lib.wasm_externtype_as_functype_const(ty)
                funcs[name] = FuncSig(
                    _kinds(loaded, lib.wasm_functype_params(ft)),
                    _kinds(loaded, lib.wasm_functype_results(ft)),
                )
            elif kind == WASM_EXTERN_MEMORY:
                memories.append(name)
    finally:
        lib.wasm_exporttype_vec_delete(vec)
    return funcs, tuple(memories)


def import_modules(loaded: Loaded, module: CData) -> frozenset[str]:
    """The module names the module imports from (e.g. ``wasi_snapshot_preview1``)."""
    ffi, lib = loaded.ffi, loaded.lib
    vec = ffi.new("wasm_importtype_vec_t *")
    lib.wasmtime_module_imports(module, vec)
    try:
        names = set()
        for i in range(vec.size):
            name = lib.wasm_importtype_module(vec.data[i])
            names.add(bytes(ffi.buffer(name.data, name.size)).decode("utf-8", "replace"))
        return frozenset(names)
    finally:
        lib.wasm_importtype_vec_delete(vec)


class Linked(NamedTuple):
    """A linker (with WASI or without) and the module's ``InstancePre`` made from it."""

    linker: CData
    pre: CData


def link(loaded: Loaded, engine: CData, module: CData, *, wasi: bool) -> Linked:
    """Resolve the module's imports once (``wasmtime_linker_instantiate_pre``).

    Raises `CantHandle` when an import is neither WASI preview 1 (with ``wasi``) nor
    anything else this engine provides.
    """
    ffi, lib = loaded.ffi, loaded.lib
    linker = ffi.gc(lib.wasmtime_linker_new(engine), lib.wasmtime_linker_delete)
    if wasi:
        err = lib.wasmtime_linker_define_wasi(linker)
        if err != ffi.NULL:
            _raise_error(loaded, err, EngineError, "wasmtime could not define WASI")
    out = ffi.new("wasmtime_instance_pre_t **")
    err = lib.wasmtime_linker_instantiate_pre(linker, module, out)
    if err != ffi.NULL:
        _raise_error(loaded, err, CantHandle, "cannot link the guest")
    return Linked(linker, ffi.gc(out[0], lib.wasmtime_instance_pre_delete))


def read_path(path: Path) -> bytes:
    """The bytes of ``path``; `CompileError` when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CompileError(f"cannot read the Wasm binary: {exc}") from exc

"""Build script of the out-of-line ABI-mode cffi module ``_ffi.py`` (run it after editing
``CDEF``; a test checks that the committed ``_ffi.py`` is what this script produces).

Usage::

    .venv/bin/python -m wasidispatch.engines._wasmtime_cffi._build

The declarations below are the subset of the wasmtime 50 C API (``wasm.h``, ``wasi.h``,
``wasmtime/*.h``) that the fast path uses, written from those headers and cross-checked with
the ctypes bindings of wasmtime-py 50. Parsing them needs ``pycparser``, so it happens here,
at build time, never at import: ``_ffi.py`` holds the pre-parsed type tables and loads with
``_cffi_backend`` alone. Struct layouts that differ between wasmtime releases are verified
against the loaded library at load time (see ``_lib.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

MODULE_NAME = "wasidispatch.engines._wasmtime_cffi._ffi"
OUTPUT = Path(__file__).with_name("_ffi.py")

CDEF = r"""
/* ---- wasm.h ---------------------------------------------------------------------------- */
typedef struct wasm_config_t wasm_config_t;
typedef struct wasm_engine_t wasm_engine_t;
typedef struct wasm_trap_t wasm_trap_t;
typedef struct wasm_valtype_t wasm_valtype_t;
typedef struct wasm_functype_t wasm_functype_t;
typedef struct wasm_externtype_t wasm_externtype_t;
typedef struct wasm_exporttype_t wasm_exporttype_t;
typedef struct wasm_importtype_t wasm_importtype_t;
typedef uint8_t wasm_valkind_t;
typedef uint8_t wasm_externkind_t;

typedef struct wasm_byte_vec_t { size_t size; uint8_t *data; } wasm_byte_vec_t;
typedef wasm_byte_vec_t wasm_name_t;
typedef wasm_byte_vec_t wasm_message_t;
typedef struct wasm_valtype_vec_t { size_t size; wasm_valtype_t **data; } wasm_valtype_vec_t;
typedef struct wasm_exporttype_vec_t {
    size_t size; wasm_exporttype_t **data;
} wasm_exporttype_vec_t;
typedef struct wasm_importtype_vec_t {
    size_t size; wasm_importtype_t **data;
} wasm_importtype_vec_t;

void wasm_byte_vec_new(wasm_byte_vec_t *out, size_t size, const uint8_t *data);
void wasm_byte_vec_delete(wasm_byte_vec_t *vec);
void wasm_exporttype_vec_delete(wasm_exporttype_vec_t *vec);
void wasm_importtype_vec_delete(wasm_importtype_vec_t *vec);

wasm_config_t *wasm_config_new(void);
void wasm_config_delete(wasm_config_t *config);
wasm_engine_t *wasm_engine_new_with_config(wasm_config_t *config);  /* consumes config */
void wasm_engine_delete(wasm_engine_t *engine);

void wasm_trap_message(const wasm_trap_t *trap, wasm_message_t *out);
void wasm_trap_delete(wasm_trap_t *trap);

const wasm_name_t *wasm_exporttype_name(const wasm_exporttype_t *et);
const wasm_externtype_t *wasm_exporttype_type(const wasm_exporttype_t *et);
wasm_externkind_t wasm_externtype_kind(const wasm_externtype_t *ty);
const wasm_functype_t *wasm_externtype_as_functype_const(const wasm_externtype_t *ty);
const wasm_valtype_vec_t *wasm_functype_params(const wasm_functype_t *ft);
const wasm_valtype_vec_t *wasm_functype_results(const wasm_functype_t *ft);
wasm_valkind_t wasm_valtype_kind(const wasm_valtype_t *ty);
const wasm_name_t *wasm_importtype_module(const wasm_importtype_t *it);

/* ---- wasi.h ---------------------------------------------------------------------------- */
typedef struct wasi_config_t wasi_config_t;
wasi_config_t *wasi_config_new(void);
void wasi_config_delete(wasi_config_t *config);
bool wasi_config_set_argv(wasi_config_t *config, size_t argc, const char *argv[]);
bool wasi_config_set_env(wasi_config_t *config, size_t envc, const char *names[],
                         const char *values[]);
bool wasi_config_set_stdin_file(wasi_config_t *config, const char *path);
void wasi_config_set_stdin_bytes(wasi_config_t *config, wasm_byte_vec_t *binary);
void wasi_config_inherit_stdin(wasi_config_t *config);
bool wasi_config_set_stdout_file(wasi_config_t *config, const char *path);
void wasi_config_inherit_stdout(wasi_config_t *config);
void wasi_config_set_stdout_custom(wasi_config_t *config,
                                   ptrdiff_t (*callback)(void *, const unsigned char *, size_t),
                                   void *data, void (*finalizer)(void *));
bool wasi_config_set_stderr_file(wasi_config_t *config, const char *path);
void wasi_config_inherit_stderr(wasi_config_t *config);
void wasi_config_set_stderr_custom(wasi_config_t *config,
                                   ptrdiff_t (*callback)(void *, const unsigned char *, size_t),
                                   void *data, void (*finalizer)(void *));
/* wasmtime 50: one bool, not the (dir_perms, file_perms) pair of some older releases */
bool wasi_config_preopen_dir(wasi_config_t *config, const char *host_path,
                             const char *guest_path, bool fs_mutable);

/* ---- wasmtime/error.h, wasmtime/trap.h --------------------------------------------------- */
typedef struct wasmtime_error wasmtime_error_t;
typedef uint8_t wasmtime_trap_code_t;
void wasmtime_error_delete(wasmtime_error_t *error);
void wasmtime_error_message(const wasmtime_error_t *error, wasm_name_t *message);
bool wasmtime_error_exit_status(const wasmtime_error_t *error, int *status);
bool wasmtime_trap_code(const wasm_trap_t *trap, wasmtime_trap_code_t *code);

/* ---- wasmtime/config.h ------------------------------------------------------------------- */
typedef struct wasmtime_pooling_allocation_config_t wasmtime_pooling_allocation_config_t;
void wasmtime_config_epoch_interruption_set(wasm_config_t *config, bool enable);
void wasmtime_config_consume_fuel_set(wasm_config_t *config, bool enable);
void wasmtime_config_max_wasm_stack_set(wasm_config_t *config, size_t size);
void wasmtime_config_parallel_compilation_set(wasm_config_t *config, bool enable);
wasmtime_pooling_allocation_config_t *wasmtime_pooling_allocation_config_new(void);
void wasmtime_pooling_allocation_config_delete(wasmtime_pooling_allocation_config_t *pc);
void wasmtime_pooling_allocation_config_total_core_instances_set(
    wasmtime_pooling_allocation_config_t *pc, uint32_t count);
void wasmtime_pooling_allocation_config_total_memories_set(
    wasmtime_pooling_allocation_config_t *pc, uint32_t count);
void wasmtime_pooling_allocation_config_total_tables_set(
    wasmtime_pooling_allocation_config_t *pc, uint32_t count);
void wasmtime_pooling_allocation_config_total_stacks_set(
    wasmtime_pooling_allocation_config_t *pc, uint32_t count);
void wasmtime_pooling_allocation_config_total_component_instances_set(
    wasmtime_pooling_allocation_config_t *pc, uint32_t count);
void wasmtime_pooling_allocation_config_max_memory_size_set(
    wasmtime_pooling_allocation_config_t *pc, size_t bytes);
/* copies the pooling config: the caller still owns (and deletes) `pc` */
void wasmtime_pooling_allocation_strategy_set(wasm_config_t *config,
                                              const wasmtime_pooling_allocation_config_t *pc);

/* ---- wasmtime/engine.h --------------------------------------------------------------------- */
void wasmtime_engine_increment_epoch(wasm_engine_t *engine);

/* ---- wasmtime/module.h --------------------------------------------------------------------- */
typedef struct wasmtime_module wasmtime_module_t;
wasmtime_error_t *wasmtime_module_new(wasm_engine_t *engine, const uint8_t *wasm, size_t len,
                                      wasmtime_module_t **ret);
void wasmtime_module_delete(wasmtime_module_t *m);
void wasmtime_module_exports(const wasmtime_module_t *module, wasm_exporttype_vec_t *out);
void wasmtime_module_imports(const wasmtime_module_t *module, wasm_importtype_vec_t *out);
wasmtime_error_t *wasmtime_module_serialize(wasmtime_module_t *module, wasm_byte_vec_t *ret);
wasmtime_error_t *wasmtime_module_deserialize(wasm_engine_t *engine, const uint8_t *bytes,
                                              size_t len, wasmtime_module_t **ret);
wasmtime_error_t *wasmtime_module_deserialize_file(wasm_engine_t *engine, const char *path,
                                                   wasmtime_module_t **ret);

/* ---- wasmtime/store.h ---------------------------------------------------------------------- */
typedef struct wasmtime_store wasmtime_store_t;
typedef struct wasmtime_context wasmtime_context_t;
wasmtime_store_t *wasmtime_store_new(wasm_engine_t *engine, void *data,
                                     void (*finalizer)(void *));
wasmtime_context_t *wasmtime_store_context(wasmtime_store_t *store);
void wasmtime_store_limiter(wasmtime_store_t *store, int64_t memory_size,
                            int64_t table_elements, int64_t instances, int64_t tables,
                            int64_t memories);
void wasmtime_store_delete(wasmtime_store_t *store);
wasmtime_error_t *wasmtime_context_set_fuel(wasmtime_context_t *store, uint64_t fuel);
/* takes ownership of `wasi`, even when it returns an error */
wasmtime_error_t *wasmtime_context_set_wasi(wasmtime_context_t *context, wasi_config_t *wasi);
void wasmtime_context_set_epoch_deadline(wasmtime_context_t *context,
                                         uint64_t ticks_beyond_current);
typedef uint8_t wasmtime_update_deadline_kind_t;
void wasmtime_store_epoch_deadline_callback(
    wasmtime_store_t *store,
    wasmtime_error_t *(*func)(wasmtime_context_t *context, void *data,
                              uint64_t *epoch_deadline_delta,
                              wasmtime_update_deadline_kind_t *update_kind),
    void *data, void (*finalizer)(void *));
wasmtime_error_t *wasmtime_error_new(const char *message);

/* ---- wasmtime/extern.h, wasmtime/val.h (layouts of wasmtime 50) ----------------------------- */
typedef struct wasmtime_func { uint64_t store_id; void *__private; } wasmtime_func_t;
typedef struct wasmtime_table {
    struct { uint64_t store_id; uint32_t __private1; } _anon;
    uint32_t __private2;
} wasmtime_table_t;
typedef struct wasmtime_memory {
    struct { uint64_t store_id; uint32_t __private1; } _anon;
    uint32_t __private2;
} wasmtime_memory_t;
typedef struct wasmtime_global {
    uint64_t store_id; uint32_t __private1; uint32_t __private2; uint32_t __private3;
} wasmtime_global_t;
typedef struct wasmtime_tag {
    struct { uint64_t store_id; uint32_t __private1; } _anon;
    uint32_t __private2;
} wasmtime_tag_t;
typedef struct wasmtime_sharedmemory wasmtime_sharedmemory_t;
typedef uint8_t wasmtime_extern_kind_t;
typedef union wasmtime_extern_union {
    wasmtime_func_t func;
    wasmtime_global_t global;
    wasmtime_table_t table;
    wasmtime_memory_t memory;
    wasmtime_sharedmemory_t *sharedmemory;
    wasmtime_tag_t tag;
} wasmtime_extern_union_t;
typedef struct wasmtime_extern {
    wasmtime_extern_kind_t kind;
    wasmtime_extern_union_t of;
} wasmtime_extern_t;
void wasmtime_extern_delete(wasmtime_extern_t *val);

typedef struct wasmtime_anyref {
    uint64_t store_id; uint32_t __private1; uint32_t __private2; void *__private3;
} wasmtime_anyref_t;
typedef struct wasmtime_externref {
    uint64_t store_id; uint32_t __private1; uint32_t __private2; void *__private3;
} wasmtime_externref_t;
typedef struct wasmtime_exnref {
    uint64_t store_id; uint32_t __private1; uint32_t __private2; void *__private3;
} wasmtime_exnref_t;
typedef uint8_t wasmtime_valkind_t;
typedef union wasmtime_valunion {
    int32_t i32;
    int64_t i64;
    float f32;
    double f64;
    wasmtime_anyref_t anyref;
    wasmtime_externref_t externref;
    wasmtime_exnref_t exnref;
    wasmtime_func_t funcref;
    uint8_t v128[16];
} wasmtime_valunion_t;
typedef struct wasmtime_val {
    wasmtime_valkind_t kind;
    wasmtime_valunion_t of;
} wasmtime_val_t;

size_t wasmtime_memory_data_size(const wasmtime_context_t *store,
                                 const wasmtime_memory_t *memory);

/* ---- wasmtime/func.h, wasmtime/instance.h, wasmtime/linker.h -------------------------------- */
typedef struct wasmtime_instance { uint64_t store_id; size_t __private; } wasmtime_instance_t;
typedef struct wasmtime_linker wasmtime_linker_t;
typedef struct wasmtime_instance_pre wasmtime_instance_pre_t;

/* returns an error or sets *trap, never both */
wasmtime_error_t *wasmtime_func_call(wasmtime_context_t *store, const wasmtime_func_t *func,
                                     const wasmtime_val_t *args, size_t nargs,
                                     wasmtime_val_t *results, size_t nresults,
                                     wasm_trap_t **trap);
bool wasmtime_instance_export_get(wasmtime_context_t *store,
                                  const wasmtime_instance_t *instance, const char *name,
                                  size_t name_len, wasmtime_extern_t *item);
wasmtime_linker_t *wasmtime_linker_new(wasm_engine_t *engine);
void wasmtime_linker_delete(wasmtime_linker_t *linker);
wasmtime_error_t *wasmtime_linker_define_wasi(wasmtime_linker_t *linker);
wasmtime_error_t *wasmtime_linker_instantiate_pre(const wasmtime_linker_t *linker,
                                                  const wasmtime_module_t *module,
                                                  wasmtime_instance_pre_t **instance_pre);
void wasmtime_instance_pre_delete(wasmtime_instance_pre_t *instance_pre);
wasmtime_error_t *wasmtime_instance_pre_instantiate(const wasmtime_instance_pre_t *instance_pre,
                                                    wasmtime_context_t *store,
                                                    wasmtime_instance_t *instance,
                                                    wasm_trap_t **trap_ptr);

/* ---- wasidispatch's own scratch block: one allocation per call for every out-parameter ---- */
typedef struct wd_call_scratch {
    wasmtime_instance_t instance;
    wasmtime_extern_t item;
    wasm_trap_t *trap;
} wd_call_scratch_t;
"""


def make_ffibuilder() -> object:
    """The configured `cffi.FFI` builder (imports cffi and pycparser)."""
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(MODULE_NAME, None)
    return ffibuilder


def generate(target: Path = OUTPUT) -> Path:
    """Write the out-of-line ABI module to ``target`` and return its path."""
    ffibuilder = make_ffibuilder()
    target.parent.mkdir(parents=True, exist_ok=True)
    ffibuilder.emit_python_code(str(target))  # type: ignore[attr-defined]
    return target


def main(argv: list[str] | None = None) -> int:
    """Regenerate ``_ffi.py`` (or the path given as the only argument)."""
    args = sys.argv[1:] if argv is None else argv
    print(generate(Path(args[0]) if args else OUTPUT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

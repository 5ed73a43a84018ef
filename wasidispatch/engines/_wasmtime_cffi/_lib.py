"""Find, check and load the ``_libwasmtime.so`` that the installed ``wasmtime`` wheel ships.

Nothing here runs at import. :func:`load` does the work once per process, under a lock:

1. locate the wasmtime package *without importing it* (``importlib.util.find_spec``; importing
   wasmtime-py would load the library through ctypes and cost tens of milliseconds);
2. read the package version from its ``.dist-info`` and refuse any major release but
   :data:`SUPPORTED_MAJOR`;
3. compare the struct sizes the cdef declares with the sizes known for that release;
4. ``dlopen`` the library, check every declared symbol exists;
5. probe the ABI: compile and run a tiny module, letting the library itself write a
   ``wasmtime_val_t`` array and a ``wasmtime_extern_t`` into sentinel-filled buffers larger
   than the declared structs, and check every value landed where the cdef says it does.

Any failure raises `EngineUnavailable` (the wasmtime-py engine keeps working); memory is
never read through a layout that was not verified.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

from wasidispatch.errors import EngineUnavailable

__all__ = [
    "EXPECTED_SIZES",
    "SUPPORTED_MAJOR",
    "Loaded",
    "installed_wasmtime",
    "load",
    "probe_module",
]

#: The wasmtime major release whose C API the cdef in ``_build.py`` describes.
SUPPORTED_MAJOR = 50

#: Struct sizes (bytes, x86_64/aarch64) per wasmtime major release. ``wasmtime_val_t`` grew
#: to 32 bytes when its union gained 24-byte GC references (older headers: 24, union 16).
EXPECTED_SIZES: dict[int, dict[str, int]] = {
    50: {
        "wasm_byte_vec_t": 16,
        "wasmtime_func_t": 16,
        "wasmtime_instance_t": 16,
        "wasmtime_memory_t": 24,
        "wasmtime_extern_union_t": 24,
        "wasmtime_extern_t": 32,
        "wasmtime_valunion_t": 24,
        "wasmtime_val_t": 32,
        "wasmtime_anyref_t": 24,
    },
}

_INSTALL_HINT = "pip install 'wasidispatch[wasmtime]'"

# wasmtime C API constants used by the probe and the fast path (wasm.h, wasmtime/val.h).
WASMTIME_I32 = 0
WASMTIME_I64 = 1
WASMTIME_EXTERN_FUNC = 0


class Loaded(NamedTuple):
    """The checked library: ``ffi`` (cffi type tables), ``lib`` (the dlopen'ed functions),
    the wasmtime package ``version`` and the ``path`` of the shared object."""

    ffi: Any
    lib: Any
    version: str
    path: Path
    sink: Any  # the one cffi callback that collects captured stdout/stderr


def _shared_object_name() -> str:
    if sys.platform.startswith("linux"):
        return "_libwasmtime.so"
    if sys.platform == "darwin":
        return "_libwasmtime.dylib"
    if sys.platform == "win32":
        return "_wasmtime.dll"
    raise EngineUnavailable(f"the wasmtime fast path does not support platform {sys.platform!r}")


def _arch_dir() -> str:
    machine = os.uname().machine.lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    plat = "linux" if sys.platform.startswith("linux") else sys.platform
    return f"{plat}-{machine}"


def installed_wasmtime() -> tuple[Path, str]:
    """``(shared object path, package version)`` of the installed wasmtime wheel.

    Raises `EngineUnavailable` when wasmtime is not installed or ships no library here.
    """
    import importlib.util

    spec = importlib.util.find_spec("wasmtime")
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(f"the wasmtime package is not installed: {_INSTALL_HINT}")
    pkgdir = Path(next(iter(spec.submodule_search_locations)))
    so = pkgdir / _arch_dir() / _shared_object_name()
    if not so.is_file():
        raise EngineUnavailable(f"the wasmtime package ships no native library at {so}")
    return so, _package_version(pkgdir)


def _package_version(pkgdir: Path) -> str:
    import re

    # The dist-info next to the package is the cheap, import-free source of truth for the
    # wheel the library came from (importlib.metadata costs ~30 ms to import).
    found = sorted(pkgdir.parent.glob("wasmtime-*.dist-info"))
    for info in found:
        try:
            text = (info / "METADATA").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        match = re.search(r"^Version:\s*(\S+)", text, re.MULTILINE)
        if match:
            return match.group(1)
    from importlib import metadata

    try:
        return metadata.version("wasmtime")
    except metadata.PackageNotFoundError as exc:
        raise EngineUnavailable(f"cannot tell the installed wasmtime version: {exc}") from exc


def _major(version: str) -> int:
    import re

    match = re.match(r"(\d+)\.", version)
    if match is None:
        raise EngineUnavailable(f"unrecognised wasmtime version {version!r}")
    return int(match.group(1))


def check_version(version: str) -> dict[str, int]:
    """The expected struct sizes for ``version``; `EngineUnavailable` when unsupported."""
    major = _major(version)
    if major != SUPPORTED_MAJOR or major not in EXPECTED_SIZES:
        raise EngineUnavailable(
            f"the wasmtime fast path is built for wasmtime {SUPPORTED_MAJOR}.x, found {version}; "
            "use the 'wasmtime' engine, or install a matching wheel: "
            f"pip install 'wasmtime>={SUPPORTED_MAJOR},<{SUPPORTED_MAJOR + 1}'"
        )
    return EXPECTED_SIZES[major]


def check_sizes(ffi: Any, expected: dict[str, int]) -> None:
    """Refuse when the cdef's layout is not the one expected for this wasmtime release."""
    wrong = {
        name: (ffi.sizeof(name), size)
        for name, size in expected.items()
        if ffi.sizeof(name) != size
    }
    if wrong:
        detail = ", ".join(f"{n}: declared {d}, expected {e}" for n, (d, e) in wrong.items())
        raise EngineUnavailable(f"wasmtime fast path struct layout mismatch ({detail})")


# ---- the probe module -------------------------------------------------------------------------


def _leb_u(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _leb_s(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


def _section(section_id: int, payload: bytes) -> bytes:
    return bytes([section_id]) + _leb_u(len(payload)) + payload


PROBE_I64_A = 0x1122334455667788
PROBE_I64_B = -2
PROBE_I32_C = 7


def probe_module() -> bytes:
    """The Wasm binary of::

        (module (func (export "p") (result i64 i64 i32)
          i64.const 0x1122334455667788  i64.const -2  i32.const 7))

    encoded here so that loading needs no WAT parser (a test compares it with wat2wasm).
    """
    functype = b"\x60" + b"\x00" + b"\x03\x7e\x7e\x7f"  # () -> (i64, i64, i32)
    body = (
        b"\x00"  # no locals
        + b"\x42"
        + _leb_s(PROBE_I64_A)
        + b"\x42"
        + _leb_s(PROBE_I64_B)
        + b"\x41"
        + _leb_s(PROBE_I32_C)
        + b"\x0b"
    )
    return (
        b"\x00asm\x01\x00\x00\x00"
        + _section(1, b"\x01" + functype)  # type section
        + _section(3, b"\x01\x00")  # function section: func 0 has type 0
        + _section(7, b"\x01\x01p\x00\x00")  # export "p" = func 0
        + _section(10, b"\x01" + _leb_u(len(body)) + body)  # code section
    )


_SENTINEL = 0xA5


def _probe_abi(ffi: Any, lib: Any) -> None:
    """Let the library write values and an extern; verify they sit where the cdef says."""
    val_size = ffi.sizeof("wasmtime_val_t")
    ext_size = ffi.sizeof("wasmtime_extern_t")
    config = lib.wasm_config_new()
    # compiled on this thread: a parallel compile would start wasmtime's thread pool in every
    # process that loads the library, and a process that forks (the shim's zygote) must stay
    # single-threaded
    lib.wasmtime_config_parallel_compilation_set(config, False)
    engine = lib.wasm_engine_new_with_config(config)  # consumes config
    if engine == ffi.NULL:
        raise EngineUnavailable("wasmtime could not create an engine")
    module_out = ffi.new("wasmtime_module_t **")
    store = ffi.NULL
    try:
        wasm = probe_module()
        err = lib.wasmtime_module_new(engine, wasm, len(wasm), module_out)
        if err != ffi.NULL:
            lib.wasmtime_error_delete(err)
            raise EngineUnavailable("wasmtime could not compile the ABI probe module")
        store = lib.wasmtime_store_new(engine, ffi.NULL, ffi.NULL)
        ctx = lib.wasmtime_store_context(store)
        linker = lib.wasmtime_linker_new(engine)
        pre_out = ffi.new("wasmtime_instance_pre_t **")
        err = lib.wasmtime_linker_instantiate_pre(linker, module_out[0], pre_out)
        lib.wasmtime_linker_delete(linker)
        if err != ffi.NULL:
            lib.wasmtime_error_delete(err)
            raise EngineUnavailable("wasmtime could not link the ABI probe module")
        scratch = ffi.new("wd_call_scratch_t *")
        err = lib.wasmtime_instance_pre_instantiate(
            pre_out[0], ctx, ffi.addressof(scratch, "instance"), ffi.addressof(scratch, "trap")
        )
        lib.wasmtime_instance_pre_delete(pre_out[0])
        if err != ffi.NULL or scratch.trap != ffi.NULL:
            if err != ffi.NULL:
                lib.wasmtime_error_delete(err)
            if scratch.trap != ffi.NULL:
                lib.wasm_trap_delete(scratch.trap)
            raise EngineUnavailable("wasmtime could not instantiate the ABI probe module")

        # The extern: room for twice the declared size, so a larger real struct stays inside
        # our buffer (and shows up as overwritten sentinel bytes).
        ext_buf = ffi.new("uint8_t[]", [_SENTINEL] * (2 * ext_size))
        item = ffi.cast("wasmtime_extern_t *", ext_buf)
        found = lib.wasmtime_instance_export_get(
            ctx, ffi.addressof(scratch, "instance"), b"p", 1, item
        )
        tail_ok = all(b == _SENTINEL for b in ext_buf[ext_size : 2 * ext_size])
        if not found or item.kind != WASMTIME_EXTERN_FUNC or not tail_ok:
            raise EngineUnavailable("wasmtime_extern_t layout differs from the declared one")
        if item.of.func.store_id != scratch.instance.store_id:
            raise EngineUnavailable(
                "wasmtime_extern_t.of.func layout differs from the declared one"
            )

        # The values: three results written by the library at its own stride.
        val_buf = ffi.new("uint8_t[]", [_SENTINEL] * (6 * val_size))
        results = ffi.cast("wasmtime_val_t *", val_buf)
        trap = ffi.new("wasm_trap_t **")
        err = lib.wasmtime_func_call(
            ctx, ffi.addressof(item.of, "func"), ffi.NULL, 0, results, 3, trap
        )
        if err != ffi.NULL or trap[0] != ffi.NULL:
            if err != ffi.NULL:
                lib.wasmtime_error_delete(err)
            if trap[0] != ffi.NULL:
                lib.wasm_trap_delete(trap[0])
            raise EngineUnavailable("wasmtime could not call the ABI probe function")
        ok = (
            results[0].kind == WASMTIME_I64
            and results[0].of.i64 == PROBE_I64_A
            and results[1].kind == WASMTIME_I64
            and results[1].of.i64 == PROBE_I64_B
            and results[2].kind == WASMTIME_I32
            and results[2].of.i32 == PROBE_I32_C
            and all(b == _SENTINEL for b in val_buf[3 * val_size : 6 * val_size])
        )
        if not ok:
            raise EngineUnavailable("wasmtime_val_t layout differs from the declared one")
    finally:
        if store != ffi.NULL:
            lib.wasmtime_store_delete(store)
        if module_out[0] != ffi.NULL:
            lib.wasmtime_module_delete(module_out[0])
        lib.wasm_engine_delete(engine)


_lock = threading.Lock()
_loaded: Loaded | None = None


def _make_sink(ffi: Any) -> Any:
    def sink(data: Any, buf: Any, size: int) -> int:
        ffi.from_handle(data).extend(ffi.buffer(buf, size))
        return size

    # onerror: a failing sink reports an I/O error to the guest (-1) instead of raising
    # through Rust frames.
    return ffi.callback(
        "ptrdiff_t(void *, const unsigned char *, size_t)", sink, error=-1, onerror=None
    )


def load() -> Loaded:
    """The checked library, loaded on first use; `EngineUnavailable` when it cannot be."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load_uncached()
        return _loaded


def _load_uncached() -> Loaded:
    path, version = installed_wasmtime()
    expected = check_version(version)
    try:
        from wasidispatch.engines._wasmtime_cffi._ffi import ffi
    except ImportError as exc:  # _cffi_backend missing
        raise EngineUnavailable(f"cffi is not installed: {_INSTALL_HINT}") from exc
    check_sizes(ffi, expected)
    try:
        lib = ffi.dlopen(str(path))
    except OSError as exc:
        raise EngineUnavailable(f"cannot load {path}: {exc}") from exc
    missing = [name for name in _function_names(ffi) if not hasattr(lib, name)]
    if missing:
        raise EngineUnavailable(f"{path} lacks C API functions: {', '.join(missing[:5])}")
    _probe_abi(ffi, lib)
    return Loaded(ffi=ffi, lib=lib, version=version, path=path, sink=_make_sink(ffi))


def _function_names(ffi: Any) -> list[str]:
    import re

    from wasidispatch.engines._wasmtime_cffi._build import CDEF

    names = re.findall(r"\b(wasm\w+|wasi_\w+)\s*\(", CDEF)
    return sorted({n for n in names if not n.endswith("_t")})

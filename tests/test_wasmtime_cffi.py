"""The cffi fast path: binding checks, the per-request API, ownership, threads and leaks.

The engine contract itself (argv, env, preopens, stdio, limits, precompiled artifacts) is
covered for ``wasmtime-fast`` by ``tests/test_engines_conformance.py``; this file covers what
is particular to the fast path.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from tests.guests import build_c, build_wat
from wasidispatch import engines
from wasidispatch.engines import ExitReason, Limits, Preopen, Stdio, Workload
from wasidispatch.engines._wasmtime_cffi import (
    CallResult,
    FastWasmtime,
    FastWasmtimeEngine,
    PreparedModule,
    _build,
    _lib,
    _native,
)
from wasidispatch.engines.wasmtime import WasmtimeEngine
from wasidispatch.errors import (
    CantHandle,
    CompileError,
    EngineError,
    EngineUnavailable,
    IncompatibleArtifact,
)

PKG = Path(_build.__file__).parent

CALC_WAT = """
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add)
  (func (export "mix") (param i64 f32 f64) (result f64 i64 f32)
    local.get 2 local.get 0 local.get 1)
  (func (export "boom") unreachable)
  (func (export "div") (param i32 i32) (result i32) local.get 0 local.get 1 i32.div_s)
  (func (export "quit") (param i32) local.get 0 call $proc_exit)
  (func (export "spin") (loop $l br $l))
  (func (export "grow") (param i32) (result i32) local.get 0 memory.grow)
  (func (export "ref") (result funcref) ref.func $id)
  (func $id (export "id") (param i32) (result i32) local.get 0)
  (elem declare func $id)
  (func (export "sum17")
    (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 i32.add local.get 2 i32.add local.get 3 i32.add
    local.get 4 i32.add local.get 5 i32.add local.get 6 i32.add local.get 7 i32.add
    local.get 8 i32.add local.get 9 i32.add local.get 10 i32.add local.get 11 i32.add
    local.get 12 i32.add local.get 13 i32.add local.get 14 i32.add local.get 15 i32.add
    local.get 16 i32.add))
"""


@pytest.fixture(scope="module")
def calc_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm(CALC_WAT))


@pytest.fixture(scope="module", params=[False, True], ids=["default", "pooling"])
def fast(request: pytest.FixtureRequest) -> FastWasmtime:
    return FastWasmtime(pooling=request.param, pool_size=32)


@pytest.fixture(scope="module")
def calc(fast: FastWasmtime, calc_wasm: bytes) -> Iterator[PreparedModule]:
    with fast.prepare(calc_wasm) as prepared:
        yield prepared


# -- the binding -------------------------------------------------------------------------------


def test_generated_ffi_module_is_reproducible(tmp_path: Path) -> None:
    target = _build.generate(tmp_path / "_ffi.py")
    assert target.read_bytes() == (PKG / "_ffi.py").read_bytes()


def test_importing_the_package_loads_neither_cffi_nor_wasmtime() -> None:
    code = (
        "import sys, wasidispatch.engines._wasmtime_cffi as m\n"
        "assert m.__doc__\n"
        "print(' '.join(n for n in ('_cffi_backend', 'cffi', 'wasmtime') if n in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == ""


def test_loading_does_not_import_wasmtime_py() -> None:
    code = (
        "import sys\nfrom wasidispatch.engines._wasmtime_cffi import FastWasmtime\n"
        "FastWasmtime()\nprint('wasmtime' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "False"


def test_probe_module_is_the_documented_wat() -> None:
    wat = (
        '(module (func (export "p") (result i64 i64 i32)'
        " i64.const 0x1122334455667788 i64.const -2 i32.const 7))"
    )
    assert _lib.probe_module() == wasmtime.wat2wasm(wat)


def test_declared_sizes_match_wasmtime_py_50_and_the_pinned_table() -> None:
    import ctypes

    from wasmtime import _bindings

    loaded = _lib.load()
    assert loaded.version.startswith(f"{_lib.SUPPORTED_MAJOR}.")
    expected = _lib.EXPECTED_SIZES[_lib.SUPPORTED_MAJOR]
    assert expected["wasmtime_val_t"] == 32
    assert expected["wasmtime_extern_t"] == 32
    for name, size in expected.items():
        assert loaded.ffi.sizeof(name) == size, name
        assert ctypes.sizeof(getattr(_bindings, name)) == size, name


def test_version_mismatch_is_refused_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    real_so, _ = _lib.installed_wasmtime()
    monkeypatch.setattr(_lib, "_loaded", None)
    monkeypatch.setattr(_lib, "installed_wasmtime", lambda: (real_so, "51.0.0"))
    with pytest.raises(EngineUnavailable, match=r"built for wasmtime 50\.x, found 51\.0\.0"):
        _lib.load()
    with pytest.raises(EngineUnavailable):
        FastWasmtime()
    with pytest.raises(EngineUnavailable):
        engines.get("wasmtime-fast", pooling=True)
    assert _lib._loaded is None  # nothing half-loaded is kept


def test_size_mismatch_is_refused_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lib, "_loaded", None)
    sizes = dict(_lib.EXPECTED_SIZES[_lib.SUPPORTED_MAJOR], wasmtime_val_t=24)
    monkeypatch.setitem(_lib.EXPECTED_SIZES, _lib.SUPPORTED_MAJOR, sizes)
    with pytest.raises(EngineUnavailable, match="wasmtime_val_t: declared 32, expected 24"):
        _lib.load()


@pytest.mark.parametrize("version", ["49.0.2", "50", "garbage"])
def test_unsupported_version_strings(version: str) -> None:
    with pytest.raises(EngineUnavailable):
        _lib.check_version(version)


def test_abi_probe_catches_a_wrong_layout() -> None:
    """A cdef with the pre-GC 16-byte value union (as older headers have) must fail the
    probe, which reads only inside buffers it allocated large enough."""
    import cffi

    old_union = _build.CDEF
    for ref in ("anyref", "externref", "exnref"):
        old_union = old_union.replace(
            f"typedef struct wasmtime_{ref} {{\n"
            "    uint64_t store_id; uint32_t __private1; uint32_t __private2; void *__private3;\n"
            f"}} wasmtime_{ref}_t;",
            f"typedef struct wasmtime_{ref} {{ uint64_t store_id; uint32_t __private1; "
            f"uint32_t __private2; }} wasmtime_{ref}_t;",
        )
    assert old_union != _build.CDEF
    ffi = cffi.FFI()
    ffi.cdef(old_union)
    assert ffi.sizeof("wasmtime_val_t") == 24
    lib = ffi.dlopen(str(_lib.installed_wasmtime()[0]))
    with pytest.raises(EngineUnavailable, match="wasmtime_val_t layout"):
        _lib._probe_abi(ffi, lib)


# -- calls -------------------------------------------------------------------------------------


def test_call_returns_values(calc: PreparedModule) -> None:
    assert calc.call("add", 2, 40) == CallResult((42,))
    assert calc.call("add", -5, 3).value == -2
    assert calc.call("add", 2**31 - 1, 1).value == -(2**31)  # i32 wraps
    values = calc.call("mix", 2**40, 1.5, 2.25).values
    assert values == (2.25, 2**40, 1.5)
    assert calc.call("sum17", *range(17)).value == sum(range(17))
    assert calc.call("boom").values == ()


def test_functions_describe_signatures(calc: PreparedModule) -> None:
    assert calc.functions["add"] == "(i32, i32) -> (i32)"
    assert calc.functions["mix"] == "(i64, f32, f64) -> (f64, i64, f32)"
    assert calc.functions["ref"] == "unsupported"


def test_traps_are_results(calc: PreparedModule) -> None:
    result = calc.call("boom")
    assert (result.exit_code, result.reason) == (137, ExitReason.TRAPPED)
    assert "unreachable" in (result.message or "")
    assert not result.ok
    with pytest.raises(EngineError, match="did not return"):
        _ = result.value
    div = calc.call("div", 1, 0)
    assert div.reason is ExitReason.TRAPPED
    assert "divide by zero" in (div.message or "")
    assert calc.call("div", 7, 2).value == 3  # the next call gets a fresh instance


def test_exits_are_results(calc: PreparedModule) -> None:
    assert calc.call("quit", 3) == CallResult((), 3, ExitReason.EXITED, None)
    assert calc.call("quit", 0).ok


def test_limits_on_calls(fast: FastWasmtime, calc: PreparedModule) -> None:
    spun = calc.call("spin", limits=Limits(timeout=0.05))
    assert (spun.exit_code, spun.reason) == (137, ExitReason.TIMED_OUT)
    assert calc.call("grow", 1, limits=Limits(memory_bytes=2 * 65536)).value == 1
    assert calc.call("grow", 2, limits=Limits(memory_bytes=2 * 65536)).value == -1
    with pytest.raises(CantHandle, match="consume_fuel"):
        calc.call("spin", limits=Limits(fuel=10))


def test_fuel_on_a_fuel_engine(calc_wasm: bytes) -> None:
    prepared = FastWasmtime(consume_fuel=True).prepare(calc_wasm)
    spun = prepared.call("spin", limits=Limits(fuel=10_000))
    assert (spun.exit_code, spun.reason) == (137, ExitReason.OUT_OF_FUEL)
    assert prepared.call("add", 1, 2).value == 3  # no fuel limit: unlimited


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("nope", (), "exports no function 'nope'"),
        ("add", (1,), "takes 2 arguments, got 1"),
        ("add", (1, 2, 3), "takes 2 arguments, got 3"),
        ("add", (1, "2"), "bad argument"),
        ("add", (1, 2.5), "bad argument"),
        ("add", (1, 2**40), "bad argument"),
        ("ref", (), "converts i32, i64, f32 and f64 values only"),
    ],
)
def test_bad_calls_raise_typed_errors(
    calc: PreparedModule, name: str, args: tuple[Any, ...], match: str
) -> None:
    with pytest.raises(EngineError, match=match):
        calc.call(name, *args)


def test_prepare_refuses_bad_input(fast: FastWasmtime) -> None:
    with pytest.raises(CompileError):
        fast.prepare(b"\0asm\x01\0\0\0\x99garbage")
    with pytest.raises(CompileError):
        fast.prepare(b"not wasm at all")
    with pytest.raises(CantHandle, match="core modules only"):
        fast.prepare(build_wat("component_hello"))
    with pytest.raises(CantHandle, match="cannot link"):
        fast.prepare(build_wat("exit42"), wasi=False)  # imports WASI, linked without it
    with pytest.raises(EngineError, match="exactly one"):
        fast.prepare()


def test_bad_engine_settings_are_refused_before_wasmtime_sees_them() -> None:
    for stack in (0, 4 << 20, -1):
        with pytest.raises(EngineError, match="max_wasm_stack"):
            FastWasmtime(max_wasm_stack=stack)
    with pytest.raises(EngineError, match="pool_size"):
        FastWasmtime(pooling=True, pool_size=0)


def test_precompiled_round_trip(fast: FastWasmtime, calc_wasm: bytes, tmp_path: Path) -> None:
    artifact = fast.precompile(calc_wasm)
    assert fast.prepare(precompiled=artifact).call("add", 1, 1).value == 2
    path = tmp_path / "calc.cwasm"
    path.write_bytes(fast.prepare(calc_wasm).serialize())
    assert fast.prepare(precompiled=path).call("add", 2, 2).value == 4
    other = FastWasmtime(pooling=not fast.config.pooling, pool_size=8)
    assert other.fingerprint() != fast.fingerprint()
    with pytest.raises(IncompatibleArtifact):
        other.prepare(precompiled=artifact)
    with pytest.raises(IncompatibleArtifact):
        fast.prepare(precompiled=artifact[:-1] + bytes([artifact[-1] ^ 1]))


# -- WASI per request -------------------------------------------------------------------------


def test_run_wasi_stdio_argv_env(fast: FastWasmtime, tmp_path: Path) -> None:
    cat = fast.prepare(build_c("cat"))
    result = cat.run_wasi(
        stdin=Stdio.from_bytes(b"abc\0def"), stdout=Stdio.capture(), stderr=Stdio.capture()
    )
    assert (result.ok, result.stdout, result.stderr) == (True, b"abc\0def", b"7 bytes\n")
    out = tmp_path / "out.txt"
    cat.run_wasi(stdin=Stdio.from_bytes(b"to a file"), stdout=Stdio.file(out))
    assert out.read_bytes() == b"to a file"
    empty = cat.run_wasi(stdout=Stdio.capture(), stderr=Stdio.null())  # stdin defaults to empty
    assert (empty.stdout, empty.stderr) == (b"", None)

    args = fast.prepare(build_c("args")).run_wasi(
        argv=("a.wasm", "x y", ""), stdout=Stdio.capture()
    )
    assert args.stdout == b"3\na.wasm\nx y\n\n"
    env = fast.prepare(build_c("env")).run_wasi(env={"ONLY": "this"}, stdout=Stdio.capture())
    assert env.stdout == b"ONLY=this\n"


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "callback"])
def test_capture_is_per_run(
    fast: FastWasmtime, monkeypatch: pytest.MonkeyPatch, memfd: bool
) -> None:
    from wasidispatch.engines._wasmtime_cffi import _fast

    if not memfd:  # where memfds or /proc are missing: wasmtime's output callback
        monkeypatch.setattr(_fast, "_capture_files", lambda: None)
    cat = fast.prepare(build_c("cat"))

    def run(data: bytes) -> tuple[bytes | None, bytes | None]:
        result = cat.run_wasi(
            stdin=Stdio.from_bytes(data), stdout=Stdio.capture(), stderr=Stdio.capture()
        )
        return result.stdout, result.stderr

    big = bytes(range(256)) * 8192  # 2 MiB
    assert run(big) == (big, b"2097152 bytes\n")
    assert run(b"x") == (b"x", b"1 bytes\n")  # nothing left over from the bigger run
    assert run(b"") == (b"", b"0 bytes\n")

    results: dict[int, tuple[bytes | None, bytes | None]] = {}

    def worker(i: int) -> None:
        for _ in range(50):
            results[i] = run(str(i).encode() * (i + 1))
            assert results[i][0] == str(i).encode() * (i + 1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: out for i, (out, _) in results.items()} == {
        i: str(i).encode() * (i + 1) for i in range(4)
    }


def test_forked_child_captures_into_its_own_files(fast: FastWasmtime) -> None:
    from wasidispatch.engines._wasmtime_cffi import _fast

    cat = fast.prepare(build_c("cat"))

    def run(data: bytes) -> bytes | None:
        return cat.run_wasi(stdin=Stdio.from_bytes(data), stdout=Stdio.capture()).stdout

    assert run(b"parent") == b"parent"
    parent_fds = dict(_fast._capture_local.files.fds)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        status = 1
        try:
            out = run(b"child")
            own = _fast._capture_local.files.pid == os.getpid()
            os.write(write_end, (out or b"") + (b" own" if own else b" shared"))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_says = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_says == b"child own"
    assert run(b"parent again") == b"parent again"
    assert _fast._capture_local.files.fds == parent_fds


def test_run_wasi_exit_trap_entry(fast: FastWasmtime) -> None:
    assert fast.prepare(build_wat("exit42")).run_wasi().exit_code == 42
    trapped = fast.prepare(build_c("trap")).run_wasi()
    assert (trapped.exit_code, trapped.reason) == (137, ExitReason.TRAPPED)
    library = fast.prepare(build_wat("no_start"))
    with pytest.raises(CantHandle, match="_start"):
        library.run_wasi()
    assert library.run_wasi(entry="answer").exit_code == 7
    with pytest.raises(EngineError, match="wasi=False"):
        fast.prepare(wasmtime.wat2wasm("(module)"), wasi=False).run_wasi()


def test_run_wasi_readonly_preopen(fast: FastWasmtime, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("data")
    files = fast.prepare(build_c("files"))
    ro = (Preopen(tmp_path, "/d", readonly=True),)
    read = files.run_wasi(argv=("f", "read", "/d/in.txt"), preopens=ro, stdout=Stdio.capture())
    assert (read.exit_code, read.stdout) == (0, b"data")
    denied = files.run_wasi(
        argv=("f", "write", "/d/new.txt", "x"), preopens=ro, stderr=Stdio.capture()
    )
    assert denied.exit_code == 1
    assert b"error:" in (denied.stderr or b"")
    assert not (tmp_path / "new.txt").exists()
    rw = (Preopen(tmp_path, "/d"),)
    assert files.run_wasi(argv=("f", "write", "/d/new.txt", "x"), preopens=rw).exit_code == 0
    assert (tmp_path / "new.txt").read_text() == "x"
    with pytest.raises(EngineError, match="does not exist"):
        files.run_wasi(preopens=(Preopen(tmp_path / "missing", "/m"),))
    with pytest.raises(EngineError, match="NUL"):
        files.run_wasi(argv=("f", "a\0b"))
    with pytest.raises(EngineError, match="without '='"):
        files.run_wasi(argv=("f",), env={"A=B": "c"})


# -- ownership: nothing public can reach a store-bound handle ---------------------------------


def _public_values(obj: object) -> list[object]:
    values: list[object] = []
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except EngineError:
            continue
        if not callable(value):
            values.append(value)
    return values


def test_no_public_object_holds_a_native_handle(fast: FastWasmtime, calc: PreparedModule) -> None:
    ffi = _lib.load().ffi
    calls = [calc.call("add", 1, 2), calc.call("boom"), calc.call("quit", 1)]
    run = fast.prepare(build_c("hello")).run_wasi(stdout=Stdio.capture())
    seen: list[object] = []
    for obj in (fast, calc, run, *calls):
        seen.extend(_public_values(obj))
    for call in calls:
        seen.extend(call)
    assert seen
    for value in seen:
        assert not isinstance(value, ffi.CData), value
        if isinstance(value, tuple | list):
            assert not any(isinstance(v, ffi.CData) for v in value)


STALE_ATTEMPTS = textwrap.dedent(
    """
    import gc, threading, wasmtime
    from wasidispatch.engines._wasmtime_cffi import FastWasmtime
    from wasidispatch.errors import EngineError

    wasm = wasmtime.wat2wasm('''(module
      (func (export "ref") (result funcref) ref.func $id)
      (func $id (export "id") (param i32) (result i32) local.get 0)
      (elem declare func $id))''')
    for pooling in (False, True):
        fast = FastWasmtime(pooling=pooling, pool_size=16)
        prepared = fast.prepare(wasm, wasi=False)
        # 1. a funcref result would be a handle into the (already deleted) store
        try:
            prepared.call("ref")
            raise SystemExit("a funcref escaped")
        except EngineError:
            pass
        # 2. the engine object goes away; the prepared module keeps what it needs
        del fast
        gc.collect()
        assert prepared.call("id", 5).value == 5
        # 3. results are plain numbers, never live objects
        result = prepared.call("id", 6)
        assert type(result.values[0]) is int
        # 4. close while other threads call: each call succeeds or raises EngineError
        errors = []
        warm = threading.Barrier(5)
        def hammer():
            for i in range(200):
                assert prepared.call("id", i).value == i
            warm.wait()
            for i in range(2000):
                try:
                    assert prepared.call("id", i).value == i
                except EngineError:
                    pass
                except BaseException as exc:
                    errors.append(exc)
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        warm.wait()  # every thread is calling when the module is closed
        prepared.close()
        prepared.close()  # idempotent
        for t in threads:
            t.join()
        assert not errors, errors
        # 5. after close: a typed error, not a use-after-free
        for attempt in (lambda: prepared.call("id", 1), prepared.serialize, prepared.run_wasi):
            try:
                attempt()
                raise SystemExit("a closed module ran")
            except EngineError:
                pass
    print("survived")
    """
)


def test_stale_handles_cannot_be_reached_through_the_public_api() -> None:
    # In a child process: a stale handle would make wasmtime abort (SIGABRT) the process.
    proc = subprocess.run(
        [sys.executable, "-c", STALE_ATTEMPTS], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "survived"


# -- threads and leaks -------------------------------------------------------------------------


def test_eight_threads_ten_thousand_calls_each(fast: FastWasmtime, calc: PreparedModule) -> None:
    failures: list[tuple[int, int, object]] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(10_000):
            result = calc.call("add", i, t * 1_000_000)
            if result.values != (i + t * 1_000_000,):
                failures.append((t, i, result))
                return

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_no_leak_over_200k_instantiations(fast: FastWasmtime, calc: PreparedModule) -> None:
    def batch(n: int) -> None:
        for i in range(n):
            if i % 50 == 0:  # traps and exits allocate errors, traps and messages
                assert calc.call("boom").reason is ExitReason.TRAPPED
                assert calc.call("quit", 2).exit_code == 2
            else:
                assert calc.call("add", i, 1).values == (i + 1,)

    batch(10_000)
    gc.collect()
    after_10k = _rss()
    batch(190_000)
    gc.collect()
    growth = _rss() - after_10k
    assert growth < 4 << 20, f"RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.slow
def test_no_leak_over_wasi_runs(fast: FastWasmtime) -> None:
    cat = fast.prepare(build_c("cat"))

    def batch(n: int) -> None:
        for _ in range(n):
            result = cat.run_wasi(
                argv=("cat",),
                env={"K": "V"},
                stdin=Stdio.from_bytes(b"x" * 100),
                stdout=Stdio.capture(),
                stderr=Stdio.null(),
            )
            assert result.stdout == b"x" * 100

    batch(2_000)
    gc.collect()
    after = _rss()
    batch(20_000)
    gc.collect()
    growth = _rss() - after
    assert growth < 4 << 20, f"RSS grew by {growth / 2**20:.1f} MiB"


# -- the engine adapter ------------------------------------------------------------------------


def test_registry_name_points_here() -> None:
    engine = engines.get("wasmtime-fast")
    assert isinstance(engine, FastWasmtimeEngine)
    assert engine.name == "wasmtime-fast"
    assert engine.capabilities.fast_instantiate
    assert not engine.capabilities.components


def test_engine_refuses_components_and_explains() -> None:
    engine = FastWasmtimeEngine()
    workload = Workload(wasm=build_wat("component_hello"), stdin=Stdio.null())
    verdict = engine.can_handle(workload)
    assert not verdict
    assert "'wasmtime' engine" in verdict.reason
    with pytest.raises(CantHandle, match="core modules only"):
        engine.run(workload)
    with pytest.raises(CantHandle):
        engine.precompile(build_wat("component_hello").read_bytes())


def test_engine_fingerprint_covers_pooling() -> None:
    plain, pooled = FastWasmtimeEngine(), FastWasmtimeEngine(pooling=True, pool_size=8)
    assert plain.fingerprint() != pooled.fingerprint()
    assert len(plain.fingerprint()) == 64
    assert plain.version() == pooled.version() == _lib.load().version
    wasm = build_c("hello").read_bytes()
    with pytest.raises(IncompatibleArtifact):
        pooled.run(Workload(wasm=wasm, precompiled=plain.precompile(wasm)))
    result = pooled.run(
        Workload(wasm=wasm, precompiled=pooled.precompile(wasm), stdout=Stdio.capture())
    )
    assert result.stdout == b"hello from wasi\n"


def test_engine_reuses_prepared_modules() -> None:
    engine = FastWasmtimeEngine(cache_size=2)
    hello = build_c("hello")
    first = engine.run(Workload(wasm=hello, stdout=Stdio.capture()))
    second = engine.run(Workload(wasm=hello, stdout=Stdio.capture()))
    assert first.stdout == second.stdout == b"hello from wasi\n"
    assert len(engine._prepared) == 1
    for name in ("args", "env", "cat"):
        engine.run(Workload(wasm=build_c(name), stdin=Stdio.null(), stdout=Stdio.null()))
    assert len(engine._prepared) == 2  # bounded


# -- precompiled artifact files -----------------------------------------------------------------


def test_c_api_deserialize_file_ignores_bytes_after_the_artifact(
    fast: FastWasmtime, calc_wasm: bytes, tmp_path: Path
) -> None:
    # What the envelope trailer relies on, for the C API the fast path maps files with.
    loaded = _lib.load()
    engine = fast._engine
    payload = _native.serialize_module(loaded, _native.compile_module(loaded, engine, calc_wasm))
    path = tmp_path / "calc.bin"
    path.write_bytes(payload + os.urandom(4096))
    assert _native.deserialize_module_file(loaded, engine, str(path)) is not None
    path.write_bytes(payload[:-64] + os.urandom(4096))  # the artifact itself cut short
    with pytest.raises(IncompatibleArtifact):
        _native.deserialize_module_file(loaded, engine, str(path))


def test_prepare_from_a_file_maps_it_and_refuses_bad_files(
    fast: FastWasmtime, calc_wasm: bytes, tmp_path: Path
) -> None:
    from wasidispatch.engines._support import TRAILER_SIZE

    artifact = fast.precompile(calc_wasm)
    path = tmp_path / "calc.art"
    path.write_bytes(artifact)
    assert fast.prepare(precompiled=path).call("add", 20, 22).value == 42
    native = artifact[:-TRAILER_SIZE]
    other = FastWasmtime(pooling=not fast.config.pooling, pool_size=8)
    cases = {
        "truncated": artifact[: len(artifact) // 2],
        "payload cut, trailer kept": native[:-100] + artifact[-TRAILER_SIZE:],
        "padded before the trailer": native + b"\0" * 16 + artifact[-TRAILER_SIZE:],
        "shorter than a trailer": artifact[:50],
        "bare wasmtime artifact": native,
        "old format": b"WDPCA\x01" + fast.fingerprint().encode() + b"m" + b"\0" * 32 + native,
        "another configuration": other.precompile(calc_wasm),
        "another engine": WasmtimeEngine().precompile(calc_wasm),
    }
    accepted = []
    for what, data in cases.items():
        bad = tmp_path / f"{what}.art"
        bad.write_bytes(data)
        try:
            fast.prepare(precompiled=bad)
        except IncompatibleArtifact:
            continue
        accepted.append(what)
    assert accepted == []
    with pytest.raises(IncompatibleArtifact, match="cannot read"):
        fast.prepare(precompiled=tmp_path / "missing.art")


def test_engine_keys_artifact_files_by_their_recorded_digest(tmp_path: Path) -> None:
    # Two copies of one artifact share one prepared module, found without hashing the file;
    # bytes of the same artifact (verified in full) find it too.
    engine = FastWasmtimeEngine()
    wasm = build_c("hello").read_bytes()
    artifact = engine.precompile(wasm)
    outputs = []
    for name in ("a.art", "b.art"):
        path = tmp_path / name
        path.write_bytes(artifact)
        outputs.append(
            engine.run(Workload(wasm=wasm, precompiled=path, stdout=Stdio.capture())).stdout
        )
    outputs.append(
        engine.run(Workload(wasm=wasm, precompiled=artifact, stdout=Stdio.capture())).stdout
    )
    assert outputs == [b"hello from wasi\n"] * 3
    assert len(engine._prepared) == 1
    (tmp_path / "a.art").write_bytes(artifact[:-1])  # a bad file is refused before the lookup
    with pytest.raises(IncompatibleArtifact):
        engine.run(Workload(wasm=wasm, precompiled=tmp_path / "a.art"))

"""Engines side by side: compile, precompile+load, and a full WASI hello run.

Run: ``.venv/bin/python -m pytest benchmarks/bench_engines.py --benchmark-only``. Every
installed engine of the registry runs in the same session, one benchmark group per measure:

* ``precompile:<size>``: `Engine.precompile` (compile + serialize + envelope) of a small
  module (the C ``hello`` guest, ~90 KB) and of a generated >= 1 MB module; engines without
  precompilation are absent from the group;
* ``load:<size>``: `Engine.run` from the precompiled artifact (verify + deserialize +
  instantiate + ``_start``, which returns at once);
* ``cold-run:<size>``: `Engine.run` of the Wasm on an engine with nothing cached (compile
  included; wasmer-sdk compiles inside its run);
* ``hello``: a full WASI run of the WAT hello guest with stdout captured, on an engine that
  has run it before (each run a fresh store/instance, or a fresh sandbox for Wasmer);
* ``hello-raw``: the floor, wasmtime-py by hand: `InstancePre.instantiate` + ``_start`` with
  a new `Store`/`WasiConfig` each time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import wasmtime
from pytest_benchmark.fixture import BenchmarkFixture

from tests.guests import build_c, guest_bytes
from wasidispatch import engines
from wasidispatch.engines import Engine, Stdio, Workload

INSTALLED = [i.name for i in engines.available() if i.installed]


def _large_module() -> bytes:
    # ~1.07 MB of code: many functions of straight-line arithmetic, and a `_start` that
    # returns at once (so "load" measures loading, not running).
    funcs = []
    body = " ".join(
        f"(local.set $x (i32.add (i32.mul (local.get $x) (i32.const {i})) (i32.const {i * 7})))"
        for i in range(1, 60)
    )
    for n in range(1600):
        funcs.append(
            f'(func $f{n} (export "f{n}") (param $x i32) (result i32) {body} (local.get $x))'
        )
    wat = '(module (memory (export "memory") 1) ' + " ".join(funcs) + ' (func (export "_start")))'
    return bytes(wasmtime.wat2wasm(wat))


LARGE = _large_module()
assert len(LARGE) >= 1_000_000, len(LARGE)
SMALL = build_c("hello").read_bytes()
SIZES = {"small": SMALL, "large": LARGE}


def _workload(wasm: bytes, **kw: object) -> Workload:
    return Workload(
        wasm=wasm,
        argv=("guest",),
        stdin=Stdio.null(),
        stdout=Stdio.capture(),
        **kw,  # type: ignore[arg-type]
    )


def _fresh(name: str) -> Engine:
    # A new instance with default options: nothing compiled or cached yet.
    fresh: Engine = type(engines.get(name))()
    return fresh


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", INSTALLED)
def test_precompile(benchmark: BenchmarkFixture, name: str, size: str) -> None:
    engine = engines.get(name)
    if not engine.capabilities.precompile:
        pytest.skip(f"{name} has no precompilation")
    benchmark.group = f"precompile:{size}"
    artifact = benchmark(engine.precompile, SIZES[size])
    assert artifact


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", INSTALLED)
def test_load(benchmark: BenchmarkFixture, name: str, size: str) -> None:
    engine = engines.get(name)
    if not engine.capabilities.precompile:
        pytest.skip(f"{name} has no precompilation")
    benchmark.group = f"load:{size}"
    artifact = engine.precompile(SIZES[size])
    workload = _workload(SIZES[size], precompiled=artifact)
    result = benchmark(engine.run, workload)
    assert result.ok


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", INSTALLED)
def test_cold_run(benchmark: BenchmarkFixture, name: str, size: str) -> None:
    benchmark.group = f"cold-run:{size}"
    workload = _workload(SIZES[size])

    def setup() -> tuple[tuple[Engine, Workload], dict[str, object]]:
        return (_fresh(name), workload), {}

    def cold(engine: Engine, w: Workload) -> bool:
        ok = engine.run(w).ok
        close: Callable[[], None] | None = getattr(engine, "close", None)
        if close is not None:
            close()
        return ok

    rounds = 8 if size == "large" else 15
    assert benchmark.pedantic(cold, setup=setup, rounds=rounds)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("name", INSTALLED)
def test_hello(benchmark: BenchmarkFixture, name: str) -> None:
    engine = engines.get(name)
    benchmark.group = "hello"
    workload = _workload(guest_bytes("wat", "hello"))
    engine.run(workload)  # warm: compiled, loop started
    result = benchmark(engine.run, workload)
    assert result.stdout == b"hello from wat\n"


def test_hello_raw_wasmtime_py(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "hello"
    eng = wasmtime.Engine()
    linker = wasmtime.Linker(eng)
    linker.define_wasi()
    pre = linker.instantiate_pre(wasmtime.Module(eng, guest_bytes("wat", "hello")))

    def once() -> bytes:
        out = bytearray()
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["guest"]
        wasi.stdout_custom = out.extend
        store = wasmtime.Store(eng)
        store.set_wasi(wasi)
        start = pre.instantiate(store).exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        return bytes(out)

    assert benchmark(once) == b"hello from wat\n"


def test_large_module_is_large() -> None:
    assert len(LARGE) >= 1_000_000
    assert Path(build_c("hello")).stat().st_size < 200_000

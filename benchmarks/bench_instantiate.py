"""Instantiate-per-request: wasmtime-py against the cffi fast path, in one run.

Run: ``.venv/bin/python -m pytest benchmarks/bench_instantiate.py --benchmark-only``.
Every round makes a fresh store and instance and drops it (what a server isolating each
request does). Groups:

* ``add``: instantiate ``(func (export "add") (param i32 i32) (result i32))`` and call it
  (targets: fast path <= 10 us median and >= 7x wasmtime-py; pooling <= 6 us);
* ``add+memory``: the same module with a 1-page exported memory, as every compiled C/Rust
  module has (a linear memory is what the pooling allocator saves mapping per instance);
* ``wasi-hello``: a WASI command writing one line to a captured stdout (target <= 35 us and
  >= 2.5x wasmtime-py ``InstancePre``);
* ``engine-run``: ``Engine.run(Workload)`` of the same hello on the ``wasmtime`` and
  ``wasmtime-fast`` engines (argv, env, capture; the executor's view);
* ``import``: a fresh interpreter importing each binding, bytecode cached as for an
  installed package (``python -c pass`` is the floor, ``import wasidispatch.engines`` the
  parent package every engine pays for; target: the fast path's own import <= 10 ms).

Contenders: ``wasmtime-py Instance`` (``Store`` + ``Instance(store, module, [])`` or
``Linker.instantiate``), ``wasmtime-py InstancePre`` (``Linker.instantiate_pre`` once, then
``pre.instantiate(store)``), ``fast`` (`PreparedModule` on ``FastWasmtime()``: epoch
interruption on, as the engines use it) and ``fast pooling`` (``FastWasmtime(pooling=True)``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import wasmtime
from pytest_benchmark.fixture import BenchmarkFixture

from tests.guests import guest_bytes
from wasidispatch.engines import Stdio, Workload
from wasidispatch.engines._wasmtime_cffi import FastWasmtime, FastWasmtimeEngine
from wasidispatch.engines.wasmtime import WasmtimeEngine

ADD_WAT = """
(module
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))
"""
ADD_MEMORY_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))
"""

CONTENDERS = ["wasmtime-py Instance", "wasmtime-py InstancePre", "fast", "fast pooling"]

#: What the shared WAT hello guest (tests/guests/wat/hello.wat) prints.
HELLO_OUT = b"hello from wat\n"


def _add_request(wat: str, contender: str) -> Callable[[], object]:
    wasm = bytes(wasmtime.wat2wasm(wat))
    if contender.startswith("fast"):
        prepared = FastWasmtime(pooling=contender == "fast pooling").prepare(wasm, wasi=False)
        return lambda: prepared.call("add", 20, 22).values[0]
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, wasm)
    if contender == "wasmtime-py Instance":

        def fresh_instance() -> object:
            store = wasmtime.Store(engine)
            instance = wasmtime.Instance(store, module, [])
            add = instance.exports(store)["add"]
            assert isinstance(add, wasmtime.Func)
            return add(store, 20, 22)

        return fresh_instance
    pre = wasmtime.Linker(engine).instantiate_pre(module)

    def from_pre() -> object:
        store = wasmtime.Store(engine)
        add = pre.instantiate(store).exports(store)["add"]
        assert isinstance(add, wasmtime.Func)
        return add(store, 20, 22)

    return from_pre


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.benchmark(group="add")
def test_add(benchmark: BenchmarkFixture, contender: str) -> None:
    request = _add_request(ADD_WAT, contender)
    assert request() == 42
    assert benchmark(request) == 42


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.benchmark(group="add+memory")
def test_add_with_memory(benchmark: BenchmarkFixture, contender: str) -> None:
    request = _add_request(ADD_MEMORY_WAT, contender)
    assert request() == 42
    assert benchmark(request) == 42


def _hello_request(contender: str) -> Callable[[], bytes]:
    wasm = bytes(guest_bytes("wat", "hello"))
    if contender.startswith("fast"):
        prepared = FastWasmtime(pooling=contender == "fast pooling").prepare(wasm)
        capture = Stdio.capture()

        def fast_run() -> bytes:
            return prepared.run_wasi(argv=("hello",), stdout=capture).stdout or b""

        return fast_run
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, wasm)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    pre = linker.instantiate_pre(module) if contender == "wasmtime-py InstancePre" else None

    def py_run() -> bytes:
        out = bytearray()
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["hello"]
        wasi.stdout_custom = out.extend
        store = wasmtime.Store(engine)
        store.set_wasi(wasi)
        instance = pre.instantiate(store) if pre is not None else linker.instantiate(store, module)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        return bytes(out)

    return py_run


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.benchmark(group="wasi-hello")
def test_wasi_hello(benchmark: BenchmarkFixture, contender: str) -> None:
    request = _hello_request(contender)
    assert request() == HELLO_OUT
    assert benchmark(request) == HELLO_OUT


@pytest.mark.parametrize("name", ["wasmtime", "wasmtime-fast", "wasmtime-fast pooling"])
@pytest.mark.benchmark(group="engine-run")
def test_engine_run(benchmark: BenchmarkFixture, name: str) -> None:
    engine = (
        WasmtimeEngine()
        if name == "wasmtime"
        else FastWasmtimeEngine(pooling=name.endswith("pooling"))
    )
    workload = Workload(
        wasm=bytes(guest_bytes("wat", "hello")),
        argv=("hello",),
        env={"A": "1"},
        stdin=Stdio.null(),
        stdout=Stdio.capture(),
        stderr=Stdio.capture(),
    )
    assert engine.run(workload).stdout == HELLO_OUT
    result = benchmark(engine.run, workload)
    assert result.ok
    assert result.stdout == HELLO_OUT


IMPORTS = {
    "python -c pass": "pass",
    "import wasidispatch.engines": "import wasidispatch.engines",
    "import fast path": "import wasidispatch.engines._wasmtime_cffi._fast",
    "import fast path + FastWasmtime()": (
        "from wasidispatch.engines._wasmtime_cffi import FastWasmtime; FastWasmtime()"
    ),
    "import wasmtime": "import wasmtime",
    "import wasmtime + Engine()": "import wasmtime; wasmtime.Engine()",
}


@pytest.fixture(scope="module")
def bytecode_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of an installed package: bytecode cached (in a private directory,
    so the checkout stays clean) even where PYTHONDONTWRITEBYTECODE is set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))
    return env


@pytest.mark.parametrize("label", list(IMPORTS))
@pytest.mark.benchmark(group="import")
def test_import(benchmark: BenchmarkFixture, label: str, bytecode_env: dict[str, str]) -> None:
    argv = [sys.executable, "-c", IMPORTS[label]]

    def fresh_interpreter() -> int:
        return subprocess.run(argv, check=True, env=bytecode_env).returncode

    result = benchmark.pedantic(  # type: ignore[no-untyped-call]
        fresh_interpreter, rounds=20, warmup_rounds=2
    )
    assert result == 0

"""Precompile cache: cold compile vs cache hit, and what the cache adds over wasmtime's own load.

Run: ``.venv/bin/python -m pytest benchmarks/bench_cache.py --benchmark-only``. One group per
input, every contender in the same run:

* ``small``: a WASI hello module from WAT (~150 B);
* ``1mb``: a generated module of 1,400 functions (~1.3 MB of Wasm);
* ``18mb``: a Python component (~18 MB) built here by ``componentize-py`` from a 4-line app
  (skipped with a reason when ``componentize-py`` is not installed).

Contenders:

* ``compile``: ``wasmtime.Module(engine, wasm)`` (``Component`` for the component), the cold
  start the cache removes;
* ``deserialize_file``: wasmtime's own file-mapped load of the serialized artifact;
* ``hit+deserialize_file``: ``cache.artifact(engine, path, digest=...)`` then the same load of
  the path it returns: target <= 50 us over ``deserialize_file``, and >= 50x faster than
  ``compile`` for ``1mb``;
* ``hit``: the cache lookup alone (digest known, as for an OCI layer);
* ``hit, hash wasm``: the lookup when the caller does not know the digest (hashes the Wasm);
* ``with_precompiled, wasm path``: what an executor's warm run does for a bundle, a
  `Workload` whose ``wasm`` is a path and no digest (the file's digest is remembered per
  file identity, so only a ``stat`` is added over ``hit``);
* ``hit, new instance``: a fresh `PrecompileCache` each time (constructor with its directory
  checks included), so the artifact's sha256 is checked in full: the first hit of a process.

The engine of the groups above is a protocol-conforming wrapper of one ``wasmtime.Engine``
whose artifacts are wasmtime's raw ``serialize()`` output, so that the path the cache hands out
can go straight to ``deserialize_file``.

Groups ``cache <size> engines`` (small and 1mb) do the same through the real engines, whose
artifacts carry wasidispatch's envelope trailer; the ``deserialize_file`` rows are the floor,
wasmtime's own load of the same serialized module (the engine's configuration) from a plain
file:

* ``deserialize_file (wasmtime-py)``: ``Module.deserialize_file`` on `WasmtimeEngine`'s
  wasmtime engine;
* ``hit+WasmtimeEngine load``: ``cache.artifact`` then the engine's own loading of
  ``Workload(precompiled=path)`` (what `WasmtimeEngine.run` does before instantiating);
* ``deserialize_file (C API)``: ``wasmtime_module_deserialize_file`` through the cffi binding;
* ``hit+FastWasmtime load``: ``cache.artifact``, then the fast path's own loading of the path
  (trailer check, then the same C call on the checked descriptor), without `PreparedModule`;
* ``deserialize_file (C API)+prepare``: ``wasmtime_module_deserialize_file`` then
  `PreparedModule` (exports scanned, imports resolved, ``InstancePre``; for the 1mb module's
  1,400 exports this dominates);
* ``hit+FastWasmtime.prepare``: ``cache.artifact`` then
  ``FastWasmtime.prepare(precompiled=path)``, the load `FastWasmtimeEngine` does on a miss of
  its in-memory cache;
* ``hit+run WasmtimeEngine`` / ``hit+run FastWasmtimeEngine``: ``cache.artifact`` then a whole
  ``Engine.run`` (stdout captured). ``FastWasmtimeEngine`` keeps prepared modules in memory
  keyed by the artifact's sha256, so its steady state loads nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime
import wasmtime.component as wtc
from pytest_benchmark.fixture import BenchmarkFixture

from tests.guests import guest_bytes
from wasidispatch.cache import PrecompileCache
from wasidispatch.engines import Capabilities, Engine, Stdio, Workload
from wasidispatch.engines._wasmtime_cffi import FastWasmtimeEngine, PreparedModule
from wasidispatch.engines.wasmtime import WasmtimeEngine

#: What the shared WAT hello guest (tests/guests/wat/hello.wat) prints.
HELLO_OUT = b"hello from wat\n"


PY_APP = """\
import wit_world


class WitWorld(wit_world.WitWorld):
    def answer(self) -> int:
        return 42
"""

PY_WIT = """\
package local:bench;

world bench {
  export answer: func() -> u32;
}
"""


def big_module_wat(functions: int = 1400, steps: int = 40) -> str:
    """A module of ``functions`` exported functions, each a chain of integer arithmetic."""
    out = ['(module (func (export "_start"))']
    for i in range(functions):
        body = " ".join(
            f"(local.set $a (i32.add (i32.mul (local.get $a) (i32.const {(i * 31 + j) % 997 + 3}))"
            f" (i32.xor (local.get $b) (i32.const {i + j}))))"
            " (local.set $b (i32.rotl (local.get $b) (local.get $a)))"
            for j in range(steps)
        )
        out.append(
            f'(func (export "f{i}") (param $a i32) (param $b i32) (result i32) {body}'
            " (i32.add (local.get $a) (local.get $b)))"
        )
    out.append(")")
    return "\n".join(out)


class NativeWasmtime:
    """The cache's view of an engine, over one ``wasmtime.Engine``; raw serialized artifacts."""

    def __init__(self) -> None:
        from importlib.metadata import version

        self.engine = wasmtime.Engine()
        # computed once: the cache asks for it on every lookup
        self._fingerprint = f"wasmtime {version('wasmtime')} default-config"

    @property
    def name(self) -> str:
        return "wasmtime-native"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(components=True, precompile=True)

    def fingerprint(self) -> str:
        return self._fingerprint

    def compile(self, wasm: bytes) -> wasmtime.Module | wtc.Component:
        if wasm[4:8] == b"\x0d\x00\x01\x00":
            return wtc.Component(self.engine, wasm)
        return wasmtime.Module(self.engine, wasm)

    def precompile(self, wasm: bytes) -> bytes:
        return bytes(self.compile(wasm).serialize())

    def load(self, path: Path, component: bool) -> object:
        if component:
            return wtc.Component.deserialize_file(self.engine, str(path))
        return wasmtime.Module.deserialize_file(self.engine, str(path))


class Input:
    def __init__(self, path: Path, cache_dir: Path, native: NativeWasmtime) -> None:
        self.path = path
        self.wasm = path.read_bytes()
        self.digest = "sha256:" + hashlib.sha256(self.wasm).hexdigest()
        self.component = self.wasm[4:8] == b"\x0d\x00\x01\x00"
        self.cache_dir = cache_dir
        self.cache = PrecompileCache(cache_dir)
        art = self.cache.artifact(native, path, digest=self.digest)
        assert art is not None
        self.artifact = art
        # wasmtime's own load reads a copy outside the cache, the baseline
        self.raw = cache_dir.parent / f"{path.stem}.cwasm"
        shutil.copyfile(art.path, self.raw)


@pytest.fixture(scope="module")
def native() -> NativeWasmtime:
    return NativeWasmtime()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, native: NativeWasmtime) -> dict[str, Input]:
    root = tmp_path_factory.mktemp("bench-cache")
    made: dict[str, Input] = {}
    small = root / "small.wasm"
    small.write_bytes(guest_bytes("wat", "hello"))
    big = root / "big.wasm"
    big.write_bytes(wasmtime.wat2wasm(big_module_wat()))
    assert big.stat().st_size >= 1 << 20
    for name, path in (("small", small), ("1mb", big)):
        made[name] = Input(path, root / f"cache-{name}", native)
    tool = shutil.which("componentize-py") or str(Path(sys.executable).with_name("componentize-py"))
    if Path(tool).exists():
        app = root / "pyapp"
        (app / "wit").mkdir(parents=True)
        (app / "wit" / "bench.wit").write_text(PY_WIT)
        (app / "app.py").write_text(PY_APP)
        out = root / "pycomponent.wasm"
        subprocess.run(
            [tool, "-q", "-d", "wit", "-w", "bench", "componentize", "app", "-o", str(out)],
            cwd=app,
            check=True,
        )
        made["18mb"] = Input(out, root / "cache-18mb", native)
    return made


SIZES = ["small", "1mb", "18mb"]


def _input(inputs: dict[str, Input], size: str) -> Input:
    if size not in inputs:
        pytest.skip("componentize-py is not installed (pip install componentize-py)")
    return inputs[size]


@pytest.mark.parametrize("size", SIZES)
def test_compile(
    benchmark: BenchmarkFixture, inputs: dict[str, Input], native: NativeWasmtime, size: str
) -> None:
    item = _input(inputs, size)
    benchmark.group = f"cache {size}"
    benchmark.name = "compile"
    if size == "small":
        benchmark(native.compile, item.wasm)
    else:
        benchmark.pedantic(  # type: ignore[no-untyped-call]
            native.compile, args=(item.wasm,), rounds=3, iterations=1
        )


@pytest.mark.parametrize("size", SIZES)
def test_deserialize_file(
    benchmark: BenchmarkFixture, inputs: dict[str, Input], native: NativeWasmtime, size: str
) -> None:
    item = _input(inputs, size)
    benchmark.group = f"cache {size}"
    benchmark.name = "deserialize_file"
    benchmark(native.load, item.raw, item.component)


@pytest.mark.parametrize("size", SIZES)
def test_hit_and_deserialize_file(
    benchmark: BenchmarkFixture, inputs: dict[str, Input], native: NativeWasmtime, size: str
) -> None:
    item = _input(inputs, size)
    benchmark.group = f"cache {size}"
    benchmark.name = "hit+deserialize_file"

    def load() -> object:
        art = item.cache.artifact(native, item.path, digest=item.digest)
        assert art is not None
        return native.load(art.path, item.component)

    benchmark(load)


@pytest.mark.parametrize("size", SIZES)
def test_hit(
    benchmark: BenchmarkFixture, inputs: dict[str, Input], native: NativeWasmtime, size: str
) -> None:
    item = _input(inputs, size)
    benchmark.group = f"cache {size}"
    benchmark.name = "hit"
    art = benchmark(item.cache.artifact, native, item.path, digest=item.digest)
    assert art is not None
    assert art.hit


@pytest.mark.parametrize("size", SIZES)
def test_hit_hashing_the_wasm(
    benchmark: BenchmarkFixture, inputs: dict[str, Input], native: NativeWasmtime, size: str
) -> None:
    item = _input(inputs, size)
    benchmark.group = f"cache {size}"
    benchmark.name = "hit, hash wasm"
    art = benchmark(item.cache.artifact, native, item.wasm)
    assert art is not None
    assert art.hit


@pytest.mark.parametrize("size", SIZES)
def test_warm_with_precompiled_on_a_path(
    benchmark: BenchmarkFixture, inputs: dict[str, Input], native: NativeWasmtime, size: str
) -> None:
    item = _input(inputs, size)
    benchmark.group = f"cache {size}"
    benchmark.name = "with_precompiled, wasm path"
    workload = Workload(wasm=item.path, argv=("bench",))
    got = benchmark(item.cache.with_precompiled, native, workload)
    assert got.precompiled is not None


@pytest.mark.parametrize("size", SIZES)
def test_hit_in_a_new_instance(
    benchmark: BenchmarkFixture, inputs: dict[str, Input], native: NativeWasmtime, size: str
) -> None:
    item = _input(inputs, size)
    benchmark.group = f"cache {size}"
    benchmark.name = "hit, new instance"

    keep: list[PrecompileCache] = []  # freed after the run: their counter flush is not timed

    def first_hit() -> bool:
        cache = PrecompileCache(item.cache_dir)
        keep.append(cache)
        art = cache.artifact(native, item.path, digest=item.digest)
        assert art is not None
        return art.hit

    assert benchmark(first_hit)


# -- the real engines ---------------------------------------------------------------------------


class EngineInput:
    """One input cached for one real engine, plus the bare serialized module as the floor."""

    def __init__(self, path: Path, root: Path, engine: Engine) -> None:
        self.path = path
        wasm = path.read_bytes()
        self.digest = "sha256:" + hashlib.sha256(wasm).hexdigest()
        self.engine = engine
        self.cache = PrecompileCache(root / f"cache-{engine.name}-{path.stem}")
        art = self.cache.artifact(engine, path, digest=self.digest)
        assert art is not None
        self.workload = Workload(wasm=path, argv=("app",), stdout=Stdio.capture())
        self.raw = root / f"{engine.name}-{path.stem}.cwasm"  # the floor's plain file
        if isinstance(engine, WasmtimeEngine):
            self.raw.write_bytes(bytes(wasmtime.Module(_wasmtime_of(engine), wasm).serialize()))
        else:
            assert isinstance(engine, FastWasmtimeEngine)
            from wasidispatch.engines._wasmtime_cffi import _native

            fast = engine._fast((False, None))
            module = _native.compile_module(fast._loaded, fast._engine, wasm)
            self.raw.write_bytes(_native.serialize_module(fast._loaded, module))

    def hit(self) -> Path:
        art = self.cache.artifact(self.engine, self.path, digest=self.digest)
        assert art is not None
        return art.path


def _wasmtime_of(engine: WasmtimeEngine) -> wasmtime.Engine:
    from wasidispatch.engines.wasmtime import _Profile

    return engine._runtime(_Profile()).engine


@pytest.fixture(scope="module")
def engine_inputs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], EngineInput]:
    root = tmp_path_factory.mktemp("bench-cache-engines")
    small = root / "small.wasm"
    small.write_bytes(guest_bytes("wat", "hello"))
    big = root / "big.wasm"
    big.write_bytes(wasmtime.wat2wasm(big_module_wat()))
    made: dict[tuple[str, str], EngineInput] = {}
    for engine in (WasmtimeEngine(), FastWasmtimeEngine()):
        for size, path in (("small", small), ("1mb", big)):
            made[engine.name, size] = EngineInput(path, root, engine)
    return made


ENGINE_SIZES = ["small", "1mb"]


@pytest.mark.parametrize("size", ENGINE_SIZES)
def test_engine_deserialize_file_wasmtime_py(
    benchmark: BenchmarkFixture, engine_inputs: dict[tuple[str, str], EngineInput], size: str
) -> None:
    item = engine_inputs["wasmtime", size]
    assert isinstance(item.engine, WasmtimeEngine)
    engine = _wasmtime_of(item.engine)
    benchmark.group = f"cache {size} engines"
    benchmark.name = "deserialize_file (wasmtime-py)"
    benchmark(wasmtime.Module.deserialize_file, engine, str(item.raw))


@pytest.mark.parametrize("size", ENGINE_SIZES)
def test_engine_hit_and_wasmtime_load(
    benchmark: BenchmarkFixture, engine_inputs: dict[tuple[str, str], EngineInput], size: str
) -> None:
    from wasidispatch.engines.wasmtime import _Profile

    item = engine_inputs["wasmtime", size]
    engine = item.engine
    assert isinstance(engine, WasmtimeEngine)
    runtime = engine._runtime(_Profile())
    benchmark.group = f"cache {size} engines"
    benchmark.name = "hit+WasmtimeEngine load"

    def load() -> object:
        workload = Workload(wasm=item.path, precompiled=item.hit())
        return engine._load(runtime, _Profile(), workload)

    kind, _ = benchmark(load)
    assert kind == "module"


@pytest.mark.parametrize("prepare", [True, False], ids=["prepare", "alone"])
@pytest.mark.parametrize("size", ENGINE_SIZES)
def test_engine_deserialize_file_c_api(
    benchmark: BenchmarkFixture,
    engine_inputs: dict[tuple[str, str], EngineInput],
    size: str,
    prepare: bool,
) -> None:
    item = engine_inputs["wasmtime-fast", size]
    assert isinstance(item.engine, FastWasmtimeEngine)
    fast = item.engine._fast((False, None))
    ffi, lib = fast._loaded.ffi, fast._loaded.lib
    raw = str(item.raw).encode()
    benchmark.group = f"cache {size} engines"
    benchmark.name = "deserialize_file (C API)" + ("+prepare" if prepare else "")

    def load() -> object:
        out = ffi.new("wasmtime_module_t **")
        err = lib.wasmtime_module_deserialize_file(fast._engine, raw, out)
        assert err == ffi.NULL
        module = ffi.gc(out[0], lib.wasmtime_module_delete)
        return PreparedModule(fast, module, wasi=True) if prepare else module

    loaded = benchmark(load)
    assert not prepare or (isinstance(loaded, PreparedModule) and loaded.functions)


@pytest.mark.parametrize("size", ENGINE_SIZES)
def test_engine_hit_and_fast_load(
    benchmark: BenchmarkFixture, engine_inputs: dict[tuple[str, str], EngineInput], size: str
) -> None:
    from wasidispatch.engines._support import open_envelope_file

    item = engine_inputs["wasmtime-fast", size]
    assert isinstance(item.engine, FastWasmtimeEngine)
    fast = item.engine._fast((False, None))
    benchmark.group = f"cache {size} engines"
    benchmark.name = "hit+FastWasmtime load"

    def load() -> object:
        with open_envelope_file(item.hit(), fast.fingerprint()) as art:
            return fast._load_artifact(art)

    benchmark(load)


@pytest.mark.parametrize("size", ENGINE_SIZES)
def test_engine_hit_and_fast_prepare(
    benchmark: BenchmarkFixture, engine_inputs: dict[tuple[str, str], EngineInput], size: str
) -> None:
    item = engine_inputs["wasmtime-fast", size]
    assert isinstance(item.engine, FastWasmtimeEngine)
    fast = item.engine._fast((False, None))
    benchmark.group = f"cache {size} engines"
    benchmark.name = "hit+FastWasmtime.prepare"
    assert benchmark(lambda: fast.prepare(precompiled=item.hit())).functions


@pytest.mark.parametrize("engine_name", ["wasmtime", "wasmtime-fast"])
@pytest.mark.parametrize("size", ENGINE_SIZES)
def test_engine_hit_and_run(
    benchmark: BenchmarkFixture,
    engine_inputs: dict[tuple[str, str], EngineInput],
    size: str,
    engine_name: str,
) -> None:
    item = engine_inputs[engine_name, size]
    engine = item.engine
    label = "WasmtimeEngine" if engine_name == "wasmtime" else "FastWasmtimeEngine"
    benchmark.group = f"cache {size} engines"
    benchmark.name = f"hit+run {label}"

    def run() -> bytes | None:
        result = engine.run(dataclasses.replace(item.workload, precompiled=item.hit()))
        assert result.ok
        return result.stdout

    assert benchmark(run) == (HELLO_OUT if size == "small" else b"")

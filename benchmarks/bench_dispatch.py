"""End-to-end dispatch: a bundle on disk to an exit code, Wasm in-process vs runc, one run.

Run: ``.venv/bin/python -m pytest benchmarks/bench_dispatch.py -o python_files='bench_*.py'
--benchmark-only``. Groups:

* ``cold-start``: `Bundle.load` + a fresh `DispatchExecutor` (nothing memoized) + ``exec`` to
  the exit code. The Wasm side runs the C ``hello`` guest in-process on the default engine
  choice (the cffi fast path) with a warm precompile cache; the Linux side is
  ``runc run`` of a busybox ``echo`` bundle (Debian's runc, as root). Engines and the cache
  are created once, as a long-lived shim would.
* ``decision``: the dispatch decision alone on a loaded bundle: `decide` (resolve
  ``process.args[0]`` inside the rootfs and sniff it) and a memoized
  `DispatchExecutor.explain`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.guests import build_c
from wasidispatch import engines
from wasidispatch._bundles import busybox_bundle, wasm_bundle
from wasidispatch.cache import PrecompileCache
from wasidispatch.engines import Engine, Stdio
from wasidispatch.executor import DispatchExecutor, LinuxExecutor, WasmExecutor, decide
from wasidispatch.oci.bundle import Bundle

needs_runc = pytest.mark.skipif(
    shutil.which("runc") is None or os.geteuid() != 0, reason="needs Debian's runc, as root"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dispatch")


@pytest.fixture(scope="module")
def wasm_path(workdir: Path) -> Path:
    return wasm_bundle(workdir / "wasm", build_c("hello"))


@pytest.fixture(scope="module")
def linux_path(workdir: Path) -> Path:
    return busybox_bundle(workdir / "linux", ["echo", "hello"])


@pytest.fixture(scope="module")
def engine_choice() -> list[Engine]:
    names = [i.name for i in engines.available() if i.installed]
    return [engines.get(n) for n in ("wasmtime-fast", "wasmtime") if n in names]


@pytest.fixture(scope="module")
def cache(workdir: Path) -> PrecompileCache:
    return PrecompileCache(workdir / "cache")


@pytest.mark.benchmark(group="cold-start")
def test_wasm_bundle_in_process_warm_cache(
    benchmark: BenchmarkFixture,
    wasm_path: Path,
    engine_choice: list[Engine],
    cache: PrecompileCache,
) -> None:
    devnull = Stdio.null()

    def once() -> int:
        bundle = Bundle.load(wasm_path)
        wasm = WasmExecutor(engine_choice, cache=cache, stdout=devnull)
        return DispatchExecutor([wasm, LinuxExecutor()]).exec(bundle)

    assert once() == 0  # warms the cache
    assert benchmark(once) == 0


@needs_runc
@pytest.mark.benchmark(group="cold-start")
def test_linux_bundle_runc_run(benchmark: BenchmarkFixture, linux_path: Path) -> None:
    with open(os.devnull, "wb") as sink:

        def once() -> int:
            bundle = Bundle.load(linux_path)
            linux = LinuxExecutor(stdout=sink.fileno())
            return DispatchExecutor([WasmExecutor("wasmtime"), linux]).exec(bundle)

        result = benchmark.pedantic(once, rounds=30, warmup_rounds=2)  # type: ignore[no-untyped-call]
        assert result == 0


@pytest.mark.benchmark(group="decision")
def test_decide_on_loaded_bundle(benchmark: BenchmarkFixture, wasm_path: Path) -> None:
    bundle = Bundle.load(wasm_path)
    assert benchmark(decide, bundle).kind == "wasm"


@pytest.mark.benchmark(group="decision")
def test_explain_memoized(
    benchmark: BenchmarkFixture, wasm_path: Path, engine_choice: list[Engine]
) -> None:
    bundle = Bundle.load(wasm_path)
    executor = DispatchExecutor([WasmExecutor(engine_choice), LinuxExecutor()])
    assert benchmark(executor.explain, bundle).executor == "wasm"


@pytest.mark.benchmark(group="decision")
def test_bundle_load(benchmark: BenchmarkFixture, wasm_path: Path) -> None:
    assert benchmark(Bundle.load, wasm_path).spec.process is not None

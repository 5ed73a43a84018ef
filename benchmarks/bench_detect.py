"""Detection speed, side by side with python-magic (libmagic), puremagic and filetype.

Run: ``.venv/bin/python -m pytest benchmarks/bench_detect.py --benchmark-only``
(or ``make bench``). Each group is one input, every contender in the same run:

* ``bytes:<kind>``: the file's first 4 KiB already in memory (``sniff(bytes)``, target <= 2 us);
  ``sniff cold`` clears detect's memo tables before every call, the worst case;
* ``path:<kind>``: from a path (``sniff_path``, target <= 15 us and >= 20x python-magic);
* ``import``: a fresh interpreter importing nothing / ``wasidispatch`` / ``wasidispatch.detect``
  (the difference is what importing the detector costs, target <= 5 ms).
"""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import filetype
import magic
import puremagic
import pytest
import wasmtime
from pytest_benchmark.fixture import BenchmarkFixture

import wasidispatch
from wasidispatch import detect
from wasidispatch.detect import PREFIX_SIZE, sniff, sniff_path

REPO = Path(__file__).resolve().parent.parent
ARM64 = REPO / "tests" / ".fixtures" / "arm64" / "busybox"

_magic = magic.Magic()  # what magic.from_buffer / from_file use, built once


def _puremagic_bytes(data: bytes) -> str | None:
    try:
        return str(puremagic.from_string(data))
    except puremagic.PureError:  # it raises on what it does not know
        return None


def _puremagic_path(path: str) -> str | None:
    try:
        return str(puremagic.from_file(path))
    except puremagic.PureError:
        return None


def _answer(result: object) -> str:
    return str(getattr(result, "mime", result))  # filetype returns a type object


def _sniff_cold(data: bytes) -> object:
    detect._cache.clear()
    detect._script_cache.clear()
    detect._unknown_cache.clear()
    return sniff(data)


BYTES_CONTENDERS: dict[str, Callable[[bytes], object]] = {
    "wasidispatch.sniff": sniff,
    "wasidispatch.sniff cold": _sniff_cold,
    "python-magic": _magic.from_buffer,
    "puremagic": _puremagic_bytes,
    "filetype": filetype.guess,
}
PATH_CONTENDERS: dict[str, Callable[[str], object]] = {
    "wasidispatch.sniff_path": sniff_path,
    "python-magic": _magic.from_file,
    "puremagic": _puremagic_path,
    "filetype": filetype.guess,
}


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("detect")
    module = tmp / "module.wasm"
    module.write_bytes(
        bytes(wasmtime.wat2wasm((REPO / "docs/examples/detect-module.wat").read_text()))
    )
    component = tmp / "component.wasm"
    component.write_bytes(
        bytes(wasmtime.wat2wasm((REPO / "docs/examples/detect-component.wat").read_text()))
    )
    found = {
        "elf-amd64": Path("/bin/true"),
        "elf-arm64": ARM64,
        "wasm-module": module,
        "wasm-component": component,
        "script": Path(sys.executable).parent / "pip",
    }
    return {k: v for k, v in found.items() if v.is_file()}


KINDS = ["elf-amd64", "elf-arm64", "wasm-module", "wasm-component", "script"]


def _sample(samples: dict[str, Path], kind: str) -> Path:
    if kind not in samples:
        pytest.skip(f"no {kind} sample (run `make fixtures` for the arm64 one)")
    return samples[kind]


@pytest.mark.parametrize("contender", list(BYTES_CONTENDERS))
@pytest.mark.parametrize("kind", KINDS)
def test_bytes(
    benchmark: BenchmarkFixture, samples: dict[str, Path], kind: str, contender: str
) -> None:
    path = _sample(samples, kind)
    with path.open("rb") as f:
        data = f.read(PREFIX_SIZE)
    func = BYTES_CONTENDERS[contender]
    benchmark.group = f"bytes:{kind}"
    benchmark.extra_info["answer"] = _answer(func(data))
    benchmark(func, data)


@pytest.mark.parametrize("contender", list(PATH_CONTENDERS))
@pytest.mark.parametrize("kind", KINDS)
def test_path(
    benchmark: BenchmarkFixture, samples: dict[str, Path], kind: str, contender: str
) -> None:
    path = str(_sample(samples, kind))
    func = PATH_CONTENDERS[contender]
    benchmark.group = f"path:{kind}"
    benchmark.extra_info["answer"] = _answer(func(path))
    benchmark(func, path)


@pytest.fixture(scope="session")
def compiled() -> None:
    # As installed: bytecode present (this environment may set PYTHONDONTWRITEBYTECODE).
    for mod in ("__init__", "errors", "detect"):
        py_compile.compile(str(Path(wasidispatch.__file__).parent / f"{mod}.py"))


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize(
    "code",
    ["pass", "import wasidispatch", "import wasidispatch.detect"],
    ids=["python", "pkg", "detect"],
)
def test_import(benchmark: BenchmarkFixture, code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cmd = [sys.executable, "-c", code]
    benchmark.group = "import"
    benchmark.pedantic(  # type: ignore[no-untyped-call]
        subprocess.run, args=(cmd,), kwargs={"env": env, "check": True}, rounds=30, warmup_rounds=2
    )
    if code.endswith("detect"):
        # What -X importtime attributes to the import (cumulative, microseconds), best of 5.
        cumulative = []
        for _ in range(5):
            err = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", code],
                env=env, capture_output=True, text=True, check=True,
            ).stderr  # fmt: skip
            last = err.strip().splitlines()[-1]
            cumulative.append(int(last.split("|")[1]))
        benchmark.extra_info["importtime_us"] = min(cumulative)

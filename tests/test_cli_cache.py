"""``wasidispatch cache warm`` warms what ``wasidispatch run`` and the executors use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.guests import build_wat, guest_bytes
from wasidispatch import engines
from wasidispatch._bundles import wasm_bundle
from wasidispatch.cache import PrecompileCache
from wasidispatch.cli import main
from wasidispatch.engines import Stdio
from wasidispatch.executor import ANNOTATION_ENGINE, WasmExecutor
from wasidispatch.oci.bundle import Bundle

HELLO_OUT = b"hello from wat\n"


def _warm(cache_dir: Path, *paths: str | Path, engine: tuple[str, ...] = ()) -> list[str]:
    flags = [arg for name in engine for arg in ("--engine", name)]
    assert main(["cache", "warm", "--dir", str(cache_dir), *flags, *map(str, paths)]) == 0
    return []


def _stats(cache_dir: Path) -> tuple[int, int, int]:
    s = PrecompileCache(cache_dir).stats()
    return s.hits, s.misses, s.entries


def test_warm_then_executor_and_run_are_hits_that_compile_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bundle = wasm_bundle(tmp_path / "bundle", build_wat("hello"))
    cache_dir = tmp_path / "cache"
    _warm(cache_dir, bundle)
    line = capfd.readouterr().out
    assert line.startswith("compiled")
    assert " wasmtime-fast " in line  # what the executor runs by default
    assert _stats(cache_dir) == (0, 1, 1)

    out = tmp_path / "out"
    cache = PrecompileCache(cache_dir)
    executor = WasmExecutor(cache=cache, stdout=Stdio.file(out))
    prepared = executor.prepare(Bundle.load(bundle))
    assert isinstance(prepared.workload.precompiled, Path)
    # nothing to compile from: only the warmed artifact can run
    no_wasm = replace(prepared.workload, wasm=b"not wasm: must not be compiled")
    result = executor.run(replace(prepared, workload=no_wasm))
    assert result.ok, result
    assert out.read_bytes() == HELLO_OUT
    cache.flush()
    assert _stats(cache_dir) == (1, 1, 1)  # a hit, no second compile

    capfd.readouterr()
    assert main(["run", "--cache", str(cache_dir), str(bundle)]) == 0
    assert capfd.readouterr().out.encode() == HELLO_OUT
    assert _stats(cache_dir) == (2, 1, 1)


def test_warm_follows_the_bundles_engine_annotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = wasm_bundle(
        tmp_path / "bundle", build_wat("hello"), annotations={ANNOTATION_ENGINE: "wasmtime"}
    )
    cache_dir = tmp_path / "cache"
    _warm(cache_dir, bundle)
    assert " wasmtime " in capsys.readouterr().out
    cache = PrecompileCache(cache_dir)
    executor = WasmExecutor(cache=cache, stdout=Stdio.null())
    assert executor.exec(Bundle.load(bundle)) == 0
    cache.flush()
    assert _stats(cache_dir) == (1, 1, 1)


def test_warm_takes_the_engine_order_of_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare module: the first engine of the order that can run it (a component is not for
    the fast path), ``--engine`` repeated as for ``wasidispatch run``."""
    module, component = tmp_path / "hello.wasm", tmp_path / "component.wasm"
    module.write_bytes(guest_bytes("wat", "hello"))
    component.write_bytes(guest_bytes("wat", "component_hello"))
    cache_dir = tmp_path / "cache"
    _warm(cache_dir, module, component)
    lines = capsys.readouterr().out.splitlines()
    assert " wasmtime-fast " in lines[0]
    assert " wasmtime " in lines[1]
    _warm(cache_dir, module, engine=("wasmtime", "wasmtime-fast"))
    assert " wasmtime " in capsys.readouterr().out
    cache = PrecompileCache(cache_dir)
    for name, path in (("wasmtime-fast", module), ("wasmtime", component), ("wasmtime", module)):
        art = cache.artifact(engines.get(name), path)
        assert art is not None
        assert art.hit, (name, path)


def test_warm_a_layout_tag_warms_that_tag_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wasidispatch.oci.layout import ImageLayout, pack_wasm, wasm_layers

    layout_dir = tmp_path / "layout"
    layout = ImageLayout.create(layout_dir)
    one, two = guest_bytes("wat", "hello"), guest_bytes("wat", "exit42")
    pack_wasm(layout, one, "v1", created=None)
    pack_wasm(layout, two, "v2", created=None)
    cache_dir = tmp_path / "cache"
    _warm(cache_dir, f"{layout_dir}:v2")
    assert ":v2@" in capsys.readouterr().out
    (entry,) = PrecompileCache(cache_dir).entries()
    assert entry.module_digest == "sha256:" + hashlib.sha256(two).hexdigest()

    # the executor running that tag's layers hits what was warmed
    bundle = wasm_bundle(tmp_path / "bundle", one)
    cache = PrecompileCache(cache_dir)
    executor = WasmExecutor(cache=cache, stdout=Stdio.null())
    assert executor.exec(Bundle.load(bundle), layers=wasm_layers(layout, "v2")) == 42
    cache.flush()
    assert _stats(cache_dir) == (1, 1, 1)

    assert main(["cache", "warm", "--dir", str(cache_dir), f"{layout_dir}:nope"]) == 1
    assert "nope" in capsys.readouterr().err


def test_warm_without_an_engine_that_can_run_it_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    component = tmp_path / "component.wasm"
    component.write_bytes(guest_bytes("wat", "component_hello"))
    status = main(
        ["cache", "warm", "--dir", str(tmp_path / "c"), "--engine", "wasmtime-fast", str(component)]
    )
    assert status == 1
    assert "no Wasm engine can run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [("1", 1), ("9" * 30, int("9" * 30)), ("1" * 30 + "T", int("1" * 30) << 40)],
)
def test_sizes_at_the_extremes_are_exact(text: str, size: int) -> None:
    from wasidispatch._cli.cache import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1" * 400, "1e308", "inf", "nan", "-1", "0", "0.1"])
def test_bad_sizes_are_refused_by_the_parser(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["cache", "stats", "--dir", str(tmp_path / "c"), "--max-bytes", text])
    assert stop.value.code == 2
    assert "size" in capsys.readouterr().err


def test_stats_json_lists_what_was_warmed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "hello.wasm"
    module.write_bytes(guest_bytes("wat", "hello"))
    _warm(tmp_path / "c", module)
    capsys.readouterr()
    assert main(["cache", "stats", "--dir", str(tmp_path / "c"), "--json", "--entries"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [e["engine"] for e in doc["list"]] == ["wasmtime-fast"]

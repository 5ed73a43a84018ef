"""What is particular to the wasmtime engine: configurations, the epoch ticker, the stack
guard, artifacts across configurations and their envelope trailer, and cleanup. Shared
behaviour is in ``test_engines_conformance.py``."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.guests import build_c, guest_bytes
from wasidispatch.engines import ExitReason, Limits, RunResult, Stdio, Workload

pytest.importorskip("wasmtime", reason="wasmtime is not installed")

import wasmtime
import wasmtime.component as wtc

from wasidispatch.engines._support import (
    TRAILER_SIZE,
    open_envelope,
    open_envelope_file,
    seal_envelope,
)
from wasidispatch.engines.wasmtime import MAX_WASM_STACK, WasmtimeEngine
from wasidispatch.errors import CantHandle, EngineError, IncompatibleArtifact


def _run(engine: WasmtimeEngine, wasm: bytes | Path, *args: str, **kw: object) -> RunResult:
    kw.setdefault("stdin", Stdio.null())
    kw.setdefault("stdout", Stdio.capture())
    kw.setdefault("stderr", Stdio.capture())
    return engine.run(Workload(wasm=wasm, argv=("guest", *args), **kw))  # type: ignore[arg-type]


def _tickers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wasidispatch-epoch"]


def test_fingerprint_changes_with_compile_config() -> None:
    default, unoptimized = WasmtimeEngine(), WasmtimeEngine(opt_level="none")
    assert default.fingerprint() == WasmtimeEngine().fingerprint()
    assert default.fingerprint() != unoptimized.fingerprint()
    assert len(default.fingerprint()) == 64


def test_unknown_opt_level_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match="opt_level"):
        WasmtimeEngine(opt_level="fastest")


def test_artifact_from_another_configuration_is_incompatible() -> None:
    wasm = build_c("hello").read_bytes()
    artifact = WasmtimeEngine(opt_level="none").precompile(wasm)
    with pytest.raises(IncompatibleArtifact, match="another engine"):
        _run(WasmtimeEngine(), wasm, precompiled=artifact)


def test_unreadable_artifact_path_is_incompatible(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleArtifact, match="cannot read"):
        _run(WasmtimeEngine(), build_c("hello"), precompiled=tmp_path / "missing.bin")


def test_precompiled_run_skips_compilation() -> None:
    engine = WasmtimeEngine()
    wasm = build_c("hello").read_bytes()
    result = _run(engine, wasm, precompiled=engine.precompile(wasm))
    assert result.ok
    assert result.stdout == b"hello from wasi\n"


def test_fuel_workload_with_artifact_compiles_from_wasm() -> None:
    # Fuel needs metering code the default artifact lacks: the engine compiles from `wasm`.
    engine = WasmtimeEngine()
    wasm = build_c("hello").read_bytes()
    result = _run(engine, wasm, precompiled=engine.precompile(wasm), limits=Limits(fuel=10**8))
    assert result.ok
    assert result.timings.compile > 0


def test_ticker_thread_is_joined_after_timed_runs() -> None:
    engine = WasmtimeEngine()
    before = len(_tickers())
    result = _run(engine, guest_bytes("wat", "loop"), limits=Limits(timeout=0.05))
    assert result.reason is ExitReason.TIMED_OUT
    assert len(_tickers()) == before
    assert _run(engine, build_c("hello"), limits=Limits(timeout=10)).ok
    assert len(_tickers()) == before


def test_a_timeout_does_not_cut_a_concurrent_run_short() -> None:
    # Both runs share one engine (one epoch counter); the looping one must not make the
    # other, with a long timeout, trap as interrupted.
    engine = WasmtimeEngine()
    looped: list[RunResult] = []
    thread = threading.Thread(
        target=lambda: looped.append(
            _run(engine, guest_bytes("wat", "loop"), limits=Limits(timeout=0.3))
        )
    )
    thread.start()
    results = [_run(engine, build_c("args"), str(i), limits=Limits(timeout=60)) for i in range(30)]
    thread.join()
    assert looped[0].reason is ExitReason.TIMED_OUT
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_small_stack_overflows_as_a_trap() -> None:
    result = _run(
        WasmtimeEngine(), guest_bytes("wat", "recurse"), limits=Limits(max_wasm_stack=64 << 10)
    )
    assert result.reason is ExitReason.TRAPPED
    assert result.message is not None
    assert "call stack exhausted" in result.message


def test_largest_accepted_stack_runs() -> None:
    result = _run(WasmtimeEngine(), build_c("hello"), limits=Limits(max_wasm_stack=MAX_WASM_STACK))
    assert result.ok


def test_stack_just_above_the_limit_is_refused_before_wasmtime() -> None:
    engine = WasmtimeEngine()
    workload = Workload(wasm=build_c("hello"), limits=Limits(max_wasm_stack=MAX_WASM_STACK + 1))
    assert "max_wasm_stack" in engine.can_handle(workload).reason
    with pytest.raises(CantHandle, match="max_wasm_stack"):
        engine.run(workload)


def test_exit_codes_up_to_125_pass_through() -> None:
    result = _run(WasmtimeEngine(), build_c("exit"), "125")
    assert (result.exit_code, result.reason) == (125, ExitReason.EXITED)


@pytest.mark.parametrize("status", ["126", "255", "-1"])
def test_exit_status_wasmtime_refuses_is_a_trap(status: str) -> None:
    # wasmtime's WASI proc_exit traps for statuses outside [0, 126) instead of exiting.
    result = _run(WasmtimeEngine(), build_c("exit"), status)
    assert (result.exit_code, result.reason) == (137, ExitReason.TRAPPED)
    assert result.message is not None
    assert "invalid exit status" in result.message


def test_stdin_bytes_temp_file_is_removed() -> None:
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("wasidispatch-stdin-*"))
    result = _run(WasmtimeEngine(), build_c("cat"), stdin=Stdio.from_bytes(b"abc"))
    assert result.stdout == b"abc"
    assert set(tmp.glob("wasidispatch-stdin-*")) == before


def test_missing_stdin_file_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="stdin file"):
        _run(WasmtimeEngine(), build_c("cat"), stdin=Stdio.file(tmp_path / "absent"))


def test_stdout_into_missing_directory_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="stdout"):
        _run(WasmtimeEngine(), build_c("hello"), stdout=Stdio.file(tmp_path / "no" / "out"))


def test_unknown_import_is_refused() -> None:
    import wasmtime

    wasm = bytes(
        wasmtime.wat2wasm(
            '(module (import "env" "host_only" (func)) (func (export "_start") call 0))'
        )
    )
    with pytest.raises(CantHandle, match="link"):
        _run(WasmtimeEngine(), wasm)


def test_component_with_entry_is_refused() -> None:
    with pytest.raises(CantHandle, match="wasi:cli/run"):
        _run(WasmtimeEngine(), guest_bytes("wat", "component_hello"), entry="run")


def test_component_without_run_export_is_refused() -> None:
    import wasmtime

    wasm = bytes(wasmtime.wat2wasm("(component)"))
    with pytest.raises(CantHandle, match="wasi:cli/run"):
        _run(WasmtimeEngine(), wasm)


def test_entry_with_parameters_is_refused() -> None:
    import wasmtime

    wasm = bytes(wasmtime.wat2wasm('(module (func (export "f") (param i32)))'))
    with pytest.raises(CantHandle, match="parameters"):
        _run(WasmtimeEngine(), wasm, entry="f")


@pytest.mark.parametrize(
    "limits",
    [Limits(memory_bytes=-1), Limits(fuel=-5), Limits(timeout=0), Limits(timeout=float("nan"))],
)
def test_meaningless_limits_are_refused(limits: Limits) -> None:
    with pytest.raises(CantHandle, match="limits"):
        _run(WasmtimeEngine(), build_c("hello"), limits=limits)


def test_cwd_outside_preopens_is_an_engine_error(tmp_path: Path) -> None:
    from wasidispatch.engines import Preopen

    with pytest.raises(EngineError, match="cwd"):
        _run(
            WasmtimeEngine(),
            build_c("hello"),
            preopens=(Preopen(tmp_path, "/d"),),
            cwd="/elsewhere",
        )


# -- the envelope trailer and loading artifact files ---------------------------------------------

FP = "0123456789abcdef" * 4


def _old_format(fingerprint: str, payload: bytes) -> bytes:
    """An artifact in the envelope of format 1: a header in front of the payload."""
    digest = hashlib.sha256(payload).digest()
    return b"WDPCA\x01" + fingerprint.encode() + b"m" + digest + payload


def _refused(fn: Callable[..., object], *args: object, **kw: object) -> bool:
    """Whether ``fn`` raises `IncompatibleArtifact` (any other exception propagates)."""
    try:
        fn(*args, **kw)
    except IncompatibleArtifact:
        return True
    return False


def test_wasmtime_ignores_bytes_after_its_artifact(tmp_path: Path) -> None:
    # What the trailer relies on: wasmtime loads its artifact with anything appended, from a
    # file (mapped) and from bytes, for modules and components.
    engine = wasmtime.Engine()
    module = bytes(wasmtime.Module(engine, build_c("hello").read_bytes()).serialize())
    component = bytes(wtc.Component(engine, guest_bytes("wat", "component_hello")).serialize())
    junk = os.urandom(4096)
    kinds: list[tuple[bytes, type[wasmtime.Module] | type[wtc.Component]]] = [
        (module, wasmtime.Module),
        (component, wtc.Component),
    ]
    for i, (payload, cls) in enumerate(kinds):
        path = tmp_path / f"{i}.bin"
        path.write_bytes(payload + junk)
        assert cls.deserialize_file(engine, str(path)) is not None
        assert cls.deserialize(engine, payload + junk) is not None
        path.write_bytes(payload[:-64] + junk)  # the artifact itself cut short: refused
        with pytest.raises(wasmtime.WasmtimeError):
            cls.deserialize_file(engine, str(path))


def test_seal_puts_the_payload_first_and_open_returns_it() -> None:
    sealed = seal_envelope(FP, "component", b"payload bytes")
    assert sealed.startswith(b"payload bytes")
    assert len(sealed) == len(b"payload bytes") + TRAILER_SIZE
    opened = open_envelope(sealed, FP)
    assert (opened.kind, bytes(opened.payload)) == ("component", b"payload bytes")
    assert opened.sha256 == hashlib.sha256(b"payload bytes").digest()


def test_open_bytes_verifies_every_field() -> None:
    sealed = seal_envelope(FP, "module", b"x" * 300)
    bad = {
        "payload byte": bytes([sealed[0] ^ 1]) + sealed[1:],
        "trailer byte": sealed[:-1] + bytes([sealed[-1] ^ 1]),
        "truncated": sealed[1:],
        "extended": b"y" + sealed,
        "padded before the trailer": sealed[:300] + b"\0" * 8 + sealed[300:],
        "shorter than a trailer": sealed[-TRAILER_SIZE + 1 :],
        "old format": _old_format(FP, b"x" * 300),
        "empty": b"",
    }
    assert [what for what, data in bad.items() if not _refused(open_envelope, data, FP)] == []
    with pytest.raises(IncompatibleArtifact, match="another engine"):
        open_envelope(sealed, "f" * 64)
    with pytest.raises(IncompatibleArtifact, match="older wasidispatch"):
        open_envelope(_old_format(FP, b"x" * 300), FP)


@given(st.binary(max_size=400))
def test_open_envelope_is_total(data: bytes) -> None:
    try:
        opened = open_envelope(data, FP)
    except IncompatibleArtifact:
        return
    assert seal_envelope(FP, opened.kind, bytes(opened.payload)) == data


@given(st.binary(min_size=1, max_size=64))
def test_any_extra_or_missing_tail_is_refused(extra: bytes) -> None:
    sealed = seal_envelope(FP, "module", b"p" * 200)
    for data in (sealed + extra, sealed[: -len(extra)]):
        with pytest.raises(IncompatibleArtifact):
            open_envelope(data, FP)


def test_artifact_path_runs_through_deserialize_file(tmp_path: Path) -> None:
    engine = WasmtimeEngine()
    wasm = build_c("hello").read_bytes()
    path = tmp_path / "hello.art"
    path.write_bytes(engine.precompile(wasm))
    result = _run(engine, wasm, precompiled=path)
    assert result.ok
    assert result.stdout == b"hello from wasi\n"
    component = guest_bytes("wat", "component_hello")
    cpath = tmp_path / "component.art"
    cpath.write_bytes(engine.precompile(component))
    assert _run(engine, component, precompiled=cpath).ok


def test_bad_artifact_files_are_incompatible(tmp_path: Path) -> None:
    engine = WasmtimeEngine()
    wasm = build_c("hello").read_bytes()
    artifact = engine.precompile(wasm)
    native = artifact[:-TRAILER_SIZE]
    from wasidispatch.engines._wasmtime_cffi import FastWasmtimeEngine

    cases = {
        "truncated": artifact[: len(artifact) // 2],
        "trailer cut": artifact[:-1],
        "payload cut, trailer kept": native[:-100] + artifact[-TRAILER_SIZE:],
        "extended": artifact + b"\0" * 16,
        # wasmtime would load this one; only the recorded length tells
        "padded before the trailer": native + b"\0" * 16 + artifact[-TRAILER_SIZE:],
        "shorter than a trailer": artifact[:40],
        "empty": b"",
        "bare wasmtime artifact": native,
        "old format": _old_format(engine.fingerprint(), native),
        "another configuration": WasmtimeEngine(opt_level="none").precompile(wasm),
        "another engine": FastWasmtimeEngine().precompile(wasm),
        "the wasm itself": wasm,
    }
    accepted = []
    for what, data in cases.items():
        path = tmp_path / f"{what}.art"
        path.write_bytes(data)
        if not _refused(_run, engine, wasm, precompiled=path):
            accepted.append(what)
    assert accepted == []
    os.mkfifo(tmp_path / "fifo")  # opening must neither block nor be mistaken for a file
    for odd in (tmp_path, tmp_path / "fifo", tmp_path / "missing"):
        with pytest.raises(IncompatibleArtifact):
            _run(engine, wasm, precompiled=odd)
    with pytest.raises(IncompatibleArtifact, match="older wasidispatch"):
        _run(engine, wasm, precompiled=tmp_path / "old format.art")


def test_the_checked_file_is_the_one_mapped(tmp_path: Path) -> None:
    # The loader is handed the descriptor that was checked: replacing or removing the path
    # between the check and the load changes nothing.
    engine = WasmtimeEngine()
    wasm = build_c("hello").read_bytes()
    path = tmp_path / "a.art"
    path.write_bytes(engine.precompile(wasm))
    runtime = wasmtime.Engine(_default_config())
    with open_envelope_file(path, engine.fingerprint()) as art:
        other = tmp_path / "other.art"
        other.write_bytes(b"not an artifact at all" * 100)
        other.replace(path)
        module = wasmtime.Module.deserialize_file(runtime, art.path)
    assert any(e.name == "_start" for e in module.exports)
    evicted = tmp_path / "b.art"
    evicted.write_bytes(engine.precompile(wasm))
    with open_envelope_file(evicted, engine.fingerprint()) as art:
        evicted.unlink()  # as a cache eviction in another process could
        assert wasmtime.Module.deserialize_file(runtime, art.path) is not None


def _default_config() -> wasmtime.Config:
    # The configuration WasmtimeEngine's artifacts are made for (default profile).
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    config.wasm_component_model = True
    return config


def test_fingerprints_cover_the_envelope_format(monkeypatch: pytest.MonkeyPatch) -> None:
    # A new envelope format must be a cache miss, never a cached entry that fails to load.
    import wasidispatch.engines._support as support
    import wasidispatch.engines._wasmtime_cffi._fast as fast_engine
    import wasidispatch.engines.wasmtime as wasmtime_engine
    from wasidispatch.engines._wasmtime_cffi import FastWasmtime

    before = (WasmtimeEngine().fingerprint(), FastWasmtime().fingerprint())
    for module in (wasmtime_engine, fast_engine):
        monkeypatch.setattr(module, "ENVELOPE_FORMAT", support.ENVELOPE_FORMAT + 1)
    monkeypatch.setattr(support, "ENVELOPE_FORMAT", support.ENVELOPE_FORMAT + 1)
    after = (WasmtimeEngine().fingerprint(), FastWasmtime().fingerprint())
    assert before[0] != after[0]
    assert before[1] != after[1]

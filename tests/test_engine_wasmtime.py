"""What is particular to the wasmtime engine: configurations, the epoch ticker, the stack
guard, artifacts across configurations, and cleanup. Shared behaviour is in
``test_engines_conformance.py``."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

from tests.guests import build_c, guest_bytes
from wasidispatch.engines import ExitReason, Limits, RunResult, Stdio, Workload

pytest.importorskip("wasmtime", reason="wasmtime is not installed")

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


def test_initial_memory_above_the_cap_is_out_of_memory() -> None:
    # The C guests start with more than 64 KiB of linear memory (stack + data).
    result = _run(WasmtimeEngine(), build_c("hello"), limits=Limits(memory_bytes=64 << 10))
    assert result.reason is ExitReason.OUT_OF_MEMORY
    assert result.exit_code == 137


def test_trap_far_below_the_cap_is_not_out_of_memory() -> None:
    result = _run(
        WasmtimeEngine(), guest_bytes("wat", "unreachable"), limits=Limits(memory_bytes=64 << 20)
    )
    assert result.reason is ExitReason.TRAPPED


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

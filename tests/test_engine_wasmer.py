"""What is particular to the Wasmer engine: the async bridge, refusals, and translations.

The shared behaviour is in ``test_engines_conformance.py``.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from tests.guests import build_c, guest_bytes
from wasidispatch.engines import Engine, ExitReason, Limits, Preopen, Stdio, Workload

pytest.importorskip("wasmer_sdk", reason="wasmer-sdk is not installed")

from wasidispatch.engines.wasmer import WasmerEngine
from wasidispatch.errors import CantHandle


def _w(wasm: bytes | Path, *args: str, **kw: object) -> Workload:
    kw.setdefault("stdin", Stdio.null())
    kw.setdefault("stdout", Stdio.capture())
    kw.setdefault("stderr", Stdio.capture())
    return Workload(wasm=wasm, argv=("guest", *args), **kw)  # type: ignore[arg-type]


def _bridge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wasidispatch-wasmer"]


def test_close_stops_the_loop_thread_and_a_later_run_restarts_it() -> None:
    engine = WasmerEngine()
    before = len(_bridge_threads())
    assert engine.run(_w(build_c("hello"))).ok
    assert len(_bridge_threads()) == before + 1
    engine.close()
    engine.close()  # idempotent
    assert len(_bridge_threads()) == before
    assert engine.run(_w(build_c("hello"))).stdout == b"hello from wasi\n"
    engine.close()
    assert len(_bridge_threads()) == before


def test_garbage_collected_engine_leaves_no_thread() -> None:
    import gc

    before = len(_bridge_threads())
    engine = WasmerEngine()
    assert engine.run(_w(build_c("hello"))).ok
    del engine
    gc.collect()
    assert len(_bridge_threads()) == before


def test_runs_from_inside_a_running_event_loop() -> None:
    engine = WasmerEngine()

    async def caller() -> bytes | None:
        return engine.run(_w(build_c("hello"))).stdout

    try:
        assert asyncio.run(caller()) == b"hello from wasi\n"
    finally:
        engine.close()


def test_concurrent_runs_from_threads() -> None:
    engine = WasmerEngine()
    results: list[bytes | None] = []

    def work(i: int) -> None:
        results.append(engine.run(_w(build_c("args"), str(i))).stdout)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert sorted(results, key=str) == sorted(
        (f"2\nguest\n{i}\n".encode() for i in range(4)), key=str
    )


@pytest.mark.parametrize(
    ("workload_kw", "reason"),
    [
        ({"stdin": Stdio.inherit()}, "stdin"),
        ({"preopens": (Preopen("/tmp", "/tmp"),)}, "preopens"),
        ({"limits": Limits(memory_bytes=1 << 20)}, "memory"),
        ({"limits": Limits(fuel=10)}, "fuel"),
        ({"entry": "answer"}, "_start"),
        ({"precompiled": b"x"}, "precompiled"),
    ],
)
def test_refusals_name_the_reason(workload_kw: dict[str, object], reason: str) -> None:
    engine = WasmerEngine()
    workload = _w(build_c("hello"), **workload_kw)
    verdict = engine.can_handle(workload)
    assert not verdict
    assert reason in verdict.reason
    with pytest.raises(CantHandle, match=reason):
        engine.run(workload)


def test_argv0_that_cannot_be_a_command_name_is_refused() -> None:
    engine = WasmerEngine()
    workload = Workload(wasm=build_c("args"), argv=("/bin/app.wasm",), stdin=Stdio.null())
    with pytest.raises(CantHandle, match="argv\\[0\\]"):
        engine.run(workload)
    assert engine.can_handle(Workload(wasm=build_c("args"), argv=("app.wasm",), stdin=Stdio.null()))


def test_trap_message_keeps_the_trap_kind() -> None:
    result = WasmerEngine().run(_w(guest_bytes("wat", "unreachable")))
    assert result.reason is ExitReason.TRAPPED
    assert result.message is not None
    assert "unreachable" in result.message
    assert not result.message.startswith("command execution failed")


def test_truncated_output_is_said_in_the_message() -> None:
    engine = WasmerEngine(output_bytes=5)
    try:
        result = engine.run(_w(build_c("hello")))
    finally:
        engine.close()
    assert result.ok
    assert result.stdout == b"hello"
    assert result.message is not None
    assert "stdout was cut" in result.message


def test_precompile_is_none_and_fingerprint_names_the_sdk() -> None:
    engine: Engine = WasmerEngine()
    assert engine.precompile(build_c("hello").read_bytes()) is None
    assert engine.fingerprint() == WasmerEngine().fingerprint()

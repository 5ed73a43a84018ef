"""The harness helper: one call (or a builder) in, exit code/stdout/stderr/timings out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.guests import build_c, guest_bytes
from wasidispatch import engines
from wasidispatch.engines import ExitReason, Limits
from wasidispatch.errors import CantHandle, CompileError, EngineUnavailable
from wasidispatch.testing import HarnessResult, WasiRun, run_wasm

pytest.importorskip("wasmtime", reason="wasmtime is not installed")


def test_argv0_is_the_file_name_then_args(tmp_path: Path) -> None:
    wasm = tmp_path / "printer.wasm"
    wasm.write_bytes(build_c("args").read_bytes())
    result = run_wasm(wasm, args=["a", "ß"])
    assert isinstance(result, HarnessResult)
    assert result.stdout_text == "3\nprinter.wasm\na\nß\n"
    assert run_wasm(str(wasm), argv0="custom").stdout_text == "1\ncustom\n"
    assert run_wasm(wasm.read_bytes()).stdout_text == "1\nmain.wasm\n"


def test_stdin_stdout_stderr_and_timings() -> None:
    result = run_wasm(build_c("cat"), stdin="héllo")
    assert result.ok
    assert result.stdout == "héllo".encode()
    assert result.stderr_text == "6 bytes\n"
    assert result.timings.total > 0
    assert result.engine == "wasmtime"


def test_stdin_from_a_file(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"from file")
    assert run_wasm(build_c("cat"), stdin=src).stdout == b"from file"


def test_dirs_as_list_and_mapping_and_readonly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fs-tests.dir").mkdir()
    (tmp_path / "fs-tests.dir" / "x").write_text("X")
    monkeypatch.chdir(tmp_path)  # wasi-testsuite names dirs relative to the test
    listed = run_wasm(build_c("files"), args=["read", "fs-tests.dir/x"], dirs=["fs-tests.dir"])
    assert listed.stdout == b"X"
    mapped = run_wasm(
        build_c("files"), args=["write", "/d/y", "Y"], dirs={"/d": tmp_path / "fs-tests.dir"}
    )
    assert mapped.ok
    assert (tmp_path / "fs-tests.dir" / "y").read_text() == "Y"
    ro = run_wasm(
        build_c("files"),
        args=["write", "/ro/z", "Z"],
        readonly_dirs={"/ro": tmp_path / "fs-tests.dir"},
    )
    assert ro.exit_code == 1
    assert not (tmp_path / "fs-tests.dir" / "z").exists()


def test_env_exactly() -> None:
    result = run_wasm(build_c("env"), env={"ONLY": "this"})
    assert result.stdout == b"ONLY=this\n"


def test_limits_and_reasons() -> None:
    timed = run_wasm(guest_bytes("wat", "loop"), limits=Limits(timeout=0.1))
    assert (timed.exit_code, timed.reason) == (137, ExitReason.TIMED_OUT)
    trapped = run_wasm(guest_bytes("wat", "unreachable"))
    assert trapped.reason is ExitReason.TRAPPED
    assert trapped.message is not None


def test_builder_is_immutable_and_runs() -> None:
    base = WasiRun(build_c("args"))
    changed = base.with_args("x", "y").with_env(A="1").with_timeout(30)
    assert base.args == ()
    assert changed.limits.timeout == 30
    assert changed.run().stdout_text == f"3\n{build_c('args').name}\nx\ny\n"


def test_builder_dirs_and_memory_limit(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("F")
    run = (
        WasiRun(build_c("files")).with_dir(tmp_path, "/rw").with_dir(tmp_path, "/ro", readonly=True)
    )
    assert run.with_args("read", "/ro/f").run().stdout == b"F"
    assert run.with_args("write", "/ro/g", "G").run().exit_code == 1
    assert run.with_args("write", "/rw/g", "G").run().ok
    bomb = WasiRun(guest_bytes("wat", "grow_bomb")).with_memory_limit(8 << 20).run()
    assert bomb.reason is ExitReason.OUT_OF_MEMORY


def test_wasi_testsuite_style_spec(tmp_path: Path) -> None:
    # A test case as the WASI test suite writes it: <name>.wasm + <name>.json.
    spec = {"args": ["7"], "env": {"K": "V"}, "exit_code": 7, "stdout": ""}
    (tmp_path / "case.json").write_text(json.dumps(spec))
    wasm = tmp_path / "case.wasm"
    wasm.write_bytes(build_c("exit").read_bytes())
    loaded = json.loads((tmp_path / "case.json").read_text())
    result = run_wasm(wasm, args=loaded["args"], env=loaded["env"], dirs=loaded.get("dirs", []))
    assert result.exit_code == loaded["exit_code"]
    assert result.stdout_text == loaded["stdout"]


def test_engine_choice_and_errors() -> None:
    with pytest.raises(EngineUnavailable):
        run_wasm(build_c("hello"), engine="no-such-engine")
    if "wasmer" in [i.name for i in engines.available() if i.installed]:
        assert run_wasm(build_c("hello"), engine="wasmer").stdout == b"hello from wasi\n"
        with pytest.raises(CantHandle):
            run_wasm(build_c("hello"), engine="wasmer", dirs={"/d": "/tmp"})


def test_builder_carries_argv0_cwd_entry_and_precompiled(tmp_path: Path) -> None:
    args = WasiRun(build_c("args")).with_argv0("prog").with_args("x").run()
    assert args.stdout.decode().splitlines()[1:] == ["prog", "x"]

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("in cwd\n")
    files = WasiRun(build_c("files")).with_dir(tmp_path, "/d").with_cwd("/d/sub")
    assert files.with_args("read", "f.txt").run().stdout == b"in cwd\n"

    lib = WasiRun(guest_bytes("wat", "no_start"))
    assert lib.with_entry("answer").run().exit_code == 7

    engine = engines.get("wasmtime")
    artifact = engine.precompile(guest_bytes("wat", "exit42"))
    assert artifact is not None
    ran = WasiRun(b"not wasm: the artifact is what runs").with_precompiled(artifact).run()
    assert ran.exit_code == 42


_EXIT_7 = """;; a WAT guest, given as text
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 7))))"""


@pytest.mark.parametrize("engine", ["wasmtime", "wasmtime-fast", "wasmer"])
def test_wat_as_text_bytes_and_file_path(tmp_path: Path, engine: str) -> None:
    source = tmp_path / "seven.wat"
    source.write_text(_EXIT_7)
    for wasm in (_EXIT_7, _EXIT_7.encode(), source, str(source)):
        result = run_wasm(wasm, engine=engine)
        assert (result.exit_code, result.reason) == (7, ExitReason.EXITED), (wasm, result)
    assert WasiRun(_EXIT_7).on(engine).run().exit_code == 7


def test_wat_file_name_is_argv0(tmp_path: Path) -> None:
    source = tmp_path / "hello.wat"
    source.write_bytes((Path(__file__).parent / "guests" / "wat" / "hello.wat").read_bytes())
    assert run_wasm(source).stdout == b"hello from wat\n"
    assert run_wasm(str(source), argv0="x").ok


def test_invalid_wat_is_a_compile_error(tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="does not assemble"):
        run_wasm('(module (func (export "_start") (i32.bogus)))')
    bad = tmp_path / "bad.wat"
    bad.write_text("(module (oops))")
    with pytest.raises(CompileError, match=r"bad\.wat"):
        run_wasm(bad)


def test_a_binary_is_not_taken_for_wat(tmp_path: Path) -> None:
    binary = tmp_path / "exit42.wasm"
    binary.write_bytes(guest_bytes("wat", "exit42"))
    assert run_wasm(binary).exit_code == 42
    assert run_wasm(guest_bytes("wat", "exit42")).exit_code == 42

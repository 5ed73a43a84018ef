"""One conformance suite, run against every engine the registry knows.

Each test takes the ``engine`` fixture, parametrized over `wasidispatch.engines.names()`
(so a newly registered engine joins automatically). A test is skipped only when the engine
is not installed, or lacks the capability the test needs; in that case the engine must
refuse such a workload with `CantHandle` (checked by ``test_missing_capability_is_refused``).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guests import build_c, build_wat, guest_bytes
from wasidispatch import engines
from wasidispatch.engines import (
    TRAP_EXIT_CODE,
    Cancel,
    Capabilities,
    Engine,
    ExitReason,
    Limits,
    Preopen,
    RunResult,
    Stdio,
    Workload,
)
from wasidispatch.errors import (
    CantHandle,
    CompileError,
    EngineError,
    EngineUnavailable,
    IncompatibleArtifact,
)


@pytest.fixture(params=engines.names())
def engine(request: pytest.FixtureRequest) -> Engine:
    try:
        return engines.get(request.param)
    except EngineUnavailable as exc:
        pytest.skip(f"engine {request.param!r} is not available: {exc}")


def need(engine: Engine, capability: str) -> None:
    if not getattr(engine.capabilities, capability):
        pytest.skip(f"{engine.name} lacks the {capability!r} capability")


def run(engine: Engine, wasm: bytes | Path, *args: str, **kw: object) -> RunResult:
    """Run with stdin empty, stdout and stderr captured and argv[0] = "guest.wasm"."""
    kw.setdefault("stdin", Stdio.null())
    kw.setdefault("stdout", Stdio.capture())
    kw.setdefault("stderr", Stdio.capture())
    workload = Workload(wasm=wasm, argv=("guest.wasm", *args), **kw)  # type: ignore[arg-type]
    return engine.run(workload)


# -- stdout, argv, env, exit codes ----------------------------------------------------------


def test_hello_c_on_stdout(engine: Engine) -> None:
    result = run(engine, build_c("hello"))
    assert result.ok, result
    assert result.stdout == b"hello from wasi\n"
    assert result.stderr == b""


def test_hello_wat_on_stdout(engine: Engine) -> None:
    result = run(engine, guest_bytes("wat", "hello"))
    assert (result.exit_code, result.reason) == (0, ExitReason.EXITED)
    assert result.stdout == b"hello from wat\n"


def test_argv_passed_exactly_including_non_ascii(engine: Engine) -> None:
    args = ("plain", "with space", "ünïcödé ✓", "日本語", "", "--flag=1")
    result = run(engine, build_c("args"), *args)
    assert result.ok, result
    lines = result.stdout.decode("utf-8").split("\n") if result.stdout else []
    assert lines == [str(len(args) + 1), "guest.wasm", *args, ""]


def test_env_is_exactly_the_workloads(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASIDISPATCH_HOST_SECRET", "leaked")
    env = {"GREETING": "hi there", "UNICODE": "é✓", "EMPTY": ""}
    listing = run(engine, build_c("env"), env=env)
    assert listing.ok, listing
    assert listing.stdout is not None
    assert sorted(listing.stdout.decode().splitlines()) == sorted(
        f"{k}={v}" for k, v in env.items()
    )
    lookup = run(engine, build_c("env"), "GREETING", "WASIDISPATCH_HOST_SECRET", "PATH", env=env)
    assert lookup.stdout == b"hi there\n<unset>\n<unset>\n"


def test_empty_env_is_empty(engine: Engine) -> None:
    assert os.environ  # the host has an environment; the guest must not see it
    result = run(engine, build_c("env"))
    assert result.ok
    assert result.stdout == b""


@pytest.mark.parametrize("status", [0, 1, 42])
def test_exit_codes(engine: Engine, status: int) -> None:
    result = run(engine, build_c("exit"), str(status))
    assert (result.exit_code, result.reason) == (status, ExitReason.EXITED)
    assert result.ok is (status == 0)


def test_proc_exit_from_wat(engine: Engine) -> None:
    result = run(engine, guest_bytes("wat", "exit42"))
    assert (result.exit_code, result.reason) == (42, ExitReason.EXITED)


# -- traps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("guest", [("wat", "unreachable"), ("c", "trap")])
def test_unreachable_is_a_trap_with_message(engine: Engine, guest: tuple[str, str]) -> None:
    result = run(engine, guest_bytes(*guest))
    assert (result.exit_code, result.reason) == (TRAP_EXIT_CODE, ExitReason.TRAPPED)
    assert result.message
    assert "unreachable" in result.message.lower()
    assert not result.ok


# -- preopens and cwd -------------------------------------------------------------------------


def test_preopen_read_write_and_outside_fails(engine: Engine, tmp_path: Path) -> None:
    need(engine, "preopens")
    (tmp_path / "in.txt").write_text("from the host\n")
    pre = (Preopen(tmp_path, "/data"),)
    read = run(engine, build_c("files"), "read", "/data/in.txt", preopens=pre)
    assert read.ok, read
    assert read.stdout == b"from the host\n"
    write = run(engine, build_c("files"), "write", "/data/out.txt", "from the guest", preopens=pre)
    assert write.ok, write
    assert (tmp_path / "out.txt").read_text() == "from the guest"
    outside = run(engine, build_c("files"), "read", "/etc/hostname", preopens=pre)
    assert outside.exit_code == 1
    assert outside.stderr
    assert outside.stderr.startswith(b"error:")
    escape = run(engine, build_c("files"), "read", "/data/../../etc/hostname", preopens=pre)
    assert escape.exit_code == 1


def test_readonly_preopen_refuses_writes(engine: Engine, tmp_path: Path) -> None:
    need(engine, "readonly_preopens")
    (tmp_path / "in.txt").write_text("kept\n")
    pre = (Preopen(tmp_path, "/ro", readonly=True),)
    write = run(engine, build_c("files"), "write", "/ro/new.txt", "nope", preopens=pre)
    assert write.exit_code == 1, write
    assert not (tmp_path / "new.txt").exists()
    overwrite = run(engine, build_c("files"), "write", "/ro/in.txt", "nope", preopens=pre)
    assert overwrite.exit_code == 1
    assert (tmp_path / "in.txt").read_text() == "kept\n"
    read = run(engine, build_c("files"), "read", "/ro/in.txt", preopens=pre)
    assert read.ok
    assert read.stdout == b"kept\n"


def test_relative_preopen_name_as_wasi_testsuite_uses(engine: Engine, tmp_path: Path) -> None:
    need(engine, "preopens")
    (tmp_path / "a.txt").write_text("A")
    pre = (Preopen(tmp_path, "fs-tests.dir"),)
    result = run(engine, build_c("files"), "read", "fs-tests.dir/a.txt", preopens=pre)
    assert result.ok, result
    assert result.stdout == b"A"


def test_cwd_resolves_relative_paths(engine: Engine, tmp_path: Path) -> None:
    need(engine, "cwd")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("in sub")
    pre = (Preopen(tmp_path, "/data"),)
    result = run(engine, build_c("files"), "read", "f.txt", preopens=pre, cwd="/data/sub")
    assert result.ok, result
    assert result.stdout == b"in sub"


# -- stdio ------------------------------------------------------------------------------------


def test_stdin_bytes_echoed_and_stderr_captured(engine: Engine) -> None:
    data = "line one\nünïcode\n".encode() * 100
    result = run(engine, build_c("cat"), stdin=Stdio.from_bytes(data))
    assert result.ok, result
    assert result.stdout == data
    assert result.stderr == f"{len(data)} bytes\n".encode()


def test_stdin_null_is_empty(engine: Engine) -> None:
    result = run(engine, build_c("cat"), stdin=Stdio.null())
    assert result.ok
    assert result.stdout == b""
    assert result.stderr == b"0 bytes\n"


def test_stdio_files(engine: Engine, tmp_path: Path) -> None:
    need(engine, "stdio_file")
    src, out, err = tmp_path / "in", tmp_path / "out", tmp_path / "err"
    src.write_bytes(b"file input\n")
    out.write_bytes(b"old content that must be truncated")
    result = run(
        engine,
        build_c("cat"),
        stdin=Stdio.file(src),
        stdout=Stdio.file(out),
        stderr=Stdio.file(err),
    )
    assert result.ok, result
    assert result.stdout is None
    assert result.stderr is None
    assert out.read_bytes() == b"file input\n"
    assert err.read_bytes() == b"11 bytes\n"


def test_null_output_is_discarded(engine: Engine) -> None:
    result = run(engine, build_c("hello"), stdout=Stdio.null(), stderr=Stdio.null())
    assert result.ok
    assert result.stdout is None
    assert result.stderr is None


# -- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("guest", [("wat", "loop"), ("c", "loop")])
def test_infinite_loop_stopped_by_timeout(engine: Engine, guest: tuple[str, str]) -> None:
    need(engine, "timeout")
    result = run(engine, guest_bytes(*guest), limits=Limits(timeout=0.2))
    assert (result.exit_code, result.reason) == (TRAP_EXIT_CODE, ExitReason.TIMED_OUT)


def test_timeout_does_not_cut_a_short_run(engine: Engine) -> None:
    need(engine, "timeout")
    result = run(engine, build_c("hello"), limits=Limits(timeout=30))
    assert result.ok
    assert result.stdout == b"hello from wasi\n"


@pytest.mark.parametrize("guest", [("wat", "grow_bomb"), ("c", "bomb")])
def test_memory_bomb_stopped_by_cap(engine: Engine, guest: tuple[str, str]) -> None:
    need(engine, "memory_limit")
    result = run(engine, guest_bytes(*guest), limits=Limits(memory_bytes=16 << 20, timeout=60))
    assert (result.exit_code, result.reason) == (TRAP_EXIT_CODE, ExitReason.OUT_OF_MEMORY), result


def test_memory_cap_leaves_small_guests_alone(engine: Engine) -> None:
    need(engine, "memory_limit")
    result = run(engine, build_c("hello"), limits=Limits(memory_bytes=16 << 20))
    assert result.ok, result


def test_initial_memory_above_the_cap_is_out_of_memory(engine: Engine) -> None:
    need(engine, "memory_limit")
    # The C guests start with more than 64 KiB of linear memory (stack + data).
    result = run(engine, build_c("hello"), limits=Limits(memory_bytes=64 << 10))
    assert (result.exit_code, result.reason) == (TRAP_EXIT_CODE, ExitReason.OUT_OF_MEMORY)
    assert result.stdout == b""


def test_trap_far_below_the_cap_is_not_out_of_memory(engine: Engine) -> None:
    need(engine, "memory_limit")
    result = run(engine, guest_bytes("wat", "unreachable"), limits=Limits(memory_bytes=64 << 20))
    assert (result.exit_code, result.reason) == (TRAP_EXIT_CODE, ExitReason.TRAPPED)
    assert result.message
    assert "unreachable" in result.message


def test_unknown_import_is_refused(engine: Engine) -> None:
    import wasmtime

    wasm = bytes(
        wasmtime.wat2wasm(
            '(module (import "env" "host_only" (func))'
            ' (memory (export "memory") 1) (func (export "_start")))'
        )
    )
    with pytest.raises(CantHandle, match="cannot link the guest"):
        run(engine, wasm)


@pytest.mark.parametrize(
    ("capability", "limits"),
    [
        ("memory_limit", Limits(memory_bytes=1 << 70)),
        ("fuel", Limits(fuel=1 << 70)),
        ("timeout", Limits(timeout=1e300)),
    ],
    ids=["memory", "fuel", "timeout"],
)
def test_huge_limits_are_no_limit(engine: Engine, capability: str, limits: Limits) -> None:
    # Engines' APIs take 64-bit integers: a larger limit must neither wrap (to a cap of 0)
    # nor overflow into an exception.
    need(engine, capability)
    result = run(engine, build_c("hello"), limits=limits)
    assert result.ok, result
    assert result.stdout == b"hello from wasi\n"


def test_fuel_runs_out(engine: Engine) -> None:
    need(engine, "fuel")
    result = run(engine, guest_bytes("wat", "loop"), limits=Limits(fuel=100_000))
    assert (result.exit_code, result.reason) == (TRAP_EXIT_CODE, ExitReason.OUT_OF_FUEL)
    enough = run(engine, build_c("hello"), limits=Limits(fuel=10_000_000))
    assert enough.ok, enough


# -- components -------------------------------------------------------------------------------


def test_component_run(engine: Engine) -> None:
    need(engine, "components")
    result = run(engine, guest_bytes("wat", "component_hello"))
    assert result.ok, result
    assert result.stdout == b"hello from a component\n"
    failed = run(engine, guest_bytes("wat", "component_fail"))
    assert (failed.exit_code, failed.reason) == (1, ExitReason.EXITED)


def test_component_refused_by_modules_only_engine(engine: Engine) -> None:
    if engine.capabilities.components:
        pytest.skip(f"{engine.name} runs components")
    workload = Workload(wasm=guest_bytes("wat", "component_hello"), stdin=Stdio.null())
    assert not engine.can_handle(workload)
    with pytest.raises(CantHandle, match="component"):
        engine.run(workload)


# -- precompile -------------------------------------------------------------------------------


@pytest.mark.parametrize("guest", [("c", "hello"), ("wat", "component_hello")])
def test_precompiled_bytes_and_path(engine: Engine, tmp_path: Path, guest: tuple[str, str]) -> None:
    need(engine, "precompile")
    wasm = guest_bytes(*guest)
    if guest[1].startswith("component"):
        need(engine, "components")
    artifact = engine.precompile(wasm)
    assert artifact is not None
    assert artifact != wasm
    expected = run(engine, wasm).stdout
    from_bytes = run(engine, wasm, precompiled=artifact)
    assert from_bytes.ok
    assert from_bytes.stdout == expected
    assert from_bytes.timings.compile < 1  # sanity: nothing absurd
    path = tmp_path / "artifact.bin"
    path.write_bytes(artifact)
    from_path = run(engine, wasm, precompiled=path)
    assert from_path.ok
    assert from_path.stdout == expected


def test_fingerprint_is_stable_hex(engine: Engine) -> None:
    fp = engine.fingerprint()
    assert fp == engine.fingerprint()
    assert fp
    assert all(c in "0123456789abcdef" for c in fp)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\x7fELF\x02\x01\x01" + b"\0" * 60, b"#!/bin/sh\necho hi\n", b"(module)", b"\0asm"],
    ids=["empty", "elf", "script", "wat-text", "magic-only"],
)
def test_not_wasm_is_a_compile_error(engine: Engine, data: bytes) -> None:
    with pytest.raises(CompileError):
        run(engine, data)


def test_truncated_wasm_is_a_compile_error(engine: Engine) -> None:
    wasm = build_c("hello").read_bytes()
    with pytest.raises(CompileError):
        run(engine, wasm[: len(wasm) // 2])


def test_module_without_start_is_refused(engine: Engine) -> None:
    with pytest.raises(CantHandle, match="_start"):
        run(engine, guest_bytes("wat", "no_start"))


def test_entry_export_runs_another_function(engine: Engine) -> None:
    need(engine, "entry_export")
    result = run(engine, guest_bytes("wat", "no_start"), entry="answer")
    assert (result.exit_code, result.reason) == (7, ExitReason.EXITED)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("a\0b",), {}, "NUL"),
        (("\udcff",), {}, "UTF-8"),
        ((), {"NAME\0": "v"}, "NUL"),
        ((), {"NAME": "v\0"}, "NUL"),
        ((), {"A=B": "v"}, "'='"),
        ((), {"": "v"}, "'='"),
    ],
    ids=["argv-nul", "argv-surrogate", "env-name-nul", "env-value-nul", "env-name-eq", "env-empty"],
)
def test_strings_a_guest_cannot_see_as_given_are_refused(
    engine: Engine, args: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    # Cut short at a NUL, unencodable, or another variable: never run with something else.
    workload = Workload(
        wasm=build_c("hello"), argv=("guest.wasm", *args), env=env, stdin=Stdio.null()
    )
    assert says in engine.can_handle(workload).reason
    with pytest.raises(CantHandle, match=says):
        run(engine, build_c("hello"), *args, env=env)


def test_missing_preopen_dir_is_an_engine_error(engine: Engine, tmp_path: Path) -> None:
    need(engine, "preopens")
    with pytest.raises(EngineError, match="does not exist"):
        run(engine, build_c("hello"), preopens=(Preopen(tmp_path / "missing", "/data"),))


def test_foreign_precompiled_artifact_is_incompatible(engine: Engine) -> None:
    need(engine, "precompile")
    wasm = build_c("hello").read_bytes()
    artifact = engine.precompile(wasm)
    assert artifact is not None
    tampered = bytearray(artifact)
    tampered[-10] ^= 0xFF
    for foreign in (b"definitely not an artifact", wasm, bytes(tampered), artifact[:100]):
        with pytest.raises(IncompatibleArtifact):
            run(engine, wasm, precompiled=foreign)


@pytest.mark.parametrize("stack", [0, 4 << 20, 1 << 40, -1])
def test_dangerous_max_wasm_stack_is_refused(engine: Engine, stack: int) -> None:
    workload = _plain(limits=Limits(max_wasm_stack=stack))
    assert not engine.can_handle(workload)
    with pytest.raises(CantHandle):
        engine.run(workload)


def _plain(**kw: object) -> Workload:
    """A workload every engine takes, plus ``kw``."""
    kw.setdefault("wasm", build_c("hello"))
    return Workload(argv=("guest.wasm",), stdin=Stdio.null(), **kw)  # type: ignore[arg-type]


def _needs(capability: str, tmp: Path) -> Workload:
    makers: dict[str, Callable[[], Workload]] = {
        "preopens": lambda: _plain(preopens=(Preopen(tmp, "/d"),)),
        "readonly_preopens": lambda: _plain(preopens=(Preopen(tmp, "/d", readonly=True),)),
        "cwd": lambda: _plain(preopens=(Preopen(tmp, "/d"),), cwd="/d"),
        "stdio_file": lambda: _plain(stdout=Stdio.file(tmp / "o")),
        "memory_limit": lambda: _plain(limits=Limits(memory_bytes=1 << 24)),
        "timeout": lambda: _plain(limits=Limits(timeout=5)),
        "fuel": lambda: _plain(limits=Limits(fuel=10**9)),
        "entry_export": lambda: _plain(wasm=build_wat("no_start"), entry="answer"),
        "components": lambda: _plain(wasm=build_wat("component_hello")),
    }
    return makers[capability]()


_REFUSABLE = (
    "preopens",
    "readonly_preopens",
    "cwd",
    "stdio_file",
    "memory_limit",
    "timeout",
    "fuel",
    "entry_export",
    "components",
)


@pytest.mark.parametrize("capability", _REFUSABLE)
def test_missing_capability_is_refused(engine: Engine, tmp_path: Path, capability: str) -> None:
    assert capability in Capabilities.__dataclass_fields__
    if getattr(engine.capabilities, capability):
        pytest.skip(f"{engine.name} has {capability!r}")
    assert engine.can_handle(_plain())  # so the refusal below is the capability's
    workload = _needs(capability, tmp_path)
    verdict = engine.can_handle(workload)
    assert not verdict
    assert verdict.reason
    with pytest.raises(CantHandle):
        engine.run(workload)


# -- descriptors, FIFOs and sockets as stdio; Cancel (issue 11, items 2, 6, 7) ---------------

# fd_write "oops\n" to stderr, then trap: stderr written before a trap must be kept.
_STDERR_THEN_TRAP = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "oops\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    unreachable))"""


class _Peer(threading.Thread):
    """The other end of a FIFO or a pipe, on a thread: writes ``data`` or reads to EOF."""

    def __init__(self, target: Callable[[], bytes | None]) -> None:
        super().__init__(daemon=True)
        self._target = target
        self.result: bytes | None = None

    def run(self) -> None:
        self.result = self._target()

    def done(self) -> bytes | None:
        self.join(30)
        assert not self.is_alive(), "the peer thread is stuck"
        return self.result


def _write_path(path: Path, data: bytes) -> _Peer:
    def write() -> None:
        with open(path, "wb") as f:
            f.write(data)

    peer = _Peer(write)
    peer.start()
    return peer


def _read_path(path: Path) -> _Peer:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    peer = _Peer(read)
    peer.start()
    return peer


def _read_fd(fd: int) -> _Peer:
    def read() -> bytes:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    peer = _Peer(read)
    peer.start()
    return peer


def test_fifos_as_stdin_stdout_and_stderr(engine: Engine, tmp_path: Path) -> None:
    names = {name: tmp_path / name for name in ("in", "out", "err")}
    for path in names.values():
        os.mkfifo(path)
    data = os.urandom(200_000)  # more than a pipe holds: the bytes must stream
    writer = _write_path(names["in"], data)
    out, err = _read_path(names["out"]), _read_path(names["err"])
    result = run(
        engine,
        build_c("cat"),
        stdin=Stdio.file(names["in"]),
        stdout=Stdio.file(names["out"]),
        stderr=Stdio.file(names["err"]),
    )
    writer.done()
    assert result.ok, result
    assert out.done() == data
    assert err.done() == b"200000 bytes\n"


def test_pipe_descriptors_as_stdio_are_used_and_left_open(engine: Engine) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    data = os.urandom(150_000)

    def feed() -> None:
        os.write(in_w, data)
        os.close(in_w)

    feeder = _Peer(feed)
    feeder.start()
    out, err = _read_fd(out_r), _read_fd(err_r)
    try:
        result = run(
            engine,
            build_c("cat"),
            stdin=Stdio.fd(in_r),
            stdout=Stdio.fd(out_w),
            stderr=Stdio.fd(err_w),
        )
        for fd in (in_r, out_w, err_w):
            os.fstat(fd)  # still open: the caller owns them
    finally:
        os.close(out_w)
        os.close(err_w)
        os.close(in_r)
    feeder.done()
    assert result.ok, result
    assert out.done() == data
    assert err.done() == b"150000 bytes\n"
    os.close(out_r)
    os.close(err_r)


def test_one_socket_as_stdin_and_stdout(engine: Engine) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"through a socket\n")
        theirs.shutdown(socket.SHUT_WR)
        result = run(
            engine, build_c("cat"), stdin=Stdio.fd(ours.fileno()), stdout=Stdio.fd(ours.fileno())
        )
        ours.shutdown(socket.SHUT_WR)
        assert result.ok, result
        assert result.stderr == b"17 bytes\n"
        assert theirs.makefile("rb").read() == b"through a socket\n"


def test_regular_file_descriptor_output_keeps_its_offset(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "log"
    with open(path, "wb") as f:
        f.write(b"earlier line\n")
        f.flush()
        result = run(engine, build_c("hello"), stdout=Stdio.fd(f.fileno()))
        assert result.ok, result
    assert path.read_bytes() == b"earlier line\nhello from wasi\n"  # appended, not truncated


def test_character_device_as_stdin(engine: Engine) -> None:
    result = run(engine, build_c("cat"), stdin=Stdio.file("/dev/null"))
    assert result.ok, result
    assert result.stderr == b"0 bytes\n"


def test_fifo_stdin_whose_writer_never_closes_times_out(engine: Engine, tmp_path: Path) -> None:
    need(engine, "timeout")
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR)  # a writer that never writes nor closes
    try:
        result = run(engine, build_c("cat"), stdin=Stdio.file(fifo), limits=Limits(timeout=0.3))
    finally:
        os.close(holder)
    assert result.reason is ExitReason.TIMED_OUT, result
    assert result.exit_code == TRAP_EXIT_CODE


def test_pipe_stdin_that_never_ends_times_out(engine: Engine) -> None:
    need(engine, "timeout")
    r, w = os.pipe()
    try:
        os.write(w, b"some but not all\n")
        result = run(engine, build_c("cat"), stdin=Stdio.fd(r), limits=Limits(timeout=0.3))
    finally:
        os.close(r)
        os.close(w)
    assert result.reason is ExitReason.TIMED_OUT, result


def test_fifo_stdout_without_a_reader_times_out(engine: Engine, tmp_path: Path) -> None:
    need(engine, "timeout")
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    result = run(engine, build_c("hello"), stdout=Stdio.file(fifo), limits=Limits(timeout=0.3))
    assert result.reason is ExitReason.TIMED_OUT, result


def test_bad_descriptors_are_typed_errors(engine: Engine) -> None:
    for bad in (-1, True, "3", 2.0):
        with pytest.raises(EngineError, match=r"Stdio\.fd"):
            Stdio.fd(bad)  # type: ignore[arg-type]
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(EngineError, match=f"descriptor {r}"):
        run(engine, build_c("cat"), stdin=Stdio.fd(r))


def test_stderr_written_before_a_trap_is_kept(engine: Engine) -> None:
    result = run(engine, build_wat_text(_STDERR_THEN_TRAP))
    assert result.reason is ExitReason.TRAPPED, result
    assert result.stderr == b"oops\n"


def build_wat_text(text: str) -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm(text))


def _cancel_later(cancel: Cancel, signum: int) -> threading.Thread:
    def fire() -> None:
        time.sleep(0.2)  # not an assertion: the guest must merely be running by then
        cancel.cancel(signum)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("guest", [("c", "loop"), ("wat", "loop")])
def test_cancel_stops_a_running_guest(engine: Engine, guest: tuple[str, str]) -> None:
    need(engine, "cancel")
    cancel = Cancel()
    firing = _cancel_later(cancel, signal.SIGTERM)
    result = run(engine, guest_bytes(*guest), cancel=cancel)
    firing.join()
    assert (result.exit_code, result.reason) == (128 + 15, ExitReason.CANCELLED), result
    assert result.message is not None
    assert "cancelled by signal 15" in result.message


def test_cancel_stops_a_guest_blocked_on_a_fifo(engine: Engine, tmp_path: Path) -> None:
    need(engine, "cancel")
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR)
    cancel = Cancel()
    firing = _cancel_later(cancel, signal.SIGKILL)
    try:
        result = run(engine, build_c("cat"), stdin=Stdio.file(fifo), cancel=cancel)
    finally:
        os.close(holder)
    firing.join()
    assert (result.exit_code, result.reason) == (137, ExitReason.CANCELLED), result


def test_cancel_before_the_run_never_starts_the_guest(engine: Engine, tmp_path: Path) -> None:
    need(engine, "cancel")
    cancel = Cancel()
    cancel.cancel(2)
    result = run(engine, build_c("hello"), cancel=cancel)
    assert (result.exit_code, result.reason) == (130, ExitReason.CANCELLED)
    assert result.message == "cancelled by signal 2"
    assert not result.stdout


def test_an_unfired_cancel_changes_nothing(engine: Engine) -> None:
    need(engine, "cancel")
    cancel = Cancel()
    result = run(engine, build_c("exit"), "3", cancel=cancel, limits=Limits(timeout=30))
    assert (result.exit_code, result.reason) == (3, ExitReason.EXITED)
    cancel.cancel()  # after the run: nothing to stop
    assert cancel.signum == signal.SIGKILL


def test_with_stdio_on_a_prepared_workload(engine: Engine, tmp_path: Path) -> None:
    precompiled = engine.precompile(build_c("cat").read_bytes())
    base = Workload(
        wasm=build_c("cat"),
        argv=("cat",),
        precompiled=precompiled,
        stdin=Stdio.null(),
        stdout=Stdio.capture(),
        stderr=Stdio.capture(),
    )
    for data in (b"first run\n", b"second\n"):
        workload = base.with_stdio(stdin=Stdio.from_bytes(data))
        assert workload.precompiled is precompiled
        assert workload.stdout == base.stdout
        result = engine.run(workload)
        assert result.ok, result
        assert result.stdout == data
    assert base.stdin == Stdio.null()  # the prepared workload is unchanged
    assert base.with_stdio() is base
    with pytest.raises(EngineError, match="stdin"):
        base.with_stdio(stdin="not a Stdio")  # type: ignore[arg-type]


def test_cancel_handle_is_thread_safe_and_first_signal_wins() -> None:
    cancel = Cancel()
    seen: list[int] = []
    cancel.subscribe(lambda: seen.append(1))
    unsubscribed = cancel.subscribe(lambda: seen.append(2))
    unsubscribed()
    threads = [threading.Thread(target=cancel.cancel, args=(s,)) for s in range(1, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cancel.cancelled
    assert cancel.signum in range(1, 30)
    assert seen == [1]  # once, and not the unsubscribed one
    late: list[int] = []
    cancel.subscribe(lambda: late.append(1))  # already cancelled: called at once
    assert late == [1]
    for bad in (0, 128, -9, True, "9"):
        with pytest.raises(EngineError, match="signal"):
            Cancel().cancel(bad)  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="Cancel"):
        Workload(wasm=b"").with_cancel("x")  # type: ignore[arg-type]
    assert Workload(wasm=b"").with_cancel(cancel).cancel is cancel


def test_endless_stdin_is_not_read_ahead(engine: Engine) -> None:
    # /dev/zero never ends: an engine that read stdin to EOF before starting the guest (as
    # Wasmer's did) would never start it, and grow without bound meanwhile.
    result = run(engine, build_c("hello"), stdin=Stdio.file("/dev/zero"))
    assert result.ok, result
    assert result.stdout == b"hello from wasi\n"


def test_endless_stdin_read_by_the_guest_ends_at_the_timeout(engine: Engine) -> None:
    need(engine, "timeout")
    result = run(
        engine,
        build_c("cat"),
        stdin=Stdio.file("/dev/zero"),
        stdout=Stdio.null(),
        limits=Limits(timeout=0.3),
    )
    assert result.reason is ExitReason.TIMED_OUT, result


_EXTREMES = [1e308, float("inf"), float("nan"), -1, 0, 1 << 70, 1.5, True, "5"]


@pytest.mark.parametrize("field", ["timeout", "memory_bytes", "fuel", "max_wasm_stack"])
@pytest.mark.parametrize("value", _EXTREMES, ids=repr)
def test_limits_at_the_extremes_are_typed_errors_or_clamps(
    engine: Engine, field: str, value: object
) -> None:
    workload = Workload(
        wasm=build_c("hello"),
        argv=("guest.wasm",),
        stdin=Stdio.null(),
        stdout=Stdio.capture(),
        limits=Limits(**{field: value}),  # type: ignore[arg-type]
    )
    verdict = engine.can_handle(workload)
    error: Exception | None = None
    result: RunResult | None = None
    try:
        result = engine.run(workload)
    except (CantHandle, EngineError) as exc:  # typed; anything else fails the test
        error = exc
    if error is not None:
        assert not verdict, f"can_handle took what run refused: {error}"
        assert field in str(error) or "wasmer-sdk" in str(error), error
        return
    assert verdict, "run took what can_handle refused"
    assert result is not None
    if value == 0 and field in ("memory_bytes", "fuel"):
        assert result.reason in (ExitReason.OUT_OF_MEMORY, ExitReason.OUT_OF_FUEL), result
    else:
        assert result.ok, result  # a clamp: so large a limit is no limit at all


def test_a_failing_cancel_callback_neither_skips_others_nor_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from wasidispatch.engines import Cancel

    seen: list[str] = []

    def broken() -> None:
        raise RuntimeError("loop is closed")

    cancel = Cancel()
    cancel.subscribe(broken)
    cancel.subscribe(lambda: seen.append("second"))
    cancel.cancel(15)  # must not raise
    assert seen == ["second"]
    assert cancel.signum == 15
    assert "a Cancel callback failed" in caplog.text

"""What is particular to the Wasmer engine: the async bridge, refusals, and translations.

The shared behaviour is in ``test_engines_conformance.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.guests import build_c, guest_bytes
from wasidispatch.engines import Engine, ExitReason, Limits, Preopen, Stdio, Workload

pytest.importorskip("wasmer_sdk", reason="wasmer-sdk is not installed")

from wasidispatch._bundles import wasm_bundle
from wasidispatch.engines.wasmer import WasmerEngine
from wasidispatch.errors import CantHandle
from wasidispatch.executor import WasmExecutor
from wasidispatch.oci.bundle import Bundle


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
        ({"preopens": (Preopen("/tmp", "/tmp"),)}, "/workspace"),
        ({"preopens": (Preopen("/tmp", "/workspace/t", readonly=True),)}, "read-only"),
        ({"preopens": (Preopen("/tmp", "/workspace/../etc"),)}, ".."),
        ({"cwd": "/workspace"}, "working directory"),
        ({"argv": ()}, "argv"),
        ({"limits": Limits(memory_bytes=1 << 20)}, "memory"),
        ({"limits": Limits(fuel=10)}, "fuel"),
        ({"entry": "answer"}, "_start"),
        ({"precompiled": b"x"}, "precompiled"),
    ],
)
def test_refusals_name_the_reason(workload_kw: dict[str, object], reason: str) -> None:
    engine = WasmerEngine()
    if "argv" in workload_kw:
        workload = Workload(wasm=build_c("hello"), argv=(), stdin=Stdio.null())
    else:
        workload = _w(build_c("hello"), **workload_kw)
    verdict = engine.can_handle(workload)
    assert not verdict
    assert reason in verdict.reason
    with pytest.raises(CantHandle, match=reason):
        engine.run(workload)


@pytest.mark.parametrize(
    "argv0", ["guest", "/bin/app.wasm", "ünï cödé ✓", 'quote" back\\slash', "tab\there", "."]
)
def test_argv0_is_exactly_the_workloads(argv0: str) -> None:
    engine = WasmerEngine()
    try:
        result = engine.run(
            Workload(
                wasm=build_c("args"),
                argv=(argv0, "x"),
                stdin=Stdio.null(),
                stdout=Stdio.capture(),
            )
        )
    finally:
        engine.close()
    assert result.ok, result
    assert result.stdout == f"2\n{argv0}\nx\n".encode()


def test_cwd_root_is_honoured() -> None:
    engine = WasmerEngine()
    assert engine.can_handle(_w(build_c("hello"), cwd="/"))
    assert engine.run(_w(build_c("hello"), cwd="/")).stdout == b"hello from wasi\n"


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


# -- preopens: mirrored into the sandbox ----------------------------------------------------


def _files(engine: WasmerEngine, *args: str, **kw: object) -> tuple[int, bytes, bytes]:
    result = engine.run(_w(build_c("files"), *args, **kw))
    assert result.stdout is not None
    assert result.stderr is not None
    return result.exit_code, result.stdout, result.stderr


def test_writable_preopen_under_workspace_round_trips(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from the host\n")
    (tmp_path / "keep.txt").write_text("old")
    (tmp_path / "keep.txt").chmod(0o600)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.txt").write_text("deep")
    (tmp_path / "empty").mkdir()
    pre = (Preopen(tmp_path, "/workspace/data"),)
    engine = WasmerEngine()
    try:
        assert engine.can_handle(_w(build_c("hello"), preopens=pre))
        assert _files(engine, "read", "/workspace/data/sub/deep.txt", preopens=pre)[:2] == (
            0,
            b"deep",
        )
        listing = _files(engine, "list", "/workspace/data", preopens=pre)
        assert sorted(listing[1].split()) == [b"empty", b"in.txt", b"keep.txt", b"sub"]
        assert _files(engine, "write", "/workspace/data/out.txt", "new", preopens=pre)[0] == 0
        assert _files(engine, "write", "/workspace/data/keep.txt", "changed", preopens=pre)[0] == 0
        assert _files(engine, "write", "/workspace/data/empty/e.txt", "e", preopens=pre)[0] == 0
        outside = _files(engine, "read", "/etc/hostname", preopens=pre)
    finally:
        engine.close()
    assert (tmp_path / "out.txt").read_text() == "new"
    assert (tmp_path / "keep.txt").read_text() == "changed"
    assert (tmp_path / "keep.txt").stat().st_mode & 0o777 == 0o600  # mode kept
    assert (tmp_path / "empty" / "e.txt").read_text() == "e"
    assert (tmp_path / "in.txt").read_text() == "from the host\n"
    assert not [p for p in tmp_path.rglob(".wasidispatch-*")]  # no temporary file left
    assert outside[0] == 1
    assert outside[2].startswith(b"error:")


def _unlink_guest(path: str) -> bytes:
    """A guest that unlinks ``path`` (relative to the root preopen, fd 3) and exits with
    the errno (0 on success)."""
    wasmtime = pytest.importorskip("wasmtime")
    data = path.encode()
    return bytes(
        wasmtime.wat2wasm(
            f"""(module
  (import "wasi_snapshot_preview1" "path_unlink_file"
    (func $unlink (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{data.decode()}")
  (func (export "_start") (call $exit (call $unlink (i32.const 3) (i32.const 16)
    (i32.const {len(data)})))))"""
        )
    )


def test_files_removed_by_the_guest_are_removed_on_the_host(tmp_path: Path) -> None:
    (tmp_path / "gone.txt").write_text("x")
    (tmp_path / "stays.txt").write_text("y")
    result = WasmerEngine().run(
        _w(_unlink_guest("workspace/gone.txt"), preopens=(Preopen(tmp_path, "/workspace"),))
    )
    assert (result.exit_code, result.reason) == (0, ExitReason.EXITED), result
    assert not (tmp_path / "gone.txt").exists()
    assert (tmp_path / "stays.txt").read_text() == "y"


def test_host_symlinks_never_lead_out_of_the_preopen(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "real.txt").write_text("real")
    os.symlink(secret, shared / "escape.txt")
    os.symlink("real.txt", shared / "alias.txt")
    os.symlink("/etc", shared / "etc")
    pre = (Preopen(shared, "/workspace"),)
    engine = WasmerEngine()
    try:
        listing = _files(engine, "list", "/workspace", preopens=pre)
        escape = _files(engine, "read", "/workspace/escape.txt", preopens=pre)
        alias = _files(engine, "read", "/workspace/alias.txt", preopens=pre)
        result = engine.run(
            _w(build_c("files"), "write", "/workspace/alias.txt", "w", preopens=pre)
        )
    finally:
        engine.close()
    assert sorted(listing[1].split()) == [b"alias.txt", b"real.txt"]
    assert escape[0] == 1
    assert alias[:2] == (0, b"real")
    # A write to a host symlink's mirror is not written through it; the result says so.
    assert result.ok
    assert (shared / "real.txt").read_text() == "real"
    assert (shared / "alias.txt").is_symlink()
    assert result.message is not None
    assert "alias.txt not written back" in result.message
    assert secret.read_text() == "host secret"


def test_mirror_limit_refuses_a_big_preopen(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"\0" * 4096)
    engine = WasmerEngine(mirror_limit=1024)
    workload = _w(build_c("hello"), preopens=(Preopen(tmp_path, "/workspace"),))
    verdict = engine.can_handle(workload)
    assert not verdict
    assert "1024 bytes" in verdict.reason
    with pytest.raises(CantHandle, match="mirror_limit"):
        engine.run(workload)


def test_discard_writes_mirrors_readonly_and_outside_preopens(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("kept\n")
    pre = (Preopen(tmp_path, "/ro", readonly=True), Preopen(tmp_path, "rel.dir"))
    assert not WasmerEngine().can_handle(_w(build_c("hello"), preopens=pre))
    engine = WasmerEngine(discard_writes=True)
    try:
        assert engine.can_handle(_w(build_c("hello"), preopens=pre))
        read = _files(engine, "read", "/ro/in.txt", preopens=pre)
        relative = _files(engine, "read", "rel.dir/in.txt", preopens=pre)
        write = _files(engine, "write", "/ro/in.txt", "nope", preopens=pre)
    finally:
        engine.close()
    assert read[:2] == (0, b"kept\n")
    assert relative[:2] == (0, b"kept\n")
    # The documented deviation: the write succeeds inside the run and is discarded.
    assert write[0] == 0
    assert (tmp_path / "in.txt").read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_no_cache_directory_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    engine = WasmerEngine(cache_root=tmp_path / "cache")
    try:
        assert engine.run(_w(build_c("hello"))).ok
    finally:
        engine.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# -- OCI bundles through WasmExecutor --------------------------------------------------------


def _executor(engine: str | WasmerEngine) -> WasmExecutor:
    return WasmExecutor(engine, stdin=Stdio.null(), stdout=Stdio.capture(), stderr=Stdio.capture())


def test_bundle_with_readonly_root_is_refused_by_a_default_engine(tmp_path: Path) -> None:
    bundle = wasm_bundle(tmp_path / "b", build_c("hello"))
    with pytest.raises(CantHandle, match="read-only"):
        _executor(WasmerEngine()).validate(Bundle.load(bundle))
    # The executor loads "wasmer" by name with discard_writes (docs/dispatch.md) and says so.
    decision = _executor("wasmer").validate(Bundle.load(bundle))
    assert decision.evidence[-1].detail == "runs on wasmer"


def test_bundles_run_with_discard_writes(tmp_path: Path) -> None:
    engine = WasmerEngine(discard_writes=True)
    executor = _executor(engine)
    out = tmp_path / "out"
    out.mkdir()
    try:
        files = wasm_bundle(
            tmp_path / "files",
            build_c("files"),
            ("/app.wasm", "read", "/etc/motd"),
            extra_files={"/etc/motd": b"from the rootfs\n"},
        )
        read = executor.run(executor.prepare(files))
        args = executor.run(
            executor.prepare(wasm_bundle(tmp_path / "args", build_c("args"), ("/app.wasm", "é x")))
        )
        env = executor.run(
            executor.prepare(
                wasm_bundle(
                    tmp_path / "env", build_c("env"), ("/app.wasm",), env=("A=1", "B=two words")
                )
            )
        )
        status = executor.exec(
            Bundle.load(wasm_bundle(tmp_path / "exit", build_c("exit"), ("/app.wasm", "42")))
        )
        escape = executor.run(
            executor.prepare(
                wasm_bundle(
                    tmp_path / "escape", build_c("files"), ("/app.wasm", "read", "/../config.json")
                )
            )
        )
        mount = {"destination": "/workspace/out", "type": "bind", "source": str(out)}
        written = executor.run(
            executor.prepare(
                wasm_bundle(
                    tmp_path / "mount",
                    build_c("files"),
                    ("/app.wasm", "write", "/workspace/out/result.txt", "done"),
                    mounts=[{**mount, "options": ["rbind", "rw"]}],
                )
            )
        )
        rootfs_write = executor.run(
            executor.prepare(
                wasm_bundle(
                    tmp_path / "rootw", build_c("files"), ("/app.wasm", "write", "/new.txt", "x")
                )
            )
        )
    finally:
        engine.close()
    assert read.ok, read
    assert read.stdout == b"from the rootfs\n"
    assert args.stdout == "2\n/app.wasm\né x\n".encode()
    assert env.stdout is not None
    assert sorted(env.stdout.decode().splitlines()) == ["A=1", "B=two words"]
    assert status == 42
    assert escape.exit_code == 1  # the bundle dir (config.json) is not visible
    assert written.ok, written
    assert (out / "result.txt").read_text() == "done"
    # The read-only rootfs's deviation: the write succeeds in the run, the host is untouched.
    assert rootfs_write.ok
    assert not (tmp_path / "rootw" / "rootfs" / "new.txt").exists()


# One interpreter's life with Wasmer: one run, then the interpreter exits at once.
_AT_EXIT_SCRIPT = """
import wasmtime
from wasidispatch.engines import Stdio, Workload
from wasidispatch.engines.wasmer import WasmerEngine

ok = bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "_start")))'))
workload = Workload(wasm=ok, argv=("x",), stdin=Stdio.null(), stdout=Stdio.capture())
result = WasmerEngine().run(workload)
assert result.ok, result
"""


def test_fresh_interpreters_never_die_by_a_signal_at_exit() -> None:
    # Measured with this script and 300 interpreters: 12 died (SIGABRT "FATAL: exception not
    # rethrown", SIGSEGV, SIGBUS) while finalizing before the fix, none after. At that rate
    # (4%), 30 interpreters catch the old behaviour about 7 times in 10.
    n = 30
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    died: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    for _ in range(n):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-c", _AT_EXIT_SCRIPT],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
        if len(procs) >= 2:  # two at a time: the machine has other work
            died.extend(_reap(procs.pop(0)))
    for proc in procs:
        died.extend(_reap(proc))
    assert not died, died


def _reap(proc: subprocess.Popen[bytes]) -> list[str]:
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        return [f"exit {proc.returncode}: {err.decode(errors='replace')[-300:]}"]
    return []


def _create_probe(op: str, fd: int) -> bytes:
    """A guest that calls ``path_create_directory`` or ``path_open(O_CREAT)`` on ``fd`` with
    the name "newdir" and exits with the errno it got."""
    import wasmtime

    calls = {
        "mkdir": f"(call $mkdir (i32.const {fd}) (i32.const 16) (i32.const 6))",
        "creat": (
            f"(call $open (i32.const {fd}) (i32.const 0) (i32.const 16) (i32.const 6) "
            "(i32.const 1) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) "
            "(i32.const 32))"
        ),
    }
    return bytes(
        wasmtime.wat2wasm(
            f"""(module
  (import "wasi_snapshot_preview1" "path_create_directory"
    (func $mkdir (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "newdir")
  (func (export "_start") (call $exit {calls[op]})))"""
        )
    )


@pytest.mark.parametrize("op", ["mkdir", "creat"])
def test_the_first_preopen_refuses_creating_a_documented_sdk_limit(op: str) -> None:
    # wasmer-sdk 0.5's WASIX gives every guest the preopens /, . and / (fds 3, 4, 5); the
    # first one refuses creating (errno 2 ACCES for mkdir, 63 PERM for O_CREAT) where the
    # other two allow it. docs/engines.md cites this test: it fails if the SDK changes.
    engine = WasmerEngine()
    errnos = {fd: engine.run(_w(_create_probe(op, fd))).exit_code for fd in (3, 4, 5)}
    engine.close()
    assert errnos[3] in (2, 63), errnos
    assert errnos[4] == 0, errnos
    assert errnos[5] == 0, errnos


def test_a_cwd_refusal_names_the_sdk_limit() -> None:
    verdict = WasmerEngine().can_handle(_w(build_c("hello"), cwd="/workspace/sub"))
    assert not verdict
    assert "/workspace/sub" in verdict.reason
    assert "preopens" in verdict.reason
    assert "relative paths" in verdict.reason

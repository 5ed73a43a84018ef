"""Executors on real bundles: Wasm on every available engine, Linux in Debian's runc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.guests import build_c, build_wat
from wasidispatch import engines
from wasidispatch._bundles import busybox_bundle, wasm_bundle
from wasidispatch.engines import ExitReason, Stdio
from wasidispatch.errors import CantHandle, SpecError
from wasidispatch.executor import (
    ANNOTATION_ENGINE,
    ANNOTATION_HANDLER,
    ANNOTATION_TIMEOUT,
    ANNOTATION_VARIANT,
    DispatchExecutor,
    LinuxExecutor,
    WasmExecutor,
    decide,
    parse_duration,
)
from wasidispatch.oci.bundle import Bundle
from wasidispatch.runc.spec import LeanBundle

needs_runc = pytest.mark.skipif(
    shutil.which("runc") is None or os.geteuid() != 0, reason="needs Debian's runc, as root"
)
INSTALLED = [i.name for i in engines.available() if i.installed]


def _runc_leftovers() -> set[str]:
    """Our private runc state dirs and container processes still around."""
    tmp = Path(tempfile.gettempdir())
    dirs = {str(p) for p in tmp.glob("wasidispatch-linux-*")}
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    running = {line for line in procs.splitlines() if "wasidispatch-linux-" in line}
    return dirs | running


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    before = _runc_leftovers()
    yield
    assert _runc_leftovers() - before == set()


def _capture(tmp_path: Path, engine: str | None = None) -> tuple[WasmExecutor, Path]:
    out = tmp_path / "stdout.txt"
    executor = WasmExecutor(
        engine, stdin=Stdio.null(), stdout=Stdio.file(out), stderr=Stdio.capture()
    )
    return executor, out


@pytest.fixture
def hello_bundle(tmp_path: Path) -> Path:
    return wasm_bundle(tmp_path / "hello", build_c("hello"))


@pytest.fixture
def files_bundle(tmp_path: Path) -> Path:
    return wasm_bundle(
        tmp_path / "files",
        build_c("files"),
        ("/bin/files", "read", "/etc/motd"),
        extra_files={"/etc/motd": b"inside the rootfs\n"},
    )


# ------------------------------------------------------------------------------ Wasm


@pytest.mark.parametrize("engine", INSTALLED)
def test_wasm_bundle_runs_on_each_engine(engine: str, tmp_path: Path, files_bundle: Path) -> None:
    executor, out = _capture(tmp_path, engine)
    assert executor.exec(Bundle.load(files_bundle)) == 0
    assert out.read_text() == "inside the rootfs\n"
    assert executor.validate(Bundle.load(files_bundle)).evidence[-1].detail == f"runs on {engine}"


@pytest.mark.parametrize("engine", INSTALLED)
def test_cli_run_pipes_stdin_and_exits_with_the_guest_code(engine: str, tmp_path: Path) -> None:
    cat = wasm_bundle(tmp_path / "cat", build_c("cat"), ("/cat",))
    proc = subprocess.run(
        [sys.executable, "-m", "wasidispatch", "run", "--no-cache", "--engine", engine, str(cat)],
        input=b"piped into the guest\n",
        capture_output=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, b"piped into the guest\n"), proc.stderr
    code = wasm_bundle(tmp_path / "exit", build_c("exit"), ("/exit", "42"))
    argv = [sys.executable, "-m", "wasidispatch", "run", "--no-cache", "--engine", engine]
    proc = subprocess.run([*argv, str(code)], stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 42


def test_argv_env_cwd_mapped_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASIDISPATCH_HOST_SECRET", "leak")
    bundle = wasm_bundle(
        tmp_path / "env", build_c("env"), ("/env",), env=["A=1", "B=héllo=x", "PATH=/bin"]
    )
    executor, out = _capture(tmp_path)
    assert executor.exec(Bundle.load(bundle)) == 0
    lines = out.read_text().splitlines()
    assert sorted(lines) == ["A=1", "B=héllo=x", "PATH=/bin"]

    args = wasm_bundle(tmp_path / "args", build_c("args"), ("/args", "één", "two words"))
    executor, out = _capture(tmp_path)
    assert executor.exec(Bundle.load(args)) == 0
    assert out.read_text().splitlines()[1:] == ["/args", "één", "two words"]


def test_guest_sees_only_its_rootfs(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host only\n")
    for target in ("/../host-secret.txt", "/../../../../etc/passwd", "/etc/hostname", str(secret)):
        bundle = wasm_bundle(tmp_path / "b", build_c("files"), ("/files", "read", target))
        executor, out = _capture(tmp_path)
        assert executor.exec(Bundle.load(bundle)) == 1, target
        assert out.read_text() == ""


def test_readonly_root_and_bind_mounts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "in.txt").write_text("read-only input\n")
    mounts = [
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind", "rw"]},
        {"destination": "/in", "type": "none", "source": str(ro), "options": ["bind", "ro"]},
    ]

    def run(*args: str, readonly: bool = True) -> int:
        bundle = wasm_bundle(
            tmp_path / "b", build_c("files"), ("/files", *args), mounts=mounts, readonly=readonly
        )
        return WasmExecutor(stdout=Stdio.null(), stderr=Stdio.null()).exec(Bundle.load(bundle))

    assert run("write", "/data/out.txt", "written") == 0
    assert (data / "out.txt").read_text() == "written"
    assert run("read", "/in/in.txt") == 0
    assert run("write", "/in/new.txt", "nope") == 1
    assert not (ro / "new.txt").exists()
    assert run("write", "/root-file.txt", "nope") == 1
    assert run("write", "/root-file.txt", "yes", readonly=False) == 0
    assert (tmp_path / "b" / "rootfs" / "root-file.txt").read_text() == "yes"


def test_memory_limit_from_spec_stops_a_grow_bomb(tmp_path: Path) -> None:
    bundle = wasm_bundle(tmp_path / "bomb", build_wat("grow_bomb"), memory_limit=4 << 20)
    executor = WasmExecutor("wasmtime")
    prepared = executor.prepare(bundle)
    assert prepared.workload.limits.memory_bytes == 4 << 20
    result = executor.run(prepared)
    assert result.exit_code == 137
    assert result.reason in (ExitReason.OUT_OF_MEMORY, ExitReason.TRAPPED)


def test_timeout_annotation(tmp_path: Path) -> None:
    bundle = wasm_bundle(
        tmp_path / "loop", build_wat("loop"), annotations={ANNOTATION_TIMEOUT: "300ms"}
    )
    executor = WasmExecutor("wasmtime")
    result = executor.run(executor.prepare(bundle))
    assert (result.exit_code, result.reason) == (137, ExitReason.TIMED_OUT)


@pytest.mark.parametrize(
    ("text", "seconds"), [("2", 2.0), ("1.5s", 1.5), ("250ms", 0.25), ("2m", 120.0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "soon",
        "-1",
        "0",
        "-0",
        "nan",
        "inf",
        "-inf",
        "1e308m",
        "1e-400",
        "9" * 5000,
        "1\x00",
        "\ud800",
        "1\ud800s",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(SpecError, match=ANNOTATION_TIMEOUT) as exc:
        parse_duration(text)
    assert len(str(exc.value)) < 200  # a 5000-digit value is not echoed whole


@pytest.mark.parametrize("value", [None, 5, 2.5, b"1s", ["1"]])
def test_parse_duration_rejects_non_strings(value: object) -> None:
    with pytest.raises(SpecError, match=f"{ANNOTATION_TIMEOUT} must be a string"):
        parse_duration(value)  # type: ignore[arg-type]


def test_parse_duration_keeps_a_huge_finite_value() -> None:
    assert parse_duration("1e308") == 1e308  # documented: engines treat it as no timeout


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"\A-?[0-9.e+_-]{0,20}(ms|s|m)?\Z"))
def test_parse_duration_property(text: str) -> None:
    """Any text: a finite positive float, or SpecError naming the annotation."""
    try:
        seconds = parse_duration(text)
    except SpecError as exc:
        assert ANNOTATION_TIMEOUT in str(exc)  # noqa: PT017 - either outcome is checked
    else:
        assert isinstance(seconds, float)
        assert 0 < seconds < float("inf")


def test_entry_function_syntax(tmp_path: Path) -> None:
    bundle = wasm_bundle(tmp_path / "lib", build_wat("no_start"), ("/lib.wasm#answer",))
    executor = WasmExecutor("wasmtime")
    prepared = executor.prepare(bundle)
    assert prepared.workload.entry == "answer"
    assert prepared.workload.argv == ("/lib.wasm#answer",)
    assert executor.run(prepared).exit_code == 7


def test_engine_annotation_and_fallback_explained(tmp_path: Path) -> None:
    bundle = wasm_bundle(
        tmp_path / "c", build_wat("component_hello"), annotations={ANNOTATION_ENGINE: "wasmtime"}
    )
    decision = WasmExecutor().validate(Bundle.load(bundle))
    assert decision.evidence[-1].detail == "runs on wasmtime"
    plain = wasm_bundle(tmp_path / "p", build_wat("component_hello"))
    decision = WasmExecutor(("wasmer", "wasmtime")).validate(Bundle.load(plain))
    details = [e.detail for e in decision.evidence]
    assert details[-1] == "runs on wasmtime"
    assert any(d.startswith("passed over wasmer: ") for d in details)


def test_component_bundle_runs(tmp_path: Path) -> None:
    bundle = wasm_bundle(tmp_path / "c", build_wat("component_hello"))
    executor, out = _capture(tmp_path)
    assert executor.exec(Bundle.load(bundle)) == 0
    assert out.read_bytes()


def test_wasm_layers_take_precedence_over_the_rootfs(tmp_path: Path) -> None:
    from wasidispatch.oci.layout import ImageLayout, pack_wasm, wasm_layers

    layout = ImageLayout.create(tmp_path / "layout")
    pack_wasm(layout, build_c("hello").read_bytes(), "v1")
    layers = wasm_layers(layout, "v1")
    # args[0] names an ELF in the rootfs: the layers still decide
    bundle = busybox_bundle(tmp_path / "b", ["/bin/busybox"])
    decision = decide(Bundle.load(bundle), layers=layers)
    assert decision.kind == "wasm"
    assert decision.evidence[0].source == "layers"
    executor, out = _capture(tmp_path)
    assert executor.exec(Bundle.load(bundle), layers=layers) == 0
    assert out.read_text().strip()


def test_precompile_cache_is_used(tmp_path: Path, hello_bundle: Path) -> None:
    from wasidispatch.cache import PrecompileCache

    cache = PrecompileCache(tmp_path / "cache")
    executor = WasmExecutor("wasmtime", cache=cache, stdout=Stdio.null())
    assert executor.exec(Bundle.load(hello_bundle)) == 0
    prepared = executor.prepare(hello_bundle)
    assert isinstance(prepared.workload.precompiled, Path)
    assert executor.run(prepared).ok
    stats = cache.stats()
    assert (stats.misses, stats.hits) == (1, 1)


# ------------------------------------------------------------------------------ decision


@pytest.mark.parametrize(
    ("annotations", "kind"),
    [
        ({ANNOTATION_HANDLER: "wasm"}, "wasm"),
        ({ANNOTATION_HANDLER: "wasmtime"}, "wasm"),
        ({ANNOTATION_VARIANT: "compat"}, "wasm"),
        ({ANNOTATION_VARIANT: "compat-smart"}, "linux"),
        ({}, "linux"),
    ],
)
def test_annotations_over_an_elf_entrypoint(
    tmp_path: Path, annotations: dict[str, str], kind: str
) -> None:
    bundle = busybox_bundle(tmp_path / "b", ["sh"], annotations=annotations)
    decision = decide(Bundle.load(bundle))
    assert decision.kind == kind
    if annotations:
        assert decision.evidence[0].source == "annotation"


def test_unknown_handler_is_refused(tmp_path: Path) -> None:
    bundle = busybox_bundle(tmp_path / "b", ["sh"], annotations={ANNOTATION_HANDLER: "krun"})
    with pytest.raises(CantHandle, match="krun"):
        decide(Bundle.load(bundle))


def test_bytes_not_suffixes_decide(tmp_path: Path) -> None:
    wasm_named_sh = wasm_bundle(tmp_path / "w", build_c("hello"), ("/app.sh",))
    elf_named_wasm = busybox_bundle(tmp_path / "e", ["/bin/app.wasm", "echo", "from-elf"])
    shutil.copy(tmp_path / "e" / "rootfs" / "bin" / "busybox", tmp_path / "e/rootfs/bin/app.wasm")
    (tmp_path / "e/rootfs/bin/app.wasm").chmod(0o755)
    smart = {ANNOTATION_VARIANT: "compat-smart"}
    wasm_named_sh_smart = wasm_bundle(
        tmp_path / "ws", build_c("hello"), ("/a.sh",), annotations=smart
    )
    assert decide(Bundle.load(wasm_named_sh)).kind == "wasm"
    assert decide(Bundle.load(wasm_named_sh_smart)).kind == "wasm"
    assert decide(Bundle.load(elf_named_wasm)).kind == "linux"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "not an executable file|does not exist|no such"),
        ("unknown", "neither Wasm nor a Linux executable"),
        ("escape-link", "escape|outside|leave"),
        ("dotdot", "escape|outside|leave|above"),
        ("wat-text", "neither Wasm nor a Linux executable"),
    ],
)
def test_refusals_are_clear(tmp_path: Path, setup: str, message: str) -> None:
    bundle_dir = tmp_path / "b"
    if setup == "missing":
        wasm_bundle(bundle_dir, b"", ("/app.wasm",))
        (bundle_dir / "rootfs" / "app.wasm").unlink()
    elif setup == "unknown":
        wasm_bundle(bundle_dir, b"PK\x03\x04 a zip, not a program", ("/app",))
    elif setup == "escape-link":
        wasm_bundle(bundle_dir, b"", ("/app",))
        (bundle_dir / "rootfs" / "app").unlink()
        (bundle_dir / "rootfs" / "app").symlink_to("../../../../../../bin/busybox")
    elif setup == "dotdot":
        wasm_bundle(bundle_dir, b"", ("/../../../bin/busybox",))
    else:
        wasm_bundle(bundle_dir, b"(module)", ("/app.wat",))
    with pytest.raises(CantHandle, match=message):
        DispatchExecutor([WasmExecutor("wasmtime"), LinuxExecutor()]).explain(bundle_dir)


def test_linux_entrypoint_without_exec_bit(tmp_path: Path) -> None:
    bundle = busybox_bundle(tmp_path / "b", ["/bin/busybox"])
    (tmp_path / "b" / "rootfs" / "bin" / "busybox").chmod(0o644)
    with pytest.raises(CantHandle, match="chmod"):
        LinuxExecutor().validate(Bundle.load(bundle))


def test_linux_validation_is_memoized_per_bundle(tmp_path: Path) -> None:
    """`exec` after `validate` (what `DispatchExecutor` does) reuses the decision; an edited
    config.json is decided again."""
    bundle = Bundle.load(busybox_bundle(tmp_path / "b", ["echo", "one"]))
    executor = LinuxExecutor()
    first = executor.validate(bundle)
    assert first.executor == "linux"
    assert executor.validate(bundle) is first
    busybox_bundle(tmp_path / "b", ["/bin/busybox", "echo", "two"])  # rewrites config.json
    again = executor.validate(Bundle.load(tmp_path / "b"))
    assert again is not first
    assert "'/bin/busybox'" in again.reason


def test_dispatch_memoizes_and_notices_edits(tmp_path: Path) -> None:
    bundle = wasm_bundle(tmp_path / "b", build_c("hello"))
    executor = DispatchExecutor([WasmExecutor("wasmtime"), LinuxExecutor()])
    first = executor.explain(bundle)
    assert executor.explain(bundle) is first
    busybox_bundle(tmp_path / "b", ["/bin/busybox"])  # rewrites config.json
    time.sleep(0.01)
    os.utime(tmp_path / "b" / "config.json")
    assert executor.explain(bundle).kind == "linux"


# ------------------------------------------------------------------------------ Linux


@needs_runc
@pytest.mark.parametrize("status", [0, 3])
def test_linux_bundle_in_runc(tmp_path: Path, status: int) -> None:
    bundle = busybox_bundle(tmp_path / "b", ["sh", "-c", f"echo from runc; exit {status}"])
    out = tmp_path / "out.txt"
    with out.open("wb") as fh:
        code = LinuxExecutor(stdout=fh.fileno()).exec(Bundle.load(bundle))
    assert code == status
    assert out.read_text() == "from runc\n"


@needs_runc
def test_mixed_bundles_through_one_dispatcher(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with out.open("wb") as fh:
        executor = DispatchExecutor(
            [
                WasmExecutor(stdout=Stdio.file(tmp_path / "wasm.txt")),
                LinuxExecutor(stdout=fh.fileno()),
            ]
        )
        linux = busybox_bundle(tmp_path / "l", ["echo", "sidecar"])
        wasm = wasm_bundle(tmp_path / "w", build_c("hello"))
        assert executor.explain(linux).executor == "linux"
        assert executor.explain(wasm).executor == "wasm"
        assert executor.exec(linux) == 0
        assert executor.exec(wasm) == 0
    assert out.read_text() == "sidecar\n"
    assert (tmp_path / "wasm.txt").read_text()


@needs_runc
def test_interrupted_caller_leaves_no_container(tmp_path: Path) -> None:
    bundle = busybox_bundle(tmp_path / "b", ["sleep", "3607"])  # a marker no other job uses
    code = (
        "import sys\n"
        "from wasidispatch.executor import LinuxExecutor\n"
        "from wasidispatch.oci.bundle import Bundle\n"
        f"root = {str(tmp_path / 'state')!r}\n"
        f"LinuxExecutor(root=root).exec(Bundle.load({str(bundle)!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    state = tmp_path / "state"
    while time.monotonic() < deadline and not any(state.glob("*/state.json")):
        time.sleep(0.05)
    assert any(state.glob("*/state.json")), "container never started"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    listed = subprocess.run(
        ["runc", "--root", str(state), "list", "-q"], capture_output=True, text=True, check=True
    )
    assert listed.stdout.strip() == ""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 3607" not in ps


@pytest.mark.parametrize("where", ["/bin", "/work"])
def test_bare_wasm_name_needs_no_exec_bit(tmp_path: Path, where: str) -> None:
    # runwasi finds Wasm entrypoints in PATH, then cwd, whatever their mode bits
    wasm_bundle(
        tmp_path / "b",
        b"",
        ("/unused",),
        extra_files={f"{where}/app.wasm": build_c("hello").read_bytes()},
    )
    (tmp_path / "b" / "rootfs" / "unused").unlink()
    config = tmp_path / "b" / "config.json"
    doc = json.loads(config.read_text())
    doc["process"]["args"] = ["app.wasm"]
    doc["process"]["cwd"] = "/work"
    doc["process"]["env"] = ["PATH=/bin"]
    config.write_text(json.dumps(doc))
    loaded = Bundle.load(tmp_path / "b")
    decision = decide(loaded)
    assert decision.kind == "wasm"
    assert decision.entrypoint == (tmp_path / "b" / "rootfs" / where.lstrip("/") / "app.wasm")
    assert not os.access(decision.entrypoint, os.X_OK)


def test_bare_non_wasm_name_without_exec_bit_is_refused(tmp_path: Path) -> None:
    bundle = busybox_bundle(tmp_path / "b", ["busybox"])
    (tmp_path / "b" / "rootfs" / "bin" / "busybox").chmod(0o644)
    with pytest.raises(CantHandle, match="not an executable file"):
        decide(Bundle.load(bundle))


def test_run_takes_per_run_stdio_fifos(tmp_path: Path) -> None:
    """One prepared container, run twice with different FIFO stdio (`Stdio.fd`), the prepared
    workload unchanged."""
    import threading

    executor = WasmExecutor("wasmtime-fast")
    prepared = executor.prepare(wasm_bundle(tmp_path / "cat", build_c("cat")))
    before = prepared.workload
    for text in (b"first\n", b"second\n"):
        fin, fout = tmp_path / f"in{len(text)}", tmp_path / f"out{len(text)}"
        os.mkfifo(fin)
        os.mkfifo(fout)
        got: list[bytes] = []

        def feed(path: Path = fin, data: bytes = text) -> None:
            with path.open("wb") as fh:
                fh.write(data)

        def drain(path: Path = fout, sink: list[bytes] = got) -> None:
            with path.open("rb") as fh:
                sink.append(fh.read())

        threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
        for t in threads:
            t.start()
        rfd = os.open(fin, os.O_RDONLY)
        wfd = os.open(fout, os.O_WRONLY)
        try:
            result = executor.run(prepared, stdin=Stdio.fd(rfd), stdout=Stdio.fd(wfd))
        finally:
            os.close(rfd)
            os.close(wfd)
        for t in threads:
            t.join(timeout=30)
        assert result.exit_code == 0
        assert got == [text]
    assert prepared.workload is before


@pytest.mark.parametrize("engine", ["wasmtime-fast", "wasmtime"])
def test_run_cancelled_from_another_thread(tmp_path: Path, engine: str) -> None:
    import threading

    from wasidispatch.engines import Cancel

    executor = WasmExecutor(engine)
    prepared = executor.prepare(wasm_bundle(tmp_path / "loop", build_wat("loop")))
    cancel = Cancel()
    timer = threading.Timer(0.3, cancel.cancel, args=(signal.SIGTERM,))
    timer.start()
    try:
        result = executor.run(prepared, cancel=cancel)
    finally:
        timer.cancel()
    assert (result.exit_code, result.reason) == (128 + signal.SIGTERM, ExitReason.CANCELLED)


def test_engine_options_reach_the_engines_it_makes(tmp_path: Path) -> None:
    """``engine_options`` are the constructor arguments of engines made by name: a bad one is
    the engine's own error in the refusal, a good one (serial compilation) runs the guest."""
    bundle = wasm_bundle(tmp_path / "hello", build_c("hello"))
    refused = WasmExecutor("wasmtime", engine_options={"wasmtime": {"opt_level": "fastest"}})
    with pytest.raises(CantHandle, match="opt_level 'fastest'"):
        refused.plan(LeanBundle.load(bundle))
    serial = WasmExecutor(
        "wasmtime-fast",
        engine_options={"wasmtime-fast": {"parallel_compilation": False}},
        stdout=Stdio.capture(),
    )
    result = serial.run(serial.prepare(LeanBundle.load(bundle)))
    assert (result.exit_code, result.stdout) == (0, b"hello from wasi\n")

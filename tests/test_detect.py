"""wasidispatch.detect on real inputs: the machine's ELF binaries, a real arm64 busybox, objects
cross-compiled by clang, Wasm built from WAT by wasmtime, real scripts, and real paths (symlinks,
FIFOs, sockets, a 1 GiB sparse file)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import platform
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

import wasidispatch
from tests._fixtures import FixtureUnavailable, busybox_arm64
from wasidispatch.detect import (
    MAX_SYMLINK_HOPS,
    PREFIX_SIZE,
    SCRIPT_LINE_MAX,
    Detected,
    ElfInfo,
    ScriptInfo,
    WasmInfo,
    resolve_in_root,
    sniff,
    sniff_file,
    sniff_path,
)
from wasidispatch.errors import DetectionError

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"
FORMATS = {"wasm-module", "wasm-component", "wasm", "wasm-text", "elf", "script", "unknown"}

MODULE_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "_start"))
)
"""
COMPONENT_WAT = """
(component
  (core module $m (func (export "run")))
  (core instance $i (instantiate $m))
)
"""

# The machine's own architecture in OCI terms, for the binaries found on it.
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64", "s390x": "s390x"}.get(
    platform.machine(), platform.machine()
)


@pytest.fixture(scope="session")
def module_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm(MODULE_WAT))


@pytest.fixture(scope="session")
def component_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm(COMPONENT_WAT))


@pytest.fixture(scope="session")
def arm64_busybox() -> Path:
    try:
        return busybox_arm64()
    except FixtureUnavailable as exc:
        pytest.skip(f"no real arm64 binary: {exc}")


def _elf(path: str | Path) -> ElfInfo:
    d = sniff_path(path)
    assert d.format == "elf", d
    assert d.elf is not None
    return d.elf


# --- ELF -----------------------------------------------------------------------------------------


def test_bin_true_is_a_host_elf() -> None:
    e = _elf("/bin/true")
    assert e.architecture == HOST_ARCH
    assert e.bits == struct.calcsize("P") * 8
    assert e.endianness == sys.byteorder
    assert e.file_type in {"exec", "dyn"}
    assert sniff_path("/bin/true").is_linux
    assert not sniff_path("/bin/true").is_wasm


def test_python_executable_follows_the_venv_symlink() -> None:
    assert Path(sys.executable).is_symlink() or Path(sys.executable).is_file()
    assert _elf(sys.executable).architecture == HOST_ARCH


def test_shared_object_is_dyn() -> None:
    spec = importlib.util.find_spec("_ctypes")
    assert spec is not None
    assert spec.origin is not None
    assert spec.origin.endswith(".so")
    e = _elf(spec.origin)
    assert e.file_type == "dyn"
    assert e.architecture == HOST_ARCH


@pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="busybox-static not installed")
def test_static_busybox_is_exec_with_linux_abi() -> None:
    e = _elf("/bin/busybox")
    assert e.file_type == "exec"  # static, not PIE
    assert e.os_abi in {"linux", "sysv"}


def test_real_arm64_busybox(arm64_busybox: Path) -> None:
    d = sniff_path(arm64_busybox)
    assert d.elf == ElfInfo(
        bits=64, endianness="little", machine=183, architecture="arm64", file_type="exec",
        os_abi="linux",  # Debian's static busybox is marked ELFOSABI_GNU
    )  # fmt: skip
    assert str(d).startswith("elf arm64 64-bit little-endian exec")


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed (make system-deps)")
@pytest.mark.parametrize(
    ("target", "arch", "bits", "endianness"),
    [
        ("x86_64-linux-gnu", "amd64", 64, "little"),
        ("i386-linux-gnu", "386", 32, "little"),
        ("aarch64-linux-gnu", "arm64", 64, "little"),
        ("armv7-linux-gnueabihf", "arm", 32, "little"),
        ("riscv64-linux-gnu", "riscv64", 64, "little"),
        ("powerpc64le-linux-gnu", "ppc64le", 64, "little"),
        ("powerpc64-linux-gnu", "ppc64", 64, "big"),
        ("s390x-linux-gnu", "s390x", 64, "big"),
        ("mips64el-linux-gnuabi64", "mips64le", 64, "little"),
        ("mips-linux-gnu", "mips", 32, "big"),
    ],
)
def test_objects_cross_compiled_by_clang(
    tmp_path: Path, target: str, arch: str, bits: int, endianness: str
) -> None:
    obj = tmp_path / f"{target}.o"
    subprocess.run(
        ["clang", f"--target={target}", "-ffreestanding", "-nostdinc", "-c", "-x", "c", "-",
         "-o", str(obj)],
        input=b"int answer(void) { return 42; }\n", check=True, capture_output=True,
    )  # fmt: skip
    e = _elf(obj)
    assert (e.architecture, e.bits, e.endianness, e.file_type) == (arch, bits, endianness, "rel")


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed (make system-deps)")
def test_os_abi_of_a_freebsd_object(tmp_path: Path) -> None:
    obj = tmp_path / "f.o"
    subprocess.run(
        ["clang", "--target=x86_64-unknown-freebsd", "-ffreestanding", "-nostdinc", "-c", "-x",
         "c", "-", "-o", str(obj)],
        input=b"int f(void) { return 1; }\n", check=True, capture_output=True,
    )  # fmt: skip
    assert _elf(obj).os_abi == "freebsd"


def elf_header(bits: int, little: bool, machine: int, e_type: int = 2, os_abi: int = 0) -> bytes:
    """A bare ELF file header, only for machines no compiler here targets."""
    end = "<" if little else ">"
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1 if little else 2, 1, os_abi]) + bytes(8)
    if bits == 64:
        rest = struct.pack(end + "HHIQQQIHHHHHH", e_type, machine, 1, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0)
    else:
        rest = struct.pack(end + "HHIIIIIHHHHHH", e_type, machine, 1, 0, 0, 0, 0, 52, 0, 0, 0, 0, 0)
    return ident + rest


@pytest.mark.parametrize(
    ("bits", "little", "machine", "arch"),
    [
        (64, True, 258, "loong64"),
        (64, False, 43, "sparc64"),
        (64, False, 183, "arm64be"),
        (32, True, 258, None),  # loongarch32 has no Go/OCI name
        (64, True, 0x1234, None),  # unknown machine keeps its number
    ],
)
def test_rarer_machines(bits: int, little: bool, machine: int, arch: str | None) -> None:
    d = sniff(elf_header(bits, little, machine))
    assert d.elf is not None
    assert (d.elf.machine, d.elf.architecture, d.elf.bits) == (machine, arch, bits)
    if arch is None:
        assert f"machine={machine}" in str(d)


@pytest.mark.parametrize(
    ("e_type", "name"),
    [(0, "none"), (1, "rel"), (2, "exec"), (3, "dyn"), (4, "core"), (0xFE00, "0xfe00")],
)
def test_file_types(e_type: int, name: str) -> None:
    d = sniff(elf_header(64, True, 62, e_type=e_type, os_abi=3))
    assert d.elf is not None
    assert (d.elf.file_type, d.elf.os_abi) == (name, "linux")


def test_elf_header_must_be_complete_and_valid() -> None:
    good = elf_header(64, True, 62)
    assert sniff(good[:63]).reason == "truncated ELF header (63 of 64 bytes)"
    assert sniff(elf_header(32, True, 3)[:51]).format == "unknown"
    assert sniff(b"\x7fELF\x03" + good[5:]).reason == "ELF with invalid class 3"
    assert sniff(b"\x7fELF\x02\x00" + good[6:]).reason == "ELF with invalid data encoding 0"


# --- Wasm ---------------------------------------------------------------------------------------


def test_module_from_wat(module_wasm: bytes) -> None:
    d = sniff(module_wasm)
    assert d == Detected("wasm-module", wasm=WasmInfo(version=1, layer=0))
    assert d.is_wasm
    assert not d.is_linux
    assert str(d) == "wasm-module version=0x01 layer=0"


def test_component_from_wat(component_wasm: bytes) -> None:
    d = sniff(component_wasm)
    assert d.format == "wasm-component"
    assert d.wasm == WasmInfo(version=0x0D, layer=1)
    assert d.is_wasm
    assert not d.is_linux


@pytest.mark.parametrize(("version", "layer"), [(0x0A, 1), (0x0C, 1), (2, 0), (1, 1), (0x0D, 0)])
def test_other_wasm_versions_and_layers(module_wasm: bytes, version: int, layer: int) -> None:
    data = module_wasm[:4] + struct.pack("<HH", version, layer) + module_wasm[8:]
    d = sniff(data)
    assert d.format == "wasm"
    assert d.wasm == WasmInfo(version, layer)
    assert d.is_wasm


def test_wasm_preamble_truncated_at_every_length(module_wasm: bytes) -> None:
    for n in range(4, 8):
        assert sniff(module_wasm[:n]).reason == f"truncated Wasm header ({n} of 8 bytes)"
    assert sniff(module_wasm[:8]).format == "wasm-module"


def test_examples_build_and_detect(tmp_path: Path) -> None:
    wats = sorted(EXAMPLES.glob("detect-*.wat"))
    assert {p.name for p in wats} >= {"detect-module.wat", "detect-component.wat"}
    for wat in wats:
        assert sniff_path(wat).format == "wasm-text"
        expected = "wasm-component" if "component" in wat.name else "wasm-module"
        assert sniff(bytes(wasmtime.wat2wasm(wat.read_text()))).format == expected


# --- WebAssembly text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b"(module)",
        b"(component)",
        b"( module $m)",
        b"  \t\r\n(module\n)",
        b";; a line comment\n(module)",
        b"(; block (; nested ;) comment ;)\n(component (core module))",
        b"(;\xff binary junk in a comment ;)(module)",
        b"\xef\xbb\xbf(module)",
        b"(module;;comment\n)",
        b"(module(func))",
        b"(module",  # cut at the end of what was read
    ],
)
def test_wasm_text(text: bytes) -> None:
    d = sniff(text)
    assert d.format == "wasm-text"
    assert not d.is_wasm
    assert not d.is_linux


@pytest.mark.parametrize(
    "text",
    [b"(func)", b"(modules)", b"(; never closed (module)", b"((module))", b"; (module)", b"  "],
)
def test_not_wasm_text(text: bytes) -> None:
    assert sniff(text).format == "unknown"


def test_real_wat_compiles_and_is_text(module_wasm: bytes) -> None:
    assert bytes(wasmtime.wat2wasm(MODULE_WAT)) == module_wasm
    assert sniff(MODULE_WAT.encode()).format == "wasm-text"
    assert sniff(COMPONENT_WAT.encode()).format == "wasm-text"


# --- scripts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "interpreter", "argument"),
    [
        (b"#!/bin/sh\necho hi\n", "/bin/sh", None),
        (b"#!/usr/bin/env python3\n", "/usr/bin/env", "python3"),
        (b"#! /usr/bin/env  -S  python3 -u \t\n", "/usr/bin/env", "-S  python3 -u"),
        (b"#!/bin/sh\r\n", "/bin/sh", None),
        (b"#!/usr/bin/env python3\r\n", "/usr/bin/env", "python3"),
        (b"#!/bin/bash\t-e\n", "/bin/bash", "-e"),
        (b"#!/bin/sh", "/bin/sh", None),  # no newline: the file is one line
        (b"#!/bin/sh\0ignored\n", "/bin/sh", None),  # NUL ends the interpreter, no argument
        (b"#!/bin/sh -x\0ignored\n", "/bin/sh", "-x"),
        ("#!/opt/ünï/sh\n".encode(), "/opt/ünï/sh", None),
    ],
)
def test_scripts(data: bytes, interpreter: str, argument: str | None) -> None:
    d = sniff(data)
    assert d.script == ScriptInfo(interpreter, argument), d
    assert d.is_linux
    assert not d.is_wasm


@pytest.mark.parametrize("data", [b"#!\n", b"#!   \t\n", b"#!", b"#!\r\n"])
def test_script_without_interpreter(data: bytes) -> None:
    assert sniff(data).reason == "#! line names no interpreter"


def test_script_line_is_capped_like_the_kernel() -> None:
    # An interpreter path that does not end within the kernel's buffer: refused.
    long_interp = b"#!/" + b"i" * 300
    assert "256-byte limit" in (sniff(long_interp).reason or "")
    assert "256-byte limit" in (sniff(long_interp + b"\n").reason or "")
    # An argument running past it is cut at 255 bytes of line, as the kernel passes it.
    data = b"#!/bin/sh " + b"a" * 400 + b"\n"
    d = sniff(data)
    assert d.script is not None
    assert d.script.argument is not None
    assert len(b"#!/bin/sh ") + len(d.script.argument) == SCRIPT_LINE_MAX - 1


def test_real_script_on_disk() -> None:
    pip = Path(sys.executable).parent / "pip"
    d = sniff_path(pip)
    assert d.script is not None
    assert Path(d.script.interpreter).name.startswith("python")


def test_script_line_never_shadows_a_wasm_preamble() -> None:
    # The #! line and the Wasm preamble are memoized in separate tables.
    assert sniff(b"#!\0asm\x01\0\0\0\n").format == "unknown"
    assert sniff(b"#!/\0asm\x01\0\0\0\n").format == "script"
    assert sniff(b"\0asm\x01\0\0\0").format == "wasm-module"


# --- totality (hypothesis) ----------------------------------------------------------------------


def _check_value(d: Detected) -> None:
    assert d.format in FORMATS
    assert (d.format == "unknown") == (d.reason is not None)
    assert str(d)
    json.dumps(d.to_dict())
    assert d.is_wasm == (d.format in {"wasm-module", "wasm-component", "wasm"})
    assert d.is_linux == (d.format in {"elf", "script"})


@settings(max_examples=500)
@given(st.binary(max_size=PREFIX_SIZE + 64))
def test_sniff_is_total(data: bytes) -> None:
    d = sniff(data)
    _check_value(d)
    assert sniff(bytearray(data)) == d == sniff(memoryview(data))


_MAGICS = [b"\0asm", b"\x7fELF\x01\x01", b"\x7fELF\x02\x02", b"#!", b"(", b";;", b"(;", b" "]


@settings(max_examples=500)
@given(st.sampled_from(_MAGICS), st.binary(max_size=300))
def test_sniff_is_total_after_every_magic(magic: bytes, rest: bytes) -> None:
    _check_value(sniff(magic + rest))


@given(
    st.sampled_from(_MAGICS),
    st.binary(max_size=100),
    st.sampled_from(b" \n;()(module)a\0"),
    st.binary(min_size=1, max_size=100),
)
def test_only_the_prefix_counts(magic: bytes, head: bytes, fill: int, tail: bytes) -> None:
    data = (magic + head).ljust(PREFIX_SIZE, bytes([fill])) + tail
    assert sniff(data) == sniff(data[:PREFIX_SIZE])


def test_unknown_reads_well() -> None:
    assert str(sniff(b"")) == "unknown: empty"
    assert str(sniff(b"MZ\x90\x00")) == "unknown: no known signature (starts with 4d5a9000)"


def test_non_bytes_input_is_unknown_not_an_exception() -> None:
    d = sniff("#!/bin/sh")  # type: ignore[arg-type]
    assert d.format == "unknown"
    assert "str" in (d.reason or "")


def test_two_dimensional_memoryview(module_wasm: bytes) -> None:
    view = memoryview(module_wasm[:8]).cast("B", (2, 4))
    assert sniff(view).format == "wasm-module"


def test_truncating_real_headers_at_every_length_never_raises(
    module_wasm: bytes, component_wasm: bytes
) -> None:
    samples = [
        Path("/bin/true").read_bytes()[:PREFIX_SIZE],
        module_wasm,
        component_wasm,
        b"#!/usr/bin/env python3\r\nprint()\n",
        MODULE_WAT.encode(),
        elf_header(32, False, 8),
    ]
    for sample in samples:
        full = sniff(sample)
        assert full.format != "unknown"
        for n in range(min(len(sample), 300) + 1):
            _check_value(sniff(sample[:n]))


# --- the values ---------------------------------------------------------------------------------


def test_values_are_frozen_hashable_and_picklable(component_wasm: bytes) -> None:
    d = sniff(component_wasm)
    with pytest.raises(AttributeError):
        d.format = "elf"
    with pytest.raises(AttributeError):
        del d.wasm
    with pytest.raises(AttributeError):
        d.extra = 1
    assert pickle.loads(pickle.dumps(d)) == d
    assert {d, Detected("wasm-component", wasm=WasmInfo(13, 1))} == {d}
    assert d != Detected("wasm", wasm=WasmInfo(13, 1))
    assert repr(d) == (
        "Detected(format='wasm-component', reason=None, elf=None, "
        "wasm=WasmInfo(version=13, layer=1), script=None)"
    )
    match d:
        case Detected("wasm-component", wasm=WasmInfo(version, layer)):
            assert (version, layer) == (13, 1)
        case _:
            pytest.fail("pattern did not match")


def test_to_dict_per_format(module_wasm: bytes) -> None:
    assert sniff(b"#!/bin/sh -e\n").to_dict() == {
        "format": "script", "is_wasm": False, "is_linux": True,
        "script": {"interpreter": "/bin/sh", "argument": "-e"},
    }  # fmt: skip
    assert sniff(b"nope").to_dict() == {
        "format": "unknown", "is_wasm": False, "is_linux": False,
        "reason": "no known signature (starts with 6e6f7065)",
    }  # fmt: skip
    elf = sniff_path("/bin/true").to_dict()
    assert elf["elf"]["architecture"] == HOST_ARCH
    assert elf["is_linux"] is True
    assert sniff(b"(module)").to_dict() == {
        "format": "wasm-text", "is_wasm": False, "is_linux": False,
    }  # fmt: skip


def test_public_names() -> None:
    assert wasidispatch.sniff is sniff
    assert wasidispatch.resolve_in_root is resolve_in_root
    assert wasidispatch.Detected is Detected


# --- files and paths ----------------------------------------------------------------------------


class CountingReader(io.RawIOBase):
    """Wraps a real file and counts the bytes handed out."""

    def __init__(self, f: io.BufferedReader) -> None:
        self.f = f
        self.read_bytes = 0
        self.calls = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        data = self.f.read(size)
        self.read_bytes += len(data)
        return data


@pytest.fixture
def sparse_wasm(tmp_path: Path, module_wasm: bytes) -> Path:
    path = tmp_path / "huge.wasm"
    with path.open("wb") as f:
        f.write(module_wasm)
        f.truncate(1 << 30)  # 1 GiB, sparse
    assert path.stat().st_size == 1 << 30
    return path


def test_sniff_file_reads_only_the_prefix_of_a_1gib_file(sparse_wasm: Path) -> None:
    with sparse_wasm.open("rb") as f:
        counting = CountingReader(f)
        d = sniff_file(counting)  # type: ignore[arg-type]
        assert f.tell() == PREFIX_SIZE
    assert d.format == "wasm-module"
    assert counting.read_bytes == PREFIX_SIZE


def _rchar() -> int:
    with open("/proc/self/io", "rb") as f:
        for line in f:
            if line.startswith(b"rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _bytes_read_by(path: Path) -> tuple[Detected, int]:
    """The kernel's count of bytes this process read() while sniffing ``path``."""
    sniff_path(path)  # warm up
    r0 = _rchar()
    r1 = _rchar()
    d = sniff_path(path)
    r2 = _rchar()
    return d, (r2 - r1) - (r1 - r0)  # minus what reading /proc/self/io itself costs


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_sniff_path_reads_only_the_prefix_of_a_1gib_file(sparse_wasm: Path) -> None:
    d, read = _bytes_read_by(sparse_wasm)
    assert d.format == "wasm-module"
    assert 8 <= read <= SCRIPT_LINE_MAX  # a binary header needs no more than the first read


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_text_like_1gib_file_is_read_up_to_the_prefix_only(tmp_path: Path) -> None:
    path = tmp_path / "blank.wat"
    with path.open("wb") as f:
        f.write(b";; a comment, then a gigabyte of NUL bytes\n")
        f.truncate(1 << 30)
    d, read = _bytes_read_by(path)
    assert d.format == "unknown"
    assert read == PREFIX_SIZE


_CONTENT_STARTS = [
    b"\0asm",
    b"\x7fELF\x02\x01",
    b"#!",
    b"(",
    b";;",
    b"(;",
    b" ",
    b"\xef\xbb\xbf",
    b"",
]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(_CONTENT_STARTS),
    st.binary(max_size=600),
    st.integers(min_value=0, max_value=PREFIX_SIZE + 300),
    st.sampled_from(b" \n;a\0"),
)
def test_sniff_path_equals_sniff_of_the_prefix(
    tmp_path_factory: pytest.TempPathFactory, start: bytes, body: bytes, pad: int, fill: int
) -> None:
    content = start + body + bytes([fill]) * pad + b"(module)"
    path = tmp_path_factory.mktemp("prop") / "f"
    path.write_bytes(content)
    assert sniff_path(path) == sniff(content[:PREFIX_SIZE])


def test_sniff_file_short_reads_and_errors(tmp_path: Path) -> None:
    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.data = b"#!/bin/sh -eu\n"

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            chunk, self.data = self.data[:1], self.data[1:]
            return chunk

    assert sniff_file(Trickle()).script == ScriptInfo("/bin/sh", "-eu")  # type: ignore[arg-type]
    with (tmp_path / "w").open("wb") as f, pytest.raises(DetectionError, match="cannot read"):
        sniff_file(f)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(DetectionError, match="is a directory"):
        sniff_path(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DetectionError, match="No such file"):
        sniff_path(tmp_path / "absent")


def test_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "absent")
    with pytest.raises(DetectionError, match="No such file"):
        sniff_path(tmp_path / "link")


def test_symlink_is_followed_without_root(tmp_path: Path, module_wasm: bytes) -> None:
    (tmp_path / "real").write_bytes(module_wasm)
    (tmp_path / "link").symlink_to("real")
    assert sniff_path(tmp_path / "link").format == "wasm-module"


def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | Detected] = []

    def attempt() -> None:
        try:
            outcome.append(sniff_path(fifo))
        except BaseException as exc:
            outcome.append(exc)

    # A hang guard, not a speed check: with no writer, a blocking open would never return.
    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "sniff_path blocked on a FIFO"
    assert isinstance(outcome[0], DetectionError)
    assert "FIFO" in str(outcome[0])


def test_socket(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        with pytest.raises(DetectionError, match="is a socket"):
            sniff_path(path)


def test_character_device() -> None:
    with pytest.raises(DetectionError, match="character device"):
        sniff_path("/dev/null")


# --- inside a root ------------------------------------------------------------------------------


@pytest.fixture
def rootfs(tmp_path: Path, module_wasm: bytes) -> Path:
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "lib").mkdir()
    (root / "usr" / "bin" / "app.wasm").write_bytes(module_wasm)
    (root / "usr" / "bin" / "python3.11").write_bytes(b"#!/bin/sh\n")
    (root / "usr" / "bin" / "python3").symlink_to("python3.11")  # relative
    (root / "bin").symlink_to("/usr/bin")  # absolute: means <root>/usr/bin
    (root / "lib").symlink_to("usr/lib")
    (root / "usr" / "lib" / "libx.so").write_bytes(b"\x7fELF")
    (root / "x").symlink_to("/etc/passwd")
    (root / "up").symlink_to("../../../../../../../etc/passwd")
    (root / "dangling").symlink_to("/nowhere")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    return root


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("/usr/bin/app.wasm", "usr/bin/app.wasm"),
        ("usr/bin/app.wasm", "usr/bin/app.wasm"),
        ("/bin/app.wasm", "usr/bin/app.wasm"),
        ("/bin/python3", "usr/bin/python3.11"),
        ("/lib/libx.so", "usr/lib/libx.so"),
        ("/usr/./bin//../bin/app.wasm", "usr/bin/app.wasm"),
        ("/bin/../lib", "usr/lib"),  # .. after a symlink applies to its target, as in Linux
        ("/", "."),
    ],
)
def test_resolve_in_root(rootfs: Path, path: str, inside: str) -> None:
    got = resolve_in_root(rootfs, path)
    assert got == rootfs.resolve() / inside
    assert got.resolve() == got  # no symlink left in the answer


def test_absolute_symlink_stays_in_root(rootfs: Path, module_wasm: bytes) -> None:
    # /x -> /etc/passwd means the container's /etc/passwd, never the host's.
    with pytest.raises(DetectionError, match="no such file"):
        sniff_path("/x", root=rootfs)
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "passwd").write_bytes(module_wasm)
    assert sniff_path("/x", root=rootfs).format == "wasm-module"
    assert sniff_path("/etc/passwd").format != "wasm-module"  # the host's is text


@pytest.mark.parametrize("path", ["/up", "../../etc/passwd", "/usr/../../etc", "usr/bin/../../.."])
def test_escapes_are_refused(rootfs: Path, path: str) -> None:
    with pytest.raises(DetectionError, match="escapes the root") as info:
        sniff_path(path, root=rootfs)
    assert path in str(info.value)


def test_dangling_and_missing_inside_root(rootfs: Path) -> None:
    with pytest.raises(DetectionError, match="no such file"):
        resolve_in_root(rootfs, "/dangling")
    with pytest.raises(DetectionError, match="no such file"):
        resolve_in_root(rootfs, "/usr/missing/app")


def test_not_a_directory_inside_root(rootfs: Path) -> None:
    with pytest.raises(DetectionError, match="not a directory"):
        resolve_in_root(rootfs, "/usr/bin/app.wasm/more")


def test_symlink_loop(rootfs: Path) -> None:
    with pytest.raises(DetectionError, match="too many levels of symbolic links"):
        resolve_in_root(rootfs, "/loop1")


def test_symlink_hop_limit_is_linuxs(rootfs: Path) -> None:
    # A chain of exactly 40 links resolves, 41 does not (Linux's MAXSYMLINKS).
    for i in range(MAX_SYMLINK_HOPS + 1):
        (rootfs / f"hop{i}").symlink_to(f"hop{i + 1}" if i < MAX_SYMLINK_HOPS else "usr")
    assert resolve_in_root(rootfs, "/hop1") == rootfs.resolve() / "usr"
    with pytest.raises(DetectionError, match="too many levels"):
        resolve_in_root(rootfs, "/hop0")


def test_root_must_be_a_directory(rootfs: Path) -> None:
    with pytest.raises(DetectionError, match="not a directory"):
        resolve_in_root(rootfs / "usr" / "bin" / "app.wasm", "/")
    with pytest.raises(DetectionError, match="root"):
        resolve_in_root(rootfs / "absent", "/")


def test_root_given_through_a_symlink(rootfs: Path) -> None:
    alias = rootfs.parent / "alias"
    alias.symlink_to(rootfs)
    assert sniff_path("/bin/app.wasm", root=alias).format == "wasm-module"


def test_sniff_path_with_root_refuses_non_files(rootfs: Path) -> None:
    with pytest.raises(DetectionError, match="is a directory"):
        sniff_path("/bin", root=rootfs)
    os.mkfifo(rootfs / "fifo")
    with pytest.raises(DetectionError, match="FIFO"):
        sniff_path("/fifo", root=rootfs)
    assert stat.S_ISFIFO((rootfs / "fifo").lstat().st_mode)


def test_sniff_path_accepts_str_and_pathlike(rootfs: Path) -> None:
    a: Any = sniff_path(str(rootfs / "usr/bin/app.wasm"))
    b: Any = sniff_path(rootfs / "usr/bin/app.wasm")
    assert a == b
    assert a.format == "wasm-module"

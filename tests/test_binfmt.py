"""A foreign-architecture ELF (Debian's real arm64 busybox on this node) is refused before runc
with both architectures named, unless a binfmt_misc handler takes it; entries are parsed from
files in the kernel's format, written to a temporary directory."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._fixtures import BUSYBOX_ARM64
from wasidispatch import _binfmt
from wasidispatch._binfmt import foreign_elf_refusal, host_architecture, read_binfmt
from wasidispatch._bundles import busybox_bundle
from wasidispatch.detect import sniff, sniff_path
from wasidispatch.errors import CantHandle
from wasidispatch.executor import DispatchExecutor, LinuxExecutor, WasmExecutor, decide
from wasidispatch.oci.bundle import Bundle

needs_arm64 = pytest.mark.skipif(
    not BUSYBOX_ARM64.is_file(),
    reason=f"{BUSYBOX_ARM64} absent: run `make fixtures` (tests/_fixtures.py fetches it)",
)
needs_amd64 = pytest.mark.skipif(host_architecture() != "amd64", reason="an amd64 node")

# What Debian's qemu-user-static registers for aarch64 (update-binfmts --display), in the format
# the kernel shows under /proc/sys/fs/binfmt_misc.
QEMU_AARCH64 = """enabled
interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
flags: {flags}
offset 0
magic 7f454c460201010000000000000000000200b700
mask ffffffffffffff00fffffffffffffffffeffffff
"""
QEMU_ARM = """enabled
interpreter /usr/bin/qemu-arm-static
flags: F
offset 0
magic 7f454c4601010100000000000000000002002800
mask ffffffffffffff00fffffffffffffffffeffffff
"""
WINE = """enabled
interpreter /usr/bin/wine
flags:
extension .exe
"""


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    _binfmt.clear_cache()
    yield
    _binfmt.clear_cache()


def _binfmt_dir(tmp_path: Path, entries: dict[str, str], status: str = "enabled") -> Path:
    d = tmp_path / "binfmt_misc"
    d.mkdir(parents=True)
    (d / "status").write_text(status + "\n")
    (d / "register").write_text("")
    for name, text in entries.items():
        (d / name).write_text(text)
    return d


def test_parser_reads_real_format_entries(tmp_path: Path) -> None:
    d = _binfmt_dir(
        tmp_path,
        {
            "qemu-aarch64": QEMU_AARCH64.format(flags="F"),
            "qemu-arm": QEMU_ARM.replace("enabled", "disabled", 1),
            "wine": WINE,
            "garbage": "enabled\nmagic zz\n",
        },
    )
    entries = {e.name: e for e in read_binfmt(d)}
    assert set(entries) == {"qemu-aarch64", "wine"}  # disabled and unparsable ones dropped
    qemu = entries["qemu-aarch64"]
    assert qemu.flags == "F"
    assert qemu.offset == 0
    assert qemu.magic == bytes.fromhex("7f454c460201010000000000000000000200b700")
    assert qemu.interpreter == "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    assert entries["wine"].magic is None
    assert read_binfmt(_binfmt_dir(tmp_path / "x", {"q": QEMU_AARCH64}, "disabled")) == ()
    assert read_binfmt(tmp_path / "absent") == ()


@needs_arm64
@needs_amd64
def test_arm64_busybox_is_refused_naming_both_architectures(tmp_path: Path) -> None:
    message = foreign_elf_refusal(
        sniff_path(BUSYBOX_ARM64), entrypoint="/bin/busybox", binfmt_dir=tmp_path / "none"
    )
    assert message == (
        "entrypoint /bin/busybox is an arm64 ELF; this node runs amd64 and has no binfmt_misc "
        "handler for arm64"
    )


@needs_arm64
@needs_amd64
def test_a_binfmt_handler_makes_it_runnable(tmp_path: Path) -> None:
    d = _binfmt_dir(tmp_path, {"qemu-aarch64": QEMU_AARCH64.format(flags="F"), "wine": WINE})
    assert foreign_elf_refusal(sniff_path(BUSYBOX_ARM64), binfmt_dir=d) is None
    # the handler for 32-bit arm does not take arm64
    _binfmt.clear_cache()
    other = _binfmt_dir(tmp_path / "o", {"qemu-arm": QEMU_ARM})
    assert foreign_elf_refusal(sniff_path(BUSYBOX_ARM64), binfmt_dir=other) is not None


@needs_arm64
@needs_amd64
def test_a_handler_without_fix_binary_needs_its_interpreter_in_the_rootfs(tmp_path: Path) -> None:
    d = _binfmt_dir(tmp_path, {"qemu-aarch64": QEMU_AARCH64.format(flags="P")})
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    detected = sniff_path(BUSYBOX_ARM64)
    refusal = foreign_elf_refusal(detected, rootfs=rootfs, binfmt_dir=d)
    assert refusal is not None
    assert "arm64" in refusal
    interp = rootfs / "usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    interp.parent.mkdir(parents=True)
    interp.write_bytes(b"\x7fELF")
    assert foreign_elf_refusal(detected, rootfs=rootfs, binfmt_dir=d) is None


def test_a_magic_beyond_the_identification_reads_the_file(tmp_path: Path) -> None:
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\xb7\x00" + bytes(20) + b"MARK"
    binary = tmp_path / "bin"
    binary.write_bytes(header + bytes(64))
    entry = "enabled\ninterpreter /x\nflags: F\noffset 40\nmagic 4d41524b\n"
    d = _binfmt_dir(tmp_path, {"marked": entry})
    detected = sniff(header + bytes(64))
    assert detected.elf is not None
    assert foreign_elf_refusal(detected, path=binary, binfmt_dir=d, host="riscv64") is None
    binary.write_bytes(header[:40] + b"NOPE" + bytes(64))
    _binfmt.clear_cache()
    assert foreign_elf_refusal(detected, path=binary, binfmt_dir=d, host="riscv64") is not None


@pytest.mark.parametrize(
    ("machine", "bits", "host", "runs"),
    [
        (62, 64, "amd64", True),
        (3, 32, "amd64", True),  # IA-32 emulation
        (183, 64, "amd64", False),
        (40, 32, "arm64", True),  # AArch32 compat
        (62, 64, "arm64", False),
        (3, 32, "arm64", False),
        (40, 32, "amd64", False),
        (243, 64, "riscv64", True),
    ],
)
def test_native_and_compat_pairs(
    tmp_path: Path, machine: int, bits: int, host: str, runs: bool
) -> None:
    klass = 2 if bits == 64 else 1
    header = (
        b"\x7fELF" + bytes([klass, 1, 1]) + bytes(9) + b"\x02\x00" + machine.to_bytes(2, "little")
    )
    refusal = foreign_elf_refusal(sniff(header + bytes(64)), host=host, binfmt_dir=tmp_path)
    assert (refusal is None) is runs


def test_not_elf_or_unknown_machine_is_never_refused(tmp_path: Path) -> None:
    assert foreign_elf_refusal(sniff(b"#!/bin/sh\n"), host="amd64", binfmt_dir=tmp_path) is None
    odd = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x99\x99" + bytes(44)
    assert foreign_elf_refusal(sniff(odd), host="amd64", binfmt_dir=tmp_path) is None


def _arm64_bundle(tmp_path: Path) -> Path:
    bundle = busybox_bundle(tmp_path / "b", ["/bin/busybox", "echo", "hi"])
    target = bundle / "rootfs" / "bin" / "busybox"
    target.unlink()
    shutil.copy(BUSYBOX_ARM64, target)
    os.chmod(target, 0o755)
    return bundle


@needs_arm64
@needs_amd64
@pytest.mark.skipif(bool(read_binfmt()), reason="this node has binfmt_misc handlers")
def test_linux_executor_refuses_before_runc(tmp_path: Path) -> None:
    bundle = Bundle.load(_arm64_bundle(tmp_path))
    assert decide(bundle).kind == "linux"  # the format is Linux; the node cannot run it
    # A runtime that does not exist: the refusal must come before it is looked for.
    executor = LinuxExecutor(runtime=str(tmp_path / "no-runc"))
    with pytest.raises(CantHandle, match="is an arm64 ELF; this node runs amd64") as exc:
        executor.exec(bundle)
    assert "entrypoint /bin/busybox" in str(exc.value)
    with pytest.raises(CantHandle, match="linux: entrypoint /bin/busybox is an arm64 ELF"):
        DispatchExecutor([WasmExecutor("wasmtime"), executor]).explain(bundle)


def _real_headers() -> list[bytes]:
    from tests.guests import build_c

    paths = [Path("/bin/busybox"), Path(sys.executable), build_c("hello")]
    if BUSYBOX_ARM64.is_file():
        paths.append(BUSYBOX_ARM64)
    return [p.read_bytes()[:512] for p in paths if p.is_file()]


_HEADERS = _real_headers()


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(_HEADERS),
    st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=8),
    st.integers(0, 512),
    st.sampled_from(["amd64", "arm64", "386", "riscv64", "s390x"]),
)
def test_mutated_real_headers_never_raise(
    header: bytes,
    flips: list[tuple[int, int]],
    cut: int,
    host: str,
) -> None:
    """Real ELF and Wasm headers, bytes changed and truncated: `sniff` gives a Detected and the
    refusal is None or names the ELF's architecture and the host's; never an exception."""
    data = bytearray(header)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    mutated = bytes(data[:cut])
    detected = sniff(mutated)
    assert detected.format in {
        "wasm-module", "wasm-component", "wasm", "wasm-text", "elf", "script", "unknown"
    }  # fmt: skip
    refusal = foreign_elf_refusal(detected, header=mutated, binfmt_dir="/nonexistent", host=host)
    if refusal is not None:
        assert detected.elf is not None
        assert detected.elf.architecture is not None
        assert f"{detected.elf.architecture} ELF; this node runs {host} " in refusal


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_binfmt_entry_parser_is_total(text: str) -> None:
    entry = _binfmt._parse_entry("x", text)
    if entry is not None:
        assert entry.matches(b"\x7fELF" + bytes(60)) in (True, False)

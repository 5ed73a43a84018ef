"""Can this node execute a given ELF? Its architecture, compatible modes, and binfmt_misc.

Stdlib only, like :mod:`wasidispatch.detect`. The one public function,
:func:`foreign_elf_refusal`, returns None when an ELF can run here and otherwise the sentence a
user needs: which architecture the binary is, which the node runs, and that no binfmt_misc
handler (qemu-user, box64...) takes it. It costs a dictionary lookup for a native ELF; the
binfmt_misc directory is read only for a foreign one, once per process and directory
(:func:`clear_cache` forgets it, e.g. after ``update-binfmts``).

What counts as runnable (conservative: a binary is refused only when this node certainly cannot
exec it):

* the ELF's OCI architecture is the host's (``uname -m`` mapped to the OCI name);
* a compat mode of the host kernel: ``386`` on ``amd64`` (IA-32 emulation, unless the kernel
  was booted with ``ia32_emulation=0``), ``arm`` on ``arm64`` (AArch32 at EL0: CPUs that have
  it and a kernel built with COMPAT; not knowable without trying, so accepted), ``ppc`` on
  ``ppc64``, ``s390`` on ``s390x``, ``mips``/``mipsle`` on ``mips64``/``mips64le``,
  ``sparc`` on ``sparc64``;
* an ELF whose machine has no OCI name (``architecture`` None), or a host whose ``uname -m``
  has none: nothing is known, nothing refused;
* an enabled binfmt_misc entry whose magic (under its mask, at its offset) matches the ELF's
  first bytes. An entry without the ``F`` (fix-binary) flag names an interpreter the kernel
  opens at exec time *inside the container*: it counts only when that interpreter exists in
  the given ``rootfs`` (or when no rootfs is given).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    from wasidispatch.detect import Detected

__all__ = [
    "BINFMT_DIR",
    "BinfmtEntry",
    "clear_cache",
    "foreign_elf_refusal",
    "host_architecture",
    "read_binfmt",
]

#: Where the kernel exposes binfmt_misc (``mount -t binfmt_misc none /proc/sys/fs/binfmt_misc``).
BINFMT_DIR = "/proc/sys/fs/binfmt_misc"

#: Linux's BINPRM_BUF_SIZE: the bytes binfmt_misc matches a magic against.
_HEADER_MAX = 256
#: An entry file is a few lines; anything bigger is not one.
_ENTRY_MAX = 4096

# ``uname -m`` -> OCI / Go GOARCH architecture name.
_UNAME: dict[str, str] = {
    "x86_64": "amd64",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "aarch64": "arm64",
    "aarch64_be": "arm64be",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "riscv64": "riscv64",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "ppc": "ppc",
    "s390x": "s390x",
    "s390": "s390",
    "mips": "mips",
    "mips64": "mips64",
    "loongarch64": "loong64",
    "sparc64": "sparc64",
}

# host -> 32-bit architectures its kernel execs natively (in a compat mode).
_COMPAT: dict[str, frozenset[str]] = {
    "amd64": frozenset({"386"}),
    "arm64": frozenset({"arm"}),
    "ppc64": frozenset({"ppc"}),
    "s390x": frozenset({"s390"}),
    "mips64": frozenset({"mips"}),
    "mips64le": frozenset({"mipsle"}),
    "sparc64": frozenset({"sparc"}),
}


class BinfmtEntry:
    """One binfmt_misc registration, as its file under :data:`BINFMT_DIR` describes it.

    ``magic`` and ``mask`` are bytes (``mask`` all ones when the entry has none), matched at
    ``offset``; extension entries (``extension .exe``) have ``magic`` None and never match an
    ELF by its bytes.
    """

    __slots__ = ("enabled", "flags", "interpreter", "magic", "mask", "name", "offset")

    def __init__(
        self,
        name: str,
        *,
        enabled: bool,
        interpreter: str,
        flags: str,
        offset: int,
        magic: bytes | None,
        mask: bytes | None,
    ) -> None:
        self.name = name
        self.enabled = enabled
        self.interpreter = interpreter
        self.flags = flags
        self.offset = offset
        self.magic = magic
        self.mask = mask

    def __repr__(self) -> str:
        return (
            f"BinfmtEntry({self.name!r}, enabled={self.enabled}, interpreter={self.interpreter!r}"
            f", flags={self.flags!r}, offset={self.offset}, magic={self.magic!r})"
        )

    def matches(self, header: bytes) -> bool:
        """Whether the kernel would hand a file starting with ``header`` to this entry."""
        magic = self.magic
        if not self.enabled or magic is None:
            return False
        end = self.offset + len(magic)
        if end > len(header):
            return False
        mask = self.mask or b"\xff" * len(magic)
        window = header[self.offset : end]
        return all((b ^ m) & k == 0 for b, m, k in zip(window, magic, mask, strict=False))


def _parse_entry(name: str, text: str) -> BinfmtEntry | None:
    """An entry file's text (``enabled``, ``interpreter ...``, ``flags: ...``, ``offset N``,
    ``magic HEX``, ``mask HEX`` or ``extension .X``); None when it is not one."""
    lines = text.splitlines()
    if not lines or lines[0].strip() not in ("enabled", "disabled"):
        return None
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.strip().partition(" ")
        fields[key.rstrip(":")] = value.strip()
    try:
        offset = int(fields.get("offset", "0"))
        magic = bytes.fromhex(fields["magic"]) if "magic" in fields else None
        mask = bytes.fromhex(fields["mask"]) if "mask" in fields else None
    except ValueError:
        return None
    if offset < 0 or offset >= _HEADER_MAX or (mask is not None and magic is None):
        return None
    if magic is not None and (not magic or (mask is not None and len(mask) != len(magic))):
        return None
    return BinfmtEntry(
        name,
        enabled=lines[0].strip() == "enabled",
        interpreter=fields.get("interpreter", ""),
        flags=fields.get("flags", ""),
        offset=offset,
        magic=magic,
        mask=mask,
    )


def read_binfmt(directory: str | os.PathLike[str] = BINFMT_DIR) -> tuple[BinfmtEntry, ...]:
    """The enabled entries registered under ``directory`` (none when binfmt_misc is not
    mounted, is globally disabled, or cannot be read). Never raises."""
    base = os.fspath(directory)
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return ()
    if "status" in names and _read_small(os.path.join(base, "status")).strip() == "disabled":
        return ()
    entries = []
    for name in names:
        if name in ("register", "status"):
            continue
        entry = _parse_entry(name, _read_small(os.path.join(base, name)))
        if entry is not None and entry.enabled:
            entries.append(entry)
    return tuple(entries)


def _read_small(path: str, limit: int = _ENTRY_MAX) -> str:
    """At most ``limit`` bytes of a regular file as text; "" for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


_entries: dict[str, tuple[BinfmtEntry, ...]] = {}
_host: list[str | None] = []
_ia32: list[bool] = []


def clear_cache() -> None:
    """Forget the host architecture and binfmt_misc entries read so far."""
    _entries.clear()
    _host.clear()
    _ia32.clear()


def host_architecture() -> str | None:
    """This node's OCI architecture name (from ``uname -m``), or None when it has none."""
    if not _host:
        _host.append(_UNAME.get(os.uname().machine))
    return _host[0]


def _ia32_enabled() -> bool:
    """False only when the kernel was booted with IA-32 emulation off (Linux 6.7+)."""
    if not _ia32:
        off = {f"ia32_emulation={v}" for v in ("0", "n", "no", "off", "false")}
        _ia32.append(off.isdisjoint(_read_small("/proc/cmdline").split()))
    return _ia32[0]


def _runs_natively(arch: str, host: str) -> bool:
    if arch == host:
        return True
    if arch not in _COMPAT.get(host, ()):
        return False
    return _ia32_enabled() if arch == "386" else True


def _synthetic_header(detected: Detected) -> bytes:
    """The first 20 bytes of an ELF (identification, e_type, e_machine) rebuilt from what
    detection kept: what binfmt magics (qemu's) match on."""
    elf = detected.elf
    assert elf is not None
    little = elf.endianness == "little"
    types = {"none": 0, "rel": 1, "exec": 2, "dyn": 3, "core": 4}
    abis = {"sysv": 0, "linux": 3, "freebsd": 9, "netbsd": 2, "openbsd": 12, "standalone": 255}
    e_type = types.get(elf.file_type)
    if e_type is None:
        try:
            e_type = int(elf.file_type, 16)
        except ValueError:
            e_type = 0
    abi = abis.get(elf.os_abi, 0)
    order: Literal["little", "big"] = "little" if little else "big"
    ident = bytes([0x7F, 0x45, 0x4C, 0x46, 2 if elf.bits == 64 else 1, 1 if little else 2, 1, abi])
    return ident + bytes(8) + (e_type & 0xFFFF).to_bytes(2, order) + elf.machine.to_bytes(2, order)


def _read_header(path: str | os.PathLike[str]) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        return os.read(fd, _HEADER_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)


def _interpreter_in(rootfs: str | os.PathLike[str], interpreter: str) -> bool:
    if not interpreter.startswith("/"):
        return False
    try:
        from wasidispatch.detect import resolve_in_root

        found = resolve_in_root(rootfs, interpreter)
        return os.path.isfile(found)
    except Exception:  # escaping, looping, unreadable: not there
        return False


def foreign_elf_refusal(
    detected: Detected,
    *,
    entrypoint: str | os.PathLike[str] | None = None,
    rootfs: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    header: bytes | None = None,
    binfmt_dir: str | os.PathLike[str] = BINFMT_DIR,
    host: str | None = None,
) -> str | None:
    """None when ``detected`` is not an ELF, or is one this node can exec (module
    docstring); otherwise why not, naming both architectures, e.g. ``"entrypoint
    /bin/busybox is an arm64 ELF; this node runs amd64 and has no binfmt_misc handler for
    arm64"``.

    ``entrypoint`` (the name in the message, e.g. ``process.args[0]``), ``path`` (the host file,
    read for a binfmt magic longer than the ELF identification when its first bytes are not
    given as ``header``), ``rootfs`` (where a non-``F`` handler's
    interpreter must exist), ``binfmt_dir`` and ``host`` (an OCI architecture name, default
    this node's) are optional. Never raises for any input that `sniff` produced.

    Example::

        >>> from wasidispatch.detect import sniff
        >>> arm64 = b"\\x7fELF\\x02\\x01\\x01" + bytes(9) + b"\\x02\\x00\\xb7\\x00" + bytes(44)
        >>> foreign_elf_refusal(sniff(arm64), host="arm64") is None
        True
        >>> foreign_elf_refusal(sniff(arm64), host="amd64", binfmt_dir="/nonexistent")[:52]
        'the entrypoint is an arm64 ELF; this node runs amd64'
    """
    elf = detected.elf
    if elf is None or elf.architecture is None:
        return None
    node = host if host is not None else host_architecture()
    if node is None or _runs_natively(elf.architecture, node):
        return None
    key = os.fspath(binfmt_dir)
    entries = _entries.get(key)
    if entries is None:
        entries = _entries[key] = read_binfmt(key)
    if entries:
        synthetic = _synthetic_header(detected)
        full = header
        for entry in entries:
            if entry.magic is None:
                continue
            data = synthetic
            if entry.offset + len(entry.magic) > len(synthetic):
                if full is None and path is not None:
                    full = _read_header(path) or b""
                data = full or b""
            if not entry.matches(data):
                continue
            if "F" in entry.flags or rootfs is None:
                return None
            if _interpreter_in(rootfs, entry.interpreter):
                return None
    what = f"entrypoint {os.fspath(entrypoint)}" if entrypoint is not None else "the entrypoint"
    article = "an" if elf.architecture[0] in "aeiou" or elf.architecture[:4] == "s390" else "a"
    return (
        f"{what} is {article} {elf.architecture} ELF; this node runs {node} and has no binfmt_misc "
        f"handler for {elf.architecture}"
    )

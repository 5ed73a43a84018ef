"""Format detection: is an entrypoint Wasm or Linux? Decided by its first bytes, never its name.

Stdlib only; importing this module never imports pydantic or a Wasm engine.

* :func:`sniff` looks at bytes already in memory (at most the first :data:`PREFIX_SIZE`);
* :func:`sniff_file` reads that prefix from an open binary file;
* :func:`sniff_path` opens a path (optionally inside a container root, see
  :func:`resolve_in_root`) without ever blocking, and reads only the prefix.

Recognised formats (the ``format`` of a :class:`Detected`):

================== ===========================================================================
``wasm-module``    ``\\0asm``, version 1, layer 0: a WebAssembly core module
``wasm-component`` ``\\0asm``, version 0x0d, layer 1: a component-model component
``wasm``           ``\\0asm`` with any other version/layer (pre-release components, future ones)
``wasm-text``      WebAssembly text: a ``(module`` or ``(component`` form after whitespace and
                   ``;;`` / ``(; ;)`` comments. Source, not runnable: ``is_wasm`` is False.
``elf``            an ELF object, with bits, endianness, machine and its OCI architecture name
``script``         a ``#!`` script, parsed the way Linux's binfmt_script does
``unknown``        everything else, with a ``reason``
================== ===========================================================================

Example::

    >>> header = b"\\x7fELF\\x02\\x01\\x01" + bytes(9) + b"\\x02\\x00\\xb7\\x00" + bytes(44)
    >>> sniff(header).elf.architecture
    'arm64'
    >>> str(sniff(b"#!/usr/bin/env python3\\n"))
    'script #!/usr/bin/env python3'
"""

from __future__ import annotations

import os
import stat

from wasidispatch.errors import DetectionError

# Not `from typing import TYPE_CHECKING`: the typing module alone costs several times this
# module's import time, and mypy treats a module-level TYPE_CHECKING = False the same way.
TYPE_CHECKING = False

__all__ = [
    "PREFIX_SIZE",
    "Detected",
    "ElfInfo",
    "ScriptInfo",
    "WasmInfo",
    "resolve_in_root",
    "sniff",
    "sniff_file",
    "sniff_path",
]

#: How many leading bytes detection ever looks at (and :func:`sniff_path` ever reads).
PREFIX_SIZE = 4096

#: Linux's BINPRM_BUF_SIZE: the kernel reads a ``#!`` line from the first 256 bytes only.
SCRIPT_LINE_MAX = 256

#: Linux's MAXSYMLINKS: symlinks followed while resolving one path before giving up (ELOOP).
MAX_SYMLINK_HOPS = 40

if TYPE_CHECKING:
    from pathlib import Path
    from typing import IO, Any, Literal

    Format = Literal[
        "wasm-module", "wasm-component", "wasm", "wasm-text", "elf", "script", "unknown"
    ]


class _Value:
    """Base of the immutable result values: slots, equality and hashing over the fields, a
    dataclass-like repr, pickling. (Written by hand rather than with ``dataclasses``: importing
    that module pulls ``inspect`` and ``ast`` in, several times the cost of this whole module.)"""

    __slots__: tuple[str, ...] = ()
    __match_args__: tuple[str, ...] = ()  # the fields, in constructor order

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    def _astuple(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._astuple() == other._astuple()

    def __hash__(self) -> int:
        return hash((self.__class__.__name__, *self._astuple()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__match_args__)
        return f"{self.__class__.__name__}({inner})"

    def __reduce__(self) -> tuple[type[_Value], tuple[object, ...]]:
        return (self.__class__, self._astuple())


_set = object.__setattr__


class ElfInfo(_Value):
    """What an ELF header says (an immutable value).

    ``architecture`` is the OCI / Go ``GOARCH`` name (``amd64``, ``arm64``, ``riscv64`` ...) or
    None for a machine without one; ``machine`` always keeps the raw ``e_machine`` number.
    ``file_type`` is ``exec``, ``dyn``, ``rel``, ``core`` or ``none`` (other values as hex);
    ``os_abi`` is the ``EI_OSABI`` name (``sysv``, ``linux``, ``freebsd`` ...; unknown as hex).
    """

    __slots__ = ("architecture", "bits", "endianness", "file_type", "machine", "os_abi")
    __match_args__ = ("bits", "endianness", "machine", "architecture", "file_type", "os_abi")

    bits: int
    endianness: Literal["little", "big"]
    machine: int
    architecture: str | None
    file_type: str
    os_abi: str

    def __init__(
        self,
        bits: int,
        endianness: Literal["little", "big"],
        machine: int,
        architecture: str | None,
        file_type: str,
        os_abi: str,
    ) -> None:
        _set(self, "bits", bits)
        _set(self, "endianness", endianness)
        _set(self, "machine", machine)
        _set(self, "architecture", architecture)
        _set(self, "file_type", file_type)
        _set(self, "os_abi", os_abi)


class WasmInfo(_Value):
    """The WebAssembly binary preamble (an immutable value): ``version`` (1 for modules, 0x0d
    for components) and ``layer`` (0 for modules, 1 for components)."""

    __slots__ = ("layer", "version")
    __match_args__ = ("version", "layer")

    version: int
    layer: int

    def __init__(self, version: int, layer: int) -> None:
        _set(self, "version", version)
        _set(self, "layer", layer)


class ScriptInfo(_Value):
    """A ``#!`` line (an immutable value): the interpreter path and the optional single
    argument, as the kernel passes it (everything after the interpreter, blanks stripped)."""

    __slots__ = ("argument", "interpreter")
    __match_args__ = ("interpreter", "argument")

    interpreter: str
    argument: str | None

    def __init__(self, interpreter: str, argument: str | None) -> None:
        _set(self, "interpreter", interpreter)
        _set(self, "argument", argument)


class Detected(_Value):
    """The result of detection (an immutable value): a ``format`` plus that format's details.

    Exactly one of ``elf`` / ``wasm`` / ``script`` is set for those formats; ``reason`` is set
    for ``unknown``. ``is_wasm`` is true for binary Wasm only (``wasm-module``,
    ``wasm-component``, ``wasm``); WebAssembly *text* is source and is not runnable as Wasm.
    ``is_linux`` is true for ELF and ``#!`` scripts (what a Linux runtime would exec).
    Values compare equal by their fields, hash, pickle, and refuse attribute assignment.

    Example::

        >>> d = sniff(b"\\0asm\\x0d\\0\\x01\\0")
        >>> d.format, d.is_wasm, d.wasm.version
        ('wasm-component', True, 13)
        >>> sniff(b"").reason
        'empty'
    """

    __slots__ = ("elf", "format", "reason", "script", "wasm")
    __match_args__ = ("format", "reason", "elf", "wasm", "script")

    format: Format
    reason: str | None
    elf: ElfInfo | None
    wasm: WasmInfo | None
    script: ScriptInfo | None

    def __init__(
        self,
        format: Format,
        reason: str | None = None,
        elf: ElfInfo | None = None,
        wasm: WasmInfo | None = None,
        script: ScriptInfo | None = None,
    ) -> None:
        _set(self, "format", format)
        _set(self, "reason", reason)
        _set(self, "elf", elf)
        _set(self, "wasm", wasm)
        _set(self, "script", script)

    @property
    def is_wasm(self) -> bool:
        """Binary WebAssembly (module, component or another version/layer)."""
        return self.wasm is not None

    @property
    def is_linux(self) -> bool:
        """An ELF object or a ``#!`` script."""
        return self.elf is not None or self.script is not None

    def __str__(self) -> str:
        if self.elf is not None:
            e = self.elf
            arch = e.architecture or f"machine={e.machine}"
            return f"elf {arch} {e.bits}-bit {e.endianness}-endian {e.file_type} os-abi={e.os_abi}"
        if self.wasm is not None:
            w = self.wasm
            return f"{self.format} version={w.version:#04x} layer={w.layer}"
        if self.script is not None:
            s = self.script
            arg = "" if s.argument is None else f" {s.argument}"
            return f"script #!{s.interpreter}{arg}"
        if self.reason is not None:
            return f"{self.format}: {self.reason}"
        return self.format

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``format``, ``is_wasm``, ``is_linux`` and the set details.

        Example::

            >>> sniff(b"\\0asm\\x01\\0\\0\\0").to_dict()
            {'format': 'wasm-module', 'is_wasm': True, 'is_linux': False, 'wasm': {'version': 1, 'layer': 0}}
        """  # noqa: E501
        out: dict[str, Any] = {
            "format": self.format,
            "is_wasm": self.is_wasm,
            "is_linux": self.is_linux,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        if self.elf is not None:
            e = self.elf
            out["elf"] = {
                "bits": e.bits,
                "endianness": e.endianness,
                "machine": e.machine,
                "architecture": e.architecture,
                "file_type": e.file_type,
                "os_abi": e.os_abi,
            }
        if self.wasm is not None:
            out["wasm"] = {"version": self.wasm.version, "layer": self.wasm.layer}
        if self.script is not None:
            out["script"] = {
                "interpreter": self.script.interpreter,
                "argument": self.script.argument,
            }
        return out


# --- tables ------------------------------------------------------------------------------------

# (e_machine, bits, little_endian) -> Go GOARCH / OCI architecture name.
_ARCH: dict[tuple[int, int, bool], str] = {
    (3, 32, True): "386",
    (62, 64, True): "amd64",
    (183, 64, True): "arm64",
    (183, 64, False): "arm64be",
    (40, 32, True): "arm",
    (40, 32, False): "armbe",
    (243, 64, True): "riscv64",
    (243, 32, True): "riscv",
    (21, 64, True): "ppc64le",
    (21, 64, False): "ppc64",
    (20, 32, False): "ppc",
    (22, 64, False): "s390x",
    (22, 32, False): "s390",
    (8, 32, False): "mips",
    (8, 32, True): "mipsle",
    (8, 64, False): "mips64",
    (8, 64, True): "mips64le",
    (258, 64, True): "loong64",
    (2, 32, False): "sparc",
    (43, 64, False): "sparc64",
}

_FILE_TYPES: dict[int, str] = {0: "none", 1: "rel", 2: "exec", 3: "dyn", 4: "core"}

_OS_ABIS: dict[int, str] = {
    0: "sysv",
    1: "hpux",
    2: "netbsd",
    3: "linux",
    4: "hurd",
    6: "solaris",
    7: "aix",
    8: "irix",
    9: "freebsd",
    10: "tru64",
    11: "modesto",
    12: "openbsd",
    13: "openvms",
    14: "nsk",
    15: "aros",
    16: "fenixos",
    17: "cloudabi",
    18: "openvos",
    64: "arm-aeabi",
    97: "arm",
    255: "standalone",
}

_ELF_HEADER_SIZE = {1: 52, 2: 64}  # by EI_CLASS
_WAT_BLANK = frozenset(b" \t\n\r")
_TEXT_START = frozenset(b"(; \t\n\r\xef")  # what WebAssembly text may start with (\xef: BOM)

# Detection is a pure function of a short key (the ELF identification and e_type/e_machine,
# the 8-byte Wasm preamble, the #! line), and Detected is immutable, so results are memoized:
# building the result objects costs more than parsing. Bounded: cleared when full.
_CACHE_MAX = 512
_cache: dict[bytes, Detected] = {}  # keyed by the ELF / Wasm prefix (first byte differs)
_script_cache: dict[bytes, Detected] = {}  # keyed by the #! line
_unknown_cache: dict[str, Detected] = {}


def _unknown(reason: str) -> Detected:
    d = _unknown_cache.get(reason)
    if d is None:
        if len(_unknown_cache) >= _CACHE_MAX:
            _unknown_cache.clear()
        d = _unknown_cache[reason] = Detected("unknown", reason=reason)
    return d


def _remember(key: bytes, d: Detected, cache: dict[bytes, Detected] = _cache) -> Detected:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = d
    return d


def _hex(b: bytes) -> str:
    return b[:4].hex()


# --- sniffing bytes ----------------------------------------------------------------------------


def sniff(data: bytes | bytearray | memoryview) -> Detected:
    """Detect the format of ``data`` (only its first :data:`PREFIX_SIZE` bytes are looked at).

    Total: every input gives a :class:`Detected`, empty, truncated or garbage input an
    ``unknown`` one with a ``reason``; it never raises.

    Example::

        >>> sniff(b"\\0asm\\x01\\0\\0\\0").format
        'wasm-module'
        >>> sniff(b"\\0asm\\x01").reason
        'truncated Wasm header (5 of 8 bytes)'
        >>> sniff(b";; a comment\\n(module)").format
        'wasm-text'
    """
    if type(data) is not bytes:
        try:
            data = _as_bytes(data)
        except Exception:
            return _unknown(f"not readable as bytes: {type(data).__name__}")
    if not data:
        return _unknown("empty")
    first = data[0]
    if first == 0x00:
        key = data[:8]
        d = _cache.get(key)
        if d is not None:
            return d
        if data[:4] == b"\0asm":
            return _sniff_wasm(key)
    elif first == 0x7F:
        key = data[:20]
        d = _cache.get(key)
        if d is not None and len(data) >= _ELF_HEADER_SIZE.get(key[4], 64):
            return d
        if data[:4] == b"\x7fELF":
            return _sniff_elf(data, key)
    elif first == 0x23 and data[1:2] == b"!":
        return _sniff_script(data)
    elif first in _TEXT_START and _is_wat(data[:PREFIX_SIZE]):
        return _WAT
    return _unknown(f"no known signature (starts with {_hex(data)})")


def _as_bytes(data: object) -> bytes:
    if isinstance(data, memoryview):
        if data.ndim == 1 and data.itemsize == 1:
            return bytes(data[:PREFIX_SIZE])
        return data.tobytes()[:PREFIX_SIZE]
    if isinstance(data, bytes | bytearray):
        return bytes(data[:PREFIX_SIZE])
    raise TypeError(type(data).__name__)


def _sniff_wasm(key: bytes) -> Detected:
    if len(key) < 8:
        return _unknown(f"truncated Wasm header ({len(key)} of 8 bytes)")
    version = key[4] | key[5] << 8
    layer = key[6] | key[7] << 8
    if version == 1 and layer == 0:
        fmt: Format = "wasm-module"
    elif version == 0x0D and layer == 1:
        fmt = "wasm-component"
    else:
        fmt = "wasm"
    return _remember(key, Detected(fmt, wasm=WasmInfo(version, layer)))


def _sniff_elf(data: bytes, key: bytes) -> Detected:
    if len(key) < 6:
        return _unknown(f"truncated ELF header ({len(data)} bytes)")
    ei_class, ei_data = key[4], key[5]
    need = _ELF_HEADER_SIZE.get(ei_class)
    if need is None:
        return _unknown(f"ELF with invalid class {ei_class}")
    if ei_data not in (1, 2):
        return _unknown(f"ELF with invalid data encoding {ei_data}")
    if len(data) < need:
        return _unknown(f"truncated ELF header ({len(data)} of {need} bytes)")
    little = ei_data == 1
    if little:
        e_type = key[16] | key[17] << 8
        machine = key[18] | key[19] << 8
    else:
        e_type = key[16] << 8 | key[17]
        machine = key[18] << 8 | key[19]
    bits = 32 if ei_class == 1 else 64
    abi = key[7]
    info = ElfInfo(
        bits=bits,
        endianness="little" if little else "big",
        machine=machine,
        architecture=_ARCH.get((machine, bits, little)),
        file_type=_FILE_TYPES.get(e_type) or f"{e_type:#06x}",
        os_abi=_OS_ABIS.get(abi) or f"{abi:#04x}",
    )
    return _remember(key, Detected("elf", elf=info))


def _sniff_script(data: bytes) -> Detected:
    # The rules of Linux's fs/binfmt_script.c, applied to the first 256 bytes:
    buf = data[:SCRIPT_LINE_MAX]
    nl = buf.find(b"\n")
    if nl >= 0:
        line = buf[2:nl]
    elif len(data) < SCRIPT_LINE_MAX:
        line = buf[2:]  # the whole file is one line
    else:
        # No newline within the buffer: the kernel takes the first 255 bytes, but refuses if
        # the interpreter path itself may be cut (no blank or NUL after it).
        line = buf[2 : SCRIPT_LINE_MAX - 1]
        body = line.lstrip(b" \t")
        if body and b" " not in body and b"\t" not in body and b"\0" not in body:
            return _unknown(f"#! interpreter longer than the kernel's {SCRIPT_LINE_MAX}-byte limit")
    d = _script_cache.get(line)
    if d is not None:
        return d
    key = line
    # Unlike the kernel (which would look for "/bin/sh\r"), accept a CRLF line ending.
    if line.endswith(b"\r"):
        line = line[:-1]
    line = line.rstrip(b" \t").lstrip(b" \t")
    end = len(line)
    for sep in (b" ", b"\t", b"\0"):
        i = line.find(sep, 0, end)
        if i >= 0:
            end = i
    interpreter = line[:end]
    if not interpreter:
        return _unknown("#! line names no interpreter")
    argument: bytes | None = None
    if end < len(line) and line[end] != 0:
        argument = line[end:].lstrip(b" \t").split(b"\0", 1)[0]
    info = ScriptInfo(
        interpreter.decode("utf-8", "surrogateescape"),
        None if argument is None else argument.decode("utf-8", "surrogateescape"),
    )
    return _remember(key, Detected("script", script=info), _script_cache)


_WAT = Detected("wasm-text")


def _skip_blank_and_comments(data: bytes, i: int) -> int:
    """Index of the first byte at or after ``i`` that is not whitespace or a comment, -1 for an
    unterminated block comment."""
    n = len(data)
    while i < n:
        c = data[i]
        if c in _WAT_BLANK:
            i += 1
        elif c == 0x3B and data[i + 1 : i + 2] == b";":  # ;; line comment
            j = data.find(b"\n", i)
            if j < 0:
                return n
            i = j + 1
        elif c == 0x28 and data[i + 1 : i + 2] == b";":  # (; block comment ;), nests
            depth = 1
            i += 2
            while depth:
                o = data.find(b"(;", i)
                e = data.find(b";)", i)
                if e < 0:
                    return -1
                if 0 <= o < e:
                    depth += 1
                    i = o + 2
                else:
                    depth -= 1
                    i = e + 2
        else:
            break
    return i


def _is_wat(data: bytes) -> bool:
    i = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    i = _skip_blank_and_comments(data, i)
    if i < 0 or data[i : i + 1] != b"(":
        return False
    i = _skip_blank_and_comments(data, i + 1)
    if i < 0:
        return False
    for word in (b"module", b"component"):
        if data.startswith(word, i):
            after = data[i + len(word) : i + len(word) + 1]
            # A keyword ends at a blank, a paren, a comment, or the end of what we read.
            return after == b"" or after[0] in _WAT_BLANK or after in (b"(", b")", b";")
    return False


# --- reading files -----------------------------------------------------------------------------


def sniff_file(fileobj: IO[bytes]) -> Detected:
    """Read at most :data:`PREFIX_SIZE` bytes from ``fileobj``'s current position and sniff
    them. The position is left after what was read.

    Raises :class:`~wasidispatch.errors.DetectionError` if reading fails.

    Example::

        >>> import io
        >>> sniff_file(io.BytesIO(b"#!/bin/sh -e\\n")).script
        ScriptInfo(interpreter='/bin/sh', argument='-e')
    """
    chunks: list[bytes] = []
    want = PREFIX_SIZE
    try:
        while want > 0:
            chunk = fileobj.read(want)
            if not chunk:  # EOF (b"") or no data yet on a non-blocking file (None)
                break
            chunks.append(bytes(chunk))
            want -= len(chunk)
    except (OSError, ValueError) as exc:
        name = getattr(fileobj, "name", repr(fileobj))
        raise DetectionError(f"cannot read {name}: {exc}") from exc
    return sniff(b"".join(chunks) if len(chunks) != 1 else chunks[0])


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# sniff_path reads this much first: all an ELF header, a Wasm preamble or a #! line needs. Only
# input starting like WebAssembly text is read further, up to PREFIX_SIZE, so the result is
# always that of sniff() on the first PREFIX_SIZE bytes.
_FIRST_READ = SCRIPT_LINE_MAX


def _not_regular(path: str | os.PathLike[str], mode: int) -> DetectionError:
    if stat.S_ISDIR(mode):
        what = "a directory"
    elif stat.S_ISFIFO(mode):
        what = "a FIFO"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    elif stat.S_ISCHR(mode):
        what = "a character device"
    elif stat.S_ISBLK(mode):
        what = "a block device"
    else:
        what = "not a regular file"
    return DetectionError(f"{os.fspath(path)} is {what}, not a regular file")


def sniff_path(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> Detected:
    """Sniff the file at ``path``, reading at most :data:`PREFIX_SIZE` bytes (usually 256).

    Without ``root``, ``path`` is a host path and symlinks are followed. With ``root``, ``path``
    is what a container with that root filesystem sees: it is resolved with
    :func:`resolve_in_root` (absolute symlinks stay inside ``root``; a path escaping it raises),
    and the final open refuses a symlink swapped in meanwhile.

    Never blocks, never reads anything but a regular file: the path is opened with
    ``O_NONBLOCK | O_NOCTTY`` (a FIFO without a writer or a device returns at once, a socket
    fails to open) and what was opened is checked with ``fstat`` before a byte is read; a
    directory, FIFO, socket or device gives ``DetectionError``.

    Raises :class:`~wasidispatch.errors.DetectionError` for a missing or unreadable path, a
    non-regular file, or an escape from ``root``.
    """
    flags = _OPEN_FLAGS
    if root is not None:
        target: str | os.PathLike[str] = resolve_in_root(root, path)
        flags |= os.O_NOFOLLOW
    else:
        target = path
    try:
        # Open first, then fstat what was opened: no stat-then-open race, one path lookup.
        # O_NONBLOCK: opening a FIFO without a writer (or a device) returns at once.
        fd = os.open(target, flags)
    except OSError as exc:
        try:  # a socket (ENXIO) or another non-file: say what it is
            mode = os.stat(target).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode) from exc
        raise DetectionError(f"cannot open {os.fspath(path)}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o170000 != 0o100000:  # not S_ISREG, without the function call
            raise _not_regular(path, st.st_mode)
        data = os.read(fd, _FIRST_READ)
        n = len(data)
        # Only WebAssembly text may need more than the first read (comments before the form);
        # a short read of a regular file is EOF except on odd filesystems. Top up then.
        if n and (data[0] in _TEXT_START if n == _FIRST_READ else n < st.st_size):
            while n < PREFIX_SIZE:
                more = os.read(fd, PREFIX_SIZE - n)
                if not more:
                    break
                data += more
                n += len(more)
    except OSError as exc:
        raise DetectionError(f"cannot read {os.fspath(path)}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return sniff(data)


# --- resolving inside a container root ---------------------------------------------------------


def resolve_in_root(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Resolve ``path`` as a container whose root filesystem is ``root`` would see it.

    ``path`` may be absolute or relative (both start at ``root``). It is walked one component
    at a time and every symlink met is followed here, not by the host: an absolute link target
    restarts at ``root`` (that is what the container sees), a relative one continues from the
    link's directory. Returns the host path (``root`` itself made absolute and symlink-free,
    joined with symlink-free components) of the existing file or directory.

    Raises :class:`~wasidispatch.errors.DetectionError`, naming ``path``, when a ``..`` (in
    ``path`` or in a link target) would climb above ``root``, when more than
    :data:`MAX_SYMLINK_HOPS` (40, as Linux) symlinks are followed, when a component is missing
    or is not a directory but has components after it, or when ``root`` is not a directory.

    The walk uses the paths as they are at call time; a rootfs being modified concurrently by
    someone else can change what the returned path names afterwards.

    Example::

        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as rootfs:
        ...     _ = pathlib.Path(rootfs, "bin").mkdir()
        ...     _ = pathlib.Path(rootfs, "bin", "app.wasm").write_bytes(b"\\0asm\\1\\0\\0\\0")
        ...     pathlib.Path(rootfs, "app").symlink_to("/bin/app.wasm")
        ...     str(resolve_in_root(rootfs, "/app").relative_to(pathlib.Path(rootfs).resolve()))
        'bin/app.wasm'
    """
    from pathlib import Path

    shown = os.fspath(path)
    try:
        base = os.path.realpath(root, strict=True)
        if not os.path.isdir(base):
            raise DetectionError(f"root {os.fspath(root)} is not a directory")
    except OSError as exc:
        raise DetectionError(f"root {os.fspath(root)}: {exc.strerror}") from exc
    pending = [p for p in reversed(shown.split("/")) if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if not resolved:
                raise DetectionError(f"{shown} escapes the root {os.fspath(root)}")
            resolved.pop()
            continue
        host = os.path.join(base, *resolved, part)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            raise DetectionError(
                f"{shown}: no such file or directory ({'/' + '/'.join([*resolved, part])})"
            ) from None
        except OSError as exc:
            raise DetectionError(f"{shown}: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise DetectionError(f"{shown}: too many levels of symbolic links")
            try:
                link = os.readlink(host)
            except OSError as exc:
                raise DetectionError(f"{shown}: {exc.strerror}") from exc
            if link.startswith("/"):
                resolved.clear()
            pending.extend(p for p in reversed(link.split("/")) if p and p != ".")
            continue
        if pending and not stat.S_ISDIR(st.st_mode):
            raise DetectionError(f"{shown}: not a directory ({'/' + '/'.join([*resolved, part])})")
        resolved.append(part)
    return Path(base, *resolved)

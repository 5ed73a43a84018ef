"""Engine-neutral helpers the engine modules share (stdlib only).

What every engine has to do the same way lives here, so that the engines agree on it:
telling a core module from a component by its header, checking preopens, mapping the
workload's ``cwd`` onto a preopen, and the envelope around precompiled artifacts. The two
wasmtime engines (``wasmtime`` on wasmtime-py, ``wasmtime-fast`` on cffi) also share what
they may accept (`wasmtime_refusal`, `limits_refusal`), the epoch arithmetic of timeouts
(`TICK`, `deadline_ticks`), how a trap or a failed instantiation becomes a `RunResult`'s
outcome (`classify_trap`, `instantiate_failure`) and the CPU part of their fingerprints
(`cpu_flags`).

The envelope is a trailer: ``payload || trailer`` (see `seal_envelope`), so a file holding an
artifact can be mapped by the engine's file loader as it is. What is verified where:

- bytes (`open_envelope`): everything, including the payload's sha256, on every load;
- a path (`open_envelope_file`): the trailer (magic, format, fingerprint, kind) and that
  payload plus trailer is exactly the file's size, but not the payload's sha256: paths come
  only from callers who wrote and verified the file (the `Workload.precompiled` contract),
  above all from `wasidispatch.cache.PrecompileCache`, which checks the whole entry's sha256
  before handing out its path.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from wasidispatch.engines._api import TRAP_EXIT_CODE, ExitReason, Limits, Preopen, Workload
from wasidispatch.errors import CantHandle, CompileError, EngineError, IncompatibleArtifact

__all__ = [
    "ENVELOPE_FORMAT",
    "LIMIT_MAX",
    "NEVER",
    "TICK",
    "TRAILER_SIZE",
    "WASMTIME_MAX_WASM_STACK",
    "Artifact",
    "ArtifactFile",
    "Outcome",
    "TrapKind",
    "WasmKind",
    "c_string_refusal",
    "check_preopens",
    "check_stdin_file",
    "classify_trap",
    "cpu_flags",
    "cwd_preopen",
    "deadline_ticks",
    "first_line",
    "instantiate_failure",
    "limits_refusal",
    "open_envelope",
    "open_envelope_file",
    "seal_envelope",
    "timeout_refusal",
    "wasm_kind",
    "wasmtime_refusal",
]

WasmKind = Literal["module", "component"]

_WASM_MAGIC = b"\0asm"


def wasm_kind(data: bytes) -> WasmKind:
    """Whether ``data`` is a core module or a component, from its 8-byte header.

    Raises `CompileError` for anything that is not a Wasm binary (text, truncated, other
    formats): engines must never be handed the WAT text format by accident.

    Example::

        >>> wasm_kind(b"\\0asm\\x01\\0\\0\\0")
        'module'
        >>> wasm_kind(b"\\0asm\\x0d\\0\\x01\\0")
        'component'
    """
    if len(data) < 8 or data[:4] != _WASM_MAGIC:
        raise CompileError("not a WebAssembly binary (missing the \\0asm header)")
    version, layer = struct.unpack("<HH", data[4:8])
    if layer == 0 and version == 1:
        return "module"
    if layer == 1:
        return "component"
    raise CompileError(f"unsupported WebAssembly binary version {version} (layer {layer})")


#: wasmtime aborts the whole process (a Rust panic) for a guest stack outside 1..2 MiB here.
WASMTIME_MAX_WASM_STACK = 2 * 1024 * 1024


def limits_refusal(limits: Limits) -> str | None:
    """Why wasmtime must not be given ``limits`` (``None`` when it may): a value of the wrong
    type (a bool, a string, a float where an integer is meant), a stack size that would
    abort the interpreter, negative, zero or NaN limits, an infinite timeout.

    Clamps, documented: ``memory_bytes`` and ``fuel`` above ``2**63 - 1`` (`LIMIT_MAX`) and a
    ``timeout`` beyond what the epoch deadline can count (about 7e14 years) mean no limit.

    Example::

        >>> limits_refusal(Limits(timeout=0.5)) is None
        True
        >>> limits_refusal(Limits(fuel=-1))
        'limits.fuel must not be negative, got -1'
        >>> limits_refusal(Limits(memory_bytes=1.5))
        'limits.memory_bytes must be an integer number of bytes, got 1.5'
    """
    reason = timeout_refusal(limits.timeout)
    if reason is not None:
        return reason
    for field, unit in (("memory_bytes", "bytes"), ("fuel", "fuel units")):
        value = getattr(limits, field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            return f"limits.{field} must be an integer number of {unit}, got {value!r}"
        if value < 0:
            return f"limits.{field} must not be negative, got {value}"
    stack = limits.max_wasm_stack
    if stack is not None:
        if isinstance(stack, bool) or not isinstance(stack, int):
            return f"limits.max_wasm_stack must be an integer number of bytes, got {stack!r}"
        if not 0 < stack <= WASMTIME_MAX_WASM_STACK:
            return (
                f"max_wasm_stack must be between 1 and {WASMTIME_MAX_WASM_STACK} bytes "
                f"(wasmtime aborts the process otherwise), got {stack}"
            )
    return None


def timeout_refusal(timeout: object) -> str | None:
    """Why ``timeout`` is not a usable ``Limits.timeout`` (``None`` when it is): it must be
    a positive, finite number of seconds (an int or a float, not a bool), or ``None``."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        return f"limits.timeout must be a number of seconds, got {timeout!r}"
    if not (timeout > 0 and math.isfinite(timeout)):
        return (
            f"limits.timeout must be a positive, finite number of seconds (None for no "
            f"timeout), got {timeout}"
        )
    return None


def c_string_refusal(workload: Workload) -> str | None:
    """Why a string of ``workload`` cannot reach a WASI guest as it is: a NUL character
    (engines take C strings, cut short there), a lone surrogate (not UTF-8), or an ``=``
    in an environment name (the guest would see another name). ``None`` when none does.

    Example::

        >>> c_string_refusal(Workload(wasm=b"", argv=("a\\0b",)))
        "an argument contains a NUL character: 'a\\\\x00b'"
    """
    stdio_paths = [io.path for io in (workload.stdin, workload.stdout, workload.stderr)]
    groups: tuple[tuple[str, Iterable[object]], ...] = (
        ("an argument", workload.argv),
        ("an environment name", workload.env.keys()),
        ("an environment value", workload.env.values()),
        ("a preopen guest path", (pre.guest for pre in workload.preopens)),
        ("a preopen host path", (pre.host for pre in workload.preopens)),
        ("a stdio file path", (path for path in stdio_paths if path is not None)),
    )
    for name in workload.env:
        if "=" in name or not name:
            return f"an environment name must be non-empty and without '=': {name!r}"
    for what, items in groups:
        for item in items:
            text = str(item)
            if "\0" in text:
                return f"{what} contains a NUL character: {text!r}"
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return f"{what} is not valid UTF-8: {text!r}"
    return None


def wasmtime_refusal(workload: Workload) -> str | None:
    """Why a wasmtime-based engine must refuse ``workload`` (``None`` when it need not): the
    `limits_refusal` of its limits, strings that cannot be C strings (a NUL character, a
    lone surrogate in an argument, the environment, a preopen or a stdio path), and stdio
    directions that make no sense (captured stdin, bytes fed to an output)."""
    reason = limits_refusal(workload.limits) or c_string_refusal(workload)
    if reason is not None:
        return reason
    if workload.stdin.kind == "capture":
        return "stdin cannot be captured; use Stdio.from_bytes or a file"
    for stream, stdio in (("stdout", workload.stdout), ("stderr", workload.stderr)):
        if stdio.kind == "bytes":
            return f"{stream} cannot be fed bytes; use capture or a file"
    return None


#: Epoch tick of the wasmtime engines, in seconds: the resolution of ``Limits.timeout``.
TICK = 0.005

#: Epoch deadline for runs without a timeout (the current epoch plus this cannot wrap).
NEVER = 1 << 62


def deadline_ticks(timeout: float) -> int:
    """The epoch deadline, in ticks of `TICK` from now, that stops a run after ``timeout``
    seconds (never earlier: the first tick may come at once, hence one tick more).

    Example::

        >>> deadline_ticks(0.001), deadline_ticks(1.0), deadline_ticks(1e308) == NEVER
        (2, 201, True)
    """
    ticks = timeout / TICK
    if not ticks < NEVER:  # also a quotient that overflowed to infinity
        return NEVER
    return min(max(1, math.ceil(ticks)) + 1, NEVER)  # wasmtime takes a u64 delta


#: Largest memory cap or fuel handed to wasmtime (its C API takes them as 64-bit integers;
#: a larger limit is the same as this one, which no guest can reach).
LIMIT_MAX = (1 << 63) - 1


#: How a run ended, without timings: exit code, reason, message (the fields of `RunResult`).
Outcome = tuple[int, ExitReason, str | None]

#: What wasmtime says about a trap: an epoch interruption, fuel running out, or anything else.
TrapKind = Literal["interrupt", "out_of_fuel", "other"]

_PAGE = 65536


def classify_trap(
    message: str,
    kind: TrapKind,
    limits: Limits | None,
    memory_sizes: Callable[[], Iterable[int]] = tuple,
) -> Outcome:
    """The outcome of a run that trapped (an exit through ``proc_exit`` is not a trap).

    An interrupt is ``TIMED_OUT``, running out of fuel ``OUT_OF_FUEL``. wasmtime does not
    tell the embedder that a ``memory.grow`` was refused by the memory cap, so any other trap
    is ``OUT_OF_MEMORY`` when a cap is set and one of the instance's memories
    (``memory_sizes()``, in bytes; asked only then) holds all but a quarter of it (at least
    one page): a heuristic. Everything else is ``TRAPPED`` with wasmtime's message.

    Example::

        >>> classify_trap("wasm trap: unreachable", "other", None)
        (137, <ExitReason.TRAPPED: 'trapped'>, 'wasm trap: unreachable')
        >>> classify_trap("x", "other", Limits(memory_bytes=1 << 20), lambda: [1 << 20])[1]
        <ExitReason.OUT_OF_MEMORY: 'out-of-memory'>
    """
    message = message.strip()
    if kind == "interrupt":
        timeout = limits.timeout if limits is not None else None
        return TRAP_EXIT_CODE, ExitReason.TIMED_OUT, f"timed out after {timeout}s"
    if kind == "out_of_fuel":
        return TRAP_EXIT_CODE, ExitReason.OUT_OF_FUEL, message
    cap = limits.memory_bytes if limits is not None else None
    if cap is not None and any(size >= cap - max(cap // 4, _PAGE) for size in memory_sizes()):
        return (
            TRAP_EXIT_CODE,
            ExitReason.OUT_OF_MEMORY,
            f"memory cap of {cap} bytes reached; {message}",
        )
    return TRAP_EXIT_CODE, ExitReason.TRAPPED, message


def first_line(message: str, default: str) -> str:
    """The first non-blank line of ``message`` stripped, or ``default`` when there is none."""
    text = message.strip()
    return text.splitlines()[0] if text else default


def instantiate_failure(message: str, limits: Limits | None) -> Outcome:
    """The outcome of an instantiation that failed with an error (not a trap, not an exit).

    An initial memory above the cap is ``OUT_OF_MEMORY``. A missing import raises
    `CantHandle` (the guest needs what the engine does not provide), anything else
    `EngineError`.

    Example::

        >>> instantiate_failure("memory minimum size exceeds limit", Limits(memory_bytes=0))[1]
        <ExitReason.OUT_OF_MEMORY: 'out-of-memory'>
    """
    first = first_line(message, "instantiation failed")
    capped = limits is not None and limits.memory_bytes is not None
    if capped and "memory" in message and "limit" in message:
        return TRAP_EXIT_CODE, ExitReason.OUT_OF_MEMORY, first
    if "import" in first or "unknown import" in message:
        raise CantHandle(f"cannot link the guest: {first}")
    raise EngineError(f"cannot instantiate the guest: {first}")


def cpu_flags() -> str:
    """A short digest of this CPU's feature flags (``"unknown"`` where ``/proc/cpuinfo``
    says nothing): wasmtime compiles for the host's features, so artifacts must not move
    between CPUs with different ones and the flags are part of the engines' fingerprints."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.split(":", 1)[1].strip().encode()).hexdigest()[:16]
    except OSError:
        pass
    return "unknown"


def check_stdin_file(path: Path) -> None:
    """Raise `EngineError` unless ``path`` can be stdin: it exists and is a regular file or a
    character device (a FIFO or a socket goes through `wasidispatch.engines._stdio`)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise EngineError(f"stdin file does not exist: {path}") from exc
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot use {path} as stdin: {exc}") from exc
    if stat.S_ISDIR(mode):
        raise EngineError(f"stdin file {path} is a directory")


def check_preopens(preopens: Iterable[Preopen]) -> None:
    """Raise `EngineError` when a preopen's host directory is missing or not a directory,
    or its guest path is empty."""
    for pre in preopens:
        host = Path(pre.host)
        if not pre.guest:
            raise EngineError(f"preopen of {host} has an empty guest path")
        if not host.is_dir():
            raise EngineError(f"preopen host directory does not exist: {host}")


def cwd_preopen(workload: Workload) -> Preopen | None:
    """The extra preopen that gives the guest its working directory, or ``None``.

    WASI preview 1 has no working directory: wasi-libc resolves a relative path against the
    preopen named ``.``. So a ``cwd`` is honoured by preopening the host directory behind it
    (found through the preopen whose guest path contains it, with that preopen's read-only
    flag) once more as ``.``. The environment is left exactly as given (no ``PWD`` is
    added). Raises `EngineError` when ``cwd`` lies in no preopen.
    """
    if workload.cwd is None:
        return None
    cwd = PurePosixPath(workload.cwd)
    if not cwd.is_absolute():
        raise EngineError(f"cwd must be an absolute guest path, got {workload.cwd!r}")
    best: tuple[int, Preopen] | None = None
    for pre in workload.preopens:
        guest = PurePosixPath("/", pre.guest)
        if cwd == guest or guest in cwd.parents:
            depth = len(guest.parts)
            if best is None or depth > best[0]:
                best = (depth, pre)
    if best is None:
        if cwd == PurePosixPath("/"):
            return None  # nothing preopened: "/" is as good as no cwd
        raise EngineError(f"cwd {workload.cwd} is not inside any preopened directory")
    pre = best[1]
    rel = cwd.relative_to(PurePosixPath("/", pre.guest))
    host = Path(pre.host) / rel
    if not host.is_dir():
        raise EngineError(f"cwd {workload.cwd} is not a directory on the host ({host})")
    return Preopen(host, ".", readonly=pre.readonly)


# -- the envelope of precompiled artifacts ------------------------------------------------------
#
# An artifact is ``payload || trailer``: the engine's own serialized bytes, then a fixed-size
# trailer. The payload comes first so that a file holding an artifact can be handed to the
# engine's file-mapped loader unchanged (wasmtime's ``deserialize_file``): wasmtime's artifact
# is an ELF image that records its own extent, and wasmtime 50 ignores bytes after it, both
# when loading a file and when loading bytes (checked by ``tests/test_engine_wasmtime.py``).
_TRAILER_MAGIC = b"WDPCATRL"
#: Format of the envelope `seal_envelope` writes. Engines put it in their fingerprint, so a
#: change of format is a miss in `PrecompileCache`, never an entry that keeps failing to load.
ENVELOPE_FORMAT = 2  # format 1 was a header in front of the payload (magic b"WDPCA\x01")
_FORMAT_VERSION = ENVELOPE_FORMAT
_OLD_MAGIC = b"WDPCA\x01"
# magic, format version, fingerprint (64 hex chars), kind (b"m"/b"c"), payload length, sha256
_TRAILER = struct.Struct("<8sH64s1s5xQ32s")

#: Size in bytes of the trailer `seal_envelope` appends to an engine's artifact.
TRAILER_SIZE = _TRAILER.size

_KINDS: dict[bytes, WasmKind] = {b"m": "module", b"c": "component"}


def seal_envelope(fingerprint: str, kind: WasmKind, payload: bytes | bytearray) -> bytes:
    """An engine's native artifact followed by wasidispatch's trailer: magic, format version,
    the engine ``fingerprint``, the ``kind``, the payload's length and its sha256.

    Example::

        >>> sealed = seal_envelope("ab" * 32, "module", b"native bytes")
        >>> sealed[:12], len(sealed) == 12 + TRAILER_SIZE
        (b'native bytes', True)
        >>> bytes(open_envelope(sealed, "ab" * 32).payload)
        b'native bytes'
    """
    fp = fingerprint.encode("ascii")
    if len(fp) != 64:
        raise ValueError("fingerprint must be 64 hex characters")
    trailer = _TRAILER.pack(
        _TRAILER_MAGIC,
        _FORMAT_VERSION,
        fp,
        kind[0].encode(),
        len(payload),
        hashlib.sha256(payload).digest(),
    )
    return bytes(payload) + trailer


@dataclass(frozen=True, slots=True)
class Artifact:
    """An envelope opened from bytes: every field of the trailer and the payload's sha256
    were checked. ``payload`` is a view of the caller's bytes (no copy)."""

    kind: WasmKind
    payload: memoryview
    sha256: bytes


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    """An envelope opened from a file by `open_envelope_file`: its trailer was checked, its
    payload was not hashed (see there). ``path`` is what to give the engine's file loader
    while the ``with`` block is open (``/proc/self/fd/N`` of the checked file where there
    is a ``/proc``); ``sha256`` is the digest the trailer records."""

    kind: WasmKind
    path: str
    payload_size: int
    sha256: bytes


def _incompatible_old_or_foreign(head: bytes) -> IncompatibleArtifact:
    if head.startswith(_OLD_MAGIC):
        return IncompatibleArtifact(
            "precompiled artifact has the envelope of an older wasidispatch (format 1); "
            "precompile the module again"
        )
    return IncompatibleArtifact("precompiled artifact was not made by wasidispatch")


def _check_trailer(trailer: bytes, fingerprint: str, total: int) -> tuple[WasmKind, int, bytes]:
    """``(kind, payload length, recorded sha256)`` of a trailer that says it closes an
    artifact of ``total`` bytes made for ``fingerprint``; `IncompatibleArtifact` otherwise."""
    magic, version, fp, kind, length, digest = _TRAILER.unpack(trailer)
    if magic != _TRAILER_MAGIC:
        raise IncompatibleArtifact("precompiled artifact was not made by wasidispatch")
    if version != _FORMAT_VERSION:
        raise IncompatibleArtifact(
            f"precompiled artifact has envelope format {version}, this wasidispatch reads "
            f"format {_FORMAT_VERSION}; precompile the module again"
        )
    if fp != fingerprint.encode("ascii"):
        raise IncompatibleArtifact(
            "precompiled artifact was made by another engine, engine version or configuration"
        )
    if kind not in _KINDS:
        raise IncompatibleArtifact("precompiled artifact has an unknown kind")
    if length == 0 or length + TRAILER_SIZE != total:
        raise IncompatibleArtifact(
            f"precompiled artifact is truncated or extended: its trailer records a "
            f"{length}-byte payload, but {total - TRAILER_SIZE} bytes precede it"
        )
    return _KINDS[kind], length, digest


def open_envelope(data: bytes | bytearray | memoryview, fingerprint: str) -> Artifact:
    """Verify and open an envelope made by `seal_envelope` for ``fingerprint``.

    Everything is checked: the trailer's magic, format version, fingerprint and kind, that
    the payload has the recorded length, and its sha256. Raises `IncompatibleArtifact` for
    anything else: foreign bytes, another engine, version or configuration, an envelope of
    an older format, a truncated, extended or altered artifact.
    """
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise IncompatibleArtifact(
            f"a precompiled artifact is bytes or a Path, not {type(data).__name__}"
        ) from exc
    if len(view) < TRAILER_SIZE:
        raise _incompatible_old_or_foreign(bytes(view[: len(_OLD_MAGIC)]))
    trailer = bytes(view[-TRAILER_SIZE:])
    if trailer[: len(_TRAILER_MAGIC)] != _TRAILER_MAGIC:
        raise _incompatible_old_or_foreign(bytes(view[: len(_OLD_MAGIC)]))
    kind, length, digest = _check_trailer(trailer, fingerprint, len(view))
    payload = view[:length]
    if hashlib.sha256(payload).digest() != digest:
        raise IncompatibleArtifact("precompiled artifact is corrupt (digest mismatch)")
    return Artifact(kind, payload, digest)


_PROC_FD: bool | None = None  # whether /proc/self/fd names this process's open files


def _proc_fd() -> bool:
    global _PROC_FD
    if _PROC_FD is None:
        _PROC_FD = os.path.isdir("/proc/self/fd")
    return _PROC_FD


@contextlib.contextmanager
def open_envelope_file(path: Path, fingerprint: str) -> Iterator[ArtifactFile]:
    """Open the artifact file ``path``, check its trailer, and yield what the engine's
    file-mapped loader needs (``with open_envelope_file(p, fp) as art: load(art.path)``).

    What is checked: the file is a regular file; it ends in a trailer with the right magic,
    format version, ``fingerprint`` and a known kind; and the recorded payload length plus
    the trailer is exactly the file's size (a truncated or extended file fails). Anything
    else is `IncompatibleArtifact`, as is a file that cannot be opened. Only the trailer is
    read (one ``pread`` at the end): the whole point is to let the engine map the file.

    What is *not* checked: the payload's sha256 (hashing a multi-megabyte artifact costs
    milliseconds, 30x the mapped load). This is sound because of who hands out paths: the
    `Workload.precompiled` contract is that callers pass only artifacts they wrote and
    verified themselves, and `wasidispatch.cache.PrecompileCache` checks the sha256 of the
    whole entry (payload and trailer) before it hands out a path, in a directory only this
    user can write. The trailer checks catch what can still happen by mistake: a file of
    another engine or configuration, of an older wasidispatch, or cut short. Callers who
    cannot vouch for a file pass its bytes instead, which `open_envelope` verifies in full.

    The yielded ``path`` is ``/proc/self/fd/N`` of the descriptor that was checked, so the
    engine maps that very file even if ``path`` is renamed, replaced or unlinked meanwhile
    (only a write into the file itself, by someone who may write it, could still change it);
    without ``/proc`` it is ``str(path)``. The descriptor is closed when the block ends.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, ValueError) as exc:
        raise IncompatibleArtifact(f"cannot read precompiled artifact {path}: {exc}") from exc
    try:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IncompatibleArtifact(f"precompiled artifact {path} is not a regular file")
            size = st.st_size
            if size < TRAILER_SIZE:
                raise _incompatible_old_or_foreign(os.pread(fd, len(_OLD_MAGIC), 0))
            trailer = os.pread(fd, TRAILER_SIZE, size - TRAILER_SIZE)
            if len(trailer) != TRAILER_SIZE:  # shrunk since fstat
                raise IncompatibleArtifact(f"precompiled artifact {path} is truncated")
            if trailer[: len(_TRAILER_MAGIC)] != _TRAILER_MAGIC:
                raise _incompatible_old_or_foreign(os.pread(fd, len(_OLD_MAGIC), 0))
        except OSError as exc:
            raise IncompatibleArtifact(f"cannot read precompiled artifact {path}: {exc}") from exc
        kind, length, digest = _check_trailer(trailer, fingerprint, size)
        mapped = f"/proc/self/fd/{fd}" if _proc_fd() else str(path)
        yield ArtifactFile(kind, mapped, length, digest)
    finally:
        os.close(fd)

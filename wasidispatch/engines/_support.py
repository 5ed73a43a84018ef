"""Engine-neutral helpers the engine modules share (stdlib only).

What every engine has to do the same way lives here, so that the engines agree on it:
telling a core module from a component by its header, checking preopens, mapping the
workload's ``cwd`` onto a preopen, and the envelope around precompiled artifacts.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from wasidispatch.engines._api import Preopen, Workload
from wasidispatch.errors import CompileError, EngineError, IncompatibleArtifact

__all__ = [
    "WasmKind",
    "check_preopens",
    "cwd_preopen",
    "open_envelope",
    "seal_envelope",
    "wasm_kind",
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


def check_preopens(preopens: tuple[Preopen, ...]) -> None:
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


# Precompiled artifacts travel in an envelope so that an engine's deserializer only ever
# sees bytes this library wrote: magic, the fingerprint of the engine configuration that
# made them, the kind, and a SHA-256 of the payload (wasmtime's deserialize trusts its input).
_ENVELOPE_MAGIC = b"WDPCA\x01"
_HEADER = struct.Struct("<6s64s1s32s")


def seal_envelope(fingerprint: str, kind: WasmKind, payload: bytes) -> bytes:
    """Wrap an engine's native artifact with its fingerprint, kind and digest."""
    fp = fingerprint.encode("ascii")
    if len(fp) != 64:
        raise ValueError("fingerprint must be 64 hex characters")
    header = _HEADER.pack(_ENVELOPE_MAGIC, fp, kind[0].encode(), hashlib.sha256(payload).digest())
    return header + payload


@dataclass(frozen=True, slots=True)
class Artifact:
    """An opened, verified envelope."""

    kind: WasmKind
    payload: bytes


def open_envelope(data: bytes, fingerprint: str) -> Artifact:
    """Verify and open an envelope made by `seal_envelope` for ``fingerprint``.

    Raises `IncompatibleArtifact` for anything else: foreign bytes, another engine,
    version or configuration, a truncated or altered payload.
    """
    if len(data) < _HEADER.size:
        raise IncompatibleArtifact("precompiled artifact is truncated or not made by wasidispatch")
    magic, fp, kind, digest = _HEADER.unpack_from(data)
    if magic != _ENVELOPE_MAGIC:
        raise IncompatibleArtifact("precompiled artifact was not made by wasidispatch")
    if fp != fingerprint.encode("ascii"):
        raise IncompatibleArtifact(
            "precompiled artifact was made by another engine, engine version or configuration"
        )
    payload = bytes(memoryview(data)[_HEADER.size :])
    if hashlib.sha256(payload).digest() != digest:
        raise IncompatibleArtifact("precompiled artifact is corrupt (digest mismatch)")
    if kind not in (b"m", b"c"):
        raise IncompatibleArtifact("precompiled artifact has an unknown kind")
    return Artifact("module" if kind == b"m" else "component", payload)

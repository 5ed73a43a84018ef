"""Guest programs for the tests, built from the sources next to this file.

``c/<name>.c`` are compiled with Debian's ``clang --target=wasm32-wasi -O2`` (wasi-libc, lld
and the wasm32 compiler-rt are Debian packages; ``make system-deps`` installs them) and
``wat/<name>.wat`` are assembled with ``wasmtime.wat2wasm``. Results are cached in the
gitignored ``tests/.fixtures/guests/`` under a name that includes a digest of the source and
the build command, so an edited source is rebuilt; writes are atomic (other test processes
may build the same guest at the same time).

C guests: ``hello`` (one line on stdout), ``say`` (prints argv[1], exits with argv[2]),
``args`` (argc then argv, one per line), ``env``
(the environment, or the named variables' values), ``exit`` (exits with argv[1]), ``files``
(``read``/``write``/``list`` under a preopen; failure is exit 1 with ``error: ...`` on
stderr), ``cat`` (stdin to stdout, byte count to stderr), ``loop`` (spins forever),
``bomb`` (mallocs until it fails, then aborts), ``trap`` (``__builtin_trap``).

WAT guests: ``hello``, ``exit42``, ``unreachable``, ``loop``, ``grow_bomb`` (memory.grow until
-1, then ``unreachable``), ``no_start`` (no ``_start``; exports ``answer`` that exits 7),
``recurse`` (stack overflow), ``component_hello`` (a WASI p2 command writing to stdout),
``component_fail`` (a WASI p2 command whose run returns err).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["C_GUESTS", "FIXTURES", "WAT_GUESTS", "build_c", "build_wat", "guest_bytes"]

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / ".fixtures" / "guests"
C_GUESTS = tuple(sorted(p.stem for p in (HERE / "c").glob("*.c")))
WAT_GUESTS = tuple(sorted(p.stem for p in (HERE / "wat").glob("*.wat")))

CLANG_FLAGS = ("--target=wasm32-wasi", "-O2", "-Wall", "-Werror")


class GuestBuildError(RuntimeError):
    """A guest could not be built (missing toolchain or a source error)."""


def _store(name: str, digest: str, produce: Callable[[Path], None]) -> Path:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    target = FIXTURES / f"{name}-{digest[:16]}.wasm"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(dir=FIXTURES, prefix=f".{name}-", suffix=".tmp")
    os.close(fd)
    try:
        produce(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build_c(name: str) -> Path:
    """Compile ``c/<name>.c`` to a WASI preview 1 command module; returns the cached path."""
    source = HERE / "c" / f"{name}.c"
    if not source.is_file():
        raise GuestBuildError(f"no C guest named {name!r} (have: {', '.join(C_GUESTS)})")
    clang = shutil.which("clang")
    if clang is None:
        raise GuestBuildError("clang is not installed (run `make system-deps`)")
    digest = hashlib.sha256(source.read_bytes() + " ".join(CLANG_FLAGS).encode()).hexdigest()

    def compile_c(out: Path) -> None:
        proc = subprocess.run(
            [clang, *CLANG_FLAGS, str(source), "-o", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise GuestBuildError(f"clang failed for {name}.c:\n{proc.stderr}")

    return _store(f"c-{name}", digest, compile_c)


def build_wat(name: str) -> Path:
    """Assemble ``wat/<name>.wat`` (module or component); returns the cached path."""
    source = HERE / "wat" / f"{name}.wat"
    if not source.is_file():
        raise GuestBuildError(f"no WAT guest named {name!r} (have: {', '.join(WAT_GUESTS)})")
    text = source.read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()

    def assemble(out: Path) -> None:
        import wasmtime

        out.write_bytes(wasmtime.wat2wasm(text))

    return _store(f"wat-{name}", digest, assemble)


def guest_bytes(kind: str, name: str) -> bytes:
    """The built guest's bytes: ``kind`` is ``"c"`` or ``"wat"``."""
    if kind == "c":
        return build_c(name).read_bytes()
    if kind == "wat":
        return build_wat(name).read_bytes()
    raise ValueError(f"guest kind must be 'c' or 'wat', not {kind!r}")

"""Precompile cache: compile a Wasm module once per node, load it in microseconds afterwards.

`PrecompileCache` stores what an engine's :meth:`~wasidispatch.engines.Engine.precompile`
returns, keyed by a stable key, and hands out a *verified* file the engine can map (wasmtime's
``Module.deserialize_file``). Only the engine contract is used, so it works with every engine
that can precompile; for the others :meth:`PrecompileCache.artifact` returns ``None``.

Key
    ``sha256(len-prefixed "wasidispatch-precompile-v1", engine.name, engine.fingerprint(),
    module digest)``. The module digest is the sha256 of the Wasm bytes, or the OCI layer digest
    the caller already knows (``digest="sha256:..."``; it is checked against the bytes on a
    miss). The engine fingerprint carries the engine version, the compile-relevant
    configuration and the target CPU, so changing any of them is a miss, never a wrong artifact.

Layout (under ``directory``, default ``$XDG_CACHE_HOME/wasidispatch``)::

    CACHEDIR.TAG
    v1/.lock               global lock: eviction, counters, clear
    v1/stats.json          persisted counters
    v1/entries/KEY.art     the artifact
    v1/entries/KEY.json    the commit record: engine, fingerprint, module digest, size, sha256
    v1/entries/KEY.lock    per-entry compile lock (fcntl.flock)

Writes go through `wasidispatch._fs.write_atomic`: a fresh temporary name created with
``O_EXCL | O_NOFOLLOW``, ``fsync``, ``rename``, ``fsync`` of the directory, so a symlink or a
file planted at the final or the temporary name is never followed or truncated. The artifact
is renamed first and the record last, and an entry exists only once its record does. A writer
killed at any point leaves either no entry or a whole one (at most an unreferenced temporary
or ``.art`` file, swept by eviction and `PrecompileCache.clear`). Lock files are opened with
``O_NOFOLLOW`` and never truncated; records and counters are read only as regular files of at
most 64 KiB (`wasidispatch._fs.read_regular`): a FIFO or a ``/dev/zero`` there is a discarded
entry, not a hang.

Integrity
    The record holds the artifact's sha256, checked before the artifact is handed out; a
    mismatch, a truncated or missing artifact, an unreadable record (wrong types, NaN, deep
    nesting) or a record of another entry is discarded, logged (logger
    ``wasidispatch.cache``), counted as a corruption and recompiled; it never reaches an
    engine's deserialize. Hashing a multi-megabyte artifact costs milliseconds, so each
    instance hashes a file once and afterwards re-checks its identity ``(device, inode,
    size, mtime_ns, ctime_ns)`` with one ``stat``: any write or replacement changes the inode
    or the ctime, which a process cannot set back. Likewise the digest of a Wasm module given
    as a path is remembered per file identity, so a warm run does not read the module again.

Trust, and directories held open
    Deserializing a wasmtime artifact runs native code it contains, so the directory must be
    one only this user can write: it is created 0700, and a directory that is group- or
    world-writable, or owned by another user, is refused with `CacheError`. The checks are
    made on descriptors of the directory, ``v1/`` and ``v1/entries/`` (the last two opened
    with ``O_NOFOLLOW``) that the instance keeps open: every later open, stat, rename and
    unlink is relative to them, so a long-lived instance whose directory is renamed away and
    replaced (by a symlink to another directory, say) keeps using the directory it checked.
    The path handed to the engine is ``/proc/self/fd/N`` of the artifact file that was
    hashed, kept open as long as the `CachedArtifact`'s path object lives: the engine maps
    the very file that was verified, whatever happens to the entry's name meanwhile (without
    ``/proc`` it is the entry's path, and a window remains in which only this user, or root,
    could replace the file). Callers that want no window at all even then use
    :meth:`CachedArtifact.read_bytes`, which returns bytes hashed after they were read.

An optimisation, never a failure
    When an entry cannot be written (a full or read-only file system, permissions, I/O
    errors), :meth:`PrecompileCache.with_precompiled` logs a warning once per cause and
    returns the workload with the compiled bytes as ``precompiled``: the workload runs,
    uncached. :meth:`PrecompileCache.artifact` (used by ``wasidispatch cache warm``) raises
    `CacheError` instead.

Concurrency
    Threads and processes asking for the same missing entry serialize on its ``flock`` (one
    open file description per request, so threads of one process exclude each other too): one
    compiles, the others wait and then read the committed entry. Readers take no lock: the
    rename makes an entry appear whole. Eviction and `clear` skip entries being compiled.

Size and eviction
    ``max_bytes`` bounds the sum of artifact sizes; after each insertion the least recently
    used entries go first. "Used" is the record's mtime, set explicitly (not atime, which
    relatime makes unreliable) on creation and on hits (at most once a second per entry and
    instance). The entry just written is never evicted by its own insertion. An artifact
    handed out stays readable through its ``/proc/self/fd`` path even if another process
    evicts the entry meanwhile; the next lookup then compiles it again.

Counters
    `PrecompileCache.stats` returns counters persisted in ``stats.json`` across processes and
    instances. Misses, evictions and corruptions are written when they happen (they are on the
    slow path anyway); hits are kept in memory and written on the next miss, on `stats`,
    `flush`, `close`, every 10 seconds of hits, and at interpreter exit (a process killed with
    SIGKILL loses its unwritten hits). `PrecompileCache.session_stats` counts this instance only.

Using it from an executor::

    cache = PrecompileCache()                       # one per process; thread-safe
    workload = cache.with_precompiled(engine, workload, digest=layer_digest)
    result = engine.run(workload)  # precompiled: a verified path (bytes if the cache is read-only)

Example (with any engine; here the smallest one that can precompile)::

    >>> import tempfile
    >>> from wasidispatch.engines import Capabilities
    >>> class Echo:  # precompile returns the Wasm bytes reversed
    ...     name = "echo"
    ...     capabilities = Capabilities(precompile=True)
    ...     def fingerprint(self) -> str: return "echo 1"
    ...     def precompile(self, wasm: bytes) -> bytes: return wasm[::-1]
    >>> tmp = tempfile.TemporaryDirectory()
    >>> cache = PrecompileCache(tmp.name, max_bytes=1 << 20)
    >>> first = cache.artifact(Echo(), b"\\0asm\\1\\0\\0\\0")
    >>> second = cache.artifact(Echo(), b"\\0asm\\1\\0\\0\\0")
    >>> (first.hit, second.hit, second.path == first.path, first.path.read_bytes()[:2])
    (False, True, True, b'\\x00\\x00')
    >>> s = cache.stats(); (s.hits, s.misses, s.entries)
    (1, 1, 1)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path, PosixPath
from typing import TYPE_CHECKING, Any, Protocol

from wasidispatch._fs import read_regular, write_atomic
from wasidispatch.errors import CacheError, SpecError

if TYPE_CHECKING:
    import logging

    from wasidispatch.engines._api import Capabilities, Workload

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CacheEntry",
    "CacheStats",
    "CachedArtifact",
    "PrecompileCache",
    "WasmSource",
    "cache_key",
    "default_cache_dir",
]


def _log() -> logging.Logger:
    """The ``wasidispatch.cache`` logger; `logging` is imported only when something is logged
    (a cache hit, as ``wasidispatch-runc create`` has it, logs nothing)."""
    import logging

    return logging.getLogger("wasidispatch.cache")


#: Default bound on the sum of artifact sizes (2 GiB).
DEFAULT_MAX_BYTES = 2 << 30

#: What `PrecompileCache.artifact` accepts as the module: its bytes, or a path to them.
WasmSource = bytes | bytearray | memoryview | os.PathLike[str]

_FORMAT = "v1"
_KEY_DOMAIN = "wasidispatch-precompile-v1"
_TOUCH_EVERY_NS = 1_000_000_000  # refresh an entry's last-use time at most once a second
_FLUSH_HITS_EVERY_NS = 10_000_000_000
_STALE_TEMP_NS = 3600 * 1_000_000_000  # leftovers of a killed writer older than this are swept
_KEY_RE = re.compile(r"[0-9a-f]{64}")
# OCI image-spec digest grammar: algorithm ":" encoded.
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_HEX_LEN = {"sha256": 64, "sha512": 128}
_CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by wasidispatch.\n"
    b"# For information about cache directory tags see https://bford.info/cachedir/\n"
)


class _PrecompilingEngine(Protocol):
    """The part of the `Engine` protocol the cache uses."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def fingerprint(self) -> str: ...

    def precompile(self, wasm: bytes) -> bytes | None: ...


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/wasidispatch``, or ``~/.cache/wasidispatch`` when that variable is
    unset or not absolute (the XDG base-directory spec says to ignore relative values).

    Example::

        >>> default_cache_dir().name
        'wasidispatch'
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "wasidispatch"


def cache_key(engine_name: str, fingerprint: str, module_digest: str) -> str:
    """The entry key: sha256 over length-prefixed parts, so no two inputs share a key.

    Example::

        >>> k = cache_key("wasmtime", "wasmtime 50.0.1 x86_64", "sha256:" + "0" * 64)
        >>> len(k), k == cache_key("wasmtime", "wasmtime 50.0.2 x86_64", "sha256:" + "0" * 64)
        (64, False)
    """
    h = hashlib.sha256()
    for part in (_KEY_DOMAIN, engine_name, fingerprint, module_digest):
        raw = part.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    return h.hexdigest()


def _normalize_digest(digest: str) -> tuple[str, str]:
    """``(algorithm, hex)`` of an OCI digest (``sha256:...``, ``sha512:...``) or bare sha256 hex."""
    if not isinstance(digest, str):
        raise SpecError(f"a digest is a string such as 'sha256:<hex>', not {type(digest).__name__}")
    if re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        return "sha256", digest.lower()
    m = _DIGEST_RE.fullmatch(digest)
    if m is None:
        raise SpecError(f"not an OCI digest: {digest!r} (expected 'sha256:<64 hex digits>')")
    alg, encoded = m.group(1), m.group(2)
    want = _HEX_LEN.get(alg)
    if want is None:
        raise SpecError(f"unsupported digest algorithm {alg!r} in {digest!r} (sha256, sha512)")
    if not re.fullmatch(rf"[0-9a-f]{{{want}}}", encoded):
        raise SpecError(f"malformed {alg} digest {digest!r}: need {want} lowercase hex digits")
    return alg, encoded


@dataclass(frozen=True, slots=True)
class CachedArtifact:
    """A verified precompiled artifact in the cache.

    ``path`` is the file to give the engine (``Workload(precompiled=path)``; wasmtime maps it
    with ``deserialize_file``); its content had sha256 ``sha256`` when it was handed out. It is
    ``/proc/self/fd/N`` of the very file that was hashed, kept open as long as the path object
    lives (the entry's name ``directory/v1/entries/KEY.art`` where there is no ``/proc``, and
    in a pickled copy).
    ``hit`` tells whether it came from the cache (``False``: compiled just now).
    ``module_digest`` is the module's identity (``sha256:<hex>``) and ``key`` the entry key.
    """

    path: Path
    sha256: str
    size: int
    key: str
    engine: str
    fingerprint: str
    module_digest: str
    hit: bool

    def read_bytes(self) -> bytes:
        """The artifact's bytes, hashed after reading: no window between check and use.

        Raises `CacheError` when the file no longer has the recorded sha256 (ask the cache
        again: it will discard and recompile the entry).
        """
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise CacheError(f"cannot read cached artifact {self.path}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise CacheError(f"cached artifact {self.path} changed after it was verified")
        return data

    def apply(self, workload: Workload) -> Workload:
        """``workload`` with ``precompiled`` set to this artifact's path."""
        return dataclasses.replace(workload, precompiled=self.path)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters and size of a cache.

    ``hits``: artifacts handed out from the cache; ``misses``: artifacts compiled and stored;
    ``evictions``: entries removed to stay under ``max_bytes``; ``corruptions``: entries found
    damaged (hash mismatch, truncated, foreign) and discarded. ``entries`` and ``bytes`` (sum
    of artifact sizes) describe the directory now.
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    corruptions: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One committed entry, as listed by :meth:`PrecompileCache.entries`.

    ``last_used_ns`` is the wall-clock time of creation or of the last recorded hit.
    """

    key: str
    engine: str
    fingerprint: str
    module_digest: str
    size: int
    sha256: str
    last_used_ns: int


@dataclass(slots=True)
class _Verified:
    identity: tuple[int, int, int, int, int]
    artifact: CachedArtifact  # with hit=True


@dataclass(frozen=True, slots=True)
class _Corrupt:
    reason: str


_COUNTER_NAMES = ("hits", "misses", "evictions", "corruptions")
_RECORD_LIMIT = 64 << 10  # a record is ~400 bytes; anything near this is not one of ours
_VERIFIED_MAX = 64  # verified artifacts kept open per instance (each holds a descriptor)
_DIGESTS_MAX = 1024  # module digests remembered per file identity
#: A file changed less than this long before it was hashed may change again within the same
#: timestamp tick without its identity changing; its digest is not remembered (racy git).
_RACY_NS = 2_000_000_000

_PROC_FD: bool | None = None


def _proc_fd() -> bool:
    """Whether ``/proc/self/fd`` names this process's descriptors (Linux with /proc)."""
    global _PROC_FD
    if _PROC_FD is None:
        _PROC_FD = os.path.isdir("/proc/self/fd")
    return _PROC_FD


class _Dir:
    """A directory held open since it was checked: every name is looked up in that very
    directory (``dir_fd=``), whatever is renamed or planted at its path afterwards.

    ``path(name)`` is ``/proc/self/fd/N/name`` for the `wasidispatch._fs` functions, which
    take paths; without ``/proc`` it falls back to the directory's path.
    """

    __slots__ = ("fd", "shown")

    def __init__(self, fd: int, shown: Path) -> None:
        self.fd = fd
        self.shown = shown

    def path(self, name: str) -> Path:
        if _proc_fd():
            return Path(f"/proc/self/fd/{self.fd}/{name}")
        return self.shown / name

    def say(self, exc: object) -> str:
        """``exc``'s message with the ``/proc/self/fd`` paths of `path` as the real ones."""
        return str(exc).replace(f"/proc/self/fd/{self.fd}/", f"{self.shown}/")

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class _Pin:
    """An open, verified artifact file; closed when nothing refers to it any more."""

    __slots__ = ("__weakref__", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        weakref.finalize(self, os.close, fd)


class _PinnedPath(PosixPath):
    """``/proc/self/fd/N`` of a verified artifact, keeping descriptor N open while it lives.

    Handing the engine this path (instead of the entry's name) means it maps the very file
    that was hashed: renaming, replacing or evicting the entry, or swapping a directory
    above it, cannot substitute another file. Copies made with ``str()`` do not keep the
    descriptor open.
    """

    _pin: _Pin
    _entry: Path

    def __reduce__(self) -> tuple[type[PosixPath], tuple[str]]:
        # Descriptor N means nothing in another process: a copy names the entry instead.
        return PosixPath, (str(self._entry),)


def _pinned(fd: int, entry: Path) -> Path:
    """The path to give the engine for the open artifact ``fd`` (which it takes over)."""
    if not _proc_fd():
        os.close(fd)
        return entry
    path = _PinnedPath(f"/proc/self/fd/{fd}")
    path._pin = _Pin(fd)
    path._entry = entry
    return path


class _Counters:
    """Counters not yet written to ``stats.json``; flushed by a finalizer at exit too."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending = dict.fromkeys(_COUNTER_NAMES, 0)
        self.session = dict.fromkeys(_COUNTER_NAMES, 0)
        self.last_flush_ns = time.monotonic_ns()

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.pending[name] += n
            self.session[name] += n

    def flush(self, base: _Dir) -> dict[str, int]:
        """Add pending counts to ``stats.json``; return the new totals."""
        with self.lock:
            pending = dict(self.pending)
            for name in _COUNTER_NAMES:
                self.pending[name] = 0
            self.last_flush_ns = time.monotonic_ns()
        if not any(pending.values()):
            # Nothing to add: a plain read (the file is replaced whole), which also works in
            # a read-only cache.
            return _read_counters(base)
        try:
            with _FileLock(base, ".lock"):
                totals = _read_counters(base)
                for name in _COUNTER_NAMES:
                    totals[name] += pending[name]
                data = json.dumps(totals).encode()
                write_atomic(base.path("stats.json"), data, mode=0o600)
        except OSError as exc:
            with self.lock:  # keep the counts for the next try
                for name in _COUNTER_NAMES:
                    self.pending[name] += pending[name]
            raise CacheError(
                f"cannot update cache counters in {base.shown}: {base.say(exc)}"
            ) from exc
        return totals


def _finish(counters: _Counters, dirs: tuple[_Dir, ...]) -> None:
    """The instance is gone (or the interpreter exits): flush what is pending, close dirs."""
    try:
        if any(counters.pending.values()):
            with contextlib.suppress(Exception):  # best effort
                counters.flush(dirs[0])
    finally:
        for d in dirs:
            with contextlib.suppress(OSError):
                d.close()


def _read_counters(base: _Dir) -> dict[str, int]:
    totals = dict.fromkeys(_COUNTER_NAMES, 0)
    try:
        raw: Any = json.loads(
            read_regular(
                base.path("stats.json"),
                limit=_RECORD_LIMIT,
                what="cache counters",
                error=CacheError,
                follow=False,
            )
        )
    except CacheError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):
            _log().warning("ignoring unreadable cache counters: %s", base.say(exc))
        return totals
    except (ValueError, RecursionError):
        _log().warning("ignoring unreadable cache counters in %s", base.shown)
        return totals
    if isinstance(raw, dict):
        for name in _COUNTER_NAMES:
            value = raw.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                totals[name] = value
    return totals


class _FileLock:
    """An exclusive ``flock`` on ``name`` in ``directory``, robust against the lock file
    being unlinked.

    Each acquisition opens its own file description, so two threads of one process exclude
    each other as two processes do. The file is opened without following a symlink and
    never truncated, and anything but a regular file at the name is refused (`OSError`), so
    a planted name is never written through. After locking, the name must still be the
    locked inode; if someone unlinked it meanwhile (eviction), the lock is retaken.
    """

    def __init__(self, directory: _Dir, name: str, *, blocking: bool = True) -> None:
        self.dir = directory
        self.name = name
        self.blocking = blocking
        self.fd: int | None = None

    def acquire(self) -> bool:
        import fcntl  # only a miss or eviction locks

        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        op = fcntl.LOCK_EX if self.blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        while True:
            fd = os.open(self.name, flags, 0o600, dir_fd=self.dir.fd)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(errno.EEXIST, "not a lock file", str(self.dir.shown / self.name))
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                st = os.stat(self.name, dir_fd=self.dir.fd, follow_symlinks=False)
                same = (st.st_dev, st.st_ino) == _identity(os.fstat(fd))[:2]
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)

    def unlink(self) -> None:
        """Remove the lock file while holding it (waiters then retake a fresh one)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name, dir_fd=self.dir.fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> _FileLock:
        if not self.acquire():
            raise BlockingIOError(errno.EWOULDBLOCK, "lock is held", str(self.name))
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_trusted(st: os.stat_result, path: Path) -> None:
    """Refuse a directory another user could write to (see the module docstring)."""
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache directory {path} is not a directory")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise CacheError(
            f"refusing cache directory {path}: it is owned by uid {st.st_uid}, not by this user "
            f"(uid {uid}); its owner could plant precompiled artifacts, and loading one runs "
            "its native code in this process. Use a directory of your own."
        )
    if st.st_mode & 0o022:
        raise CacheError(
            f"refusing cache directory {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
            "other users write to it, and they could plant precompiled artifacts whose native "
            f"code would run in this process. Fix it with `chmod 700 {path}`."
        )


def _make_private_dir(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0700."""
    missing: list[Path] = []
    p = path
    try:
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
    except OSError as exc:  # e.g. a parent this user may not search
        raise CacheError(f"cannot use cache directory {path}: {exc}") from exc
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # another process won the race; checked by the caller
        except OSError as exc:
            raise CacheError(f"cannot create cache directory {d}: {exc}") from exc
        # mkdir's mode is filtered by the umask. fchmod through an O_NOFOLLOW descriptor: a
        # symlink swapped in at the new name meanwhile is refused (ELOOP), never followed.
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        except OSError as exc:
            raise CacheError(f"cannot make cache directory {d} private: {exc}") from exc


def _open_trusted(path: Path) -> _Dir:
    """Open the cache directory ``path`` (created if missing) and check it is trusted."""
    _make_private_dir(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError as exc:
        raise CacheError(f"cache directory {path} is not a directory") from exc
    except OSError as exc:
        raise CacheError(f"cannot use cache directory {path}: {exc}") from exc
    return _checked(fd, path)


def _checked(fd: int, path: Path) -> _Dir:
    try:
        _check_trusted(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return _Dir(fd, path)


def _open_subdir(parent: _Dir, name: str) -> _Dir:
    """``parent/name``, created 0700 if missing; a symlink there is refused, not followed."""
    shown = parent.shown / name
    created = False
    try:
        os.mkdir(name, 0o700, dir_fd=parent.fd)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise CacheError(f"cannot create cache directory {shown}: {exc}") from exc
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent.fd)
    except (NotADirectoryError, OSError) as exc:
        if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
            raise CacheError(f"cache directory {shown} is not a directory") from exc
        raise CacheError(f"cannot use cache directory {shown}: {exc}") from exc
    if created:
        try:
            os.fchmod(fd, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            os.close(fd)
            raise CacheError(f"cannot make cache directory {shown} private: {exc}") from exc
    return _checked(fd, shown)


class PrecompileCache:
    """A node-local cache of precompiled Wasm artifacts (see the module docstring).

    ``directory`` defaults to :func:`default_cache_dir`; it is created 0700, and refused with
    `CacheError` when another user owns it or could write to it. ``max_bytes`` bounds the sum
    of artifact sizes (least recently used entries are evicted). One instance may be shared by
    threads; instances in several processes may share a directory. The directories are held
    open from construction on: renaming them or planting a symlink at their path afterwards
    changes nothing for this instance.

    For an executor, the whole integration is::

        workload = cache.with_precompiled(engine, workload, digest=known_layer_digest)

    which leaves the workload unchanged for an engine that cannot precompile, and runs it
    uncached (with a warning) when the cache cannot be written.
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise CacheError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.max_bytes = max_bytes
        top = _open_trusted(self.directory)
        try:
            self._base_dir = _open_subdir(top, _FORMAT)
            try:
                self._entries_dir = _open_subdir(self._base_dir, "entries")
            except BaseException:
                self._base_dir.close()
                raise
            try:
                os.stat("CACHEDIR.TAG", dir_fd=top.fd, follow_symlinks=False)
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    write_atomic(top.path("CACHEDIR.TAG"), _CACHEDIR_TAG, mode=0o600)
            except OSError:
                pass
        finally:
            top.close()
        self._base = self._base_dir.shown
        self._entries = self._entries_dir.shown
        self._lock = threading.Lock()
        self._verified: dict[str, _Verified] = {}
        self._digests: dict[tuple[int, int, int, int, int], str] = {}
        self._touched: dict[str, int] = {}
        self._no_precompile: set[tuple[str, str]] = set()
        self._warned: set[tuple[str, object]] = set()
        self._counters = _Counters()
        self._finalizer = weakref.finalize(
            self, _finish, self._counters, (self._base_dir, self._entries_dir)
        )

    def __repr__(self) -> str:
        return f"PrecompileCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    # -- the hot path -------------------------------------------------------------------------

    def artifact(
        self, engine: _PrecompilingEngine, wasm: WasmSource, *, digest: str | None = None
    ) -> CachedArtifact | None:
        """A verified artifact of ``wasm`` for ``engine``, compiling and storing it on a miss.

        ``wasm`` is the module's bytes or a path (`os.PathLike`) to them. ``digest``
        (``sha256:<hex>``, e.g. an OCI layer digest) names the module without hashing it; on a
        miss the bytes are checked against it (`SpecError` when they differ). Returns ``None``
        when the engine cannot precompile. Raises what ``engine.precompile`` raises
        (`CompileError` for bad Wasm; nothing is stored then), `CacheError` for an unusable
        cache directory or an entry that cannot be written (:meth:`with_precompiled` runs
        the workload uncached instead).
        """
        got = self._get(engine, wasm, digest, degrade=False)
        assert not isinstance(got, bytes)  # degrade=False raises instead
        return got

    def with_precompiled(
        self, engine: _PrecompilingEngine, workload: Workload, *, digest: str | None = None
    ) -> Workload:
        """``workload`` with ``precompiled`` pointing at a verified cached artifact.

        Unchanged when it already has ``precompiled`` or the engine cannot precompile. When
        the entry cannot be written (a full or read-only file system, permissions, I/O
        errors) a warning is logged once per cause and ``precompiled`` is the artifact's
        bytes, which the engine verifies in full: the cache is an optimisation, the workload
        still runs. Raises like :meth:`artifact` otherwise.
        """
        if workload.precompiled is not None:
            return workload
        got = self._get(engine, workload.wasm, digest, degrade=True)
        if got is None:
            return workload
        if isinstance(got, bytes):
            return dataclasses.replace(workload, precompiled=got)
        return got.apply(workload)

    def _get(
        self,
        engine: _PrecompilingEngine,
        wasm: WasmSource,
        digest: str | None,
        *,
        degrade: bool,
    ) -> CachedArtifact | bytes | None:
        if not engine.capabilities.precompile:
            return None
        name = engine.name
        fingerprint = engine.fingerprint()
        if (name, fingerprint) in self._no_precompile:
            return None
        data: bytes | None = None
        if digest is not None:
            alg, encoded = _normalize_digest(digest)
            module_digest = f"{alg}:{encoded}"
        elif isinstance(wasm, bytes | bytearray | memoryview):
            data = bytes(wasm)
            module_digest = "sha256:" + hashlib.sha256(data).hexdigest()
        else:
            module_digest, data = self._path_digest(Path(wasm))
        key = cache_key(name, fingerprint, module_digest)

        found = self._lookup_fast(key)
        if found is not None:
            return found
        loaded = self._load(key, name, fingerprint, module_digest)
        if isinstance(loaded, CachedArtifact):
            self._hit(key)
            return loaded

        if data is None:
            data = _wasm_bytes(wasm)
            if digest is not None:
                _check_digest(data, module_digest)
            else:  # a remembered digest of a file that changed in the meantime
                actual = "sha256:" + hashlib.sha256(data).hexdigest()
                if actual != module_digest:
                    module_digest = actual
                    key = cache_key(name, fingerprint, module_digest)
        lock = _FileLock(self._entries_dir, f"{key}.lock")
        try:
            lock.acquire()
        except OSError as exc:
            if not degrade:
                raise CacheError(
                    f"cannot lock cache entry in {self._entries}: {self._entries_dir.say(exc)}"
                ) from exc
            self._warn_once("lock", exc)
            return self._uncached(engine, name, fingerprint, data)
        try:
            # Somebody may have compiled it while we waited for the lock.
            loaded = self._load(key, name, fingerprint, module_digest)
            if isinstance(loaded, CachedArtifact):
                self._hit(key)
                return loaded
            if isinstance(loaded, _Corrupt):
                self._discard(key, name, loaded.reason)
            compiled = engine.precompile(data)
            if compiled is None:
                self._no_precompile.add((name, fingerprint))
                return None
            compiled = bytes(compiled)
            try:
                result = self._store(key, name, fingerprint, module_digest, compiled)
            except OSError as exc:
                if not degrade:
                    raise CacheError(
                        f"cannot write cache entry in {self._entries}: {self._entries_dir.say(exc)}"
                    ) from exc
                self._warn_once("write", exc)
                return compiled
            self._counters.add("misses")
        finally:
            lock.release()
        # The entry is committed; trimming and counting are housekeeping that must not fail it.
        try:
            self._evict(keep=key)
            self._counters.flush(self._base_dir)
        except (OSError, CacheError) as exc:
            self._warn_once("housekeeping", exc)
        return result

    def _uncached(
        self, engine: _PrecompilingEngine, name: str, fingerprint: str, data: bytes
    ) -> bytes | None:
        compiled = engine.precompile(data)
        if compiled is None:
            self._no_precompile.add((name, fingerprint))
            return None
        return bytes(compiled)

    def _warn_once(self, what: str, exc: OSError | CacheError) -> None:
        """Log a cache failure as a warning the first time its cause is seen, then as debug."""
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        errno_ = cause.errno if isinstance(cause, OSError) else type(exc).__name__
        with self._lock:
            first = (what, errno_) not in self._warned
            self._warned.add((what, errno_))
        if what == "housekeeping":
            message = "precompile cache housekeeping failed in %s: %s"
        else:
            message = "precompile cache in %s cannot %s an entry (%s); running uncached"
        said = self._base_dir.say(self._entries_dir.say(exc))
        args: tuple[object, ...] = (self._base, said)
        if what != "housekeeping":
            args = (self._base, what, said)
        if first:
            _log().warning(message, *args)
        else:
            _log().debug(message, *args)

    def _path_digest(self, path: Path) -> tuple[str, bytes | None]:
        """The module digest of the file ``path``, and its bytes when they had to be read.

        The digest is remembered per file identity (device, inode, size, mtime, ctime), so an
        unchanged file is not read again; any write or replacement changes the identity.
        """
        try:
            known = self._digests.get(_identity(os.stat(path)))
        except OSError as exc:
            raise CacheError(f"cannot read Wasm module {path}: {exc}") from exc
        if known is not None:
            return known, None
        began = time.time_ns()
        data, before, after = _read_module(path)
        module_digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if before == after and began - after[4] > _RACY_NS:
            with self._lock:
                if len(self._digests) >= _DIGESTS_MAX:
                    self._digests.pop(next(iter(self._digests)))
                self._digests[after] = module_digest
        return module_digest, data

    def _lookup_fast(self, key: str) -> CachedArtifact | None:
        """A hit on a file this instance already hashed and that nobody changed since."""
        memo = self._verified.get(key)
        if memo is None:
            return None
        try:
            st = os.stat(f"{key}.art", dir_fd=self._entries_dir.fd, follow_symlinks=False)
        except OSError:
            st = None
        if st is None or _identity(st) != memo.identity:
            self._forget(key)
            return None
        self._hit(key)
        return memo.artifact

    def _forget(self, key: str) -> None:
        with self._lock:  # not while _remember trims (an iteration)
            self._verified.pop(key, None)

    def _remember(
        self, key: str, identity: tuple[int, int, int, int, int], art: CachedArtifact
    ) -> None:
        with self._lock:
            self._verified.pop(key, None)
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.pop(next(iter(self._verified)))
            self._verified[key] = _Verified(identity, art)

    def _hit(self, key: str) -> None:
        now = time.time_ns()
        if now - self._touched.get(key, 0) >= _TOUCH_EVERY_NS:
            self._touched[key] = now
            with contextlib.suppress(OSError):  # evicted meanwhile, or read-only
                os.utime(
                    f"{key}.json",
                    ns=(now, now),
                    dir_fd=self._entries_dir.fd,
                    follow_symlinks=False,
                )
        self._counters.add("hits")
        if time.monotonic_ns() - self._counters.last_flush_ns >= _FLUSH_HITS_EVERY_NS:
            try:
                self._counters.flush(self._base_dir)
            except CacheError as exc:  # counts are kept for the next try; the hit stands
                self._warn_once("housekeeping", exc)

    # -- reading and writing entries ----------------------------------------------------------

    def _read_record(self, key: str) -> dict[str, Any] | _Corrupt | None:
        """The parsed record of ``key``; ``None`` if absent, `_Corrupt` if unusable."""
        try:
            raw = read_regular(
                self._entries_dir.path(f"{key}.json"),
                limit=_RECORD_LIMIT,
                what="cache record",
                error=CacheError,
                follow=False,
            )
        except CacheError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            return _Corrupt(f"its record cannot be read ({self._entries_dir.say(exc)})")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):
            return _Corrupt("its record is unreadable")
        return meta if isinstance(meta, dict) else _Corrupt("its record is not a JSON object")

    def _load(
        self, key: str, name: str, fingerprint: str, module_digest: str
    ) -> CachedArtifact | _Corrupt | None:
        """Read and verify an entry: the artifact, ``_Corrupt`` with why, or None if absent."""
        meta = self._read_record(key)
        if meta is None or isinstance(meta, _Corrupt):
            return meta
        want = {"key": key, "engine": name, "fingerprint": fingerprint, "module": module_digest}
        if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in want.items()):
            return _Corrupt("its record belongs to another entry")
        size, sha = meta.get("size"), meta.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return _Corrupt("its record has no valid size")
        if not isinstance(sha, str) or not _KEY_RE.fullmatch(sha):
            return _Corrupt("its record has no valid sha256")
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(f"{key}.art", flags, dir_fd=self._entries_dir.fd)
        except FileNotFoundError:
            return _Corrupt("its artifact is missing")
        except OSError as exc:
            return _Corrupt(f"its artifact cannot be opened ({exc.strerror})")
        try:
            checked = _verify_artifact(fd, size, sha)
        except BaseException:
            os.close(fd)
            raise
        if isinstance(checked, _Corrupt):
            os.close(fd)
            return checked
        path = _pinned(fd, self._entries / f"{key}.art")
        art = CachedArtifact(path, sha, size, key, name, fingerprint, module_digest, hit=True)
        self._remember(key, _identity(checked), art)
        return art

    def _store(
        self, key: str, name: str, fingerprint: str, module_digest: str, compiled: bytes
    ) -> CachedArtifact:
        """Commit an entry (caller holds its lock): artifact first, record last.

        Raises `OSError` when it cannot; nothing of the entry is left behind then.
        """
        sha = hashlib.sha256(compiled).hexdigest()
        meta = {
            "format": 1,
            "key": key,
            "engine": name,
            "fingerprint": fingerprint,
            "module": module_digest,
            "size": len(compiled),
            "sha256": sha,
            "created_ns": time.time_ns(),
        }
        entries = self._entries_dir
        # durable: the artifact's name is on disk before the record's
        write_atomic(entries.path(f"{key}.art"), compiled, mode=0o600, durable=True)
        try:
            write_atomic(
                entries.path(f"{key}.json"),
                json.dumps(meta).encode(),
                mode=0o600,
                durable=True,
                mtime_ns=time.time_ns(),
            )
            fd = os.open(
                f"{key}.art", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=entries.fd
            )
        except BaseException:
            self._remove_entry(key)
            raise
        try:
            checked = _verify_artifact(fd, len(compiled), sha)
        except BaseException:
            os.close(fd)
            raise
        if isinstance(checked, _Corrupt):  # replaced under our lock: by this user only
            os.close(fd)
            raise OSError(errno.EIO, f"the entry just written {checked.reason[4:]}")
        path = _pinned(fd, self._entries / f"{key}.art")
        art = CachedArtifact(path, sha, len(compiled), key, name, fingerprint, module_digest, True)
        self._remember(key, _identity(checked), art)
        return dataclasses.replace(art, hit=False)

    def _discard(self, key: str, engine: str, reason: str) -> None:
        _log().warning("discarding corrupt precompile cache entry %s (%s): %s", key, engine, reason)
        self._forget(key)
        self._remove_entry(key)
        self._counters.add("corruptions")

    def _remove_entry(self, key: str) -> None:
        # Record first: without it the entry is gone even if we stop halfway. A read-only
        # cache keeps the entry: it is discarded again (and not loaded) on every lookup.
        for suffix in (".json", ".art"):
            try:
                os.unlink(f"{key}{suffix}", dir_fd=self._entries_dir.fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                _log().debug("cannot remove %s%s: %s", key, suffix, exc)

    # -- listing, eviction, counters ----------------------------------------------------------

    def _scan(self) -> tuple[list[CacheEntry], set[str]]:
        """Committed entries (oldest use first) and the names of every file in the directory."""
        entries = self._entries_dir
        try:
            names = set(os.listdir(entries.fd))
        except OSError as exc:
            raise CacheError(f"cannot list cache directory {self._entries}: {exc}") from exc
        found: list[CacheEntry] = []
        for fname in names:
            key, _, suffix = fname.partition(".")
            if suffix != "json" or not _KEY_RE.fullmatch(key) or f"{key}.art" not in names:
                continue
            try:
                st = os.stat(fname, dir_fd=entries.fd, follow_symlinks=False)
                art = os.stat(f"{key}.art", dir_fd=entries.fd, follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            meta = self._read_record(key)
            if not isinstance(meta, dict) or not stat.S_ISREG(art.st_mode):
                continue  # damaged: the next lookup will say so
            found.append(
                CacheEntry(
                    key=key,
                    engine=_text(meta.get("engine")),
                    fingerprint=_text(meta.get("fingerprint")),
                    module_digest=_text(meta.get("module")),
                    size=art.st_size,
                    sha256=_text(meta.get("sha256")),
                    last_used_ns=st.st_mtime_ns,
                )
            )
        found.sort(key=lambda e: (e.last_used_ns, e.key))
        return found, names

    def entries(self) -> list[CacheEntry]:
        """The committed entries, least recently used first."""
        return self._scan()[0]

    def _sweep(self, names: set[str], entries: list[CacheEntry], *, all_locks: bool) -> None:
        """Remove leftovers of killed writers and unused lock files."""
        live = {e.key for e in entries}
        now = time.time_ns()
        fd = self._entries_dir.fd
        for fname in names:
            key, _, suffix = fname.partition(".")
            temporary = fname.startswith(".") and fname.endswith(".tmp")  # _fs.write_atomic's
            if temporary or fname.startswith(".tmp-") or (suffix == "art" and key not in live):
                with contextlib.suppress(OSError):
                    if now - os.stat(fname, dir_fd=fd, follow_symlinks=False).st_mtime_ns > (
                        _STALE_TEMP_NS
                    ):
                        os.unlink(fname, dir_fd=fd)
            elif suffix == "lock" and (all_locks or key not in live):
                lock = _FileLock(self._entries_dir, fname, blocking=False)
                with contextlib.suppress(OSError):
                    if lock.acquire():
                        lock.unlink()
                        lock.release()

    def _evict(self, *, keep: str | None) -> None:
        with _FileLock(self._base_dir, ".lock"):
            entries, names = self._scan()
            total = sum(e.size for e in entries)
            for e in entries:
                if total <= self.max_bytes:
                    break
                if e.key == keep:
                    continue
                lock = _FileLock(self._entries_dir, f"{e.key}.lock", blocking=False)
                if not lock.acquire():
                    continue  # being rewritten right now
                try:
                    self._remove_entry(e.key)
                    lock.unlink()
                finally:
                    lock.release()
                self._forget(e.key)
                total -= e.size
                self._counters.add("evictions")
                _log().info(
                    "evicted precompile cache entry %s (%s, %d bytes)", e.key, e.engine, e.size
                )
            self._sweep(names, entries, all_locks=False)

    def stats(self) -> CacheStats:
        """Counters persisted across processes (this instance's included) and the size now."""
        totals = self._counters.flush(self._base_dir)
        entries = self.entries()
        return CacheStats(
            **totals,
            entries=len(entries),
            bytes=sum(e.size for e in entries),
            max_bytes=self.max_bytes,
        )

    def session_stats(self) -> CacheStats:
        """Counters of this instance only, and the size now."""
        with self._counters.lock:
            session = dict(self._counters.session)
        entries = self.entries()
        return CacheStats(
            **session,
            entries=len(entries),
            bytes=sum(e.size for e in entries),
            max_bytes=self.max_bytes,
        )

    def flush(self) -> None:
        """Write this instance's pending hit count to the persisted counters."""
        self._counters.flush(self._base_dir)

    def close(self) -> None:
        """Flush counters. The instance stays usable; closing twice is harmless."""
        self.flush()

    def __enter__(self) -> PrecompileCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear(self) -> int:
        """Remove every entry and reset the counters; returns the number of entries removed.

        Entries being compiled at this moment (their lock is held) survive.
        """
        removed = 0
        try:
            with _FileLock(self._base_dir, ".lock"):
                entries, names = self._scan()
                for e in entries:
                    lock = _FileLock(self._entries_dir, f"{e.key}.lock", blocking=False)
                    if not lock.acquire():
                        continue
                    try:
                        self._remove_entry(e.key)
                        lock.unlink()
                    finally:
                        lock.release()
                    removed += 1
                self._sweep(names, entries, all_locks=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink("stats.json", dir_fd=self._base_dir.fd)
        except OSError as exc:
            raise CacheError(f"cannot clear cache directory {self._base}: {exc}") from exc
        finally:
            with self._lock:  # whatever is left is verified again on its next use
                self._verified.clear()
        self._touched.clear()
        with self._counters.lock:
            for name in _COUNTER_NAMES:
                self._counters.pending[name] = 0
        return removed


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _verify_artifact(fd: int, size: int, sha: str) -> _Corrupt | os.stat_result:
    """Check the open artifact ``fd``: a regular file of ``size`` bytes hashing to ``sha``,
    unchanged while it was hashed. Its ``fstat`` when it is, `_Corrupt` with why if not."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _Corrupt("its artifact is not a regular file")
        if st.st_size != size:
            return _Corrupt(f"its artifact has {st.st_size} bytes, the record says {size}")
        with open(fd, "rb", closefd=False) as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != sha:
            return _Corrupt(f"its artifact's sha256 is {actual[:16]}..., recorded {sha[:16]}...")
        if _identity(os.fstat(fd)) != _identity(st):
            return _Corrupt("its artifact changed while it was verified")
    except OSError as exc:
        return _Corrupt(f"its artifact cannot be read ({exc.strerror})")
    return st


def _read_module(
    path: Path,
) -> tuple[bytes, tuple[int, int, int, int, int], tuple[int, int, int, int, int]]:
    """The bytes of the Wasm file ``path`` and its identity before and after reading them.

    A FIFO or a device is refused (`CacheError`) instead of blocking or reading forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise CacheError(f"cannot read Wasm module {path}: {exc}") from exc
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise CacheError(f"cannot read Wasm module {path}: not a regular file")
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
        after = os.fstat(fd)
    except OSError as exc:
        raise CacheError(f"cannot read Wasm module {path}: {exc}") from exc
    finally:
        os.close(fd)
    return data, _identity(before), _identity(after)


def _wasm_bytes(wasm: WasmSource) -> bytes:
    if isinstance(wasm, bytes | bytearray | memoryview):
        return bytes(wasm)
    return _read_module(Path(wasm))[0]


def _check_digest(data: bytes, module_digest: str) -> None:
    alg, _, encoded = module_digest.partition(":")
    actual = hashlib.new(alg, data).hexdigest()
    if actual != encoded:
        raise SpecError(
            f"the Wasm bytes do not match {module_digest} (they hash to {alg}:{actual})"
        )

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

Writes are atomic: a temp file in the same directory, ``fsync``, ``rename``, ``fsync`` of the
directory; the artifact is renamed first and the record last, and an entry exists only once its
record does. A writer killed at any point leaves either no entry or a whole one (at most an
unreferenced ``.tmp-*`` or ``.art`` file, swept by eviction and `PrecompileCache.clear`).

Integrity
    The record holds the artifact's sha256, checked before the artifact is handed out; a
    mismatch, a truncated or missing artifact, or a record of another entry is discarded,
    logged (logger ``wasidispatch.cache``), counted as a corruption and recompiled; it never
    reaches an engine's deserialize. Hashing a multi-megabyte artifact costs milliseconds, so
    each instance hashes a file once and afterwards re-checks its identity ``(device, inode,
    size, mtime_ns, ctime_ns)`` with one ``stat``: any write or replacement changes the inode or
    the ctime, which a process cannot set back.

Trust and the remaining window
    Deserializing a wasmtime artifact runs native code it contains, so the directory must be
    one only this user can write: it is created 0700, and a directory that is group- or
    world-writable, or owned by another user, is refused with `CacheError`. Between the check
    and the engine opening the path there is a window in which the file could be replaced; only
    this user (or root) can write in the directory, and they can already change this process
    directly, so the window gives nobody new power. Callers that want no window at all use
    :meth:`CachedArtifact.read_bytes`, which returns bytes hashed after they were read.

Concurrency
    Threads and processes asking for the same missing entry serialize on its ``flock`` (one
    open file description per request, so threads of one process exclude each other too): one
    compiles, the others wait and then read the committed entry. Readers take no lock: the
    rename makes an entry appear whole. Eviction and `clear` skip entries being compiled.

Size and eviction
    ``max_bytes`` bounds the sum of artifact sizes; after each insertion the least recently
    used entries go first. "Used" is the record's mtime, set explicitly (not atime, which
    relatime makes unreliable) on creation and on hits (at most once a second per entry and
    instance). The entry just written is never evicted by its own insertion. Another process
    may evict an entry between its hand-out and the engine opening the path; the engine then
    fails to read it (wasmtime: `IncompatibleArtifact`), and asking the cache again recompiles.
    A bound of many artifacts, not a few, keeps that rare.

Counters
    `PrecompileCache.stats` returns counters persisted in ``stats.json`` across processes and
    instances. Misses, evictions and corruptions are written when they happen (they are on the
    slow path anyway); hits are kept in memory and written on the next miss, on `stats`,
    `flush`, `close`, every 10 seconds of hits, and at interpreter exit (a process killed with
    SIGKILL loses its unwritten hits). `PrecompileCache.session_stats` counts this instance only.

Using it from an executor::

    cache = PrecompileCache()                       # one per process; thread-safe
    workload = cache.with_precompiled(engine, workload, digest=layer_digest)
    result = engine.run(workload)                   # workload.precompiled is a verified path

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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
    with ``deserialize_file``); its content had sha256 ``sha256`` when it was handed out.
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

    def flush(self, base: Path) -> dict[str, int]:
        """Add pending counts to ``stats.json``; return the new totals."""
        with self.lock:
            pending = dict(self.pending)
            for name in _COUNTER_NAMES:
                self.pending[name] = 0
            self.last_flush_ns = time.monotonic_ns()
        try:
            with _FileLock(base / ".lock"):
                totals = _read_counters(base / "stats.json")
                if any(pending.values()):
                    for name in _COUNTER_NAMES:
                        totals[name] += pending[name]
                    _write_atomic(base, "stats.json", json.dumps(totals).encode(), durable=False)
        except OSError as exc:
            with self.lock:  # keep the counts for the next try
                for name in _COUNTER_NAMES:
                    self.pending[name] += pending[name]
            raise CacheError(f"cannot update cache counters in {base}: {exc}") from exc
        return totals


def _flush_at_exit(counters: _Counters, base: Path) -> None:
    if any(counters.pending.values()):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            counters.flush(base)


def _read_counters(path: Path) -> dict[str, int]:
    totals = dict.fromkeys(_COUNTER_NAMES, 0)
    try:
        raw: Any = json.loads(path.read_bytes())
    except FileNotFoundError:
        return totals
    except ValueError:
        _log().warning("ignoring unreadable cache counters %s", path)
        return totals
    if isinstance(raw, dict):
        for name in _COUNTER_NAMES:
            value = raw.get(name)
            if isinstance(value, int) and value >= 0:
                totals[name] = value
    return totals


class _FileLock:
    """An exclusive ``flock`` on ``path``, robust against the lock file being unlinked.

    Each acquisition opens its own file description, so two threads of one process exclude
    each other as two processes do. After locking, the path must still name the locked inode;
    if someone unlinked it meanwhile (eviction), the lock is retaken on the new file.
    """

    def __init__(self, path: Path, *, blocking: bool = True) -> None:
        self.path = path
        self.blocking = blocking
        self.fd: int | None = None

    def acquire(self) -> bool:
        import fcntl  # only a miss or eviction locks

        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        op = fcntl.LOCK_EX if self.blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        while True:
            fd = os.open(self.path, flags, 0o600)
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)

    def unlink(self) -> None:
        """Remove the lock file while holding it (waiters then retake a fresh one)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> _FileLock:
        if not self.acquire():
            raise BlockingIOError(errno.EWOULDBLOCK, "lock is held", str(self.path))
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(
    directory: Path, name: str, data: bytes, *, durable: bool = True, mtime_ns: int | None = None
) -> None:
    """Write ``directory/name`` so that it appears whole or not at all."""
    import tempfile  # not on a hit (tempfile pulls in shutil, random, bz2, lzma)

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)  # mode 0600
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_trusted(path: Path) -> None:
    """Refuse a directory another user could write to (see the module docstring)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CacheError(f"cannot use cache directory {path}: {exc}") from exc
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
    """Create ``path`` and missing parents with mode 0700, then check it is trusted."""
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
            continue  # another process won the race; checked below
        except OSError as exc:
            raise CacheError(f"cannot create cache directory {d}: {exc}") from exc
        try:
            os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise CacheError(f"cannot make cache directory {d} private: {exc}") from exc
    _check_trusted(path)


class PrecompileCache:
    """A node-local cache of precompiled Wasm artifacts (see the module docstring).

    ``directory`` defaults to :func:`default_cache_dir`; it is created 0700, and refused with
    `CacheError` when another user owns it or could write to it. ``max_bytes`` bounds the sum
    of artifact sizes (least recently used entries are evicted). One instance may be shared by
    threads; instances in several processes may share a directory.

    For an executor, the whole integration is::

        workload = cache.with_precompiled(engine, workload, digest=known_layer_digest)

    which leaves the workload unchanged for an engine that cannot precompile.
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise CacheError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.max_bytes = max_bytes
        _make_private_dir(self.directory)
        self._base = self.directory / _FORMAT
        self._entries = self._base / "entries"
        for d in (self._base, self._entries):
            _make_private_dir(d)
        tag = self.directory / "CACHEDIR.TAG"
        if not tag.exists():
            with contextlib.suppress(OSError):
                _write_atomic(self.directory, "CACHEDIR.TAG", _CACHEDIR_TAG, durable=False)
        self._verified: dict[str, _Verified] = {}
        self._touched: dict[str, int] = {}
        self._no_precompile: set[tuple[str, str]] = set()
        self._counters = _Counters()
        self._finalizer = weakref.finalize(self, _flush_at_exit, self._counters, self._base)

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
        cache directory.
        """
        if not engine.capabilities.precompile:
            return None
        name = engine.name
        fingerprint = engine.fingerprint()
        if (name, fingerprint) in self._no_precompile:
            return None
        data: bytes | None = None
        if digest is None:
            data = _wasm_bytes(wasm)
            module_digest = "sha256:" + hashlib.sha256(data).hexdigest()
        else:
            alg, encoded = _normalize_digest(digest)
            module_digest = f"{alg}:{encoded}"
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
            _check_digest(data, module_digest)
        lock = _FileLock(self._entries / f"{key}.lock")
        try:
            lock.acquire()
        except OSError as exc:
            raise CacheError(f"cannot lock cache entry in {self._entries}: {exc}") from exc
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
            result = self._store(key, name, fingerprint, module_digest, bytes(compiled))
            self._counters.add("misses")
        finally:
            lock.release()
        # The entry is committed; trimming and counting are housekeeping that must not fail it.
        try:
            self._evict(keep=key)
            self._counters.flush(self._base)
        except (OSError, CacheError) as exc:
            _log().warning("precompile cache housekeeping failed in %s: %s", self._base, exc)
        return result

    def with_precompiled(
        self, engine: _PrecompilingEngine, workload: Workload, *, digest: str | None = None
    ) -> Workload:
        """``workload`` with ``precompiled`` pointing at a verified cached artifact.

        Unchanged when it already has ``precompiled`` or the engine cannot precompile.
        Raises like :meth:`artifact`.
        """
        if workload.precompiled is not None:
            return workload
        art = self.artifact(engine, workload.wasm, digest=digest)
        return workload if art is None else art.apply(workload)

    def _lookup_fast(self, key: str) -> CachedArtifact | None:
        """A hit on a file this instance already hashed and that nobody changed since."""
        memo = self._verified.get(key)
        if memo is None:
            return None
        try:
            st = os.stat(memo.artifact.path)
        except OSError:
            st = None
        if st is None or _identity(st) != memo.identity:
            self._verified.pop(key, None)
            return None
        self._hit(key)
        return memo.artifact

    def _hit(self, key: str) -> None:
        now = time.time_ns()
        if now - self._touched.get(key, 0) >= _TOUCH_EVERY_NS:
            self._touched[key] = now
            with contextlib.suppress(OSError):  # evicted meanwhile: nothing to refresh
                os.utime(self._entries / f"{key}.json", ns=(now, now))
        self._counters.add("hits")
        if time.monotonic_ns() - self._counters.last_flush_ns >= _FLUSH_HITS_EVERY_NS:
            try:
                self._counters.flush(self._base)
            except CacheError as exc:  # counts are kept for the next try; the hit stands
                _log().warning("%s", exc)

    # -- reading and writing entries ----------------------------------------------------------

    def _load(
        self, key: str, name: str, fingerprint: str, module_digest: str
    ) -> CachedArtifact | _Corrupt | None:
        """Read and verify an entry: the artifact, ``_Corrupt`` with why, or None if absent."""
        try:
            raw = (self._entries / f"{key}.json").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheError(f"cannot read cache entry {key}: {exc}") from exc
        try:
            meta: Any = json.loads(raw)
            want = {
                "key": key,
                "engine": name,
                "fingerprint": fingerprint,
                "module": module_digest,
            }
            if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in want.items()):
                return _Corrupt("its record belongs to another entry")
            size, sha = meta["size"], meta["sha256"]
            if not isinstance(size, int) or not isinstance(sha, str):
                raise ValueError("bad size or sha256")
        except (ValueError, KeyError):
            return _Corrupt("its record is unreadable")
        path = self._entries / f"{key}.art"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return _Corrupt("its artifact is missing")
        except OSError as exc:
            return _Corrupt(f"its artifact cannot be opened ({exc.strerror})")
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return _Corrupt("its artifact is not a regular file")
            if st.st_size != size:
                return _Corrupt(f"its artifact has {st.st_size} bytes, the record says {size}")
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != sha:
            return _Corrupt(f"its artifact's sha256 is {actual[:16]}..., recorded {sha[:16]}...")
        art = CachedArtifact(path, sha, size, key, name, fingerprint, module_digest, hit=True)
        self._verified[key] = _Verified(_identity(st), art)
        return art

    def _store(
        self, key: str, name: str, fingerprint: str, module_digest: str, compiled: bytes
    ) -> CachedArtifact:
        """Commit an entry (caller holds its lock): artifact first, record last."""
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
        try:
            _write_atomic(self._entries, f"{key}.art", compiled)
            _fsync_dir(self._entries)  # the artifact's name is durable before the record's
            _write_atomic(
                self._entries, f"{key}.json", json.dumps(meta).encode(), mtime_ns=time.time_ns()
            )
            _fsync_dir(self._entries)
        except OSError as exc:
            raise CacheError(f"cannot write cache entry in {self._entries}: {exc}") from exc
        path = self._entries / f"{key}.art"
        art = CachedArtifact(path, sha, len(compiled), key, name, fingerprint, module_digest, True)
        with contextlib.suppress(OSError):
            self._verified[key] = _Verified(_identity(os.stat(path)), art)
        return dataclasses.replace(art, hit=False)

    def _discard(self, key: str, engine: str, reason: str) -> None:
        _log().warning("discarding corrupt precompile cache entry %s (%s): %s", key, engine, reason)
        self._verified.pop(key, None)
        self._remove_entry(key)
        self._counters.add("corruptions")

    def _remove_entry(self, key: str) -> None:
        # Record first: without it the entry is gone even if we stop halfway.
        for suffix in (".json", ".art"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._entries / f"{key}{suffix}")

    # -- listing, eviction, counters ----------------------------------------------------------

    def _scan(self) -> tuple[list[CacheEntry], set[str]]:
        """Committed entries (oldest use first) and the names of every file in the directory."""
        try:
            names = set(os.listdir(self._entries))
        except OSError as exc:
            raise CacheError(f"cannot list cache directory {self._entries}: {exc}") from exc
        found: list[CacheEntry] = []
        for fname in names:
            key, _, suffix = fname.partition(".")
            if suffix != "json" or not _KEY_RE.fullmatch(key) or f"{key}.art" not in names:
                continue
            try:
                st = os.stat(self._entries / fname)
                meta: Any = json.loads((self._entries / fname).read_bytes())
                size = os.stat(self._entries / f"{key}.art").st_size
            except (OSError, ValueError):
                continue  # removed meanwhile, or damaged: the next lookup will say so
            if not isinstance(meta, dict):
                continue
            found.append(
                CacheEntry(
                    key=key,
                    engine=str(meta.get("engine", "")),
                    fingerprint=str(meta.get("fingerprint", "")),
                    module_digest=str(meta.get("module", "")),
                    size=size,
                    sha256=str(meta.get("sha256", "")),
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
        for fname in names:
            path = self._entries / fname
            key, _, suffix = fname.partition(".")
            if fname.startswith(".tmp-") or (suffix == "art" and key not in live):
                with contextlib.suppress(OSError):
                    if now - os.lstat(path).st_mtime_ns > _STALE_TEMP_NS:
                        os.unlink(path)
            elif suffix == "lock" and (all_locks or key not in live):
                lock = _FileLock(path, blocking=False)
                with contextlib.suppress(OSError):
                    if lock.acquire():
                        lock.unlink()
                        lock.release()

    def _evict(self, *, keep: str | None) -> None:
        with _FileLock(self._base / ".lock"):
            entries, names = self._scan()
            total = sum(e.size for e in entries)
            for e in entries:
                if total <= self.max_bytes:
                    break
                if e.key == keep:
                    continue
                lock = _FileLock(self._entries / f"{e.key}.lock", blocking=False)
                if not lock.acquire():
                    continue  # being rewritten right now
                try:
                    self._remove_entry(e.key)
                    lock.unlink()
                finally:
                    lock.release()
                self._verified.pop(e.key, None)
                total -= e.size
                self._counters.add("evictions")
                _log().info(
                    "evicted precompile cache entry %s (%s, %d bytes)", e.key, e.engine, e.size
                )
            self._sweep(names, entries, all_locks=False)

    def stats(self) -> CacheStats:
        """Counters persisted across processes (this instance's included) and the size now."""
        totals = self._counters.flush(self._base)
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
        self._counters.flush(self._base)

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
            with _FileLock(self._base / ".lock"):
                entries, names = self._scan()
                for e in entries:
                    lock = _FileLock(self._entries / f"{e.key}.lock", blocking=False)
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
                    os.unlink(self._base / "stats.json")
        except OSError as exc:
            raise CacheError(f"cannot clear cache directory {self._base}: {exc}") from exc
        finally:
            self._verified.clear()  # whatever is left is verified again on its next use
        self._touched.clear()
        with self._counters.lock:
            for name in _COUNTER_NAMES:
                self._counters.pending[name] = 0
        return removed


def _wasm_bytes(wasm: WasmSource) -> bytes:
    if isinstance(wasm, bytes | bytearray | memoryview):
        return bytes(wasm)
    try:
        return Path(wasm).read_bytes()
    except OSError as exc:
        raise CacheError(f"cannot read Wasm module {wasm}: {exc}") from exc


def _check_digest(data: bytes, module_digest: str) -> None:
    alg, _, encoded = module_digest.partition(":")
    actual = hashlib.new(alg, data).hexdigest()
    if actual != encoded:
        raise SpecError(
            f"the Wasm bytes do not match {module_digest} (they hash to {alg}:{actual})"
        )

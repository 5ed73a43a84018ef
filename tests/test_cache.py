"""The precompile cache, against the real wasmtime engine (a fake only for protocol edges)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from wasidispatch import _fs
from wasidispatch.cache import (
    CachedArtifact,
    PrecompileCache,
    _normalize_digest,
    cache_key,
    default_cache_dir,
)
from wasidispatch.engines import Capabilities, Stdio, Workload
from wasidispatch.engines.wasmtime import WasmtimeEngine
from wasidispatch.errors import CacheError, CompileError, IncompatibleArtifact, SpecError

REPO = Path(__file__).resolve().parent.parent

HELLO_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from the cache\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 21))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def _module(n: int) -> bytes:
    """A distinct valid module per ``n`` (an exported constant)."""
    return bytes(wasmtime.wat2wasm(f'(module (func (export "f") (result i32) i32.const {n}))'))


@pytest.fixture(scope="module")
def hello() -> bytes:
    return bytes(wasmtime.wat2wasm(HELLO_WAT))


@pytest.fixture(scope="module")
def engine() -> WasmtimeEngine:
    return WasmtimeEngine()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(cache_dir: Path) -> PrecompileCache:
    return PrecompileCache(cache_dir)


def _entries_dir(cache: PrecompileCache) -> Path:
    return cache.directory / "v1" / "entries"


def _run(engine: WasmtimeEngine, wasm: bytes, art: CachedArtifact) -> bytes:
    """Run the artifact; ``wasm`` is replaced by non-Wasm bytes, so only the artifact can run."""
    assert wasm[:4] == b"\0asm"
    workload = Workload(
        wasm=b"not wasm: must not be compiled",
        argv=("hello",),
        stdout=Stdio.capture(),
        stderr=Stdio.null(),
    )
    result = engine.run(art.apply(workload))
    assert result.ok, result
    assert result.stdout is not None
    return result.stdout


class Fake:
    """A protocol-conforming engine whose artifacts are predictable bytes (protocol tests only).

    ``precompile`` returns ``size`` bytes derived from the module and the fingerprint, and
    counts its calls.
    """

    def __init__(self, fingerprint: str = "fake 1", *, size: int = 1000, can: bool = True) -> None:
        self._fingerprint = fingerprint
        self.size = size
        self.compiles = 0
        self._can = can

    @property
    def name(self) -> str:
        return "fake"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(precompile=self._can)

    def fingerprint(self) -> str:
        return self._fingerprint

    def precompile(self, wasm: bytes) -> bytes | None:
        self.compiles += 1
        seed = hashlib.sha256(self._fingerprint.encode() + wasm).digest()
        return (seed * (self.size // len(seed) + 1))[: self.size]


# -- hit, miss, keys ----------------------------------------------------------------------------


def test_miss_then_hit_runs_the_cached_artifact(
    cache: PrecompileCache, engine: WasmtimeEngine, hello: bytes
) -> None:
    first = cache.artifact(engine, hello)
    second = cache.artifact(engine, hello)
    assert first is not None
    assert second is not None
    assert (first.hit, second.hit) == (False, True)
    assert first.path == second.path
    assert first.sha256 == second.sha256
    assert first.module_digest == "sha256:" + hashlib.sha256(hello).hexdigest()
    assert hashlib.sha256(second.path.read_bytes()).hexdigest() == second.sha256
    assert _run(engine, hello, second) == b"hello from the cache\n"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (1, 1, 1, first.size)


def test_hit_from_another_instance_hashes_the_file(
    cache_dir: Path, engine: WasmtimeEngine, hello: bytes
) -> None:
    made = PrecompileCache(cache_dir).artifact(engine, hello)
    other = PrecompileCache(cache_dir)
    got = other.artifact(engine, hello)
    assert made is not None
    assert got is not None
    assert got.hit
    assert other.session_stats().hits == 1
    assert other.session_stats().misses == 0
    assert _run(engine, hello, got) == b"hello from the cache\n"


def test_with_precompiled_sets_the_path(
    cache: PrecompileCache, engine: WasmtimeEngine, hello: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "hello.wasm"
    path.write_bytes(hello)
    workload = Workload(wasm=path, stdout=Stdio.capture())
    prepared = cache.with_precompiled(engine, workload)
    assert isinstance(prepared.precompiled, Path)
    (entry,) = _entries_dir(cache).glob("*.art")
    assert os.path.samefile(prepared.precompiled, entry)  # the very file, through its fd
    assert engine.run(prepared).stdout == b"hello from the cache\n"
    # a workload that already has an artifact is left alone
    assert cache.with_precompiled(engine, prepared) is prepared


def test_known_digest_skips_hashing_and_is_checked_on_a_miss(
    cache: PrecompileCache, engine: WasmtimeEngine, hello: bytes, tmp_path: Path
) -> None:
    digest = "sha256:" + hashlib.sha256(hello).hexdigest()
    with pytest.raises(SpecError, match="do not match"):
        cache.artifact(engine, _module(1), digest=digest)
    assert cache.entries() == []
    path = tmp_path / "m.wasm"
    path.write_bytes(hello)
    made = cache.artifact(engine, path, digest=digest)
    assert made is not None
    assert not made.hit
    # the same digest, bare hex, from bytes: the same entry
    again = cache.artifact(engine, hello, digest=digest.removeprefix("sha256:"))
    assert again is not None
    assert again.hit
    assert again.key == made.key
    # a hit with a known digest does not read the module at all
    path.unlink()
    assert (hit := cache.artifact(engine, path, digest=digest)) is not None
    assert hit.hit


@pytest.mark.parametrize(
    "digest",
    ["", "sha256:", "sha256:abc", "md5:" + "0" * 32, "SHA256:" + "0" * 64, "sha256:" + "G" * 64],
)
def test_malformed_digest_is_a_spec_error(
    cache: PrecompileCache, engine: WasmtimeEngine, hello: bytes, digest: str
) -> None:
    with pytest.raises(SpecError):
        cache.artifact(engine, hello, digest=digest)


@given(st.text(max_size=140))
def test_digest_parser_is_total(text: str) -> None:
    try:
        alg, encoded = _normalize_digest(text)
    except SpecError:
        return
    assert alg in ("sha256", "sha512")
    assert len(encoded) in (64, 128)


def test_configuration_change_is_a_miss_never_a_wrong_artifact(
    cache: PrecompileCache, hello: bytes
) -> None:
    fast, plain = WasmtimeEngine(), WasmtimeEngine(opt_level="none")
    assert fast.fingerprint() != plain.fingerprint()
    a = cache.artifact(fast, hello)
    b = cache.artifact(plain, hello)
    assert a is not None
    assert b is not None
    assert not a.hit
    assert not b.hit
    assert a.key != b.key
    assert len(cache.entries()) == 2
    assert _run(fast, hello, a) == _run(plain, hello, b) == b"hello from the cache\n"
    with pytest.raises(IncompatibleArtifact):  # what the key keeps from happening
        _run(plain, hello, a)


def test_engine_version_change_is_a_miss(cache: PrecompileCache, hello: bytes) -> None:
    old, new = Fake("fake 1.0 x86_64"), Fake("fake 1.1 x86_64")
    a, b = cache.artifact(old, hello), cache.artifact(new, hello)
    assert a is not None
    assert b is not None
    assert not b.hit
    assert (old.compiles, new.compiles) == (1, 1)
    assert a.key == cache_key("fake", "fake 1.0 x86_64", a.module_digest) != b.key
    c = cache.artifact(old, hello)
    assert c is not None
    assert c.hit
    assert old.compiles == 1


def test_engine_without_precompile_is_left_alone(cache: PrecompileCache, hello: bytes) -> None:
    cannot = Fake(can=False)
    assert cache.artifact(cannot, hello) is None
    assert cannot.compiles == 0

    class Declines(Fake):
        def precompile(self, wasm: bytes) -> bytes | None:
            self.compiles += 1
            return None

    declines = Declines()
    assert cache.artifact(declines, hello) is None
    assert cache.artifact(declines, hello) is None
    assert declines.compiles == 1  # remembered for this fingerprint
    workload = Workload(wasm=hello)
    assert cache.with_precompiled(declines, workload) is workload
    assert cache.entries() == []


def test_invalid_wasm_stores_nothing(cache: PrecompileCache, engine: WasmtimeEngine) -> None:
    with pytest.raises(CompileError):
        cache.artifact(engine, b"\0asm\x01\0\0\0\xff\xff")
    assert cache.entries() == []
    assert not [p for p in _entries_dir(cache).iterdir() if p.suffix != ".lock"]
    assert cache.stats().misses == 0


def test_unreadable_module_path_is_a_cache_error(
    cache: PrecompileCache, engine: WasmtimeEngine, tmp_path: Path
) -> None:
    with pytest.raises(CacheError, match="cannot read Wasm module"):
        cache.artifact(engine, tmp_path / "missing.wasm")


# -- corruption ---------------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_flip_byte, "sha256 is"), (_truncate, "bytes, the record says"), (Path.unlink, "missing")],
)
@pytest.mark.parametrize("fresh_instance", [False, True])
def test_damaged_artifact_is_discarded_and_recompiled(
    cache_dir: Path,
    engine: WasmtimeEngine,
    hello: bytes,
    caplog: pytest.LogCaptureFixture,
    damage: object,
    reason: str,
    fresh_instance: bool,
) -> None:
    cache = PrecompileCache(cache_dir)
    good = cache.artifact(engine, hello)
    assert good is not None
    assert callable(damage)
    entry = _entries_dir(cache) / f"{good.key}.art"
    damage(entry)
    damaged_sha = hashlib.sha256(entry.read_bytes()).hexdigest() if entry.exists() else ""
    user = PrecompileCache(cache_dir) if fresh_instance else cache
    with caplog.at_level(logging.WARNING, logger="wasidispatch.cache"):
        again = user.artifact(engine, hello)
    assert again is not None
    assert not again.hit
    assert any(reason in r.getMessage() and good.key in r.getMessage() for r in caplog.records)
    current = hashlib.sha256(again.path.read_bytes()).hexdigest()
    assert current == again.sha256 == good.sha256 != damaged_sha
    assert _run(engine, hello, again) == b"hello from the cache\n"
    stats = user.stats()
    assert (stats.corruptions, stats.misses, stats.entries) == (1, 2, 1)


def test_another_engines_artifact_is_never_loaded(
    cache: PrecompileCache, engine: WasmtimeEngine, hello: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    mine = cache.artifact(engine, hello)
    foreign = PrecompileCache(cache.directory.parent / "other").artifact(
        WasmtimeEngine(opt_level="none"), hello
    )
    assert mine is not None
    assert foreign is not None
    mine.path.write_bytes(foreign.path.read_bytes())  # a valid artifact, of another config
    with caplog.at_level(logging.WARNING, logger="wasidispatch.cache"):
        again = cache.artifact(engine, hello)
    assert again is not None
    assert not again.hit
    assert again.path.read_bytes() != foreign.path.read_bytes()
    assert _run(engine, hello, again) == b"hello from the cache\n"
    assert cache.stats().corruptions == 1


def test_swapped_or_garbled_record_is_discarded(
    cache: PrecompileCache, hello: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    fake = Fake()
    a = cache.artifact(fake, hello)
    b = cache.artifact(fake, _module(7))
    assert a is not None
    assert b is not None
    entries = _entries_dir(cache)
    # b's record and artifact put in a's place: whole, valid, but not a's
    (entries / f"{a.key}.json").write_bytes((entries / f"{b.key}.json").read_bytes())
    (entries / f"{a.key}.art").write_bytes(b.path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="wasidispatch.cache"):
        again = cache.artifact(fake, hello)
    assert again is not None
    assert not again.hit
    assert again.sha256 == a.sha256
    assert "another entry" in caplog.text
    (entries / f"{a.key}.json").write_text("{not json")
    again = PrecompileCache(cache.directory).artifact(fake, hello)
    assert again is not None
    assert not again.hit
    assert again.sha256 == a.sha256
    assert "unreadable" in caplog.text
    assert fake.compiles == 4
    assert cache.stats().corruptions == 2


def test_read_bytes_refuses_a_file_changed_after_verification(
    cache: PrecompileCache, engine: WasmtimeEngine, hello: bytes
) -> None:
    art = cache.artifact(engine, hello)
    assert art is not None
    assert hashlib.sha256(art.read_bytes()).hexdigest() == art.sha256
    _flip_byte(art.path)
    with pytest.raises(CacheError, match="changed after it was verified"):
        art.read_bytes()


# -- crashes and concurrency --------------------------------------------------------------------

# A writer that SIGKILL finds stopped inside one step of the write. The child wraps one os
# function (fault injection at the syscall boundary): when the cache calls it, the child writes
# a marker and sleeps until it is killed.
_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import wasidispatch.cache as cache_mod
    from wasidispatch.engines.wasmtime import WasmtimeEngine

    cache_dir, wasm_path, marker, step = sys.argv[1:5]
    real = getattr(os, step)

    def stop_here(*args, **kwargs):
        if step != "replace" or str(args[1]).endswith(".json"):
            Path(marker).write_text(str(args[0]))
            time.sleep(600)
        return real(*args, **kwargs)

    setattr(cache_mod.os, step, stop_here)
    cache_mod.PrecompileCache(cache_dir).artifact(WasmtimeEngine(), Path(wasm_path))
    """
)


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None:
            out = proc.communicate()
            raise AssertionError(f"writer ended early: {out}")
        if time.monotonic() > deadline:
            raise AssertionError("writer never reached the step")
        time.sleep(0.02)


@pytest.mark.parametrize(
    "step",
    [
        "fsync",  # artifact bytes written to the temp file, not yet synced or renamed
        "replace",  # artifact renamed into place, record not yet: the entry must not exist
    ],
)
def test_writer_killed_mid_write_leaves_no_entry(
    cache_dir: Path, engine: WasmtimeEngine, hello: bytes, tmp_path: Path, step: str
) -> None:
    wasm_path = tmp_path / "hello.wasm"
    wasm_path.write_bytes(hello)
    marker = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(cache_dir), str(wasm_path), str(marker), step],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(marker, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in (cache_dir / "v1" / "entries").iterdir())
    assert any(n.startswith(".") and n.endswith(".tmp") for n in leftovers)  # died mid-write
    cache = PrecompileCache(cache_dir)
    assert cache.entries() == []
    assert not [n for n in leftovers if n.endswith(".json")]
    art = cache.artifact(engine, hello)
    assert art is not None
    assert not art.hit
    assert _run(engine, hello, art) == b"hello from the cache\n"
    assert [e.key for e in cache.entries()] == [art.key]


_RACER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from wasidispatch.cache import PrecompileCache
    from wasidispatch.engines.wasmtime import WasmtimeEngine

    cache_dir, wasm_path, log_path, go = sys.argv[1:5]

    class Counting(WasmtimeEngine):
        def precompile(self, wasm):
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, f"{os.getpid()}\\n".encode())
            os.close(fd)
            time.sleep(0.5)  # keep the others waiting on the lock
            return super().precompile(wasm)

    engine = Counting()
    wasm = Path(wasm_path).read_bytes()
    cache = PrecompileCache(cache_dir)
    while not os.path.exists(go):
        time.sleep(0.005)
    art = cache.artifact(engine, wasm)
    data = art.read_bytes()
    cache.close()
    print(json.dumps({"hit": art.hit, "sha": art.sha256, "len": len(data)}))
    """
)


def test_eight_processes_racing_compile_once(
    cache_dir: Path, engine: WasmtimeEngine, hello: bytes, tmp_path: Path
) -> None:
    wasm_path, log_path, go = tmp_path / "m.wasm", tmp_path / "compiles.log", tmp_path / "go"
    wasm_path.write_bytes(hello)
    args = [str(cache_dir), str(wasm_path), str(log_path), str(go)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(8)
    ]
    time.sleep(1.0)  # let them import and open the cache; the race starts at the go file
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert len(log_path.read_text().split()) == 1  # one compile
    assert sorted(r["hit"] for r in results) == [False] + [True] * 7
    assert len({r["sha"] for r in results}) == 1
    stats = PrecompileCache(cache_dir).stats()
    assert (stats.misses, stats.hits, stats.entries) == (1, 7, 1)


def test_threads_racing_compile_once(cache_dir: Path, hello: bytes) -> None:
    class Slow(Fake):
        def precompile(self, wasm: bytes) -> bytes | None:
            time.sleep(0.2)
            return super().precompile(wasm)

    fake = Slow()
    caches = [PrecompileCache(cache_dir) for _ in range(2)]  # shared and separate instances
    results: list[CachedArtifact | None] = []
    barrier = threading.Barrier(8)

    def ask(i: int) -> None:
        barrier.wait()
        results.append(caches[i % 2].artifact(fake, hello))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.compiles == 1
    assert sorted(r.hit for r in results if r is not None) == [False] + [True] * 7


# -- trust ---------------------------------------------------------------------------------------


def test_new_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        cache = PrecompileCache(tmp_path / "a" / "b" / "cache")
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", cache.directory, _entries_dir(cache)):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert (cache.directory / "CACHEDIR.TAG").read_bytes().startswith(b"Signature: 8a477f59")


@pytest.mark.parametrize(("mode", "says"), [(0o777, "mode 0777"), (0o770, "mode 0770")])
def test_writable_by_others_is_refused(tmp_path: Path, mode: int, says: str) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(CacheError, match=says) as err:
        PrecompileCache(d)
    assert "chmod 700" in str(err.value)
    assert "native code" in str(err.value)


def test_a_writable_subdirectory_is_refused_too(cache_dir: Path) -> None:
    cache = PrecompileCache(cache_dir)
    _entries_dir(cache).chmod(0o777)
    with pytest.raises(CacheError, match="other users write"):
        PrecompileCache(cache_dir)


def test_foreign_owner_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(CacheError, match=r"owned by uid 65534, not by this user \(uid 0\)"):
        PrecompileCache(d)


def test_not_a_directory_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CacheError, match="not a directory"):
        PrecompileCache(f)


@pytest.mark.parametrize("max_bytes", [0, -1, 1.5, True])
def test_bad_max_bytes_is_a_cache_error(cache_dir: Path, max_bytes: object) -> None:
    with pytest.raises(CacheError, match="max_bytes"):
        PrecompileCache(cache_dir, max_bytes=max_bytes)  # type: ignore[arg-type]
    assert not cache_dir.exists()  # refused before anything was created


def test_clear_failing_on_disk_is_a_cache_error(
    cache: PrecompileCache, cache_dir: Path, hello: bytes
) -> None:
    art = cache.artifact(Fake(), hello)
    assert art is not None
    lock = cache_dir / "v1" / ".lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()  # the global lock cannot be opened (running as root, modes do not stop us)
    with pytest.raises(CacheError, match="cannot clear"):
        cache.clear()
    lock.rmdir()
    assert cache.clear() == 1
    assert cache.entries() == []


def test_default_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "wasidispatch"
    assert PrecompileCache().directory == tmp_path / "xdg" / "wasidispatch"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "wasidispatch"


# -- size, eviction, counters -------------------------------------------------------------------


def test_least_recently_used_goes_first(cache_dir: Path) -> None:
    fake = Fake(size=1000)
    cache = PrecompileCache(cache_dir, max_bytes=2500)
    a = cache.artifact(fake, _module(1))
    b = cache.artifact(fake, _module(2))
    assert a is not None
    assert b is not None
    assert [e.key for e in cache.entries()] == [a.key, b.key]
    hit = cache.artifact(fake, _module(1))  # a is now the most recent
    assert hit is not None
    assert hit.hit
    assert [e.key for e in cache.entries()] == [b.key, a.key]
    c = cache.artifact(fake, _module(3))
    assert c is not None
    assert [e.key for e in cache.entries()] == [a.key, c.key]
    assert not (_entries_dir(cache) / f"{b.key}.art").exists()
    assert not (_entries_dir(cache) / f"{b.key}.lock").exists()
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes) == (1, 2, 2000)
    again = cache.artifact(fake, _module(2))  # evicted: compiled again
    assert again is not None
    assert not again.hit
    assert fake.compiles == 4


def test_an_entry_larger_than_the_bound_stays_alone(cache_dir: Path) -> None:
    cache = PrecompileCache(cache_dir, max_bytes=1500)
    small, big = Fake(size=1000), Fake("big", size=4000)
    assert cache.artifact(small, _module(1)) is not None
    art = cache.artifact(big, _module(2))
    assert art is not None
    assert art.path.exists()
    assert [e.key for e in cache.entries()] == [art.key]
    assert cache.stats().evictions == 1


def test_counters_persist_across_instances_and_processes(
    cache_dir: Path, hello: bytes, tmp_path: Path
) -> None:
    engine = WasmtimeEngine()
    cache = PrecompileCache(cache_dir)
    assert cache.artifact(engine, hello) is not None
    wasm_path = tmp_path / "m.wasm"
    wasm_path.write_bytes(hello)
    # another process: two hits, flushed at interpreter exit
    code = (
        "import sys; from pathlib import Path; from wasidispatch.cache import PrecompileCache;"
        "from wasidispatch.engines.wasmtime import WasmtimeEngine;"
        "c = PrecompileCache(sys.argv[1]); e = WasmtimeEngine();"
        "[c.artifact(e, Path(sys.argv[2])) for _ in range(2)]"
    )
    subprocess.run([sys.executable, "-c", code, str(cache_dir), str(wasm_path)], check=True)
    assert cache.artifact(engine, hello) is not None
    total, mine = cache.stats(), cache.session_stats()
    assert (total.hits, total.misses) == (3, 1)
    assert (mine.hits, mine.misses) == (1, 1)


def test_clear_removes_entries_and_resets_counters(
    cache: PrecompileCache, engine: WasmtimeEngine, hello: bytes
) -> None:
    art = cache.artifact(engine, hello)
    assert art is not None
    assert cache.artifact(engine, hello) is not None
    assert cache.clear() == 1
    assert not (_entries_dir(cache) / f"{art.key}.art").exists()
    assert cache.stats() == type(cache.stats())(max_bytes=cache.max_bytes)
    assert [p.name for p in _entries_dir(cache).iterdir()] == []
    again = cache.artifact(engine, hello)
    assert again is not None
    assert not again.hit


def test_stale_leftovers_are_swept(cache: PrecompileCache, hello: bytes) -> None:
    entries = _entries_dir(cache)
    stale_tmp, fresh_tmp = entries / ".tmp-stale", entries / ".tmp-fresh"
    stale_new = entries / f".{'cd' * 32}.art.0123456789ab.tmp"  # _fs.write_atomic's pattern
    orphan = entries / ("ab" * 32 + ".art")
    for p in (stale_tmp, fresh_tmp, orphan, stale_new):
        p.write_bytes(b"partial")
    old = time.time_ns() - 2 * 3600 * 10**9
    for p in (stale_tmp, orphan, stale_new):
        os.utime(p, ns=(old, old))
    assert cache.artifact(Fake(), hello) is not None  # an insertion sweeps
    names = {p.name for p in entries.iterdir()}
    assert fresh_tmp.name in names  # may belong to a writer at work
    assert stale_tmp.name not in names
    assert stale_new.name not in names
    assert orphan.name not in names


def test_record_describes_the_artifact_and_files_are_private(
    cache: PrecompileCache, hello: bytes
) -> None:
    art = cache.artifact(Fake(), hello)
    assert art is not None
    record = json.loads((_entries_dir(cache) / f"{art.key}.json").read_text())
    assert record["sha256"] == hashlib.sha256(art.path.read_bytes()).hexdigest()
    assert record["size"] == art.size
    assert record["module"] == art.module_digest
    for p in _entries_dir(cache).iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


# -- the command line ---------------------------------------------------------------------------


def test_cli_warm_stats_clear(
    tmp_path: Path, hello: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    from wasidispatch.cli import main

    d = str(tmp_path / "c")
    files = []
    for n, wasm in enumerate((hello, _module(5))):
        f = tmp_path / f"m{n}.wasm"
        f.write_bytes(wasm)
        files.append(str(f))
    (tmp_path / "notes.txt").write_text("not wasm")
    status = main(["cache", "warm", "--dir", d, *files, str(tmp_path / "notes.txt")])
    out, err = capsys.readouterr()
    assert status == 1  # one input was not Wasm; the others were still warmed
    assert "notes.txt: not a Wasm binary" in err
    assert [line.split()[0] for line in out.splitlines()] == ["compiled", "compiled"]
    assert "\x1b[2K" not in err  # no progress bar when stderr is not a terminal

    assert main(["cache", "warm", "--dir", d, "--progress", "always", *files]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["cached", "cached"]
    assert "] 1/2" in err
    assert "\x1b[2K" in err

    assert main(["cache", "stats", "--dir", d, "--json", "--entries"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["entries"], doc["misses"], doc["hits"]) == (2, 2, 2)
    assert {e["module_digest"] for e in doc["list"]} == {
        "sha256:" + hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files
    }
    from wasidispatch import engines

    # warmed for the engine the executor runs by default
    cached = PrecompileCache(d).artifact(engines.get("wasmtime-fast"), Path(files[0]))
    assert cached is not None
    assert cached.hit

    assert main(["cache", "stats", "--dir", d]) == 0
    assert "entries      2" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", d]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert PrecompileCache(d).entries() == []


def test_cli_refuses_an_unsafe_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wasidispatch.cli import main

    d = tmp_path / "open"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    assert main(["cache", "stats", "--dir", str(d)]) == 1
    assert "chmod 700" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "size"), [("1024", 1024), ("4k", 4096), ("1.5MiB", 3 << 19)])
def test_cli_sizes(text: str, size: int) -> None:
    from wasidispatch._cli.cache import parse_size

    assert parse_size(text) == size


def test_cli_warms_a_bundle_and_a_layout(
    tmp_path: Path, hello: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    from wasidispatch.cli import main
    from wasidispatch.oci.layout import ImageLayout, pack_wasm

    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    (bundle / "rootfs" / "bin" / "hello.wasm").write_bytes(hello)
    (bundle / "rootfs" / "bin" / "hello.wasm").chmod(0o755)
    spec = {
        "ociVersion": "1.2.0",
        "process": {"args": ["hello.wasm"], "cwd": "/", "env": ["PATH=/bin"]},
        "root": {"path": "rootfs"},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    layout_dir = tmp_path / "layout"
    layout = ImageLayout.create(layout_dir)
    other = _module(11)
    pack_wasm(layout, other, "v1", created=None)
    pack_wasm(layout, other, "latest", created=None)  # the same layer twice: warmed once

    d = str(tmp_path / "c")
    warm = ["cache", "warm", "--dir", d, "--engine", "wasmtime"]
    assert main([*warm, str(bundle), str(layout_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[0] == "compiled"
    assert "bundle:/bin/hello.wasm" in lines[0]
    assert lines[1].split()[0] == "compiled"
    assert "layout:" in lines[1]
    cache = PrecompileCache(d)
    engine = WasmtimeEngine()
    from_bundle = cache.artifact(engine, hello)
    from_layout = cache.artifact(
        engine, other, digest="sha256:" + hashlib.sha256(other).hexdigest()
    )
    assert from_bundle is not None
    assert from_bundle.hit
    assert from_layout is not None
    assert from_layout.hit
    assert _run(engine, hello, from_bundle) == b"hello from the cache\n"

    # a bundle whose entrypoint is not Wasm is reported, not warmed
    (bundle / "rootfs" / "bin" / "hello.wasm").write_bytes(b"#!/bin/sh\necho hi\n")
    assert main(["cache", "warm", "--dir", d, str(bundle)]) == 1
    assert "is not Wasm (detected script)" in capsys.readouterr().err


def test_failing_housekeeping_does_not_fail_a_committed_entry(
    cache: PrecompileCache, hello: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (cache.directory / "v1" / "stats.json").mkdir()  # the counters cannot be written
    with caplog.at_level(logging.WARNING, logger="wasidispatch.cache"):
        art = cache.artifact(Fake(), hello)
    assert art is not None
    assert not art.hit
    assert "housekeeping failed" in caplog.text
    assert cache.session_stats().misses == 1
    with pytest.raises(CacheError, match="cannot update cache counters"):
        cache.stats()


# -- planted files and swapped directories (issue 11, item 1) -----------------------------------

EVIL_WAT = HELLO_WAT.replace("hello from the cache", "EVIL planted module!")


@pytest.fixture(scope="module")
def evil() -> bytes:
    return bytes(wasmtime.wat2wasm(EVIL_WAT))


def _key_of(engine: WasmtimeEngine, wasm: bytes) -> str:
    return cache_key(
        engine.name, engine.fingerprint(), "sha256:" + hashlib.sha256(wasm).hexdigest()
    )


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the cache that no cache write may reach."""
    path = tmp_path / "victim"
    path.write_bytes(b"precious\n")
    return path


@pytest.mark.parametrize("plant", [os.symlink, os.link])
@pytest.mark.parametrize("where", ["entries", "v1", "top"])
@pytest.mark.parametrize("name", ["{key}.art", "{key}.json", "stats.json", "CACHEDIR.TAG"])
def test_a_link_planted_at_a_final_name_is_replaced_not_written_through(
    cache_dir: Path,
    engine: WasmtimeEngine,
    hello: bytes,
    victim: Path,
    where: str,
    name: str,
    plant: Callable[[Path, Path], None],
) -> None:
    key = _key_of(engine, hello)
    directory = {"entries": cache_dir / "v1" / "entries", "v1": cache_dir / "v1", "top": cache_dir}
    PrecompileCache(cache_dir).clear()
    (cache_dir / "CACHEDIR.TAG").unlink()
    planted = directory[where] / name.format(key=key)
    plant(victim, planted)  # a symlink, or a hard link to a file outside the cache
    cache = PrecompileCache(cache_dir)
    art = cache.artifact(engine, hello)
    assert art is not None
    cache.flush()
    assert cache.stats().entries == 1
    assert victim.read_bytes() == b"precious\n"
    assert _run(engine, hello, art) == b"hello from the cache\n"


@pytest.mark.parametrize("name", ["{key}.lock", ".lock"])
def test_a_symlink_planted_at_a_lock_name_is_never_followed(
    cache_dir: Path,
    engine: WasmtimeEngine,
    hello: bytes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    key = _key_of(engine, hello)
    cache = PrecompileCache(cache_dir)
    folder = cache_dir / "v1" / ("entries" if name.startswith("{") else "")
    missing = tmp_path / "not-created"
    for target in (missing, tmp_path / "victim-lock"):
        planted = folder / name.format(key=key)
        planted.unlink(missing_ok=True)
        os.symlink(target, planted)
        if target.name == "victim-lock":
            target.write_bytes(b"precious\n")
        workload = Workload(wasm=hello, stdout=Stdio.capture(), stderr=Stdio.null())
        with caplog.at_level(logging.WARNING, logger="wasidispatch.cache"):
            ran = engine.run(cache.with_precompiled(engine, workload))
        assert ran.stdout == b"hello from the cache\n"
    assert not missing.exists()  # O_CREAT through the symlink would have made it
    assert (tmp_path / "victim-lock").read_bytes() == b"precious\n"


def test_a_file_planted_at_the_temporary_name_is_never_written(
    cache_dir: Path,
    engine: WasmtimeEngine,
    hello: bytes,
    victim: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = _key_of(engine, hello)
    cache = PrecompileCache(cache_dir)
    tokens = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"] * 8)
    monkeypatch.setattr(_fs, "_token", lambda: next(tokens))
    entries, base = cache_dir / "v1" / "entries", cache_dir / "v1"
    planted = [
        entries / f".{key}.art.aaaaaaaaaaaa.tmp",
        entries / f".{key}.json.aaaaaaaaaaaa.tmp",
        base / ".stats.json.aaaaaaaaaaaa.tmp",
    ]
    for p in planted:
        os.symlink(victim, p)
    art = cache.artifact(engine, hello)
    assert art is not None
    cache.flush()
    assert victim.read_bytes() == b"precious\n"
    assert all(p.is_symlink() for p in planted)  # left alone, another name was used
    assert cache.stats().misses == 1
    assert _run(engine, hello, art) == b"hello from the cache\n"


def _plant_entry(
    engine: WasmtimeEngine, directory: Path, key: str, hello: bytes, evil: bytes
) -> None:
    """Make ``directory`` a cache whose valid-looking entry ``key`` (the key of ``hello``)
    holds a real artifact of the ``evil`` module."""
    other = PrecompileCache(directory)
    made = other.artifact(engine, evil)
    assert made is not None
    entries = directory / "v1" / "entries"
    os.rename(entries / f"{made.key}.art", entries / f"{key}.art")
    record = json.loads((entries / f"{made.key}.json").read_text())
    record.update(key=key, module="sha256:" + hashlib.sha256(hello).hexdigest())
    (entries / f"{made.key}.json").unlink()
    (entries / f"{key}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("swapped", ["", "v1", "v1/entries"])
@pytest.mark.parametrize("used_before", [False, True])
def test_a_directory_swapped_after_construction_cannot_hand_out_another_module(
    tmp_path: Path,
    engine: WasmtimeEngine,
    hello: bytes,
    evil: bytes,
    swapped: str,
    used_before: bool,
) -> None:
    key = _key_of(engine, hello)
    attacker = tmp_path / "attacker"
    _plant_entry(engine, attacker, key, hello, evil)
    assert _run(engine, evil, PrecompileCache(attacker).artifact(engine, hello)) == (  # type: ignore[arg-type]
        b"EVIL planted module!\n"
    )  # the planted entry is valid: any cache reading it would run it

    cache_dir = tmp_path / "cache"
    cache = PrecompileCache(cache_dir)  # the long-lived instance
    if used_before:
        first = cache.artifact(engine, hello)
        assert first is not None
        assert _run(engine, hello, first) == b"hello from the cache\n"
    target = cache_dir / swapped if swapped else cache_dir
    os.rename(target, target.with_name(target.name + ".away"))
    os.symlink(attacker / swapped if swapped else attacker, target)

    for _ in range(2):
        art = cache.artifact(engine, hello)
        assert art is not None
        assert _run(engine, hello, art) == b"hello from the cache\n"
        workload = Workload(wasm=hello, stdout=Stdio.capture(), stderr=Stdio.null())
        assert engine.run(cache.with_precompiled(engine, workload)).stdout == (
            b"hello from the cache\n"
        )


_PLANTED_READ = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from wasidispatch.cache import PrecompileCache
    from wasidispatch.engines.wasmtime import WasmtimeEngine

    engine = WasmtimeEngine()
    cache = PrecompileCache(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # reading 4 GiB fails
    art = cache.artifact(engine, Path(sys.argv[2]))
    print(art.hit, cache.stats().entries)
    """
)


@pytest.mark.parametrize("what", ["fifo", "zero", "huge"])
@pytest.mark.parametrize("name", ["{key}.json", "stats.json"])
def test_a_record_that_is_a_fifo_or_endless_neither_hangs_nor_eats_memory(
    cache_dir: Path, engine: WasmtimeEngine, hello: bytes, tmp_path: Path, what: str, name: str
) -> None:
    key = _key_of(engine, hello)
    PrecompileCache(cache_dir)
    folder = cache_dir / "v1" / ("entries" if name.startswith("{") else "")
    planted = folder / name.format(key=key)
    if what == "fifo":
        os.mkfifo(planted)
    elif what == "zero":
        os.symlink("/dev/zero", planted)
    else:
        with planted.open("wb") as f:
            f.truncate(4 << 30)  # sparse: 4 GiB of zeros, over the child's address space
    wasm = tmp_path / "hello.wasm"
    wasm.write_bytes(hello)
    proc = subprocess.run(
        [sys.executable, "-c", _PLANTED_READ, str(cache_dir), str(wasm)],
        capture_output=True,
        timeout=120,  # a bound on a hang, not a measurement
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == b"False 1\n"  # compiled and stored, the planted name discarded
    art = PrecompileCache(cache_dir).artifact(engine, hello)
    assert art is not None
    assert art.hit
    assert _run(engine, hello, art) == b"hello from the cache\n"


# -- the cache is an optimisation (issue 11, item 3) ---------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(options)``: a fresh tmpfs under tmp_path (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(options: str = "size=4m") -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)


def _hello_workload(path: Path) -> Workload:
    return Workload(wasm=path, argv=("hello",), stdout=Stdio.capture(), stderr=Stdio.null())


def _uncached_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "running uncached" in r.getMessage()
    ]


def test_a_read_only_cache_runs_the_workload_uncached_and_warns_once(
    tmpfs: Callable[..., Path],
    engine: WasmtimeEngine,
    hello: bytes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    point = tmpfs()
    cache = PrecompileCache(point / "cache")
    wasm = tmp_path / "hello.wasm"
    wasm.write_bytes(hello)
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
    with caplog.at_level(logging.DEBUG, logger="wasidispatch.cache"):
        for _ in range(3):
            workload = cache.with_precompiled(engine, _hello_workload(wasm))
            assert isinstance(workload.precompiled, bytes)  # compiled, not stored
            assert engine.run(workload).stdout == b"hello from the cache\n"
    (warning,) = _uncached_warnings(caplog)  # once per cause, not per run
    assert "Read-only file system" in warning
    assert str(point / "cache") in warning
    assert not [p for p in (point / "cache" / "v1" / "entries").iterdir()]
    with pytest.raises(CacheError, match="Read-only file system"):
        cache.artifact(engine, wasm)  # the explicit API says so
    assert cache.stats().entries == 0  # and the stats still read


def test_a_full_cache_file_system_runs_the_workload_uncached(
    tmpfs: Callable[..., Path],
    engine: WasmtimeEngine,
    hello: bytes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from wasidispatch.executor import WasmExecutor
    from wasidispatch.oci.bundle import Bundle

    point = tmpfs("size=64k")
    cache = PrecompileCache(point / "cache")
    fd = os.open(point / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    with contextlib.suppress(OSError):
        while True:  # leave no block free
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    bundle_dir = tmp_path / "bundle"
    (bundle_dir / "rootfs").mkdir(parents=True)
    (bundle_dir / "rootfs" / "hello.wasm").write_bytes(hello)
    (bundle_dir / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["/hello.wasm"], "cwd": "/"},
                "root": {"path": "rootfs"},
            }
        )
    )
    out = tmp_path / "out"
    executor = WasmExecutor("wasmtime", cache=cache, stdout=Stdio.file(out))
    with caplog.at_level(logging.WARNING, logger="wasidispatch.cache"):
        assert executor.exec(Bundle.load(bundle_dir)) == 0
        assert executor.exec(Bundle.load(bundle_dir)) == 0
    assert out.read_bytes() == b"hello from the cache\n"
    (warning,) = _uncached_warnings(caplog)
    assert "No space left on device" in warning
    leftovers = [p.name for p in (point / "cache" / "v1" / "entries").iterdir()]
    assert not [n for n in leftovers if not n.endswith(".lock")]  # nothing half written


# -- a warm exec does not hash the module again (issue 11, item 6) ------------------------------


class _CountingHashlib:
    """``hashlib`` for the cache module, counting the hashes of given Wasm modules."""

    def __init__(self, *modules: bytes) -> None:
        self.modules = modules
        self.module_hashes = 0

    def __getattr__(self, name: str) -> object:
        return getattr(hashlib, name)

    def sha256(self, data: bytes = b"", **kw: bool) -> hashlib._Hash:
        if bytes(data) in self.modules:
            self.module_hashes += 1
        return hashlib.sha256(data, **kw)


def test_a_warm_exec_does_not_hash_an_unchanged_module_file(
    cache: PrecompileCache,
    engine: WasmtimeEngine,
    hello: bytes,
    evil: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import wasidispatch.cache as cache_mod

    assert len(evil) == len(hello)  # an edit in place keeps the size
    spy = _CountingHashlib(hello, evil)
    monkeypatch.setattr(cache_mod, "hashlib", spy)
    monkeypatch.setattr(cache_mod, "_RACY_NS", 0, raising=False)  # the file is brand new
    wasm = tmp_path / "app.wasm"
    wasm.write_bytes(hello)
    for _ in range(4):
        ran = engine.run(cache.with_precompiled(engine, _hello_workload(wasm)))
        assert ran.stdout == b"hello from the cache\n"
    assert spy.module_hashes == 1  # the first exec only
    before = wasm.stat()
    with wasm.open("r+b") as f:  # edited in place: same inode, same size, new mtime
        f.write(evil)
    os.utime(wasm, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    for _ in range(2):
        ran = engine.run(cache.with_precompiled(engine, _hello_workload(wasm)))
        assert ran.stdout == b"EVIL planted module!\n"
    assert spy.module_hashes == 2
    assert cache.session_stats().hits == 4


def test_a_module_changed_just_before_it_was_hashed_is_hashed_again(
    cache: PrecompileCache,
    engine: WasmtimeEngine,
    hello: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within the timestamp granularity a write may not change the identity: a file changed
    less than _RACY_NS before it was hashed is not remembered (as git does)."""
    import wasidispatch.cache as cache_mod

    spy = _CountingHashlib(hello)
    monkeypatch.setattr(cache_mod, "hashlib", spy)
    monkeypatch.setattr(cache_mod, "_RACY_NS", 3600 * 10**9)
    wasm = tmp_path / "app.wasm"
    wasm.write_bytes(hello)
    for _ in range(2):
        assert cache.with_precompiled(engine, _hello_workload(wasm)).precompiled is not None
    assert spy.module_hashes == 2


# -- bad values in records, counters and arguments (issue 11, item 4) ---------------------------

_DEEP = "[" * 50_000 + "]" * 50_000  # under the record cap, far over the parser's recursion


def _record_path(cache: PrecompileCache, key: str) -> Path:
    return _entries_dir(cache) / f"{key}.json"


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r | {"size": "12"},
        lambda r: r | {"size": True},
        lambda r: r | {"size": -1},
        lambda r: r | {"size": 10**30},
        lambda r: r | {"size": None},
        lambda r: r | {"sha256": 123},
        lambda r: r | {"sha256": "zz" * 32},
        lambda r: r | {"sha256": [r["sha256"]]},
        lambda r: r | {"key": {"nested": [1, 2]}},
        lambda r: [r],
        lambda r: None,
        lambda r: "NaN-size",
        lambda r: "inf-size",
        lambda r: "deep",
        lambda r: "deep-field",
    ],
)
def test_a_record_with_bad_values_is_discarded_never_raised(
    cache: PrecompileCache,
    hello: bytes,
    caplog: pytest.LogCaptureFixture,
    edit: Callable[..., object],
) -> None:
    fake = Fake()
    art = cache.artifact(fake, hello)
    assert art is not None
    path = _record_path(cache, art.key)
    record = json.loads(path.read_text())
    edited = edit(record)
    text = {
        "NaN-size": json.dumps(record).replace(f'"size": {art.size}', '"size": NaN'),
        "inf-size": json.dumps(record).replace(f'"size": {art.size}', '"size": 1e400'),
        "deep": _DEEP,
        "deep-field": json.dumps(record)[:-1] + ', "x": ' + _DEEP + "}",
    }.get(edited if isinstance(edited, str) else "")
    path.write_text(text if text is not None else json.dumps(edited))
    fresh = PrecompileCache(cache.directory)  # nothing remembered: it reads the record
    assert [e.key for e in fresh.entries()] in ([], [art.key])  # listing copes
    with caplog.at_level(logging.WARNING, logger="wasidispatch.cache"):
        again = fresh.artifact(fake, hello)
    assert again is not None
    assert not again.hit  # discarded and compiled again
    assert "discarding corrupt precompile cache entry" in caplog.text
    assert fake.compiles == 2
    assert fresh.stats().corruptions == 1


@pytest.mark.parametrize(
    "text",
    [
        '{"hits": 1e400, "misses": NaN, "evictions": true, "corruptions": -5}',
        '{"hits": "3", "misses": [1], "evictions": {"a": 1}, "corruptions": null}',
        "[1, 2, 3]",
        _DEEP,
        "\udcff not utf-8",
    ],
)
def test_bad_counters_count_as_zero(cache: PrecompileCache, text: str) -> None:
    (cache.directory / "v1" / "stats.json").write_text(text, errors="surrogateescape")
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.corruptions) == (0, 0, 0, 0)
    assert cache.artifact(Fake(), b"\0asm\1\0\0\0") is not None
    assert cache.stats().misses == 1  # and the next write repairs the file


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None)
@given(
    field=st.sampled_from(["key", "engine", "fingerprint", "module", "size", "sha256"]), value=_JSON
)
def test_any_json_in_a_record_field_is_a_hit_or_a_recompile(
    tmp_path_factory: pytest.TempPathFactory, field: str, value: object
) -> None:
    cache = PrecompileCache(tmp_path_factory.mktemp("fuzz"))
    fake = Fake()
    art = cache.artifact(fake, b"\0asm\1\0\0\0")
    assert art is not None
    path = _record_path(cache, art.key)
    record = json.loads(path.read_text())
    record[field] = value
    path.write_text(json.dumps(record))
    fresh = PrecompileCache(cache.directory)
    fresh.entries()
    again = fresh.artifact(fake, b"\0asm\1\0\0\0")
    assert again is not None
    assert again.hit or fake.compiles == 2  # a hit only if the record still fits
    assert hashlib.sha256(again.read_bytes()).hexdigest() == again.sha256 == art.sha256


@pytest.mark.parametrize("max_bytes", [float("nan"), float("inf"), "1G", None, 2**63 + 0.5])
def test_max_bytes_that_is_not_an_int_is_a_cache_error(cache_dir: Path, max_bytes: object) -> None:
    with pytest.raises(CacheError, match="max_bytes"):
        PrecompileCache(cache_dir, max_bytes=max_bytes)  # type: ignore[arg-type]


def test_a_huge_max_bytes_is_accepted(cache_dir: Path, hello: bytes) -> None:
    cache = PrecompileCache(cache_dir, max_bytes=1 << 200)
    assert cache.artifact(Fake(), hello) is not None
    assert cache.stats().max_bytes == 1 << 200


@pytest.mark.parametrize("digest", [123, b"sha256:00", ["sha256:"]])
def test_a_digest_of_the_wrong_type_is_a_spec_error(
    cache: PrecompileCache, hello: bytes, digest: object
) -> None:
    with pytest.raises(SpecError, match="digest"):
        cache.artifact(Fake(), hello, digest=digest)  # type: ignore[arg-type]


def test_a_pickled_artifact_path_names_the_entry_not_a_descriptor(
    cache: PrecompileCache, hello: bytes
) -> None:
    import pickle

    art = cache.artifact(Fake(), hello)
    assert art is not None
    assert str(art.path).startswith("/proc/self/fd/")
    copy = pickle.loads(pickle.dumps(art.path))
    assert copy == _entries_dir(cache) / f"{art.key}.art"
    assert copy.read_bytes() == art.read_bytes()

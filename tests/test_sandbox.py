"""`wasidispatch.runc.sandbox` on the real kernel, in forked children (root).

Each case writes a bundle (a small rootfs and a config.json), forks, and the child runs
`sandbox.enter` and the `Finish` it returns, then reports what it sees from inside as JSON on
a pipe: its root, mounts, hostname, rlimits, ids, groups, capabilities, no_new_privs and
seccomp state. The parent checks it, and that the host's mount table is as before. A symlink
planted at a mount's destination lands inside the rootfs; specs the sandbox cannot honour are
typed errors raised before anything changes.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from wasidispatch.errors import ExecutorError, SpecError
from wasidispatch.runc import sandbox
from wasidispatch.runc.spec import LeanBundle

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root")


def _mountinfo(under: Path) -> list[str]:
    """The host's mount points under ``under`` (other tests run containers meanwhile)."""
    with open("/proc/self/mountinfo") as fh:
        points = (line.split()[4] for line in fh)
        return sorted(p for p in points if p == "/" or p.startswith(str(under)))


def _bundle(tmp_path: Path, spec: Mapping[str, Any]) -> LeanBundle:
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    for d in ("etc", "proc", "dev", "tmp"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "etc" / "hostname").write_text("image\n")
    (rootfs / "app.wasm").write_bytes(b"\0asm\1\0\0\0")
    doc = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, **spec}
    (bundle / "config.json").write_text(json.dumps(doc))
    return LeanBundle.load(bundle)


_ROOT: list[str] = []  # in the child: the engine's preopen of the guest's /


def _in_child(bundle: LeanBundle, probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; the child enters the sandbox, applies the process settings and reports
    ``probe()`` (or the error) as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            try:
                finish = sandbox.enter(bundle)
                finish()
                finish.seal()
                _ROOT.append(finish.root)
                out: dict[str, Any] = {"ok": probe()}
            except Exception as exc:
                out = {"error": type(exc).__name__, "message": str(exc)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


def _status() -> dict[str, str]:
    with open("/proc/self/status") as fh:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in fh)}


def _try(call: Callable[[], object]) -> str:
    try:
        call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


@root_only
def test_a_full_spec_seen_from_inside(tmp_path: Path) -> None:
    host_dir = tmp_path / "host-data"
    host_dir.mkdir()
    (host_dir / "shared.txt").write_text("from the host")
    spec = {
        "hostname": "wasm-box",
        "process": {
            "args": ["/app.wasm"],
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000, 2001]},
            "noNewPrivileges": True,
            "oomScoreAdj": 500,
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512}],
            "capabilities": {
                "bounding": ["CAP_NET_BIND_SERVICE", "CAP_KILL"],
                "effective": ["CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_NET_BIND_SERVICE"],
                "inheritable": ["CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_NET_BIND_SERVICE"],
            },
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "mode=755", "size=1m"],
            },
            {
                "destination": "/data",
                "type": "bind",
                "source": str(host_dir),
                "options": ["rbind", "ro"],
            },
            {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("mount", "uts", "ipc", "network")],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys"],
            "sysctl": {"kernel.domainname": "example.test"},
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
                ],
            },
        },
    }
    bundle = _bundle(tmp_path, spec)
    before = _mountinfo(tmp_path)
    host_ns = {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "uts", "ipc", "net")}

    def probe() -> dict[str, Any]:
        status = _status()
        return {
            "root": sorted(os.listdir("/")),
            "engine_root": _ROOT[-1],
            "engine_proc": sorted(os.listdir(_ROOT[-1] + "/proc")),
            "engine_dev": sorted(os.listdir(_ROOT[-1] + "/dev")),
            "engine_data": sorted(os.listdir(_ROOT[-1] + "/data")),
            "data": open("/data/shared.txt").read(),
            "write_ro": _try(lambda: open("/data/new", "w")),
            "write_tmpfs": _try(lambda: open("/scratch/new", "w").close()),
            "mkdir": _try(lambda: os.mkdir("/scratch/d")),
            "hostname": socket.gethostname(),
            "domainname": open("/proc/sys/kernel/domainname").read().strip(),
            "sysctl_ro": _try(lambda: open("/proc/sys/kernel/domainname", "w")),
            "keys": open("/proc/keys").read(),
            "devices": sorted(os.listdir("/dev")),
            "null": _try(lambda: open("/dev/null", "w").write("x")),
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "oom": open("/proc/self/oom_score_adj").read().strip(),
            "ids": [os.getuid(), os.getgid(), sorted(os.getgroups())],
            "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "uts", "ipc", "net")},
            "status": {
                k: status[k]
                for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh", "NoNewPrivs", "Seccomp")
            },
        }

    got = _in_child(bundle, probe)
    assert "ok" in got, got
    seen = got["ok"]
    assert seen["root"] == ["app.wasm", "data", "dev", "etc", "proc", "scratch", "tmp"]
    assert seen["data"] == "from the host"
    # the engine's / is the rootfs alone: no procfs (/proc/1/mem), devices or volumes in it
    assert seen["engine_root"].startswith("/proc/self/fd/")
    assert (seen["engine_proc"], seen["engine_dev"], seen["engine_data"]) == ([], [], [])
    assert seen["write_ro"] == "EROFS"
    assert seen["write_tmpfs"] == "ok"  # a tmpfs is 1777 unless told
    assert seen["mkdir"] == "EPERM"  # the seccomp rule
    assert seen["hostname"] == "wasm-box"
    assert seen["domainname"] == "example.test"
    assert seen["sysctl_ro"] in ("EROFS", "EACCES")
    assert seen["keys"] == ""  # masked by /dev/null
    assert {"null", "zero", "full", "random", "urandom", "tty", "fd", "stdin"} <= set(
        seen["devices"]
    )
    assert seen["null"] == "ok"
    assert seen["nofile"] == [256, 512]
    assert seen["oom"] == "500"
    assert seen["ids"] == [1000, 1000, [2000, 2001]]
    assert all(seen["ns"][n] != host_ns[n] for n in host_ns)
    bind = 1 << 10  # CAP_NET_BIND_SERVICE
    assert seen["status"] == {
        "CapEff": f"{bind:016x}",
        "CapPrm": f"{bind:016x}",
        "CapAmb": f"{bind:016x}",
        "CapInh": f"{bind:016x}",
        "CapBnd": f"{bind | 1 << 5:016x}",  # + CAP_KILL
        "NoNewPrivs": "1",
        "Seccomp": "2",
    }
    assert _mountinfo(tmp_path) == before  # nothing reached the host's mount namespace


@root_only
def test_no_capabilities_in_the_spec_means_none(tmp_path: Path) -> None:
    bundle = _bundle(
        tmp_path,
        {
            "process": {"args": ["/app.wasm"]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]},
        },
    )
    got = _in_child(bundle, lambda: {k: v for k, v in _status().items() if k.startswith("Cap")})
    assert "ok" in got, got
    assert got["ok"] == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), "0000000000000000"
    )


@root_only
def test_a_symlink_planted_at_a_mount_destination_stays_inside(tmp_path: Path) -> None:
    target = tmp_path / "host-target"
    target.mkdir()
    (target / "keep").write_text("untouched")
    source = tmp_path / "source"
    source.mkdir()
    (source / "mounted").write_text("mounted")
    bundle = _bundle(
        tmp_path,
        {
            "process": {"args": ["/app.wasm"]},
            "mounts": [
                {
                    "destination": "/mnt/data",
                    "type": "bind",
                    "source": str(source),
                    "options": ["rbind"],
                }
            ],
            "linux": {"namespaces": [{"type": "mount"}]},
        },
    )
    os.symlink(f"/../../../../../..{target}", bundle.rootfs / "mnt")

    def probe() -> dict[str, Any]:
        inside = os.path.realpath("/mnt/data")
        return {"inside": inside, "listing": sorted(os.listdir("/mnt/data"))}

    got = _in_child(bundle, probe)
    assert got["ok"]["listing"] == ["mounted"]
    assert got["ok"]["inside"] == f"{target}/data"  # the same path, under the rootfs
    assert (bundle.rootfs / str(target).lstrip("/") / "data").is_dir()
    assert sorted(os.listdir(target)) == ["keep"]  # the host's directory was not touched


def test_resolve_in_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    os.symlink("/etc", root / "abs")
    os.symlink("../../../../..", root / "a" / "up")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    r = str(root)
    assert sandbox.resolve_in(r, "/abs/passwd") == f"{r}/etc/passwd"
    assert sandbox.resolve_in(r, "/a/up/etc") == f"{r}/etc"
    assert sandbox.resolve_in(r, "/../../x") == f"{r}/x"
    assert sandbox.resolve_in(r, "/a/b/../b/./c") == f"{r}/a/b/c"
    with pytest.raises(ExecutorError, match="symbolic links"):
        sandbox.resolve_in(r, "/loop1/x")


@root_only
@pytest.mark.parametrize(
    ("spec", "error", "text"),
    [
        ({"linux": {"namespaces": [{"type": "user"}]}}, ExecutorError, "user namespaces"),
        ({"hostname": "h", "linux": {"namespaces": [{"type": "mount"}]}}, SpecError, "UTS"),
        ({"linux": {"namespaces": [{"type": "bogus"}]}}, SpecError, "bogus"),
        ({"linux": {"namespaces": [{"type": "ipc"}, {"type": "ipc"}]}}, SpecError, "second"),
        (
            {"linux": {"namespaces": [{"type": "network", "path": "/nonexistent"}]}},
            ExecutorError,
            "/nonexistent",
        ),
        (
            {"process": {"args": ["/a"], "capabilities": {"bounding": ["CAP_NOPE"]}}},
            SpecError,
            "CAP_NOPE",
        ),
        ({"mounts": [{"destination": "relative", "type": "tmpfs"}]}, SpecError, "absolute"),
        (
            {"mounts": [{"destination": "/x", "type": "bind", "source": "/nonexistent-src"}]},
            ExecutorError,
            "nonexistent-src",
        ),
        ({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_NOPE"}}}, SpecError, "NOPE"),
    ],
)
def test_specs_it_cannot_honour_are_typed_errors(
    tmp_path: Path, spec: dict[str, Any], error: type[Exception], text: str
) -> None:
    bundle = _bundle(tmp_path, {"process": {"args": ["/app.wasm"]}, **spec})
    before = _mountinfo(tmp_path)
    got = _in_child(bundle, lambda: {"root": os.listdir("/")})
    assert got.get("error") == error.__name__, got
    assert text in got["message"]
    assert _mountinfo(tmp_path) == before


@root_only
@pytest.mark.parametrize(
    ("sysctl", "allowed"),
    [
        ({"kernel.shmmax": "1000000"}, True),
        ({"net.ipv4.ip_forward": "0"}, True),
        ({"kernel.core_pattern": "|/tmp/x"}, False),
        ({"kernel.hostname": "h"}, False),
        ({"vm.overcommit_memory": "1"}, False),
    ],
)
def test_only_namespaced_sysctls(tmp_path: Path, sysctl: dict[str, str], allowed: bool) -> None:
    spec = {
        "process": {"args": ["/app.wasm"]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [{"type": t} for t in ("mount", "ipc", "network")],
            "sysctl": sysctl,
        },
    }
    got = _in_child(_bundle(tmp_path, spec), lambda: {})
    if allowed:
        assert "ok" in got, got
    else:
        assert got.get("error") == "SpecError", got
        assert next(iter(sysctl)) in got["message"]


@root_only
def test_a_hostname_in_a_joined_uts_namespace(tmp_path: Path) -> None:
    """A pod's UTS namespace, joined by path, takes the spec's hostname (as runc sets it)."""
    r, w = os.pipe()
    holder = os.fork()
    if holder == 0:  # pragma: no cover - holds a UTS namespace for the test
        try:
            sandbox._check(sandbox._libc().unshare(sandbox.CLONE_NEWUTS), "unshare")
            os.write(w, b"x")
            signal.pause()
        finally:
            os._exit(0)
    try:
        os.read(r, 1)
        spec = {
            "hostname": "pod-host",
            "process": {"args": ["/app.wasm"]},
            "linux": {
                "namespaces": [
                    {"type": "mount"},
                    {"type": "uts", "path": f"/proc/{holder}/ns/uts"},
                ]
            },
        }
        got = _in_child(_bundle(tmp_path, spec), lambda: {"host": socket.gethostname()})
        assert got == {"ok": {"host": "pod-host"}}
        assert socket.gethostname() != "pod-host"
    finally:
        os.kill(holder, 9)
        os.waitpid(holder, 0)
        os.close(r)
        os.close(w)


@root_only
def test_a_planted_dev_null_is_not_bound_over_a_masked_path(tmp_path: Path) -> None:
    bundle = _bundle(
        tmp_path,
        {
            "process": {"args": ["/app.wasm"]},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "mount"}], "maskedPaths": ["/proc/keys"]},
        },
    )
    os.symlink("/proc/sys/kernel/core_pattern", bundle.rootfs / "dev" / "null")
    got = _in_child(bundle, lambda: {"null": os.stat("/dev/null").st_rdev})
    assert got == {"ok": {"null": os.makedev(1, 3)}}  # replaced by the device itself


@root_only
def test_a_process_with_threads_is_refused(tmp_path: Path) -> None:
    import threading

    bundle = _bundle(tmp_path, {"process": {"args": ["/app.wasm"]}})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        try:
            sandbox.enter(bundle)
            os.write(w, b"entered")
        except ExecutorError as exc:
            os.write(w, str(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        said = fh.read().decode()
    os.waitpid(pid, 0)
    assert "2 threads" in said

"""The sandbox of a Wasm container, through containerd and our shim.

The guest cannot see its own process: its ``/`` is the rootfs alone (a clone of the rootfs
mount without the procfs, sysfs and device mounts on it: ``/proc/1/mem`` would let it write
its engine's memory). So the container process is read through the host's ``/proc/<pid>``
while it runs (a looping guest), and so is busybox's ``sleep`` under the same ``ctr run``
options through runc.v2; they must agree: capabilities, ``NoNewPrivs``,
``Seccomp``, uid and gid, the namespaces (new ones unless ``--net-host``), the mount table
rooted at the rootfs with the spec's mounts and masked paths. From inside, the guest's ``/``
is the image's rootfs, and a guest trying a host file through every path it has (``..``,
``/proc/1/root``, a symlink planted in the image, descriptors) never reads it.
``tests/test_sandbox.py`` reads ``/proc/self`` inside the sandboxed process itself.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd_harness import (
    RUNC_CMD,
    RUNC_RUNTIME,
    SHIM_RUNTIME,
    PrivateContainerd,
    _image,
    _tar,
    busybox_layout,
    missing_requirements,
    missing_shim,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
    pytest.mark.skipif(missing_shim() is not None, reason=str(missing_shim())),
]

DEFAULT_CAPS = (  # containerd's default set (a80425fb)
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)  # fmt: skip
FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Uid", "Gid")


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    daemon = PrivateContainerd(namespace=f"wdx-sbx-{uuid.uuid4().hex[:8]}", debug=True)
    try:
        daemon.start()
        yield daemon
        assert daemon.settle()["processes"] == []
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    token = f"host-secret-{uuid.uuid4().hex}"
    directory = Path(f"/tmp/wdx-sbx-{uuid.uuid4().hex[:8]}")
    directory.mkdir()
    path = directory / "secret"
    path.write_text(token)
    yield path, token
    path.unlink()
    directory.rmdir()


@pytest.fixture(scope="module")
def images(containerd: PrivateContainerd, secret: tuple[Path, str]) -> dict[str, str]:
    from tests.guests import build_c

    files = build_c("files").read_bytes()
    loop = build_c("loop").read_bytes()
    host = str(secret[0])
    layer = _tar(
        [
            ("files.wasm", files, None),
            ("loop.wasm", loop, None),
            ("link", None, "/../../.." + host),  # planted: a symlink to the host's file
            ("up", None, "../../../../.."),
            ("etc", None, None),
            ("etc/hostname", b"image\n", None),
        ]
    )
    base = containerd.base
    wasm = _image(base / "wasm-layout", "test", layer, {"Entrypoint": ["/files.wasm"]})
    return {
        "wasm": containerd.import_layout(wasm, "localhost/wdx-sbx/wasm"),
        "linux": containerd.import_layout(
            busybox_layout(base / "busybox-layout"), "localhost/wdx-sbx/busybox"
        ),
    }


def _ctr(
    d: PrivateContainerd,
    image: str,
    runtime: str,
    *args: str,
    flags: tuple[str, ...] = (),
    binary: str | None = None,
) -> tuple[int, str, str]:
    import subprocess

    cid = f"s{uuid.uuid4().hex[:10]}"
    argv = d.run_argv(image, cid, *args, runtime_type=runtime, runtime=binary)
    at = argv.index("run") + 1
    argv[at:at] = list(flags)
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL
    )
    return out.returncode, out.stdout, out.stderr


def _status(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            fields[key] = " ".join(value.split())
    return fields


@contextlib.contextmanager
def _running(
    d: PrivateContainerd,
    image: str,
    runtime: str,
    *args: str,
    flags: tuple[str, ...] = (),
    binary: str | None = None,
) -> Iterator[int]:
    """A detached container running ``args``; its process's host pid, removed afterwards."""
    import subprocess

    cid = f"r{uuid.uuid4().hex[:10]}"
    argv = d.run_argv(image, cid, *args, runtime_type=runtime, runtime=binary, detach=True)
    at = argv.index("run") + 2  # after "-d"
    argv[at:at] = list(flags)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    try:
        assert out.returncode == 0, out.stderr + d.log()
        assert d.wait_status(cid, "RUNNING") == "RUNNING", d.log()
        yield d.task_pid(cid)
    finally:
        d.remove(cid)


def _seen(pid: int | str) -> dict[str, str]:
    return _status(Path(f"/proc/{pid}/status").read_text())


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param((), id="default"),
        pytest.param(("--seccomp",), id="seccomp"),
        pytest.param(tuple(f for c in DEFAULT_CAPS for f in ("--cap-drop", c)), id="no-caps"),
        pytest.param(("--cap-add", "CAP_SYS_ADMIN", "--seccomp"), id="cap-add"),
        pytest.param(("--privileged",), id="privileged"),
    ],
)
@pytest.mark.parametrize("binary", [None, str(RUNC_CMD)], ids=["shim", "wasidispatch-runc"])
def test_process_status_matches_runc(
    containerd: PrivateContainerd,
    images: dict[str, str],
    flags: tuple[str, ...],
    binary: str | None,
) -> None:
    runtime = SHIM_RUNTIME if binary is None else RUNC_RUNTIME
    with _running(
        containerd, images["wasm"], runtime, "/loop.wasm", flags=flags, binary=binary
    ) as pid:
        ours = _seen(pid)
    # busybox read the same way, from the host while it runs (its own `cat` went through a
    # FIFO whose output a loaded machine once lost)
    with _running(containerd, images["linux"], RUNC_RUNTIME, "sleep", "60", flags=flags) as pid:
        theirs = _seen(pid)
    assert set(ours) == set(FIELDS)
    assert ours == theirs
    if "--seccomp" in flags:
        assert ours["Seccomp"] == "2"
    if "--cap-drop" in flags:
        assert ours["CapEff"] == ours["CapBnd"] == "0000000000000000"


def _devices_list(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "devices" in controllers.split(","):
            return sorted(
                Path(f"/sys/fs/cgroup/devices{path}/devices.list").read_text().split("\n")
            )
    pytest.skip("no cgroup v1 devices controller (v2 takes device rules as eBPF: not done)")


@pytest.mark.parametrize("binary", [None, str(RUNC_CMD)], ids=["shim", "wasidispatch-runc"])
def test_device_rules_match_runc(
    containerd: PrivateContainerd, images: dict[str, str], binary: str | None
) -> None:
    """The spec's device cgroup rules (deny all, allow the default devices): an engine
    escape cannot mknod and open the host's disk."""
    runtime = SHIM_RUNTIME if binary is None else RUNC_RUNTIME
    with _running(containerd, images["wasm"], runtime, "/loop.wasm", binary=binary) as pid:
        ours = _devices_list(pid)
    with _running(containerd, images["linux"], RUNC_RUNTIME, "sleep", "60") as pid:
        theirs = _devices_list(pid)
    assert ours == theirs, (ours, theirs)
    assert "a *:* rwm" not in ours
    assert "c 1:3 rwm" in ours  # /dev/null


NAMESPACES = ("net", "ipc", "uts", "mnt", "pid")


def test_namespaces_are_new_unless_host(
    containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    host = {name: os.readlink(f"/proc/self/ns/{name}") for name in NAMESPACES}
    with _running(containerd, images["wasm"], SHIM_RUNTIME, "/loop.wasm") as pid:
        new = {name: os.readlink(f"/proc/{pid}/ns/{name}") for name in NAMESPACES}
    assert all(new[name] != host[name] for name in host), (new, host)
    with _running(
        containerd, images["wasm"], SHIM_RUNTIME, "/loop.wasm", flags=("--net-host",)
    ) as pid:
        shared = {name: os.readlink(f"/proc/{pid}/ns/{name}") for name in NAMESPACES}
    assert shared["net"] == host["net"]
    assert shared["mnt"] != host["mnt"]
    assert shared["pid"] != host["pid"]


def test_root_is_the_rootfs_with_the_spec_mounts(
    containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    code, listing, err = _ctr(containerd, images["wasm"], SHIM_RUNTIME, "/files.wasm", "list", "/")
    assert code == 0, err
    names = set(listing.split())
    assert {"files.wasm", "link", "up", "etc"} <= names
    assert not names & {"usr", "bin", "home", "root", "tmp", "work"}
    # the guest's / holds no kernel file system: its own process is out of its reach
    for path in ("/proc", "/dev", "/sys"):
        code, inside, err = _ctr(
            containerd, images["wasm"], SHIM_RUNTIME, "/files.wasm", "list", path
        )
        assert inside == "", (path, inside, err)
    with _running(containerd, images["wasm"], SHIM_RUNTIME, "/loop.wasm") as pid:
        info = Path(f"/proc/{pid}/mountinfo").read_text()
        root = sorted(os.listdir(f"/proc/{pid}/root"))
        devs = set(os.listdir(f"/proc/{pid}/root/dev"))
        procs = [n for n in os.listdir(f"/proc/{pid}/root/proc") if n.isdigit()]
    points = {line.split()[4]: line.split(" - ")[1].split()[0] for line in info.splitlines()}
    assert points["/"] == "overlay"
    assert (points["/proc"], points["/dev"], points["/sys"]) == ("proc", "tmpfs", "sysfs")
    assert "/proc/kcore" in points or "/proc/keys" in points  # masked paths are covered
    assert not any(p.startswith(("/tmp", "/work", "/run/containerd")) for p in points)
    assert {"files.wasm", "loop.wasm", "proc", "dev", "sys"} <= set(root)
    assert {"null", "zero", "urandom", "pts", "shm"} <= devs
    assert procs == ["1"]  # its own pid namespace: the container process is its init


def test_read_only_rootfs(containerd: PrivateContainerd, images: dict[str, str]) -> None:
    def root_options(flags: tuple[str, ...]) -> list[str]:
        with _running(containerd, images["wasm"], SHIM_RUNTIME, "/loop.wasm", flags=flags) as pid:
            info = Path(f"/proc/{pid}/mountinfo").read_text()
        root = next(line.split() for line in info.splitlines() if line.split()[4] == "/")
        return root[5].split(",")

    assert "ro" in root_options(("--read-only",))  # the kernel's mount, not only the engine
    assert "rw" in root_options(())
    code, _, err = _ctr(
        containerd,
        images["wasm"],
        SHIM_RUNTIME,
        "/files.wasm",
        "mkdir",
        "/newdir",
        flags=("--read-only",),
    )
    assert code == 1
    assert "/newdir" in err
    code, _, err = _ctr(containerd, images["wasm"], SHIM_RUNTIME, "/files.wasm", "mkdir", "/newdir")
    assert code == 0, err


def test_host_files_out_of_reach(
    containerd: PrivateContainerd, images: dict[str, str], secret: tuple[Path, str]
) -> None:
    path, token = secret
    host = str(path)
    shim_like = [str(p) for p in range(2, 12)]
    attempts = [
        host,
        "/.." + host,
        "/../../../.." + host,
        "/link",
        "/up" + host,
        "/proc/1/root" + host,
        "/proc/self/root" + host,
        "/proc/1/cwd/../../.." + host,
        "/dev/.." + host,
        "/sys/../.." + host,
        *(f"/proc/1/fd/{fd}/../..{host}" for fd in shim_like),
        *(f"/proc/{pid}/root{host}" for pid in shim_like),
    ]
    for attempt in attempts:
        code, out, err = _ctr(
            containerd, images["wasm"], SHIM_RUNTIME, "/files.wasm", "read", attempt
        )
        assert token not in out + err, attempt
        assert code != 0, (attempt, out)
    # the host's file is readable when mounted, as with runc: the attempts failed for want of
    # a path, not because the guest cannot read at all
    code, out, err = _ctr(
        containerd,
        images["wasm"],
        SHIM_RUNTIME,
        "/files.wasm",
        "read",
        "/mnt/secret",
        flags=("--mount", f"type=bind,src={path.parent},dst=/mnt,options=rbind:ro"),
    )
    assert (code, out) == (0, token), err

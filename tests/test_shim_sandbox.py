"""The sandbox of a Wasm container, read from inside it, through containerd and our shim.

A Wasm guest (``files``: read, list, readlink) reports what its own process sees in
``/proc/self``; busybox under the same ``ctr run`` options through runc.v2 reports the same
fields, and they must agree: capabilities, ``NoNewPrivs``, ``Seccomp``, the namespaces
(new ones unless ``--net-host``), ``/`` being the image's rootfs, the spec's mounts and
masked paths. A second guest tries a host file through every path it has (``..``, the
pid namespace's ``/proc/1/root``, a symlink planted in the image, the descriptors it holds)
and must never read it.
"""

from __future__ import annotations

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
    host = str(secret[0])
    layer = _tar(
        [
            ("files.wasm", files, None),
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
def test_process_status_matches_runc(
    containerd: PrivateContainerd, images: dict[str, str], flags: tuple[str, ...]
) -> None:
    code, wasm, err = _ctr(
        containerd,
        images["wasm"],
        SHIM_RUNTIME,
        "/files.wasm",
        "read",
        "/proc/self/status",
        flags=flags,
    )
    assert code == 0, err + containerd.log()
    code, linux, err = _ctr(
        containerd, images["linux"], RUNC_RUNTIME, "cat", "/proc/self/status", flags=flags
    )
    assert code == 0, err
    ours, theirs = _status(wasm), _status(linux)
    assert set(ours) == set(FIELDS)
    assert ours == theirs
    if "--seccomp" in flags:
        assert ours["Seccomp"] == "2"
    if "--cap-drop" in flags:
        assert ours["CapEff"] == ours["CapBnd"] == "0000000000000000"


def test_wasidispatch_runc_sandboxes_too(
    containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    """The same sandbox for a Wasm container of ``wasidispatch-runc`` under runc.v2."""
    flags = ("--seccomp",)
    code, wasm, err = _ctr(
        containerd,
        images["wasm"],
        RUNC_RUNTIME,
        "/files.wasm",
        "read",
        "/proc/self/status",
        flags=flags,
        binary=str(RUNC_CMD),
    )
    assert code == 0, err + containerd.log()
    code, linux, err = _ctr(
        containerd, images["linux"], RUNC_RUNTIME, "cat", "/proc/self/status", flags=flags
    )
    assert code == 0, err
    assert _status(wasm) == _status(linux)
    assert _status(wasm)["Seccomp"] == "2"
    code, procs, err = _ctr(
        containerd, images["wasm"], RUNC_RUNTIME, "/files.wasm", "list", "/proc",
        binary=str(RUNC_CMD),
    )  # fmt: skip
    assert code == 0, err
    assert [name for name in procs.split() if name.isdigit()] == ["1"]


def _ns(d: PrivateContainerd, image: str, flags: tuple[str, ...] = ()) -> dict[str, str]:
    names = ("net", "ipc", "uts", "mnt", "pid")
    out = {}
    for name in names:
        code, link, err = _ctr(
            d, image, SHIM_RUNTIME, "/files.wasm", "readlink", f"/proc/self/ns/{name}", flags=flags
        )
        assert code == 0, err
        out[name] = link.strip()
    return out


def test_namespaces_are_new_unless_host(
    containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    host = {
        name: os.readlink(f"/proc/self/ns/{name}") for name in ("net", "ipc", "uts", "mnt", "pid")
    }
    new = _ns(containerd, images["wasm"])
    assert all(new[name] != host[name] for name in host), (new, host)
    assert all(new[name].startswith(f"{name}:[") for name in host)
    shared = _ns(containerd, images["wasm"], ("--net-host",))
    assert shared["net"] == host["net"]
    assert shared["mnt"] != host["mnt"]
    assert shared["pid"] != host["pid"]


def test_root_is_the_rootfs_with_the_spec_mounts(
    containerd: PrivateContainerd, images: dict[str, str]
) -> None:
    code, listing, err = _ctr(containerd, images["wasm"], SHIM_RUNTIME, "/files.wasm", "list", "/")
    assert code == 0, err
    names = set(listing.split())
    assert {"files.wasm", "link", "up", "etc", "proc", "dev", "sys"} <= names
    assert not names & {"usr", "bin", "home", "root", "tmp", "work"}
    code, info, err = _ctr(
        containerd, images["wasm"], SHIM_RUNTIME, "/files.wasm", "read", "/proc/self/mountinfo"
    )
    assert code == 0, err
    points = {line.split()[4]: line.split(" - ")[1].split()[0] for line in info.splitlines()}
    assert points["/"] == "overlay"
    assert (points["/proc"], points["/dev"], points["/sys"]) == ("proc", "tmpfs", "sysfs")
    assert "/proc/kcore" in points or "/proc/keys" in points  # masked paths are covered
    assert not any(p.startswith(("/tmp", "/work", "/run/containerd")) for p in points)
    code, devs, err = _ctr(containerd, images["wasm"], SHIM_RUNTIME, "/files.wasm", "list", "/dev")
    assert code == 0, err
    assert {"null", "zero", "urandom", "pts", "shm"} <= set(devs.split())
    code, procs, err = _ctr(
        containerd, images["wasm"], SHIM_RUNTIME, "/files.wasm", "list", "/proc"
    )
    assert code == 0, err
    # its own pid namespace: the container process is the only one, its init
    assert [name for name in procs.split() if name.isdigit()] == ["1"]


def test_read_only_rootfs(containerd: PrivateContainerd, images: dict[str, str]) -> None:
    def root_options(flags: tuple[str, ...]) -> list[str]:
        code, info, err = _ctr(
            containerd,
            images["wasm"],
            SHIM_RUNTIME,
            "/files.wasm",
            "read",
            "/proc/self/mountinfo",
            flags=flags,
        )
        assert code == 0, err
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

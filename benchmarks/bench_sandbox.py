"""What the Wasm container sandbox costs per container, measured where it runs.

Through CRI (``bench_cri.py``'s ``sandbox-cost``) the VM's noise (~10 ms) hides milliseconds;
here the container process's own steps are timed without containerd. Each round forks as the
shim's zygote does (a child that forks the container process, here into a new pid namespace
for the sandboxed cases) and waits for it; the container process applies a spec shaped like
the one containerd's CRI plugin writes for a container (proc, a tmpfs ``/dev``, devpts,
mqueue, a read-only sysfs, the pod's ``/dev/shm`` and ``/etc/hosts``/``resolv.conf``/
``hostname`` binds, ``/dev/termination-log``, CRI's masked and read-only paths, its default
capabilities, the node's network namespace joined by path, new IPC/UTS/mount/pid ones) and
exits. Cases:

* ``none``: the double fork and exit only (what the sandbox is added to);
* ``sandbox``: + `wasidispatch.runc.sandbox` without a seccomp profile;
* ``sandbox+seccomp``: + RuntimeDefault-like seccomp (``tests/data/seccomp/default-like.json``,
  318 syscalls), its BPF built once in the parent (as the zygote does) and loaded in the child;
* ``sandbox+seccomp-uncached``: the same, compiled with libseccomp in every container (what
  ``wasidispatch-runc`` pays: a fresh process per container).

The container process also times its own ``enter`` + ``Finish`` with ``perf_counter_ns``:
the median is in each case's ``extra_info`` (``inside_ms``), the number to hold against the
2 ms target. Root only.

Run: ``.venv/bin/python -m pytest benchmarks/bench_sandbox.py -o python_files='bench_*.py'
--benchmark-only``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from wasidispatch.runc import sandbox
from wasidispatch.runc.spec import LeanBundle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root")

PROFILE = Path(__file__).parent.parent / "tests" / "data" / "seccomp" / "default-like.json"
CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip


def _cri_like(base: Path, seccomp: bool) -> LeanBundle:
    pod = base / "pod"
    (pod / "shm").mkdir(parents=True, exist_ok=True)
    for name in ("hosts", "resolv.conf", "hostname", "termination-log"):
        (pod / name).write_text(f"{name}\n")
    bundle = base / ("bundle-seccomp" if seccomp else "bundle")
    rootfs = bundle / "rootfs"
    for d in ("etc", "proc", "dev", "sys", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "app.wasm").write_bytes(b"\0asm\1\0\0\0")

    def bind(src: Path, dst: str, *options: str) -> dict[str, Any]:
        return {"destination": dst, "type": "bind", "source": str(src),
                "options": ["rbind", "rprivate", *options]}  # fmt: skip

    linux: dict[str, Any] = {
        "namespaces": [
            {"type": "pid"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
            {"type": "network", "path": "/proc/self/ns/net"},
        ],
        "maskedPaths": [
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
        ],
        "readonlyPaths": [
            "/proc/asound",
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ],
    }
    if seccomp:
        linux["seccomp"] = json.loads(PROFILE.read_text())
    spec = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {
            "args": ["/app.wasm"],
            "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": True,
            "oomScoreAdj": 0,
            "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        },
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": [
                    "nosuid",
                    "noexec",
                    "newinstance",
                    "ptmxmode=0666",
                    "mode=0620",
                    "gid=5",
                ],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
            bind(pod / "hosts", "/etc/hosts", "rw"),
            bind(pod / "termination-log", "/dev/termination-log", "rw"),
            bind(pod / "hostname", "/etc/hostname", "rw"),
            bind(pod / "resolv.conf", "/etc/resolv.conf", "rw"),
            bind(pod / "shm", "/dev/shm", "rw"),
        ],
        "linux": linux,
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return LeanBundle.load(bundle)


def _round(bundle: LeanBundle | None, *, seccomp_cached: bool) -> int:
    """One container's fork, sandbox and exit; the container's own ns for enter + Finish."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the zygote's child
        try:
            if bundle is not None:
                sandbox._check(sandbox._libc().unshare(sandbox.CLONE_NEWPID), "pid namespace")
            if os.fork() == 0:
                took = 0
                try:
                    if bundle is not None:
                        if not seccomp_cached:
                            from wasidispatch import _seccomp

                            _seccomp._PROGRAMS.clear()
                        start = time.perf_counter_ns()
                        sandbox.enter(bundle)()
                        took = time.perf_counter_ns() - start
                    os.write(w, str(took).encode())
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    return int(data or b"-1")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LeanBundle]:
    base = tmp_path_factory.mktemp("sandbox-bench")
    from wasidispatch import _seccomp

    made = {"plain": _cri_like(base, False), "seccomp": _cri_like(base, True)}
    _seccomp.program(json.loads(PROFILE.read_text()))  # the zygote's cache, inherited
    return made


@pytest.mark.benchmark(group="sandbox")
@pytest.mark.parametrize("case", ["none", "sandbox", "sandbox+seccomp", "sandbox+seccomp-uncached"])
def test_sandbox_per_container(
    benchmark: BenchmarkFixture, bundles: dict[str, LeanBundle], case: str
) -> None:
    bundle = {"none": None, "sandbox": bundles["plain"]}.get(case, bundles["seccomp"])
    cached = case != "sandbox+seccomp-uncached"
    inside: list[int] = []

    def once() -> None:
        took = _round(bundle, seccomp_cached=cached)
        assert took >= 0, "the container process failed"
        inside.append(took)

    benchmark.pedantic(once, rounds=60, warmup_rounds=3)  # type: ignore[no-untyped-call]
    benchmark.extra_info["inside_ms"] = round(statistics.median(inside) / 1e6, 3)

"""A private containerd for the end-to-end tests and the runtime benchmarks.

Everything lives under one temporary directory: config, root, state, the gRPC/ttrpc sockets,
the ``opt`` plugin path, the runc state root handed to the runc shim (``--runc-root``), and
the precompile cache (``WASIDISPATCH_CACHE_DIR``) of ``wasidispatch-runc`` and of our shim.
Containers get cgroups under one unique top-level path. `PrivateContainerd.stop` stops the
daemon, kills what is left of its shims and containers, unmounts what is still mounted below
the directory and removes it; `PrivateContainerd.leftovers` lists what would have been left.

Two runtimes are driven: containerd's stock ``io.containerd.runc.v2`` (optionally with
``wasidispatch-runc`` as its runc binary) and our shim v2, runtime type
``io.containerd.wasidispatch.v1``: containerd finds ``containerd-shim-wasidispatch-v1`` on
its ``PATH``, where the virtualenv's ``bin`` comes first. A few things our shim (like every
shim) puts outside the directory are tracked by what appeared after `PrivateContainerd.start`:
shim sockets in ``/run/containerd/s``, ``ctr``'s FIFO directories in ``/run/containerd/fifo``
and, for Linux containers of our shim, runc's state under ``/run/containerd/wasidispatch/<ns>``
(``ctr`` sends runc options only to ``io.containerd.runc.v2``: ``--runc-root`` does not reach
another runtime). The shim tests use their own namespace, so that directory is theirs.

Bytecode: this workplace sets ``PYTHONDONTWRITEBYTECODE=1``, and containerd passes its own
environment to shims. containerd gets an explicit environment here: with ``bytecode=True``
(the default, as on a real node) the variable is not set, Python shims and ``wasidispatch-runc``
write and use ``__pycache__``; ``bytecode=False`` sets it.

Images are built here, not pulled: a busybox image from Debian's ``busybox-static`` binary and
a Wasm image whose rootfs holds ``.wasm`` files (an ordinary OCI image: containerd unpacks it,
and the dispatch rule sends it to Wasm by the entrypoint's bytes). Both are written with
`wasidispatch.oci.layout.ImageLayout` and imported with ``ctr images import``.

`ContainerdClient` drives containerd's own gRPC API (containers, snapshots, tasks: what ``ctr
run`` calls) from this process, so that a container's create, start and exit can be timed
without ``ctr``'s start-up; it needs ``grpcio`` and ``grpcio-tools`` (the messages are
generated once per process from the few fields written out in `_API_PROTO`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "GROUP_ANNOTATION",
    "RUNC_CMD",
    "RUNC_RUNTIME",
    "SHIM_BINARY",
    "SHIM_CMD",
    "SHIM_RUNTIME",
    "ContainerTemplate",
    "ContainerdClient",
    "PrivateContainerd",
    "RunOutcome",
    "busybox_layout",
    "missing_grpc",
    "missing_requirements",
    "missing_shim",
    "pss_kib",
    "vm_rss_kib",
    "wasm_layout",
]

RUNC_CMD = Path(sys.executable).with_name("wasidispatch-runc")
SHIM_BINARY = "containerd-shim-wasidispatch-v1"
SHIM_CMD = Path(sys.executable).with_name(SHIM_BINARY)
SHIM_RUNTIME = "io.containerd.wasidispatch.v1"
RUNC_RUNTIME = "io.containerd.runc.v2"
GROUP_ANNOTATION = "io.kubernetes.cri.sandbox-id"
"""The annotation both shims group containers by (one shim process per value)."""

SOCKET_DIR = Path("/run/containerd/s")
FIFO_DIR = Path("/run/containerd/fifo")
SHIM_RUNC_ROOT = Path("/run/containerd/wasidispatch")
"""Our shim's runc root when no runc options reach it (``<root>/<namespace>/<id>``)."""

_BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2", "runc", "busybox")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64", "ppc64le": "ppc64le"}
_TASK_DIR = "io.containerd.runtime.v2.task"


def missing_requirements() -> str | None:
    """Why the end-to-end setup cannot run here, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc and cgroups)"
    missing = [b for b in _BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian packages; run make system-deps)"
    if not RUNC_CMD.exists():
        return f"{RUNC_CMD} is not installed (pip install -e .)"
    return None


def missing_shim() -> str | None:
    """Why our shim cannot be driven here (`missing_requirements`, or no console script)."""
    why = missing_requirements()
    if why is None and not SHIM_CMD.exists():
        why = f"{SHIM_CMD} is not installed (pip install -e '.[all]')"
    return why


def missing_grpc() -> str | None:
    """Why `ContainerdClient` cannot work here (no ``grpcio``/``grpcio-tools``), or ``None``."""
    try:
        import grpc  # type: ignore[import-untyped]  # noqa: F401
        import grpc_tools  # noqa: F401
    except ImportError as exc:
        return f"needs grpcio and grpcio-tools ({exc})"
    return None


def _arch() -> str:
    return _ARCH.get(platform.machine(), platform.machine())


def _tar(entries: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """An uncompressed layer tar: (path, file bytes | None for a directory, symlink target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data, link in entries:
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _image(directory: Path, ref: str, layer: bytes, config: Mapping[str, object]) -> Path:
    """One single-layer OCI image in a layout at ``directory``, tagged ``ref``."""
    from wasidispatch.oci.image import (
        MEDIA_TYPE_IMAGE_CONFIG,
        MEDIA_TYPE_IMAGE_LAYER,
        MEDIA_TYPE_IMAGE_MANIFEST,
    )
    from wasidispatch.oci.layout import ImageLayout

    layout = ImageLayout.create(directory)
    layer_desc = layout.write_blob(layer, media_type=MEDIA_TYPE_IMAGE_LAYER)
    image_config = {
        "architecture": _arch(),
        "os": "linux",
        "config": dict(config),
        "rootfs": {"type": "layers", "diff_ids": [str(layer_desc.digest)]},
    }
    config_desc = layout.write_blob(
        json.dumps(image_config).encode(), media_type=MEDIA_TYPE_IMAGE_CONFIG
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": config_desc.model_dump(mode="json", by_alias=True, exclude_none=True),
        "layers": [layer_desc.model_dump(mode="json", by_alias=True, exclude_none=True)],
    }
    manifest_desc = layout.write_blob(
        json.dumps(manifest).encode(), media_type=MEDIA_TYPE_IMAGE_MANIFEST
    )
    layout.tag(manifest_desc, ref)
    return directory


def busybox_layout(directory: Path, ref: str = "test") -> Path:
    """busybox (Debian's static binary) with ``sh``, ``echo``, ``sleep``, ``true`` applets."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    entries: list[tuple[str, bytes | None, str | None]] = [
        ("bin", None, None),
        ("bin/busybox", Path(busybox).read_bytes(), None),
    ]
    entries += [(f"bin/{a}", None, "busybox") for a in ("sh", "echo", "sleep", "true", "cat")]
    config = {"Env": ["PATH=/bin"], "Cmd": ["sh"]}
    return _image(directory, ref, _tar(entries), config)


def wasm_layout(
    directory: Path, files: Mapping[str, bytes], entrypoint: str, ref: str = "test"
) -> Path:
    """An image whose rootfs holds ``files`` (name -> Wasm bytes) at ``/``."""
    entries: list[tuple[str, bytes | None, str | None]] = [
        (name, data, None) for name, data in sorted(files.items())
    ]
    config = {"Env": ["PATH=/"], "Entrypoint": [entrypoint]}
    return _image(directory, ref, _tar(entries), config)


def _tar_layout(layout: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(layout / name, arcname=name)
    return archive


# ------------------------------------------------------------------------ /proc and friends


def _cmdline(pid: int) -> str:
    """``pid``'s command line, words joined by spaces ("" when gone or a kernel thread)."""
    try:
        return (
            (Path("/proc") / str(pid) / "cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode(errors="replace")
        )
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    """``pid``'s parent (0 when gone). The comm field may hold spaces: split after ')'."""
    try:
        text = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return 0
    return int(text.rsplit(")", 1)[1].split()[1])


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _status_field(pid: int, name: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (0 when absent)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    return 0


def vm_rss_kib(pid: int) -> int:
    """``VmRSS`` of ``pid`` in KiB (resident pages, shared ones counted in full)."""
    return _status_field(pid, "VmRSS")


def pss_kib(pid: int) -> int:
    """``Pss`` of ``pid`` in KiB (shared pages divided among their users): forked processes
    sum up fairly, unlike ``VmRSS``."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _unix_inodes() -> dict[str, set[int]]:
    """Bound unix socket paths -> their socket inodes (``/proc/net/unix``)."""
    found: dict[str, set[int]] = {}
    with open("/proc/net/unix") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if len(parts) >= 8:
                found.setdefault(parts[7], set()).add(int(parts[6]))
    return found


def _fd_targets(pid: int) -> list[str]:
    fds = Path("/proc") / str(pid) / "fd"
    targets: list[str] = []
    with contextlib.suppress(OSError):
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                targets.append(os.readlink(fd))
    return targets


def _holders(targets: set[str]) -> dict[str, set[int]]:
    """Which processes hold a descriptor on each of ``targets`` (paths or ``socket:[N]``)."""
    held: dict[str, set[int]] = {t: set() for t in targets}
    if not targets:
        return held
    for pid in _pids():
        for target in _fd_targets(pid):
            if target in held:
                held[target].add(pid)
    return held


def _entries(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


# ------------------------------------------------------------------------ the daemon


class PrivateContainerd:
    """containerd with every path under ``base`` (see the module docstring).

    ``namespace``: the containerd namespace `ctr` and `run` use (``default`` unless given).
    ``debug``: containerd logs at debug level, so the shims' own logs (their ``log`` FIFO)
    appear in `log`; shims also get ``-debug``. ``bytecode``: see the module docstring.
    ``env``: more variables for containerd and thus for the shims.
    """

    def __init__(
        self,
        base: Path | None = None,
        *,
        namespace: str = "default",
        debug: bool = False,
        bytecode: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.base = Path(base or tempfile.mkdtemp(prefix="wasidispatch-e2e-"))
        self.sock = self.base / "containerd.sock"
        self.runc_root = self.base / "runc-root"
        self.cache = self.base / "cache"
        self.token = uuid.uuid4().hex[:10]
        self.cgroup_parent = f"/wasidispatch-e2e-{self.token}"
        self.namespace = namespace
        self.debug = debug
        self.bytecode = bytecode
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._sockets_before: set[str] = set()
        self._fifos_before: set[str] = set()

    # ----------------------------------------------------------------- life cycle

    def _config(self) -> str:
        b = self.base
        return "\n".join(
            [
                "version = 2",
                f'root = "{b}/root"',
                f'state = "{b}/state"',
                f'temp = "{b}/tmp"',
                "[grpc]",
                f'  address = "{self.sock}"',
                "[ttrpc]",
                f'  address = "{self.sock}.ttrpc"',
                "[debug]",
                f'  level = "{"debug" if self.debug else "warn"}"',
                "[plugins]",
                '  [plugins."io.containerd.internal.v1.opt"]',
                f'    path = "{b}/opt"',
                '  [plugins."io.containerd.grpc.v1.cri"]',
                "    restrict_oom_score_adj = true",
                "",
            ]
        )

    def environment(self) -> dict[str, str]:
        """containerd's (and so every shim's) environment."""
        env = {
            "PATH": f"{RUNC_CMD.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/bin",
            "HOME": str(self.base),
            "WASIDISPATCH_CACHE_DIR": str(self.cache),
        }
        if not self.bytecode:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        return {**env, **self.extra_env}

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemon and wait until it answers on its socket."""
        (self.base / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(self._config())
        self._sockets_before = _entries(SOCKET_DIR)
        self._fifos_before = _entries(FIFO_DIR)
        with (self.base / "containerd.log").open("wb") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.environment(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log()}")
            if self.sock.exists() and self.ctr("version").returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not come up in {timeout}s: {self.log()}")

    def alive(self) -> bool:
        """containerd is running and answers ``ctr version``."""
        return (
            self.proc is not None
            and self.proc.poll() is None
            and self.ctr("version").returncode == 0
        )

    def log(self, tail: int = 4000) -> str:
        """The end of the daemon's own log (with ``debug``, the shims' logs too)."""
        path = self.base / "containerd.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self) -> None:
        """Stop the daemon, kill what is left of shims and containers, unmount, remove the
        cgroups, our sockets, FIFO directories and runc state, and the whole directory."""
        self._shutdown()
        if self.namespace != "default":
            shutil.rmtree(SHIM_RUNC_ROOT / self.namespace, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def _shutdown(self) -> None:
        """`stop` up to the state directories: the daemon stopped, what is left of its
        shims and containers killed, unmounted, its cgroups, sockets and FIFO dirs gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_leftovers()
        for point in self.mounts():
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        self._remove_cgroups()
        for path in self.sockets():
            with contextlib.suppress(OSError):
                os.unlink(path)
        for path in self.fifo_dirs():
            shutil.rmtree(path, ignore_errors=True)

    def _kill_leftovers(self, timeout: float = 10.0) -> None:
        """SIGKILL every process of ours (frozen cgroups thawed first) and wait for them."""
        for cgroup in self._cgroup_tree():
            state = cgroup / "freezer.state"
            if state.exists():
                with contextlib.suppress(OSError):
                    state.write_text("THAWED")
            freeze = cgroup / "cgroup.freeze"
            if freeze.exists():
                with contextlib.suppress(OSError):
                    freeze.write_text("0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self._process_ids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def _remove_cgroups(self) -> None:
        for cgroup in sorted(self._cgroup_tree(), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                cgroup.rmdir()

    # ----------------------------------------------------------------- ctr

    def ctr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCK -n NAMESPACE ARGS`` with output captured."""
        return subprocess.run(
            ["ctr", "-a", str(self.sock), "-n", self.namespace, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def run_argv(
        self,
        image: str,
        cid: str,
        *args: str,
        runtime: str | None = None,
        runtime_type: str = RUNC_RUNTIME,
        annotations: Mapping[str, str] | None = None,
        detach: bool = False,
    ) -> list[str]:
        """``ctr run --rm`` (or ``run -d``) in a private cgroup.

        ``runtime``: the runc binary of ``io.containerd.runc.v2``; ``runtime_type``: the
        runtime (`SHIM_RUNTIME` for ours, which gets neither ``--runc-root`` nor a binary:
        ``ctr`` refuses or drops them for runtimes other than runc.v2). ``annotations``: OCI
        annotations (``ctr run --annotation``), e.g. `GROUP_ANNOTATION` to group containers.
        """
        argv = ["ctr", "-a", str(self.sock), "-n", self.namespace, "run"]
        argv.append("-d" if detach else "--rm")
        if runtime_type != RUNC_RUNTIME:
            if runtime is not None:
                raise ValueError("a runc binary is only for io.containerd.runc.v2")
            argv += ["--runtime", runtime_type]
        else:
            if runtime is not None:
                argv += ["--runc-binary", runtime]
            argv += ["--runc-root", str(self.runc_root)]
        for key, value in (annotations or {}).items():
            argv += ["--annotation", f"{key}={value}"]
        argv += ["--cgroup", f"{self.cgroup_parent}/{cid}"]
        return [*argv, image, cid, *args]

    def run(
        self,
        image: str,
        cid: str,
        *args: str,
        runtime: str | None = None,
        runtime_type: str = RUNC_RUNTIME,
        annotations: Mapping[str, str] | None = None,
        detach: bool = False,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a container to completion (its exit code is ctr's), or start it (``detach``)."""
        return subprocess.run(
            self.run_argv(
                image,
                cid,
                *args,
                runtime=runtime,
                runtime_type=runtime_type,
                annotations=annotations,
                detach=detach,
            ),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def import_layout(self, layout: Path, name: str) -> str:
        """Import an image layout (tagged ``test``) as ``name:test``; returns the reference."""
        archive = _tar_layout(layout, self.base / f"{layout.name}.tar")
        out = self.ctr("images", "import", "--base-name", name, str(archive))
        if out.returncode != 0:
            raise RuntimeError(f"ctr images import failed: {out.stderr}")
        return f"{name}:test"

    # ----------------------------------------------------------------- tasks

    def tasks(self) -> dict[str, tuple[int, str]]:
        """``ctr task ls``: task id -> (pid, status such as ``RUNNING``)."""
        out = self.ctr("tasks", "ls")
        found: dict[str, tuple[int, str]] = {}
        for line in out.stdout.splitlines()[1:]:
            words = line.split()
            if len(words) >= 3 and words[1].isdigit():
                found[words[0]] = (int(words[1]), words[2])
        return found

    def task_status(self, cid: str) -> str:
        """The task's status in ``ctr task ls`` ("" when there is no such task)."""
        return self.tasks().get(cid, (0, ""))[1]

    def task_pid(self, cid: str) -> int:
        """The task's (init process's) host pid in ``ctr task ls`` (0 when none)."""
        return self.tasks().get(cid, (0, ""))[0]

    def wait_status(self, cid: str, want: str, timeout: float = 60.0) -> str:
        """Poll ``ctr task ls`` until the task shows ``want``; returns the last status seen."""
        deadline = time.monotonic() + timeout
        status = self.task_status(cid)
        while status != want and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.task_status(cid)
        return status

    def task_pids(self, cid: str) -> list[int]:
        """``ctr task ps``: the pids of the task's processes."""
        out = self.ctr("tasks", "ps", cid)
        return [int(w[0]) for w in (line.split() for line in out.stdout.splitlines()[1:]) if w]

    def delete_task(self, cid: str) -> int:
        """``ctr task rm``: delete a stopped task; returns its exit code (``ctr`` exits 0 and
        warns ``task ID exit with non-zero exit code N``)."""
        out = self.ctr("tasks", "rm", cid)
        if out.returncode != 0:
            raise RuntimeError(f"ctr task rm {cid} failed: {out.stderr}")
        found = re.search(r"exit with non-zero exit code (\d+)", out.stderr)
        return int(found.group(1)) if found else 0

    def frozen(self, cid: str) -> bool | None:
        """Whether the container's cgroup is frozen: cgroup v1's ``freezer.state`` or v2's
        ``cgroup.freeze`` (``None`` when the container has neither)."""
        relative = f"{self.cgroup_parent}/{cid}".lstrip("/")
        v1 = Path("/sys/fs/cgroup/freezer") / relative / "freezer.state"
        with contextlib.suppress(OSError):
            return v1.read_text().strip() == "FROZEN"
        for top in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
            with contextlib.suppress(OSError):
                return (top / relative / "cgroup.freeze").read_text().strip() == "1"
        return None

    def shim_pid(self, cid: str) -> int:
        """The pid of the shim serving task ``cid`` (0 when not found).

        The shim is the task process's nearest ancestor that is a shim and whose own parent
        is not one (our shim may fork helpers, such as a zygote, from itself): a runc
        container's init is re-parented to the shim (a subreaper), a Wasm process is forked
        from it.
        """
        pid = self.task_pid(cid)
        shim = 0
        while pid > 1:
            pid = _ppid(pid)
            if "containerd-shim" in _cmdline(pid):
                shim = pid
            elif shim:
                break
        return shim

    def shim_processes(self) -> list[int]:
        """Every process of our shim started by this containerd (daemon and its forks)."""
        return [
            pid
            for pid in _pids()
            if SHIM_BINARY in (cmd := _cmdline(pid)) and str(self.sock) in cmd
        ]

    def remove(self, cid: str) -> int | None:
        """Kill (SIGKILL, all processes), delete the task, remove the container and its
        snapshot; returns the task's exit code as ``ctr task rm`` reports it (``None``
        when there was no task). Cleanup for tests: errors are ignored."""
        code: int | None = None
        if self.task_status(cid):
            if self.task_status(cid) == "PAUSED":
                self.ctr("tasks", "resume", cid)
            self.ctr("tasks", "kill", "--all", "-s", "SIGKILL", cid)
            self.wait_status(cid, "STOPPED", timeout=30)
            code = self.ctr("tasks", "rm", "-f", cid).returncode
        self.ctr("containers", "rm", cid)
        return code

    # ----------------------------------------------------------------- leftovers

    def cgroups(self) -> list[Path]:
        """Cgroup directories under our parent path, in every hierarchy."""
        found: list[Path] = []
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            parent = hierarchy / self.cgroup_parent.lstrip("/")
            if parent.is_dir():
                found += [p for p in parent.iterdir() if p.is_dir()]
        return found

    def _cgroup_tree(self) -> list[Path]:
        """Our parent cgroups and everything below them, in every hierarchy."""
        found: list[Path] = []
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            parent = hierarchy / self.cgroup_parent.lstrip("/")
            if parent.is_dir():
                found.append(parent)
                found += [p for p in parent.rglob("*") if p.is_dir()]
        return found

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for cgroup in self._cgroup_tree():
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
        return pids

    def _process_ids(self) -> set[int]:
        """Processes of ours: naming ``base`` (shims, runtimes), in our cgroups (containers)
        or working below ``base`` (a shim's forks)."""
        skip = {os.getpid(), self.proc.pid if self.proc is not None else -1}
        found = self._cgroup_pids()
        base = str(self.base)
        for pid in _pids():
            if str(self.base) in _cmdline(pid):
                found.add(pid)
                continue
            with contextlib.suppress(OSError):
                cwd = os.readlink(f"/proc/{pid}/cwd")
                if cwd == base or cwd.startswith(base + "/"):
                    found.add(pid)
        return found - skip

    def processes(self) -> list[str]:
        """Command lines of processes of ours other than containerd itself: naming ``base``
        (shims, runtimes), in our cgroups (containers) or working below ``base``."""
        found: list[str] = []
        for pid in sorted(self._process_ids()):
            cmdline = _cmdline(pid)
            if cmdline or Path(f"/proc/{pid}").exists():
                found.append(f"{pid}: {cmdline}")
        return found

    def states(self) -> list[str]:
        """Runtime state dirs: runc's under our ``--runc-root``, our shim's runc root for
        our (non-default) namespace, and containerd's bundles and shim work dirs."""
        found = (
            sorted(str(p) for p in self.runc_root.glob("*/*")) if self.runc_root.exists() else []
        )
        if self.namespace != "default":
            found += sorted(str(p) for p in (SHIM_RUNC_ROOT / self.namespace).glob("*"))
        for top in (self.base / "state", self.base / "root"):
            found += sorted(str(p) for p in (top / _TASK_DIR).glob("*/*"))
        return found

    def sockets(self) -> list[str]:
        """Shim sockets that appeared in ``/run/containerd/s`` since `start` and are not
        held by someone else's live process (a dead socket file counts as ours)."""
        new = sorted(_entries(SOCKET_DIR) - self._sockets_before)
        if not new:
            return []
        inodes = _unix_inodes()
        paths = [str(SOCKET_DIR / name) for name in new]
        wanted = {f"socket:[{i}]" for p in paths for i in inodes.get(p, ())}
        held = _holders(wanted)
        ours = self._process_ids()
        found = []
        for path in paths:
            holders = {pid for i in inodes.get(path, ()) for pid in held.get(f"socket:[{i}]", ())}
            if not holders or holders & ours:
                found.append(path)
        return found

    def fifo_dirs(self) -> list[str]:
        """``ctr``'s FIFO directories that appeared in ``/run/containerd/fifo`` since `start`
        and whose FIFOs nobody else holds open."""
        new = sorted(_entries(FIFO_DIR) - self._fifos_before)
        if not new:
            return []
        files = {str(f): d for d in new for f in (FIFO_DIR / d).glob("*")}
        held = _holders(set(files))
        ours = self._process_ids()
        busy = {files[f] for f, pids in held.items() if pids and not pids & ours}
        return [str(FIFO_DIR / d) for d in new if d not in busy]

    def mounts(self) -> list[str]:
        """Mount points below ``base``, deepest first."""
        with open("/proc/self/mountinfo") as fh:
            points = [line.split()[4] for line in fh]
        return sorted((p for p in points if p.startswith(str(self.base))), reverse=True)

    _mounts = mounts

    def leftovers(self, *, everything: bool = False) -> dict[str, list[str]]:
        """What containers left: runtime state dirs (runc's), cgroups, processes; with
        ``everything``, also containerd's bundles (in ``state``), mounts, shim sockets and
        FIFO directories."""
        if not everything:
            states = (
                sorted(str(p) for p in self.runc_root.glob("*/*"))
                if self.runc_root.exists()
                else []
            )
            return {
                "state": states,
                "cgroups": sorted(str(p) for p in self.cgroups()),
                "processes": self.processes(),
            }
        return {
            "state": self.states(),
            "cgroups": sorted(str(p) for p in self.cgroups()),
            "processes": self.processes(),
            "mounts": self.mounts(),
            "sockets": self.sockets(),
            "fifos": self.fifo_dirs(),
        }

    def settle(self, timeout: float = 15.0) -> dict[str, list[str]]:
        """`leftovers` (everything) once empty, or as they are after ``timeout``: a shim
        exits, and removes its socket, just after answering containerd's Shutdown."""
        deadline = time.monotonic() + timeout
        found = self.leftovers(everything=True)
        while any(found.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
            found = self.leftovers(everything=True)
        return found


# ------------------------------------------------------------------------ containerd's gRPC API

# Field numbers are containerd's (api/services/{containers,snapshots,tasks}/v1, api/types,
# runtime/v2/runc/options); only the fields used here. The package is ours, so these messages
# never clash with the shim's own generated modules in one descriptor pool: the wire format
# knows field numbers only, and the gRPC method paths are spelled out in `_METHODS`.
_API_PROTO = """
syntax = "proto3";
package wasidispatch_harness.containerd;
import "google/protobuf/any.proto";
import "google/protobuf/timestamp.proto";

message Mount {
  string type = 1; string source = 2; string target = 3; repeated string options = 4;
}

message Container {
  message Runtime { string name = 1; google.protobuf.Any options = 2; }
  string id = 1;
  map<string, string> labels = 2;
  string image = 3;
  Runtime runtime = 4;
  google.protobuf.Any spec = 5;
  string snapshotter = 6;
  string snapshot_key = 7;
}
message CreateContainerRequest { Container container = 1; }
message CreateContainerResponse { Container container = 1; }
message DeleteContainerRequest { string id = 1; }

message PrepareSnapshotRequest {
  string snapshotter = 1; string key = 2; string parent = 3; map<string, string> labels = 4;
}
message PrepareSnapshotResponse { repeated Mount mounts = 1; }
message RemoveSnapshotRequest { string snapshotter = 1; string key = 2; }

message CreateTaskRequest {
  string container_id = 1; repeated Mount rootfs = 3;
  string stdin = 4; string stdout = 5; string stderr = 6; bool terminal = 7;
  google.protobuf.Any options = 9;
}
message CreateTaskResponse { string container_id = 1; uint32 pid = 2; }
message StartRequest { string container_id = 1; string exec_id = 2; }
message StartResponse { uint32 pid = 1; }
message WaitRequest { string container_id = 1; string exec_id = 2; }
message WaitResponse { uint32 exit_status = 1; google.protobuf.Timestamp exited_at = 2; }
message KillRequest {
  string container_id = 1; string exec_id = 2; uint32 signal = 3; bool all = 4;
}
message DeleteTaskRequest { string container_id = 1; }
message DeleteResponse {
  string id = 1; uint32 pid = 2; uint32 exit_status = 3; google.protobuf.Timestamp exited_at = 4;
}

message RuncOptions { string binary_name = 6; string root = 7; bool systemd_cgroup = 9; }
"""

_SERVICES = "/containerd.services."
_METHODS = {  # our name: (gRPC method path, response message)
    "CreateContainer": ("containers.v1.Containers/Create", "CreateContainerResponse"),
    "DeleteContainer": ("containers.v1.Containers/Delete", "Empty"),
    "Prepare": ("snapshots.v1.Snapshots/Prepare", "PrepareSnapshotResponse"),
    "RemoveSnapshot": ("snapshots.v1.Snapshots/Remove", "Empty"),
    "CreateTask": ("tasks.v1.Tasks/Create", "CreateTaskResponse"),
    "Start": ("tasks.v1.Tasks/Start", "StartResponse"),
    "Wait": ("tasks.v1.Tasks/Wait", "WaitResponse"),
    "Kill": ("tasks.v1.Tasks/Kill", "Empty"),
    "DeleteTask": ("tasks.v1.Tasks/Delete", "DeleteResponse"),
}
_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
_RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"

_api_lock = threading.Lock()
_api_module: ModuleType | None = None


def _api() -> ModuleType:
    """The generated message module (built once per process in a temporary directory)."""
    global _api_module
    with _api_lock:
        if _api_module is None:
            import importlib.resources
            import importlib.util

            from grpc_tools import protoc

            with tempfile.TemporaryDirectory(prefix="wasidispatch-harness-proto-") as tmp:
                source = Path(tmp) / "wasidispatch_harness_containerd.proto"
                source.write_text(_API_PROTO)
                include = str(importlib.resources.files("grpc_tools") / "_proto")
                code = protoc.main(
                    ["protoc", f"-I{tmp}", f"-I{include}", f"--python_out={tmp}", str(source)]
                )
                if code != 0:
                    raise RuntimeError(f"protoc failed ({code}) on the harness's API messages")
                name = "wasidispatch_harness_containerd_pb2"
                spec = importlib.util.spec_from_file_location(name, Path(tmp) / f"{name}.py")
                assert spec is not None
                assert spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            _api_module = module
        return _api_module


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


@dataclass(frozen=True)
class ContainerTemplate:
    """What a new container is made from: ``ctr``'s own spec for the image and runtime."""

    image: str
    runtime: str
    spec: dict[str, Any]
    snapshotter: str
    parent: str
    """The image's unpacked snapshot (chain id): the parent of each container's rootfs."""
    runc_root: str = ""
    """``containerd.runc.v1.Options.root`` sent with the container ("" sends no options)."""


@dataclass
class RunOutcome:
    """One container's run through `ContainerdClient.run`."""

    id: str
    exit_status: int
    stdout: bytes
    stderr: bytes
    pid: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class ContainerdClient:
    """containerd's gRPC API from this process: containers, snapshots and tasks, the calls
    ``ctr run --rm`` makes (without its image resolution, lease and start-up).

    Thread-safe: `run` may be called from several threads at once (`run_many`).
    """

    def __init__(self, daemon: PrivateContainerd) -> None:
        import grpc

        self.daemon = daemon
        self.pb = _api()
        self.channel = grpc.insecure_channel(f"unix://{daemon.sock}")
        self.metadata = (("containerd-namespace", daemon.namespace),)
        self.io_dir = daemon.base / "client-io"
        self.io_dir.mkdir(parents=True, exist_ok=True)
        self._stubs: dict[str, Any] = {}
        for name, (path, response) in _METHODS.items():
            if response == "Empty":
                from google.protobuf import empty_pb2

                deserialize = empty_pb2.Empty.FromString
            else:
                deserialize = getattr(self.pb, response).FromString
            self._stubs[name] = self.channel.unary_unary(
                _SERVICES + path,
                request_serializer=_serialize,
                response_deserializer=deserialize,
            )

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def call(self, name: str, request: Any, timeout: float = 120.0) -> Any:
        """One unary call in our namespace (raises ``grpc.RpcError``)."""
        return self._stubs[name](request, metadata=self.metadata, timeout=timeout)

    def template(
        self,
        image: str,
        *args: str,
        runtime_type: str = RUNC_RUNTIME,
        annotations: Mapping[str, str] | None = None,
    ) -> ContainerTemplate:
        """``ctr containers create`` once (then removed) for ``ctr``'s spec of ``image`` with
        ``args`` and ``annotations``, and the image's snapshot."""
        d = self.daemon
        cid = f"template-{uuid.uuid4().hex[:8]}"
        argv = ["containers", "create"]
        if runtime_type != RUNC_RUNTIME:
            argv += ["--runtime", runtime_type]
        for key, value in (annotations or {}).items():
            argv += ["--annotation", f"{key}={value}"]
        made = d.ctr(*argv, image, cid, *args)
        if made.returncode != 0:
            raise RuntimeError(f"ctr containers create failed: {made.stderr}")
        try:
            info = json.loads(d.ctr("containers", "info", cid).stdout)
            snapshot = json.loads(
                d.ctr(
                    "snapshots", "--snapshotter", info["Snapshotter"], "info", info["SnapshotKey"]
                ).stdout
            )
        finally:
            d.ctr("containers", "rm", cid)
        return ContainerTemplate(
            image=image,
            runtime=runtime_type,
            spec=info["Spec"],
            snapshotter=info["Snapshotter"],
            parent=snapshot["Parent"],
            runc_root=str(d.runc_root) if runtime_type == RUNC_RUNTIME else "",
        )

    def _fifos(self, cid: str) -> tuple[str, str, int, int]:
        out, err = str(self.io_dir / f"{cid}-stdout"), str(self.io_dir / f"{cid}-stderr")
        os.mkfifo(out, 0o600)
        os.mkfifo(err, 0o600)
        # opened for reading first and without blocking: the shim's open for writing then
        # never waits for us, and what it writes is read after the exit
        return (
            out,
            err,
            os.open(out, os.O_RDONLY | os.O_NONBLOCK),
            os.open(err, os.O_RDONLY | os.O_NONBLOCK),
        )

    @staticmethod
    def _drain(fd: int) -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def run(
        self,
        template: ContainerTemplate,
        cid: str,
        *,
        args: Sequence[str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> RunOutcome:
        """Create, start and wait for a container made from ``template``, then delete its
        task, the container and its snapshot, as ``ctr run --rm`` does; the container's
        output is read from its FIFOs. ``timings``: seconds spent creating (container,
        snapshot, task), starting, until Wait returned, and in all."""
        pb = self.pb
        spec = json.loads(json.dumps(template.spec))
        spec.setdefault("linux", {})["cgroupsPath"] = f"{self.daemon.cgroup_parent}/{cid}"
        if args is not None:
            spec["process"]["args"] = list(args)
        if annotations:
            spec["annotations"] = {**spec.get("annotations", {}), **annotations}
        runtime = pb.Container.Runtime(name=template.runtime)
        if template.runc_root:
            runtime.options.type_url = _RUNC_OPTIONS_TYPE
            runtime.options.value = pb.RuncOptions(root=template.runc_root).SerializeToString()
        container = pb.Container(
            id=cid,
            image=template.image,
            runtime=runtime,
            snapshotter=template.snapshotter,
            snapshot_key=cid,
        )
        container.spec.type_url = _SPEC_TYPE
        container.spec.value = json.dumps(spec).encode()
        stdout, stderr, out_fd, err_fd = self._fifos(cid)
        outcome = RunOutcome(cid, -1, b"", b"")
        steps: list[str] = []
        t0 = time.perf_counter()
        try:
            # the container first: its record references the snapshot key, so a garbage
            # collection between the two calls cannot take the fresh snapshot
            self.call("CreateContainer", pb.CreateContainerRequest(container=container))
            steps.append("container")
            request = pb.PrepareSnapshotRequest(
                snapshotter=template.snapshotter, key=cid, parent=template.parent
            )
            mounts = self.call("Prepare", request).mounts
            steps.append("snapshot")
            request = pb.CreateTaskRequest(
                container_id=cid, rootfs=list(mounts), stdout=stdout, stderr=stderr
            )
            outcome.pid = self.call("CreateTask", request).pid
            steps.append("task")
            t1 = time.perf_counter()
            self.call("Start", pb.StartRequest(container_id=cid))
            t2 = time.perf_counter()
            outcome.exit_status = self.call("Wait", pb.WaitRequest(container_id=cid)).exit_status
            steps.append("exited")
            t3 = time.perf_counter()
            outcome.timings.update(create=t1 - t0, start=t2 - t1, wait=t3 - t2)
        finally:
            try:
                self._cleanup(cid, template.snapshotter, steps)
                outcome.timings["total"] = time.perf_counter() - t0
            finally:
                # the shim has closed its ends at the task's Delete: all that was written is
                # in the pipes
                outcome.stdout, outcome.stderr = self._drain(out_fd), self._drain(err_fd)
                for fd in (out_fd, err_fd):
                    os.close(fd)
                for path in (stdout, stderr):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        return outcome

    def _cleanup(self, cid: str, snapshotter: str, steps: list[str]) -> None:
        import grpc

        pb = self.pb
        if "task" in steps:
            if "exited" not in steps:
                with contextlib.suppress(grpc.RpcError):
                    self.call("Kill", pb.KillRequest(container_id=cid, signal=9, all=True))
                with contextlib.suppress(grpc.RpcError):
                    self.call("Wait", pb.WaitRequest(container_id=cid), timeout=30)
            self.call("DeleteTask", pb.DeleteTaskRequest(container_id=cid))
        # the snapshot before the container: once the container is gone, nothing holds the
        # snapshot, and the garbage collection the deletion triggers may take it first
        if "snapshot" in steps:
            self.call("RemoveSnapshot", pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=cid))
        if "container" in steps:
            self.call("DeleteContainer", pb.DeleteContainerRequest(id=cid))

    def run_many(
        self,
        template: ContainerTemplate,
        ids: Iterable[str],
        *,
        concurrency: int = 4,
        annotations: Mapping[str, str] | None = None,
    ) -> list[RunOutcome]:
        """`run` each id, ``concurrency`` containers at a time."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(lambda cid: self.run(template, cid, annotations=annotations), ids))

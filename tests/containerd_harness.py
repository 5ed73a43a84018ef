"""A private containerd for the end-to-end tests and the runtime benchmark.

Everything lives under one temporary directory: config, root, state, the gRPC/ttrpc sockets,
the ``opt`` plugin path, the runc state root handed to the shim (``--runc-root``), and the
precompile cache of ``wasidispatch-runc``. Containers get cgroups under one unique top-level
path. `PrivateContainerd.stop` stops the daemon, unmounts what is still mounted below the
directory and removes it; `leftovers` lists what would have been left behind.

Images are built here, not pulled: a busybox image from Debian's ``busybox-static`` binary and
a Wasm image whose rootfs holds ``.wasm`` files (an ordinary OCI image: containerd unpacks it,
and the dispatch rule sends it to Wasm by the entrypoint's bytes). Both are written with
`wasidispatch.oci.layout.ImageLayout` and imported with ``ctr images import``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "RUNC_CMD",
    "PrivateContainerd",
    "busybox_layout",
    "missing_requirements",
    "wasm_layout",
]

RUNC_CMD = Path(sys.executable).with_name("wasidispatch-runc")
_BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2", "runc", "busybox")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64", "ppc64le": "ppc64le"}


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


class PrivateContainerd:
    """containerd with every path under ``base`` (see the module docstring)."""

    def __init__(self, base: Path | None = None) -> None:
        self.base = Path(base or tempfile.mkdtemp(prefix="wasidispatch-e2e-"))
        self.sock = self.base / "containerd.sock"
        self.runc_root = self.base / "runc-root"
        self.cache = self.base / "cache"
        self.cgroup_parent = f"/wasidispatch-e2e-{uuid.uuid4().hex[:10]}"
        self.proc: subprocess.Popen[bytes] | None = None

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
                '  level = "warn"',
                "[plugins]",
                '  [plugins."io.containerd.internal.v1.opt"]',
                f'    path = "{b}/opt"',
                '  [plugins."io.containerd.grpc.v1.cri"]',
                "    restrict_oom_score_adj = true",
                "",
            ]
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemon and wait until it answers on its socket."""
        (self.base / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(self._config())
        env = {
            "PATH": f"{RUNC_CMD.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/bin",
            "HOME": str(self.base),
            "WASIDISPATCH_CACHE_DIR": str(self.cache),
        }
        with (self.base / "containerd.log").open("wb") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
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

    def log(self) -> str:
        """The daemon's own log (for failure messages)."""
        path = self.base / "containerd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def ctr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCK ARGS`` with output captured."""
        return subprocess.run(
            ["ctr", "-a", str(self.sock), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def run_argv(self, image: str, cid: str, *args: str, runtime: str | None = None) -> list[str]:
        """``ctr run --rm`` with the runtime binary, our runc root and a private cgroup."""
        argv = ["ctr", "-a", str(self.sock), "run", "--rm"]
        if runtime is not None:
            argv += ["--runc-binary", runtime]
        argv += ["--runc-root", str(self.runc_root), "--cgroup", f"{self.cgroup_parent}/{cid}"]
        return [*argv, image, cid, *args]

    def run(
        self, image: str, cid: str, *args: str, runtime: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a container to completion; its exit code is ctr's."""
        return subprocess.run(
            self.run_argv(image, cid, *args, runtime=runtime),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def import_layout(self, layout: Path, name: str) -> str:
        """Import an image layout (tagged ``test``) as ``name:test``; returns the reference."""
        archive = _tar_layout(layout, self.base / f"{layout.name}.tar")
        out = self.ctr("images", "import", "--base-name", name, str(archive))
        if out.returncode != 0:
            raise RuntimeError(f"ctr images import failed: {out.stderr}")
        return f"{name}:test"

    def cgroups(self) -> list[Path]:
        """Cgroup directories under our parent path, in every hierarchy."""
        found: list[Path] = []
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            parent = hierarchy / self.cgroup_parent.lstrip("/")
            if parent.is_dir():
                found += [p for p in parent.iterdir() if p.is_dir()]
        return found

    def processes(self) -> list[str]:
        """Command lines of processes (other than containerd itself) naming ``base``."""
        found: list[str] = []
        me = self.proc.pid if self.proc is not None else -1
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (me, os.getpid()):
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if str(self.base) in cmdline:
                    found.append(f"{entry.name}: {cmdline}")
        return found

    def leftovers(self) -> dict[str, list[str]]:
        """What containers left: runtime state dirs, cgroups, processes."""
        states = (
            sorted(str(p) for p in self.runc_root.glob("*/*")) if self.runc_root.exists() else []
        )
        return {
            "state": states,
            "cgroups": sorted(str(p) for p in self.cgroups()),
            "processes": self.processes(),
        }

    def _mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as fh:
            points = [line.split()[4] for line in fh]
        return sorted((p for p in points if p.startswith(str(self.base))), reverse=True)

    def stop(self) -> None:
        """Stop the daemon, unmount, remove our cgroup parent and the whole directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for point in self._mounts():
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            parent = hierarchy / self.cgroup_parent.lstrip("/")
            if parent.is_dir():
                with contextlib.suppress(OSError):
                    parent.rmdir()
        shutil.rmtree(self.base, ignore_errors=True)

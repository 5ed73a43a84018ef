"""Write small OCI runtime bundles (config.json + rootfs) for the demo, tests and benchmarks.

Private: the public way to read a bundle is `wasidispatch.oci.bundle.Bundle`. The config.json
written here follows what ``runc spec`` produces (namespaces, masked paths, a read-only root),
so the same bundle runs unchanged in runc and in the Wasm executor.

Every file is written through :func:`wasidispatch._fs.write_atomic`: a symlink or a file
planted at a final or temporary name is replaced, never followed, and a symlinked directory on
the way into the bundle (``rootfs``, ``rootfs/bin``, ...) is refused with ``SpecError``, so
writing a bundle never writes outside it.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wasidispatch import _fs, _resolve
from wasidispatch.errors import SpecError

BUSYBOX = Path("/bin/busybox")
DEFAULT_PATH = f"PATH={_resolve.DEFAULT_PATH}"
_BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "sleep", "true", "false", "env", "id")


def config(
    args: Sequence[str],
    *,
    env: Sequence[str] = (DEFAULT_PATH,),
    cwd: str = "/",
    readonly: bool = True,
    annotations: Mapping[str, str] | None = None,
    mounts: Sequence[Mapping[str, Any]] = (),
    memory_limit: int | None = None,
) -> dict[str, Any]:
    """A runc-style config.json document for ``args``."""
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_limit is not None:
        resources["memory"] = {"limit": memory_limit}
    doc: dict[str, Any] = {
        "ociVersion": "1.2.0",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": list(env),
            "cwd": cwd,
            "capabilities": {
                key: ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
                for key in ("bounding", "effective", "permitted")
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": "wasidispatch",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            *[dict(m) for m in mounts],
        ],
        "linux": {
            "resources": resources,
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"],
        },
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return doc


def _real_dirs(base: Path, rel: Path) -> Path:
    """``base/rel`` as directories made one component at a time; a component that is a
    symlink (or not a directory) is refused, so nothing is created outside ``base``."""
    current = base
    for part in rel.parts:
        if part in ("", ".", ".."):
            raise SpecError(f"{base / rel}: not a plain path inside the bundle")
        current = current / part
        try:
            current.mkdir(exist_ok=True)
            mode = os.lstat(current).st_mode
        except OSError as exc:
            raise SpecError(f"{current}: cannot create directory: {exc.strerror}") from exc
        if not stat.S_ISDIR(mode):
            raise SpecError(f"{current}: not a directory (a symlink or a file is in the way)")
    return current


def write_bundle(
    directory: str | os.PathLike[str],
    files: Mapping[str, bytes | Path],
    args: Sequence[str],
    *,
    executable: Sequence[str] = (),
    symlinks: Mapping[str, str] | None = None,
    **config_options: Any,
) -> Path:
    """Create ``directory`` with ``rootfs/`` holding ``files`` (rootfs-relative path -> bytes or
    a host file to copy) and a config.json for ``args``. Paths in ``executable`` get mode 0755.
    """
    bundle = Path(directory)
    bundle.mkdir(parents=True, exist_ok=True)
    rootfs = _real_dirs(bundle, Path("rootfs"))
    for rel, content in files.items():
        # ".." is taken as the container takes it (it stops at "/"): never above the rootfs.
        target_rel = Path(posixpath.normpath("/" + rel).lstrip("/"))
        parent = _real_dirs(rootfs, target_rel.parent)
        data = content.read_bytes() if isinstance(content, Path) else content
        mode = 0o755 if rel in executable else 0o644
        _fs.write_atomic(parent / target_rel.name, data, mode=mode)
    for rel, dest in (symlinks or {}).items():
        link_rel = Path(posixpath.normpath("/" + rel).lstrip("/"))
        link = _real_dirs(rootfs, link_rel.parent) / link_rel.name
        if os.path.lexists(link):
            link.unlink()
        link.symlink_to(dest)  # symlink(2) never follows what it creates
    doc = config(args, **config_options)
    _fs.write_atomic(bundle / "config.json", (json.dumps(doc, indent=2) + "\n").encode())
    return bundle


def busybox_bundle(
    directory: str | os.PathLike[str], args: Sequence[str], **config_options: Any
) -> Path:
    """A Linux bundle whose rootfs is Debian's static busybox with a few applet links."""
    return write_bundle(
        directory,
        {"/bin/busybox": BUSYBOX},
        args,
        executable=("/bin/busybox",),
        symlinks={f"/bin/{applet}": "busybox" for applet in _BUSYBOX_APPLETS},
        **config_options,
    )


def wasm_bundle(
    directory: str | os.PathLike[str],
    wasm: bytes | Path,
    args: Sequence[str] = ("/app.wasm",),
    *,
    extra_files: Mapping[str, bytes | Path] | None = None,
    **config_options: Any,
) -> Path:
    """A Wasm bundle: ``wasm`` at ``args[0]`` (before any ``#func``) inside the rootfs."""
    path = args[0].partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    return write_bundle(directory, {path: wasm, **(extra_files or {})}, args, **config_options)

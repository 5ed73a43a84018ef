"""Write small OCI runtime bundles (config.json + rootfs) for the demo, tests and benchmarks.

Private: the public way to read a bundle is `wasidispatch.oci.bundle.Bundle`. The config.json
written here follows what ``runc spec`` produces (namespaces, masked paths, a read-only root),
so the same bundle runs unchanged in runc and in the Wasm executor.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wasidispatch import _resolve

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
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = rootfs / rel.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
        target.chmod(0o755 if rel in executable else 0o644)
    for rel, dest in (symlinks or {}).items():
        link = rootfs / rel.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(dest)
    doc = config(args, **config_options)
    (bundle / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
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

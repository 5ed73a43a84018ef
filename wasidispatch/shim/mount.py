"""The rootfs mounts of a Create (containerd's ``types.Mount``) on ``bundle/rootfs``.

containerd's snapshotter hands the shim the container's root as mounts to make, usually one
overlay (``lowerdir=...,upperdir=...,workdir=...``) or a bind. `mount_rootfs` makes them all
or none (a failure unmounts what was mounted); `unmount_rootfs` unmounts everything at or
below the target, deepest first, falling back to a lazy detach for a busy mount. mount(2) and
umount2(2) through ctypes: no ``mount`` binary, no subprocess in the shim.

Example (root)::

    mount_rootfs([Mount("overlay", "overlay", options=("lowerdir=/l", ...))], "/b/rootfs")
    unmount_rootfs("/b/rootfs")
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from wasidispatch.errors import ShimError
from wasidispatch.shim.instance import Mount

__all__ = ["mount_rootfs", "mounts_below", "unmount_rootfs"]

_MS = {
    "ro": 1,
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "sync": 16,
    "remount": 32,
    "mand": 64,
    "dirsync": 128,
    "noatime": 1024,
    "nodiratime": 2048,
    "bind": 4096,
    "rbind": 4096 | 16384,
    "relatime": 1 << 21,
    "strictatime": 1 << 24,
}
_CLEAR = {"rw": 1, "suid": 2, "dev": 4, "exec": 8, "async": 16, "atime": 1024}
_MS_REMOUNT = 32
_MS_BIND = 4096
_MNT_DETACH = 2
_PAGE = os.sysconf("SC_PAGE_SIZE")

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


def _split(options: Sequence[str]) -> tuple[int, str]:
    flags = 0
    data: list[str] = []
    for option in options:
        if option in _MS:
            flags |= _MS[option]
        elif option in _CLEAR:
            flags &= ~_CLEAR[option]
        else:
            data.append(option)
    return flags, ",".join(data)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if len(data) >= _PAGE:
        raise ShimError(
            f"mount {target}: options are {len(data)} bytes, over the kernel's {_PAGE}-byte "
            "page (too many overlay layers for one mount call)"
        )
    result = _lib().mount(
        source.encode(), target.encode(), fstype.encode() or None, flags, data.encode() or None
    )
    if result != 0:
        errno = ctypes.get_errno()
        raise ShimError(f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(errno)}")


def mount_rootfs(mounts: Sequence[Mount], target: str) -> None:
    """Mount every one of ``mounts`` on ``target`` in order; on a failure unmount those made
    and raise `ShimError` naming the mount and the kernel's reason."""
    made = 0
    try:
        for m in mounts:
            flags, data = _split(m.options)
            fstype = "" if m.type == "bind" or flags & _MS_BIND else m.type
            where = os.path.join(target, m.target.lstrip("/")) if m.target else target
            _mount(m.source, where, fstype, flags & ~1 if flags & _MS_BIND else flags, data)
            made += 1
            if flags & _MS_BIND and flags & 1:  # a read-only bind needs a remount
                _mount("", where, "", _MS_REMOUNT | _MS_BIND | 1, "")
    except BaseException:
        if made:
            unmount_rootfs(target)
        raise


def mounts_below(target: str) -> list[str]:
    """Mount points at or below ``target`` (from /proc/self/mountinfo), deepest first."""
    prefix = os.path.normpath(target)
    found: list[str] = []
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split(b" ")
            if len(fields) < 5:
                continue
            point = fields[4].decode(errors="surrogateescape")
            for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(code, char)
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


def unmount_rootfs(target: str) -> None:
    """Unmount everything at or below ``target`` (a busy mount is detached lazily); no-op
    when nothing is mounted there. Raises `ShimError` when a mount cannot go at all."""
    for _ in range(64):  # stacked mounts on one point come off one by one
        points = mounts_below(target)
        if not points:
            return
        for point in points:
            if _lib().umount2(point.encode(), 0) != 0:
                errno = ctypes.get_errno()
                if _lib().umount2(point.encode(), _MNT_DETACH) != 0:
                    errno = ctypes.get_errno()
                    if errno not in (22,):  # EINVAL: not a mount point (any more)
                        raise ShimError(f"unmount {point}: {os.strerror(errno)}")
    raise ShimError(f"unmount {target}: mounts keep reappearing")

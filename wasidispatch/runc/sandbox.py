"""The container sandbox of a Wasm container process, set up as runc sets up a Linux one.

A Wasm guest reaches the host only through its engine's WASI preopens; the sandbox is the
second wall, for an engine escape. The process that runs the guest calls `enter` once the
engine is loaded and the module prepared (precompiled), and the `Finish` it returns just
before the guest starts. Between them nothing of the host is left to it but its stdio and
control socket:

- namespaces (`enter`): the spec's ``linux.namespaces`` with a ``path`` are joined (the pod's
  network, IPC and UTS namespaces, opened before anything changes), those without are new;
  a mount namespace is always new. The pid namespace is made by the caller, which forks
  (``unshare(CLONE_NEWPID)`` affects children only; see `pid_namespace`). User namespaces
  are refused (``ExecutorError``): no id mapping is done here.
- the file system (`enter`): the host's mounts turn slaves (nothing propagates back), the
  rootfs is bind-mounted on itself, every ``mounts`` entry is mounted under it at a
  destination resolved inside the rootfs (a symlink planted in the image never leads out):
  binds with their flags (``ro``, ``nosuid``...) and propagation, ``proc``, ``sysfs``,
  ``tmpfs``, ``devpts``, ``mqueue`` as themselves (``cgroup`` mounts are skipped: WASI has
  no use for them); the default device nodes (``/dev/null``, ``zero``, ``full``, ``random``,
  ``urandom``, ``tty``) and ``linux.devices`` are made; ``maskedPaths`` are covered and
  ``readonlyPaths`` made read-only; then ``pivot_root`` and the old root is detached;
  ``root.readonly`` makes ``/`` read-only. ``hostname``/``domainname`` are set in a new UTS
  namespace, ``linux.sysctl`` written.
- the process (`Finish`): ``oomScoreAdj``, ``rlimits``, ``noNewPrivileges``, the bounding
  set, user and groups (``process.user``), the capability sets (empty when the spec gives
  none: a Wasm guest needs none), the ambient set, and the ``linux.seccomp`` profile (after
  ``no_new_privs``, last; before the capabilities are dropped when ``no_new_privs`` is off,
  as runc does, since loading then needs ``CAP_SYS_ADMIN``).

`rewrite` maps the prepared workload into the new root: the rootfs preopen becomes ``/``,
each bind preopen its destination, a module path its path under the rootfs. Every failure is
an `ExecutorError` (or `SpecError` for a spec that cannot be honoured) naming the step; the
mount namespace dies with the process, so a failure leaves no mount behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno as _errno
import os
import resource
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wasidispatch.errors import ExecutorError, SpecError
from wasidispatch.runc.wasm_container import _rlim

if TYPE_CHECKING:
    from wasidispatch.engines import Workload
    from wasidispatch.runc.spec import LeanBundle

__all__ = ["CAPABILITIES", "Finish", "enter", "pid_namespace", "rewrite", "with_root"]

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

_NAMESPACES = {
    "mount": CLONE_NEWNS,
    "network": CLONE_NEWNET,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
    "pid": CLONE_NEWPID,
    "user": CLONE_NEWUSER,
    "time": CLONE_NEWTIME,
}

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2

# option -> (clear, flag): runc's table of mount(8) flag options
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "lazytime": (False, MS_LAZYTIME),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nolazytime": (True, MS_LAZYTIME),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "nosymfollow": (False, MS_NOSYMFOLLOW),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}
# options that are neither flags nor data for mount(2): recursive attributes (mount_setattr),
# runc's own extensions; ignored as an older runc ignores them
_IGNORED = frozenset({"rro", "rrw", "rnosuid", "rsuid", "rnodev", "rdev", "rnoexec", "rexec",
                      "tmpcopyup", "rnoatime", "ratime", "rnodiratime", "rdiratime",
                      "rrelatime", "rnorelatime", "rstrictatime", "rnostrictatime"})  # fmt: skip
_KERNEL_FS = frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue", "ramfs", "securityfs"})

#: Capability names in kernel order (their number is the index), up to Linux 5.9's 40.
CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip
_CAP_NUMBER = {name: i for i, name in enumerate(CAPABILITIES)}

# (name, major, minor): the devices runc gives every container
_DEFAULT_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
_DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_V3 = 0x20080522
_MAX_LINKS = 255

_LIBC: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.unshare.argtypes = [ctypes.c_int]
        libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.pivot_root.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                               ctypes.c_ulong]  # fmt: skip
        libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        _LIBC.append(libc)
    return _LIBC[0]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise ExecutorError(f"sandbox: {what}: {os.strerror(code)} (errno {code})")


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None,
           what: str) -> None:  # fmt: skip
    _check(_libc().mount(_b(source), _b(target), _b(fstype), flags, _b(data)), what)


# ------------------------------------------------------------------------------ spec reads


def _doc(node: object) -> Mapping[str, Any]:
    doc = getattr(node, "_doc", None)
    return doc if isinstance(doc, Mapping) else {}


def _list(doc: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{where}.{key}: not a list")
    return value


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: not an object")
    return value


def _text(doc: Mapping[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or "\0" in value:
        raise SpecError(f"{where}.{key}: not a string")
    return value


def _names(doc: Mapping[str, Any], key: str, where: str) -> list[str]:
    values = _list(doc, key, where)
    if not all(isinstance(v, str) for v in values):
        raise SpecError(f"{where}.{key}: not a list of strings")
    return values


@dataclasses.dataclass(frozen=True)
class _Namespace:
    kind: str
    flag: int
    path: str | None


def namespaces(spec_doc: Mapping[str, Any]) -> list[_Namespace]:
    """``linux.namespaces`` checked: known types, no duplicates, string paths."""
    linux = _obj(spec_doc.get("linux") or {}, "linux")
    seen: set[str] = set()
    out: list[_Namespace] = []
    for i, item in enumerate(_list(linux, "namespaces", "linux")):
        where = f"linux.namespaces[{i}]"
        entry = _obj(item, where)
        kind = _text(entry, "type", where)
        if kind not in _NAMESPACES:
            raise SpecError(f"{where}.type: unknown namespace type {kind!r}")
        if kind in seen:
            raise SpecError(f"{where}: a second {kind} namespace")
        seen.add(kind)
        out.append(_Namespace(kind, _NAMESPACES[kind], _text(entry, "path", where) or None))
    return out


def pid_namespace(spec_doc: Mapping[str, Any]) -> bool:
    """Whether the container process needs a new pid namespace (made by its parent, which
    forks it). The spec's pid namespace with a ``path`` (a pod's shared one) also gets a new
    one: a process joining it from here would be re-parented to that namespace's init
    (the pause process), out of the shim's reach (docs/kubernetes.md)."""
    return any(ns.kind == "pid" for ns in namespaces(spec_doc))


# ------------------------------------------------------------------------------ paths


def resolve_in(root: str, path: str) -> str:
    """``path`` (absolute, in the container) as a host path under ``root``, with every
    symlink resolved inside ``root`` (``..`` stops at it), as runc's securejoin. Missing
    components are kept as they are (they are created later, as directories)."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            done.append(part)
            continue
        except OSError as exc:
            raise ExecutorError(f"sandbox: {path}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise ExecutorError(f"sandbox: {path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def _make_dirs(root: str, host: str) -> None:
    """Create the missing directories of ``host`` (under ``root``), never through a symlink
    (`resolve_in` already resolved them; one planted since is refused by ``O_NOFOLLOW``)."""
    rel = os.path.relpath(host, root)
    if rel == ".":
        return
    try:
        if stat.S_ISDIR(os.lstat(host).st_mode):  # there already (`resolve_in` saw no link)
            return
    except OSError:
        pass
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel.split("/"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)  # fmt: skip
            os.close(fd)
            fd = nxt
    except OSError as exc:
        raise ExecutorError(f"sandbox: cannot create {host}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _make_target(root: str, host: str, *, directory: bool) -> None:
    if directory:
        _make_dirs(root, host)
        return
    try:
        if stat.S_ISREG(os.lstat(host).st_mode):
            return
    except OSError:
        pass
    _make_dirs(root, os.path.dirname(host))
    try:
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        os.close(fd)
    except IsADirectoryError:
        pass
    except OSError as exc:
        raise ExecutorError(f"sandbox: cannot create {host}: {exc.strerror}") from None


def _options(options: Sequence[str]) -> tuple[int, list[int], str | None]:
    flags = 0
    propagation: list[int] = []
    data: list[str] = []
    for option in options:
        if option in _FLAGS:
            clear, flag = _FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION:
            propagation.append(_PROPAGATION[option])
        elif option in _IGNORED:
            continue
        elif option == "idmap" or option == "ridmap":
            raise SpecError("mounts: idmapped mounts are not supported for Wasm containers")
        else:
            data.append(option)
    return flags, propagation, ",".join(data) or None


# ------------------------------------------------------------------------------ enter


def enter(bundle: LeanBundle) -> Finish:
    """Namespaces and the container's file system as its root (see the module docstring);
    returns the `Finish` to call just before the guest starts. Run by the container process
    itself, single-threaded, as root. Everything the process settings need is read and
    checked first (the seccomp profile compiled, the capability sets): after the pivot the
    host's files, Python's own modules included, are out of reach."""
    threads = _threads()
    if threads != 1:
        raise ExecutorError(
            f"sandbox: the container process has {threads} threads ({_thread_names()}: an"
            " engine started them): a thread would stay outside the sandbox"
        )
    doc = _doc(bundle.spec)
    finish = Finish(doc)
    spaces = namespaces(doc)
    if any(ns.kind == "user" for ns in spaces):
        raise ExecutorError("sandbox: user namespaces are not supported for Wasm containers")
    if any(ns.kind == "time" for ns in spaces):  # unshare would move only its children
        raise ExecutorError("sandbox: time namespaces are not supported for Wasm containers")
    mount_ns = next((ns for ns in spaces if ns.kind == "mount"), None)
    if mount_ns is not None and mount_ns.path:
        raise ExecutorError("sandbox: joining an existing mount namespace is not supported")
    libc = _libc()
    opened: list[tuple[_Namespace, int]] = []
    try:
        for ns in spaces:  # every path opened first: they are the host's paths
            if ns.path and ns.kind not in ("pid", "mount"):
                try:
                    opened.append((ns, os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)))
                except OSError as exc:
                    raise ExecutorError(
                        f"sandbox: {ns.kind} namespace {ns.path}: {exc.strerror}"
                    ) from None
        for ns, fd in opened:
            _check(libc.setns(fd, ns.flag), f"joining the {ns.kind} namespace {ns.path}")
    finally:
        for _, fd in opened:
            os.close(fd)
    new = CLONE_NEWNS
    for ns in spaces:
        if not ns.path and ns.kind not in ("pid", "mount", "user"):
            new |= ns.flag
    _check(libc.unshare(new), "unshare")
    hostname = _text(doc, "hostname", "spec")
    domainname = _text(doc, "domainname", "spec")
    if (hostname or domainname) and not any(ns.kind == "uts" for ns in spaces):
        raise SpecError("hostname: cannot be set without a private UTS namespace")
    if hostname:
        data = os.fsencode(hostname)
        _check(libc.sethostname(data, len(data)), "sethostname")
    if domainname:
        data = os.fsencode(domainname)
        _check(libc.setdomainname(data, len(data)), "setdomainname")
    oom = _obj(doc.get("process") or {}, "process").get("oomScoreAdj")
    if oom is not None:  # through the host's /proc: the container may mount none
        try:
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write(str(oom))
        except OSError as exc:
            raise ExecutorError(f"sandbox: oom_score_adj: {exc.strerror}") from None
    finish.root = _filesystem(bundle, doc, {ns.kind for ns in spaces})
    return finish


def _thread_names() -> str:
    names = []
    with contextlib.suppress(OSError):
        for tid in sorted(os.listdir("/proc/self/task"), key=int)[1:]:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(fh.read().strip())
    return ", ".join(names)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _filesystem(bundle: LeanBundle, doc: Mapping[str, Any], spaces: set[str]) -> str:
    """The mounts and the pivot; returns the path the engine preopens as the guest's ``/``:
    a clone of the rootfs's own mount without the mounts on it (``open_tree``), so that the
    guest's ``/`` holds no procfs, sysfs or device nodes (``/proc/1/mem`` would let a guest
    write its engine's memory); ``/`` itself when the kernel cannot clone one or the
    container has no ``/proc`` to name the clone through."""
    linux = _obj(doc.get("linux") or {}, "linux")
    rootfs = os.path.realpath(bundle.rootfs)
    propagation = _text(linux, "rootfsPropagation", "linux")
    root_flag = _PROPAGATION.get(propagation or "rslave")
    if root_flag is None:
        raise SpecError(f"linux.rootfsPropagation: unknown propagation {propagation!r}")
    _mount(None, "/", None, MS_SLAVE | MS_REC if root_flag & MS_SHARED else root_flag | MS_REC,
           None, "making the host's mounts slaves")  # fmt: skip
    _mount(rootfs, rootfs, None, MS_BIND | MS_REC, None, "binding the rootfs")
    root = _obj(doc.get("root") or {}, "root")
    clone = _clone_tree(rootfs, readonly=root.get("readonly") is True)
    dev_is_tmpfs = False
    for i, item in enumerate(_list(doc, "mounts", "spec")):
        where = f"mounts[{i}]"
        entry = _obj(item, where)
        destination = _text(entry, "destination", where)
        if not destination or not destination.startswith("/"):
            raise SpecError(f"{where}.destination: not an absolute path")
        kind = _text(entry, "type", where)
        source = _text(entry, "source", where)
        flags, propagations, data = _options(_names(entry, "options", where))
        target = resolve_in(rootfs, destination)
        if flags & MS_BIND or kind == "bind":
            _bind(bundle, source, target, rootfs, destination, flags, propagations, where)
            continue
        if kind == "cgroup" or kind == "cgroup2":
            continue  # WASI has no use for it; runc's cgroup mounts are not reproduced
        if kind is None:
            raise SpecError(f"{where}.type: required for a mount that is not a bind")
        _make_target(rootfs, target, directory=True)
        with _opened_in(rootfs, destination, target) as at:
            _mount(source or kind, at, kind, flags, data, f"mounting {kind} on {destination}")
        if os.path.normpath(destination) == "/dev" and kind == "tmpfs":
            dev_is_tmpfs = True
        for flag in propagations:
            _mount(None, target, None, flag, None, f"propagation of {destination}")
    _devices(rootfs, linux, made_dev=dev_is_tmpfs)
    masked = _names(linux, "maskedPaths", "linux")
    readonly = _names(linux, "readonlyPaths", "linux")
    sysctls = _obj(linux.get("sysctl") or {}, "linux.sysctl")
    for key, value in sysctls.items():
        _check_sysctl(str(key), value, spaces)
    _pivot(rootfs)
    if propagation is not None:
        _mount(None, "/", None, root_flag, None, "the rootfs propagation")
    # in runc's order: sysctls before /proc/sys turns read-only, the root last
    for key, value in sysctls.items():
        _sysctl(str(key), value)
    for path in readonly:
        _readonly("/", path)
    for path in masked:
        _mask("/", path)
    if root.get("readonly") is True:
        _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY, None, "read-only root")
    if clone is not None and os.path.isdir(f"/proc/self/fd/{clone}"):
        return f"/proc/self/fd/{clone}"
    if clone is not None:
        os.close(clone)
    return "/"


_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_NR_OPEN_TREE = 428  # one number on every architecture (syscalls from Linux 5.1 on)
_NR_MOUNT_SETATTR = 442
_MOUNT_ATTR_RDONLY = 1


def _clone_tree(rootfs: str, *, readonly: bool) -> int | None:
    """A detached clone of the rootfs's mount alone (no submounts), as an fd; ``None`` on a
    kernel without ``open_tree`` (before 5.2)."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(
        ctypes.c_long(_NR_OPEN_TREE),
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(rootfs),
        ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC),
    )
    if fd < 0:
        code = ctypes.get_errno()
        if code in (_errno.ENOSYS, _errno.EPERM):
            return None
        raise ExecutorError(f"sandbox: cloning the rootfs: {os.strerror(code)}")
    if readonly:
        attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        rc = libc.syscall(
            ctypes.c_long(_NR_MOUNT_SETATTR),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(_AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if rc != 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise ExecutorError(f"sandbox: a read-only rootfs clone: {os.strerror(code)}")
    return int(fd)


# sysctls runc lets a container set: those of a kernel namespace it has (runc's validator)
_IPC_SYSCTLS = frozenset(
    {"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
     "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"}
)  # fmt: skip


def _check_sysctl(key: str, value: object, spaces: set[str]) -> None:
    if not isinstance(value, str):
        raise SpecError(f"linux.sysctl.{key}: not a string")
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        if "ipc" in spaces:
            return
        raise SpecError(f"linux.sysctl.{key}: needs an IPC namespace of the container's")
    if key.startswith("net."):
        if "network" in spaces:
            return
        raise SpecError(f"linux.sysctl.{key}: needs a network namespace of the container's")
    if key == "kernel.domainname" and "uts" in spaces:
        return
    if key == "kernel.hostname":
        raise SpecError("linux.sysctl.kernel.hostname: set the spec's hostname instead")
    raise SpecError(f"linux.sysctl.{key}: not in a kernel namespace of the container's")


def _bind(bundle: LeanBundle, source: str | None, target: str, rootfs: str, destination: str,
          flags: int, propagations: list[int], where: str) -> None:  # fmt: skip
    """A bind mount, attached with its flags and propagation already set (``open_tree``,
    ``mount_setattr``, ``move_mount``) onto a target opened inside the rootfs: no window in
    which it is writable, and no path to swap between a mount and its remount (a sidecar
    sharing a volume could). Older kernels: bind, then remount, by path."""
    if not source:
        raise SpecError(f"{where}.source: required for a bind mount")
    host = source if source.startswith("/") else os.path.join(bundle.path, source)
    try:
        is_dir = stat.S_ISDIR(os.stat(host).st_mode)
    except OSError as exc:
        raise ExecutorError(f"sandbox: bind source {host}: {exc.strerror}") from None
    _make_target(rootfs, target, directory=is_dir)
    recursive = bool(flags & MS_REC)
    extra = flags & ~(MS_BIND | MS_REC | MS_REMOUNT)
    with _opened_in(rootfs, destination, target) as at:
        tree = _syscall(
            _NR_OPEN_TREE,
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(host),
            ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | (_AT_RECURSIVE if recursive else 0)),
        )
        if tree >= 0:
            try:
                attrs = sum(bit for flag, bit in _MOUNT_ATTRS if extra & flag)
                for propagation in propagations or [0]:
                    _setattr(tree, attrs, propagation & ~MS_REC, recursive, host)
                    attrs = 0
                # onto the opened target itself: move_mount follows no symlink, magic or not
                into, path = (int(at[14:]), b"") if at.startswith("/proc/self/fd/") else (
                    _AT_FDCWD, os.fsencode(at))  # fmt: skip
                empty = _MOVE_MOUNT_T_EMPTY_PATH if into != _AT_FDCWD else 0
                _check(
                    _syscall(
                        _NR_MOVE_MOUNT,
                        ctypes.c_int(tree),
                        b"",
                        ctypes.c_int(into),
                        path,
                        ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | empty),
                    ),
                    f"binding {host}",
                )
            finally:
                os.close(tree)
            return
        _mount(host, at, None, MS_BIND | (flags & MS_REC), None, f"binding {host}")
    if extra:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | extra, None, f"remounting {target}")
    for flag in propagations:
        _mount(None, target, None, flag, None, f"propagation of {destination}")


_NR_MOVE_MOUNT = 429
_NR_OPENAT2 = 437
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
# mount(2) flag -> mount_setattr's MOUNT_ATTR_*
_MOUNT_ATTRS = (
    (MS_RDONLY, 0x1),
    (MS_NOSUID, 0x2),
    (MS_NODEV, 0x4),
    (MS_NOEXEC, 0x8),
    (MS_NOATIME, 0x10),
    (MS_NODIRATIME, 0x80),
    (MS_NOSYMFOLLOW, 0x200000),
)


def _syscall(number: int, *args: object) -> int:
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    return int(libc.syscall(ctypes.c_long(number), *args))


def _setattr(tree: int, attrs: int, propagation: int, recursive: bool, what: str) -> None:
    if not attrs and not propagation:
        return
    attr = (ctypes.c_uint64 * 4)(attrs, 0, propagation, 0)
    flags = _AT_EMPTY_PATH | (_AT_RECURSIVE if recursive else 0)
    rc = _syscall(
        _NR_MOUNT_SETATTR, ctypes.c_int(tree), b"", ctypes.c_uint(flags), ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )  # fmt: skip
    if rc != 0:
        code = ctypes.get_errno()
        raise ExecutorError(f"sandbox: the flags of {what}: {os.strerror(code)}")


@contextlib.contextmanager
def _opened_in(rootfs: str, destination: str, target: str) -> Iterator[str]:
    """``/proc/self/fd/N`` of ``destination`` opened inside ``rootfs`` by the kernel
    (``openat2`` with ``RESOLVE_IN_ROOT``: whatever was swapped since `resolve_in`, the
    mount lands inside the rootfs); ``target`` itself on a kernel without ``openat2``."""
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = (ctypes.c_uint64 * 3)(os.O_PATH | os.O_CLOEXEC, 0,
                                    _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)  # fmt: skip
        fd = _syscall(
            _NR_OPENAT2, ctypes.c_int(root), os.fsencode(destination.lstrip("/") or "."),
            ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
        )  # fmt: skip
    finally:
        os.close(root)
    if fd < 0:
        code = ctypes.get_errno()
        if code == _errno.ENOSYS:
            yield target
            return
        raise ExecutorError(f"sandbox: opening {destination} in the rootfs: {os.strerror(code)}")
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _devices(rootfs: str, linux: Mapping[str, Any], *, made_dev: bool) -> None:
    dev = os.path.join(rootfs, "dev")
    if not os.path.isdir(dev) or os.path.islink(dev):
        return
    old = os.umask(0)
    try:
        for name, major, minor in _DEFAULT_DEVICES:
            path = os.path.join(dev, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(major, minor):
                    continue  # the device already (a bind of the host's /dev keeps its own)
            _device(path, stat.S_IFCHR | 0o666, major, minor, 0, 0)
        for i, item in enumerate(_list(linux, "devices", "linux")):
            where = f"linux.devices[{i}]"
            entry = _obj(item, where)
            named = _text(entry, "path", where)
            kind = _text(entry, "type", where)
            kinds = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
            if not named or kind not in kinds:
                raise SpecError(f"{where}: needs a path and a type c, b, u or p")
            mode = entry.get("fileMode", 0o666)
            major, minor = entry.get("major", 0), entry.get("minor", 0)
            uid, gid = entry.get("uid", 0), entry.get("gid", 0)
            for name, value in (("fileMode", mode), ("major", major), ("minor", minor),
                                ("uid", uid), ("gid", gid)):  # fmt: skip
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise SpecError(f"{where}.{name}: not a non-negative integer")
            target = resolve_in(rootfs, named)
            _make_dirs(rootfs, os.path.dirname(target))
            _device(target, kinds[kind] | (mode & 0o7777), major, minor, uid, gid)
        if made_dev:
            for name, target in _DEV_LINKS:
                os.symlink(target, os.path.join(dev, name))
            if os.path.isdir(os.path.join(dev, "pts")):
                os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    except FileExistsError:
        pass
    except OSError as exc:
        raise ExecutorError(f"sandbox: devices: {exc.strerror}") from None
    finally:
        os.umask(old)


def _device(path: str, mode: int, major: int, minor: int, uid: int, gid: int) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise ExecutorError(f"sandbox: device {path} is a directory") from None
    os.mknod(path, mode, os.makedev(major, minor))
    os.chown(path, uid, gid, follow_symlinks=False)


def _mask(rootfs: str, path: str) -> None:
    target = resolve_in(rootfs, path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ExecutorError(f"sandbox: masked path {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        _mount("tmpfs", target, "tmpfs", MS_RDONLY, None, f"masking {path}")
        return
    # the container's /dev/null, checked to be the device (a symlink or file planted in the
    # image would be bound over the masked path, writable)
    try:
        null = os.open("/dev/null", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ExecutorError(f"sandbox: masking {path}: /dev/null: {exc.strerror}") from None
    try:
        st = os.fstat(null)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(1, 3):
            raise ExecutorError(f"sandbox: masking {path}: /dev/null is not the null device")
        _mount(f"/proc/self/fd/{null}", target, None, MS_BIND, None, f"masking {path}")
    finally:
        os.close(null)


def _readonly(rootfs: str, path: str) -> None:
    target = resolve_in(rootfs, path)
    if not os.path.lexists(target):
        return
    _mount(target, target, None, MS_BIND | MS_REC, None, f"binding {path}")
    kept = os.statvfs(target).f_flag & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC | kept, None,
           f"read-only {path}")  # fmt: skip


def _pivot(rootfs: str) -> None:
    libc = _libc()
    old = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    new = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(new)
        _check(libc.pivot_root(b".", b"."), "pivot_root")
        os.fchdir(old)
        _mount(None, ".", None, MS_SLAVE | MS_REC, None, "old root as a slave")
        _check(libc.umount2(b".", MNT_DETACH), "detaching the old root")
        os.chdir("/")
    finally:
        os.close(old)
        os.close(new)


def _sysctl(key: str, value: object) -> None:
    if not isinstance(value, str) or not key or ".." in key or key.startswith(("/", ".")):
        raise SpecError(f"linux.sysctl.{key}: not a sysctl name with a string value")
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise ExecutorError(f"sandbox: sysctl {key}: {exc.strerror}") from None


# ------------------------------------------------------------------------------ finish


def _cap_set(doc: Mapping[str, Any], key: str, last: int) -> int:
    mask = 0
    for name in _names(doc, key, "process.capabilities"):
        number = _CAP_NUMBER.get(name)
        if number is None:
            raise SpecError(f"process.capabilities.{key}: unknown capability {name!r}")
        if number <= last:  # one this kernel does not know is dropped, as runc does
            mask |= 1 << number
    return mask


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


class Finish:
    """The process settings of a spec, checked and compiled by `enter`; calling it applies
    them (module docstring) but the seccomp filter, which `seal` loads, last thing before
    the guest starts (when ``noNewPrivileges`` is off the filter goes in with the rest, as
    runc does, while ``CAP_SYS_ADMIN`` is still held). ``root``: the path the engine should
    preopen as the guest's ``/`` (set by `enter`)."""

    def __init__(self, doc: Mapping[str, Any], *, last_cap: int | None = None) -> None:
        self.process = _obj(doc.get("process") or {}, "process")
        linux = _obj(doc.get("linux") or {}, "linux")
        self.last = _last_cap() if last_cap is None else last_cap
        self.held = _held_caps()
        self.root = "/"
        caps = _obj(self.process.get("capabilities") or {}, "process.capabilities")
        self.sets = {key: _cap_set(caps, key, self.last) for key in
                     ("bounding", "effective", "permitted", "inheritable", "ambient")}  # fmt: skip
        self.seccomp: Any = None
        self._pending: Any = None
        profile = linux.get("seccomp")
        if profile is not None:
            from wasidispatch import _seccomp

            self.seccomp = _seccomp.program(_obj(profile, "linux.seccomp"))
        for i, item in enumerate(_list(self.process, "rlimits", "process")):
            entry = _obj(item, f"process.rlimits[{i}]")
            if not isinstance(getattr(resource, str(entry.get("type")), None), int):
                raise SpecError(f"process.rlimits[{i}].type: {entry.get('type')!r} is not known")

    def __call__(self) -> None:
        process, sets, last = self.process, self.sets, self.last
        libc = _libc()
        _rlimits(process)
        nnp = process.get("noNewPrivileges") is True
        if nnp:
            _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        if self.seccomp is not None and not nnp:
            self.seccomp.load()  # needs CAP_SYS_ADMIN: before the capabilities go
        for number in range(last + 1):
            if not sets["bounding"] >> number & 1:
                _check(libc.prctl(_PR_CAPBSET_DROP, number, 0, 0, 0), "dropping the bounding set")
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps")
        _user(process)
        _check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "keepcaps")
        # runc sets the spec's sets and then executes the program, and the kernel recomputes
        # them: a Wasm guest starts without an execve, so the result of that rule is set at
        # once (no file capabilities): root keeps inheritable | bounding | ambient, any other
        # user only the ambient set; all within what this process holds
        bounding = sets["bounding"] & self.held
        inheritable = sets["inheritable"] & self.held
        ambient = sets["ambient"] & sets["permitted"] & inheritable
        user = _obj(process.get("user") or {}, "process.user")
        if user.get("uid", 0) == 0:
            after = (inheritable | bounding | ambient) & self.held
        else:
            after = ambient
        _capset(after, after, inheritable)
        _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient set")
        for number in range(last + 1):
            if ambient >> number & 1:
                _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, number, 0, 0), "ambient")
        if self.seccomp is not None and nnp:
            self._pending = self.seccomp

    def seal(self) -> None:
        """Load the seccomp filter if `__call__` left it (once; a no-op otherwise)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.load()


def _held_caps() -> int:
    """This process's permitted set (what it can keep)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapPrm:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return (1 << 64) - 1


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = (ctypes.c_uint32 * 2)(_CAP_V3, 0)
    data = (ctypes.c_uint32 * 6)(
        effective & 0xFFFFFFFF,
        permitted & 0xFFFFFFFF,
        inheritable & 0xFFFFFFFF,
        effective >> 32,
        permitted >> 32,
        inheritable >> 32,
    )
    _check(_libc().capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def _rlimits(process: Mapping[str, Any]) -> None:
    for i, item in enumerate(_list(process, "rlimits", "process")):
        entry = _obj(item, f"process.rlimits[{i}]")
        which = getattr(resource, str(entry.get("type")), None)
        if not isinstance(which, int):
            raise SpecError(f"process.rlimits[{i}].type: {entry.get('type')!r} is not known")
        try:
            resource.setrlimit(which, (_rlim(entry["soft"]), _rlim(entry["hard"])))
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise ExecutorError(f"sandbox: rlimit {entry.get('type')}: {exc}") from None


def _user(process: Mapping[str, Any]) -> None:
    user = _obj(process.get("user") or {}, "process.user")
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    groups = user.get("additionalGids") or []
    try:
        os.setgroups([int(g) for g in groups])
        os.setresgid(int(gid), int(gid), int(gid))
        os.setresuid(int(uid), int(uid), int(uid))
    except OSError as exc:
        raise ExecutorError(f"sandbox: user {uid}:{gid}: {exc.strerror}") from None


# ------------------------------------------------------------------------------ rewrite


def rewrite(workload: Workload, bundle: LeanBundle, *, in_memory: bool = False) -> Workload:
    """``workload`` as seen from inside the new root: preopens of the rootfs and of bind
    mounts at their container paths, a module path under the rootfs as its container path.
    A precompiled artifact stays ``/proc/self/fd/N`` when the spec mounts ``/proc``, and
    is read into memory otherwise or with ``in_memory`` (a process that changes its user
    may not open the cache's files any more)."""
    from wasidispatch.engines import Preopen

    rootfs = os.path.realpath(bundle.rootfs)
    preopens = []
    for preopen in workload.preopens:
        host = os.path.realpath(preopen.host)
        if host == rootfs:
            preopens.append(Preopen("/", preopen.guest, readonly=preopen.readonly))
        else:
            preopens.append(Preopen(preopen.guest, preopen.guest, readonly=preopen.readonly))
    wasm = workload.wasm
    if isinstance(wasm, Path | str):
        real = os.path.realpath(wasm)
        if real == rootfs or real.startswith(rootfs + "/"):
            wasm = Path("/" + os.path.relpath(real, rootfs))
        else:
            wasm = Path(real).read_bytes()
    precompiled = workload.precompiled
    if isinstance(precompiled, Path | str) and (in_memory or not _mounts_proc(bundle)):
        precompiled = Path(precompiled).read_bytes()
    return dataclasses.replace(
        workload, preopens=tuple(preopens), wasm=wasm, precompiled=precompiled
    )


def with_root(workload: Workload, root: str) -> Workload:
    """``workload`` (from `rewrite`) with the guest's ``/`` preopened at ``root`` (the
    rootfs clone `enter` made, `Finish.root`)."""
    from wasidispatch.engines import Preopen

    preopens = tuple(
        Preopen(root, p.guest, readonly=p.readonly) if p.host == "/" else p
        for p in workload.preopens
    )
    return dataclasses.replace(workload, preopens=preopens)


def _mounts_proc(bundle: LeanBundle) -> bool:
    for item in _list(_doc(bundle.spec), "mounts", "spec"):
        if (
            isinstance(item, Mapping)
            and item.get("type") == "proc"
            and os.path.normpath(str(item.get("destination"))) == "/proc"
        ):
            return True
    return False


def errno_name(code: int) -> str:
    """``"EPERM"`` for 1 (for messages)."""
    return _errno.errorcode.get(code, str(code))

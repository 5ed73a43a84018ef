"""The cgroup of a Wasm container: created from ``linux.cgroupsPath``, joined, removed.

Works on cgroup v2 (one hierarchy), v1 and the hybrid layout (v1 controllers plus a v2
mount without controllers), found from ``/proc/self/mountinfo``: the container's path is
created in every mounted hierarchy, as runc's cgroupfs driver does. Limits applied:
``linux.resources.memory.limit`` (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and
``linux.resources.pids.limit`` (``pids.max``); CPU and block-I/O weights are not.

``cgroupsPath`` forms: absolute (``/kubepods/pod1/c1``, from the hierarchy's root), relative
(from this process's own cgroup), or with ``--systemd-cgroup`` systemd's
``slice:prefix:name``, expanded by systemd's naming rule (``a-b.slice`` lives in
``a.slice/a-b.slice``; the unit is ``prefix-name.scope``). Without D-Bus the scope cannot be
registered with a running systemd, so that combination is refused with a clear message.
Stdlib only.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Sequence

__all__ = [
    "CgroupError",
    "Hierarchy",
    "create",
    "expand_systemd",
    "hierarchies",
    "join",
    "prewarm",
    "remove",
    "resolve",
]

_MOUNTINFO = "/proc/self/mountinfo"


class CgroupError(Exception):
    """A cgroup could not be set up (the message is for the user)."""


class Hierarchy:
    """One mounted cgroup hierarchy: ``mountpoint``, ``version`` (1 or 2), controllers."""

    def __init__(self, mountpoint: str, version: int, controllers: frozenset[str]) -> None:
        self.mountpoint = mountpoint
        self.version = version
        self.controllers = controllers

    def __repr__(self) -> str:
        return f"Hierarchy({self.mountpoint!r}, v{self.version}, {sorted(self.controllers)})"


_V1_CONTROLLERS = (
    "cpuset cpu cpuacct blkio memory devices freezer net_cls perf_event net_prio hugetlb pids "
    "rdma misc"
)


def _controller_names() -> frozenset[str]:
    """The kernel's controller names (``/proc/cgroups``): mount options such as ``xattr``
    or ``nsdelegate`` are not controllers."""
    try:
        with open("/proc/cgroups") as fh:
            names = {line.split()[0] for line in fh if line.strip() and not line.startswith("#")}
    except OSError:
        names = set()
    return frozenset(names | set(_V1_CONTROLLERS.split()))


def hierarchies(mountinfo: str = _MOUNTINFO) -> list[Hierarchy]:
    """The cgroup hierarchies mounted in this mount namespace (first mount of each)."""
    found: dict[str, Hierarchy] = {}
    known = _controller_names()
    with open(mountinfo) as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) < 5 or len(rest) < 3 or fields[3] != "/":
                continue
            fstype, options = rest[0], rest[2].split(",")
            mountpoint = fields[4].replace("\\040", " ")
            if fstype == "cgroup2":
                found.setdefault("2", Hierarchy(mountpoint, 2, frozenset()))
            elif fstype == "cgroup":
                ctrl = frozenset(o for o in options if o in known)
                named = frozenset(o for o in options if o.startswith("name="))
                key = ",".join(sorted(ctrl | named))
                found.setdefault(key, Hierarchy(mountpoint, 1, ctrl | named))
    return list(found.values())


def _own_cgroup(h: Hierarchy) -> str:
    """This process's cgroup path inside hierarchy ``h``."""
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, ctrl, path = line.rstrip("\n").split(":", 2)
            if h.version == 2 and ctrl == "":
                return path
            if h.version == 1 and ctrl and frozenset(ctrl.split(",")) == h.controllers:
                return path
    return "/"


def expand_systemd(cgroups_path: str) -> str:
    """systemd's ``slice:prefix:name`` as a cgroup path, by systemd's naming rule.

    Example::

        >>> expand_systemd("kubepods-besteffort-pod1.slice:cri-containerd:abc")
        '/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope'
    """
    parts = cgroups_path.split(":")
    if len(parts) != 3:
        raise CgroupError(
            f"cgroupsPath {cgroups_path!r} is not of the form slice:prefix:name "
            "(expected with --systemd-cgroup)"
        )
    slice_name, prefix, name = parts
    if any("/" in p or p in (".", "..") for p in parts) or not name:
        raise CgroupError(f"invalid systemd cgroupsPath {cgroups_path!r}")
    slice_name = slice_name or "system.slice"
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise CgroupError(f"invalid systemd slice {slice_name!r} in cgroupsPath")
    dirs: list[str] = []
    if slice_name != "-.slice":  # the root slice
        words = slice_name.removesuffix(".slice").split("-")
        dirs = ["-".join(words[: i + 1]) + ".slice" for i in range(len(words))]
    if name.endswith(".slice"):
        unit = name
    else:
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return "/" + "/".join([*dirs, unit])


def resolve(cgroups_path: str | None, *, systemd: bool = False) -> str | None:
    """The absolute cgroup path (inside each hierarchy) for ``cgroupsPath``; ``None``
    when the spec names none (the container then stays in its parent's cgroup). A
    relative path is returned with a ``./`` prefix, resolved per hierarchy by `create`.

    Example::

        >>> resolve("/kubepods/pod1/c1"), resolve("pod1/c1"), resolve("")
        ('/kubepods/pod1/c1', './pod1/c1', None)
    """
    if not cgroups_path:
        return None
    if systemd:
        if os.path.isdir("/run/systemd/system"):
            raise CgroupError(
                "--systemd-cgroup with a running systemd is not supported for Wasm containers "
                "(the scope would have to be registered over D-Bus); configure containerd with "
                "SystemdCgroup = false for this runtime"
            )
        return expand_systemd(cgroups_path)
    if ".." in cgroups_path.split("/"):
        raise CgroupError(f"cgroupsPath {cgroups_path!r} must not contain '..'")
    if cgroups_path.startswith("/"):
        return os.path.normpath(cgroups_path)
    return "./" + os.path.normpath(cgroups_path)


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _cpuset_inherit(directory: str) -> None:
    """A new v1 cpuset cgroup has empty cpus/mems and refuses tasks: copy the parent's."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        path = os.path.join(directory, name)
        try:
            with open(path) as fh:
                if fh.read().strip():
                    continue
            parent = os.path.dirname(directory)
            _cpuset_inherit(parent)
            with open(os.path.join(parent, name)) as fh:
                _write(path, fh.read().strip())
        except OSError:
            return


def _enable_v2_controllers(mountpoint: str, directory: str, wanted: Iterable[str]) -> None:
    """Enable ``wanted`` controllers in every ancestor's subtree_control (v2)."""
    rel = os.path.relpath(os.path.dirname(directory), mountpoint)
    current = mountpoint
    parts = [] if rel == "." else rel.split("/")
    for part in [None, *parts]:
        if part is not None:
            current = os.path.join(current, part)
        try:
            with open(os.path.join(current, "cgroup.controllers")) as fh:
                available = set(fh.read().split())
            enable = " ".join(f"+{c}" for c in wanted if c in available)
            if enable:
                _write(os.path.join(current, "cgroup.subtree_control"), enable)
        except OSError:
            return


def _mkdirs(directory: str, made: list[str]) -> None:
    """``os.makedirs`` that appends each directory it creates (parents first) to ``made``."""
    missing: list[str] = []
    current = directory
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, not ours to remove
        made.append(path)


def create(
    path: str,
    *,
    memory_limit: int | None = None,
    pids_limit: int | None = None,
    found: list[Hierarchy] | None = None,
    made: list[str] | None = None,
    devices: Sequence[tuple[bool, str]] = (),
) -> list[str]:
    """Create ``path`` (from `resolve`) in every hierarchy and apply the limits; returns the
    leaf directories (which `join` joins and ``delete`` removes). Raises `CgroupError`, having
    removed every directory it created.

    ``made``, when given, receives every directory created (ancestors and leaves, parents
    first) as soon as it exists: a caller interrupted midway (a signal) or failing later
    removes exactly those with ``remove(reversed(made))``, and nothing that was there before.

    ``devices``: device rules in order, as ``(allow, "TYPE MAJOR:MINOR ACCESS")``
    (`device_rules`: the spec's, then runc's always-allowed ones), written to a v1
    ``devices`` controller (cgroup v2 takes them as an eBPF program, not done here).
    """
    created: list[str] = [] if made is None else made
    start = len(created)
    leaves: list[str] = []
    try:
        for h in hierarchies() if found is None else found:
            if path.startswith("./"):
                base = os.path.join(h.mountpoint, _own_cgroup(h).lstrip("/"))
                directory = os.path.normpath(os.path.join(base, path[2:]))
            else:
                directory = os.path.normpath(os.path.join(h.mountpoint, path.lstrip("/")))
            if h.version == 2:
                # every ancestor must exist and delegate the controllers before the leaf
                # gets its interface files (memory.max, pids.max)
                _mkdirs(os.path.dirname(directory), created)
                _enable_v2_controllers(h.mountpoint, directory, ("memory", "pids"))
            _mkdirs(directory, created)
            leaves.append(directory)
            if h.version == 1 and "cpuset" in h.controllers:
                _cpuset_inherit(directory)
            _limits(h, directory, memory_limit, pids_limit)
            if devices and h.version == 1 and "devices" in h.controllers:
                for allow, rule in devices:
                    name = "devices.allow" if allow else "devices.deny"
                    _write(os.path.join(directory, name), rule)
    except OSError as exc:
        remove(reversed(created[start:]))
        del created[start:]
        raise CgroupError(f"cannot set up cgroup {path}: {exc}") from exc
    return leaves


def device_rules(resources: object) -> list[tuple[bool, str]]:
    """``linux.resources.devices`` (a JSON list) as `create` takes them; `SpecError` for an
    entry that is not a device rule.

    Example::

        >>> device_rules([{"allow": False, "access": "rwm"},
        ...               {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}])[:3]
        [(False, 'a *:* rwm'), (True, 'c 1:3 rw'), (True, 'c *:* m')]
    """
    from wasidispatch.errors import SpecError

    if resources is None:
        return []
    if not isinstance(resources, list):
        raise SpecError("linux.resources.devices: not a list")
    rules = []
    for i, entry in enumerate(resources):
        where = f"linux.resources.devices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("allow"), bool):
            raise SpecError(f"{where}: not a device rule with a boolean allow")
        kind = entry.get("type") or "a"
        access = entry.get("access") or "rwm"
        if (
            kind not in ("a", "b", "c")
            or not isinstance(access, str)
            or not access
            or set(access) - set("rwm")
        ):
            raise SpecError(f"{where}: type a, b or c and access of r, w, m")

        major, minor = (_device_number(entry.get(key), f"{where}.{key}") for key in
                        ("major", "minor"))  # fmt: skip
        rules.append((entry["allow"], f"{kind} {major}:{minor} {access}"))
    if rules:  # runc allows these after the spec's own rules
        rules += [(True, rule) for rule in _RUNC_ALLOWED]
    return rules


#: runc's always-allowed devices: mknod of any, and the devices every container gets.
_RUNC_ALLOWED = (
    "c *:* m", "b *:* m", "c 1:3 rwm", "c 1:8 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 1:5 rwm",
    "c 1:9 rwm", "c 136:* rwm", "c 5:2 rwm", "c 10:200 rwm",
)  # fmt: skip


def _device_number(value: object, where: str) -> str:
    from wasidispatch.errors import SpecError

    if value is None or value == -1:
        return "*"
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SpecError(f"{where}: not a device number")
    return str(value)


def _limits(h: Hierarchy, directory: str, memory: int | None, pids: int | None) -> None:
    if memory is not None and memory > 0:
        if h.version == 2 and os.path.exists(os.path.join(directory, "memory.max")):
            _write(os.path.join(directory, "memory.max"), str(memory))
        elif h.version == 1 and "memory" in h.controllers:
            _write(os.path.join(directory, "memory.limit_in_bytes"), str(memory))
    if pids is not None and pids > 0:
        target = os.path.join(directory, "pids.max")
        if (h.version == 2 and os.path.exists(target)) or (
            h.version == 1 and "pids" in h.controllers
        ):
            _write(target, str(pids))


def join(directories: Iterable[str], pid: int = 0) -> None:
    """Move ``pid`` (0: the calling process) into each cgroup directory."""
    for directory in directories:
        try:
            _write(os.path.join(directory, "cgroup.procs"), str(pid or os.getpid()))
        except OSError as exc:
            raise CgroupError(f"cannot join cgroup {directory}: {exc}") from exc


def prewarm(found: list[Hierarchy] | None = None) -> bool:
    """Start the kernel's wait for a cgroup migration now, in this process, so that a `join`
    by another process a few milliseconds later does not wait.

    Moving a process between cgroups takes a global lock whose first writer waits for an RCU
    grace period (5-15 ms here); for about one more grace period after that, migrations are
    fast. ``create`` calls this right after forking the container process, whose `join`
    follows its ~15 ms of preparation: the wait overlaps that work instead of following it.
    The migration is a no-op (this process's pid into its own cgroup, in the first hierarchy
    that takes it); nothing changes and errors are ignored. True when a write was made.
    """
    pid = str(os.getpid())
    try:
        found = hierarchies() if found is None else found
    except (OSError, ValueError):
        return False
    for h in sorted(found, key=lambda h: h.version):  # v1 first: no internal-process rule
        try:
            own = os.path.join(h.mountpoint, _own_cgroup(h).lstrip("/"), "cgroup.procs")
            _write(own, pid)
        except (OSError, ValueError):
            continue
        return True
    return False


def remove(directories: Iterable[str], *, timeout: float = 2.0) -> list[str]:
    """Remove the cgroup directories (retrying while the kernel still counts exiting tasks);
    returns those that could not be removed."""
    left: list[str] = []
    for directory in directories:
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    left.append(directory)
                    break
                time.sleep(0.005)
    return left

"""Add the wasidispatch runtime to a node's containerd config (``wasidispatch node install``).

The config is read with `tomllib` and edited as text: the runtime's table is appended at the
end of the file, so the operator's comments, order and formatting stay byte for byte. Before
anything is written the result is parsed again and must equal the original settings plus the
new runtime, exactly where containerd's CRI plugin looks for it; anything else (broken TOML, a
version 1 file, an unknown version, a runtime of that name with another ``runtime_type``, an
inline table that a header cannot extend) is refused with a `SpecError` and the file is left
untouched. A changed file is first copied to ``config.toml.bak-<UTC time>`` (a new name, never
an existing file), then replaced atomically with its mode and owner.

Where the runtime goes (facts from containerd's CRI config):

- version 2 (containerd 1.x, still read by 2.x):
  ``[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.NAME]``
- version 3 (containerd 2.0-2.2) and 4 (2.3+; only server settings moved):
  ``[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.NAME]``

A runtimes table in the file replaces containerd 1.x's built-in one (which holds only
``runc``, the default runtime), and the CRI plugin does not load without its default runtime:
when the file does not define ``runc`` (and it is the default), it is written out beside the
new runtime, so pods without a RuntimeClass keep running.

Stdlib only.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import shutil
import stat
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wasidispatch._fs import create_new, fsync_dir, read_regular, write_atomic
from wasidispatch.errors import SpecError

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_NAME",
    "NODE_LABEL",
    "RUNTIME_TYPE",
    "SHIM_BINARY",
    "InstallResult",
    "install",
    "install_runtime",
    "runtime_class",
]

#: The runtime type containerd maps to the binary `SHIM_BINARY`.
RUNTIME_TYPE = "io.containerd.wasidispatch.v1"
#: The shim v2 binary containerd starts for `RUNTIME_TYPE`.
SHIM_BINARY = "containerd-shim-wasidispatch-v1"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
#: The runtime's name in containerd's config: the RuntimeClass ``handler``.
DEFAULT_NAME = "wasidispatch"
#: The node label the RuntimeClass selects: nodes where the runtime is installed.
NODE_LABEL = "wasidispatch.dev/runtime"

#: A containerd config is a few KiB; larger is not one.
_CONFIG_LIMIT = 4 << 20
#: The CRI plugin holding ``containerd.runtimes``, by config version.
_CRI_PLUGIN = {
    2: "io.containerd.grpc.v1.cri",
    3: "io.containerd.cri.v1.runtime",
    4: "io.containerd.cri.v1.runtime",
}
_RUNC_TYPES = ("io.containerd.runc.v2", "io.containerd.runc.v1")
#: A RuntimeClass handler is a DNS label (RFC 1123): also a bare TOML key.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
#: The PATH a containerd service usually has (systemd's default), where it looks for shims.
_SERVICE_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

Action = Literal["added", "created", "already-installed"]


@dataclass(frozen=True, slots=True)
class InstallResult:
    """What `install` did (or, with ``dry_run``, would do) to one containerd config.

    ``action``: ``"added"`` (the runtime appended to an existing file), ``"created"`` (no
    file was there: a minimal version 2 config was written) or ``"already-installed"``
    (nothing to do). ``changed`` is whether the file's bytes change; ``backup`` the copy of the
    previous file (``None`` for a new file, a dry run or no change); ``diff`` a unified diff of
    the change; ``notes`` and ``warnings`` lines for the operator.
    """

    path: Path
    name: str
    version: int
    action: Action
    table: str
    dry_run: bool = False
    backup: Path | None = None
    diff: str = ""
    notes: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> bool:
        """The file's bytes change (or would, in a dry run)."""
        return self.action != "already-installed"


@dataclass(frozen=True, slots=True)
class _Plan:
    version: int
    action: Action
    table: str
    text: str  # the new text (the old one when nothing changes)
    notes: tuple[str, ...]


def runtime_class(name: str = DEFAULT_NAME, *, label: str = NODE_LABEL) -> str:
    """The RuntimeClass (YAML) whose handler is the runtime ``name``, scheduled on nodes
    labelled ``label=true``.

    Example::

        >>> print(runtime_class("wasidispatch"), end="")
        apiVersion: node.k8s.io/v1
        kind: RuntimeClass
        metadata:
          name: wasidispatch
        handler: wasidispatch
        scheduling:
          nodeSelector:
            wasidispatch.dev/runtime: "true"
    """
    _check_name(name)
    return (
        "apiVersion: node.k8s.io/v1\n"
        "kind: RuntimeClass\n"
        "metadata:\n"
        f"  name: {name}\n"
        f"handler: {name}\n"
        "scheduling:\n"
        "  nodeSelector:\n"
        f'    {label}: "true"\n'
    )


def install(
    path: str | os.PathLike[str] = DEFAULT_CONFIG,
    *,
    name: str = DEFAULT_NAME,
    dry_run: bool = False,
    shim_path: str | os.PathLike[str] | None = None,
) -> InstallResult:
    """Add the runtime ``name`` (``runtime_type = "io.containerd.wasidispatch.v1"``) to the
    containerd config at ``path``; create a minimal version 2 config if there is none.

    Idempotent: when the file already defines that runtime nothing is written (no backup
    either). ``shim_path`` (absolute) is written as the runtime's ``runtime_path``; without it
    containerd finds `SHIM_BINARY` on its ``PATH``, and a warning says when it is not in the
    usual places. ``dry_run`` computes the result and its diff and writes nothing. Raises
    `SpecError` (the file untouched, no backup) for a file that cannot safely be edited, and
    `OSError` when writing fails.

    Example::

        >>> import tempfile, tomllib
        >>> config = Path(tempfile.mkdtemp()) / "config.toml"
        >>> r = install(config, shim_path="/usr/local/bin/containerd-shim-wasidispatch-v1")
        >>> r.action, r.backup
        ('created', None)
        >>> cri = tomllib.loads(config.read_text())["plugins"]["io.containerd.grpc.v1.cri"]
        >>> cri["containerd"]["runtimes"]["wasidispatch"]["runtime_type"]
        'io.containerd.wasidispatch.v1'
        >>> install(config).action
        'already-installed'
    """
    _check_name(name)
    target = Path(path)
    runtime_path = None if shim_path is None else os.fspath(shim_path)
    if runtime_path is not None and not os.path.isabs(runtime_path):
        raise SpecError(f"--shim-path must be absolute (containerd requires it): {runtime_path}")
    st, original = _read(target)
    plan = _plan(original, name=name, runtime_path=runtime_path, path=target)
    notes = plan.notes
    warnings = _shim_warnings(runtime_path) + _containerd_warnings(plan.version)
    warnings += _import_warnings(plan.text, target, plan.version)
    if st is not None and st.st_nlink > 1 and plan.action != "already-installed":
        warnings += (
            f"{target} has {st.st_nlink} hard links: the edited file replaces this name only",
        )
    old_lines = [] if original is None else original.splitlines(keepends=True)
    diff = "".join(
        difflib.unified_diff(
            old_lines,
            plan.text.splitlines(keepends=True),
            fromfile="/dev/null" if original is None else str(target),
            tofile=str(target),
        )
    )
    result = InstallResult(
        path=target,
        name=name,
        version=plan.version,
        action=plan.action,
        table=plan.table,
        dry_run=dry_run,
        diff=diff,
        notes=notes,
        warnings=warnings,
    )
    if dry_run or plan.action == "already-installed":
        return result
    data = plan.text.encode()
    if st is None:
        try:
            create_new(target, data, mode=0o644)
        except FileExistsError as exc:
            raise SpecError(f"{target} appeared while it was being created: run again") from exc
        _settle(target, 0o644, None)
        fsync_dir(target.parent)
        return result
    assert original is not None
    if _read(target)[1] != original:
        raise SpecError(f"{target} changed while it was being edited: run again")
    backup = _backup(target, original.encode(), st)
    try:
        write_atomic(target, data, mode=stat.S_IMODE(st.st_mode), durable=True)
    except BaseException:
        backup.unlink()  # the config is untouched: no backup of it either
        raise
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
        os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    return InstallResult(
        path=target,
        name=name,
        version=plan.version,
        action=plan.action,
        table=plan.table,
        backup=backup,
        diff=diff,
        notes=notes,
        warnings=warnings,
    )


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise SpecError(
            f"runtime name {name!r} is not a DNS label (lowercase letters, digits and '-', "
            "at most 63): Kubernetes requires one as the RuntimeClass handler"
        )


def _read(path: Path) -> tuple[os.stat_result | None, str | None]:
    """The file's status and text; ``(None, None)`` when there is none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise SpecError(f"{path}: the directory {path.parent} does not exist") from None
        return None, None
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise SpecError(
            f"{path} is a symlink to {os.readlink(path)}: pass --config with the file it "
            "points to, so the link is not replaced by a copy"
        )
    data = read_regular(path, limit=_CONFIG_LIMIT, what="containerd config", follow=False)
    try:
        return st, data.decode()
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text (TOML must be): {exc}") from exc


def _parse(text: str, path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path} is not valid TOML ({exc}); nothing was changed") from exc


def _plan(text: str | None, *, name: str, runtime_path: str | None, path: Path) -> _Plan:
    """The new text of the config (``text`` None: there is no file)."""
    doc: dict[str, object] = {} if text is None else _parse(text, path)
    empty = not doc  # no file, or only comments and blank lines: containerd's defaults
    version = 2 if empty else doc.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise SpecError(f"{path}: version = {version!r} is not a containerd config version")
    if version == 1:
        raise SpecError(
            f"{path} is a containerd config version 1 (no 'version = 2' line), whose plugin "
            "tables have other names ([plugins.cri]...): convert it to version 2 (containerd "
            "1.x) or 3 ('containerd config migrate', containerd 2.x) first; nothing was changed"
        )
    if version not in _CRI_PLUGIN:
        known = ", ".join(map(str, _CRI_PLUGIN))
        raise SpecError(
            f"{path}: unknown containerd config version {version} (this command knows "
            f"{known}); nothing was changed"
        )
    plugin = _CRI_PLUGIN[version]
    style = "'" if text is not None and f"'{plugin}'" in text else '"'
    prefix = f"plugins.{style}{plugin}{style}.containerd.runtimes"
    table = f"[{prefix}.{name}]"
    keys = ("plugins", plugin, "containerd", "runtimes")
    runtimes = _walk(doc, keys, path)
    notes = list(_cgroup_notes(doc, plugin, runtimes))
    existing = None if runtimes is None else runtimes.get(name)
    if existing is not None:
        return _existing(existing, table, name, runtime_path, path, version, text, notes)

    ours: dict[str, object] = {"runtime_type": RUNTIME_TYPE}
    if runtime_path is not None:
        ours["runtime_path"] = runtime_path
    added: dict[str, dict[str, object]] = {}
    blocks: list[str] = []
    containerd = _walk(doc, keys[:3], path) or {}
    default = containerd.get("default_runtime_name", "runc")
    if default == "runc" and "runc" not in (runtimes or {}):
        if name == "runc":
            raise SpecError(
                f"{path}: 'runc' is the name of containerd's default runtime: pass another "
                "--name; nothing was changed"
            )
        added["runc"] = {"runtime_type": "io.containerd.runc.v2"}
        blocks.append(
            "# containerd's built-in runc runtime (the default), written out: a runtimes table\n"
            "# here replaces the built-in one, and pods without a RuntimeClass still need runc.\n"
            f"[{prefix}.runc]\n"
            '  runtime_type = "io.containerd.runc.v2"\n'
        )
        notes.append(
            f"also added [{prefix}.runc], containerd's built-in default runtime: a runtimes "
            "table in the file replaces the built-in one (containerd 1.x), and the CRI plugin "
            "does not load without its default runtime"
        )
    elif default != name and default not in (runtimes or {}):
        notes.append(
            f"default_runtime_name = {default!r} is not among the file's runtimes: containerd's "
            "CRI plugin will not load until it is defined"
        )
    added[name] = ours
    lines = [f"# The wasidispatch runtime ({SHIM_BINARY}), added by 'wasidispatch node install'."]
    lines += [table, f"  runtime_type = {_toml_string(RUNTIME_TYPE)}"]
    if runtime_path is not None:
        lines.append(f"  runtime_path = {_toml_string(runtime_path)}")
    blocks.append("\n".join(lines) + "\n")
    if empty:
        head = "" if text is None else text
        if head and not head.endswith("\n"):
            head += "\n"
        new = head + ("\n" if head.strip() else "") + "version = 2\n\n" + "\n".join(blocks)
    else:
        assert text is not None
        new = text + ("" if text.endswith("\n") else "\n") + "\n" + "\n".join(blocks)
    if text is not None and "\r\n" in text:  # keep a CRLF file CRLF
        new = text + new[len(text) :].replace("\n", "\r\n")
    expected = copy.deepcopy(doc)
    expected.setdefault("version", 2)
    node: dict[str, object] = expected
    for key in keys:
        node = _child(node, key)
    node.update(added)
    _verify(new, expected, table, path)
    return _Plan(version, "created" if text is None else "added", table, new, tuple(notes))


def _existing(
    existing: object,
    table: str,
    name: str,
    runtime_path: str | None,
    path: Path,
    version: int,
    text: str | None,
    notes: list[str],
) -> _Plan:
    """The runtime ``name`` is already defined: nothing to do, or a refusal."""
    if not isinstance(existing, dict):
        raise SpecError(f"{path}: {table[1:-1]} is not a table; nothing was changed")
    runtime_type = existing.get("runtime_type")
    if runtime_type != RUNTIME_TYPE:
        options = existing.get("options")
        binary = options.get("BinaryName", "") if isinstance(options, dict) else ""
        hint = (
            " (the wasidispatch-runc setup)"
            if isinstance(binary, str) and "wasidispatch-runc" in binary
            else ""
        )
        now = "no runtime_type" if runtime_type is None else f"runtime_type = {runtime_type!r}"
        raise SpecError(
            f"{path} already defines {table} with {now}{hint}, not {RUNTIME_TYPE!r}: pass "
            "another --name, or edit that table by hand; nothing was changed"
        )
    have = existing.get("runtime_path")
    if runtime_path is not None and have != runtime_path:
        now = "without runtime_path" if have is None else f"with runtime_path = {have!r}"
        raise SpecError(
            f"{path}: {table} is already installed {now}, not {runtime_path!r}: edit it by "
            "hand; nothing was changed"
        )
    assert text is not None
    return _Plan(version, "already-installed", table, text, tuple(notes))


def _walk(doc: dict[str, object], keys: tuple[str, ...], path: Path) -> dict[str, object] | None:
    """The table at ``keys`` (None when some part is missing); a non-table on the way is
    refused."""
    node: object = doc
    for depth, key in enumerate(keys):
        assert isinstance(node, dict)
        node = node.get(key)
        if node is None:
            return None
        if not isinstance(node, dict):
            dotted = ".".join(keys[: depth + 1])
            raise SpecError(f"{path}: {dotted} is not a table; nothing was changed")
    assert isinstance(node, dict)
    return node


def _child(node: dict[str, object], key: str) -> dict[str, object]:
    child = node.setdefault(key, {})
    assert isinstance(child, dict)
    return child


def _verify(new: str, expected: dict[str, object], table: str, path: Path) -> None:
    """``new`` must parse to exactly ``expected``: the old settings and the new tables."""
    try:
        got = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(
            f"{path}: appending {table} would not be valid TOML ({exc}): the file defines a "
            "parent of it in a form a table header cannot extend (an inline table such as "
            "'runtimes = {...}'?); add the runtime there by hand; nothing was changed"
        ) from exc
    if got != expected:
        raise SpecError(
            f"{path}: appending {table} would change other settings; add it by hand; nothing "
            "was changed"
        )


def _toml_string(value: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _cgroup_notes(
    doc: dict[str, object], plugin: str, runtimes: dict[str, object] | None
) -> list[str]:
    """A note for each runc runtime with ``SystemdCgroup = true``."""
    notes = []
    for rname, runtime in (runtimes or {}).items():
        if not isinstance(runtime, dict) or runtime.get("runtime_type") not in _RUNC_TYPES:
            continue
        options = runtime.get("options")
        if isinstance(options, dict) and options.get("SystemdCgroup") is True:
            notes.append(
                f"runtime {rname!r} uses the systemd cgroup driver (SystemdCgroup = true), so "
                "the kubelet's cgroupDriver is presumably systemd too; containerd hands an "
                "options table's SystemdCgroup only to runc runtime types, so the wasidispatch "
                "runtime cannot be given it: the shim runs its containers with the cgroupfs "
                "driver (see docs/kubernetes.md)"
            )
    plugins = doc.get("plugins")
    cri = plugins.get(plugin) if isinstance(plugins, dict) else None
    if isinstance(cri, dict) and cri.get("systemd_cgroup") is True:
        notes.append(f"{plugin} sets the legacy systemd_cgroup = true (runtime v1 only)")
    return notes


def _import_warnings(text: str, path: Path, version: int) -> tuple[str, ...]:
    """Files the config imports that define the same CRI plugin table: containerd 1.x
    replaces this file's table with theirs (seen with ``containerd config dump``)."""
    doc = tomllib.loads(text)
    imports = doc.get("imports")
    disabled = doc.get("disabled_plugins")
    out: list[str] = []
    plugin = _CRI_PLUGIN[version]
    cri_plugin = "io.containerd.grpc.v1.cri"
    if isinstance(disabled, list) and (cri_plugin in disabled or plugin in disabled):
        out.append(
            f"the CRI plugin is disabled (disabled_plugins in {path}): Kubernetes cannot use "
            "the runtime until it is enabled ('ctr run --runtime' still can)"
        )
    if not isinstance(imports, list):
        return tuple(out)
    import glob

    for pattern in imports:
        if not isinstance(pattern, str):
            continue
        full = pattern if os.path.isabs(pattern) else str(path.parent / pattern)
        for found in sorted(glob.glob(full)) if "*" in full else [full]:
            try:
                imported = tomllib.loads(Path(found).read_text())
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                continue
            plugins = imported.get("plugins")
            if isinstance(plugins, dict) and plugin in plugins:
                out.append(
                    f"{found} (imported by {path}) also defines [plugins.{plugin!r}]: "
                    "containerd 1.x then ignores this file's table, runtime included; add the "
                    f"runtime there instead (--config {found}) or check 'containerd config "
                    "dump'"
                )
    return tuple(out)


def _containerd_warnings(version: int) -> tuple[str, ...]:
    """A warning when the containerd on PATH does not read this config version's CRI
    tables: containerd 1.x takes a version 3 file without a word and ignores its
    ``io.containerd.cri.v1.*`` plugins."""
    import subprocess

    binary = shutil.which("containerd")
    if binary is None or version < 3:
        return ()
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"\sv?(\d+)\.(\d+)\.\d+", out)
    if m is None or int(m.group(1)) >= 2:
        return ()
    return (
        f"{binary} is containerd {m.group(1)}.{m.group(2)}, which ignores the CRI tables of a "
        f"version {version} config (plugins.'io.containerd.cri.v1.runtime' is containerd 2.x): "
        "it will not see the runtime; a version 2 config serves both",
    )


def _shim_warnings(runtime_path: str | None) -> tuple[str, ...]:
    """Warnings when containerd will likely not find the shim."""
    if runtime_path is not None:
        if not (os.path.isfile(runtime_path) and os.access(runtime_path, os.X_OK)):
            return (f"--shim-path {runtime_path} is not an executable file (yet)",)
        return ()
    containerd = shutil.which("containerd")
    dirs = list(_SERVICE_PATH)
    if containerd is not None:
        dirs.append(os.path.dirname(os.path.realpath(containerd)))
    for d in dirs:
        candidate = os.path.join(d, SHIM_BINARY)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return ()
    here = shutil.which(SHIM_BINARY) or shutil.which(
        SHIM_BINARY, path=os.path.dirname(sys.executable)
    )
    if here is not None:
        return (
            f"{SHIM_BINARY} is at {here}, which containerd's PATH ({':'.join(_SERVICE_PATH)}) "
            f"does not usually hold: ln -s {here} /usr/local/bin/, or pass --shim-path {here}",
        )
    return (
        f"{SHIM_BINARY} is not installed where containerd looks ({':'.join(_SERVICE_PATH)}): "
        "pip install 'wasidispatch[all]' and link it into /usr/local/bin, or pass --shim-path",
    )


def _backup(path: Path, data: bytes, st: os.stat_result, *, when: float | None = None) -> Path:
    """Copy the old config to ``NAME.bak-<UTC time>`` (a new file: an existing name, a
    planted symlink included, is skipped, never written through), with its mode and owner."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    for n in range(100):
        backup = path.with_name(f"{path.name}.bak-{stamp}" + (f".{n}" if n else ""))
        try:
            create_new(backup, data, mode=stat.S_IMODE(st.st_mode) & 0o777)
        except FileExistsError:
            continue
        _settle(backup, stat.S_IMODE(st.st_mode) & 0o777, st)
        return backup
    raise SpecError(f"no free backup name beside {path}; nothing was changed")


def _settle(path: Path, mode: int, owner: os.stat_result | None) -> None:
    """Give a file just created its exact mode (not the umask's) and ``owner``'s uid and gid
    (when root), and fsync it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


#: `install` under the name ``wasidispatch`` re-exports it as.
install_runtime = install

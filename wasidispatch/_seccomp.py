"""Apply an OCI ``linux.seccomp`` profile to the calling process through libseccomp.

A Wasm container's process calls :func:`load` just before the guest starts, with the
``linux.seccomp`` object of ``config.json`` as a plain mapping (no pydantic: this module imports
the stdlib only, and ``ctypes`` only when a filter is built). :func:`compile` validates the whole
profile and builds the libseccomp filter without loading it, so every error comes before
anything is applied; :meth:`Filter.load` then installs it. The filter is built the way runc
builds it:

* ``SCMP_ACT_KILL`` is ``KILL_THREAD``; ``ERRNO`` and ``TRACE`` return ``errnoRet`` (or
  ``defaultErrnoRet``), EPERM when absent; an ``errnoRet`` on any other action is an error;
* every name of an entry is a rule of its own; a name libseccomp does not know (a syscall of
  a newer kernel) is skipped and listed in :attr:`Filter.skipped`; a rule whose action equals
  the default action is skipped (libseccomp refuses it);
* an entry's ``args`` are ANDed in one rule, except when two of them test the same argument
  index: then each condition is a rule of its own (so they are ORed), as runc does;
* ``architectures`` are added to the native one (an architecture of the other endianness,
  which libseccomp cannot add, is skipped and listed in :attr:`Filter.skipped_architectures`:
  this kernel never runs its syscalls, and a syscall of an architecture missing from the
  filter is killed anyway; runc fails instead); the filter syncs every thread of the process
  (TSYNC, as libseccomp-golang always asks when the kernel has it); no_new_privs is left to the
  caller (``SCMP_FLTATR_CTL_NNP`` is 0): without it, loading needs CAP_SYS_ADMIN and fails
  with EACCES otherwise; ``flags`` LOG and SPEC_ALLOW set the matching filter attributes.

What differs from runc:

* ``SCMP_ACT_NOTIFY`` is refused (there is no seccomp agent to pass a listener to);
  ``listenerPath``/``listenerMetadata`` are ignored and so is the flag
  ``SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV``, which only changes how a listener waits;
* runc patches the generated BPF so that syscalls newer than any the profile names return
  ENOSYS rather than the default action (so a libc falls back from e.g. ``clone3``); this
  module loads libseccomp's program as is: a profile that must answer ENOSYS says so with an
  ERRNO rule (Docker's and containerd's default profiles do, for ``clone3``).

Errors: :class:`~wasidispatch.errors.SpecError` for an invalid profile, before libseccomp is
touched; :class:`~wasidispatch.errors.ExecutorError` when libseccomp is missing or refuses a
call (with the errno)::

    >>> compile({"defaultAction": "SCMP_ACT_NOPE"})
    Traceback (most recent call last):
    ...
    wasidispatch.errors.SpecError: linux.seccomp.defaultAction: unknown action 'SCMP_ACT_NOPE'
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from collections.abc import Mapping, Sequence
    from typing import Any

    Condition = tuple[int, int, int, int]  # (argument index, scmp_compare, datum_a, datum_b)

__all__ = ["Filter", "Program", "compile", "load", "program"]

_SONAME = "libseccomp.so.2"
_WHERE = "linux.seccomp"

# libseccomp's action values (seccomp.h); ERRNO and TRACE carry 16 bits of data.
_ACT_KILL_THREAD = 0x00000000
_ACT_KILL_PROCESS = 0x80000000
_ACT_TRAP = 0x00030000
_ACT_ERRNO = 0x00050000
_ACT_TRACE = 0x7FF00000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000
_ACTIONS = {
    "SCMP_ACT_KILL": _ACT_KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": _ACT_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": _ACT_KILL_PROCESS,
    "SCMP_ACT_TRAP": _ACT_TRAP,
    "SCMP_ACT_ERRNO": _ACT_ERRNO,
    "SCMP_ACT_TRACE": _ACT_TRACE,
    "SCMP_ACT_LOG": _ACT_LOG,
    "SCMP_ACT_ALLOW": _ACT_ALLOW,
}
# libseccomp refuses ERRNO(x) for x >= MAX_ERRNO (4095); a TRACE message is 16 bits.
_ERRNO_LIMIT = 4094
_TRACE_LIMIT = 0xFFFF

# enum scmp_compare
_OPERATORS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
_MAX_ARGS = 6

# enum scmp_filter_attr
_FLTATR_CTL_NNP = 3
_FLTATR_CTL_TSYNC = 4
_FLTATR_CTL_LOG = 6
_FLTATR_CTL_SSB = 7
_FLTATR_CTL_OPTIMIZE = 8
_FLTATR_API_SYSRAWRC = 9

# seccomp(2): SECCOMP_SET_MODE_FILTER and its flags; the syscall's number per machine
_SET_MODE_FILTER = 1
_KERNEL_TSYNC, _KERNEL_LOG, _KERNEL_SPEC_ALLOW = 1, 2, 4
_NR_SECCOMP = {"x86_64": 317, "aarch64": 277, "i386": 354, "i686": 354, "armv7l": 383,
               "ppc64le": 358, "s390x": 348, "riscv64": 277, "loongarch64": 277}  # fmt: skip
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2

_FLAG_TSYNC = "SECCOMP_FILTER_FLAG_TSYNC"
_FLAG_LOG = "SECCOMP_FILTER_FLAG_LOG"
_FLAG_SPEC_ALLOW = "SECCOMP_FILTER_FLAG_SPEC_ALLOW"
_FLAGS = frozenset(
    {_FLAG_TSYNC, _FLAG_LOG, _FLAG_SPEC_ALLOW, "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"}
)

# The runtime-spec's architectures; libseccomp's name is the lowercase rest ("x86_64").
_ARCH_PREFIX = "SCMP_ARCH_"
_ARCHES = frozenset(
    _ARCH_PREFIX + name
    for name in (
        "X86", "X86_64", "X32", "ARM", "AARCH64", "LOONGARCH64", "M68K", "MIPS", "MIPS64",
        "MIPS64N32", "MIPSEL", "MIPSEL64", "MIPSEL64N32", "PPC", "PPC64", "PPC64LE", "S390",
        "S390X", "SH", "SHEB", "PARISC", "PARISC64", "RISCV64",
    )
)  # fmt: skip

_NR_SCMP_ERROR = -1  # seccomp_syscall_resolve_name: unknown name
# runc asks for libseccomp's binary-tree layout above this many rules (libseccomp <= 2.5.4
# misbehaves with it on an empty filter).
_OPTIMIZE_ABOVE = 32


class _Rule:
    """One libseccomp rule: a syscall name, its action and its ANDed conditions."""

    __slots__ = ("action", "conditions", "name", "where")

    def __init__(
        self, name: str, action: int, conditions: tuple[Condition, ...], where: str
    ) -> None:
        self.name = name
        self.action = action
        self.conditions = conditions
        self.where = where  # the entry's JSON path, for errors


class _Plan:
    """A validated profile, in libseccomp's terms."""

    __slots__ = ("arches", "default_action", "flags", "rules")

    def __init__(
        self,
        default_action: int,
        arches: tuple[tuple[str, str], ...],  # (OCI name, libseccomp name)
        flags: frozenset[str],
        rules: tuple[_Rule, ...],
    ) -> None:
        self.default_action = default_action
        self.arches = arches
        self.flags = flags
        self.rules = rules


class Filter:
    """A built libseccomp filter, not loaded yet; :meth:`release` frees it (idempotent).

    ``skipped`` lists the syscall names this libseccomp does not know, in profile order;
    ``skipped_architectures`` the architectures it cannot add to a filter for this one.
    """

    __slots__ = ("_ctx", "_lib", "flags", "skipped", "skipped_architectures")

    def __init__(self, lib: _Lib, ctx: int) -> None:
        self._lib = lib
        self._ctx: int | None = ctx
        self.flags = 0  # seccomp(2)'s SECCOMP_FILTER_FLAG_* for this filter
        self.skipped: tuple[str, ...] = ()
        self.skipped_architectures: tuple[str, ...] = ()

    def load(self) -> None:
        """Install the filter in the calling process (every thread); irreversible.

        Raises :class:`~wasidispatch.errors.ExecutorError` when the kernel refuses it, e.g.
        EACCES when the process has neither no_new_privs nor CAP_SYS_ADMIN.
        """
        from wasidispatch.errors import ExecutorError

        if self._ctx is None:
            raise ExecutorError("seccomp: this filter was released")
        rc = self._lib.load(self._ctx)
        if rc < 0:
            hint = ""
            if -rc == errno.EACCES:
                hint = ": without no_new_privs, loading a filter needs CAP_SYS_ADMIN"
            elif -rc == errno.ESRCH:
                hint = ": another thread could not be synchronized to the filter"
            raise ExecutorError(f"seccomp: loading the filter failed: {_strerror(rc)}{hint}")

    def export(self) -> Program:
        """The filter as the kernel's BPF program and ``seccomp(2)`` flags: a `Program`
        loads without libseccomp, in a few microseconds (libseccomp generates the program on
        every :meth:`load`, which for a default profile costs milliseconds)."""
        from wasidispatch.errors import ExecutorError

        if self._ctx is None:
            raise ExecutorError("seccomp: this filter was released")
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            rc = self._lib.export_bpf(self._ctx, fd)
            if rc < 0:
                raise ExecutorError(f"seccomp: exporting the filter failed: {_strerror(rc)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            bpf = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        return Program(bpf, self.flags)

    def release(self) -> None:
        """Free libseccomp's filter context (a loaded filter stays in force)."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self._lib.release(ctx)

    def __enter__(self) -> Filter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class Program:
    """A filter as the kernel takes it: ``bpf`` (``struct sock_filter`` instructions, as
    libseccomp exports them) and ``flags`` (``SECCOMP_FILTER_FLAG_*``). Plain bytes: it
    survives a fork and loads with one ``seccomp(2)`` call."""

    __slots__ = ("bpf", "flags")

    def __init__(self, bpf: bytes, flags: int) -> None:
        if not bpf or len(bpf) % 8:
            from wasidispatch.errors import ExecutorError

            raise ExecutorError("seccomp: not a BPF program")
        self.bpf = bpf
        self.flags = flags

    def load(self) -> None:
        """Install it in the calling process (every thread with TSYNC); irreversible. Needs
        no_new_privs or CAP_SYS_ADMIN, as `Filter.load`."""
        import ctypes
        import platform

        from wasidispatch.errors import ExecutorError

        class SockFprog(ctypes.Structure):
            _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_char_p))

        prog = SockFprog(len(self.bpf) // 8, self.bpf)
        libc = ctypes.CDLL(None, use_errno=True)
        number = _NR_SECCOMP.get(platform.machine())
        if number is not None:
            libc.syscall.restype = ctypes.c_long
            rc = libc.syscall(
                ctypes.c_long(number),
                ctypes.c_uint(_SET_MODE_FILTER),
                ctypes.c_uint(self.flags),
                ctypes.byref(prog),
            )
        else:  # no flags through prctl: TSYNC, LOG and SPEC_ALLOW need seccomp(2)
            if self.flags & ~_KERNEL_TSYNC:
                raise ExecutorError(f"seccomp: seccomp(2) unknown on {platform.machine()}")
            rc = libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)
        if rc > 0:  # TSYNC: the id of a thread that could not take the filter
            raise ExecutorError(f"seccomp: thread {rc} could not be synchronized to the filter")
        if rc != 0:
            code = ctypes.get_errno()
            hint = ""
            if code == errno.EACCES:
                hint = ": without no_new_privs, loading a filter needs CAP_SYS_ADMIN"
            raise ExecutorError(f"seccomp: loading the filter failed: {os.strerror(code)}{hint}")


_PROGRAMS: dict[str, Program] = {}
_PROGRAMS_KEPT = 16


def program(profile: Mapping[str, object]) -> Program:
    """`compile` then `Filter.export`, remembered per profile (the last 16): a process that
    forks containers (the shim's zygote) builds each profile once and its children inherit
    the program. Raises as `compile` does."""
    import hashlib
    import json

    try:
        key = hashlib.sha256(
            json.dumps(profile, sort_keys=True, allow_nan=False).encode()
        ).hexdigest()
    except (TypeError, ValueError):
        key = ""  # not JSON: `compile` says why
    found = _PROGRAMS.get(key) if key else None
    if found is not None:
        return found
    with compile(profile) as built:
        made = built.export()
    if key:
        if len(_PROGRAMS) >= _PROGRAMS_KEPT:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = made
    return made


def load(profile: Mapping[str, object]) -> None:
    """Validate ``profile`` (an OCI ``linux.seccomp`` object) and load it into this process."""
    with compile(profile) as built:
        built.load()


def compile(profile: Mapping[str, object]) -> Filter:
    """Validate ``profile`` and build its libseccomp filter without loading it.

    Raises :class:`~wasidispatch.errors.SpecError` for an invalid profile (before libseccomp is
    loaded) and :class:`~wasidispatch.errors.ExecutorError` when libseccomp is missing or
    refuses an attribute, an architecture or a rule.
    """
    plan = _parse(profile)
    lib = _library()
    return _build(lib, plan)


# -- validation: the profile as plain JSON values ---------------------------------------------


def _parse(profile: object) -> _Plan:
    from collections.abc import Mapping

    if not isinstance(profile, Mapping):
        raise _spec_error(_WHERE, f"must be an object, not {type(profile).__name__}")
    if profile.get("defaultAction") is None:
        raise _spec_error(f"{_WHERE}.defaultAction", "is required")
    default_action = _action(
        profile.get("defaultAction"),
        profile.get("defaultErrnoRet"),
        f"{_WHERE}.defaultAction",
        f"{_WHERE}.defaultErrnoRet",
    )
    arches: dict[tuple[str, str], None] = {}
    for i, arch in enumerate(_list(profile.get("architectures"), f"{_WHERE}.architectures")):
        if not isinstance(arch, str) or arch not in _ARCHES:
            raise _spec_error(f"{_WHERE}.architectures[{i}]", f"unknown architecture {arch!r}")
        arches[arch, arch[len(_ARCH_PREFIX) :].lower()] = None
    flags: set[str] = set()
    for i, flag in enumerate(_list(profile.get("flags"), f"{_WHERE}.flags")):
        if not isinstance(flag, str) or flag not in _FLAGS:
            raise _spec_error(f"{_WHERE}.flags[{i}]", f"unknown flag {flag!r}")
        flags.add(flag)
    rules: list[_Rule] = []
    for i, entry in enumerate(_list(profile.get("syscalls"), f"{_WHERE}.syscalls")):
        rules.extend(_entry_rules(entry, f"{_WHERE}.syscalls[{i}]"))
    return _Plan(default_action, tuple(arches), frozenset(flags), tuple(rules))


def _entry_rules(entry: object, where: str) -> list[_Rule]:
    from collections.abc import Mapping

    if not isinstance(entry, Mapping):
        raise _spec_error(where, f"must be an object, not {type(entry).__name__}")
    names = _list(entry.get("names"), f"{where}.names")
    if not names:
        raise _spec_error(f"{where}.names", "must list at least one syscall")
    for j, name in enumerate(names):
        if not isinstance(name, str) or not name or "\0" in name:
            raise _spec_error(f"{where}.names[{j}]", f"not a syscall name: {name!r}")
    if entry.get("action") is None:
        raise _spec_error(f"{where}.action", "is required")
    action = _action(
        entry.get("action"), entry.get("errnoRet"), f"{where}.action", f"{where}.errnoRet"
    )
    conditions = tuple(
        _condition(arg, f"{where}.args[{k}]")
        for k, arg in enumerate(_list(entry.get("args"), f"{where}.args"))
    )
    # runc: when two conditions test one argument, each becomes a rule of its own (ORed)
    indexes = [cond[0] for cond in conditions]
    shared = len(set(indexes)) < len(indexes)
    groups = [(cond,) for cond in conditions] if shared else [conditions]
    return [_Rule(str(name), action, group, where) for name in names for group in groups]


def _action(name: object, ret: object, where: str, ret_where: str) -> int:
    if name == "SCMP_ACT_NOTIFY":
        raise _spec_error(
            where, "SCMP_ACT_NOTIFY is not supported: there is no seccomp agent to notify"
        )
    if not isinstance(name, str) or name not in _ACTIONS:
        raise _spec_error(where, f"unknown action {name!r}")
    base = _ACTIONS[name]
    if base == _ACT_ERRNO:
        return base | (errno.EPERM if ret is None else _uint(ret, _ERRNO_LIMIT, ret_where))
    if base == _ACT_TRACE:
        return base | (errno.EPERM if ret is None else _uint(ret, _TRACE_LIMIT, ret_where))
    if ret is not None:
        raise _spec_error(
            ret_where, f"is only valid with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, not {name}"
        )
    return base


def _condition(arg: object, where: str) -> Condition:
    from collections.abc import Mapping

    if not isinstance(arg, Mapping):
        raise _spec_error(where, f"must be an object, not {type(arg).__name__}")
    index = _uint(arg.get("index"), _MAX_ARGS - 1, f"{where}.index")
    op = arg.get("op")
    if not isinstance(op, str) or op not in _OPERATORS:
        raise _spec_error(f"{where}.op", f"unknown operator {op!r}")
    value = _uint(arg.get("value"), 2**64 - 1, f"{where}.value")
    two = arg.get("valueTwo")
    value_two = 0 if two is None else _uint(two, 2**64 - 1, f"{where}.valueTwo")
    return (index, _OPERATORS[op], value, value_two)


def _list(value: object, where: str) -> Sequence[object]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _spec_error(where, f"must be a list, not {type(value).__name__}")
    return value


def _uint(value: object, limit: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise _spec_error(where, f"must be an integer from 0 to {limit}, not {value!r}")
    return value


def _spec_error(where: str, message: str) -> Exception:
    from wasidispatch.errors import SpecError

    return SpecError(f"{where}: {message}")


# -- building: libseccomp calls ---------------------------------------------------------------


def _build(lib: _Lib, plan: _Plan) -> Filter:
    from wasidispatch.errors import ExecutorError

    ctx = lib.init(plan.default_action)
    if not ctx:
        raise ExecutorError(
            f"seccomp: libseccomp {lib.version} refused the default action"
            f" {plan.default_action:#x} (not supported by this kernel?)"
        )
    built = Filter(lib, ctx)
    try:
        _set(lib, ctx, _FLTATR_CTL_NNP, 0, "no_new_privs off")
        rc = lib.attr_set(ctx, _FLTATR_CTL_TSYNC, 1)
        if rc < 0 and (_FLAG_TSYNC in plan.flags or -rc != errno.EOPNOTSUPP):
            raise ExecutorError(f"seccomp: cannot set {_FLAG_TSYNC}: {_strerror(rc)}")
        built.flags = _KERNEL_TSYNC if rc >= 0 else 0
        if _FLAG_LOG in plan.flags:
            built.flags |= _KERNEL_LOG
        if _FLAG_SPEC_ALLOW in plan.flags:
            built.flags |= _KERNEL_SPEC_ALLOW
        # the kernel's errno from seccomp_load rather than libseccomp's ECANCELED (>= 2.5.0)
        lib.attr_set(ctx, _FLTATR_API_SYSRAWRC, 1)
        if _FLAG_LOG in plan.flags:
            _set(lib, ctx, _FLTATR_CTL_LOG, 1, _FLAG_LOG)
        if _FLAG_SPEC_ALLOW in plan.flags:
            _set(lib, ctx, _FLTATR_CTL_SSB, 1, _FLAG_SPEC_ALLOW)
        if len(plan.rules) > _OPTIMIZE_ABOVE:
            lib.attr_set(ctx, _FLTATR_CTL_OPTIMIZE, 2)  # a speed-up only: failure is fine
        skipped_arches = []
        for oci_name, arch in plan.arches:
            token = lib.arch_resolve(arch)
            if not token:
                raise ExecutorError(
                    f"seccomp: libseccomp {lib.version} does not know {oci_name} ({arch})"
                )
            rc = lib.arch_add(ctx, token)
            if -rc == errno.EDOM:  # the other endianness: not in one filter with the native
                skipped_arches.append(oci_name)
            elif rc < 0 and -rc != errno.EEXIST:  # EEXIST: the native one
                raise ExecutorError(f"seccomp: cannot add {oci_name}: {_strerror(rc)}")
        built.skipped_architectures = tuple(skipped_arches)
        built.skipped = _add_rules(lib, ctx, plan)
    except BaseException:
        built.release()
        raise
    return built


def _add_rules(lib: _Lib, ctx: int, plan: _Plan) -> tuple[str, ...]:
    from wasidispatch.errors import ExecutorError

    skipped: dict[str, None] = {}
    numbers: dict[str, int] = {}
    for rule in plan.rules:
        if rule.action == plan.default_action:
            continue
        number = numbers.get(rule.name)
        if number is None:
            number = numbers[rule.name] = lib.syscall_resolve(rule.name)
        if number == _NR_SCMP_ERROR:
            skipped[rule.name] = None
            continue
        rc = lib.rule_add(ctx, rule.action, number, rule.conditions)
        if rc < 0:
            raise ExecutorError(
                f"seccomp: {rule.where}: libseccomp refused the rule for {rule.name!r}:"
                f" {_strerror(rc)}"
            )
    return tuple(skipped)


def _set(lib: _Lib, ctx: int, attr: int, value: int, what: str) -> None:
    from wasidispatch.errors import ExecutorError

    rc = lib.attr_set(ctx, attr, value)
    if rc < 0:
        raise ExecutorError(f"seccomp: cannot set {what}: {_strerror(rc)}")


def _strerror(rc: int) -> str:
    code = -rc
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


class _Lib:
    """libseccomp through ctypes, every prototype declared (seccomp.h, libseccomp >= 2.5)."""

    def __init__(self, soname: str) -> None:
        import ctypes

        from wasidispatch.errors import ExecutorError

        try:
            dll = ctypes.CDLL(soname)
        except OSError as exc:
            raise ExecutorError(
                f"seccomp: cannot load {soname} ({exc}): install libseccomp2"
            ) from exc

        def declare(
            name: str, restype: type[ctypes._SimpleCData[Any]] | None, *args: type[object]
        ) -> ctypes._NamedFuncPointer:
            try:
                function = getattr(dll, name)
            except AttributeError as exc:
                raise ExecutorError(f"seccomp: {soname} has no {name} (too old?)") from exc
            function.restype = restype
            function.argtypes = args
            return function  # type: ignore[no-any-return]

        class ArgCmp(ctypes.Structure):
            _fields_ = (
                ("arg", ctypes.c_uint),
                ("op", ctypes.c_int),  # enum scmp_compare
                ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64),
            )

        class Version(ctypes.Structure):
            _fields_ = (
                ("major", ctypes.c_uint),
                ("minor", ctypes.c_uint),
                ("micro", ctypes.c_uint),
            )

        ctx, u32, c_int = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
        self._arg_cmp = ArgCmp
        self._init = declare("seccomp_init", ctx, u32)
        self._release = declare("seccomp_release", None, ctx)
        self._load = declare("seccomp_load", c_int, ctx)
        self._attr_set = declare("seccomp_attr_set", c_int, ctx, c_int, u32)
        self._export_bpf = declare("seccomp_export_bpf", c_int, ctx, c_int)
        self._arch_resolve = declare("seccomp_arch_resolve_name", u32, ctypes.c_char_p)
        self._arch_add = declare("seccomp_arch_add", c_int, ctx, u32)
        self._syscall_resolve = declare("seccomp_syscall_resolve_name", c_int, ctypes.c_char_p)
        self._rule_add = declare(
            "seccomp_rule_add_array", c_int, ctx, u32, c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp)
        )
        version_fn = declare("seccomp_version", None)
        version_fn.restype = ctypes.POINTER(Version)
        v = version_fn().contents
        self.version = f"{v.major}.{v.minor}.{v.micro}"

    def init(self, action: int) -> int:
        return int(self._init(action) or 0)

    def release(self, ctx: int) -> None:
        self._release(ctx)

    def load(self, ctx: int) -> int:
        return int(self._load(ctx))

    def export_bpf(self, ctx: int, fd: int) -> int:
        return int(self._export_bpf(ctx, fd))

    def attr_set(self, ctx: int, attr: int, value: int) -> int:
        return int(self._attr_set(ctx, attr, value))

    def arch_resolve(self, name: str) -> int:
        return int(self._arch_resolve(name.encode()))

    def arch_add(self, ctx: int, token: int) -> int:
        return int(self._arch_add(ctx, token))

    def syscall_resolve(self, name: str) -> int:
        return int(self._syscall_resolve(name.encode()))

    def rule_add(self, ctx: int, action: int, number: int, conds: Sequence[Condition]) -> int:
        array = (self._arg_cmp * len(conds))(*(self._arg_cmp(*cond) for cond in conds))
        return int(self._rule_add(ctx, action, number, len(conds), array))


_LIB: _Lib | None = None  # a dlopen handle stays valid in a forked child


def _library() -> _Lib:
    global _LIB
    if _LIB is None:
        _LIB = _Lib(_SONAME)
    return _LIB

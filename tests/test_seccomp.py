"""wasidispatch._seccomp against the real libseccomp and kernel.

Every filter is loaded in a forked child (``in_child``: no_new_privs set, the result sent back
through a pipe, ``os._exit``), so the test process itself stays unfiltered; an autouse fixture
checks that. ``tests/data/seccomp/default-like.json`` is a hand-written profile shaped like
Docker's and containerd's defaults (see its ``comment``) with an allow list of our own.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wasidispatch import _seccomp
from wasidispatch.errors import ExecutorError, SpecError

DATA = Path(__file__).parent / "data"
DEFAULT_LIKE = DATA / "seccomp" / "default-like.json"
RUNTIME_SPEC = DATA / "oci" / "runtime-spec"

try:
    _seccomp._library()
except ExecutorError as exc:  # pragma: no cover - depends on the machine
    pytestmark = pytest.mark.skip(reason=str(exc))
if not sys.platform.startswith("linux"):  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="seccomp is Linux only")

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
NR_CLONE3 = 435  # the same number on every architecture (a syscall of the unified table)
PERSONA_QUERY = 0xFFFFFFFF
ADDR_NO_RANDOMIZE = 0x0040000
NOBODY = 65534

libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
libc.prctl.restype = ctypes.c_int
libc.personality.argtypes = [ctypes.c_ulong]
libc.personality.restype = ctypes.c_int
libc.syscall.restype = ctypes.c_long


def seccomp_mode() -> int:
    """The ``Seccomp:`` field of /proc/self/status (0 none, 2 filter)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return int(line.split()[1])
    raise AssertionError("no Seccomp field in /proc/self/status")


def personality(persona: int) -> int:
    """personality(2): the previous persona, or -errno."""
    ctypes.set_errno(0)
    rc = int(libc.personality(persona))
    return -ctypes.get_errno() if rc == -1 else rc


def errno_of(call: Callable[[], object]) -> int:
    """0 when ``call`` succeeds, else the errno of the OSError it raises."""
    try:
        call()
    except OSError as exc:
        return exc.errno or -1
    return 0


def in_child(body: Callable[[], object], *, privileged: bool = False) -> tuple[int, Any]:
    """Run ``body`` in a forked child; its wait status and ``{"value": ...}`` (what it
    returned) or ``{"raised": name, "message": ...}``, or None when it died first.

    The child sets no_new_privs (as the container process does before the filter), unless
    ``privileged``, and never dumps core (some tests kill it with SIGSYS).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - coverage does not follow the child
        try:
            os.close(read_fd)
            try:
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                assert libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
                if not privileged:
                    assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                report: dict[str, object] = {"value": body()}
            except Exception as exc:
                report = {"raised": type(exc).__name__, "message": str(exc)}
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    return status, json.loads(data) if data else None


def child_value(body: Callable[[], object], **kwargs: bool) -> Any:
    """``body``'s return value in a child that exited normally (its exception re-raised as
    an AssertionError with its message)."""
    status, report = in_child(body, **kwargs)
    assert os.WIFEXITED(status), f"child died: wait status {status:#x}"
    assert report is not None
    assert "raised" not in report, f"{report['raised']}: {report['message']}"
    return report["value"]


def allow_but(names: list[str], action: str, **rule: object) -> dict[str, object]:
    """A profile allowing everything except ``names``, which get ``action``."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": names, "action": action, **rule}],
    }


# mkdir(2) is mkdirat on arm64 and riscv64: a rule names both (the absent one is skipped)
MKDIR = ["mkdir", "mkdirat"]


@pytest.fixture(autouse=True)
def _test_process_stays_unfiltered() -> Iterator[None]:
    before = seccomp_mode()
    yield
    assert seccomp_mode() == before


def test_errno_rule_fails_only_its_syscall(tmp_path: Path) -> None:
    def body() -> dict[str, object]:
        _seccomp.load(allow_but(MKDIR, "SCMP_ACT_ERRNO", errnoRet=errno.EROFS))
        (tmp_path / "file").write_text("still writable")
        return {
            "mkdir": errno_of(lambda: os.mkdir(tmp_path / "d")),
            "read": (tmp_path / "file").read_text(),
            "pid": os.getpid(),
            "mode": seccomp_mode(),
        }

    seen = child_value(body)
    assert seen["mkdir"] == errno.EROFS
    assert seen["read"] == "still writable"
    assert seen["pid"] != os.getpid()
    assert seen["mode"] == 2
    assert not (tmp_path / "d").exists()


def test_errno_without_errno_ret_is_eperm(tmp_path: Path) -> None:
    def body() -> int:
        _seccomp.load(allow_but(MKDIR, "SCMP_ACT_ERRNO"))
        return errno_of(lambda: os.mkdir(tmp_path / "d"))

    assert child_value(body) == errno.EPERM


def test_seccomp_field_says_filter_after_load() -> None:
    def body() -> list[int]:
        before = seccomp_mode()
        _seccomp.load(allow_but(["mount"], "SCMP_ACT_ERRNO"))
        return [before, seccomp_mode()]

    assert child_value(body) == [0, 2]


def test_default_errno_with_an_allow_list_keeps_python_running(tmp_path: Path) -> None:
    profile = json.loads(DEFAULT_LIKE.read_text())
    source = Path(__file__).read_text()

    def body() -> dict[str, object]:
        _seccomp.load(profile)
        pid = os.fork()  # clone without namespace flags: allowed
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        ctypes.set_errno(0)
        clone3 = libc.syscall(ctypes.c_long(NR_CLONE3), ctypes.c_void_p(), ctypes.c_size_t(0))
        return {
            "read": Path(__file__).read_text() == source,
            "mkdir": errno_of(lambda: os.mkdir(tmp_path / "d")),
            "chroot": errno_of(lambda: os.chroot(tmp_path)),  # not in the list: the default
            "clone3": -ctypes.get_errno() if clone3 == -1 else clone3,
            "fork": os.waitstatus_to_exitcode(status),
            "query persona": personality(PERSONA_QUERY) >= 0,
            "other persona": personality(ADDR_NO_RANDOMIZE),
            "json": json.loads(json.dumps({"a": [1, 2]})),
        }

    seen = child_value(body)
    assert seen == {
        "read": True,
        "mkdir": 0,
        "chroot": errno.EPERM,
        "clone3": -errno.ENOSYS,  # an ERRNO rule, so that a libc falls back to clone
        "fork": 7,
        "query persona": True,
        "other persona": -errno.EPERM,
        "json": {"a": [1, 2]},
    }
    assert (tmp_path / "d").is_dir()


def test_default_like_profile_skips_names_unknown_to_libseccomp() -> None:
    profile = json.loads(DEFAULT_LIKE.read_text())
    with _seccomp.compile(profile) as built:
        skipped = set(built.skipped)
    names = set(profile["syscalls"][0]["names"])
    lib = _seccomp._library()
    assert skipped == {name for name in names if lib.syscall_resolve(name) == -1}
    assert "read" not in skipped
    assert "socketcall" not in skipped  # an x86 (32-bit) syscall: a rule for that arch


def test_unknown_syscall_names_are_skipped(tmp_path: Path) -> None:
    profile = allow_but(["no_such_syscall", *MKDIR, "no_such_syscall"], "SCMP_ACT_ERRNO")
    with _seccomp.compile(profile) as built:
        assert "no_such_syscall" in built.skipped
        assert "mkdir" not in built.skipped or "mkdirat" not in built.skipped
        assert built.skipped.count("no_such_syscall") == 1

        def body() -> int:
            built.load()  # built in the parent, loaded in the child
            return errno_of(lambda: os.mkdir(tmp_path / "d"))

        assert child_value(body) == errno.EPERM


def test_arg_equal_filters_only_that_value() -> None:
    rule = {"args": [{"index": 0, "value": PERSONA_QUERY, "op": "SCMP_CMP_EQ"}]}
    current = personality(PERSONA_QUERY)

    def body() -> list[int]:
        _seccomp.load(allow_but(["personality"], "SCMP_ACT_ERRNO", errnoRet=13, **rule))
        return [personality(PERSONA_QUERY), personality(current)]

    assert child_value(body) == [-errno.EACCES, current]


def test_two_conditions_on_one_argument_are_separate_rules() -> None:
    # ANDed, arg0 == A && arg0 == B could never match; runc adds one rule per condition
    args = [
        {"index": 0, "value": PERSONA_QUERY, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": ADDR_NO_RANDOMIZE, "valueTwo": 0, "op": "SCMP_CMP_EQ"},
    ]
    current = personality(PERSONA_QUERY)

    def body() -> list[int]:
        _seccomp.load(allow_but(["personality"], "SCMP_ACT_ERRNO", errnoRet=13, args=args))
        return [personality(PERSONA_QUERY), personality(ADDR_NO_RANDOMIZE), personality(current)]

    assert child_value(body) == [-errno.EACCES, -errno.EACCES, current]


def test_conditions_on_different_arguments_are_anded(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("x")
    args = [  # openat(dirfd, path, flags, mode): O_CREAT in flags and mode 0600
        {"index": 2, "value": os.O_CREAT, "valueTwo": os.O_CREAT, "op": "SCMP_CMP_MASKED_EQ"},
        {"index": 3, "value": 0o600, "op": "SCMP_CMP_EQ"},
    ]
    profile = allow_but(["openat"], "SCMP_ACT_ERRNO", errnoRet=errno.EROFS, args=args)
    flags = os.O_WRONLY | os.O_CREAT

    def body() -> dict[str, int]:
        _seccomp.load(profile)
        return {
            "read": errno_of(lambda: os.close(os.open(tmp_path / "old", os.O_RDONLY))),
            "create 0600": errno_of(lambda: os.open(tmp_path / "a", flags, 0o600)),
            "create 0644": errno_of(lambda: os.close(os.open(tmp_path / "b", flags, 0o644))),
        }

    assert child_value(body) == {"read": 0, "create 0600": errno.EROFS, "create 0644": 0}
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("op", "denied"),
    [
        ("SCMP_CMP_NE", [1999, 2001]),
        ("SCMP_CMP_LT", [1999]),
        ("SCMP_CMP_LE", [1999, 2000]),
        ("SCMP_CMP_EQ", [2000]),
        ("SCMP_CMP_GE", [2000, 2001]),
        ("SCMP_CMP_GT", [2001]),
    ],
)
def test_comparison_operators(op: str, denied: list[int]) -> None:
    # close() of an fd that is not open: EBADF, or the rule's EACCES where the op matches
    args = [{"index": 0, "value": 2000, "op": op}]
    fds = [1999, 2000, 2001]

    def body() -> list[int]:
        _seccomp.load(allow_but(["close"], "SCMP_ACT_ERRNO", errnoRet=13, args=args))
        return [errno_of(functools.partial(os.close, fd)) for fd in fds]

    expected = [errno.EACCES if fd in denied else errno.EBADF for fd in fds]
    assert child_value(body) == expected


HIGH = 0xFFFFFFFF_00000000


@pytest.mark.skipif(sys.maxsize < 2**32, reason="64-bit syscall arguments")
@pytest.mark.parametrize(
    ("condition", "denied"),
    [
        ({"value": 1 << 32 | 2000, "op": "SCMP_CMP_EQ"}, False),
        ({"value": HIGH, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}, True),
        ({"value": HIGH, "valueTwo": 1 << 32, "op": "SCMP_CMP_MASKED_EQ"}, False),
        ({"value": 2**64 - 1, "op": "SCMP_CMP_LT"}, True),
    ],
)
def test_values_are_compared_on_64_bits(condition: dict[str, object], denied: bool) -> None:
    args = [{"index": 0, **condition}]

    def body() -> int:
        _seccomp.load(allow_but(["close"], "SCMP_ACT_ERRNO", errnoRet=13, args=args))
        return errno_of(functools.partial(os.close, 2000))

    assert child_value(body) == (errno.EACCES if denied else errno.EBADF)


def test_trace_without_a_tracer_is_enosys(tmp_path: Path) -> None:
    def body() -> int:
        _seccomp.load(allow_but(MKDIR, "SCMP_ACT_TRACE"))
        return errno_of(lambda: os.mkdir(tmp_path / "d"))

    assert child_value(body) == errno.ENOSYS


@pytest.mark.parametrize(
    "action", ["SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP"]
)
def test_kill_and_trap_end_the_child_with_sigsys(tmp_path: Path, action: str) -> None:
    def body() -> str:
        _seccomp.load(allow_but(MKDIR, action))
        os.mkdir(tmp_path / "d")
        return "survived"

    status, report = in_child(body)
    assert report is None
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGSYS
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("action", "process_dies"),
    [("SCMP_ACT_KILL_PROCESS", True), ("SCMP_ACT_KILL_THREAD", False), ("SCMP_ACT_KILL", False)],
)
def test_kill_process_ends_every_thread_kill_thread_one(
    tmp_path: Path, action: str, process_dies: bool
) -> None:
    def body() -> str:
        _seccomp.load(allow_but(MKDIR, action))
        started, tid = threading.Event(), []

        def other() -> None:
            tid.append(threading.get_native_id())
            started.set()
            os.mkdir(tmp_path / "d")

        threading.Thread(target=other, daemon=True).start()
        started.wait()
        while os.path.exists(f"/proc/self/task/{tid[0]}"):  # until the kernel ends it
            time.sleep(0.001)
        return "main thread survived"

    status, report = in_child(body)
    if process_dies:
        assert report is None
        assert os.WIFSIGNALED(status)
        assert os.WTERMSIG(status) == signal.SIGSYS
    else:
        assert report == {"value": "main thread survived"}
    assert not (tmp_path / "d").exists()


def test_filter_reaches_every_thread(tmp_path: Path) -> None:
    def body() -> dict[str, object]:
        go, seen = threading.Event(), dict[str, object]()

        def other() -> None:
            go.wait()
            seen["mkdir"] = errno_of(lambda: os.mkdir(tmp_path / "d"))

        thread = threading.Thread(target=other)
        thread.start()  # before the filter: TSYNC puts it on this thread too
        _seccomp.load(allow_but(MKDIR, "SCMP_ACT_ERRNO", errnoRet=errno.EROFS))
        go.set()
        thread.join()
        return seen

    assert child_value(body) == {"mkdir": errno.EROFS}


def test_flags_load() -> None:
    flags = [
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",  # ignored: only a listener waits
    ]

    def body() -> int:
        _seccomp.load({**allow_but(["mount"], "SCMP_ACT_ERRNO"), "flags": flags})
        return seccomp_mode()

    assert child_value(body) == 2


def test_log_default_lets_calls_run(tmp_path: Path) -> None:
    def body() -> int:
        _seccomp.load({"defaultAction": "SCMP_ACT_LOG"})
        return errno_of(lambda: os.mkdir(tmp_path / "d"))

    assert child_value(body) == 0
    assert (tmp_path / "d").is_dir()


def test_a_rule_equal_to_the_default_is_skipped(tmp_path: Path) -> None:
    profile = json.loads(DEFAULT_LIKE.read_text())
    profile["syscalls"].append({"names": ["chroot"], "action": "SCMP_ACT_ERRNO"})  # EPERM: 1

    def body() -> list[int]:
        _seccomp.load(profile)  # libseccomp would refuse the chroot rule with EACCES
        return [errno_of(lambda: os.chroot(tmp_path)), errno_of(lambda: os.mkdir(tmp_path / "d"))]

    assert child_value(body) == [errno.EPERM, 0]
    with _seccomp.compile(allow_but(MKDIR, "SCMP_ACT_ALLOW")) as built:
        assert built.skipped == ()


def test_runtime_spec_example_profile(tmp_path: Path) -> None:
    config = json.loads((RUNTIME_SPEC / "config" / "valid-spec-example.json").read_text())
    profile = config["linux"]["seccomp"]  # ERRNO for getcwd and chmod, two extra arches
    (tmp_path / "f").write_text("")

    def body() -> list[int]:
        _seccomp.load(profile)
        return [errno_of(os.getcwd), errno_of(lambda: os.chmod(tmp_path / "f", 0o600))]

    assert child_value(body) == [errno.EPERM, errno.EPERM]


def test_every_action_operator_and_arch_runc_knows_compiles() -> None:
    features = json.loads((RUNTIME_SPEC / "features" / "valid-runc.json").read_text())
    seccomp = features["linux"]["seccomp"]
    actions = [a for a in seccomp["actions"] if a not in ("SCMP_ACT_NOTIFY", "SCMP_ACT_ALLOW")]
    assert len(actions) == 5
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": seccomp["archs"],
        "flags": seccomp["knownFlags"],
        "syscalls": [
            {
                "names": [name],
                "action": action,
                "args": [{"index": i, "value": 1, "op": op} for i, op in enumerate(ops)],
            }
            for name, action, ops in zip(
                ["mount", "umount2", "chroot", "pivot_root", "swapon", "swapoff", "reboot"],
                actions,
                [seccomp["operators"][:6], seccomp["operators"][6:], [], [], [], [], []],
                strict=False,
            )
        ],
    }
    with _seccomp.compile(profile) as built:
        assert built.skipped == ()
        skipped_arches = set(built.skipped_architectures)
    # a filter holds one endianness: on a little-endian host the big-endian ones are left out
    big_endian = {"MIPS", "MIPS64", "MIPS64N32", "PPC", "PPC64", "S390", "S390X"}
    big = {f"SCMP_ARCH_{name}" for name in big_endian}
    assert skipped_arches == (big if sys.byteorder == "little" else set(seccomp["archs"]) - big)


def test_compile_then_release_refuses_to_load() -> None:
    built = _seccomp.compile(allow_but(MKDIR, "SCMP_ACT_ERRNO"))
    built.release()
    built.release()  # idempotent

    def body() -> int:
        with pytest.raises(ExecutorError, match="released"):
            built.load()
        return seccomp_mode()

    assert child_value(body) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_without_no_new_privs_an_unprivileged_load_fails_with_eacces() -> None:
    profile = allow_but(["mount"], "SCMP_ACT_ERRNO")

    def body(nnp: bool) -> Callable[[], int]:
        def run() -> int:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            if nnp:
                assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            _seccomp.load(profile)
            return seccomp_mode()

        return run

    status, report = in_child(body(nnp=False), privileged=True)
    assert os.WIFEXITED(status)
    assert report["raised"] == "ExecutorError"
    assert "EACCES" in report["message"]
    assert "no_new_privs" in report["message"]
    assert child_value(body(nnp=True), privileged=True) == 2


def test_root_without_no_new_privs_loads() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs CAP_SYS_ADMIN")

    def body() -> int:
        _seccomp.load(allow_but(["mount"], "SCMP_ACT_ERRNO"))
        return seccomp_mode()

    assert child_value(body, privileged=True) == 2


def test_notify_is_refused() -> None:
    with pytest.raises(SpecError, match=r"syscalls\[0\]\.action: SCMP_ACT_NOTIFY is not supp"):
        _seccomp.compile(allow_but(["openat"], "SCMP_ACT_NOTIFY"))
    with pytest.raises(SpecError, match=r"defaultAction: SCMP_ACT_NOTIFY is not supported"):
        _seccomp.compile({"defaultAction": "SCMP_ACT_NOTIFY", "listenerPath": "/run/agent"})


def entry(**fields: object) -> dict[str, object]:
    """A profile whose one syscall entry is mkdir/ERRNO updated with ``fields``."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", **fields}],
    }


def arg(**fields: object) -> dict[str, object]:
    return entry(args=[{"index": 0, "value": 1, "op": "SCMP_CMP_EQ", **fields}])


INVALID = [
    ([], "linux.seccomp: must be an object"),
    ({}, "defaultAction: is required"),
    ({"defaultAction": "SCMP_ACT_NOPE"}, "unknown action 'SCMP_ACT_NOPE'"),
    ({"defaultAction": 0}, "defaultAction: unknown action 0"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1}, "defaultErrnoRet: is only"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1}, "defaultErrnoRet: must be"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 4095}, "from 0 to 4094"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": True}, "defaultErrnoRet"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": "1"}, "defaultErrnoRet"),
    (
        {"defaultAction": "SCMP_ACT_ALLOW", "architectures": "SCMP_ARCH_X86_64"},
        "architectures: must be a list, not str",
    ),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["x86_64"]}, "architectures[0]"),
    (
        {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86", "SCMP_ARCH_VAX"]},
        "architectures[1]: unknown architecture 'SCMP_ARCH_VAX'",
    ),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NOPE"]}, "flags[0]"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {"names": ["mkdir"]}}, "must be a list"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": "mkdir"}, "syscalls: must be a list"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [["mkdir"]]}, "syscalls[0]: must be an"),
    (entry(names=None), "names: must list at least one"),
    (entry(names=[]), "names: must list at least one"),
    (entry(names="mkdir"), "names: must be a list"),
    (entry(names=["mkdir", ""]), "names[1]: not a syscall name"),
    (entry(names=[83]), "names[0]: not a syscall name"),
    (entry(action=None), "syscalls[0].action: is required"),
    (entry(action="SCMP_ACT_NOPE"), "syscalls[0].action: unknown action"),
    (entry(action="SCMP_ACT_ALLOW", errnoRet=1), "syscalls[0].errnoRet: is only valid"),
    (entry(action="SCMP_ACT_TRACE", errnoRet=70000), "errnoRet: must be an integer from 0 to"),
    (entry(args={"index": 0}), "syscalls[0].args: must be a list"),
    (entry(args=[0]), "args[0]: must be an object"),
    (arg(index=6), "args[0].index: must be an integer from 0 to 5"),
    (arg(index=-1), "args[0].index"),
    (arg(index=None), "args[0].index"),
    (arg(op="SCMP_CMP_NOPE"), "args[0].op: unknown operator 'SCMP_CMP_NOPE'"),
    (arg(op=None), "args[0].op: unknown operator None"),
    (arg(value=None), "args[0].value: must be an integer"),
    (arg(value=2**64), "args[0].value"),
    (arg(value=1.0), "args[0].value"),
    (arg(valueTwo="0"), "args[0].valueTwo"),
]


@pytest.mark.parametrize(("profile", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_profiles_raise_spec_error(profile: object, message: str) -> None:
    with pytest.raises(SpecError) as raised:
        _seccomp.compile(profile)  # type: ignore[arg-type]
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_an_invalid_profile_loads_nothing(tmp_path: Path) -> None:
    profile = allow_but(MKDIR, "SCMP_ACT_ERRNO")
    profile["syscalls"].append(  # type: ignore[attr-defined]
        {"names": ["rmdir"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 9, "value": 0}]}
    )

    def body() -> list[object]:
        with pytest.raises(SpecError, match=r"syscalls\[1\]\.args\[0\]\.index"):
            _seccomp.load(profile)
        return [seccomp_mode(), errno_of(lambda: os.mkdir(tmp_path / "d"))]

    assert child_value(body) == [0, 0]


def test_unknown_fields_are_ignored() -> None:
    profile = {**allow_but(MKDIR, "SCMP_ACT_ERRNO"), "listenerMetadata": "x", "future": [1]}
    with _seccomp.compile(profile) as built:
        assert isinstance(built, _seccomp.Filter)


def test_missing_library_is_an_executor_error() -> None:
    with pytest.raises(ExecutorError, match=r"cannot load libseccomp-absent\.so\.0"):
        _seccomp._Lib("libseccomp-absent.so.0")


def test_an_architecture_unknown_to_libseccomp_is_an_executor_error() -> None:
    # a valid OCI architecture that libseccomp 2.5 predates
    lib = _seccomp._library()
    if lib.arch_resolve("loongarch64"):
        pytest.skip(f"libseccomp {lib.version} knows loongarch64")
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_LOONGARCH64"]}
    with pytest.raises(
        ExecutorError, match=rf"libseccomp {lib.version} does not know SCMP_ARCH_LOONGARCH64"
    ):
        _seccomp.compile(profile)


def test_an_exported_program_filters_as_the_filter_does(tmp_path: Path) -> None:
    """`program` builds the BPF once (in the parent: a zygote) and the child loads it with
    one seccomp(2) call: the same answers as `load`, the same Seccomp field."""
    profile = json.loads(DEFAULT_LIKE.read_text())
    built = _seccomp.program(profile)
    assert _seccomp.program(json.loads(DEFAULT_LIKE.read_text())) is built  # remembered
    assert len(built.bpf) % 8 == 0
    assert built.flags & 1  # TSYNC, as libseccomp asks

    def body() -> dict[str, object]:
        built.load()
        return {
            "mkdir": errno_of(lambda: os.mkdir(tmp_path / "d")),
            "chroot": errno_of(lambda: os.chroot(tmp_path)),
            "seccomp": seccomp_mode(),
        }

    assert child_value(body) == {"mkdir": 0, "chroot": errno.EPERM, "seccomp": 2}
    deny = _seccomp.program(allow_but(MKDIR, "SCMP_ACT_ERRNO", errnoRet=errno.EXDEV))

    def denied() -> int:
        deny.load()
        return errno_of(lambda: os.mkdir(tmp_path / "e"))

    assert child_value(denied) == errno.EXDEV
    with pytest.raises(SpecError):
        _seccomp.program({"defaultAction": "SCMP_ACT_NOPE"})

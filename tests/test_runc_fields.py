"""Every config.json field the runtime command reads is checked, with a message naming it.

`LeanBundle.load` is what ``wasidispatch-runc create`` reads a bundle with: a wrong JSON
type, a number out of range (``1e308``, ``NaN``, beyond 64 bits, negative, a boolean), a
string with a NUL or a lone surrogate, JSON nested too deep, and a config.json that is a
FIFO, a device, a directory or huge are each a `SpecError` naming the field (or
config.json), never another exception. Through the real command each is runc's log line
and exit status 1, with nothing left behind. Fuzzed at the end (hypothesis).
"""

# The fixtures are test_runc_cli's, imported by name (pytest finds them in the module):
# ruff: noqa: F811
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_runc_cli import (  # noqa: F401 - fixtures
    Runtime,
    cgroup_dirs,
    cgroup_name,
    needs_runtime,
    runtime,
    subreaper,
    wasm_bundle,
    wasm_env,
)
from wasidispatch.errors import SpecError
from wasidispatch.runc.spec import LeanBundle

BASE: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "root": {"path": "rootfs"},
    "process": {"args": ["/app.wasm"], "cwd": "/", "env": ["PATH=/bin"]},
    "linux": {"cgroupsPath": "/c", "resources": {"memory": {"limit": 1 << 20}}},
}


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return doc


BAD: list[tuple[str, Any, str]] = [
    ("linux.cgroupsPath", 7, "linux.cgroupsPath: not a string"),
    ("linux.cgroupsPath", "/a\0b", "linux.cgroupsPath: contains a NUL"),
    ("linux.resources.pids.limit", "5", "linux.resources.pids.limit: not an integer"),
    ("linux.resources.pids.limit", True, "linux.resources.pids.limit: not an integer"),
    (
        "linux.resources.pids.limit",
        1 << 64,
        "linux.resources.pids.limit: 18446744073709551616 is out",
    ),
    ("linux.resources.pids.limit", -5, "linux.resources.pids.limit: -5 is out of range"),
    ("linux.resources.pids", 3, "linux.resources.pids: not an object"),
    ("linux.resources.memory.limit", 1e308, "linux.resources.memory.limit: not an integer"),
    ("linux.resources.memory.limit", 1.5, "linux.resources.memory.limit: not an integer"),
    ("linux.resources.memory.limit", -2, "linux.resources.memory.limit: -2 is out of range"),
    ("linux.resources.memory.limit", 1 << 63, "linux.resources.memory.limit: 9223372036854775808"),
    ("linux.resources.memory.reservation", "x", "linux.resources.memory.reservation: not an"),
    ("linux.resources.memory.swap", [], "linux.resources.memory.swap: not an integer"),
    ("linux.resources.cpu.shares", -1, "linux.resources.cpu.shares: -1 is out of range"),
    ("linux.resources.cpu.quota", 1e3, "linux.resources.cpu.quota: not an integer"),
    ("linux.resources.cpu.period", 1 << 64, "linux.resources.cpu.period: 18446744073709551616"),
    ("linux.resources.cpu.cpus", 0, "linux.resources.cpu.cpus: not a string"),
    ("linux.resources", [], "linux.resources: not an object"),
    ("linux", "x", "linux: not an object"),
    ("process.oomScoreAdj", "1", "process.oomScoreAdj: not an integer"),
    ("process.oomScoreAdj", 1001, "process.oomScoreAdj: 1001 is out of range [-1000, 1000]"),
    ("process.oomScoreAdj", False, "process.oomScoreAdj: not an integer"),
    ("process.terminal", "yes", "process.terminal: not a boolean"),
    ("process.noNewPrivileges", 1, "process.noNewPrivileges: not a boolean"),
    ("process.rlimits", {}, "process.rlimits: not a list of objects"),
    ("process.rlimits", [{"type": "RLIMIT_NOPE", "soft": 1, "hard": 1}], "unknown rlimit"),
    ("process.rlimits", [{"type": "RLIMIT_CORE", "soft": -1, "hard": 1}], "rlimits.0.soft"),
    ("process.rlimits", [{"type": "RLIMIT_CORE", "soft": 2, "hard": 1}], "above hard"),
    ("process.user", {"uid": 1 << 32}, "process.user.uid: 4294967296 is out of range"),
    ("process.user", {"gid": "0"}, "process.user.gid: not an integer"),
    ("process.user", {"additionalGids": [-1]}, "process.user.additionalGids: not a list"),
    ("process.args", "/app.wasm", "process.args: not a list of strings"),
    ("process.args", ["/app\0.wasm"], "process.args.0: contains a NUL"),
    ("process.args", ["/app\ud800.wasm"], "process.args.0: contains a lone surrogate"),
    ("process.env", ["PATH=/bin\0/x"], "process.env.0: contains a NUL"),
    ("process.env", ["PATH=\udcff"], "process.env.0: contains a lone surrogate"),
    ("process.env", {"PATH": "/bin"}, "process.env: not a list of strings"),
    ("process.cwd", 1, "process.cwd: not a string"),
    ("process.cwd", "/\0", "process.cwd: contains a NUL"),
    ("process.cwd", "/\udc80", "process.cwd: contains a lone surrogate"),
    ("process", [], "process: not an object"),
    ("root.path", 5, "root.path: required"),
    ("root.path", "root\0fs", "root.path: contains a NUL"),
    ("root.readonly", "true", "root.readonly: not a boolean"),
    ("root", "rootfs", "root.path: required"),
    ("annotations", {"a": 1}, "annotations: not a map of strings"),
    ("annotations", ["a"], "annotations: not a map of strings"),
    ("mounts", [{"destination": 1}], "mounts.0.destination: not a string"),
    ("ociVersion", 1, "ociVersion: not a string"),
]


def _write(bundle: Path, doc: Any) -> None:
    (bundle / "rootfs").mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(("field", "value", "message"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_each_bad_field_is_a_spec_error_naming_it(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    _write(tmp_path, _set(BASE, field, value))
    with pytest.raises(SpecError) as caught:
        LeanBundle.load(tmp_path)
    assert message in str(caught.value)
    assert str(tmp_path / "config.json") in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"root": {"path": "rootfs"}, "linux": {"resources": {"pids": {"limit": NaN}}}}', "NaN"),
        ('{"root": {"path": "rootfs"}, "process": {"oomScoreAdj": Infinity}}', "Infinity"),
        ('{"root": {"path": "rootfs"}, "process": {"oomScoreAdj": 1e400}}', "oomScoreAdj: not an"),
        ('{"root": {"path": "rootfs"}, "process": {"oomScoreAdj": ' + "9" * 5000 + "}}", "JSON"),
        ("[]", "not a JSON object"),
        ("{", "not valid JSON"),
        (b"\xff\xfe".decode("latin-1"), "not valid JSON"),
    ],
)
def test_bad_json_is_a_spec_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(SpecError, match=message):
        LeanBundle.load(tmp_path)


def _special(bundle: Path, kind: str) -> None:
    config = bundle / "config.json"
    config.unlink(missing_ok=True)
    if kind == "devzero":
        config.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(config)
    elif kind == "directory":
        config.mkdir()
    else:  # 100 MB, sparse: reading it whole would cost 100 MB
        with config.open("wb") as fh:
            fh.truncate(100 << 20)


SPECIAL = {
    "devzero": "not a regular file (character device)",
    "fifo": "not a regular file (FIFO)",
    "directory": "not a regular file (directory)",
    "huge": "over the 4194304-byte limit",
}


@pytest.mark.parametrize("kind", sorted(SPECIAL))
def test_config_json_must_be_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    (tmp_path / "rootfs").mkdir()
    _special(tmp_path, kind)
    with pytest.raises(SpecError) as caught:
        LeanBundle.load(tmp_path)
    assert str(caught.value).startswith("config.json ")
    assert SPECIAL[kind] in str(caught.value)


def _assert_refused(runtime: Runtime, proc: Any, message: str, cid: str) -> None:
    assert proc.returncode == 1
    assert proc.stderr == ""  # no traceback, nothing on the container's stderr
    errors = runtime.errors()
    assert len(errors) == 1, errors
    assert message in errors[0]
    assert "internal error" not in errors[0]
    assert not (runtime.root / cid).exists()


@needs_runtime
@pytest.mark.parametrize("kind", sorted(SPECIAL))
def test_create_refuses_a_config_json_that_is_not_a_small_regular_file(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None, kind: str
) -> None:
    """Before the fix a FIFO hung `create` and /dev/zero ate memory until killed."""
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    _special(bundle, kind)
    with (tmp_path / "out").open("wb") as out:
        proc = runtime("create", "--bundle", str(bundle), "f1", stdout=out)
    _assert_refused(runtime, proc, SPECIAL[kind], "f1")


CLI_BAD = [
    ("process.args", ["/app.wasm\ud800"], "process.args.0: contains a lone surrogate"),
    ("process.cwd", "/\0", "process.cwd: contains a NUL"),
    ("process.env", ["PATH=/bin\0"], "process.env.0: contains a NUL"),
    ("linux.cgroupsPath", "/x\0y", "linux.cgroupsPath: contains a NUL"),
    ("linux.cgroupsPath", ["/x"], "linux.cgroupsPath: not a string"),
    ("linux.resources.pids.limit", "max", "linux.resources.pids.limit: not an integer"),
    ("linux.resources.memory.limit", 1 << 64, "linux.resources.memory.limit: 1844674407"),
    ("process.oomScoreAdj", 5000, "process.oomScoreAdj: 5000 is out of range"),
    ("process.oomScoreAdj", "high", "process.oomScoreAdj: not an integer"),
    ("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": "1"}], "rlimits.0.soft: not an"),
    ("process.user", {"uid": -1}, "process.user.uid: -1 is out of range"),
    ("process.terminal", "no", "process.terminal: not a boolean"),
]


@needs_runtime
@pytest.mark.parametrize(("field", "value", "message"), CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_create_refuses_a_bad_field_in_runcs_log_format(
    runtime: Runtime,
    tmp_path: Path,
    cgroup_name: str,
    wasm_env: None,
    field: str,
    value: Any,
    message: str,
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps(_set(config, field, value)))
    with (tmp_path / "out").open("wb") as out:
        proc = runtime(
            "create", "--bundle", str(bundle), "--pid-file", str(bundle / "p"), "f2", stdout=out
        )
    _assert_refused(runtime, proc, message, "f2")
    assert not (bundle / "p").exists()
    assert cgroup_dirs(cgroup_name) == []


@needs_runtime
def test_rlimit_infinity_is_clamped_not_an_overflow(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    """Go's RLIM_INFINITY (2**64 - 1) is a valid OCI rlimit; Python's setrlimit takes -1."""
    from tests.test_runc_cli import create, wait_exit

    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    config = json.loads((bundle / "config.json").read_text())
    rlimit = {"type": "RLIMIT_CORE", "soft": (1 << 64) - 1, "hard": (1 << 64) - 1}
    (bundle / "config.json").write_text(json.dumps(_set(config, "process.rlimits", [rlimit])))
    pid = create(runtime, bundle, "f3", tmp_path / "out")
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert any(
        line.startswith("Max core file size") and "unlimited" in line
        for line in limits.splitlines()
    )
    assert runtime("start", "f3").returncode == 0
    assert wait_exit(pid) == 0
    assert runtime("delete", "f3").returncode == 0


# ----------------------------------------------------------------------------- fuzzing

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)

_FIELDS = [
    "ociVersion",
    "root",
    "root.path",
    "root.readonly",
    "annotations",
    "mounts",
    "process",
    "process.args",
    "process.cwd",
    "process.env",
    "process.terminal",
    "process.oomScoreAdj",
    "process.noNewPrivileges",
    "process.rlimits",
    "process.user",
    "process.user.uid",
    "process.user.additionalGids",
    "linux",
    "linux.cgroupsPath",
    "linux.resources",
    "linux.resources.memory",
    "linux.resources.memory.limit",
    "linux.resources.pids.limit",
    "linux.resources.cpu",
    "linux.resources.cpu.shares",
]

_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load_only_spec_error(bundle: Path, doc: Any) -> None:
    (bundle / "config.json").write_text(json.dumps(doc))
    try:
        loaded = LeanBundle.load(bundle)
    except SpecError:
        return
    # what create goes on to read must not raise either, but as a typed error
    from wasidispatch.errors import WasiDispatchError

    with contextlib.suppress(WasiDispatchError):
        loaded.resolve_entrypoint()


@_SETTINGS
@given(field=st.sampled_from(_FIELDS), value=_JSON)
def test_fuzz_any_json_value_at_any_field(tmp_path: Path, field: str, value: Any) -> None:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    _load_only_spec_error(tmp_path, _set(BASE, field, value))


@_SETTINGS
@given(doc=_JSON)
def test_fuzz_any_json_document(tmp_path: Path, doc: Any) -> None:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    _load_only_spec_error(tmp_path, doc)


@_SETTINGS
@given(data=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzz_any_bytes(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_bytes(data)
    with contextlib.suppress(SpecError):
        LeanBundle.load(tmp_path)


@needs_runtime
@pytest.mark.parametrize("value", ["99999999999999999999", "-1", "+3", " 1", "1_0", "١"])
def test_create_refuses_a_bad_preserve_fds(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None, value: str
) -> None:
    """A count beyond any process's descriptors was a set of that many numbers (memory and
    time without end); Go's parser refuses a sign, spaces, "_" and non-ASCII digits."""
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    with (tmp_path / "out").open("wb") as out:
        proc = runtime("create", "--preserve-fds", value, "--bundle", str(bundle), "f4", stdout=out)
    _assert_refused(runtime, proc, "--preserve-fds", "f4")
    assert cgroup_dirs(cgroup_name) == []


def _runc_template() -> dict[str, Any]:
    """``runc spec``'s own config.json (a real, full document), or BASE without runc."""
    import shutil
    import subprocess
    import tempfile

    runc = shutil.which("runc")
    if runc is None:
        return BASE
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([runc, "spec", "--bundle", tmp], check=True)
        doc: dict[str, Any] = json.loads((Path(tmp) / "config.json").read_text())
    doc["process"]["args"] = ["/app.wasm"]
    return doc


_TEMPLATE = _runc_template()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


_TEMPLATE_PATHS = _paths(_TEMPLATE)


@_SETTINGS
@given(where=st.lists(st.sampled_from(_TEMPLATE_PATHS), min_size=1, max_size=3), data=st.data())
def test_fuzz_mutated_real_config(tmp_path: Path, where: list[tuple[Any, ...]], data: Any) -> None:
    """``runc spec``'s document with up to three of its values (any depth) replaced by any
    JSON value: only `SpecError`."""
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    doc = copy.deepcopy(_TEMPLATE)
    for path in where:
        node = doc
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = data.draw(_JSON)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced a parent
    _load_only_spec_error(tmp_path, doc)

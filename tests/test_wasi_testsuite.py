"""The WASI conformance runner (`tests.wasi_testsuite`), and the public suite when present.

The runner's own behaviour is checked on a small suite written here in the public suite's
format, from real guests (``tests/guests``), run through the real CLI on wasmtime. The public
suite (WebAssembly/wasi-testsuite, ``prod/testsuite-base``) cannot be downloaded in CI: set
``WASI_TESTSUITE`` to its directory to run it on every installed engine; a test that is not
in the engine's documented failures (docs/engines.md) fails.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests import wasi_testsuite as suite
from tests.guests import build_c
from wasidispatch import engines

needs_clang = pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")

# Failures measured on wasi-testsuite prod/testsuite-base 9f80ca35 (docs/engines.md has the
# cause of each). A test that passes is fine; a test that fails and is not listed is a
# regression.
_BUNDLE_DEVIATION = frozenset({"sock_shutdown-invalid_fd"})  # fd 3 is the rootfs preopen
KNOWN_FAILURES: dict[str, frozenset[str]] = {
    "wasmtime": _BUNDLE_DEVIATION,
    "wasmtime-fast": _BUNDLE_DEVIATION,
    "wasmer": _BUNDLE_DEVIATION
    | frozenset(
        {
            # the first preopen "/" refuses path_create_directory / path_open(O_CREAT)
            "fd_fdstat_set_rights",
            "fd_readdir",
            "file_allocate",
            "file_pread_pwrite",
            "file_seek_tell",
            "file_truncation",
            "file_unbuffered_write",
            "isatty",
            "nofollow_errors",
            "overwrite_preopen",
            "path_exists",
            "path_filestat",
            "path_link",
            "path_open_create_existing",
            "path_open_dirfd_not_dir",
            "path_open_missing",
            "path_rename",
            "path_rename_dir_trailing_slashes",
            "path_symlink_trailing_slashes",
            "readlink",
            "remove_nonempty_directory",
            "renumber",
            "stdio",
            "symlink_create",
            "symlink_filestat",
            "symlink_loop",
            "truncation_rights",
            "unlink_file_trailing_slashes",
            "interesting_paths",
            "directory_seek",
            "remove_directory_trailing_slashes",
            "dangling_fd",
            "fd_advise",
            "fd_filestat_set",
            "fd_flags_set",
            "fstflags_validate",
            "path_open_read_write",
            # path_open of a directory without O_DIRECTORY is EISDIR
            "path_open_nonblock",
            "path_open_preopen",
            # fd_prestat_dir_name(len 0) is EOVERFLOW; fd_seek on a directory succeeds
            "dir_fd_op_failures",
            # fd_close of a preopen leaves it open
            "close_preopen",
            # sock_shutdown of stdout is EACCES, not ENOTSOCK
            "sock_shutdown-not_sock",
        }
    ),
}


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc))


def _mini_suite(root: Path) -> Path:
    """A suite in wasi-testsuite's layout: manifest, modules, specs and a ``root`` dir."""
    tests = root / "c" / "wasm32-wasip1"
    data = tests / "data.dir"
    data.mkdir(parents=True)
    (data / "greeting.txt").write_text("hi there\n")
    _write(tests / "manifest.json", {"name": "mini [wasm32-wasip1]", "version": "wasm32-wasip1"})
    cases: dict[str, tuple[str, dict[str, Any]]] = {
        "read-root": ("files", {"root": "data.dir", "args": ["read", "greeting.txt"]}),
        "write-root": ("files", {"root": "data.dir", "args": ["write", "new.txt", "x"]}),
        "exit-code": ("exit", {"args": ["33"], "exit_code": 33}),
        "legacy-dirs": ("files", {"dirs": ["data.dir"], "args": ["read", "data.dir/greeting.txt"]}),
        "env-only": ("env", {"env": {"A": "1"}}),
        "argv": ("args", {"args": ["a b", "c"]}),
        "wrong-stdout": ("args", {"stdout": "nope"}),
        "wrong-exit": ("exit", {"args": ["3"]}),
        "ops": (
            "cat",
            {
                "operations": [
                    {"type": "run"},
                    {"type": "write", "payload": "fed"},
                    {"type": "read", "payload": "fed"},
                    {"type": "wait"},
                ]
            },
        ),
        "socket": (
            "hello",
            {"operations": [{"type": "run"}, {"type": "connect"}, {"type": "wait"}]},
        ),
    }
    for name, (guest, spec) in cases.items():
        shutil.copyfile(build_c(guest), tests / f"{name}.wasm")
        _write(tests / f"{name}.json", spec)
    # expectations that need the guest's own output
    _write(tests / "read-root.json", {**cases["read-root"][1], "stdout": "hi there\n"})
    legacy = {**cases["legacy-dirs"][1], "stdout": "hi there\n"}
    _write(tests / "legacy-dirs.json", legacy)
    _write(tests / "env-only.json", {"env": {"A": "1"}, "stdout": "A=1\n"})
    _write(tests / "argv.json", {"args": ["a b", "c"], "stdout": "3\n/argv.wasm\na b\nc\n"})
    return root


def test_read_spec_follows_the_suite_format(tmp_path: Path) -> None:
    (tmp_path / "fs.dir").mkdir()
    wasm = tmp_path / "t.wasm"
    wasm.write_bytes(b"\0asm\1\0\0\0")
    _write(tmp_path / "t.json", {"root": "fs.dir", "args": ["x"], "env": {"K": "v"}})
    spec = suite.read_spec(wasm, tmp_path, "s")
    assert (spec.test_id, spec.root, spec.args, spec.env) == (
        "t",
        tmp_path / "fs.dir",
        ("x",),
        (("K", "v"),),
    )
    assert (spec.exit_code, spec.stdout, spec.stdin, spec.skip) == (0, "", "", None)

    ops = [{"type": "run", "args": ["y"]}, {"type": "write", "payload": "in"}]
    ops += [{"type": "read", "payload": "a"}, {"type": "read", "payload": "b"}]
    _write(tmp_path / "t.json", {"operations": [*ops, {"type": "wait", "exit_code": 4}]})
    spec = suite.read_spec(wasm, tmp_path, "s")
    assert (spec.args, spec.stdin, spec.stdout, spec.exit_code) == (("y",), "in", "ab", 4)

    _write(tmp_path / "t.json", {"proposals": ["http"], "operations": []})
    assert suite.read_spec(wasm, tmp_path, "s").skip == "needs WASI proposals ['http']"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"args": "x"}, "args"),
        ({"env": {"A": 1}}, "env"),
        ({"root": "missing.dir"}, "root"),
        ({"exit_code": "0"}, "exit_code"),
        ({"args": [], "operations": []}, "mixes"),
        ({"operations": [{"type": "run"}, {"type": "read", "id": "x"}, {"type": "wait"}]}, "id"),
    ],
)
def test_a_bad_spec_names_its_file_and_field(
    tmp_path: Path, doc: dict[str, Any], field: str
) -> None:
    wasm = tmp_path / "t.wasm"
    wasm.write_bytes(b"\0asm\1\0\0\0")
    _write(tmp_path / "t.json", doc)
    with pytest.raises(suite.SpecError, match=field) as info:
        suite.read_spec(wasm, tmp_path, "s")
    assert str(tmp_path / "t.json") in str(info.value)


@needs_clang
def test_runner_scores_a_suite_through_the_cli(tmp_path: Path) -> None:
    root = _mini_suite(tmp_path / "suite")
    before = sorted(p.name for p in (root / "c" / "wasm32-wasip1" / "data.dir").iterdir())
    specs = suite.discover(root)
    assert len(specs) == 10
    score = suite.run_suite(specs, ["wasmtime"], timeout=120)["wasmtime"]
    failed = {r.test_id.rsplit("/", 1)[1]: r.reason for r in score.failures}
    assert set(failed) == {"wrong-stdout", "wrong-exit"}
    assert "expected 'nope'" in failed["wrong-stdout"]
    assert "exit code 3, expected 0" in failed["wrong-exit"]
    assert [r.test_id.rsplit("/", 1)[1] for r in score.skips] == ["socket"]
    assert (score.passed, score.failed, score.skipped) == (7, 2, 1)
    # the guest wrote into a copy: the suite is unchanged
    after = sorted(p.name for p in (root / "c" / "wasm32-wasip1" / "data.dir").iterdir())
    assert after == before


@needs_clang
def test_main_exit_status_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _mini_suite(tmp_path / "suite")
    assert suite.main([str(root), "--engine", "wasmtime", "-k", "exit-code", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["engines"]["wasmtime"]["passed"] == 1
    assert suite.main([str(root), "--engine", "wasmtime", "-k", "wrong-exit"]) == 1
    assert "FAIL c/wasm32-wasip1/wrong-exit: exit code 3" in capsys.readouterr().out
    assert suite.main([str(tmp_path / "empty")]) == 2


_SUITE = os.environ.get("WASI_TESTSUITE")


@pytest.mark.slow
@pytest.mark.skipif(
    not _SUITE or not Path(_SUITE).is_dir(),
    reason="set WASI_TESTSUITE to a WebAssembly/wasi-testsuite prod/testsuite-base checkout",
)
@pytest.mark.parametrize("engine", sorted(KNOWN_FAILURES))
def test_public_suite_has_no_undocumented_failure(engine: str) -> None:
    info = next(i for i in engines.available() if i.name == engine)
    if not info.installed:
        pytest.skip(f"{engine} is not installed: {info.error}")
    assert _SUITE is not None
    specs = suite.discover(Path(_SUITE))
    assert specs, f"no wasm32-wasip1 tests under {_SUITE}"
    score = suite.run_suite(specs, [engine], jobs=2)[engine]
    new = {r.test_id: r.reason for r in score.failures}
    new = {k: v for k, v in new.items() if k.rsplit("/", 1)[1] not in KNOWN_FAILURES[engine]}
    assert not new, f"{engine}: failures not in docs/engines.md: {new}"

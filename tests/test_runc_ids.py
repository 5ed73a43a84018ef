"""Container ids: `valid_id` gives the verdict of the real runc on this machine, id by id.

runc 1.1 (libcontainer ``validateID``) accepts the Go regexp ``^[\\w+-\\.]+$`` (``\\w`` is
ASCII, ``+-\\.`` is the range ``+ , - .``) and refuses ``.`` and ``..``. Each id below is
given to Debian's ``runc state``: its answer ("invalid container ID format" or any other
error) must be ours.
"""

# The fixtures are test_runc_cli's, imported by name (pytest finds them in the module):
# ruff: noqa: F811
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_runc_cli import (  # noqa: F401 - fixtures
    RUNC,
    Runtime,
    cgroup_name,
    needs_runtime,
    runtime,
    subreaper,
    wasm_bundle,
    wasm_env,
)
from wasidispatch.runc.state import valid_id

IDS = [
    "a",
    "a,b",
    ",",
    "a+b",
    "a-b",
    "a.b",
    "a_b",
    "...",
    ".a",
    "-a",
    "+",
    "A9_z",
    "x" * 300,
    ".",
    "..",
    "é",
    "a\u0660",  # an Arabic-Indic digit: str.isalnum() says yes, runc says no
    "ａ",  # a fullwidth letter
    "a b",
    "a/b",
    "a*b",
    "a\nb",
    "a\n",
    "a:b",
    "a@b",
    "a\\b",
    "\u212a",  # the Kelvin sign, which case-folds to "k"
]

needs_runc = pytest.mark.skipif(RUNC is None, reason="needs Debian's runc")


def runc_accepts(root: Path, container_id: str) -> bool:
    assert RUNC is not None
    proc = subprocess.run(
        # `--`: an id starting with "-" would be read as a flag of runc's (a usage error,
        # not its verdict on the id)
        [RUNC, "--root", str(root), "state", "--", container_id],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0  # no such container either way
    return "invalid container ID format" not in proc.stderr


@needs_runc
def test_ids_get_the_verdict_of_the_real_runc(tmp_path: Path) -> None:
    verdicts = {cid: (valid_id(cid), runc_accepts(tmp_path, cid)) for cid in IDS}
    assert {cid: v for cid, v in verdicts.items() if v[0] != v[1]} == {}
    assert verdicts["a,b"] == (True, True)
    assert verdicts["é"] == (False, False)


@needs_runc
@settings(max_examples=60, deadline=None)
@given(
    st.text(
        alphabet=st.characters(
            codec="utf-8", exclude_characters="\0", max_codepoint=0x2200, exclude_categories=["Cs"]
        ),
        min_size=1,
        max_size=8,
    )
)
def test_arbitrary_ids_get_the_verdict_of_the_real_runc(container_id: str) -> None:
    root = Path("/tmp/wasidispatch-test-ids-root")  # never created: `state` only reads it
    assert valid_id(container_id) == runc_accepts(root, container_id)


@needs_runtime
def test_wasm_create_refuses_an_id_runc_refuses(
    runtime: Runtime, tmp_path: Path, cgroup_name: str, wasm_env: None
) -> None:
    bundle = wasm_bundle(tmp_path / "b", "hello", [], cgroup_name)
    with (tmp_path / "out").open("wb") as out:
        proc = runtime("create", "--bundle", str(bundle), "é", stdout=out)
    assert proc.returncode == 1
    assert runtime.errors() == ["invalid container ID format"]
    assert not runtime.root.exists() or list(runtime.root.iterdir()) == []

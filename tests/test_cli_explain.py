"""``wasidispatch explain``: the decision and its evidence, text and --json; bad bundles give a
one-line error and exit 1 (for ``run`` too), never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from wasidispatch._bundles import busybox_bundle, wasm_bundle
from wasidispatch.cli import main

MODULE = bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))


def test_explain_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wasm = wasm_bundle(tmp_path / "w", MODULE, ("/app.sh",))  # bytes, not suffix
    linux = busybox_bundle(tmp_path / "l", ["echo", "hi"])
    assert main(["explain", "--engine", "wasmtime", str(wasm)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("executor: wasm (wasm)\n")
    assert f"entrypoint: {wasm / 'rootfs' / 'app.sh'}" in out
    assert "magic: wasm-module" in out
    assert main(["explain", "--json", str(linux)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["executor"] == "linux"
    assert doc["kind"] == "linux"
    assert doc["format"] == "elf"
    assert doc["entrypoint"] == str(linux / "rootfs" / "bin" / "busybox")
    assert [e["source"] for e in doc["evidence"]] == ["path", "magic"]


def _garbage(tmp_path: Path, case: str) -> Path:
    bundle = tmp_path / case
    if case == "absent":
        return bundle
    (bundle / "rootfs").mkdir(parents=True)
    config = {
        "no-config": None,
        "bad-json": "{not json",
        "wrong-type": json.dumps({"ociVersion": "1.0.0", "process": {"cwd": "/", "args": 5}}),
        "no-entrypoint": json.dumps(
            {
                "ociVersion": "1.0.0",
                "root": {"path": "rootfs"},
                "process": {"cwd": "/", "args": ["/x"]},
            }
        ),
    }[case]
    if config is not None:
        (bundle / "config.json").write_text(config)
    return bundle


@pytest.mark.parametrize("command", ["explain", "run"])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("absent", "not a bundle directory"),
        ("no-config", "config.json: cannot read"),
        ("bad-json", "config.json: malformed JSON"),
        ("wrong-type", "config.json: process.args"),
        ("no-entrypoint", "no executor takes"),
    ],
)
def test_bad_bundles_give_one_line_and_exit_1(
    tmp_path: Path, command: str, case: str, message: str
) -> None:
    bundle = _garbage(tmp_path, case)
    proc = subprocess.run(
        [sys.executable, "-m", "wasidispatch", command, "--engine", "wasmtime", str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("wasidispatch: error: ")
    assert message in lines[0]


@pytest.mark.parametrize("command", ["run", "explain"])
@pytest.mark.parametrize("hostile", ["missing", "fifo", "dev-zero", "deep", "types"])
def test_hostile_bundles_are_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, hostile: str
) -> None:
    """config.json missing, a FIFO, a symlink to /dev/zero, deeply nested or of wrong types:
    one ``wasidispatch: error:`` line naming config.json, exit 1, never a traceback."""
    import os

    bundle = tmp_path / "b"
    bundle.mkdir()
    config = bundle / "config.json"
    if hostile == "fifo":
        os.mkfifo(config)
    elif hostile == "dev-zero":
        config.symlink_to("/dev/zero")
    elif hostile == "deep":
        config.write_text("[" * 100_000 + "]" * 100_000)
    elif hostile == "types":
        config.write_text('{"ociVersion": 1, "process": "x", "root": 5}')
    assert main([command, "--engine", "wasmtime", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wasidispatch: error: ")
    assert "config.json" in err
    assert "Traceback" not in err

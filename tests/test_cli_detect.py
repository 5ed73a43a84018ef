"""``wasidispatch detect``: one line per path, --json, --root, exit status 0/1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from wasidispatch.cli import main

MODULE = bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    module = tmp_path / "app.wasm"
    module.write_bytes(MODULE)
    script = tmp_path / "run.sh"
    script.write_bytes(b"#!/bin/sh -e\necho hi\n")
    return {"module": module, "script": script, "elf": Path("/bin/true")}


def test_one_line_per_path(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(files["module"]), str(files["script"]), str(files["elf"])]
    assert main(["detect", *paths]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3
    assert err == ""
    width = max(map(len, paths))
    assert lines[0] == f"{paths[0]:<{width}}  wasm-module version=0x01 layer=0"
    assert lines[1] == f"{paths[1]:<{width}}  script #!/bin/sh -e"
    assert lines[2].startswith(f"{paths[2]:<{width}}  elf ")


def test_json_lines(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", "--json", str(files["module"]), str(files["elf"])]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[0] == {
        "path": str(files["module"]),
        "format": "wasm-module",
        "is_wasm": True,
        "is_linux": False,
        "wasm": {"version": 1, "layer": 0},
    }
    assert records[1]["format"] == "elf"
    assert records[1]["elf"]["bits"] in (32, 64)


def test_unreadable_paths_exit_1_and_the_rest_still_print(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    status = main(["detect", str(missing), str(files["module"]), str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 1
    assert out.splitlines()[0].endswith("wasm-module version=0x01 layer=0")
    assert len(out.splitlines()) == 1
    err_lines = err.splitlines()
    assert len(err_lines) == 2
    assert str(missing) in err_lines[0]
    assert "No such file" in err_lines[0]
    assert "is a directory" in err_lines[1]


def test_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "app").mkdir(parents=True)
    (rootfs / "app" / "main.wasm").write_bytes(MODULE)
    (rootfs / "entry").symlink_to("/app/main.wasm")
    (rootfs / "escape").symlink_to("../../../../../../bin/true")
    assert main(["detect", "--root", str(rootfs), "/entry", "/escape"]) == 1
    out, err = capsys.readouterr()
    assert out.split() == ["/entry", "wasm-module", "version=0x01", "layer=0"]
    assert "/escape escapes the root" in err


def test_no_path_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["detect"])
    assert info.value.code == 2
    assert "PATH" in capsys.readouterr().err


def test_python_dash_m_and_the_console_script(files: dict[str, Path]) -> None:
    commands = [[sys.executable, "-m", "wasidispatch"]]
    script = Path(sys.executable).parent / "wasidispatch"
    if script.exists():
        commands.append([str(script)])
    for command in commands:
        proc = subprocess.run(
            [*command, "detect", "--json", str(files["script"])],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["script"] == {"interpreter": "/bin/sh", "argument": "-e"}


def test_detect_demo_prints_every_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wasidispatch._demo import detect_demo

    assert detect_demo(tmp_path) == 0
    out = capsys.readouterr().out
    for kind in ("wasm-component", "wasm-module", "wasm-text", "elf ", "script #!", "unknown: "):
        assert kind in out
    assert (tmp_path / "module.wasm").read_bytes()[:4] == b"\0asm"


def test_output_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """``wasidispatch detect big-list | head -1``: no BrokenPipeError traceback, exit 141."""
    import subprocess
    import sys

    target = tmp_path / "f.wasm"
    target.write_bytes(b"\0asm\x01\0\0\0")
    cmd = [sys.executable, "-m", "wasidispatch", "detect", *(["f.wasm"] * 20000)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert b"wasm-module" in proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as head -1 does
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert stderr == b""

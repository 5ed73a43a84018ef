"""``wasidispatch engines``: the engine table and its JSON form, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wasidispatch import engines
from wasidispatch.cli import main


def test_table_lists_every_engine(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["engines"])
    out = capsys.readouterr().out
    infos = engines.available()
    assert status == (0 if any(i.installed for i in infos) else 1)
    assert out.splitlines()[0].split() == ["ENGINE", "STATUS", "VERSION", "CAPABILITIES"]
    for info in infos:
        line = next(ln for ln in out.splitlines() if ln.startswith(info.name + " "))
        assert ("installed" if info.installed else "missing") in line
        if info.installed:
            assert info.version is not None
            assert info.version in line
        else:
            assert f"install: {info.install_hint}" in out


def test_json_form(capsys: pytest.CaptureFixture[str]) -> None:
    main(["engines", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in doc] == engines.names()
    by_name = {d["name"]: d for d in doc}
    if by_name["wasmtime"]["installed"]:
        assert "components" in by_name["wasmtime"]["capabilities"]
    assert by_name["wasmer"]["install_hint"] == "pip install 'wasidispatch[wasmer]'"


def test_missing_engine_shows_the_install_hint() -> None:
    # A fresh interpreter where wasmer-sdk cannot be imported.
    code = (
        "import sys; sys.modules['wasmer_sdk'] = None\n"
        "from wasidispatch.cli import main\n"
        "raise SystemExit(main(['engines']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("wasmer "))
    assert "missing" in line
    assert "install: pip install 'wasidispatch[wasmer]'" in proc.stdout

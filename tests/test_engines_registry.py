"""The engine registry: names, lazy loading, install hints, and third-party entry points."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasidispatch import engines
from wasidispatch.engines import Capabilities, Engine, EngineInfo
from wasidispatch.errors import EngineError, EngineUnavailable

_PLUGIN_MODULE = '''
"""A tiny third-party engine, only to test the entry point (it runs nothing)."""

from __future__ import annotations

from wasidispatch.engines import Capabilities, ExitReason, RunResult, Verdict, Workload


class EchoEngine:
    def __init__(self, *, greeting: str = "hello") -> None:
        self.greeting = greeting

    @property
    def name(self) -> str:
        return "echo-plugin"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(modules=True, preopens=False)

    def version(self) -> str:
        return "9.9.9"

    def fingerprint(self) -> str:
        return "0" * 64

    def can_handle(self, workload: Workload) -> Verdict:
        return Verdict.yes()

    def precompile(self, wasm: bytes) -> bytes | None:
        return None

    def run(self, workload: Workload) -> RunResult:
        return RunResult(exit_code=len(workload.argv), reason=ExitReason.EXITED)


class NotAnEngine:
    pass
'''


def _install_plugin(root: Path) -> None:
    """A real (unpacked) distribution: a package plus a ``*.dist-info`` with entry points."""
    (root / "echo_plugin").mkdir()
    (root / "echo_plugin" / "__init__.py").write_text(_PLUGIN_MODULE)
    info = root / "echo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [wasidispatch.engines]
            echo-plugin = echo_plugin:EchoEngine
            not-an-engine = echo_plugin:NotAnEngine
            missing-module = echo_plugin_absent.engine:Engine
            wasmtime = echo_plugin:EchoEngine
            """
        )
    )
    (info / "RECORD").write_text("")


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    _install_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    engines.refresh()
    yield
    sys.modules.pop("echo_plugin", None)
    monkeypatch.undo()
    engines.refresh()


def test_builtin_names_in_order() -> None:
    assert engines.names()[:3] == ["wasmtime", "wasmtime-fast", "wasmer"]


def test_unknown_engine_is_unavailable_and_lists_known_names() -> None:
    with pytest.raises(EngineUnavailable, match=r"unknown engine 'nope'.*wasmtime"):
        engines.get("nope")


def test_import_does_not_load_engines_or_scan_entry_points() -> None:
    code = (
        "import sys, wasidispatch.engines as e\n"
        "assert e._plugins is None, 'entry points scanned at import'\n"
        "heavy = [m for m in ('wasmtime', 'wasmer_sdk', 'cffi') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "e.names()\n"
        "assert e._plugins is not None\n"
        "assert 'wasmtime' not in sys.modules, 'names() imported an engine'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(importlib.util.find_spec("wasmtime") is None, reason="wasmtime not installed")
def test_installed_wasmtime_engine_loads_and_is_shared() -> None:
    engine = engines.get("wasmtime")
    assert isinstance(engine, Engine)
    assert engine.name == "wasmtime"
    assert engines.get("wasmtime") is engine  # no options: the shared instance
    other = engines.get("wasmtime", opt_level="none")
    assert other is not engine
    assert other.fingerprint() != engine.fingerprint()  # config is part of the key


@pytest.mark.skipif(importlib.util.find_spec("wasmer_sdk") is None, reason="wasmer-sdk absent")
def test_installed_wasmer_engine_loads() -> None:
    engine = engines.get("wasmer")
    assert engine.name == "wasmer"


def test_bad_options_are_an_engine_error() -> None:
    with pytest.raises(EngineError, match="options"):
        engines.get("wasmtime", no_such_option=True)


def test_available_reports_every_engine_without_raising() -> None:
    infos = engines.available()
    assert [i.name for i in infos] == engines.names()
    for info in infos:
        assert isinstance(info, EngineInfo)
        assert info.install_hint
        if info.installed:
            assert info.version
            assert isinstance(info.capabilities, Capabilities)
            assert info.error is None
        else:
            assert info.error
            assert info.capabilities is None
    wasmtime_info = next(i for i in infos if i.name == "wasmtime")
    assert wasmtime_info.install_hint == "pip install 'wasidispatch[wasmtime]'"


def test_missing_package_names_the_extra(plugin: None) -> None:
    with pytest.raises(EngineUnavailable, match="echo_plugin_absent") as info:
        engines.get("missing-module")
    assert "pip install echo-plugin" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_missing_builtin_names_the_wasidispatch_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate an uninstalled wasmer-sdk: a None entry in sys.modules makes import fail.
    monkeypatch.setitem(sys.modules, "wasmer_sdk", None)
    monkeypatch.delitem(sys.modules, "wasidispatch.engines.wasmer", raising=False)
    engines.refresh()
    try:
        with pytest.raises(EngineUnavailable, match=r"pip install 'wasidispatch\[wasmer\]'"):
            engines.get("wasmer")
    finally:
        engines.refresh()


def test_entry_point_plugin_is_found_and_runs(plugin: None) -> None:
    assert "echo-plugin" in engines.names()
    engine = engines.get("echo-plugin", greeting="hi")
    assert engine.name == "echo-plugin"
    result = engine.run(engines.Workload(wasm=b"", argv=("a", "b", "c")))
    assert result.exit_code == 3
    info = next(i for i in engines.available() if i.name == "echo-plugin")
    assert (info.installed, info.version, info.source) == (True, "9.9.9", "entry-point")
    assert info.install_hint == "pip install echo-plugin"


def test_entry_point_cannot_shadow_a_builtin(plugin: None) -> None:
    assert engines.names().count("wasmtime") == 1
    assert engines.get("wasmtime").name == "wasmtime"


def test_entry_point_not_implementing_the_protocol(plugin: None) -> None:
    with pytest.raises(EngineError, match="Engine protocol"):
        engines.get("not-an-engine")


def test_entry_points_are_scanned_once_until_refresh(tmp_path: Path) -> None:
    engines.refresh()
    assert "echo-plugin" not in engines.names()
    _install_plugin(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        assert "echo-plugin" not in engines.names()  # cached scan
        engines.refresh()
        assert "echo-plugin" in engines.names()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("echo_plugin", None)
        engines.refresh()

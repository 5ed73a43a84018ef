"""``wasidispatch inspect`` and ``pack`` (pull/push are exercised in test_oci_registry.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wasmtime

from wasidispatch.cli import main
from wasidispatch.oci.image import Digest
from wasidispatch.oci.layout import ImageLayout, wasm_layers


@pytest.fixture
def wasm_file(tmp_path: Path) -> Path:
    path = tmp_path / "app.wasm"
    path.write_bytes(bytes(wasmtime.wat2wasm('(module (func (export "_start")))')))
    return path


def test_pack_then_inspect_layout(
    tmp_path: Path, wasm_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout_dir = tmp_path / "layout"
    assert main(["pack", "--no-created", str(wasm_file), f"{layout_dir}:v1"]) == 0
    out = capsys.readouterr().out
    layout = ImageLayout.open(layout_dir)
    desc, _ = layout.resolve("v1")
    assert out.strip() == f"{layout_dir}:v1 {desc.digest}"
    assert wasm_layers(layout, "v1")[0].read_bytes() == wasm_file.read_bytes()

    assert main(["inspect", "--json", f"{layout_dir}:v1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "image layout"
    [image] = report["images"]
    assert image["type"] == "wasm artifact"
    assert image["platform"] == "wasm/wasip1"
    assert image["digest"] == desc.digest
    assert image["wasm"][0].startswith("wasm-module")

    assert main(["inspect", str(layout_dir)]) == 0
    text = capsys.readouterr().out
    assert "kind: image layout" in text
    assert "type: wasm artifact" in text


def test_inspect_wasm_file(wasm_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(wasm_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "wasm file"
    assert report["format"].startswith("wasm-module")
    assert report["digest"] == Digest.of(wasm_file.read_bytes())


def test_inspect_bundle(
    tmp_path: Path, wasm_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "rootfs" / "app.wasm").write_bytes(wasm_file.read_bytes())
    spec = {
        "ociVersion": "1.3.0",
        "root": {"path": "rootfs"},
        "process": {"cwd": "/", "args": ["/app.wasm"]},
        "annotations": {"run.oci.handler": "wasm"},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    assert main(["inspect", "--json", str(bundle)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "runtime bundle"
    assert report["format"].startswith("wasm-module")
    assert report["annotations"] == {"run.oci.handler": "wasm"}


def test_cli_errors_are_reported_not_raised(
    tmp_path: Path, wasm_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "absent")]) == 1
    assert "not a bundle, an image layout or a file" in capsys.readouterr().err
    assert main(["pack", str(wasm_file), str(tmp_path / "no-tag")]) == 1
    assert "DIR:TAG" in capsys.readouterr().err
    not_wasm = tmp_path / "x.wasm"
    not_wasm.write_bytes(b"#!/bin/sh\n")
    assert main(["pack", str(not_wasm), f"{tmp_path / 'l'}:v1"]) == 1
    assert f"{not_wasm}: not a Wasm module or component" in capsys.readouterr().err
    assert not (tmp_path / "l").exists()  # the layout it would have made is not left behind
    existing = tmp_path / "existing"
    assert main(["pack", str(wasm_file), f"{existing}:v1"]) == 0
    assert main(["pack", str(not_wasm), f"{existing}:v2"]) == 1
    assert "not a Wasm module" in capsys.readouterr().err
    assert ImageLayout.open(existing).refs() == ["v1"]  # kept as it was
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "oci-layout").write_text("{}")
    assert main(["inspect", str(tmp_path / "bad")]) == 1
    assert "imageLayoutVersion" in capsys.readouterr().err

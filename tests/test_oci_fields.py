"""Every field checked, with a message naming it (issue 11, item 4): deep nesting, lone
surrogates, NUL in paths/arguments/environment and numbers at the extremes are a `SpecError`
from every OCI model, never a RecursionError, a ValueError from the serializer or a bad path
handed on to the kernel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wasidispatch.errors import SpecError
from wasidispatch.oci._base import MAX_DEPTH, OCIModel
from wasidispatch.oci.bundle import Bundle
from wasidispatch.oci.image import Descriptor, ImageConfig, Index, Manifest
from wasidispatch.oci.runtime import Spec
from wasidispatch.oci.wasm import WasmConfig

DIGEST = "sha256:" + "0" * 64
DESCRIPTOR = {"mediaType": "application/wasm", "digest": DIGEST, "size": 1}
MINIMAL: dict[type[OCIModel], dict[str, Any]] = {
    Spec: {"ociVersion": "1.2.0"},
    Manifest: {"schemaVersion": 2, "config": DESCRIPTOR, "layers": [DESCRIPTOR]},
    Index: {"schemaVersion": 2, "manifests": [DESCRIPTOR]},
    ImageConfig: {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
    },
    WasmConfig: {"architecture": "wasm", "os": "wasip1", "layerDigests": []},
    Descriptor: DESCRIPTOR,
}
MODELS = list(MINIMAL)


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):  # built iteratively: no recursion here either
        value = [value]
    return value


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("where", ["unknown field", "annotation value"])
def test_100000_nested_lists_are_a_spec_error_from_json(model: type[OCIModel], where: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    doc = json.dumps(MINIMAL[model])[:-1]
    if where == "unknown field":
        text = f'{doc}, "x-deep": {deep}}}'
    else:
        text = f'{doc}, "annotations": {{"a": {deep}}}}}'
    with pytest.raises(SpecError, match="recursion limit"):
        model.parse(text.encode(), source="doc.json")


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_100000_nested_lists_are_a_spec_error_from_a_mapping(model: type[OCIModel]) -> None:
    doc = {**MINIMAL[model], "x-deep": _deep(100_000)}
    with pytest.raises(SpecError, match=rf"doc: x-deep\.0\.0.*nested deeper than {MAX_DEPTH}"):
        model.parse(doc, source="doc")
    # Just under the limit is fine, and dumps again (the serializer has a depth limit too).
    doc = {**MINIMAL[model], "x-deep": _deep(MAX_DEPTH - 2)}
    assert len(model.parse(doc).to_json()) > MAX_DEPTH


def test_deep_config_json_in_a_bundle_is_a_spec_error(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text(
        '{"ociVersion": "1.2.0", "root": {"path": "rootfs"}, "x": ' + deep + "}"
    )
    with pytest.raises(SpecError, match=r"config\.json: malformed JSON: .*recursion limit"):
        Bundle.load(tmp_path)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"process": {"cwd": "/\ud800", "args": ["a"]}}, "process.cwd"),
        ({"process": {"cwd": "/", "args": ["a", "b\udcff"]}}, "process.args.1"),
        ({"annotations": {"k": "\ud83d"}}, "annotations.k"),
        ({"annotations": {"\ud800": "v"}}, "annotations"),
    ],
)
def test_lone_surrogates_are_a_spec_error_naming_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=rf"config\.json: {field}: .*lone surrogate"):
        Spec.parse({"ociVersion": "1.2.0", **doc}, source="config.json")


def test_lone_surrogates_in_json_text_are_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"malformed JSON: .*(surrogate|hex escape)"):
        Spec.parse(b'{"ociVersion": "1.2.0", "annotations": {"\\ud800": "x"}}')
    with pytest.raises(SpecError, match=r"malformed JSON: .*(surrogate|hex escape)"):
        Spec.parse(b'{"ociVersion": "1.2.0", "annotations": {"a": "\\udc80"}}')


_NUL_CASES = [
    ({"process": {"cwd": "/tmp\u0000x"}}, "process.cwd"),
    ({"process": {"cwd": "/", "args": ["/app.wasm\u0000"]}}, "process.args.0"),
    ({"process": {"cwd": "/", "env": ["PATH=/bin", "A=\u0000"]}}, "process.env.1"),
    ({"root": {"path": "root\u0000fs"}}, "root.path"),
    ({"mounts": [{"destination": "/\u0000etc"}]}, "mounts.0.destination"),
    ({"hooks": {"prestart": [{"path": "/bin/\u0000true"}]}}, "hooks.prestart.0.path"),
    ({"linux": {"cgroupsPath": "/a\u0000b"}}, "linux.cgroupsPath"),
]


@pytest.mark.parametrize(("doc", "field"), _NUL_CASES)
def test_nul_in_a_path_argument_or_env_entry_is_a_spec_error(
    doc: dict[str, Any], field: str
) -> None:
    text = json.dumps({"ociVersion": "1.2.0", **doc}).encode()
    with pytest.raises(SpecError, match=rf"config\.json: {field}: contains a NUL character"):
        Spec.parse(text, source="config.json")


@pytest.mark.parametrize(
    ("run", "field"),
    [
        ({"Entrypoint": ["/app.wasm\u0000"]}, "config.Entrypoint.0"),
        ({"Cmd": ["a", "\u0000"]}, "config.Cmd.1"),
        ({"Env": ["A=\u0000"]}, "config.Env.0"),
        ({"WorkingDir": "/\u0000"}, "config.WorkingDir"),
    ],
)
def test_nul_in_an_image_config_is_a_spec_error(run: dict[str, Any], field: str) -> None:
    doc = {**MINIMAL[ImageConfig], "config": run}
    with pytest.raises(SpecError, match=rf"config: {field}: contains a NUL character"):
        ImageConfig.parse(json.dumps(doc).encode(), source="config")


@pytest.mark.parametrize(
    "size",
    [
        b"-1",
        b"9223372036854775808",  # 2**63
        b"18446744073709551616",  # 2**64
        b"1" + b"0" * 5000,
        b"1.0",
        b"1e308",
        b"-1e308",
        b"NaN",
        b"Infinity",
        b'"1"',
        b"true",
        b"null",
    ],
)
def test_sizes_at_the_extremes_are_a_spec_error_naming_the_field(size: bytes) -> None:
    doc = b'{"mediaType": "application/wasm", "digest": "' + DIGEST.encode() + b'", "size": '
    with pytest.raises(SpecError, match=r"size|number out of range"):
        Descriptor.parse(doc + size + b"}", source="desc")
    manifest = json.dumps(MINIMAL[Manifest]).replace('"size": 1', '"size": ' + size.decode(), 1)
    with pytest.raises(SpecError, match=r"config\.size|number out of range"):
        Manifest.parse(manifest.encode(), source="manifest")


@pytest.mark.parametrize(
    ("field", "value"),
    [("uid", -1), ("uid", 2**32), ("gid", 2**70), ("uid", 1.5), ("uid", "0"), ("uid", True)],
)
def test_ids_out_of_range_or_of_another_type_are_a_spec_error(field: str, value: Any) -> None:
    doc = {"ociVersion": "1.2.0", "process": {"cwd": "/", "user": {field: value}}}
    with pytest.raises(SpecError, match=rf"process\.user\.{field}"):
        Spec.parse(json.dumps(doc).encode(), source="config.json")
    with pytest.raises(SpecError, match=rf"process\.user\.{field}"):
        Spec.parse(doc, source="config.json")

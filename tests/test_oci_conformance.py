"""Verdict agreement with upstream on every labelled OCI example, and exact round trips.

The examples and upstream's verdicts are in ``tests/data/oci`` (see its README and INDEX.json).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from wasidispatch.errors import SpecError
from wasidispatch.oci._base import OCIModel
from wasidispatch.oci.image import Descriptor, ImageConfig, Index, LayoutHeader, Manifest
from wasidispatch.oci.runtime import Features, Spec, State
from wasidispatch.oci.wasm import WasmConfig

DATA = Path(__file__).parent / "data" / "oci"

# INDEX.json "target" -> the model that plays upstream's validator for it.
MODELS: dict[str, type[OCIModel]] = {
    "config-schema.json": Spec,  # runtime-spec; image-spec's config-schema is told apart below
    "state-schema.json": State,
    "features-schema.json": Features,
    "content-descriptor.json": Descriptor,
    "image-index-schema.json": Index,
    "image-layout-schema.json": LayoutHeader,
    "image-manifest-schema.json": Manifest,
    "mediatype=application/vnd.oci.descriptor.v1+json": Descriptor,
    "mediatype=application/vnd.oci.image.config.v1+json": ImageConfig,
    "mediatype=application/vnd.oci.image.index.v1+json": Index,
    "mediatype=application/vnd.oci.image.manifest.v1+json": Manifest,
    "mediatype=application/vnd.oci.layout.header.v1+json": LayoutHeader,
    "application/vnd.wasm.config.v0+json": WasmConfig,
}


def _model_for(entry: dict[str, Any]) -> type[OCIModel]:
    if entry["target"] == "config-schema.json" and entry["file"].startswith("image-spec/"):
        return ImageConfig
    return MODELS[entry["target"]]


def _labelled() -> list[dict[str, Any]]:
    index = json.loads((DATA / "INDEX.json").read_text())
    return [e for e in index if e["verdict"] in ("valid", "invalid")]


LABELLED = _labelled()


def _verdict(model: type[OCIModel], path: Path) -> str:
    try:
        model.load(path)
    except SpecError:
        return "invalid"
    return "valid"


def test_corpus_is_complete() -> None:
    # 85 image-spec + 19 runtime-spec + 1 real runwasi Wasm config.
    by_spec: dict[str, int] = {}
    for e in LABELLED:
        spec = e["file"].split("/", 1)[0]
        by_spec[spec] = by_spec.get(spec, 0) + 1
    assert by_spec == {"image-spec": 85, "runtime-spec": 19, "wasm-oci": 1}


def test_verdicts_agree_with_upstream_on_every_labelled_example() -> None:
    disagreements = [
        (e["file"], e["verdict"])
        for e in LABELLED
        if _verdict(_model_for(e), DATA / e["file"]) != e["verdict"]
    ]
    agree = len(LABELLED) - len(disagreements)
    assert disagreements == [], f"agree on {agree}/{len(LABELLED)}"
    assert agree == 105


@pytest.mark.parametrize("entry", LABELLED, ids=[e["file"] for e in LABELLED])
def test_verdict(entry: dict[str, Any]) -> None:
    model = _model_for(entry)
    path = DATA / entry["file"]
    if entry["verdict"] == "invalid":
        with pytest.raises(SpecError) as info:
            model.load(path)
        assert str(path) in str(info.value)  # the message names the file
    else:
        model.load(path)


VALID = [e for e in LABELLED if e["verdict"] == "valid"]


@pytest.mark.parametrize("entry", VALID, ids=[e["file"] for e in VALID])
def test_valid_example_round_trips_exactly(entry: dict[str, Any]) -> None:
    model = _model_for(entry)
    path = DATA / entry["file"]
    original = json.loads(path.read_bytes())
    loaded = model.load(path)
    dumped = loaded.dump()
    assert dumped == original  # unknown fields, explicit nulls and spellings all kept
    assert model.parse(loaded.to_json()) == loaded


def test_invalid_example_errors_name_the_field() -> None:
    # A sample of the "why": the field's JSON path appears in the message.
    tests = "image-spec/tests/"
    cases = {
        f"{tests}invalid-descriptor-11-expected-failure-size-is-a-string-expected-integer.json": (
            "size"
        ),
        f"{tests}invalid-config-10-expected-failure-env-is-invalid.json": "config.Env.0",
        f"{tests}invalid-imageindex-04-expected-failure-in-the-optional-field-platform-pl.json": (
            "manifests.0.platform.architecture"
        ),
        "runtime-spec/config/invalid-linux-rdma.json": "linux.resources.rdma.mlx5_1.hcaHandles",
        "runtime-spec/features/invalid-missing-ociVersionMax.json": "ociVersionMax",
    }
    by_file = {e["file"]: e for e in LABELLED}
    for file, field in cases.items():
        with pytest.raises(SpecError, match=re.escape(f"{file}: {field}")):
            _model_for(by_file[file]).load(DATA / file)


def test_cncf_wasm_examples_only_fail_on_their_placeholder_digests() -> None:
    # The CNCF page's examples use "sha256:1234567890"-style placeholders; everything else in
    # them is well formed, which we show by substituting real digests.
    real = "sha256:" + "ab" * 32
    config = json.loads((DATA / "wasm-oci/example-cncf-config.stripped.json").read_text())
    with pytest.raises(SpecError, match=r"layerDigests\.0"):
        WasmConfig.parse(config)
    config["layerDigests"] = [real, real]
    assert WasmConfig.parse(config).component is not None

    manifest = json.loads((DATA / "wasm-oci/example-cncf-manifest.stripped.json").read_text())
    with pytest.raises(SpecError, match=r"config\.digest"):
        Manifest.parse(manifest)
    manifest["config"]["digest"] = real
    for layer in manifest["layers"]:
        layer["digest"] = real
    parsed = Manifest.parse(manifest)
    assert parsed.config.media_type == "application/vnd.wasm.config.v0+json"
    assert [la.media_type for la in parsed.layers] == ["application/wasm"] * 2

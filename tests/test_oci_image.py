"""image-spec models: digests (a parser, so property-tested), descriptors, manifests, configs."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wasidispatch.errors import SpecError
from wasidispatch.oci.image import (
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    LayoutHeader,
    Manifest,
    Platform,
)

SHA = "sha256:" + "a" * 64


# --- Digest --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:../../etc/passwd",
        "sha256:..",
        "../sha256:" + "a" * 64,
        "sha256/x:" + "a" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "sha512:" + "a" * 64,
        "sha256",
        ":abc",
        "sha256:",
        "sha256+-b:abc",
        "sha256:abc/def",
        "",
    ],
)
def test_invalid_digests_raise_spec_error(bad: str) -> None:
    with pytest.raises(SpecError, match="invalid digest"):
        Digest.parse(bad)


def test_non_string_digest_raises_spec_error() -> None:
    with pytest.raises(SpecError):
        Digest.parse(42)  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_any_accepted_digest_is_a_safe_pair_of_path_components(value: str) -> None:
    try:
        digest = Digest.parse(value)
    except SpecError:
        return
    assert digest.algorithm
    assert digest.encoded
    assert "/" not in digest.algorithm
    assert "/" not in digest.encoded
    assert digest.algorithm not in (".", "..")
    assert digest.encoded not in (".", "..")
    assert "\x00" not in digest
    assert digest.blob_path == f"blobs/{digest.algorithm}/{digest.encoded}"


@given(st.binary(max_size=256), st.sampled_from(["sha256", "sha384", "sha512"]))
def test_digest_of_bytes_round_trips(data: bytes, algorithm: str) -> None:
    digest = Digest.of(data, algorithm)
    assert Digest.parse(str(digest)) == digest
    assert digest.encoded == hashlib.new(algorithm, data).hexdigest()
    hasher = digest.hasher()
    hasher.update(data)
    assert hasher.hexdigest() == digest.encoded


def test_unverifiable_algorithm_is_a_spec_error() -> None:
    digest = Digest.parse("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8")
    with pytest.raises(SpecError, match="cannot verify"):
        digest.hasher()
    with pytest.raises(SpecError, match="unsupported"):
        Digest.of(b"", "md5")


# --- Descriptor ----------------------------------------------------------------------------


def _descriptor(**extra: object) -> dict[str, object]:
    return {"mediaType": "application/octet-stream", "size": 3, "digest": SHA, **extra}


def test_descriptor_fields_and_aliases() -> None:
    d = Descriptor.parse(
        _descriptor(
            artifactType="application/vnd.example+json",
            annotations={ANNOTATION_REF_NAME: "v1"},
            platform={"architecture": "wasm", "os": "wasip1", "os.version": "x"},
        )
    )
    assert d.artifact_type == "application/vnd.example+json"
    assert d.ref_name == "v1"
    assert d.platform == Platform(architecture="wasm", os="wasip1", os_version="x")
    assert isinstance(d.digest, Digest)
    # snake_case names populate too
    assert Descriptor(media_type="a/b", digest=Digest(SHA), size=0).media_type == "a/b"


def test_descriptor_data_must_be_padded_base64() -> None:
    data = base64.b64encode(b"abc").decode()
    assert Descriptor.parse(_descriptor(data=data)).decoded_data() == b"abc"
    with pytest.raises(SpecError, match="data"):
        Descriptor.parse(_descriptor(data="YWJjZA"))  # "abcd" without its padding
    with pytest.raises(SpecError, match="data"):
        Descriptor.parse(_descriptor(data="!!!!"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", -1),
        ("size", "3"),
        ("size", True),
        ("size", 3.5),
        ("mediaType", "nosubtype"),
        ("mediaType", ""),
        ("urls", ["not a uri"]),
        ("urls", "https://x"),
        ("annotations", {"a": 1}),
    ],
)
def test_descriptor_wrong_types_name_the_field(field: str, value: object) -> None:
    doc = _descriptor()
    doc[field] = value
    with pytest.raises(SpecError, match=field):
        Descriptor.parse(json.dumps(doc).encode(), source="desc.json")


def test_missing_required_field_is_named() -> None:
    doc = _descriptor()
    del doc["digest"]
    with pytest.raises(SpecError, match=r"desc\.json: digest: Field required"):
        Descriptor.parse(doc, source="desc.json")


def test_malformed_json_is_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(b'{"schemaVersion": 2,')
    with pytest.raises(SpecError, match=rf"{path}: malformed JSON"):
        Manifest.load(path)
    with pytest.raises(SpecError, match=r"absent\.json .* does not exist"):
        Manifest.load(tmp_path / "absent.json")
    with pytest.raises(SpecError, match="malformed JSON"):
        Manifest.load(b"\xff\xfe")


# --- Manifest / Index / layout header ------------------------------------------------------


def test_manifest_built_in_python_round_trips() -> None:
    empty = Descriptor(media_type=MEDIA_TYPE_EMPTY, digest=Digest.of(b"{}"), size=2)
    m = Manifest(
        schema_version=2, media_type=MEDIA_TYPE_IMAGE_MANIFEST, config=empty, layers=[empty]
    )
    doc = json.loads(m.to_json())
    assert doc["schemaVersion"] == 2
    assert doc["config"]["digest"] == Digest.of(b"{}")
    assert Manifest.parse(m.to_json()) == m


def test_manifest_rejects_other_schema_versions_and_no_layers() -> None:
    doc = {"schemaVersion": 1, "config": _descriptor(), "layers": [_descriptor()]}
    with pytest.raises(SpecError, match="schemaVersion"):
        Manifest.parse(doc)
    doc = {"schemaVersion": 2, "config": _descriptor(), "layers": []}
    with pytest.raises(SpecError, match="layers"):
        Manifest.parse(doc)


def test_unknown_fields_survive_at_every_level() -> None:
    doc = {
        "schemaVersion": 2,
        "x-top": {"nested": [1, 2]},
        "manifests": [
            _descriptor(**{"x-desc": None, "platform": {"architecture": "a", "os": "b", "z": 1}})
        ],
    }
    index = Index.parse(doc)
    assert index.dump() == doc
    assert Index.parse(index.to_json()).dump() == doc


def test_required_versions_have_no_defaults() -> None:
    # The schemas require them; a document that leaves them out is invalid.
    assert LayoutHeader(image_layout_version="1.0.0").dump() == {"imageLayoutVersion": "1.0.0"}
    with pytest.raises(SpecError, match="imageLayoutVersion: Field required"):
        LayoutHeader.parse(b"{}")
    with pytest.raises(SpecError, match="schemaVersion: Field required"):
        Manifest.parse({"config": _descriptor(), "layers": [_descriptor()]})
    with pytest.raises(SpecError, match="schemaVersion: Field required"):
        Index.parse({"manifests": []})
    with pytest.raises(SpecError, match="imageLayoutVersion"):
        LayoutHeader.parse({"imageLayoutVersion": "2.0.0"})


# --- ImageConfig ---------------------------------------------------------------------------


def _config(**run: object) -> dict[str, object]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [SHA]},
    }


def test_image_config_env_must_be_key_value() -> None:
    cfg = ImageConfig.parse(_config(Env=["PATH=/bin", "EMPTY="], Entrypoint=None))
    assert cfg.config is not None
    assert cfg.config.env == ["PATH=/bin", "EMPTY="]
    assert cfg.dump()["config"]["Entrypoint"] is None  # explicit null kept
    for bad in (["foo"], ["=x"], ["A=1\nB"]):
        with pytest.raises(SpecError, match=r"config\.Env"):
            ImageConfig.parse(_config(Env=bad))


def test_image_config_created_must_be_rfc3339() -> None:
    ok = {**_config(), "created": "2024-06-25T15:58:49.377917735Z"}
    assert ImageConfig.parse(ok).created == ok["created"]
    with pytest.raises(SpecError, match="created"):
        ImageConfig.parse({**_config(), "created": "yesterday"})


def test_image_config_rootfs_type_and_diff_ids_are_checked() -> None:
    doc = _config()
    doc["rootfs"] = {"type": "tarball", "diff_ids": [SHA]}
    with pytest.raises(SpecError, match=r"rootfs\.type"):
        ImageConfig.parse(doc)
    doc["rootfs"] = {"type": "layers", "diff_ids": ["sha256:nothex"]}
    with pytest.raises(SpecError, match=r"rootfs\.diff_ids\.0"):
        ImageConfig.parse(doc)

"""Typed models of the OCI image-spec (v1.1): digests, descriptors, manifests, indexes, configs.

The verdicts follow upstream's own validator (image-spec ``schema/validator.go``), which is the
JSON schema plus Go-side checks: typed ``json.Unmarshal`` (so ``"size": "1470"`` is an error),
``digest.Validate()`` for registered algorithms (``sha256`` needs 64 lowercase hex characters,
``sha512`` 128), and config ``Env`` entries of the form ``KEY=value``. Every model keeps fields it
does not know, so a load/dump round trip reproduces the document.

Example::

    >>> from wasidispatch.oci.image import Descriptor, Digest
    >>> d = Descriptor.parse(b'{"mediaType": "application/wasm", "size": 8,'
    ...     b' "digest": "sha256:' + b"0" * 64 + b'", "x-unknown": true}')
    >>> d.digest.algorithm, d.size, d.dump()["x-unknown"]
    ('sha256', 8, True)
    >>> Digest.parse("sha256:../../etc/passwd")
    Traceback (most recent call last):
    ...
    wasidispatch.errors.SpecError: invalid digest 'sha256:../../etc/passwd': ...
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator
from pydantic.alias_generators import to_pascal
from pydantic_core import core_schema

from wasidispatch.errors import SpecError
from wasidispatch.oci._base import CString, OCIModel

__all__ = [
    "ANNOTATION_REF_NAME",
    "ANNOTATION_TITLE",
    "MEDIA_TYPE_DESCRIPTOR",
    "MEDIA_TYPE_EMPTY",
    "MEDIA_TYPE_IMAGE_CONFIG",
    "MEDIA_TYPE_IMAGE_INDEX",
    "MEDIA_TYPE_IMAGE_LAYER",
    "MEDIA_TYPE_IMAGE_LAYER_GZIP",
    "MEDIA_TYPE_IMAGE_LAYER_ZSTD",
    "MEDIA_TYPE_IMAGE_MANIFEST",
    "MEDIA_TYPE_LAYOUT_HEADER",
    "Descriptor",
    "Digest",
    "History",
    "ImageConfig",
    "ImageConfigRunConfig",
    "Index",
    "LayoutHeader",
    "Manifest",
    "MediaType",
    "Platform",
    "RootFS",
]

MEDIA_TYPE_DESCRIPTOR = "application/vnd.oci.descriptor.v1+json"
MEDIA_TYPE_LAYOUT_HEADER = "application/vnd.oci.layout.header.v1+json"
MEDIA_TYPE_IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_IMAGE_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_IMAGE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_IMAGE_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_EMPTY = "application/vnd.oci.empty.v1+json"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_TITLE = "org.opencontainers.image.title"

# image-spec descriptor.md grammar (the schema's pattern). The encoded alphabet has neither
# "/" nor ".", and an algorithm component cannot be empty, so a valid digest is always a safe
# pair of path components: this is what keeps "sha256:../../etc/passwd" out of blob paths.
_DIGEST_PATTERN = r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$"
_DIGEST_RE = re.compile(_DIGEST_PATTERN)
# Registered algorithms (descriptor.md, plus go-digest's sha384): lowercase hex of fixed length.
_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128, "blake3": 64}
_HEX_RE = re.compile(r"[a-f0-9]+")
# Those we can compute (blake3 is registered but not in hashlib).
_HASHLIB = {"sha256", "sha384", "sha512"}

_MEDIA_TYPE_PATTERN = (
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)
MediaType = Annotated[str, StringConstraints(pattern=_MEDIA_TYPE_PATTERN)]
"""An RFC 6838 media type, as the descriptor schema constrains it."""

# An absolute URI (JSON schema "format": "uri"): a scheme, then no whitespace or characters
# RFC 3986 never allows unescaped.
_URI_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s<>\"{}|\\^`]*$"
Uri = Annotated[str, StringConstraints(pattern=_URI_PATTERN)]

# RFC 3339 date-time (Go's time.Time JSON form).
_DATE_TIME_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
DateTime = Annotated[str, StringConstraints(pattern=_DATE_TIME_PATTERN)]

# Go's regexp `^[^=]+=.*$` (no (?s), so "." stops at a newline, as Rust's regex does).
EnvEntry = Annotated[CString, StringConstraints(pattern=r"^[^=]+=.*$")]


def _digest_problem(value: str) -> str | None:
    if not _DIGEST_RE.match(value):
        return "not of the form <algorithm>:<encoded> (encoded part: [a-zA-Z0-9=_-]+)"
    algorithm, encoded = value.split(":", 1)
    length = _HEX_LENGTH.get(algorithm)
    if length is not None and (len(encoded) != length or not _HEX_RE.fullmatch(encoded)):
        return f"{algorithm} needs {length} lowercase hex characters"
    return None


class Digest(str):
    """A validated content digest ``<algorithm>:<encoded>`` (a ``str`` subclass).

    Registered algorithms are checked for length and lowercase hex; others follow the spec's
    grammar. A valid digest never contains ``/`` or ``..``, so ``blob_path`` is always safe.

        >>> d = Digest.of(b"")
        >>> d.algorithm, d.encoded[:12]
        ('sha256', 'e3b0c44298fc')
        >>> d.blob_path
        'blobs/sha256/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """

    __slots__ = ()

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Validate ``value``; :class:`SpecError` when it is not a digest."""
        if not isinstance(value, str):
            raise SpecError(f"invalid digest {value!r}: not a string")
        problem = _digest_problem(value)
        if problem is not None:
            raise SpecError(f"invalid digest {value!r}: {problem}")
        return cls(value)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data`` (``sha256``, ``sha384`` or ``sha512``)."""
        if algorithm not in _HASHLIB:
            raise SpecError(f"unsupported digest algorithm {algorithm!r}")
        return cls(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")

    @property
    def algorithm(self) -> str:
        """The part before the first ``:``."""
        return self.split(":", 1)[0]

    @property
    def encoded(self) -> str:
        """The part after the first ``:``."""
        return self.split(":", 1)[1]

    @property
    def blob_path(self) -> str:
        """``blobs/<algorithm>/<encoded>``, the blob's path inside an image layout."""
        return f"blobs/{self.algorithm}/{self.encoded}"

    def hasher(self) -> Any:
        """A fresh :mod:`hashlib` object for this digest's algorithm.

        Raises :class:`SpecError` when the algorithm cannot be verified here (e.g. ``blake3``).
        """
        if self.algorithm not in _HASHLIB:
            raise SpecError(f"{self}: cannot verify digest algorithm {self.algorithm!r}")
        return hashlib.new(self.algorithm)

    @classmethod
    def _validate(cls, value: str) -> Digest:
        problem = _digest_problem(value)
        if problem is not None:
            raise ValueError(f"invalid digest {value!r}: {problem}")
        return cls(value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls._validate,
            core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="always"),
        )


class Platform(OCIModel):
    """The platform an image runs on (``architecture`` and ``os`` required)."""

    architecture: str
    os: str
    os_version: str | None = Field(
        default=None, validation_alias="os.version", serialization_alias="os.version"
    )
    os_features: list[str] | None = Field(
        default=None, validation_alias="os.features", serialization_alias="os.features"
    )
    variant: str | None = None
    features: list[str] | None = None


class Descriptor(OCIModel):
    """A content descriptor: what a blob is, how big, and its digest.

    >>> Descriptor(media_type="application/wasm", digest=Digest.of(b"x"), size=1).dump()
    ... # doctest: +ELLIPSIS
    {'mediaType': 'application/wasm', 'digest': 'sha256:2d71...', 'size': 1}
    """

    media_type: MediaType
    digest: Digest
    size: Annotated[int, Field(ge=0, le=2**63 - 1)]
    urls: list[Uri] | None = None
    data: str | None = None
    artifact_type: MediaType | None = None
    platform: Platform | None = None
    annotations: dict[str, str] | None = None

    @field_validator("data")
    @classmethod
    def _padded_base64(cls, value: str | None) -> str | None:
        # Go's encoding/base64 StdEncoding: padding required, standard alphabet only.
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"not padded standard base64: {exc}") from None
        return value

    @property
    def ref_name(self) -> str | None:
        """The ``org.opencontainers.image.ref.name`` annotation, if any."""
        return (self.annotations or {}).get(ANNOTATION_REF_NAME)

    def decoded_data(self) -> bytes | None:
        """The embedded ``data`` bytes, or ``None`` when the descriptor has none."""
        return None if self.data is None else base64.b64decode(self.data, validate=True)


class _VersionedDocument(OCIModel):
    # Required, as in the schema (no default: a document without it must not validate).
    schema_version: Literal[2]


class Manifest(_VersionedDocument):
    """An image manifest (image or artifact): a config descriptor and at least one layer.

    >>> cfg = Descriptor(media_type=MEDIA_TYPE_EMPTY, digest=Digest.of(b"{}"), size=2)
    >>> m = Manifest(schema_version=2, config=cfg, layers=[cfg])
    >>> m.dump()["schemaVersion"], Manifest.parse(m.to_json()) == m
    (2, True)
    """

    media_type: MediaType | None = None
    artifact_type: MediaType | None = None
    config: Descriptor
    layers: Annotated[list[Descriptor], Field(min_length=1)]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class Index(_VersionedDocument):
    """An image index: a list of manifest descriptors (also a layout's ``index.json``)."""

    media_type: MediaType | None = None
    artifact_type: MediaType | None = None
    manifests: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class LayoutHeader(OCIModel):
    """The ``oci-layout`` file of an image layout: ``{"imageLayoutVersion": "1.0.0"}``."""

    image_layout_version: Literal["1.0.0"]


class ImageConfigRunConfig(OCIModel):
    """The ``config`` object of an image config: how to run a container from the image."""

    model_config = OCIModel.model_config | {"alias_generator": to_pascal}

    user: CString | None = None
    exposed_ports: dict[str, dict[str, Any]] | None = None
    env: list[EnvEntry] | None = None
    entrypoint: list[CString] | None = None
    cmd: list[CString] | None = None
    volumes: dict[str, dict[str, Any]] | None = None
    working_dir: CString | None = None
    labels: dict[str, str] | None = None
    stop_signal: str | None = None
    args_escaped: bool | None = None


class RootFS(OCIModel):
    """The ``rootfs`` of an image config: the uncompressed layer digests, in order."""

    model_config = OCIModel.model_config | {"alias_generator": None}

    diff_ids: list[Digest]
    type: Literal["layers"]


class History(OCIModel):
    """One ``history`` entry of an image config."""

    model_config = OCIModel.model_config | {"alias_generator": None}

    created: DateTime | None = None
    author: str | None = None
    created_by: str | None = None
    comment: str | None = None
    empty_layer: bool | None = None


class ImageConfig(OCIModel):
    """An image configuration (``application/vnd.oci.image.config.v1+json``)."""

    created: DateTime | None = None
    author: str | None = None
    architecture: str
    os: str
    os_version: str | None = Field(
        default=None, validation_alias="os.version", serialization_alias="os.version"
    )
    os_features: list[str] | None = Field(
        default=None, validation_alias="os.features", serialization_alias="os.features"
    )
    variant: str | None = None
    config: ImageConfigRunConfig | None = None
    rootfs: RootFS
    history: list[History] | None = None

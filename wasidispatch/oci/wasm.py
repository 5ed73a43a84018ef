"""The Wasm OCI artifact (CNCF TAG Runtime layout) and the Wasm media types and annotations.

A Wasm artifact is an ordinary image manifest whose config has media type
``application/vnd.wasm.config.v0+json`` and whose layers are ``application/wasm``. Its config
is a :class:`WasmConfig`, which is *not* an image config (no ``rootfs``, ``architecture`` is
``wasm``, ``os`` is ``wasip1`` for a core module and ``wasip2`` for a component).

Example::

    >>> from wasidispatch.oci.wasm import WasmConfig
    >>> cfg = WasmConfig.parse(b'{"architecture": "wasm", "os": "wasip1", "author": null,'
    ...     b' "layerDigests": [], "component": null}')
    >>> cfg.os, cfg.author, cfg.dump()["component"]
    ('wasip1', None, None)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import StringConstraints

from wasidispatch.oci._base import OCIModel
from wasidispatch.oci.image import DateTime, Digest

__all__ = [
    "ANNOTATION_RUN_OCI_HANDLER",
    "ANNOTATION_WASM_VARIANT",
    "MEDIA_TYPE_WASM",
    "MEDIA_TYPE_WASM_COMPONENT_LAYER_V0",
    "MEDIA_TYPE_WASM_CONFIG",
    "MEDIA_TYPE_WASM_CONFIG_V1_LEGACY",
    "MEDIA_TYPE_WASM_CONTENT_LAYER_V1",
    "OS_COMPONENT",
    "OS_MODULE",
    "WASM_ARCHITECTURE",
    "WASM_LAYER_MEDIA_TYPES",
    "WasmComponent",
    "WasmConfig",
    "is_wasm_layer",
]

# CNCF TAG Runtime Wasm OCI artifact (and bytecodealliance/rust-oci-wasm's constants).
MEDIA_TYPE_WASM = "application/wasm"
MEDIA_TYPE_WASM_CONFIG = "application/vnd.wasm.config.v0+json"
WASM_ARCHITECTURE = "wasm"
OS_MODULE = "wasip1"
OS_COMPONENT = "wasip2"

# Older layer types still met in the wild: runwasi accepts the bytecodealliance component layer
# by default; engineerd/wasm-to-oci used the content layer and a v1 config type.
MEDIA_TYPE_WASM_COMPONENT_LAYER_V0 = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"
MEDIA_TYPE_WASM_CONTENT_LAYER_V1 = "application/vnd.wasm.content.layer.v1+wasm"
MEDIA_TYPE_WASM_CONFIG_V1_LEGACY = "application/vnd.wasm.config.v1+json"

WASM_LAYER_MEDIA_TYPES: frozenset[str] = frozenset(
    {MEDIA_TYPE_WASM, MEDIA_TYPE_WASM_COMPONENT_LAYER_V0, MEDIA_TYPE_WASM_CONTENT_LAYER_V1}
)
"""Layer media types whose blob is a Wasm binary (module or component)."""

# Annotations crun reads to pick its Wasm handler for a plain OCI *image* (rootfs tar layers):
# ``run.oci.handler=wasm`` (podman/crun) and ``module.wasm.image/variant=compat`` (the
# solo-io/wasm "compat" variant, also honoured by crun).
ANNOTATION_RUN_OCI_HANDLER = "run.oci.handler"
ANNOTATION_WASM_VARIANT = "module.wasm.image/variant"


def is_wasm_layer(media_type: str) -> bool:
    """Whether a layer of this media type is a Wasm binary.

    >>> is_wasm_layer("application/wasm"), is_wasm_layer("application/vnd.oci.image.layer.v1.tar")
    (True, False)
    """
    return media_type in WASM_LAYER_MEDIA_TYPES


class WasmComponent(OCIModel):
    """The ``component`` section of a Wasm config (present for ``wasip2``)."""

    exports: list[str] | None = None
    imports: list[str] | None = None
    target: str | None = None


class WasmConfig(OCIModel):
    """The config blob of a Wasm OCI artifact (``application/vnd.wasm.config.v0+json``).

    ``author`` and ``component`` may be JSON ``null`` (runwasi's oci-tar-builder writes both
    as null); an explicit null survives a round trip. ``layerDigests`` lists the layer digests
    in manifest order, which makes the config (and so the artifact) unique per content.
    """

    created: DateTime | None = None
    author: str | None = None
    architecture: Literal["wasm"]
    # The spec names wasip1 and wasip2 and says the value must be a GOOS-like name; later
    # previews (wasip3, ...) are accepted rather than rejected.
    os: Annotated[str, StringConstraints(pattern=r"^wasip[0-9]+$")]
    layer_digests: list[Digest]
    component: WasmComponent | None = None

"""OCI content: runtime-spec and image-spec models, image layouts, Wasm artifacts, bundles.

Submodules:

- :mod:`wasidispatch.oci.runtime`: ``Spec`` (``config.json``), ``State``, ``Features``.
- :mod:`wasidispatch.oci.image`: ``Digest``, ``Descriptor``, ``Manifest``, ``Index``,
  ``ImageConfig``, ``Platform``, ``LayoutHeader``.
- :mod:`wasidispatch.oci.wasm`: ``WasmConfig`` and the Wasm media types and annotations.
- :mod:`wasidispatch.oci.layout`: ``ImageLayout`` (a directory), ``pack_wasm`` (the artifact),
  ``pack_image`` (a runnable image), ``wasm_layers``.
- :mod:`wasidispatch.oci.bundle`: ``Bundle`` (a runtime bundle directory).
- :mod:`wasidispatch.oci.registry`: ``pull``/``push`` (needs the ``registry`` extra).

Names are re-exported lazily, so ``import wasidispatch.oci`` imports nothing heavy until a
name is used (and the registry client only when ``pull``/``push`` is).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "Bundle": "wasidispatch.oci.bundle",
    "Descriptor": "wasidispatch.oci.image",
    "Digest": "wasidispatch.oci.image",
    "ImageConfig": "wasidispatch.oci.image",
    "ImageLayout": "wasidispatch.oci.layout",
    "Index": "wasidispatch.oci.image",
    "LayoutHeader": "wasidispatch.oci.image",
    "Manifest": "wasidispatch.oci.image",
    "Platform": "wasidispatch.oci.image",
    "Process": "wasidispatch.oci.runtime",
    "Spec": "wasidispatch.oci.runtime",
    "State": "wasidispatch.oci.runtime",
    "Features": "wasidispatch.oci.runtime",
    "WasmConfig": "wasidispatch.oci.wasm",
    "WasmLayer": "wasidispatch.oci.layout",
    "pack_image": "wasidispatch.oci.layout",
    "pack_wasm": "wasidispatch.oci.layout",
    "wasm_layers": "wasidispatch.oci.layout",
    "pull": "wasidispatch.oci.registry",
    "push": "wasidispatch.oci.registry",
}

__all__ = [
    "Bundle",
    "Descriptor",
    "Digest",
    "Features",
    "ImageConfig",
    "ImageLayout",
    "Index",
    "LayoutHeader",
    "Manifest",
    "Platform",
    "Process",
    "Spec",
    "State",
    "WasmConfig",
    "WasmLayer",
    "pack_image",
    "pack_wasm",
    "pull",
    "push",
    "wasm_layers",
]

if TYPE_CHECKING:
    from wasidispatch.oci.bundle import Bundle
    from wasidispatch.oci.image import (
        Descriptor,
        Digest,
        ImageConfig,
        Index,
        LayoutHeader,
        Manifest,
        Platform,
    )
    from wasidispatch.oci.layout import (
        ImageLayout,
        WasmLayer,
        pack_image,
        pack_wasm,
        wasm_layers,
    )
    from wasidispatch.oci.registry import pull, push
    from wasidispatch.oci.runtime import Features, Process, Spec, State
    from wasidispatch.oci.wasm import WasmConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wasidispatch.oci' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

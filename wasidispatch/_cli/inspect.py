"""``wasidispatch inspect PATH``: what a bundle, an image layout or a ``.wasm`` file is.

PATH is a runtime bundle (a directory with ``config.json``), an OCI image layout ``DIR[:TAG]``
(a directory with ``oci-layout``), or a file. The report names the kind, summarizes the
manifest/config, and gives the detected format of the entrypoint or Wasm layers. ``--json``
prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``inspect`` subcommand."""
    parser = sub.add_parser(
        "inspect",
        help="describe a bundle, an image layout DIR[:TAG] or a .wasm file",
        description=(
            "Describe PATH: a runtime bundle (config.json + rootfs), an OCI image layout "
            "DIR[:TAG], or a file such as FILE.wasm; with the detected entrypoint format."
        ),
    )
    parser.add_argument("path", metavar="PATH")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Inspect ``args.path``; 0 on success (errors are raised as wasidispatch errors)."""
    from wasidispatch._cli.pack import split_layout_ref
    from wasidispatch.errors import SpecError

    directory, tag = split_layout_ref(args.path)
    path = Path(directory)
    if path.is_dir() and (path / "oci-layout").exists():
        report = _layout(path, tag)
    elif tag is None and path.is_dir() and (path / "config.json").exists():
        report = _bundle(path)
    elif tag is None and path.is_file():
        report = _file(path)
    else:
        raise SpecError(f"{args.path}: not a bundle, an image layout or a file")
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print(report)
    return 0


def _print(report: dict[str, Any], indent: str = "") -> None:
    for key, value in report.items():
        if isinstance(value, dict):
            sys.stdout.write(f"{indent}{key}:\n")
            _print(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            sys.stdout.write(f"{indent}{key}:\n")
            for item in value:
                sys.stdout.write(f"{indent}  -\n")
                _print(item, indent + "    ")
        elif isinstance(value, list):
            sys.stdout.write(f"{indent}{key}: {' '.join(map(str, value)) or '(none)'}\n")
        else:
            sys.stdout.write(f"{indent}{key}: {value}\n")


def _detected(data: bytes) -> str:
    from wasidispatch.detect import sniff

    return str(sniff(data))


def _file(path: Path) -> dict[str, Any]:
    import hashlib
    import os
    import stat

    from wasidispatch.detect import sniff_path
    from wasidispatch.errors import SpecError

    # Hashed as a stream (a 10 GB file costs no memory); opened without blocking on a FIFO.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        hasher = hashlib.sha256()
        size = 0
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    detected = sniff_path(path)
    return {
        "kind": "wasm file" if detected.is_wasm else "file",
        "path": str(path),
        "size": size,
        "digest": f"sha256:{hasher.hexdigest()}",
        "format": str(detected),
    }


def _bundle(path: Path) -> dict[str, Any]:
    from wasidispatch.detect import sniff_path
    from wasidispatch.errors import DetectionError, SpecError
    from wasidispatch.oci.bundle import Bundle

    bundle = Bundle.load(path)
    process = bundle.spec.process
    report: dict[str, Any] = {
        "kind": "runtime bundle",
        "path": str(bundle.path),
        "ociVersion": bundle.spec.oci_version,
        "rootfs": str(bundle.rootfs),
        "args": list(process.args or []) if process else [],
        "annotations": dict(bundle.annotations),
    }
    try:
        entry = bundle.resolve_entrypoint()
        report["entrypoint"] = str(entry)
        report["format"] = str(sniff_path(entry))
    except (SpecError, DetectionError) as exc:
        report["entrypoint"] = f"unresolved: {exc}"
    return report


def _layout(path: Path, tag: str | None) -> dict[str, Any]:
    from wasidispatch.oci.layout import ImageLayout

    layout = ImageLayout.open(path)
    report: dict[str, Any] = {"kind": "image layout", "path": str(layout.path)}
    refs = [tag] if tag is not None else layout.refs()
    report["refs"] = layout.refs()
    report["images"] = [_image(layout, ref) for ref in refs]
    return report


def _image(layout: Any, ref: str) -> dict[str, Any]:
    from wasidispatch.oci.image import MEDIA_TYPE_IMAGE_CONFIG, ImageConfig
    from wasidispatch.oci.layout import is_wasm_image, wasm_layers
    from wasidispatch.oci.wasm import MEDIA_TYPE_WASM_CONFIG, WasmConfig

    desc, manifest = layout.resolve(ref)
    item: dict[str, Any] = {
        "ref": ref,
        "digest": str(desc.digest),
        "mediaType": manifest.media_type or desc.media_type,
        "config": f"{manifest.config.media_type} {manifest.config.digest}",
        "layers": [f"{la.media_type} {la.size} {la.digest}" for la in manifest.layers],
    }
    if manifest.annotations:
        item["annotations"] = dict(manifest.annotations)
    if manifest.config.media_type == MEDIA_TYPE_WASM_CONFIG:
        config = layout.read_json(manifest.config, WasmConfig)
        item["type"] = "wasm artifact"
        item["platform"] = f"{config.architecture}/{config.os}"
    elif manifest.config.media_type == MEDIA_TYPE_IMAGE_CONFIG:
        image = layout.read_json(manifest.config, ImageConfig)
        item["type"] = "wasm image" if is_wasm_image(manifest, image) else "image"
        item["platform"] = f"{image.os}/{image.architecture}"
        if image.config is not None:
            item["entrypoint"] = [*(image.config.entrypoint or []), *(image.config.cmd or [])]
    else:
        item["type"] = "artifact"
    wasm = wasm_layers(layout, ref)
    if wasm:
        item["wasm"] = [f"{_sniff_layer(layout, w)} {w.digest}" for w in wasm]
    return item


def _sniff_layer(layout: Any, layer: Any) -> str:
    """The detected format of a Wasm layer; an artifact layer is streamed (verified to its
    end, only its head kept), so inspecting a large module costs no memory."""
    if layer.origin != "layer":
        return _detected(layer.read_bytes())
    with layout.open_blob(layer.descriptor) as reader:
        head = reader.read(4096)
        while reader.read(1 << 20):
            pass
    return _detected(head)

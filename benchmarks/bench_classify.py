"""``classify`` against a full ``pull`` of the same image, on a loopback registry.

Run: ``.venv/bin/python -m pytest benchmarks/bench_classify.py -o python_files='bench_*.py'
--benchmark-only`` (Debian's docker-registry and busybox-static). One registry on 127.0.0.1
(plain HTTP), the images pushed once per module with ``wasidispatch.oci.registry.push``:

* ``wasm``: `pack_image` of a small module, unannotated (``variant=None``): only the
  entrypoint's bytes say it is Wasm; one gzip layer.
* ``busybox``: `tests.containerd_harness.busybox_layout` (Debian's static busybox, one
  uncompressed layer, ``Cmd: [sh]`` through the ``/bin/sh`` symlink).
* ``layered``: 50 MB of incompressible files in five gzip layers, and a top layer holding
  ``/app.wasm`` (the ``Entrypoint``) followed by 2 MB more.

Groups, one per image: ``classify`` (a `Classifier` without a cache: every round reads the
registry) against ``pull`` (`wasidispatch.oci.registry.pull` into a new layout each round:
the way a tool without ``classify`` decides). ``extra_info["bytes"]``: bytes read
(`ImageDecision.bytes_read`; for a pull, the blobs and manifests it stored). Group
``repeat``: the same digest again, answered by the cache: a local layout, a registry
reference by digest (no request) and by tag (one ``HEAD`` of the manifest).

Targets (issue 14): for ``layered`` classify reads <= 10% of the pull's bytes (asserted here,
bytes are not timings) and is >= 10x faster; a repeated classify <= 100 us.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import wasmtime
from pytest_benchmark.fixture import BenchmarkFixture

from tests.containerd_harness import busybox_layout
from tests.registry_harness import REGISTRY_BIN, local_registry
from wasidispatch.classify import Classifier
from wasidispatch.oci.image import (
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_IMAGE_LAYER_GZIP,
    MEDIA_TYPE_IMAGE_MANIFEST,
    Digest,
)
from wasidispatch.oci.layout import ImageLayout, node_platform, pack_image
from wasidispatch.oci.registry import pull, push

NODE_OS, NODE_ARCH = node_platform().split("/")[:2]
WASM = bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))

pytestmark = [
    pytest.mark.skipif(not Path(REGISTRY_BIN).exists(), reason="docker-registry not installed"),
    pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static not installed"),
]


class Pushed(NamedTuple):
    ref: str  # by tag
    pinned: str  # by digest
    layout: Path  # the layout it was pushed from


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry (distribution 2.8) on 127.0.0.1, plain HTTP."""
    with local_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running.address


def _tar(files: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _layered(directory: Path, ref: str) -> None:
    """Five gzip layers of 10 MB of random files each, then the top layer: /app.wasm first,
    then 2 MB more."""
    layout = ImageLayout.create(directory)
    tars = [
        _tar([(f"data/{n}/{i}.bin", os.urandom(1 << 20), 0o644) for i in range(10)])
        for n in range(5)
    ]
    tars.append(_tar([("app.wasm", WASM, 0o755), ("assets/blob.bin", os.urandom(2 << 20), 0o644)]))
    layers = [
        layout.write_blob(
            gzip.compress(t, compresslevel=1, mtime=0), media_type=MEDIA_TYPE_IMAGE_LAYER_GZIP
        )
        for t in tars
    ]
    config = {
        "architecture": NODE_ARCH,
        "os": NODE_OS,
        "config": {"Entrypoint": ["/app.wasm"]},
        "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(t)) for t in tars]},
    }
    config_desc = layout.write_blob(json.dumps(config).encode(), media_type=MEDIA_TYPE_IMAGE_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": config_desc.dump(),
        "layers": [d.dump() for d in layers],
    }
    body = json.dumps(manifest).encode()
    layout.tag(layout.write_blob(body, media_type=MEDIA_TYPE_IMAGE_MANIFEST), ref)


@pytest.fixture(scope="module")
def images(registry: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pushed]:
    base = tmp_path_factory.mktemp("images")
    pack_image(ImageLayout.create(base / "wasm"), WASM, "v1", variant=None)
    busybox_layout(base / "busybox", "v1")
    _layered(base / "layered", "v1")
    pushed = {}
    for name in ("wasm", "busybox", "layered"):
        ref = f"{registry}/bench/{name}:v1"
        desc = push(base / name, "v1", ref)
        pushed[name] = Pushed(ref, f"{registry}/bench/{name}@{desc.digest}", base / name)
    return pushed


def _stored_bytes(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs").rglob("*") if p.is_file())


@pytest.mark.parametrize("image", ["wasm", "busybox", "layered"])
def test_classify(benchmark: BenchmarkFixture, images: dict[str, Pushed], image: str) -> None:
    benchmark.group = image
    classifier = Classifier(cache_size=0)
    decision = benchmark(classifier.classify, images[image].ref)
    assert decision.kind == ("linux" if image == "busybox" else "wasm")
    benchmark.extra_info["bytes"] = decision.bytes_read


@pytest.mark.parametrize("image", ["wasm", "busybox", "layered"])
def test_pull(
    benchmark: BenchmarkFixture, images: dict[str, Pushed], image: str, tmp_path: Path
) -> None:
    benchmark.group = image
    targets = iter(tmp_path / f"pull{n}" for n in range(1000))
    done: list[Path] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        for old in done:
            shutil.rmtree(old, ignore_errors=True)
        target = next(targets)
        done.append(target)
        return (images[image].ref, target), {}

    rounds = 5 if image == "layered" else 20
    benchmark.pedantic(  # type: ignore[no-untyped-call]
        pull, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1
    )
    benchmark.extra_info["bytes"] = _stored_bytes(done[-1])


def test_layered_classify_reads_a_tenth_of_a_pull(
    images: dict[str, Pushed], tmp_path: Path
) -> None:
    decision = Classifier(cache_size=0).classify(images["layered"].ref)
    pull(images["layered"].ref, tmp_path / "full")
    pulled = _stored_bytes(tmp_path / "full")
    assert pulled >= 50 << 20
    assert decision.bytes_read * 10 <= pulled


@pytest.mark.parametrize("how", ["layout", "digest", "tag"])
def test_repeat(benchmark: BenchmarkFixture, images: dict[str, Pushed], how: str) -> None:
    benchmark.group = "repeat"
    pushed = images["wasm"]
    ref = {"layout": f"{pushed.layout}:v1", "digest": pushed.pinned, "tag": pushed.ref}[how]
    classifier = Classifier()
    first = classifier.classify(ref)
    decision = benchmark(classifier.classify, ref)
    assert decision.cached
    assert decision == first

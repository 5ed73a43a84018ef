"""OCI documents: load + validate with the pydantic models vs jsonschema on the upstream schemas.

Run: ``.venv/bin/python -m pytest benchmarks/bench_oci.py --benchmark-only``. One group per
document, both contenders in the same run, each starting from the raw JSON bytes:

* ``models``: ``Spec.parse(data)`` / ``Manifest.parse(data)`` / ``Index.parse(data)``:
  JSON decoding, validation and the typed objects;
* ``jsonschema``: ``json.loads(data)`` then ``validate`` with a prepared ``Draft4Validator``
  over the upstream schemas (``tests/data/oci/*/schema``; references resolved through a
  ``referencing`` registry built once). This is the schema alone, without image-spec's Go-side
  digest/Env checks, so it does less than the models.

Documents (``tests/data/oci``): runtime-spec's full ``config.json`` example
(``valid-spec-example.json``, 6 KB: process, mounts, hooks, Linux resources, seccomp), a
realistic runc ``config.json`` (runc's default spec for a Wasm entrypoint, from
``wasidispatch._bundles.config``), the image-spec manifest example and the multi-platform index
example. Target: the models >= 5x faster than jsonschema.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft4Validator
from pytest_benchmark.fixture import BenchmarkFixture
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from wasidispatch._bundles import DEFAULT_PATH, config
from wasidispatch.oci._base import OCIModel
from wasidispatch.oci.image import Index, Manifest
from wasidispatch.oci.runtime import Spec

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "oci"

# A realistic runc config.json (the shape of `runc spec` output, as the demo and tests write it)
# for a Wasm entrypoint, with runc spec's devpts and sysfs mounts on top.
RUNC_CONFIG: dict[str, Any] = config(
    ["/app.wasm", "--serve"],
    env=(DEFAULT_PATH, "TERM=xterm"),
    annotations={"run.oci.handler": "wasm"},
    memory_limit=134217728,
    mounts=[
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
    ],
)


def _registry() -> Registry:
    """Every upstream schema under the URIs its relative references resolve to."""
    resources: list[tuple[str, Resource[Any]]] = []
    for spec, bases in (
        ("runtime-spec", ["https://oci.invalid/runtime/"]),
        (
            "image-spec",
            ["https://opencontainers.org/schema/", "https://opencontainers.org/schema/image/"],
        ),
    ):
        for path in sorted((DATA / spec / "schema").glob("*.json")):
            contents = json.loads(path.read_text())
            contents.pop("id", None)  # placed by URI below instead
            for base in bases:
                resources.append((base + path.name, DRAFT4.create_resource(contents)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def _validator(uri: str) -> Draft4Validator:
    return Draft4Validator({"$ref": uri}, registry=REGISTRY)


DOCUMENTS: dict[str, tuple[bytes, type[OCIModel], str]] = {
    "config.json spec example": (
        (DATA / "runtime-spec/config/valid-spec-example.json").read_bytes(),
        Spec,
        "https://oci.invalid/runtime/config-schema.json",
    ),
    "config.json runc default": (
        json.dumps(RUNC_CONFIG).encode(),
        Spec,
        "https://oci.invalid/runtime/config-schema.json",
    ),
    "image manifest": (
        (DATA / "image-spec/md-examples/valid-manifest-01-manifest.json").read_bytes(),
        Manifest,
        "https://opencontainers.org/schema/image/image-manifest-schema.json",
    ),
    "image index": (
        (DATA / "image-spec/md-examples/valid-image-index-01-image-index.json").read_bytes(),
        Index,
        "https://opencontainers.org/schema/image/image-index-schema.json",
    ),
}


def _contender(name: str, contender: str) -> Callable[[], object]:
    data, model, uri = DOCUMENTS[name]
    if contender == "models":
        return lambda: model.parse(data)
    validator = _validator(uri)

    def with_jsonschema() -> object:
        document = json.loads(data)
        validator.validate(document)
        return document

    return with_jsonschema


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_both_contenders_accept_and_reject_alike(name: str) -> None:
    """Sanity check (not timed): the schemas load, and both sides agree on the document."""
    data, model, uri = DOCUMENTS[name]
    model.parse(data)
    _validator(uri).validate(json.loads(data))
    broken = json.loads(data)
    broken["schemaVersion" if model is not Spec else "ociVersion"] = 7.5
    assert list(_validator(uri).iter_errors(broken))
    with pytest.raises(ValueError, match="Input should be"):
        model.parse(json.dumps(broken))


@pytest.mark.parametrize("contender", ["models", "jsonschema"])
@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_load_and_validate(benchmark: BenchmarkFixture, name: str, contender: str) -> None:
    benchmark.group = f"oci: {name}"
    benchmark.name = contender
    benchmark(_contender(name, contender))

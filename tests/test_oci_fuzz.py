"""Fuzzing the parsers of outside input (issue 11, item 8): config.json models, image manifests,
indexes and configs, digests, ``ImageLayout.resolve``/``tag`` of arbitrary references and the
``DIR:TAG`` argument of ``pack``/``inspect``. The only exception any of them may raise is
`SpecError` (a ``wasidispatch`` error for the CLI, which then exits 1), never another one.

Bounded: ``deadline=None`` (no timing), a modest ``max_examples``, no shrinking past that.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wasidispatch._cli.pack import split_layout_ref
from wasidispatch.cli import main
from wasidispatch.errors import SpecError
from wasidispatch.oci._base import OCIModel
from wasidispatch.oci.image import Descriptor, Digest, ImageConfig, Index, LayoutHeader, Manifest
from wasidispatch.oci.layout import ImageLayout, pack_wasm
from wasidispatch.oci.runtime import Spec, State
from wasidispatch.oci.wasm import WasmConfig

DATA = Path(__file__).resolve().parent / "data" / "oci"
FUZZ = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# JSON values, including the awkward ones: lone surrogates, NUL, huge and negative numbers,
# floats at the extremes, deep-ish nesting.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["\0", "/\0", "\ud800", "a\udcff", "PATH=/bin", "/app.wasm", "sha256:"])
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)


def _examples(*globs: str) -> list[Any]:
    docs = []
    for pattern in globs:
        for path in sorted(DATA.glob(pattern)):
            try:
                docs.append(json.loads(path.read_text()))
            except ValueError:
                continue  # the deliberately broken ones are fuzzed as bytes below
    return docs


RUNTIME_EXAMPLES = _examples("runtime-spec/config/*.json")
IMAGE_EXAMPLES = _examples(
    "image-spec/md-examples/*.json", "image-spec/tests/*.json", "wasm-oci/*.json"
)
MODELS: list[type[OCIModel]] = [
    Spec,
    State,
    Manifest,
    Index,
    ImageConfig,
    WasmConfig,
    Descriptor,
    LayoutHeader,
]


def _only_spec_errors(model: type[OCIModel], document: Any) -> None:
    try:
        parsed = model.parse(document, source="fuzz")
    except SpecError:
        return
    parsed.to_json()  # what was accepted can be written back
    parsed.dump()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _mutate(doc: Any, seed: int, replacement: Any) -> Any:
    """``doc`` with one value (picked by ``seed``) replaced, deleted or its key renamed."""
    doc = json.loads(json.dumps(doc))
    paths = _paths(doc)
    rng = random.Random(seed)
    path = rng.choice(paths)
    if not path:
        return replacement
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = rng.randrange(3)
    if action == 0 or isinstance(parent, list):
        parent[path[-1]] = replacement
    elif action == 1:
        del parent[path[-1]]
    else:
        parent[str(replacement)[:8]] = parent.pop(path[-1])
    return doc


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@FUZZ
@given(document=json_values)
def test_any_json_value_is_parsed_or_a_spec_error(model: type[OCIModel], document: Any) -> None:
    _only_spec_errors(model, document)
    try:
        text = json.dumps(document).encode("utf-8", "surrogatepass")
    except ValueError:
        return  # NaN and friends are already fuzzed as a mapping above
    _only_spec_errors(model, text)


@FUZZ
@given(seed=st.integers(0, 2**32), replacement=json_values, index=st.integers(0, 10**6))
def test_mutated_real_configs_are_parsed_or_a_spec_error(
    seed: int, replacement: Any, index: int
) -> None:
    doc = _mutate(RUNTIME_EXAMPLES[index % len(RUNTIME_EXAMPLES)], seed, replacement)
    _only_spec_errors(Spec, doc)
    _only_spec_errors(Spec, json.dumps(doc).encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    "model", [Manifest, Index, ImageConfig, WasmConfig, Descriptor], ids=lambda m: m.__name__
)
@FUZZ
@given(seed=st.integers(0, 2**32), replacement=json_values, index=st.integers(0, 10**6))
def test_mutated_real_image_documents_are_parsed_or_a_spec_error(
    model: type[OCIModel], seed: int, replacement: Any, index: int
) -> None:
    doc = _mutate(IMAGE_EXAMPLES[index % len(IMAGE_EXAMPLES)], seed, replacement)
    _only_spec_errors(model, doc)
    _only_spec_errors(model, json.dumps(doc).encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=st.binary(max_size=300), index=st.integers(0, 10**6), cut=st.integers(0, 4000))
def test_damaged_json_bytes_are_a_spec_error(data: bytes, index: int, cut: int) -> None:
    docs = RUNTIME_EXAMPLES + IMAGE_EXAMPLES
    text = json.dumps(docs[index % len(docs)]).encode()
    damaged = text[: cut % (len(text) + 1)] + data + text[cut % (len(text) + 1) :]
    for model in MODELS:
        _only_spec_errors(model, damaged)


@FUZZ
@given(
    value=st.text(max_size=140)
    | st.from_regex(r"\A[a-z0-9+._-]{1,10}:[a-zA-Z0-9=_-]{1,130}\Z")
    | st.builds(
        lambda h: f"sha256:{h}", st.text("0123456789abcdefABCDEF", min_size=60, max_size=66)
    )
)
def test_digests_are_validated_or_a_spec_error(value: str) -> None:
    try:
        digest = Digest.parse(value)
    except SpecError:
        return
    assert "/" not in digest
    assert ".." not in digest.encoded
    assert digest.blob_path == f"blobs/{digest.algorithm}/{digest.encoded}"
    try:
        digest.hasher()
    except SpecError:
        assert digest.algorithm not in ("sha256", "sha384", "sha512")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> ImageLayout:
    layout = ImageLayout.create(tmp_path_factory.mktemp("fuzz") / "layout")
    pack_wasm(layout, wasmtime.wat2wasm('(module (func (export "_start")))'), "v1", created=None)
    return layout


_refs = st.text(max_size=40) | st.sampled_from(["v1", "", "\0", "\ud800", "v1\n", "../v1", "v1:x"])


@FUZZ
@given(ref=_refs)
def test_resolving_any_reference_is_the_manifest_or_a_spec_error(
    layout: ImageLayout, ref: str
) -> None:
    try:
        desc, manifest = layout.resolve(ref)
    except SpecError:
        assert ref != "v1"
        return
    assert ref == "v1"
    assert desc.ref_name == "v1"
    assert manifest.layers


@FUZZ
@given(ref=_refs)
def test_tagging_any_reference_is_done_or_a_spec_error(tmp_path: Path, ref: str) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        layout = ImageLayout.create(tmp)
        desc = pack_wasm(layout, wasmtime.wat2wasm("(module)"), "v1", created=None)
        try:
            tagged = layout.tag(desc, ref)
        except SpecError:
            assert ImageLayout.open(tmp).refs() == ["v1"]  # nothing half written
            return
        assert layout.resolve(ref)[0].digest == tagged.digest


@FUZZ
@given(
    value=st.text(max_size=60)
    | st.sampled_from([":", "::", "/:", ":v1", "/tmp:", "\0:x", "\ud800:v"])
)
def test_layout_refs_split_without_error(value: str) -> None:
    for must_exist in (True, False):
        directory, tag = split_layout_ref(value, must_exist=must_exist)
        assert isinstance(directory, str)
        assert tag is None or (tag and f"{directory}:{tag}" == value)


# No lone surrogates here: argv never holds one but \udc80-\udcff (surrogateescape), and the
# real stderr writes those with backslashreplace (pytest's captured one is strict).
_cli_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)


@FUZZ
@given(value=_cli_text | st.sampled_from(["\0:x", "-:", ":v1", "/dev/zero", "/proc:1", "a:b:c"]))
def test_inspect_and_pack_of_any_dir_tag_exit_with_a_code(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    wasm = tmp_path / "app.wasm"
    if not wasm.exists():
        wasm.write_bytes(wasmtime.wat2wasm("(module)"))
    # pack writes: always under tmp_path (no "/" in the fuzzed part, so no ".." either).
    target = f"{tmp_path}/out/{value.replace('/', '_')}"
    assert main(["inspect", "--", value]) in (0, 1)
    assert main(["pack", "--", str(wasm), target]) in (0, 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "internal error" not in err

"""No write through a planted file (issue 11, item 1): layouts, ``pack`` output and the bundles
``_bundles`` writes never follow a symlink (or truncate a file) planted beforehand at a final
or a temporary name; a symlinked directory on the way in is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import wasmtime

from wasidispatch import _fs
from wasidispatch._bundles import wasm_bundle
from wasidispatch.cli import main
from wasidispatch.errors import SpecError
from wasidispatch.oci.bundle import Bundle
from wasidispatch.oci.image import Digest
from wasidispatch.oci.layout import ImageLayout, pack_wasm, wasm_layers

VICTIM_TEXT = b"precious, must stay as it is\n"


@pytest.fixture
def module() -> bytes:
    return bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM_TEXT)
    return path


@pytest.fixture
def victim_dir(tmp_path: Path) -> Path:
    path = tmp_path / "victim-dir"
    path.mkdir()
    return path


@pytest.fixture
def predictable_temp_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``_fs``'s temporary names become ``.<name>.t0.tmp``, ``.<name>.t1.tmp``, ..."""
    handed: list[str] = []

    def token() -> str:
        handed.append(f"t{len(handed)}")
        return handed[-1]

    monkeypatch.setattr(_fs, "_token", token)
    return handed


# --- bundles written by _bundles -------------------------------------------------------------


def test_bundle_config_json_symlink_is_replaced_not_followed(
    tmp_path: Path, module: bytes, victim: Path
) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "config.json").symlink_to(victim)
    wasm_bundle(bundle, module)
    assert victim.read_bytes() == VICTIM_TEXT
    assert not (bundle / "config.json").is_symlink()
    assert Bundle.load(bundle).spec.process is not None


def test_bundle_rootfs_file_symlink_is_replaced_not_followed(
    tmp_path: Path, module: bytes, victim: Path
) -> None:
    rootfs = tmp_path / "b" / "rootfs"
    rootfs.mkdir(parents=True)
    (rootfs / "app.wasm").symlink_to(victim)
    wasm_bundle(tmp_path / "b", module)
    assert victim.read_bytes() == VICTIM_TEXT
    assert (rootfs / "app.wasm").read_bytes() == module
    assert not (rootfs / "app.wasm").is_symlink()


@pytest.mark.parametrize("planted", ["rootfs", "rootfs/bin"])
def test_bundle_symlinked_directory_on_the_way_is_refused(
    tmp_path: Path, module: bytes, victim_dir: Path, planted: str
) -> None:
    bundle = tmp_path / "b"
    link = bundle / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim_dir)
    with pytest.raises(SpecError, match="a symlink or a file is in the way"):
        wasm_bundle(bundle, module, ["/bin/app.wasm"])
    assert list(victim_dir.iterdir()) == []


def test_bundle_planted_temporary_names_are_skipped(
    tmp_path: Path, module: bytes, victim: Path, predictable_temp_names: list[str]
) -> None:
    bundle = tmp_path / "b"
    (bundle / "rootfs").mkdir(parents=True)
    # The first temporary name of each file written (t0: app.wasm, t2: config.json after the
    # retry) is a symlink to the victim.
    (bundle / "rootfs" / ".app.wasm.t0.tmp").symlink_to(victim)
    (bundle / ".config.json.t2.tmp").symlink_to(victim)
    wasm_bundle(bundle, module)
    assert victim.read_bytes() == VICTIM_TEXT
    assert predictable_temp_names == ["t0", "t1", "t2", "t3"]
    assert (bundle / "rootfs" / "app.wasm").read_bytes() == module
    assert Bundle.load(bundle).resolve_entrypoint().read_bytes() == module


# --- image layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["blobs", "blobs/sha256"])
def test_layout_symlinked_blobs_directory_is_refused(
    tmp_path: Path, victim_dir: Path, planted: str
) -> None:
    root = tmp_path / "layout"
    (root / planted).parent.mkdir(parents=True, exist_ok=True)
    (root / planted).symlink_to(victim_dir)
    with pytest.raises(SpecError, match="a symlink or a file is in the way"):
        ImageLayout.create(root)
    assert list(victim_dir.iterdir()) == []


def test_layout_write_blob_into_a_symlinked_algorithm_directory_is_refused(
    tmp_path: Path, victim_dir: Path
) -> None:
    layout = ImageLayout.create(tmp_path / "layout")
    (layout.path / "blobs" / "sha512").symlink_to(victim_dir)
    with pytest.raises(SpecError, match="a symlink or a file is in the way"):
        layout.write_blob(b"data", algorithm="sha512")
    assert list(victim_dir.iterdir()) == []


def test_layout_dangling_symlinks_at_document_names_are_never_followed(
    tmp_path: Path,
) -> None:
    root = tmp_path / "layout"
    root.mkdir()
    target = tmp_path / "created-through-the-link"
    (root / "index.json").symlink_to(target)
    with pytest.raises(SpecError, match=r"index\.json .*symbolic links"):
        ImageLayout.create(root)  # refused: the planted name is not the layout's own file
    assert not target.exists()


def test_layout_index_symlink_is_never_written_through(
    tmp_path: Path, module: bytes, victim: Path
) -> None:
    layout = ImageLayout.create(tmp_path / "layout")
    desc = pack_wasm(layout, module, "v1", created=None)
    index = layout.path / "index.json"
    victim.write_bytes(index.read_bytes())  # a valid index: only the symlink is wrong
    before = victim.read_bytes()
    index.unlink()
    index.symlink_to(victim)
    with pytest.raises(SpecError, match=r"index\.json .*symbolic links"):
        layout.tag(desc, "v2")
    assert victim.read_bytes() == before


def test_layout_planted_temporary_names_are_skipped(
    tmp_path: Path, module: bytes, victim: Path, predictable_temp_names: list[str]
) -> None:
    layout = ImageLayout.create(tmp_path / "layout")
    used = len(predictable_temp_names)
    layer = layout.blob_path(Digest.of(module))
    # Every temporary name the layer blob and index.json could get next is a planted symlink.
    for i in range(used, used + 8):
        (layer.parent / f".{layer.name}.t{i}.tmp").symlink_to(victim)
        (layout.path / f".index.json.t{i}.tmp").symlink_to(victim)
    pack_wasm(layout, module, "v1", created=None)
    assert victim.read_bytes() == VICTIM_TEXT
    assert len(predictable_temp_names) > used + 4  # names were skipped, not followed
    assert [w.read_bytes() for w in wasm_layers(layout, "v1")] == [module]


def test_layout_blob_planted_at_its_final_name_is_replaced(
    tmp_path: Path, module: bytes, victim: Path
) -> None:
    layout = ImageLayout.create(tmp_path / "layout")
    final = layout.blob_path(Digest.of(module))
    final.symlink_to(victim)
    assert not layout.has_blob(Digest.of(module))  # a symlink is no blob
    pack_wasm(layout, module, "v1", created=None)
    assert victim.read_bytes() == VICTIM_TEXT
    assert not final.is_symlink()
    assert final.read_bytes() == module


# --- pack output -----------------------------------------------------------------------------


def test_pack_into_a_layout_with_a_planted_blobs_symlink_writes_nothing_there(
    tmp_path: Path, module: bytes, victim_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wasm = tmp_path / "app.wasm"
    wasm.write_bytes(module)
    root = tmp_path / "layout"
    root.mkdir()
    (root / "blobs").symlink_to(victim_dir)
    assert main(["pack", str(wasm), f"{root}:v1"]) == 1
    assert "a symlink or a file is in the way" in capsys.readouterr().err
    assert list(victim_dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_pack_input_must_be_a_bounded_regular_file(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "app.wasm"
    if kind == "fifo":
        os.mkfifo(source)
    else:
        source.symlink_to("/dev/zero")
    assert main(["pack", str(source), f"{tmp_path / 'layout'}:v1"]) == 1
    assert "not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "layout").exists()  # the layout pack would have made is gone


@pytest.mark.parametrize("target", [":v1", ":\0"])
def test_pack_with_an_empty_dir_writes_nothing_in_the_cwd(
    tmp_path: Path, module: bytes, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    # "DIR" was "": the layout went into the current directory (and a failure rmtree'd "").
    wasm = tmp_path / "app.wasm"
    wasm.write_bytes(module)
    monkeypatch.chdir(tmp_path)
    assert main(["pack", str(wasm), target]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.wasm"]

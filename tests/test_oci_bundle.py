"""Runtime bundles: loading, rootfs location, and entrypoint resolution inside the rootfs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from wasidispatch.errors import DetectionError, SpecError
from wasidispatch.oci.bundle import Bundle


def _write(
    bundle: Path,
    *,
    args: list[str] | None = None,
    env: list[str] | None = None,
    root: str | None = "rootfs",
    cwd: str = "/",
    annotations: dict[str, str] | None = None,
) -> None:
    spec: dict[str, Any] = {"ociVersion": "1.3.0", "process": {"cwd": cwd}}
    if args is not None:
        spec["process"]["args"] = args
    if env is not None:
        spec["process"]["env"] = env
    if root is not None:
        spec["root"] = {"path": root}
    if annotations is not None:
        spec["annotations"] = annotations
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(spec))


def _file(path: Path, data: bytes = b"", mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def wasm() -> bytes:
    return bytes(wasmtime.wat2wasm("(module)"))


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    (tmp_path / "b" / "rootfs").mkdir(parents=True)
    return tmp_path / "b"


def test_load_relative_rootfs_and_annotations(bundle_dir: Path) -> None:
    _write(bundle_dir, args=["/app"], annotations={"run.oci.handler": "wasm"})
    bundle = Bundle.load(bundle_dir)
    assert bundle.path == bundle_dir.absolute()
    assert bundle.rootfs == bundle_dir / "rootfs"
    assert bundle.rootfs.is_absolute()
    assert bundle.annotations == {"run.oci.handler": "wasm"}
    assert bundle.spec.process is not None
    assert bundle.spec.process.args == ["/app"]


def test_load_absolute_rootfs(bundle_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write(bundle_dir, args=["/app"], root=str(elsewhere))
    assert Bundle.load(bundle_dir).rootfs == elsewhere


def test_load_errors_name_the_file_and_field(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"config\.json: cannot read: .* does not exist"):
        Bundle.load(bundle_dir)
    (bundle_dir / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="malformed JSON"):
        Bundle.load(bundle_dir)
    (bundle_dir / "config.json").write_text('{"ociVersion": "1", "process": {"cwd": 1}}')
    with pytest.raises(SpecError, match=r"config\.json: process\.cwd"):
        Bundle.load(bundle_dir)
    _write(bundle_dir, args=["/app"], root=None)
    with pytest.raises(SpecError, match=r"root\.path: required"):
        Bundle.load(bundle_dir)
    _write(bundle_dir, args=["/app"], root="nope")
    with pytest.raises(SpecError, match=r"root\.path: .* is not a directory"):
        Bundle.load(bundle_dir)
    with pytest.raises(SpecError, match="not a bundle directory"):
        Bundle.load(tmp_path / "absent")


def test_absolute_entrypoint_need_not_be_executable(bundle_dir: Path, wasm: bytes) -> None:
    app = _file(bundle_dir / "rootfs" / "app.wasm", wasm, 0o644)
    _write(bundle_dir, args=["/app.wasm", "arg"])
    assert Bundle.load(bundle_dir).resolve_entrypoint() == app.resolve()


def test_relative_entrypoint_is_relative_to_cwd(bundle_dir: Path, wasm: bytes) -> None:
    app = _file(bundle_dir / "rootfs" / "srv" / "app.wasm", wasm)
    _write(bundle_dir, args=["./app.wasm"], cwd="/srv")
    assert Bundle.load(bundle_dir).resolve_entrypoint() == app.resolve()


def test_bare_name_uses_the_spec_path_not_the_hosts(bundle_dir: Path, wasm: bytes) -> None:
    app = _file(bundle_dir / "rootfs" / "opt" / "tools" / "app", wasm)
    _write(bundle_dir, args=["app"], env=["PATH=/nowhere:/opt/tools"])
    assert Bundle.load(bundle_dir).resolve_entrypoint() == app.resolve()
    # "sh" exists on the host's PATH, but not in the rootfs: not found.
    _write(bundle_dir, args=["sh"], env=["PATH=/bin:/usr/bin"])
    with pytest.raises(SpecError, match=r"'sh' is not an executable file in PATH=/bin:/usr/bin"):
        Bundle.load(bundle_dir).resolve_entrypoint()


def test_default_path_when_env_has_none(bundle_dir: Path, wasm: bytes) -> None:
    app = _file(bundle_dir / "rootfs" / "usr" / "local" / "bin" / "app", wasm)
    _write(bundle_dir, args=["app"], env=["HOME=/root"])
    bundle = Bundle.load(bundle_dir)
    assert "/usr/local/bin" in bundle.search_path()
    assert bundle.resolve_entrypoint() == app.resolve()


def test_path_search_skips_non_executables(bundle_dir: Path, wasm: bytes) -> None:
    _file(bundle_dir / "rootfs" / "a" / "app", wasm, 0o644)
    _file(bundle_dir / "rootfs" / "b" / "app", wasm, 0o755)
    (bundle_dir / "rootfs" / "c" / "app").mkdir(parents=True)  # a directory is no match either
    _write(bundle_dir, args=["app"], env=["PATH=/c:/a:/b"])
    assert Bundle.load(bundle_dir).resolve_entrypoint() == (bundle_dir / "rootfs/b/app").resolve()


def test_symlinks_are_followed_inside_the_rootfs(bundle_dir: Path, wasm: bytes) -> None:
    real = _file(bundle_dir / "rootfs" / "real" / "app.wasm", wasm)
    (bundle_dir / "rootfs" / "bin").mkdir()
    # An absolute target is the container's /real/app.wasm, not the host's.
    (bundle_dir / "rootfs" / "bin" / "app").symlink_to("/real/app.wasm")
    _write(bundle_dir, args=["app"], env=["PATH=/bin"])
    assert Bundle.load(bundle_dir).resolve_entrypoint() == real.resolve()


@pytest.mark.parametrize("target", ["../../../../../../etc/passwd", "../.."])
def test_rootfs_symlink_escape_is_a_spec_error(bundle_dir: Path, target: str) -> None:
    (bundle_dir / "rootfs" / "bin").mkdir()
    (bundle_dir / "rootfs" / "bin" / "app").symlink_to(target)
    _file(bundle_dir / "rootfs" / "usr" / "bin" / "app")  # a later PATH entry is not used
    for args, env in ((["/bin/app"], None), (["app"], ["PATH=/bin:/usr/bin"])):
        _write(bundle_dir, args=args, env=env)
        with pytest.raises(SpecError, match="escapes the root") as info:
            Bundle.load(bundle_dir).resolve_entrypoint()
        assert isinstance(info.value.__cause__, DetectionError)
        assert "config.json" in str(info.value)


def test_dotdot_in_args_cannot_leave_the_rootfs(bundle_dir: Path) -> None:
    _write(bundle_dir, args=["/../../../bin/sh"])
    with pytest.raises(SpecError, match="escapes the root"):
        Bundle.load(bundle_dir).resolve_entrypoint()


def test_symlink_loop_is_a_spec_error(bundle_dir: Path) -> None:
    os.symlink("b", bundle_dir / "rootfs" / "a")
    os.symlink("a", bundle_dir / "rootfs" / "b")
    _write(bundle_dir, args=["/a"])
    with pytest.raises(SpecError, match="too many levels"):
        Bundle.load(bundle_dir).resolve_entrypoint()


@pytest.mark.parametrize(
    ("args", "message"),
    [(None, "process.args: nothing to run"), ([], "nothing to run"), ([""], "empty")],
)
def test_missing_args(bundle_dir: Path, args: list[str] | None, message: str) -> None:
    _write(bundle_dir, args=args)
    with pytest.raises(SpecError, match=message):
        Bundle.load(bundle_dir).resolve_entrypoint()


def test_missing_or_directory_entrypoint(bundle_dir: Path) -> None:
    _write(bundle_dir, args=["/missing.wasm"])
    with pytest.raises(SpecError, match="no such file"):
        Bundle.load(bundle_dir).resolve_entrypoint()
    (bundle_dir / "rootfs" / "dir").mkdir()
    _write(bundle_dir, args=["/dir"])
    with pytest.raises(SpecError, match="not a file"):
        Bundle.load(bundle_dir).resolve_entrypoint()

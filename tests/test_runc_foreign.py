"""A plainly-Linux bundle whose entrypoint is a foreign-architecture ELF (Debian's arm64
busybox on this amd64 machine) is refused by ``wasidispatch-runc create`` before runc, in
runc's log format, naming the architecture, unless the node has a binfmt handler for it.

Without the check runc's ``create`` succeeds and the container fails only at ``start``, with
"exec format error" and no word of the architecture.
"""

# The fixtures are test_runc_cli's, imported by name (pytest finds them in the module):
# ruff: noqa: F811
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests._fixtures import BUSYBOX_ARM64
from tests.test_runc_cli import (  # noqa: F401 - fixtures
    RUNC,
    Runtime,
    _children,
    cgroup_dirs,
    cgroup_name,
    needs_runtime,
    runtime,
    subreaper,
)

needs_arm64 = pytest.mark.skipif(
    not BUSYBOX_ARM64.is_file(),
    reason=f"{BUSYBOX_ARM64} absent: run `make fixtures` (tests/_fixtures.py fetches it)",
)


def _binfmt_handles_arm64() -> bool:
    root = Path("/proc/sys/fs/binfmt_misc")
    try:
        entries = [p for p in root.iterdir() if p.name not in ("register", "status")]
    except OSError:
        return False
    for entry in entries:
        try:
            text = entry.read_text()
        except OSError:
            continue
        # the ELF header's e_machine for aarch64 is 0xb7, little-endian: "b700" in the magic
        if text.startswith("enabled") and "magic 7f454c46" in text and "b700" in text:
            return True
    return False


def arm64_bundle(directory: Path, cgroups_path: str) -> Path:
    assert RUNC is not None
    (directory / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX_ARM64, directory / "rootfs" / "bin" / "busybox")
    (directory / "rootfs" / "bin" / "echo").symlink_to("busybox")
    subprocess.run([RUNC, "spec", "--bundle", str(directory)], check=True)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["echo", "hello"]
    config["linux"]["cgroupsPath"] = cgroups_path
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@needs_runtime
@needs_arm64
@pytest.mark.skipif(_binfmt_handles_arm64(), reason="this node runs arm64 through binfmt_misc")
def test_foreign_elf_is_refused_before_runc(
    runtime: Runtime, tmp_path: Path, cgroup_name: str
) -> None:
    bundle = arm64_bundle(tmp_path / "b", cgroup_name)
    before = _children()
    with (tmp_path / "out").open("wb") as out:
        proc = runtime(
            "create", "--bundle", str(bundle), "--pid-file", str(bundle / "pid"), "a1", stdout=out
        )
    assert proc.returncode == 1
    assert proc.stderr == ""
    errors = runtime.errors()
    assert len(errors) == 1, errors
    assert "arm64" in errors[0]
    assert not (bundle / "pid").exists()
    assert not (runtime.root / "a1").exists()  # neither our state nor runc's
    assert cgroup_dirs(cgroup_name) == []
    assert _children() <= before
    assert RUNC is not None
    state = subprocess.run(
        [RUNC, "--root", str(runtime.root), "state", "a1"], capture_output=True, check=False
    )
    assert state.returncode != 0  # runc never heard of it


@needs_runtime
def test_a_native_elf_still_goes_to_runc(
    runtime: Runtime, tmp_path: Path, cgroup_name: str
) -> None:
    """The same bundle with the host's own busybox: created by runc, as before."""
    from tests.test_runc_cli import linux_bundle

    bundle = linux_bundle(tmp_path / "b", ["echo", "hello"], cgroup_name)
    with (tmp_path / "out").open("wb") as out:
        proc = runtime(
            "create", "--bundle", str(bundle), "--pid-file", str(bundle / "pid"), "n1", stdout=out
        )
    assert proc.returncode == 0, runtime.errors()
    assert runtime.state("n1")["status"] == "created"
    assert runtime("delete", "--force", "n1").returncode == 0

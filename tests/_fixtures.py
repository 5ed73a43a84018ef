"""Real binaries the tests need that are not on an amd64 machine, fetched once and cached.

``busybox_arm64()`` returns a real arm64 ELF executable: Debian's ``busybox-static:arm64``
downloaded with ``apt-get download`` (after ``dpkg --add-architecture arm64`` and an
``apt-get update``, which need root) and unpacked with ``dpkg -x`` into the gitignored
``tests/.fixtures/``. ``make fixtures`` (run by ``make test``) calls ``python -m tests._fixtures``;
the tests call the same function from a session fixture and skip with its reason if it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / ".fixtures"
BUSYBOX_ARM64 = FIXTURES / "arm64" / "busybox"


class FixtureUnavailable(Exception):
    """A fixture could not be fetched; the message says why."""


def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def busybox_arm64() -> Path:
    """Path of a real arm64 busybox (static ELF executable), fetching it if needed."""
    if BUSYBOX_ARM64.is_file():
        return BUSYBOX_ARM64
    for tool in ("dpkg", "apt-get"):
        if shutil.which(tool) is None:
            raise FixtureUnavailable(f"{tool} not found (a Debian system is needed)")
    foreign = _run("dpkg", "--print-foreign-architectures").stdout.split()
    if "arm64" not in foreign:
        if os.geteuid() != 0:
            raise FixtureUnavailable("arm64 is not a dpkg architecture and we are not root")
        added = _run("dpkg", "--add-architecture", "arm64")
        if added.returncode != 0:
            raise FixtureUnavailable(f"dpkg --add-architecture arm64: {added.stderr.strip()}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=FIXTURES) as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # lets apt's sandbox user write the download
        got = _run("apt-get", "download", "-q", "busybox-static:arm64", cwd=work)
        if got.returncode != 0 and os.geteuid() == 0:
            _run("apt-get", "update", "-qq")  # the arm64 package lists were never fetched
            got = _run("apt-get", "download", "-q", "busybox-static:arm64", cwd=work)
        debs = sorted(work.glob("busybox-static_*_arm64.deb"))
        if got.returncode != 0 or not debs:
            raise FixtureUnavailable(
                f"apt-get download busybox-static:arm64 failed: {got.stderr.strip()[-300:]}"
            )
        unpacked = work / "root"
        x = _run("dpkg", "-x", str(debs[0]), str(unpacked))
        binary = unpacked / "bin" / "busybox"
        if x.returncode != 0 or not binary.is_file():
            raise FixtureUnavailable(f"dpkg -x {debs[0].name} failed: {x.stderr.strip()}")
        BUSYBOX_ARM64.parent.mkdir(parents=True, exist_ok=True)
        os.replace(binary, BUSYBOX_ARM64)  # atomic: a concurrent run sees all or nothing
    return BUSYBOX_ARM64


def main() -> int:
    """Fetch every fixture; print where they are. Exit 0 even if one is unavailable (the
    tests that need it skip with the reason printed here)."""
    try:
        print(f"arm64 busybox: {busybox_arm64()}")
    except FixtureUnavailable as exc:
        print(f"warning: arm64 busybox unavailable, its tests will skip: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real registry for the tests and benchmarks: Debian's ``docker-registry`` (distribution
2.8) serving plain HTTP on 127.0.0.1 at a free port, its storage under a test directory.

`local_registry` starts one and stops it (terminate, then kill) on the way out, whatever
happened; `free_port` also names a port where nothing listens.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

__all__ = ["REGISTRY_BIN", "LocalRegistry", "free_port", "local_registry", "missing_registry"]

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def missing_registry() -> str | None:
    """Why no registry can be started here, or ``None``."""
    if not Path(REGISTRY_BIN).exists():
        return "docker-registry not installed (make system-deps)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalRegistry(NamedTuple):
    """A running registry: ``address`` (``127.0.0.1:PORT``) and its storage root."""

    address: str
    storage: Path


@contextlib.contextmanager
def local_registry(base: Path, *, delete: bool = False) -> Iterator[LocalRegistry]:
    """Start a registry under ``base`` (config, storage, log); ``delete`` enables manifest
    deletion. Waits (bounded) until ``/v2/`` answers."""
    port = free_port()
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'storage'}\n"
        + ("  delete:\n    enabled: true\n" if delete else "")
        + f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (base / "registry.log").open("wb")
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log, start_new_session=True
    )
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(200):  # wait until it answers (bounded; not a timing assertion)
            try:
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((base / "registry.log").read_text()) from None
                time.sleep(0.05)
        else:
            raise RuntimeError("docker-registry did not start")
        yield LocalRegistry(address, base / "storage")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

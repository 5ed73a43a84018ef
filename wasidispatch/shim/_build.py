"""Generate ``wasidispatch/shim/_pb/`` from the project's own ``.proto`` files.

Run ``python -m wasidispatch.shim._build`` after editing ``wasidispatch/shim/proto/*.proto``
(needs ``grpcio-tools``, the test extra; the generated modules only need ``protobuf``), and
``--check`` to verify that the committed modules are what the sources generate (a test does).

The output is reproducible: one pinned protoc (``grpcio-tools`` 1.85.1), the sources by their
bare names (no absolute path reaches the output), and one rewrite: protoc's top-level
``import mount_pb2`` between generated modules becomes ``from wasidispatch.shim._pb import
mount_pb2``. Each module gets a ``.pyi`` beside it for ``mypy --strict``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "proto"
OUT = HERE / "_pb"
PACKAGE = "wasidispatch.shim._pb"
PROTOC_VERSION = "1.85.1"  # grpcio-tools; its protoc's output is what is committed

_INIT = '''"""Generated protobuf modules (``python -m wasidispatch.shim._build``); do not edit."""
'''


def _rewrite(text: str, modules: set[str]) -> str:
    def local(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in modules:
            return match.group(0)
        alias = match.group(2)
        return f"from {PACKAGE} import {name}" + (f" as {alias}" if alias else "")

    return re.sub(r"^import (\w+_pb2)(?: as (\w+))?$", local, text, flags=re.M)


def generate() -> dict[str, bytes]:
    """Every generated file (name -> bytes), in memory."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - the test extra has it
        raise SystemExit("grpcio-tools is needed: pip install 'wasidispatch[test]'") from exc
    from importlib.metadata import version

    if version("grpcio-tools") != PROTOC_VERSION:
        raise SystemExit(
            f"grpcio-tools {version('grpcio-tools')} installed; the committed modules come "
            f"from {PROTOC_VERSION} (pip install grpcio-tools=={PROTOC_VERSION})"
        )
    sources = sorted(p.name for p in PROTO.glob("*.proto"))
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                *sources,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed ({code})")
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    modules = {name[: -len(".py")] for name in files if name.endswith(".py")}
    out = {n: _rewrite(d.decode(), modules).encode() for n, d in files.items()}
    out["__init__.py"] = _INIT.encode()
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the modules, or with ``--check`` report those that differ."""
    parser = argparse.ArgumentParser(prog="python -m wasidispatch.shim._build")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        stale = sorted(
            n for n, d in files.items() if not (OUT / n).exists() or (OUT / n).read_bytes() != d
        )
        extra = (
            sorted(p.name for p in OUT.iterdir() if p.is_file() and p.name not in files)
            if OUT.exists()
            else []
        )
        for name in stale:
            print(f"stale: {OUT / name}")
        for name in extra:
            print(f"not generated: {OUT / name}")
        return 1 if stale or extra else 0
    OUT.mkdir(exist_ok=True)
    for name, data in files.items():
        (OUT / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

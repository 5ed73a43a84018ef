"""The README's main job (``make demo``): grows with the library; see the docstring of main()."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"
DEMO_DIR = REPO / ".demo"


def detect_demo(workdir: Path = DEMO_DIR) -> int:
    """Run ``wasidispatch detect`` over real files of every kind and print the table.

    Builds the Wasm module and component from the WAT sources in ``docs/examples/`` with
    ``wasmtime.wat2wasm`` into ``workdir`` (when wasmtime is installed), and adds real ELF
    binaries of this machine (``/bin/true``, this Python, a ``.so``), a ``#!`` script, the WAT
    text itself, a Markdown file (unknown), and the tests' arm64 busybox if ``make fixtures``
    fetched it.
    Returns the command's exit status.
    """
    from wasidispatch.cli import main as cli_main

    workdir.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    try:
        import wasmtime
    except ImportError:
        print("(wasmtime not installed: no Wasm binaries built)", file=sys.stderr)
    else:
        for wat in sorted(EXAMPLES.glob("detect-*.wat")):
            out = workdir / (wat.stem.removeprefix("detect-") + ".wasm")
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(bytes(wasmtime.wat2wasm(wat.read_text())))
            os.replace(tmp, out)
            paths.append(str(out))
    paths += [str(p) for p in sorted(EXAMPLES.glob("detect-*.wat"))]
    paths += ["/bin/true", sys.executable]
    spec = importlib.util.find_spec("_ctypes")
    if spec is not None and spec.origin and spec.origin.endswith(".so"):
        link = workdir / "_ctypes.so"  # a short name for the table; detect follows the link
        link.unlink(missing_ok=True)
        link.symlink_to(spec.origin)
        paths.append(str(link))
    for candidate in (Path(sys.executable).parent / "pip", Path("/bin/busybox")):
        if candidate.is_file():
            paths.append(str(candidate))
    arm64 = REPO / "tests" / ".fixtures" / "arm64" / "busybox"
    if arm64.is_file():
        paths.append(str(arm64))
    paths.append(str(REPO / "docs" / "architecture.md"))  # neither Wasm nor Linux: unknown
    rel = [os.path.relpath(p) if p.startswith(str(REPO)) else p for p in paths]
    print("$ wasidispatch detect", " ".join(rel))
    return cli_main(["detect", *rel])


def main() -> int:
    """Print what wasidispatch can do so far on this machine: the detection table."""
    return detect_demo()


if __name__ == "__main__":
    sys.exit(main())

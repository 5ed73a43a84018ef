"""``wasidispatch pack FILE.wasm DIR:TAG``: build a Wasm OCI artifact inside an image layout.

The layout is created when missing (and removed again when the pack fails), written through
:mod:`wasidispatch._fs` (nothing planted in it is followed); FILE.wasm must be a regular file
of at most 1 GiB (``MAX_WASM_SIZE``). ``os`` is
``wasip1`` for a core module and ``wasip2`` for a component (from the file's bytes). Prints the
manifest digest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def split_layout_ref(value: str, *, must_exist: bool = True) -> tuple[str, str | None]:
    """Split ``DIR[:TAG]``: an existing directory wins over a ``:`` inside its name.

    >>> split_layout_ref("/no/such/dir:v1", must_exist=False)
    ('/no/such/dir', 'v1')
    >>> split_layout_ref("/", must_exist=True)
    ('/', None)
    """
    if os.path.isdir(value) or ":" not in value:
        return value, None
    directory, _, tag = value.rpartition(":")
    if must_exist and not os.path.isdir(directory):
        return value, None
    return directory, tag or None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pack`` subcommand."""
    parser = sub.add_parser(
        "pack",
        help="build a Wasm OCI artifact from a .wasm file in an image layout",
        description=(
            "Store FILE.wasm as a Wasm OCI artifact (CNCF TAG Runtime layout: config "
            "application/vnd.wasm.config.v0+json, one application/wasm layer) in the image "
            "layout DIR (created if missing), tagged TAG."
        ),
    )
    parser.add_argument("wasm", metavar="FILE.wasm", help="a Wasm module or component")
    parser.add_argument("target", metavar="DIR:TAG", help="image layout directory and tag")
    parser.add_argument("--title", help="org.opencontainers.image.title of the layer")
    parser.add_argument(
        "--no-created",
        action="store_true",
        help="omit the config's creation time (reproducible digests)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Pack the file; prints ``DIR:TAG sha256:...``."""
    from wasidispatch import _fs
    from wasidispatch.errors import SpecError
    from wasidispatch.oci.layout import MAX_WASM_SIZE, ImageLayout, pack_wasm

    directory, tag = split_layout_ref(args.target, must_exist=False)
    if tag is None or not directory:
        raise SpecError(f"{args.target!r}: give the target as DIR:TAG")
    # A regular file of at most MAX_WASM_SIZE: a FIFO or /dev/zero is refused, never read.
    wasm = _fs.read_regular(args.wasm, limit=MAX_WASM_SIZE, what="FILE.wasm")
    created = not os.path.lexists(directory)
    layout = ImageLayout.create(directory)
    try:
        desc = pack_wasm(
            layout,
            wasm,
            tag,
            created=None if args.no_created else True,
            title=args.title or os.path.basename(args.wasm),
        )
    except BaseException as exc:
        if created:  # a failed pack leaves no layout behind that it made
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(exc, SpecError):
            raise SpecError(f"{args.wasm}: {exc}") from exc
        raise
    sys.stdout.write(f"{directory}:{tag} {desc.digest}\n")
    return 0

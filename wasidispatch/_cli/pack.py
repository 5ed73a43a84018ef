"""``wasidispatch pack FILE.wasm DIR:TAG``: build a Wasm OCI artifact inside an image layout,
or with ``--image`` a runnable OCI image (the ``.wasm`` in its rootfs, ``Entrypoint`` naming
it; extra files with ``--add SRC:DEST``): the form containerd unpacks and CRI runs.

The layout is created when missing (and removed again when the pack fails), written through
:mod:`wasidispatch._fs` (nothing planted in it is followed); FILE.wasm must be a regular file
of at most 1 GiB (``MAX_WASM_SIZE``). ``os`` is
``wasip1`` for a core module and ``wasip2`` for a component (from the file's bytes). Files
given with ``--add`` are read the same way. Prints the manifest digest.
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
        help="build a Wasm OCI artifact (or with --image a runnable image) in an image layout",
        description=(
            "Store FILE.wasm as a Wasm OCI artifact (CNCF TAG Runtime layout: config "
            "application/vnd.wasm.config.v0+json, one application/wasm layer) in the image "
            "layout DIR (created if missing), tagged TAG. With --image: an ordinary OCI image "
            "instead (one gzip tar layer holding FILE.wasm at --path, Entrypoint naming it, "
            "the node's linux platform), which containerd imports and CRI runs."
        ),
    )
    parser.add_argument("wasm", metavar="FILE.wasm", help="a Wasm module or component")
    parser.add_argument("target", metavar="DIR:TAG", help="image layout directory and tag")
    parser.add_argument(
        "--title", help="org.opencontainers.image.title of the layer (artifact only)"
    )
    parser.add_argument(
        "--image",
        action="store_true",
        help="build a runnable OCI image (the .wasm in a tar layer) instead of an artifact",
    )
    parser.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="SRC:DEST",
        help="with --image: also put file SRC at DEST in the image (repeatable)",
    )
    parser.add_argument(
        "--path",
        default=None,
        metavar="DEST",
        help="with --image: where the .wasm goes and what Entrypoint names (default /app.wasm)",
    )
    parser.add_argument(
        "--platform",
        default=None,
        metavar="OS/ARCH[/VARIANT]",
        help="with --image: the config's platform (default: this node's, e.g. linux/amd64)",
    )
    parser.add_argument(
        "--no-gzip", action="store_true", help="with --image: an uncompressed tar layer"
    )
    parser.add_argument(
        "--unmarked",
        action="store_true",
        help="with --image: no module.wasm.image/variant=compat annotation on the manifest",
    )
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
    from wasidispatch.oci.layout import (
        IMAGE_WASM_PATH,
        MAX_WASM_SIZE,
        ImageLayout,
        pack_image,
        pack_wasm,
    )

    directory, tag = split_layout_ref(args.target, must_exist=False)
    if tag is None or not directory:
        raise SpecError(f"{args.target!r}: give the target as DIR:TAG")
    # A regular file of at most MAX_WASM_SIZE: a FIFO or /dev/zero is refused, never read.
    wasm = _fs.read_regular(args.wasm, limit=MAX_WASM_SIZE, what="FILE.wasm")
    image_only = [
        flag
        for flag, given in (
            ("--add", args.add),
            ("--path", args.path is not None),
            ("--platform", args.platform is not None),
            ("--no-gzip", args.no_gzip),
            ("--unmarked", args.unmarked),
        )
        if given
    ]
    if image_only and not args.image:
        raise SpecError(f"{', '.join(image_only)}: only with --image")
    if args.image and args.title is not None:
        raise SpecError("--title: only for an artifact (not with --image)")
    files = _added_files(args.add)
    created = not os.path.lexists(directory)
    layout = ImageLayout.create(directory)
    try:
        if args.image:
            desc = pack_image(
                layout,
                wasm,
                tag,
                path=args.path or IMAGE_WASM_PATH,
                files=files,
                platform=args.platform,
                created=None if args.no_created else True,
                compress=not args.no_gzip,
                variant=None if args.unmarked else "compat",
            )
        else:
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


def _added_files(specs: list[str]) -> dict[str, bytes]:
    """``--add SRC:DEST`` values read: image path -> bytes (regular files of at most 1 GiB)."""
    from wasidispatch import _fs
    from wasidispatch.errors import SpecError
    from wasidispatch.oci.layout import MAX_WASM_SIZE

    files: dict[str, bytes] = {}
    for spec in specs:
        source, _, dest = spec.rpartition(":")
        if not source or not dest:
            raise SpecError(f"--add {spec!r}: give it as SRC:DEST")
        if dest in files:
            raise SpecError(f"--add {spec!r}: {dest} is given twice")
        files[dest] = _fs.read_regular(source, limit=MAX_WASM_SIZE, what="--add SRC")
    return files

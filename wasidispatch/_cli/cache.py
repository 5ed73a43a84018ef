"""``wasidispatch cache stats|clear|warm``: inspect, empty or fill the precompile cache.

``warm PATH...`` precompiles ahead of time: a Wasm file, a runtime bundle's Wasm entrypoint
(a directory with ``config.json``), or the Wasm layers of an OCI image layout ``DIR[:TAG]`` (a
directory with ``oci-layout``; every tag, or only ``TAG``). Each is compiled for the engine
`WasmExecutor` would run it on (``wasidispatch run`` and the executors): for a bundle exactly
`WasmExecutor.plan` (its ``dev.wasidispatch.engine`` annotation included), otherwise the first
engine of the same order (``--engine``, repeated, or the default) that can run the module. On
a terminal a progress bar on stderr follows many or large inputs. Exit status 0 when every
PATH was warmed, 1 when any could not be (the others are still warmed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, cast

if TYPE_CHECKING:
    from collections.abc import Mapping

    from wasidispatch.cache import PrecompileCache
    from wasidispatch.engines import Engine
    from wasidispatch.executor import BundleLike, WasmExecutor

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"2GiB"``, ``"1000"`` -> bytes (binary units).

    Example::

        >>> parse_size("2G"), parse_size("512MiB"), parse_size("1000")
        (2147483648, 536870912, 1000)
    """
    m = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)")
    whole, _, fraction = m.group(1).partition(".")
    scale: int = 10 ** len(fraction)  # exact integer arithmetic: no float overflow or rounding
    value = (int(whole) * scale + int(fraction or 0)) * _UNITS[m.group(2).lower()] // scale
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``cache`` subcommand and its ``stats``, ``clear`` and ``warm`` actions."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        metavar="DIR",
        help="cache directory (default: $XDG_CACHE_HOME/wasidispatch or ~/.cache/wasidispatch)",
    )
    common.add_argument(
        "--max-bytes",
        type=parse_size,
        metavar="SIZE",
        help="bound on the sum of artifact sizes, e.g. 2G (default 2 GiB)",
    )
    parser = sub.add_parser(
        "cache",
        help="inspect, clear or warm the precompile cache",
        description="The node-local cache of precompiled Wasm artifacts.",
    )
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    stats = actions.add_parser(
        "stats", parents=[common], help="counters and size", description="Counters and size."
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument(
        "--entries", action="store_true", help='also list the entries (JSON: under "list")'
    )
    actions.add_parser(
        "clear",
        parents=[common],
        help="remove every entry",
        description="Remove every entry and reset the counters.",
    )
    warm = actions.add_parser(
        "warm",
        parents=[common],
        help="precompile Wasm files, bundles or OCI layouts ahead of time",
        description=(
            "Precompile each PATH: a Wasm file, a runtime bundle (a directory with "
            "config.json; its Wasm entrypoint) or an OCI image layout DIR[:TAG] (a directory "
            "with oci-layout; the Wasm layers of TAG, or of every tag). Each is compiled for "
            "the engine 'wasidispatch run' would pick."
        ),
    )
    warm.add_argument("paths", nargs="+", metavar="PATH")
    warm.add_argument(
        "--engine",
        action="append",
        help="Wasm engine, as for 'wasidispatch run' (repeat for fallbacks; default: "
        "wasmtime-fast, wasmtime, wasmer)",
    )
    warm.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr (auto: on a terminal, for several or large inputs)",
    )
    parser.set_defaults(func=run)


def _open_cache(args: argparse.Namespace) -> PrecompileCache:
    from wasidispatch.cache import DEFAULT_MAX_BYTES, PrecompileCache

    max_bytes: int | None = args.max_bytes
    return PrecompileCache(args.dir, max_bytes=max_bytes or DEFAULT_MAX_BYTES)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    action: str = args.cache_action
    if action == "stats":
        return _stats(args)
    if action == "clear":
        cache = _open_cache(args)
        removed = cache.clear()
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {cache.directory}")
        return 0
    return _warm(args)


def _stats(args: argparse.Namespace) -> int:
    cache = _open_cache(args)
    s = cache.stats()
    entries = cache.entries() if args.entries else []
    if args.json:
        doc: dict[str, object] = {"directory": str(cache.directory), **asdict(s)}
        if args.entries:
            doc["list"] = [asdict(e) for e in entries]
        print(json.dumps(doc))
        return 0
    print(f"directory    {cache.directory}")
    print(f"entries      {s.entries}")
    print(f"size         {_human(s.bytes)} of {_human(s.max_bytes)}")
    for name in ("hits", "misses", "evictions", "corruptions"):
        print(f"{name:<12} {getattr(s, name)}")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used_ns / 1e9))
        print(f"  {e.key[:16]}  {e.engine:<14} {_human(e.size):>10}  {used}  {e.module_digest}")
    return 0


@dataclass(frozen=True, slots=True)
class _Target:
    """One Wasm binary to warm: a file, or bytes read (and digest-verified) on demand, and how
    to pick its engine (``bundle``: the executor's plan; otherwise the executor's order)."""

    label: str
    source: Path | Callable[[], bytes]
    digest: str | None = None
    size: int = 0
    bundle: BundleLike | None = None

    def wasm(self) -> Path | bytes:
        return self.source if isinstance(self.source, Path) else self.source()


@dataclass(frozen=True, slots=True)
class _NoBundle:
    """What `WasmExecutor.select_engine` reads of a bundle (its annotations) for a module
    that comes without one."""

    annotations: Mapping[str, str]


def _engine_for(executor: WasmExecutor, target: _Target, wasm: Path | bytes) -> Engine:
    """The engine ``executor`` would run ``target`` on (raises `CantHandle` when none)."""
    from wasidispatch.engines import Workload

    if target.bundle is not None:
        return executor.plan(target.bundle).engine
    workload = Workload(wasm=wasm, argv=(target.label,))
    stand_in = cast("BundleLike", _NoBundle({}))  # only the annotations are read
    return executor.select_engine(workload, stand_in)[0]


class _Progress:
    """A one-line bar on a terminal's stderr: ``[#####-----] 3/10  4.2/12.0 MiB  name``."""

    WIDTH = 28

    def __init__(self, stream: TextIO, total_items: int, total_bytes: int, on: bool) -> None:
        self.stream = stream
        self.total_items = total_items
        self.total_bytes = max(total_bytes, 1)
        self.on = on
        self.items = 0
        self.bytes = 0
        self.label = ""

    def start(self, label: str) -> None:
        self.label = label
        self._draw()

    def advance(self, size: int) -> None:
        self.items += 1
        self.bytes += size

    def _draw(self) -> None:
        if not self.on:
            return
        filled = int(self.WIDTH * self.bytes / self.total_bytes)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        sizes = f"{_human(self.bytes)}/{_human(self.total_bytes)}"
        line = f"[{bar}] {self.items}/{self.total_items}  {sizes}  {self.label}"
        self.stream.write("\r\x1b[2K" + line[:200])
        self.stream.flush()

    def clear(self) -> None:
        if self.on:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def _targets(arg: str) -> list[_Target]:
    """What to precompile for one PATH; raises a WasiDispatchError when there is nothing."""
    from wasidispatch._cli.pack import split_layout_ref
    from wasidispatch.detect import sniff_path
    from wasidispatch.errors import DetectionError

    directory, tag = split_layout_ref(arg)
    path = Path(directory)
    if path.is_dir() and (path / "oci-layout").is_file():
        return _layout_targets(path, tag)
    path = Path(arg)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _bundle_targets(path)
        raise DetectionError(
            f"{path}: a directory that is neither a runtime bundle (config.json) nor an OCI "
            "image layout (oci-layout)"
        )
    detected = sniff_path(path)
    if not detected.is_wasm:
        raise DetectionError(f"{path}: not a Wasm binary (detected {detected.format})")
    return [_Target(str(path), path, size=path.stat().st_size)]


def _bundle_targets(path: Path) -> list[_Target]:
    """The bundle's entrypoint, resolved inside its rootfs as the container would see it."""
    from wasidispatch.detect import sniff_path
    from wasidispatch.errors import DetectionError
    from wasidispatch.oci.bundle import Bundle

    bundle = Bundle.load(path)
    entry = bundle.resolve_entrypoint()
    detected = sniff_path(entry)
    if not detected.is_wasm:
        raise DetectionError(
            f"{path}: the entrypoint {entry} is not Wasm (detected {detected.format})"
        )
    inside = entry.relative_to(bundle.rootfs) if entry.is_relative_to(bundle.rootfs) else entry
    return [_Target(f"{path}:/{inside}", entry, size=entry.stat().st_size, bundle=bundle)]


def _layout_targets(path: Path, tag: str | None) -> list[_Target]:
    """The Wasm layers of ``tag``, or of every reference in the layout (of its only manifest
    if untagged)."""
    from wasidispatch.oci.layout import ImageLayout, wasm_layers

    layout = ImageLayout.open(path)
    refs: list[str | None] = [tag] if tag is not None else (list(layout.refs()) or [None])
    targets: list[_Target] = []
    seen: set[str] = set()
    for ref in refs:
        for layer in wasm_layers(layout, ref):
            digest = str(layer.digest)
            if digest in seen:
                continue
            seen.add(digest)
            label = f"{path}:{ref or ''}@{digest[:19]}"
            targets.append(_Target(label, layer.read_bytes, digest=digest, size=layer.size))
    return targets


def _warm(args: argparse.Namespace) -> int:
    from wasidispatch.errors import WasiDispatchError
    from wasidispatch.executor import WasmExecutor

    choices: list[str] | None = args.engine
    executor = WasmExecutor(tuple(choices) if choices else None)
    cache = _open_cache(args)
    status = 0
    targets: list[_Target] = []
    for p in args.paths:
        try:
            targets.extend(_targets(p))
        except (WasiDispatchError, OSError) as exc:
            print(f"wasidispatch cache warm: {exc}", file=sys.stderr)
            status = 1
    total = sum(t.size for t in targets)
    mode: str = args.progress
    on = mode == "always" or (
        mode == "auto" and sys.stderr.isatty() and (len(targets) > 1 or total >= 1 << 20)
    )
    bar = _Progress(sys.stderr, len(targets), total, on)
    width = max((len(t.label) for t in targets), default=0)
    for t in targets:
        bar.start(t.label)
        began = time.perf_counter()
        engine_name = "-"
        try:
            wasm = t.wasm()
            engine = _engine_for(executor, t, wasm)
            engine_name = engine.name
            art = cache.artifact(engine, wasm, digest=t.digest)
        except (WasiDispatchError, OSError) as exc:
            bar.clear()
            print(f"wasidispatch cache warm: {t.label}: {exc}", file=sys.stderr)
            status = 1
            bar.advance(t.size)
            continue
        took = time.perf_counter() - began
        bar.advance(t.size)
        bar.clear()
        if art is None:  # the engine cannot precompile, or declined this module
            print(f"{'skipped':<8} {'':>10}  {t.label:<{width}}  {engine_name}", flush=True)
        else:
            state = "cached" if art.hit else "compiled"
            print(
                f"{state:<8} {_human(art.size):>10}  {t.label:<{width}}  {engine_name}  "
                f"{took:.3f}s",
                flush=True,
            )
    bar.clear()
    return status

"""Wasm engines behind one `Engine` protocol, found by name.

The contract types live in :mod:`wasidispatch.engines._api` and are re-exported here. The
registry maps a name to a ``"module:Class"`` string (as fsspec does): nothing is imported
until an engine is asked for, so ``import wasidispatch.engines`` never loads wasmtime or
Wasmer. Third-party engines join through the entry-point group ``wasidispatch.engines``
(``name = "package.module:Class"``), scanned on first use, never at import.

Example::

    >>> from wasidispatch import engines
    >>> "wasmtime" in engines.names()
    True
    >>> engines.get("no-such-engine")
    Traceback (most recent call last):
    ...
    wasidispatch.errors.EngineUnavailable: unknown engine 'no-such-engine'; known: ...
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any, Literal

from wasidispatch.engines._api import (
    TRAP_EXIT_CODE,
    Cancel,
    Capabilities,
    Engine,
    ExitReason,
    Limits,
    Preopen,
    RunResult,
    Stdio,
    Timings,
    Verdict,
    Workload,
)
from wasidispatch.errors import EngineError, EngineUnavailable, WasiDispatchError

__all__ = [
    "ENTRY_POINT_GROUP",
    "TRAP_EXIT_CODE",
    "Cancel",
    "Capabilities",
    "Engine",
    "EngineInfo",
    "ExitReason",
    "Limits",
    "Preopen",
    "RunResult",
    "Stdio",
    "Timings",
    "Verdict",
    "Workload",
    "available",
    "get",
    "names",
    "refresh",
]

#: The entry-point group third-party engines register under.
ENTRY_POINT_GROUP = "wasidispatch.engines"


@dataclass(frozen=True, slots=True)
class _Spec:
    target: str  # "module:Class"
    install_hint: str
    source: Literal["builtin", "entry-point"]


def _extra(extra: str) -> str:
    return f"pip install 'wasidispatch[{extra}]'"


# Built-in engines: name -> where the class lives and what to install when it is missing.
_BUILTIN: dict[str, _Spec] = {
    "wasmtime": _Spec(
        "wasidispatch.engines.wasmtime:WasmtimeEngine", _extra("wasmtime"), "builtin"
    ),
    "wasmtime-fast": _Spec(
        "wasidispatch.engines._wasmtime_cffi:FastWasmtimeEngine", _extra("wasmtime"), "builtin"
    ),
    "wasmer": _Spec("wasidispatch.engines.wasmer:WasmerEngine", _extra("wasmer"), "builtin"),
}

_lock = threading.Lock()
_plugins: dict[str, _Spec] | None = None  # None until the entry points are scanned
_shared: dict[str, Engine] = {}  # engines made by get(name) without options


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What `available` knows about one engine: whether it loads, its version and
    capabilities, and what to install when it does not (``install_hint``, ``error``).

    Example::

        >>> from wasidispatch.engines import available
        >>> info = next(i for i in available() if i.name == "wasmtime")
        >>> info.installed, info.source
        (True, 'builtin')
    """

    name: str
    installed: bool
    version: str | None
    capabilities: Capabilities | None
    install_hint: str
    error: str | None
    target: str
    source: Literal["builtin", "entry-point"]


def _scan_entry_points() -> dict[str, _Spec]:
    from importlib import metadata  # ~20 ms: only when a name is not a built-in

    found: dict[str, _Spec] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _BUILTIN or ep.name in found:
            continue  # built-ins win; the first distribution wins a clash between plugins
        dist = ep.dist.name if ep.dist is not None else None
        hint = f"pip install {dist}" if dist else f"install the package providing {ep.value}"
        found[ep.name] = _Spec(ep.value, hint, "entry-point")
    return found


def _specs() -> dict[str, _Spec]:
    global _plugins
    with _lock:
        if _plugins is None:
            _plugins = _scan_entry_points()
        return {**_BUILTIN, **_plugins}


def refresh() -> None:
    """Forget the scanned entry points and the shared engine instances; the next lookup
    scans the entry-point group again (after installing a plugin in a running process)."""
    global _plugins
    with _lock:
        _plugins = None
        _shared.clear()


def names() -> list[str]:
    """Every engine name known: built-ins first, then entry points, installed or not.

    Example::

        >>> from wasidispatch.engines import names
        >>> names()[:3]
        ['wasmtime', 'wasmtime-fast', 'wasmer']
    """
    return list(_specs())


def _load_class(name: str, spec: _Spec) -> type[Any]:
    module_name, _, attr = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr, None) if attr else None
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module_name
        raise EngineUnavailable(
            f"engine {name!r} is not available ({missing} cannot be imported: {exc}); "
            f"install it with: {spec.install_hint}"
        ) from exc
    except Exception as exc:  # a broken native library must not crash the caller
        raise EngineUnavailable(
            f"engine {name!r} failed to load ({type(exc).__name__}: {exc}); "
            f"try reinstalling: {spec.install_hint}"
        ) from exc
    if not isinstance(cls, type):
        raise EngineUnavailable(f"engine {name!r}: {spec.target} does not name a class")
    return cls


def get(name: str, **options: Any) -> Engine:
    """The engine called ``name``, configured with ``options``.

    Without options the same instance is returned on every call (engines are thread-safe
    and keep their compiled state); with options a new instance is made. Raises
    `EngineUnavailable` for an unknown name or a missing package (the message names the
    ``pip install`` to run), `EngineError` when the class does not satisfy `Engine` or
    refuses the options.
    """
    spec = _BUILTIN.get(name)  # built-ins win anyway: no entry-point scan for them
    if spec is None:
        specs = _specs()
        spec = specs.get(name)
        if spec is None:
            raise EngineUnavailable(f"unknown engine {name!r}; known: {', '.join(specs)}")
    if not options:
        with _lock:
            shared = _shared.get(name)
        if shared is not None:
            return shared
    cls = _load_class(name, spec)
    try:
        engine = cls(**options)
    except WasiDispatchError:
        raise
    except TypeError as exc:
        raise EngineError(f"engine {name!r} does not accept these options: {exc}") from exc
    except Exception as exc:  # a native library that fails to start is "unavailable"
        raise EngineUnavailable(
            f"engine {name!r} failed to start ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(engine, Engine):
        raise EngineError(f"engine {name!r} ({spec.target}) does not implement the Engine protocol")
    if not options:
        with _lock:
            engine = _shared.setdefault(name, engine)
    return engine


def available() -> list[EngineInfo]:
    """One `EngineInfo` per known engine, loading each to learn its version.

    Never raises for a missing or broken engine: that is reported in the entry.
    """
    infos: list[EngineInfo] = []
    for name, spec in _specs().items():
        try:
            engine = get(name)
            version, caps = engine.version(), engine.capabilities
        except Exception as exc:  # report, don't raise: this is a status listing
            infos.append(
                EngineInfo(
                    name, False, None, None, spec.install_hint, str(exc), spec.target, spec.source
                )
            )
            continue
        infos.append(
            EngineInfo(name, True, version, caps, spec.install_hint, None, spec.target, spec.source)
        )
    return infos

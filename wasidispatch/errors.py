"""The one exception tree of wasidispatch.

Everything the library raises on purpose derives from :class:`WasiDispatchError`, so a caller
can catch the library's failures in one place and still tell them apart::

    WasiDispatchError
    ├── DetectionError              unreadable entrypoint, path escapes the root
    ├── SpecError (ValueError)      invalid config.json / manifest / layout, digest mismatch
    ├── EngineError
    │   ├── EngineUnavailable       engine package missing (message says what to install)
    │   ├── CompileError            not valid Wasm for this engine
    │   └── IncompatibleArtifact    precompiled bytes from another engine/version
    ├── ExecutorError
    │   └── CantHandle              not this executor's/engine's workload (carries the reason)
    ├── CacheError                  untrusted or unusable precompile cache
    ├── RegistryError               registry unreachable, refused, or sent bad content
    └── ShimError                   a shim request failed; ``code`` is its ttrpc/gRPC status
        ├── InvalidArgumentError    (3) a request that can never succeed as given
        ├── NotFoundError           (5) no such task, process or shim
        ├── AlreadyExistsError      (6) a second Create of one id
        ├── FailedPreconditionError (9) not in this state (Delete of a running task, ...)
        ├── UnimplementedError      (12) a method or feature this shim does not have
        └── TtrpcError              (14) transport: bad frame, closed or refused connection;
                                    a status from the peer keeps the peer's code

Guest failures (a trap, a non-zero exit code, a timeout, running out of memory) are not
exceptions: they come back as a :class:`wasidispatch.RunResult`.

Errors raised by an engine or a client library are translated at the boundary into the most
specific class above, chaining the original (``raise CompileError(...) from exc``).

Example::

    >>> from wasidispatch.errors import SpecError, WasiDispatchError
    >>> issubclass(SpecError, ValueError) and issubclass(SpecError, WasiDispatchError)
    True
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "CacheError",
    "CantHandle",
    "CompileError",
    "DetectionError",
    "EngineError",
    "EngineUnavailable",
    "ExecutorError",
    "FailedPreconditionError",
    "IncompatibleArtifact",
    "InvalidArgumentError",
    "NotFoundError",
    "RegistryError",
    "ShimError",
    "SpecError",
    "TtrpcError",
    "UnimplementedError",
    "WasiDispatchError",
]


class WasiDispatchError(Exception):
    """Base class of every error wasidispatch raises on purpose."""


class DetectionError(WasiDispatchError):
    """An entrypoint could not be read: missing, not a regular file, or outside its root."""


class SpecError(WasiDispatchError, ValueError):
    """An OCI document or layout is invalid: bad JSON, wrong field, digest or size mismatch."""


class EngineError(WasiDispatchError):
    """A Wasm engine failed outside the guest (setup, compile, load)."""


class EngineUnavailable(EngineError):
    """The engine's Python package is not installed or cannot be loaded.

    The message names the extra to install, e.g. ``pip install 'wasidispatch[wasmtime]'``.
    """


class CompileError(EngineError):
    """The bytes are not valid Wasm for this engine (or not Wasm at all)."""


class IncompatibleArtifact(EngineError):
    """Precompiled bytes were made by another engine, engine version or configuration."""


class ExecutorError(WasiDispatchError):
    """An executor could not run a container (outside of the guest's own failure)."""


class CantHandle(ExecutorError):
    """This executor or engine does not take this workload; ``reason`` says why.

    Example::

        >>> err = CantHandle("entrypoint is an ELF binary")
        >>> err.reason
        'entrypoint is an ELF binary'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CacheError(WasiDispatchError):
    """The precompile cache cannot be used safely (permissions, owner, I/O)."""


class RegistryError(WasiDispatchError):
    """A registry could not be reached, refused a request, or returned bad content."""


class ShimError(WasiDispatchError):
    """A shim request failed. ``code`` is the ttrpc (gRPC) status code it is answered with;
    containerd turns 5, 6, 9 and 12 into its own not-found, already-exists,
    failed-precondition and not-implemented errors and shows the message.

    Example::

        >>> err = FailedPreconditionError("task c1 is running: kill it first")
        >>> (err.code, isinstance(err, ShimError))
        (9, True)
        >>> ShimError("engine crashed", code=13).code
        13
    """

    code: int = 2  # UNKNOWN

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(ShimError):
    """A request that can never succeed as given (an empty id, a bad options message)."""

    code = 3


class NotFoundError(ShimError):
    """No such task, exec process or shim."""

    code = 5


class AlreadyExistsError(ShimError):
    """A task or exec id that is already in use."""

    code = 6


class FailedPreconditionError(ShimError):
    """The task is not in a state that allows the request (the state machine refused it)."""

    code = 9


class UnimplementedError(ShimError):
    """A method or a feature this shim or instance does not have (Checkpoint, Exec into a
    Wasm container)."""

    code = 12


class TtrpcError(ShimError):
    """The ttrpc transport failed: a malformed or oversized frame, a closed or refused
    connection. A client raising it for the peer's status keeps the peer's ``code``."""

    code = 14  # UNAVAILABLE

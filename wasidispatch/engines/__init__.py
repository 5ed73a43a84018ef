"""Wasm engines behind one `Engine` protocol.

The contract types live in :mod:`wasidispatch.engines._api` and are re-exported here.
"""

from __future__ import annotations

from wasidispatch.engines._api import (
    TRAP_EXIT_CODE,
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

__all__ = [
    "TRAP_EXIT_CODE",
    "Capabilities",
    "Engine",
    "ExitReason",
    "Limits",
    "Preopen",
    "RunResult",
    "Stdio",
    "Timings",
    "Verdict",
    "Workload",
]

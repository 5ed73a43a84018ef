"""Classify an OCI image as Wasm or Linux before it runs (work in progress)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ImageDecision", "classify"]

Kind = Literal["wasm", "linux", "unknown"]


@dataclass(frozen=True)
class ImageDecision:
    """What an image would run as, and why."""

    kind: Kind
    evidence: tuple[str, ...]
    architecture: str | None
    digest: str
    reference: str
    entrypoint: str | None
    platform: str | None = None
    bytes_read: int = field(default=0, compare=False)
    cached: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "kind": self.kind,
            "evidence": list(self.evidence),
            "architecture": self.architecture,
            "digest": self.digest,
            "reference": self.reference,
            "entrypoint": self.entrypoint,
            "platform": self.platform,
            "bytes_read": self.bytes_read,
            "cached": self.cached,
        }


def classify(
    ref_or_layout: str | os.PathLike[str],
    *,
    platform: str | None = None,
    timeout: float | None = 60.0,
    insecure: bool = False,
) -> ImageDecision:
    """Decide whether ``ref_or_layout`` is a Wasm or a Linux image (not implemented yet)."""
    raise NotImplementedError("classify: work in progress")

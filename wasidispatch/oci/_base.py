"""The base every OCI model shares: strict JSON types, unknown fields kept, one load boundary.

Each top-level document model (``Spec``, ``Manifest``, ``Index``, ``ImageConfig``, ...) is
loaded through :meth:`OCIModel.parse` or :meth:`OCIModel.load`, which turn malformed JSON and
:class:`pydantic.ValidationError` into :class:`~wasidispatch.errors.SpecError` naming the
document and the offending field (with its JSON name, e.g. ``process.user.uid``).

Why strict: the upstream validators are a JSON schema plus Go's typed ``json.Unmarshal``, and
both reject ``"size": "1470"``; pydantic's lax mode would quietly coerce it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from wasidispatch.errors import SpecError

__all__ = [
    "Int32",
    "Int64",
    "OCIModel",
    "Uint8",
    "Uint16",
    "Uint32",
    "Uint64",
    "format_validation_error",
]

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Uint8 = Annotated[int, Field(ge=0, le=2**8 - 1)]
Uint16 = Annotated[int, Field(ge=0, le=2**16 - 1)]
Uint32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Uint64 = Annotated[int, Field(ge=0, le=2**64 - 1)]

# How many individual field errors a SpecError message lists before "and N more".
_MAX_LISTED_ERRORS = 5


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line per failing field: ``source: field.path: message``."""
    errors = exc.errors(include_url=False)
    lines = []
    for err in errors[:_MAX_LISTED_ERRORS]:
        loc = ".".join(str(part) for part in err["loc"]) or "(document)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}")
    if len(errors) > _MAX_LISTED_ERRORS:
        lines.append(f"{source}: and {len(errors) - _MAX_LISTED_ERRORS} more field errors")
    return "\n".join(lines)


class OCIModel(BaseModel):
    """Base of all OCI models: camelCase JSON names, strict JSON types, unknown fields kept.

    Python attribute names are snake_case; the JSON names are their camelCase aliases (or the
    spec's own spelling where it differs, e.g. ``os.version``). Either name populates a field.
    """

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        alias_generator=to_camel,
        strict=True,
        frozen=False,
    )

    @classmethod
    def parse(
        cls, document: bytes | str | Mapping[str, Any], *, source: str = "<document>"
    ) -> Self:
        """Validate a JSON document (bytes/str) or an already decoded mapping.

        Raises :class:`SpecError` naming ``source`` and the field on any problem.
        """
        try:
            if isinstance(document, bytes | str):
                return cls.model_validate_json(document)
            return cls.model_validate(document)
        except ValidationError as exc:
            if any(err["type"] == "json_invalid" for err in exc.errors(include_url=False)):
                raise SpecError(f"{source}: malformed JSON: {exc.errors()[0]['msg']}") from exc
            raise SpecError(format_validation_error(source, exc)) from exc

    @classmethod
    def load(cls, path_or_bytes: str | os.PathLike[str] | bytes) -> Self:
        """Load from a file path or from the raw JSON bytes; :class:`SpecError` when invalid."""
        if isinstance(path_or_bytes, bytes):
            return cls.parse(path_or_bytes)
        path = Path(path_or_bytes)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        return cls.parse(data, source=str(path))

    def dump(self) -> dict[str, Any]:
        """The JSON document as a dict, with the spec's field names; unset fields omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def to_json(self) -> bytes:
        """Compact canonical-ish JSON bytes (as written into blobs and files)."""
        return self.model_dump_json(by_alias=True, exclude_unset=True).encode()

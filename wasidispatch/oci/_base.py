"""The base every OCI model shares: strict JSON types, unknown fields kept, one load boundary.

Each top-level document model (``Spec``, ``Manifest``, ``Index``, ``ImageConfig``, ...) is
loaded through :meth:`OCIModel.parse` or :meth:`OCIModel.load`, which turn malformed JSON and
:class:`pydantic.ValidationError` into :class:`~wasidispatch.errors.SpecError` naming the
document and the offending field (with its JSON name, e.g. ``process.user.uid``).

Why strict: the upstream validators are a JSON schema plus Go's typed ``json.Unmarshal``, and
both reject ``"size": "1470"``; pydantic's lax mode would quietly coerce it.

Bounds: a file is read only when it is a regular file of at most 4 MiB
(:func:`wasidispatch._fs.read_regular`: a FIFO, a device or a symlink to ``/dev/zero`` is a
``SpecError``, never a hang); nesting deeper than :data:`MAX_DEPTH` (arrays and objects, in JSON
text or in an already decoded mapping) is a ``SpecError``, never a ``RecursionError``; so is a
string holding a lone surrogate (it has no UTF-8 form), named by its field path. Strings that
become paths or C strings (``process.cwd``, ``args``, ``env``, mount points, ...) are
:data:`CString`: a NUL in one is a ``SpecError`` naming the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from wasidispatch import _fs
from wasidispatch.errors import SpecError

__all__ = [
    "DOCUMENT_LIMIT",
    "MAX_DEPTH",
    "CString",
    "Int32",
    "Int64",
    "OCIModel",
    "Uint8",
    "Uint16",
    "Uint32",
    "Uint64",
    "check_tree",
    "format_validation_error",
]

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Uint8 = Annotated[int, Field(ge=0, le=2**8 - 1)]
Uint16 = Annotated[int, Field(ge=0, le=2**16 - 1)]
Uint32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Uint64 = Annotated[int, Field(ge=0, le=2**64 - 1)]

DOCUMENT_LIMIT = _fs.CONFIG_LIMIT
"""The cap on a JSON document read from a file by :meth:`OCIModel.load` (4 MiB)."""

MAX_DEPTH = 200
"""The deepest nesting of arrays and objects accepted (pydantic's JSON parser stops there too)."""


def _no_nul(value: str) -> str:
    at = value.find("\0")
    if at >= 0:
        raise ValueError(f"contains a NUL character at offset {at}")
    return value


CString = Annotated[str, AfterValidator(_no_nul)]
"""A string that becomes a path, an argument or an environment entry: no NUL allowed."""


def _surrogate_at(text: str) -> int | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_tree(document: Any, source: str) -> None:
    """Refuse a decoded JSON value nested deeper than :data:`MAX_DEPTH` or holding a string (or
    key) with a lone surrogate; :class:`SpecError` naming ``source`` and the path. Iterative:
    no depth of input can exhaust the Python stack."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(document, ())]
    while stack:
        value, where = stack.pop()
        if len(where) > MAX_DEPTH:
            shown = ".".join(where[:8])
            raise SpecError(f"{source}: {shown}...: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            at = _surrogate_at(value)
            if at is not None:
                field = ".".join(where) or "(document)"
                raise SpecError(
                    f"{source}: {field}: lone surrogate at offset {at} (not valid Unicode)"
                )
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and _surrogate_at(key) is not None:
                    field = ".".join(where) or "(document)"
                    raise SpecError(f"{source}: {field}: a key holds a lone surrogate")
                stack.append((item, (*where, str(key))))
        elif isinstance(value, list | tuple):
            stack.extend((item, (*where, str(i))) for i, item in enumerate(value))


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

        Raises :class:`SpecError` naming ``source`` and the field on any problem (also for
        nesting deeper than :data:`MAX_DEPTH` and lone surrogates), never another exception.
        """
        try:
            if isinstance(document, bytes | bytearray | str):
                return cls.model_validate_json(document)
            check_tree(document, source)
            return cls.model_validate(document)
        except RecursionError as exc:  # a deep model built by hand; JSON input never gets here
            raise SpecError(f"{source}: nested too deeply") from exc
        except ValidationError as exc:
            if any(err["type"] == "json_invalid" for err in exc.errors(include_url=False)):
                raise SpecError(f"{source}: malformed JSON: {exc.errors()[0]['msg']}") from exc
            raise SpecError(format_validation_error(source, exc)) from exc

    @classmethod
    def load(cls, path_or_bytes: str | os.PathLike[str] | bytes) -> Self:
        """Load from a file path or from the raw JSON bytes; :class:`SpecError` when invalid.

        A path must name a regular file of at most :data:`DOCUMENT_LIMIT` bytes (symlinks are
        followed): a FIFO, a device or a larger file is refused without reading it.
        """
        if isinstance(path_or_bytes, bytes):
            return cls.parse(path_or_bytes)
        path = Path(path_or_bytes)
        data = _fs.read_regular(path, limit=DOCUMENT_LIMIT, what=path.name)
        return cls.parse(data, source=str(path))

    def dump(self) -> dict[str, Any]:
        """The JSON document as a dict, with the spec's field names; unset fields omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def to_json(self) -> bytes:
        """Compact canonical-ish JSON bytes (as written into blobs and files)."""
        return self.model_dump_json(by_alias=True, exclude_unset=True).encode()

"""The public surface: `__all__` is exactly what is importable, documented, and lazy."""

from __future__ import annotations

import subprocess
import sys

import pytest

import wasidispatch


def test_all_is_sorted_and_unique() -> None:
    assert list(wasidispatch.__all__) == sorted(set(wasidispatch.__all__))


@pytest.mark.parametrize("name", [n for n in wasidispatch.__all__ if n != "__version__"])
def test_every_public_name_is_importable_and_documented(name: str) -> None:
    obj = getattr(wasidispatch, name)
    assert obj is not None
    assert (getattr(obj, "__doc__", None) or "").strip(), f"{name} has no docstring"


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = wasidispatch.no_such_name


def test_dir_lists_public_names() -> None:
    assert set(wasidispatch.__all__) <= set(dir(wasidispatch))


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "code",
    ["import wasidispatch", "import wasidispatch.errors", "import wasidispatch.engines"],
)
def test_light_imports_pull_no_heavy_dependency(code: str) -> None:
    loaded = _modules_after(code)
    for heavy in ("pydantic", "wasmtime", "wasmer_sdk", "cffi", "oras"):
        assert heavy not in loaded, f"{code!r} imported {heavy}"

"""runtime-spec models: config.json, state, features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wasidispatch.errors import SpecError
from wasidispatch.oci.runtime import Features, Process, Spec, State

DATA = Path(__file__).parent / "data" / "oci" / "runtime-spec"


def _spec(**extra: Any) -> dict[str, Any]:
    return {
        "ociVersion": "1.3.0",
        "process": {"cwd": "/", "args": ["/bin/app"], "env": ["PATH=/bin"]},
        "root": {"path": "rootfs"},
        **extra,
    }


def test_full_example_reads_every_section() -> None:
    spec = Spec.load(DATA / "config" / "valid-spec-example.json")
    assert spec.process is not None
    assert spec.linux is not None
    assert spec.process.user is not None
    assert spec.process.user.uid == 1
    assert spec.process.capabilities is not None
    assert "CAP_AUDIT_WRITE" in (spec.process.capabilities.bounding or [])
    assert spec.process.rlimits is not None
    assert "RLIMIT_NOFILE" in {r.type for r in spec.process.rlimits}
    assert spec.linux.namespaces is not None
    assert {ns.type for ns in spec.linux.namespaces} >= {"pid", "mount"}
    assert spec.linux.resources is not None
    assert spec.linux.resources.memory is not None
    assert spec.linux.seccomp is not None
    assert spec.hooks is not None
    assert spec.hooks.prestart is not None
    assert spec.mounts is not None
    assert spec.mounts[0].destination == "/proc"


def test_env_dict_keeps_exactly_the_spec_env() -> None:
    proc = Process(cwd="/", env=["PATH=/opt/bin", "X==", "NOEQ"])
    assert proc.env_dict() == {"PATH": "/opt/bin", "X": "=", "NOEQ": ""}
    assert Process(cwd="/").env_dict() == {}


def test_snake_and_camel_names_both_populate() -> None:
    a = Spec.parse({"ociVersion": "1", "linux": {"cgroupsPath": "/x"}})
    b = Spec.parse({"oci_version": "1", "linux": {"cgroups_path": "/x"}})
    assert a.linux is not None
    assert b.linux is not None
    assert a.linux.cgroups_path == b.linux.cgroups_path == "/x"
    assert a.dump() == {"ociVersion": "1", "linux": {"cgroupsPath": "/x"}}


def test_unknown_fields_survive_nested() -> None:
    doc = _spec(
        **{"x-top": 1, "linux": {"resources": {"memory": {"limit": 1, "x-mem": [True]}}}},
    )
    doc["process"]["x-proc"] = {"a": None}
    spec = Spec.parse(json.dumps(doc))
    assert spec.dump() == doc
    assert Spec.parse(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"process": {"cwd": "/", "user": {"uid": -1}}}, "process.user.uid"),
        ({"process": {"cwd": "/", "user": {"uid": 2**32}}}, "process.user.uid"),
        ({"process": {"cwd": "/", "user": {"uid": "0"}}}, "process.user.uid"),
        ({"process": {"cwd": "/", "terminal": 1}}, "process.terminal"),
        ({"process": {"cwd": "/", "args": "sh"}}, "process.args"),
        ({"process": {"args": ["sh"]}}, "process.cwd"),
        (
            {"process": {"cwd": "/", "rlimits": [{"type": "NOFILE", "soft": 1, "hard": 1}]}},
            "process.rlimits.0.type",
        ),
        ({"process": {"cwd": "/", "ioPriority": {"class": "BEST"}}}, "process.ioPriority.class"),
        ({"root": {"readonly": True}}, "root.path"),
        ({"mounts": [{"source": "/x"}]}, "mounts.0.destination"),
        ({"linux": {"namespaces": [{"type": "bogus"}]}}, "linux.namespaces.0.type"),
        ({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_NOPE"}}}, "linux.seccomp.defaultAction"),
        ({"linux": {"devices": [{"type": "x", "path": "/dev/x"}]}}, "linux.devices.0.type"),
        ({"linux": {"resources": {"cpu": {"shares": -5}}}}, "linux.resources.cpu.shares"),
        ({"hooks": {"prestart": [{"path": "/h", "timeout": 0}]}}, "hooks.prestart.0.timeout"),
        ({"annotations": {"k": 1}}, "annotations.k"),
    ],
)
def test_wrong_fields_are_spec_errors_naming_the_field(patch: dict[str, Any], field: str) -> None:
    doc = {"ociVersion": "1.3.0", **patch}
    with pytest.raises(SpecError) as info:
        Spec.parse(json.dumps(doc), source="bundle/config.json")
    assert f"bundle/config.json: {field}" in str(info.value)


def test_missing_oci_version_and_bad_json() -> None:
    with pytest.raises(SpecError, match="ociVersion: Field required"):
        Spec.parse(b"{}")
    with pytest.raises(SpecError, match="malformed JSON"):
        Spec.parse(b"[1, 2")
    with pytest.raises(SpecError, match="Input should be an object"):
        Spec.parse(b"[]")


def test_state_and_features() -> None:
    state = State.load(DATA / "state" / "valid-spec-example.json")
    assert state.status in ("creating", "created", "running", "stopped")
    with pytest.raises(SpecError, match="status"):
        State.parse({"ociVersion": "1", "id": "a", "status": "paused", "bundle": "/b"})
    features = Features.load(DATA / "features" / "valid-runc.json")
    assert features.linux is not None
    assert features.linux.namespaces
    assert "mount" in features.linux.namespaces

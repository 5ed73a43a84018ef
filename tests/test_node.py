"""``wasidispatch node install`` on real containerd configs (tests/data/containerd-configs)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wasidispatch import node
from wasidispatch._cli import node as cli_node
from wasidispatch.errors import SpecError
from wasidispatch.node import NODE_LABEL, RUNTIME_TYPE, install, runtime_class

DATA = Path(__file__).parent / "data" / "containerd-configs"
V2 = "io.containerd.grpc.v1.cri"
V3 = "io.containerd.cri.v1.runtime"
SHIM = "/usr/local/bin/containerd-shim-wasidispatch-v1"
CONTAINERD = shutil.which("containerd")
needs_containerd = pytest.mark.skipif(CONTAINERD is None, reason="no containerd binary")


def _copy(tmp_path: Path, name: str) -> Path:
    config = tmp_path / "config.toml"
    shutil.copyfile(DATA / name, config)
    return config


def _runtimes(doc: dict[str, Any], plugin: str) -> dict[str, Any]:
    runtimes = doc["plugins"][plugin]["containerd"]["runtimes"]
    assert isinstance(runtimes, dict)
    return runtimes


def _others(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "config.toml")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="wasidispatch")
    cli_node.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["node", *argv])
    status: int = args.func(args)
    return status


@pytest.mark.parametrize(
    ("name", "plugin"),
    [
        ("default-1.6.20.toml", V2),
        ("minimal-v2.toml", V2),
        ("systemd-v2.toml", V2),
        ("v3-containerd2.toml", V3),
        ("v4-containerd2.3.toml", V3),
    ],
)
def test_install_appends_the_runtime_where_containerd_looks_and_keeps_the_rest(
    tmp_path: Path, name: str, plugin: str
) -> None:
    config = _copy(tmp_path, name)
    original = config.read_bytes()
    result = install(config, name="wasidispatch")
    assert result.action == "added"
    new = config.read_bytes()
    assert new.startswith(original)  # comments, order and formatting byte for byte
    doc = tomllib.loads(new.decode())
    before = tomllib.loads(original.decode())
    runtimes = _runtimes(doc, plugin)
    assert runtimes["wasidispatch"] == {"runtime_type": RUNTIME_TYPE}
    assert doc["version"] == before["version"]
    # the default runtime is there: the file's own, or the built-in runc written out
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert result.backup is not None
    assert result.backup.read_bytes() == original
    assert result.backup.name.startswith("config.toml.bak-")
    assert result.backup.name.endswith("Z")


def test_v3_header_keeps_the_files_quoting(tmp_path: Path) -> None:
    config = _copy(tmp_path, "v3-containerd2.toml")
    result = install(config)
    assert (
        result.table == "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.wasidispatch]"
    )
    assert result.table in config.read_text()
    assert f'[plugins."{V2}"' not in config.read_text().split("# The wasidispatch runtime")[1]


def test_a_file_without_runtimes_gets_runc_written_out_with_ours(tmp_path: Path) -> None:
    config = _copy(tmp_path, "minimal-v2.toml")
    result = install(config)
    assert any("runtimes.runc]" in n for n in result.notes)
    doc = tomllib.loads(config.read_text())
    cri = doc["plugins"][V2]
    assert cri["sandbox_image"] == "registry.k8s.io/pause:3.9"  # the operator's settings stay
    assert cri["registry"] == {"config_path": "/etc/containerd/certs.d"}
    assert set(cri["containerd"]["runtimes"]) == {"runc", "wasidispatch"}
    text = config.read_text()
    assert "# kubeadm 1.28 wants this one" in text
    assert "# End of the node's settings." in text


def test_a_file_with_runtimes_gets_only_ours(tmp_path: Path) -> None:
    config = _copy(tmp_path, "default-1.6.20.toml")
    result = install(config)
    assert result.notes == ()
    added = config.read_text()[len((DATA / "default-1.6.20.toml").read_text()) :]
    assert added.count("[plugins.") == 1
    assert "runtimes.runc]" not in added


def test_second_run_is_byte_identical_and_makes_no_backup(tmp_path: Path) -> None:
    config = _copy(tmp_path, "systemd-v2.toml")
    first = install(config)
    assert first.changed
    after_first = config.read_bytes()
    backups = _others(tmp_path)
    assert len(backups) == 1
    second = install(config)
    assert second.action == "already-installed"
    assert not second.changed
    assert second.backup is None
    assert config.read_bytes() == after_first
    assert _others(tmp_path) == backups


def test_a_file_that_already_holds_the_runtime_is_left_alone(tmp_path: Path) -> None:
    config = _copy(tmp_path, "installed-v2.toml")
    before = os.stat(config)
    result = install(config)
    assert result.action == "already-installed"
    assert result.diff == ""
    assert config.read_bytes() == (DATA / "installed-v2.toml").read_bytes()
    assert os.stat(config).st_ino == before.st_ino  # not even rewritten
    assert _others(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken.toml", "is not valid TOML"),
        ("v1-no-version.toml", "version 1"),
        ("v1-explicit.toml", "version 1"),
        ("unknown-version.toml", "unknown containerd config version 9"),
        ("conflict-v2.toml", "runtime_type = 'io.containerd.runc.v2' (the wasidispatch-runc"),
        ("inline-v2.toml", "inline table"),
    ],
)
def test_refusals_leave_the_file_byte_identical_and_make_no_backup(
    tmp_path: Path, name: str, message: str
) -> None:
    config = _copy(tmp_path, name)
    before = config.read_bytes()
    mtime = os.stat(config).st_mtime_ns
    for dry_run in (True, False):
        with pytest.raises(SpecError, match=r"nothing was changed") as info:
            install(config, dry_run=dry_run)
        assert message in str(info.value)
        assert "\n" not in str(info.value)  # one clear line
    assert config.read_bytes() == before
    assert os.stat(config).st_mtime_ns == mtime
    assert _others(tmp_path) == []


def test_conflict_is_refused_also_through_the_cli_and_another_name_installs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _copy(tmp_path, "conflict-v2.toml")
    with pytest.raises(SpecError, match="pass another --name"):
        _cli("install", "--config", str(config))
    assert config.read_bytes() == (DATA / "conflict-v2.toml").read_bytes()
    assert _cli("install", "--config", str(config), "--name", "wasidispatch-shim") == 0
    runtimes = _runtimes(tomllib.loads(config.read_text()), V2)
    assert runtimes["wasidispatch-shim"] == {"runtime_type": RUNTIME_TYPE}
    assert runtimes["wasidispatch"]["runtime_type"] == "io.containerd.runc.v2"
    out = capsys.readouterr().out
    assert "handler: wasidispatch-shim" in out


def test_missing_file_is_created_minimal_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    assert _cli("install", "--config", str(config), "--shim-path", SHIM) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"created {config} (there was none)")
    doc = tomllib.loads(config.read_text())
    assert doc["version"] == 2
    runtimes = _runtimes(doc, V2)
    assert runtimes == {
        "runc": {"runtime_type": "io.containerd.runc.v2"},
        "wasidispatch": {"runtime_type": RUNTIME_TYPE, "runtime_path": SHIM},
    }
    assert set(doc) == {"version", "plugins"}
    assert os.stat(config).st_mode & 0o777 == 0o644
    assert _others(tmp_path) == []  # nothing to back up


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        install(tmp_path / "etc" / "containerd" / "config.toml")
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_only_comments_becomes_version_2_keeping_them(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("# managed by hand\n# (empty for now)")
    result = install(config)
    assert result.action == "added"
    text = config.read_text()
    assert text.startswith("# managed by hand\n# (empty for now)\n")
    doc = tomllib.loads(text)
    assert doc["version"] == 2
    assert set(_runtimes(doc, V2)) == {"runc", "wasidispatch"}


def test_dry_run_prints_the_diff_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _copy(tmp_path, "minimal-v2.toml")
    before = config.read_bytes()
    assert _cli("install", "--config", str(config), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry run: would change" in out
    assert f"--- {config}" in out
    assert '+[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.wasidispatch]' in out
    assert f'+  runtime_type = "{RUNTIME_TYPE}"' in out
    assert config.read_bytes() == before
    assert _others(tmp_path) == []
    missing = tmp_path / "new.toml"
    result = install(missing, dry_run=True)
    assert result.action == "created"
    assert result.diff.startswith("--- /dev/null")
    assert not missing.exists()


def test_cli_output_names_change_backup_label_restart_and_runtime_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _copy(tmp_path, "systemd-v2.toml")
    assert _cli("install", "--config", str(config)) == 0
    captured = capsys.readouterr()
    out = captured.out
    (backup,) = _others(tmp_path)
    assert out.startswith(f'added [plugins."{V2}".containerd.runtimes.wasidispatch]')
    assert f"backup: {tmp_path / backup}" in out
    assert "note: runtime 'runc' uses the systemd cgroup driver (SystemdCgroup = true)" in out
    assert "systemctl restart containerd" in out
    assert f"kubectl label node <node> {NODE_LABEL}=true" in out
    assert out.endswith(runtime_class("wasidispatch"))
    # a second run: already installed, no restart needed, still the next steps
    assert _cli("install", "--config", str(config)) == 0
    again = capsys.readouterr().out
    assert again.startswith("already installed:")
    assert "systemctl restart" not in again
    assert again.endswith(runtime_class("wasidispatch"))


def test_runtime_class_selects_the_labelled_nodes() -> None:
    doc = runtime_class("wasi-a")
    assert "kind: RuntimeClass\n" in doc
    assert "apiVersion: node.k8s.io/v1\n" in doc
    assert "  name: wasi-a\nhandler: wasi-a\n" in doc
    assert f'    {NODE_LABEL}: "true"\n' in doc
    assert runtime_class("x", label="example.com/wasm").endswith('example.com/wasm: "true"\n')


def test_runtime_class_action(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("runtime-class", "--name", "edge") == 0
    assert capsys.readouterr().out == runtime_class("edge")


@pytest.mark.parametrize("bad", ["Wasi", "a.b", "-x", "x" * 64, "", "a b", 'a"]'])
def test_names_that_are_not_dns_labels_are_refused(tmp_path: Path, bad: str) -> None:
    config = _copy(tmp_path, "default-1.6.20.toml")
    with pytest.raises(SpecError, match="not a DNS label"):
        install(config, name=bad)
    assert config.read_bytes() == (DATA / "default-1.6.20.toml").read_bytes()


def test_mode_and_owner_are_kept_on_the_config_and_its_backup(tmp_path: Path) -> None:
    config = _copy(tmp_path, "default-1.6.20.toml")
    os.chmod(config, 0o640)
    root = os.geteuid() == 0
    if root:
        os.chown(config, 1234, 5678)
    result = install(config)
    assert result.backup is not None
    for path in (config, result.backup):
        st = os.stat(path)
        assert st.st_mode & 0o7777 == 0o640
        if root:
            assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_a_planted_symlink_at_the_backup_name_is_not_followed(tmp_path: Path) -> None:
    config = _copy(tmp_path, "minimal-v2.toml")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    when = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    planted = tmp_path / "config.toml.bak-20270115T080000Z"
    planted.symlink_to(victim)
    data = config.read_bytes()
    backup = node._backup(config, data, os.stat(config), when=when)
    assert backup == tmp_path / "config.toml.bak-20270115T080000Z.1"
    assert backup.read_bytes() == data
    assert not backup.is_symlink()
    assert victim.read_text() == "keep"
    assert planted.is_symlink()
    # a real earlier backup of the same second is not overwritten either
    assert node._backup(config, b"x", os.stat(config), when=when).name.endswith(".2")
    assert backup.read_bytes() == data


def test_install_never_writes_through_a_symlink_at_the_config(tmp_path: Path) -> None:
    real = _copy(tmp_path, "default-1.6.20.toml")
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    with pytest.raises(SpecError, match="is a symlink to"):
        install(link)
    assert link.is_symlink()
    assert real.read_bytes() == (DATA / "default-1.6.20.toml").read_bytes()


def test_a_config_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(SpecError, match="not a regular file"):
        install(tmp_path / "fifo.toml")


def test_crlf_files_stay_crlf(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    original = (DATA / "minimal-v2.toml").read_bytes().replace(b"\n", b"\r\n")
    config.write_bytes(original)
    install(config)
    new = config.read_bytes()
    assert new.startswith(original)
    assert b"\n" not in new.replace(b"\r\n", b"")
    assert _runtimes(tomllib.loads(new.decode()), V2)["wasidispatch"] == {
        "runtime_type": RUNTIME_TYPE
    }


def test_a_file_without_final_newline(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  a = 1  # last')
    install(config)
    doc = tomllib.loads(config.read_text())
    assert doc["plugins"][V2]["a"] == 1
    assert "wasidispatch" in doc["plugins"][V2]["containerd"]["runtimes"]


def test_shim_path_is_written_as_runtime_path_and_must_be_absolute(tmp_path: Path) -> None:
    config = _copy(tmp_path, "v3-containerd2.toml")
    with pytest.raises(SpecError, match="must be absolute"):
        install(config, shim_path="bin/containerd-shim-wasidispatch-v1")
    assert _others(tmp_path) == []
    result = install(config, shim_path=tmp_path / "no-such-shim")
    assert any("not an executable file" in w for w in result.warnings)
    runtime = _runtimes(tomllib.loads(config.read_text()), V3)["wasidispatch"]
    assert runtime == {"runtime_type": RUNTIME_TYPE, "runtime_path": str(tmp_path / "no-such-shim")}
    # installed without that path: a different --shim-path is refused, not silently ignored
    with pytest.raises(SpecError, match="already installed with runtime_path"):
        install(config, shim_path="/opt/other/containerd-shim-wasidispatch-v1")
    assert install(config).action == "already-installed"


def test_an_existing_runtime_without_runtime_path_refuses_a_shim_path(tmp_path: Path) -> None:
    config = _copy(tmp_path, "installed-v2.toml")
    with pytest.raises(SpecError, match="already installed without runtime_path"):
        install(config, shim_path=SHIM)
    assert config.read_bytes() == (DATA / "installed-v2.toml").read_bytes()


def test_missing_shim_is_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _copy(tmp_path, "default-1.6.20.toml")
    if any(
        os.access(os.path.join(d, node.SHIM_BINARY), os.X_OK) for d in node._SERVICE_PATH
    ):  # pragma: no cover - a node with the shim installed
        pytest.skip("the shim is installed on this machine")
    result = install(config, dry_run=True)
    assert any(node.SHIM_BINARY in w for w in result.warnings)
    given_path = install(config, dry_run=True, shim_path="/bin/sh")
    assert not any(node.SHIM_BINARY in w for w in given_path.warnings)


def test_imports_that_replace_the_cri_table_are_warned_about(tmp_path: Path) -> None:
    config = _copy(tmp_path, "default-1.6.20.toml")
    text = config.read_text().replace("imports = []", 'imports = ["conf.d/*.toml"]')
    config.write_text(text)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "cri.toml").write_text(
        f'version = 2\n[plugins."{V2}"]\n  sandbox_image = "x/pause:1"\n'
    )
    result = install(config, dry_run=True)
    assert any("cri.toml (imported by" in w for w in result.warnings)


def test_a_disabled_cri_plugin_is_warned_about(tmp_path: Path) -> None:
    config = _copy(tmp_path, "default-1.6.20.toml")
    text = config.read_text().replace("disabled_plugins = []", f'disabled_plugins = ["{V2}"]')
    config.write_text(text)
    result = install(config, dry_run=True)
    assert any("the CRI plugin is disabled" in w for w in result.warnings)


@needs_containerd
def test_a_v3_file_with_containerd_1_is_warned_about(tmp_path: Path) -> None:
    version = subprocess.run(
        [str(CONTAINERD), "--version"], capture_output=True, text=True, check=True
    ).stdout
    if " 1." not in version:  # pragma: no cover - containerd 2.x reads version 3
        pytest.skip(f"containerd is not 1.x: {version}")
    result = install(_copy(tmp_path, "v3-containerd2.toml"), dry_run=True)
    assert any("ignores the CRI tables of a version 3 config" in w for w in result.warnings)
    v2 = install(_copy(tmp_path, "minimal-v2.toml"), dry_run=True)
    assert not any("ignores the CRI tables" in w for w in v2.warnings)


def _dump(config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [str(CONTAINERD), "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return tomllib.loads(out)


@needs_containerd
@pytest.mark.parametrize("name", ["default-1.6.20.toml", "minimal-v2.toml", "systemd-v2.toml"])
def test_containerd_config_dump_shows_the_runtime_under_cri(tmp_path: Path, name: str) -> None:
    config = _copy(tmp_path, name)
    before = _dump(config)
    install(config, shim_path=SHIM)
    after = _dump(config)
    runtimes = _runtimes(after, V2)
    ours = runtimes.pop("wasidispatch")
    assert ours["runtime_type"] == RUNTIME_TYPE
    assert ours["runtime_path"] == SHIM
    cri = after["plugins"][V2]
    assert cri["containerd"]["default_runtime_name"] in runtimes
    # containerd sees every other setting as before (runc written out is containerd's own)
    old_runc = _runtimes(before, V2)["runc"]
    assert runtimes["runc"]["runtime_type"] == old_runc["runtime_type"]
    runtimes["runc"] = old_runc
    assert after == before


@needs_containerd
def test_containerd_rejects_nothing_that_install_writes_for_a_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    install(config)
    runtimes = _runtimes(_dump(config), V2)
    assert runtimes["wasidispatch"]["runtime_type"] == RUNTIME_TYPE
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"


@given(st.text(st.characters(codec="utf-8"), max_size=40))
def test_toml_strings_round_trip(value: str) -> None:
    assert tomllib.loads(f"k = {node._toml_string(value)}")["k"] == value


@given(st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True))
def test_any_dns_label_installs_on_the_default_config(name: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "config.toml"
        shutil.copyfile(DATA / "default-1.6.20.toml", config)
        if name == "runc":  # the file's own runc runtime: another runtime_type
            with pytest.raises(SpecError, match="already defines"):
                install(config, name=name)
            return
        install(config, name=name)
        runtimes = _runtimes(tomllib.loads(config.read_text()), V2)
        assert runtimes[name] == {"runtime_type": RUNTIME_TYPE}


def test_the_default_runtimes_name_is_refused_where_runc_is_written_out(tmp_path: Path) -> None:
    config = _copy(tmp_path, "minimal-v2.toml")
    with pytest.raises(SpecError, match="'runc' is the name of containerd's default runtime"):
        install(config, name="runc")
    assert config.read_bytes() == (DATA / "minimal-v2.toml").read_bytes()


def test_a_runtime_table_without_runtime_type_is_a_conflict(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    text = f'version = 2\n[plugins."{V2}".containerd.runtimes.wasidispatch.options]\n  X = 1\n'
    config.write_text(text)
    with pytest.raises(SpecError, match="with no runtime_type, not"):
        install(config)
    assert config.read_text() == text


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_read_only_directory_is_one_line_and_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "etc"
    directory.mkdir()
    config = directory / "config.toml"
    shutil.copyfile(DATA / "minimal-v2.toml", config)
    mounted = subprocess.run(["mount", "--bind", str(directory), str(directory)], check=False)
    if mounted.returncode != 0:  # pragma: no cover - no mount privilege here
        pytest.skip("cannot bind-mount")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        assert _cli("install", "--config", str(config)) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"wasidispatch node install: {config}: ")
        assert "Read-only file system" in err
        assert err.count("\n") == 1
        assert sorted(p.name for p in directory.iterdir()) == ["config.toml"]
    finally:
        subprocess.run(["umount", str(directory)], check=True)
    assert config.read_bytes() == (DATA / "minimal-v2.toml").read_bytes()


@pytest.mark.parametrize(
    "runtimes",
    [
        f'[plugins."{V2}".containerd.runtimes]\n',  # empty: containerd 1.x is left without runc
        f'[plugins."{V2}".containerd.runtimes.crun]\n  runtime_type = "io.containerd.runc.v2"\n',
    ],
)
def test_a_runtimes_table_without_the_default_runc_gets_it(tmp_path: Path, runtimes: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n" + runtimes)
    result = install(config)
    assert any("built-in default runtime" in n for n in result.notes)
    got = _runtimes(tomllib.loads(config.read_text()), V2)
    assert got["runc"] == {"runtime_type": "io.containerd.runc.v2"}
    assert got["wasidispatch"] == {"runtime_type": RUNTIME_TYPE}


def test_another_default_runtime_is_not_written_out_but_noted(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'version = 2\n[plugins."{V2}".containerd]\n  default_runtime_name = "crun"\n'
    )
    result = install(config)
    assert set(_runtimes(tomllib.loads(config.read_text()), V2)) == {"wasidispatch"}
    assert any("default_runtime_name = 'crun' is not among" in n for n in result.notes)
    ok = tmp_path / "ok.toml"
    ok.write_text(
        f'version = 2\n[plugins."{V2}".containerd]\n  default_runtime_name = "wasidispatch"\n'
    )
    assert install(ok).notes == ()  # the new runtime is the default: nothing missing

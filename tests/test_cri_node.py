"""``wasidispatch node install`` on a running node: containerd restarted with the result.

A private containerd with its CRI plugin and only runc's handler refuses a pod for the
``wasidispatch`` handler; ``wasidispatch node install`` (the command line, on the daemon's
own config file) adds the runtime; the same daemon, restarted with that file, runs a Wasm
pod through our shim. A second install changes nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc  # type: ignore[import-untyped]
import pytest

from tests.containerd_harness import RUNC_RUNTIME, missing_grpc, missing_requirements, missing_shim
from tests.cri_harness import (
    RUNC_HANDLER,
    SHIM_HANDLER,
    CriContainerd,
    build_pause_image,
    import_k8s,
    import_wasm,
    read_log,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
    pytest.mark.skipif(missing_grpc() is not None, reason=str(missing_grpc())),
    pytest.mark.skipif(missing_shim() is not None, reason=str(missing_shim())),
]


class InstalledNode(CriContainerd):
    """A daemon whose config file, once written, is the operator's: restarts keep it."""

    def _config(self) -> str:
        config = self.base / "config.toml"
        if config.exists():
            return config.read_text()
        return super()._config()


def _install(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wasidispatch", "node", "install", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_install_then_restart_runs_a_wasm_pod(tmp_path: Path) -> None:
    from tests.guests import build_c

    daemon = InstalledNode(runtimes={RUNC_HANDLER: RUNC_RUNTIME})
    try:
        daemon.start()
        import_k8s(daemon, build_pause_image(tmp_path / "pause"), daemon.sandbox_image)
        image = import_wasm(daemon, tmp_path / "wasm", {"say.wasm": build_c("say").read_bytes()},
                            "/say.wasm")  # fmt: skip
        cri = daemon.client()
        with pytest.raises(grpc.RpcError) as refused:
            cri.run_pod(
                "before",
                runtime_handler=SHIM_HANDLER,
                log_directory=tmp_path / "logs",
                cgroup_parent=daemon.pod_cgroup("before"),
            )
        assert SHIM_HANDLER in str(refused.value.details())

        config = daemon.base / "config.toml"
        original = config.read_bytes()
        done = _install(config)
        assert done.returncode == 0, done.stderr
        assert "kind: RuntimeClass" in done.stdout
        assert "wasidispatch.dev/runtime" in done.stdout
        installed = config.read_bytes()
        assert installed.startswith(original)
        assert b"io.containerd.wasidispatch.v1" in installed[len(original) :]
        backups = sorted(config.parent.glob("config.toml.bak-*"))
        assert [b.read_bytes() for b in backups] == [original]
        again = _install(config)
        assert again.returncode == 0, again.stderr
        assert config.read_bytes() == installed
        assert sorted(config.parent.glob("config.toml.bak-*")) == backups

        cri.close()
        assert daemon.proc is not None
        daemon.proc.terminate()
        daemon.proc.wait(timeout=30)
        daemon.start()  # the same root, state and images: a restart with the new config
        assert config.read_bytes() == installed
        cri = daemon.client()
        pod = cri.run_pod(
            "after",
            runtime_handler=SHIM_HANDLER,
            log_directory=tmp_path / "logs",
            cgroup_parent=daemon.pod_cgroup("after"),
        )
        cid = cri.create_container(
            pod.id, pod.config, "app", image, ["/say.wasm", "installed", "7"], log_path="app.log"
        )
        cri.start_container(cid)
        status = cri.wait_exited(cid)
        assert (status.exit_code, status.reason) == (7, "Error")
        assert [x.text for x in read_log(tmp_path / "logs" / "app.log")] == ["installed"]
        assert cri.remove_pod(pod.id) == []
    finally:
        daemon.stop()
    assert not daemon.base.exists()

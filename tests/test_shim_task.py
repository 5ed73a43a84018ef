"""The Task service's state machine, events and error codes (`wasidispatch.shim.task`).

The instances here are small in-memory processes: these tests are about the protocol's edges
(every transition, every code), which real containers reach too slowly and too rarely. The
same service drives real runc and Wasm containers in tests/test_shim_e2e.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from wasidispatch.errors import ShimError
from wasidispatch.shim._pb import events_pb2, mount_pb2, shim_pb2, task_types_pb2
from wasidispatch.shim.instance import CreateRequest, Mount, Stdio
from wasidispatch.shim.reaper import Exit
from wasidispatch.shim.task import TaskService


class FakeProcess:
    """A process that runs until killed or told to exit."""

    _next_pid = 1000

    def __init__(self) -> None:
        FakeProcess._next_pid += 1
        self._pid = FakeProcess._next_pid
        self.started = False
        self.deleted = False
        self.signals: list[tuple[int, bool]] = []
        self._exit: Exit | None = None
        self._done = threading.Event()
        self.stdin_closed = False
        self.size: tuple[int, int] | None = None

    @property
    def pid(self) -> int:
        return self._pid

    def start(self) -> int:
        self.started = True
        return self._pid

    def finish(self, status: int) -> None:
        if self._exit is None:
            self._exit = Exit(status, time.time_ns(), self._pid)
            self._done.set()

    def kill(self, signal: int, all: bool = False) -> None:
        self.signals.append((signal, all))
        self.finish(128 + signal)

    def wait(self) -> Exit:
        self._done.wait()
        assert self._exit is not None
        return self._exit

    def delete(self) -> None:
        self.finish(137)
        self.deleted = True

    def resize_pty(self, width: int, height: int) -> None:
        self.size = (width, height)

    def close_stdin(self) -> None:
        self.stdin_closed = True


class FakeInstance(FakeProcess):
    def __init__(self, request: CreateRequest) -> None:
        super().__init__()
        self.request = request
        self.paused = False
        self.execs: dict[str, FakeProcess] = {}

    def pids(self) -> list[int]:
        return [self.pid, *(p.pid for p in self.execs.values())]

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def stats(self) -> any_pb2.Any:
        return any_pb2.Any(type_url="test.Stats", value=b"\x08\x01")

    def update(self, resources: any_pb2.Any) -> None:
        self.updated = resources.value

    def exec(self, exec_id: str, process: Mapping[str, object], stdio: Stdio) -> FakeProcess:
        proc = FakeProcess()
        self.execs[exec_id] = proc
        return proc


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Message]] = []

    def publish(self, topic: str, event: Message) -> None:
        self.seen.append((topic, event))

    def topics(self) -> list[str]:
        return [t for t, _ in self.seen]


class World:
    def __init__(self, tmp_path: Path, fail: Exception | None = None) -> None:
        self.instances: dict[str, FakeInstance] = {}
        self.events = Events()
        self.mounted: list[str] = []
        self.unmounted: list[str] = []
        self.fail = fail
        self.shutdowns = 0
        self.tmp = tmp_path
        self.service = TaskService(
            self.factory,
            namespace="ns1",
            events=self.events,
            on_shutdown=self.on_shutdown,
            mount=lambda mounts, target: self.mounted.append(target),
            unmount=self.unmounted.append,
        )

    def on_shutdown(self) -> None:
        self.shutdowns += 1

    def factory(self, request: CreateRequest) -> FakeInstance:
        if self.fail is not None:
            raise self.fail
        inst = FakeInstance(request)
        self.instances[request.id] = inst
        return inst

    def bundle(self, name: str, config: object = None) -> str:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        body = config if config is not None else {"ociVersion": "1.0.2", "annotations": {"a": "b"}}
        (path / "config.json").write_text(json.dumps(body))
        return str(path)

    def create(self, task_id: str, **kw: object) -> shim_pb2.CreateTaskResponse:
        req = shim_pb2.CreateTaskRequest(
            id=task_id,
            bundle=self.bundle(task_id),
            stdout="/fifo/out",
            rootfs=[mount_pb2.Mount(type="overlay", source="overlay", options=["lowerdir=/l"])],
        )
        for key, value in kw.items():
            setattr(req, key, value)
        return self.service.Create(req)


def code_of(call: object) -> int:
    assert callable(call)
    with pytest.raises(ShimError) as info:
        call()
    return info.value.code


def test_lifecycle_publishes_every_event_in_order(tmp_path: Path) -> None:
    w = World(tmp_path)
    svc = w.service
    pid = w.create("c1").pid
    inst = w.instances["c1"]
    assert inst.request.annotations == {"a": "b"}
    assert inst.request.rootfs == (Mount("overlay", "overlay", "", ("lowerdir=/l",)),)
    assert w.mounted == [str(tmp_path / "c1" / "rootfs")]
    state = svc.State(shim_pb2.StateRequest(id="c1"))
    assert (state.status, state.pid, state.stdout) == (task_types_pb2.CREATED, pid, "/fifo/out")
    assert svc.Start(shim_pb2.StartRequest(id="c1")).pid == pid
    assert svc.State(shim_pb2.StateRequest(id="c1")).status == task_types_pb2.RUNNING
    waiters = [
        threading.Thread(target=lambda: svc.Wait(shim_pb2.WaitRequest(id="c1"))) for _ in range(3)
    ]
    for t in waiters:
        t.start()
    inst.finish(3)
    for t in waiters:
        t.join(5)
        assert not t.is_alive()
    waited = svc.Wait(shim_pb2.WaitRequest(id="c1"))
    assert waited.exit_status == 3
    assert waited.exited_at.seconds > 0
    state = svc.State(shim_pb2.StateRequest(id="c1"))
    assert (state.status, state.exit_status) == (task_types_pb2.STOPPED, 3)
    deleted = svc.Delete(shim_pb2.DeleteRequest(id="c1"))
    assert (deleted.pid, deleted.exit_status) == (pid, 3)
    assert inst.deleted
    assert w.unmounted == [str(tmp_path / "c1" / "rootfs")]
    assert w.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    create, exit_ = w.events.seen[0][1], w.events.seen[2][1]
    assert isinstance(create, events_pb2.TaskCreate)
    assert create.pid == pid
    assert create.io.stdout == "/fifo/out"
    assert create.rootfs[0].type == "overlay"
    assert isinstance(exit_, events_pb2.TaskExit)
    assert (exit_.container_id, exit_.id, exit_.exit_status) == ("c1", "c1", 3)
    assert code_of(lambda: svc.State(shim_pb2.StateRequest(id="c1"))) == 5
    assert svc.task_ids == []


def test_illegal_transitions_are_refused_with_their_codes(tmp_path: Path) -> None:
    w = World(tmp_path)
    svc = w.service
    w.create("c1")
    assert code_of(lambda: w.create("c1")) == 6  # a second Create of one id
    assert code_of(lambda: svc.Resume(shim_pb2.ResumeRequest(id="c1"))) == 9
    assert code_of(lambda: svc.Pause(shim_pb2.PauseRequest(id="c1"))) == 9  # not running
    assert code_of(lambda: svc.Exec(_exec("c1", "e1"))) == 9  # not running
    svc.Start(shim_pb2.StartRequest(id="c1"))
    assert code_of(lambda: svc.Start(shim_pb2.StartRequest(id="c1"))) == 9
    assert code_of(lambda: svc.Delete(shim_pb2.DeleteRequest(id="c1"))) == 9  # running
    svc.Pause(shim_pb2.PauseRequest(id="c1"))
    assert w.instances["c1"].paused
    assert svc.State(shim_pb2.StateRequest(id="c1")).status == task_types_pb2.PAUSED
    assert code_of(lambda: svc.Pause(shim_pb2.PauseRequest(id="c1"))) == 9
    assert code_of(lambda: svc.Delete(shim_pb2.DeleteRequest(id="c1"))) == 9  # paused
    svc.Resume(shim_pb2.ResumeRequest(id="c1"))
    assert not w.instances["c1"].paused
    svc.Kill(shim_pb2.KillRequest(id="c1", signal=15, all=True))
    assert w.instances["c1"].signals == [(15, True)]
    svc.Wait(shim_pb2.WaitRequest(id="c1"))
    assert code_of(lambda: svc.Kill(shim_pb2.KillRequest(id="c1", signal=9))) == 5
    assert code_of(lambda: svc.Pause(shim_pb2.PauseRequest(id="c1"))) == 9
    assert code_of(lambda: svc.Update(shim_pb2.UpdateTaskRequest(id="c1"))) == 9
    assert code_of(lambda: svc.Checkpoint(shim_pb2.CheckpointTaskRequest(id="c1"))) == 12
    for call in (
        lambda: svc.Start(shim_pb2.StartRequest(id="nope")),
        lambda: svc.Kill(shim_pb2.KillRequest(id="nope", signal=9)),
        lambda: svc.Wait(shim_pb2.WaitRequest(id="nope")),
        lambda: svc.Delete(shim_pb2.DeleteRequest(id="nope")),
        lambda: svc.Pids(shim_pb2.PidsRequest(id="nope")),
        lambda: svc.Stats(shim_pb2.StatsRequest(id="nope")),
        lambda: svc.State(shim_pb2.StateRequest(id="c1", exec_id="nope")),
    ):
        assert code_of(call) == 5
    assert code_of(lambda: svc.Kill(shim_pb2.KillRequest(id="c1", signal=0))) in (3, 5)
    assert svc.Delete(shim_pb2.DeleteRequest(id="c1")).exit_status == 143
    assert "/tasks/paused" in w.events.topics()
    assert "/tasks/resumed" in w.events.topics()


def test_exec_processes(tmp_path: Path) -> None:
    w = World(tmp_path)
    svc = w.service
    w.create("c1")
    svc.Start(shim_pb2.StartRequest(id="c1"))
    svc.Exec(_exec("c1", "e1"))
    assert code_of(lambda: svc.Exec(_exec("c1", "e1"))) == 6
    bad = _exec("c1", "e2")
    bad.spec.value = b"[1"
    assert code_of(lambda: svc.Exec(bad)) == 3
    assert code_of(lambda: svc.Exec(_exec("c1", ""))) == 3
    proc = w.instances["c1"].execs["e1"]
    assert svc.Start(shim_pb2.StartRequest(id="c1", exec_id="e1")).pid == proc.pid
    assert sorted(p.pid for p in svc.Pids(shim_pb2.PidsRequest(id="c1")).processes) == sorted(
        [w.instances["c1"].pid, proc.pid]
    )
    svc.ResizePty(shim_pb2.ResizePtyRequest(id="c1", exec_id="e1", width=80, height=24))
    svc.CloseIO(shim_pb2.CloseIORequest(id="c1", exec_id="e1", stdin=True))
    assert proc.size == (80, 24)
    assert proc.stdin_closed
    # the init cannot go while an exec runs
    assert code_of(lambda: svc.Delete(shim_pb2.DeleteRequest(id="c1"))) == 9
    proc.finish(5)
    assert svc.Wait(shim_pb2.WaitRequest(id="c1", exec_id="e1")).exit_status == 5
    assert svc.Delete(shim_pb2.DeleteRequest(id="c1", exec_id="e1")).exit_status == 5
    assert code_of(lambda: svc.State(shim_pb2.StateRequest(id="c1", exec_id="e1"))) == 5
    # an exec still running when its init exits is killed
    svc.Exec(_exec("c1", "e3"))
    svc.Start(shim_pb2.StartRequest(id="c1", exec_id="e3"))
    w.instances["c1"].finish(0)
    assert svc.Wait(shim_pb2.WaitRequest(id="c1", exec_id="e3")).exit_status == 137
    topics = w.events.topics()
    assert topics.count("/tasks/exec-added") == 2
    assert topics.count("/tasks/exec-started") == 2


def test_bad_bundles_fail_create_cleanly(tmp_path: Path) -> None:
    w = World(tmp_path)
    svc = w.service
    missing = tmp_path / "missing"
    missing.mkdir()
    req = shim_pb2.CreateTaskRequest(id="c1", bundle=str(missing))
    assert code_of(lambda: svc.Create(req)) == 3
    (missing / "config.json").write_text("{not json")
    with pytest.raises(ShimError, match="not valid JSON"):
        svc.Create(req)
    (missing / "config.json").write_text("[]")
    assert code_of(lambda: svc.Create(req)) == 3
    assert code_of(lambda: svc.Create(shim_pb2.CreateTaskRequest(id="", bundle="/x"))) == 3
    assert code_of(lambda: svc.Create(shim_pb2.CreateTaskRequest(id="c", bundle="rel"))) == 3
    assert w.instances == {}
    assert w.mounted == []
    assert w.events.seen == []


def test_a_failing_factory_unmounts_and_frees_the_id(tmp_path: Path) -> None:
    w = World(tmp_path, fail=ShimError("the module does not compile"))
    with pytest.raises(ShimError, match="does not compile"):
        w.create("c1")
    assert w.mounted == w.unmounted == [str(tmp_path / "c1" / "rootfs")]
    assert w.events.seen == []
    assert w.service.task_ids == []
    w.fail = None
    assert w.create("c1").pid > 0  # the id is free again


def test_delete_of_a_created_task_kills_it(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.create("c1")
    response = w.service.Delete(shim_pb2.DeleteRequest(id="c1"))
    assert response.exit_status == 137
    assert w.instances["c1"].deleted


def test_shutdown_waits_for_the_last_task(tmp_path: Path) -> None:
    w = World(tmp_path)
    svc = w.service
    w.create("c1")
    svc.Shutdown(shim_pb2.ShutdownRequest(id="c1"))
    assert w.shutdowns == 0
    svc.Delete(shim_pb2.DeleteRequest(id="c1"))
    svc.Shutdown(shim_pb2.ShutdownRequest(id="c1"))
    svc.Shutdown(shim_pb2.ShutdownRequest(id="c1"))
    assert w.shutdowns == 1
    assert code_of(lambda: w.create("c2")) == 9  # no Create after shutdown


def test_stats_connect_update(tmp_path: Path) -> None:
    w = World(tmp_path)
    svc = w.service
    pid = w.create("c1").pid
    assert svc.Stats(shim_pb2.StatsRequest(id="c1")).stats.type_url == "test.Stats"
    connected = svc.Connect(shim_pb2.ConnectRequest(id="c1"))
    assert connected.task_pid == pid
    assert connected.shim_pid > 0
    svc.Update(shim_pb2.UpdateTaskRequest(id="c1", resources=any_pb2.Any(value=b"{}")))
    assert w.instances["c1"].updated == b"{}"


def test_concurrent_creates_of_one_id_make_one_task(tmp_path: Path) -> None:
    w = World(tmp_path)
    req = shim_pb2.CreateTaskRequest(id="c1", bundle=w.bundle("c1"))
    codes: list[int] = []

    def create() -> None:
        try:
            w.service.Create(req)
            codes.append(0)
        except ShimError as exc:
            codes.append(exc.code)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [0] + [6] * 7
    assert len(w.instances) == 1


def _exec(task_id: str, exec_id: str) -> shim_pb2.ExecProcessRequest:
    spec = any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
        value=json.dumps({"args": ["sh"], "cwd": "/"}).encode(),
    )
    return shim_pb2.ExecProcessRequest(id=task_id, exec_id=exec_id, spec=spec)

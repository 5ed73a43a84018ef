"""The ``containerd.task.v2.Task`` service over `Instance`s, with the task state machine.

Every task (a container's init process) and every exec process moves through::

    created ──Start──► running ──(exit)──► stopped ──Delete──► (gone)
       │                 │  ▲                  ▲
       │              Pause Resume             │
       │                 ▼  │                  │
       │               paused ──(exit)─────────┘
       └──Delete (the process is killed and reaped first)──► (gone)

A request that does not fit the state is refused with ttrpc code 9 (failed precondition): a
second Start, Delete of a running task, Pause of a stopped one, Exec into a task that is not
running. Unknown ids are code 5, a second Create of one id code 6, Kill of a process that has
exited code 5 ("process already finished", as runc.v2 answers), Checkpoint code 12.

The service publishes ``/tasks/create``, ``start``, ``exit``, ``delete``, ``oom``, ``paused``,
``resumed``, ``exec-added`` and ``exec-started`` through an event sink (`EventSink`; the shim
uses `wasidispatch.shim.events.Publisher`), mounts the rootfs containerd passes on
``bundle/rootfs`` before the factory runs and unmounts it at Delete, and fans ``Wait`` out: a
thread per started process waits for its `Exit`, publishes ``TaskExit`` and wakes every
``Wait``. Handlers take and return the generated messages of ``wasidispatch.shim._pb``;
`TaskService.methods` maps each method name to ``(request class, handler)`` for
`wasidispatch.shim.ttrpc.Server.register`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal as _signal
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from wasidispatch import _fs
from wasidispatch.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ShimError,
    UnimplementedError,
    WasiDispatchError,
)
from wasidispatch.shim._pb import events_pb2, shim_pb2, task_types_pb2
from wasidispatch.shim.instance import CreateRequest, Factory, Instance, Mount, Process, Stdio
from wasidispatch.shim.reaper import Exit

if TYPE_CHECKING:
    from google.protobuf.any_pb2 import Any as AnyMessage

__all__ = ["SERVICE", "EventSink", "TaskService"]

SERVICE = "containerd.task.v2.Task"

log = logging.getLogger("wasidispatch.shim")

_STATUS = {
    "created": task_types_pb2.CREATED,
    "running": task_types_pb2.RUNNING,
    "stopped": task_types_pb2.STOPPED,
    "paused": task_types_pb2.PAUSED,
    "pausing": task_types_pb2.PAUSING,
}


class EventSink(Protocol):
    """Where the service's events go (`wasidispatch.shim.events.Publisher` is one)."""

    def publish(self, topic: str, event: Message) -> None:
        """Queue ``event`` under ``topic`` (``/tasks/exit``...); never blocks for long."""
        ...


class _NoEvents:
    def publish(self, topic: str, event: Message) -> None:
        pass


RootfsMounter = Callable[[tuple[Mount, ...], str], None]
RootfsUnmounter = Callable[[str], None]


def _default_mount(mounts: tuple[Mount, ...], target: str) -> None:
    from wasidispatch.shim.mount import mount_rootfs

    mount_rootfs(mounts, target)


def _default_unmount(target: str) -> None:
    from wasidispatch.shim.mount import unmount_rootfs

    unmount_rootfs(target)


class _Proc:
    """One process of a task: its state, its `Process`, its exit once known. (Plain
    classes, no dataclasses: the import costs the daemon's start ~10 ms.)"""

    def __init__(
        self,
        container: str,
        exec_id: str,
        process: Process,
        stdio: Stdio,
        state: str = "created",  # created, starting, running, pausing, paused, stopped, deleting
    ) -> None:
        self.container = container
        self.exec_id = exec_id
        self.process = process
        self.stdio = stdio
        self.state = state
        self.exit: Exit | None = None
        self.done = threading.Event()


class _Task:
    def __init__(
        self, id: str, bundle: str, instance: Instance, init: _Proc, rootfs: str | None
    ) -> None:
        self.id = id
        self.bundle = bundle
        self.instance = instance
        self.init = init
        self.rootfs = rootfs  # where the service mounted the rootfs, to unmount at Delete
        self.execs: dict[str, _Proc] = {}
        self.oom_seen = 0


def _timestamp(at_ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(at_ns)
    return ts


class TaskService:
    """The Task service of one shim process: any number of tasks, each from ``factory``.

    ``namespace`` is the containerd namespace the events carry; ``on_shutdown`` is called
    (once) when containerd asks the shim to go and no task is left (or ``now`` is set).
    ``mount``/``unmount`` put containerd's rootfs mounts on ``bundle/rootfs`` (the
    defaults use `wasidispatch.shim.mount`; tests of the state machine can pass no-ops).
    """

    def __init__(
        self,
        factory: Factory,
        *,
        namespace: str = "default",
        events: EventSink | None = None,
        on_shutdown: Callable[[], None] | None = None,
        mount: RootfsMounter = _default_mount,
        unmount: RootfsUnmounter = _default_unmount,
    ) -> None:
        self._factory = factory
        self.namespace = namespace
        self._events: EventSink = events or _NoEvents()
        self._on_shutdown = on_shutdown
        self._mount = mount
        self._unmount = unmount
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}
        self._reserved: set[str] = set()
        self._shutdown = False

    # ------------------------------------------------------------------------------ plumbing

    def methods(self) -> dict[str, tuple[type[Message], Callable[..., Message]]]:
        """Method name -> (request class, handler) for the ttrpc server."""
        return {
            "State": (shim_pb2.StateRequest, self.State),
            "Create": (shim_pb2.CreateTaskRequest, self.Create),
            "Start": (shim_pb2.StartRequest, self.Start),
            "Delete": (shim_pb2.DeleteRequest, self.Delete),
            "Pids": (shim_pb2.PidsRequest, self.Pids),
            "Pause": (shim_pb2.PauseRequest, self.Pause),
            "Resume": (shim_pb2.ResumeRequest, self.Resume),
            "Checkpoint": (shim_pb2.CheckpointTaskRequest, self.Checkpoint),
            "Kill": (shim_pb2.KillRequest, self.Kill),
            "Exec": (shim_pb2.ExecProcessRequest, self.Exec),
            "ResizePty": (shim_pb2.ResizePtyRequest, self.ResizePty),
            "CloseIO": (shim_pb2.CloseIORequest, self.CloseIO),
            "Update": (shim_pb2.UpdateTaskRequest, self.Update),
            "Wait": (shim_pb2.WaitRequest, self.Wait),
            "Stats": (shim_pb2.StatsRequest, self.Stats),
            "Connect": (shim_pb2.ConnectRequest, self.Connect),
            "Shutdown": (shim_pb2.ShutdownRequest, self.Shutdown),
        }

    @property
    def task_ids(self) -> list[str]:
        """Ids of the tasks this service holds."""
        with self._lock:
            return sorted(self._tasks)

    def _publish(self, topic: str, event: Message) -> None:
        try:
            self._events.publish(topic, event)
        except Exception:  # events are best effort; a task never fails for one
            log.exception("cannot publish %s", topic)

    def _task(self, task_id: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFoundError(f"task {task_id}: not found")
        return task

    def _proc(self, task_id: str, exec_id: str) -> tuple[_Task, _Proc]:
        task = self._task(task_id)
        if not exec_id:
            return task, task.init
        proc = task.execs.get(exec_id)
        if proc is None:
            raise NotFoundError(f"process {exec_id} of task {task_id}: not found")
        return task, proc

    # ------------------------------------------------------------------------------ Create

    def Create(self, req: shim_pb2.CreateTaskRequest, *_ctx: object) -> shim_pb2.CreateTaskResponse:
        """Create a task: mount its rootfs, read its config.json, call the factory."""
        task_id = req.id
        if not task_id:
            raise InvalidArgumentError("create: the task id is empty")
        if req.checkpoint:
            raise UnimplementedError("create from a checkpoint is not supported by this shim")
        bundle = req.bundle
        if not bundle or not os.path.isabs(bundle):
            raise InvalidArgumentError(f"create {task_id}: bundle must be an absolute path")
        with self._lock:
            if self._shutdown:
                raise FailedPreconditionError("the shim is shutting down")
            if task_id in self._tasks or task_id in self._reserved:
                raise AlreadyExistsError(f"task {task_id}: already exists")
            self._reserved.add(task_id)
        try:
            task = self._create(req, task_id, bundle)
        finally:
            with self._lock:
                self._reserved.discard(task_id)
        with self._lock:
            late = self._shutdown  # the shim is going: a task made meanwhile goes too
            if not late:
                self._tasks[task_id] = task
        if late:
            task.instance.delete()
            if task.rootfs is not None:
                self._unmount(task.rootfs)
            raise FailedPreconditionError(f"create {task_id}: the shim is shutting down")
        pid = task.instance.pid
        self._publish(
            "/tasks/create",
            events_pb2.TaskCreate(
                container_id=task_id,
                bundle=bundle,
                rootfs=list(req.rootfs),
                io=events_pb2.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                pid=pid,
            ),
        )
        return shim_pb2.CreateTaskResponse(pid=pid)

    def _create(self, req: shim_pb2.CreateTaskRequest, task_id: str, bundle: str) -> _Task:
        spec = _load_spec(bundle, task_id)
        mounts = tuple(Mount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs)
        rootfs = os.path.join(bundle, "rootfs")
        mounted = False
        if mounts:
            try:
                os.makedirs(rootfs, 0o711, exist_ok=True)
                self._mount(mounts, rootfs)
            except WasiDispatchError:
                raise
            except OSError as exc:
                raise ShimError(f"create {task_id}: cannot mount the rootfs: {exc}") from exc
            mounted = True
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        annotations = spec.get("annotations")
        request = CreateRequest(
            id=task_id,
            bundle=bundle,
            namespace=self.namespace,
            stdio=stdio,
            spec=spec,
            rootfs=mounts,
            options=req.options if req.HasField("options") else None,
            annotations=(
                {str(k): str(v) for k, v in annotations.items()}
                if isinstance(annotations, dict)
                else {}
            ),
        )
        try:
            instance = self._factory(request)
        except BaseException as exc:
            if mounted:
                try:
                    self._unmount(rootfs)
                except Exception:
                    log.exception("create %s: cannot unmount the rootfs", task_id)
            if isinstance(exc, WasiDispatchError) and not isinstance(exc, ShimError):
                raise ShimError(f"create {task_id}: {exc}") from exc
            raise
        init = _Proc(task_id, "", instance, stdio)
        return _Task(task_id, bundle, instance, init, rootfs if mounted else None)

    # ------------------------------------------------------------------------------ Start

    def Start(self, req: shim_pb2.StartRequest, *_ctx: object) -> shim_pb2.StartResponse:
        """Start the task's init or an exec process (created -> running)."""
        with self._lock:
            task, proc = self._proc(req.id, req.exec_id)
            if proc.state != "created":
                raise FailedPreconditionError(
                    f"cannot start {_what(proc)}: it is {proc.state}, not created"
                )
            if proc.exec_id and task.init.state not in ("running",):
                raise FailedPreconditionError(
                    f"cannot start {_what(proc)}: task {task.id} is {task.init.state}"
                )
            proc.state = "starting"
        try:
            pid = proc.process.start()
        except BaseException:
            with self._lock:
                if proc.state == "starting":
                    proc.state = "created"
            raise
        with self._lock:
            if proc.state == "starting":
                proc.state = "running"
        # TaskStart goes out before the exit watcher exists: a process that exits at once
        # must not have its TaskExit published first
        if proc.exec_id:
            self._publish(
                "/tasks/exec-started",
                events_pb2.TaskExecStarted(container_id=task.id, exec_id=proc.exec_id, pid=pid),
            )
        else:
            self._publish("/tasks/start", events_pb2.TaskStart(container_id=task.id, pid=pid))
        threading.Thread(
            target=self._watch_exit, args=(task, proc), name=f"exit-{req.id}", daemon=True
        ).start()
        return shim_pb2.StartResponse(pid=pid)

    def _watch_exit(self, task: _Task, proc: _Proc) -> None:
        try:
            done = proc.process.wait()
        except Exception as exc:  # an instance that cannot tell: report it as killed
            log.exception("waiting for %s failed", _what(proc))
            done = Exit(255, _now_ns(), proc.process.pid)
            del exc
        if not proc.exec_id:
            self._check_oom(task)
        with self._lock:
            proc.exit = done
            proc.state = "stopped"
            others = [p for p in task.execs.values() if p.state in ("running", "paused")]
        self._publish(
            "/tasks/exit",
            events_pb2.TaskExit(
                container_id=task.id,
                id=proc.exec_id or task.id,
                pid=done.pid,
                exit_status=done.status,
                exited_at=_timestamp(done.at_ns),
            ),
        )
        proc.done.set()
        if not proc.exec_id:
            # the init has gone: so do the processes exec'd into it (runc.v2 does the same)
            for other in others:
                with contextlib.suppress(ShimError, OSError):
                    other.process.kill(_signal.SIGKILL, False)

    def _check_oom(self, task: _Task) -> None:
        count = getattr(task.instance, "oom_events", None)
        if isinstance(count, int) and count > task.oom_seen:
            task.oom_seen = count
            self._publish("/tasks/oom", events_pb2.TaskOOM(container_id=task.id))

    # ------------------------------------------------------------------------------ Delete

    def Delete(self, req: shim_pb2.DeleteRequest, *_ctx: object) -> shim_pb2.DeleteResponse:
        """Delete a stopped (or never started) process; the init deletes the task."""
        with self._lock:
            task, proc = self._proc(req.id, req.exec_id)
            if proc.state in ("running", "paused", "pausing", "starting"):
                raise FailedPreconditionError(
                    f"cannot delete {_what(proc)}: it is {proc.state}; kill it first"
                )
            if proc.state == "deleting":
                raise FailedPreconditionError(f"{_what(proc)} is already being deleted")
            if not proc.exec_id:
                live = [e for e, p in task.execs.items() if p.state not in ("stopped", "created")]
                if live:
                    raise FailedPreconditionError(
                        f"cannot delete task {task.id}: exec processes {', '.join(live)} run"
                    )
            previous = proc.state
            proc.state = "deleting"
        try:
            if not proc.exec_id:
                for other in list(task.execs.values()):
                    other.process.delete()
            proc.process.delete()
        except BaseException:
            with self._lock:
                proc.state = previous
            raise
        done = proc.exit
        if done is None:  # never started: its delete killed it
            done = Exit(137 if previous == "created" else 0, _now_ns(), proc.process.pid)
        if proc.exec_id:
            with self._lock:
                task.execs.pop(proc.exec_id, None)
        else:
            if task.rootfs is not None:
                try:
                    self._unmount(task.rootfs)
                except Exception as exc:
                    log.exception("delete %s: cannot unmount the rootfs", task.id)
                    with self._lock:  # the process is gone: a retried Delete may go on
                        proc.state = "stopped"
                    raise ShimError(f"delete {task.id}: cannot unmount the rootfs: {exc}") from exc
                task.rootfs = None
            with self._lock:
                self._tasks.pop(task.id, None)
            self._publish(
                "/tasks/delete",
                events_pb2.TaskDelete(
                    container_id=task.id,
                    pid=done.pid,
                    exit_status=done.status,
                    exited_at=_timestamp(done.at_ns),
                    id=task.id,
                ),
            )
        proc.done.set()
        return shim_pb2.DeleteResponse(
            pid=done.pid, exit_status=done.status, exited_at=_timestamp(done.at_ns)
        )

    # ------------------------------------------------------------------------------ the rest

    def State(self, req: shim_pb2.StateRequest, *_ctx: object) -> shim_pb2.StateResponse:
        """The process's state, pid, stdio and (once stopped) exit."""
        with self._lock:
            task, proc = self._proc(req.id, req.exec_id)
            state, done = proc.state, proc.exit
        status = _STATUS.get(state)
        if status is None:  # starting/deleting: containerd's nearest
            status = task_types_pb2.CREATED if state == "starting" else task_types_pb2.STOPPED
        response = shim_pb2.StateResponse(
            id=req.exec_id or task.id,
            bundle=task.bundle,
            pid=proc.process.pid,
            status=status,
            stdin=proc.stdio.stdin,
            stdout=proc.stdio.stdout,
            stderr=proc.stdio.stderr,
            terminal=proc.stdio.terminal,
            exec_id=req.exec_id,
        )
        if done is not None:
            response.exit_status = done.status
            response.exited_at.CopyFrom(_timestamp(done.at_ns))
        return response

    def Pids(self, req: shim_pb2.PidsRequest, *_ctx: object) -> shim_pb2.PidsResponse:
        """Every pid of the task's container."""
        with self._lock:
            task = self._task(req.id)
        pids = task.instance.pids()
        return shim_pb2.PidsResponse(processes=[task_types_pb2.ProcessInfo(pid=p) for p in pids])

    def Pause(self, req: shim_pb2.PauseRequest, *_ctx: object) -> empty_pb2.Empty:
        """Freeze a running task."""
        with self._lock:
            task = self._task(req.id)
            if task.init.state != "running":
                raise FailedPreconditionError(
                    f"cannot pause task {task.id}: it is {task.init.state}"
                )
            task.init.state = "pausing"
        try:
            task.instance.pause()
        except BaseException:
            with self._lock:
                if task.init.state == "pausing":
                    task.init.state = "running"
            raise
        with self._lock:
            if task.init.state == "pausing":
                task.init.state = "paused"
        self._publish("/tasks/paused", events_pb2.TaskPaused(container_id=task.id))
        return empty_pb2.Empty()

    def Resume(self, req: shim_pb2.ResumeRequest, *_ctx: object) -> empty_pb2.Empty:
        """Thaw a paused task."""
        with self._lock:
            task = self._task(req.id)
            if task.init.state != "paused":
                raise FailedPreconditionError(
                    f"cannot resume task {task.id}: it is {task.init.state}, not paused"
                )
        task.instance.resume()
        with self._lock:
            if task.init.state == "paused":
                task.init.state = "running"
        self._publish("/tasks/resumed", events_pb2.TaskResumed(container_id=task.id))
        return empty_pb2.Empty()

    def Checkpoint(self, req: shim_pb2.CheckpointTaskRequest, *_ctx: object) -> empty_pb2.Empty:
        """Not supported: a clear code 12."""
        raise UnimplementedError(f"checkpoint of task {req.id}: not supported by this shim")

    def Kill(self, req: shim_pb2.KillRequest, *_ctx: object) -> empty_pb2.Empty:
        """Signal a process (``all``: every process of the container)."""
        with self._lock:
            _, proc = self._proc(req.id, req.exec_id)
            state = proc.state
        if state in ("stopped", "deleting"):
            raise NotFoundError(f"{_what(proc)}: process already finished")
        if not 0 < req.signal < 65:
            raise InvalidArgumentError(f"kill {_what(proc)}: signal {req.signal} out of range")
        proc.process.kill(req.signal, req.all)
        return empty_pb2.Empty()

    def Exec(self, req: shim_pb2.ExecProcessRequest, *_ctx: object) -> empty_pb2.Empty:
        """Add a process (from a runtime-spec ``process`` in ``spec``) to a running task."""
        if not req.exec_id:
            raise InvalidArgumentError(f"exec into task {req.id}: the exec id is empty")
        with self._lock:
            task = self._task(req.id)
            if task.init.state != "running":
                raise FailedPreconditionError(
                    f"cannot exec into task {task.id}: it is {task.init.state}"
                )
            if req.exec_id in task.execs:
                raise AlreadyExistsError(f"exec {req.exec_id} of task {task.id}: already exists")
            placeholder = _Proc(task.id, req.exec_id, _Placeholder(), Stdio(), state="deleting")
            task.execs[req.exec_id] = placeholder
        try:
            try:
                spec = json.loads(req.spec.value or b"null")
            except (UnicodeDecodeError, ValueError) as exc:
                raise InvalidArgumentError(f"exec {req.exec_id}: bad process spec: {exc}") from exc
            if not isinstance(spec, dict):
                raise InvalidArgumentError(f"exec {req.exec_id}: the process spec is not an object")
            stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
            process = task.instance.exec(req.exec_id, spec, stdio)
        except BaseException:
            with self._lock:
                task.execs.pop(req.exec_id, None)
            raise
        with self._lock:
            task.execs[req.exec_id] = _Proc(task.id, req.exec_id, process, stdio)
        self._publish(
            "/tasks/exec-added",
            events_pb2.TaskExecAdded(container_id=task.id, exec_id=req.exec_id),
        )
        return empty_pb2.Empty()

    def ResizePty(self, req: shim_pb2.ResizePtyRequest, *_ctx: object) -> empty_pb2.Empty:
        """Resize a process's terminal."""
        with self._lock:
            _, proc = self._proc(req.id, req.exec_id)
        proc.process.resize_pty(req.width, req.height)
        return empty_pb2.Empty()

    def CloseIO(self, req: shim_pb2.CloseIORequest, *_ctx: object) -> empty_pb2.Empty:
        """Close a process's stdin."""
        with self._lock:
            _, proc = self._proc(req.id, req.exec_id)
        if req.stdin:
            proc.process.close_stdin()
        return empty_pb2.Empty()

    def Update(self, req: shim_pb2.UpdateTaskRequest, *_ctx: object) -> empty_pb2.Empty:
        """Apply new resources to a task."""
        with self._lock:
            task = self._task(req.id)
            if task.init.state in ("stopped", "deleting"):
                raise FailedPreconditionError(f"cannot update task {task.id}: it has stopped")
        task.instance.update(req.resources)
        return empty_pb2.Empty()

    def Wait(self, req: shim_pb2.WaitRequest, *_ctx: object) -> shim_pb2.WaitResponse:
        """Block until the process has exited."""
        with self._lock:
            _, proc = self._proc(req.id, req.exec_id)
        proc.done.wait()
        done = proc.exit
        if done is None:
            raise NotFoundError(f"{_what(proc)}: deleted before it exited")
        return shim_pb2.WaitResponse(exit_status=done.status, exited_at=_timestamp(done.at_ns))

    def Stats(self, req: shim_pb2.StatsRequest, *_ctx: object) -> shim_pb2.StatsResponse:
        """The task's cgroup metrics."""
        with self._lock:
            task = self._task(req.id)
        stats: AnyMessage = task.instance.stats()
        return shim_pb2.StatsResponse(stats=stats)

    def Connect(self, req: shim_pb2.ConnectRequest, *_ctx: object) -> shim_pb2.ConnectResponse:
        """The shim's and the task's pids."""
        with self._lock:
            task = self._tasks.get(req.id)
        return shim_pb2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=task.instance.pid if task is not None else 0
        )

    def Shutdown(self, req: shim_pb2.ShutdownRequest, *_ctx: object) -> empty_pb2.Empty:
        """Leave when no task is left (or at once with ``now``)."""
        with self._lock:
            if (self._tasks or self._reserved) and not req.now:
                return empty_pb2.Empty()
            first = not self._shutdown
            self._shutdown = True
        if first and self._on_shutdown is not None:
            self._on_shutdown()
        return empty_pb2.Empty()

    def close(self) -> None:
        """Kill and delete every task (the shim is going away)."""
        with self._lock:
            tasks = list(self._tasks.values())
            self._shutdown = True
        for task in tasks:
            for proc in [*task.execs.values(), task.init]:
                try:
                    proc.process.delete()
                except Exception:
                    log.exception("cannot delete %s", _what(proc))
            if task.rootfs is not None:
                try:
                    self._unmount(task.rootfs)
                except Exception:
                    log.exception("cannot unmount %s", task.rootfs)
        with self._lock:
            self._tasks.clear()


class _Placeholder:
    """Holds an exec id while its process is being created."""

    pid = 0

    def start(self) -> int:
        raise FailedPreconditionError("process is still being created")

    def kill(self, signal: int, all: bool = False) -> None:
        raise FailedPreconditionError("process is still being created")

    def wait(self) -> Exit:
        raise FailedPreconditionError("process is still being created")

    def delete(self) -> None:
        pass

    def resize_pty(self, width: int, height: int) -> None:
        raise FailedPreconditionError("process is still being created")

    def close_stdin(self) -> None:
        pass


def _what(proc: _Proc) -> str:
    if proc.exec_id:
        return f"exec {proc.exec_id} of task {proc.container}"
    return f"task {proc.container}"


def _now_ns() -> int:
    import time

    return time.time_ns()


def _load_spec(bundle: str, task_id: str) -> Mapping[str, Any]:
    """The bundle's config.json as a JSON object, or a clear `InvalidArgumentError`."""
    path = os.path.join(bundle, "config.json")
    try:
        data = _fs.read_regular(
            path, limit=_fs.CONFIG_LIMIT, what="config.json", error=InvalidArgumentError
        )
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"create {task_id}: {exc}") from exc
    try:
        spec = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgumentError(f"create {task_id}: {path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise InvalidArgumentError(f"create {task_id}: {path} is not a JSON object")
    return spec

from __future__ import annotations

import asyncio
import itertools

import pytest

from agent.allocator import Allocator
from agent.config import Config, ImagePullPolicy, OptionsConfig
from agent.containers import ContainerEvent, EventKind
from agent.inventory import NodeLayout, virtual_cores
from agent.models import TRANSITIONS, TaskState, parse_task_spec, transition_allowed
from agent.node import ExecutorState, Node
from agent.tasks import TaskManager, exit_result, task_env
from tests.fakes import FakeRuntime, RecordingSink
from tests.helpers import FULL_SEQUENCE


def spec(instance_id="TI-1", cores=None, memory=None, image="busybox:latest", **extra):
    return parse_task_spec(
        {
            "taskId": "T1",
            "sourceAppName": "APP",
            "instanceId": instance_id,
            "executable": {"url": image, "dockerPullTimeout": extra.pop("timeout", "100 seconds")},
            "resources": [
                {"type": "CPU", "cores": cores or {"0": [1]}},
                {"type": "MEMORY", "memoryInMB": memory or {"0": 64}},
            ],
            **extra,
        }
    )


class Harness:
    def __init__(self, tg: asyncio.TaskGroup, layout=None, **options):
        layout = layout or {0: NodeLayout(0, frozenset({0, 1}), {0: 0, 1: 1}, 1024, 1024)}
        self.runtime = FakeRuntime()
        self.sink = RecordingSink()
        self.node = Node(
            hostname="exec-1", port=3000, allocator=Allocator(layout), state=ExecutorState.ACTIVE
        )
        cfg = Config(options=OptionsConfig(**options))
        self.manager = TaskManager(
            cfg=cfg,
            node=self.node,
            runtime=self.runtime,
            sink=self.sink,
            spawn=lambda coro, name: tg.create_task(coro, name=name),
            environ={"PASSED": "from-agent"},
        )
        self.runtime.start_events(self.manager.on_event)

    async def until(self, predicate, timeout=5.0):
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)

    async def state(self, instance_id, state):
        await self.until(lambda: state in self.sink.states(instance_id))


@pytest.fixture
async def harness_factory():
    async with asyncio.TaskGroup() as tg:
        made = []

        def make(**kw):
            h = Harness(tg, **kw)
            made.append(h)
            return h

        yield make
        for h in made:
            for rec in h.manager.active():
                h.manager.stop(rec.instance_id)
            for cid in list(h.runtime.containers):
                if h.runtime.containers[cid]["running"]:
                    h.runtime.exit(cid, 0)
            await h.until(lambda h=h: not h.manager.active())


def test_transition_table_is_the_reference():
    assert TRANSITIONS[TaskState.PENDING] == {TaskState.PROVISIONING, TaskState.STOPPED}
    assert TRANSITIONS[TaskState.RUNNING] == {TaskState.RUN_COMPLETED}
    assert TRANSITIONS[TaskState.UNKNOWN] == {TaskState.RUNNING, TaskState.STOPPED}
    assert not transition_allowed(TaskState.RUNNING, TaskState.STOPPED)
    assert transition_allowed(TaskState.RUNNING, TaskState.LOST)
    assert not transition_allowed(TaskState.STOPPED, TaskState.LOST)
    for state in TaskState:
        if state.terminal:
            assert TRANSITIONS[state] == frozenset()


@pytest.mark.parametrize(
    ("code", "oom", "status", "message"),
    [
        (0, False, "SUCCESSFUL", None),
        (0, True, "SUCCESSFUL", None),
        (3, False, "FAILED", "Task instance exited with status: 3"),
        (137, False, "FAILED", "Task instance exited with status: 137"),
        (137, True, "FAILED", "OOM killed (memory limit 64 MB)"),
        (
            1,
            True,
            "FAILED",
            "Task instance exited with status: 1 after an OOM kill inside the container (memory limit 64 MB)",
        ),
    ],
)
def test_exit_results(code, oom, status, message):
    result, msg = exit_result(code, oom, 64)
    assert result.status == status
    assert result.exit_code == code
    assert msg == message


def test_env_order_dedup_and_pass_through():
    s = spec(
        env={"A": "1", "HOST": "spoof", "DROVE_INSTANCE_ID": "spoof", "PASSED": "", "UNSET": ""}
    )
    env = task_env(s, "exec-1", {"PASSED": "from-agent"})
    assert env[0] == "HOST=exec-1"
    assert env[1:3] == ("A=1", "PASSED=from-agent")
    assert "DROVE_INSTANCE_ID=TI-1" in env
    assert not any(e.startswith("UNSET") for e in env)
    keys = [e.split("=", 1)[0] for e in env]
    assert len(keys) == len(set(keys))


async def test_exit_zero_sequence_and_resources(harness_factory):
    h = harness_factory()
    assert h.manager.start(spec()).accepted
    await h.state("TI-1", "RUNNING")
    assert h.node.allocator.free_cores()[0] == {0}
    cid = h.runtime.container_of("TI-1")
    params = h.runtime.containers[cid]["params"]
    assert params.cpuset_cpus == "1"
    assert params.cpuset_mems == "0"
    assert params.mem_limit_bytes == 64 << 20
    h.runtime.exit(cid, 0)
    await h.state("TI-1", "STOPPED")
    assert h.sink.states("TI-1") == FULL_SEQUENCE
    assert h.node.allocator.is_free()
    # the STOPPED report's snapshot already shows the resources free
    stopped_snapshot = h.sink.reports[-1][1]
    assert stopped_snapshot["cpus"]["usedCores"] == {}
    assert ("remove", cid) in h.runtime.calls


async def test_updated_strictly_increases(harness_factory):
    h = harness_factory()
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    h.runtime.exit(h.runtime.container_of("TI-1"), 0)
    await h.state("TI-1", "STOPPED")
    stamps = [i["updated"] for i, _ in h.sink.reports]
    assert all(b > a for a, b in itertools.pairwise(stamps))


async def test_stop_in_pending_goes_straight_to_stopped(harness_factory):
    h = harness_factory()
    assert h.manager.start(spec()).accepted
    assert h.manager.stop("TI-1").accepted  # before the runner had a chance to run
    await h.state("TI-1", "STOPPED")
    assert h.sink.states("TI-1") == ["STOPPED"]
    assert h.runtime.containers == {}
    assert h.node.allocator.is_free()


async def test_stop_during_pull_cancels_without_container(harness_factory):
    h = harness_factory()
    h.runtime.pull_gate = asyncio.Event()
    h.manager.start(spec(image="registry:5000/app:1"))
    await h.state("TI-1", "PROVISIONING")
    await h.until(lambda: ("pull", "registry:5000/app:1") in h.runtime.calls)
    h.manager.stop("TI-1")
    await h.state("TI-1", "STOPPED")
    assert h.sink.states("TI-1") == [
        "PROVISIONING",
        "STARTING",
        "RUN_COMPLETED",
        "DEPROVISIONING",
        "STOPPED",
    ]
    assert h.sink.last("TI-1")["taskResult"] == {"status": "CANCELLED", "exitCode": -1}
    assert h.runtime.containers == {}
    assert h.node.allocator.is_free()


async def test_stop_while_creating_never_loses_the_container(harness_factory):
    h = harness_factory()
    h.runtime.create_gate = asyncio.Event()
    h.manager.start(spec())
    await h.state("TI-1", "STARTING")
    h.manager.stop("TI-1")
    h.runtime.create_gate.set()
    await h.state("TI-1", "STOPPED")
    assert "LOST" not in h.sink.states("TI-1")
    assert h.runtime.containers == {}  # created, then removed
    assert h.sink.last("TI-1")["taskResult"] == {"status": "CANCELLED", "exitCode": -1}


async def test_stop_when_running_kills_and_reports_cancelled(harness_factory):
    h = harness_factory()
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    h.manager.stop("TI-1")
    await h.state("TI-1", "STOPPED")
    assert ("kill", "SIGKILL") in h.runtime.calls
    assert ("kill", "SIGTERM") not in h.runtime.calls
    assert h.sink.last("TI-1")["taskResult"] == {"status": "CANCELLED", "exitCode": -1}


async def test_grace_period_sends_sigterm_first(harness_factory):
    h = harness_factory(task_stop_grace_period_s=0.2)
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    h.manager.stop("TI-1")
    await h.state("TI-1", "STOPPED")
    kills = [c for c in h.runtime.calls if c[0] == "kill"]
    assert kills == [("kill", "SIGTERM"), ("kill", "SIGKILL")]


async def test_grace_period_not_needed_when_sigterm_works(harness_factory):
    h = harness_factory(task_stop_grace_period_s=5)
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    h.runtime.containers[h.runtime.container_of("TI-1")]["dies_on_term"] = True
    h.manager.stop("TI-1")
    await h.state("TI-1", "STOPPED")
    kills = [c for c in h.runtime.calls if c[0] == "kill"]
    assert kills == [("kill", "SIGTERM")]


async def test_container_gone_is_lost_result(harness_factory):
    h = harness_factory()
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    cid = h.runtime.container_of("TI-1")
    del h.runtime.containers[cid]
    h.runtime.sink(ContainerEvent(EventKind.DESTROY, cid))
    await h.state("TI-1", "STOPPED")
    done = next(i for i, _ in h.sink.reports if i["state"] == "RUN_COMPLETED")
    assert done["taskResult"] == {"status": "LOST", "exitCode": -1}
    assert done["errorMessage"] == f"Task instance lost for container: {cid}"


async def test_exit_missed_by_events_is_found_by_relist(harness_factory):
    h = harness_factory()
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    h.runtime.exit(h.runtime.container_of("TI-1"), 5, event=False)
    await asyncio.sleep(0.05)
    assert "RUN_COMPLETED" not in h.sink.states("TI-1")
    await h.manager.relist()
    await h.state("TI-1", "STOPPED")
    assert h.sink.last("TI-1")["taskResult"] == {"status": "FAILED", "exitCode": 5}


async def test_no_false_exit_while_docker_is_down(harness_factory):
    h = harness_factory()
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    h.runtime.down = True
    await h.manager.relist()
    assert not h.manager.docker_ok
    verdict = h.manager.start(spec("TI-2", cores={"0": [0]}))
    assert not verdict.accepted
    assert "Docker engine is unreachable" in verdict.message
    assert h.sink.states("TI-1")[-1] == "RUNNING"
    h.runtime.down = False
    await h.manager.relist()
    assert h.manager.docker_ok
    assert h.sink.states("TI-1")[-1] == "RUNNING"


async def test_pull_failure_is_provisioning_failed_without_result(harness_factory):
    h = harness_factory()
    h.runtime.pull_error = "manifest unknown"
    h.manager.start(spec(image="reg:5000/x:1"))
    await h.state("TI-1", "STOPPED")
    assert h.sink.states("TI-1") == [
        "PROVISIONING",
        "PROVISIONING_FAILED",
        "DEPROVISIONING",
        "STOPPED",
    ]
    last = h.sink.last("TI-1")
    assert "taskResult" not in last
    assert last["errorMessage"] == "Error while pulling image reg:5000/x:1: manifest unknown"


async def test_pull_timeout(harness_factory):
    h = harness_factory()
    h.runtime.pull_gate = asyncio.Event()
    h.manager.start(spec(image="reg:5000/x:1", timeout="1 second"))
    await h.state("TI-1", "STOPPED")
    assert h.sink.last("TI-1")["errorMessage"] == (
        "Error while pulling image reg:5000/x:1: pull did not finish within 1 second"
    )


async def test_never_policy_refuses_absent_image(harness_factory):
    h = harness_factory(image_pull_policy=ImagePullPolicy.NEVER)
    h.manager.start(spec(image="reg:5000/x:1"))
    await h.state("TI-1", "STOPPED")
    assert h.runtime.calls == []
    assert "imagePullPolicy is NEVER" in h.sink.last("TI-1")["errorMessage"]


async def test_always_policy_pulls_present_image(harness_factory):
    h = harness_factory(image_pull_policy=ImagePullPolicy.ALWAYS)
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    assert ("pull", "busybox:latest") in h.runtime.calls


async def test_uncached_image_is_removed(harness_factory):
    h = harness_factory(cache_images=False)
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    h.runtime.exit(h.runtime.container_of("TI-1"), 0)
    await h.state("TI-1", "STOPPED")
    assert ("remove_image", "sha256:busybox") in h.runtime.calls


async def test_start_failure_is_run_failed(harness_factory):
    h = harness_factory()
    h.runtime.start_error = "exec: no such file"
    h.manager.start(spec())
    await h.state("TI-1", "STOPPED")
    assert h.sink.states("TI-1") == [
        "PROVISIONING",
        "STARTING",
        "RUN_FAILED",
        "DEPROVISIONING",
        "STOPPED",
    ]
    last = h.sink.last("TI-1")
    assert last["taskResult"] == {"status": "FAILED", "exitCode": -1}
    assert last["errorMessage"] == "exec: no such file"
    assert h.runtime.containers == {}


async def test_duplicate_and_conflicting_starts(harness_factory):
    h = harness_factory()
    assert h.manager.start(spec(), "msg-1").accepted
    again = h.manager.start(spec(), "msg-1")
    assert again.accepted
    same_spec = h.manager.start(spec(), "msg-2")
    assert same_spec.accepted
    other = h.manager.start(spec(cores={"0": [0]}), "msg-3")
    assert not other.accepted
    assert "different spec" in other.message
    await h.state("TI-1", "RUNNING")
    assert len([c for c in h.runtime.calls if c[0] == "create"]) == 1


async def test_starts_refused_unless_active(harness_factory):
    h = harness_factory()
    h.node.state = ExecutorState.BLACKLISTED
    verdict = h.manager.start(spec())
    assert not verdict.accepted
    assert "BLACKLISTED" in verdict.message
    assert h.node.allocator.is_free()


async def test_allocation_failure_names_the_problem(harness_factory):
    h = harness_factory()
    verdict = h.manager.start(spec(memory={"0": 999_999}))
    assert not verdict.accepted
    assert "999999 MB requested on NUMA node 0, only 1024 MB free" in verdict.message
    assert h.manager.get("TI-1") is None


async def test_overprovisioned_cpuset_is_physical(harness_factory):
    layout = {0: NodeLayout(0, frozenset({0, 1}), virtual_cores([0, 1], 2), 1024, 2048)}
    h = harness_factory(layout=layout)
    # vcores 4,5 -> core 0; 7,8 -> core 1
    h.manager.start(spec(cores={"0": [4, 7]}))
    await h.state("TI-1", "RUNNING")
    params = h.runtime.containers[h.runtime.container_of("TI-1")]["params"]
    assert params.cpuset_cpus == "0,1"
    assert h.sink.last("TI-1")["resources"][0] == {"type": "CPU", "cores": {"0": [4, 7]}}


async def test_recovered_container_that_never_started_is_reported_failed(harness_factory):
    h = harness_factory()
    from agent.containers import ContainerParams

    params = ContainerParams("TI-1", "busybox:latest", {}, (), None, None, 1, None, None, 1)
    h.runtime.containers["c9"] = {"params": params, "running": False, "exit": None, "oom": False}
    assert h.manager.adopt(
        spec(),
        executor_id="e",
        created=1,
        updated=2,
        container_id="c9",
        image_id="x",
        never_started=True,
    ).accepted
    await h.state("TI-1", "STOPPED")
    assert h.sink.states("TI-1") == ["STOPPED"]
    last = h.sink.last("TI-1")
    assert last["taskResult"] == {"status": "FAILED", "exitCode": -1}
    assert "never started" in last["errorMessage"]
    assert h.runtime.containers == {}
    assert h.node.allocator.is_free()


async def test_recovered_exited_container_reports_its_real_exit(harness_factory):
    h = harness_factory()
    from agent.containers import ContainerParams

    params = ContainerParams("TI-1", "busybox:latest", {}, (), None, None, 1, None, None, 1)
    h.runtime.containers["c9"] = {"params": params, "running": False, "exit": 7, "oom": False}
    h.manager.adopt(spec(), executor_id="e", created=1, updated=2, container_id="c9", image_id="x")
    await h.state("TI-1", "STOPPED")
    assert h.sink.states("TI-1") == ["RUNNING", "RUN_COMPLETED", "DEPROVISIONING", "STOPPED"]
    assert h.sink.last("TI-1")["taskResult"] == {"status": "FAILED", "exitCode": 7}
    assert h.sink.last("TI-1")["executorId"] == "e"


async def test_docker_api_errors_do_not_kill_tasks_or_the_agent(harness_factory):
    from agent.errors import ContainerRuntimeError

    h = harness_factory()
    h.manager.start(spec())
    await h.state("TI-1", "RUNNING")
    real_inspect, real_list = h.runtime.inspect, h.runtime.list_managed
    failures = {"inspect": 2}

    async def flaky_inspect(cid):
        if failures["inspect"]:
            failures["inspect"] -= 1
            raise ContainerRuntimeError("500 Server Error: transient")
        return await real_inspect(cid)

    async def broken_list():
        raise ContainerRuntimeError("500 Server Error: list failed")

    h.runtime.inspect = flaky_inspect
    h.runtime.list_managed = broken_list
    await h.manager.relist()  # logged, not raised
    h.runtime.list_managed = real_list
    cid = h.runtime.container_of("TI-1")
    h.runtime.exit(cid, 5, event=False)
    await h.manager.relist()
    await h.state("TI-1", "STOPPED")
    assert "LOST" not in h.sink.states("TI-1")
    assert h.sink.last("TI-1")["taskResult"] == {"status": "FAILED", "exitCode": 5}


async def test_stop_ends_a_stalled_pull_at_once(harness_factory):
    h = harness_factory()

    async def stalled(image, auth, cancel, progress=None):
        await asyncio.sleep(3600)

    h.runtime.pull = stalled
    h.manager.start(spec(image="reg:5000/slow:1", timeout="1 hour"))
    await h.state("TI-1", "PROVISIONING")
    h.manager.stop("TI-1")
    await h.until(lambda: "STOPPED" in h.sink.states("TI-1"), timeout=2)
    assert h.sink.last("TI-1")["taskResult"] == {"status": "CANCELLED", "exitCode": -1}

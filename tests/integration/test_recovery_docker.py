"""Fault tests: the agent as a subprocess against the real Docker engine. Nothing is lost."""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import docker
import pytest

from agent.inventory import parse_cpulist
from tests.conftest import new_instance_id, start_message, stop_message
from tests.controller import StandInController
from tests.dockerd import PrivateDockerd
from tests.helpers import FULL_SEQUENCE, AgentProcess, free_port, http_json, write_config

pytestmark = pytest.mark.docker

# cpuMultiplier 4 -> p = 5: core 0 -> vcores 6..9, core 1 -> vcores 11..14
OVER = {"overProvisioning": {"enabled": True, "cpuMultiplier": 4, "memoryMultiplier": 1}}
VCORE_TO_CORE = {**{v: 0 for v in range(6, 10)}, **{v: 1 for v in range(11, 15)}}


def make_agent(tmp_path, ctl, **extra):
    port = free_port()
    cfg = write_config(
        tmp_path / "agent.yaml",
        port,
        controllers={"endpoints": [ctl.url], "leadershipCheckInterval": "3 seconds"},
        resources=OVER,
        **extra,
    )
    return AgentProcess(cfg, tmp_path / "agent.log", port)


def send(agent, body):
    status, reply = http_json(f"{agent.url}/apis/v1/messages", body=body)
    assert status == 200, reply
    return reply


def wait_active(agent, ctl):
    ctl.wait_for(
        lambda: http_json(f"{agent.url}/apis/v1/status")[1]["executorState"] == "ACTIVE",
        15,
        "executor ACTIVE",
    )


def result_of(ctl, iid):
    return ctl.wait_state(iid, "RUN_COMPLETED", 60)["instanceInfo"]["taskResult"]


def test_sigkill_restart_reports_true_exit_codes_and_relocks(tmp_path, docker_client):
    ctl = StandInController().start()
    agent = make_agent(tmp_path, ctl).start()
    ids = {name: new_instance_id() for name in ("exit5", "exit0", "oom", "run1", "run2")}
    scripts = {
        "exit5": ("sleep 2; exit 5", {"0": [6]}, 64),
        "exit0": ("sleep 2; exit 0", {"0": [7]}, 64),
        "oom": ("sleep 2; tail /dev/zero", {"0": [11]}, 16),
        "run1": ("sleep 300", {"0": [12]}, 64),
        "run2": ("sleep 300", {"0": [8, 13]}, 96),
    }
    try:
        wait_active(agent, ctl)
        for name, (script, cores, mem) in scripts.items():
            msg = start_message(ids[name], ["sh", "-c", script], cores=cores, memory={"0": mem})
            assert send(agent, msg)["status"] == "ACCEPTED"
        for iid in ids.values():
            ctl.wait_state(iid, "RUNNING")
        started = {
            n: docker_client.containers.get(ids[n]).attrs["State"]["StartedAt"]
            for n in ("run1", "run2")
        }
        agent.kill()  # SIGKILL: no chance to clean up
        for name in ("exit5", "exit0", "oom"):
            docker_client.api.wait(ids[name], timeout=30)
        agent.start()

        assert result_of(ctl, ids["exit5"]) == {"status": "FAILED", "exitCode": 5}
        assert result_of(ctl, ids["exit0"]) == {"status": "SUCCESSFUL", "exitCode": 0}
        assert result_of(ctl, ids["oom"]) == {"status": "FAILED", "exitCode": 137}
        oom_info = ctl.wait_state(ids["oom"], "RUN_COMPLETED")["instanceInfo"]
        assert oom_info["errorMessage"] == "OOM killed (memory limit 16 MB)"
        for name in ("exit5", "exit0", "oom"):
            ctl.wait_state(ids[name], "STOPPED")
            with pytest.raises(docker.errors.NotFound):
                docker_client.containers.get(ids[name])
        # the running ones were re-attached, untouched
        for name in ("run1", "run2"):
            container = docker_client.containers.get(ids[name])
            assert container.status == "running"
            assert container.attrs["State"]["StartedAt"] == started[name]
        status, node = http_json(f"{agent.url}/apis/v1/status")
        assert status == 200
        assert node["executorState"] == "ACTIVE"
        assert sorted(t["instanceId"] for t in node["tasks"]) == sorted([ids["run1"], ids["run2"]])
        used = node["state"]["cpus"]["usedCores"]
        assert sorted(used["0"]) == [8, 12, 13]
        assert node["state"]["memory"]["usedMemory"] == {"0": 64 + 96}
        locked_physical = {VCORE_TO_CORE[v] for v in used["0"]}
        running_cpusets = set()
        for name in ("run1", "run2"):
            cpus = docker_client.containers.get(ids[name]).attrs["HostConfig"]["CpusetCpus"]
            running_cpusets |= parse_cpulist(cpus)
        assert locked_physical == running_cpusets
        for name in ("run1", "run2"):
            assert send(agent, stop_message(ids[name]))["status"] == "ACCEPTED"
            stopped = ctl.wait_state(ids[name], "STOPPED")
            assert stopped["instanceInfo"]["taskResult"] == {"status": "CANCELLED", "exitCode": -1}
        assert agent.stop() == 0
    finally:
        agent.kill()
        ctl.stop()


def _assert_consistent(ctl, iid, expected_result):
    states = ctl.states(iid)
    deduped = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
    assert deduped == FULL_SEQUENCE, states
    for report in ctl.reports(iid):
        info = report["instanceInfo"]
        if info["state"] in ("RUN_COMPLETED", "DEPROVISIONING", "STOPPED"):
            assert info["taskResult"] == expected_result
    updated = [r["instanceInfo"]["updated"] for r in ctl.reports(iid)]
    assert updated == sorted(updated)


def test_controller_outage_loses_no_report(tmp_path):
    ctl = StandInController().start()
    agent = make_agent(tmp_path, ctl).start()
    ids = [new_instance_id() for _ in range(3)]
    try:
        wait_active(agent, ctl)
        for n, iid in enumerate(ids):
            msg = start_message(iid, ["sh", "-c", f"sleep 1; exit {n}"], cores={"0": [6 + n]})
            assert send(agent, msg)["status"] == "ACCEPTED"
        for iid in ids:
            ctl.wait_state(iid, "RUNNING")
        ctl.stop()  # the controller is gone: connections are refused
        for iid in ids:
            ctl.wait_for(
                lambda iid=iid: (
                    http_json(f"{agent.url}/apis/v1/tasks/{iid}")[1]["state"] == "STOPPED"
                ),
                30,
            )
        time.sleep(3)  # a few failed rounds of retries
        revived = StandInController(port=ctl.port).start()
        revived.messages[:0] = ctl.messages
        for n, iid in enumerate(ids):
            revived.wait_state(iid, "STOPPED", 30)
            _assert_consistent(
                revived, iid, {"status": "SUCCESSFUL" if n == 0 else "FAILED", "exitCode": n}
            )
        agent.stop()
        revived.stop()
    finally:
        agent.kill()
        ctl.stop()


def test_reports_survive_an_agent_crash_while_the_controller_is_down(tmp_path):
    ctl = StandInController().start()
    agent = make_agent(tmp_path, ctl).start()
    iid = new_instance_id()
    try:
        wait_active(agent, ctl)
        assert (
            send(agent, start_message(iid, ["sh", "-c", "sleep 1; exit 7"], cores={"0": [6]}))[
                "status"
            ]
            == "ACCEPTED"
        )
        ctl.wait_state(iid, "RUNNING")
        ctl.accepting = False
        ctl.wait_for(
            lambda: http_json(f"{agent.url}/apis/v1/tasks/{iid}")[1]["state"] == "STOPPED", 30
        )
        agent.kill()  # the unsent reports are only in the journal now
        journal = tmp_path / "state" / "reports.journal"
        assert journal.exists()
        ctl.accepting = True
        agent.start()
        ctl.wait_state(iid, "STOPPED", 30)
        _assert_consistent(ctl, iid, {"status": "FAILED", "exitCode": 7})
        ctl.wait_for(lambda: len(journal.read_text().splitlines()) == 1, 10, "a compacted journal")
        assert agent.stop() == 0
    finally:
        agent.kill()
        ctl.stop()


def test_start_task_sent_three_times_makes_one_container(tmp_path, docker_client):
    ctl = StandInController().start()
    agent = make_agent(tmp_path, ctl).start()
    iid = new_instance_id()
    msg = start_message(iid, ["sh", "-c", "sleep 300"], cores={"0": [6]}, header_id="same-header")
    try:
        wait_active(agent, ctl)
        replies = []
        threads = [
            threading.Thread(target=lambda: replies.append(send(agent, msg))) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r["status"] for r in replies] == ["ACCEPTED"] * 3
        ctl.wait_state(iid, "RUNNING")
        assert (
            len(
                docker_client.containers.list(
                    all=True, filters={"label": f"drove.instance.id={iid}"}
                )
            )
            == 1
        )
        # same instanceId, different spec: refused
        other = start_message(iid, ["sh", "-c", "sleep 1"], cores={"0": [7]})
        reply = send(agent, other)
        assert reply["status"] == "FAILED"
        assert "different spec" in reply["message"]
        assert send(agent, stop_message(iid))["status"] == "ACCEPTED"
        ctl.wait_state(iid, "STOPPED")
        assert send(agent, stop_message(iid))["status"] == "ACCEPTED"
        assert ctl.states(iid).count("PROVISIONING") == 1
    finally:
        agent.stop()
        agent.kill()
        ctl.stop()


def test_sigterm_leaves_containers_running_and_restart_adopts_them(tmp_path, docker_client):
    ctl = StandInController().start()
    agent = make_agent(tmp_path, ctl).start()
    iid = new_instance_id()
    try:
        wait_active(agent, ctl)
        send(agent, start_message(iid, ["sh", "-c", "sleep 300"], cores={"0": [6]}))
        ctl.wait_state(iid, "RUNNING")
        started_at = docker_client.containers.get(iid).attrs["State"]["StartedAt"]
        assert agent.stop(signal.SIGTERM) == 0
        assert docker_client.containers.get(iid).status == "running"
        agent.start()
        ctl.wait_for(
            lambda: ctl.states(iid).count("RUNNING") == 2, 20, "RUNNING again after restart"
        )
        assert docker_client.containers.get(iid).attrs["State"]["StartedAt"] == started_at
        send(agent, stop_message(iid))
        ctl.wait_state(iid, "STOPPED")
    finally:
        agent.stop()
        agent.kill()
        ctl.stop()


def test_reaper_removes_orphans_but_not_known_tasks(tmp_path, docker_client):
    from tests.helpers import TEST_IMAGE

    ctl = StandInController().start()
    agent = make_agent(tmp_path, ctl)
    orphan = docker_client.containers.run(
        TEST_IMAGE,
        ["sleep", "300"],
        detach=True,
        name=new_instance_id(),
        labels={"drove.job.type": "COMPUTATION", "drove.instance.id": "TI-orphan"},
    )
    garbled = docker_client.containers.run(
        TEST_IMAGE,
        ["sleep", "300"],
        detach=True,
        labels={"drove.job.type": "COMPUTATION"},
    )
    try:
        agent.start()
        wait_active(agent, ctl)
        iid = new_instance_id()
        send(agent, start_message(iid, ["sh", "-c", "sleep 300"], cores={"0": [6]}))
        ctl.wait_state(iid, "RUNNING")
        # the unusable containers were not adopted, and the agent did not crash on them
        assert [t["instanceId"] for t in http_json(f"{agent.url}/apis/v1/status")[1]["tasks"]] == [
            iid
        ]
        events = agent.events()
        assert any(e.get("event") == "recovery_container_unusable" for e in events)
    finally:
        agent.stop()
        agent.kill()
        ctl.stop()
    # the reaper itself, run once against the real engine
    import asyncio

    from agent.config import Config
    from agent.recovery import Reaper
    from agent.runtime import DockerRuntime

    class Owner:
        def owns(self, instance_id, container_id):
            return instance_id == iid

    async def reap():
        runtime = DockerRuntime()

        async def nothing_known(_):
            return None

        try:
            return await Reaper(Config(), Owner(), runtime, nothing_known, "x").reap_once()
        finally:
            await runtime.close()

    removed = asyncio.run(reap())
    assert set(removed) == {orphan.id, garbled.id}
    assert docker_client.containers.get(iid).status == "running"
    docker_client.containers.get(iid).remove(force=True)


def test_dockerd_restart_under_a_running_agent(tmp_path, docker_client):
    # unix socket paths are limited to 108 bytes: keep the daemon's root short
    engine = PrivateDockerd(Path(tempfile.mkdtemp(prefix="dd-", dir="/tmp"))).start()
    engine.load_test_image(docker_client)
    private = engine.client()
    ctl = StandInController().start()
    agent = make_agent(tmp_path, ctl, options={"dockerSocketPath": str(engine.socket)}).start()
    running, later = new_instance_id(), new_instance_id()
    try:
        wait_active(agent, ctl)
        send(agent, start_message(running, ["sh", "-c", "sleep 8; exit 9"], cores={"0": [6]}))
        ctl.wait_state(running, "RUNNING")
        engine.stop()
        # the agent keeps serving and refuses starts while the engine is gone
        time.sleep(1)
        reply = {}
        for core in (7, 8, 9, 11, 12):
            reply = send(agent, start_message(new_instance_id(), cores={"0": [core]}))
            if reply["status"] == "FAILED":
                break
            time.sleep(0.5)
        assert reply["status"] == "FAILED"
        assert "Docker engine is unreachable" in reply["message"]
        assert http_json(f"{agent.url}/apis/v1/tasks/{running}")[1]["state"] == "RUNNING"
        time.sleep(2)
        assert "RUN_COMPLETED" not in ctl.states(running)  # no false exit
        engine.start()
        ctl.wait_for(
            lambda: send(agent, start_message(later, cores={"0": [14]}))["status"] == "ACCEPTED",
            30,
            "starts accepted again",
        )
        # the real exit after the restart is seen through the reconnected event stream
        assert result_of(ctl, running) == {"status": "FAILED", "exitCode": 9}
        ctl.wait_state(running, "STOPPED")
        ctl.wait_state(later, "STOPPED")
    finally:
        agent.stop()
        agent.kill()
        ctl.stop()
        private.close()
        engine.destroy()
        shutil.rmtree(engine.root, ignore_errors=True)


def test_shutdown_flush_deadline_and_second_signal_forces_exit(tmp_path):
    ctl = StandInController().start()
    agent = make_agent(tmp_path, ctl).start()
    iid = new_instance_id()
    try:
        wait_active(agent, ctl)
        ctl.accepting = False
        send(agent, start_message(iid, ["sh", "-c", "exit 0"], cores={"0": [6]}))
        ctl.wait_for(
            lambda: http_json(f"{agent.url}/apis/v1/tasks/{iid}")[1]["state"] == "STOPPED", 30
        )
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert agent.proc.poll() is None, "still flushing reports within its deadline"
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.proc.wait(10)
        assert code != 0
        assert time.monotonic() - started < 5
        assert any(e.get("event") == "agent_forced_exit" for e in agent.events())
        # nothing lost: the reports are still in the journal for the next start
        journal = (tmp_path / "state" / "reports.journal").read_text()
        assert iid in journal
    finally:
        agent.kill()
        ctl.stop()

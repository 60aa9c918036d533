"""The RPC controller link: leader discovery, executor state, snapshots and report retries."""

from __future__ import annotations

import time

import pytest

from tests.conftest import new_instance_id, start_message
from tests.controller import StandInController
from tests.helpers import FULL_SEQUENCE, AgentProcess, free_port, http_json, write_config


def rpc_agent_for(tmp_path, endpoints, interval="3 seconds"):
    port = free_port()
    cfg = write_config(
        tmp_path / "agent.yaml",
        port,
        controllers={"endpoints": endpoints, "leadershipCheckInterval": interval},
    )
    return AgentProcess(cfg, tmp_path / "agent.log", port)


def executor_state(agent):
    return http_json(f"{agent.url}/apis/v1/status")[1]["executorState"]


def send(agent, body):
    return http_json(f"{agent.url}/apis/v1/messages", body=body)[1]


def test_unready_until_a_leader_answers_then_active(tmp_path):
    ctl = StandInController()  # not started yet
    agent = rpc_agent_for(tmp_path, [ctl.url]).start()
    try:
        assert executor_state(agent) == "UNREADY"
        reply = send(agent, start_message(new_instance_id()))
        assert reply["status"] == "FAILED"
        assert "UNREADY" in reply["message"]
        ctl.start()
        deadline = time.monotonic() + 10
        while executor_state(agent) != "ACTIVE" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert executor_state(agent) == "ACTIVE"
        snap = ctl.wait_for(ctl.snapshots, 10, "a snapshot")[0]
        assert snap["nodeData"]["executorState"] == "ACTIVE"
        assert snap["headers"]["Cluster-Authorization"] == "TestExecutorSecret"
        assert agent.stop() == 0
    finally:
        agent.kill()
        ctl.stop()


def test_first_answering_endpoint_is_the_leader(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    ctl = StandInController().start()
    agent = rpc_agent_for(tmp_path, [dead, ctl.url]).start()
    try:
        ctl.wait_for(ctl.snapshots, 10, "a snapshot at the second endpoint")
        assert executor_state(agent) == "ACTIVE"
    finally:
        agent.stop()
        agent.kill()
        ctl.stop()


def test_blacklisting_changes_state_refuses_starts_and_is_reported(tmp_path):
    ctl = StandInController().start()
    agent = rpc_agent_for(tmp_path, [ctl.url]).start()
    try:
        ctl.wait_for(lambda: executor_state(agent) == "ACTIVE", 10)
        for kind, state in [
            ("BLACKLIST_REQUESTED", "BLACKLIST_REQUESTED"),
            ("BLACKLIST", "BLACKLISTED"),
        ]:
            reply = send(agent, {"type": kind, "header": {"id": kind}})
            assert reply["status"] == "ACCEPTED"
            assert executor_state(agent) == state
            ctl.wait_for(
                lambda state=state: any(
                    s["nodeData"]["executorState"] == state for s in ctl.snapshots()
                ),
                10,
                f"a snapshot with {state}",
            )
        reply = send(agent, start_message(new_instance_id()))
        assert reply["status"] == "FAILED"
        assert "BLACKLISTED" in reply["message"]
        assert send(agent, {"type": "UNBLACKLIST", "header": {"id": "u"}})["status"] == "ACCEPTED"
        assert executor_state(agent) == "ACTIVE"
    finally:
        agent.stop()
        agent.kill()
        ctl.stop()


@pytest.mark.docker
def test_reports_are_retried_until_the_controller_accepts(tmp_path):
    ctl = StandInController().start()
    agent = rpc_agent_for(tmp_path, [ctl.url]).start()
    try:
        ctl.wait_for(lambda: executor_state(agent) == "ACTIVE", 10)
        ctl.accepting = False  # as a controller that lost leadership answers
        iid = new_instance_id()
        assert send(agent, start_message(iid, ["sh", "-c", "exit 4"]))["status"] == "ACCEPTED"
        status = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = http_json(f"{agent.url}/apis/v1/tasks/{iid}")[1]
            if status["state"] == "STOPPED":
                break
            time.sleep(0.1)
        assert status["state"] == "STOPPED"
        assert ctl.reports(iid) == []
        assert ctl.rejected > 0
        ctl.accepting = True
        ctl.wait_state(iid, "STOPPED", timeout=20)
        assert ctl.states(iid) == FULL_SEQUENCE
        assert ctl.wait_state(iid, "RUN_COMPLETED")["instanceInfo"]["taskResult"] == {
            "status": "FAILED",
            "exitCode": 4,
        }
    finally:
        agent.stop()
        agent.kill()
        ctl.stop()


@pytest.mark.docker
def test_standalone_is_active_at_once_and_keeps_reports(tmp_path):
    port = free_port()
    agent = AgentProcess(write_config(tmp_path / "a.yaml", port), tmp_path / "a.log", port).start()
    try:
        agent.wait_state("ACTIVE")
        iid = new_instance_id()
        assert send(agent, start_message(iid, ["sh", "-c", "exit 2"]))["status"] == "ACCEPTED"
        deadline = time.monotonic() + 20
        reports = []
        while time.monotonic() < deadline:
            reports = http_json(f"{agent.url}/apis/v1/reports?instanceId={iid}")[1]
            if reports and reports[-1]["instanceInfo"]["state"] == "STOPPED":
                break
            time.sleep(0.1)
        assert [r["instanceInfo"]["state"] for r in reports] == FULL_SEQUENCE
        assert reports[-1]["type"] == "TASK_STATE_REPORT"
    finally:
        agent.stop()
        agent.kill()

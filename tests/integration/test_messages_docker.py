"""The command endpoint's answers to bad input, against a running agent: nothing locked, nothing
registered, nothing started."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.conftest import new_instance_id, start_message
from tests.helpers import CONTROLLER_SECRET, http_json

pytestmark = pytest.mark.docker


def post_raw(agent, data: bytes, secret: str | None = CONTROLLER_SECRET):
    req = urllib.request.Request(f"{agent.url}/apis/v1/messages", data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    if secret is not None:
        req.add_header("Cluster-Authorization", secret)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def assert_nothing_locked(agent):
    status, node = http_json(f"{agent.url}/apis/v1/status")
    assert status == 200
    snap = node["state"]
    assert snap["cpus"]["freeCores"] == snap["layout"]["cores"]
    assert snap["memory"]["freeMemory"] == snap["layout"]["memory"]
    assert node["tasks"] == []


@pytest.mark.parametrize("secret", [None, "wrong", ""])
def test_messages_need_the_cluster_secret(rpc_agent, secret):
    body = json.dumps(start_message(new_instance_id())).encode()
    status, raw = post_raw(rpc_agent, body, secret=secret)
    assert status == 401
    assert raw == b""
    assert_nothing_locked(rpc_agent)


def _with(msg, path, value):
    target = msg
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return msg


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: _with(m, ["type"], "FLY_TO_MOON"), "type"),
        (lambda m: _with(m, ["type"], KeyError), "type"),
        (lambda m: _with(m, ["header"], KeyError), "header"),
        (lambda m: _with(m, ["header", "id"], 12), "header.id"),
        (lambda m: _with(m, ["spec"], KeyError), "spec"),
        (lambda m: _with(m, ["spec", "instanceId"], KeyError), "spec.instanceId"),
        (lambda m: _with(m, ["spec", "taskId"], ["x"]), "spec.taskId"),
        (lambda m: _with(m, ["spec", "executable"], "busybox"), "spec.executable"),
        (lambda m: _with(m, ["spec", "executable", "url"], KeyError), "spec.executable.url"),
        (
            lambda m: _with(m, ["spec", "executable", "dockerPullTimeout"], "soon"),
            "spec.executable.dockerPullTimeout",
        ),
        (lambda m: _with(m, ["spec", "resources"], []), "spec.resources"),
        (
            lambda m: _with(m, ["spec", "resources", 0, "cores"], {"x": [1]}),
            "spec.resources[0].cores",
        ),
        (
            lambda m: _with(m, ["spec", "resources", 0, "cores"], {"0": ["a"]}),
            "spec.resources[0].cores.0",
        ),
        (
            lambda m: _with(m, ["spec", "resources", 1, "memoryInMB"], {"0": -5}),
            "spec.resources[1].memoryInMB.0",
        ),
        (lambda m: _with(m, ["spec", "resources", 1, "type"], "GPU"), "spec.resources[1].type"),
        (lambda m: _with(m, ["spec", "args"], [1, 2]), "spec.args"),
        (lambda m: _with(m, ["spec", "env"], ["A=1"]), "spec.env"),
        (
            lambda m: _with(m, ["spec", "volumes"], [{"mode": "READ_ONLY"}]),
            "spec.volumes[0].pathOnHost",
        ),
        (
            lambda m: _with(
                m, ["spec", "configs"], [{"type": "INLINE", "localFilename": "/a", "data": "%%"}]
            ),
            "spec.configs[0].data",
        ),
        (
            lambda m: _with(m, ["spec", "configs"], [{"type": "INLINE", "localFilename": "rel"}]),
            "spec.configs[0].localFilename",
        ),
    ],
)
def test_malformed_messages_are_400_naming_the_field(rpc_agent, mutate, field):
    msg = mutate(start_message(new_instance_id()))
    status, reply = http_json(f"{rpc_agent.url}/apis/v1/messages", body=msg)
    assert status == 400, reply
    assert reply["error"] == "bad_message"
    assert reply["message"].startswith(f"{field}:"), reply["message"]
    assert "Traceback" not in reply["message"]
    assert_nothing_locked(rpc_agent)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"START_TASK"', b"\xff\xfe"])
def test_unparseable_bodies_are_400(rpc_agent, raw):
    status, body = post_raw(rpc_agent, raw)
    assert status == 400
    assert json.loads(body)["error"] == "bad_message"
    assert_nothing_locked(rpc_agent)


def test_enums_any_case_unknown_fields_and_nulls_accepted(rpc_agent, controller):
    iid = new_instance_id()
    msg = start_message(iid)
    msg["type"] = "start_task"
    msg["somethingNew"] = {"x": 1}
    spec = msg["spec"]
    spec["executable"]["type"] = "docker"
    del spec["executable"]["type"]
    spec["resources"][0]["type"] = "cpu"
    spec["volumes"] = None
    spec["configs"] = None
    spec["env"] = None
    spec["devices"] = None
    spec["loggingSpec"] = None
    spec["futureField"] = True
    status, reply = http_json(f"{rpc_agent.url}/apis/v1/messages", body=msg)
    assert status == 200, reply
    assert reply["status"] == "ACCEPTED"
    controller.wait_state(iid, "STOPPED")


@pytest.mark.parametrize(
    "kind",
    [
        "START_INSTANCE",
        "STOP_INSTANCE",
        "START_LOCAL_SERVICE_INSTANCE",
        "STOP_LOCAL_SERVICE_INSTANCE",
    ],
)
def test_app_and_local_service_messages_fail_as_unsupported(rpc_agent, kind):
    msg = {"type": kind, "header": {"id": "h-" + kind}, "instanceId": "AI-1", "spec": {}}
    status, reply = http_json(f"{rpc_agent.url}/apis/v1/messages", body=msg)
    assert status == 200
    assert reply["status"] == "FAILED"
    assert "not supported yet" in reply["message"]
    assert reply["header"] == {"id": "h-" + kind}


def test_read_api(rpc_agent, controller):
    iid = new_instance_id()
    http_json(f"{rpc_agent.url}/apis/v1/messages", body=start_message(iid, ["sh", "-c", "exit 0"]))
    controller.wait_state(iid, "STOPPED")
    status, tasks = http_json(f"{rpc_agent.url}/apis/v1/tasks")
    assert status == 200
    assert iid in [t["instanceId"] for t in tasks]
    status, info = http_json(f"{rpc_agent.url}/apis/v1/tasks/{iid}")
    assert status == 200
    assert info["state"] == "STOPPED"
    assert info["taskResult"] == {"status": "SUCCESSFUL", "exitCode": 0}
    status, err = http_json(f"{rpc_agent.url}/apis/v1/tasks/TI-nope")
    assert status == 404
    assert err == {
        "error": "task_not_found",
        "message": "no task with instanceId TI-nope on this executor",
    }
    assert http_json(f"{rpc_agent.url}/apis/v1/tasks", secret=None)[0] == 401

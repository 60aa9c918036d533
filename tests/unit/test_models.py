from __future__ import annotations

import pytest

from agent.errors import MessageError
from agent.models import MessageType, parse_executor_message, parse_task_spec

SPEC = {
    "taskId": "T001",
    "sourceAppName": "TEST_APP",
    "instanceId": "TI-3c5e2b8a",
    "executable": {
        "type": "DOCKER",
        "url": "ghcr.io/org/task:1.0",
        "dockerPullTimeout": "100 seconds",
    },
    "resources": [
        {"type": "CPU", "cores": {"0": [2, 3]}},
        {"type": "MEMORY", "memoryInMB": {"0": 512}},
    ],
    "volumes": [{"pathInContainer": "/data", "pathOnHost": "/mnt/data", "mode": "READ_ONLY"}],
    "configs": [
        {"type": "INLINE", "localFilename": "/files/drove.txt", "data": "RHJvdmUgVGVzdA=="}
    ],
    "loggingSpec": {"type": "LOCAL", "maxSize": "10m", "maxFiles": 3, "compress": True},
    "env": {"ITERATIONS": "3", "PASS_THROUGH_ME": ""},
    "args": ["--flag", "x"],
    "devices": [{"type": "DIRECT", "pathOnHost": "/dev/random"}],
    "userSpec": {"user": "1000", "group": "1000"},
}


def test_reference_example_parses():
    spec = parse_task_spec(SPEC)
    assert spec.instance_id == "TI-3c5e2b8a"
    assert spec.image == "ghcr.io/org/task:1.0"
    assert spec.pull_timeout.seconds == 100
    assert spec.resources.cores == {0: {2, 3}}
    assert spec.resources.memory_mb == {0: 512}
    assert spec.volumes[0].read_only
    assert spec.configs[0].data == b"Drove Test"
    assert spec.logging is not None
    assert spec.logging.max_files == 3
    assert spec.args == ("--flag", "x")
    assert spec.direct_devices[0].path_in_container == "/dev/random"
    assert spec.direct_devices[0].permissions == "rwm"
    assert (spec.user, spec.group) == ("1000", "1000")
    assert spec.executable_wire() == {
        "type": "DOCKER",
        "url": "ghcr.io/org/task:1.0",
        "dockerPullTimeout": "100 seconds",
    }


def test_default_pull_timeout_is_15_minutes():
    spec = parse_task_spec({**SPEC, "executable": {"url": "x"}})
    assert str(spec.pull_timeout) == "15 minutes"


def test_identity_ignores_key_order():
    a = parse_task_spec(SPEC)
    b = parse_task_spec(dict(reversed(list(SPEC.items()))))
    assert a.identity() == b.identity()


def test_messages():
    stop = parse_executor_message(
        {"type": "stop_task", "header": {"id": "1"}, "instanceId": "TI-1"}
    )
    assert stop.type is MessageType.STOP_TASK
    assert stop.instance_id == "TI-1"
    bl = parse_executor_message({"type": "BLACKLIST", "header": {"id": "2"}})
    assert bl.type is MessageType.BLACKLIST


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "(body): must be a JSON object, not a list"),
        ({"header": {"id": "1"}}, "type: is required"),
        ({"type": "X", "header": {"id": "1"}}, "type: 'X' is not one of"),
        ({"type": "STOP_TASK", "header": {"id": "1"}}, "instanceId: is required"),
        ({"type": "STOP_TASK", "header": {}}, "header.id: is required"),
        ({"type": "START_TASK", "header": {"id": "1"}, "spec": None}, "spec: is required"),
        (
            {"type": "START_TASK", "header": {"id": "1"}, "spec": {**SPEC, "instanceId": "a/b"}},
            "spec.instanceId: 'a/b' is not a valid instance id",
        ),
        (
            {
                "type": "START_TASK",
                "header": {"id": "1"},
                "spec": {
                    **SPEC,
                    "configs": [{"type": "INLINE", "localFilename": "/a/../etc/passwd"}],
                },
            },
            "spec.configs[0].localFilename:",
        ),
        (
            {
                "type": "START_TASK",
                "header": {"id": "1"},
                "spec": {**SPEC, "resources": [{"type": "MEMORY", "memoryInMB": {"0": 5}}]},
            },
            "spec.resources: no CPU cores are allocated",
        ),
        (
            {
                "type": "START_TASK",
                "header": {"id": "1"},
                "spec": {**SPEC, "resources": [{"type": "CPU", "cores": {"0": [1]}}]},
            },
            "spec.resources: no memory is allocated",
        ),
    ],
)
def test_bad_messages_name_the_field(body, message):
    with pytest.raises(MessageError) as info:
        parse_executor_message(body)
    assert str(info.value).startswith(message)

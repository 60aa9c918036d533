"""Tasks against the real Docker engine, reported to a stand-in controller (RPC mode)."""

from __future__ import annotations

import base64
import json
import time

import docker
import pytest

from tests.conftest import new_instance_id, start_message, stop_message
from tests.helpers import CONTROLLER_SECRET, FULL_SEQUENCE, http_json

pytestmark = pytest.mark.docker


def send(agent, body, secret=CONTROLLER_SECRET):
    return http_json(f"{agent.url}/apis/v1/messages", body=body, secret=secret)


def accepted(agent, body):
    status, reply = send(agent, body)
    assert status == 200, reply
    assert reply["status"] == "ACCEPTED", reply
    assert reply["header"] == body["header"]
    return reply


def assert_all_free(snapshot):
    """The snapshot's free cores and memory equal the layout again."""
    assert snapshot["cpus"]["freeCores"] == snapshot["layout"]["cores"]
    assert snapshot["memory"]["freeMemory"] == snapshot["layout"]["memory"]
    assert snapshot["cpus"]["usedCores"] == {}
    assert snapshot["memory"]["usedMemory"] == {}


def finished(controller, instance_id, timeout=60):
    stopped = controller.wait_state(instance_id, "STOPPED", timeout)
    assert_all_free(stopped["resourceSnapshot"])
    return stopped


@pytest.mark.parametrize(
    ("code", "result", "error"),
    [
        (0, {"status": "SUCCESSFUL", "exitCode": 0}, ""),
        (3, {"status": "FAILED", "exitCode": 3}, "Task instance exited with status: 3"),
    ],
)
def test_full_report_sequence(rpc_agent, controller, code, result, error):
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, ["sh", "-c", f"sleep 0.2; exit {code}"]))
    stopped = finished(controller, iid)
    reports = controller.reports(iid)
    assert [r["instanceInfo"]["state"] for r in reports] == FULL_SEQUENCE
    updated = [r["instanceInfo"]["updated"] for r in reports]
    assert updated == sorted(updated)
    assert len(set(updated)) == len(updated), "updated must strictly increase"
    completed = reports[3]["instanceInfo"]
    assert completed["taskResult"] == result
    assert completed["errorMessage"] == error
    assert stopped["instanceInfo"]["taskResult"] == result
    info = stopped["instanceInfo"]
    assert info["hostname"] == "127.0.0.1"
    assert info["executable"]["url"]
    assert info["resources"] == [
        {"type": "CPU", "cores": {"0": [1]}},
        {"type": "MEMORY", "memoryInMB": {"0": 64}},
    ]
    # the RUNNING report carries the lock in its snapshot
    running = reports[2]["resourceSnapshot"]
    assert running["cpus"]["usedCores"] == {"0": [1]}
    assert running["memory"]["usedMemory"] == {"0": 64}
    for r in reports:
        assert r["headers"]["Cluster-Authorization"] == "TestExecutorSecret"
        assert r["headers"]["NodeId"] == "127.0.0.1"
        assert r["header"]["senderType"] == "EXECUTOR"


def test_snapshots_flow_with_tasks(rpc_agent, controller):
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, ["sh", "-c", "sleep 1"]))
    controller.wait_state(iid, "RUNNING")

    def snapshot_with_task():
        for snap in reversed(controller.snapshots()):
            tasks = snap["nodeData"]["tasks"]
            if any(t["instanceId"] == iid for t in tasks):
                return snap
        return None

    snap = controller.wait_for(snapshot_with_task, 10, "a snapshot listing the task")
    node = snap["nodeData"]
    assert node["type"] == "EXECUTOR"
    assert node["executorState"] == "ACTIVE"
    assert node["port"] == rpc_agent.port
    assert node["state"]["executorId"]
    finished(controller, iid)


def _cgroup_script() -> str:
    # cgroup v1 (this machine) or v2 (most production hosts), chosen by what the container sees
    return (
        "if [ -f /sys/fs/cgroup/cpuset/cpuset.cpus ]; then "
        "cat /sys/fs/cgroup/cpuset/cpuset.cpus > /out/cpus; "
        "cat /sys/fs/cgroup/cpuset/cpuset.mems > /out/mems; "
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes > /out/mem; "
        "else cat /sys/fs/cgroup/cpuset.cpus.effective > /out/cpus; "
        "cat /sys/fs/cgroup/cpuset.mems.effective > /out/mems; "
        "cat /sys/fs/cgroup/memory.max > /out/mem; fi; "
        "cat /files/inline.txt > /out/inline; cat /etc/drove/local.cfg > /out/local; "
        "cat /etc/drove/fetched.cfg > /out/fetched; env > /out/env; ulimit -n > /out/nofile; "
        "touch /out/done; sleep 30"
    )


def test_pinning_limits_env_and_configs_seen_inside(rpc_agent, controller, tmp_path, docker_client):
    out = tmp_path / "out"
    out.mkdir()
    local = tmp_path / "local.cfg"
    local.write_text("from the host\n")
    controller.files["fetched.cfg"] = b"x" * 5000  # more than the reference's 22-byte cap
    iid = new_instance_id()
    msg = start_message(
        iid,
        ["sh", "-c", _cgroup_script()],
        cores={"0": [1]},
        memory={"0": 96},
        volumes=[{"pathInContainer": "/out", "pathOnHost": str(out), "mode": "READ_WRITE"}],
        configs=[
            {
                "type": "INLINE",
                "localFilename": "/files/inline.txt",
                "data": base64.b64encode(b"Drove Test").decode(),
            },
            {
                "type": "EXECUTOR_LOCAL_FILE",
                "localFilename": "/etc/drove/local.cfg",
                "filePathOnHost": str(local),
            },
            {
                "type": "EXECUTOR_HTTP_FETCH",
                "localFilename": "/etc/drove/fetched.cfg",
                "http": {
                    "protocol": "HTTP",
                    "hostname": "127.0.0.1",
                    "port": controller.port,
                    "path": "/files/fetched.cfg",
                    "username": "user",
                    "password": "pass",
                },
            },
        ],
        env={"ITERATIONS": "3", "HOST": "spoofed", "DROVE_TASK_ID": "spoofed", "PATH_THROUGH": ""},
    )
    accepted(rpc_agent, msg)
    controller.wait_state(iid, "RUNNING")
    deadline = time.monotonic() + 20
    while not (out / "done").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "done").exists()
    assert (out / "cpus").read_text().strip() == "1"
    assert (out / "mems").read_text().strip() == "0"
    assert int((out / "mem").read_text()) == 96 * 2**20
    assert (out / "inline").read_text() == "Drove Test"
    assert (out / "local").read_text() == "from the host\n"
    assert (out / "fetched").read_bytes() == b"x" * 5000
    assert (out / "nofile").read_text().strip() == "4096"
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines() if "=" in line)
    assert env["HOST"] == "127.0.0.1"
    assert env["DROVE_TASK_ID"] == msg["spec"]["taskId"]
    assert env["DROVE_INSTANCE_ID"] == iid
    assert env["DROVE_SOURCE_APP_NAME"] == "TEST_APP"
    assert env["DROVE_CONTAINER_ID"] == msg["spec"]["executable"]["url"]
    assert env["ITERATIONS"] == "3"
    assert "PATH_THROUGH" not in env

    container = docker_client.containers.get(iid)
    host = container.attrs["HostConfig"]
    assert host["CpusetCpus"] == "1"
    assert host["CpusetMems"] == "0"
    assert host["Memory"] == 96 * 2**20
    assert host["MemorySwap"] == 96 * 2**20
    assert host["LogConfig"]["Type"] == "json-file"
    assert host["LogConfig"]["Config"]["max-size"] == "10m"
    assert host["LogConfig"]["Config"]["mode"] == "non-blocking"
    labels = container.labels
    assert labels["drove.job.type"] == "COMPUTATION"
    assert labels["drove.instance.id"] == iid
    assert json.loads(labels["drove.instance.spec"])["instanceId"] == iid
    assert json.loads(labels["drove.instance.info"])["hostname"] == "127.0.0.1"

    accepted(rpc_agent, stop_message(iid))
    stopped = finished(controller, iid)
    assert stopped["instanceInfo"]["taskResult"] == {"status": "CANCELLED", "exitCode": -1}


def test_oom_kill_and_plain_exit_137_are_told_apart(rpc_agent, controller):
    oom = new_instance_id()
    plain = new_instance_id()
    accepted(rpc_agent, start_message(oom, ["sh", "-c", "tail /dev/zero"], memory={"0": 16}))
    finished(controller, oom)
    accepted(rpc_agent, start_message(plain, ["sh", "-c", "exit 137"]))
    finished(controller, plain)

    oom_done = controller.wait_state(oom, "RUN_COMPLETED")["instanceInfo"]
    assert oom_done["taskResult"] == {"status": "FAILED", "exitCode": 137}
    assert oom_done["errorMessage"] == "OOM killed (memory limit 16 MB)"
    plain_done = controller.wait_state(plain, "RUN_COMPLETED")["instanceInfo"]
    assert plain_done["taskResult"] == {"status": "FAILED", "exitCode": 137}
    assert plain_done["errorMessage"] == "Task instance exited with status: 137"


def test_external_kill_is_not_reported_as_oom(rpc_agent, controller, docker_client):
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, ["sh", "-c", "sleep 60"]))
    controller.wait_state(iid, "RUNNING")
    docker_client.containers.get(iid).kill()
    done = controller.wait_state(iid, "RUN_COMPLETED")["instanceInfo"]
    assert done["taskResult"] == {"status": "FAILED", "exitCode": 137}
    assert "OOM" not in done["errorMessage"]
    finished(controller, iid)


def test_stop_of_a_sleeping_task_is_cancelled_and_leaves_nothing(
    rpc_agent, controller, docker_client
):
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, ["sh", "-c", "sleep 300"]))
    controller.wait_state(iid, "RUNNING")
    accepted(rpc_agent, stop_message(iid))
    stopped = finished(controller, iid)
    assert stopped["instanceInfo"]["taskResult"] == {"status": "CANCELLED", "exitCode": -1}
    assert controller.states(iid) == FULL_SEQUENCE
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(iid)
    # a repeated stop is accepted
    accepted(rpc_agent, stop_message(iid))


def test_stop_right_after_start(rpc_agent, controller, docker_client):
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, ["sh", "-c", "sleep 300"]))
    accepted(rpc_agent, stop_message(iid))
    stopped = finished(controller, iid)
    states = controller.states(iid)
    assert "LOST" not in states
    assert states[-1] == "STOPPED"
    result = stopped["instanceInfo"].get("taskResult")
    assert result in (None, {"status": "CANCELLED", "exitCode": -1})
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(iid)


def test_stop_of_unknown_task_fails_clearly(rpc_agent):
    status, reply = send(rpc_agent, stop_message("TI-unknown"))
    assert status == 200
    assert reply["status"] == "FAILED"
    assert "TI-unknown" in reply["message"]


def test_pull_from_local_registry_with_credentials(rpc_agent, controller, registry, docker_client):
    image = f"{registry}/drove/busybox:1"
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, ["sh", "-c", "exit 0"], image=image))
    stopped = finished(controller, iid)
    assert stopped["instanceInfo"]["taskResult"] == {"status": "SUCCESSFUL", "exitCode": 0}
    assert docker_client.images.get(image)  # cacheImages: true keeps it
    docker_client.images.remove(image)


def test_pull_with_wrong_credentials_fails_provisioning(rpc_agent, controller, registry):
    port = registry.split(":")[1]
    image = f"localhost:{port}/drove/busybox:1"  # dockerAuth has a wrong password for this host
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, image=image))
    stopped = finished(controller, iid)
    assert controller.states(iid) == [
        "PROVISIONING",
        "PROVISIONING_FAILED",
        "DEPROVISIONING",
        "STOPPED",
    ]
    failed = controller.wait_state(iid, "PROVISIONING_FAILED")["instanceInfo"]
    assert image in failed["errorMessage"]
    assert "auth" in failed["errorMessage"].lower()
    assert "taskResult" not in stopped["instanceInfo"]
    assert stopped["instanceInfo"]["errorMessage"] == failed["errorMessage"]


def test_missing_image_fails_provisioning(rpc_agent, controller, registry):
    image = f"{registry}/drove/does-not-exist:1"
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, image=image))
    finished(controller, iid)
    failed = controller.wait_state(iid, "PROVISIONING_FAILED")["instanceInfo"]
    assert f"Error while pulling image {image}" in failed["errorMessage"]


def test_pull_that_outlives_its_timeout(rpc_agent, controller, stalling_registry):
    image = f"{stalling_registry}/slow/image:1"
    iid = new_instance_id()
    started = time.monotonic()
    accepted(rpc_agent, start_message(iid, image=image, pull_timeout="2 seconds"))
    finished(controller, iid, timeout=30)
    assert time.monotonic() - started < 15
    failed = controller.wait_state(iid, "PROVISIONING_FAILED")["instanceInfo"]
    assert failed["errorMessage"] == (
        f"Error while pulling image {image}: pull did not finish within 2 seconds"
    )


def test_start_failure_is_run_failed_and_frees_resources(rpc_agent, controller):
    iid = new_instance_id()
    accepted(rpc_agent, start_message(iid, ["/no/such/binary"]))
    stopped = finished(controller, iid)
    assert controller.states(iid) == [
        "PROVISIONING",
        "STARTING",
        "RUN_FAILED",
        "DEPROVISIONING",
        "STOPPED",
    ]
    assert stopped["instanceInfo"]["taskResult"] == {"status": "FAILED", "exitCode": -1}
    assert "/no/such/binary" in stopped["instanceInfo"]["errorMessage"]


def test_busy_core_is_refused_without_side_effects(rpc_agent, controller):
    first = new_instance_id()
    accepted(rpc_agent, start_message(first, ["sh", "-c", "sleep 30"], cores={"0": [1]}))
    controller.wait_state(first, "RUNNING")
    second = new_instance_id()
    status, reply = send(rpc_agent, start_message(second, cores={"0": [1]}))
    assert status == 200
    assert reply["status"] == "FAILED"
    assert "cores 1 on NUMA node 0 are not free" in reply["message"]
    status, _ = http_json(f"{rpc_agent.url}/apis/v1/tasks/{second}")
    assert status == 404
    accepted(rpc_agent, stop_message(first))
    finished(controller, first)

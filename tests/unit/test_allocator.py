from __future__ import annotations

import pytest

from agent.allocator import Allocator, ResourceRequest
from agent.config import OverProvisioningConfig, ResourcesConfig
from agent.errors import (
    AlreadyLocked,
    CoresUnavailable,
    InsufficientMemory,
    InvalidRequest,
    UnknownNode,
)
from agent.inventory import build_inventory, read_topology
from tests.sysfs import build_sysfs


def req(cores=None, memory=None):
    return ResourceRequest(
        cores={n: frozenset(c) for n, c in (cores or {}).items()}, memory_mb=memory or {}
    )


@pytest.fixture
def two_nodes(tmp_path):
    build_sysfs(tmp_path, {0: ([0, 1, 2, 3], 1000), 1: ([4, 5, 6, 7], 2000)})
    inv = build_inventory(read_topology(tmp_path), ResourcesConfig(os_cores=frozenset({0})))
    return Allocator(inv.layout)


def test_idle_snapshot_shape(two_nodes):
    snap = two_nodes.snapshot("exec-1")
    assert snap == {
        "executorId": "exec-1",
        "cpus": {"type": "CPU", "freeCores": {"0": [1, 2, 3], "1": [4, 5, 6, 7]}, "usedCores": {}},
        "memory": {"type": "MEMORY", "freeMemory": {"0": 1000, "1": 2000}, "usedMemory": {}},
        "layout": {"cores": {"0": [1, 2, 3], "1": [4, 5, 6, 7]}, "memory": {"0": 1000, "1": 2000}},
    }


def test_lock_and_reclaim(two_nodes):
    two_nodes.lock("TI-1", req({0: [1, 2]}, {0: 512}))
    snap = two_nodes.snapshot("e")
    assert snap["cpus"]["freeCores"] == {"0": [3], "1": [4, 5, 6, 7]}
    assert snap["cpus"]["usedCores"] == {"0": [1, 2]}
    assert snap["memory"]["freeMemory"] == {"0": 488, "1": 2000}
    assert snap["memory"]["usedMemory"] == {"0": 512}
    assert two_nodes.physical_cores("TI-1") == (1, 2)
    released = two_nodes.reclaim("TI-1")
    assert released is not None
    assert released.total_cores == 2
    assert two_nodes.is_free()
    assert two_nodes.reclaim("TI-1") is None


def test_unknown_node(two_nodes):
    with pytest.raises(UnknownNode, match="NUMA node 7 does not exist"):
        two_nodes.lock("TI-1", req({7: [1]}, {7: 1}))
    assert two_nodes.is_free()


def test_core_not_free_names_the_cores(two_nodes):
    two_nodes.lock("TI-1", req({0: [1, 2]}, {0: 10}))
    with pytest.raises(CoresUnavailable, match="cores 2 on NUMA node 0 are not free"):
        two_nodes.lock("TI-2", req({0: [2, 3]}, {0: 10}))
    # nothing of TI-2 was taken
    assert two_nodes.free_cores()[0] == {3}
    assert two_nodes.free_memory()[0] == 990


def test_reserved_core_is_not_allocatable(two_nodes):
    with pytest.raises(CoresUnavailable, match="cores 0 do not exist on NUMA node 0"):
        two_nodes.lock("TI-1", req({0: [0]}, {0: 10}))


def test_memory_above_free(two_nodes):
    two_nodes.lock("TI-1", req({1: [4]}, {1: 1500}))
    with pytest.raises(InsufficientMemory, match="600 MB requested on NUMA node 1, only 500 MB"):
        two_nodes.lock("TI-2", req({1: [5]}, {1: 600}))
    assert two_nodes.free_cores()[1] == {5, 6, 7}


def test_already_locked(two_nodes):
    two_nodes.lock("TI-1", req({0: [1]}, {0: 1}))
    with pytest.raises(AlreadyLocked, match="TI-1"):
        two_nodes.lock("TI-1", req({0: [2]}, {0: 1}))


@pytest.mark.parametrize("mb", [0, -5])
def test_non_positive_memory_is_refused(two_nodes, mb):
    with pytest.raises(InvalidRequest, match="must be positive"):
        two_nodes.lock("TI-1", req({0: [1]}, {0: mb}))
    assert two_nodes.is_free()


def test_empty_request_is_refused(two_nodes):
    with pytest.raises(InvalidRequest):
        two_nodes.lock("TI-1", req())


def test_restore_is_idempotent(two_nodes):
    two_nodes.restore("TI-1", req({0: [1]}, {0: 100}))
    two_nodes.restore("TI-1", req({0: [1]}, {0: 100}))
    assert two_nodes.free_memory()[0] == 900
    with pytest.raises(AlreadyLocked):
        two_nodes.restore("TI-1", req({0: [2]}, {0: 100}))


def test_snapshot_lists_only_locked_nodes_and_sums(two_nodes):
    two_nodes.lock("a", req({1: [4]}, {1: 100}))
    two_nodes.lock("b", req({1: [5, 6]}, {1: 200}))
    snap = two_nodes.snapshot("e")
    assert snap["cpus"]["usedCores"] == {"1": [4, 5, 6]}
    assert snap["memory"]["usedMemory"] == {"1": 300}


def test_over_provisioned_locks_map_to_physical_cores(tmp_path):
    build_sysfs(tmp_path, {0: ([0, 1], 1000), 1: ([2, 3], 1000)})
    over = OverProvisioningConfig(enabled=True, cpu_multiplier=2, memory_multiplier=2)
    inv = build_inventory(read_topology(tmp_path), ResourcesConfig(over_provisioning=over))
    alloc = Allocator(inv.layout)
    alloc.lock("TI-1", req({1: [10, 11, 13]}, {1: 1500}))
    assert alloc.physical_cores("TI-1") == (2, 3)
    snap = alloc.snapshot("e")
    # free/used are virtual ids and multiplied memory; layout stays physical
    assert snap["cpus"]["freeCores"]["1"] == [14]
    assert snap["memory"]["freeMemory"]["1"] == 500
    assert snap["layout"] == {"cores": {"0": [0, 1], "1": [2, 3]}, "memory": {"0": 1000, "1": 1000}}
    with pytest.raises(CoresUnavailable, match="cores 2 do not exist"):
        alloc.lock("TI-2", req({1: [2]}, {1: 1}))

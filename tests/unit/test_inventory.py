from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import OverProvisioningConfig, ResourcesConfig
from agent.inventory import (
    build_inventory,
    format_cpulist,
    next_prime_above,
    parse_cpulist,
    read_topology,
)
from tests.sysfs import build_sysfs


def inventory(root: Path, **resources):
    return build_inventory(read_topology(root), ResourcesConfig(**resources))


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3,8-11", {0, 1, 2, 3, 8, 9, 10, 11}),
        ("0,2,4", {0, 2, 4}),
        ("5", {5}),
        ("", set()),
        ("\n", set()),
        ("0-7:2", {0, 2, 4, 6}),
    ],
)
def test_cpulist_round_trip(text, cpus):
    assert parse_cpulist(text) == cpus
    assert parse_cpulist(format_cpulist(cpus)) == cpus


def test_cpulist_rejects_backwards_range():
    with pytest.raises(ValueError, match="backwards"):
        parse_cpulist("5-3")


def test_one_node(tmp_path):
    build_sysfs(tmp_path, {0: (range(4), 8192)})
    inv = inventory(tmp_path)
    assert [n.allocatable for n in inv.nodes] == [(0, 1, 2, 3)]
    assert inv.layout[0].memory_mb == 8192
    assert inv.to_json()["cores"] == {"0": [0, 1, 2, 3]}
    assert inv.to_json()["memory"] == {"0": 8192}


def test_two_nodes_interleaved_with_smt_siblings(tmp_path):
    # node0 = 0,2,4,6 node1 = 1,3,5,7; siblings (0,4) (2,6) (1,5) (3,7)
    build_sysfs(
        tmp_path,
        {0: ([0, 2, 4, 6], 16000), 1: ([1, 3, 5, 7], 16001)},
        siblings=[(0, 4), (2, 6), (1, 5), (3, 7)],
    )
    inv = inventory(tmp_path)
    node0, node1 = inv.nodes
    assert node0.allocatable == (0, 2, 4, 6)
    assert node1.allocatable == (1, 3, 5, 7)
    assert node0.siblings == ((0, 4), (2, 6))
    assert node1.siblings == ((1, 5), (3, 7))
    assert node0.memory_total_mb == 16000
    assert node1.memory_exposed_mb == 16001
    assert inv.to_json()["siblings"] == {"0": [[0, 4], [2, 6]], "1": [[1, 5], [3, 7]]}


def test_four_nodes_with_range_cpulists(tmp_path):
    build_sysfs(
        tmp_path,
        {
            0: ([*range(0, 4), *range(16, 20)], 1000),
            1: ([*range(4, 8), *range(20, 24)], 1000),
            2: ([*range(8, 12), *range(24, 28)], 1000),
            3: ([*range(12, 16), *range(28, 32)], 1000),
        },
    )
    assert (tmp_path / "devices/system/node/node0/cpulist").read_text() == "0-3,16-19\n"
    inv = inventory(tmp_path)
    assert len(inv.nodes) == 4
    assert inv.nodes[3].allocatable == (12, 13, 14, 15, 28, 29, 30, 31)
    assert sorted(inv.layout) == [0, 1, 2, 3]


def test_offline_cpus_are_never_allocatable(tmp_path):
    build_sysfs(tmp_path, {0: (range(4), 4096), 1: (range(4, 8), 4096)}, online=[0, 1, 2, 4, 5])
    inv = inventory(tmp_path)
    assert inv.nodes[0].allocatable == (0, 1, 2)
    assert inv.nodes[0].offline == (3,)
    assert inv.nodes[1].allocatable == (4, 5)
    assert inv.nodes[1].offline == (6, 7)
    assert inv.layout[1].cores == {4, 5}


def test_memory_only_and_cpu_only_nodes(tmp_path):
    build_sysfs(tmp_path, {0: (range(4), 0), 1: ([], 65536)})
    inv = inventory(tmp_path)
    assert inv.nodes[0].allocatable == (0, 1, 2, 3)
    assert inv.nodes[0].memory_total_mb == 0
    assert inv.nodes[1].allocatable == ()
    assert inv.nodes[1].memory_exposed_mb == 65536
    assert inv.layout[1].cores == frozenset()


def test_os_cores_and_exposed_memory(tmp_path):
    build_sysfs(tmp_path, {0: (range(4), 10000), 1: (range(4, 8), 10001)})
    inv = inventory(tmp_path, os_cores=frozenset({0, 4}), exposed_mem_percentage=60)
    assert inv.nodes[0].allocatable == (1, 2, 3)
    assert inv.nodes[0].reserved == (0,)
    assert inv.nodes[1].reserved == (4,)
    assert inv.nodes[0].memory_exposed_mb == 6000
    assert inv.nodes[1].memory_exposed_mb == 6000  # 10001 * 60 / 100 truncated
    assert inv.layout[0].physical_cores == {1, 2, 3}


def test_disable_numa_pinning_merges_nodes(tmp_path):
    build_sysfs(tmp_path, {0: ([0, 2], 1000), 1: ([1, 3], 2000)})
    inv = inventory(tmp_path, disable_numa_pinning=True)
    assert list(inv.layout) == [0]
    assert inv.layout[0].cores == {0, 1, 2, 3}
    assert inv.layout[0].memory_mb == 3000
    assert not inv.numa_pinning
    # the operator's view still shows the real nodes
    assert len(inv.nodes) == 2


def test_over_provisioning_keeps_one_virtual_map_per_node(tmp_path):
    build_sysfs(tmp_path, {0: ([0, 1], 1000), 1: ([2, 3], 1000)})
    over = OverProvisioningConfig(enabled=True, cpu_multiplier=2, memory_multiplier=3)
    inv = inventory(tmp_path, over_provisioning=over)
    # p = 3 (smallest prime above 2): core c -> (c+1)*3 + 1, (c+1)*3 + 2
    assert dict(inv.layout[0].vcore_map) == {4: 0, 5: 0, 7: 1, 8: 1}
    assert dict(inv.layout[1].vcore_map) == {10: 2, 11: 2, 13: 3, 14: 3}
    assert inv.layout[0].memory_mb == 3000
    assert inv.layout[0].physical_memory_mb == 1000
    assert inv.layout[0].physical_cores == {0, 1}


def test_over_provisioning_with_merge(tmp_path):
    build_sysfs(tmp_path, {0: ([0], 1000), 1: ([1], 1000)})
    over = OverProvisioningConfig(enabled=True, cpu_multiplier=1)
    inv = inventory(tmp_path, over_provisioning=over, disable_numa_pinning=True)
    assert dict(inv.layout[0].vcore_map) == {3: 0, 5: 1}
    assert inv.layout[0].physical_cores == {0, 1}


@pytest.mark.parametrize(("m", "p"), [(1, 2), (2, 3), (3, 5), (10, 11), (20, 23)])
def test_next_prime(m, p):
    assert next_prime_above(m) == p


def test_no_node_directory_falls_back_to_one_node(tmp_path):
    build_sysfs(tmp_path, None, all_cpus=range(3))
    topo = read_topology(tmp_path, fallback_memory_bytes=2048 * 1024 * 1024)
    assert not topo.from_sysfs
    inv = build_inventory(topo, ResourcesConfig())
    assert inv.nodes[0].allocatable == (0, 1, 2)
    assert inv.nodes[0].memory_total_mb == 2048


def test_real_host_reads():
    inv = build_inventory(read_topology(Path("/sys")), ResourcesConfig())
    assert inv.nodes
    assert sum(len(n.allocatable) for n in inv.nodes) >= 1

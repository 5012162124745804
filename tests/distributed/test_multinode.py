"""A real 2-node Ray cluster on one machine (two raylets on 127.0.0.2 and 127.0.0.3):
workers land on both nodes and training runs."""

from __future__ import annotations

import math

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from moedist.runtime.coordinator import Coordinator  # noqa: E402
from tests.distributed.test_runtime import assert_no_leftovers, cfg_for  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.2", "num_cpus": 2})
    try:
        cluster.add_node(node_ip_address="127.0.0.3", num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.2", log_to_driver=False,
                 configure_logging=False)  # fmt: skip
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_workers_span_both_nodes_and_train(two_nodes, tmp_path):
    coord = Coordinator(cfg_for("et", 4, steps=4), tmp_path / "run", strategy="SPREAD", timeout_s=120)
    try:
        infos = coord.start()
        assert {i["node"] for i in infos} == {"127.0.0.2", "127.0.0.3"}
        # ranks are ordered by node: ranks 0,1 on one node, 2,3 on the other
        by_rank = sorted(infos, key=lambda i: i["rank"])
        assert by_rank[0]["node"] == by_rank[1]["node"] != by_rank[2]["node"] == by_rank[3]["node"]
        rows = [coord.train_step() for _ in range(4)]
    finally:
        coord.shutdown()
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"] + 0.5
    assert_no_leftovers()

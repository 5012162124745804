"""Shared fixtures for tests/distributed (the helpers themselves live in tests/distributed/_mp.py)."""

from __future__ import annotations

import contextlib
import socket
import string

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from moedist.data.dataset import prepare_dataset
from tests.distributed._mp import GlooPools


@pytest.fixture(scope="module")
def gloo_pools():
    """Spawned gloo process groups on loopback, one per world size, for the module:
    ``gloo_pools.run(world, fn, *args)`` runs fn(rank, world, *args) on every rank."""
    pools = GlooPools()
    yield pools
    pools.close()


@pytest.fixture(scope="session")
def random_text(tmp_path_factory) -> str:
    """A dataset of random printable characters.

    Real text repeats itself (runs of spaces, common openings), and windows that share a
    prefix give near-equal logits whose order at the k-th cutoff can flip when weights
    differ in the last bits (after step 0, EP and one process sum gradients in different
    orders). Random text has no such near-ties, so routing must match decision for
    decision; exact ties (equal tokens at position 0) are broken by global token order.
    """
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("random-text")
    alphabet = np.array(list(string.ascii_letters + string.digits + string.punctuation + " "))
    for i in range(20):
        (src / f"doc{i:02d}.txt").write_text("".join(rng.choice(alphabet, 20_000)))
    out = src.parent / "random-text-ds"
    prepare_dataset([src], out, tokenizer="byte", val_fraction=0.1)
    return str(out)


# The GCS marks a node dead after 5 missed health checks, 3 s apart by default, so a test
# that loses a node waited about 15 s for Ray to notice. Checks 0.5 s apart find a dead
# raylet in about 2.5 s, while a live but busy one still has 5 x 3 s to answer. (Ray's own
# settings, for the test clusters; users' clusters keep Ray's defaults.)
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_timeout_ms": 3000, "health_check_failure_threshold": 5}


@contextlib.contextmanager
def ray_cluster(*more_nodes: str):
    """A Ray cluster of a head on 127.0.0.2 and a node on each of `more_nodes`, 2 CPUs each,
    free ports (no dashboard; its API server on a free port, not the fixed 8265), this
    process its driver."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.2", "num_cpus": 2,
                                                             "include_dashboard": False,
                                                             "dashboard_port": api_port,
                                                             "_system_config": FAST_NODE_DEATH})  # fmt: skip
    try:
        for ip in more_nodes:
            cluster.add_node(node_ip_address=ip, num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.2", log_to_driver=False,
                 configure_logging=False)  # fmt: skip
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def two_nodes():
    """A 2-node Ray cluster for the module (raylets on 127.0.0.2 and 127.0.0.3)."""
    with ray_cluster("127.0.0.3") as cluster:
        yield cluster

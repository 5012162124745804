"""The elastic policy on a real Ray cluster: a job started with 2 workers on one node
(127.0.0.2, 2 CPUs) and `--elastic 2:4` grows to 4 workers when a second node (127.0.0.3,
2 CPUs) joins while it runs, and its per-step losses stay those of an unscaled
single-process run."""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster

from moedist.runtime.coordinator import Coordinator
from moedist.runtime.elastic import ElasticPolicy
from moedist.training.loop import RunLoop, single_process_loop, write_config
from moedist.training.trainer import load_dataset
from tests.distributed.test_runtime import assert_no_leftovers
from tests.distributed.test_scaling import STEPS, assert_rows_match, cfg_for

JOIN_AFTER = 3  # steps done when the second node joins


@pytest.fixture
def one_node():
    """A 1-node Ray cluster (raylet on 127.0.0.2, 2 CPUs, free ports), this process its
    driver; the test adds nodes to it."""
    cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.2", "num_cpus": 2})
    try:
        ray.init(address=cluster.address, _node_ip_address="127.0.0.2", log_to_driver=False,
                 configure_logging=False)  # fmt: skip
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def wait_for_free_cpus(n: float, timeout_s: float = 30.0) -> None:
    """Until the cluster's resource view shows `n` free CPUs (a joined node's are seen a
    moment after its raylet starts)."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < n:
        assert time.monotonic() < deadline, f"{n} free CPUs never seen: {ray.available_resources()}"
        time.sleep(0.1)


def test_a_joining_node_grows_the_job_and_every_loss_stays(one_node, random_text, tmp_path):
    ref = single_process_loop(cfg_for(1, random_text), tmp_path / "one")
    ref.run()

    cfg = cfg_for(2, random_text)
    coord = Coordinator(cfg, strategy="PACK", start_timeout_s=60)
    said: list[str] = []
    try:
        coord.start()
        loop = RunLoop(cfg, tmp_path / "elastic", coord, load_dataset(cfg).tokenizer.to_spec())
        write_config(loop.run_dir, cfg)

        def join(loop: RunLoop) -> None:
            if loop.step == JOIN_AFTER:
                one_node.add_node(node_ip_address="127.0.0.3", num_cpus=2)
                wait_for_free_cpus(2)

        # every boundary looks (interval 0); the room must be seen at two looks in a row
        policy = ElasticPolicy(2, 4, interval_s=0.0, say=said.append)
        loop.on_boundary += [join, policy]
        summary = loop.run()
        nodes = {m["node"] for m in coord.members()}
    finally:
        coord.shutdown()
    # seen after steps JOIN_AFTER and JOIN_AFTER + 1: grown before the next step
    grown_at = JOIN_AFTER + 1
    assert [r["workers"] for r in loop.rows] == [2] * grown_at + [4] * (STEPS - grown_at)
    assert nodes == {"127.0.0.2", "127.0.0.3"}
    (s,) = summary["scales"]
    assert (s["step"], s["workers_before"], s["workers_after"]) == (grown_at, 2, 4)
    assert s["reason"] == "elastic: room for 4 workers (2 running, 0 idle bundles, 2 more fit), range 2:4"
    assert said[0] == f"moedist: elastic: scaling 2 -> 4 workers at step {grown_at}: {s['reason'][9:]}"
    assert summary["workers"] == 4 and cfg.workers == 4
    assert_rows_match(ref.rows, loop.rows)
    assert_no_leftovers()

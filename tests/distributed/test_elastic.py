"""The elastic policy on a real Ray cluster: a job started with 2 workers on one node
(127.0.0.2, 2 CPUs) and `--elastic 2:4` grows to 4 workers when a second node (127.0.0.3,
2 CPUs) joins while it runs, and its per-step losses stay those of an unscaled
single-process run."""

from __future__ import annotations

import contextlib
import time

import pytest
import ray

from moedist.runtime.coordinator import Coordinator, ScaleError
from moedist.runtime.elastic import ElasticPolicy
from moedist.training.loop import RunLoop, single_process_loop, write_config
from moedist.training.trainer import load_dataset
from tests.distributed.conftest import ray_cluster
from tests.distributed.test_runtime import assert_no_leftovers
from tests.distributed.test_scaling import STEPS, assert_rows_match, cfg_for

JOIN_AFTER = 3  # steps done when the second node joins


@pytest.fixture
def one_node():
    """A 1-node Ray cluster (raylet on 127.0.0.2); the test adds nodes to it."""
    with ray_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ref_rows(random_text, tmp_path_factory) -> list[dict]:
    """The unscaled single-process run both tests compare with (the same config)."""
    ref = single_process_loop(cfg_for(1, random_text), tmp_path_factory.mktemp("one"))
    ref.run()
    return ref.rows


def wait_for_free_cpus(n: float, timeout_s: float = 30.0) -> None:
    """Until the cluster's resource view shows `n` free CPUs (a joined node's are seen a
    moment after its raylet starts)."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < n:
        assert time.monotonic() < deadline, f"{n} free CPUs never seen: {ray.available_resources()}"
        time.sleep(0.1)


def until_ready(coord: Coordinator):
    """A boundary hook that holds the run until a scale-up the policy prepared (new workers
    starting while the job trains on) is ready, so that the switch comes at a known step:
    the boundary after the one that prepared it."""

    def hook(loop: RunLoop) -> None:
        deadline = time.monotonic() + 60
        with contextlib.suppress(ScaleError):  # a refusal is the policy's to handle
            while not coord.scale_ready():
                assert time.monotonic() < deadline, "the new workers never became ready"
                time.sleep(0.05)

    return hook


def test_a_joining_node_grows_the_job_and_every_loss_stays(one_node, ref_rows, random_text, tmp_path):

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
        loop.on_boundary += [join, until_ready(coord), policy]
        summary = loop.run()
        nodes = {m["node"] for m in coord.members()}
    finally:
        coord.shutdown()
    # seen after steps JOIN_AFTER and JOIN_AFTER + 1: the new workers start then, and the
    # job switches to them at the next boundary
    grown_at = JOIN_AFTER + 2
    assert [r["workers"] for r in loop.rows] == [2] * grown_at + [4] * (STEPS - grown_at)
    assert nodes == {"127.0.0.2", "127.0.0.3"}
    (s,) = summary["scales"]
    assert (s["step"], s["workers_before"], s["workers_after"]) == (grown_at, 2, 4)
    assert s["reason"] == "elastic: room for 4 workers (2 running, 0 idle bundles, 2 more fit), range 2:4"
    assert said[0] == f"moedist: elastic: scaling 2 -> 4 workers at step {grown_at - 1}: {s['reason'][9:]}"
    assert said[1].startswith(f"moedist: elastic: 2 -> 4 workers at step {grown_at} in ")
    assert s["warm_s"] > 0  # the new workers warmed up before the switch
    assert summary["workers"] == 4 and cfg.workers == 4
    assert_rows_match(ref_rows, loop.rows)
    assert_no_leftovers()


def test_after_a_lost_node_and_a_recovery_to_fewer_workers_a_new_node_grows_the_job_again(
    one_node, ref_rows, random_text, tmp_path
):
    """2 workers, a node joins: 4 (2 per node, the growth in a second placement group). The
    node is lost after step 6: the recovery goes on with 2 workers from the checkpoint at 6
    (no room for the others), while Ray keeps the lost group's bundles waiting. A new node
    joins: Ray places those idle bundles on it; the policy counts them as room, releases
    them and grows the job to 4 again. Every row still equals the single-process run's."""

    cfg = cfg_for(2, random_text)
    cfg.train.checkpoint_every = 2
    # an elastic job's recovery waits only briefly for room (moedist train --elastic: 10 s)
    coord = Coordinator(cfg, strategy="PACK", start_timeout_s=60, grace_s=2, replace_timeout_s=5)
    said: list[str] = []
    try:
        coord.start()
        loop = RunLoop(cfg, tmp_path / "elastic", coord, load_dataset(cfg).tokenizer.to_spec())
        write_config(loop.run_dir, cfg)
        joined: list = []

        def churn(loop: RunLoop) -> None:
            from ray.util.placement_group import placement_group_table

            if loop.step == JOIN_AFTER and not joined:
                joined.append(one_node.add_node(node_ip_address="127.0.0.3", num_cpus=2))
                wait_for_free_cpus(2)
            elif loop.step == 6 and len(joined) == 1 and len(coord.workers) == 4:
                one_node.remove_node(joined[0])
                joined.append(None)
            elif loop.failures and len(joined) == 2:
                joined.append(one_node.add_node(node_ip_address="127.0.0.3", num_cpus=2))
                (lost_group,) = coord.idle_groups()
                deadline = time.monotonic() + 30
                while placement_group_table(coord.pgs[lost_group])["state"] != "CREATED":  # re-placed by Ray
                    assert time.monotonic() < deadline, placement_group_table(coord.pgs[lost_group])
                    time.sleep(0.1)

        policy = ElasticPolicy(2, 4, interval_s=0.0, say=said.append)
        loop.on_boundary += [churn, until_ready(coord), policy]
        summary = loop.run()
        nodes = {m["node"] for m in coord.members()}
    finally:
        coord.shutdown()
    assert [(f["step"], f["restored_step"]) for f in summary["failures"]] == [(6, 6)]
    # grown before step 5; lost at step 6 (recovered to 2); the new node is seen after steps
    # 7 and 8 (the recovery makes the policy look afresh): new workers start, grown before step 9
    assert [r["workers"] for r in loop.rows] == [2] * 5 + [4] * 1 + [2] * 3 + [4] * 3
    scales = [(s["step"], s["workers_before"], s["workers_after"]) for s in summary["scales"]]
    assert scales == [(5, 2, 4), (9, 2, 4)]
    assert summary["scales"][1]["reason"] == ("elastic: room for 4 workers (2 running, 2 idle bundles, 0 more "
                                              "fit), range 2:4")  # fmt: skip
    assert nodes == {"127.0.0.2", "127.0.0.3"}
    assert_rows_match(ref_rows, loop.rows)
    assert_no_leftovers()

"""The elastic policy (--elastic MIN:MAX) over a fake cluster view: the pure decision
(what the job holds + what is free + range + valid counts -> target) and the hook's
hysteresis, back-off and interplay with manual scales and recoveries (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from moedist.config import ConfigError, build_config
from moedist.runtime.coordinator import valid_worker_counts
from moedist.runtime.elastic import (
    ClusterView,
    ElasticPolicy,
    bundles_that_fit,
    choose_workers,
    decide,
    parse_range,
    room,
)
from moedist.training.evaluate import EvalResult
from moedist.training.loop import RunLoop, ScaleError, write_config
from moedist.training.trainer import load_dataset

CPU1 = {"CPU": 1.0}


def cfg_with(batch_size: int = 12, n_experts: int = 8, steps: int = 100):
    return build_config("tiny", None, {"model": {"n_experts": n_experts}, "workers": 2,
                                       "train": {"batch_size": batch_size, "steps": steps, "progress": False,
                                                 "eval_every": 0, "checkpoint_every": 0}})  # fmt: skip


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize(("text", "want"), [("2:4", (2, 4)), ("1:1", (1, 1)), ("3:16", (3, 16))])
def test_parse_range(text, want):
    assert parse_range(text) == want


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("4", "expected MIN:MAX worker counts such as 2:8, got '4'"),
        ("2:4:8", "expected MIN:MAX"),
        ("a:4", "expected MIN:MAX"),
        ("2:", "expected MIN:MAX"),
        ("0:4", "MIN must be >= 1, got 0"),
        ("-1:4", "MIN must be >= 1"),
        ("4:2", "MAX must be >= MIN, got '4:2'"),
    ],
)
def test_parse_range_rejects(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_range(text)


# ------------------------------------------------------------------ room
def test_bundles_fit_per_node_not_in_the_cluster_total():
    halves = [{"CPU": 1.5}, {"CPU": 1.5}]  # 3 CPUs free, but no node has 2
    assert bundles_that_fit(halves, {"CPU": 2.0}, "PACK") == 0
    assert bundles_that_fit(halves, CPU1, "PACK") == 2
    nodes = [{"CPU": 4.0}, {"CPU": 2.0}, {"CPU": 0.5}]
    assert bundles_that_fit(nodes, CPU1, "SPREAD") == 6
    assert bundles_that_fit(nodes, CPU1, "STRICT_PACK") == 4  # all on one node
    assert bundles_that_fit(nodes, CPU1, "STRICT_SPREAD") == 2  # one per node with room
    # a GPU bundle needs both; a node without the resource holds none
    gpu = {"CPU": 1.0, "GPU": 1.0}
    assert bundles_that_fit([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0}], gpu, "PACK") == 2
    assert bundles_that_fit([], CPU1, "PACK") == 0
    # exact fractions are not lost to rounding (0.7 / 0.1 is 6.999999999999999 in floats)
    assert bundles_that_fit([{"CPU": 0.7}], {"CPU": 0.1}, "PACK") == 7


def test_room_counts_what_the_job_holds_and_what_fits():
    view = ClusterView(workers=2, idle_bundles=1, free_per_node=[{"CPU": 2.0}, {"CPU": 0.0}])
    assert room(view) == 5
    assert room(ClusterView(2, 0, [{"CPU": 4.0}], bundle={"CPU": 2.0})) == 4


# ------------------------------------------------------------------ decision
def test_decide_grows_to_the_largest_valid_count_in_range():
    valid = valid_worker_counts(cfg_with(batch_size=12), 8)  # 12 rows: 6, 4, 3, 2, 1
    assert valid == [6, 4, 3, 2, 1]
    node = [{"CPU": 2.0}]
    assert decide(ClusterView(2, 0, node), 2, 4, valid) == 4  # a 2-CPU node joined
    assert decide(ClusterView(2, 0, node), 2, 3, valid) == 3  # capped at MAX
    assert decide(ClusterView(2, 0, [{"CPU": 3.0}]), 2, 8, valid) == 4  # room 5: 5 cannot split 12 rows
    assert decide(ClusterView(2, 0, []), 2, 8, valid) == 2  # no room: stay
    assert decide(ClusterView(2, 2, []), 2, 8, valid) == 4  # the job's own idle bundles are room


def test_decide_after_a_recovery_below_min_and_after_a_manual_scale_above_max():
    valid = [6, 4, 3, 2, 1]
    # recovery went on with 1 worker; room for 2 only: MIN is 3, the recovery's count stands
    assert decide(ClusterView(1, 0, [{"CPU": 1.0}]), 3, 6, valid) == 1
    assert decide(ClusterView(1, 0, [{"CPU": 2.0}]), 3, 6, valid) == 3  # room for 3: back in range
    # a manual scale to 6 (outside 2:4): when the policy acts, it brings the job back into range
    assert decide(ClusterView(6, 0, []), 2, 4, valid) == 4
    assert choose_workers(3, 2, 4, 8, valid) == 3  # no count in range fits: unchanged


# ------------------------------------------------------------------ the hook
class FakeCluster:
    """Nodes with free CPUs; the job's workers take 1 CPU each (also the view's counter)."""

    def __init__(self, free: list[float], workers: int = 2):
        self.free = list(free)
        self.workers = workers
        self.looks = 0
        self.fail_look = False

    def view(self, ex) -> ClusterView:
        self.looks += 1
        if self.fail_look:
            raise ConnectionError("GCS unavailable")
        return ClusterView(self.workers, 0, [{"CPU": f} for f in self.free])

    def resize(self, n: int) -> None:
        """The job goes to n workers, taking CPUs from the first nodes with room or giving
        them back to the last node."""
        delta = n - self.workers
        if delta < 0:
            self.free[-1] -= delta
        for i in range(len(self.free)):
            take = min(max(delta, 0), self.free[i])
            self.free[i] -= take
            delta -= take
        self.workers = n


class FakeLoop:
    """What the hook uses of a RunLoop: step, cfg, stopped_at, scale() and scales."""

    def __init__(self, cluster: FakeCluster, steps: int = 100, refuse: int = 0):
        self.cfg = cfg_with(steps=steps)
        self.step = 5
        self.stopped_at = None
        self.ex = object()
        self.scales: list[dict] = []
        self.failures: list[dict] = []  # recoveries from lost workers
        self.cluster = cluster
        self.refuse = refuse  # refuse this many scale calls

    def scale(self, workers: int):
        if self.refuse:
            self.refuse -= 1
            raise ScaleError("could not place 2 more workers")
        self.scales.append({"step": self.step, "workers_before": self.cluster.workers, "workers_after": workers,
                            "scale_s": 0.5})  # fmt: skip
        self.cluster.resize(workers)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def policy_for(cluster: FakeCluster, lo: int = 2, hi: int = 4, **kw) -> tuple[ElasticPolicy, Clock, list[str]]:
    clock, said = Clock(), []
    return ElasticPolicy(lo, hi, interval_s=5.0, view=cluster.view, clock=clock, say=said.append, **kw), clock, said


def boundaries(policy, loop, clock, n: int, dt: float = 5.0) -> None:
    for _ in range(n):
        policy(loop)
        loop.step += 1
        clock.t += dt


def test_a_joined_node_grows_the_job_once_the_room_is_seen_twice():
    cluster = FakeCluster([0.0])  # the head's 2 CPUs hold the 2 workers
    loop = FakeLoop(cluster)
    policy, clock, said = policy_for(cluster)
    boundaries(policy, loop, clock, 3)
    assert loop.scales == []
    cluster.free.append(2.0)  # a node with 2 CPUs joins
    boundaries(policy, loop, clock, 1)
    assert loop.scales == []  # seen once: not yet
    boundaries(policy, loop, clock, 1)
    assert [(s["workers_before"], s["workers_after"]) for s in loop.scales] == [(2, 4)]
    assert loop.scales[0]["reason"] == ("elastic: room for 4 workers (2 running, 0 idle bundles, 2 more fit), "
                                        "range 2:4")  # fmt: skip
    assert said[0].startswith("moedist: elastic: scaling 2 -> 4 workers at step 9: room for 4")
    assert said[1] == "moedist: elastic: 2 -> 4 workers at step 9 in 0.5 s"
    boundaries(policy, loop, clock, 5)
    assert len(loop.scales) == 1  # the room is what it was: nothing more


def test_a_blip_seen_at_one_look_does_not_scale():
    cluster = FakeCluster([0.0])
    loop = FakeLoop(cluster)
    policy, clock, _ = policy_for(cluster)
    boundaries(policy, loop, clock, 2)
    for free in ([2.0], [0.0], [2.0], [1.0], [2.0], [0.0]):  # never the same new room twice running
        cluster.free = free
        boundaries(policy, loop, clock, 1)
    assert loop.scales == []


def test_looks_are_at_most_one_per_interval_and_none_after_the_last_step():
    cluster = FakeCluster([0.0])
    loop = FakeLoop(cluster, steps=40)
    policy, clock, _ = policy_for(cluster)
    boundaries(policy, loop, clock, 20, dt=1.0)  # 20 boundaries in 20 s: a look every 5 s
    assert cluster.looks == 4
    loop.step = 40  # the run is at its last step: nothing is left to scale for
    boundaries(policy, loop, clock, 3)
    assert cluster.looks == 4
    loop.step, loop.stopped_at = 10, 10  # stopped by ctl stop
    boundaries(policy, loop, clock, 3)
    assert cluster.looks == 4


def test_a_refused_change_is_logged_and_retried_with_back_off():
    cluster = FakeCluster([0.0, 2.0])  # room from the start: the first confirmed look grows
    loop = FakeLoop(cluster, refuse=2)
    policy, clock, said = policy_for(cluster)
    times = []
    for _ in range(40):
        before = len(said)
        policy(loop)
        if len(said) > before:
            times.append(clock.t)
        loop.step += 1
        clock.t += 1.0
    refusals = [s for s in said if "refused" in s]
    assert len(refusals) == 2 and "could not place 2 more workers" in refusals[0]
    assert refusals[0].endswith("trying again in 5 s") and refusals[1].endswith("trying again in 10 s")
    assert [(s["workers_before"], s["workers_after"]) for s in loop.scales] == [(2, 4)]
    # looks at 0 and 5 (confirmed: refused); after 5 s at 10 and 15 (refused); after 10 s at
    # 25 and 30 (done): each attempt needs its two looks again
    assert times == [5.0, 15.0, 30.0]


def test_a_manual_scale_stays_until_the_room_changes():
    cluster = FakeCluster([0.0, 2.0])
    loop = FakeLoop(cluster)
    policy, clock, _ = policy_for(cluster)
    boundaries(policy, loop, clock, 3)
    assert cluster.workers == 4
    loop.scale(workers=3)  # moedist ctl scale --workers 3: gives one CPU back, the room is unchanged
    boundaries(policy, loop, clock, 5)
    assert cluster.workers == 3 and len(loop.scales) == 2
    cluster.free.append(1.0)  # a node joins: the policy follows the cluster again (up to MAX 4)
    boundaries(policy, loop, clock, 3)
    assert cluster.workers == 4 and [s["workers_after"] for s in loop.scales] == [4, 3, 4]


def test_after_a_recovery_to_fewer_workers_the_policy_grows_when_room_reappears():
    cluster = FakeCluster([0.0, 0.0], workers=4)  # 4 workers on two full 2-CPU nodes
    loop = FakeLoop(cluster)
    policy, clock, _ = policy_for(cluster)
    boundaries(policy, loop, clock, 3)
    cluster.free, cluster.workers = [0.0], 2  # a node left; the recovery went on with 2 workers
    loop.failures.append({"step": 8})
    boundaries(policy, loop, clock, 3)
    assert loop.scales == []  # no room: the recovery's count stands
    cluster.free.append(2.0)  # a node joins again
    boundaries(policy, loop, clock, 3)
    assert [(s["workers_before"], s["workers_after"]) for s in loop.scales] == [(2, 4)]


def test_a_node_replaced_between_two_looks_still_grows_the_job_back():
    """The room before the loss and after the new node joined is the same (4): the
    recovery, not the room, tells the policy to look again."""
    cluster = FakeCluster([0.0, 0.0], workers=4)
    loop = FakeLoop(cluster)
    policy, clock, _ = policy_for(cluster)
    boundaries(policy, loop, clock, 3)
    cluster.free, cluster.workers = [0.0, 2.0], 2  # node lost, recovered to 2, a new node joined
    loop.failures.append({"step": 8})
    boundaries(policy, loop, clock, 3)
    assert [(s["workers_before"], s["workers_after"]) for s in loop.scales] == [(2, 4)]


def test_a_failed_look_is_logged_and_training_goes_on():
    cluster = FakeCluster([2.0])
    cluster.fail_look = True
    loop = FakeLoop(cluster)
    policy, clock, said = policy_for(cluster)
    boundaries(policy, loop, clock, 3)
    assert said == ["moedist: elastic: could not look at the cluster (ConnectionError: GCS unavailable); "
                    "trying again every look"]  # once, not at every failed look  # fmt: skip
    cluster.fail_look = False
    boundaries(policy, loop, clock, 2)
    assert cluster.workers == 4


# ------------------------------------------------------------------ with a real RunLoop
class ScalableExecutor:
    """A fake step executor that can change its worker count (losses do not depend on it)."""

    def __init__(self, cluster: FakeCluster):
        self.step = 0
        self.cluster = cluster

    def train_step(self):
        row = {"step": self.step, "loss": 1.0 / (1 + self.step), "tokens_per_s": 1.0, "val_loss": None,
               "workers": self.cluster.workers}  # fmt: skip
        self.step += 1
        return row

    def evaluate(self):
        return EvalResult(val_loss=1.0, tokens=1)

    def state(self):
        return {"model": {"w": torch.zeros(1)}, "optim": {}}, {}

    def load_state(self, tensors, extra, step):
        self.step = step

    def scale(self, workers=None, experts=None):
        before = self.cluster.workers
        self.cluster.resize(workers)
        return {"workers_before": before, "workers_after": workers, "experts_moved": 0}

    def info(self):
        return {"workers": self.cluster.workers}

    def param_counts(self):
        return {"total": 1, "active": 1}


def test_the_hook_in_a_run_loop_records_each_change_with_its_reason(tmp_path):
    cluster = FakeCluster([0.0])
    cfg = cfg_with(steps=12)
    write_config(tmp_path, cfg)
    ex = ScalableExecutor(cluster)
    loop = RunLoop(cfg, tmp_path, ex, load_dataset(cfg).tokenizer.to_spec())
    policy = ElasticPolicy(2, 4, interval_s=0.0, view=cluster.view, say=lambda s: None)

    def join(loop):  # a node joins after step 4
        if loop.step == 4:
            cluster.free.append(2.0)

    loop.on_boundary += [join, policy]
    summary = loop.run()
    # the room is seen after 4 and 5 steps: grown before step 5 (0-based) runs
    assert [r["workers"] for r in loop.rows] == [2] * 5 + [4] * 7
    (s,) = summary["scales"]
    assert (s["step"], s["workers_before"], s["workers_after"]) == (5, 2, 4)
    assert s["reason"].startswith("elastic: room for 4 workers")
    assert json.loads((tmp_path / "summary.json").read_text())["scales"][0]["reason"] == s["reason"]

"""A real 2-node Ray cluster on one machine (two raylets on 127.0.0.2 and 127.0.0.3):
workers land on both nodes and training runs."""

from __future__ import annotations

import math

import pytest

from moedist.runtime.coordinator import Coordinator
from tests.distributed.test_runtime import assert_no_leftovers, cfg_for


def test_workers_span_both_nodes_and_train(two_nodes, tmp_path):
    coord = Coordinator(cfg_for("et", 4, steps=4), strategy="SPREAD", start_timeout_s=120)
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


def test_etr_locality_loss_sees_which_experts_share_the_node(two_nodes, tmp_path):
    """4 workers on 2 nodes own 8 experts: half of them live on a worker's own node, so at
    initialisation (nearly uniform gates) the locality loss is about mu * log 2 per layer."""
    cfg = cfg_for("etr", 4, steps=2)
    cfg.router.locality_loss_coef = 0.1
    coord = Coordinator(cfg, strategy="SPREAD", start_timeout_s=120)
    try:
        coord.start()
        rows = [coord.train_step() for _ in range(2)]
    finally:
        coord.shutdown()
    # the model sums its routers' aux losses: 2 MoE layers
    assert rows[0]["aux_loss"] == pytest.approx(2 * 0.1 * math.log(2), rel=0.2)
    assert_no_leftovers()

"""A scale-up prepared ahead of its step boundary (what the control API does): the new
workers are placed, started and warmed up while the job trains on, and the switch to them
happens at a later boundary. Training during the preparation and the switch itself leave
every loss as in an unscaled run; a preparation that cannot be placed is dropped without a
trace, and so is one that is cancelled."""

from __future__ import annotations

import time

import pytest

from moedist.runtime.coordinator import Coordinator, ScaleError
from moedist.training.trainer import Trainer, load_dataset
from tests.distributed.test_runtime import assert_no_leftovers
from tests.distributed.test_scaling import STEPS, assert_rows_match, cfg_for


def live_pgs() -> int:
    from ray.util.placement_group import placement_group_table

    return sum(pg["state"] != "REMOVED" for pg in placement_group_table().values())


def test_workers_started_ahead_join_at_a_later_boundary_and_keep_every_loss(two_nodes, random_text):
    cfg1 = cfg_for(1, random_text)
    tr = Trainer(cfg1, load_dataset(cfg1))
    ref = [tr.train_step() for _ in range(STEPS)]

    coord = Coordinator(cfg_for(2, random_text), strategy="SPREAD", start_timeout_s=120)
    try:
        coord.start()
        rows = [coord.train_step() for _ in range(3)]
        coord.prepare_scale(4)
        assert not coord.scale_ready()  # new actors take seconds to start and warm up
        rows.append(coord.train_step())  # the job trains on meanwhile
        while len(rows) < STEPS - 3 and not coord.scale_ready():
            rows.append(coord.train_step())
        assert [r["workers"] for r in rows] == [2] * len(rows)
        grow = coord.scale(workers=4)  # waits for the new workers if they are not warm yet
        assert {i["node"] for i in coord.members()} == {"127.0.0.2", "127.0.0.3"}
        rows += [coord.train_step() for _ in range(STEPS - len(rows))]
        assert live_pgs() == 2  # the job's first group and the one of the new workers
    finally:
        coord.shutdown()
    assert (grow["workers_before"], grow["workers_after"]) == (2, 4)
    assert grow["warm_s"] > 0 and grow["prepared_s"] >= 0
    n2 = sum(r["workers"] == 2 for r in rows)
    assert 4 <= n2 <= STEPS - 3 and [r["workers"] for r in rows] == [2] * n2 + [4] * (STEPS - n2)
    assert_rows_match(ref, rows)
    assert_no_leftovers()


def test_a_preparation_that_cannot_be_placed_or_is_cancelled_leaves_nothing(two_nodes, random_text):
    cfg1 = cfg_for(1, random_text, router="tc")
    tr = Trainer(cfg1, load_dataset(cfg1))
    ref = [tr.train_step() for _ in range(6)]

    coord = Coordinator(cfg_for(2, random_text, router="tc"), strategy="SPREAD", start_timeout_s=120)
    try:
        coord.start()
        rows = [coord.train_step()]
        coord.start_timeout_s = 2  # 6 workers x 1 CPU on a 4-CPU cluster: never placed
        coord.prepare_scale(6)
        rows.append(coord.train_step())
        deadline = time.monotonic() + 60
        with pytest.raises(ScaleError, match=r"could not place 4 more workers.*goes on with 2 workers"):
            while not coord.scale_ready() and time.monotonic() < deadline:
                time.sleep(0.1)
        assert coord.scale_ready() and live_pgs() == 1  # dropped: nothing prepared any more
        coord.start_timeout_s = 120
        coord.prepare_scale(4)
        rows.append(coord.train_step())
        coord.cancel_scale()
        assert live_pgs() == 1 and coord.scale_ready()
        with pytest.raises(ScaleError, match="cannot run on 5 workers"):  # checked at once, nothing started
            coord.prepare_scale(5)
        rows += [coord.train_step() for _ in range(6 - len(rows))]
        assert [r["workers"] for r in rows] == [2] * 6
    finally:
        coord.shutdown()
    assert_rows_match(ref, rows[:6])
    assert_no_leftovers()

"""CollectiveCounter's per-call record and split_wait (waiting for other ranks vs the rest)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from moedist.parallel.counting import CollectiveCounter, split_wait


def test_split_wait_counts_the_least_time_per_call_as_cost_and_the_rest_as_waiting():
    # rank 0 arrives early at the all-reduce (waits 0.8 s), rank 1 early at the all-to-all
    rank0 = [("all_reduce @ a.py:f", 1.0), ("all_to_all_single @ b.py:g", 0.5)]
    rank1 = [("all_reduce @ a.py:f", 0.2), ("all_to_all_single @ b.py:g", 0.9)]
    got = split_wait([rank0, rank1])
    assert got["cost_s"] == pytest.approx(0.2 + 0.5)
    assert got["wait_s"] == pytest.approx([0.8, 0.4])
    assert got["total_s"] == pytest.approx([1.5, 1.1])
    assert got["cost_by_site"] == pytest.approx({"all_reduce @ a.py:f": 0.2, "all_to_all_single @ b.py:g": 0.5})
    assert got["calls_by_site"] == {"all_reduce @ a.py:f": 1, "all_to_all_single @ b.py:g": 1}
    # each rank's total is its cost plus its waiting
    assert all(t == pytest.approx(got["cost_s"] + w) for t, w in zip(got["total_s"], got["wait_s"], strict=True))


def test_split_wait_refuses_call_sequences_that_do_not_match():
    a = [("all_reduce @ a.py:f", 1.0)]
    assert split_wait([a, [("all_gather @ a.py:f", 1.0)]]) is None
    assert split_wait([a, a + a]) is None
    assert split_wait([]) is None
    assert split_wait([[], []]) == {"cost_s": 0, "wait_s": [0, 0], "total_s": [0, 0], "cost_by_site": {},
                                    "calls_by_site": {}}  # fmt: skip


def test_counter_records_every_call_in_order(monkeypatch):
    made = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: made.append("all_reduce"))
    monkeypatch.setattr(dist, "all_gather", lambda *a, **k: made.append("all_gather"))
    with CollectiveCounter() as cc:
        dist.all_reduce(None)
        dist.all_gather(None, None)
        dist.all_reduce(None)
    assert made == ["all_reduce", "all_gather", "all_reduce"]
    assert [site.split(" @ ")[0] for site, _ in cc.calls] == made
    assert all(site.endswith("test_counting.py:test_counter_records_every_call_in_order") for site, _ in cc.calls)
    assert all(s >= 0 for _, s in cc.calls) and cc.total == 3
    cc.reset()
    assert cc.calls == []

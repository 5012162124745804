"""Live scaling of the worker group on a 2-node Ray cluster (raylets on 127.0.0.2 and
127.0.0.3): the batch is global, so changing the worker count mid-run changes where the
experts live and how fast a step is, never the losses."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from moedist.config import build_config
from moedist.parallel.shards import dense_state
from moedist.runtime.coordinator import Coordinator, ScaleError
from moedist.runtime.worker import _tensors
from moedist.training.loop import TIMING_KEYS
from moedist.training.profile import PROFILE_KEYS
from moedist.training.trainer import Trainer, load_dataset
from tests.distributed.test_runtime import SMALL, assert_no_leftovers

STEPS = 12
# Columns that measure time or say how many workers ran, not what was computed.
# (The step profile's spans, bytes and collectives: one process exchanges nothing.)
NOT_COMPARED = set(TIMING_KEYS) | {"tokens_per_s", "workers", "step_s"} | PROFILE_KEYS


def cfg_for(workers: int, data: str, router: str = "et"):
    over = json.loads(json.dumps(SMALL))
    over["data"] = {"path": data}
    over["router"]["kind"] = router
    over["train"].update(steps=STEPS, batch_size=12)  # divisible by 1, 2, 3 and 4 workers
    over["workers"] = workers
    return build_config("tiny", None, over)


def assert_rows_match(ref: list[dict], rows: list[dict]) -> None:
    """Every computed column: decisions (loads) exactly, floats to 1e-4 (gradients are summed
    in another order on another number of workers, so the last bits differ)."""
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for a, b in zip(ref, rows, strict=True):
        assert set(b) - NOT_COMPARED == set(a) - NOT_COMPARED, a["step"]
        for k in sorted(set(a) - NOT_COMPARED):
            if k.endswith("_load") or (isinstance(a[k], list) and all(isinstance(x, int) for x in a[k])):
                assert a[k] == b[k], (a["step"], k)
            elif isinstance(a[k], (list, float)):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (a["step"], k)
            else:
                assert a[k] == b[k], (a["step"], k)


def live_pgs() -> int:
    from ray.util.placement_group import placement_group_table

    return sum(pg["state"] != "REMOVED" for pg in placement_group_table().values())


def test_scaling_2_to_4_to_3_workers_keeps_every_loss(two_nodes, random_text):
    cfg1 = cfg_for(1, random_text)
    tr = Trainer(cfg1, load_dataset(cfg1))
    ref = [tr.train_step() for _ in range(STEPS)]

    coord = Coordinator(cfg_for(2, random_text), strategy="SPREAD", start_timeout_s=120)
    try:
        coord.start()
        rows = [coord.train_step() for _ in range(2)]
        # the new workers start and warm up while the job trains on (what `ctl scale` does)
        coord.prepare_scale(4)
        assert not coord.scale_ready()  # actors take seconds to start and warm up
        rows += [coord.train_step() for _ in range(2)]
        assert live_pgs() == 2  # the job's group and the new workers'
        grow = coord.scale(workers=4)  # waits for them if they are not warm yet
        assert {i["node"] for i in coord.members()} == {"127.0.0.2", "127.0.0.3"}
        # experts 0-3 | 4-7  ->  0,1 | 4,5 | 2,3 | 6,7: the new ranks take 2 experts each
        assert coord.placement.owner_E == [0, 0, 2, 2, 1, 1, 3, 3]
        rows += [coord.train_step() for _ in range(4)]
        shrink = coord.scale(workers=3)
        # the leaving rank 3's experts 6, 7 go to ranks 0 and 1: 0,1,6 | 4,5,7 | 2,3
        assert coord.placement.owner_E == [0, 0, 2, 2, 1, 1, 0, 1]
        same = coord.scale(workers=3)
        rows += [coord.train_step() for _ in range(4)]
    finally:
        coord.shutdown()
    # the fewest moves: contiguous blocks would move 6 (2 -> 4) and 5 (4 -> 3)
    assert (grow["workers_before"], grow["workers_after"], grow["experts_moved"]) == (2, 4, 4)
    assert grow["warm_s"] > 0 and grow["prepared_s"] >= 0
    assert (shrink["workers_before"], shrink["workers_after"], shrink["experts_moved"]) == (4, 3, 2)
    assert same == {"workers_before": 3, "workers_after": 3, "experts_moved": 0}
    assert 0 < shrink["bytes_moved"] < grow["bytes_moved"]  # 2 experts vs 4 experts + 2 dense replicas
    assert [r["workers"] for r in rows] == [2] * 4 + [4] * 4 + [3] * 4
    assert_rows_match(ref, rows)
    assert_no_leftovers()


def test_a_count_that_cannot_be_placed_or_run_is_refused_and_the_job_goes_on(two_nodes, random_text):
    cfg1 = cfg_for(1, random_text, router="tc")
    tr = Trainer(cfg1, load_dataset(cfg1))
    ref = [tr.train_step() for _ in range(4)]

    coord = Coordinator(cfg_for(2, random_text, router="tc"), strategy="SPREAD", start_timeout_s=120)
    try:
        coord.start()
        rows = [coord.train_step() for _ in range(2)]
        coord.start_timeout_s = 3  # 6 workers x 1 CPU on a 4-CPU cluster: never placed
        with pytest.raises(ScaleError, match=r"could not place 4 more workers.*goes on with 2 workers"):
            coord.scale(workers=6)
        with pytest.raises(ScaleError, match="cannot run on 5 workers"):  # 12 rows do not split in 5
            coord.scale(workers=5)
        with pytest.raises(ScaleError, match="cannot run on 0 workers"):
            coord.scale(workers=0)
        assert live_pgs() == 1  # nothing of the refused growth is left
        rows.append(coord.train_step())
        # prepared ahead: the same refusal comes from scale_ready (never waiting) once the
        # start timeout has passed; a cancelled preparation leaves nothing either
        coord.start_timeout_s = 2
        coord.prepare_scale(6)
        with pytest.raises(ScaleError, match=r"could not place 4 more workers.*goes on with 2 workers"):
            deadline = time.monotonic() + 60
            while not coord.scale_ready() and time.monotonic() < deadline:
                time.sleep(0.1)
        assert coord.scale_ready() and live_pgs() == 1
        coord.start_timeout_s = 120
        coord.prepare_scale(4)
        rows.append(coord.train_step())
        coord.cancel_scale()
        assert coord.scale_ready() and live_pgs() == 1
        with pytest.raises(ScaleError, match="cannot run on 5 workers"):  # checked at once, nothing started
            coord.prepare_scale(5)
        assert len(coord.members()) == 2
    finally:
        coord.shutdown()
    assert_rows_match(ref, rows)
    assert_no_leftovers()


def test_resizing_experts_of_a_running_job_equals_resizing_one_process(two_nodes, random_text):
    """ET, 2 workers: 8 -> 11 experts (split, uneven blocks of 6 and 5) after step 3, then
    11 -> 9 (drop) after step 6: every row equals the single-process run resized at the
    same steps, with the same symmetry-breaking noise."""
    cfg1 = cfg_for(1, random_text)
    tr = Trainer(cfg1, load_dataset(cfg1))
    ref = [tr.train_step() for _ in range(3)]
    one_split = tr.scale(experts=11, noise=0.01)
    ref += [tr.train_step() for _ in range(3)]
    one_drop = tr.scale(experts=9)
    ref += [tr.train_step() for _ in range(3)]

    coord = Coordinator(cfg_for(2, random_text), strategy="SPREAD", start_timeout_s=120)
    try:
        coord.start()
        rows = [coord.train_step() for _ in range(3)]
        split = coord.scale(experts=11, noise=0.01)
        assert [len(coord.placement.local_experts(r)) for r in range(2)] == [6, 5]
        after_split, _ = coord.state()
        layout = coord._expert_layout()
        rows += [coord.train_step() for _ in range(3)]
        drop = coord.scale(experts=9)
        rows += [coord.train_step() for _ in range(3)]
        tensors, _ = coord.state()
    finally:
        coord.shutdown()
    assert split["layers"] == one_split["layers"] and drop["layers"] == one_drop["layers"]
    assert [len(r["L1_load"]) for r in rows] == [8] * 3 + [11] * 3 + [9] * 3
    assert_rows_match(ref, rows)
    # the checkpointable whole model has the new shape
    assert tensors["model"]["blocks.1.ffn.experts.w1_EDF"].shape[0] == 9
    whole = sum(t.nbytes for t in _tensors(tensors["model"], tensors["optim"]))
    assert drop["state_bytes_after"] == whole and split["state_bytes_after"] == drop["state_bytes_before"]
    assert split["state_bytes_before"] < split["state_bytes_after"]  # 8 -> 11 experts
    # bytes moved: the whole old state gathered once (rank 1 sends its expert rows only),
    # then each of the 2 workers fetches the dense part and its own expert rows
    for r, state in ((split, after_split), (drop, tensors)):
        dense = sum(t.nbytes for t in _tensors(*dense_state(state["model"], state["optim"], *layout)))
        assert r["state_bytes_after"] == sum(t.nbytes for t in _tensors(state["model"], state["optim"]))
        assert r["bytes_gathered"] == r["state_bytes_before"]
        assert r["bytes_loaded"] == r["state_bytes_after"] + dense  # dense twice, every expert row once
        assert r["bytes_moved"] == r["bytes_gathered"] + r["bytes_loaded"]
        assert r["bytes_moved"] < r["state_bytes_before"] + 2 * r["state_bytes_after"]  # the old gather-and-broadcast
    assert_no_leftovers()


def test_rebalanced_placements_resize_checkpoint_and_resume_like_one_process(two_nodes, random_text):
    """ET: 2 workers, grow to 4 (non-contiguous table), resize 8 -> 10 experts on it (the
    gather merges by that table), shrink to 3 workers (non-contiguous again). Every row
    equals the single-process run resized at the same step; the checkpoint (single-process
    layout) equals its state; restoring it on the workers gives it back bit for bit; a
    single process that resumes from it evaluates and steps like the workers."""
    cfg1 = cfg_for(1, random_text)
    tr = Trainer(cfg1, load_dataset(cfg1))
    ref = [tr.train_step() for _ in range(4)]
    tr.scale(experts=10, noise=0.01)
    ref += [tr.train_step() for _ in range(4)]
    ref_tensors = copy.deepcopy(tr.state()[0])  # state_dict() holds the live tensors
    ref_eval = tr.evaluate()
    ref.append(tr.train_step())

    coord = Coordinator(cfg_for(2, random_text), strategy="SPREAD", start_timeout_s=120)
    try:
        coord.start()
        rows = [coord.train_step() for _ in range(2)]
        coord.scale(workers=4)
        assert coord.placement.owner_E == [0, 0, 2, 2, 1, 1, 3, 3]
        rows += [coord.train_step() for _ in range(2)]
        coord.scale(experts=10, noise=0.01)
        assert coord.placement.owner_E == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # blocks of the new count
        rows += [coord.train_step() for _ in range(2)]
        shrink = coord.scale(workers=3)
        assert coord.placement.owner_E == [0, 0, 0, 1, 1, 1, 2, 2, 0, 2] and shrink["experts_moved"] == 2
        rows += [coord.train_step() for _ in range(2)]
        tensors, extra = coord.state()
        coord.load_state(tensors, extra, coord.step)  # a restore on the same non-contiguous table
        again, _ = coord.state()
        ev = coord.evaluate()
        rows.append(coord.train_step())
    finally:
        coord.shutdown()
    assert_rows_match(ref, rows)
    for part in ("model", "optim"):
        assert _equal(again[part], tensors[part]), part
    ref_m, got_m = ref_tensors["model"], tensors["model"]
    assert got_m.keys() == ref_m.keys() and got_m["blocks.1.ffn.experts.w1_EDF"].shape[0] == 10
    for k in ref_m:
        torch.testing.assert_close(got_m[k], ref_m[k], rtol=1e-4, atol=1e-6, msg=k)
    # a single process resumes from the workers' checkpoint
    cfg10 = cfg_for(1, random_text)
    cfg10.model.n_experts = 10
    tr2 = Trainer(cfg10, load_dataset(cfg10))
    tr2.load_state(tensors, extra, 8)
    ev2 = tr2.evaluate()
    assert ev2.val_loss == pytest.approx(ev.val_loss, rel=1e-6) and ev.val_loss == pytest.approx(ref_eval.val_loss,
                                                                                                 rel=1e-4)
    assert_rows_match(ref[-1:], [tr2.train_step()])
    assert_no_leftovers()


def _equal(a, b) -> bool:
    """Bit-for-bit equality of nested dicts/lists of tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b

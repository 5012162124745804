"""The run loop's schedule and recovery, over a fake step executor (no model, no Ray)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from moedist.config import build_config
from moedist.training.checkpoint import list_checkpoints, load_checkpoint
from moedist.training.evaluate import EvalResult
from moedist.training.loop import RunLoop, TooManyFailuresError, WorkerLostError, write_config
from moedist.training.trainer import load_dataset


class FakeExecutor:
    """Steps whose 'loss' is a pure function of the step and of the state it started from,
    so a restore that loses or corrupts state shows in the rows."""

    def __init__(self, fail_at=(), eval_fails=False):
        self.step = 0
        self.w = 0.0  # the 'model': the sum of the losses so far
        self.fail_at = set(fail_at)
        self.eval_fails = eval_fails
        self.calls: list[str] = []
        self.recoveries = 0

    def train_step(self):
        if self.step in self.fail_at:
            self.fail_at.discard(self.step)
            raise WorkerLostError(f"worker lost in step {self.step}")
        loss = 1.0 / (1 + self.step) + 1e-3 * self.w
        self.w += loss
        row = {"step": self.step, "loss": loss, "tokens_per_s": 1.0, "val_loss": None, "L1_load": [self.step, 1]}
        self.step += 1
        self.calls.append(f"step{row['step']}")
        return row

    def evaluate(self):
        self.calls.append(f"eval@{self.step}")
        if self.eval_fails:
            raise RuntimeError("evaluation failed")
        return EvalResult(val_loss=2.0 + self.step, tokens=10)

    def state(self):
        self.calls.append(f"save@{self.step}")
        return {"model": {"w": torch.tensor([self.w], dtype=torch.float64)}, "optim": {}}, {"extra": 1}

    def load_state(self, tensors, extra, step):
        assert extra["extra"] == 1
        self.w = float(tensors["model"]["w"][0])
        self.step = step

    def recover(self, err):
        self.recoveries += 1
        self.w, self.step = float("nan"), -1  # whatever was in memory is gone
        return {"probe_s": 0.0, "actor_start_s": 0.0, "group_s": 0.0}

    def info(self):
        return {"workers": 1}

    def param_counts(self):
        return {"total": 1, "active": 1}


def make(tmp_path, ex, steps=10, eval_every=4, ckpt_every=3, max_failures=3):
    cfg = build_config("tiny", None, {"train": {"steps": steps, "eval_every": eval_every, "progress": False,
                                                "checkpoint_every": ckpt_every, "keep_checkpoints": 10}})  # fmt: skip
    write_config(tmp_path, cfg)
    return RunLoop(cfg, tmp_path, ex, load_dataset(cfg).tokenizer.to_spec(), max_failures=max_failures)


def test_schedule_saves_each_step_once_and_before_the_final_evaluation(tmp_path):
    ex = FakeExecutor()
    summary = make(tmp_path, ex).run()
    # eval at 4 and 8 (not at 10: the final one), checkpoints at 3, 6, 9 and 10; the final
    # checkpoint is written before the final evaluation
    saves = [c for c in ex.calls if c.startswith(("save", "eval"))]
    assert saves == ["save@3", "eval@4", "save@6", "eval@8", "save@9", "save@10", "eval@10"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6, 9, 10]
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    assert [r["val_loss"] for r in rows] == [None, None, None, 6.0, None, None, None, 10.0, None, 12.0]
    assert summary["final_val_loss"] == 12.0 and summary["steps"] == 10 and summary["failures"] == []


def test_no_double_save_when_the_last_step_is_a_checkpoint_step(tmp_path):
    ex = FakeExecutor()
    make(tmp_path, ex, steps=9, eval_every=0, ckpt_every=3).run()
    assert [c for c in ex.calls if c.startswith("save")] == ["save@3", "save@6", "save@9"]


def test_a_failed_final_evaluation_loses_no_training(tmp_path):
    ex = FakeExecutor(eval_fails=True)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        make(tmp_path, ex, steps=7, eval_every=0, ckpt_every=0).run()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [7]
    assert len(pq.read_table(tmp_path / "metrics.parquet")) == 7


def test_recovery_replays_from_the_newest_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    straight = FakeExecutor()
    make(tmp_path / "a", straight).run()
    ex = FakeExecutor(fail_at={5, 8})
    summary = make(tmp_path / "b", ex).run()
    a = pq.read_table(tmp_path / "a" / "metrics.parquet").to_pylist()
    b = pq.read_table(tmp_path / "b" / "metrics.parquet").to_pylist()
    assert a == b  # one row per step, replayed rows replace the lost ones, same values
    assert ex.recoveries == 2
    # step 5 failed -> back to the checkpoint at 3; step 8 failed -> back to 6
    assert [(f["step"], f["restored_step"]) for f in summary["failures"]] == [(5, 3), (8, 6)]
    assert all(f["recovery_s"] is not None and f["load_s"] >= 0 for f in summary["failures"])
    objs, _ = load_checkpoint(list_checkpoints(tmp_path / "b")[-1][1], ["model"])
    assert float(objs["model"]["w"][0]) == pytest.approx(straight.w, rel=0, abs=0)


def test_recovery_before_any_checkpoint_starts_from_step_zero(tmp_path):
    ex_ref = FakeExecutor()
    make(tmp_path / "a", ex_ref, ckpt_every=5).run()

    class Fresh(FakeExecutor):
        def recover(self, err):  # re-formed workers hold the seed's initial model
            super().recover(err)
            self.w, self.step = 0.0, 0
            return {}

    fresh = Fresh(fail_at={2})
    summary = make(tmp_path / "b", fresh, ckpt_every=5).run()
    assert summary["failures"][0]["restored_step"] == 0
    assert pq.read_table(tmp_path / "a" / "metrics.parquet").to_pylist() == \
        pq.read_table(tmp_path / "b" / "metrics.parquet").to_pylist()  # fmt: skip


def test_more_failures_than_allowed_stop_with_a_report_and_keep_the_checkpoint(tmp_path):
    ex = FakeExecutor(fail_at={4, 5})
    loop = make(tmp_path, ex, max_failures=1)
    with pytest.raises(TooManyFailuresError, match=r"2 worker failures, more than --max-failures 1") as info:
        loop.run()
    msg = str(info.value)
    assert "#1 at step 4" in msg and "#2 at step 5" in msg and "step_000003" in msg
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    # what was trained is written out
    # replayed 3 and 4 after the first failure, then lost step 5
    assert [r["step"] for r in pq.read_table(tmp_path / "metrics.parquet").to_pylist()] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "summary.json").exists()


def test_summary_is_valid_json_when_a_step_was_skipped(tmp_path):
    class Skipping(FakeExecutor):
        def train_step(self):
            row = super().train_step()
            if row["step"] == 9:
                row["loss"], row["skipped"] = float("nan"), True
            return row

    make(tmp_path, Skipping(), steps=10, eval_every=0).run()
    summary = json.loads((tmp_path / "summary.json").read_text())  # NaN is not JSON
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    # the tail (10% of 9 kept steps = the last kept one) leaves the skipped step out
    assert summary["skipped_steps"] == 1 and summary["final_train_loss"] == rows[8]["loss"]


# ------------------------------------------------------------- train.keep_heap

HEAP_PROBE = """
import resource
from moedist.training.heap import keep_heap, keep_heap_status

def faults() -> int:
    # minor page faults of allocating and filling (malloc + memset) a 64 MB buffer, after
    # two warm-ups; no torch: its CPU allocator takes big buffers from malloc the same way
    for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        bytearray(64 << 20)
        n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return n

before, status0 = faults(), keep_heap_status()
status = keep_heap()
print(before, faults(), status0, status, keep_heap())
"""


def test_keep_heap_keeps_big_buffers_mapped():
    """Without keep_heap every 64 MB buffer is faulted in afresh (16384 pages of 4 KB);
    with it (once per process) the same buffer comes back from the heap, already mapped."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True).stdout
    before, after, status0, status, again = out.split()
    assert (status0, status, again) == ("off", "on", "on")
    assert int(before) > 8000 and int(after) < 1000, (before, after)


def test_keep_heap_is_a_noted_no_op_without_glibc(monkeypatch):
    from moedist.training import heap

    monkeypatch.setattr(heap, "_status", None)
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("", ""))
    assert heap.keep_heap().startswith("unavailable: not glibc")
    assert heap.keep_heap_status() == heap.keep_heap()

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
from moedist.training.sinks import MetricSinks
from moedist.training.trainer import load_dataset
from tests.sink_helpers import wandb_runs


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


def test_wandb_offline_run_holds_every_row_once_across_a_recovery_and_a_resume(tmp_path):
    """profile.log = wandb, offline: a lost worker at step 5 (replayed from the checkpoint
    at 3), then a resume to 12 steps: one W&B run id for the folder (a second offline run
    directory for the resumed job), every step logged once, each scalar equal to
    metrics.parquet (val_loss where evaluated, the final one included); lists not logged."""
    pytest.importorskip("wandb")

    def run(steps, resume=False, fail_at=()):
        cfg = build_config("tiny", None, {"train": {"steps": steps, "eval_every": 4, "progress": False,
                                                    "checkpoint_every": 3}, "profile": {"log": "wandb"}})  # fmt: skip
        if not resume:
            write_config(tmp_path, cfg)
        loop = RunLoop(cfg, tmp_path, FakeExecutor(fail_at=fail_at), load_dataset(cfg).tokenizer.to_spec())
        if resume:
            loop.restore()
        return loop.run()

    assert run(8, fail_at={5})["failures"][0]["restored_step"] == 3
    first = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    run(12, resume=True)
    # the resumed rows come from the checkpoint at 8, written before the final evaluation
    # of step 7: W&B keeps that val_loss, as the first run's metrics.parquet did
    rows = first + pq.read_table(tmp_path / "metrics.parquet").to_pylist()[8:]
    runs = wandb_runs(tmp_path)
    run_id = (tmp_path / "wandb" / "moedist_run_id").read_text().strip()
    assert [r[0] for r in runs] == [run_id, run_id]
    history = [h for _, hs in runs for h in hs]
    assert [h["_step"] for h in history] == list(range(12)) == [r["step"] for r in rows]
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [3, 7, 11]
    for h, r in zip(history, rows, strict=True):
        want = {"train/loss": r["loss"], "train/tokens_per_s": r["tokens_per_s"]}
        if r["val_loss"] is not None:
            want["train/val_loss"] = r["val_loss"]
        assert {k: v for k, v in h.items() if not k.startswith("_")} == want, r["step"]


class RecordingSink:
    """A metric sink that records what the run loop asks of it."""

    def __init__(self):
        self.calls: list[tuple] = []

    def write(self, row):
        self.calls.append(("row", row["step"], row["val_loss"] is not None))

    def write_value(self, step, column, value):
        self.calls.append((column, step))

    def rewind(self, step):
        self.calls.append(("rewind", step))

    def close(self):
        self.calls.append(("close",))


@pytest.mark.parametrize("how", ["finish", "stop", "error", "recovery"])
def test_the_loop_feeds_its_sinks_every_row_and_closes_them_on_every_way_out(tmp_path, monkeypatch, how):
    """Rows as they come (evaluated ones with their val_loss), the final evaluation's
    val_loss, a rewind to the checkpoint a recovery replays from, and one close: at the
    end, after a stop at a step boundary, after an error, after a recovery."""
    sink = RecordingSink()
    monkeypatch.setattr(MetricSinks, "open", classmethod(lambda cls, cfg, run_dir, step: cls([sink])))
    monkeypatch.setattr("moedist.training.plots.write_plots", lambda *a: None)  # not what is tested; slow
    ex = FakeExecutor(fail_at={5} if how == "recovery" else (), eval_fails=how == "error")
    loop = make(tmp_path, ex, steps=6, eval_every=4 if how != "error" else 0, ckpt_every=3)
    if how == "stop":
        loop.on_boundary.append(lambda lp: lp.request_stop() if lp.step == 3 else None)
    if how == "error":
        with pytest.raises(RuntimeError, match="evaluation failed"):
            loop.run()
    else:
        loop.run()
    rows = {"finish": [0, 1, 2, 3, 4, 5], "stop": [0, 1, 2], "error": [0, 1, 2, 3, 4, 5],
            "recovery": [0, 1, 2, 3, 4, 3, 4, 5]}[how]  # fmt: skip
    want = [("row", s, s == 3 and how != "error") for s in rows]
    if how == "recovery":
        want.insert(5, ("rewind", 3))
    if how != "error":
        want.append(("val_loss", rows[-1]))
    assert sink.calls == [*want, ("close",)]


# ----------------------------------------------------------------------------- the step profile
def test_clock_spans_are_self_times_and_collectives_go_to_the_innermost_span(monkeypatch):
    """Nested blocks: each kind gets its wall time less the blocks inside it, a collective
    is counted on the innermost open block, events are the blocks' whole intervals; a
    block measured through autograd (clock.traced) is timed in the backward pass too."""
    from moedist.parallel import clock as clock_mod

    now = [0.0]
    monkeypatch.setattr(clock_mod.time, "perf_counter", lambda: now[0])
    clock = clock_mod.CommClock(spans=True)
    clock.begin_step(tracing=True)
    with clock.measure("dense_fwd"):
        now[0] = 2.0
        with clock.measure("dispatch"):
            clock_mod.note_collective(100)
            clock_mod.note_collective(20)
            now[0] = 5.0
        with clock.span("expert"):
            now[0] = 9.0
        now[0] = 10.0
    clock_mod.note_collective(7)  # outside any block: not counted

    def fn(x):  # its backward takes 0.5 s
        y = x * 2
        y.register_hook(lambda g: now.__setitem__(0, now[0] + 0.5))
        return y

    x = torch.ones(3, requires_grad=True)
    y = clock.traced("expert", fn, x)  # forward: 0 s
    now[0] = 11.0
    with clock.measure("dense_bwd"):
        y.sum().backward()  # the expert block opens at 11.0 and closes at 11.5
        now[0] = 13.0
    assert clock.take() == {"dense_fwd": 3.0, "dispatch": 3.0, "expert": 4.5, "dense_bwd": 1.5}
    assert clock.take_counts() == ({"dense_fwd": 0, "dispatch": 2, "expert": 0, "dense_bwd": 0},
                                   {"dense_fwd": 0, "dispatch": 120, "expert": 0, "dense_bwd": 0})  # fmt: skip
    ev = {(k, a, b) for k, a, b, _, _ in clock.take_events()}
    assert {("dense_fwd", 0.0, 10.0), ("dispatch", 2.0, 5.0), ("expert", 5.0, 9.0), ("expert", 11.0, 11.5),
            ("dense_bwd", 11.0, 13.0)} <= ev
    assert not clock_mod._OPEN and torch.equal(x.grad, torch.full((3,), 2.0))
    # the communication blocks of the step, with their self times, in the order they closed
    assert clock.take_comm_blocks() == [("dispatch", 3.0)] and clock.take_comm_blocks() == []
    off = clock_mod.CommClock()  # spans off: span() is a no-op, measure() still counts
    with off.span("router"), off.measure("pool"):
        now[0] = 14.0
    assert off.take() == {"pool": 1.0} and off.take_comm_blocks() == [("pool", 1.0)]
    off.begin_step()
    assert off.take_comm_blocks() == []


def _worker_row(step: int, comm_s: float, step_s: float = 0.1) -> dict:
    from moedist.training.profile import COUNT_KINDS, SPAN_COLUMNS

    row = {"step": step, "step_s": step_s, "comm_s": comm_s, "a2a_bytes": 1000, "collectives": 3,
           **{c: 0.0 for c in SPAN_COLUMNS}, **{f"{k}_collectives": 1 for k in COUNT_KINDS},
           **{f"{k}_bytes": 10 for k in COUNT_KINDS}}  # fmt: skip
    row["span_pool_s"], row["span_dispatch_s"] = 0.5 * comm_s, 0.5 * comm_s
    return row


def test_worker_columns_split_communication_into_own_cost_and_waiting():
    """Per communication block, the least time any worker spent in it is its own cost (the
    last to arrive waits for nobody); each worker's excess is waiting. The report prints
    both; workers whose block sequences differ get no split."""
    from moedist.training.profile import format_report, profile_report, worker_columns

    b0 = [("pool", 0.004), ("dispatch", 0.001), ("grad_sync", 0.010)]
    b1 = [("pool", 0.001), ("dispatch", 0.005), ("grad_sync", 0.002)]
    rows = [_worker_row(0, 0.015), _worker_row(0, 0.008)]
    cols = worker_columns(rows, [b0, b1])
    assert cols["comm_own_s"] == pytest.approx(0.001 + 0.001 + 0.002)
    assert cols["workers_comm_wait_s"] == pytest.approx([0.011, 0.004])
    # own cost + waiting = each worker's time in communication, which is its comm_s
    assert [cols["comm_own_s"] + w for w in cols["workers_comm_wait_s"]] == pytest.approx(cols["workers_comm_s"])
    for other in ([("pool", 0.004), ("combine", 0.001), ("grad_sync", 0.010)], b0[:2]):
        bad = worker_columns(rows, [other, b1])  # not the same blocks: no pairing
        assert bad["comm_own_s"] is None and bad["workers_comm_wait_s"] is None
    assert worker_columns(rows)["comm_own_s"] is None  # no blocks sent (spans off on a worker)
    # the report over steps: the mean own cost, the most any worker waited, each worker's mean wait
    steps = []
    for step, (w0, w1) in enumerate([(b0, b1), (b1, b0), (b0, b1)]):
        rs = [_worker_row(step, sum(t for _, t in w0)), _worker_row(step, sum(t for _, t in w1))]
        steps.append({**rs[0], **worker_columns(rs, [w0, w1]), "worker_step_s": 0.1, "step_s": 0.11})
    rep = profile_report(steps, skip=0)
    cs = rep["comm_split"]
    assert cs["steps"] == 3 and cs["own_s"] == pytest.approx(0.004) and cs["most_wait_s"] == pytest.approx(0.011)
    assert cs["wait_s_by_worker"] == pytest.approx([(0.011 * 2 + 0.004) / 3, (0.004 * 2 + 0.011) / 3])
    text = format_report(rep)
    assert "communication per step: own cost 4.00 ms" in text and "waiting for other workers up to 11.00 ms" in text


def _tiny(tmp_path, spans: bool = True, trace: str = "1-2", router: str = "et"):
    cfg = build_config("tiny", None, {
        "model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "seq_len": 16, "n_experts": 4},
        "router": {"kind": router},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 0, "eval_tokens": 64, "progress": False,
                  "checkpoint_every": 0},
        "profile": {"spans": spans, "trace_steps": trace}})  # fmt: skip
    return cfg


def test_single_process_run_writes_the_trace_window_and_spans_that_add_up(tmp_path):
    """The trainer's rows and trace.json (the run loop writes it from trace_events, as the
    e2e tests' runs show); no run loop here: its evaluation, checkpoint and plots would
    double the test's time."""
    from moedist.training.profile import SPAN_COLUMNS, write_trace
    from moedist.training.trainer import Trainer

    cfg = _tiny(tmp_path)
    cfg.train.steps = 3
    tr = Trainer(cfg, load_dataset(cfg))
    rows = [tr.train_step() for _ in range(3)]
    write_trace(tmp_path, tr.trace_events(), {})
    for r in rows:
        inner = sum(r[c] for c in SPAN_COLUMNS)
        # What the spans leave out of step_s is the glue between them (a few statements:
        # 0.1-0.5 ms measured); 5% + 2 ms allows a busy machine, and is far less than any
        # real span (the optimiser's alone is ~20% of a step).
        assert inner <= r["step_s"] and r["step_s"] - inner < 0.05 * r["step_s"] + 2e-3, (r["step_s"], inner)
        assert r["span_expert_s"] > 0 and r["span_router_s"] > 0 and r["span_optimiser_s"] > 0
        # one process: no exchange, no collective
        assert r["a2a_bytes"] == 0 and r["collectives"] == 0 and r["span_dispatch_s"] == r["span_pool_s"] == 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    # Chrome trace event format: complete events ("X") and metadata ("M": the track names)
    assert xs and all({"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) for e in xs)
    assert all({"name", "ph", "pid", "tid", "args"} <= set(e) and e["ph"] in "XM" for e in trace["traceEvents"])
    assert {e["args"]["step"] for e in xs} == {1, 2} and {(e["pid"], e["tid"]) for e in xs} == {(0, 0)}
    for step in (1, 2):
        whole = next(e for e in xs if e["name"] == f"step {step}")
        assert whole["dur"] == pytest.approx(rows[step]["step_s"] * 1e6, abs=1.0)
        inside = [e for e in xs if e["args"]["step"] == step and e is not whole]
        assert all(whole["ts"] <= e["ts"] and e["ts"] + e["dur"] <= whole["ts"] + whole["dur"] + 1e-3 for e in inside)
        names = {e["name"] for e in inside}
        assert {"data", "dense_fwd", "router", "expert", "dense_bwd", "stats", "optimiser"} <= names


def _numbers(row: dict) -> dict:
    """A metrics row without its timing columns (what must not change between two runs)."""
    from moedist.training.loop import TIMING_KEYS
    from moedist.training.profile import PROFILE_KEYS

    skip = set(TIMING_KEYS) | PROFILE_KEYS | {"tokens_per_s"}
    return {k: v for k, v in row.items() if k not in skip}


def test_spans_do_not_change_the_run():
    """Spans add autograd identity nodes and timers only: every non-timing column of a run
    with spans is bitwise that of the same run without."""
    from moedist.training.trainer import Trainer

    runs = []
    for spans in (True, False):
        cfg = _tiny(None, spans=spans, trace="", router="tc")
        cfg.router.aux_loss_coef = 0.01
        tr = Trainer(cfg, load_dataset(cfg))
        runs.append([tr.train_step() for _ in range(3)])
    for a, b in zip(*runs, strict=True):
        assert _numbers(a) == _numbers(b)
        assert "span_expert_s" in a and "span_expert_s" not in b


@pytest.mark.parametrize("router", ["aoe", "et"])
def test_train_threads_caps_numba_too_and_the_thread_count_changes_no_number(router):
    """train.threads sets numba's kernel threads as well as torch's (a 1-thread run's numba
    threads otherwise spin on the other core), and the run's numbers do not depend on how
    many threads numba's kernels use."""
    import numba

    from moedist.training.trainer import Trainer

    before = numba.get_num_threads(), torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 0):
            if not threads:
                numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
            cfg = _tiny(None, trace="", router=router)
            cfg.train.threads = threads
            tr = Trainer(cfg, load_dataset(cfg))
            if threads:
                assert numba.get_num_threads() == 1 and torch.get_num_threads() == 1
            runs.append([tr.train_step() for _ in range(3)])
    finally:
        numba.set_num_threads(before[0])
        torch.set_num_threads(before[1])
    for a, b in zip(*runs, strict=True):
        assert _numbers(a) == _numbers(b)


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

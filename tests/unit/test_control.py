"""The control API's server over a real RunLoop and a fake step executor (no model, no Ray).

The fake executor's steps wait for the test to release them, so every test decides where
the step boundaries fall; all calls go through a real gRPC server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest
import torch

from moedist.config import ConfigError, build_config
from moedist.control import hub as hub_mod
from moedist.control.client import Client
from moedist.control.hub import ControlError, ControlHub, row_message
from moedist.control.server import serve
from moedist.control.v1 import control_pb2 as pb
from moedist.training.checkpoint import list_checkpoints
from moedist.training.evaluate import EvalResult
from moedist.training.loop import RunLoop, ScaleError, write_config
from moedist.training.plots import write_plots as _real_write_plots

E = 4  # experts per MoE layer of the fake rows


class GatedExecutor:
    """Each train_step waits until the test releases it; rows are a pure function of the step."""

    def __init__(self, fail_at: int | None = None):
        self.step = 0
        self.gate = threading.Semaphore(0)
        self.fail_at = fail_at
        self.saves: list[int] = []

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def train_step(self) -> dict:
        assert self.gate.acquire(timeout=30), "the test never released this step"
        s = self.step
        if s == self.fail_at:
            raise RuntimeError(f"boom at step {s}")
        row = {"step": s, "loss": 5.0 / (s + 1), "aux_loss": 0.0, "lr": 1e-3 * (s + 1), "grad_norm": 0.5 + s,
               "tokens": (s + 1) * 256, "step_s": 0.01 * (s + 1), "tokens_per_s": 256 / (0.01 * (s + 1)),
               "val_loss": None, "skipped": s % 5 == 4, "L1_load": [s, 1, 2, 3], "L1_fanout": 1.0 + s / 10,
               "L1_threshold": [0.1 * s, -0.5, 0.25, 1.0 + s]}  # fmt: skip
        self.step += 1
        return row

    def evaluate(self) -> EvalResult:
        return EvalResult(val_loss=2.5, tokens=10, fanout_hist=[[0, 10]], load=[[3, 3, 2, 2]])

    def state(self):
        self.saves.append(self.step)
        return {"model": {"w": torch.tensor([float(self.step)])}, "optim": {}}, {}

    def load_state(self, tensors, extra, step):
        self.step = step

    def info(self):
        return {"workers": 1}

    def param_counts(self):
        return {"total": 1, "active": 1}


class ScalingExecutor(GatedExecutor):
    """An executor that can scale: records each call and the step it came at."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg  # the run's config: a scale changes it in place, as the real executors do
        self.scaled: list[tuple[int, int | None, int | None]] = []
        self.n_workers = 1

    def scale(self, workers=None, experts=None, noise=0.0):
        if workers == 3:
            raise ScaleError("3 workers cannot share 4 experts evenly")
        self.scaled.append((self.step, workers, experts))
        self.n_workers = workers or self.n_workers
        if experts is not None:
            self.cfg.model.n_experts = experts
        return {"workers_after": self.n_workers}

    def members(self):
        return [{"rank": r, "node": "127.0.0.1", "pid": 100 + r, "backend": "gloo"} for r in range(self.n_workers)]


def make_cfg(steps: int = 50, ckpt_every: int = 0):
    return build_config("tiny", None, {"train": {"steps": steps, "eval_every": 0, "progress": False,
                                                 "checkpoint_every": ckpt_every, "keep_checkpoints": 10},
                                       "model": {"n_experts": E}})  # fmt: skip


class Job:
    """A RunLoop over `ex` running in a thread, with the control API served around it."""

    def __init__(self, run_dir: Path, ex, steps: int = 50, ckpt_every: int = 0, executor_needs_cfg: bool = False):
        cfg = make_cfg(steps, ckpt_every)
        self.ex = ex = ex(cfg) if executor_needs_cfg else ex
        write_config(run_dir, cfg)
        self.loop = RunLoop(cfg, run_dir, ex, {"kind": "byte"})
        self.run_dir = run_dir
        self.summary: dict | None = None
        self.error: BaseException | None = None
        started = threading.Event()
        self.server = None

        def main():
            try:
                with serve(self.loop, "127.0.0.1", 0) as server:
                    self.server = server
                    started.set()
                    self.summary = self.loop.run()
            except BaseException as e:
                self.error = e
            finally:
                started.set()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert started.wait(30)
        info = json.loads((run_dir / "control.json").read_text())
        self.client = Client(info["address"], info["token"], timeout_s=20)
        self.hub: ControlHub = self.loop.on_boundary[0].__self__

    def wait_step(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.hub.status().step < n:
            assert time.monotonic() < deadline, f"step {n} not reached"
            time.sleep(0.01)

    def finish(self) -> None:
        """Release every step left and wait for the run to end."""
        self.ex.release(1000)
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.client.close()


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr("moedist.training.plots.write_plots", lambda *a, **k: None)  # matplotlib: slow, not tested


@pytest.fixture
def job(tmp_path):
    j = Job(tmp_path / "run", GatedExecutor())
    yield j
    j.finish()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ------------------------------------------------------------------- status
def test_status_is_the_snapshot_of_the_last_step_boundary(job):
    st = job.client.call("GetStatus", pb.GetStatusRequest())
    assert (st.state, st.step, st.total_steps, st.router) == (pb.RUN_STATE_RUNNING, 0, 50, "et")
    assert not st.HasField("train_loss") and not st.HasField("checkpoint_step") and st.failures == 0
    # before the first step: the MoE layers of the config (tiny: 4 layers, the first dense), no thresholds yet
    assert [(x.layer, x.n_experts, list(x.thresholds)) for x in st.layers] == [(1, E, []), (2, E, []), (3, E, [])]
    job.ex.release(3)
    job.wait_step(3)
    st = job.client.call("GetStatus", pb.GetStatusRequest())
    last = job.loop.rows[-1]
    assert st.step == 3 and st.train_loss == last["loss"] == 5.0 / 3
    # tokens/s over the last steps: tokens of the batch x steps / their seconds
    per_step = job.loop.cfg.train.batch_size * job.loop.cfg.model.seq_len
    assert st.tokens_per_s == pytest.approx(3 * per_step / (0.01 + 0.02 + 0.03))
    [w] = st.workers
    assert (w.rank, w.node, w.pid, list(w.experts), w.backend) == (0, "127.0.0.1", os.getpid(), [0, 1, 2, 3], "")
    [layer] = st.layers
    assert (layer.layer, layer.n_experts) == (1, E)
    assert list(layer.thresholds) == last["L1_threshold"]  # the row's L1_threshold, exactly
    assert st.run_dir == str(job.run_dir) and not st.HasField("stopped_at_step")


def test_status_reads_no_lock_held_by_a_step(job):
    """A step in progress (blocked inside train_step) does not hold up GetStatus."""
    job.ex.release(1)
    job.wait_step(1)
    t0 = time.perf_counter()
    for _ in range(20):  # step 1 is blocked on the gate all along
        assert job.client.call("GetStatus", pb.GetStatusRequest()).step == 1
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------- commands
def call_in_thread(fn):
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except grpc.RpcError as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def wait_queued(job: Job, n: int = 1, timeout: float = 20) -> None:
    """Until `n` commands wait for the next step boundary (the call has reached the hub)."""
    deadline = time.monotonic() + timeout
    while len(job.hub._pending) < n:
        assert time.monotonic() < deadline, "the command never reached the hub"
        time.sleep(0.01)
    time.sleep(0.1)  # and a little longer: nothing may happen before the boundary


def test_checkpoint_waits_for_the_step_boundary_and_reports_what_was_written(job):
    job.ex.release(2)
    job.wait_step(2)  # step 2 is now blocked inside train_step
    t, out = call_in_thread(lambda: job.client.call("Checkpoint", pb.CheckpointRequest()))
    wait_queued(job)
    assert t.is_alive() and job.ex.saves == []  # nothing is saved in the middle of a step
    job.ex.release(1)
    t.join(20)
    res = out["result"]
    assert (res.step, res.path) == (3, str(job.run_dir / "checkpoints" / "step_000003"))
    assert [s for s, _ in list_checkpoints(job.run_dir)] == [3] and job.ex.saves == [3]
    st = job.client.call("GetStatus", pb.GetStatusRequest())
    assert (st.checkpoint_step, st.checkpoint_path) == (3, res.path)
    # a second request at the same boundary reuses that checkpoint
    t, out = call_in_thread(lambda: job.client.call("Checkpoint", pb.CheckpointRequest()))
    wait_queued(job)
    job.ex.release(1)
    t.join(20)
    assert out["result"].step == 4 and job.ex.saves == [3, 4]


def test_stop_ends_the_run_after_the_current_step_with_a_final_checkpoint(tmp_path):
    job = Job(tmp_path / "run", GatedExecutor())
    job.ex.release(4)
    job.wait_step(4)
    t, out = call_in_thread(lambda: job.client.call("Stop", pb.StopRequest()))
    wait_queued(job)
    assert t.is_alive()  # accepted only at the boundary
    job.ex.release(1)
    t.join(20)
    assert (out["result"].step, out["result"].total_steps) == (5, 50)
    job.thread.join(20)
    assert job.error is None and job.summary["stopped_at_step"] == 5 and job.summary["steps"] == 5
    assert [s for s, _ in list_checkpoints(job.run_dir)] == [5] and job.ex.saves == [5]
    rows = pq.read_table(job.run_dir / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["val_loss"] == 2.5  # the final evaluation
    assert json.loads((job.run_dir / "summary.json").read_text())["stopped_at_step"] == 5
    st = job.hub.status()
    assert (st.state, st.stopped_at_step, st.val_loss, st.val_loss_step) == (pb.RUN_STATE_FINISHED, 5, 2.5, 5)
    assert not (job.run_dir / "control.json").exists()
    # the server is gone: nothing answers at the address any more
    assert code_of(lambda: job.client.call("GetStatus", pb.GetStatusRequest(), timeout_s=5)) == \
        grpc.StatusCode.UNAVAILABLE  # fmt: skip
    job.finish()


def test_a_command_that_misses_its_deadline_is_withdrawn(job):
    job.ex.release(1)
    job.wait_step(1)
    code = code_of(lambda: job.client.call("Checkpoint", pb.CheckpointRequest(), timeout_s=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while job.hub._pending:  # the server notices the deadline within 0.1 s (more on a loaded machine)
        assert time.monotonic() < deadline, "the command was never withdrawn"
        time.sleep(0.01)
    job.ex.release(1)
    job.wait_step(2)
    assert job.ex.saves == [] and not list_checkpoints(job.run_dir)  # withdrawn: never carried out


def test_commands_after_the_run_finished_are_refused(tmp_path):
    job = Job(tmp_path / "run", GatedExecutor(), steps=3)
    job.ex.release(3)
    job.thread.join(20)
    with pytest.raises(ControlError) as info:
        job.hub.submit(hub_mod.Command("checkpoint"), 5)
    assert info.value.code == "FAILED_PRECONDITION" and "finished its 3 steps" in info.value.message
    job.finish()


def test_a_failed_run_reports_failed_and_ends_the_streams(tmp_path):
    job = Job(tmp_path / "run", GatedExecutor(fail_at=2))
    stream = job.hub.stream(0, True, lambda: True)
    job.ex.release(3)
    assert [m.step for m in stream] == [0, 1]  # then the stream ends, it does not hang
    job.thread.join(20)
    assert isinstance(job.error, RuntimeError)
    st = job.hub.status()
    assert st.state == pb.RUN_STATE_FAILED and "boom at step 2" in st.error
    assert not (job.run_dir / "control.json").exists()
    job.finish()


# ------------------------------------------------------------------- scale
def test_scale_is_refused_when_the_executor_cannot_scale(job):
    err = None
    try:
        job.client.call("Scale", pb.ScaleRequest(workers=2))
    except grpc.RpcError as e:
        err = e
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "this job's executor cannot scale yet"


def test_scale_calls_the_executors_scale_at_a_step_boundary(tmp_path):
    job = Job(tmp_path / "run", ScalingExecutor, executor_needs_cfg=True)
    job.ex.release(2)
    job.wait_step(2)
    t, out = call_in_thread(lambda: job.client.call("Scale", pb.ScaleRequest(workers=2)))
    wait_queued(job)
    assert t.is_alive() and job.ex.scaled == []
    job.ex.release(1)
    t.join(20)
    assert job.ex.scaled == [(3, 2, None)]  # at the boundary after step 2, only the field given
    res = out["result"]
    assert (res.step, res.workers, res.experts) == (3, 2, E)
    st = job.hub.status()
    assert [(w.rank, w.backend) for w in st.workers] == [(0, "gloo"), (1, "gloo")]
    assert json.loads((job.run_dir / "workers.json").read_text())[1]["pid"] == 101  # rewritten after the change
    t, out = call_in_thread(lambda: job.client.call("Scale", pb.ScaleRequest(experts=8)))
    wait_queued(job)
    job.ex.release(1)
    t.join(20)
    assert job.ex.scaled[-1] == (4, None, 8) and out["result"].experts == 8
    # the status follows at once: 8 experts per layer (the last row's 4 thresholds are not shown as theirs)
    assert [(x.n_experts, len(x.thresholds)) for x in job.hub.status().layers] == [(8, 0)]
    # the executor refusing a request (ScaleError) -> FAILED_PRECONDITION, and training goes on
    t, out = call_in_thread(lambda: job.client.call("Scale", pb.ScaleRequest(workers=3)))
    wait_queued(job)
    job.ex.release(1)
    t.join(20)
    assert out["error"].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert out["error"].details() == "scale refused: 3 workers cannot share 4 experts evenly"
    job.ex.release(1)
    job.wait_step(6)
    job.finish()
    assert job.error is None
    # summary.json lists the changes made (not the refused one), each with what it cost
    scales = job.summary["scales"]
    assert [(s["step"], s["workers_after"]) for s in scales] == [(3, 2), (4, 2)]
    assert all(set(s) == {"step", "workers_after", "scale_s", "save_s"} and s["scale_s"] >= 0 for s in scales)


class PreparingExecutor(ScalingExecutor):
    """An executor that starts new workers ahead (as the Ray coordinator does): a scale-up is
    prepared, polled at each boundary, and carried out once the test says it is ready."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prepared: list[tuple[int, int]] = []
        self.cancelled = 0
        self.ready = False
        self.fail = ""

    def prepare_scale(self, workers):
        self.prepared.append((self.step, workers))
        self.ready, self.fail = False, ""

    def scale_ready(self):
        if self.fail:
            raise ScaleError(self.fail)
        return self.ready

    def cancel_scale(self, why=""):
        self.cancelled += 1


def test_a_scale_up_trains_on_while_its_workers_start_and_switches_when_they_are_ready(tmp_path):
    job = Job(tmp_path / "run", PreparingExecutor, executor_needs_cfg=True)
    ex = job.ex
    job.ex.release(2)
    job.wait_step(2)
    t, out = call_in_thread(lambda: job.client.call("Scale", pb.ScaleRequest(workers=4)))
    wait_queued(job)
    ex.release(1)
    job.wait_step(3)
    assert ex.prepared == [(3, 4)] and ex.scaled == [] and t.is_alive()  # started, not switched
    t2, out2 = call_in_thread(lambda: job.client.call("Scale", pb.ScaleRequest(workers=2)))
    wait_queued(job)
    ex.release(2)  # two more steps on the old workers; the second request waits behind the first
    job.wait_step(5)
    assert ex.scaled == [] and t.is_alive() and t2.is_alive() and len(job.hub._pending) == 1
    ex.ready = True
    ex.release(1)
    t.join(20)
    t2.join(20)
    assert ex.scaled == [(6, 4, None), (6, 2, None)]  # the switch, then the request that waited
    assert (out["result"].step, out["result"].workers) == (6, 4) and out2["result"].workers == 2
    # new workers that cannot be started: refused, the job goes on
    t, out = call_in_thread(lambda: job.client.call("Scale", pb.ScaleRequest(workers=8)))
    wait_queued(job)
    ex.release(1)
    job.wait_step(7)
    ex.fail = "could not place 6 more workers"
    ex.release(1)
    t.join(20)
    assert out["error"].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert out["error"].details() == "scale refused: could not place 6 more workers"
    # a run that stops before the new workers are ready drops them and says so
    t, out = call_in_thread(lambda: job.client.call("Scale", pb.ScaleRequest(workers=8)))
    wait_queued(job)
    ex.release(1)
    job.wait_step(9)
    assert ex.prepared[-1] == (9, 8) and t.is_alive()
    ts, outs = call_in_thread(lambda: job.client.call("Stop", pb.StopRequest()))
    wait_queued(job)
    ex.release(1)
    t.join(20)
    ts.join(20)
    assert out["error"].code() == grpc.StatusCode.FAILED_PRECONDITION and ex.cancelled == 1
    assert "error" not in outs  # the stop itself was carried out
    job.finish()
    assert job.error is None and [s["workers_after"] for s in job.summary["scales"]] == [4, 2]


class ResizingExecutor(ScalingExecutor):
    """Rows whose per-expert columns have the run's current expert count."""

    def train_step(self) -> dict:
        row = super().train_step()
        n = self.cfg.model.n_experts
        row["L1_load"] = [row["step"] + e for e in range(n)]
        row["L1_threshold"] = [0.01 * e for e in range(n)]
        row["skipped"] = False  # every step counts in the summary's tail
        return row


def test_a_run_whose_experts_change_writes_its_outputs(tmp_path, monkeypatch):
    """After Scale(experts=) near the end (the summary's last 10% of steps spans the change),
    the run still writes its metrics, summary and plots (real matplotlib here)."""
    monkeypatch.setattr("moedist.training.plots.write_plots", _real_write_plots)
    job = Job(tmp_path / "run", ResizingExecutor, steps=20, executor_needs_cfg=True)
    job.ex.release(18)
    job.wait_step(18)
    t, out = call_in_thread(lambda: job.client.call("Scale", pb.ScaleRequest(experts=6)))
    wait_queued(job)
    job.ex.release(1)
    t.join(20)
    assert (out["result"].step, out["result"].experts) == (19, 6)
    job.finish()
    assert job.error is None, job.error
    rows = pq.read_table(job.run_dir / "metrics.parquet").to_pylist()
    assert [len(r["L1_load"]) for r in rows] == [4] * 19 + [6]
    assert (job.run_dir / "plots" / "expert_load.png").stat().st_size > 0
    # the load ratio of the rows with the final expert count: step 19's loads 19..24
    assert job.summary["max_load_ratio"] == pytest.approx(24 / 21.5)


# ------------------------------------------------------------------- metrics
def assert_row_equals(msg: pb.MetricsRow, row: dict) -> None:
    """Every column of the row, and nothing else, in the message."""
    assert msg.step == row["step"]
    scalars = {k: float(v) for k, v in row.items() if k != "step" and v is not None and not isinstance(v, list)}
    arrays = {k: [float(x) for x in v] for k, v in row.items() if isinstance(v, list)}
    assert dict(msg.values) == scalars
    assert {k: list(v.values) for k, v in msg.arrays.items()} == arrays


def test_stream_metrics_sends_the_backlog_then_each_new_step(job):
    job.ex.release(4)
    job.wait_step(4)
    # without follow: the steps done from from_step, then the stream ends
    got = list(job.client.stream(pb.StreamMetricsRequest(from_step=1)))
    assert [m.step for m in got] == [1, 2, 3]
    for msg, row in zip(got, job.loop.rows[1:], strict=True):
        assert_row_equals(msg, row)
    assert got[2].values["skipped"] == 0.0 and job.loop.rows[4 - 1]["val_loss"] is None
    assert "val_loss" not in got[0].values  # an empty cell is left out
    # with follow: the backlog, then live rows as the steps finish, until the run ends
    stream = job.client.stream(pb.StreamMetricsRequest(from_step=2, follow=True))
    first = [next(stream).step for _ in range(2)]
    job.ex.release(2)
    live = [next(stream) for _ in range(2)]
    assert first == [2, 3] and [m.step for m in live] == [4, 5]
    assert_row_equals(live[0], job.loop.rows[4])
    assert live[0].values["skipped"] == 1.0  # step 4 is a skipped one: booleans as 0/1
    job.ex.release(1000)
    rest = [m.step for m in stream]  # ends (OK) when the run ends
    assert rest == list(range(6, 50))


def test_a_slow_subscriber_is_disconnected_and_never_holds_up_training(tmp_path):
    job = Job(tmp_path / "run", GatedExecutor())
    job.hub.max_rows = 3
    stream = job.hub.stream(0, True, lambda: True)
    job.ex.release(10)
    job.wait_step(10, timeout=10)  # 10 steps done although nobody reads the stream
    got = []
    with pytest.raises(ControlError) as info:
        for m in stream:
            got.append(m.step)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "reconnect from step 0" in info.value.message
    assert got == []  # closed before sending more: no stream with gaps
    assert job.hub._subs == ()  # unsubscribed
    job.finish()


def test_each_row_is_serialised_once_for_every_stream_and_never_on_the_training_thread(job, monkeypatch):
    """Three clients following at once get every row exactly once, in order and whole;
    each row was converted once (by a stream thread) for all three."""
    converted: list[tuple[int, bool]] = []  # (step, on the training thread)
    real = hub_mod.row_message

    def counting(row):
        converted.append((row["step"], threading.current_thread() is job.thread))
        return real(row)

    monkeypatch.setattr(hub_mod, "row_message", counting)
    streams = [job.client.stream(pb.StreamMetricsRequest(from_step=0, follow=True)) for _ in range(3)]
    deadline = time.monotonic() + 20
    while len(job.hub._subs) < 3:  # each call subscribes once the server runs it
        assert time.monotonic() < deadline, "the streams did not subscribe"
        time.sleep(0.01)
    job.ex.release(6)
    got = [[next(s) for _ in range(6)] for s in streams]
    for msgs in got:
        assert [m.step for m in msgs] == list(range(6))
        for msg, row in zip(msgs, job.loop.rows, strict=True):
            assert_row_equals(msg, row)
    assert sorted(step for step, _ in converted) == list(range(6))  # once per row, not once per stream
    assert not any(on_training for _, on_training in converted)
    for s in streams:
        s.cancel()


def test_the_server_serves_the_generated_service_with_rows_sent_as_serialised():
    """server._method_handlers registers what the generated add_ControlServicer_to_server
    does (the same methods and messages), but StreamMetrics passes its bytes through."""
    from moedist.control import server as server_mod
    from moedist.control.v1 import control_pb2_grpc as pb_grpc

    class Recorder:
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service, handlers):
            self.service, self.handlers = service, handlers

    generated = Recorder()
    service = server_mod.ControlService(hub=None)
    pb_grpc.add_ControlServicer_to_server(service, generated)
    ours = server_mod._method_handlers(service)
    assert generated.service == server_mod.SERVICE and ours.keys() == generated.handlers.keys()
    for name, want in generated.handlers.items():
        have = ours[name]
        assert (have.request_streaming, have.response_streaming) == (want.request_streaming, want.response_streaming)
        assert have.request_deserializer == want.request_deserializer
        assert (have.unary_unary or have.unary_stream) == (want.unary_unary or want.unary_stream)
        if name == "StreamMetrics":
            assert have.response_serializer(b"\x08\x07") == b"\x08\x07"
        else:
            assert have.response_serializer == want.response_serializer


def test_row_message_keeps_numbers_and_lists_and_drops_empty_cells():
    msg = row_message({"step": 7, "loss": 1.5, "skipped": True, "workers": 2, "val_loss": None,
                       "L2_load": [1, 2], "L2_fanout": None, "note": "x"})  # fmt: skip
    assert msg.step == 7 and dict(msg.values) == {"loss": 1.5, "skipped": 1.0, "workers": 2.0}
    assert {k: list(v.values) for k, v in msg.arrays.items()} == {"L2_load": [1.0, 2.0]}


# ------------------------------------------------------------------- security
def raw_call(job: Job, method: str, body: bytes, metadata, timeout: float = 10):
    channel = grpc.insecure_channel(job.server.address, options=[("grpc.enable_http_proxy", 0)])
    try:
        fn = channel.unary_unary(f"/moedist.v1.Control/{method}", request_serializer=None,
                                 response_deserializer=None)  # fmt: skip
        return fn(body, metadata=metadata, timeout=timeout)
    finally:
        channel.close()


def test_every_bad_call_gets_its_code_and_the_server_keeps_serving(job):
    good = job.client.metadata
    checks = [
        ("GetStatus", b"", (), grpc.StatusCode.UNAUTHENTICATED),  # no token
        ("GetStatus", b"", (("authorization", "Bearer nope"),), grpc.StatusCode.UNAUTHENTICATED),
        ("GetStatus", b"", (("authorization", job.client.metadata[0][1][7:]),), grpc.StatusCode.UNAUTHENTICATED),
        ("Stop", b"", (("authorization", "Bearer nope"),), grpc.StatusCode.UNAUTHENTICATED),
        ("Scale", b"\x08", good, grpc.StatusCode.INVALID_ARGUMENT),  # truncated varint: does not decode
        ("Scale", pb.ScaleRequest(workers=0).SerializeToString(), good, grpc.StatusCode.INVALID_ARGUMENT),
        ("Scale", pb.ScaleRequest(experts=-2).SerializeToString(), good, grpc.StatusCode.INVALID_ARGUMENT),
        ("Scale", b"", good, grpc.StatusCode.INVALID_ARGUMENT),  # neither field
        ("Scale", b"\x00" * (65 * 1024), good, grpc.StatusCode.RESOURCE_EXHAUSTED),  # over 64 KiB
    ]
    for method, body, md, want in checks:
        with pytest.raises(grpc.RpcError) as info:
            raw_call(job, method, body, md)
        assert info.value.code() == want, (method, md, info.value.details())
        assert job.client.call("GetStatus", pb.GetStatusRequest()).state == pb.RUN_STATE_RUNNING
    # streaming: no token, and an out-of-range from_step
    for req, md, want in [(pb.StreamMetricsRequest(), (), grpc.StatusCode.UNAUTHENTICATED),
                          (pb.StreamMetricsRequest(from_step=-1), good, grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.StreamMetricsRequest(from_step=50), good, grpc.StatusCode.INVALID_ARGUMENT)]:  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            list(job.client.stub.StreamMetrics(req, metadata=md, timeout=10))
        assert info.value.code() == want
    assert job.ex.saves == [] and job.loop.stopped_at is None  # no refused call had an effect


def test_control_file_is_private_and_names_the_server(job):
    path = job.run_dir / "control.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = json.loads(path.read_text())
    assert info["address"] == job.server.address and info["address"].startswith("127.0.0.1:")
    assert info["token"] == job.server.token and len(info["token"]) >= 40 and info["pid"] == os.getpid()
    assert not list(job.run_dir.glob(".control.json*"))  # no temporary file left


def test_each_job_gets_a_fresh_token(tmp_path):
    a = Job(tmp_path / "a", GatedExecutor())
    b = Job(tmp_path / "b", GatedExecutor())
    assert a.server.token != b.server.token and a.server.address != b.server.address
    # a's token does not open b
    with pytest.raises(grpc.RpcError) as info:
        raw_call(b, "GetStatus", b"", a.client.metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    a.finish()
    b.finish()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "a b"])
def test_the_server_never_listens_on_every_interface(tmp_path, host):
    cfg = make_cfg()
    write_config(tmp_path, cfg)
    loop = RunLoop(cfg, tmp_path, GatedExecutor(), {"kind": "byte"})
    with pytest.raises(ConfigError, match="--control-host"), serve(loop, host, 0):
        pass
    assert not (tmp_path / "control.json").exists()


def test_a_port_in_use_is_an_error_not_shared(tmp_path):
    """gRPC sets SO_REUSEPORT unless told not to: two servers could then share a port."""
    cfg = make_cfg()
    write_config(tmp_path, cfg)
    loop = RunLoop(cfg, tmp_path, GatedExecutor(), {"kind": "byte"})
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another gRPC server's socket
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"), serve(loop, "127.0.0.1", port):
            pass
    assert not (tmp_path / "control.json").exists()

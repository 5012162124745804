"""The run loop's side of the control API: commands, the status snapshot, metric streams.

Two kinds of threads meet here:

- the training thread calls `on_row` and `at_boundary` (hooks of RunLoop, between steps)
  and `finish` (when the run ends); it carries out every command itself, at a step
  boundary, so the executor is never touched from another thread;
- the gRPC server's threads call `status`, `submit` and `open_stream`.

The training thread never waits for a gRPC thread. The one lock is held only for list
swaps and appends (microseconds, at boundaries, never during a step); the status is a
message rebuilt at each boundary and read without a lock (a reference swap); each metric
subscriber has a bounded queue, and a subscriber that lets it fill (a slow or stalled
client) is disconnected, not waited for: its stream ends with RESOURCE_EXHAUSTED naming the
step to reconnect from. Disconnecting rather than dropping rows means a client never sees
a stream with silent gaps.

What a row costs the training thread, which every streaming client would otherwise slow
down: a shallow copy of the row, an append per subscriber and one wake-up of the stream
threads. The conversion to a MetricsRow and its serialisation happen once per row, in
whichever stream thread sends it first; every stream sends those same bytes (the server
registers StreamMetrics with a pass-through serializer), and a stream thread that wakes up
sends all the rows that are ready back to back.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moedist.control.v1 import control_pb2 as pb
from moedist.training.loop import ScaleError, WorkerLostError

if TYPE_CHECKING:
    from moedist.training.loop import RunLoop

THROUGHPUT_WINDOW = 10  # steps the status's tokens/s is averaged over


class ControlError(Exception):
    """A call that cannot be carried out: a gRPC status code name and a one-line message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Command:
    """A request for the run loop, carried out at the next step boundary."""

    kind: str  # "checkpoint" | "stop" | "scale"
    args: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    taken: bool = False  # the training thread has started it (it can no longer be withdrawn)
    result: Any = None
    error: ControlError | None = None


class StreamRow:
    """One step's row as StreamMetrics sends it: converted to a MetricsRow and serialised
    once, by the first stream thread that needs it, and then sent as the same bytes on
    every stream."""

    __slots__ = ("_lock", "_row", "_wire", "step")

    def __init__(self, row: dict[str, Any]):
        self.step = int(row["step"])
        # a snapshot (the loop adds the final evaluation's val_loss to its last row later); dropped once sent
        self._row: dict[str, Any] | None = dict(row)
        self._wire: bytes | None = None
        self._lock = threading.Lock()

    def wire(self) -> bytes:
        """The serialised MetricsRow."""
        if self._wire is None:
            with self._lock:
                if self._wire is None:  # not serialised by another stream meanwhile
                    self._wire = row_message(self._row).SerializeToString()
                    self._row = None
        return self._wire


class Subscriber:
    """One StreamMetrics client: a bounded queue of StreamRows. The training thread appends,
    the stream's thread pops (a deque does both safely without a lock); the hub's condition
    wakes the stream threads."""

    def __init__(self, max_rows: int):
        self.rows: deque[StreamRow] = deque()
        self.max_rows = max_rows
        self.overflowed = False  # the queue filled up: the client is too slow, its stream is closed
        self.closed = False  # the run ended: the stream completes once its queue is empty

    def offer(self, item: StreamRow) -> None:
        """Called by the training thread: never blocks."""
        if self.overflowed:
            return
        if len(self.rows) >= self.max_rows:
            self.overflowed = True
        else:
            self.rows.append(item)


def row_message(row: dict[str, Any]) -> pb.MetricsRow:
    """A metrics row as a MetricsRow: numbers (booleans as 0/1) in `values`, lists in
    `arrays`; empty cells (None) and anything else left out."""
    msg = pb.MetricsRow(step=int(row["step"]))
    for key, val in row.items():
        if key == "step" or val is None:
            continue
        if isinstance(val, bool | int | float | np.integer | np.floating | np.bool_):
            msg.values[key] = float(val)
        elif isinstance(val, list | tuple | np.ndarray):
            msg.arrays[key].values.extend(float(x) for x in val)
    return msg


def _one_line(e: BaseException) -> str:
    """'Type: first line of the message' (just 'Type' when there is no message)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _layer_index(key: str, suffix: str) -> int | None:
    """i of a column named L<i><suffix>, else None."""
    if key.startswith("L") and key.endswith(suffix) and key[1 : -len(suffix)].isdigit():
        return int(key[1 : -len(suffix)])
    return None


class ControlHub:
    """Commands, status and metric streams of one RunLoop (see the module docstring)."""

    def __init__(self, loop: RunLoop, node: str, max_rows: int = 256, max_streams: int = 16):
        self.loop = loop
        self.node = node  # the driver's address: a single-process run's one "worker" node
        self.max_rows = max_rows
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._pending: list[Command] = []
        # A scale-up whose new workers are starting while the job trains on (executors with
        # prepare_scale): carried out at the first boundary after they are warm. Other scale
        # requests wait behind it; checkpoint and stop do not.
        self._staged: Command | None = None
        self._subs: tuple[Subscriber, ...] = ()
        self._rows_ready = threading.Condition()  # notified when rows are offered or the streams end
        self._history: list[dict[str, Any]] = list(loop.rows)  # the same row objects as the loop's
        self._state = pb.RUN_STATE_RUNNING
        self._error = ""
        self._last_val: tuple[float, int] | None = None
        for r in loop.rows:
            self._note_val(r)
        self._status = self._build_status()

    def attach(self) -> None:
        """Register with the run loop (its hooks run on the training thread)."""
        self.loop.on_row.append(self.on_row)
        self.loop.on_boundary.append(self.at_boundary)

    # ---------------------------------------------------------- training thread
    def on_row(self, row: dict[str, Any]) -> None:
        """A step's row: into the history (replayed steps after a recovery replace the lost
        ones, as in the loop) and to every subscriber."""
        self._note_val(row)
        with self._lock:
            while self._history and self._history[-1]["step"] >= row["step"]:
                self._history.pop()
            self._history.append(row)
            subs = self._subs
            if subs:  # under the lock, so that a new subscriber gets each row exactly once (backlog or live)
                item = StreamRow(row)
                for s in subs:
                    s.offer(item)
        if subs:
            with self._rows_ready:
                self._rows_ready.notify_all()

    def at_boundary(self, loop: RunLoop) -> None:
        """Carry out a staged scale-up whose workers are ready and the queued commands (in
        order; scale requests wait while one is staged), then publish the new status."""
        self._advance_staged(loop)
        while True:
            with self._lock:
                c = next((c for c in self._pending if not (c.kind == "scale" and self._staged is not None)), None)
                if c is None:
                    break
                self._pending.remove(c)
                c.taken = True
            self._execute(c)
        stopping = loop.stopped_at is not None or loop.step >= loop.cfg.train.steps
        with self._lock:
            late: list[Command] = []
            if stopping:
                self._state = pb.RUN_STATE_STOPPING  # no step boundary is left for new commands
                late, self._pending = self._pending, []
        if stopping:
            self._drop_staged()
        for c in late:
            self._fail(c, ControlError("FAILED_PRECONDITION", self._not_running()))
        self._status = self._build_status()

    def _advance_staged(self, loop: RunLoop) -> None:
        """Switch to a staged scale-up's new workers once they are warm (never waits)."""
        c = self._staged
        if c is None:
            return
        try:
            ready = loop.ex.scale_ready()
        except ScaleError as e:  # they could not be placed or started: the job goes on as it was
            self._staged = None
            self._fail(c, ControlError("FAILED_PRECONDITION", f"scale refused: {e}"))
            return
        if ready:
            self._staged = None
            self._execute(c, stage=False)

    def _drop_staged(self) -> None:
        """The run ends before a staged scale-up could happen: stop its new workers."""
        c, self._staged = self._staged, None
        if c is not None:
            with contextlib.suppress(Exception):
                self.loop.ex.cancel_scale()
            self._fail(c, ControlError("FAILED_PRECONDITION", self._not_running()))

    def finish(self, error: BaseException | None = None) -> None:
        """The run ended (its summary is written, or it failed): answer what is left and
        end every metric stream."""
        with self._lock:
            self._state = pb.RUN_STATE_FAILED if error is not None else pb.RUN_STATE_FINISHED
            self._error = "" if error is None else _one_line(error)
            late, self._pending = self._pending, []
            subs = self._subs
        self._drop_staged()
        for c in late:
            self._fail(c, ControlError("FAILED_PRECONDITION", self._not_running()))
        for s in subs:
            s.closed = True
        with self._rows_ready:
            self._rows_ready.notify_all()
        ev = self.loop.last_eval
        if error is None and ev is not None and math.isfinite(ev.val_loss):
            self._last_val = (ev.val_loss, self.loop.step)
        self._status = self._build_status()

    def _execute(self, c: Command, stage: bool = True) -> None:
        loop = self.loop
        try:
            if c.kind == "checkpoint":
                if loop.saved_step != loop.step:  # a checkpoint of this very step is reused
                    loop.save()
                c.result = (loop.saved_step, str(Path(loop.saved_path).resolve()))
            elif c.kind == "stop":
                if loop.stopped_at is None:
                    loop.request_stop()
                c.result = loop.stopped_at
            elif c.kind == "scale":
                self._scale(c, stage)
            else:  # pragma: no cover - the server only submits the kinds above
                raise ControlError("INTERNAL", f"unknown command {c.kind!r}")
        except ControlError as e:
            c.error = e
        except WorkerLostError as e:  # the loop recovers from it; the caller may try again after
            c.error = ControlError("ABORTED", f"a worker was lost during {c.kind} at step {loop.step}: {e}")
            raise
        except Exception as e:
            c.error = ControlError("INTERNAL", f"{c.kind} at step {loop.step} failed: {type(e).__name__}: {e}")
            if c.kind == "scale":  # the executor may be half-rescaled: the run must not go on
                raise
            # a failed extra checkpoint leaves the run as it was (checkpoints are written
            # atomically); the periodic and final ones still run
        finally:
            if c is not self._staged:
                c.done.set()

    def _scale(self, c: Command, stage: bool) -> None:
        loop = self.loop
        if loop.stopped_at is not None or loop.step >= loop.cfg.train.steps:
            raise ControlError("FAILED_PRECONDITION", f"no step is left to scale for ({self._not_running()})")
        members = getattr(loop.ex, "members", None)
        prepare = getattr(loop.ex, "prepare_scale", None)
        grow = c.args.get("workers") is not None and members is not None and c.args["workers"] > len(members())
        try:
            if stage and grow and prepare is not None:
                # New workers start and warm up while the job trains on; the switch happens
                # at the first boundary after they are ready (at_boundary), a short pause.
                prepare(c.args["workers"])
                self._staged = c
                return
            loop.scale(**c.args)
        except ScaleError as e:  # refused: the job goes on unchanged
            raise ControlError("FAILED_PRECONDITION", f"scale refused: {e}") from None
        # The executors update the run's config in place (it is the loop's): model.n_experts.
        c.result = (loop.step, len(members()) if members is not None else 1, loop.cfg.model.n_experts)
        self._status = self._build_status()  # before the caller hears back: status shows the new size

    @staticmethod
    def _fail(c: Command, err: ControlError) -> None:
        c.error = err
        c.done.set()

    def _note_val(self, row: dict[str, Any]) -> None:
        val = row.get("val_loss")
        if val is not None and math.isfinite(val):
            self._last_val = (float(val), int(row["step"]) + 1)

    def _not_running(self) -> str:
        loop = self.loop
        if self._state == pb.RUN_STATE_FAILED:
            return f"the run failed at step {loop.step} ({self._error})"
        if loop.stopped_at is not None:
            return f"the run was stopped at step {loop.stopped_at}"
        return f"the run has finished its {loop.cfg.train.steps} steps"

    # ------------------------------------------------------------------ status
    def _build_status(self) -> pb.Status:
        loop, cfg = self.loop, self.loop.cfg
        st = pb.Status(state=self._state, run_dir=str(loop.run_dir.resolve()), router=cfg.router.kind, step=loop.step,
                       total_steps=cfg.train.steps, failures=len(loop.failures), error=self._error)  # fmt: skip
        rows = loop.rows
        last = rows[-1] if rows else None
        if last is not None and last.get("loss") is not None:
            st.train_loss = float(last["loss"])
        if self._last_val is not None:
            st.val_loss, st.val_loss_step = self._last_val
        window = [r for r in rows[-THROUGHPUT_WINDOW:] if r.get("step_s")]
        if window:
            tokens = len(window) * cfg.train.batch_size * cfg.model.seq_len
            st.tokens_per_s = tokens / sum(r["step_s"] for r in window)
        if loop.saved_step is not None:
            st.checkpoint_step = loop.saved_step
            st.checkpoint_path = str(loop.saved_path.resolve()) if loop.saved_path else ""
        if loop.stopped_at is not None:
            st.stopped_at_step = loop.stopped_at
        st.workers.extend(self._workers())
        n_now = cfg.model.n_experts  # the config follows a Scale(experts=); the last row may predate it
        if last is not None:  # the row says which layers are MoE layers, and their thresholds
            for key, val in last.items():
                i = _layer_index(key, "_load")
                if i is not None and val is not None:
                    layer = st.layers.add(layer=i, n_experts=n_now)
                    thr = last.get(f"L{i}_threshold")
                    if thr is not None and len(thr) == n_now:
                        layer.thresholds.extend(float(x) for x in thr)
        elif cfg.router.kind != "dense":  # before the first step: the config's (MoETransformer's rule)
            first, n = (1 if cfg.model.first_layer_dense else 0), cfg.model.n_experts
            st.layers.extend(pb.MoELayer(layer=i, n_experts=n) for i in range(first, cfg.model.n_layers))
        return st

    def _workers(self) -> list[pb.Worker]:
        ex, cfg = self.loop.ex, self.loop.cfg
        members = getattr(ex, "members", None)
        if members is None:  # a single process holds every expert
            n = cfg.model.n_experts if cfg.router.kind != "dense" else 0
            return [pb.Worker(rank=0, node=self.node, pid=os.getpid(), experts=range(n))]
        placement = getattr(ex, "placement", None) if cfg.router.kind != "dense" else None
        out = []
        for m in members():
            experts = placement.local_experts(m["rank"]) if placement is not None else []
            out.append(pb.Worker(rank=m["rank"], node=str(m["node"]), pid=int(m["pid"]), experts=experts,
                                 backend=str(m.get("backend") or "")))  # fmt: skip
        return out

    def status(self) -> pb.Status:
        """The snapshot of the last step boundary (read without a lock)."""
        return self._status

    # ---------------------------------------------------------------- commands
    def can_scale(self) -> bool:
        return callable(getattr(self.loop.ex, "scale", None))

    def submit(self, cmd: Command, timeout_s: float, is_active: Callable[[], bool] = lambda: True) -> Any:
        """Queue `cmd` for the next step boundary and wait for its result.

        If the boundary is not reached within `timeout_s` (or the caller goes away), the
        command is withdrawn, unless the training thread has already started it: then it
        is waited for (a started checkpoint is finished and reported).
        """
        with self._lock:
            if self._state != pb.RUN_STATE_RUNNING:
                raise ControlError("FAILED_PRECONDITION", self._not_running())
            self._pending.append(cmd)
        deadline = time.monotonic() + timeout_s
        while not cmd.done.wait(0.1):
            if time.monotonic() < deadline and is_active():
                continue
            with self._lock:
                if not cmd.taken:
                    self._pending.remove(cmd)
                    raise ControlError(
                        "DEADLINE_EXCEEDED",
                        f"step {self.loop.step + 1} did not finish within {timeout_s:g} s; the {cmd.kind} "
                        "request was withdrawn",
                    )
            if not is_active():
                return None  # nobody to report to; the training thread finishes it
            cmd.done.wait()
        if cmd.error is not None:
            raise cmd.error
        return cmd.result

    # ----------------------------------------------------------------- streams
    def open_stream(self, from_step: int, follow: bool) -> tuple[list[dict[str, Any]], Subscriber | None]:
        """(the rows of steps >= from_step so far, the subscriber for later ones or None).

        Without `follow`, or once the run has ended, there is no subscriber."""
        with self._lock:
            history = list(self._history)  # a cheap copy; filtered outside the lock
            sub = None
            if follow and self._state in (pb.RUN_STATE_RUNNING, pb.RUN_STATE_STOPPING):
                if len(self._subs) >= self.max_streams:
                    raise ControlError("RESOURCE_EXHAUSTED", f"{self.max_streams} metric streams are open already")
                sub = Subscriber(self.max_rows)
                self._subs = (*self._subs, sub)
        return [r for r in history if r["step"] >= from_step], sub

    def close_stream(self, sub: Subscriber) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def stream(self, from_step: int, follow: bool, is_active: Callable[[], bool]) -> Iterator[StreamRow]:
        """StreamMetrics' rows: the backlog, then live rows until the run ends.

        Raises ControlError(RESOURCE_EXHAUSTED) when the subscriber fell `max_rows` rows
        behind (see the module docstring). Subscribes at once (not on the first next())."""
        backlog, sub = self.open_stream(from_step, follow)
        return self._iterate(backlog, sub, from_step, is_active)

    def _iterate(self, backlog: list[dict[str, Any]], sub: Subscriber | None, from_step: int,
                 is_active: Callable[[], bool]) -> Iterator[StreamRow]:  # fmt: skip
        try:
            for row in backlog:
                yield StreamRow(row)
            if sub is None:
                return
            sent = backlog[-1]["step"] if backlog else None
            ready = self._rows_ready
            while is_active():
                if sub.overflowed:
                    nxt = from_step if sent is None else sent + 1
                    raise ControlError(
                        "RESOURCE_EXHAUSTED",
                        f"this stream fell {sub.max_rows} steps behind the run and was closed (training never "
                        f"waits for a client); reconnect from step {nxt}",
                    )
                closed = sub.closed  # read before the queue: every row offered before the end is in it
                if sub.rows:  # the rows that are ready go out back to back, without waiting in between
                    item = sub.rows.popleft()
                    if item.step >= from_step:
                        sent = item.step
                        yield item
                    continue
                if closed:
                    return
                with ready:
                    if not (sub.rows or sub.closed):
                        ready.wait(0.2)  # woken by the next row or the end; the timeout checks is_active
        finally:
            if sub is not None:
                self.close_stream(sub)

"""Wall-clock accounting of a step: per-kind seconds of collectives (always) and, with spans
on, a span recorder that splits the whole step into named parts, counts the collectives
and the bytes they send, and records (name, start, end) events for a trace window.

    clock = CommClock()
    dispatcher.clock = clock; pool_ops.clock = clock
    with clock.measure("grad_sync"):
        sync_gradients(model, group)
    clock.take()   # {"grad_sync": 0.020, "dispatch": 0.008, "combine": 0.004, "pool": 0.003}, and resets

Nesting: measured blocks nest (an exchange runs inside the forward pass, ET's pool select
inside the optimiser span). Every kind's seconds are its SELF time: the block's wall time
minus the wall time of the blocks measured inside it. So the kinds of a step never count a
second twice and add up to the measured part of the step; "dense_fwd" is what is left of
the forward pass after router, pool, dispatch, expert and combine.

Collectives call `note_collective(nbytes)`: it counts one collective and its bytes on the
innermost open block of any clock (none open: not counted). Bytes are what this process
puts on the wire: for an all-to-all the rows sent to other ranks, for an all-reduce or
all-gather its own buffer.

On CUDA a collective only enqueues work, so the clock synchronises the device around each
measured call (only when a clock is attached: unmeasured runs keep their overlap).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["COMM_KINDS", "SPANS", "CommClock", "measure", "note_collective"]

# The parts of a step, in the order they happen (the metrics' span_<name>_s columns).
SPANS = ("data", "router", "pool", "dispatch", "expert", "combine", "dense_fwd", "dense_bwd", "stats",
         "grad_sync", "optimiser")  # fmt: skip
# Kinds that are time spent moving data between workers (comm_s is their sum). "a2a" is a
# token exchange whose caller did not say dispatch or combine (reported under span "other").
COMM_KINDS = ("pool", "dispatch", "combine", "a2a", "grad_sync")
EXCHANGE_KINDS = ("dispatch", "combine", "a2a")

# Open blocks of every clock in this process, innermost last: collectives are noted on the
# innermost one. One list (not per thread): on CUDA the autograd engine runs backward in a
# device thread while the caller waits in .backward(), so the two never run at once.
_OPEN: list[_Frame] = []


class _Frame:
    __slots__ = ("bytes", "child", "clock", "colls", "kind", "start")

    def __init__(self, clock: CommClock, kind: str, start: float):
        self.clock, self.kind, self.start = clock, kind, start
        self.child = 0.0  # wall seconds of the blocks measured inside this one
        self.bytes = 0
        self.colls = 0


def note_collective(nbytes: int, count: int = 1) -> None:
    """Count `count` collectives sending `nbytes` in all on the innermost measured block."""
    if _OPEN:
        f = _OPEN[-1]
        f.colls += count
        f.bytes += int(nbytes)


def bytes_to_others(x_ND: torch.Tensor, send_splits: list[int], rank: int) -> int:
    """Bytes of the rows of x_ND that go to ranks other than `rank` (the self slice never leaves)."""
    row = x_ND[0].numel() * x_ND.element_size() if x_ND.shape[0] else 0
    return (sum(send_splits) - send_splits[rank]) * row


class CommClock:
    """Self seconds per kind (collectives always; every span of the step when `spans`),
    collectives and bytes per kind, and trace events of the steps being traced."""

    def __init__(self, spans: bool = False) -> None:
        self.spans = spans
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.collectives: defaultdict[str, int] = defaultdict(int)
        self.bytes: defaultdict[str, int] = defaultdict(int)
        self.tracing = False  # record events of this step
        self.events: list[tuple[str, float, float, int, int]] = []  # (kind, t0, t1, bytes, collectives)
        # (kind, self seconds) of every communication block of the step, in order: the
        # driver pairs them across workers to split their time into waiting and own cost.
        self.comm_blocks: list[tuple[str, float]] = []
        self._stack: list[_Frame] = []
        self._cuda = _cuda_in_use()

    # ------------------------------------------------------------ blocks
    def open(self, kind: str) -> None:
        """Start a block of `kind` (prefer `measure`; this is for blocks that begin and end
        in different calls, e.g. a backward pass seen through autograd hooks)."""
        if self._cuda:
            torch.cuda.synchronize()
        f = _Frame(self, kind, time.perf_counter())
        self._stack.append(f)
        _OPEN.append(f)

    def close(self, kind: str) -> None:
        """End the innermost open block of `kind` (and any block left open inside it)."""
        if self._cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if not any(f.kind == kind for f in self._stack):
            return
        while self._stack:
            f = self._stack.pop()
            if _OPEN and _OPEN[-1] is f:
                _OPEN.pop()
            elif f in _OPEN:
                _OPEN.remove(f)
            wall = t1 - f.start
            self.seconds[f.kind] += wall - f.child
            if f.kind in COMM_KINDS:
                self.comm_blocks.append((f.kind, wall - f.child))
            self.collectives[f.kind] += f.colls
            self.bytes[f.kind] += f.bytes
            if self._stack:
                self._stack[-1].child += wall
            if self.tracing:
                self.events.append((f.kind, f.start, t1, f.bytes, f.colls))
            if f.kind == kind:
                return

    @contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        """Add the self time of the block (its wall time less the blocks measured inside)
        to `kind`."""
        self.open(kind)
        try:
            yield
        finally:
            self.close(kind)

    def span(self, kind: str):
        """`measure(kind)` when spans are on, else nothing (the fine parts of a step)."""
        return self.measure(kind) if self.spans else _NULL

    def traced(self, kind: str, fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> torch.Tensor:
        """fn(x, *args) measured as `kind`, in the forward pass and (spans on, x requiring
        grad) in the backward pass too: identity autograd nodes on x and on the result open
        the block when the result's gradient arrives and close it when x's leaves."""
        if not (self.spans and torch.is_grad_enabled() and x.requires_grad):
            with self.measure(kind):
                return fn(x, *args)
        x = _MarkInBackward.apply(x, self, kind, False)
        with self.measure(kind):
            y = fn(x, *args)
        return _MarkInBackward.apply(y, self, kind, True)

    # ------------------------------------------------------------ steps
    def begin_step(self, tracing: bool = False) -> float:
        """Forget anything measured since the last step (e.g. an evaluation's collectives)
        and start a step; returns its start (perf_counter seconds)."""
        self.abandon()
        self.seconds.clear()
        self.collectives.clear()
        self.bytes.clear()
        self.tracing = tracing
        self.events = []
        self.comm_blocks = []
        self._cuda = _cuda_in_use()  # checked once a step (measure is called often)
        return time.perf_counter()

    def abandon(self) -> None:
        """Drop blocks left open (a step that raised); their time is not counted."""
        for f in self._stack:
            if f in _OPEN:
                _OPEN.remove(f)
        self._stack.clear()

    def take(self) -> dict[str, float]:
        """The self seconds per kind since the last take (or step start), then zero them."""
        out = dict(self.seconds)
        self.seconds.clear()
        return out

    def take_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(collectives, bytes) per kind since the last call (or step start), then zero them."""
        out = dict(self.collectives), dict(self.bytes)
        self.collectives.clear()
        self.bytes.clear()
        return out

    def take_comm_blocks(self) -> list[tuple[str, float]]:
        """(kind, self seconds) of the communication blocks since the last call (or step
        start), in the order they closed; their seconds add up to the comm kinds' seconds."""
        out, self.comm_blocks = self.comm_blocks, []
        return out

    def take_events(self) -> list[tuple[str, float, float, int, int]]:
        out, self.events = self.events, []
        return out


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _Null()


class _MarkInBackward(torch.autograd.Function):
    """Identity; its backward opens (`opening`: the gradient reaching the measured fn's
    output) or closes (the gradient leaving the measured fn) the block `kind`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clock: CommClock, kind: str, opening: bool) -> torch.Tensor:
        ctx.clock, ctx.kind, ctx.opening = clock, kind, opening
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ctx.clock.open if ctx.opening else ctx.clock.close)(ctx.kind)
        return grad, None, None, None


@contextmanager
def measure(clock: CommClock | None, kind: str) -> Iterator[None]:
    """`clock.measure(kind)`, or nothing when no clock is attached."""
    if clock is None:
        yield
    else:
        with clock.measure(kind):
            yield

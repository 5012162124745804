"""Wall-clock accounting of collectives, so a step's time splits into compute and
communication (the weak-scaling benchmark and each metrics row report it).

    clock = CommClock()
    dispatcher.clock = clock; pool_ops.clock = clock
    with clock.measure("grad_sync"):
        sync_gradients(model, group)
    clock.take()   # {"a2a": 0.012, "pool": 0.003, "grad_sync": 0.020}, and resets

On CUDA a collective only enqueues work, so the clock synchronises the device around each
measured call (only when a clock is attached: unmeasured runs keep their overlap).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["CommClock", "measure"]


class CommClock:
    """Seconds spent in collectives, accumulated per kind until `take`."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        """Add the wall time of the block to `kind`."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            self.seconds[kind] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        """The totals since the last take, then zero them."""
        out = dict(self.seconds)
        self.seconds.clear()
        return out


@contextmanager
def measure(clock: CommClock | None, kind: str) -> Iterator[None]:
    """`clock.measure(kind)`, or nothing when no clock is attached."""
    if clock is None:
        yield
    else:
        with clock.measure(kind):
            yield

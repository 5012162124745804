"""Count the torch.distributed collectives a block of code makes (tests, benchmarks).

    with CollectiveCounter() as cc:
        trainer.train_step()
    cc.total              # collectives issued by this process
    cc.by_op()            # {"all_reduce": 9, "all_to_all_single": 15, ...}
    cc.by_site()          # {"all_reduce @ et.py:forward > pool.py:total > ...": 3, ...}
    cc.seconds_by_site()  # wall seconds inside those calls (waiting for other ranks included)
    cc.calls              # [(site, seconds)] of every call in order: with every rank's list,
                          # split_wait() tells waiting for the other ranks from the rest

The counter replaces the collective functions of the torch.distributed module while it is
active (moedist's modules call them as ``dist.all_reduce``, so they see the wrappers) and
restores them on exit. A collective made inside another one (all_gather_object runs
all_gather underneath) counts once, as the outer call. Not thread-safe; meant for one
process's step at a time, not for production runs.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

__all__ = ["COLLECTIVES", "CollectiveCounter", "split_wait"]

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "barrier",
)
_SKIP_FILES = ("torch/distributed", "parallel/counting.py", "torch/autograd", "contextlib.py")


def _call_site(depth: int = 3) -> str:
    """The `depth` innermost frames outside torch and this module, outermost first
    ("et.py:step_end > pool.py:kth_largest > pool.py:_radix_select")."""
    f = sys._getframe(2)
    chain: list[str] = []
    while f is not None and len(chain) < depth:
        fname = f.f_code.co_filename
        if not any(s in fname for s in _SKIP_FILES):
            chain.append(f"{fname.rsplit('/', 1)[-1]}:{f.f_code.co_name}")
        f = f.f_back
    return " > ".join(reversed(chain)) or "?"


class CollectiveCounter:
    """Counts collectives by (op, call site) while active (a context manager)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.seconds: Counter[tuple[str, str]] = Counter()
        # ("op @ site", seconds) of every counted call, in the order they were made
        self.calls: list[tuple[str, float]] = []
        self._saved: dict[str, Callable[..., Any]] = {}
        self._depth = 0

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth > 0:
                return fn(*args, **kwargs)
            key = (name, _call_site())
            self.counts[key] += 1
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.seconds[key] += dt
                self.calls.append((f"{name} @ {key[1]}", dt))
                self._depth -= 1

        return wrapper

    def __enter__(self) -> CollectiveCounter:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    @property
    def total(self) -> int:
        """Collectives counted so far."""
        return sum(self.counts.values())

    def by_op(self) -> dict[str, int]:
        """Counts per collective function."""
        out: Counter[str] = Counter()
        for (op, _), n in self.counts.items():
            out[op] += n
        return dict(out)

    def by_site(self) -> dict[str, int]:
        """Counts per "op @ file:function" (where in moedist each collective is issued)."""
        return {f"{op} @ {site}": n for (op, site), n in sorted(self.counts.items())}

    def seconds_by_site(self) -> dict[str, float]:
        """Wall seconds spent in the collectives of each site (a collective also waits for
        the slowest rank to arrive, so this is where a rank waited, not only transfer time)."""
        return {f"{op} @ {site}": t for (op, site), t in sorted(self.seconds.items())}

    def reset(self) -> dict[str, int]:
        """by_site() so far, then start from zero."""
        out = self.by_site()
        self.counts.clear()
        self.seconds.clear()
        self.calls.clear()
        return out


def split_wait(calls_by_rank: list[list[tuple[str, float]]]) -> dict[str, Any] | None:
    """Every rank's seconds in collectives, split into waiting for the other ranks and the rest.

    A collective cannot finish on any rank before the last rank has arrived, and the last
    to arrive waits for nobody: its time in the call is the collective's own cost (transfer,
    reduction). So per call, the smallest time over the ranks is counted as its cost and
    each rank's excess over it as waiting (an estimate: a rank that arrives last but is
    descheduled inside the call makes the cost look larger). `calls_by_rank[r]` is rank r's
    `CollectiveCounter.calls` over the same steps. Returns {"cost_s": sum of the per-call
    minima, "wait_s": [per rank], "total_s": [per rank], "cost_by_site": {site: its calls'
    cost}, "calls_by_site": {site: calls}}, or None when the ranks' call sequences differ
    (they are the same for matched synchronous collectives)."""
    if not calls_by_rank or any([c for c, _ in calls] != [c for c, _ in calls_by_rank[0]] for calls in calls_by_rank):
        return None
    per_call = list(zip(*([t for _, t in calls] for calls in calls_by_rank), strict=True))
    cost = [min(ts) for ts in per_call]
    cost_s = sum(cost)
    totals = [sum(t for _, t in calls) for calls in calls_by_rank]
    by_site: Counter[str] = Counter()
    n_site: Counter[str] = Counter()
    for (site, _), c in zip(calls_by_rank[0], cost, strict=True):
        by_site[site] += c
        n_site[site] += 1
    return {"cost_s": cost_s, "wait_s": [tot - cost_s for tot in totals], "total_s": totals,
            "cost_by_site": dict(by_site), "calls_by_site": dict(n_site)}  # fmt: skip

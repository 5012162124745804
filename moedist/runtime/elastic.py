"""Following the cluster's size: the optional elastic policy of a Ray job (`--elastic MIN:MAX`).

A step-boundary hook of the run loop (`RunLoop.on_boundary`). At most every `interval_s`
seconds it looks at the cluster and measures the job's *room*: the workers it runs, plus
the bundles of one worker's size ({CPU: cpus_per_worker, GPU: ...}) that the free
resources of the live nodes hold, plus the placed bundles of the job's own placement
groups that hold no worker any more (left by a recovery that went on with fewer workers;
`Coordinator.scale` releases them before it grows). The policy acts when the room changes
(a node joined or left, or another job took or gave back resources) and the new room was
seen at `confirm` consecutive looks (hysteresis: a passing blip never scales the job). It
then scales to the largest worker count within [MIN, MAX] that fits the room and that the
job can run with (`valid_worker_counts`), if that differs from the current count.

So a node that joins grows the job; a node that leaves is handled by the recovery path
(the lost workers are replaced where there is room, or the job goes on with fewer), and
the policy grows the job again when room reappears (after a recovery it weighs the room
afresh, since the count it left is no one's choice). A manual `moedist ctl scale --workers
N` is obeyed as it is, and stays until the room next changes; from then on the policy
follows the cluster again. A refused change (`ScaleError`) is logged and tried again
after a back-off that doubles up to `max_backoff_s`.

The decision itself is pure (`decide`: a `ClusterView` (the job's workers and idle
bundles, each node's free resources, the bundle and the placement strategy), the range
and the valid counts -> the target count), so it is tested without a
cluster; `look` is the one function here that asks Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from moedist.config import ConfigError

# Seconds between two looks at the cluster (each is one GCS query, at a step boundary).
DEFAULT_INTERVAL_S = 5.0
# Consecutive looks that must see the same new room before the policy acts.
DEFAULT_CONFIRM = 2
# Shortest and longest wait before trying a refused change again (it doubles in between).
MIN_BACKOFF_S = 1.0
DEFAULT_MAX_BACKOFF_S = 120.0
# How long the recovery of an elastic job waits for room for replacements (a job without
# the policy waits the whole start timeout): it goes on with the survivors, and the policy
# grows it again when room comes.
REPLACE_TIMEOUT_S = 10.0


def parse_range(text: str, flag: str = "--elastic") -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX) with 1 <= MIN <= MAX (ConfigError naming the flag)."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"{flag}: expected MIN:MAX worker counts such as 2:8, got '{text}'") from None
    if lo < 1:
        raise ConfigError(f"{flag}: MIN must be >= 1, got {lo} in '{text}'")
    if hi < lo:
        raise ConfigError(f"{flag}: MAX must be >= MIN, got '{text}'")
    return lo, hi


@dataclass(frozen=True)
class ClusterView:
    """What one look at the cluster saw."""

    workers: int  # workers the job runs now
    idle_bundles: int  # placed bundles of the job's placement groups that hold no worker
    free_per_node: list[dict[str, float]] = field(default_factory=list)  # available resources of each live node
    bundle: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})  # one worker's bundle
    strategy: str = "PACK"  # the job's placement strategy


def bundles_that_fit(free_per_node: Iterable[dict[str, float]], bundle: dict[str, float], strategy: str) -> int:
    """How many more bundles `bundle` the free resources hold under a placement strategy:
    PACK and SPREAD (soft) use every node, STRICT_PACK one node, STRICT_SPREAD one bundle
    per node."""
    per_node = []
    for free in free_per_node:
        fits = [math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        per_node.append(max(0, min(fits)) if fits else 0)
    if not per_node:
        return 0
    if strategy == "STRICT_PACK":
        return max(per_node)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n > 0)
    return sum(per_node)


def room(view: ClusterView) -> int:
    """Workers the job could run now: its own, its idle placed bundles, and what fits."""
    return view.workers + view.idle_bundles + bundles_that_fit(view.free_per_node, view.bundle, view.strategy)


def choose_workers(current: int, room_workers: int, lo: int, hi: int, valid: Iterable[int]) -> int:
    """The largest count in [lo, hi] that fits `room_workers` and the job can run with
    (`valid`); `current` when there is none (e.g. after a recovery to fewer than lo workers
    with no room yet: the recovery's choice stands)."""
    fits = [w for w in valid if lo <= w <= min(hi, room_workers)]
    return max(fits) if fits else current


def decide(view: ClusterView, lo: int, hi: int, valid: Iterable[int]) -> int:
    """The worker count the policy wants for what `view` saw."""
    return choose_workers(view.workers, room(view), lo, hi, valid)


def look(coord: Any) -> ClusterView:
    """One look at the cluster for a Coordinator: its workers, its idle placed bundles and
    the free resources of each live node (one GCS query each)."""
    import ray
    from ray.util.placement_group import placement_group_table

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    idle = 0
    for g in coord.idle_groups():
        to_node = placement_group_table(coord.pgs[g]).get("bundles_to_node_id", {})
        idle += sum(1 for node in to_node.values() if node in alive)
    try:  # per node: a bundle cannot straddle two nodes
        from ray._private.state import available_resources_per_node  # a DeveloperAPI

        free = [res for node, res in available_resources_per_node().items() if node in alive]
    except (ImportError, AttributeError):
        free = [ray.available_resources()]  # the cluster's total: may overcount when fragmented
    return ClusterView(workers=len(coord.workers), idle_bundles=idle, free_per_node=free, bundle=coord.worker_bundle(),
                       strategy=coord.strategy)  # fmt: skip


def _log(msg: str) -> None:
    from moedist.training.loop import _log as loop_log

    loop_log(msg)


class ElasticPolicy:
    """The on_boundary hook that follows the cluster's size within [lo, hi] workers.

    `view` returns a ClusterView for the loop's executor (default: `look`); `clock` and
    `say` are for tests.
    """

    def __init__(
        self,
        lo: int,
        hi: int,
        interval_s: float = DEFAULT_INTERVAL_S,
        confirm: int = DEFAULT_CONFIRM,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        view: Callable[[Any], ClusterView] = look,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] = _log,
    ):
        self.lo, self.hi = lo, hi
        self.interval_s = interval_s
        self.confirm = max(1, confirm)
        self.max_backoff_s = max_backoff_s
        self.view, self.clock, self.say = view, clock, say
        self.settled: int | None = None  # the room last acted on (None: act on the next confirmed look)
        self._seen: int | None = None  # the new room of the looks so far, and how many saw it
        self._streak = 0
        self._next_look = -math.inf
        self._backoff = max(interval_s, MIN_BACKOFF_S)
        self._failures = 0  # recoveries seen (len(loop.failures))
        self._look_failed = False
        self._growing: tuple[int, int, str] | None = None  # a scale-up in preparation: (before, target, why)

    def __call__(self, loop: Any) -> None:
        if loop.stopped_at is not None or loop.step >= loop.cfg.train.steps:
            if self._growing is not None:  # no step is left for the new workers: stop them
                self._growing = None
                loop.ex.cancel_scale()
            return  # no step is left to run on another count
        if self._growing is not None:
            self._advance(loop)
            return
        if len(loop.failures) != self._failures:
            # A recovery chose the worker count (not a user): weigh the room afresh, even if
            # a node left and another joined between two looks and the room looks the same.
            self._failures, self.settled = len(loop.failures), None
        now = self.clock()
        if now < self._next_look:
            return
        self._next_look = now + self.interval_s
        try:
            view = self.view(loop.ex)
        except Exception as e:  # a look that fails (e.g. a GCS hiccup) never stops training
            if not self._look_failed:  # said once per run of failed looks, not every interval
                self.say(f"moedist: elastic: could not look at the cluster ({type(e).__name__}: {e}); trying "
                         "again every look")  # fmt: skip
            self._look_failed = True
            return
        self._look_failed = False
        have = room(view)
        if have == self.settled:
            self._seen, self._streak = None, 0
            return
        self._streak = self._streak + 1 if have == self._seen else 1
        self._seen = have
        if self._streak < self.confirm:
            return
        self._seen, self._streak = None, 0
        self.settled = have
        from moedist.runtime.coordinator import valid_worker_counts

        target = choose_workers(view.workers, have, self.lo, self.hi, valid_worker_counts(loop.cfg, self.hi))
        if target == view.workers:
            self._backoff = max(self.interval_s, MIN_BACKOFF_S)
            return
        why = (f"room for {have} workers ({view.workers} running, {view.idle_bundles} idle bundles, "
               f"{have - view.workers - view.idle_bundles} more fit), range {self.lo}:{self.hi}")  # fmt: skip
        self._scale(loop, view.workers, target, why)

    def _scale(self, loop: Any, before: int, target: int, why: str) -> None:
        from moedist.training.loop import ScaleError

        self.say(f"moedist: elastic: scaling {before} -> {target} workers at step {loop.step}: {why}")
        prepare = getattr(loop.ex, "prepare_scale", None)
        if target > before and prepare is not None:
            # New workers start and warm up while the job trains on (the coordinator's
            # prepare_scale); the switch comes at the first boundary after they are ready.
            try:
                prepare(target)
            except ScaleError as e:
                self._refused(target, e)
                return
            self._growing = (before, target, why)
            self._advance(loop)
            return
        self._switch(loop, before, target, why)

    def _advance(self, loop: Any) -> None:
        """Switch to a prepared scale-up once its workers are ready (never waits)."""
        from moedist.training.loop import ScaleError

        before, target, why = self._growing
        try:
            ready = loop.ex.scale_ready()
        except ScaleError as e:
            self._growing = None
            self._refused(target, e)
            return
        if ready:
            self._growing = None
            self._switch(loop, before, target, why)

    def _refused(self, target: int, e: Exception) -> None:
        """Refused, nothing changed: look again after a back-off."""
        self.settled = None
        self._next_look = self.clock() + self._backoff
        self.say(f"moedist: elastic: scaling to {target} workers refused ({e}); trying again in "
                 f"{self._backoff:.0f} s")  # fmt: skip
        self._backoff = min(2 * self._backoff, self.max_backoff_s)

    def _switch(self, loop: Any, before: int, target: int, why: str) -> None:
        from moedist.training.loop import ScaleError

        step = loop.step
        try:
            loop.scale(workers=target)
        except ScaleError as e:
            self._refused(target, e)
            return
        self._backoff = max(self.interval_s, MIN_BACKOFF_S)
        loop.scales[-1]["reason"] = f"elastic: {why}"
        rec = loop.scales[-1]
        self.say(f"moedist: elastic: {before} -> {target} workers at step {step} "
                 f"in {rec.get('scale_s', 0.0):.1f} s")  # fmt: skip

"""The coordinator: the step executor of an expert-parallel job on a Ray cluster.

It lives in the driver process (so its workers are owned by the driver and die with it),
reserves a placement group (one bundle per worker), starts the worker actors pinned to the
bundles, orders ranks by node, runs the torch.distributed rendezvous on rank 0's node
address and fans every call of the run loop (moedist.training.loop) out to the workers.

Failures: a dead worker (its process killed, its node's raylet gone) or a step that hangs
past the step timeout raises `WorkerDiedError`, which the run loop recovers from by calling
`recover`: the workers that still answer are kept, the lost ones are replaced in their
placement-group bundles (Ray moves a bundle whose node is gone to a node with room), or
the job goes on with fewer workers when the cluster has no room; then the process group is
re-formed with a fresh rendezvous and the loop restores every worker from the newest
checkpoint. Any other worker error is a typed JobError, and `shutdown` always removes the
actors and the placement group.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from moedist.config import RunConfig, to_dict
from moedist.errors import JobError  # defined there: the CLI handles it without importing torch and ray
from moedist.runtime.worker import _tensors
from moedist.training.evaluate import EvalResult
from moedist.training.loop import ScaleError, WorkerLostError
from moedist.training.profile import COMM_BLOCKS_KEY
from moedist.training.torch_profile import ROW_KEY

if TYPE_CHECKING:
    from moedist.parallel.placement import ExpertPlacement


class PlacementTimeoutError(JobError):
    """The cluster could not place every worker within the timeout."""


class WorkerStartError(JobError):
    """A worker actor failed to start or to join the process group."""


class WorkerFailedError(JobError):
    """A worker raised an error that is not a lost worker (a bug, bad data): not retried."""


class WorkerDiedError(JobError, WorkerLostError):
    """A worker actor died (or hung past the step timeout) while the job ran; recoverable."""


def _resources_text(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU", "memory"))


def valid_worker_counts(cfg: RunConfig, at_most: int) -> list[int]:
    """Worker counts <= at_most the job can run with (each worker owns at least one expert
    and gets an equal share of every micro-batch), largest first."""
    t = cfg.train
    n_experts = cfg.model.n_experts if cfg.router.kind != "dense" else at_most
    return [w for w in range(min(at_most, n_experts), 0, -1) if t.batch_size % (t.micro_batches * w) == 0]


class Coordinator:
    """Drives cfg.workers worker actors, one optimiser step at a time (a StepExecutor)."""

    def __init__(
        self,
        cfg: RunConfig,
        strategy: str = "PACK",
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float | None = None,
        start_timeout_s: float = 120.0,
        step_timeout_s: float = 1800.0,
        grace_s: float = 10.0,
        replace_timeout_s: float | None = None,
    ):
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement strategy '{strategy}' is not one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
        self.cfg = cfg
        self.strategy = strategy
        self.cpus = cpus_per_worker
        self.gpus = gpus_per_worker
        self.start_timeout_s = start_timeout_s
        self.step_timeout_s = step_timeout_s
        self.grace_s = grace_s  # how long survivors of a lost worker get to finish failing their step
        # How long a recovery waits for room for replacements (None: the start timeout). An
        # elastic job waits briefly: it goes on with the survivors and grows when room comes.
        self.replace_timeout_s = replace_timeout_s
        # Placement groups: the job's first one, then one per growth by live scaling (Ray
        # cannot resize a group). A bundle is (group index, bundle index).
        self.pgs: list[Any] = []
        self.target = cfg.workers  # the worker count recovery restores (changed by scale)
        self.placement = None
        self.workers: list[Any] = []  # actor handles in rank order
        self.bundles: list[tuple[int, int]] = []  # placement-group bundle of each rank
        self.infos: list[dict[str, Any]] = []
        self.step = 0
        self.last_row: dict[str, Any] | None = None  # its loads choose the experts a resize splits
        self.last_state_bytes = 0  # tensor bytes the workers sent for the last state()
        self.last_load_bytes = 0  # tensor bytes the workers fetched in the last load_state()
        self._spawned = 0  # actors started so far (names stay unique across replacements)
        self._growth: _Growth | None = None  # new workers starting ahead of a live scale-up
        self._actor_cls = None
        self.torch_traces: dict[str, bytes] = {}  # file name -> Chrome trace, until taken
        self.trace: dict[int, dict[int, list[list[Any]]]] = {}  # traced step -> rank -> events

    # ------------------------------------------------------------------ start
    def start(self) -> list[dict[str, Any]]:
        """Placement group, worker actors, rendezvous. Cleans up everything on failure."""
        try:
            return self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> list[dict[str, Any]]:
        import ray
        from ray.util.placement_group import placement_group

        W = self.cfg.workers
        if self.gpus is None:
            self.gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= W else 0.0
        bundle = self.worker_bundle()
        self.pgs = [placement_group([dict(bundle) for _ in range(W)], strategy=self.strategy)]
        try:
            ray.get(self.pgs[0].ready(), timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PlacementTimeoutError(
                f"could not place {W} workers x {{{_resources_text(bundle)}}} ({self.strategy}) within "
                f"{self.start_timeout_s:g} s; the cluster has {_resources_text(ray.cluster_resources())} in all, "
                f"{_resources_text(ray.available_resources())} free"
            ) from None
        # Ranks ordered by node so neighbouring ranks share a node (cheaper exchanges): rank r
        # runs in bundle order[r], known before any actor starts, so names can carry the rank.
        order = self._bundles_by_node([(0, b) for b in range(W)])
        self.bundles = order
        self.workers = [self._spawn(b, f"rank{rank}-of{W}") for rank, b in enumerate(order)]
        return self._form_group()

    def worker_bundle(self) -> dict[str, float]:
        """The resources of one worker's placement-group bundle."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def _bundles_by_node(self, bundles) -> list[tuple[int, int]]:
        import ray
        from ray.util.placement_group import placement_group_table

        node_addr = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        tables = [placement_group_table(pg)["bundles_to_node_id"] for pg in self.pgs]
        return sorted(bundles, key=lambda b: (node_addr.get(tables[b[0]].get(b[1]), ""), b))

    def _all_bundles(self) -> list[tuple[int, int]]:
        return [(g, b) for g, pg in enumerate(self.pgs) if pg is not None for b in range(pg.bundle_count)]

    def _spawn(self, bundle: tuple[int, int], label: str):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from moedist.runtime.worker import Worker

        job = ray.get_runtime_context().get_job_id()
        self._spawned += 1
        opts = {
            "num_cpus": self.cpus,
            "num_gpus": self.gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pgs[bundle[0]],
                                                                    placement_group_bundle_index=bundle[1]),
            "name": f"moedist-worker-{label}-job{job}-{id(self):x}-{self._spawned}",
            "max_restarts": 0,  # the coordinator replaces lost workers itself (state comes from a checkpoint)
        }
        if self._actor_cls is None:  # one actor class for every worker and replacement
            self._actor_cls = ray.remote(Worker)
        return self._actor_cls.options(**opts).remote(to_dict(self.cfg))

    def _form_group(self, placement: ExpertPlacement | None = None) -> list[dict[str, Any]]:
        """Rendezvous of the current workers (in rank order) and a fresh model on each, its
        experts placed by `placement` (None: contiguous blocks, as at start and after a
        lost worker, when every worker is restored from a whole-model checkpoint anyway)."""
        from moedist.parallel.placement import ExpertPlacement

        W = len(self.workers)
        self.cfg.workers = W
        E = self.cfg.model.n_experts if self.cfg.router.kind != "dense" else W
        if placement is None:
            placement = ExpertPlacement.blocks(E, W)
        if (placement.n_experts, placement.world_size) != (E, W):
            raise ValueError(f"placement of {placement.n_experts} experts on {placement.world_size} workers for a "
                             f"group of {W} workers with {E} experts")  # fmt: skip
        addrs = self._get([w.address.remote() for w in self.workers], "start", WorkerStartError,
                          self.start_timeout_s)  # fmt: skip
        port = self._get(self.workers[0].rendezvous_port.remote(), "start", WorkerStartError, self.start_timeout_s)
        self.placement = placement
        self.infos = self._get(
            [w.setup.remote(r, W, addrs[0], port, self.placement.to_dict(), addrs, to_dict(self.cfg))
             for r, w in enumerate(self.workers)],
            "join the process group",
            WorkerStartError,
            self.start_timeout_s,
        )
        self.step = 0
        return self.infos

    def _get(self, refs, what: str, err: type[JobError] = WorkerDiedError, timeout_s: float | None = None):
        """ray.get with a timeout, turning failures into typed errors.

        Fails fast: results are checked as they arrive, so a dead worker is reported at once
        even while the others wait for it inside a collective. A task error on a survivor
        (its collective lost a peer) is told apart from a real error by giving the other
        workers `grace_s` to report their own fate.
        """
        import ray

        single = not isinstance(refs, list)
        pending = [refs] if single else list(refs)
        timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:  # a hang without a death is a lost worker too (recovery kills it)
                raise err(f"workers did not {what} within {timeout_s:g} s")
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if ready:
                try:
                    ray.get(ready[0])
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                    self._raise_failure(e, [ready[0], *pending], what, err)
        return ray.get(refs)

    def _raise_failure(self, first: Exception, refs: list, what: str, err: type[JobError]) -> None:
        """Classify a failed call: a lost worker (recoverable), a non-finite step (the
        trainer's own error, re-raised as is), or a worker error (fatal)."""
        import ray

        noticed = time.monotonic()
        outcomes = [first]
        # The other workers' fates arrive within the grace: a survivor's collective fails as
        # soon as its peer is gone, so a task error may be a survivor's and the death a peer's.
        # (Collecting them also keeps Ray from printing each as an unhandled error.)
        others = refs[1:]
        done, _ = ray.wait(others, num_returns=len(others), timeout=self.grace_s) if others else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:  # each outcome is classified below
                outcomes.append(e)
        dead = [e for e in outcomes if isinstance(e, ray.exceptions.RayActorError)]
        causes = [getattr(e, "cause", None) for e in outcomes]
        cause = next((c for c in causes if isinstance(c, FloatingPointError)), None)
        if cause is not None:
            raise cause
        if dead or _is_collective_error(first):
            if err is not WorkerDiedError:
                raise err(f"a worker died while trying to {what}: {_short(dead[0] if dead else first)}")
            raise WorkerDiedError(f"a worker died while trying to {what}: {_short(dead[0] if dead else first)}",
                                  noticed) from None  # fmt: skip
        raise (err if err is not WorkerDiedError else WorkerFailedError)(
            f"a worker failed to {what}: {_short(first)}"
        ) from None

    # --------------------------------------------------------- executor calls
    def train_step(self) -> dict[str, Any]:
        """One step on every worker; rank 0's row (already global) plus cluster facts."""
        t0 = time.perf_counter()
        rows = self._get([w.train_step.remote() for w in self.workers], f"finish step {self.step}")
        for r in rows:  # torch.profiler traces of a finished window (the run loop writes them)
            self.torch_traces.update(r.pop(ROW_KEY, {}))
        traced = {rank: r.pop("_trace") for rank, r in enumerate(rows) if "_trace" in r}
        for rank, per_step in traced.items():  # a replayed step's events replace the lost ones
            for step, events in per_step.items():
                self.trace.setdefault(step, {})[rank] = events
        blocks = [r.pop(COMM_BLOCKS_KEY, None) for r in rows]
        row = dict(rows[0])
        row["step_s"] = time.perf_counter() - t0  # wall clock seen by the coordinator
        row["tokens_per_s"] = self.cfg.train.batch_size * self.cfg.model.seq_len / row["step_s"]
        # Communication per part: the slowest rank (a collective ends when its last rank does).
        for key in ("a2a_s", "pool_s", "grad_sync_s", "comm_s"):
            row[key] = max(r.get(key, 0.0) for r in rows)
        row["compute_s"] = max(r["step_s"] - r.get("comm_s", 0.0) for r in rows)
        row["workers"] = len(self.workers)
        if "span_data_s" in rows[0]:  # profile.spans: the slowest worker's spans, and every worker's
            from moedist.training.profile import worker_columns

            row.update(worker_columns(rows, blocks))
        self.step += 1
        self.last_row = row
        return row

    def take_torch_traces(self) -> dict[str, bytes]:
        """The workers' torch.profiler traces that came in (file name -> bytes), once."""
        out, self.torch_traces = self.torch_traces, {}
        return out

    def trace_events(self) -> dict[int, dict[int, list[list[Any]]]]:
        """{step: {rank: events}} of the traced steps (the run loop writes trace.json)."""
        return {step: dict(sorted(per.items())) for step, per in sorted(self.trace.items())}

    def trace_names(self) -> dict[int, str]:
        """Each rank's track name in trace.json: rank, node and process id."""
        return {i["rank"]: f"worker {i['rank']} ({i['node']}, pid {i['pid']})" for i in self.infos}

    def evaluate(self) -> EvalResult:
        ev = self._get([w.evaluate.remote() for w in self.workers], "evaluate")[0]
        return EvalResult.from_json(ev)

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The whole model and optimiser (expert shards of every rank merged, the layout of a
        single-process checkpoint, so eval, generate and resume work with any worker count)."""
        from moedist.parallel.shards import merge_model_shards, merge_optim_shards

        # Rank 0 sends its whole shard, the others only their expert rows (the merge takes
        # everything else from rank 0), so the whole state crosses the object store once.
        shards = self._get([w.shard_state.remote(r == 0) for r, w in enumerate(self.workers)], "save a checkpoint")
        self.last_state_bytes = sum(t.nbytes for t in _tensors([(s["model"], s["optim"]) for s in shards]))
        tensors = {
            "model": merge_model_shards([s["model"] for s in shards], self.placement, shards[0]["expert_keys"]),
            "optim": merge_optim_shards([s["optim"] for s in shards], self.placement, shards[0]["expert_slots"]),
        }
        # Every worker draws the same random numbers (same seed, same calls): rank 0's are the run's.
        return tensors, {"torch_rng": shards[0]["torch_rng"], "skipped_steps": shards[0]["skipped"],
                         "workers": len(self.workers)}  # fmt: skip

    def load_state(self, tensors: dict[str, Any], extra: dict[str, Any], step: int) -> None:
        """Every worker takes its share of a whole-model checkpoint and continues at `step`.

        The state is cut here into one dense part (everything but the routed experts' rows,
        put once, the same for every worker) and each rank's expert rows (one object per
        rank), so a worker fetches the dense part and its own experts only.
        `last_load_bytes` is the sum of what the workers fetched."""
        import ray

        from moedist.parallel.shards import dense_state, split_rows

        keys, slots = self._expert_layout()
        model, optim = tensors["model"], tensors["optim"]
        dense_m, dense_o = dense_state(model, optim, keys, slots)
        rows = split_rows(model, optim, keys, slots, self.placement) if keys else [None] * len(self.workers)
        dense_ref = ray.put({"model": dense_m, "optim": dense_o})
        self._get([w.load_state.remote(dense_ref, ray.put(rows[r]), step, extra) for r, w in enumerate(self.workers)],
                  "load the checkpoint")  # fmt: skip
        dense_bytes = sum(t.nbytes for t in _tensors(dense_m, dense_o))
        row_bytes = sum(t.nbytes for r in rows if r is not None for t in _tensors(r.model, r.optim))
        self.last_load_bytes = dense_bytes * len(self.workers) + row_bytes
        self.step = int(step)

    def _expert_layout(self) -> tuple[list[str], list[int]]:
        """State-dict keys and optimiser slots of the routed experts (sharded entries) of the
        current model, read off a model on the meta device (nothing allocated)."""
        from moedist.model.transformer import MoETransformer
        from moedist.parallel.shards import expert_keys, expert_slots
        from moedist.training.trainer import make_optimizer

        with torch.device("meta"):
            meta = MoETransformer(self.cfg.model, self.cfg.router)
            return expert_keys(meta), expert_slots(meta, make_optimizer(meta, self.cfg))

    def info(self) -> dict[str, Any]:
        return {"workers": len(self.workers), "nodes": len({i["node"] for i in self.infos}),
                "backend": self.infos[0]["backend"] if self.infos else None,
                "keep_heap": self.infos[0].get("keep_heap") if self.infos else None}  # fmt: skip

    def members(self) -> list[dict[str, Any]]:
        """Each worker's rank, node, pid and backend (written to RUN/workers.json)."""
        return [{k: i[k] for k in ("rank", "node", "pid", "backend")} for i in self.infos]

    def param_counts(self) -> dict[str, int]:
        from moedist.model.transformer import MoETransformer

        with torch.device("meta"):  # parameter counts without allocating the model
            return MoETransformer(self.cfg.model, self.cfg.router).param_counts()

    # -------------------------------------------------------------- recovery
    def recover(self, err: Exception | None = None) -> dict[str, float]:
        """Bring the worker group back after a lost worker; the caller then restores state.

        Keeps the workers that answer within the grace period, replaces the others in their
        bundles (waiting up to the start timeout for Ray to place them), goes on with fewer
        workers if some cannot be placed, and re-forms the process group. Returns the
        seconds each part took.
        """
        import ray

        # A scale-up in preparation was sized for the old group and holds resources a
        # replacement may need: drop it (its requester hears why at the next poll).
        self.cancel_scale("a worker was lost while the new workers started; ask again")
        try:
            t0 = time.perf_counter()
            pings = [w.ping.remote() for w in self.workers]
            done, _ = ray.wait(pings, num_returns=len(pings), timeout=self.grace_s)
            done_set = set(done)
            keep: list[tuple[Any, int]] = []
            for w, b, ref in zip(self.workers, self.bundles, pings, strict=True):
                ok = False
                if ref in done_set:
                    with contextlib.suppress(Exception):
                        ray.get(ref)
                        ok = True
                if ok:
                    keep.append((w, b))
                else:
                    with contextlib.suppress(Exception):
                        ray.kill(w, no_restart=True)
            t1 = time.perf_counter()

            # Replacements in the free bundles; Ray moves a bundle whose node is gone to a node
            # with room. An actor placed before Ray noticed the node's death dies at once: retry.
            held = {b for _, b in keep}
            free = [b for b in self._all_bundles() if b not in held]
            keep += self._replace(free[: max(0, self.target - len(keep))], self.replace_timeout_s)
            counts = valid_worker_counts(self.cfg, len(keep))
            if not counts:
                raise WorkerStartError(f"no worker could be started or kept after the failure ({err})")
            # Fewer workers than bundles (no room): keep the largest count the job can run with.
            while len(keep) > counts[0]:
                w, _ = keep.pop()
                with contextlib.suppress(Exception):
                    ray.kill(w, no_restart=True)
            t2 = time.perf_counter()

            self._get([w.reset.remote() for w, _ in keep], "leave the old process group", WorkerStartError,
                      self.start_timeout_s)  # fmt: skip
            by_bundle = dict((b, w) for w, b in keep)
            self.bundles = self._bundles_by_node(by_bundle)
            self.workers = [by_bundle[b] for b in self.bundles]
            self._form_group()
            t3 = time.perf_counter()
        except BaseException:
            self.shutdown()
            raise
        return {"probe_s": t1 - t0, "actor_start_s": t2 - t1, "group_s": t3 - t2, "workers_after": len(self.workers)}

    def _replace(
        self, bundles: list[tuple[int, int]], timeout_s: float | None = None
    ) -> list[tuple[Any, tuple[int, int]]]:
        """Start a worker in each bundle, retrying actors that die while starting, until the
        timeout (default: the start timeout); bundles still without a live worker then are
        left out."""
        import ray

        deadline = time.monotonic() + (self.start_timeout_s if timeout_s is None else timeout_s)
        started: list[tuple[Any, int]] = []
        todo = list(bundles)
        while todo and time.monotonic() < deadline:
            fresh = [(self._spawn(b, f"bundle{b[0]}.{b[1]}"), b) for b in todo]
            refs = [w.warm.remote() for w, _ in fresh]  # started and warmed up, or dead
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            todo = []
            for (w, b), ref in zip(fresh, refs, strict=True):
                ok = False
                if ref in ready:
                    with contextlib.suppress(Exception):
                        ray.get(ref)
                        ok = True
                if ok:
                    started.append((w, b))
                else:
                    with contextlib.suppress(Exception):
                        ray.kill(w, no_restart=True)
                    if ref in ready:  # died while starting (its node was lost): try again
                        todo.append(b)
            if todo:
                time.sleep(0.5)
        return started

    # --------------------------------------------------------- live scaling
    def scale(self, workers: int | None = None, experts: int | None = None, noise: float = 0.0) -> dict[str, Any]:
        """Change the worker count and/or the expert count at a step boundary, without a
        checkpoint or a restart.

        Experts: see `_resize_experts`. Workers:

        New workers start in a new placement group (Ray cannot grow one); if it cannot be
        placed within the start timeout the request is refused (ScaleError) and the job goes
        on as it was. Otherwise every worker publishes, through the object store, the rows of
        each expert whose owner changes under the new placement (ExpertPlacement.rebalance:
        balanced, and the fewest experts change owner; staying workers keep their ranks) with
        their optimiser state; the group is re-formed with a fresh rendezvous; each worker takes
        its experts (kept ones from its own memory, moved ones straight from their old
        owner), new workers take the dense replica and router state from rank 0; leaving
        workers are stopped. Batches are global, so the run's losses do not change.
        Returns what was done and how long each part took.
        """
        report: dict[str, Any] = {}
        if workers is not None:
            report.update(self._scale_workers(int(workers)))
        if experts is not None:
            report.update(self._resize_experts(int(experts), noise))
        return report

    def _resize_experts(self, n_experts: int, noise: float) -> dict[str, Any]:
        """Gather the whole model (as for a checkpoint, in memory), split or drop experts,
        rebuild every worker's model for the new count and hand each its share (the dense
        part and its own expert rows, see `load_state`)."""
        from moedist.training.trainer import check_resize, resize_experts

        E = self.cfg.model.n_experts
        check_resize(self.cfg, n_experts, len(self.workers))
        if n_experts == E:
            return {"experts_before": E, "experts_after": E, "layers": []}
        t0 = time.perf_counter()
        step = self.step
        tensors, extra = self.state()  # merged by the current placement, whatever its table
        old_model, old_optim = tensors["model"], tensors["optim"]
        gathered = self.last_state_bytes
        new_cfg, tensors, layers = resize_experts(self.cfg, tensors, n_experts, self.last_row, noise)
        self._get([w.reset.remote() for w in self.workers], "leave the old process group")
        self.cfg.model.n_experts = new_cfg.model.n_experts
        # Expert ids change (copies are appended, dropped ones renumber the rest), and every
        # worker takes its rows from the driver anyway: contiguous blocks of the new count.
        self._form_group()
        self.load_state(tensors, extra, step)
        self.last_row = None  # its loads were the old experts'
        # Bytes through the object store: what the workers sent here (rank 0's whole shard,
        # the others' expert rows: the whole old state once), then what they fetched (the
        # dense part each, its own expert rows each).
        before = sum(t.nbytes for t in _tensors(old_model, old_optim))
        whole = sum(t.nbytes for t in _tensors(tensors["model"], tensors["optim"]))
        return {"experts_before": E, "experts_after": n_experts, "layers": layers,
                "bytes_moved": gathered + self.last_load_bytes, "bytes_gathered": gathered,
                "bytes_loaded": self.last_load_bytes, "state_bytes_before": before,
                "state_bytes_after": whole, "resize_s": time.perf_counter() - t0}  # fmt: skip

    def _check_count(self, N: int) -> None:
        W = len(self.workers)
        if N < 1 or N not in valid_worker_counts(self.cfg, N):
            t = self.cfg.train
            raise ScaleError(
                f"cannot run on {N} workers: each needs at least one of {self.cfg.model.n_experts} experts and an "
                f"equal share of every micro-batch (batch_size {t.batch_size}, micro_batches {t.micro_batches}); "
                f"possible: {valid_worker_counts(self.cfg, 4 * max(W, N))[::-1]}"
            )

    def prepare_scale(self, workers: int) -> None:
        """Start, without waiting, what a scale-up to `workers` needs: a placement group for
        the new workers, their actors, and their warm-up (imports, dataset, a throwaway
        step). The job trains on meanwhile; `scale_ready` tells when `scale(workers=...)`
        can switch to them with a short pause. A count the job cannot run with raises
        ScaleError at once; nothing is prepared for a shrink (it needs no new workers)."""
        from ray.util.placement_group import placement_group

        N = int(workers)
        self._check_count(N)
        g = self._growth
        if g is not None and not g.error and g.workers == N and g.from_workers == len(self.workers):
            return
        self.cancel_scale()  # a request for another count (or after a cancelled one) replaces it
        if len(self.workers) >= N:
            return
        self.release_idle_groups()  # their resources serve the new workers instead
        pg = placement_group([self.worker_bundle() for _ in range(N - len(self.workers))], strategy=self.strategy)
        self.pgs.append(pg)
        now = time.monotonic()
        self._growth = _Growth(N, len(self.workers), len(self.pgs) - 1, pg.ready(), now, now + self.start_timeout_s)

    def scale_ready(self) -> bool:
        """True when no scale-up is in preparation or its new workers are up and warm (never
        blocks). Raises ScaleError, and drops the preparation, if they could not be placed or
        started within the start timeout."""
        import ray

        g = self._growth
        if g is None:
            return True
        if g.error:
            self._growth = None
            raise ScaleError(g.error)
        late = time.monotonic() > g.deadline
        if g.warm_refs is None:  # waiting for the placement group
            if not ray.wait([g.pg_ready], timeout=0)[0]:
                if late:
                    self.cancel_scale()
                    raise ScaleError(
                        f"could not place {g.workers - g.from_workers} more workers x "
                        f"{{{_resources_text(self.worker_bundle())}}} within {self.start_timeout_s:g} s "
                        f"({_resources_text(ray.available_resources())} free); the job goes on with "
                        f"{len(self.workers)} workers"
                    )
                return False
            g.started_s = time.monotonic()
            g.fresh = [self._spawn((g.group, b), f"bundle{g.group}.{b}") for b in range(g.workers - g.from_workers)]
            g.warm_refs = [w.warm.remote() for w in g.fresh]
        ready, _ = ray.wait(g.warm_refs, num_returns=len(g.warm_refs), timeout=0)
        for i, ref in enumerate(g.warm_refs):
            if ref in ready and not isinstance(g.warm_s[i], float):
                try:
                    g.warm_s[i] = float(ray.get(ref))
                except Exception as e:  # died while starting (its node lost?): start another
                    g.failures += 1
                    if g.failures > 2 * len(g.fresh):
                        self.cancel_scale()
                        raise ScaleError(f"new workers keep failing to start ({_short(e)}); the job goes on "
                                         f"with {len(self.workers)} workers") from None  # fmt: skip
                    with contextlib.suppress(Exception):
                        ray.kill(g.fresh[i], no_restart=True)
                    g.fresh[i] = self._spawn((g.group, i), f"bundle{g.group}.{i}")
                    g.warm_refs[i] = g.fresh[i].warm.remote()
        if all(isinstance(x, float) for x in g.warm_s):
            return True
        if late:
            self.cancel_scale()
            raise ScaleError(f"new workers did not start within {self.start_timeout_s:g} s; the job goes on "
                             f"with {len(self.workers)} workers")  # fmt: skip
        return False

    def cancel_scale(self, why: str = "") -> None:
        """Drop a scale-up in preparation: stop its actors, free its placement group. With a
        reason, the next `scale_ready` raises ScaleError with it."""
        from ray.util.placement_group import remove_placement_group

        g = self._growth
        if g is None:
            return
        for w in g.fresh or []:
            _stop(w)
        with contextlib.suppress(Exception):
            remove_placement_group(self.pgs[g.group])
        self.pgs[g.group] = None
        if why:
            g.error, g.fresh, g.warm_refs = f"the scale-up to {g.workers} workers was cancelled: {why}", [], []
        else:
            self._growth = None

    def _scale_workers(self, N: int) -> dict[str, Any]:
        from moedist.parallel.placement import ExpertPlacement

        W = len(self.workers)
        if N == W:
            self.cancel_scale()
            return {"workers_before": W, "workers_after": W, "experts_moved": 0}
        self._check_count(N)
        t0 = time.perf_counter()
        fresh: list[tuple[Any, tuple[int, int]]] = []
        prepared = {}
        if N > W:
            # Started ahead (the control API asks for it and switches once they are warm),
            # or now, waiting here.
            self.prepare_scale(N)
            while not self.scale_ready():
                time.sleep(0.02)
            g, self._growth = self._growth, None
            fresh = [(w, (g.group, b)) for b, w in enumerate(g.fresh)]
            prepared = {"prepared_s": g.started_s - g.created, "warm_s": max(g.warm_s)}
        else:
            self.cancel_scale()
        t1 = time.perf_counter()

        step = self.step
        E = self.cfg.model.n_experts if self.cfg.router.kind != "dense" else N
        # The fewest experts change owner (a dense model's placement only names the ranks).
        new = ExpertPlacement.rebalance(self.placement, N) if self.cfg.router.kind != "dense" else \
            ExpertPlacement.blocks(E, N)  # fmt: skip
        pub = self._get([w.publish.remote(new.to_dict(), r == 0 and N > W) for r, w in enumerate(self.workers)],
                        "hand over their experts")  # fmt: skip
        leaving = self.workers[N:]
        self._get([w.reset.remote() for w in self.workers], "leave the old process group")
        # Staying workers keep their ranks (so fewer experts move); new ones come after.
        self.workers = self.workers[:N] + [w for w, _ in fresh]
        self.bundles = self.bundles[:N] + [b for _, b in fresh]
        self._form_group(new)
        t2 = time.perf_counter()
        dense_ref = pub[0]["dense"]
        calls = []
        for r, w in enumerate(self.workers):
            refs = [p["parts"][r] for p in pub if r in p["parts"]]
            calls.append(w.adopt.remote(refs, [dense_ref] if r >= W else []))
        got = self._get(calls, "take over their experts")
        moved, nbytes = sum(g["experts_in"] for g in got), sum(g["bytes_in"] for g in got)
        self.step = step
        t3 = time.perf_counter()
        for w in leaving:
            _stop(w)
        self.release_idle_groups()  # a group none of whose bundles is used any more
        self.target = N
        return {"workers_before": W, "workers_after": N, "experts_moved": moved, "bytes_moved": nbytes,
                "actor_start_s": t1 - t0, **prepared,
                "group_s": t2 - t1, "move_s": t3 - t2, "total_s": time.perf_counter() - t0}  # fmt: skip

    def idle_groups(self) -> list[int]:
        """Indices of the placement groups none of whose bundles holds a worker: left by a
        recovery that went on with fewer workers (Ray re-places their bundles when a node
        has room again, so they may hold resources no worker uses)."""
        held = {g for g, _ in self.bundles}
        if self._growth is not None:  # the group of a scale-up in preparation is not idle
            held.add(self._growth.group)
        return [g for g, pg in enumerate(self.pgs) if pg is not None and g not in held]

    def release_idle_groups(self) -> int:
        """Remove the idle placement groups (growth starts its workers in a new group, so
        their bundles would only keep its resources away); the bundles released."""
        from ray.util.placement_group import remove_placement_group

        released = 0
        for g in self.idle_groups():
            released += self.pgs[g].bundle_count
            with contextlib.suppress(Exception):
                remove_placement_group(self.pgs[g])
            self.pgs[g] = None
        return released

    # -------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Stop every worker and remove the placement group (safe to call twice)."""
        with contextlib.suppress(Exception):
            self.cancel_scale()
        self._growth = None
        for w in self.workers:
            _stop(w)
        self.workers = []
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs:
            if pg is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(pg)
        self.pgs = []


@dataclass
class _Growth:
    """A scale-up in preparation: its placement group, then its actors warming up."""

    workers: int  # the worker count it grows to
    from_workers: int  # the count it was sized for
    group: int  # index of its placement group in Coordinator.pgs
    pg_ready: Any  # ObjectRef of the group's ready()
    created: float  # time.monotonic() when it was asked for
    deadline: float  # time.monotonic() by which it must be ready
    started_s: float = 0.0  # time.monotonic() when the group was placed and the actors started
    fresh: list[Any] | None = None
    warm_refs: list[Any] | None = None
    warm_s: list[float | None] = field(default_factory=list)
    failures: int = 0
    error: str = ""  # set when cancelled with a reason: the next scale_ready raises it

    def __post_init__(self) -> None:
        self.warm_s = [None] * (self.workers - self.from_workers)


def _stop(worker: Any) -> None:
    """Let a worker leave its process group, then end its actor (a dead one cannot say goodbye)."""
    import ray

    with contextlib.suppress(Exception):
        ray.get(worker.shutdown.remote(), timeout=10)
    with contextlib.suppress(Exception):
        ray.kill(worker, no_restart=True)


def _short(e: BaseException) -> str:
    """The first line of an error's message (Ray's carry whole remote tracebacks)."""
    cause = getattr(e, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _is_collective_error(e: BaseException) -> bool:
    """True for a worker error raised by torch.distributed (a peer of the collective is gone)."""
    import torch.distributed as dist

    cause = getattr(e, "cause", None)
    return isinstance(cause, dist.DistError) or (
        isinstance(cause, RuntimeError) and any(s in str(cause) for s in ("Connection closed by peer", "Gloo",
                                                                           "gloo", "NCCL", "Socket Timeout"))
    )  # fmt: skip

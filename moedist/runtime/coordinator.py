"""The coordinator: owns an expert-parallel job on a Ray cluster.

It reserves a placement group (one bundle per worker), starts the worker actors pinned to
the bundles, orders ranks by node, runs the torch.distributed rendezvous on rank 0's node
address, drives the steps, gathers metrics and writes the run folder (the same layout as a
single-process run). Any failure to start or a dead worker becomes a typed error, and
`shutdown` always removes the actors and the placement group.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
import torch

from moedist.config import RunConfig, to_dict


class JobError(RuntimeError):
    """Base of the runtime's typed errors."""


class PlacementTimeoutError(JobError):
    """The cluster could not place every worker within the timeout."""


class WorkerStartError(JobError):
    """A worker actor failed to start or to join the process group."""


class WorkerDiedError(JobError):
    """A worker actor died while the job ran."""


def _resources_text(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU", "memory"))


class Coordinator:
    """Drives W workers through cfg.train.steps optimiser steps."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        strategy: str = "PACK",
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float | None = None,
        timeout_s: float = 120.0,
    ):
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement strategy '{strategy}' is not one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.strategy = strategy
        self.cpus = cpus_per_worker
        self.gpus = gpus_per_worker
        self.timeout_s = timeout_s
        self.pg = None
        self.placement = None
        self.workers: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.step = 0
        self.last_eval: dict[str, Any] | None = None
        self._t_start = time.perf_counter()
        self._first_step = 0

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
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from moedist.parallel.placement import ExpertPlacement
        from moedist.runtime.worker import Worker

        W = self.cfg.workers
        gpus = self.gpus if self.gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) >= W else 0.0)
        bundle = {"CPU": self.cpus, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(W)], strategy=self.strategy)
        try:
            ray.get(self.pg.ready(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PlacementTimeoutError(
                f"could not place {W} workers x {{{_resources_text(bundle)}}} ({self.strategy}) within "
                f"{self.timeout_s:g} s; the cluster has {_resources_text(ray.cluster_resources())} in all, "
                f"{_resources_text(ray.available_resources())} free"
            ) from None

        # Ranks ordered by node so neighbouring ranks share a node (cheaper exchanges): rank r
        # runs in bundle order[r], known before any actor starts, so names can carry the rank.
        node_addr = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        bundle_node = placement_group_table(self.pg)["bundles_to_node_id"]
        order = sorted(range(W), key=lambda b: (node_addr.get(bundle_node[b], ""), b))
        actor_cls = ray.remote(Worker)
        cfg_dict = to_dict(self.cfg)
        job = ray.get_runtime_context().get_job_id()
        for rank, b in enumerate(order):
            opts = {
                "num_cpus": self.cpus,
                "num_gpus": gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=b),
                "name": f"moedist-worker-rank{rank}-of{W}-job{job}-{id(self):x}",
                "max_restarts": 0,
            }
            self.workers.append(actor_cls.options(**opts).remote(cfg_dict, rank, W))
        addrs = self._get([w.address.remote() for w in self.workers], "start", WorkerStartError)
        port = self._get(self.workers[0].rendezvous_port.remote(), "start", WorkerStartError)
        self.placement = ExpertPlacement(self.cfg.model.n_experts, W)
        self.infos = self._get(
            [w.setup.remote(r, addrs[0], port, self.placement.to_dict(), addrs) for r, w in enumerate(self.workers)],
            "join the process group",
            WorkerStartError,
        )
        return self.infos

    def _get(self, refs, what: str, err: type[JobError] = WorkerDiedError):
        """ray.get with the timeout, turning actor failures into typed errors.

        Fails fast: results are checked as they arrive, so a dead worker is reported at once
        even while the others wait for it inside a collective (until shutdown kills them).
        """
        import ray

        single = not isinstance(refs, list)
        pending = [refs] if single else list(refs)
        deadline = time.monotonic() + self.timeout_s
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ray.exceptions.GetTimeoutError()
                ready, pending = ray.wait(pending, num_returns=1, timeout=left)
                if ready:
                    ray.get(ready[0])  # raises this task's error, if any
            return ray.get(refs)
        except ray.exceptions.GetTimeoutError:
            raise err(f"workers did not {what} within {self.timeout_s:g} s") from None
        except ray.exceptions.RayActorError as e:
            raise err(f"a worker died while trying to {what}: {e}") from e
        except ray.exceptions.RayTaskError as e:
            raise err(f"a worker failed to {what}: {e}") from e

    # ------------------------------------------------------------------- run
    def train_step(self) -> dict[str, Any]:
        """One step on every worker; rank 0's row (already global) plus cluster facts."""
        t0 = time.perf_counter()
        rows = self._get([w.train_step.remote() for w in self.workers], f"finish step {self.step}")
        row = dict(rows[0])
        row["step_s"] = time.perf_counter() - t0  # wall clock seen by the coordinator
        row["tokens_per_s"] = self.cfg.train.batch_size * self.cfg.model.seq_len / row["step_s"]
        # Communication per part: the slowest rank (a collective ends when its last rank does).
        for key in ("a2a_s", "pool_s", "grad_sync_s", "comm_s"):
            row[key] = max(r.get(key, 0.0) for r in rows)
        row["compute_s"] = max(r["step_s"] - r.get("comm_s", 0.0) for r in rows)
        self.step += 1
        return row

    def evaluate(self) -> dict[str, Any]:
        self.last_eval = self._get([w.evaluate.remote() for w in self.workers], "evaluate")[0]
        return self.last_eval

    def save(self) -> Path:
        """Checkpoint with the layout of a single-process run: the expert shards of every
        rank are merged into one whole model (and optimiser) state, so eval, generate and
        resume work on it with any number of workers."""
        from moedist.parallel.shards import merge_model_shards, merge_optim_shards
        from moedist.training.checkpoint import save_checkpoint
        from moedist.training.trainer import load_dataset, parquet_bytes

        shards = self._get([w.shard_state.remote() for w in self.workers], "save a checkpoint")
        tensors = {
            "model": merge_model_shards([s["model"] for s in shards], self.placement, shards[0]["expert_keys"]),
            "optim": merge_optim_shards([s["optim"] for s in shards], self.placement, shards[0]["expert_slots"]),
        }
        state = {
            "step": self.step,
            "workers": len(self.workers),
            "tokenizer": load_dataset(self.cfg).tokenizer.to_spec(),
            "config": to_dict(self.cfg),
            "torch_rng": torch.get_rng_state().tolist(),
        }
        return save_checkpoint(self.run_dir, self.step, tensors, state,
                               blobs={"metrics.parquet": parquet_bytes(self.rows)},
                               keep=self.cfg.train.keep_checkpoints)  # fmt: skip

    def restore(self) -> int:
        """Continue from the run folder's newest checkpoint (call after start): every worker
        takes its share of the whole-model state. Returns the step reached."""
        import ray

        from moedist.training.trainer import read_resume_checkpoint

        objs, state, rows, _ = read_resume_checkpoint(self.run_dir, self.cfg)
        model_ref, optim_ref = ray.put(objs["model"]), ray.put(objs["optim"])  # one copy for all workers
        self._get([w.load_state.remote(model_ref, optim_ref, state["step"]) for w in self.workers],
                  "load the checkpoint")  # fmt: skip
        self.step = int(state["step"])
        self.rows = rows
        return self.step

    def begin(self) -> None:
        """Write the resolved config into the run folder and start the clock."""
        from moedist.training.trainer import write_atomic

        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / "config.toml", tomli_w.dumps(to_dict(self.cfg)).encode())
        self._t_start = time.perf_counter()
        self._first_step = self.step

    def run_steps(self, n: int) -> list[dict[str, Any]]:
        """Up to n more steps (evaluating and checkpointing on schedule); their metric rows."""
        cfg = self.cfg
        out = []
        for _ in range(n):
            if self.step >= cfg.train.steps:
                break
            row = self.train_step()
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                row["val_loss"] = self.evaluate()["val_loss"]
            self.rows.append(row)
            out.append(row)
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                self.save()
        return out

    def finish(self) -> dict[str, Any]:
        """Final evaluation and checkpoint; write metrics, summary and plots; the summary."""
        from moedist.training.evaluate import EvalResult
        from moedist.training.plots import write_plots
        from moedist.training.trainer import parquet_bytes, write_atomic

        ev = self.evaluate()
        if self.rows:
            self.rows[-1]["val_loss"] = ev["val_loss"]
        self.save()
        wall = time.perf_counter() - self._t_start
        write_atomic(self.run_dir / "metrics.parquet", parquet_bytes(self.rows))
        summary = self.summary(wall, self.step - self._first_step)
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1).encode())
        write_plots(self.run_dir, self.rows, EvalResult(ev["val_loss"], ev["tokens"], ev["fanout_hist"], ev["load"]))
        return summary

    def run(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """begin, every step, finish (in-process use)."""
        self.begin()
        while self.step < self.cfg.train.steps:
            for row in self.run_steps(1):
                if on_step:
                    on_step(row)
        return self.finish()

    def summary(self, wall_s: float, steps_this_run: int) -> dict[str, Any]:
        """summary.json: the single-process keys plus workers, nodes and communication."""
        import numpy as np

        from moedist.model.transformer import MoETransformer
        from moedist.training.evaluate import EvalResult
        from moedist.training.trainer import run_summary

        with torch.device("meta"):  # parameter counts without allocating the model
            counts = MoETransformer(self.cfg.model, self.cfg.router).param_counts()
        ev = self.last_eval
        ev_res = EvalResult(ev["val_loss"], ev["tokens"], ev["fanout_hist"], ev["load"]) if ev else None
        out = run_summary(self.cfg, self.rows, self.step, wall_s, steps_this_run, ev_res, counts)
        out["workers"] = len(self.workers)
        out["nodes"] = len({i["node"] for i in self.infos})
        out["backend"] = self.infos[0]["backend"] if self.infos else None
        # Mean seconds per step (slowest rank of each step) for each part of the step.
        for key in ("step_s", "compute_s", "comm_s", "a2a_s", "pool_s", "grad_sync_s"):
            out[f"{key}_per_step"] = float(np.mean([r.get(key, 0.0) for r in self.rows])) if self.rows else 0.0
        return out

    # -------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Stop every worker and remove the placement group (safe to call twice)."""
        import ray

        for w in self.workers:
            with contextlib.suppress(Exception):  # a dead worker cannot say goodbye
                ray.get(w.shutdown.remote(), timeout=10)
            with contextlib.suppress(Exception):
                ray.kill(w)
        self.workers = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(self.pg)
            self.pg = None


def run_job(
    cfg: RunConfig,
    run_dir: Path,
    strategy: str = "PACK",
    cpus_per_worker: float = 1.0,
    timeout_s: float = 120.0,
    on_start: Callable[[list[dict[str, Any]]], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    chunk: int = 1,
    resume: bool = False,
) -> dict[str, Any]:
    """Run a job with the Coordinator as a Ray actor on the driver's node (so the run folder
    is written where the driver can read it); the driver only relays progress. The
    coordinator's shutdown (actors, placement group) runs whatever happens. `resume`
    continues from run_dir's newest checkpoint (written with any number of workers)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(Coordinator).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False), max_restarts=0
    )
    coord = actor_cls.remote(cfg, run_dir, strategy, cpus_per_worker, None, timeout_s)
    try:
        infos = ray.get(coord.start.remote())
        done = ray.get(coord.restore.remote()) if resume else 0
        if on_start:
            on_start(infos)
        ray.get(coord.begin.remote())
        while done < cfg.train.steps:
            rows = ray.get(coord.run_steps.remote(chunk))
            if not rows:
                break
            done += len(rows)
            for row in rows:
                if on_step:
                    on_step(row)
        return ray.get(coord.finish.remote())
    except ray.exceptions.RayTaskError as e:
        # Re-raise the coordinator's own typed error (PlacementTimeoutError, ...) as itself.
        if isinstance(e.cause, JobError):
            raise e.cause from None
        raise
    finally:
        try:
            ray.get(coord.shutdown.remote(), timeout=60)
        finally:
            ray.kill(coord)

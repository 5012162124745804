"""The worker: one Ray actor per rank, holding the dense replica, its expert shard and its
share of every batch. The coordinator drives it step by step.

This module is plain Python; the coordinator turns `Worker` into a Ray actor class with
resource options, so the same class also runs in-process in tests.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch

from moedist.config import RunConfig, from_dict, to_dict
from moedist.training.profile import COMM_BLOCKS_KEY
from moedist.training.torch_profile import ROW_KEY


def node_address() -> str:
    """The address Ray knows this node by (127.0.0.x on a local multi-raylet cluster)."""
    import ray

    return ray.util.get_node_ip_address()


def cpu_share() -> int:
    """CPUs Ray assigned to this actor (at least 1)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # outside Ray
        cpus = float(os.cpu_count() or 1)
    return max(1, round(cpus))


class Worker:
    """One rank of an expert-parallel job."""

    def __init__(self, cfg_dict: dict[str, Any]):
        self.cfg: RunConfig = from_dict(cfg_dict)
        if self.cfg.train.keep_heap:  # once per worker process, before any model exists
            from moedist.training.heap import keep_heap

            keep_heap()
        self.rank, self.world = -1, 0
        self.trainer = None
        self._listen = None  # rank 0: the rendezvous store's socket, from rendezvous_port to setup
        self._stash: dict[str, Any] | None = None  # own state between publish and adopt (rescaling)
        self._dataset: tuple[tuple[str, int], Any] | None = None  # (data path, seq_len) -> dataset, kept across setups
        # Each worker uses its CPU share for intra-op threads (torch's and numba's), so W
        # workers on a node do not oversubscribe its cores (OpenMP threads that spin on a busy
        # core are very slow).
        from moedist.training.trainer import set_threads

        set_threads(self.cfg.train.threads or cpu_share())

    # ------------------------------------------------------------ rendezvous
    def address(self) -> str:
        return node_address()

    def rendezvous_port(self) -> int:
        """Port of the torch.distributed store this worker (rank 0) will host: the socket is
        bound now, on this node's address, and kept until setup."""
        from moedist.parallel.group import listen_socket

        self._listen = listen_socket(node_address())
        return int(self._listen.getsockname()[1])

    def warm(self) -> float:
        """Do now, before joining a group, what a fresh process would otherwise do in its
        first setup and step: import the training code (torch's optimiser pulls in
        torch._dynamo, over a second), open the dataset and run one throwaway step of a
        one-layer copy of the model (compiling the numba kernels). A worker started ahead of
        a live scale-up does this while the job still trains, so the pause at the switch is
        only the rendezvous and the hand-over. Returns the seconds it took."""
        from moedist.training.trainer import Trainer

        t0 = time.perf_counter()
        cfg = from_dict(to_dict(self.cfg))
        cfg.workers = 1
        cfg.model.n_layers = 2 if cfg.model.first_layer_dense else 1  # one MoE layer is enough
        cfg.train.micro_batches = 1
        cfg.train.batch_size = 1
        cfg.profile.torch_profile = ""
        # The throwaway step must not trip the run's own guards: no eval, no checkpoint.
        Trainer(cfg, self._load_dataset()).train_step()
        return time.perf_counter() - t0

    def _load_dataset(self):
        """The run's dataset, opened once per worker process (a re-formed group reuses it)."""
        from moedist.training.trainer import load_dataset

        key = (self.cfg.data.path, self.cfg.model.seq_len)
        if self._dataset is None or self._dataset[0] != key:
            self._dataset = (key, load_dataset(self.cfg))
        return self._dataset[1]

    def ping(self) -> int:
        """Answers once any task in flight has finished (the coordinator's liveness probe)."""
        return os.getpid()

    def setup(
        self,
        rank: int,
        world: int,
        master_addr: str,
        master_port: int,
        placement: dict[str, Any],
        nodes: list[str] | None = None,
        cfg_dict: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Join a process group of `world` ranks as `rank`; build a fresh model shard (from
        the seed) and the data sampler; `cfg_dict` replaces the config (a resized job)."""
        from moedist.parallel.exchange import sweep_stale_segments
        from moedist.parallel.group import init_group
        from moedist.parallel.placement import ExpertPlacement
        from moedist.training.heap import keep_heap_status
        from moedist.training.trainer import DistContext, Trainer

        sweep_stale_segments()  # /dev/shm files of killed workers ([comm] shm), on or off now
        if cfg_dict is not None:
            self.cfg = from_dict(cfg_dict)
        self.rank, self.world = rank, world
        self.cfg.workers = world
        t0 = time.perf_counter()
        listen, self._listen = self._listen, None
        backend = init_group(rank, self.world, master_addr, master_port, node_address(), listen=listen)
        dataset = self._load_dataset()
        ctx = DistContext(rank=rank, world=self.world, placement=ExpertPlacement.from_dict(placement), nodes=nodes)
        self.trainer = Trainer(self.cfg, dataset, ctx)
        return {
            "rank": rank,
            "node": node_address(),
            "pid": os.getpid(),
            "backend": backend,
            "threads": torch.get_num_threads(),
            "keep_heap": keep_heap_status(),
            "setup_s": time.perf_counter() - t0,
        }

    # ----------------------------------------------------------------- steps
    def train_step(self) -> dict[str, Any]:
        """The step's row; a traced step's events ride along under "_trace", torch.profiler
        traces under ROW_KEY, the communication blocks (spans on) under COMM_BLOCKS_KEY (the
        coordinator takes them out: the run folder is on the driver's machine, and the
        blocks are paired across workers there)."""
        row = self.trainer.train_step()
        blocks = self.trainer.take_comm_blocks()
        if blocks:
            row[COMM_BLOCKS_KEY] = blocks
        trace = self.trainer.take_trace()
        if trace:
            row["_trace"] = trace
        traces = self.trainer.take_torch_traces()
        if traces:
            row[ROW_KEY] = traces
        return row

    def evaluate(self) -> dict[str, Any]:
        return self.trainer.evaluate().to_json()

    # ------------------------------------------------------------ state
    def shard_state(self, with_dense: bool = True) -> dict[str, Any]:
        """This rank's model shard and optimiser state, and which entries are expert shards
        (the coordinator merges them into a whole-model checkpoint). Without the dense
        part: the expert rows only (the merge takes the rest from rank 0)."""
        from moedist.parallel.shards import expert_keys, expert_part, expert_slots

        tr = self.trainer
        keys, slots = expert_keys(tr.model), expert_slots(tr.model, tr.opt)
        model, optim = tr.model.state_dict(), tr.opt.state_dict()
        if not with_dense:
            model, optim = expert_part(model, optim, keys, slots)
        return {
            "model": model,
            "optim": optim,
            "step": tr.step,
            "torch_rng": torch.get_rng_state().tolist(),
            "skipped": tr.skipped,
            "expert_keys": keys,
            "expert_slots": slots,
        }

    def load_state(self, dense: dict[str, Any], rows: Any, step: int, extra: dict[str, Any]) -> None:
        """Take this rank's share of a whole-model (checkpoint) state and continue at `step`:
        `dense` is its dense part ({"model", "optim"}, moedist.parallel.shards.dense_state),
        `rows` this rank's expert rows (an ExpertRows; None for a model without experts)."""
        self._install(dense["model"], dense["optim"], [rows], extra["torch_rng"], extra.get("skipped_steps", 0), step)

    def _install(self, dense_model: dict[str, Any], dense_optim: dict[str, Any], parts: list[Any],
                 torch_rng: list[int], skipped: int, step: int) -> None:  # fmt: skip
        """Load this rank's shard, built from a dense part and expert rows (`parts`, the
        rows of the experts it owns), and continue at `step` with the run's RNG state."""
        from moedist.parallel.shards import assemble_shard, expert_keys, expert_slots

        tr, d = self.trainer, self.trainer.dist
        keys, slots = expert_keys(tr.model), expert_slots(tr.model, tr.opt)
        model, optim = dense_model, dense_optim
        if keys:  # a dense model has no expert rows
            model, optim = assemble_shard(model, optim, parts, keys, slots, d.placement, d.rank)
        tr.model.load_state_dict(model)
        tr.opt.load_state_dict(optim)
        torch.set_rng_state(torch.tensor(torch_rng, dtype=torch.uint8))
        tr.skipped = int(skipped)
        tr.step = int(step)

    # ------------------------------------------------------- live rescaling
    def publish(self, new_placement: dict[str, Any], send_dense: bool) -> dict[str, Any]:
        """Before a change of worker count: put into the object store the rows of each
        expert whose owner changes (one object per new owner) and, if asked, the dense
        replica state new workers start from; keep the rest here for `adopt`. Returns
        {"parts": {new rank: ref}, "dense": ref | None}."""
        import ray

        from moedist.parallel.placement import ExpertPlacement
        from moedist.parallel.shards import dense_state, expert_keys, expert_slots, rows_by_new_owner

        tr, d = self.trainer, self.trainer.dist
        new = ExpertPlacement.from_dict(new_placement)
        keys, slots = expert_keys(tr.model), expert_slots(tr.model, tr.opt)
        model, optim = tr.model.state_dict(), tr.opt.state_dict()
        # A dense model has no experts to move (its placement only names the ranks).
        parts = rows_by_new_owner(model, optim, keys, slots, d.placement, d.rank, new) if keys else {}
        kept = parts.pop(d.rank, None)
        dense_m, dense_o = dense_state(model, optim, keys, slots)
        dense = {"model": dense_m, "optim": dense_o, "torch_rng": torch.get_rng_state().tolist(),
                 "skipped": tr.skipped, "step": tr.step}  # fmt: skip
        self._stash = {"dense": dense, "kept": kept}
        return {"parts": {dest: ray.put(part) for dest, part in parts.items()},
                "dense": ray.put(dense) if send_dense else None}  # fmt: skip

    def adopt(self, part_refs: list[Any], dense_refs: list[Any]) -> dict[str, int]:
        """After `setup` in the re-formed group: take this rank's experts (kept ones from
        the stash, moved ones from their old owners' objects) and the dense state (own, or a
        peer's for a new worker); continue at the old group's step. Returns the experts and
        bytes that came in from other workers.
        (References come in lists: Ray would resolve a bare one before the call.)"""
        import ray

        stash, self._stash = self._stash, None
        dense = ray.get(dense_refs[0]) if dense_refs else stash["dense"]
        moved = ray.get(list(part_refs))
        parts = moved + ([stash["kept"]] if stash and stash["kept"] is not None else [])
        self._install(dense["model"], dense["optim"], parts, dense["torch_rng"], dense["skipped"], dense["step"])
        nbytes = sum(t.nbytes for p in moved for t in _tensors(p.model, p.optim))
        if dense_refs:
            nbytes += sum(t.nbytes for t in _tensors(dense["model"], dense["optim"]))
        return {"experts_in": sum(len(p.experts) for p in moved), "bytes_in": nbytes}

    def reset(self) -> None:
        """Leave the process group and drop the model (before a re-formed group's setup)."""
        from moedist.parallel.exchange import close_exchanges
        from moedist.parallel.group import destroy_group

        if self.trainer is not None:  # a capture cut short by a lost peer ends here, unwritten
            self.trainer.torch_profiler.stop()
        self.trainer = None
        close_exchanges()  # shared-memory segments of the old group
        with contextlib.suppress(Exception):  # a group that lost a peer may not close cleanly
            destroy_group()

    def shutdown(self) -> None:
        from moedist.parallel.exchange import close_exchanges
        from moedist.parallel.group import destroy_group

        close_exchanges()
        destroy_group()


def _tensors(*trees: Any) -> list[torch.Tensor]:
    """Every tensor in nested dicts/lists (to count bytes moved)."""
    out: list[torch.Tensor] = []
    stack = list(trees)
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out

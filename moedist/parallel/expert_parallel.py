"""Expert parallelism applied to a built model in one call.

Legend: E experts (global), W ranks.

    clock = enable_expert_parallel(model, placement, rank, group, nodes)

shards the experts of every MoE block (this rank keeps ``placement.local_experts(rank)``),
gives each block an all-to-all dispatcher, gives every router the distributed pool
statistics (exact radix select over all ranks), and tells each router which experts live
on this rank's node (ETR's locality loss). Everything is timed on the returned clock, so a
step splits into compute and communication. The model must be the same freshly built
(same-seed) single-process model on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moedist.config import CommConfig
from moedist.parallel.clock import CommClock
from moedist.parallel.exchange import RowExchange, make_exchange
from moedist.parallel.grads import shard_model_experts
from moedist.parallel.placement import ExpertPlacement
from moedist.parallel.pool import DistributedPoolOps
from moedist.routing import Router


def experts_on_node(placement: ExpertPlacement, rank: int, nodes: list[str]) -> torch.Tensor:
    """Bool [E]: the experts whose owner shares `rank`'s node (nodes[r] = rank r's node)."""
    here = nodes[rank]
    return torch.tensor([nodes[placement.owner(e)] == here for e in range(placement.n_experts)], dtype=torch.bool)


def enable_expert_parallel(
    model: nn.Module,
    placement: ExpertPlacement,
    rank: int,
    group: dist.ProcessGroup | None = None,
    nodes: list[str] | None = None,
    comm: CommConfig | None = None,
    exchange: RowExchange | None = None,
) -> CommClock:
    """Make `model` this rank's part of an expert-parallel model; returns its CommClock.

    `group` (None: the default group) need not be initialised yet, but must be by the first
    forward pass; `nodes` gives every rank's node address (None: all ranks on one node);
    `comm` holds the exchange's switches (None: the defaults; comm.fuse gives the pool
    statistics fewer, larger collectives, see DistributedPoolOps; comm.plan_counts lets the
    dispatchers take their split sizes from plans whose router gathered every worker's counts). With ``comm.shm`` or
    ``comm.hierarchical`` the token rows move through `exchange` (None: one made by
    moedist.parallel.exchange.make_exchange from `nodes`; the worker closes it on reset).
    """
    if nodes is not None and len(nodes) != placement.world_size:
        raise ValueError(f"nodes names {len(nodes)} ranks, the placement has {placement.world_size}")
    clock = CommClock()
    comm = comm or CommConfig()
    if exchange is None and (comm.shm or comm.hierarchical):
        exchange = make_exchange(group, nodes, shm=comm.shm, hierarchical=comm.hierarchical)
    shard_model_experts(model, placement, rank, group, clock, dedup=comm.dedup, wire_dtype=comm.wire_dtype,
                        exchange=exchange, overlap_chunks=comm.overlap_chunks,
                        plan_counts=comm.plan_counts)  # fmt: skip
    pool = DistributedPoolOps(group, clock, fuse=comm.fuse)
    on_node_E = experts_on_node(placement, rank, nodes) if nodes is not None else None
    device = next(model.parameters()).device
    for module in model.modules():
        if isinstance(module, Router):
            module.attach(pool, on_node_E.to(device) if on_node_E is not None else None)
    return clock

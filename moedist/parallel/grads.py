"""Expert sharding of a model and gradient synchronisation for expert-parallel training.

Legend: E experts (global), L experts local to one worker, W workers, D model width,
F expert width.

Every worker builds the full single-process model from the same seed, then
`shard_model_experts` keeps only its own experts' weights (copied, so the shard starts
from exactly the weights the 1-process model has) and gives each MoE block an
AllToAllDispatcher. After backward, `sync_gradients` averages the replicated gradients
and scales the expert gradients, so each parameter's gradient equals the 1-process
gradient on the global batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moedist.model.experts import GroupedExperts
from moedist.model.moe import MoEBlock
from moedist.parallel.alltoall import AllToAllDispatcher
from moedist.parallel.clock import CommClock, note_collective
from moedist.parallel.exchange import RowExchange
from moedist.parallel.placement import ExpertPlacement

__all__ = [
    "all_reduce_sum",
    "all_reduce_sum_counts",
    "expert_parameters",
    "gather_objects",
    "grad_presence",
    "replicated_parameters",
    "shard_model_experts",
    "sync_gradients",
]

DEFAULT_BUCKET_BYTES = 32 << 20


def shard_model_experts(
    model: nn.Module,
    placement: ExpertPlacement,
    rank: int,
    group: dist.ProcessGroup | None = None,
    clock: CommClock | None = None,
    *,
    dedup: bool = False,
    wire_dtype: str = "auto",
    exchange: RowExchange | None = None,
) -> nn.Module:
    """Turn a full model into `rank`'s shard, in place, and return it.

    Each MoEBlock's routed experts become a GroupedExperts of this rank's experts
    (``placement.local_experts(rank)`` order) holding copies of their weights, and the block
    dispatches with ``AllToAllDispatcher(placement, group)``. Everything else (attention,
    norms, embeddings, routers, shared experts) stays a replica. The shard is built on the
    meta device first, so sharding draws no random numbers: the process's RNG stream stays
    that of the 1-process model. The process group need not exist yet; it must by the first
    forward pass. A `clock` times the dispatchers' exchanges; `dedup` and `wire_dtype`
    are the dispatchers' switches (moedist.parallel.alltoall); `exchange` (shared by all
    blocks; None: the plain collective) moves their token rows.
    """
    local = placement.local_experts(rank)
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    for i, block in enumerate(blocks):
        full = block.experts
        if isinstance(block.dispatcher, AllToAllDispatcher):
            raise ValueError(f"MoE block {i} is already sharded")
        if full.n_experts != placement.n_experts:
            raise ValueError(f"MoE block {i} has {full.n_experts} experts, the placement places {placement.n_experts}")
        if not isinstance(full, GroupedExperts):  # e.g. AoE's experts know how to cut themselves
            block.experts = full.subset(local)
            block.dispatcher = AllToAllDispatcher(placement, group, clock, dedup=dedup, wire_dtype=wire_dtype,
                                                  exchange=exchange)  # fmt: skip
            continue
        w = full.w1_EDF
        shard = GroupedExperts(len(local), full.d_model, full.d_ff, activation=full.activation,
                               init_std=full.init_std, out_std=full.out_std, device="meta",
                               dtype=w.dtype).to_empty(device=w.device)  # fmt: skip
        idx = torch.tensor(local, dtype=torch.int64, device=w.device)
        with torch.no_grad():
            for name, p in shard.named_parameters():
                p.copy_(getattr(full, name).index_select(0, idx))
        shard.train(full.training)
        block.experts = shard  # same attribute: the module (and parameter) order is unchanged
        block.dispatcher = AllToAllDispatcher(placement, group, clock, dedup=dedup, wire_dtype=wire_dtype,
                                              exchange=exchange)  # fmt: skip
    return model



def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the routed experts of MoE blocks that dispatch all-to-all (sharded:
    each worker holds different experts)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, MoEBlock) and isinstance(m.dispatcher, AllToAllDispatcher)
        for p in m.experts.parameters()
    ]


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter that is not a sharded expert weight, in model order."""
    sharded = {id(p) for p in expert_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in sharded]


def grad_presence(model: nn.Module) -> Tensor:
    """int32 [P], one per replicated parameter (model order): 1 if it has a gradient here.
    Summed over the ranks it tells `sync_gradients` which gradients to all-reduce."""
    return torch.tensor([p.grad is not None for p in replicated_parameters(model)], dtype=torch.int32)


@torch.no_grad()
def sync_gradients(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    has_P: Tensor | None = None,
) -> None:
    """Make every gradient the gradient of the global loss (the mean of the ranks' losses).

    Call after backward, on every rank, before clipping and the optimiser step.

    - Replicated parameters (embeddings, attention, norms, routers, shared experts, dense
      FFNs): rank r holds d loss_r / dp, and d (1/W sum_r loss_r) / dp is their average,
      so they are all-reduced and divided by W. The all-reduce runs over a few flat
      buffers of at most ``bucket_bytes`` each (per device and dtype), not one collective
      per tensor.
    - Expert parameters (sharded by an AllToAllDispatcher) stay on their owner and are only
      scaled by 1/W: the all-to-all backward already brought each owner the gradient of
      every rank's loss, summed (sum_r d loss_r / dp), because every rank's tokens ran
      through the owner's copy. With loss_r the mean over rank r's tokens and the global
      loss the mean over ranks, the global gradient is that sum / W.

    This assumes every rank's loss is a mean over the same number of tokens (the global
    batch split evenly), which is what makes the mean of the ranks' losses the global mean.
    A replicated parameter without a gradient on some ranks gets a zero gradient there (it
    was used on other ranks); one without a gradient anywhere keeps ``grad = None``.
    ``has_P``: `grad_presence` already summed over the ranks (a caller that sums it with
    other counts in one all-reduce); None: summed here (one more all-reduce).
    """
    W = dist.get_world_size(group)
    rep = replicated_parameters(model)
    for p in rep:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError("sync_gradients does not handle sparse gradients")
    # Which parameters have a gradient somewhere: decided together, so every rank builds
    # the same buckets (a rank-dependent layout would mismatch or deadlock the all-reduce).
    if has_P is None:
        has_P = all_reduce_sum(grad_presence(model), group)
    elif has_P.shape != (len(rep),):
        raise ValueError(f"has_P has shape {tuple(has_P.shape)}, the model has {len(rep)} replicated parameters")
    grads: list[Tensor] = []
    for p, n in zip(rep, has_P.tolist(), strict=True):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        flat = all_reduce_sum(flat, group, inplace=True).div_(W)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
            g.copy_(part.view_as(g))
    for p in expert_parameters(model):
        if p.grad is not None:
            p.grad.div_(W)


def _buckets(grads: Iterable[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Consecutive grads grouped by (device, dtype), each group cut into buckets of at most
    bucket_bytes (a tensor larger than that is a bucket of its own). The order only depends
    on the model, so it is the same on every rank."""
    open_: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    size: dict[tuple[torch.device, torch.dtype], int] = {}
    done: list[list[Tensor]] = []
    for g in grads:
        key = (g.device, g.dtype)
        nbytes = g.numel() * g.element_size()
        if key in open_ and size[key] + nbytes > bucket_bytes:
            done.append(open_.pop(key))
        if key not in open_:
            open_[key], size[key] = [], 0
        open_[key].append(g)
        size[key] += nbytes
    done.extend(open_.values())
    return done


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None = None, inplace: bool = False) -> Tensor:
    """Elementwise sum of x over the ranks of `group`.

    Returns a new tensor on x's device (x untouched) unless ``inplace``. CPU tensors also
    work on an NCCL group: they travel through the current CUDA device.
    """
    device = x.device
    note_collective(x.numel() * x.element_size())
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        buf = x.detach().to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, group=group)
        if inplace:
            return x.copy_(buf)
        return buf.to(device)
    buf = x if inplace else x.detach().clone()
    dist.all_reduce(buf, group=group)
    return buf


def all_reduce_sum_counts(xs: list[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Each integer tensor of `xs` summed over the ranks, all in ONE all-reduce (int64 on
    the wire; integer sums are exact in any order, so this equals one all-reduce each).
    Returns new tensors with the inputs' shapes, dtypes and devices."""
    for x in xs:
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise TypeError(f"all_reduce_sum_counts sums integer counts, got {x.dtype}")
    if not xs:
        return []
    flat = all_reduce_sum(torch.cat([x.detach().reshape(-1).to(torch.int64).cpu() for x in xs]), group, inplace=True)
    parts = flat.split([x.numel() for x in xs])
    return [p.view(x.shape).to(x.device, x.dtype) for p, x in zip(parts, xs, strict=True)]


def gather_objects(obj: object, group: dist.ProcessGroup | None = None) -> list[object]:
    """Every rank's picklable `obj`, in rank order (a rare, small exchange: error reports)."""
    out: list[object] = [None] * dist.get_world_size(group)
    note_collective(0, count=2)  # sizes, then the pickled objects
    dist.all_gather_object(out, obj, group=group)
    return out

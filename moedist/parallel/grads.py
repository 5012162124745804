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
    "OverlappedGradSync",
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
OVERLAP_MIN_BUCKET_BYTES = 256 << 10


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
    overlap_chunks: int = 1,
    plan_counts: bool = False,
) -> nn.Module:
    """Turn a full model into `rank`'s shard, in place, and return it.

    Each MoEBlock's routed experts become a GroupedExperts of this rank's experts
    (``placement.local_experts(rank)`` order) holding copies of their weights, and the block
    dispatches with ``AllToAllDispatcher(placement, group)``. Everything else (attention,
    norms, embeddings, routers, shared experts) stays a replica. The shard is built on the
    meta device first, so sharding draws no random numbers: the process's RNG stream stays
    that of the 1-process model. The process group need not exist yet; it must by the first
    forward pass. A `clock` times the dispatchers' exchanges; `dedup` and `wire_dtype`
    are the dispatchers' switches (moedist.parallel.alltoall), as is `overlap_chunks`
    (moedist.parallel.overlap), as is `plan_counts` (split sizes from the routing plan
    when it carries every worker's counts); `exchange` (shared by all blocks; None: the
    plain collective) moves their token rows.
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
                                                  exchange=exchange, overlap_chunks=overlap_chunks,
                                                  plan_counts=plan_counts)  # fmt: skip
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
                                              exchange=exchange, overlap_chunks=overlap_chunks,
                                              plan_counts=plan_counts)  # fmt: skip
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
    scale_experts: bool = True,
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
    ``scale_experts=False``: the caller already called `scale_expert_grads` (to take the
    experts' norm before the sync, e.g. to sum it in the same all-reduce as other numbers).
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
    if scale_experts:
        scale_expert_grads(model, W)


def scale_expert_grads(model: nn.Module, world: int) -> None:
    """Divide the expert (sharded) gradients by the world size: the all-to-all backward
    brought each owner the sum over ranks, and the global loss is their mean. A local step,
    no collective; `sync_gradients` does it unless told the caller has."""
    _divide_grads(expert_parameters(model), world)


def _divide_grads(params: Iterable[Tensor], world: int) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.div_(world)


class OverlappedGradSync:
    """`sync_gradients` overlapped with the backward pass ([comm] overlap_grad_sync).

    Replicated parameters are cut once into buckets of at most ``bucket_bytes`` (default:
    an eighth of the replicated gradients, within 256 KiB .. 32 MiB), in reverse model
    order (backward produces the last layers' gradients first). A post-accumulate-grad
    hook on each counts the parameters whose gradient is final; when a bucket is complete
    its gradients are copied into its flat buffer and an async all-reduce starts, while
    backward goes on. `finish` starts the buckets still open, waits, divides by W and
    writes the averages back, then scales the expert gradients by 1/W: the same result as
    `sync_gradients` (the same sums and the same division; bitwise with 2 ranks, where a
    sum of two is the same in any bucketing).

        sync = OverlappedGradSync(model, group)      # on every rank, after the group exists
        for each micro-batch: ...; if last: sync.arm(); loss.backward()
        sync.finish()                                 # before clipping and the optimiser step

    Only an armed backward launches (the last micro-batch's: earlier ones only accumulate).
    Buckets start strictly in bucket order on every rank, over a process group of their own
    (same ranks): a bucket may complete during backward on one rank and only at `finish`
    on another (a parameter unused there), and a group of their own keeps those
    all-reduces from pairing up with the backward's token all-to-alls in another order.
    Each bucket carries one flag per parameter (1 where this rank has a gradient): a
    parameter with no gradient on some rank gets zeros there, one with no gradient
    anywhere keeps ``grad = None``, as in `sync_gradients`.
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None,
                 bucket_bytes: int | None = None):  # fmt: skip
        ranks = dist.get_process_group_ranks(group) if group is not None else None
        self.group = dist.new_group(ranks)  # collective: every rank of the default group
        self.world = dist.get_world_size(self.group)
        self.experts = expert_parameters(model)
        rep = replicated_parameters(model)
        if any(p.device.type == "cpu" for p in rep) and dist.get_backend(self.group) == "nccl":
            raise ValueError("overlap_grad_sync needs the gradients on the GPU with an NCCL group")
        if bucket_bytes is None:
            # About 8 buckets (the first starts once the last eighth of the gradients is
            # done), none under 256 KiB (each collective has a fixed cost) or over 32 MiB.
            total = sum(p.numel() * p.element_size() for p in rep)
            bucket_bytes = min(DEFAULT_BUCKET_BYTES, max(OVERLAP_MIN_BUCKET_BYTES, total // 8))
        self.buckets = [_Bucket(ps) for ps in _buckets(reversed(rep), bucket_bytes)]
        self._slot = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in rep]
        self.armed = False
        self._next = 0  # the next bucket to start: they start in order

    def arm(self) -> None:
        """The next backward is the step's last: start all-reduces as buckets complete."""
        if self.armed and self._next > 0:
            # All-reduces of earlier gradients are in flight (armed before a micro-batch
            # that was not the last): their buffers would be packed again under them.
            raise RuntimeError("OverlappedGradSync armed twice in one step: arm only before the last backward")
        self.reset()
        self.armed = True

    def reset(self) -> None:
        """Forget a step's progress (a skipped step; arm does it too). Started all-reduces
        are not waited for: after a failure mid-backward the group is rebuilt anyway."""
        self.armed = False
        self._next = 0
        for b in self.buckets:
            b.ready, b.work = 0, None

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _on_grad(self, p: Tensor) -> None:
        if not self.armed:
            return
        b = self.buckets[self._slot[id(p)]]
        b.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._start(self._next)

    @torch.no_grad()
    def _start(self, i: int) -> None:
        b = self.buckets[i]
        b.pack()
        b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)
        self._next = i + 1

    @torch.no_grad()
    def finish(self, scale_experts: bool = True) -> None:
        """Start what backward left open, wait for every bucket, write the averages back
        (and scale the expert gradients by 1/W unless the caller already did)."""
        if not self.armed:
            raise RuntimeError("OverlappedGradSync.finish without arm() before the last backward")
        while self._next < len(self.buckets):
            self._start(self._next)
        for b in self.buckets:
            b.work.wait()
            b.unpack(self.world)
        if scale_experts:
            _divide_grads(self.experts, self.world)
        self.reset()


class _Bucket:
    """Parameters whose gradients travel in one flat buffer: [gradients..., one flag each]."""

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.n = sum(self.sizes)
        p0 = params[0]
        self.flat = torch.empty(self.n + len(params), dtype=p0.dtype, device=p0.device)
        self.ready = 0
        self.work: dist.Work | None = None

    def pack(self) -> None:
        """Gradients (zeros where there is none) and the has-a-gradient flags into flat."""
        grads, flags = self.flat[: self.n].split(self.sizes), self.flat[self.n :]
        for k, (p, part) in enumerate(zip(self.params, grads, strict=True)):
            if p.grad is None:
                part.zero_()
                flags[k] = 0
            else:
                if p.grad.is_sparse:
                    raise ValueError("overlap_grad_sync does not handle sparse gradients")
                part.copy_(p.grad.reshape(-1))
                flags[k] = 1

    def unpack(self, world: int) -> None:
        """The all-reduced sums / world into each gradient (none where no rank had one)."""
        sums = self.flat[: self.n].div_(world)
        has = self.flat[self.n :].tolist()
        for p, part, h in zip(self.params, sums.split(self.sizes), has, strict=True):
            if h == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(part.view_as(p.grad))


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
    if not xs:
        return []
    flat = all_reduce_sum(_flat_counts(xs), group, inplace=True)
    return _unflat_counts(flat, xs)


def _flat_counts(xs: list[Tensor]) -> Tensor:
    """The integer tensors of `xs` as one flat int64 host tensor (float ones are refused)."""
    for x in xs:
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise TypeError(f"all_reduce_sum_counts sums integer counts, got {x.dtype}")
    return torch.cat([x.detach().reshape(-1).to(torch.int64).cpu() for x in xs])


def _unflat_counts(flat: Tensor, xs: list[Tensor]) -> list[Tensor]:
    """`_flat_counts`' inverse: pieces with the shapes, dtypes and devices of `xs`."""
    parts = flat.split([x.numel() for x in xs])
    return [p.view(x.shape).to(x.device, x.dtype) for p, x in zip(parts, xs, strict=True)]


def floats_ride_with_counts(group: dist.ProcessGroup | None = None) -> bool:
    """Whether `all_reduce_sum_counts_and_floats` sums its floats in the counts' all-reduce
    (bitwise what they would sum to alone): only in a group of 2 ranks."""
    return dist.is_initialized() and dist.get_world_size(group) == 2


def all_reduce_sum_counts_and_floats(
    xs: list[Tensor], floats_F: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[list[Tensor], Tensor]:
    """`all_reduce_sum_counts(xs)` and the float64 sums of `floats_F`: ONE all-reduce when
    the group has 2 ranks, else two. With 2 ranks every element's sum is one addition, and
    a + b == b + a in IEEE arithmetic, so the floats' sums do not depend on where they sit in
    the buffer (with 3 or more ranks gloo's order does, hence two all-reduces there). The
    counts travel as float64 then, exact below 2^53 (a step's token counts are far below)."""
    if not floats_ride_with_counts(group) or not xs:
        return all_reduce_sum_counts(xs, group), all_reduce_sum(floats_F.to(torch.float64), group)
    counts = _flat_counts(xs).to(torch.float64)
    flat = all_reduce_sum(torch.cat([counts, floats_F.detach().reshape(-1).cpu().to(torch.float64)]), group,
                          inplace=True)  # fmt: skip
    return _unflat_counts(flat[: counts.numel()].to(torch.int64), xs), flat[counts.numel() :].view(floats_F.shape)


def gather_objects(obj: object, group: dist.ProcessGroup | None = None) -> list[object]:
    """Every rank's picklable `obj`, in rank order (a rare, small exchange: error reports)."""
    out: list[object] = [None] * dist.get_world_size(group)
    note_collective(0, count=2)  # sizes, then the pickled objects
    dist.all_gather_object(out, obj, group=group)
    return out

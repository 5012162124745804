"""Global pool statistics without gathering logits: distributed radix select and PoolOps.

Legend: T local tokens (this rank's rows), N global pool tokens (all ranks), E experts,
B = 256 buckets of one 8-bit digit, W ranks in the group.

ET's threshold update and EC's top-k need, per expert, the k-th largest logit over the
global pool. Gathering every logit moves N x E floats to every rank. `radix_kth_largest`
finds the same value exactly in 4 rounds of 8 bits: each rank counts its keys under the
current per-expert prefix into an E x 256 histogram (moedist.kernels.radix), one all-reduce
sums them, and every rank walks the same summed histogram to the same bucket, so all ranks
end with the same cutoff bit for bit and need no further sync.

Collectives are torch.distributed on `group` (None = the default group; None with
torch.distributed not initialised = this process alone). This module never imports ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moedist.kernels.dispatch import Backend
from moedist.kernels.radix import N_BUCKETS, N_ROUNDS, RadixCounter, key_to_float
from moedist.parallel.clock import CommClock, measure, note_collective
from moedist.routing.base import NonFiniteLogitsError, PoolOps

__all__ = ["AllGatherPoolOps", "DistributedPoolOps", "radix_kth_largest", "threshold_sync_bytes"]

_INT32_LIMIT = 1 << 31
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- group helpers


def _active(group) -> bool:
    """True when collectives must run (a group given, or the default group exists)."""
    return group is not None or (dist.is_available() and dist.is_initialized())


def _world_rank(group) -> tuple[int, int]:
    if not _active(group):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _comm_device(group, data: torch.device) -> torch.device:
    """Where collective buffers live: the data's device in a single process, the current CUDA
    device for NCCL, the CPU for gloo (whatever device the data is on)."""
    if not _active(group):
        return data
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_(x: Tensor, group) -> Tensor:
    """In-place sum over the group (no-op for a single process)."""
    if _active(group):
        note_collective(x.numel() * x.element_size())
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce sum: the gradient of every rank's input is the sum of the
    output gradients of all ranks (each rank's loss is one term of the global loss).

    torch.distributed.nn.functional.all_reduce does the same, but in torch 2.13 it emits a
    FutureWarning on every call; this is its 10 lines without the warning.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, clock: CommClock | None = None) -> Tensor:
        ctx.group, ctx.clock = group, clock
        out = x.clone(memory_format=torch.contiguous_format)
        note_collective(out.numel() * out.element_size())
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with measure(ctx.clock, "pool"):  # the backward all-reduce is pool statistics too
            return _AllReduceSum.apply(grad_out, ctx.group, ctx.clock), None, None


# ----------------------------------------------------------------------------- radix select


def _pick_bucket(hist_EB: Tensor, k_E: Tensor) -> tuple[Tensor, Tensor]:
    """Per expert, the bucket holding the k-th largest key and the rank within that bucket.

    Buckets are scanned from the top (largest keys): the answer is the first bucket whose
    cumulative count reaches k. Needs 1 <= k_E <= hist_EB.sum(1).
    """
    desc_EB = hist_EB.flip(1).cumsum(1)  # desc_EB[e, j] = keys in buckets 255-j .. 255
    j_E = (desc_EB < k_E.unsqueeze(1)).sum(1)  # buckets entirely above the k-th key
    above_E = torch.where(j_E > 0, desc_EB.gather(1, (j_E - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
    return (N_BUCKETS - 1) - j_E, k_E - above_E


def _radix_select(
    counter: RadixCounter, k_E: Tensor, group, world: int, rank: int, nan_local: bool, count_dtype: torch.dtype
) -> tuple[Tensor, int, Tensor] | None:
    """The 4-round select with counts in count_dtype.

    Returns (selected keys [E], N, nan flags [W]) or None when some rank's rows could
    overflow int32 counts (then every rank gets None and retries in int64).
    Round 0's message carries W + 1 extra entries: a NaN flag per rank and the int32
    overflow flag, so every rank learns about a problem in the same collective.
    """
    E = counter.E
    dev = _comm_device(group, counter.device)
    prefix_E = torch.zeros(E, dtype=torch.int64, device=counter.device)
    nan_W = torch.zeros(world, dtype=torch.int64)
    N = 0
    k_eff_E = k_E
    for r in range(N_ROUNDS):
        hist_EB = counter.histogram(prefix_E, r).to(dev)
        if r == 0:
            flags = torch.zeros(world + 1, dtype=torch.int64, device=dev)
            flags[rank] = int(nan_local)
            flags[world] = int(count_dtype == torch.int32 and counter.T * world >= _INT32_LIMIT)
            msg = torch.cat([hist_EB.reshape(-1), flags]).to(count_dtype)
            _all_reduce_(msg, group)
            msg = msg.to(torch.int64)
            nan_W = msg[E * N_BUCKETS : E * N_BUCKETS + world].cpu()
            if bool(nan_W.any()):
                return torch.zeros(E, dtype=torch.int64), 0, nan_W
            if int(msg[-1]) > 0:
                return None
            hist_EB = msg[: E * N_BUCKETS].view(E, N_BUCKETS).to(counter.device)
            N = int(hist_EB[0].sum())  # every key of expert 0 lands in some bucket
            if N == 0:
                return torch.zeros(E, dtype=torch.int64), 0, nan_W
            # k = 0 is answered by the caller; k >= N selects the minimum.
            k_eff_E = k_E.clamp(1, N).to(counter.device)
        else:
            msg = hist_EB.reshape(-1).to(count_dtype)
            _all_reduce_(msg, group)
            hist_EB = msg.to(torch.int64).view(E, N_BUCKETS).to(counter.device)
        bucket_E, k_eff_E = _pick_bucket(hist_EB, k_eff_E)
        prefix_E = (prefix_E << 8) | bucket_E
    return prefix_E, N, nan_W


def radix_kth_largest(values_TE: Tensor, k_E: Tensor, group=None, backend: Backend = "auto") -> Tensor:
    """Per column e, the k_E[e]-th largest value over the rows of every rank in `group`.

    Semantics of PoolOps.kth_largest on the concatenated rows: k = 0 gives +inf, k >= N the
    global minimum, N = 0 gives +inf. Ranks may hold different T (0 included) but must pass
    the same E and k_E. The result is bitwise equal to torch.topk's k-th value on the
    concatenation, except that a selected zero is always +0.0 (topk may return either zero).
    NaN on any rank raises NonFiniteLogitsError (a ValueError) on every rank (the flag rides in the first all-reduce,
    so no rank is left waiting in a later collective). Exactly 4 all-reduces per call (5 if
    some rank holds >= 2^31 / W rows: round 0 is then redone with int64 counts).

    float16/bfloat16 are selected exactly through float32; float64 is refused (32-bit keys).
    """
    if values_TE.dim() != 2:
        raise ValueError(f"values_TE must be 2-D [T, E], got shape {tuple(values_TE.shape)}")
    E = values_TE.shape[1]
    if k_E.shape != (E,):
        raise ValueError(f"k_E must have shape ({E},) to match values_TE [T, E], got {tuple(k_E.shape)}")
    out_dtype = values_TE.dtype
    if out_dtype in _LOW_PRECISION:
        values_TE = values_TE.float()  # exact, order-preserving
    elif out_dtype != torch.float32:
        raise TypeError(f"radix_kth_largest selects float32 (or float16/bfloat16) values, got {out_dtype}")
    if E == 0:  # no column to select in (E is the same on every rank: no collective)
        return torch.empty(0, dtype=out_dtype, device=values_TE.device)
    world, rank = _world_rank(group)
    values_TE = values_TE.detach()
    counter = RadixCounter(values_TE, backend)
    nan_local = counter.has_nan()
    k_E = k_E.detach().to(torch.int64).cpu()
    res = _radix_select(counter, k_E, group, world, rank, nan_local, torch.int32)
    if res is None:
        res = _radix_select(counter, k_E, group, world, rank, nan_local, torch.int64)
        if res is None:  # cannot happen: the overflow flag is only set for int32
            raise RuntimeError("radix select: int64 retry reported overflow")
    key_E, N, nan_W = res
    if bool(nan_W.any()):
        bad = nan_W.nonzero().flatten().tolist()
        raise NonFiniteLogitsError(
            f"router logits contain NaN on rank(s) {bad} of {world}; cannot select the k-th largest"
        )
    out_E = torch.full((E,), float("inf"), dtype=torch.float32, device=values_TE.device)
    if N > 0:
        picked_E = key_to_float(key_E.to(values_TE.device))
        out_E = torch.where(k_E.to(values_TE.device) > 0, picked_E, out_E)
    return out_E.to(out_dtype)


# ----------------------------------------------------------------------------- PoolOps


class DistributedPoolOps(PoolOps):
    """Pool statistics over every rank of a torch.distributed group (None = default group).

    Every method is a collective: all ranks of the group must call it, in the same order.
    ``clock``, when set, accumulates the seconds of every call under "pool" (the radix
    select's local histogram counting included: it is the price of the exchange).
    """

    def __init__(self, group=None, clock: CommClock | None = None):
        self.group = group
        self.clock = clock

    @property
    def world_rank(self) -> tuple[int, int]:
        """(ranks in the group, this rank's index in it)."""
        return _world_rank(self.group)

    def total(self, n_local: int) -> int:
        """Tokens in the global pool (all-reduce of the local count)."""
        n = torch.tensor([n_local], dtype=torch.int64, device=_comm_device(self.group, torch.device("cpu")))
        with measure(self.clock, "pool"):
            return int(_all_reduce_(n, self.group).item())

    def sum(self, x: Tensor) -> Tensor:
        """Elementwise sum over the ranks; gradients flow back to every rank's input."""
        if not _active(self.group):
            return x
        dev = _comm_device(self.group, x.device)
        with measure(self.clock, "pool"):
            return _AllReduceSum.apply(x.to(dev), self.group, self.clock).to(x.device)

    def exclusive_prefix(self, counts_E: Tensor) -> Tensor:
        """Per-expert sum of the counts of lower ranks (rank 0 gets zeros)."""
        return self.sum_and_prefix(torch.zeros_like(counts_E), counts_E)[1]

    def sum_and_prefix(self, sum_E: Tensor, prefix_E: Tensor) -> tuple[Tensor, Tensor]:
        """(sum_E summed over ranks, prefix_E summed over lower ranks): one all-gather."""
        world, rank = self.world_rank
        if world == 1:
            return sum_E.detach(), torch.zeros_like(prefix_E)
        dev = _comm_device(self.group, prefix_E.device)
        local_2E = torch.stack([sum_E.detach(), prefix_E.detach()]).to(dev, torch.int64).contiguous()
        parts_W2E = [torch.empty_like(local_2E) for _ in range(world)]
        with measure(self.clock, "pool"):
            note_collective(local_2E.numel() * local_2E.element_size())
            dist.all_gather(parts_W2E, local_2E, group=self.group)
        all_W2E = torch.stack(parts_W2E)
        total_E = all_W2E[:, 0].sum(0).to(sum_E.device, sum_E.dtype)
        below_E = all_W2E[:rank, 1].sum(0).to(prefix_E.device, prefix_E.dtype)
        return total_E, below_E

    def kth_largest(self, values_TE: Tensor, k_E: Tensor) -> Tensor:
        """Exact global k-th largest per expert by distributed radix select."""
        with measure(self.clock, "pool"):
            return self._kth_largest(values_TE, k_E)

    def _kth_largest(self, values_TE: Tensor, k_E: Tensor) -> Tensor:
        return radix_kth_largest(values_TE, k_E, self.group)


class AllGatherPoolOps(DistributedPoolOps):
    """kth_largest the way the ET paper's code does it: all-gather every rank's logits, then
    a local topk over the whole pool. The reference for tests and benchmarks; moves N x E floats."""

    def _kth_largest(self, values_TE: Tensor, k_E: Tensor) -> Tensor:
        world, _ = self.world_rank
        if world == 1:
            return PoolOps.kth_largest(self, values_TE, k_E)
        T, E = values_TE.shape
        dev = _comm_device(self.group, values_TE.device)
        # Sizes first, so that ranks with fewer rows can pad to the largest.
        size = torch.tensor([T], dtype=torch.int64, device=dev)
        sizes_W = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes_W, size, group=self.group)
        sizes = [int(s.item()) for s in sizes_W]
        t_max = max(sizes)
        local_TE = torch.zeros(t_max, E, dtype=values_TE.dtype, device=dev)
        local_TE[:T] = values_TE.detach()
        parts_WTE = [torch.empty_like(local_TE) for _ in range(world)]
        dist.all_gather(parts_WTE, local_TE, group=self.group)
        pool_NE = torch.cat([p[:n] for p, n in zip(parts_WTE, sizes, strict=True)]).to(values_TE.device)
        # Every rank now holds every row, so a NaN anywhere raises on every rank.
        return PoolOps.kth_largest(self, pool_NE, k_E)


def threshold_sync_bytes(n_experts: int, local_sizes: Sequence[int], count_bytes: int = 4) -> dict[str, int]:
    """Bytes each rank receives from the collectives of one kth_largest call.

    radix: 4 rounds x E x 256 counts (+ W + 1 flag counts in round 0); count_bytes is 4 while
    every rank holds < 2^31 / W rows, else 8. allgather: the W sizes (int64) + W x max(T) x E
    float32 (ranks pad to the largest T; = N x E x 4 when T is equal).
    """
    world = len(local_sizes)
    radix = (N_ROUNDS * n_experts * N_BUCKETS + world + 1) * count_bytes
    allgather = world * 8 + world * max(local_sizes, default=0) * n_experts * 4
    return {"radix": radix, "allgather": allgather}

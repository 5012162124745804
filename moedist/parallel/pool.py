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

__all__ = [
    "AllGatherPoolOps",
    "DistributedPoolOps",
    "candidate_kth_largest",
    "candidates_fit",
    "radix_kth_largest",
    "threshold_sync_bytes",
]

_INT32_LIMIT = 1 << 31
# The candidate select gathers W x K values per column where the radix select sums 4 rounds
# of 256 counts: it is used while W x K <= this (then it also moves at most 4x the bytes).
CANDIDATE_LIMIT = 4 * N_ROUNDS * N_BUCKETS
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


def candidates_fit(k_E: Tensor, world: int) -> bool:
    """True when `candidate_kth_largest` is the cheaper select: W x max(k) <= CANDIDATE_LIMIT
    (the same answer on every rank: k_E and W are)."""
    return k_E.numel() > 0 and world * int(k_E.max()) <= CANDIDATE_LIMIT


def candidate_kth_largest(values_TE: Tensor, k_E: Tensor, group=None) -> Tensor:
    """`radix_kth_largest` in ONE collective when k is small: each rank sends its local top-K
    of every column (K = max k_E), padded to K rows, and every rank selects the k-th largest
    of the gathered union. The global top-k of a column lies in the union of the ranks'
    local top-k, so the value is exact and equal to the radix select's (a selected zero is
    +0.0 here too). NaN on any rank raises on every rank (a flag travels with the values).
    Moves W x (K x E + 2) floats to every rank; use it while `candidates_fit`."""
    return _candidate_select(values_TE, k_E, group)[0].to(values_TE.device, values_TE.dtype)


def candidate_topk_cut(values_TE: Tensor, k_E: Tensor, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """(cutoff_E, above_WE, ties_WE) of `PoolOps.topk_cut` from the same ONE all-gather as
    `candidate_kth_largest`. The per-rank counts are read from the gathered lists:

    - above: fewer than k values of a column lie strictly above its k-th largest, so every
      rank's top-K list holds all of its values above the cutoff: the count is exact.
    - ties: a list holds all of its rank's ties unless it is full of values >= the cutoff;
      then its rank alone has K >= k values at or above the cutoff, so the ties it shows
      already reach the k - n_above still to take, and the ranks after it take no tie
      either way. The masks (and per-rank counts) `pool_topk_mask` builds are the exact ones."""
    cutoff_E, lists, _ = _candidate_select(values_TE, k_E, group)
    above_WE = torch.stack([(v_ME > cutoff_E).sum(0) for v_ME in lists])
    ties_WE = torch.stack([(v_ME == cutoff_E).sum(0) for v_ME in lists])
    dev = values_TE.device
    return cutoff_E.to(dev, values_TE.dtype), above_WE.to(dev), ties_WE.to(dev)


def _candidate_select(values_TE: Tensor, k_E: Tensor, group) -> tuple[Tensor, list[Tensor], int]:
    """(k-th largest per column as float32 on the host, every rank's gathered top-K list
    [n_r, E] on the host, this rank) after one all-gather."""
    if values_TE.dim() != 2:
        raise ValueError(f"values_TE must be 2-D [T, E], got shape {tuple(values_TE.shape)}")
    T, E = values_TE.shape
    if k_E.shape != (E,):
        raise ValueError(f"k_E must have shape ({E},) to match values_TE [T, E], got {tuple(k_E.shape)}")
    out_dtype = values_TE.dtype
    if out_dtype not in (torch.float32, *_LOW_PRECISION):
        raise TypeError(f"candidate_kth_largest selects float32 (or float16/bfloat16) values, got {out_dtype}")
    world, rank = _world_rank(group)
    if E == 0:
        return torch.empty(0, dtype=torch.float32), [torch.empty(0, 0)] * world, rank
    dev = _comm_device(group, values_TE.device)
    k_E = k_E.detach().to(torch.int64).cpu()
    K = max(0, int(k_E.max()))
    vals_TE = values_TE.detach().float()
    n_send = min(K, T)
    # [valid rows, NaN flag, K x E values]: both header counts are exact in float32 (<= K).
    msg = torch.zeros(2 + K * E, dtype=torch.float32, device=dev)
    msg[0] = n_send
    msg[1] = float(bool(torch.isnan(vals_TE).any()))
    if n_send > 0:
        msg[2 : 2 + n_send * E] = torch.topk(vals_TE, n_send, dim=0).values.reshape(-1).to(dev)
    if _active(group):
        parts = [torch.empty_like(msg) for _ in range(world)]
        note_collective(msg.numel() * msg.element_size())
        dist.all_gather(parts, msg, group=group)
    else:
        parts = [msg]
    parts = [p.cpu() for p in parts]
    nan_W = torch.stack([p[1] for p in parts])
    if bool(nan_W.any()):
        bad = nan_W.nonzero().flatten().tolist()
        raise NonFiniteLogitsError(
            f"router logits contain NaN on rank(s) {bad} of {world}; cannot select the k-th largest"
        )
    lists = [p[2 : 2 + int(p[0]) * E].view(-1, E) for p in parts]
    out_E = PoolOps.kth_largest(PoolOps(), torch.cat(lists), k_E)  # k >= union rows: the union is the pool
    out_E = torch.where(out_E == 0, torch.zeros_like(out_E), out_E)  # -0.0 -> +0.0, as radix
    # Through the output dtype and back: the cutoff the caller compares with.
    return out_E.to(out_dtype).float(), lists, rank


# ----------------------------------------------------------------------------- PoolOps


class DistributedPoolOps(PoolOps):
    """Pool statistics over every rank of a torch.distributed group (None = default group).

    Every method is a collective: all ranks of the group must call it, in the same order.
    ``clock``, when set, accumulates the seconds of every call under "pool" (the radix
    select's local histogram counting included: it is the price of the exchange).

    ``fuse`` (``[comm] fuse``) makes fewer, larger collectives with the same results:
    `kth_largest` with a small k (`candidates_fit`) is one all-gather of every rank's local
    top-k (`candidate_kth_largest`) instead of the radix select's 4 all-reduces;
    `kth_largest_many` selects every matrix's columns in one select (not one per matrix);
    `sum_counts` sends all its tensors in one all-reduce, and `total`
    counts the pool once per forward pass (after `new_pool`; every MoE layer of a forward
    routes the same tokens). Float sums are never merged: gloo's summation order for an
    element depends on where it sits in the buffer (with 3 or more ranks), so merging them
    could change the last bits; integer counts are exact in any order.
    """

    def __init__(self, group=None, clock: CommClock | None = None, fuse: bool = False):
        self.group = group
        self.clock = clock
        self.fuse = fuse
        # (local count, global count) of the current forward pass; "open" after new_pool.
        self._total: tuple[int, int] | str | None = None

    @property
    def world_rank(self) -> tuple[int, int]:
        """(ranks in the group, this rank's index in it)."""
        return _world_rank(self.group)

    def new_pool(self) -> None:
        """A forward pass begins: with fuse, its first `total` is counted and then reused."""
        self._total = "open" if self.fuse else None

    def total(self, n_local: int) -> int:
        """Tokens in the global pool (all-reduce of the local count; with fuse, once per
        forward pass)."""
        if isinstance(self._total, tuple):
            if self._total[0] != n_local:
                raise RuntimeError(f"pool total asked for {n_local} local tokens after {self._total[0]} in the same "
                                   "forward pass (every MoE layer of a forward routes the same tokens)")  # fmt: skip
            return self._total[1]
        n = torch.tensor([n_local], dtype=torch.int64, device=_comm_device(self.group, torch.device("cpu")))
        with measure(self.clock, "pool"):
            N = int(_all_reduce_(n, self.group).item())
        if self._total == "open":
            self._total = (n_local, N)
        return N

    def sum_counts(self, xs: list[Tensor]) -> list[Tensor]:
        """Detached sums of integer-valued tensors; with fuse, one all-reduce for all."""
        if not self.fuse or len(xs) < 2 or not _active(self.group):
            return super().sum_counts(xs)
        from moedist.parallel.grads import all_reduce_sum_counts  # the one flat all-reduce of counts

        with measure(self.clock, "pool"):  # integer-valued: int64 on the wire is exact for any dtype here
            sums = all_reduce_sum_counts([x.detach().to(torch.int64) for x in xs], self.group)
        return [s.to(x.dtype) for s, x in zip(sums, xs, strict=True)]

    def sum(self, x: Tensor) -> Tensor:
        """Elementwise sum over the ranks; gradients flow back to every rank's input."""
        if not _active(self.group):
            return x
        dev = _comm_device(self.group, x.device)
        with measure(self.clock, "pool"):
            return _AllReduceSum.apply(x.to(dev), self.group, self.clock).to(x.device)

    def gather_counts(self, counts_X: Tensor) -> Tensor:
        """Every rank's integer counts stacked in rank order [W, *X]: one all-gather."""
        world, _ = self.world_rank
        if world == 1:
            return super().gather_counts(counts_X)
        local_X = counts_X.detach().to(_comm_device(self.group, counts_X.device), torch.int64).contiguous()
        parts = [torch.empty_like(local_X) for _ in range(world)]
        with measure(self.clock, "pool"):
            note_collective(local_X.numel() * local_X.element_size())
            dist.all_gather(parts, local_X, group=self.group)
        return torch.stack(parts).to(counts_X.device)

    def topk_cut(self, values_TE: Tensor, k_E: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """With fuse and a small k: one all-gather of candidates gives the cutoff and the
        per-rank counts (`candidate_topk_cut`), not a select and then a count exchange."""
        if self._use_candidates(values_TE, k_E):
            with measure(self.clock, "pool"):
                return candidate_topk_cut(values_TE, k_E.to(torch.int64).cpu(), self.group)
        return super().topk_cut(values_TE, k_E)

    def _use_candidates(self, values_TE: Tensor, k_E: Tensor) -> bool:
        """With fuse, a small k is selected from one all-gather of candidates (not the radix
        select's 4 all-reduces); the same answer on every rank (k_E and W are)."""
        return self.fuse and values_TE.dtype != torch.float64 and candidates_fit(k_E, self.world_rank[0])

    def kth_largest(self, values_TE: Tensor, k_E: Tensor) -> Tensor:
        """Exact global k-th largest per expert by distributed radix select."""
        with measure(self.clock, "pool"):
            return self._kth_largest(values_TE, k_E)

    def kth_largest_many(self, values: list[Tensor], k: list[Tensor]) -> list[Tensor]:
        """With fuse: one select over the matrices' columns side by side (the same values,
        as each column is selected on its own); else one select per matrix."""
        if not self.fuse or len(values) < 2:
            return super().kth_largest_many(values, k)
        T, dtype = values[0].shape[0], values[0].dtype
        for i, v_TE in enumerate(values):
            # A rank-local fallback here would leave the ranks in different collectives.
            if v_TE.dim() != 2 or v_TE.shape[0] != T or v_TE.dtype != dtype:
                raise ValueError(f"kth_largest_many: matrix {i} is {tuple(v_TE.shape)} {v_TE.dtype}, matrix 0 is "
                                 f"[{T}, E] {dtype}: fused selection needs the same rows and dtype")  # fmt: skip
        widths = [v_TE.shape[1] for v_TE in values]
        with measure(self.clock, "pool"):
            cutoff_E = self._kth_largest(torch.cat(values, dim=1), torch.cat([k_E.to(torch.int64).cpu() for k_E in k]))
        return list(cutoff_E.split(widths))

    def _kth_largest(self, values_TE: Tensor, k_E: Tensor) -> Tensor:
        if self._use_candidates(values_TE, k_E):
            return candidate_kth_largest(values_TE, k_E, self.group)
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

"""The expert-parallel dispatcher: tokens go to the workers that own their experts and the
results come back, through two all-to-all exchanges.

Legend: T local tokens, A local assignments ((token, expert) pairs, expert ids global),
R rows this worker receives, D model width, E experts (global), L experts local to this
worker, W workers, S = E send slots (rank-major order of the global experts).

One call, on every worker of the group (it is a collective: all ranks call it for the
same layer in the same order, also with zero tokens):

    sort assignments by slot = (destination worker, local expert index there)  [counting sort]
    all_to_all(counts per slot)   -> each receiver knows rows per (source, local expert)
    all_to_all(token rows, uneven splits)
    receiver: (source, expert) order -> expert-major [counting sort], experts(x, counts),
              back to (source, expert) order
    all_to_all(expert outputs back, the reverse splits)
    sender: y_TD = combine(out_AD, weight_A, token_A, T)

Gate weights never travel: the sender keeps them and applies them in `combine`, so the
router's gradient is computed where the router lives. Both row exchanges are autograd
Functions whose backward is the reverse exchange, so a backward pass runs the same two
all-to-alls in reverse order on every rank; hence every rank must also run backward
through the same layers, with the same inputs requiring grad (as in any SPMD training).

Works on any initialised torch.distributed group whose backend has all_to_all (gloo on
CPU; NCCL with tensors on the current CUDA device), so a torchrun script can use the MoE
layer without moedist's runtime. Under autocast the rows travel in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from moedist.kernels.dispatch import combine, inverse_permutation, sort_by_expert
from moedist.model.experts import GroupedExperts
from moedist.model.moe import expert_rows
from moedist.parallel.clock import CommClock, measure
from moedist.parallel.exchange import RowExchange
from moedist.parallel.placement import ExpertPlacement
from moedist.routing.base import RoutingPlan

__all__ = ["AllToAllDispatcher", "all_to_all_rows"]


class _AllToAllRows(torch.autograd.Function):
    """Rows x_ND -> rows received from every rank; the backward sends the grads back."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group, clock, exchange) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.clock = send_splits, recv_splits, group, clock
        ctx.exchange = exchange
        return _exchange(x_ND, send_splits, recv_splits, group, clock, exchange)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RD: Tensor):
        grad_ND = _exchange(grad_RD, ctx.recv_splits, ctx.send_splits, ctx.group, ctx.clock, ctx.exchange)
        return grad_ND, None, None, None, None, None


def _exchange(x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group, clock=None,
              exchange: RowExchange | None = None) -> Tensor:  # fmt: skip
    out_RD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    x_ND = x_ND.contiguous()
    with measure(clock, "a2a"):
        if exchange is None:
            dist.all_to_all_single(out_RD, x_ND, recv_splits, send_splits, group=group)
        else:  # shared memory / hierarchical (moedist.parallel.exchange), same contract
            exchange(out_RD, x_ND, recv_splits, send_splits)
    return out_RD


def all_to_all_rows(
    x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group=None, clock: CommClock | None = None,
    exchange: RowExchange | None = None,
) -> Tensor:  # fmt: skip
    """Differentiable uneven all-to-all of rows: ``send_splits[w]`` consecutive rows of x_ND go
    to rank w, ``recv_splits[w]`` rows arrive from rank w (in rank order). A `clock` gets
    the seconds of both the forward and the backward exchange under "a2a". `exchange`
    (None: ``dist.all_to_all_single`` on `group`) moves the rows both ways."""
    return _AllToAllRows.apply(x_ND, list(send_splits), list(recv_splits), group, clock, exchange)


class _PermuteRows(torch.autograd.Function):
    """x[perm] whose backward is the gather by the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, perm_N: Tensor, inv_N: Tensor) -> Tensor:
        ctx.save_for_backward(inv_N)
        return x_ND.index_select(0, perm_N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND: Tensor):
        (inv_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, inv_N), None, None


class AllToAllDispatcher:
    """Runs each assignment on the worker that owns its expert (see the module docstring).

    ``experts`` passed to a call holds only this rank's experts, in
    ``placement.local_experts(rank)`` order; ``plan`` uses global expert ids. ``group`` is a
    torch.distributed process group (None: the default group) whose size is
    ``placement.world_size``; ranks are group ranks. ``clock``, when set, accumulates the
    seconds of every exchange (counts and rows, forward and backward) under "a2a".
    ``exchange`` (moedist.parallel.exchange.make_exchange; None: the collective on `group`)
    moves the token rows, e.g. through shared memory within a node.
    """

    def __init__(
        self, placement: ExpertPlacement, group: dist.ProcessGroup | None = None, clock: CommClock | None = None,
        exchange: RowExchange | None = None,
    ):  # fmt: skip
        self.placement = placement
        self.group = group
        self.clock = clock
        self.exchange = exchange
        self._slot_E: dict[torch.device, Tensor] = {}

    def __call__(self, x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts) -> Tensor:
        P, group = self.placement, self.group
        W, L, E = self._check(x_TD, plan, experts)
        T, device = x_TD.shape[0], x_TD.device

        # 1. Sender: one counting sort by slot groups assignments by destination, then by
        # the destination's local expert, which is the send layout and the layout the
        # receiver's expert-major reordering expects.
        order_A, counts_S = sort_by_expert(self._slots(device)[plan.expert_idx_A], E)
        order_A, counts_S = order_A.to(device), counts_S.to(device)
        token_A = plan.token_idx_A[order_A]
        weight_A = plan.weight_A[order_A]

        # 2. Counts per (destination, its local expert) -> counts per (source, my local expert).
        recv_counts_WL = counts_S.new_empty(W * L)
        with measure(self.clock, "a2a"):
            dist.all_to_all_single(recv_counts_WL, counts_S, [L] * W, [P.n_local(w) for w in range(W)], group=group)
        # One host transfer for both (one sync on CUDA): split sizes must be host ints.
        host = torch.cat([counts_S, recv_counts_WL]).tolist()
        send_S, recv_WL = host[:E], host[E:]
        send_splits, recv_splits, start = [], [], 0
        for w in range(W):
            send_splits.append(sum(send_S[start : start + P.n_local(w)]))
            start += P.n_local(w)
            recv_splits.append(sum(recv_WL[w * L : (w + 1) * L]))

        # 3. Token rows out. Under autocast they travel in the compute dtype (half the bytes
        # in bf16); the experts would cast them on arrival anyway.
        # (AoE: each row also carries the expert's low-rank activation, the plan's payload.)
        rows_AD = expert_rows(x_TD, token_A, order_A, plan)
        if torch.is_autocast_enabled(device.type):
            rows_AD = rows_AD.to(torch.get_autocast_dtype(device.type))
        x_RD = all_to_all_rows(rows_AD, send_splits, recv_splits, group, self.clock, self.exchange)

        # 4. Receiver: (source, expert)-ordered rows -> expert-major, experts, and back.
        # With one source or one local expert the two orders coincide.
        counts_L = [sum(recv_WL[l::L]) for l in range(L)]  # host ints, as the experts need
        if W == 1 or L == 1:
            out_RD = experts(x_RD, counts_L)
        else:
            # Local expert of each received row; output_size spares a device sync on CUDA.
            local_WL = torch.arange(L, device=device).repeat(W)
            local_R = local_WL.repeat_interleave(recv_counts_WL, output_size=x_RD.shape[0])
            perm_R = sort_by_expert(local_R, L)[0].to(device)
            inv_R = inverse_permutation(perm_R)
            out_sorted_RD = experts(_PermuteRows.apply(x_RD, perm_R, inv_R), counts_L)
            out_RD = _PermuteRows.apply(out_sorted_RD, inv_R, perm_R)

        # 5. Results back to their senders (the same rows, reverse splits), gated there.
        out_AD = all_to_all_rows(out_RD, recv_splits, send_splits, group, self.clock, self.exchange)
        # float32 gates: the weighted sum accumulates in float32 even when experts ran in bf16.
        return combine(out_AD, weight_A, token_A, T)

    # ----------------------------------------------------------------- helpers
    def _check(self, x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts) -> tuple[int, int, int]:
        """(W, L, E) after checking that the call fits the placement and the group.

        All checks run before the first collective. A mismatch of placement, plan or shard
        sizes is usually the same on every rank, so every rank raises; an error only one rank
        sees (a bad expert id) leaves the others waiting in the counts exchange until the
        group's timeout, as with any collective a rank skips."""
        if not dist.is_initialized():
            raise RuntimeError("AllToAllDispatcher needs an initialised torch.distributed process group")
        P = self.placement
        rank, W = dist.get_rank(self.group), dist.get_world_size(self.group)
        if P.world_size != W:
            raise ValueError(f"placement is for world_size={P.world_size}, but the process group has {W} ranks")
        if plan.n_experts != P.n_experts:
            raise ValueError(f"plan routes to {plan.n_experts} experts, the placement places {P.n_experts}")
        L = P.n_local(rank)
        if experts.n_experts != L:
            raise ValueError(
                f"rank {rank} owns {L} experts under the placement, but its GroupedExperts has "
                f"{experts.n_experts}; shard the experts first (moedist.parallel.grads.shard_model_experts)"
            )
        if x_TD.dim() != 2 or x_TD.shape[0] != plan.n_tokens:
            raise ValueError(f"x_TD has shape {tuple(x_TD.shape)}, the plan is for {plan.n_tokens} tokens")
        idx = plan.expert_idx_A
        if idx.numel() > 0:
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= P.n_experts:
                raise IndexError(f"plan.expert_idx_A holds {int(lo)}..{int(hi)}, outside 0..{P.n_experts - 1}")
        return W, L, P.n_experts

    def _slots(self, device: torch.device) -> Tensor:
        """Global expert -> rank-major slot, cached per device."""
        if device not in self._slot_E:
            self._slot_E[device] = torch.tensor(self.placement.slot_E(), dtype=torch.int64, device=device)
        return self._slot_E[device]

    def __repr__(self) -> str:
        return f"AllToAllDispatcher({self.placement!r})"

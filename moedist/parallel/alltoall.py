"""The expert-parallel dispatcher: tokens go to the workers that own their experts and the
results come back, through two all-to-all exchanges.

Legend: T local tokens, A local assignments ((token, expert) pairs, expert ids global),
R rows this worker receives, D model width, E experts (global), L experts local to this
worker, W workers, S = E send slots (rank-major order of the global experts).

One call, on every worker of the group (it is a collective: all ranks call it for the
same layer in the same order, also with zero tokens):

    sort assignments by slot = (destination worker, local expert index there)  [counting sort]
    all_to_all(counts per slot)   -> each receiver knows rows per (source, local expert)
                                     (none with plan_counts when the plan carries every
                                     worker's counts: the router's collective told them)
    all_to_all(token rows, uneven splits)
    receiver: experts on the (source, expert) segments as they arrived
              (GroupedExperts.forward_segments; other experts: reorder to expert-major
              [counting sort], experts(x, counts), back to (source, expert) order)
    all_to_all(expert outputs back, the reverse splits)
    sender: y_TD = combine(out_AD, weight_A, token_A, T)

Gate weights never travel: the sender keeps them and applies them in `combine`, so the
router's gradient is computed where the router lives. Both row exchanges are autograd
Functions whose backward is the reverse exchange, so a backward pass runs the same two
all-to-alls in reverse order on every rank; hence every rank must also run backward
through the same layers, with the same inputs requiring grad (as in any SPMD training).

Two switches change what travels, not the result (docs/profiling.md, "Deduplication and
bf16 on the wire"):

- ``wire_dtype``: rows (and their grads in backward) travel in this dtype; "auto" is the
  compute dtype (bfloat16 under autocast, else x's dtype). The receiver casts rows back to
  the compute dtype before the experts, and the sender's combine accumulates in the gates'
  dtype (float32 or wider), so only the bytes on the wire are rounded.
- ``dedup``: a token routed to several experts of one worker travels to it once. Its row
  carries, bit-packed after the D features, its gates for that worker's local experts
  (a sentinel NaN pattern marks "not routed"), so the gates travel with the token and the
  receiver combines: it expands the row to its experts (index_select), runs them and sends
  back ONE gated, summed row per (token, worker). In backward the grad of that row comes
  in, the receiver computes the gates' grads itself (<grad_y, expert output>, the formula
  the sender's combine would use) and sends them back bit-packed after the row's x-grad:
  4 U rows per layer instead of 4 A (U distinct (token, worker) pairs, A assignments), no
  extra collective beyond a counts exchange of W ints. The alternative that keeps gates on
  the sender must return every expert output unsummed (2 U + 2 A rows). Gradients stay
  exact (the same formulas); sums over a token's experts change order (float tolerance).
  Plans with a payload per assignment (AoE) use the plain path.

Works on any initialised torch.distributed group whose backend has all_to_all (gloo on
CPU; NCCL with tensors on the current CUDA device), so a torchrun script can use the MoE
layer without moedist's runtime. Under autocast the rows travel in the compute dtype.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from moedist.kernels.dispatch import combine, gather_rows, inverse_permutation, sort_by_expert, unique_pairs
from moedist.model.experts import GroupedExperts
from moedist.model.moe import expert_rows
from moedist.parallel.clock import CommClock, bytes_to_others, measure, note_collective
from moedist.parallel.exchange import RowExchange
from moedist.parallel.overlap import ChunkPlan, chunk_of_local, run_pipelined
from moedist.parallel.placement import ExpertPlacement
from moedist.routing.base import RoutingPlan

__all__ = ["WIRE_DTYPES", "AllToAllDispatcher", "all_to_all_rows"]

WIRE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Bit pattern of a gate slot that holds no assignment (a NaN payload torch arithmetic does not
# produce; compared as integers, so a NaN gate computed by a router is never mistaken for it).
_ABSENT = {torch.float32: (torch.int32, 0x7FA5A5A5), torch.float64: (torch.int64, 0x7FF4A5A5A5A5A5A5)}


class _AllToAllRows(torch.autograd.Function):
    """Rows x_ND -> rows received from every rank; the backward sends the grads back."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group, clock, kind,
                exchange) -> Tensor:  # fmt: skip
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.clock, ctx.kind = send_splits, recv_splits, group, clock, kind
        ctx.exchange = exchange
        return _exchange(x_ND, send_splits, recv_splits, group, clock, kind, exchange)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RD: Tensor):
        grad_ND = _exchange(grad_RD, ctx.recv_splits, ctx.send_splits, ctx.group, ctx.clock, ctx.kind, ctx.exchange)
        return grad_ND, None, None, None, None, None, None


def _exchange(x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group, clock=None,
              kind: str = "a2a", exchange: RowExchange | None = None) -> Tensor:  # fmt: skip
    out_RD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    x_ND = x_ND.contiguous()
    with measure(clock, kind):
        note_collective(bytes_to_others(x_ND, send_splits, dist.get_rank(group)))
        if exchange is None:
            dist.all_to_all_single(out_RD, x_ND, recv_splits, send_splits, group=group)
        else:  # shared memory / hierarchical (moedist.parallel.exchange), same contract
            exchange(out_RD, x_ND, recv_splits, send_splits)
    return out_RD


def all_to_all_rows(
    x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group=None, clock: CommClock | None = None,
    kind: str = "a2a", exchange: RowExchange | None = None,
) -> Tensor:  # fmt: skip
    """Differentiable uneven all-to-all of rows: ``send_splits[w]`` consecutive rows of x_ND go
    to rank w, ``recv_splits[w]`` rows arrive from rank w (in rank order). A `clock` gets
    the seconds (and bytes sent) of both the forward and the backward exchange under `kind`.
    `exchange` (None: ``dist.all_to_all_single`` on `group`) moves the rows both ways."""
    return _AllToAllRows.apply(x_ND, list(send_splits), list(recv_splits), group, clock, kind, exchange)


def _gate_cols(gate_NL: Tensor, wire: torch.dtype) -> int:
    """Columns of the wire dtype that hold the bits of one row of gates."""
    return -(-gate_NL.shape[1] * gate_NL.element_size() // wire.itemsize)


def _pack(x_ND: Tensor, gate_NL: Tensor, wire: torch.dtype) -> Tensor:
    """[x cast to the wire dtype | the gates' bits, padded to whole wire-dtype columns],
    written in one pass (no intermediate cast or concatenation)."""
    (N, D), nbytes = x_ND.shape, gate_NL.shape[1] * gate_NL.element_size()
    p_ND = x_ND.new_empty((N, D + _gate_cols(gate_NL, wire)), dtype=wire)
    p_ND[:, :D].copy_(x_ND)
    bits_NB = p_ND.view(torch.uint8)[:, D * wire.itemsize :]
    bits_NB[:, :nbytes].copy_(gate_NL.contiguous().view(torch.uint8))
    bits_NB[:, nbytes:].zero_()
    return p_ND


def _unpack(p_ND: Tensor, D: int, L: int, x_dtype: torch.dtype, gate_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """_pack's inverse: (x in x_dtype, gates bit-exact)."""
    bits_NB = p_ND[:, D:].contiguous().view(torch.uint8)
    gate_NL = bits_NB[:, : L * gate_dtype.itemsize].contiguous().view(gate_dtype)
    return p_ND[:, :D].to(x_dtype), gate_NL


class _DedupRows(torch.autograd.Function):
    """Deduplicated rows with their gates out, (x_RD, gate_RL) in; the backward sends the
    grads of both back in the same packed layout (gate grads bit-exact, x-grads in the wire
    dtype)."""

    @staticmethod
    def forward(
        ctx,
        x_UD: Tensor,
        gate_UL: Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        wire: torch.dtype,
        compute: torch.dtype,
        owner: AllToAllDispatcher,
    ) -> tuple[Tensor, Tensor]:
        ctx.splits = send_splits, recv_splits
        ctx.owner, ctx.wire, ctx.owner_device = owner, wire, x_UD.device
        ctx.x_dtype, ctx.gate_dtype, ctx.D, ctx.L = x_UD.dtype, gate_UL.dtype, x_UD.shape[1], gate_UL.shape[1]
        p_RD = _exchange(_pack(x_UD, gate_UL, wire), send_splits, recv_splits, owner.group, owner.clock, "dispatch",
                         owner.exchange)  # fmt: skip
        return _unpack(p_RD, ctx.D, ctx.L, compute, gate_UL.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_RD: Tensor | None, grad_gate_RL: Tensor | None):
        send_splits, recv_splits = ctx.splits
        R, device = sum(recv_splits), ctx.owner_device
        if grad_x_RD is None:
            grad_x_RD = torch.zeros(R, ctx.D, dtype=ctx.wire, device=device)
        if grad_gate_RL is None:
            grad_gate_RL = torch.zeros(R, ctx.L, dtype=ctx.gate_dtype, device=device)
        p_UD = _exchange(_pack(grad_x_RD, grad_gate_RL, ctx.wire), recv_splits, send_splits,
                         ctx.owner.group, ctx.owner.clock, "dispatch", ctx.owner.exchange)  # fmt: skip
        grad_x_UD, grad_gate_UL = _unpack(p_UD, ctx.D, ctx.L, ctx.x_dtype, ctx.gate_dtype)
        return grad_x_UD, grad_gate_UL, None, None, None, None, None


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


def _run_received(experts: GroupedExperts, x_RD: Tensor, local: list[int], recv_WL: list[int], W: int,
                  L: int) -> Tensor:  # fmt: skip
    """The experts on received rows: W source blocks, each sorted by the local experts
    `local` (recv_WL[w * L + l] rows of expert l from source w), outputs in the same order.

    GroupedExperts runs the (source, expert) segments where they lie (no reordering pass,
    none in backward; an expert's GEMMs run per source). Other experts (AoE's) get the rows
    reordered expert-major and back; with one source or one expert the orders coincide."""
    sizes = [recv_WL[w * L + l] for w in range(W) for l in local]
    counts_L = [0] * L  # host ints, as the experts need
    for i, n in enumerate(sizes):
        counts_L[local[i % len(local)]] += n
    if W == 1 or len(local) <= 1:
        return experts(x_RD, counts_L)
    if hasattr(experts, "forward_segments"):
        return experts.forward_segments(x_RD, local * W, sizes)
    # Local expert of each received row; output_size spares a device sync on CUDA.
    local_R = torch.tensor(local * W).repeat_interleave(torch.tensor(sizes), output_size=x_RD.shape[0])
    perm_R = sort_by_expert(local_R.to(x_RD.device), L)[0].to(x_RD.device)
    inv_R = inverse_permutation(perm_R)
    out_sorted_RD = experts(_PermuteRows.apply(x_RD, perm_R, inv_R), counts_L)
    return _PermuteRows.apply(out_sorted_RD, inv_R, perm_R)


class AllToAllDispatcher:
    """Runs each assignment on the worker that owns its expert (see the module docstring).

    ``experts`` passed to a call holds only this rank's experts, in
    ``placement.local_experts(rank)`` order; ``plan`` uses global expert ids. ``group`` is a
    torch.distributed process group (None: the default group) whose size is
    ``placement.world_size``; ranks are group ranks. ``clock``, when set, accumulates the
    seconds of every exchange, forward and backward: the counts and the rows out under
    "dispatch", the results back under "combine".
    ``dedup`` and ``wire_dtype`` ("auto", "float32", "bfloat16") choose what travels (see
    the module docstring). ``fwd_bytes_sent`` adds up the row bytes this rank sends in
    forward calls (a backward pass sends the same again; counts exchanges not included).
    ``exchange`` (moedist.parallel.exchange.make_exchange; None: the collective on `group`)
    moves the token rows, e.g. through shared memory within a node.
    ``plan_counts``: take the split sizes from a plan that carries every worker's counts
    (``RoutingPlan.rank_counts_WE``: ET's guard and warm-up, EC, TC with a capacity routed
    over a pool on this same group) instead of exchanging them, one collective fewer per
    call; plans without them still exchange counts. Off by default here, since a plan's
    counts are over its router's pool group; moedist's runtime turns it on
    (``[comm] plan_counts``), where the pool and the dispatcher share one group.
    """

    def __init__(
        self,
        placement: ExpertPlacement,
        group: dist.ProcessGroup | None = None,
        clock: CommClock | None = None,
        dedup: bool = False,
        wire_dtype: str = "auto",
        exchange: RowExchange | None = None,
        overlap_chunks: int = 1,
        plan_counts: bool = False,
    ):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        if not isinstance(overlap_chunks, int) or overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be an integer >= 1, got {overlap_chunks!r}")
        if overlap_chunks > 1 and (dedup or exchange is not None):
            raise ValueError("overlap_chunks > 1 pipelines the collective exchange; it cannot be combined with "
                             "dedup or a shared-memory/hierarchical exchange")  # fmt: skip
        self.placement = placement
        self.group = group
        self.clock = clock
        self.dedup = bool(dedup)
        self.wire_dtype = wire_dtype
        self.exchange = exchange
        self.plan_counts = bool(plan_counts)
        # Chunks of the pipelined exchange: at most the largest worker's expert count (a
        # chunk is a group of each worker's local experts), the same on every rank.
        self.overlap_chunks = min(overlap_chunks, max(placement.n_local(w) for w in range(placement.world_size)))
        self._slot_E: dict[torch.device, Tensor] = {}
        self._chunk_slot_E: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._owner_local: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.fwd_bytes_sent = 0

    def __call__(self, x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts) -> Tensor:
        P, group = self.placement, self.group
        W, L, E = self._check(x_TD, plan, experts)
        if self.dedup and plan.payload_A is None:
            return self._dedup_call(x_TD, plan, experts, W, L)
        if self.overlap_chunks > 1 and W > 1:  # (one worker: nothing travels to overlap)
            return self._pipelined_call(x_TD, plan, experts, W, L)
        T, device = x_TD.shape[0], x_TD.device

        # 1. Sender: one counting sort by slot groups assignments by destination, then by
        # the destination's local expert, which is the send layout and the layout the
        # receiver's expert-major reordering expects.
        order_A, counts_S = sort_by_expert(self._slots(device)[plan.expert_idx_A], E)
        order_A, counts_S = order_A.to(device), counts_S.to(device)
        token_A = plan.token_idx_A[order_A]
        weight_A = plan.weight_A[order_A]

        # 2. Counts per (destination, its local expert) -> counts per (source, my local expert).
        send_S, recv_WL = self._split_counts(counts_S, plan, W, L)
        send_splits, recv_splits, start = [], [], 0
        for w in range(W):
            send_splits.append(sum(send_S[start : start + P.n_local(w)]))
            start += P.n_local(w)
            recv_splits.append(sum(recv_WL[w * L : (w + 1) * L]))

        # 3. Token rows out, in the wire dtype (auto: the compute dtype, so under autocast
        # half the bytes in bf16; the experts would cast them on arrival anyway), back to
        # the compute dtype on arrival. Autograd's casts send the grads in the wire dtype too.
        # (AoE: each row also carries the expert's low-rank activation, the plan's payload.)
        rows_AD = expert_rows(x_TD, token_A, order_A, plan)
        compute, wire = self._dtypes(x_TD)
        x_RD = all_to_all_rows(rows_AD.to(wire), send_splits, recv_splits, group, self.clock, "dispatch",
                              self.exchange).to(compute)  # fmt: skip
        self.fwd_bytes_sent += (sum(send_splits) + sum(recv_splits)) * rows_AD.shape[1] * wire.itemsize

        # 4. Receiver: the experts on the rows as they arrived.
        out_RD = _run_received(experts, x_RD, list(range(L)), recv_WL, W, L)

        # 5. Results back to their senders (the same rows, reverse splits), gated there.
        out_AD = all_to_all_rows(out_RD.to(wire), recv_splits, send_splits, group, self.clock, "combine", self.exchange)
        # float32 gates: the weighted sum accumulates in float32 even when experts ran in bf16.
        return combine(out_AD, weight_A, token_A, T)

    def _pipelined_call(self, x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts, W: int, L: int) -> Tensor:
        """The exchange in chunks of local experts, pipelined with the experts
        (moedist.parallel.overlap): chunk c's experts run while the other chunks travel."""
        P, group, C = self.placement, self.group, self.overlap_chunks
        T, E, device = x_TD.shape[0], P.n_experts, x_TD.device
        rank = dist.get_rank(group)

        # 1. Sender: counting sort by chunk-major slot (chunk, destination, local expert).
        order_A, counts_K = sort_by_expert(self._chunk_slots(device)[plan.expert_idx_A], E)
        order_A = order_A.to(device)
        token_A = plan.token_idx_A[order_A]
        weight_A = plan.weight_A[order_A]
        # Counts per rank-major slot (destination, its local expert) for the counts exchange.
        counts_S = counts_K.to(device)[self._chunk_slots(device, rank_major=True)]
        send_S, recv_WL = self._split_counts(counts_S, plan, W, L)

        # 2. Rows per chunk and worker, both ways, and each chunk's rows per local expert.
        send = [[0] * W for _ in range(C)]
        start = 0
        for w in range(W):
            n = P.n_local(w)
            for l in range(n):
                send[chunk_of_local(l, n, C)][w] += send_S[start + l]
            start += n
        local_C = [[l for l in range(L) if chunk_of_local(l, L, C) == c] for c in range(C)]
        recv = [[sum(recv_WL[w * L + l] for l in local) for w in range(W)] for local in local_C]
        starts = list(itertools.accumulate((sum(s) for s in send[:-1]), initial=0))
        cp = ChunkPlan(send, recv, starts, group, self.clock, rank)

        compute, wire = self._dtypes(x_TD)

        def run_chunk(c: int, x_RD: Tensor) -> Tensor:
            """Chunk c's experts on its received rows."""
            return _run_received(experts, x_RD.to(compute), local_C[c], recv_WL, W, L).to(wire)

        # 3. Rows out and results back, chunk by chunk, overlapped with the experts.
        rows_AD = expert_rows(x_TD, token_A, order_A, plan).to(wire)
        out_AD = run_pipelined(rows_AD, cp, run_chunk)
        self.fwd_bytes_sent += (cp.n_rows + sum(map(sum, recv))) * rows_AD.shape[1] * wire.itemsize
        return combine(out_AD, weight_A, token_A, T)

    def _split_counts(self, counts_S: Tensor, plan: RoutingPlan, W: int, L: int) -> tuple[list[int], list[int]]:
        """(send_S, recv_WL) of `_exchange_counts`; with ``plan_counts`` and a plan that
        carries every worker's counts (RoutingPlan.rank_counts_WE) read from the plan, with
        no collective. The choice is the same on every rank: routers set the counts from
        their collectives' results, which every rank shares. Counts that do not describe the
        plan (a routing bug) raise on the ranks that see it; as with `_check`, if only one
        rank raises, the others wait in the rows exchange until the group's timeout."""
        if not self.plan_counts or plan.rank_counts_WE is None:
            return self._exchange_counts(counts_S, W, L)
        P, rank = self.placement, dist.get_rank(self.group)
        all_WE = plan.rank_counts_WE
        if tuple(all_WE.shape) != (W, P.n_experts):
            raise ValueError(f"plan.rank_counts_WE has shape {tuple(all_WE.shape)}, the dispatcher's group and "
                             f"placement need ({W}, {P.n_experts}): route over the dispatcher's group")  # fmt: skip
        all_WE = all_WE.to(counts_S.device, torch.int64)
        send_S = torch.zeros_like(counts_S).index_copy_(0, self._slots(counts_S.device), all_WE[rank])
        recv_WL = all_WE[:, P.local_experts(rank)].reshape(-1)
        # One host transfer (one sync on CUDA), as in the exchange.
        host = torch.cat([send_S, counts_S, recv_WL]).tolist()
        send, mine, recv = host[: P.n_experts], host[P.n_experts : 2 * P.n_experts], host[2 * P.n_experts :]
        if send != mine:  # the router's counts do not describe this plan: a routing bug
            raise RuntimeError(f"rank {rank}: plan.rank_counts_WE says {send} assignments per slot, the plan has "
                               f"{mine}")  # fmt: skip
        return send, recv

    def _exchange_counts(self, counts_S: Tensor, W: int, L: int) -> tuple[list[int], list[int]]:
        """Rows per (destination, its local expert) out, rows per (source, my local expert)
        in, as host ints (send_S, recv_WL)."""
        P, group = self.placement, self.group
        recv_counts_WL = counts_S.new_empty(W * L)
        with measure(self.clock, "dispatch"):
            send_counts = [P.n_local(w) for w in range(W)]
            note_collective(bytes_to_others(counts_S.view(-1, 1), send_counts, dist.get_rank(group)))
            dist.all_to_all_single(recv_counts_WL, counts_S, [L] * W, send_counts, group=group)
        # One host transfer for both (one sync on CUDA): split sizes must be host ints.
        host = torch.cat([counts_S, recv_counts_WL]).tolist()
        return host[: counts_S.shape[0]], host[counts_S.shape[0] :]

    def _chunk_slots(self, device: torch.device, rank_major: bool = False) -> Tensor:
        """Global expert -> chunk-major slot (chunk, owner rank, local index); with
        `rank_major`, rank-major slot -> chunk-major slot (to read counts kept chunk-major in
        rank-major order). Both cached per device."""
        if device not in self._chunk_slot_E:
            P, C = self.placement, self.overlap_chunks
            key = {}
            for e in range(P.n_experts):
                w, l = P.owner_E[e], P.local_index(e)
                key[e] = (chunk_of_local(l, P.n_local(w), C), w, l)
            ranked = sorted(range(P.n_experts), key=key.__getitem__)
            slot_E = [0] * P.n_experts
            for s, e in enumerate(ranked):
                slot_E[e] = s
            chunk_E = torch.tensor(slot_E, dtype=torch.int64, device=device)
            self._chunk_slot_E[device] = (chunk_E, chunk_E[inverse_permutation(self._slots(device))])
        return self._chunk_slot_E[device][1 if rank_major else 0]

    def _dedup_call(self, x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts, W: int, L: int) -> Tensor:
        """The deduplicated exchange (module docstring): U rows out, U gated sums back."""
        P, group = self.placement, self.group
        T, device = x_TD.shape[0], x_TD.device
        compute, wire = self._dtypes(x_TD)
        owner_E, local_E = self._owner_local_E(device)
        expert_A = plan.expert_idx_A.to(device)
        dest_A, local_A = owner_E[expert_A], local_E[expert_A]

        # 1. Sender: distinct (destination, token) pairs, destination-major; each pair's row
        # carries its gates for the destination's experts (absent ones hold the sentinel).
        u_A, token_U, send_W = unique_pairs(plan.token_idx_A.to(device), dest_A, T, W)
        Lmax = max(P.n_local(w) for w in range(W))
        gate_dtype = torch.float64 if plan.weight_A.dtype == torch.float64 else torch.float32
        int_dtype, absent = _ABSENT[gate_dtype]
        blank_UL = torch.full((token_U.shape[0], Lmax), absent, dtype=int_dtype, device=device).view(gate_dtype)
        gate_UL = blank_UL.index_put((u_A, local_A), plan.weight_A.to(gate_dtype))
        # A (token, expert) pair twice in one plan would keep one gate of the two; routers
        # build plans from a [T, E] mask, so this is a bad plan (checked: U x L is small).
        n_set = int((gate_UL.detach().view(int_dtype) != absent).sum())
        if n_set != u_A.shape[0]:
            raise ValueError(f"plan repeats {u_A.shape[0] - n_set} (token, expert) pair(s); dedup needs distinct pairs")

        # 2. Rows per destination -> rows per source (one int each way).
        recv_W = send_W.new_empty(W)
        with measure(self.clock, "dispatch"):
            note_collective(bytes_to_others(send_W.view(-1, 1), [1] * W, dist.get_rank(group)))
            dist.all_to_all_single(recv_W, send_W, group=group)
        host = torch.cat([send_W, recv_W]).tolist()
        send_splits, recv_splits = host[:W], host[W:]

        # 3. Rows and gates out; the receiver sees each (source, token) once.
        x_UD = gather_rows(x_TD, token_U)
        x_RD, gate_RL = _DedupRows.apply(x_UD, gate_UL, send_splits, recv_splits, wire, compute, self)

        # 4. Receiver: expand to (local expert, row) pairs, expert-major (nonzero of the
        # transposed mask is sorted by expert, then row), run the experts, combine per row.
        present_RL = gate_RL.detach()[:, :L].contiguous().view(int_dtype) != absent
        pair_A2 = present_RL.t().nonzero()
        local_a, row_a = pair_A2[:, 0], pair_A2[:, 1].contiguous()
        counts_L = present_RL.sum(0).tolist()
        out_AD = experts(gather_rows(x_RD, row_a), counts_L)
        # float32 (or wider) gates: each row's sum accumulates in float32 even from bf16 experts.
        y_RD = combine(out_AD, gate_RL[row_a, local_a], row_a, x_RD.shape[0])

        # 5. One summed row per (token, worker) back; the sender adds up its workers' rows.
        y_UD = all_to_all_rows(y_RD.to(wire), recv_splits, send_splits, group, self.clock, "combine", self.exchange)
        self.fwd_bytes_sent += (sum(send_splits) * (x_UD.shape[1] + _gate_cols(gate_UL, wire)) +
                                sum(recv_splits) * y_RD.shape[1]) * wire.itemsize  # fmt: skip
        ones_U = torch.ones(token_U.shape[0], dtype=gate_dtype, device=device)
        return combine(y_UD, ones_U, token_U, T)

    def _dtypes(self, x_TD: Tensor) -> tuple[torch.dtype, torch.dtype]:
        """(compute dtype of the experts, dtype of rows on the wire)."""
        device_type = x_TD.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_TD.dtype
        return compute, WIRE_DTYPES[self.wire_dtype] or compute

    def _owner_local_E(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(owner rank, local index there) of every global expert, cached per device."""
        if device not in self._owner_local:
            P = self.placement
            self._owner_local[device] = (
                torch.tensor(P.owner_E, dtype=torch.int64, device=device),
                torch.tensor([P.local_index(e) for e in range(P.n_experts)], dtype=torch.int64, device=device),
            )
        return self._owner_local[device]

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

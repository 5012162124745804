"""The MoE FFN block: Router -> Dispatcher -> GroupedExperts, plus an optional shared expert.

Legend: T tokens in the pool, A (token, expert) assignments, D model width, E experts,
F expert width.

The dispatcher is the seam between the math and the parallel runtime: `LocalDispatcher`
runs every expert in this process (the oracle); moedist.parallel's all-to-all dispatcher
has the same call signature and runs the experts where they live.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from moedist.config import RouterConfig
from moedist.kernels.dispatch import combine, gather_rows, sort_by_expert
from moedist.model.aoe_experts import AoEExperts
from moedist.model.experts import GroupedExperts
from moedist.routing import Router, RoutingPlan, make_router
from moedist.routing.aoe import aoe_dims


def expert_rows(x_TD: Tensor, token_A: Tensor, order_A: Tensor | None, plan: RoutingPlan) -> Tensor:
    """The rows the experts get, in `order_A` of the plan's assignments: x of each
    assignment's token, followed by the plan's payload (AoE's low-rank activation) if any."""
    rows_AD = gather_rows(x_TD, token_A)
    if plan.payload_A is None:
        return rows_AD
    payload_AP = plan.payload_A if order_A is None else plan.payload_A[order_A]
    return torch.cat([rows_AD, payload_AP.to(rows_AD.dtype)], dim=1)


class Dispatcher(Protocol):
    """Moves routed tokens to their experts and the results back, weighted."""

    def __call__(self, x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts) -> Tensor: ...


class LocalDispatcher:
    """All experts in this process: counting sort by expert, then one fused pass per expert
    (gather its token rows, MLP, gated scatter-add into y_TD)."""

    def __call__(self, x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts) -> Tensor:
        if plan.payload_A is not None or not isinstance(experts, GroupedExperts):
            return SplitLocalDispatcher()(x_TD, plan, experts)
        order_A, counts_E = sort_by_expert(plan.expert_idx_A, plan.n_experts)
        return experts.forward_gathered(x_TD, plan.token_idx_A[order_A], plan.weight_A[order_A], counts_E)


class SplitLocalDispatcher:
    """The same as LocalDispatcher in separate stages (gather -> experts -> combine), the
    shape the all-to-all dispatcher has; kept as a second implementation for tests."""

    def __call__(self, x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts) -> Tensor:
        order_A, counts_E = sort_by_expert(plan.expert_idx_A, plan.n_experts)
        token_A = plan.token_idx_A[order_A]
        out_AD = experts(expert_rows(x_TD, token_A, order_A, plan), counts_E)
        # float32 gates: the weighted sum accumulates in float32 even when experts ran in bf16.
        return combine(out_AD, plan.weight_A[order_A], token_A, x_TD.shape[0])


class MoEBlock(nn.Module):
    """y_t = shared(x_t) + sum_i w_ti * expert_i(x_t) over the experts routed to token t."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_width: int,
        n_shared: int,
        activation: str,
        router_cfg: RouterConfig,
        init_std: float,
        out_std: float,
    ):
        super().__init__()
        self.n_experts = n_experts
        self.router: Router = make_router(router_cfg, d_model, n_experts, init_std)
        self.experts: GroupedExperts | AoEExperts
        if router_cfg.kind == "aoe":
            # AoE experts finish the router's low-rank gate activation (param-matched to `activation`).
            d_low, d_wide = aoe_dims(d_model, expert_width, router_cfg, activation)
            self.experts = AoEExperts(n_experts, d_model, d_low, d_wide, init_std=init_std, out_std=out_std)
        else:
            self.experts = GroupedExperts(
                n_experts, d_model, expert_width, activation=activation, init_std=init_std, out_std=out_std
            )
        # n_shared always-on experts are one MLP of n_shared x the expert width, run through
        # the same fused grouped-MLP autograd function as the routed experts (one segment of
        # all T rows), which saves less for backward than nn.Linear + autograd.
        self.shared = (
            GroupedExperts(1, d_model, n_shared * expert_width, activation=activation, init_std=init_std,
                           out_std=out_std)
            if n_shared > 0
            else None
        )
        self.dispatcher: Dispatcher = LocalDispatcher()
        # A step profiler (moedist.parallel.clock.CommClock, spans on) the trainer attaches:
        # it times the router and the experts' part of the block (forward and backward).
        self.clock = None

    def forward(self, x_TD: Tensor) -> tuple[Tensor, RoutingPlan]:
        clock = self.clock
        if clock is None:
            plan = self.router(x_TD)
            y_TD = self.dispatcher(x_TD, plan, self.experts)
        else:
            with clock.measure("router"):
                plan = self.router(x_TD)
            # "expert": the block's local work (sort, gather, expert MLPs, gated combine);
            # the exchanges inside it are measured as dispatch and combine (self times).
            y_TD = clock.traced("expert", self.dispatcher, x_TD, plan, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD, [x_TD.shape[0]])
        return y_TD, plan



def expert_mlp(x_TD: Tensor, w1_DF: Tensor, w2_FD: Tensor, w3_DF: Tensor | None, activation: str) -> Tensor:
    """One expert's MLP, written plainly (used by the reference implementations)."""
    h_TF = x_TD @ w1_DF
    h_TF = torch.relu(h_TF).square() if activation == "relu2" else torch.nn.functional.silu(h_TF) * (x_TD @ w3_DF)
    return h_TF @ w2_FD


def masked_loop_reference(x_TD: Tensor, plan: RoutingPlan, experts: GroupedExperts) -> Tensor:
    """The common per-expert masked loop (reference implementation for tests/benchmarks)."""
    y_TD = torch.zeros_like(x_TD)
    mask_TE = plan.mask_TE()
    weights_TE = torch.zeros(x_TD.shape[0], plan.n_experts, dtype=x_TD.dtype, device=x_TD.device)
    weights_TE = weights_TE.index_put((plan.token_idx_A, plan.expert_idx_A), plan.weight_A.to(x_TD.dtype))
    for e in range(plan.n_experts):
        rows = mask_TE[:, e].nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        w3 = experts.w3_EDF[e] if experts.activation == "swiglu" else None
        out = expert_mlp(x_TD[rows], experts.w1_EDF[e], experts.w2_EFD[e], w3, experts.activation)
        y_TD = y_TD.index_add(0, rows, (out * weights_TE[rows, e].unsqueeze(1)).to(y_TD.dtype))
    return y_TD

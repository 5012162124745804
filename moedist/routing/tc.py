"""Token choice top-k (GShard / Switch / Mixtral), with Switch aux loss, z-loss and an
optional capacity factor (dropless by default).

Legend: T local tokens, N global pool tokens, E experts, K = top_k, W workers of the pool.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moedist.routing.base import Router, RoutingPlan, gate_probs, take_in_rank_order


def switch_aux_loss(probs_TE: Tensor, mask_TE: Tensor, pool_n: int, k: int, pool_sum) -> Tensor:
    """alpha-free Switch loss E * sum_i f_i * P_i over the global pool.

    f_i = share of the N*k assignments that went to expert i (no gradient),
    P_i = mean gate probability of expert i (carries the gradient).
    """
    E = probs_TE.shape[1]
    f_E = pool_sum(mask_TE.sum(0).to(probs_TE.dtype)) / max(pool_n * k, 1)
    P_E = pool_sum(probs_TE.sum(0)) / max(pool_n, 1)
    return E * (f_E.detach() * P_E).sum()


def topk_mask(scores_TE: Tensor, k: int) -> Tensor:
    """Boolean [T, E] mask of each row's top-k entries."""
    idx_TK = torch.topk(scores_TE, k, dim=-1).indices
    mask_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
    return mask_TE.scatter_(1, idx_TK, True)


def apply_capacity(mask_TE: Tensor, capacity: int, prefix_E: Tensor) -> Tensor:
    """Keep, per expert, its first `capacity` tokens in token order (Switch priority).

    prefix_E counts tokens already taken by workers earlier in the global order.
    """
    rank_TE = torch.cumsum(mask_TE.to(torch.int64), dim=0) + prefix_E.unsqueeze(0)
    return mask_TE & (rank_TE <= capacity)


class TokenChoiceRouter(Router):
    """Each token picks its top-k experts by gate probability."""

    default_gate = "softmax"

    def select_scores(self, probs_TE: Tensor, logits_TE: Tensor | None = None) -> Tensor:
        """Scores used for the top-k selection (LF adds its bias here, to the probabilities
        or to the logits)."""
        return probs_TE

    def plan_stat_names(self) -> tuple[str, ...]:
        return ("capped",) if self.cfg.capacity_factor > 0 else ()

    def forward(self, x_TD: Tensor) -> RoutingPlan:
        logits_TE = self.restrict(self.logits(x_TD))
        probs_TE = gate_probs(logits_TE, self.gate)
        T, E = probs_TE.shape
        N = self.pool.total(T)
        stats: dict[str, Tensor] = {}
        counts_WE = None
        with torch.no_grad():
            # The selection before capacity drops (the experts the weights renormalise over).
            sel_TE = mask_TE = topk_mask(self.select_scores(probs_TE, logits_TE), self.top_k)
            if self.cfg.capacity_factor > 0:
                cap = math.ceil(self.cfg.capacity_factor * self.capacity(N))
                chosen_TE = mask_TE
                # Every worker's choices per expert (one all-gather): the priority prefix of
                # this worker, and what every worker keeps (the dispatcher's split sizes).
                prefix_WE, counts_WE = take_in_rank_order(self.pool.gather_counts(chosen_TE.sum(0)), cap)
                mask_TE = apply_capacity(chosen_TE, cap, prefix_WE[self.pool.world_rank[1]])
                stats["capped"] = (chosen_TE & ~mask_TE).sum(0)  # dropped over capacity
        weights_TE = probs_TE
        if self.cfg.normalize_weights and self.top_k > 1:
            # Renormalise over the SELECTED experts (before capacity drops, as Mixtral does).
            denom_T1 = (probs_TE * sel_TE).sum(-1, keepdim=True).clamp_min(1e-20)
            weights_TE = probs_TE / denom_T1
        aux = self.aux_losses(logits_TE, probs_TE, mask_TE, N)
        token_idx_A, expert_idx_A = mask_TE.nonzero(as_tuple=True)
        return RoutingPlan(
            token_idx_A=token_idx_A,
            expert_idx_A=expert_idx_A,
            weight_A=weights_TE[token_idx_A, expert_idx_A],
            n_tokens=T,
            n_experts=E,
            aux_loss=aux,
            stats=stats,
            rank_counts_WE=counts_WE,
        )

    def aux_losses(self, logits_TE: Tensor, probs_TE: Tensor, mask_TE: Tensor, N: int) -> Tensor | None:
        """Switch balance loss and router z-loss, as configured."""
        total = None
        if self.cfg.aux_loss_coef > 0:
            # The Switch loss is defined on softmax probabilities; with a sigmoid gate we
            # normalise the sigmoid scores per token so P_i still sums to 1 over experts.
            p_TE = probs_TE if self.gate == "softmax" else probs_TE / probs_TE.sum(-1, keepdim=True)
            total = self.cfg.aux_loss_coef * switch_aux_loss(p_TE, mask_TE, N, self.top_k, self.pool.sum)
        if self.cfg.z_loss_coef > 0:
            z = self.pool.sum(torch.logsumexp(logits_TE, dim=-1).square().sum()) / max(N, 1)
            total = self.cfg.z_loss_coef * z if total is None else total + self.cfg.z_loss_coef * z
        return total

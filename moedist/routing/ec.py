"""Expert choice (Zhou et al. 2022): each expert takes its top-k tokens of the pool,
k = N * top_k / E. Perfectly balanced, variable experts per token, NOT causal: whether a
token is chosen depends on the other tokens of the pool (later ones included).

Legend: T local tokens, N global pool tokens, E experts, W workers of the pool.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moedist.routing.base import PoolOps, Router, RoutingPlan, gate_probs, plan_from_mask, take_in_rank_order


def pool_topk_mask(logits_TE: Tensor, k_E: Tensor, pool: PoolOps) -> Tensor:
    """Mask of exactly min(k_E, N) tokens per expert e: its top-k_E of the global pool.

    Every worker decides its own tokens from one shared cutoff (the k-th largest value).
    Tokens tied at the cutoff are taken in global token order (lower rank first, then
    local position) until k is reached, so the choice never depends on how the pool is
    split over workers and an expert never takes more than k tokens.
    """
    return pool_topk_mask_counts(logits_TE, k_E, pool)[0]


def pool_topk_mask_counts(logits_TE: Tensor, k_E: Tensor, pool: PoolOps) -> tuple[Tensor, Tensor]:
    """`pool_topk_mask` and how many tokens each worker's mask gives each expert [W, E]
    (int64; every worker computes the same, from the same collective's counts)."""
    cutoff_E, above_WE, ties_WE = pool.topk_cut(logits_TE, k_E)
    rank = pool.world_rank[1]
    cutoff_1E = cutoff_E.unsqueeze(0)
    above_TE = logits_TE > cutoff_1E
    tied_TE = logits_TE == cutoff_1E
    # Ties to take globally = k minus the tokens strictly above the cutoff anywhere; the
    # global order of a tied token among the ties puts lower ranks' ties first, so each
    # worker takes its ties in that order until the need is met.
    need_E = k_E.to(torch.int64) - above_WE.sum(0)
    before_WE, taken_WE = take_in_rank_order(ties_WE, need_E.unsqueeze(0))
    tie_order_TE = before_WE[rank].unsqueeze(0) + tied_TE.cumsum(0) - 1
    mask_TE = above_TE | (tied_TE & (tie_order_TE < need_E.unsqueeze(0)))
    return mask_TE, above_WE + taken_WE


def ec_k(n_pool: int, top_k: int, n_experts: int) -> int:
    """Tokens per expert for expert choice: round(N * top_k / E), at least 1 if N > 0."""
    if n_pool == 0:
        return 0
    return max(1, min(n_pool, round(n_pool * top_k / n_experts)))


class ExpertChoiceRouter(Router):
    """Each expert picks its top-k tokens of the pool."""

    default_gate = "softmax"
    causal = False

    def forward(self, x_TD: Tensor) -> RoutingPlan:
        logits_TE = self.restrict(self.logits(x_TD))
        probs_TE = gate_probs(logits_TE, self.gate)
        T, E = logits_TE.shape
        N = self.pool.total(T)
        k_E = torch.full((E,), ec_k(N, self.top_k, E), dtype=torch.int64, device=x_TD.device)
        with torch.no_grad():
            mask_TE, counts_WE = pool_topk_mask_counts(logits_TE.detach(), k_E, self.pool)
        return plan_from_mask(mask_TE, probs_TE, rank_counts_WE=counts_WE)

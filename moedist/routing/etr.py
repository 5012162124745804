"""Expert-Token Resonance (ETR, arXiv 2406.00023): a fixed affinity and bidirectional
selection.

Affinity: expert i owns the i-th contiguous slice of the D hidden dimensions (D/E each,
torch.tensor_split when E does not divide D); its unlearned vector w_i averages that slice,
scaled to unit norm, so the rows of w are orthonormal. delta_ti = cos(x_t, w_i).

Selection (training): token choice top-l by affinity (l = router.top_k), then each expert
keeps at most C of the tokens that chose it, the ones of highest affinity in the global
pool (expert choice within the assignment). C = etr_capacity_factor * N*l/E when set; else
the paper's lower bound, read here as a share of the pool's assignments:
C = ceil(min(1, exp(D * dmax^2 / (2 - dmax^2)) / E) * N * l), dmax = the largest affinity
in the pool (|cos| <= 1 keeps the formula finite). In eval mode there is no capacity: the
token-choice path is causal, the expert-side capacity is not (it compares a token with the
rest of the pool, later tokens included), so training routing is not causal.

Gate weights: `gate` (default softmax) of the affinities, not renormalised. Locality loss
(locality_loss_coef = mu): mu * KL(D_loc || D_cur), where D_cur is the mean gate
distribution of this worker's tokens over experts and D_loc the same distribution moved
onto the experts on this worker's node; it equals -mu * log(mass of D_cur on local
experts), is 0 when every expert is local (a single process) and is averaged over tokens.

Legend: T local tokens, N global pool tokens, E experts, D model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moedist.config import RouterConfig
from moedist.routing.base import Router, RoutingPlan, gate_probs, plan_from_mask, routing_dtype
from moedist.routing.ec import pool_topk_mask
from moedist.routing.tc import topk_mask


def slice_average_vectors(d_model: int, n_experts: int) -> Tensor:
    """w_ED: row i averages the i-th contiguous slice of the D dimensions; unit norm."""
    if n_experts > d_model:
        raise ValueError(f"ETR needs at most d_model = {d_model} experts (a slice each), got {n_experts}")
    w_ED = torch.zeros(n_experts, d_model)
    for i, dims in enumerate(torch.tensor_split(torch.arange(d_model), n_experts)):
        w_ED[i, dims] = 1.0 / math.sqrt(len(dims))
    return w_ED


def capacity_lower_bound(d_model: int, n_experts: int, delta_max: float, n_pool: int, top_l: int) -> int:
    """The paper's C_min as tokens per expert: ceil(min(1, exp(D dmax^2/(2-dmax^2))/E) * N * l)."""
    dm2 = min(abs(delta_max), 1.0) ** 2
    share = min(1.0, math.exp(min(d_model * dm2 / (2.0 - dm2), 700.0)) / n_experts)
    return min(n_pool * top_l, math.ceil(share * n_pool * top_l))


class ResonanceRouter(Router):
    """Fixed grouped-average-pooling affinity; top-l per token, then capacity per expert."""

    default_gate = "softmax"
    has_projection = False

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig, init_std: float = 0.02):
        super().__init__(d_model, n_experts, cfg, init_std)
        self.d_model = d_model
        self.register_buffer("w_ED", slice_average_vectors(d_model, n_experts), persistent=False)
        self.last_capacity = 0

    def logits(self, x_TD: Tensor) -> Tensor:
        """Affinities delta_TE = cos(x_t, w_i), in routing_dtype (float32 or float64)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.to(routing_dtype(x_TD))
            return (x @ self.w_ED.to(x.dtype).T) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def forward(self, x_TD: Tensor) -> RoutingPlan:
        delta_TE = self.restrict(self.logits(x_TD))
        probs_TE = gate_probs(delta_TE, self.gate)
        stats: dict[str, Tensor] = {}
        with torch.no_grad():
            mask_TE = topk_mask(delta_TE, self.top_k)
            if self.training:
                chosen_TE = mask_TE
                mask_TE = self._expert_side_capacity(delta_TE, chosen_TE)
                stats["capped"] = (chosen_TE & ~mask_TE).sum(0)  # dropped over capacity
        plan = plan_from_mask(mask_TE, probs_TE, stats=stats)
        if self.training and self.cfg.locality_loss_coef > 0:
            plan.aux_loss = self.cfg.locality_loss_coef * self._locality_loss(probs_TE)
        return plan

    def plan_stat_names(self) -> tuple[str, ...]:
        return ("capped",)

    def capacity(self, n_pool: int, delta_max: float = 0.0) -> float:  # type: ignore[override]
        """Tokens each expert may keep: configured factor, or the paper's lower bound."""
        if self.cfg.etr_capacity_factor > 0:
            return math.ceil(self.cfg.etr_capacity_factor * n_pool * self.top_k / self.n_experts)
        return capacity_lower_bound(self.d_model, self.n_experts, delta_max, n_pool, self.top_k)

    def _expert_side_capacity(self, delta_TE: Tensor, mask_TE: Tensor) -> Tensor:
        N = self.pool.total(delta_TE.shape[0])
        E = self.n_experts
        delta_max = 0.0
        if self.cfg.etr_capacity_factor == 0:
            ones_E = torch.ones(E, dtype=torch.int64, device=delta_TE.device)
            delta_max = float(self.pool.kth_largest(delta_TE, ones_E).max()) if N > 0 else 0.0
        cap = int(self.capacity(N, delta_max))
        self.last_capacity = cap
        chosen_E = self.pool.sum(mask_TE.sum(0))
        if int(chosen_E.max()) <= cap:  # nobody is over capacity (the same answer on every worker)
            return mask_TE
        # Each expert keeps its `cap` best tokens among those that chose it.
        chosen_TE = delta_TE.masked_fill(~mask_TE, -math.inf)
        return mask_TE & pool_topk_mask(chosen_TE, chosen_E.clamp(max=cap), self.pool)

    def _locality_loss(self, probs_TE: Tensor) -> Tensor:
        if self.on_node_E is None or bool(self.on_node_E.all()):
            return probs_TE.sum() * 0.0  # every expert is local: D_loc = D_cur
        T = probs_TE.shape[0]
        p_TE = probs_TE / probs_TE.sum(-1, keepdim=True)
        local_mass = (p_TE.mean(0) * self.on_node_E.to(p_TE.dtype)).sum().clamp_min(1e-12)
        # token-weighted mean over workers of -log(local mass)
        return self.pool.sum(-torch.log(local_mass) * T) / max(self.pool.total(T), 1)

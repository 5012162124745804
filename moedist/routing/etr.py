"""Expert-Token Resonance (ETR, arXiv 2406.00023): a fixed affinity and bidirectional
selection.

Affinity: expert i owns the i-th contiguous slice of the D hidden dimensions (D/E each,
torch.tensor_split when E does not divide D); its unlearned vector w_i averages that slice,
scaled to unit norm, so the rows of w are orthonormal. delta_ti = cos(x_t, w_i).

Selection (training): token choice top-l by affinity (l = router.top_k), then each expert
keeps at most C of the tokens that chose it, the ones of highest affinity in the global
pool (expert choice within the assignment). The paper's lower bound, read as a share of
the pool's assignments, is B(dmax) = ceil(min(1, exp(D dmax^2 / (2 - dmax^2)) / E) * N*l).
Default (etr_capacity_factor = cf > 0): C = ceil(cf * N*l/E), at least B(1/sqrt(D)) with
etr_capacity_floor: the bound at the typical affinity of the paper's own assumptions
(isotropic tokens, orthogonal affinity vectors: E[cos^2] = 1/D), about 1.65 * N*l/E.
With cf = 0: C = B(dmax), dmax = the largest affinity in the pool, which on isotropic
tokens is N*l (no cap) for any D of interest. In eval mode there is no capacity: the
token-choice path is causal, the expert-side capacity is not (it compares a token with the
rest of the pool, later tokens included), so training routing is not causal.

Gate weights: `gate` (default softmax) of the affinities, not renormalised. Training adds
two losses: the Switch balance loss etr_aux_loss_coef * E * sum_i f_i P_i (f_i share of the
kept assignments, P_i mean gate probability; its gradient reaches the hidden states, as the
affinity has no parameters), and the locality loss (locality_loss_coef = mu):
mu * KL(D_loc || D_cur), where D_cur is the mean gate distribution of this worker's tokens
over experts and D_loc the same distribution moved onto the experts on this worker's node;
it equals -mu * log(mass of D_cur on local experts), is 0 when every expert is local (a
single process) and is averaged over tokens. The paper writes KL(D_cur || D_loc), which is
infinite whenever D_cur puts mass on another node's expert (D_loc is 0 there).

Legend: T local tokens, N global pool tokens, E experts, D model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moedist.config import RouterConfig
from moedist.routing.base import Router, RoutingPlan, gate_probs, plan_from_mask, routing_dtype
from moedist.routing.ec import pool_topk_mask
from moedist.routing.tc import switch_aux_loss, topk_mask


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


def typical_affinity(d_model: int) -> float:
    """RMS cosine of an isotropic token with a fixed unit vector: 1/sqrt(D)."""
    return 1.0 / math.sqrt(d_model)


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
        if self.training:
            plan.aux_loss = self._training_losses(probs_TE, mask_TE)
        return plan

    def _training_losses(self, probs_TE: Tensor, mask_TE: Tensor) -> Tensor | None:
        """Switch balance loss (on the kept assignments) plus the locality loss, as configured."""
        total = None
        if self.cfg.etr_aux_loss_coef > 0:
            N = self.pool.total(probs_TE.shape[0])
            # a sigmoid gate is normalised per token so P sums to 1, as in TC
            p_TE = probs_TE if self.gate == "softmax" else probs_TE / probs_TE.sum(-1, keepdim=True)
            total = self.cfg.etr_aux_loss_coef * switch_aux_loss(p_TE, mask_TE, N, self.top_k, self.pool.sum)
        if self.cfg.locality_loss_coef > 0:
            loc = self.cfg.locality_loss_coef * self._locality_loss(probs_TE)
            total = loc if total is None else total + loc
        return total

    def plan_stat_names(self) -> tuple[str, ...]:
        return ("capped",)

    def capacity(self, n_pool: int, delta_max: float = 0.0) -> float:  # type: ignore[override]
        """Tokens each expert may keep: the configured factor (floored by the paper's bound at
        the typical affinity), or with factor 0 the paper's bound at the pool's `delta_max`."""
        D, E, l = self.d_model, self.n_experts, self.top_k
        if self.cfg.etr_capacity_factor > 0:
            cap = math.ceil(self.cfg.etr_capacity_factor * n_pool * l / E)
            if self.cfg.etr_capacity_floor:
                cap = max(cap, capacity_lower_bound(D, E, typical_affinity(D), n_pool, l))
            return min(cap, n_pool * l)
        return capacity_lower_bound(D, E, delta_max, n_pool, l)

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

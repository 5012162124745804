"""Autonomy of Experts (AoE, arXiv 2501.13074): no router; experts choose themselves.

Each expert i factorises its gate projection W_g,i = W_down,i (D x L) . W_up,i (L x W).
One matmul with the concatenated [D, E*L] matrix gives every expert's low-rank activation
a_i = x W_down,i; an expert's score is ||a_i||_2; each token takes its top-k experts by
score, weighted by the softmax over all E scores, the k values kept as they are (the
official code; router.aoe_renormalize: the softmax over the k selected scores); the
selected experts finish
E_i(x) = (SiLU(a_i W_up,i) * (x W_p,i)) W_o,i, reusing a_i (it travels with the token as
the plan's payload, through the all-to-all in expert-parallel runs).

With aoe_param_match, an AoE expert (W_down,i, W_up,i, W_p,i, W_o,i: L D + W (L + 2 D)
parameters) gets the parameter count P of the model's own expert of width F, within one
row of W: W = (P - L D) / (L + 2 D), P = 3 D F for SwiGLU (the paper's formula) and
2 D F for ReLU^2 experts. Optional Switch aux
loss on the softmax of the scores (router.aux_loss_coef; 0 turns it off).

Legend: T tokens, E experts, L = d_low, W = d_wide, D model width, A assignments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moedist.config import ConfigError, RouterConfig
from moedist.routing.base import Router, RoutingPlan, plan_from_mask, routing_dtype
from moedist.routing.tc import switch_aux_loss, topk_mask


def expert_param_count(d_model: int, width: int, activation: str) -> int:
    """Parameters of one standard expert: 3 D F (SwiGLU) or 2 D F (ReLU^2)."""
    return (3 if activation == "swiglu" else 2) * d_model * width


def aoe_dims(d_model: int, width: int, cfg: RouterConfig, activation: str = "swiglu") -> tuple[int, int]:
    """(d_low, d_wide) of AoE experts replacing experts of `width` and `activation`."""
    d_low = cfg.aoe_d_low or max(1, d_model // 3)
    if cfg.aoe_param_match:
        P = expert_param_count(d_model, width, activation)
        d_wide = round((P - d_low * d_model) / (d_low + 2 * d_model))
    else:
        d_wide = cfg.aoe_d_wide or width
    if d_wide < 1:
        raise ConfigError(
            f"router.aoe_d_low ({d_low}) leaves no room for the expert with model.d_model ({d_model}) and "
            f"expert width {width} (param-matched d_wide = {d_wide}); lower router.aoe_d_low"
        )
    return d_low, d_wide


class AutonomyRouter(Router):
    """Every expert's low-rank activation in one matmul; top-k experts by its L2 norm."""

    default_gate = "softmax"
    has_projection = False

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig, init_std: float = 0.02):
        super().__init__(d_model, n_experts, cfg, init_std)
        self.d_low = cfg.aoe_d_low or max(1, d_model // 3)
        # W_down of all experts side by side: [D, E*L] as a Linear (weight [E*L, D]).
        self.w_down = nn.Linear(d_model, n_experts * self.d_low, bias=False)
        nn.init.normal_(self.w_down.weight, std=init_std)

    def activations(self, x_TD: Tensor) -> Tensor:
        """a_TEL: every expert's low-rank activation (the one matmul)."""
        return self.w_down(x_TD).view(x_TD.shape[0], self.n_experts, self.d_low)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Scores ||a_i|| in routing_dtype (what signatures and analysis read as logits)."""
        a_TEL = self.activations(x_TD)
        return a_TEL.to(routing_dtype(a_TEL)).norm(dim=-1)

    def forward(self, x_TD: Tensor) -> RoutingPlan:
        a_TEL = self.activations(x_TD)
        scores_TE = self.restrict(a_TEL.to(routing_dtype(a_TEL)).norm(dim=-1))
        with torch.no_grad():
            mask_TE = topk_mask(scores_TE, self.top_k)
        probs_TE = torch.softmax(scores_TE, dim=-1)  # over all E experts (official code)
        if self.cfg.aoe_renormalize:
            # softmax over the selected scores only: sums to 1, constant 1 at top_k = 1
            weights_TE = torch.softmax(scores_TE.masked_fill(~mask_TE, -math.inf), dim=-1)
        else:
            weights_TE = probs_TE  # the top-k values, not renormalised
        aux = None
        if self.cfg.aux_loss_coef > 0:
            N = self.pool.total(scores_TE.shape[0])
            aux = self.cfg.aux_loss_coef * switch_aux_loss(probs_TE, mask_TE, N, self.top_k, self.pool.sum)
        plan = plan_from_mask(mask_TE, weights_TE, aux_loss=aux)
        # each assignment carries its expert's activation: the expert reuses it
        plan.payload_A = a_TEL[plan.token_idx_A, plan.expert_idx_A]
        return plan

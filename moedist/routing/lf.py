"""Loss-free balancing (DeepSeek-V3, arXiv 2408.15664).

A per-expert bias b_E is added to the scores for the top-k SELECTION only; gate weights
use the unbiased scores. lf_bias_on picks what the bias is added to: "scores" (the gate
probabilities, moedist's default, as DeepSeek-V3 describes it) or "logits" (the raw router
logits, as the ET paper's LF baseline does; a sigmoid's slope at p = 1/16 is about 0.06, so
the same b moves a logit-side selection about 17x less). After every optimiser step,
b_i += u * sign(mean_load - load_i), with loads counted over the whole step (all
micro-batches, all workers).

Legend: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moedist.config import RouterConfig
from moedist.routing.base import Router, RoutingPlan
from moedist.routing.tc import TokenChoiceRouter


class LossFreeRouter(TokenChoiceRouter):
    """Token choice with bias-adjusted selection and no auxiliary loss."""

    default_gate = "sigmoid"

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig, init_std: float = 0.02):
        super().__init__(d_model, n_experts, cfg, init_std)
        self.register_buffer("bias_E", torch.zeros(n_experts))
        # Loads of the current optimiser step; not saved (steps end before checkpoints).
        self.register_buffer("pending_load_E", torch.zeros(n_experts, dtype=torch.int64), persistent=False)

    def select_scores(self, probs_TE: Tensor, logits_TE: Tensor | None = None) -> Tensor:
        if self.cfg.lf_bias_on == "logits":
            if logits_TE is None:
                raise ValueError("router.lf_bias_on = 'logits' needs the router logits")
            return self.restrict(logits_TE + self.bias_E)
        return self.restrict(probs_TE + self.bias_E)

    def forward(self, x_TD: Tensor) -> RoutingPlan:
        plan = super().forward(x_TD)
        if self.training:
            self.pending_load_E += plan.load_E
        return plan

    def aux_losses(self, logits_TE, probs_TE, mask_TE, N):
        if self.cfg.z_loss_coef > 0:
            z = self.pool.sum(torch.logsumexp(logits_TE, dim=-1).square().sum()) / max(N, 1)
            return self.cfg.z_loss_coef * z
        return None

    @torch.no_grad()
    def step_end(self) -> None:
        self._update_bias(self.pool.sum(self.pending_load_E.to(torch.float64)))

    @classmethod
    @torch.no_grad()
    def step_end_all(cls, routers: list[Router]) -> None:
        """Every layer's loads summed in one `PoolOps.sum_counts` (exact: integer counts)."""
        if len({id(r.pool) for r in routers}) != 1:
            for r in routers:
                r.step_end()
            return
        loads = routers[0].pool.sum_counts([r.pending_load_E.to(torch.float64) for r in routers])
        for r, load_E in zip(routers, loads, strict=True):
            r._update_bias(load_E)

    def _update_bias(self, load_E: Tensor) -> None:
        """b_i += u * sign(mean load - load_i) from the step's global loads; new step."""
        self.bias_E += self.cfg.lf_update_rate * torch.sign(load_E.mean() - load_E).to(self.bias_E.dtype)
        self.pending_load_E.zero_()

    def state_stats(self) -> dict[str, Tensor]:
        return {"bias": self.bias_E.detach().clone()}

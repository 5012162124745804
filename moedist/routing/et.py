"""Expert Threshold routing (arXiv 2603.11535).

Each expert keeps an EMA of the k-th largest logit it saw over the global pool of every
optimiser step (k = N * top_k / E). A token goes to every expert whose threshold its logit
exceeds: causal at inference, balanced without aux losses, and a variable number of
experts per token. Gate p = sigmoid(r), no renormalisation.

Training details (docs/routers.md): raw EMA from 0 with bias correction c = ema / (1 - beta^n);
the first `et_warmup_steps` optimiser steps route with expert choice while the EMA already
accumulates; a capacity guard keeps each expert between (1-C) and (1+C) times k tokens
of the pool (training only). Eval mode: frozen thresholds, no guard, causal. While training
is still in warm-up, `moedist.training.evaluate` may switch `eval_warmup_rule` on: eval-mode
forwards then route with the warm-up's expert choice over their own pool (the rule training
uses at that step, at the target fanout; not causal, so generation never uses it).

Legend: T local tokens, N global pool tokens, E experts, W workers of the pool, P this
worker's rows of every micro-batch of the step (its part of the pool the step-end cutoff is
taken over).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moedist.config import RouterConfig
from moedist.routing.base import Router, RoutingPlan, gate_probs, plan_from_mask
from moedist.routing.ec import ec_k, pool_topk_mask_counts


def guard_bounds(k: float, capacity: float, n_pool: int) -> tuple[int, int]:
    """Token bounds per expert of the training-time capacity guard: floor((1-C)k), ceil((1+C)k)."""
    lo = max(0, math.floor((1.0 - capacity) * k))
    hi = min(n_pool, math.ceil((1.0 + capacity) * k))
    return lo, hi


class ExpertThresholdRouter(Router):
    """Route each token to every expert whose EMA threshold its logit exceeds."""

    default_gate = "sigmoid"

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig, init_std: float = 0.02):
        super().__init__(d_model, n_experts, cfg, init_std)
        self.beta = cfg.et_beta
        self.register_buffer("ema_E", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.int64))
        # Logits of the current optimiser step's micro-batches (this worker's share) and
        # the global pool size of each (known from routing: no second count at step end).
        self._pending: list[Tensor] = []
        self._pending_N: list[int] = []
        # Eval mode during warm-up: route with expert choice over the forward's pool instead
        # of the unsettled thresholds (set only by `evaluate`; generation keeps thresholds).
        self.eval_warmup_rule = False

    # ------------------------------------------------------------------ state
    def threshold_E(self) -> Tensor:
        """Bias-corrected threshold c_E (zeros before the first update)."""
        n = int(self.n_updates)
        if n == 0:
            return torch.zeros_like(self.ema_E)
        return self.ema_E / (1.0 - self.beta**n)

    @property
    def in_warmup(self) -> bool:
        """True while training routes with expert choice."""
        return int(self.n_updates) < self.cfg.et_warmup_steps

    def state_stats(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold_E().detach().clone()}

    def plan_stat_names(self) -> tuple[str, ...]:
        return ("capped",)

    # ---------------------------------------------------------------- routing
    def above_threshold(self, logits_TE: Tensor) -> Tensor:
        """z_TE = r > c (paper) or r >= c (official code)."""
        c_1E = self.threshold_E().unsqueeze(0)
        return logits_TE >= c_1E if self.cfg.et_inclusive else logits_TE > c_1E

    def warmup_mask(self, logits_TE: Tensor) -> tuple[Tensor, int, Tensor]:
        """Warm-up routing: expert choice, each expert its top N*top_k/E tokens of the
        pool; also returns the pool size N and every worker's count per expert [W, E]."""
        N = self.pool.total(logits_TE.shape[0])
        E = logits_TE.shape[1]
        k_E = torch.full((E,), ec_k(N, self.top_k, E), dtype=torch.int64, device=logits_TE.device)
        mask_TE, counts_WE = pool_topk_mask_counts(logits_TE, k_E, self.pool)
        return mask_TE, N, counts_WE

    def guarded_mask(self, logits_TE: Tensor, above_TE: Tensor | None = None) -> tuple[Tensor, int, Tensor]:
        """Threshold routing, with each expert's global count clamped to the guard bounds;
        also returns the pool size N and every worker's count per expert [W, E]: N and the
        counts from the one all-gather of the experts' loads, the clamped experts' counts
        from their selection's collective."""
        above_TE = self.above_threshold(logits_TE) if above_TE is None else above_TE
        local = torch.cat([above_TE.sum(0), above_TE.new_tensor([logits_TE.shape[0]], dtype=torch.int64)])
        per_rank_WX = self.pool.gather_counts(local)
        above_WE, N = per_rank_WX[:, :-1], int(per_rank_WX[:, -1].sum())
        n_above_E = above_WE.sum(0)
        lo, hi = guard_bounds(self.capacity(N), self.cfg.et_capacity, N)
        n_take_E = n_above_E.clamp(lo, hi)
        clamped_E = n_take_E != n_above_E
        if not bool(clamped_E.any()):
            return above_TE, N, above_WE
        # Too few above threshold -> add the best tokens below it; too many -> keep the
        # best: either way the expert takes its global top-n_take by logit.
        topn_TE, topn_WE = pool_topk_mask_counts(logits_TE, n_take_E, self.pool)
        clamped_1E = clamped_E.unsqueeze(0)
        return torch.where(clamped_1E, topn_TE, above_TE), N, torch.where(clamped_1E, topn_WE, above_WE)

    def forward(self, x_TD: Tensor) -> RoutingPlan:
        logits_TE = self.restrict(self.logits(x_TD))
        probs_TE = gate_probs(logits_TE, self.gate)
        E = logits_TE.shape[1]
        stats: dict[str, Tensor] = {}
        counts_WE = None
        with torch.no_grad():
            r_TE = logits_TE.detach()
            if self.training:
                if self.in_warmup:
                    mask_TE, N, counts_WE = self.warmup_mask(r_TE)
                    capped_E = torch.zeros(E, dtype=torch.int64, device=r_TE.device)
                else:
                    above_TE = self.above_threshold(r_TE)
                    mask_TE, N, counts_WE = self.guarded_mask(r_TE, above_TE)
                    # The guard only adds (too few above) or only drops (too many) per expert.
                    capped_E = (mask_TE != above_TE).sum(0)
                self._pending.append(r_TE)
                self._pending_N.append(N)
                stats["capped"] = capped_E
            elif self.eval_warmup_rule and self.in_warmup:
                mask_TE, _, counts_WE = self.warmup_mask(r_TE)
            else:
                mask_TE = self.above_threshold(r_TE)  # causal: no collective, counts unknown
        # outside no_grad: the gate weights carry the router's gradient
        return plan_from_mask(mask_TE, probs_TE, stats=stats, rank_counts_WE=counts_WE)

    @torch.no_grad()
    def step_end(self) -> None:
        """EMA update from the k-th largest logit of the step's global pool."""
        if not self._pending:
            return
        r_PE, k_E = self._take_pending()
        self._update_ema(self.pool.kth_largest(r_PE, k_E))

    @classmethod
    @torch.no_grad()
    def step_end_all(cls, routers: list[Router]) -> None:
        """Every layer's EMA update from one pool selection (`PoolOps.kth_largest_many`):
        the pool rows are the same tokens in every layer and each column is selected on
        its own, so the cutoffs are those of the per-layer `step_end`."""
        todo = [r for r in routers if isinstance(r, ExpertThresholdRouter) and r._pending]
        if len({id(r.pool) for r in todo}) != 1:  # nothing pending, or routers on different pools
            for r in todo:
                r.step_end()
            return
        taken = [r._take_pending() for r in todo]
        cutoffs = todo[0].pool.kth_largest_many([t[0] for t in taken], [t[1] for t in taken])
        for r, cutoff_E in zip(todo, cutoffs, strict=True):
            r._update_ema(cutoff_E)

    def _take_pending(self) -> tuple[Tensor, Tensor]:
        """(this worker's logits of the step r_PE, k_E of the step's global pool); clears them."""
        r_PE = torch.cat(self._pending)
        N = sum(self._pending_N)
        self._pending.clear()
        self._pending_N.clear()
        E = r_PE.shape[1]
        return r_PE, torch.full((E,), ec_k(N, self.top_k, E), dtype=torch.int64, device=r_PE.device)

    def _update_ema(self, cutoff_E: Tensor) -> None:
        self.ema_E.mul_(self.beta).add_((1.0 - self.beta) * cutoff_E.to(self.ema_E.dtype))
        self.n_updates += 1

    def train(self, mode: bool = True):
        # Logits of an unfinished step must not leak into the next one.
        self._pending.clear()
        self._pending_N.clear()
        return super().train(mode)

"""The Router interface, the RoutingPlan it returns, and pool statistics.

Legend: T tokens in this process's routing pool, N tokens in the GLOBAL pool (all workers),
E routed experts, A assignments ((token, expert) pairs), D model width.

A router sees the tokens of one forward pass (this process's share of the pool). Where a
router needs statistics over the whole pool (EC's top-k, ET's cutoffs and capacity guard,
aux-loss means) it asks its `PoolOps`; `LocalPoolOps` answers from local tokens only, and
the expert-parallel runtime swaps in a collective implementation (moedist.parallel) so an
N-worker run routes exactly like a 1-process run on the same global batch.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moedist.config import RouterConfig


@dataclass
class RoutingPlan:
    """Which tokens go to which experts, with what gate weight.

    Assignments are ordered token-major (as `mask_TE.nonzero()` gives them).
    """

    token_idx_A: Tensor  # int64 [A]
    expert_idx_A: Tensor  # int64 [A]
    weight_A: Tensor  # [A] in routing_dtype (float32, float64 in a float64 model), differentiable
    n_tokens: int
    n_experts: int
    aux_loss: Tensor | None = None  # scalar added to the LM loss
    # Detached int64 [E] counts over this process's tokens, named by Router.plan_stat_names
    # (in every training plan); the trainer sums them over micro-batches and workers.
    stats: dict[str, Tensor] = field(default_factory=dict)
    # Extra features per assignment [A, P] that travel with the token to its expert and are
    # appended to its row (AoE: the expert's low-rank gate activation, computed once by the
    # router and reused). Differentiable; None for routers whose experts need only x.
    payload_A: Tensor | None = None
    # int64 [W, E]: assignments per expert of every worker of the routing pool (this plan's
    # row included), when the router's own pool statistics already told every worker (ET's
    # guard and warm-up, EC, TC's capacity). The same on every worker; an expert-parallel
    # dispatcher may take its split sizes from it instead of exchanging counts. None: unknown.
    rank_counts_WE: Tensor | None = None

    @property
    def load_E(self) -> Tensor:
        """Tokens routed to each expert (local pool)."""
        return torch.bincount(self.expert_idx_A, minlength=self.n_experts)

    @property
    def fanout_T(self) -> Tensor:
        """Routed experts per token."""
        return torch.bincount(self.token_idx_A, minlength=self.n_tokens)

    def mask_TE(self) -> Tensor:
        """Boolean routing decisions [T, E]."""
        m = torch.zeros(self.n_tokens, self.n_experts, dtype=torch.bool, device=self.token_idx_A.device)
        m[self.token_idx_A, self.expert_idx_A] = True
        return m


def routing_dtype(x: Tensor) -> torch.dtype:
    """The dtype routers score in: at least float32 (routing decisions need precision, also
    under bf16 autocast); a float64 model keeps float64, so its routing is exact as well."""
    return torch.promote_types(x.dtype, torch.float32)


class NonFiniteLogitsError(FloatingPointError, ValueError):
    """Router logits contain NaN (raised on every worker alike, so all can stop or skip)."""


class PoolOps:
    """Reductions over the routing pool. This base class is the single-process pool."""

    @property
    def world_rank(self) -> tuple[int, int]:
        """(workers in the pool, this worker's index among them)."""
        return 1, 0

    def gather_counts(self, counts_X: Tensor) -> Tensor:
        """Every worker's integer counts stacked in rank order [W, *X] (detached int64; one
        all-gather in a collective implementation)."""
        return counts_X.detach().to(torch.int64).unsqueeze(0)

    def total(self, n_local: int) -> int:
        """Number of tokens in the global pool."""
        return n_local

    def sum(self, x: Tensor) -> Tensor:
        """Elementwise sum over all workers (differentiable)."""
        return x

    def exclusive_prefix(self, counts_E: Tensor) -> Tensor:
        """Per-expert counts contributed by workers of lower rank (token order priority)."""
        all_WE = self.gather_counts(counts_E)
        return all_WE[: self.world_rank[1]].sum(0).to(counts_E.device, counts_E.dtype)

    def sum_counts(self, xs: list[Tensor]) -> list[Tensor]:
        """Detached sums over all workers of integer-valued tensors (counts: exact in any
        summation order, so a collective implementation may send them as one message)."""
        return [self.sum(x).detach() for x in xs]

    def new_pool(self) -> None:
        """A forward pass begins: the pool's tokens change (cached statistics such as the
        pool total are dropped). Called by the model on every rank alike."""

    def kth_largest_many(self, values: list[Tensor], k: list[Tensor]) -> list[Tensor]:
        """`kth_largest` of each [T, E_i] matrix, all over the same pool rows (e.g. every
        MoE layer's logits of one step); a collective implementation may select them in
        one pass (each column is independent, so the values are the same)."""
        return [self.kth_largest(v_TE, k_E) for v_TE, k_E in zip(values, k, strict=True)]

    def topk_cut(self, values_TE: Tensor, k_E: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(cutoff_E, above_WE, ties_WE): the k_E-th largest value of each column over the
        pool, and per worker how many of its values lie strictly above it and how many equal
        it (ties as far as a selection of k needs to know: a worker that alone holds k values
        at or above the cutoff may report fewer of its ties; see
        moedist.parallel.pool.candidate_topk_cut). Counts are int64 on the values' device."""
        cutoff_E = self.kth_largest(values_TE, k_E)
        c_1E = cutoff_E.unsqueeze(0)
        both_W2E = self.gather_counts(torch.stack([(values_TE > c_1E).sum(0), (values_TE == c_1E).sum(0)]))
        return cutoff_E, both_W2E[:, 0], both_W2E[:, 1]

    def kth_largest(self, values_TE: Tensor, k_E: Tensor) -> Tensor:
        """Per column e, the k_E[e]-th largest value over the global pool.

        k = 0 gives +inf (selects nothing with >=); k >= N gives the smallest value.
        """
        if torch.isnan(values_TE).any():
            raise NonFiniteLogitsError("router logits contain NaN; cannot select the k-th largest")
        T, E = values_TE.shape
        out_E = torch.full((E,), float("inf"), dtype=values_TE.dtype, device=values_TE.device)
        if T == 0:
            return out_E
        k_E = k_E.to(torch.int64).clamp(0, T)
        kmax = int(k_E.max())
        if kmax == 0:
            return out_E
        top_KE = torch.topk(values_TE, kmax, dim=0, largest=True, sorted=True).values
        picked_E = top_KE.gather(0, (k_E - 1).clamp(min=0).unsqueeze(0)).squeeze(0)
        return torch.where(k_E > 0, picked_E, out_E)


LocalPoolOps = PoolOps


def take_in_rank_order(avail_WE: Tensor, budget: Tensor | int) -> tuple[Tensor, Tensor]:
    """(before_WE, taken_WE) when workers take from `budget` in rank order (token-order
    priority): what lower ranks offer, and what each worker takes of its `avail_WE` before
    the budget runs out (per column; `budget` broadcasts against [W, E])."""
    before_WE = avail_WE.cumsum(0) - avail_WE
    return before_WE, torch.minimum(avail_WE, (budget - before_WE).clamp(min=0))


def gate_probs(logits_TE: Tensor, gate: str) -> Tensor:
    """Gate probabilities from router logits."""
    if gate == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if gate == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"unknown gate '{gate}' (softmax, sigmoid)")


def plan_from_mask(mask_TE: Tensor, probs_TE: Tensor, **kw) -> RoutingPlan:
    """Token-major assignments for every True entry, weights = the gate probabilities."""
    token_idx_A, expert_idx_A = mask_TE.nonzero(as_tuple=True)
    return RoutingPlan(
        token_idx_A=token_idx_A,
        expert_idx_A=expert_idx_A,
        weight_A=probs_TE[token_idx_A, expert_idx_A],
        n_tokens=mask_TE.shape[0],
        n_experts=mask_TE.shape[1],
        **kw,
    )


class Router(nn.Module, abc.ABC):
    """A router maps tokens x_TD to a RoutingPlan.

    Stateful routers (LF's bias, ET's thresholds) keep their state in buffers, so it is
    saved in checkpoints, and update it in `step_end`, called once per optimiser step
    after every micro-batch of the step has been routed.
    """

    default_gate = "softmax"
    causal = True  # routing of a token depends only on that token (in eval mode)

    has_projection = True  # a learned d_model -> E logit projection (AoE and ETR have none)

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.n_experts = n_experts
        self.top_k = cfg.top_k
        if self.top_k > n_experts:
            raise ValueError(f"router.top_k = {self.top_k} is more than the {n_experts} experts")
        self.gate = self.default_gate if cfg.gate == "auto" else cfg.gate
        if self.has_projection:
            self.proj = nn.Linear(d_model, n_experts, bias=False)
            nn.init.normal_(self.proj.weight, std=init_std)
        self.pool: PoolOps = PoolOps()
        # Experts living on this worker's node (ETR's locality loss); None = all of them.
        self.on_node_E: Tensor | None = None
        # Experts this router may choose (task-aware pre-selection); None = all.
        self.allowed_E: Tensor | None = None

    def attach(self, pool: PoolOps, on_node_E: Tensor | None = None) -> None:
        """Take pool statistics from `pool` (the expert-parallel runtime's collectives) and
        learn which experts share this worker's node (None: all of them)."""
        self.pool = pool
        self.on_node_E = on_node_E

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in routing_dtype (float32 also under autocast; float64 in a float64 model)."""
        dt = routing_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return nn.functional.linear(x_TD.to(dt), self.proj.weight.to(dt))

    def restrict(self, scores_TE: Tensor) -> Tensor:
        """Scores with the experts outside `allowed_E` at -inf (never chosen, gate 0)."""
        if self.allowed_E is None:
            return scores_TE
        return scores_TE.masked_fill(~self.allowed_E.to(scores_TE.device), -math.inf)

    @abc.abstractmethod
    def forward(self, x_TD: Tensor) -> RoutingPlan:
        """Route the tokens x_TD."""

    def step_end(self) -> None:
        """Update routing state after an optimiser step (default: stateless)."""

    @classmethod
    def step_end_all(cls, routers: list[Router]) -> None:
        """`step_end` of several routers of this class (every MoE layer of a model), in
        order; a router may override it to share the step-end statistics' exchange."""
        for router in routers:
            router.step_end()

    def state_stats(self) -> dict[str, Tensor]:
        """Per-expert state worth logging (thresholds, biases)."""
        return {}

    def plan_stat_names(self) -> tuple[str, ...]:
        """Per-expert counts every training plan of this router carries in `stats`, logged
        per step as L<layer>_<name>. "capped": (token, expert) decisions a capacity limit
        changed (tokens dropped over capacity, or added/removed by ET's guard)."""
        return ()

    def capacity(self, n_pool: int) -> float:
        """Tokens per expert at perfect balance: N * top_k / E."""
        return n_pool * self.top_k / self.n_experts

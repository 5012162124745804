"""Routers against hand computations on small tensors (the equations of docs/routers.md)."""

from __future__ import annotations

import math

import pytest
import torch

from moedist.config import RouterConfig
from moedist.routing import PoolOps, make_router
from moedist.routing.base import gate_probs
from moedist.routing.ec import ec_k
from moedist.routing.et import guard_bounds
from moedist.routing.tc import apply_capacity


def router_with_logits(kind: str, logits_TE: torch.Tensor, **cfg_kw):
    """A router whose logits are exactly `logits_TE` (identity projection on x = logits)."""
    E = logits_TE.shape[1]
    r = make_router(RouterConfig(kind=kind, **cfg_kw), d_model=E, n_experts=E)
    with torch.no_grad():
        r.proj.weight.copy_(torch.eye(E))
    return r, logits_TE.clone()


# ------------------------------------------------------------------ pool ops
def test_kth_largest_matches_sort_with_edge_ks():
    g = torch.Generator().manual_seed(0)
    v_TE = torch.randn(50, 4, generator=g)
    k_E = torch.tensor([0, 1, 17, 50])
    got = PoolOps().kth_largest(v_TE, k_E)
    srt = v_TE.sort(dim=0, descending=True).values
    assert got[0] == float("inf")
    assert got[1] == srt[0, 1]
    assert got[2] == srt[16, 2]
    assert got[3] == srt[49, 3]


def test_kth_largest_rejects_nan():
    v = torch.zeros(4, 2)
    v[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PoolOps().kth_largest(v, torch.tensor([1, 1]))


# ----------------------------------------------------------------------- TC
def test_tc_topk_weights_and_aux_loss_formula():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0], [1.0, 0.0, 2.0, 0.5]])
    r, x = router_with_logits("tc", logits, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    plan = r(x)
    p = torch.softmax(logits, -1)
    top = p.topk(2, dim=-1).indices
    mask = torch.zeros(3, 4, dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(plan.mask_TE(), mask)
    # weights renormalised over the two chosen experts
    w = torch.zeros(3, 4)
    w[plan.token_idx_A, plan.expert_idx_A] = plan.weight_A
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    torch.testing.assert_close(w[0, 0], p[0, 0] / (p[0, 0] + p[0, 1]))
    # Switch: alpha * E * sum_i f_i P_i, f_i = share of the N*k assignments
    f = mask.float().sum(0) / (3 * 2)
    P = p.mean(0)
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(plan.aux_loss, 0.1 * 4 * (f * P).sum() + 0.01 * z)


def test_tc_capacity_drops_later_tokens_first():
    mask = torch.tensor([[1, 0], [1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    kept = apply_capacity(mask, capacity=2, prefix_E=torch.zeros(2, dtype=torch.int64))
    assert kept.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    # tokens of earlier workers count against the capacity
    kept = apply_capacity(mask, capacity=2, prefix_E=torch.tensor([1, 0]))
    assert kept[:, 0].tolist() == [True, False, False, False]


# ----------------------------------------------------------------------- LF
def test_lf_bias_moves_toward_balance_and_changes_selection_only():
    logits = torch.tensor([[3.0, 0.0], [2.0, 1.0], [2.5, 0.5], [1.0, 0.9]])
    r, x = router_with_logits("lf", logits, top_k=1, lf_update_rate=0.25)
    r.train()
    plan = r(x)
    assert plan.load_E.tolist() == [4, 0]
    assert plan.aux_loss is None
    r.step_end()
    # overloaded expert 0 goes down, underloaded expert 1 goes up, by exactly u
    assert r.bias_E.tolist() == [-0.25, 0.25]
    plan = r(x)
    # sigmoid(1.0)-0.25 < sigmoid(0.9)+0.25 -> token 3 now picks expert 1
    assert plan.mask_TE()[3].tolist() == [False, True]
    # the gate weight is the UNBIASED score
    w3 = plan.weight_A[plan.token_idx_A == 3]
    torch.testing.assert_close(w3, torch.sigmoid(torch.tensor([0.9])))


@pytest.mark.parametrize("bias_on", ["scores", "logits"])
def test_lf_bias_on_scores_or_logits_selects_by_that_sum_and_weights_stay_unbiased(bias_on):
    """lf_bias_on = "scores" (default): top-k of sigmoid(r) + b; "logits" (the ET paper's
    LF baseline): top-k of r + b. The gate weight is sigmoid(r) either way."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 8, generator=g)
    r, x = router_with_logits("lf", logits, top_k=2, lf_bias_on=bias_on, normalize_weights=False)
    bias = 0.3 * torch.randn(8, generator=g)
    r.bias_E.copy_(bias)
    plan = r(x)
    p = torch.sigmoid(logits)
    by_scores = torch.zeros(64, 8, dtype=torch.bool).scatter_(1, (p + bias).topk(2, -1).indices, True)
    by_logits = torch.zeros(64, 8, dtype=torch.bool).scatter_(1, (logits + bias).topk(2, -1).indices, True)
    assert not torch.equal(by_scores, by_logits)  # the two readings differ on these tokens
    assert torch.equal(plan.mask_TE(), by_logits if bias_on == "logits" else by_scores)
    torch.testing.assert_close(plan.weight_A, p[plan.token_idx_A, plan.expert_idx_A])
    assert RouterConfig().lf_bias_on == "scores"


def test_tc_sigmoid_without_renormalisation_and_ec_sigmoid_gate():
    """The ET paper's TC: sigmoid gate, weights not renormalised, Switch loss on the
    per-token-normalised sigmoid; its EC: sigmoid gate weights."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(32, 4, generator=g)
    p = torch.sigmoid(logits)
    r, x = router_with_logits("tc", logits, top_k=2, gate="sigmoid", normalize_weights=False, aux_loss_coef=0.001)
    plan = r(x)
    mask = torch.zeros(32, 4, dtype=torch.bool).scatter_(1, p.topk(2, -1).indices, True)
    assert torch.equal(plan.mask_TE(), mask)
    torch.testing.assert_close(plan.weight_A, p[plan.token_idx_A, plan.expert_idx_A])  # not renormalised
    q = p / p.sum(-1, keepdim=True)
    torch.testing.assert_close(plan.aux_loss, 0.001 * 4 * (mask.float().sum(0) / 64 * q.mean(0)).sum())
    renorm, _ = router_with_logits("tc", logits, top_k=2, gate="sigmoid")  # moedist's default renormalises
    w = renorm(x).weight_A.view(32, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    ec, _ = router_with_logits("ec", logits, top_k=1, gate="sigmoid")
    plan = ec(x)
    torch.testing.assert_close(plan.weight_A, p[plan.token_idx_A, plan.expert_idx_A])


# ----------------------------------------------------------------------- EC
def test_ec_each_expert_takes_its_top_k_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 4, generator=g)
    r, x = router_with_logits("ec", logits, top_k=1)
    plan = r(x)
    k = ec_k(32, 1, 4)
    assert k == 8
    assert plan.load_E.tolist() == [8, 8, 8, 8]
    m = plan.mask_TE()
    for e in range(4):
        assert set(m[:, e].nonzero().flatten().tolist()) == set(logits[:, e].topk(k).indices.tolist())


def test_pool_topk_takes_exactly_k_breaking_ties_by_token_order():
    from moedist.routing.ec import pool_topk_mask

    # expert 0: five tokens tied at the cutoff; expert 1: all equal; expert 2: k = 0 with +inf logits
    logits = torch.tensor(
        [[1.0, 0.0, float("inf")], [3.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 0.0, 2.0], [1.0, 0.0, 3.0], [1.0, 0.0, 4.0]]
    )
    mask = pool_topk_mask(logits, torch.tensor([3, 4, 0]), PoolOps())
    assert mask[:, 0].nonzero().flatten().tolist() == [0, 1, 2]  # the 3.0, then the earliest ties
    assert mask[:, 1].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert not mask[:, 2].any()
    full = pool_topk_mask(logits, torch.tensor([6, 9, 6]), PoolOps())  # k >= N takes everything
    assert bool(full.all())


# ----------------------------------------------------------------------- ET
def test_et_ema_bias_correction_and_warmup_switch():
    beta = 0.9
    g = torch.Generator().manual_seed(2)
    steps = [torch.randn(40, 4, generator=g) for _ in range(3)]
    r, _ = router_with_logits("et", steps[0], top_k=1, et_beta=beta, et_warmup_steps=2, et_capacity=1.0)
    r.train()
    ema = torch.zeros(4)
    for i, logits in enumerate(steps):
        assert r.in_warmup == (i < 2)
        plan = r(logits)
        if i < 2:  # expert choice: exactly k = 40/4 tokens each
            assert plan.load_E.tolist() == [10] * 4
        else:  # threshold routing with the bias-corrected EMA (guard C=1 never binds here)
            c = ema / (1 - beta**i)
            assert torch.equal(plan.mask_TE(), logits > c)
        r.step_end()
        cutoff = logits.sort(dim=0, descending=True).values[9]  # 10th largest per expert
        ema = beta * ema + (1 - beta) * cutoff
        torch.testing.assert_close(r.ema_E, ema)
        torch.testing.assert_close(r.threshold_E(), ema / (1 - beta ** (i + 1)))


def test_et_cutoff_pools_all_micro_batches_of_a_step():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g)
    r, _ = router_with_logits("et", a, top_k=1, et_beta=0.5, et_warmup_steps=5)
    r.train()
    r(a)
    r(b)
    r.step_end()
    pooled = torch.cat([a, b]).sort(dim=0, descending=True).values[round(40 / 3) - 1]
    torch.testing.assert_close(r.ema_E, 0.5 * pooled)
    assert int(r.n_updates) == 1


def test_et_warmup_and_guard_act_per_micro_batch():
    """Two micro-batches of a step: the warm-up balances each on its own (round(20/3) = 7
    tokens per expert in each), and after warm-up the guard bounds each micro-batch's counts
    to its own [floor(0.5 k), ceil(1.5 k)] (k = 20/3), while the EMA takes one cutoff over both."""
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g) + torch.tensor([3.0, 0.0, -3.0])
    r, _ = router_with_logits("et", a, top_k=1, et_beta=0.5, et_warmup_steps=1, et_capacity=0.5)
    r.train()
    assert r(a).load_E.tolist() == [7, 7, 7] and r(b).load_E.tolist() == [7, 7, 7]
    r.step_end()
    pooled = torch.cat([a, b]).sort(dim=0, descending=True).values[round(40 / 3) - 1]
    torch.testing.assert_close(r.threshold_E(), pooled)
    # b's shifted logits put many tokens above expert 0's pooled cutoff, few above expert 2's:
    # the guard clamps them to b's own bounds [3, 10], also as the step's second micro-batch
    n_above = (b > pooled).sum(0)
    assert n_above[0] > 10 and n_above[2] < 3
    r(a)
    assert r(b).load_E.tolist() == [10, int(n_above[1].clamp(3, 10)), 3]


def test_et_capacity_guard_bounds_and_fill():
    assert guard_bounds(10.0, 0.5, 100) == (5, 15)
    assert guard_bounds(10.0, 0.5, 12) == (5, 12)
    # Expert 0: threshold passes every token (too many) -> keeps its best 15.
    # Expert 1: threshold passes none (too few) -> takes its best 5.
    # Expert 2: 8 above threshold: within [5, 15] -> untouched.
    T = 40
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(T, 3, generator=g)
    r, _ = router_with_logits("et", logits, top_k=1, et_warmup_steps=0, et_capacity=0.5)
    with torch.no_grad():
        r.n_updates.fill_(1)
        c2 = logits[:, 2].sort(descending=True).values[8]  # exactly 8 strictly above
        r.ema_E.copy_(torch.tensor([-1e9, 1e9, float(c2)]) * (1 - r.beta))
    k = T / 3
    lo, hi = guard_bounds(k, 0.5, T)
    r.train()
    m = r(logits).mask_TE()
    def chosen(e):
        return set(m[:, e].nonzero().flatten().tolist())

    assert m[:, 0].sum() == hi and chosen(0) == set(logits[:, 0].topk(hi).indices.tolist())
    assert m[:, 1].sum() == lo and chosen(1) == set(logits[:, 1].topk(lo).indices.tolist())
    assert torch.equal(m[:, 2], logits[:, 2] > c2) and m[:, 2].sum() == 8
    # eval mode: frozen thresholds, no guard
    r.eval()
    m = r(logits).mask_TE()
    assert m[:, 0].all() and not m[:, 1].any()


def test_et_inclusive_option_and_sigmoid_weights():
    logits = torch.tensor([[0.0, 1.0], [0.5, -1.0]])
    r, x = router_with_logits("et", logits, et_warmup_steps=0, et_inclusive=True)
    r.eval()  # n_updates = 0 -> threshold 0
    m = r(x).mask_TE()
    assert m.tolist() == [[True, True], [True, False]]
    r2, _ = router_with_logits("et", logits, et_warmup_steps=0, et_inclusive=False)
    r2.eval()
    plan = r2(x)
    assert plan.mask_TE().tolist() == [[False, True], [True, False]]
    torch.testing.assert_close(plan.weight_A, torch.sigmoid(torch.tensor([1.0, 0.5])))


def test_et_threshold_state_is_in_state_dict():
    r, _ = router_with_logits("et", torch.zeros(2, 2))
    keys = set(r.state_dict())
    assert {"ema_E", "n_updates"} <= keys
    assert math.isclose(r.beta, 0.999)


# ------------------------------------------------------------- capped counts
@pytest.mark.parametrize(("kind", "cfg_kw"), [("tc", {"capacity_factor": 1.0}), ("lf", {"capacity_factor": 1.0}),
                                              ("et", {"et_warmup_steps": 0, "et_capacity": 0.2, "et_beta": 0.5}),
                                              ("etr", {"etr_capacity_factor": 1.0,
                                                       "etr_capacity_floor": False})])  # fmt: skip
def test_capped_counts_the_decisions_a_capacity_changed(kind, cfg_kw):
    """plan.stats["capped"] (logged as L<i>_capped): per expert, the tokens a capacity
    dropped (TC, LF, ETR) or ET's guard added or removed, against the uncapped choice."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 4, generator=g)
    logits[:, 0] += 2.0  # a popular expert, so every capacity binds
    if kind == "etr":
        r = make_router(RouterConfig(kind=kind, top_k=1, **cfg_kw), d_model=4, n_experts=4)
        x = logits
    else:
        r, x = router_with_logits(kind, logits, top_k=1, **cfg_kw)
    r.train()
    if kind == "et":  # past warm-up, every threshold at 0.5
        r.ema_E.fill_(0.5 * (1 - r.beta))
        r.n_updates.fill_(1)
    assert r.plan_stat_names() == ("capped",)
    plan = r(x)
    with torch.no_grad():
        if kind == "et":
            uncapped_E = r.above_threshold(r.logits(x)).sum(0)
        else:
            scores = r.logits(x) if kind == "etr" else r.select_scores(gate_probs(r.logits(x), r.gate))
            uncapped_E = scores.topk(1, dim=-1).indices.flatten().bincount(minlength=4)
    capped_E = plan.stats["capped"]
    # counting is a side product: the gate weights still carry the router's gradient
    assert plan.weight_A.requires_grad == (kind != "etr")  # ETR's affinity has no parameters
    assert capped_E.dtype == torch.int64 and int(capped_E.sum()) > 0
    assert torch.equal(capped_E, (uncapped_E - plan.load_E).abs())
    # without a capacity there is nothing to count, and no column
    assert make_router(RouterConfig(kind="tc"), d_model=4, n_experts=4).plan_stat_names() == ()

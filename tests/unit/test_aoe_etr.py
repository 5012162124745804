"""AoE and ETR routers against hand computations (docs/routers.md), and their causality."""

from __future__ import annotations

import math

import pytest
import torch

from moedist.config import ConfigError, ModelConfig, RouterConfig
from moedist.model.aoe_experts import AoEExperts
from moedist.model.moe import LocalDispatcher, MoEBlock, SplitLocalDispatcher
from moedist.model.transformer import MoETransformer
from moedist.routing import PoolOps
from moedist.routing.aoe import aoe_dims
from moedist.routing.etr import ResonanceRouter, capacity_lower_bound, slice_average_vectors
from moedist.routing.tc import topk_mask


def aoe_block(E=6, D=24, F=32, k=2, **kw) -> MoEBlock:
    torch.manual_seed(0)
    cfg = RouterConfig(kind="aoe", top_k=k, aoe_d_low=8, **kw)
    return MoEBlock(D, E, F, 0, "swiglu", cfg, 0.3, 0.3).double()


# ----------------------------------------------------------------------- AoE
def test_aoe_low_rank_activations_come_from_one_matmul_and_are_reused():
    block = aoe_block()
    x = torch.randn(30, 24, dtype=torch.float64)
    calls = []
    block.router.w_down.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    plan = block.router(x)
    assert calls == [torch.Size([30, 6 * 8])]  # every expert's activation, one matmul
    # the experts own no down-projection: they reuse the activation that travels with the token
    assert {n for n, _ in block.experts.named_parameters()} == {"w_up_ELW", "w_p_EDW", "w_o_EWD"}
    Wd = block.router.w_down.weight.T.view(24, 6, 8)  # [D, E, L]
    for a, (t, e) in enumerate(zip(plan.token_idx_A.tolist(), plan.expert_idx_A.tolist(), strict=True)):
        torch.testing.assert_close(plan.payload_A[a], x[t] @ Wd[:, e], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("renormalize", [False, True])
def test_aoe_outputs_equal_a_from_scratch_computation(renormalize):
    block = aoe_block(aoe_renormalize=renormalize)
    x = torch.randn(30, 24, dtype=torch.float64)
    plan = block.router(x)
    y = LocalDispatcher()(x, plan, block.experts)
    Wd = block.router.w_down.weight.T.view(24, 6, 8)
    ex = block.experts
    y_ref = torch.zeros_like(x)
    for t in range(30):
        # scores in the routing dtype: float64 here (float32 for float32 and bf16 inputs)
        norms = torch.stack([(x[t] @ Wd[:, e]).norm() for e in range(6)])
        top = torch.topk(norms, 2).indices
        if renormalize:
            w = torch.softmax(norms[top], 0)  # softmax over the selected norms
        else:
            w = torch.softmax(norms, 0)[top]  # official code: softmax over all E, top-k values
        for j, e in enumerate(top.tolist()):
            a = x[t] @ Wd[:, e]  # from scratch: no reuse
            h = torch.nn.functional.silu(a @ ex.w_up_ELW[e]) * (x[t] @ ex.w_p_EDW[e])
            y_ref[t] += w[j] * (h @ ex.w_o_EWD[e])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(SplitLocalDispatcher()(x, plan, block.experts), y_ref, rtol=1e-10, atol=1e-12)


def test_aoe_gate_gradient_reaches_w_down_at_top1_only_without_renormalisation():
    """At top_k = 1 the official gate (softmax over all E norms, no renormalisation) gives a
    weight < 1 whose gradient reaches W_down; renormalising over the one selected norm gives
    the constant 1 and exactly no gradient through the gate."""
    x = torch.randn(30, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    c = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for renormalize in (False, True):
        router = aoe_block(k=1, aoe_renormalize=renormalize).router
        plan = router(x)
        assert plan.weight_A.numel() == 30  # one expert per token
        # only the gate path: the payload (a_ti, also differentiable) is left out
        (plan.weight_A * c[plan.token_idx_A]).sum().backward()
        grads[renormalize] = router.w_down.weight.grad
    torch.testing.assert_close(grads[True], torch.zeros_like(grads[True]), rtol=0, atol=0)
    assert float(grads[False].abs().sum()) > 1e-3


@pytest.mark.parametrize(("D", "F", "L"), [(128, 256, 42), (96, 384, 32), (64, 170, 21), (512, 1024, 64)])
def test_aoe_param_match_equals_swiglu_moe_within_one_row(D, F, L):
    E = 8
    swiglu = MoEBlock(D, E, F, 0, "swiglu", RouterConfig(kind="tc"), 0.02, 0.02)
    aoe = MoEBlock(D, E, F, 0, "swiglu", RouterConfig(kind="aoe", aoe_d_low=L), 0.02, 0.02)
    n_swiglu = sum(p.numel() for p in swiglu.experts.parameters())  # 3 D F per expert
    n_aoe = sum(p.numel() for p in aoe.parameters())  # W_down (in the router) + the rest
    row = L + 2 * D  # one step of d_wide: a row of W_up, a column of W_p, a row of W_o
    assert abs(n_aoe - n_swiglu) <= E * row / 2
    _, d_wide = aoe_dims(D, F, RouterConfig(kind="aoe", aoe_d_low=L))
    assert d_wide == round((3 * D * F - L * D) / (L + 2 * D))


def test_aoe_shard_subset_and_bad_dims():
    block = aoe_block()
    sub = block.experts.subset([4, 1])
    assert isinstance(sub, AoEExperts) and sub.n_experts == 2
    assert torch.equal(sub.w_o_EWD[0], block.experts.w_o_EWD[4])
    with pytest.raises(ConfigError, match="aoe_d_low"):
        aoe_dims(16, 4, RouterConfig(kind="aoe", aoe_d_low=200))


# ----------------------------------------------------------------------- ETR
@pytest.mark.parametrize(("D", "E"), [(32, 8), (30, 8), (16, 16)])
def test_etr_affinity_vectors_are_orthonormal_slice_averages(D, E):
    w = slice_average_vectors(D, E)
    torch.testing.assert_close(w @ w.T, torch.eye(E))
    # each row is constant on one contiguous slice and zero elsewhere; the slices cover D
    assert torch.equal((w > 0).sum(0), torch.ones(D, dtype=torch.int64))
    for row in w:
        nz = row.nonzero().flatten()
        assert torch.equal(nz, torch.arange(int(nz[0]), int(nz[-1]) + 1)) and len(set(row[nz].tolist())) == 1
    with pytest.raises(ValueError, match="at most d_model"):
        slice_average_vectors(4, 8)


def test_etr_top1_path_equals_hand_computation():
    torch.manual_seed(0)
    r = ResonanceRouter(12, 4, RouterConfig(kind="etr", top_k=1)).eval()
    x = torch.randn(20, 12)
    plan = r(x)
    for t in range(20):
        slices = x[t].view(4, 3)
        cos = slices.sum(1) / math.sqrt(3) / x[t].norm()
        e = int(cos.argmax())
        assert plan.mask_TE()[t].nonzero().flatten().tolist() == [e]
        torch.testing.assert_close(plan.weight_A[t], torch.softmax(cos, 0)[e])


def test_etr_capacity_is_respected_and_keeps_the_most_resonant_tokens():
    torch.manual_seed(1)
    cfg = RouterConfig(kind="etr", top_k=1, etr_capacity_factor=1.0, etr_capacity_floor=False)
    r = ResonanceRouter(16, 4, cfg).train()
    x = torch.randn(64, 16)
    x[:, :4] += 2.0  # most tokens prefer expert 0
    plan = r(x)
    cap = math.ceil(1.0 * 64 / 4)
    assert r.last_capacity == cap and int(plan.load_E.max()) <= cap
    delta = r.logits(x)
    chose0 = delta.argmax(1) == 0
    kept = plan.mask_TE()[:, 0]
    assert int(chose0.sum()) > cap and int(kept.sum()) == cap
    assert delta[kept, 0].min() >= delta[chose0 & ~kept, 0].max()  # the best `cap` of those that chose it
    # eval mode: token choice only, no capacity
    assert int(r.eval()(x).mask_TE()[:, 0].sum()) == int(chose0.sum())


def test_etr_capacity_lower_bound_formula():
    # C = ceil(min(1, exp(D dmax^2 / (2 - dmax^2)) / E) * N * l)
    assert capacity_lower_bound(64, 8, 0.0, 1000, 1) == 125  # dmax = 0: perfect balance N/E
    want = math.ceil(math.exp(64 * 0.01 / 1.99) / 8 * 1000)
    assert capacity_lower_bound(64, 8, 0.1, 1000, 1) == want
    assert capacity_lower_bound(64, 8, 0.9, 1000, 2) == 2000  # large affinity: no cap


def test_etr_default_capacity_is_the_factor_floored_by_the_bound_at_the_typical_affinity():
    """Default: C = max(ceil(1.25 N l / E), the paper's bound at dmax = 1/sqrt(D)), which is
    ceil(exp(1 / (2 - 1/D)) N l / E) (about 1.65 N l / E); no floor: exactly the factor;
    factor 0: the bound at the pool's largest affinity (no cap on isotropic tokens)."""
    D, E, N, l = 128, 16, 2048, 1
    r = ResonanceRouter(D, E, RouterConfig(kind="etr", top_k=l))
    assert r.cfg.etr_capacity_factor == 1.25 and r.cfg.etr_capacity_floor
    floor = math.ceil(math.exp(1 / (2 - 1 / D)) / E * N * l)
    assert floor == 212 and r.capacity(N) == floor > math.ceil(1.25 * N * l / E) == 160
    no_floor = ResonanceRouter(D, E, RouterConfig(kind="etr", top_k=l, etr_capacity_floor=False))
    assert no_floor.capacity(N) == 160
    big = ResonanceRouter(D, E, RouterConfig(kind="etr", top_k=l, etr_capacity_factor=3.0))
    assert big.capacity(N) == 384  # a factor above the floor wins
    bound = ResonanceRouter(D, E, RouterConfig(kind="etr", top_k=l, etr_capacity_factor=0.0))
    assert bound.capacity(N, delta_max=0.34) == N * l  # the pool-max reading: no cap


def test_etr_switch_loss_equals_hand_computation_on_the_kept_assignments():
    torch.manual_seed(1)
    cfg = RouterConfig(kind="etr", top_k=1, etr_aux_loss_coef=0.01, etr_capacity_floor=False)
    r = ResonanceRouter(16, 4, cfg).train()
    x = torch.randn(64, 16)
    x[:, :4] += 2.0  # expert 0 is over capacity
    x.requires_grad_(True)
    plan = r(x)
    assert plan.stats["capped"].sum() > 0
    p = torch.softmax(r.logits(x), -1)
    f = plan.load_E.double() / 64  # shares of the kept assignments (drops included in N l)
    torch.testing.assert_close(plan.aux_loss, 0.01 * 4 * (f.float() * p.mean(0)).sum())
    plan.aux_loss.backward()
    assert x.grad.abs().sum() > 0  # the affinity is fixed: the loss moves the hidden states
    assert r.eval()(x).aux_loss is None  # training only
    off = ResonanceRouter(16, 4, RouterConfig(kind="etr", etr_aux_loss_coef=0.0)).train()
    assert off(x).aux_loss is None


def test_etr_tiny_preset_loads_stay_within_the_default_capacity_and_routing_is_not_plain_top1():
    """A few training steps of the `tiny` preset with router.kind = etr and its defaults:
    every expert of every layer keeps at most C tokens (C computed here from the formula),
    and the routing differs from plain top-1 of the affinity: tokens over capacity are
    dropped, and only those."""
    from moedist.config import build_config
    from moedist.training.trainer import Trainer, load_dataset

    cfg = build_config("tiny", sets=["router.kind=etr", "train.batch_size=4", "train.progress=false",
                                     "profile.spans=false"])  # fmt: skip
    tr = Trainer(cfg, load_dataset(cfg))
    D, E, N = cfg.model.d_model, cfg.model.n_experts, 4 * cfg.model.seq_len
    d2 = 1 / D  # the typical affinity squared
    cap = max(math.ceil(1.25 * N / E), math.ceil(math.exp(D * d2 / (2 - d2)) / E * N))
    seen = []
    for router in tr.model.routers():
        router.register_forward_hook(lambda m, inp, plan: seen.append((m.logits(inp[0]).detach(), plan)))
    for _ in range(3):
        seen.clear()
        row = tr.train_step()
        assert len(seen) == 3  # one plan per MoE layer (the first layer is dense)
        for layer in tr.model.moe_layer_ids():
            assert max(row[f"L{layer}_load"]) <= cap
        for delta_TE, plan in seen:
            top1_TE = topk_mask(delta_TE, 1)
            kept_TE = plan.mask_TE()
            assert int(plan.load_E.max()) <= cap
            assert bool((kept_TE <= top1_TE).all())  # a subset of the token choice
            dropped_E = (top1_TE & ~kept_TE).sum(0)
            assert int(dropped_E.sum()) > 0  # not plain top-1
            # an expert drops tokens only when over capacity, and then keeps exactly C
            over_E = top1_TE.sum(0) > cap
            assert torch.equal(dropped_E > 0, over_E)
            assert torch.equal(plan.load_E[over_E], torch.full_like(plan.load_E[over_E], cap))


def test_etr_training_capacity_is_not_causal_but_eval_routing_is():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, seq_len=64, d_model=32, n_layers=2, n_heads=2, n_experts=4,
                      first_layer_dense=False)  # fmt: skip
    rcfg = RouterConfig(kind="etr", top_k=1, etr_capacity_factor=0.5, etr_capacity_floor=False)
    model = MoETransformer(cfg, rcfg).double()
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 50, (2, 24), generator=g)
    changed = base.clone()
    changed[:, 12:] = torch.randint(0, 50, (2, 12), generator=g)

    def early_routing(train: bool):
        model.train(train)
        with torch.no_grad():
            a = [p.mask_TE().view(2, 24, -1)[:, :12] for p in model(base).plans]
            b = [p.mask_TE().view(2, 24, -1)[:, :12] for p in model(changed).plans]
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert early_routing(train=False)  # token choice by a fixed affinity: causal
    assert not early_routing(train=True)  # the expert-side capacity looks at later tokens


def test_etr_locality_loss_favours_local_experts():
    torch.manual_seed(0)
    r = ResonanceRouter(16, 4, RouterConfig(kind="etr", locality_loss_coef=0.1, etr_aux_loss_coef=0.0)).train()
    x = torch.randn(32, 16, requires_grad=True)
    assert float(r(x).aux_loss.detach()) == 0.0  # one process: every expert is local
    r.attach(r.pool, torch.tensor([True, True, False, False]))
    plan = r(x)
    p = torch.softmax(r.logits(x), -1).mean(0)
    torch.testing.assert_close(plan.aux_loss, -0.1 * torch.log(p[:2].sum()))
    plan.aux_loss.backward()
    assert x.grad.abs().sum() > 0


def test_etr_pool_ops_default_is_local():
    assert isinstance(ResonanceRouter(8, 2, RouterConfig(kind="etr")).pool, PoolOps)

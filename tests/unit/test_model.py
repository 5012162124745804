"""Model-level oracles: 1-expert MoE == dense FFN, ET causality, ET generation == teacher forcing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from moedist.config import ModelConfig, RouterConfig
from moedist.model.experts import DenseMLP
from moedist.model.generate import generate
from moedist.model.moe import LocalDispatcher, MoEBlock, masked_loop_reference
from moedist.model.transformer import MoETransformer

ROUTERS = ["tc", "lf", "ec", "et", "aoe", "etr"]


def tiny_model(kind: str, seq_len: int = 64, **router_kw) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, seq_len=seq_len, d_model=32, n_layers=3, n_heads=2, n_experts=4, granularity=2)
    model = MoETransformer(cfg, RouterConfig(kind=kind, **router_kw)).double()
    return model


def calibrate_thresholds(model: MoETransformer, steps: int = 3) -> None:
    """Give ET/LF routers real state: a few training-mode forwards + step ends."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randint(0, 50, (4, 32), generator=g))
            model.routing_step_end()
    model.eval()


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_one_expert_moe_equals_dense_ffn(activation):
    torch.manual_seed(0)
    D, F = 16, 24
    block = MoEBlock(D, 1, F, 0, activation, RouterConfig(kind="tc", top_k=1), 0.02, 0.02).double()
    dense = DenseMLP(D, F, activation=activation, init_std=0.5, out_std=0.5).double()
    with torch.no_grad():
        block.experts.w1_EDF[0].copy_(dense.fc1.weight.T)
        block.experts.w2_EFD[0].copy_(dense.fc2.weight.T)
        if activation == "swiglu":
            block.experts.w3_EDF[0].copy_(dense.fc3.weight.T)
    x = torch.randn(37, D, dtype=torch.float64, requires_grad=True)
    y, plan = block(x)
    assert torch.equal(plan.weight_A, torch.ones(37, dtype=torch.float64))  # softmax over 1 expert
    y_ref = dense(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g_moe = torch.autograd.grad(y.square().sum(), x)[0]
    g_ref = torch.autograd.grad(y_ref.square().sum(), x)[0]
    torch.testing.assert_close(g_moe, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in ROUTERS if k != "aoe"])  # AoE: tests/unit/test_aoe_etr.py
def test_local_dispatch_equals_masked_loop(kind):
    torch.manual_seed(0)
    block = MoEBlock(16, 6, 20, 0, "relu2", RouterConfig(kind=kind, top_k=2, et_warmup_steps=0), 0.3, 0.3).double()
    x = torch.randn(40, 16, dtype=torch.float64)
    plan = block.router(x)
    assert plan.token_idx_A.numel() > 0
    y = LocalDispatcher()(x, plan, block.experts)
    torch.testing.assert_close(y, masked_loop_reference(x, plan, block.experts), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ROUTERS)
def test_forward_backward_every_router(kind):
    model = tiny_model(kind, top_k=2).float()
    idx = torch.randint(0, 50, (2, 16))
    out = model(idx, idx)
    assert out.logits_BSV.shape == (2, 16, 50)
    assert len(out.plans) == 2  # first layer dense
    (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
    router = model.blocks[1].ffn.router
    if kind == "aoe":
        assert router.w_down.weight.grad.abs().sum() > 0
    elif kind == "etr":  # a fixed affinity: nothing to learn in the router
        assert list(router.parameters()) == []
    else:
        assert router.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ROUTERS)
def test_router_scores_and_logits_are_at_least_float32(kind):
    """bf16 autocast: router scores and LM logits in float32; a float64 model keeps float64
    (the oracle tests compare it to 1e-10)."""
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_model(kind, top_k=2).float().eval()
    router = model.blocks[1].ffn.router
    x_TD = torch.randn(16, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert router.logits(x_TD.bfloat16()).dtype == torch.float32
        assert model(idx).logits_BSV.dtype == torch.float32
    with torch.no_grad():
        assert router.logits(x_TD).dtype == torch.float32
        model.double()
        assert router.logits(x_TD.double()).dtype == torch.float64
        assert model(idx).logits_BSV.dtype == torch.float64


def _prefix_outputs(model, idx, t):
    out = model(idx)
    return out.logits_BSV[0, : t + 1], [p.mask_TE().view(idx.shape[0], idx.shape[1], -1)[0, : t + 1] for p in out.plans]


def test_et_is_causal_and_ec_is_not():
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 50, (2, 24), generator=g)
    changed = base.clone()
    t = 9
    changed[0, t + 1 :] = torch.randint(0, 50, (24 - t - 1,), generator=g)
    changed[1] = torch.randint(0, 50, (24,), generator=g)  # the other sequence of the batch too

    et = tiny_model("et", et_warmup_steps=0)
    calibrate_thresholds(et)
    with torch.no_grad():
        la, ra = _prefix_outputs(et, base, t)
        lb, rb = _prefix_outputs(et, changed, t)
    assert any(r.any() for r in ra)  # something is routed at all
    for a, b in zip(ra, rb, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)

    ec = tiny_model("ec")
    ec.eval()
    with torch.no_grad():
        la, ra = _prefix_outputs(ec, base, t)
        lb, rb = _prefix_outputs(ec, changed, t)
    routing_changed = any(not torch.equal(a, b) for a, b in zip(ra, rb, strict=True))
    assert routing_changed and (la - lb).abs().max() > 1e-6


# (model.seq_len, prompt tokens, new tokens)
GENERATION_CASES = {
    "within_seq_len": (64, 8, 20),  # the prompt in one step, then 20 steps on the KV cache
    "past_seq_len": (16, 5, 27),  # 32 positions: the window slides after 16
    "prompt_longer_than_seq_len": (16, 21, 6),  # only the prompt's last 16 tokens are context
}


def teacher_forced(model: MoETransformer, ids: list[int], first: int) -> tuple[Tensor, list[Tensor]]:
    """Logits [S, V] and routing masks [S, E] per MoE layer of positions first.. of `ids`,
    as the model computes them on whole sequences of at most seq_len tokens starting at
    `first` (the generation's first context token): positions up to first + seq_len - 1
    from one forward over ids[first : first + seq_len]; a later position p from a forward
    over the window of the last seq_len tokens, ids[p - seq_len + 1 : p + 1] (its last row)."""
    S = model.cfg.seq_len
    rows: list[tuple[Tensor, list[Tensor]]] = []
    with torch.no_grad():
        out = model(torch.tensor([ids[first : first + S]]))
        masks = [p.mask_TE() for p in out.plans]
        rows += [(out.logits_BSV[0, i], [m[i] for m in masks]) for i in range(out.logits_BSV.shape[1])]
        for p in range(first + S, len(ids)):
            out = model(torch.tensor([ids[p - S + 1 : p + 1]]))
            rows.append((out.logits_BSV[0, -1], [pl.mask_TE()[-1] for pl in out.plans]))
    n_moe = len(model.moe_blocks())
    return torch.stack([r[0] for r in rows]), [torch.stack([r[1][i] for r in rows]) for i in range(n_moe)]


@pytest.mark.parametrize("case", GENERATION_CASES)
@pytest.mark.parametrize("kind", ["et", "tc", "lf", "aoe", "etr", "dense"])  # EC: the next test
def test_generation_equals_teacher_forcing(kind: str, case: str):
    """Every position generate processes (the prompt in one step, then one token at a time
    on the KV cache, then a sliding window past seq_len) has the logits (float64, 1e-10) and
    routing of the teacher-forced forward."""
    seq_len, n_prompt, n_new = GENERATION_CASES[case]
    model = tiny_model(kind, seq_len=seq_len, et_warmup_steps=1, top_k=1)
    calibrate_thresholds(model)
    prompt = torch.randint(0, 50, (n_prompt,), generator=torch.Generator().manual_seed(2)).tolist()
    gen = generate(model, prompt, n_new, temperature=1.0, seed=0, record_routing=True, record_logits=True)
    assert len(gen.ids) == n_prompt + n_new and gen.ids[:n_prompt] == prompt
    first = max(0, n_prompt - seq_len)
    assert gen.logits_SV is not None and gen.logits_SV.dtype == torch.float64
    assert gen.logits_SV.shape == (len(gen.ids) - first, 50)
    ref_logits_SV, ref_masks = teacher_forced(model, gen.ids, first)
    torch.testing.assert_close(gen.logits_SV, ref_logits_SV, rtol=1e-10, atol=1e-10)
    assert len(gen.routing_SE) == len(ref_masks) == (0 if kind == "dense" else 2)
    for layer, (got, want) in enumerate(zip(gen.routing_SE, ref_masks, strict=True)):
        assert torch.equal(got, want), f"layer {layer}"
    if kind == "et":  # thresholds route a variable number of experts per token
        fan = ref_masks[0].sum(-1)
        assert fan.min() != fan.max()


def test_expert_choice_generation_is_not_teacher_forcing():
    """EC is left out above: an expert picks its top tokens of the pool, so a prompt routed
    as one pool and later tokens routed one by one see other pools than a full forward."""
    model = tiny_model("ec", top_k=1)
    prompt = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    gen = generate(model, prompt, 20, temperature=1.0, seed=0, record_logits=True)
    ref_logits_SV, _ = teacher_forced(model, gen.ids, 0)
    assert (gen.logits_SV - ref_logits_SV).abs().max() > 1e-3


def test_generate_is_seeded_and_greedy_is_deterministic():
    model = tiny_model("et")
    a = generate(model, [1, 2, 3], 10, temperature=1.0, seed=7).ids
    b = generate(model, [1, 2, 3], 10, temperature=1.0, seed=7).ids
    assert a == b
    g1 = generate(model, [1, 2, 3], 10, temperature=0).ids
    assert model.training  # generate restores the caller's mode
    model.eval()
    with torch.no_grad():  # greedy continuation equals argmax of a full forward
        logits = model(torch.tensor([g1[:-1]])).logits_BSV[0]
    assert g1[3:] == logits[2:].argmax(-1).tolist()
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 5)

"""Whole-model state <-> expert shards (moedist.parallel.shards): exact round trips."""

from __future__ import annotations

import pytest
import torch

from moedist.config import ModelConfig, RouterConfig
from moedist.model.transformer import MoETransformer
from moedist.parallel.placement import ExpertPlacement
from moedist.parallel.shards import (
    assemble_shard,
    dense_state,
    expert_keys,
    expert_slots,
    merge_model_shards,
    merge_optim_shards,
    model_shard,
    optim_shard,
    rows_by_new_owner,
)


def _model_and_optim():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, seq_len=8, n_experts=8, first_layer_dense=False)
    model = MoETransformer(cfg, RouterConfig(kind="tc", top_k=2))
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.ndim >= 2]},
                             {"params": [p for p in model.parameters() if p.ndim < 2]}])  # fmt: skip
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("perm", [None, [3, 1, 0, 2, 1, 0, 3, 2]])
def test_shard_then_merge_is_the_identity(perm):
    model, opt = _model_and_optim()
    keys, slots = expert_keys(model), expert_slots(model, opt)
    assert len(keys) == 2 * 2 and len(slots) == 2 * 2  # w1, w2 of 2 MoE layers
    placement = ExpertPlacement(8, 4, perm)
    full_m, full_o = model.state_dict(), opt.state_dict()
    m_shards = [model_shard(full_m, placement, r, keys) for r in range(4)]
    o_shards = [optim_shard(full_o, placement, r, slots) for r in range(4)]
    for r in range(4):
        local = placement.local_experts(r)
        for k in keys:
            assert torch.equal(m_shards[r][k], full_m[k][local])
        for i in slots:
            assert torch.equal(o_shards[r]["state"][i]["exp_avg"], full_o["state"][i]["exp_avg"][local])
    assert _equal(merge_model_shards(m_shards, placement, keys), full_m)
    assert _equal(merge_optim_shards(o_shards, placement, slots), full_o)


def test_mismatched_shards_are_refused_by_name():
    model, _ = _model_and_optim()
    keys = expert_keys(model)
    full = model.state_dict()
    with pytest.raises(ValueError, match="places 4"):
        model_shard(full, ExpertPlacement(4, 2), 0, keys)
    shards = [model_shard(full, ExpertPlacement(8, 2), r, keys) for r in range(2)]
    with pytest.raises(ValueError, match="2 shards for a placement over 4 workers"):
        merge_model_shards(shards, ExpertPlacement(8, 4), keys)


@pytest.mark.parametrize(("old", "new"), [((8, 2), (8, 4)), ((8, 4), (8, 3)), ((8, 3), (8, 2)), ((8, 2), (8, 1))])
def test_moving_rows_between_placements_gives_the_new_shards(old, new):
    """Live rescaling: each old rank splits its shard by new owner; each new rank assembles
    a replica's dense state with exactly its rows. The result is the new placement's shard
    of the whole model, bit for bit, and a rank sends only the experts that change owner."""
    model, opt = _model_and_optim()
    keys, slots = expert_keys(model), expert_slots(model, opt)
    full_m, full_o = model.state_dict(), opt.state_dict()
    p_old, p_new = ExpertPlacement.blocks(*old), ExpertPlacement.blocks(*new)
    sent: dict[int, list] = {r: [] for r in range(p_new.world_size)}
    for r in range(p_old.world_size):
        m, o = model_shard(full_m, p_old, r, keys), optim_shard(full_o, p_old, r, slots)
        for dest, part in rows_by_new_owner(m, o, keys, slots, p_old, r, p_new).items():
            assert all(p_new.owner(e) == dest and p_old.owner(e) == r for e in part.experts)
            sent[dest].append(part)
    assert sum(len(p.experts) for parts in sent.values() for p in parts) == 8  # every expert lands once
    for r in range(p_new.world_size):
        # the dense state of any old replica (here the last one's, with its own expert rows)
        src = p_old.world_size - 1
        dense_m, dense_o = model_shard(full_m, p_old, src, keys), optim_shard(full_o, p_old, src, slots)
        if r % 2:  # what a new worker receives: the dense state with the expert rows stripped
            dense_m, dense_o = dense_state(dense_m, dense_o, keys, slots)
        m, o = assemble_shard(dense_m, dense_o, sent[r], keys, slots, p_new, r)
        assert _equal(m, model_shard(full_m, p_new, r, keys))
        assert _equal(o, optim_shard(full_o, p_new, r, slots))
    # what crosses workers: the experts whose owner changes, nothing else
    travelling = sum(len(p.experts) for d, parts in sent.items() for p in parts
                     if any(p_old.owner(e) != d for e in p.experts))  # fmt: skip
    assert travelling == sum(p_old.owner(e) != p_new.owner(e) for e in range(8))


def test_assemble_refuses_the_wrong_experts():
    model, opt = _model_and_optim()
    keys, slots = expert_keys(model), expert_slots(model, opt)
    p_old, p_new = ExpertPlacement.blocks(8, 2), ExpertPlacement.blocks(8, 4)
    m, o = model_shard(model.state_dict(), p_old, 0, keys), optim_shard(opt.state_dict(), p_old, 0, slots)
    parts = rows_by_new_owner(m, o, keys, slots, p_old, 0, p_new)
    with pytest.raises(ValueError, match="owns experts \\[2, 3\\], was given \\[0, 1\\]"):
        assemble_shard(m, o, [parts[0]], keys, slots, p_new, 1)

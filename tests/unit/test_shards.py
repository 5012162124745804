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
    expert_part,
    expert_slots,
    merge_model_shards,
    merge_optim_shards,
    model_shard,
    optim_shard,
    rows_by_new_owner,
    split_rows,
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


def _move(shards, p_old: ExpertPlacement, p_new: ExpertPlacement, keys, slots):
    """What live worker scaling does (Worker.publish / adopt): every old rank splits its shard
    by new owner; new rank r assembles rank 0's dense state with its rows (staying ranks:
    their own dense state; new ranks: rank 0's, stripped). Returns the new shards and the
    number of experts that travelled."""
    sent: dict[int, list] = {r: [] for r in range(p_new.world_size)}
    travelled = 0
    for r, (m, o) in enumerate(shards):
        for dest, part in rows_by_new_owner(m, o, keys, slots, p_old, r, p_new).items():
            sent[dest].append(part)
            travelled += len(part.experts) if dest != r else 0
    out = []
    for r in range(p_new.world_size):
        dense = shards[r] if r < p_old.world_size else dense_state(*shards[0], keys, slots)
        out.append(assemble_shard(*dense, sent[r], keys, slots, p_new, r))
    return out, travelled


@pytest.mark.parametrize(
    "chain",
    [
        [("blocks", 2), 4, 3, 2, 1, 3],  # rebalanced tables are not contiguous (e.g. 0,0,2,2,1,1,3,3)
        [[3, 1, 0, 2, 1, 0, 3, 2], 3, 4, 2],  # a permuted start
        [[1, 0, 1, 1, 1, 0, 1, 1], 3, 2],  # an uneven start (rank 0 owns 2, rank 1 owns 6)
    ],
)
def test_moving_rows_along_rebalanced_non_contiguous_placements(chain):
    """A chain of live worker-count changes with ExpertPlacement.rebalance: after every move
    each rank's shard is exactly the new placement's shard of the whole model (so the
    checkpoint merged from it is the whole model, bit for bit), and only the fewest experts
    travel."""
    model, opt = _model_and_optim()
    keys, slots = expert_keys(model), expert_slots(model, opt)
    full_m, full_o = model.state_dict(), opt.state_dict()
    first = chain[0]
    p = ExpertPlacement.blocks(8, first[1]) if first[0] == "blocks" else ExpertPlacement(8, max(first) + 1, first)
    shards = [(model_shard(full_m, p, r, keys), optim_shard(full_o, p, r, slots)) for r in range(p.world_size)]
    contiguous_seen = []
    for N in chain[1:]:
        p_new = ExpertPlacement.rebalance(p, N)
        shards, travelled = _move(shards, p, p_new, keys, slots)
        assert travelled == sum(p.owner(e) != p_new.owner(e) for e in range(8))
        assert travelled <= sum(p.owner(e) != ExpertPlacement.blocks(8, N).owner(e) for e in range(8))
        for r in range(N):
            assert _equal(shards[r][0], model_shard(full_m, p_new, r, keys))
            assert _equal(shards[r][1], optim_shard(full_o, p_new, r, slots))
        assert _equal(merge_model_shards([m for m, _ in shards], p_new, keys), full_m)
        assert _equal(merge_optim_shards([o for _, o in shards], p_new, slots), full_o)
        contiguous_seen.append(p_new.owner_E == sorted(p_new.owner_E))
        p = p_new
    assert not all(contiguous_seen)  # the chain really used non-contiguous tables


@pytest.mark.parametrize("owner", [None, [3, 1, 0, 2, 1, 0, 3, 2], [0, 0, 2, 2, 1, 1, 3, 3], [3, 0, 1, 1, 2, 1, 1, 3]])
def test_split_rows_with_the_dense_state_give_every_shard(owner):
    """Restoring a whole-model state per rank (Coordinator.load_state): one dense part for
    all, each rank its rows: the same shard as model_shard / optim_shard. And gathering one:
    rank 0's whole shard plus only the expert rows of the others merges to the whole model."""
    model, opt = _model_and_optim()
    keys, slots = expert_keys(model), expert_slots(model, opt)
    full_m, full_o = model.state_dict(), opt.state_dict()
    p = ExpertPlacement(8, 4, owner)
    dense_m, dense_o = dense_state(full_m, full_o, keys, slots)
    rows = split_rows(full_m, full_o, keys, slots, p)
    assert [r.experts for r in rows] == [p.local_experts(r) for r in range(4)]
    shards = []
    for r in range(4):
        m, o = assemble_shard(dense_m, dense_o, [rows[r]], keys, slots, p, r)
        assert _equal(m, model_shard(full_m, p, r, keys))
        assert _equal(o, optim_shard(full_o, p, r, slots))
        shards.append((m, o))
    sent = [shards[0]] + [expert_part(m, o, keys, slots) for m, o in shards[1:]]
    assert set(sent[1][0]) == set(keys)  # no dense tensor travels from ranks other than 0
    assert _equal(merge_model_shards([m for m, _ in sent], p, keys), full_m)
    assert _equal(merge_optim_shards([o for _, o in sent], p, slots), full_o)
    with pytest.raises(ValueError, match="has 8 experts, the placement places 6"):
        split_rows(full_m, full_o, keys, slots, ExpertPlacement(6, 2))

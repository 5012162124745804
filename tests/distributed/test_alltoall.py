"""Expert parallelism on W gloo processes (loopback) equals one process on the same global
batch: AllToAllDispatcher vs LocalDispatcher (outputs and gradients, float64), expert
placement tables, expert sharding and gradient sync of a whole model.

Legend: N global tokens, T tokens of one rank, A assignments, D model width, E experts,
W workers. Functions named `_on_rank_*` run inside the spawned processes: each rank builds
the same global problem from a seed, computes the 1-process oracle itself, runs its share
distributed and compares its rows.
"""

from __future__ import annotations

import pytest
import torch

from moedist.config import ModelConfig, RouterConfig
from moedist.model.experts import GroupedExperts
from moedist.model.moe import LocalDispatcher
from moedist.model.transformer import MoETransformer
from moedist.parallel.alltoall import AllToAllDispatcher
from moedist.parallel.grads import (
    all_reduce_sum,
    expert_parameters,
    replicated_parameters,
    shard_model_experts,
    sync_gradients,
)
from moedist.parallel.placement import ExpertPlacement
from moedist.routing.base import RoutingPlan

TIGHT = {"rtol": 1e-12, "atol": 1e-12}
# A float64 model keeps float64 logits and router scores; whole-model results differ only by
# the order of sums (gradients are reduced across ranks).
MODEL_TOL = {"rtol": 1e-9, "atol": 1e-12}
D, F = 12, 10

# ----------------------------------------------------------------------------- placement


def test_placement_default_is_contiguous_blocks():
    p = ExpertPlacement(8, 4)
    assert p.owner_E == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.local_experts(2) == [4, 5] and p.owner(5) == 2 and p.local_index(5) == 1
    assert p.slot_E() == list(range(8)) and p.is_balanced


def test_placement_permutation_uneven_and_json():
    p = ExpertPlacement(6, 3, [2, 0, 1, 0, 2, 0])
    assert [p.local_experts(r) for r in range(3)] == [[1, 3, 5], [2], [0, 4]]
    assert [p.local_index(e) for e in range(6)] == [0, 0, 0, 1, 1, 2]
    # rank-major slots: rank 0's experts 1,3,5 -> 0,1,2; rank 1's 2 -> 3; rank 2's 0,4 -> 4,5
    assert p.slot_E() == [4, 0, 3, 1, 5, 2]
    assert not p.is_balanced
    import json

    assert ExpertPlacement.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((6, 4, None), "divisible"),
        ((4, 2, [0, 0, 0, 0]), r"no expert to rank\(s\) \[1\]"),
        ((4, 2, [0, 1, 2, 1]), r"owner_E\[2\] = 2"),
        ((4, 2, [0, 1]), "2 entries"),
        ((0, 1, None), "n_experts"),
    ],
)
def test_placement_rejects_bad_tables(args, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement(*args)


# ----------------------------------------------------------------------------- dispatch

E8 = 8
CASES = {
    # several experts per token (0..3), a rank with no tokens, expert 3 gets none,
    # assignments not in token order
    "random": {"tokens": [13, 0, 7, 21], "mode": "random", "kmax": 3, "skip": (3,), "shuffle": True},
    # every token of every rank to expert 5: all but one rank receive nothing
    "one_expert": {"tokens": [9, 5, 0, 6], "mode": "one", "expert": 5},
    # nothing routed anywhere: every exchange is empty
    "no_assignments": {"tokens": [4, 3, 0, 2], "mode": "none"},
    # a random non-contiguous placement (equal shares), swiglu experts
    "permuted": {"tokens": [11, 6, 9, 3], "mode": "random", "kmax": 2, "placement": "perm",
                 "activation": "swiglu", "shuffle": True},
    # workers own different numbers of experts (some own one)
    "uneven": {"tokens": [10, 8, 0, 12], "mode": "random", "kmax": 3, "placement": "uneven"},
    # one expert per worker (no receiver-side reordering needed)
    "one_per_worker": {"tokens": [7, 12, 5, 9], "mode": "random", "kmax": 2, "n_experts": "world"},
}  # fmt: skip
UNEVEN = {2: [1, 0, 1, 1, 1, 0, 1, 1], 4: [3, 0, 1, 1, 2, 1, 1, 3]}


def _placement(case: dict, E: int, world: int) -> ExpertPlacement:
    kind = case.get("placement")
    if kind == "uneven":
        return ExpertPlacement(E, world, UNEVEN[world])
    if kind == "perm":
        g = torch.Generator().manual_seed(7)
        owner = torch.arange(E).div(E // world, rounding_mode="floor")[torch.randperm(E, generator=g)]
        return ExpertPlacement(E, world, owner.tolist())
    return ExpertPlacement(E, world)


def _problem(case: dict, world: int, seed: int = 0):
    """The global problem: tokens per rank, x_ND, assignments, gates, upstream grad, experts."""
    g = torch.Generator().manual_seed(seed)
    T_W = case["tokens"][:world]
    N = sum(T_W)
    E = world if case.get("n_experts") == "world" else E8
    x_ND = torch.randn(N, D, generator=g, dtype=torch.float64)
    allowed = [e for e in range(E) if e not in case.get("skip", ())]
    token_A, expert_A = [], []
    for t in range(N):
        if case["mode"] == "one":
            chosen = [case["expert"]]
        elif case["mode"] == "none":
            chosen = []
        else:
            k = int(torch.randint(0, case["kmax"] + 1, (1,), generator=g))
            chosen = [allowed[i] for i in torch.randperm(len(allowed), generator=g)[:k].tolist()]
        token_A += [t] * len(chosen)
        expert_A += chosen
    token_A = torch.tensor(token_A, dtype=torch.int64)
    expert_A = torch.tensor(expert_A, dtype=torch.int64)
    gate_A = torch.rand(token_A.shape[0], generator=g, dtype=torch.float64) + 0.1
    grad_ND = torch.randn(N, D, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    experts = GroupedExperts(E, D, F, activation=case.get("activation", "relu2"), init_std=0.5, out_std=0.5).double()
    return T_W, x_ND, token_A, expert_A, gate_A, grad_ND, experts


def _shard(full: GroupedExperts, local: list[int]) -> GroupedExperts:
    shard = GroupedExperts(len(local), D, F, activation=full.activation).double()
    with torch.no_grad():
        for name, p in shard.named_parameters():
            p.copy_(getattr(full, name)[local])
    return shard


def _on_rank_dispatch(rank: int, world: int, name: str) -> dict:
    case = CASES[name]
    T_W, x_ND, token_A, expert_A, gate_A, grad_ND, full = _problem(case, world)
    N, E = x_ND.shape[0], full.n_experts
    placement = _placement(case, E, world)

    # The 1-process oracle on the whole batch.
    x = x_ND.clone().requires_grad_()
    gate = gate_A.clone().requires_grad_()
    y_ND = LocalDispatcher()(x, RoutingPlan(token_A, expert_A, gate, N, E), full)
    (y_ND * grad_ND).sum().backward()

    # This rank's share: its tokens, its assignments (local token ids), its experts.
    off, T = sum(T_W[:rank]), T_W[rank]
    mine_A = ((token_A >= off) & (token_A < off + T)).nonzero().squeeze(1)
    if case.get("shuffle"):
        mine_A = mine_A[torch.randperm(mine_A.numel(), generator=torch.Generator().manual_seed(rank))]
    local = placement.local_experts(rank)
    shard = _shard(full, local)
    x_r = x_ND[off : off + T].clone().requires_grad_()
    gate_r = gate_A[mine_A].clone().requires_grad_()
    plan = RoutingPlan(token_A[mine_A] - off, expert_A[mine_A], gate_r, T, E)
    y_r = AllToAllDispatcher(placement)(x_r, plan, shard)
    # sum_r loss_r is the oracle's loss, so every gradient must match the oracle's.
    (y_r * grad_ND[off : off + T]).sum().backward()

    torch.testing.assert_close(y_r, y_ND[off : off + T], **TIGHT)
    torch.testing.assert_close(x_r.grad, x.grad[off : off + T], **TIGHT)
    torch.testing.assert_close(gate_r.grad, gate.grad[mine_A], **TIGHT)
    for pname, p in shard.named_parameters():
        torch.testing.assert_close(p.grad, getattr(full, pname).grad[local], **TIGHT, msg=pname)
    return {"assignments": int(mine_A.numel()), "experts": local}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_all_to_all_equals_local_dispatch(gloo_pools, world, name):
    out = gloo_pools.run(world, _on_rank_dispatch, name)
    assert sorted(e for o in out for e in o["experts"]) == list(range(world if name == "one_per_worker" else E8))


def _on_rank_bf16(rank: int, world: int) -> None:
    """Under bf16 autocast rows travel in bf16 and y comes back in float32."""
    T_W, x_ND, token_A, expert_A, gate_A, _, full = _problem(CASES["random"], world)
    full, x_ND, gate_A = full.float(), x_ND.float(), gate_A.float()
    N, E = x_ND.shape[0], full.n_experts
    placement = ExpertPlacement(E, world)
    off, T = sum(T_W[:rank]), T_W[rank]
    mine_A = ((token_A >= off) & (token_A < off + T)).nonzero().squeeze(1)
    shard = _shard(full.double(), placement.local_experts(rank)).float()
    x_r = x_ND[off : off + T].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = LocalDispatcher()(x_ND, RoutingPlan(token_A, expert_A, gate_A, N, E), full.float())
        plan = RoutingPlan(token_A[mine_A] - off, expert_A[mine_A], gate_A[mine_A], T, E)
        y_r = AllToAllDispatcher(placement)(x_r, plan, shard)
    assert y_r.dtype == torch.float32
    torch.testing.assert_close(y_r, y_ref[off : off + T], rtol=2e-2, atol=2e-2)
    y_r.sum().backward()
    assert x_r.grad.dtype == torch.float32 and torch.isfinite(x_r.grad).all()


def test_bf16_autocast(gloo_pools):
    gloo_pools.run(2, _on_rank_bf16)


def _on_rank_bad_shard(rank: int, world: int) -> None:
    placement = ExpertPlacement(8, world)
    wrong = GroupedExperts(3, D, F)
    x = torch.randn(4, D)
    plan = RoutingPlan(torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.ones(4), 4, 8)
    with pytest.raises(ValueError, match=r"owns 4 experts .* has 3"):
        AllToAllDispatcher(placement)(x, plan, wrong)


def test_clear_error_for_wrong_shard(gloo_pools):
    gloo_pools.run(2, _on_rank_bad_shard)  # raised on every rank, before any collective


# ----------------------------------------------------------------------------- whole model

MODEL = {"vocab_size": 50, "seq_len": 16, "d_model": 32, "n_layers": 3, "n_heads": 2, "n_experts": 8}


def _tiny_model(seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**MODEL)  # first layer dense, 1 shared expert: every kind of parameter
    return MoETransformer(cfg, RouterConfig(kind="tc", top_k=2, aux_loss_coef=0.0)).double()


def _on_rank_model(rank: int, world: int) -> float:
    batch_BS = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(3))
    one = _tiny_model()
    out = one(batch_BS[:, :-1], batch_BS[:, 1:])
    out.loss.backward()

    model = _tiny_model()
    placement = ExpertPlacement(8, world)
    shard_model_experts(model, placement, rank)
    B = batch_BS.shape[0] // world
    mine = batch_BS[rank * B : (rank + 1) * B]
    loss_r = model(mine[:, :-1], mine[:, 1:]).loss
    loss_r.backward()
    # a small bucket cap: several buckets per dtype
    sync_gradients(model, bucket_bytes=4096)

    mean_loss = all_reduce_sum(loss_r.detach().reshape(1))[0] / world
    torch.testing.assert_close(mean_loss, out.loss.detach(), **MODEL_TOL)
    ref = dict(one.named_parameters())
    sharded = {id(p) for p in expert_parameters(model)}
    local = placement.local_experts(rank)
    for name, p in model.named_parameters():
        want = ref[name].grad[local] if id(p) in sharded else ref[name].grad
        torch.testing.assert_close(p.grad, want, **MODEL_TOL, msg=name)
    return float(loss_r.detach())


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_model_equals_one_process(gloo_pools, world):
    losses = gloo_pools.run(world, _on_rank_model)
    assert len(set(losses)) == world  # each rank really saw different tokens


def _on_rank_unused_param(rank: int, world: int) -> None:
    """A replicated parameter used on rank 0 only still gets the average (zeros elsewhere);
    one used nowhere keeps grad None."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3), "c": torch.nn.Linear(3, 3)})
    x = torch.full((2, 3), float(rank + 1))
    loss = model["a"](x).sum() + (model["b"](x).sum() if rank == 0 else 0)
    loss.backward()
    sync_gradients(model)
    assert model["c"].weight.grad is None
    torch.testing.assert_close(model["b"].weight.grad, torch.full((3, 3), 2.0 / world))
    torch.testing.assert_close(model["a"].weight.grad, torch.full((3, 3), 2.0 * (world + 1) / 2))


def test_sync_gradients_with_rank_dependent_unused_params(gloo_pools):
    gloo_pools.run(2, _on_rank_unused_param)


def test_shard_keeps_rng_and_parameter_order():
    model = _tiny_model()
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    placement = ExpertPlacement(8, 4, [3, 1, 0, 2, 1, 0, 3, 2])
    shard_model_experts(model, placement, 1)
    assert torch.equal(torch.rand(3), before)  # sharding draws no random numbers
    assert [n for n, _ in model.named_parameters()] == names
    for name, v in model.state_dict().items():
        want = ref_state[name][[1, 4]] if ".experts." in name else ref_state[name]
        assert torch.equal(v, want), name
    assert len(expert_parameters(model)) == 2 * 2  # w1, w2 of 2 MoE layers
    assert len(replicated_parameters(model)) + 4 == len(names)
    with pytest.raises(ValueError, match="already sharded"):
        shard_model_experts(model, placement, 1)


# ----------------------------------------------------- dense-gradient sync during backward


def _on_rank_overlap_unused(rank: int, world: int) -> list[int]:
    """OverlappedGradSync gives sync_gradients' semantics: a parameter used on rank 0 only
    gets the average (zeros elsewhere), one used nowhere keeps grad None. Buckets of one
    parameter each, started in reverse model order: a's complete during backward on every
    rank, b's on rank 0 only (rank 1 starts them in finish), c's nowhere."""
    from moedist.parallel.grads import OverlappedGradSync

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"c": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3), "a": torch.nn.Linear(3, 3)})
    sync = OverlappedGradSync(model, bucket_bytes=8)
    started = []
    for step in range(2):  # twice: the second step reuses the buckets
        model.zero_grad(set_to_none=True)
        x = torch.full((2, 3), float(rank + 1 + step))
        sync.arm()
        (model["a"](x).sum() + (model["b"](x).sum() if rank == 0 else 0)).backward()
        started.append(sync._next)  # buckets under way before finish
        sync.finish()
        assert model["c"].weight.grad is None and model["c"].bias.grad is None
        s = sum(r + 1 + step for r in range(world))
        torch.testing.assert_close(model["b"].weight.grad, torch.full((3, 3), 2.0 * (1 + step) / world))
        torch.testing.assert_close(model["a"].weight.grad, torch.full((3, 3), 2.0 * s / world))
    sync.remove()
    return started


def test_overlapped_sync_with_rank_dependent_unused_params(gloo_pools):
    started = gloo_pools.run(2, _on_rank_overlap_unused)
    assert started == [[4, 4], [2, 2]]  # a.bias, a.weight (, b.bias, b.weight on rank 0)


def _overlap_trainer(world: int, rank: int, overlap: bool, micro: int):
    from moedist.config import build_config
    from moedist.parallel.grads import OverlappedGradSync
    from moedist.training.trainer import DistContext, Trainer, load_dataset

    over = {"model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "seq_len": 16, "n_experts": 4},
            "train": {"batch_size": 4, "micro_batches": micro, "eval_every": 0, "progress": False,
                      "warmup_steps": 0, "lr": 1e-2, "grad_clip": 0.5},
            "router": {"kind": "tc", "top_k": 2, "aux_loss_coef": 0.01},
            "comm": {"overlap_grad_sync": overlap}, "workers": world}  # fmt: skip
    cfg = build_config("tiny", None, over)
    tr = Trainer(cfg, load_dataset(cfg), DistContext(rank, world, ExpertPlacement(4, world)))
    if overlap:  # small buckets: several start during backward, in an order all ranks share
        tr.grad_sync.remove()
        tr.grad_sync = OverlappedGradSync(tr.model, bucket_bytes=2048)
    return tr


def _on_rank_overlap_trainer(rank: int, world: int, micro: int) -> int:
    """Training steps with overlap_grad_sync equal the plain path bitwise: every metrics
    column (timings aside), every parameter and every optimiser state."""
    runs = {}
    for overlap in (False, True):
        tr = _overlap_trainer(world, rank, overlap, micro)
        rows = [tr.train_step() for _ in range(3)]
        runs[overlap] = (rows, tr)
    (ref, a), (rows, b) = runs[False], runs[True]
    for r0, r1 in zip(ref, rows, strict=True):
        for k in r0:
            if not k.endswith("_s") and k != "tokens_per_s":
                assert r0[k] == r1[k], (r0["step"], k, r0[k], r1[k])
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    return len(b.grad_sync.buckets)


@pytest.mark.parametrize("micro", [1, 2])
def test_overlapped_grad_sync_equals_plain_sync(gloo_pools, micro):
    n_buckets = gloo_pools.run(2, _on_rank_overlap_trainer, micro)
    assert n_buckets[0] > 3  # several buckets really were in flight

"""Expert parallelism on W gloo processes (loopback) equals one process on the same global
batch: AllToAllDispatcher vs LocalDispatcher (outputs and gradients, float64), expert
placement tables, expert sharding and gradient sync of a whole model.

Legend: N global tokens, T tokens of one rank, A assignments, D model width, E experts,
W workers. Functions named `_on_rank_*` run inside the spawned processes: each rank builds
the same global problem from a seed, computes the 1-process oracle itself, runs its share
distributed and compares its rows.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from moedist.config import CommConfig, ModelConfig, RouterConfig
from moedist.model.experts import GroupedExperts
from moedist.model.moe import LocalDispatcher, MoEBlock
from moedist.model.transformer import MoETransformer
from moedist.parallel import enable_expert_parallel
from moedist.parallel.alltoall import AllToAllDispatcher
from moedist.parallel.clock import CommClock
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
F32_TOL = {"rtol": 1e-4, "atol": 1e-6}
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


def _on_rank_dispatch(rank: int, world: int, name: str, dedup: bool = False, exchange: str | None = None,
                      chunks: int = 1, plan_counts: bool = False) -> dict:  # fmt: skip
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
    if plan_counts:  # every rank's assignments per expert, as a router's all-gather would give them
        rank_A = torch.bucketize(token_A, torch.tensor(T_W).cumsum(0), right=True)
        plan.rank_counts_WE = torch.zeros(world, E, dtype=torch.int64).index_put_(
            (rank_A, expert_A), torch.ones_like(expert_A), accumulate=True)  # fmt: skip
    clock = CommClock(spans=True)
    clock.begin_step()
    ex = _exchange_of(exchange, world) if exchange else None
    dispatcher = AllToAllDispatcher(placement, dedup=dedup, clock=clock, exchange=ex, overlap_chunks=chunks,
                                    plan_counts=plan_counts)  # fmt: skip
    y_r = dispatcher(x_r, plan, shard)
    # sum_r loss_r is the oracle's loss, so every gradient must match the oracle's.
    (y_r * grad_ND[off : off + T]).sum().backward()

    # The profile's bytes: rows that leave this rank (its assignments to other ranks' experts
    # out, their results' gradients back; other ranks' rows for my experts back, their
    # gradients out), plus the counts for the other ranks' experts; 3 dispatch collectives
    # (counts, rows, their backward) and 2 combine ones; in C chunks: 1 + 2C and 2C. With
    # the plan's counts no counts exchange: 2C dispatch collectives, no count bytes.
    owner_E = torch.tensor(placement.owner_E)
    out_rows = int((owner_E[expert_A[mine_A]] != rank).sum())
    theirs_A = (token_A < off) | (token_A >= off + T)
    in_rows = int(((owner_E[expert_A] == rank) & theirs_A).sum())
    colls, nbytes = clock.take_counts()
    C = min(chunks, max(placement.n_local(w) for w in range(world)))
    assert dispatcher.overlap_chunks == C
    assert colls == {"dispatch": (not plan_counts) + 2 * C, "combine": 2 * C}, colls
    if not dedup:  # (dedup sends distinct (token, worker) rows with their gates: its bytes are checked below)
        assert nbytes == {"dispatch": (E - len(local)) * 8 * (not plan_counts) + (out_rows + in_rows) * D * 8,
                          "combine": (in_rows + out_rows) * D * 8}, (nbytes, out_rows, in_rows)  # fmt: skip

    torch.testing.assert_close(y_r, y_ND[off : off + T], **TIGHT)
    torch.testing.assert_close(x_r.grad, x.grad[off : off + T], **TIGHT)
    torch.testing.assert_close(gate_r.grad, gate.grad[mine_A], **TIGHT)
    for pname, p in shard.named_parameters():
        torch.testing.assert_close(p.grad, getattr(full, pname).grad[local], **TIGHT, msg=pname)
    if ex is not None:
        ex.close()
    # Row bytes of this rank's forward exchanges: A rows out and back, or U with dedup.
    pairs = {(int(t), placement.owner(int(e))) for t, e in zip(token_A[mine_A], expert_A[mine_A], strict=True)}
    rows = len(pairs) if dedup else int(mine_A.numel())
    return {"assignments": int(mine_A.numel()), "experts": local, "rows": rows, "bytes": dispatcher.fwd_bytes_sent}


# (dedup, overlap chunks, split sizes from the plan): 2 chunks group several experts per
# chunk (the receiver reorders within a chunk); 8 puts one expert per chunk (no reordering).
MODES = {"plain": (False, 1, False), "dedup": (True, 1, False), "overlap2": (False, 2, False),
         "overlap8": (False, 8, False), "plan_counts": (False, 1, True),
         "overlap2_plan_counts": (False, 2, True)}  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_all_to_all_equals_local_dispatch(gloo_pools, world, name, mode):
    dedup, chunks, plan_counts = MODES[mode]
    out = gloo_pools.run(world, _on_rank_dispatch, name, dedup, None, chunks, plan_counts)
    assert sorted(e for o in out for e in o["experts"]) == list(range(world if name == "one_per_worker" else E8))
    # Every row sent is received once: the bytes of the whole group are 2 x rows x row bytes
    # (+ the gate columns with dedup: 8 experts over W ranks, float64 gates, float64 rows).
    L = max(len(o["experts"]) for o in out)
    sent_rows = sum(o["rows"] for o in out)
    assert sum(o["bytes"] for o in out) == (2 * sent_rows * D + (sent_rows * L if dedup else 0)) * 8


def _on_rank_bad_plan_counts(rank: int, world: int) -> list[str]:
    """Plan counts that do not fit the group, or do not describe the plan, are refused
    before any collective. Here every rank's own check fails, so all ranks raise alike (a
    mismatch on one rank only would leave the others waiting in the rows exchange)."""
    E, placement = 4, ExpertPlacement(4, world)
    shard = GroupedExperts(placement.n_local(rank), D, F).double()
    x = torch.randn(3, D, dtype=torch.float64)
    plan = RoutingPlan(torch.tensor([0, 1]), torch.tensor([0, 3]), torch.ones(2, dtype=torch.float64), 3, E)
    dispatcher = AllToAllDispatcher(placement, plan_counts=True)
    errors = []
    for counts_WE in (torch.ones(1, E, dtype=torch.int64), torch.zeros(world, E, dtype=torch.int64)):
        plan.rank_counts_WE = counts_WE
        try:
            dispatcher(x, plan, shard)
        except (ValueError, RuntimeError) as e:
            errors.append(str(e))
    return errors


def test_plan_counts_that_do_not_fit_are_refused(gloo_pools):
    for rank, errors in enumerate(gloo_pools.run(2, _on_rank_bad_plan_counts)):
        assert len(errors) == 2, errors
        assert "shape (1, 4)" in errors[0] and "need (2, 4)" in errors[0]
        assert f"rank {rank}: plan.rank_counts_WE says [0, 0, 0, 0]" in errors[1]
        assert "the plan has [1, 0, 0, 1]" in errors[1]


def _on_rank_bf16(rank: int, world: int, dedup: bool) -> None:
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
        y_r = AllToAllDispatcher(placement, dedup=dedup)(x_r, plan, shard)
    assert y_r.dtype == torch.float32
    torch.testing.assert_close(y_r, y_ref[off : off + T], rtol=2e-2, atol=2e-2)
    y_r.sum().backward()
    assert x_r.grad.dtype == torch.float32 and torch.isfinite(x_r.grad).all()


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_bf16_autocast(gloo_pools, dedup):
    gloo_pools.run(2, _on_rank_bf16, dedup)


# bf16 on the wire against the float32 wire: rows rounded to bf16 (8 bits of mantissa, a
# relative step of 2^-8) on the way to the experts and back, fp32 everywhere else. Per
# tensor: max error <= 2^-6 of its largest entry, and relative Frobenius error <= 1%
# (measured: 0.3-0.4% for both).
BF16_WIRE_TOL = {"max": 2.0**-6, "norm": 1e-2}


def _on_rank_wire(rank: int, world: int, dedup: bool) -> dict:
    """Rows (and grads) in bf16 on the wire: y, x's grad, the gates' grad and every expert
    weight's grad within BF16_WIRE_TOL of the float32 wire; y and the grads stay float32."""
    T_W, x_ND, token_A, expert_A, gate_A, grad_ND, full = _problem(CASES["random"], world)
    placement = ExpertPlacement(full.n_experts, world)
    off, T = sum(T_W[:rank]), T_W[rank]
    mine_A = ((token_A >= off) & (token_A < off + T)).nonzero().squeeze(1)
    local = placement.local_experts(rank)
    got, sent = {}, {}
    for wire in ("float32", "bfloat16"):
        shard = _shard(full, local).float()
        x_r = x_ND[off : off + T].float().requires_grad_()
        gate_r = gate_A[mine_A].float().requires_grad_()
        plan = RoutingPlan(token_A[mine_A] - off, expert_A[mine_A], gate_r, T, full.n_experts)
        dispatcher = AllToAllDispatcher(placement, dedup=dedup, wire_dtype=wire)
        y_r = dispatcher(x_r, plan, shard)
        (y_r * grad_ND[off : off + T].float()).sum().backward()
        got[wire] = {"y": y_r, "x.grad": x_r.grad, "gate.grad": gate_r.grad,
                     **{n: p.grad for n, p in shard.named_parameters()}}  # fmt: skip
        sent[wire] = dispatcher.fwd_bytes_sent
    for name, ref in got["float32"].items():
        assert got["bfloat16"][name].dtype == torch.float32, name
        err = (got["bfloat16"][name] - ref).abs()
        if err.numel() == 0:  # a rank without tokens
            continue
        assert err.max() <= BF16_WIRE_TOL["max"] * ref.abs().max(), (name, float(err.max()), float(ref.abs().max()))
        assert err.norm() <= BF16_WIRE_TOL["norm"] * ref.norm(), (name, float(err.norm() / ref.norm()))
    return sent


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_bf16_wire_within_tolerance(gloo_pools, dedup):
    sent = gloo_pools.run(2, _on_rank_wire, dedup)
    f32, bf16 = sum(s["float32"] for s in sent), sum(s["bfloat16"] for s in sent)
    # half the row bytes; dedup's gate columns stay float32 bits (2 bf16 columns per gate)
    assert bf16 * 2 == f32 if not dedup else f32 / 2 < bf16 < f32 * 0.6


def _on_rank_bad_shard(rank: int, world: int) -> None:
    placement = ExpertPlacement(8, world)
    wrong = GroupedExperts(3, D, F)
    x = torch.randn(4, D)
    plan = RoutingPlan(torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.ones(4), 4, 8)
    with pytest.raises(ValueError, match=r"owns 4 experts .* has 3"):
        AllToAllDispatcher(placement)(x, plan, wrong)
    # dedup keeps one gate per (token, expert): a repeated pair is an error, on every rank
    twice = RoutingPlan(torch.tensor([0, 1, 1]), torch.tensor([2, 5, 5]), torch.ones(3), 4, 8)
    with pytest.raises(ValueError, match=r"repeats 1 \(token, expert\) pair"):
        AllToAllDispatcher(placement, dedup=True)(x, twice, GroupedExperts(4, D, F))
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        AllToAllDispatcher(placement, wire_dtype="float16")


def test_clear_error_for_wrong_shard(gloo_pools):
    gloo_pools.run(2, _on_rank_bad_shard)  # raised on every rank, before any collective


# ----------------------------------------------------------------------------- whole model

MODEL = {"vocab_size": 50, "seq_len": 16, "d_model": 32, "n_layers": 3, "n_heads": 2, "n_experts": 8}


def _tiny_model(seed: int = 0, router: str = "tc", dtype: torch.dtype = torch.float64) -> MoETransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**MODEL)  # first layer dense, 1 shared expert: every kind of parameter
    # ET without warm-up routes by its thresholds (zeros at first) under the capacity guard
    rcfg = RouterConfig(kind=router, top_k=2, aux_loss_coef=0.0, et_warmup_steps=0)
    return MoETransformer(cfg, rcfg).to(dtype)


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


def _on_rank_model_dedup(rank: int, world: int, router: str) -> dict:
    """EC / ET (variable fanout, pool statistics over all ranks): the deduplicated exchange
    and the pipelined one (4 chunks, two micro-batches' worth of layers in flight) give the
    1-process loss and every gradient (routers' included), as the plain one does.
    float32 (the distributed radix select's dtype): sums in another order, F32_TOL."""
    batch_BS = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(3))
    one = _tiny_model(router=router, dtype=torch.float32)
    ref_loss = one(batch_BS[:, :-1], batch_BS[:, 1:]).loss
    ref_loss.backward()
    ref = dict(one.named_parameters())
    placement = ExpertPlacement(8, world)
    local = placement.local_experts(rank)
    B = batch_BS.shape[0] // world
    mine = batch_BS[rank * B : (rank + 1) * B]
    sent = {}
    for mode, comm in {"plain": CommConfig(), "dedup": CommConfig(dedup=True),
                       "overlap": CommConfig(overlap_chunks=4)}.items():  # fmt: skip
        model = _tiny_model(router=router, dtype=torch.float32)
        enable_expert_parallel(model, placement, rank, comm=comm)
        loss_r = model(mine[:, :-1], mine[:, 1:]).loss
        loss_r.backward()
        sync_gradients(model)
        mean_loss = all_reduce_sum(loss_r.detach().reshape(1))[0] / world
        torch.testing.assert_close(mean_loss, ref_loss.detach(), **F32_TOL)
        sharded = {id(p) for p in expert_parameters(model)}
        for name, p in model.named_parameters():
            want = ref[name].grad[local] if id(p) in sharded else ref[name].grad
            torch.testing.assert_close(p.grad, want, **F32_TOL, msg=f"{mode} {name}")
        sent[mode] = sum(m.dispatcher.fwd_bytes_sent for m in model.modules() if isinstance(m, MoEBlock))
    return sent


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("router", ["ec", "et"])
def test_dedup_model_equals_one_process(gloo_pools, world, router):
    sent = gloo_pools.run(world, _on_rank_model_dedup, router)
    # fewer bytes in total: some token met two experts of one rank; chunks move the same rows
    assert sum(s["dedup"] for s in sent) < sum(s["plain"] for s in sent)
    assert [s["overlap"] for s in sent] == [s["plain"] for s in sent]


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


# ----------------------------------------------------------------------------- fewer collectives ([comm] fuse)

# router kind -> router settings: ET's warm-up (step 0) then its guard (engaged, checked
# below); TC with capacity, aux and z-loss; LF's bias; EC.
FUSE_ROUTERS = {
    "et": {"kind": "et", "top_k": 1, "et_warmup_steps": 1},
    "ec": {"kind": "ec", "top_k": 1},
    "tc": {"kind": "tc", "top_k": 2, "capacity_factor": 1.0, "z_loss_coef": 1e-3},
    "lf": {"kind": "lf", "top_k": 2},
}
FUSE_STEPS = 3
# Collectives per step (every rank), unfused -> fused, for the model below (3 MoE layers,
# 1 micro-batch; fused with 4 ranks, 2 fewer with 2 ranks). ET: warm-up step, then 2 steps
# whose guard clamps all 3 layers. Fused ET, EC and TC (capacity) dispatch without a counts
# exchange (their plans carry every rank's counts): 3 fewer.
FUSE_COUNTS = {
    "et": ([52, 52, 52], [21, 23, 23]),
    "ec": ([39, 39, 39], [20, 20, 20]),
    "tc": ([43, 43, 43], [35, 35, 35]),
    "lf": ([27, 27, 27], [21, 21, 21]),
}
def _not_compared() -> frozenset[str]:
    """Timings and the step profile's columns (its collective counts differ by design)."""
    from moedist.training.loop import TIMING_KEYS
    from moedist.training.profile import PROFILE_KEYS

    return frozenset(TIMING_KEYS) | {"tokens_per_s"} | PROFILE_KEYS


def _fuse_trainer(rank: int, world: int, kind: str, fuse: bool, comm: dict | None = None, micro: int = 1,
                  lr: float | None = None):  # fmt: skip
    from moedist.config import build_config
    from moedist.training.trainer import DistContext, Trainer, load_dataset

    over = {"workers": world, "router": FUSE_ROUTERS[kind], "comm": {"fuse": fuse, "plan_counts": fuse, **(comm or {})},
            "model": {"seq_len": 16, "d_model": 32, "n_layers": 4, "n_heads": 2, "n_experts": 8},
            "train": {"steps": FUSE_STEPS, "batch_size": 4 * world, "eval_every": 0, "progress": False,
                      "warmup_steps": 0, "threads": 1, "micro_batches": micro}}  # fmt: skip
    if lr is not None:
        over["train"]["lr"] = lr
    cfg = build_config("tiny", None, over)
    return Trainer(cfg, load_dataset(cfg), DistContext(rank, world, ExpertPlacement(cfg.model.n_experts, world)))


def _on_rank_fuse(rank: int, world: int, kind: str, fuse: bool, comm: dict | None = None, micro: int = 1,
                  lr: float | None = None) -> dict:  # fmt: skip
    from moedist.parallel.counting import CollectiveCounter

    trainer = _fuse_trainer(rank, world, kind, fuse, comm, micro, lr)
    # The first step's gradients, as the optimiser gets them (every later state follows
    # from them and the same initial state).
    grads0, step = {}, trainer.opt.step

    def recording_step(*a, **k):
        if not grads0:
            grads0.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    trainer.opt.step = recording_step
    skip = _not_compared()
    rows, counts, profiled = [], [], []
    for _ in range(FUSE_STEPS):
        with CollectiveCounter() as cc:
            row = trainer.train_step()
        rows.append({k: v for k, v in row.items() if k not in skip})
        counts.append(cc.total)
        profiled.append(row.get("collectives"))
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"opt/{i}/{k}": v for i, s in trainer.opt.state_dict()["state"].items()
                  for k, v in s.items() if torch.is_tensor(v)})  # fmt: skip
    return {"rows": rows, "counts": counts, "profiled": profiled, "state": state, "grads0": grads0}


@pytest.mark.parametrize("world", [2, 4])
def test_fused_collectives_equal_unfused(gloo_pools, world):
    """[comm] fuse = true (with plan_counts) gives bitwise the run with both off: every metrics column (losses, loads,
    fanout, capped counts, ET thresholds, LF biases, gradient norm; not timings and the
    profile's counts), every parameter, buffer (ET's EMA and update count) and optimiser
    moment, on every rank, with the collective counts per step pinned (a regression in either
    direction shows) and equal to the profile's `collectives` column."""
    for kind in FUSE_ROUTERS if world == 2 else ("et", "ec", "tc"):
        plain = gloo_pools.run(world, _on_rank_fuse, kind, False)
        fused = gloo_pools.run(world, _on_rank_fuse, kind, True)
        assert plain[0]["counts"] == FUSE_COUNTS[kind][0], kind
        # with 2 ranks the float loss sums and the clip's expert norm ride with the integer
        # counts: two fewer
        assert fused[0]["counts"] == [c - 2 * (world == 2) for c in FUSE_COUNTS[kind][1]], kind
        for r in range(world):
            # the step profile's own count (moedist.parallel.clock) agrees with the counter
            assert plain[r]["profiled"] == plain[r]["counts"] and fused[r]["profiled"] == fused[r]["counts"], kind
            assert fused[r]["rows"] == plain[r]["rows"], (kind, r)
            assert fused[r]["state"].keys() == plain[r]["state"].keys()
            for name, want in plain[r]["state"].items():
                assert torch.equal(fused[r]["state"][name], want), (kind, r, name)
        if kind == "et":  # the guard really changed decisions after the warm-up step
            assert any(sum(v) > 0 for row in plain[0]["rows"][1:] for k, v in row.items() if k.endswith("_capped"))
            assert plain[0]["rows"][-1]["L1_threshold"] != [0.0] * 8


@pytest.mark.parametrize("kind", ["et", "tc"])
def test_pipelined_exchange_trains_like_the_plain_one(gloo_pools, kind):
    """[comm] overlap_chunks = 4 (2 ranks, 4 experts each: one expert per chunk, async
    exchanges in flight across the forward and the backward of 3 MoE layers, 2 micro-batches):
    at every step the same routing decisions as one exchange per layer, every metrics column
    and every gradient to float32 rounding (the combine adds a token's expert outputs in chunk
    order).

    The learning rate is 1e-12, below float32's resolution of these weights, so the weights
    stay bitwise where they started and every step compares the two exchanges on the same
    weights; ET's thresholds still move (their EMA is not the optimiser's) and route after the
    warm-up step. With a real learning rate the runs are two trajectories, not one: Adam's
    normalised step turns a rounding-level gradient of an entry whose true gradient is ~0 into
    a whole step either way, and later steps' decisions may then differ (seen on an AMD EPYC
    host: one capacity drop of 57 at the third step)."""
    plain = gloo_pools.run(2, _on_rank_fuse, kind, True, None, 2, 1e-12)
    piped = gloo_pools.run(2, _on_rank_fuse, kind, True, {"overlap_chunks": 4}, 2, 1e-12)
    for r in range(2):
        # 3 MoE layers x 2 micro-batches x (1 + 2C - 3 more dispatch, 2C - 2 more combine), C = 4
        assert [p - q for p, q in zip(piped[r]["counts"], plain[r]["counts"], strict=True)] == [3 * 2 * 12] * FUSE_STEPS
        for step, (got, want) in enumerate(zip(piped[r]["rows"], plain[r]["rows"], strict=True)):
            assert got.keys() == want.keys()
            for k, v in want.items():
                exact = k.endswith(("_load", "_capped", "_fanout_hist")) or not isinstance(v, float | list)
                if exact or v is None or (isinstance(v, list) and None in v):
                    assert got[k] == v, (kind, r, step, k)
                else:
                    torch.testing.assert_close(torch.tensor(got[k], dtype=torch.float64),
                                               torch.tensor(v, dtype=torch.float64), rtol=1e-5, atol=1e-6,
                                               msg=f"{kind} rank {r} step {step} {k}")  # fmt: skip
        assert piped[r]["grads0"].keys() == plain[r]["grads0"].keys() and len(plain[r]["grads0"]) > 20
        for name, want in plain[r]["grads0"].items():
            torch.testing.assert_close(piped[r]["grads0"][name], want, rtol=1e-4, atol=1e-6, msg=f"{kind} {r} {name}")
        if kind == "et":  # the thresholds routed (and the guard clamped) after the warm-up step
            assert any(sum(v) > 0 for row in plain[r]["rows"][1:] for k, v in row.items() if k.endswith("_capped"))
        # The weights never moved; the buffers (ET's EMA thresholds and counts) and Adam's
        # moments (sums of every step's gradients) agree to float32 rounding.
        params = set(plain[r]["grads0"])
        for name, want in plain[r]["state"].items():
            got = piped[r]["state"][name]
            if not want.is_floating_point() or name in params:
                assert torch.equal(got, want), (kind, r, name)
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9, msg=f"{kind} {r} {name}")


# ----------------------------------------------------------------------------- shm / hierarchical

# Exchange variants: (shm, hierarchical, nodes by world). "aabb": ranks 0,1 on one node and
# 2,3 on another (both paths of the flat shm exchange); "abab": interleaved nodes, so a
# node's ranks are not contiguous (the leaders' block order is tested).
EXCHANGES = {
    "shm_one_node": (True, False, {2: "aa", 4: "aaaa"}),
    "shm_two_nodes": (True, False, {2: "ab", 4: "aabb"}),
    "hier_shm": (True, True, {2: "ab", 4: "abab"}),
    "hier_gloo": (False, True, {2: "ab", 4: "aabb"}),
}


def _exchange_of(name: str, world: int):
    from moedist.parallel.exchange import make_exchange

    shm, hier, nodes = EXCHANGES[name]
    return make_exchange(None, list(nodes[world]), shm=shm, hierarchical=hier)


def _on_rank_exchange(rank: int, world: int, name: str) -> list[str]:
    """Random uneven splits (zeros included), several dtypes and row shapes, a round big
    enough to grow the segments: bitwise equal to dist.all_to_all_single."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from moedist.parallel import exchange as X

    groups_before = len(c10d._world.pg_map)
    ex = _exchange_of(name, world)
    g = torch.Generator().manual_seed(100 + rank)
    rounds = [(torch.float64, (D,), 9)] * 4 + [(torch.bfloat16, (3, 5), 9), (torch.int64, (), 9),
                                                 (torch.float32, (64,), 6000)]  # fmt: skip
    for i, (dtype, row, hi) in enumerate(rounds):
        # Every rank draws the whole split matrix from one seed; row s is rank s's sends.
        m = torch.randint(0, hi, (world, world), generator=torch.Generator().manual_seed(i))
        m[m < hi // 4] = 0  # plenty of zero pairs
        if i == 1:
            m.zero_()  # an empty round
        send, recv = m[rank].tolist(), m[:, rank].tolist()
        x = (torch.randn(sum(send), *row, generator=g) * 100).to(dtype)
        want = x.new_empty((sum(recv), *row))
        dist.all_to_all_single(want, x, recv, send)
        got = torch.full_like(want, 7)
        ex(got, x, recv, send)
        assert torch.equal(got, want), (name, i)
    if name == "shm_one_node":
        # The splits must agree: a receiver expecting one row too many fails loudly.
        bad = [r + (1 if s == (rank + 1) % world else 0) for s, r in enumerate([1] * world)]
        with pytest.raises(RuntimeError, match="splits disagree"):
            ex(torch.empty(sum(bad), 2), torch.zeros(world, 2), bad, [1] * world)
    ex.close()
    dist.barrier()
    # the hierarchical exchange's sub-groups go with it (private registry: no public count)
    assert len(c10d._world.pg_map) == groups_before, (name, len(c10d._world.pg_map), groups_before)
    return [p.name for p in X.SHM_DIR.glob(f"{X.PREFIX}.{os.getpid()}.*")]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(EXCHANGES))
def test_exchange_equals_all_to_all_single(gloo_pools, world, name):
    left = gloo_pools.run(world, _on_rank_exchange, name)
    assert left == [[]] * world  # no segment survives close(), nor a sub-group


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("exchange", list(EXCHANGES))
def test_dispatch_through_exchange(gloo_pools, world, exchange, dedup):
    """Forward and backward of the dispatcher over each exchange equal the 1-process oracle
    (the same checks as test_all_to_all_equals_local_dispatch), also with dedup."""
    gloo_pools.run(world, _on_rank_dispatch, "random", dedup, exchange)


def _killed_creator() -> str:
    """A segment file left by a process SIGKILLed right after creating it (before its peers
    mapped it, so nobody unlinked it)."""
    from moedist.parallel import exchange as X

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only makes the file and dies
        name = f"{X.PREFIX}.{os.getpid()}.dead.r0.g1"
        X._create(name, 4096)
        os.write(w, name.encode())
        os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    name = os.read(r, 256).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return name


def _on_rank_one_round(rank: int, world: int) -> None:
    ex = _exchange_of("shm_one_node", world)
    x = torch.arange(world * 2, dtype=torch.float32).view(world, 2) + 10 * rank
    out = torch.empty_like(x)
    ex(out, x, [1] * world, [1] * world)
    assert out[:, 0].tolist() == [10 * s + 2 * rank for s in range(world)]
    ex.close()


def test_next_start_removes_segments_of_killed_workers(gloo_pools):
    from moedist.parallel import exchange as X

    name = _killed_creator()
    assert (X.SHM_DIR / name).exists()
    gloo_pools.run(2, _on_rank_one_round)  # a new exchange sweeps first
    assert not (X.SHM_DIR / name).exists()


def _on_rank_dies(rank: int, world: int) -> None:
    ex = _exchange_of("shm_one_node", world)
    x = torch.ones(world * 3, 4)
    ex(torch.empty_like(x), x, [3] * world, [3] * world)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    ex(torch.empty_like(x), x, [3] * world, [3] * world)  # rank 0 waits for a dead peer


def test_dead_peer_fails_fast_and_leaves_nothing(gloo_pools):
    """A SIGKILLed rank: its peer raises at once naming it (no wait for the group timeout),
    and whatever files the dead pool left are gone after the next start's sweep. (It breaks
    the 2-rank pool, so no later test of the module may use it.)"""
    from moedist.parallel import exchange as X

    pool = gloo_pools.get(2)
    pids = [p.pid for p in pool._procs]
    with pytest.raises(AssertionError, match=r"local rank 1 \(pid \d+\) died"):
        pool.run(_on_rank_dies, timeout_s=30)
    X.sweep_stale_segments()
    assert [p.name for pid in pids for p in X.SHM_DIR.glob(f"{X.PREFIX}.{pid}.*")] == []


def _on_rank_train(rank: int, world: int, comm: dict) -> list[dict]:
    """Three optimiser steps of a tiny ET model through the Trainer, with the given [comm]
    switches, ranks 0,1 on one node and 2,3 on another."""
    from moedist.config import build_config
    from moedist.parallel.exchange import close_exchanges
    from moedist.training.trainer import DistContext, Trainer, load_dataset

    over = {"model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "seq_len": 16, "n_experts": 8},
            "train": {"batch_size": 4, "steps": 3, "eval_every": 0, "progress": False},
            "router": {"kind": "et", "top_k": 2}, "comm": comm, "workers": world}  # fmt: skip
    cfg = build_config("tiny", None, over)
    ctx = DistContext(rank, world, ExpertPlacement(8, world), nodes=list("aabb"[:world]))
    tr = Trainer(cfg, load_dataset(cfg), ctx)
    used = {type(m.dispatcher.exchange).__name__ for m in tr.model.modules() if hasattr(m, "dispatcher")}
    rows = [tr.train_step() for _ in range(3)]
    close_exchanges()
    # Wall-clock columns aside, every column must be bitwise the plain path's.
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows], sorted(used)


def test_training_steps_equal_with_shm_and_hierarchical(gloo_pools):
    plain = gloo_pools.run(4, _on_rank_train, {})
    assert plain[0][0][0]["loss"] > 0 and plain[0][1] == ["NoneType"]
    # (hierarchical over gloo alone: test_dispatch_through_exchange)
    for comm, used in [({"shm": True}, "ShmExchange"), ({"shm": True, "hierarchical": True}, "HierarchicalExchange")]:
        out = gloo_pools.run(4, _on_rank_train, comm)
        assert [rows for rows, _ in out] == [rows for rows, _ in plain], comm
        assert all(u == [used] for _, u in out), out[0][1]  # the switch reached every MoE block


def test_control_slots_fit_any_node_size():
    from moedist.parallel.exchange import _HDR, _slot_words

    # header, 2 parities x (offsets, sizes), acks: 5 words per local rank; whole cache lines
    assert all(_slot_words(n) >= _HDR + 5 * n and _slot_words(n) % 8 == 0 for n in range(1, 200))


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
    skip = _not_compared()  # timings, and the profile's counts (overlap runs other collectives)
    for r0, r1 in zip(ref, rows, strict=True):
        assert {k for k in r0 if k not in skip} == {k for k in r1 if k not in skip}
        for k in r0:
            if k not in skip:
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

"""Global pool statistics over real gloo process groups (2, 3 and 4 processes, loopback only).

Legend: T local tokens, N global pool tokens, E experts, W ranks.
Each world size is spawned ONCE (module fixture); every rank runs all cases and saves what
it computed, and the tests below check those results against torch.topk on the
concatenation of every rank's rows, computed here in the parent from the same seeds.

Network: every socket is on 127.0.0.1, never the machine's outward address: rank 0's
TCPStore serves a listening socket bound to 127.0.0.1 (a plain init_method=tcp:// store
listens on every interface) and the gloo device is created with hostname=127.0.0.1.
"""

from __future__ import annotations

import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moedist.config import RouterConfig
from moedist.routing.base import PoolOps
from moedist.routing.ec import pool_topk_mask, pool_topk_mask_counts
from moedist.routing.et import ExpertThresholdRouter, guard_bounds

LOOPBACK = "127.0.0.1"
WORLDS = (2, 3, 4)
SPAWN_TIMEOUT_S = 90.0
INF = float("inf")
DENORM_MIN = 2.0**-149


# ----------------------------------------------------------------------------- cases (shared by parent and ranks)


def make_cases(world: int) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
    """name -> (rows of each rank [T_r, E] float32, k_E). Deterministic in (world, name)."""
    g = torch.Generator().manual_seed(1000 + world)
    cases: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def sizes(base: int) -> list[int]:
        return [base + 37 * r for r in range(world)]  # uneven T on purpose

    def put(name: str, parts: list[torch.Tensor], k: list[int]) -> None:
        cases[name] = (parts, torch.tensor(k, dtype=torch.int64))

    n = sum(sizes(200))
    put("random", [torch.randn(t, 6, generator=g) for t in sizes(200)], [1, 2, n // 7, n // 2, n - 1, n])
    n = sum(sizes(150))
    put("heavy_ties", [torch.randint(-2, 3, (t, 5), generator=g).float() for t in sizes(150)],
        [1, n // 5, n // 5 + 1, n // 2, n])  # fmt: skip
    n = 64 * world
    put("all_equal", [torch.full((64, 3), -2.25) for _ in range(world)], [1, n // 2, n])
    parts = []
    for t in sizes(60):
        x = torch.randn(t, 4, generator=g)
        x[::5, 0], x[1::7, 1], x[:, 2], x[2::3, 3] = INF, -INF, -INF, INF
        parts.append(x)
    n = sum(sizes(60))
    put("plus_minus_inf", parts, [3, n - 2, n // 2, n // 3])
    tiny = torch.tensor([DENORM_MIN, -DENORM_MIN, 1e-40, -1e-40, 1e-39, -3e-39, 0.0, -0.0])
    n = sum(sizes(80))
    put("denormals", [tiny[torch.randint(0, 8, (t, 4), generator=g)] for t in sizes(80)], [1, n // 4, n // 2, n])
    empty = [torch.randn(0 if r == 1 else 120, 5, generator=g) for r in range(world)]
    n = sum(p.shape[0] for p in empty)
    put("a_rank_with_no_rows", empty, [1, 7, n // 2, n, n + 3])
    put("no_rows_anywhere", [torch.zeros(0, 3) for _ in range(world)], [0, 1, 4])
    n = sum(sizes(100))
    put("k_one", [torch.randn(t, 4, generator=g) for t in sizes(100)], [1, 1, 1, 1])
    put("k_N", [torch.randn(t, 4, generator=g) for t in sizes(100)], [n, n, n, n])
    put("k_zero_and_beyond_N", [torch.randn(t, 4, generator=g) for t in sizes(100)], [0, n + 1, 10**9, 0])
    # Enough rows that the numba kernel splits them into per-thread chunks.
    n = 20_000 * world
    put("large", [torch.randn(20_000, 4, generator=g) for _ in range(world)], [1, n // 16, n // 2, n])
    return cases


def topk_reference(parts: list[torch.Tensor], k_E: torch.Tensor) -> torch.Tensor:
    """torch.topk's k-th value on the concatenation (+inf for k = 0 or an empty pool)."""
    pool_NE = torch.cat(parts)
    N, E = pool_NE.shape
    out = torch.full((E,), INF)
    for e in range(E):
        k = min(int(k_E[e]), N)
        if k > 0:
            out[e] = torch.topk(pool_NE[:, e], k).values[-1]
    return out


def sum_inputs(rank: int, E: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_E requiring grad, weight c_E of this rank's loss term <c_r, sum_s x_s>)."""
    x = torch.arange(E, dtype=torch.float32) + 10.0 * rank
    c = torch.full((E,), float(rank + 1)) * torch.linspace(1.0, 2.0, E)
    return x, c


def count_inputs(rank: int, E: int = 6) -> torch.Tensor:
    return (torch.arange(E) * (rank + 1) + rank) % 7


# ----------------------------------------------------------------------------- one rank

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def init_loopback_group(rank: int, world: int, port: int, timeout_s: float = 30.0) -> None:
    """Default gloo group with the store and every gloo socket on 127.0.0.1 (moedist's own
    group set-up, as the workers use it)."""
    from moedist.parallel.group import init_group, listen_socket

    listen = listen_socket(LOOPBACK, port) if rank == 0 else None
    init_group(rank, world, LOOPBACK, port, LOOPBACK, backend="gloo", timeout_s=timeout_s, listen=listen)


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # W processes share 2 cores
    import numba

    numba.set_num_threads(1)
    import torch.distributed as dist

    from moedist.parallel.pool import AllGatherPoolOps, DistributedPoolOps, radix_kth_largest

    init_loopback_group(rank, world, port)
    res: dict = {"rank": rank}
    try:
        radix, gather = DistributedPoolOps(), AllGatherPoolOps()
        fused = DistributedPoolOps(fuse=True)  # small k: one all-gather of local top-k candidates
        for name, (parts, k_E) in make_cases(world).items():
            x_TE = parts[rank]
            res[f"{name}/radix"] = radix.kth_largest(x_TE, k_E)
            res[f"{name}/fused"] = fused.kth_largest(x_TE, k_E)
            # two matrices side by side in one select: each must equal its own select
            res[f"{name}/many"] = fused.kth_largest_many([x_TE, -x_TE], [k_E, k_E.flip(0)])
            res[f"{name}/radix_torch"] = radix_kth_largest(x_TE, k_E, backend="torch")
            res[f"{name}/allgather"] = gather.kth_largest(x_TE, k_E)

        # NaN on the last rank only: every rank must raise, and the group must stay usable.
        for label, ops in (("radix", radix), ("allgather", gather), ("fused", fused)):
            x_TE = torch.randn(50, 4)
            if rank == world - 1:
                x_TE[17, 2] = float("nan")
            try:
                ops.kth_largest(x_TE, torch.tensor([1, 2, 3, 4]))
                res[f"nan/{label}"] = "no error"
            except ValueError as exc:
                res[f"nan/{label}"] = f"ValueError: {exc}"
        res["after_nan/total"] = radix.total(1)

        res["total"] = radix.total(100 + rank)
        res["exclusive_prefix"] = radix.exclusive_prefix(count_inputs(rank))
        x, c = sum_inputs(rank)
        x.requires_grad_(True)
        y = radix.sum(x * 1.0)
        (y * c).sum().backward()
        res["sum/value"], res["sum/grad"] = y.detach(), x.grad
        res["sum/int"] = radix.sum(torch.tensor([rank, 1]))  # ET's guard sums integer counts
        res.update(tie_selection(rank, world, radix))
        # the fused pool: small k selects and counts from one all-gather of candidates
        res.update({f"fused/{k}": v for k, v in tie_selection(rank, world, fused).items()})

        # A subgroup of the odd ranks ([1] or [1, 3]): only members call; ranks are renumbered.
        members = list(range(1, world, 2))
        sub = dist.new_group(members)
        if rank in members:
            parts, k_E = make_cases(world)["random"]
            res["subgroup/radix"] = DistributedPoolOps(sub).kth_largest(parts[rank], k_E)
            res["subgroup/prefix"] = DistributedPoolOps(sub).exclusive_prefix(count_inputs(rank))
        dist.barrier()
    except Exception:
        res["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _spawn(world: int, out_dir: Path) -> list[dict]:
    ctx = mp.start_processes(_rank_main, args=(world, free_port(), str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"world={world}: ranks did not finish in {SPAWN_TIMEOUT_S:.0f} s (a collective hung?)")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=WORLDS, ids=[f"W{w}" for w in WORLDS])
def world_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    return world, _spawn(world, tmp_path_factory.mktemp(f"threshold-w{world}"))


# ----------------------------------------------------------------------------- checks


def canon_bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns with -0.0 folded into +0.0 (topk may return either zero; radix returns +0.0)."""
    return torch.where(x == 0, torch.zeros_like(x), x).view(torch.int32)


CASE_NAMES = list(make_cases(2))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_radix_equals_topk_on_concatenation(world_results, name):
    world, results = world_results
    parts, k_E = make_cases(world)[name]
    want = topk_reference(parts, k_E)
    assert torch.equal(canon_bits(PoolOps().kth_largest(torch.cat(parts), k_E)), canon_bits(want))
    first = results[0][f"{name}/radix"]
    for res in results:
        for method in ("radix", "radix_torch", "allgather", "fused"):
            got = res[f"{name}/{method}"]
            assert got.dtype == torch.float32 and got.shape == k_E.shape
            assert torch.equal(canon_bits(got), canon_bits(want)), (res["rank"], method, got, want)
        # Every rank holds the same cutoff bit for bit (the EMA needs no further sync).
        assert torch.equal(res[f"{name}/radix"].view(torch.int32), first.view(torch.int32))
        # [comm] fuse: bit for bit the radix select (zeros included), alone and side by side
        many = res[f"{name}/many"]
        assert torch.equal(res[f"{name}/fused"].view(torch.int32), first.view(torch.int32)), res["rank"]
        assert torch.equal(many[0].view(torch.int32), first.view(torch.int32)), res["rank"]
        want_neg = topk_reference([-p for p in parts], k_E.flip(0))
        assert torch.equal(canon_bits(many[1]), canon_bits(want_neg)), res["rank"]


def test_nan_on_one_rank_raises_on_every_rank(world_results):
    world, results = world_results
    for res in results:
        assert res["nan/radix"].startswith("ValueError") and "NaN" in res["nan/radix"], res["nan/radix"]
        assert f"rank(s) [{world - 1}]" in res["nan/radix"]
        assert res["nan/allgather"].startswith("ValueError"), res["nan/allgather"]
        assert res["nan/fused"] == res["nan/radix"]
        assert res["after_nan/total"] == world  # nobody was left behind in a collective


def test_total_and_exclusive_prefix(world_results):
    world, results = world_results
    counts = [count_inputs(r) for r in range(world)]
    for r, res in enumerate(results):
        assert res["total"] == sum(100 + s for s in range(world))
        want = sum((counts[s] for s in range(r)), torch.zeros_like(counts[0]))
        assert torch.equal(res["exclusive_prefix"], want)


def test_sum_is_differentiable(world_results):
    world, results = world_results
    xs, cs = zip(*(sum_inputs(r) for r in range(world)), strict=True)
    for res in results:
        assert torch.equal(res["sum/value"], sum(xs))
        # loss = sum_r <c_r, sum_s x_s>  =>  d loss / d x_r = sum_s c_s on every rank
        assert res["sum/grad"] is not None
        assert torch.allclose(res["sum/grad"], sum(cs))
        assert torch.equal(res["sum/int"], torch.tensor([world * (world - 1) // 2, world]))


def test_subgroup(world_results):
    world, results = world_results
    members = list(range(1, world, 2))
    parts, k_E = make_cases(world)["random"]
    want = topk_reference([parts[r] for r in members], k_E)
    for i, r in enumerate(members):
        assert torch.equal(canon_bits(results[r]["subgroup/radix"]), canon_bits(want))
        below = sum((count_inputs(m) for m in members[:i]), torch.zeros(6, dtype=torch.int64))
        assert torch.equal(results[r]["subgroup/prefix"], below)
    assert "subgroup/radix" not in results[0]


# ----------------------------------------------------------------------------- exact-k selection across ranks
#
# pool_topk_mask (EC's selection, ET's warm-up and capacity guard, ETR's capacity) takes,
# per expert, exactly min(k, N) tokens of the global pool: those above the shared cutoff,
# then tokens tied AT the cutoff in global token order (lower rank first, then local
# position). Heavy ties and all-equal logits, split unevenly over 2, 3 and 4 ranks, must
# give the single-process mask of the concatenation, bit for bit. Every rank computes the
# cases in _rank_main (tie_selection); the tests below check what it saved.


def tie_cases(world: int) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
    """name -> (rows of each rank [T_r, E] float32, k_E). Deterministic in (world, name)."""
    g = torch.Generator().manual_seed(2000 + world)
    sizes = [11 + 29 * r for r in range(world)]  # uneven T on purpose
    n = sum(sizes)
    cases: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def put(name: str, parts: list[torch.Tensor], k: list[int]) -> None:
        cases[name] = (parts, torch.tensor(k, dtype=torch.int64))

    # 3 distinct values in 6 columns: almost every cutoff falls inside a run of ties
    put("heavy_ties", [torch.randint(-1, 2, (t, 6), generator=g).float() for t in sizes],
        [1, n // 5, n // 3 + 1, n // 2, n - 1, n])  # fmt: skip
    put("all_equal", [torch.full((t, 4), 0.75) for t in sizes], [1, n // 3, n - 2, n])
    zeros = torch.tensor([0.0, -0.0, 1.0])  # -0.0 == +0.0: one run of ties, however the signs fall
    put("signed_zeros", [zeros[torch.randint(0, 3, (t, 3), generator=g)] for t in sizes], [n // 4, n // 2, n - 3])
    # rank 1 holds no rows: the ties of the ranks after it still come after rank 0's
    empty = [torch.randint(0, 2, (0 if r == 1 else 17 + 5 * r, 3), generator=g).float() for r in range(world)]
    m = sum(p.shape[0] for p in empty)
    put("a_rank_with_no_rows", empty, [1, m // 2, m + 4])
    put("k_zero", [torch.zeros(t, 2) for t in sizes], [0, 3])
    # Small k (K = 4): rank 0's 11 ties fill its candidate list (the fused select's one
    # all-gather shows only 4 of them), and in column 0 two larger values on the last rank
    # leave one tie to take, rank 0's first.
    sat = [torch.full((t, 3), 0.5) for t in sizes]
    sat[-1][:2, 0] = 1.0
    put("saturated_ties", sat, [3, 1, 4])
    return cases


def ordered_topk_mask(pool_NE: torch.Tensor, k_E: torch.Tensor) -> torch.Tensor:
    """The definition, written plainly: per expert, the first min(k, N) tokens sorted by
    value (largest first), ties in token order."""
    N, E = pool_NE.shape
    mask = torch.zeros(N, E, dtype=torch.bool)
    for e in range(E):
        col = pool_NE[:, e].tolist()
        order = sorted(range(N), key=lambda i: (-col[i], i))
        mask[order[: min(int(k_E[e]), N)], e] = True
    return mask


def guard_router(E: int):
    """An ET router past warm-up with fixed thresholds, chosen so that on 3-valued logits
    (-1, 0, 1) the guard binds in both directions: too many tokens above a threshold of
    -2 (clamped down to ceil(1.2k)), none above 5 (filled up to floor(0.8k))."""
    cfg = RouterConfig(kind="et", top_k=1, et_beta=0.5, et_warmup_steps=0, et_capacity=0.2)
    router = ExpertThresholdRouter(d_model=4, n_experts=E, cfg=cfg)
    thresholds_E = torch.tensor([-2.0, 5.0, 0.5, -0.5, 0.0, 1.0])[:E]
    router.ema_E.copy_(thresholds_E * (1 - cfg.et_beta))  # one update: c = ema / (1 - beta)
    router.n_updates.fill_(1)
    return router


def tie_selection(rank: int, world: int, pool: PoolOps) -> dict[str, torch.Tensor]:
    """On each rank: the distributed mask of every tie case, its k-th values, and ET's guarded
    mask on the heavy-tie rows."""
    out: dict[str, torch.Tensor] = {}
    for name, (parts, k_E) in tie_cases(world).items():
        out[f"ties/{name}/mask"], out[f"ties/{name}/counts"] = pool_topk_mask_counts(parts[rank], k_E, pool)
        out[f"ties/{name}/kth"] = pool.kth_largest(parts[rank], k_E)
    parts, _ = tie_cases(world)["heavy_ties"]
    router = guard_router(parts[rank].shape[1])
    router.attach(pool)
    out["guard/mask"], out["guard/N"], out["guard/counts"] = router.guarded_mask(parts[rank])
    return out


def test_exact_k_selection_breaks_ties_by_global_token_order(world_results):
    world, results = world_results
    for name, (parts, k_E) in tie_cases(world).items():
        pool_NE = torch.cat(parts)
        N = pool_NE.shape[0]
        want = ordered_topk_mask(pool_NE, k_E)
        # The single-process mask is the definition (exactly min(k, N) per expert, ties in
        # token order), and the ranks' masks put together are that mask.
        assert torch.equal(pool_topk_mask(pool_NE, k_E, PoolOps()), want), name
        assert torch.equal(want.sum(0), k_E.clamp(max=N)), name
        kth = topk_reference(parts, k_E)
        for prefix in ("", "fused/"):  # radix select + count exchange; candidates (one all-gather)
            got = torch.cat([res[f"{prefix}ties/{name}/mask"] for res in results])
            assert torch.equal(got, want), (prefix, name, (got != want).nonzero().tolist()[:5])
            # Every rank knows every rank's count per expert (the dispatcher's split sizes
            # without a counts exchange), hidden ties of the candidate lists included.
            per_rank_WE = torch.stack([res[f"{prefix}ties/{name}/mask"].sum(0) for res in results])
            for res in results:
                assert torch.equal(res[f"{prefix}ties/{name}/counts"], per_rank_WE), (prefix, name)
            for res in results:
                assert torch.equal(canon_bits(res[f"{prefix}ties/{name}/kth"]), canon_bits(kth)), (prefix, name)


def test_et_capacity_guard_across_ranks_is_the_single_process_guard(world_results):
    world, results = world_results
    parts, _ = tie_cases(world)["heavy_ties"]
    pool_NE = torch.cat(parts)
    N, E = pool_NE.shape
    router = guard_router(E)
    want, n, counts_1E = router.guarded_mask(pool_NE)
    assert n == N and all(res["guard/N"] == N for res in results)
    assert torch.equal(counts_1E, want.sum(0, keepdim=True))
    lo, hi = guard_bounds(router.capacity(N), router.cfg.et_capacity, N)
    above_E = router.above_threshold(pool_NE).sum(0)
    # The case is built so that the guard binds both ways (else this test would not test it).
    assert int(above_E[0]) > hi and int(above_E[1]) < lo, (above_E, lo, hi)
    assert torch.equal(want.sum(0), above_E.clamp(lo, hi))
    assert torch.equal(want[:, :2], ordered_topk_mask(pool_NE[:, :2], torch.tensor([hi, lo])))
    for prefix in ("", "fused/"):
        got = torch.cat([res[f"{prefix}guard/mask"] for res in results])
        assert torch.equal(got, want), (prefix, (got != want).nonzero().tolist()[:5])
        # clamped columns from the selection's per-rank counts, the others from the guard's gather
        per_rank_WE = torch.stack([res[f"{prefix}guard/mask"].sum(0) for res in results])
        assert all(torch.equal(res[f"{prefix}guard/counts"], per_rank_WE) for res in results), prefix

"""Global pool statistics over real gloo process groups (2 and 4 processes, loopback only).

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

from moedist.routing.base import PoolOps

LOOPBACK = "127.0.0.1"
WORLDS = (2, 4)
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
        for name, (parts, k_E) in make_cases(world).items():
            x_TE = parts[rank]
            res[f"{name}/radix"] = radix.kth_largest(x_TE, k_E)
            res[f"{name}/radix_torch"] = radix_kth_largest(x_TE, k_E, backend="torch")
            res[f"{name}/allgather"] = gather.kth_largest(x_TE, k_E)

        # NaN on the last rank only: every rank must raise, and the group must stay usable.
        for label, ops in (("radix", radix), ("allgather", gather)):
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
        for method in ("radix", "radix_torch", "allgather"):
            got = res[f"{name}/{method}"]
            assert got.dtype == torch.float32 and got.shape == k_E.shape
            assert torch.equal(canon_bits(got), canon_bits(want)), (res["rank"], method, got, want)
        # Every rank holds the same cutoff bit for bit (the EMA needs no further sync).
        assert torch.equal(res[f"{name}/radix"].view(torch.int32), first.view(torch.int32))


def test_nan_on_one_rank_raises_on_every_rank(world_results):
    world, results = world_results
    for res in results:
        assert res["nan/radix"].startswith("ValueError") and "NaN" in res["nan/radix"], res["nan/radix"]
        assert f"rank(s) [{world - 1}]" in res["nan/radix"]
        assert res["nan/allgather"].startswith("ValueError"), res["nan/allgather"]
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

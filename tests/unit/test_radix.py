"""Radix-select kernels and the single-process radix_kth_largest.

Legend: T tokens (rows), E experts (columns), B = 256 buckets of one 8-bit digit.
Oracles: float order (torch.sort) for the keys, the torch fallback for the numba histogram,
PoolOps().kth_largest (torch.topk) for the select.
"""

from __future__ import annotations

import math

import pytest
import torch

from moedist.kernels.radix import N_BUCKETS, N_ROUNDS, RadixCounter, float_to_key, key_to_float, radix_histogram
from moedist.parallel.pool import DistributedPoolOps, radix_kth_largest, threshold_sync_bytes
from moedist.routing.base import PoolOps

INF = float("inf")
F32 = torch.finfo(torch.float32)
DENORM_MIN = 2.0**-149  # smallest positive float32 denormal
DENORM_MAX = F32.tiny - DENORM_MIN  # largest float32 denormal

# Every special region of float32, in increasing order (-0.0 and +0.0 are equal).
EDGE_SORTED = [
    -INF, -F32.max, -1.0e30, -1.0, -F32.tiny, -DENORM_MAX, -1.0e-40, -DENORM_MIN, -0.0, 0.0,
    DENORM_MIN, 1.0e-40, DENORM_MAX, F32.tiny, 1.0, 1.0e30, F32.max, INF,
]  # fmt: skip


def canon_bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns with -0.0 folded into +0.0 (topk may return either zero; radix returns +0.0)."""
    x = x.float()
    return torch.where(x == 0, torch.zeros_like(x), x).view(torch.int32)


def random_bit_floats(n: int, seed: int) -> torch.Tensor:
    """Floats with uniformly random bit patterns (every exponent, denormals, +-inf), NaN removed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return x[~torch.isnan(x)]


def test_edge_values_are_really_what_they_claim():
    x = torch.tensor(EDGE_SORTED, dtype=torch.float32)
    assert x[10].item() == DENORM_MIN and 0 < x[12].item() < F32.tiny  # denormals survived the tensor
    assert math.copysign(1.0, x[8].item()) == -1.0


# ----------------------------------------------------------------------------- keys


def test_key_order_matches_float_order_on_edges():
    x = torch.tensor(EDGE_SORTED, dtype=torch.float32)
    key = float_to_key(x)
    assert key.dtype == torch.int64
    assert bool((key >= 0).all()) and bool((key < 2**32).all())
    diff = key[1:] - key[:-1]
    zero_pair = 8  # (-0.0, +0.0) share a key
    assert diff[zero_pair] == 0
    assert bool((torch.cat([diff[:zero_pair], diff[zero_pair + 1 :]]) > 0).all())
    # -inf and +inf are the extreme non-NaN keys.
    assert key[0] == 0x007FFFFF and key[-1] == 0xFF800000


def test_key_order_matches_float_order_on_random_bits():
    x = random_bit_floats(200_000, seed=1)
    x = torch.cat([x, torch.tensor(EDGE_SORTED, dtype=torch.float32)])
    xs = torch.sort(x).values
    ks = float_to_key(xs)
    assert bool((ks[1:] >= ks[:-1]).all()), "keys of sorted floats are not sorted"
    # Equal keys exactly where the floats are equal (ties and the two zeros).
    assert torch.equal(ks[1:] == ks[:-1], xs[1:] == xs[:-1])
    # Pairwise: sign of the comparison is the same.
    g = torch.Generator().manual_seed(2)
    i, j = torch.randint(0, x.numel(), (2, 100_000), generator=g)
    kx = float_to_key(x)
    assert torch.equal(x[i] < x[j], kx[i] < kx[j])


def test_key_roundtrip_is_bitwise_except_negative_zero():
    x = torch.cat([random_bit_floats(100_000, seed=3), torch.tensor(EDGE_SORTED, dtype=torch.float32)])
    back = key_to_float(float_to_key(x))
    assert back.dtype == torch.float32
    assert torch.equal(back.view(torch.int32), canon_bits(x))
    assert key_to_float(float_to_key(torch.tensor([-0.0]))).view(torch.int32).item() == 0  # +0.0


def test_float_to_key_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        float_to_key(torch.zeros(3, dtype=torch.float64))


# ----------------------------------------------------------------------------- histograms


def _hist_reference(values_TE: torch.Tensor, prefix_E: torch.Tensor, round_idx: int) -> torch.Tensor:
    """Dense loop over experts with a different formulation (bincount per column)."""
    shift = 8 * (N_ROUNDS - 1 - round_idx)
    key_TE = float_to_key(values_TE)
    out = torch.zeros(values_TE.shape[1], N_BUCKETS, dtype=torch.int64)
    for e in range(values_TE.shape[1]):
        col = key_TE[:, e]
        col = col[(col >> (shift + 8)) == prefix_E[e]]
        out[e] = torch.bincount((col >> shift) & 255, minlength=N_BUCKETS)
    return out


def _hist_inputs() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    edge = torch.tensor(EDGE_SORTED, dtype=torch.float32)
    return [
        ("randn", torch.randn(500, 7, generator=g)),
        ("random_bits", random_bit_floats(4000, seed=5)[:3000].view(600, 5)),
        ("edges", edge[torch.randint(0, edge.numel(), (300, 4), generator=g)]),
        ("ties", torch.randint(-2, 3, (400, 3), generator=g).float()),
        ("parallel_chunks", torch.randn(20_000, 4, generator=g)),  # T * E >= 2^16: chunked kernel
        ("one_row", torch.randn(1, 6, generator=g)),
        ("no_rows", torch.zeros(0, 3)),
    ]


HIST_INPUTS = _hist_inputs()


@pytest.mark.parametrize(("name", "values_TE"), HIST_INPUTS, ids=[n for n, _ in HIST_INPUTS])
def test_numba_histogram_equals_torch_fallback(name, values_TE):
    T, E = values_TE.shape
    g = torch.Generator().manual_seed(6)
    numba_c, torch_c = RadixCounter(values_TE, "numba"), RadixCounter(values_TE, "torch")
    assert numba_c.use_numba and not torch_c.use_numba
    key_TE = float_to_key(values_TE)
    for r in range(N_ROUNDS):
        hi = 32 - 8 * r
        # Prefixes that occur (taken from a random row) and prefixes that do not (random).
        row = torch.randint(0, max(T, 1), (1,), generator=g).item()
        present_E = key_TE[row] >> hi if T > 0 else torch.zeros(E, dtype=torch.int64)
        random_E = torch.randint(0, 2 ** (32 - hi) if hi < 32 else 1, (E,), generator=g)
        for prefix_E in (present_E, random_E):
            h_nb, h_t = numba_c.histogram(prefix_E, r), torch_c.histogram(prefix_E, r)
            assert h_nb.dtype == h_t.dtype == torch.int64 and h_nb.shape == (E, N_BUCKETS)
            assert torch.equal(h_nb, h_t), (name, r)
            assert torch.equal(h_t, _hist_reference(values_TE, prefix_E, r)), (name, r)
    if T > 0:
        assert torch.equal(radix_histogram(values_TE, torch.zeros(E, dtype=torch.int64), 0).sum(1), torch.full((E,), T))


def test_histogram_rejects_bad_input():
    with pytest.raises(TypeError, match="float32"):
        RadixCounter(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        RadixCounter(torch.zeros(3))
    with pytest.raises(ValueError, match="backend"):
        RadixCounter(torch.zeros(3, 2), "cuda")
    with pytest.raises(ValueError, match="round_idx"):
        RadixCounter(torch.zeros(3, 2)).histogram(torch.zeros(2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="prefix_E"):
        RadixCounter(torch.zeros(3, 2)).histogram(torch.zeros(3, dtype=torch.int64), 0)


# ----------------------------------------------------------------------------- single-process select


def _select_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    edge = torch.tensor(EDGE_SORTED, dtype=torch.float32)
    inf_mix = torch.randn(50, 4, generator=g)
    inf_mix[::3, 0] = INF
    inf_mix[1::4, 1] = -INF
    inf_mix[:, 2] = -INF
    inf_mix[:, 3] = INF
    denorm = torch.tensor([DENORM_MIN, -DENORM_MIN, DENORM_MAX, -DENORM_MAX, 1e-40, -1e-40, 0.0, -0.0])
    cases = [
        ("randn", torch.randn(300, 6, generator=g), torch.tensor([1, 2, 37, 150, 299, 300])),
        ("heavy_ties", torch.randint(-2, 3, (200, 5), generator=g).float(), torch.tensor([1, 40, 41, 120, 200])),
        ("all_equal", torch.full((64, 3), 1.5), torch.tensor([1, 30, 64])),
        ("plus_minus_inf", inf_mix, torch.tensor([17, 20, 1, 50])),
        ("denormals", denorm[torch.randint(0, 8, (80, 4), generator=g)], torch.tensor([1, 20, 40, 80])),
        ("edges", edge[torch.randint(0, edge.numel(), (90, 3), generator=g)], torch.tensor([5, 45, 89])),
        ("random_bits", random_bit_floats(3000, seed=8)[:2000].view(500, 4), torch.tensor([1, 7, 250, 500])),
        ("k_zero_and_beyond_N", torch.randn(20, 4, generator=g), torch.tensor([0, 20, 21, 10**9])),
        ("no_rows", torch.zeros(0, 3), torch.tensor([0, 1, 5])),
        ("large_chunked", torch.randn(20_000, 4, generator=g), torch.tensor([1, 1250, 19_999, 20_000])),
    ]
    return cases


SELECT_CASES = _select_cases()


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize(("name", "values_TE", "k_E"), SELECT_CASES, ids=[c[0] for c in SELECT_CASES])
def test_radix_kth_largest_equals_pool_ops(backend, name, values_TE, k_E):
    got = radix_kth_largest(values_TE, k_E, backend=backend)
    want = PoolOps().kth_largest(values_TE, k_E)
    assert got.dtype == torch.float32 and got.shape == k_E.shape
    assert torch.equal(canon_bits(got), canon_bits(want)), (got, want)
    # A selected zero is +0.0 (deterministic across ranks and backends).
    assert not bool(((got == 0) & torch.signbit(got)).any())


def test_selected_zero_is_positive_zero_even_if_only_negative_zeros():
    got = radix_kth_largest(torch.full((4, 2), -0.0), torch.tensor([1, 4]))
    assert got.view(torch.int32).tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_selects_exactly(dtype):
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(9)).to(dtype)
    k = torch.tensor([1, 77, 200])
    got = radix_kth_largest(x, k)
    assert got.dtype == dtype
    assert torch.equal(got, PoolOps().kth_largest(x, k))


def test_radix_rejects_nan_float64_and_bad_shapes():
    x = torch.randn(10, 3)
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        radix_kth_largest(x, torch.tensor([1, 1, 1]))
    with pytest.raises(TypeError, match="float64"):
        radix_kth_largest(torch.zeros(4, 2, dtype=torch.float64), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="k_E"):
        radix_kth_largest(torch.zeros(4, 2), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="2-D"):
        radix_kth_largest(torch.zeros(4), torch.tensor([1]))


def test_int64_count_retry_gives_the_same_answer(monkeypatch):
    """Ranks with >= 2^31 / W rows make every rank redo the select in int64 counts."""
    import moedist.parallel.pool as thr

    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(11))
    k = torch.tensor([1, 250, 500])
    dtypes = []
    select = thr._radix_select

    def spy(*args):
        dtypes.append(args[-1])
        return select(*args)

    monkeypatch.setattr(thr, "_INT32_LIMIT", 100)
    monkeypatch.setattr(thr, "_radix_select", spy)
    assert torch.equal(radix_kth_largest(x, k), PoolOps().kth_largest(x, k))
    assert dtypes == [torch.int32, torch.int64]


def test_no_experts():
    assert radix_kth_largest(torch.zeros(5, 0), torch.zeros(0, dtype=torch.int64)).shape == (0,)


def test_distributed_pool_ops_without_a_group_is_the_local_pool():
    ops, ref = DistributedPoolOps(), PoolOps()
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(10))
    k = torch.tensor([0, 1, 15, 30])
    assert ops.total(30) == 30
    assert torch.equal(ops.sum(x), x)
    assert torch.equal(ops.exclusive_prefix(torch.tensor([3, 1])), torch.zeros(2, dtype=torch.int64))
    assert torch.equal(ops.kth_largest(x, k), ref.kth_largest(x, k))


def test_threshold_sync_bytes():
    b = threshold_sync_bytes(16, [65536, 65536])
    assert b["radix"] == (4 * 16 * 256 + 3) * 4
    assert b["allgather"] == 2 * 8 + 131072 * 16 * 4
    assert b["radix"] / b["allgather"] < 0.01
    # Uneven ranks pad to the largest T.
    assert threshold_sync_bytes(2, [10, 0, 3])["allgather"] == 3 * 8 + 3 * 10 * 2 * 4

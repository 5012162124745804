"""Dispatch kernels: numba == torch fallback == an independent dense reference.

Legend: T tokens, A assignments ((token, expert) pairs), D model width, E experts.
The dense references build the one-hot matrix S_TA (S[t, a] = 1 iff token_idx_A[a] == t), so
combine is y = S @ (w * out) and gather's backward is S @ g: no indexing code shared with
the kernels under test.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moedist.kernels.dispatch import combine, gather_rows, inverse_permutation, sort_by_expert, unique_pairs

BACKENDS = ["numba", "torch"]


def _onehot_TA(token_idx_A: torch.Tensor, n_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(n_tokens)[:, None] == token_idx_A[None, :]).to(dtype)


# Token index patterns for combine / gather: (name, n_tokens, token_idx_A).
def _token_cases() -> list[tuple[str, int, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    several = torch.randint(0, 13, (40,), generator=g)  # ~3 per token, some tokens unused
    several[several == 5] = 6  # make sure token 5 has no assignment
    return [
        ("several_per_token", 13, several),
        ("permutation", 9, torch.randperm(9, generator=g)),
        ("all_to_one_token", 6, torch.full((7,), 4)),
        ("no_assignments", 5, torch.zeros(0, dtype=torch.int64)),
        ("no_tokens", 0, torch.zeros(0, dtype=torch.int64)),
    ]


TOKEN_CASES = _token_cases()
TOKEN_IDS = [c[0] for c in TOKEN_CASES]


# ----------------------------------------------------------------------------- sort_by_expert


def _check_sorted(expert_idx_A: torch.Tensor, n_experts: int, order_A, counts_E) -> None:
    A = expert_idx_A.shape[0]
    assert order_A.dtype == torch.int64 and counts_E.dtype == torch.int64
    assert counts_E.shape == (n_experts,)
    assert torch.equal(torch.sort(order_A).values, torch.arange(A)), "order_A is not a permutation"
    sorted_A = expert_idx_A[order_A]
    assert bool((sorted_A[1:] >= sorted_A[:-1]).all()), "not sorted by expert"
    # Stability: within one expert's segment the original positions increase.
    same = sorted_A[1:] == sorted_A[:-1]
    assert bool((order_A[1:][same] > order_A[:-1][same]).all()), "sort is not stable"
    assert torch.equal(counts_E, torch.bincount(expert_idx_A.long(), minlength=n_experts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("name", "n_experts", "expert_idx_A"),
    [
        ("random", 7, torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(1))),
        ("empty_experts", 10, torch.tensor([5, 2, 2, 5, 9, 2, 5])),
        ("all_to_one_expert", 4, torch.full((9,), 3)),
        ("no_assignments", 6, torch.zeros(0, dtype=torch.int64)),
        ("int32_input", 3, torch.tensor([2, 0, 1, 0, 2], dtype=torch.int32)),
    ],
)
def test_sort_by_expert(backend, name, n_experts, expert_idx_A):
    order_A, counts_E = sort_by_expert(expert_idx_A, n_experts, backend=backend)
    _check_sorted(expert_idx_A, n_experts, order_A, counts_E)


def test_sort_by_expert_backends_agree_exactly():
    expert_idx_A = torch.randint(0, 16, (3000,), generator=torch.Generator().manual_seed(2))
    order_nb, counts_nb = sort_by_expert(expert_idx_A, 16, backend="numba")
    order_t, counts_t = sort_by_expert(expert_idx_A, 16, backend="torch")
    assert torch.equal(order_nb, order_t)
    assert torch.equal(counts_nb, counts_t)
    assert torch.equal(sort_by_expert(expert_idx_A, 16)[0], order_nb)  # "auto"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 4])
def test_sort_by_expert_rejects_out_of_range(backend, bad):
    with pytest.raises(IndexError, match=r"expert_idx_A\[2\]"):
        sort_by_expert(torch.tensor([0, 3, bad, 1]), 4, backend=backend)


def test_bad_backend_and_arguments():
    with pytest.raises(ValueError, match="backend"):
        sort_by_expert(torch.tensor([0]), 1, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_experts"):
        sort_by_expert(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="expert_idx_A"):
        sort_by_expert(torch.tensor([0.0]), 2)


def test_inverse_permutation():
    order_A = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    inv_A = inverse_permutation(order_A)
    assert torch.equal(inv_A[order_A], torch.arange(50))
    x = torch.randn(50, 3)
    assert torch.equal(x[order_A][inv_A], x)
    assert inverse_permutation(torch.zeros(0, dtype=torch.int64)).shape == (0,)


def test_unique_pairs_against_python_sets():
    g = torch.Generator().manual_seed(4)
    T, G = 9, 3
    token_A = torch.randint(0, T, (40,), generator=g)
    group_A = torch.randint(0, G, (40,), generator=g)
    u_A, token_U, counts_G = unique_pairs(token_A, group_A, T, G)
    pairs = sorted({(int(gr), int(t)) for t, gr in zip(token_A, group_A, strict=True)})  # group-major, then token
    assert token_U.tolist() == [t for _, t in pairs]
    assert counts_G.tolist() == [sum(gr == k for gr, _ in pairs) for k in range(G)]
    assert [pairs[u] for u in u_A.tolist()] == [(int(gr), int(t)) for t, gr in zip(token_A, group_A, strict=True)]
    empty = torch.zeros(0, dtype=torch.int64)
    u_A, token_U, counts_G = unique_pairs(empty, empty, 0, 2)
    assert u_A.numel() == token_U.numel() == 0 and counts_G.tolist() == [0, 0]


# ----------------------------------------------------------------------------- combine


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "n_tokens", "token_idx_A"), TOKEN_CASES, ids=TOKEN_IDS)
def test_combine_forward_backward(name, n_tokens, token_idx_A, dtype):
    A, D = token_idx_A.shape[0], 6
    g = torch.Generator().manual_seed(4)
    out_AD = torch.randn(A, D, generator=g, dtype=dtype)
    weight_A = torch.rand(A, generator=g, dtype=dtype)
    grad_TD = torch.randn(n_tokens, D, generator=g, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}

    results = {}
    for backend in [*BACKENDS, "reference"]:
        o = out_AD.clone().requires_grad_()
        w = weight_A.clone().requires_grad_()
        if backend == "reference":
            y = _onehot_TA(token_idx_A, n_tokens, dtype) @ (w[:, None] * o)
        else:
            y = combine(o, w, token_idx_A, n_tokens, backend=backend)
        y.backward(grad_TD)
        results[backend] = (y.detach(), o.grad, w.grad)

    ref_y, ref_go, ref_gw = results["reference"]
    for backend in BACKENDS:
        y, go, gw = results[backend]
        assert y.dtype == dtype and y.shape == (n_tokens, D)
        assert_close(y, ref_y, **tol, msg=f"{backend} forward")
        assert_close(go, ref_go, **tol, msg=f"{backend} grad out_AD")
        assert_close(gw, ref_gw, **tol, msg=f"{backend} grad weight_A")
    unused = torch.ones(n_tokens, dtype=torch.bool)
    unused[token_idx_A] = False
    for backend in BACKENDS:
        assert bool((results[backend][0][unused] == 0).all()), "unassigned tokens must get zeros"


def test_combine_sums_several_assignments_of_one_token():
    out_AD = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    weight_A = torch.tensor([0.5, 2.0, 1.0])
    for backend in BACKENDS:
        y = combine(out_AD, weight_A, torch.tensor([1, 1, 0]), 3, backend=backend)
        assert_close(y, torch.tensor([[100.0, 200.0], [20.5, 41.0], [0.0, 0.0]]))


def test_combine_non_contiguous_and_partial_grads():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 10, generator=g, dtype=torch.float64)
    out_AD = base.t().requires_grad_()  # [10, 4], non-contiguous
    assert not out_AD.is_contiguous()
    weight_A = torch.rand(10, generator=g, dtype=torch.float64)  # no grad wanted
    token_idx_A = torch.randint(0, 5, (10,), generator=g)
    ys = []
    for backend in BACKENDS:
        y = combine(out_AD, weight_A, token_idx_A, 5, backend=backend)
        (gout,) = torch.autograd.grad(y, out_AD, torch.ones_like(y))
        ys.append((y, gout))
    assert_close(ys[0][0], ys[1][0])
    assert_close(ys[0][1], ys[1][1])
    assert_close(ys[0][1], weight_A[:, None].expand(10, 4))


def test_combine_bfloat16_and_dtype_promotion():
    g = torch.Generator().manual_seed(6)
    out_AD = torch.randn(12, 8, generator=g).to(torch.bfloat16).requires_grad_()
    token_idx_A = torch.randint(0, 5, (12,), generator=g)
    weight_bf = torch.rand(12, generator=g).to(torch.bfloat16).requires_grad_()
    y = combine(out_AD, weight_bf, token_idx_A, 5)  # auto -> torch path for bf16
    assert y.dtype == torch.bfloat16
    ref = _onehot_TA(token_idx_A, 5, torch.float64) @ (weight_bf.double()[:, None] * out_AD.double())
    assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    y.sum().backward()
    assert out_AD.grad.dtype == torch.bfloat16 and weight_bf.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="numba"):
        combine(out_AD, weight_bf, token_idx_A, 5, backend="numba")

    # bf16 rows with float32 weights are summed in float32 (type promotion), numba included.
    weight_f32 = torch.rand(12, generator=g).requires_grad_()
    y32 = combine(out_AD, weight_f32, token_idx_A, 5, backend="numba")
    assert y32.dtype == torch.float32
    y32.sum().backward()
    assert weight_f32.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_rejects_bad_input(backend):
    out_AD, weight_A = torch.randn(3, 2), torch.rand(3)
    # numba checks indices itself (it would write out of bounds); torch's index_add_ raises.
    with pytest.raises(IndexError if backend == "numba" else RuntimeError, match="out of"):
        combine(out_AD, weight_A, torch.tensor([0, 3, 1]), 3, backend=backend)
    with pytest.raises(ValueError, match="weight_A"):
        combine(out_AD, torch.rand(2), torch.tensor([0, 1, 1]), 3, backend=backend)
    with pytest.raises(ValueError, match="token_idx_A"):
        combine(out_AD, weight_A, torch.tensor([0, 1]), 3, backend=backend)


# ----------------------------------------------------------------------------- gather_rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "n_tokens", "idx_A"), TOKEN_CASES, ids=TOKEN_IDS)
def test_gather_rows_forward_backward(name, n_tokens, idx_A, dtype):
    A, D = idx_A.shape[0], 5
    g = torch.Generator().manual_seed(7)
    x_TD = torch.randn(n_tokens, D, generator=g, dtype=dtype)
    grad_AD = torch.randn(A, D, generator=g, dtype=dtype)
    ref_grad_TD = _onehot_TA(idx_A, n_tokens, dtype) @ grad_AD
    for backend in BACKENDS:
        x = x_TD.clone().requires_grad_()
        x_AD = gather_rows(x, idx_A, backend=backend)
        assert torch.equal(x_AD, x_TD[idx_A])
        assert x_AD.is_contiguous()
        x_AD.backward(grad_AD)
        assert_close(x.grad, ref_grad_TD, msg=f"{backend} grad x_TD")


def test_gather_rows_bfloat16_takes_torch_path():
    x = torch.randn(6, 4).to(torch.bfloat16).requires_grad_()
    idx_A = torch.tensor([5, 0, 5, 2])
    gather_rows(x, idx_A).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert_close(x.grad[:, 0].float(), torch.tensor([1.0, 0, 1, 0, 0, 2]))
    with pytest.raises(ValueError, match="numba"):
        gather_rows(x, idx_A, backend="numba")


@pytest.mark.gpu
def test_cuda_torch_path_matches_cpu_numba():
    g = torch.Generator().manual_seed(8)
    T, A, D, E = 20, 50, 7, 5
    expert_idx_A = torch.randint(0, E, (A,), generator=g)
    token_idx_A = torch.randint(0, T, (A,), generator=g)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    weight_A = torch.rand(A, generator=g, dtype=torch.float64)
    grad_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    results = []
    for device in ["cpu", "cuda"]:
        order_A, counts_E = sort_by_expert(expert_idx_A.to(device), E)
        assert order_A.device.type == device and counts_E.device.type == device
        token_A = token_idx_A.to(device)[order_A]
        x = x_TD.clone().to(device).requires_grad_()
        w = weight_A.clone().to(device).requires_grad_()
        y = combine(2 * gather_rows(x, token_A), w[order_A], token_A, T)
        y.backward(grad_TD.to(device))
        results.append([t.cpu() for t in (order_A, counts_E, y.detach(), x.grad, w.grad)])
    for cpu, cuda in zip(*results, strict=True):
        assert_close(cuda, cpu)

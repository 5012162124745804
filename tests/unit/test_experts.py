"""GroupedExperts (hand-written backward) == plain autograd; 1-expert MoE == dense FFN.

Legend: T tokens, A assignments ((token, expert) pairs), D model width, F expert width,
E experts.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moedist.kernels.dispatch import combine, gather_rows, sort_by_expert
from moedist.model.experts import DenseMLP, GroupedExperts, expert_mlp_reference

ACTIVATIONS = ["relu2", "swiglu"]
D, F = 6, 10
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _experts(n_experts: int, activation: str, seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    # Large std so the activations are far from linear and every term of the grads matters.
    return GroupedExperts(n_experts, D, F, activation, init_std=0.5, out_std=0.5, dtype=torch.float64)


def _weights(m: GroupedExperts) -> list[torch.Tensor]:
    return [m.w1_EDF, m.w2_EFD] + ([m.w3_EDF] if m.w3_EDF is not None else [])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "counts",
    [[3, 0, 7, 1, 0], [0, 12, 0], [9], [0, 0, 0], [4, 4, 4, 4]],
    ids=["empty_experts", "all_to_one", "one_expert", "no_rows", "balanced"],
)
def test_grouped_matches_autograd_reference(activation, counts):
    m = _experts(len(counts), activation)
    A = sum(counts)
    g = torch.Generator().manual_seed(1)
    x_AD = torch.randn(A, D, generator=g, dtype=torch.float64, requires_grad=True)
    grad_AD = torch.randn(A, D, generator=g, dtype=torch.float64)
    inputs = [x_AD, *_weights(m)]

    out = m(x_AD, torch.tensor(counts))
    grads = torch.autograd.grad(out, inputs, grad_AD)
    ref = expert_mlp_reference(x_AD, counts, m.w1_EDF, m.w2_EFD, m.w3_EDF, activation)
    ref_grads = torch.autograd.grad(ref, inputs, grad_AD)

    assert out.shape == (A, D)
    assert_close(out, ref, **TIGHT)
    for name, got, want in zip(["x", "w1", "w2", "w3"], grads, ref_grads, strict=False):
        assert_close(got, want, **TIGHT, msg=f"grad {name}")
    for e, c in enumerate(counts):
        if c == 0:  # an expert with no rows gets exactly zero grads
            assert all(bool((gw[e] == 0).all()) for gw in grads[1:])
        else:
            assert all(bool((gw[e] != 0).any()) for gw in grads[1:])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_partial_grads(activation):
    counts = [2, 0, 5]
    m = _experts(3, activation)
    x_AD = torch.randn(7, D, dtype=torch.float64)
    # x needs no grad (e.g. first layer): the weight grads are still right.
    weights = _weights(m)
    got = torch.autograd.grad(m(x_AD, counts).sum(), weights)
    ref = expert_mlp_reference(x_AD, counts, m.w1_EDF, m.w2_EFD, m.w3_EDF, activation)
    want = torch.autograd.grad(ref.sum(), weights)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, **TIGHT)
    # Frozen weights: only x gets a grad.
    for w in weights:
        w.requires_grad_(False)
    x = x_AD.clone().requires_grad_()
    (gx,) = torch.autograd.grad(m(x, counts).sum(), x)
    ref = expert_mlp_reference(x, counts, m.w1_EDF, m.w2_EFD, m.w3_EDF, activation)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x)
    assert_close(gx, gx_ref, **TIGHT)


def test_grouped_rejects_bad_counts_and_dtype():
    m = _experts(3, "relu2")
    x_AD = torch.randn(5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="sum to the 5 rows"):
        m(x_AD, [2, 2, 2])
    with pytest.raises(ValueError, match="n_experts=3"):
        m(x_AD, [5, 0])
    with pytest.raises(TypeError, match="float32"):
        m(x_AD.float(), [5, 0, 0])
    with pytest.raises(ValueError, match="activation"):
        GroupedExperts(2, D, F, "gelu")  # type: ignore[arg-type]


def test_init_stds():
    m = GroupedExperts(4, 64, 128, "swiglu", init_std=0.1, out_std=0.01)
    assert m.w1_EDF.shape == (4, 64, 128) and m.w2_EFD.shape == (4, 128, 64)
    assert m.w3_EDF.shape == (4, 64, 128)
    assert abs(m.w1_EDF.std().item() - 0.1) < 0.005
    assert abs(m.w3_EDF.std().item() - 0.1) < 0.005
    assert abs(m.w2_EFD.std().item() - 0.01) < 0.0005
    assert GroupedExperts(2, 4, 8, "relu2").w3_EDF is None
    dense = DenseMLP(64, 128, "relu2", init_std=0.1, out_std=0.01)
    assert abs(dense.fc1.weight.std().item() - 0.1) < 0.005
    assert abs(dense.fc2.weight.std().item() - 0.01) < 0.0005


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_expert_equals_dense_mlp(activation):
    torch.manual_seed(2)
    dense = DenseMLP(D, F, activation, init_std=0.5, out_std=0.5, dtype=torch.float64)
    m = _experts(1, activation, seed=3)
    m.load_from_dense(0, dense)
    x = torch.randn(9, D, dtype=torch.float64, requires_grad=True)
    y_dense = dense(x)
    y_grouped = m(x, [9])
    assert_close(y_grouped, y_dense, **TIGHT)
    g = torch.randn_like(y_dense)
    gx_d, *gw_d = torch.autograd.grad(y_dense, [x, *(p for p in dense.parameters())], g)
    gx_g, *gw_g = torch.autograd.grad(y_grouped, [x, *_weights(m)], g)
    assert_close(gx_g, gx_d, **TIGHT)
    for a, b in zip(gw_g, gw_d, strict=True):  # Linear stores [out, in], experts [in, out]
        assert_close(a[0], b.t(), **TIGHT)


def test_load_from_dense_into_one_of_several_experts():
    dense = DenseMLP(D, F, "swiglu", init_std=0.5, out_std=0.5, dtype=torch.float64)
    m = _experts(4, "swiglu")
    before = m.w1_EDF[1].clone()
    m.load_from_dense(2, dense)
    x = torch.randn(6, D, dtype=torch.float64)
    out = m(x, [1, 2, 3, 0])
    assert_close(out[3:6], dense(x[3:6]), **TIGHT)  # expert 2's segment
    assert torch.equal(m.w1_EDF[1], before)
    with pytest.raises(ValueError, match="does not fit"):
        m.load_from_dense(0, DenseMLP(D, F, "relu2", dtype=torch.float64))
    with pytest.raises(IndexError):
        m.load_from_dense(4, dense)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_expert_moe_pipeline_equals_dense(activation, backend):
    """sort -> gather -> GroupedExperts -> combine with gate weight 1 == the dense FFN."""
    torch.manual_seed(4)
    T = 11
    dense = DenseMLP(D, F, activation, init_std=0.5, out_std=0.5, dtype=torch.float64)
    m = _experts(1, activation)
    m.load_from_dense(0, dense)
    x_TD = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    token_idx_A = torch.randperm(T)  # plan order need not be token order
    expert_idx_A = torch.zeros(T, dtype=torch.int64)
    order_A, counts_E = sort_by_expert(expert_idx_A, 1, backend=backend)
    token_A = token_idx_A[order_A]
    x_AD = gather_rows(x_TD, token_A, backend=backend)
    y_TD = combine(m(x_AD, counts_E), torch.ones(T, dtype=torch.float64), token_A, T, backend)
    y_ref = dense(x_TD)
    assert_close(y_TD, y_ref, **TIGHT)
    g = torch.randn(T, D, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y_TD, x_TD, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x_TD, g)
    assert_close(gx, gx_ref, **TIGHT)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autocast_bfloat16(activation):
    torch.manual_seed(5)
    m = GroupedExperts(3, 16, 32, activation, init_std=0.2, out_std=0.2)
    counts = [5, 0, 9]
    x = torch.randn(14, 16)
    ref = expert_mlp_reference(x, counts, m.w1_EDF, m.w2_EFD, m.w3_EDF, activation)
    ref_grads = torch.autograd.grad(ref.sum(), _weights(m))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, counts)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    grads = torch.autograd.grad(out.float().sum(), _weights(m))
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32  # grads reach the float32 parameters
        assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_moe_pipeline_matches_per_assignment_loop(backend):
    """Several experts, 2 assignments per token, some tokens unrouted, one expert unused."""
    torch.manual_seed(6)
    T, E = 10, 4
    m = _experts(E, "swiglu")
    x_TD = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    token_idx_A = torch.tensor([0, 0, 1, 1, 2, 2, 3, 5, 5, 6, 7, 7, 9, 9])
    expert_idx_A = torch.tensor([1, 3, 0, 1, 3, 0, 1, 1, 0, 3, 0, 1, 3, 1])  # expert 2 unused
    weight_A = torch.rand(14, dtype=torch.float64, requires_grad=True)

    order_A, counts_E = sort_by_expert(expert_idx_A, E, backend=backend)
    token_A = token_idx_A[order_A]
    out_AD = m(gather_rows(x_TD, token_A, backend=backend), counts_E)
    y_TD = combine(out_AD, weight_A[order_A], token_A, T, backend=backend)

    rows = [
        weight_A[a]
        * expert_mlp_reference(x_TD[token_idx_A[a]][None], [1], *(w[e][None] for w in _weights(m)), "swiglu")[0]
        for a, e in enumerate(expert_idx_A.tolist())
    ]
    y_ref = torch.zeros(T, D, dtype=torch.float64).index_add(0, token_idx_A, torch.stack(rows))
    assert_close(y_TD, y_ref, **TIGHT)
    assert bool((y_TD[[4, 8]] == 0).all())
    g = torch.randn(T, D, dtype=torch.float64)
    inputs = [x_TD, weight_A, *_weights(m)]
    for got, want in zip(torch.autograd.grad(y_TD, inputs, g), torch.autograd.grad(y_ref, inputs, g), strict=True):
        assert_close(got, want, **TIGHT)


def test_backward_twice_with_retain_graph():
    """The backward must not consume what it saved (retain_graph=True runs it again)."""
    for activation in ACTIVATIONS:
        m = _experts(3, activation)
        x = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
        out = m(x, [3, 0, 5])
        first = torch.autograd.grad(out.sum(), [x, *_weights(m)], retain_graph=True)
        second = torch.autograd.grad(out.sum(), [x, *_weights(m)])
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_cuda_matches_cpu(activation):
    m_cpu = _experts(3, activation)
    m_gpu = _experts(3, activation).cuda()
    m_gpu.load_state_dict(m_cpu.state_dict())
    x = torch.randn(9, D, dtype=torch.float64)
    results = []
    for m, device in [(m_cpu, "cpu"), (m_gpu, "cuda")]:
        xd = x.clone().to(device).requires_grad_()
        out = m(xd, torch.tensor([4, 0, 5], device=device))
        grads = torch.autograd.grad(out.square().sum(), [xd, *_weights(m)])
        results.append([t.cpu() for t in (out.detach(), *grads)])
    for cpu, cuda in zip(*results, strict=True):
        assert_close(cuda, cpu, **TIGHT)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_gathered_equals_split_pipeline(activation):
    """The fused gather -> MLP -> gated scatter pass equals gather / experts / combine,
    forward and every gradient (x, gates, weights); empty expert, unrouted tokens, 2 per token."""
    torch.manual_seed(7)
    T, E = 12, 5
    m = _experts(E, activation)
    x_TD = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    token_idx_A = torch.tensor([0, 0, 1, 2, 2, 3, 5, 5, 6, 8, 8, 9, 11])
    expert_idx_A = torch.tensor([1, 4, 0, 4, 1, 1, 0, 4, 1, 0, 1, 4, 0])  # experts 2 and 3 unused
    gate_A = torch.rand(13, dtype=torch.float64, requires_grad=True)
    order_A, counts_E = sort_by_expert(expert_idx_A, E)
    token_A, g_A = token_idx_A[order_A], gate_A[order_A]
    y_fused = m.forward_gathered(x_TD, token_A, g_A, counts_E)
    y_split = combine(m(gather_rows(x_TD, token_A), counts_E), g_A, token_A, T)
    assert_close(y_fused, y_split, **TIGHT)
    assert bool((y_fused[[4, 7, 10]] == 0).all())
    g = torch.randn(T, D, dtype=torch.float64)
    inputs = [x_TD, gate_A, *_weights(m)]
    got = torch.autograd.grad(y_fused, inputs, g, retain_graph=True)
    want = torch.autograd.grad(y_split, inputs, g)
    for name, a, b in zip(["x", "gate", "w1", "w2", "w3"], got, want, strict=False):
        assert_close(a, b, **TIGHT, msg=name)
    assert bool((got[2][[2, 3]] == 0).all())  # unused experts get zero weight grads


def test_forward_gathered_autocast_accumulates_in_float32():
    torch.manual_seed(8)
    m = GroupedExperts(3, 16, 32, "relu2", init_std=0.2, out_std=0.2)
    x = torch.randn(9, 16, requires_grad=True)
    rows = torch.tensor([0, 3, 4, 1, 2, 3, 8])
    gate = torch.rand(7, requires_grad=True)
    counts = [3, 0, 4]
    ref = m.forward_gathered(x, rows, gate, counts)
    ref_grads = torch.autograd.grad(ref.sum(), [x, gate])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.forward_gathered(x, rows, gate, counts)
    assert out.dtype == torch.float32
    assert_close(out, ref, rtol=5e-2, atol=5e-2)
    for got, want in zip(torch.autograd.grad(out.sum(), [x, gate]), ref_grads, strict=True):
        assert got.dtype == torch.float32
        assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_path_when_x_needs_no_grad(activation):
    """forward_gathered (gather + MLP + gated scatter-add) with an input that needs no grad,
    as a first MoE layer fed by a frozen embedding or a benchmark's random input: the
    weight and gate grads equal those of the split path."""
    m = _experts(3, activation)
    x_TD = torch.randn(6, D, dtype=torch.float64)
    token_A = torch.tensor([0, 4, 1, 2, 5, 3, 0])
    counts = torch.tensor([2, 0, 5])
    gate_A = torch.rand(7, dtype=torch.float64, requires_grad=True)
    weights = _weights(m)
    got = torch.autograd.grad(m.forward_gathered(x_TD, token_A, gate_A, counts).square().sum(), [*weights, gate_A])
    y_ref = combine(m(gather_rows(x_TD, token_A), counts), gate_A, token_A, 6)
    want = torch.autograd.grad(y_ref.square().sum(), [*weights, gate_A])
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, **TIGHT)


# ------------------------------------------------- bf16: weights cast once, not per use


def _per_use_cast(monkeypatch) -> None:
    """Put back the old autocast path: the weights cast differentiably on every use."""

    def masters(self):
        ws = (self.w1_EDF, self.w2_EFD, self.w3_EDF)
        if not torch.is_autocast_enabled("cpu"):
            return ws
        return tuple(None if w is None else w.to(torch.get_autocast_dtype("cpu")) for w in ws)

    monkeypatch.setattr(GroupedExperts, "_masters", masters)
    monkeypatch.setattr(GroupedExperts, "_compute_dtype", lambda self, x: (x.to(torch.get_autocast_dtype("cpu"))
                        if torch.is_autocast_enabled("cpu") else x, None))  # fmt: skip


def _bf16_run(m: GroupedExperts, x_TD, rows_A, gate_A, counts) -> list[torch.Tensor]:
    """Both entry points under bf16 autocast: outputs, then grads of x, gate and weights."""
    x_TD, gate_A = x_TD.clone().requires_grad_(), gate_A.clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_AD = m(x_TD[rows_A], counts)
        y_TD = m.forward_gathered(x_TD, rows_A, gate_A, counts)
    (y_AD.float().square().sum() + y_TD.pow(3).sum()).backward()
    return [y_AD, y_TD, x_TD.grad, gate_A.grad] + [w.grad for w in _weights(m)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cast_once_is_bitwise_the_per_use_cast(activation, monkeypatch):
    """Forward values and every gradient (float32 on the masters) are bitwise those of a
    differentiable cast per use, also after each way a weight changes."""
    torch.manual_seed(3)
    m = GroupedExperts(4, 16, 24, activation, init_std=0.3, out_std=0.3)
    counts = [5, 0, 9, 6]
    x_TD, rows_A, gate_A = torch.randn(20, 16), torch.randint(0, 20, (20,)), torch.rand(20)
    for i in range(20 // 5):  # the gathered path needs each token at most once per expert segment
        rows_A[i * 5 : i * 5 + 5] = torch.randperm(20)[:5]
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    changes = [lambda: opt.step(),
               lambda: m.load_state_dict({k: v * 1.5 for k, v in m.state_dict().items()}),
               lambda: m.load_from_dense(2, DenseMLP(16, 24, activation))]  # fmt: skip
    for change in [lambda: None, *changes]:
        change()
        got = _bf16_run(m, x_TD, rows_A, gate_A, counts)
        with monkeypatch.context() as mp:
            _per_use_cast(mp)
            want = _bf16_run(m, x_TD, rows_A, gate_A, counts)
        assert [g.dtype for g in got[2:]] == [torch.float32] * (len(got) - 2)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    # Unchanged weights: the same copy serves every use (no cast per micro-batch).
    first = m.cast_weights(torch.bfloat16)
    assert all(a is b for a, b in zip(first, m.cast_weights(torch.bfloat16), strict=True))


def test_bf16_training_steps_equal_the_per_use_cast(monkeypatch):
    """Whole bf16 training steps (2 micro-batches, AdamW updates between steps): every loss,
    gradient norm and parameter bitwise those of the per-use cast."""
    from moedist.config import build_config
    from moedist.training.trainer import Trainer, load_dataset

    over = {"model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "seq_len": 16, "n_experts": 4},
            "train": {"batch_size": 4, "micro_batches": 2, "dtype": "bfloat16", "eval_every": 0,
                      "progress": False, "warmup_steps": 0, "lr": 1e-2},
            "router": {"kind": "tc", "top_k": 2}}  # fmt: skip
    cfg = build_config("tiny", None, over)

    def run() -> tuple[list[tuple[float, float]], Trainer]:
        tr = Trainer(cfg, load_dataset(cfg))
        return [(r["loss"], r["grad_norm"]) for r in (tr.train_step() for _ in range(3))], tr

    rows, tr = run()
    with monkeypatch.context() as mp:
        _per_use_cast(mp)
        ref, ref_tr = run()
    assert rows == ref
    for (name, p), q in zip(tr.model.named_parameters(), ref_tr.model.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_segments_equals_expert_major_rows(activation):
    """Rows in segments of any expert order (an all-to-all receive buffer: source-major,
    experts repeating, empty segments, expert 1 absent) give each row its expert's output and
    the same gradients as the expert-major layout: x's rows, and each weight's gradient summed
    over its expert's segments (expert 1's exactly zero)."""
    m = _experts(4, activation)
    experts_S = [0, 2, 3, 0, 2, 3, 2, 0]
    sizes_S = [3, 0, 4, 2, 5, 1, 2, 0]
    g = torch.Generator().manual_seed(2)
    A = sum(sizes_S)
    x_AD = torch.randn(A, D, generator=g, dtype=torch.float64, requires_grad=True)
    grad_AD = torch.randn(A, D, generator=g, dtype=torch.float64)
    inputs = [x_AD, *_weights(m)]
    out = m.forward_segments(x_AD, experts_S, sizes_S)
    grads = torch.autograd.grad(out, inputs, grad_AD)

    expert_A = torch.repeat_interleave(torch.tensor(experts_S), torch.tensor(sizes_S))
    order_A, counts_E = sort_by_expert(expert_A, 4)
    ref_sorted = m(x_AD[order_A], counts_E)
    ref = torch.empty_like(ref_sorted).index_copy(0, order_A, ref_sorted)
    ref_grads = torch.autograd.grad(ref, inputs, grad_AD)
    assert_close(out, ref, **TIGHT)
    for name, got, want in zip(["x", "w1", "w2", "w3"], grads, ref_grads, strict=False):
        assert_close(got, want, **TIGHT, msg=f"grad {name}")
    assert all(bool((gw[1] == 0).all()) and bool((gw[2] != 0).all()) for gw in grads[1:])
    with pytest.raises(ValueError, match="do not cover"):
        m.forward_segments(x_AD, experts_S, [1] * len(experts_S))
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        m.forward_segments(x_AD, [4, *experts_S[1:]], sizes_S)

"""Expert MLPs: `GroupedExperts` (all E experts over expert-sorted rows) and `DenseMLP`.

Legend: T tokens, A assignments ((token, expert) pairs), D model width, F expert width,
E experts.

Each expert is an MLP D -> F -> D with activation
- ``"relu2"``:  y = relu(x W1)^2 W2
- ``"swiglu"``: y = (silu(x W1) * (x W3)) W2.

`GroupedExperts.forward` takes rows already sorted by expert (contiguous segments of
``counts_E`` rows) and runs one GEMM per non-empty expert on each segment, written with
``out=`` straight into preallocated buffers, inside an autograd Function with a
hand-written backward (no per-token Python, no masks). Only torch ops are used, so it runs
on CPU and CUDA alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.functional import silu

Activation = Literal["relu2", "swiglu"]
_ACTIVATIONS = ("relu2", "swiglu")

__all__ = ["Activation", "DenseMLP", "GroupedExperts", "expert_mlp_reference"]


def _check_activation(activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def _mlp(x_AD: Tensor, w1_DF: Tensor, w2_FD: Tensor, w3_DF: Tensor | None, activation: str) -> Tensor:
    """One expert's MLP written plainly for autograd (the reference math)."""
    z_AF = x_AD @ w1_DF
    h_AF = torch.relu(z_AF).square() if activation == "relu2" else silu(z_AF) * (x_AD @ w3_DF)
    return h_AF @ w2_FD


def _segment_sizes(counts_E: Tensor | Sequence[int], n_rows: int, n_experts: int) -> list[int]:
    """counts_E as host ints, checked against the rows and the experts."""
    # On CUDA .tolist() is a host sync; a loop over experts needs the sizes on the host anyway.
    sizes = counts_E.tolist() if isinstance(counts_E, Tensor) else [int(c) for c in counts_E]
    if len(sizes) != n_experts:
        raise ValueError(f"counts_E has {len(sizes)} entries, expected n_experts={n_experts}")
    if any(c < 0 for c in sizes) or sum(sizes) != n_rows:
        raise ValueError(f"counts_E must be >= 0 and sum to the {n_rows} rows of x_AD, got {sizes}")
    return sizes


class _GroupedMLP(torch.autograd.Function):
    """All experts' MLPs over expert-sorted rows; grads for x, every weight (and gates) by hand.

    Two modes share one implementation of the expert math:
    - split (rows_A is None): x is x_AD, already gathered and sorted by expert; returns out_AD.
      Used where rows arrive in a buffer (the shared expert, an all-to-all receive buffer).
    - fused (rows_A given): x is x_TD; each expert segment gathers its token rows into a
      small scratch, runs its MLP, and adds gate_A * output straight into y_TD[rows]; returns
      y_TD. No [A, D] buffer is ever allocated (on a 2-core VM every fresh buffer of
      >= 32 MB costs ~14 ms of page faults, more than the gather itself), and the gate's
      gradient needs no saved output: d y / d gate_a = <h_a W2, g_a> = <h_a, g_a W2^T>,
      the GEMM the backward computes anyway.
    Within one segment a token appears at most once, so index_add_ has no conflicts.

    Work runs expert by expert: a segment's GEMM output is still in cache when its
    elementwise step runs, and everything that is not saved for backward lives in per-call
    scratch of [max rows of one expert, F]. Saved activations: relu(z) for relu2; z1 and z3
    for swiglu; the rest is recomputed. On GPU this costs ~10 small kernels per expert; a
    grouped GEMM kernel would be the next step there.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        rows_A: Tensor | None,
        gate_A: Tensor | None,
        n_out: int,
        segs: list[tuple[int, int, int]],
        activation: str,
        w1_EDF: Tensor,
        w2_EFD: Tensor,
        w3_EDF: Tensor | None,
        cast: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        # `cast`: the weights already in x's dtype (GroupedExperts' once-per-step copies of
        # float32 masters under autocast). The GEMMs use them; the weight gradients are
        # computed in that dtype and cast to the masters' dtype on the way out, as the
        # backward of a differentiable cast would.
        ctx.master_dtypes = (w1_EDF.dtype, w2_EFD.dtype, None if w3_EDF is None else w3_EDF.dtype)
        if cast is not None:
            w1_EDF, w2_EFD, w3_EDF = cast
        fused = rows_A is not None
        A = rows_A.shape[0] if fused else x.shape[0]
        D, F = w1_EDF.shape[1], w1_EDF.shape[2]
        x = x.contiguous()  # row slices of a contiguous tensor are valid out= targets
        rows = max((n for _, _, n in segs), default=0)
        ctx.segs, ctx.rows, ctx.activation, ctx.fused = segs, rows, activation, fused
        swiglu = activation == "swiglu"
        # Autocast is resolved by the caller (inputs arrive in the compute dtype); inside,
        # nothing must be re-cast, and out= ops are not autocast-eligible anyway.
        with torch.autocast(x.device.type, enabled=False):
            z_AF = x.new_empty(A, F)  # relu2: becomes relu(z) in place
            z3_AF = x.new_empty(A, F) if swiglu else None
            scratch = x.new_empty(rows, F)
            if fused:
                # Gates are float32: the weighted sum accumulates in float32 under bf16 autocast.
                out = torch.zeros(n_out, D, dtype=torch.promote_types(x.dtype, gate_A.dtype), device=x.device)
                xs_buf, o_buf = x.new_empty(rows, D), x.new_empty(rows, D)
            else:
                out = x.new_empty(A, D)
            for e, s, n in segs:
                z, h = z_AF[s : s + n], scratch[:n]
                if fused:
                    idx = rows_A[s : s + n]
                    xs = torch.index_select(x, 0, idx, out=xs_buf[:n])
                    o = o_buf[:n]
                else:
                    xs, o = x[s : s + n], out[s : s + n]
                torch.mm(xs, w1_EDF[e], out=z)
                if swiglu:
                    z3 = z3_AF[s : s + n]
                    torch.mm(xs, w3_EDF[e], out=z3)
                    torch.ops.aten.silu.out(z, out=h)
                    h.mul_(z3)
                else:
                    torch.mul(z.relu_(), z, out=h)
                torch.mm(h, w2_EFD[e], out=o)
                if fused:
                    o = o if o.dtype == out.dtype else o.to(out.dtype)
                    out.index_add_(0, idx, o.mul_(gate_A[s : s + n].unsqueeze(1)))
        ctx.save_for_backward(x, rows_A, gate_A, w1_EDF, w2_EFD, w3_EDF, z_AF, z3_AF)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, rows_A, gate_A, w1_EDF, w2_EFD, w3_EDF, z_AF, z3_AF = ctx.saved_tensors
        segs, fused = ctx.segs, ctx.fused
        need_x, _, need_gate, _, _, _, need_w1, need_w2, need_w3, _ = ctx.needs_input_grad
        gy_all = grad_out.contiguous()
        if fused and gy_all.dtype != x.dtype:
            # float32 upstream grad, bf16 compute: cast it once (each element rounds the same
            # as when its gathered rows were cast per segment, at less than half the traffic:
            # the segments together read fanout x T rows).
            gy_all = gy_all.to(x.dtype)
        D, F = w1_EDF.shape[1], w1_EDF.shape[2]
        # Weight grads start empty: an expert's first segment writes its slice with a GEMM
        # (beta = 0), later segments of the same expert add to it; only the slices of
        # experts with no rows need zeros.
        present = {e for e, _, _ in segs}
        empty = [e for e in range(w1_EDF.shape[0]) if e not in present]
        gw1 = _empty_grad(w1_EDF, empty) if need_w1 else None
        gw2 = _empty_grad(w2_EFD, empty) if need_w2 else None
        gw3 = _empty_grad(w3_EDF, empty) if need_w3 else None
        ggate = torch.empty_like(gate_A) if fused and need_gate else None
        if need_x:
            gx_all = torch.zeros_like(x) if fused else x.new_empty(x.shape)
        else:
            gx_all = None
        rows = ctx.rows
        swiglu = ctx.activation == "swiglu"
        seen: set[int] = set()

        with torch.autocast(x.device.type, enabled=False):
            hb, b = x.new_empty(rows, F), x.new_empty(rows, F)
            a_buf = x.new_empty(rows, F) if swiglu else None
            if fused:
                xs_buf, gy_buf, gx_buf = x.new_empty(rows, D), x.new_empty(rows, D), x.new_empty(rows, D)
                dot_buf = x.new_empty(rows, F)
            for e, s, n in segs:
                if fused:
                    idx = rows_A[s : s + n]
                    xs = torch.index_select(x, 0, idx, out=xs_buf[:n])
                    gy = torch.index_select(gy_all, 0, idx, out=gy_buf[:n])
                    gx = gx_buf[:n] if gx_all is not None else None  # x may not need a grad
                else:
                    xs, gy = x[s : s + n], gy_all[s : s + n]
                    gx = gx_all[s : s + n] if gx_all is not None else None
                z, h, gh = z_AF[s : s + n], hb[:n], b[:n]
                beta = 1 if e in seen else 0  # a later segment of the same expert accumulates
                seen.add(e)
                if swiglu:
                    z3, act = z3_AF[s : s + n], a_buf[:n]
                    torch.ops.aten.silu.out(z, out=act)  # act = silu(z1)
                    torch.mul(act, z3, out=h)
                else:
                    torch.mul(z, z, out=h)  # h = relu(z)^2 (z holds relu(z))
                torch.mm(gy, w2_EFD[e].t(), out=gh)  # grad h (ungated in fused mode)
                if fused:
                    g_col = gate_A[s : s + n].unsqueeze(1)
                    if ggate is not None:  # <h, grad h> row by row, through scratch
                        torch.sum(torch.mul(h, gh, out=dot_buf[:n]), dim=-1, dtype=ggate.dtype, out=ggate[s : s + n])
                    gy.mul_(g_col)
                    gh.mul_(g_col)
                if gw2 is not None:
                    gw2[e].addmm_(h.t(), gy, beta=beta)
                if swiglu:
                    act.mul_(gh)  # act = grad z3 = grad h * silu(z1)
                    gh.mul_(z3)  # grad silu(z1)
                    torch.ops.aten.silu_backward.grad_input(gh, z, grad_input=gh)  # grad z1
                    if gw1 is not None:
                        gw1[e].addmm_(xs.t(), gh, beta=beta)
                    if gw3 is not None:
                        gw3[e].addmm_(xs.t(), act, beta=beta)
                    if gx is not None:
                        torch.mm(gh, w1_EDF[e].t(), out=gx)
                        gx.addmm_(act, w3_EDF[e].t())
                else:
                    # d relu(z)^2/dz = 2 relu(z): multiply by relu(z) here and fold the 2
                    # into the GEMMs' alpha (one pass less).
                    gh.mul_(z)
                    if gw1 is not None:
                        gw1[e].addmm_(xs.t(), gh, beta=beta, alpha=2)
                    if gx is not None:
                        gx.addmm_(gh, w1_EDF[e].t(), beta=0, alpha=2)
                if fused and gx is not None:
                    gx_all.index_add_(0, idx, gx)
        gw1, gw2, gw3 = (g if g is None or g.dtype == dt else g.to(dt)
                         for g, dt in zip((gw1, gw2, gw3), ctx.master_dtypes, strict=True))  # fmt: skip
        return gx_all, None, ggate, None, None, None, gw1, gw2, gw3, None


def _segments(sizes: list[int], experts: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """(expert, start row, rows) of the non-empty segments; segment i belongs to expert
    ``experts[i]`` (default: i, one segment per expert in order)."""
    segs, start = [], 0
    for i, n in enumerate(sizes):
        if n > 0:
            segs.append((i if experts is None else experts[i], start, n))
        start += n
    return segs


def _empty_grad(w: Tensor | None, zero_experts: list[int]) -> Tensor | None:
    if w is None:
        return None
    g = torch.empty_like(w, memory_format=torch.contiguous_format)
    for e in zero_experts:
        g[e].zero_()
    return g


class GroupedExperts(nn.Module):
    """E expert MLPs (D -> F -> D) applied to rows sorted by expert.

    Parameters: ``w1_EDF`` [E, D, F], ``w2_EFD`` [E, F, D] and, for swiglu, ``w3_EDF``
    [E, D, F]; w1/w3 ~ N(0, init_std), w2 ~ N(0, out_std).

    Under autocast the GEMMs and the activation run in the autocast dtype: x is cast on
    entry, the weights are cast once and reused until they change (`cast_weights`), and
    the weight gradients reach the float32 parameters cast back, exactly as through a
    differentiable per-use cast; the output is in the autocast dtype.
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_ff: int,
        activation: Activation = "relu2",
        init_std: float = 0.02,
        out_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_activation(activation)
        if min(n_experts, d_model, d_ff) < 1:
            raise ValueError(f"n_experts, d_model and d_ff must be >= 1, got {n_experts}, {d_model}, {d_ff}")
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.activation = activation
        self.init_std, self.out_std = init_std, out_std
        # (weight name, dtype) -> (version key of the master, its cast copy): cast_weights
        self._cast_cache: dict[tuple[str, torch.dtype], tuple[tuple, Tensor]] = {}
        kw = {"device": device, "dtype": dtype}
        self.w1_EDF = nn.Parameter(torch.empty(n_experts, d_model, d_ff, **kw))
        self.w2_EFD = nn.Parameter(torch.empty(n_experts, d_ff, d_model, **kw))
        if activation == "swiglu":
            self.w3_EDF = nn.Parameter(torch.empty(n_experts, d_model, d_ff, **kw))
        else:
            self.register_parameter("w3_EDF", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init: w1/w3 with init_std, w2 with out_std."""
        nn.init.normal_(self.w1_EDF, 0.0, self.init_std)
        nn.init.normal_(self.w2_EFD, 0.0, self.out_std)
        if self.w3_EDF is not None:
            nn.init.normal_(self.w3_EDF, 0.0, self.init_std)

    def forward(self, x_AD: Tensor, counts_E: Tensor | Sequence[int]) -> Tensor:
        """out_AD for rows sorted by expert: rows of expert e are the e-th segment of counts_E."""
        if x_AD.dim() != 2 or x_AD.shape[1] != self.d_model:
            raise ValueError(f"x_AD must have shape [A, {self.d_model}], got {tuple(x_AD.shape)}")
        sizes = _segment_sizes(counts_E, x_AD.shape[0], self.n_experts)
        x_AD, cast = self._compute_dtype(x_AD)
        return _GroupedMLP.apply(x_AD, None, None, 0, _segments(sizes), self.activation, *self._masters(), cast)

    def forward_segments(self, x_AD: Tensor, experts_S: Sequence[int], sizes_S: Sequence[int]) -> Tensor:
        """out_AD for rows in segments of any expert order: the i-th segment holds
        ``sizes_S[i]`` rows of expert ``experts_S[i]`` (an expert may have several segments).

        This is the order an all-to-all receive buffer has (source-major, expert-major
        within each source), so the receiver needs no reordering pass; an expert's weight
        gradient adds up its segments' GEMMs."""
        if x_AD.dim() != 2 or x_AD.shape[1] != self.d_model:
            raise ValueError(f"x_AD must have shape [A, {self.d_model}], got {tuple(x_AD.shape)}")
        sizes = [int(n) for n in sizes_S]
        if len(sizes) != len(experts_S) or any(n < 0 for n in sizes) or sum(sizes) != x_AD.shape[0]:
            raise ValueError(f"{len(experts_S)} segment experts, sizes {sizes}: do not cover the {x_AD.shape[0]} rows")
        if any(not 0 <= e < self.n_experts for e in experts_S):
            raise ValueError(f"segment experts {list(experts_S)} outside 0..{self.n_experts - 1}")
        x_AD, cast = self._compute_dtype(x_AD)
        segs = _segments(sizes, list(experts_S))
        return _GroupedMLP.apply(x_AD, None, None, 0, segs, self.activation, *self._masters(), cast)

    def forward_gathered(
        self, x_TD: Tensor, rows_A: Tensor, gate_A: Tensor, counts_E: Tensor | Sequence[int]
    ) -> Tensor:
        """y_TD[t] = sum over assignments a with rows_A[a] = t of gate_A[a] * expert(x_TD[t]).

        Assignments are sorted by expert (segments of counts_E). Gathering, the expert MLPs
        and the gated scatter-add run in one pass per expert, without [A, D] buffers.
        Differentiable w.r.t. x_TD, gate_A and the weights; y is float32 under bf16 autocast.
        """
        if x_TD.dim() != 2 or x_TD.shape[1] != self.d_model:
            raise ValueError(f"x_TD must have shape [T, {self.d_model}], got {tuple(x_TD.shape)}")
        if rows_A.shape != gate_A.shape or rows_A.dim() != 1:
            raise ValueError(f"rows_A {tuple(rows_A.shape)} and gate_A {tuple(gate_A.shape)} must be equal 1-D shapes")
        sizes = _segment_sizes(counts_E, rows_A.shape[0], self.n_experts)
        x_TD, cast = self._compute_dtype(x_TD)
        return _GroupedMLP.apply(x_TD, rows_A.contiguous(), gate_A.contiguous(), x_TD.shape[0], _segments(sizes),
                                 self.activation, *self._masters(), cast)  # fmt: skip

    def _masters(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.w1_EDF, self.w2_EFD, self.w3_EDF

    def _compute_dtype(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None] | None]:
        """x in the dtype the GEMMs run in (the autocast dtype, if enabled), and the weights
        in that dtype when it differs from theirs (None: use the parameters themselves)."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            if dtype == self.w1_EDF.dtype:
                return x.to(dtype), None
            return x.to(dtype), self.cast_weights(dtype)
        if x.dtype != self.w1_EDF.dtype:
            raise TypeError(
                f"input is {x.dtype} but the expert weights are {self.w1_EDF.dtype}; "
                "cast it or run under torch.autocast"
            )
        return x, None

    @torch.no_grad()
    def cast_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        """The weights cast to `dtype`, cast once and reused until a weight changes.

        Casting float32 masters to bf16 on every forward pass read 6 bytes per weight per
        micro-batch, as much memory traffic as a shape's GEMMs themselves. The copy is
        refreshed when a parameter's version counter moves (every in-place change bumps it:
        the optimiser's step, load_state_dict, copy_ into a view such as load_from_dense) or
        the parameter is another tensor (a rebuilt or resized model), so no caller has to
        invalidate it. It is the same rounding `w.to(dtype)` does, so results are bitwise
        those of a per-use cast. Memory: one `dtype` copy of the expert weights, kept.
        """
        out = []
        for name, w in zip(("w1", "w2", "w3"), self._masters(), strict=True):
            if w is None:
                out.append(None)
                continue
            key = (w.data_ptr(), w._version, tuple(w.shape), w.device)
            entry = self._cast_cache.get((name, dtype))
            if entry is None or entry[0] != key:
                # Refill the same buffer when the shape allows: no fresh allocation per step.
                buf = entry[1] if entry is not None and entry[1].shape == w.shape else None
                buf = w.detach().to(dtype) if buf is None else buf.copy_(w)
                entry = (key, buf)
                self._cast_cache[(name, dtype)] = entry
            out.append(entry[1])
        return out[0], out[1], out[2]

    @torch.no_grad()
    def load_from_dense(self, expert: int, mlp: DenseMLP) -> None:
        """Copy a DenseMLP's weights into expert ``expert`` (same widths and activation)."""
        if not 0 <= expert < self.n_experts:
            raise IndexError(f"expert {expert} out of range for n_experts={self.n_experts}")
        if (mlp.d_model, mlp.d_ff, mlp.activation) != (self.d_model, self.d_ff, self.activation):
            raise ValueError(
                f"DenseMLP(d_model={mlp.d_model}, d_ff={mlp.d_ff}, {mlp.activation}) does not fit "
                f"GroupedExperts(d_model={self.d_model}, d_ff={self.d_ff}, {self.activation})"
            )
        # nn.Linear stores weight [out, in]; the experts store [in, out].
        self.w1_EDF[expert].copy_(mlp.fc1.weight.t())
        self.w2_EFD[expert].copy_(mlp.fc2.weight.t())
        if self.w3_EDF is not None:
            self.w3_EDF[expert].copy_(mlp.fc3.weight.t())

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"


def expert_mlp_reference(
    x_AD: Tensor,
    counts_E: Tensor | Sequence[int],
    w1_EDF: Tensor,
    w2_EFD: Tensor,
    w3_EDF: Tensor | None = None,
    activation: Activation = "relu2",
) -> Tensor:
    """Plain per-expert loop with autograd (tests only): the math GroupedExperts must match."""
    _check_activation(activation)
    sizes = _segment_sizes(counts_E, x_AD.shape[0], w1_EDF.shape[0])
    outs = [
        _mlp(x, w1_EDF[e], w2_EFD[e], None if w3_EDF is None else w3_EDF[e], activation)
        for e, x in enumerate(torch.split(x_AD, sizes))
    ]
    return torch.cat(outs)


class DenseMLP(nn.Module):
    """Dense FFN D -> F -> D (no biases): ``fc1`` D->F, ``fc2`` F->D, ``fc3`` D->F for swiglu."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: Activation = "relu2",
        init_std: float = 0.02,
        out_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_activation(activation)
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.init_std, self.out_std = init_std, out_std
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.fc1 = nn.Linear(d_model, d_ff, **kw)
        self.fc2 = nn.Linear(d_ff, d_model, **kw)
        self.fc3 = nn.Linear(d_model, d_ff, **kw) if activation == "swiglu" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init: fc1/fc3 with init_std, fc2 with out_std."""
        nn.init.normal_(self.fc1.weight, 0.0, self.init_std)
        nn.init.normal_(self.fc2.weight, 0.0, self.out_std)
        if self.fc3 is not None:
            nn.init.normal_(self.fc3.weight, 0.0, self.init_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        """y_TD = fc2(act(fc1(x))), any leading dims."""
        z_TF = self.fc1(x_TD)
        if self.activation == "relu2":
            h_TF = torch.relu(z_TF).square()
        else:
            h_TF = silu(z_TF) * self.fc3(x_TD)
        return self.fc2(h_TF)

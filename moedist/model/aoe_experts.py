"""AoE's experts: the rest of each expert after the router's shared low-rank projection.

Rows arrive as [x_t, a_ti] (D + L features; a_ti = x_t W_down,i was computed once by the
AutonomyRouter and travels as the plan's payload). Expert i computes
(SiLU(a W_up,i) * (x W_p,i)) W_o,i. Plain torch per expert segment (autograd as usual).

Legend: R rows (assignments, expert-major), D model width, L = d_low, W = d_wide, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AoEExperts(nn.Module):
    """E AoE experts; forward(rows_R(D+L), counts_E) -> out_RD, rows grouped by expert."""

    def __init__(self, n_experts: int, d_model: int, d_low: int, d_wide: int, init_std: float = 0.02,
                 out_std: float | None = None, device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.n_experts, self.d_model, self.d_low, self.d_wide = n_experts, d_model, d_low, d_wide
        self.init_std = init_std
        self.out_std = init_std if out_std is None else out_std
        kw = {"device": device, "dtype": dtype}
        self.w_up_ELW = nn.Parameter(torch.empty(n_experts, d_low, d_wide, **kw))
        self.w_p_EDW = nn.Parameter(torch.empty(n_experts, d_model, d_wide, **kw))
        self.w_o_EWD = nn.Parameter(torch.empty(n_experts, d_wide, d_model, **kw))
        if self.w_up_ELW.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_up_ELW, std=self.init_std)
        nn.init.normal_(self.w_p_EDW, std=self.init_std)
        nn.init.normal_(self.w_o_EWD, std=self.out_std)

    def expert(self, e: int, x_RD: Tensor, a_RL: Tensor, weights: tuple | None = None) -> Tensor:
        """Expert e on rows x with their low-rank activations a (weights: unbound views)."""
        w_up, w_p, w_o = weights if weights is not None else (self.w_up_ELW, self.w_p_EDW, self.w_o_EWD)
        h_RW = torch.nn.functional.silu(a_RL @ w_up[e]) * (x_RD @ w_p[e])
        return h_RW @ w_o[e]

    def forward(self, rows_RP: Tensor, counts_E: Tensor | Sequence[int]) -> Tensor:
        D = self.d_model
        if rows_RP.shape[1] != D + self.d_low:
            raise ValueError(f"AoE expert rows need {D} + {self.d_low} features (x, a), got {rows_RP.shape[1]}")
        sizes = [int(c) for c in (counts_E.tolist() if isinstance(counts_E, Tensor) else counts_E)]
        if len(sizes) != self.n_experts or sum(sizes) != rows_RP.shape[0]:
            raise ValueError(f"counts {sizes} do not split {rows_RP.shape[0]} rows over {self.n_experts} experts")
        dtype = self.w_o_EWD.dtype
        if torch.is_autocast_enabled(rows_RP.device.type):
            dtype = torch.get_autocast_dtype(rows_RP.device.type)
        # unbind once: each expert's weight grad lands in its slice of one stacked grad;
        # indexing the [E, ...] parameter per expert would make autograd build and add a
        # full-size zero grad per expert (E^2 memory traffic).
        weights = (self.w_up_ELW.unbind(0), self.w_p_EDW.unbind(0), self.w_o_EWD.unbind(0))
        # likewise split the rows once (a slice per expert would cost a full-size grad each)
        outs = []
        for e, r in enumerate(rows_RP.split(sizes)):
            if r.shape[0]:
                r = r.to(dtype)
                x_RD, a_RL = r.split([D, self.d_low], dim=1)
                outs.append(self.expert(e, x_RD, a_RL, weights))
        if not outs:
            return rows_RP.new_zeros((0, D))
        return torch.cat(outs)

    def subset(self, experts: Sequence[int]) -> AoEExperts:
        """A module holding copies of the given experts' weights (an expert-parallel shard)."""
        p = self.w_o_EWD
        out = AoEExperts(len(experts), self.d_model, self.d_low, self.d_wide, self.init_std, self.out_std,
                         device="meta", dtype=p.dtype).to_empty(device=p.device)  # fmt: skip
        idx = torch.tensor(list(experts), dtype=torch.int64, device=p.device)
        with torch.no_grad():
            for name, q in out.named_parameters():
                q.copy_(getattr(self, name).index_select(0, idx))
        return out.train(self.training)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_low={self.d_low}, d_wide={self.d_wide}"

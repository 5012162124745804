"""Finding and naming non-finite values before they reach an optimiser step or a checkpoint.

A run must never step on NaN/Inf gradients or save non-finite state: the trainer checks the
loss and the global gradient norm before each optimiser step and the parameters after it,
and names the first culprit by layer (and, in an MoE layer, by expert).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter became NaN or infinite; the message names where."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _where(name: str, bad_row: int | None, expert_ids: list[int] | None) -> str:
    """'layer 2 MoE expert 5 (w1_EDF)' for a parameter name like blocks.2.ffn.experts.w1_EDF."""
    m = _BLOCK.match(name)
    if not m:
        return name
    layer, rest = int(m.group(1)), m.group(2)
    if rest.startswith("ffn.experts.") and bad_row is not None:
        expert = expert_ids[bad_row] if expert_ids is not None else bad_row
        return f"layer {layer} MoE expert {expert} ({rest.removeprefix('ffn.experts.')})"
    if rest.startswith("ffn.shared."):
        return f"layer {layer} MoE shared expert ({rest.removeprefix('ffn.shared.')})"
    if rest.startswith("ffn.router."):
        return f"layer {layer} MoE router ({rest.removeprefix('ffn.router.')})"
    return f"layer {layer} {rest}"


def first_nonfinite(model: nn.Module, of: str, expert_ids: list[int] | None = None) -> str | None:
    """Where the deepest non-finite gradient (of='grad') or parameter (of='param') is, and
    how many tensors are non-finite; None when all are finite.

    Parameters are searched from the output back: backward spreads a NaN from where it arose
    to everything before it, so the deepest culprit is the closest to the cause.
    `expert_ids` maps this process's expert rows to global expert ids (expert parallelism).
    """
    found, n_bad = None, 0
    named = list(model.named_parameters())
    for name, p in reversed(named):
        t = p.grad if of == "grad" else p
        if t is None or bool(torch.isfinite(t).all()):
            continue
        n_bad += 1
        if found is None:
            bad_row = None
            if ".experts." in name and t.ndim >= 2:  # routed experts: dim 0 is the expert
                bad_row = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])
            found = _where(name, bad_row, expert_ids)
    return None if found is None else f"{found}; {n_bad} of {len(named)} tensors non-finite"


def params_finite(params: list[torch.Tensor]) -> bool:
    """True when every parameter is finite: one fused max-norm over all of them (a max of
    |x| cannot overflow as a sum of squares would, and NaN propagates through it)."""
    if not params:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf, foreach=True)))

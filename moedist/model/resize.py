"""Changing the number of routed experts of a trained model (whole-model state dicts).

Legend: E experts before, E2 after. A resize is a per-MoE-layer table `src[j]`: new
expert j starts as a copy of old expert src[j]; `share[j]` is the number of new experts
copied from that source.

Growth splits experts: expert i becomes i and a copy i' with the same weights, router row
and routing state (ET's EMA threshold, LF's bias); the output projection of each copy is
divided by the number of copies, so a token that reached i now reaches all copies (same
logit, same cutoff) and their outputs add up to i's. For routers whose gate depends on
the token's own logit only (ET and EC's sigmoid, LF's bias-free gate, TC's sigmoid gate)
and whose selection is a per-expert cutoff (ET at inference), the model's function is
unchanged. Top-k and softmax routers are not: see docs/scaling.md.

Adam's moments are rescaled to the gradients each copy would have seen had it been split
from the start: with its output divided by s, the gradients of its input projections and
router row are divided by s (m / s, v / s^2), its output projection's are unchanged.

Shrinking drops experts (the least loaded by default); their tokens go to the remaining
experts the router picks, so the function changes and the loss change is measured.

Pure tensor bookkeeping: no torch.distributed, no ray.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moedist.model.moe import MoEBlock

__all__ = ["ResizePlan", "moe_prefixes", "param_slots", "plan_resize", "resize_state"]

# Output projections: their rows are divided among copies (everything else is copied).
OUTPUT_PARAMS = ("w2_EFD", "w_o_EWD")


@dataclass
class ResizePlan:
    """How one MoE layer goes from E to E2 experts."""

    n_before: int
    src: list[int]  # new expert j copies old expert src[j]
    split: list[int]  # old experts that were split (growth)
    dropped: list[int]  # old experts that were dropped (shrink)

    @property
    def n_after(self) -> int:
        return len(self.src)

    def share(self) -> list[int]:
        """For each new expert, how many new experts copy its source."""
        counts = [0] * self.n_before
        for s in self.src:
            counts[s] += 1
        return [counts[s] for s in self.src]

    def to_json(self) -> dict[str, Any]:
        return {"experts_before": self.n_before, "experts_after": self.n_after, "split": self.split,
                "dropped": self.dropped}  # fmt: skip


def plan_resize(n_before: int, n_after: int, load_E: Sequence[float] | None = None) -> ResizePlan:
    """Split the most loaded experts (growth) or drop the least loaded (shrink).

    Growth beyond 2x splits again: each round splits the expert with the highest load per
    copy. Copies are appended after the old experts, so old expert ids keep their place.
    Ties go to the lower id. `load_E` defaults to equal loads.
    """
    if n_after < 1:
        raise ValueError(f"cannot resize to {n_after} experts")
    load = [1.0] * n_before if load_E is None else [float(x) for x in load_E]
    if len(load) != n_before:
        raise ValueError(f"{len(load)} loads for {n_before} experts")
    if n_after >= n_before:
        copies = [1] * n_before
        src = list(range(n_before))
        for _ in range(n_after - n_before):
            i = max(range(n_before), key=lambda e: (load[e] / copies[e], -e))
            copies[i] += 1
            src.append(i)
        return ResizePlan(n_before, src, sorted({s for s in src[n_before:]}), [])
    order = sorted(range(n_before), key=lambda e: (load[e], e))
    dropped = sorted(order[: n_before - n_after])
    return ResizePlan(n_before, [e for e in range(n_before) if e not in set(dropped)], [], dropped)


def moe_prefixes(model: nn.Module) -> list[str]:
    """state_dict prefixes of the model's MoE blocks, in layer order."""
    return [name for name, mod in model.named_modules() if isinstance(mod, MoEBlock)]


def param_slots(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """state_dict key of each parameter -> its index in the optimiser's state."""
    slot = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {name: slot[id(p)] for name, p in model.named_parameters() if id(p) in slot}


def _per_expert(state: dict[str, Tensor], prefix: str, n: int) -> list[str]:
    """Keys of `prefix`'s experts and router whose dim 0 is the expert."""
    heads = (f"{prefix}.experts.", f"{prefix}.router.")
    return [k for k, v in state.items() if k.startswith(heads) and v.dim() >= 1 and v.shape[0] == n]


def resize_state(
    model_state: dict[str, Tensor],
    optim_state: dict[str, Any] | None,
    slots: dict[str, int],
    plans: dict[str, ResizePlan],
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Apply each MoE layer's plan (keyed by prefix) to a whole-model state.

    `noise` > 0 adds N(0, (noise * std)^2) to the input projections of the second and later
    copies (std of that tensor), which breaks their symmetry at the cost of exactness.
    """
    model = dict(model_state)
    optim = None
    if optim_state is not None:
        optim = copy.copy(optim_state)
        optim["state"] = dict(optim_state["state"])
    for prefix, plan in plans.items():
        src = torch.tensor(plan.src, dtype=torch.int64)
        share = torch.tensor(plan.share(), dtype=torch.float32)
        first = [plan.src.index(s) == j for j, s in enumerate(plan.src)]
        for key in _per_expert(model_state, prefix, plan.n_before):
            out = key.rsplit(".", 1)[-1] in OUTPUT_PARAMS
            v = model_state[key].index_select(0, src).clone()
            grad_scale = None
            if v.is_floating_point() and key.startswith(f"{prefix}.experts."):
                scale = share.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))
                if out:
                    v = v / scale  # the copies' outputs add up to the source's
                else:
                    grad_scale = scale  # the copy's gradient is 1/share of the source's
                    if noise > 0:
                        late = torch.tensor([not f for f in first], dtype=torch.bool)
                        eps = torch.randn(v.shape, generator=generator, dtype=v.dtype)
                        std = model_state[key].std()
                        v[late] = v[late] + noise * std * eps[late]
            elif v.is_floating_point() and key.endswith(".proj.weight"):
                # the router row: the loss's gradient through a copy's gate is 1/share
                grad_scale = share.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))
            model[key] = v
            if optim is not None and key in slots and slots[key] in optim["state"]:
                st = dict(optim["state"][slots[key]])
                for name, m in st.items():
                    if not (isinstance(m, Tensor) and m.dim() > 0):
                        continue
                    m2 = m.index_select(0, src).clone()
                    if grad_scale is not None and name == "exp_avg":
                        m2 = m2 / grad_scale
                    elif grad_scale is not None and name in ("exp_avg_sq", "max_exp_avg_sq"):
                        m2 = m2 / grad_scale.square()
                    st[name] = m2
                optim["state"][slots[key]] = st
    return model, optim

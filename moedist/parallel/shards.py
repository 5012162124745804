"""Whole-model state <-> per-worker expert shards, for checkpoints and moving workers.

A distributed run saves the same checkpoint as a single-process run (one model.pt, one
optim.pt, full expert tensors), so eval, generate and resume work on it whatever the
number of workers, and a job can restart on a different number of workers. Only routed
expert tensors are sharded: dim 0 is the expert, and rank r holds the rows
`placement.local_experts(r)` in that order. Everything else is replicated and taken from
rank 0.

Expert entries are named by the worker that owns the model: `expert_keys` are state_dict
keys, `expert_slots` are optimiser state indices (position in the optimiser's parameter
list). Pure tensor bookkeeping: no torch.distributed, no ray.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moedist.model.moe import MoEBlock
from moedist.parallel.placement import ExpertPlacement

__all__ = [
    "ExpertRows",
    "assemble_shard",
    "dense_state",
    "expert_keys",
    "expert_part",
    "expert_slots",
    "merge_model_shards",
    "merge_optim_shards",
    "model_shard",
    "optim_shard",
    "rows_by_new_owner",
    "split_rows",
]


def _per_expert(v: Any) -> bool:
    """An optimiser-state entry of an expert parameter that has a row per expert (Adam's
    moments), not a scalar such as its step count (which is the same on every rank)."""
    return isinstance(v, Tensor) and v.dim() > 0


def expert_keys(model: nn.Module) -> list[str]:
    """state_dict keys of the routed experts' parameters (the sharded ones)."""
    keys = []
    for name, mod in model.named_modules():
        if isinstance(mod, MoEBlock):
            keys += [f"{name}.experts.{p}" for p, _ in mod.experts.named_parameters()]
    return keys


def expert_slots(model: nn.Module, opt: torch.optim.Optimizer) -> list[int]:
    """Optimiser state indices of the routed experts' parameters."""
    ids = {id(p) for name, mod in model.named_modules() if isinstance(mod, MoEBlock) for p in mod.experts.parameters()}
    flat = [p for g in opt.param_groups for p in g["params"]]
    return [i for i, p in enumerate(flat) if id(p) in ids]


def _merge_rows(parts: Sequence[Tensor], placement: ExpertPlacement, what: str) -> Tensor:
    full = parts[0].new_empty((placement.n_experts, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        local = placement.local_experts(rank)
        if part.shape[0] != len(local):
            raise ValueError(f"{what}: rank {rank} holds {part.shape[0]} experts, the placement gives it {len(local)}")
        full[torch.tensor(local, dtype=torch.int64)] = part
    return full


def _rows(full: Tensor, placement: ExpertPlacement, rank: int, what: str) -> Tensor:
    if full.shape[0] != placement.n_experts:
        raise ValueError(f"{what} has {full.shape[0]} experts, the placement places {placement.n_experts}")
    return full.index_select(0, torch.tensor(placement.local_experts(rank), dtype=torch.int64)).clone()


def merge_model_shards(
    shards: Sequence[dict[str, Tensor]], placement: ExpertPlacement, keys: Sequence[str]
) -> dict[str, Tensor]:
    """One whole-model state_dict from every rank's (rank order) shard state_dict."""
    if len(shards) != placement.world_size:
        raise ValueError(f"{len(shards)} shards for a placement over {placement.world_size} workers")
    full = dict(shards[0])
    for k in keys:
        full[k] = _merge_rows([s[k] for s in shards], placement, k)
    return full


def model_shard(
    full: dict[str, Tensor], placement: ExpertPlacement, rank: int, keys: Sequence[str]
) -> dict[str, Tensor]:
    """Rank `rank`'s shard of a whole-model state_dict."""
    out = dict(full)
    for k in keys:
        if k not in full:
            raise KeyError(f"state has no expert tensor '{k}'")
        out[k] = _rows(full[k], placement, rank, k)
    return out


def merge_optim_shards(
    shards: Sequence[dict[str, Any]], placement: ExpertPlacement, slots: Sequence[int]
) -> dict[str, Any]:
    """One whole-model optimiser state_dict from every rank's (per-parameter state such as
    Adam's moments is sliced like its parameter; scalars such as the step count are shared)."""
    if len(shards) != placement.world_size:
        raise ValueError(f"{len(shards)} optimiser shards for a placement over {placement.world_size} workers")
    full = copy.copy(shards[0])
    state = dict(full["state"])
    for i in slots:
        if i not in state:  # never stepped (no gradient yet): nothing to merge
            continue
        merged = dict(state[i])
        for name, v in state[i].items():
            if _per_expert(v):
                merged[name] = _merge_rows([s["state"][i][name] for s in shards], placement, f"optimiser {i}.{name}")
        state[i] = merged
    full["state"] = state
    return full


def optim_shard(full: dict[str, Any], placement: ExpertPlacement, rank: int, slots: Sequence[int]) -> dict[str, Any]:
    """Rank `rank`'s shard of a whole-model optimiser state_dict."""
    out = copy.copy(full)
    state = dict(full["state"])
    for i in slots:
        if i not in state:
            continue
        state[i] = {
            name: _rows(v, placement, rank, f"optimiser {i}.{name}") if _per_expert(v) else v
            for name, v in state[i].items()
        }
    out["state"] = state
    return out


# ------------------------------------------------------------------ live moves
@dataclass
class ExpertRows:
    """Some experts' rows of every expert tensor and optimiser slot (what one worker sends
    another when the placement changes). `experts` are global ids, in row order."""

    experts: list[int]
    model: dict[str, Tensor] = field(default_factory=dict)
    optim: dict[int, dict[str, Tensor]] = field(default_factory=dict)


def rows_by_new_owner(
    model_state: dict[str, Tensor],
    optim_state: dict[str, Any],
    keys: Sequence[str],
    slots: Sequence[int],
    old: ExpertPlacement,
    rank: int,
    new: ExpertPlacement,
) -> dict[int, ExpertRows]:
    """Split rank `rank`'s shard (under `old`) by each expert's owner under `new`.

    Returns {new owner: its rows}; the entry for `rank` itself (if it stays) holds the
    experts it keeps, the others are what must travel.
    """
    if old.n_experts != new.n_experts:
        raise ValueError(f"placements over {old.n_experts} and {new.n_experts} experts")
    mine = old.local_experts(rank)
    by_owner: dict[int, list[int]] = {}
    for e in mine:
        by_owner.setdefault(new.owner(e), []).append(e)
    out = {}
    for dest, experts in by_owner.items():
        idx = torch.tensor([old.local_index(e) for e in experts], dtype=torch.int64)
        part = ExpertRows(experts=experts)
        for k in keys:
            part.model[k] = model_state[k].index_select(0, idx).clone()
        for i in slots:
            if i in optim_state["state"]:  # slots never stepped have no state to move
                part.optim[i] = {n: v.index_select(0, idx).clone()
                                 for n, v in optim_state["state"][i].items() if _per_expert(v)}
        out[dest] = part
    return out


def dense_state(
    model_state: dict[str, Tensor], optim_state: dict[str, Any], keys: Sequence[str], slots: Sequence[int]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A replica's state without its expert rows (what a new worker needs from a peer)."""
    drop = set(keys)
    model = {k: v for k, v in model_state.items() if k not in drop}
    optim = copy.copy(optim_state)
    state = dict(optim_state["state"])
    for i in slots:
        if i in state:
            state[i] = {n: v for n, v in state[i].items() if not _per_expert(v)}
    optim["state"] = state
    return model, optim


def expert_part(
    model_state: dict[str, Tensor], optim_state: dict[str, Any], keys: Sequence[str], slots: Sequence[int]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Only a shard's expert rows (the complement of `dense_state`): what ranks other than
    0 send for a checkpoint, since merge_model_shards / merge_optim_shards take everything
    else from rank 0's shard."""
    model = {k: model_state[k] for k in keys}
    state = {i: {n: v for n, v in optim_state["state"][i].items() if _per_expert(v)}
             for i in slots if i in optim_state["state"]}  # fmt: skip
    return model, {"state": state}


def split_rows(
    model_state: dict[str, Tensor],
    optim_state: dict[str, Any],
    keys: Sequence[str],
    slots: Sequence[int],
    placement: ExpertPlacement,
) -> list[ExpertRows]:
    """Every rank's expert rows (rank order) of a whole-model state; with `dense_state` of the
    same state, `assemble_shard` turns them into the rank's shard. A whole model is the one
    shard of a single-worker placement, so this is `rows_by_new_owner` from that placement."""
    for k in keys:
        if model_state[k].shape[0] != placement.n_experts:
            raise ValueError(f"{k} has {model_state[k].shape[0]} experts, the placement places {placement.n_experts}")
    one = ExpertPlacement(placement.n_experts, 1)
    by_rank = rows_by_new_owner(model_state, optim_state, keys, slots, one, 0, placement)
    return [by_rank[r] for r in range(placement.world_size)]


def assemble_shard(
    dense_model: dict[str, Tensor],
    dense_optim: dict[str, Any],
    parts: Sequence[ExpertRows],
    keys: Sequence[str],
    slots: Sequence[int],
    new: ExpertPlacement,
    rank: int,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Rank `rank`'s (model, optimiser) state under `new`, from a replica's dense state
    (any rank's; its expert entries, if any, are replaced: `dense_state` strips them for
    sending) and the rows of exactly its experts."""
    want = new.local_experts(rank)
    have = sorted(e for p in parts for e in p.experts)
    if have != want:
        raise ValueError(f"rank {rank} under the new placement owns experts {want}, was given {have}")
    pos = {e: new.local_index(e) for e in want}
    model = dict(dense_model)
    for k in keys:
        ref = parts[0].model[k]
        full = ref.new_empty((len(want), *ref.shape[1:]))
        for p in parts:
            full[torch.tensor([pos[e] for e in p.experts], dtype=torch.int64)] = p.model[k]
        model[k] = full
    optim = copy.copy(dense_optim)
    state = dict(dense_optim["state"])
    for i in slots:
        if i not in state:
            continue
        merged = dict(state[i])  # scalars (Adam's step) are shared by every replica
        for name, ref in parts[0].optim.get(i, {}).items():
            full = ref.new_empty((len(want), *ref.shape[1:]))
            for p in parts:
                full[torch.tensor([pos[e] for e in p.experts], dtype=torch.int64)] = p.optim[i][name]
            merged[name] = full
        state[i] = merged
    optim["state"] = state
    return model, optim

"""Expert placement: which worker owns which routed expert.

Legend: E experts (global ids 0..E-1), W workers (ranks 0..W-1), L experts local to one
worker.

A placement is a plain table ``owner_E[e] = rank``. A worker's local experts are the
global ids it owns in ascending order; that order is the expert order of its
GroupedExperts shard (local index i holds global expert ``local_experts(rank)[i]``).
The same table is used for every MoE layer of a model.

Allowed tables: any assignment in which every worker owns at least one expert (a
GroupedExperts needs one). Workers may own different numbers of experts, so E need not
be divisible by W when an explicit table is given; only the default contiguous layout
requires it. Uneven tables work in the all-to-all dispatcher, but the busiest worker
sets the pace, so balanced tables are what a runtime normally wants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ExpertPlacement"]


class ExpertPlacement:
    """Expert -> worker table; contiguous blocks of E/W experts per worker by default."""

    def __init__(self, n_experts: int, world_size: int, owner_E: Sequence[int] | None = None):
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if owner_E is None:
            if n_experts % world_size != 0:
                raise ValueError(
                    f"the default contiguous placement needs n_experts divisible by world_size; got "
                    f"n_experts={n_experts}, world_size={world_size} (pass owner_E for an uneven table)"
                )
            per = n_experts // world_size
            owner_E = [e // per for e in range(n_experts)]
        owner = [int(w) for w in owner_E]
        if len(owner) != n_experts:
            raise ValueError(f"owner_E has {len(owner)} entries, expected n_experts={n_experts}")
        bad = [(e, w) for e, w in enumerate(owner) if not 0 <= w < world_size]
        if bad:
            e, w = bad[0]
            raise ValueError(f"owner_E[{e}] = {w} is not a rank in 0..{world_size - 1}")
        local: list[list[int]] = [[] for _ in range(world_size)]
        for e, w in enumerate(owner):
            local[w].append(e)
        idle = [w for w in range(world_size) if not local[w]]
        if idle:
            raise ValueError(f"owner_E gives no expert to rank(s) {idle}; every worker must own at least one")
        self.n_experts, self.world_size = n_experts, world_size
        self.owner_E: list[int] = owner
        self._local = local
        self._local_index = [0] * n_experts
        for experts in local:
            for i, e in enumerate(experts):
                self._local_index[e] = i

    @classmethod
    def blocks(cls, n_experts: int, world_size: int) -> ExpertPlacement:
        """Contiguous blocks whose sizes differ by at most one (the default table when
        world_size divides n_experts); needs world_size <= n_experts."""
        if not 1 <= world_size <= n_experts:
            raise ValueError(f"{world_size} workers cannot each own one of {n_experts} experts")
        base, extra = divmod(n_experts, world_size)
        owner = [w for w in range(world_size) for _ in range(base + (w < extra))]
        return cls(n_experts, world_size, owner)

    @classmethod
    def rebalance(cls, old: ExpertPlacement, world_size: int) -> ExpertPlacement:
        """A placement over `world_size` ranks, as balanced as `blocks`, that moves the fewest
        experts away from their owner under `old` (for changing the worker count live).

        Ranks 0..min(old.world_size, world_size) - 1 stay (same rank numbers); ranks from
        old.world_size on are new, ranks from world_size on leave. Every rank owns
        floor(E / N) or ceil(E / N) experts. A staying rank r can keep at most
        min(old count, quota) of its experts and others keep none, so the fewest moves are
        E - sum_r min(count_r, quota_r), reached by giving the E mod N larger quotas first to
        staying ranks that hold more than floor(E / N). Deterministic: ties go to the lower
        rank, a rank keeps its lowest expert ids, and the released experts (ascending id)
        fill the ranks that lack experts in rank order.
        """
        E, W, N = old.n_experts, old.world_size, world_size
        if not 1 <= N <= E:
            raise ValueError(f"{N} workers cannot each own one of {E} experts")
        base, extra = divmod(E, N)
        count = [old.n_local(r) if r < W else 0 for r in range(N)]
        # Which ranks get base + 1: those that would keep one more expert first, then by rank.
        ceil = set(sorted(range(N), key=lambda r: (count[r] <= base, r))[:extra])
        quota = [base + (r in ceil) for r in range(N)]
        owner = [-1] * E
        released: list[int] = []
        for r in range(W):
            experts = old.local_experts(r)
            keep = min(len(experts), quota[r]) if r < N else 0
            for e in experts[:keep]:
                owner[e] = r
            released += experts[keep:]
        released.sort()
        held = [min(count[r], quota[r]) for r in range(N)]
        it = iter(released)
        for r in range(N):
            for _ in range(quota[r] - held[r]):
                owner[next(it)] = r
        return cls(E, N, owner)

    # ----------------------------------------------------------------- queries
    def local_experts(self, rank: int) -> list[int]:
        """Global ids of the experts `rank` owns, in local order (ascending global id)."""
        self._check_rank(rank)
        return list(self._local[rank])

    def n_local(self, rank: int) -> int:
        """Number of experts `rank` owns."""
        self._check_rank(rank)
        return len(self._local[rank])

    def owner(self, e: int) -> int:
        """The rank that owns global expert e."""
        self._check_expert(e)
        return self.owner_E[e]

    def local_index(self, e: int) -> int:
        """Position of global expert e in its owner's shard."""
        self._check_expert(e)
        return self._local_index[e]

    @property
    def is_balanced(self) -> bool:
        """True when every worker owns the same number of experts."""
        return len({len(x) for x in self._local}) == 1

    def slot_E(self) -> list[int]:
        """Rank-major position of each global expert: experts of rank 0 in local order, then
        rank 1, ... Sorting assignments by slot groups them by destination worker and, within
        a worker, by its local expert index (the layout of an all-to-all send buffer)."""
        starts = [0] * self.world_size
        for w in range(1, self.world_size):
            starts[w] = starts[w - 1] + len(self._local[w - 1])
        return [starts[w] + self._local_index[e] for e, w in enumerate(self.owner_E)]

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (ints and lists only)."""
        return {"n_experts": self.n_experts, "world_size": self.world_size, "owner_E": list(self.owner_E)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertPlacement:
        """Inverse of to_dict (validated like the constructor)."""
        missing = {"n_experts", "world_size"} - set(data)
        if missing:
            raise ValueError(f"placement dict lacks {sorted(missing)}; got keys {sorted(data)}")
        return cls(int(data["n_experts"]), int(data["world_size"]), data.get("owner_E"))

    # ----------------------------------------------------------------- misc
    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range for world_size={self.world_size}")

    def _check_expert(self, e: int) -> None:
        if not 0 <= e < self.n_experts:
            raise IndexError(f"expert {e} out of range for n_experts={self.n_experts}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertPlacement):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.n_experts, self.world_size, tuple(self.owner_E)))

    def __repr__(self) -> str:
        return f"ExpertPlacement(n_experts={self.n_experts}, world_size={self.world_size}, owner_E={self.owner_E})"

"""ExpertPlacement.rebalance: the placement for a new worker count that moves the fewest
experts. Oracles: an exhaustive search over every table (tiny cases) and, for larger
ones, the best over every choice of which ranks get the larger share (a staying rank can
keep at most min(its experts, its share), other ranks keep none)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from moedist.parallel.expert_parallel import experts_on_node
from moedist.parallel.placement import ExpertPlacement


def moves(old: ExpertPlacement, new: ExpertPlacement) -> int:
    """Experts whose owner changes (a leaving rank's experts all change owner)."""
    return sum(old.owner(e) != new.owner(e) for e in range(old.n_experts))


def fewest_moves(old: ExpertPlacement, N: int) -> int:
    """Independent oracle: try every set of E mod N ranks that get the larger share."""
    E, W = old.n_experts, old.world_size
    base, extra = divmod(E, N)
    best = 0
    for ceil in itertools.combinations(range(N), extra):
        keep = sum(min(old.n_local(r), base + (r in ceil)) for r in range(min(W, N)))
        best = max(best, keep)
    return E - best


def balanced(p: ExpertPlacement) -> bool:
    """Shares of floor/ceil(E/N), as many of each as `blocks` has."""
    want = sorted(ExpertPlacement.blocks(p.n_experts, p.world_size).n_local(r) for r in range(p.world_size))
    return sorted(p.n_local(r) for r in range(p.world_size)) == want


def random_table(E: int, W: int, rng: random.Random, uneven: bool) -> ExpertPlacement:
    """A random table in which every rank owns at least one expert (uneven: any sizes)."""
    if uneven:
        owner = list(range(W)) + [rng.randrange(W) for _ in range(E - W)]
    else:
        owner = ExpertPlacement.blocks(E, W).owner_E
    rng.shuffle(owner)
    return ExpertPlacement(E, W, owner)


CASES = [(E, W, N) for E in (1, 2, 3, 5, 7, 8, 11, 12, 16, 17, 24, 31, 64) for W in range(1, 9) for N in range(1, 9)
         if W <= E and N <= E]  # fmt: skip


@pytest.mark.parametrize(("E", "W", "N"), CASES)
def test_rebalance_is_balanced_and_moves_the_fewest_experts(E, W, N):
    rng = random.Random(E * 100 + W * 10 + N)
    olds = [ExpertPlacement.blocks(E, W)] + [random_table(E, W, rng, uneven=i % 2 == 1) for i in range(6)]
    for old in olds:
        new = ExpertPlacement.rebalance(old, N)
        assert (new.n_experts, new.world_size) == (E, N)
        assert balanced(new), (old, new)
        assert moves(old, new) == fewest_moves(old, N), (old, new)
        # staying ranks keep min(count, share) of their own experts; new ranks only receive
        for r in range(N):
            kept = set(new.local_experts(r)) & (set(old.local_experts(r)) if r < W else set())
            assert len(kept) == (min(old.n_local(r), new.n_local(r)) if r < W else 0)


def test_the_oracle_equals_an_exhaustive_search_on_tiny_cases():
    """fewest_moves (used above) against every balanced table over N ranks."""
    rng = random.Random(0)
    for E in range(1, 7):
        for W in range(1, E + 1):
            for N in range(1, min(E, 4) + 1):
                old = random_table(E, W, rng, uneven=True)
                best = min(moves(old, ExpertPlacement(E, N, t))
                           for t in itertools.product(range(N), repeat=E)
                           if len(set(t)) == N and balanced(ExpertPlacement(E, N, t)))  # fmt: skip
                assert best == fewest_moves(old, N), (old, N)
                assert moves(old, ExpertPlacement.rebalance(old, N)) == best


@pytest.mark.parametrize(
    ("E", "W", "N", "moved", "owner"),
    [
        # 2 -> 4: each new rank takes the top half of one old rank (4 moves, blocks: 6)
        (8, 2, 4, 4, [0, 0, 2, 2, 1, 1, 3, 3]),
        # 4 -> 3: the leaving rank's 2 experts go to ranks 0 and 1 (blocks: 5 moves)
        (8, 4, 3, 2, [0, 0, 1, 1, 2, 2, 0, 1]),
        # 2 -> 4 with 16 experts: 8 moves (blocks: 12)
        (16, 2, 4, 8, [0] * 4 + [2] * 4 + [1] * 4 + [3] * 4),
        # 3 -> 2 with 11 experts (4|4|3): 3 moves, shares 6|5
        (11, 3, 2, 3, [0] * 4 + [1] * 4 + [0, 0, 1]),
        # same count: nothing moves
        (11, 3, 3, 0, ExpertPlacement.blocks(11, 3).owner_E),
    ],
)
def test_rebalance_of_blocks_examples(E, W, N, moved, owner):
    new = ExpertPlacement.rebalance(ExpertPlacement.blocks(E, W), N)
    assert new.owner_E == owner
    assert moves(ExpertPlacement.blocks(E, W), new) == moved


def test_rebalance_is_deterministic_and_round_trips():
    rng = random.Random(3)
    old = random_table(31, 5, rng, uneven=True)
    a, b = ExpertPlacement.rebalance(old, 7), ExpertPlacement.rebalance(ExpertPlacement.from_dict(old.to_dict()), 7)
    assert a == b and a.owner_E == b.owner_E
    assert ExpertPlacement.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    # growing and shrinking back returns the blocks (released experts fill ranks in order)
    blocks = ExpertPlacement.blocks(16, 2)
    assert ExpertPlacement.rebalance(ExpertPlacement.rebalance(blocks, 4), 2) == blocks
    # an unbalanced table on the same count is balanced with the fewest moves
    skew = ExpertPlacement(6, 2, [0, 0, 0, 0, 0, 1])
    assert ExpertPlacement.rebalance(skew, 2).owner_E == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("N", [0, 9])
def test_rebalance_refuses_counts_that_leave_a_rank_without_experts(N):
    with pytest.raises(ValueError, match=f"{N} workers cannot each own one of 8 experts"):
        ExpertPlacement.rebalance(ExpertPlacement.blocks(8, 2), N)


def test_non_contiguous_tables_downstream_helpers():
    """What routers (Router.attach) and the dispatcher read from a rebalanced, non-contiguous
    table: experts on this rank's node, rank-major slots."""
    p = ExpertPlacement.rebalance(ExpertPlacement.blocks(8, 4), 3)  # [0,0,1,1,2,2,0,1]
    nodes = ["a", "a", "b"]
    assert experts_on_node(p, 0, nodes).tolist() == [True, True, True, True, False, False, True, True]
    assert experts_on_node(p, 2, nodes).tolist() == [False, False, False, False, True, True, False, False]
    # slots: rank 0 holds 0,1,6 (slots 0-2), rank 1 holds 2,3,7 (3-5), rank 2 holds 4,5 (6-7)
    assert p.slot_E() == [0, 1, 3, 4, 6, 7, 2, 5]
    assert [p.local_index(e) for e in range(8)] == [0, 1, 0, 1, 0, 1, 2, 2]
    assert torch.equal(torch.tensor(p.slot_E()).argsort(), torch.tensor([0, 1, 6, 2, 3, 7, 4, 5]))

"""Shared fixtures for tests/distributed (the helpers themselves live in tests/distributed/_mp.py)."""

from __future__ import annotations

import pytest

from tests.distributed._mp import GlooPools


@pytest.fixture(scope="module")
def gloo_pools():
    """Spawned gloo process groups on loopback, one per world size, for the module:
    ``gloo_pools.run(world, fn, *args)`` runs fn(rank, world, *args) on every rank."""
    pools = GlooPools()
    yield pools
    pools.close()

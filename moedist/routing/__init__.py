"""Routers: one file each, one interface (Router -> RoutingPlan)."""

from __future__ import annotations

from moedist.config import RouterConfig
from moedist.routing.aoe import AutonomyRouter
from moedist.routing.base import LocalPoolOps, PoolOps, Router, RoutingPlan
from moedist.routing.ec import ExpertChoiceRouter
from moedist.routing.et import ExpertThresholdRouter
from moedist.routing.etr import ResonanceRouter
from moedist.routing.lf import LossFreeRouter
from moedist.routing.tc import TokenChoiceRouter

ROUTER_CLASSES: dict[str, type[Router]] = {
    "tc": TokenChoiceRouter,
    "lf": LossFreeRouter,
    "ec": ExpertChoiceRouter,
    "et": ExpertThresholdRouter,
    "aoe": AutonomyRouter,
    "etr": ResonanceRouter,
}


def make_router(cfg: RouterConfig, d_model: int, n_experts: int, init_std: float = 0.02) -> Router:
    """Build the router named by cfg.kind ('dense' has no router)."""
    try:
        cls = ROUTER_CLASSES[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown router '{cfg.kind}' (available: {', '.join(ROUTER_CLASSES)})") from None
    return cls(d_model, n_experts, cfg, init_std)


__all__ = [
    "ROUTER_CLASSES",
    "LocalPoolOps",
    "PoolOps",
    "Router",
    "RoutingPlan",
    "make_router",
]

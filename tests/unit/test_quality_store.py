"""benchmarks/quality.py's run store: a stored run is found under every variant name that
resolves to the same training run, and never under one that trains differently."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality

COMMON = quality.merge({}, {"train": {"eval_every": 0, "progress": False, "threads": 1}})


def digest(v: quality.Variant, seed: int = 0, steps: int = 1000) -> str:
    return quality.run_digest(v, seed, steps, 100, COMMON)


def test_a_gate_named_as_the_routers_default_shares_the_default_runs():
    tc = quality.Variant("tc", "tc")
    spelled = quality.Variant("tc softmax aux 0.01", "tc", over={"router": {"gate": "softmax", "aux_loss_coef": 0.01}})
    et = quality.Variant("et", "et")
    et_sigmoid = quality.Variant("et sigmoid", "et", over={"router": {"gate": "sigmoid"}})
    assert digest(spelled) == digest(tc) and digest(spelled, seed=1) == digest(tc, seed=1)
    assert digest(et_sigmoid) == digest(et)


def test_anything_that_changes_the_run_changes_the_key():
    tc, et = quality.Variant("tc", "tc"), quality.Variant("et", "et")
    keys = {
        digest(tc),
        digest(tc, seed=1),
        digest(tc, steps=999),
        digest(quality.Variant("tc sigmoid", "tc", over={"router": {"gate": "sigmoid"}})),
        digest(quality.Variant("tc aux 0.001", "tc", over={"router": {"aux_loss_coef": 0.001}})),
        digest(quality.Variant("tc paper", "tc", "paper")),
        digest(et),
        digest(quality.Variant("et softmax gate", "et", over={"router": {"gate": "softmax"}})),
    }
    assert len(keys) == 8

"""Config validation: cross-field checks, tables given values, integers out of range."""

from __future__ import annotations

from pathlib import Path

import pytest

from moedist.config import ConfigError, build_config, from_dict


def _cfg(**sections) -> dict:
    """A config dict from the tiny preset plus `sections` ({"model": {...}, ...})."""
    return {"preset": "tiny", **sections}


def test_valid_configs_pass():
    cfg = build_config(None, None, None, ["model.d_model=64", "model.n_heads=4", "workers=2", "model.n_experts=8"])
    assert cfg.model.d_model == 64 and cfg.workers == 2


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["model.d_model=96", "model.n_heads=5"], r"model.d_model \(96\) must be divisible by model.n_heads \(5\)"),
        # 96 / 32 = 3: rotary embeddings rotate pairs of dimensions
        (["model.d_model=96", "model.n_heads=32"], r"model.d_model / model.n_heads \(96 / 32 = 3\) must be even"),
        (["router.top_k=5", "model.n_experts=4"], r"router.top_k \(5\) must be <= model.n_experts \(4\)"),
        (["train.batch_size=10", "train.micro_batches=4"],
         r"train.batch_size \(10\) must be divisible by train.micro_batches \(4\)"),
        (["train.batch_size=12", "train.micro_batches=2", "workers=4"],
         r"train.batch_size \(12\) must be divisible by train.micro_batches x workers \(2 x 4\)"),
        # the expert-parallel placement gives every worker at least one expert
        (["workers=4", "model.n_experts=2"], r"model.n_experts \(2\) must be >= workers \(4\)"),
    ],
)  # fmt: skip
def test_cross_field_checks_name_both_fields(sets: list[str], match: str):
    with pytest.raises(ConfigError, match=match):
        build_config(None, None, None, sets)


def test_top_k_is_not_checked_for_the_dense_router():
    cfg = build_config(None, None, None, ["router.kind=dense", "router.top_k=8", "model.n_experts=4"])
    assert cfg.router.kind == "dense"


def test_experts_divisible_by_workers_passes_and_one_worker_needs_nothing():
    assert build_config(None, None, None, ["workers=4", "model.n_experts=8"]).workers == 4
    assert build_config(None, None, None, ["workers=4", "model.n_experts=6"]).workers == 4  # uneven blocks
    assert build_config(None, None, None, ["workers=1", "model.n_experts=3"]).model.n_experts == 3


def test_a_table_given_a_value_in_the_file_is_an_error_even_when_a_flag_sets_that_table(tmp_path: Path):
    f = tmp_path / "run.toml"
    f.write_text("train = 3\n")
    # without a flag the field check names it; with one (--steps 5) the merge used to drop it
    for overrides in (None, {"train": {"steps": 5}}):
        with pytest.raises(ConfigError, match=r"train: expected a table, got 3"):
            build_config(None, f, overrides)
    f.write_text("[model]\nd_model = 64\n[router]\nkind = 'et'\n[train]\nsteps = 4\n")
    assert build_config(None, f, {"train": {"seed": 1}}).train.steps == 4


def test_a_table_given_a_value_by_set_is_an_error():
    with pytest.raises(ConfigError, match=r"--set 'train=3': train: expected a table, got 3"):
        build_config(None, None, {"train": {"steps": 5}}, ["train=3"])


@pytest.mark.parametrize("value", [2**64 + 1, 2**63, -(2**63) - 1])
def test_integers_outside_64_bits_are_refused(value: int):
    with pytest.raises(ConfigError, match=r"train.seed: .* is out of range"):
        from_dict(_cfg(train={"seed": value}))


def test_largest_seed_is_accepted():
    assert from_dict(_cfg(train={"seed": 2**63 - 1})).train.seed == 2**63 - 1

"""Config validation: cross-field checks (also through the CLI), tables given values, integers out of range."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomli_w

from moedist.cli import main
from moedist.config import ConfigError, build_config, deep_update, from_dict, parse_override, to_dict
from moedist.training.loop import write_config


def _cfg(**sections) -> dict:
    """A config dict from the tiny preset plus `sections` ({"model": {...}, ...})."""
    return {"preset": "tiny", **sections}


def test_valid_configs_pass():
    cfg = build_config(None, None, None, ["model.d_model=64", "model.n_heads=4", "workers=2", "model.n_experts=8"])
    assert cfg.model.d_model == 64 and cfg.workers == 2


# Every cross-field check of config.validate: (--set items, the one-line error it gives).
CROSS_FIELD = {
    "d_model_by_heads": (["model.d_model=96", "model.n_heads=5"],
                         "model.d_model (96) must be divisible by model.n_heads (5)"),
    # 96 / 32 = 3: rotary embeddings rotate pairs of dimensions
    "head_dim_even": (["model.d_model=96", "model.n_heads=32"],
                      "model.d_model / model.n_heads (96 / 32 = 3) must be even"),
    "top_k_by_experts": (["router.top_k=5", "model.n_experts=4"], "router.top_k (5) must be <= model.n_experts (4)"),
    "batch_by_micro": (["train.batch_size=10", "train.micro_batches=4"],
                       "train.batch_size (10) must be divisible by train.micro_batches (4)"),
    "batch_by_micro_x_workers": (["train.batch_size=12", "train.micro_batches=2", "workers=4"],
                                 "train.batch_size (12) must be divisible by train.micro_batches x workers (2 x 4)"),
    # the expert-parallel placement gives every worker at least one expert
    "experts_by_workers": (["workers=4", "model.n_experts=2"], "model.n_experts (2) must be >= workers (4)"),
    # ETR's fixed affinity averages one slice of the model's dimensions per expert
    "etr_experts_by_d_model": (["router.kind=etr", "model.d_model=32", "model.n_heads=2", "model.n_experts=40"],
                               "model.n_experts (40) must be <= model.d_model (32) for router.kind etr"),
    # AoE's param-matched expert width (tiny preset: d_model 128, relu2 experts of width 256) goes below 1
    "aoe_d_low_by_d_model": (["router.kind=aoe", "router.aoe_d_low=1000"],
                             "router.aoe_d_low (1000) leaves no room for the expert with model.d_model (128)"),
}  # fmt: skip


def _fields(message: str) -> list[str]:
    """The dotted config fields (and `workers`) a message names."""
    return [w for w in re.findall(r"[a-z_]+\.[a-z_0-9]+|\bworkers\b", message) if w.split(".")[0] in
            ("model", "router", "train", "workers")]  # fmt: skip


@pytest.mark.parametrize("case", CROSS_FIELD)
def test_cross_field_checks_name_both_fields(case: str):
    sets, message = CROSS_FIELD[case]
    assert len(set(_fields(message))) >= 2, message  # the check names every field it relates
    with pytest.raises(ConfigError) as e:
        build_config(None, None, None, sets)
    assert message in str(e.value) and "\n" not in str(e.value)
    # the same values from a dict (a run's config.toml on --resume, a checkpoint's config)
    data: dict = {"preset": "tiny"}
    for item in sets:
        deep_update(data, parse_override(item))
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(deep_update(to_dict(build_config()), data))


@pytest.fixture
def nothing_may_start(monkeypatch):
    """Starting Ray, building a Trainer or reading data fails the test: a bad config must be
    refused first."""

    def forbidden(what: str):
        def fail(*a, **k):
            raise AssertionError(f"{what} started before the config was checked")

        return fail

    monkeypatch.setattr("moedist.runtime.cluster.connect", forbidden("Ray"))
    monkeypatch.setattr("moedist.training.trainer.Trainer.__init__", forbidden("a Trainer"))
    monkeypatch.setattr("moedist.training.trainer.load_dataset", forbidden("loading the data"))


def _one_error_line(capsys, argv: list[str]) -> str:
    """`moedist ARGV` exits with status 2 and prints one line `moedist: error: ...` (no traceback)."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moedist: error: "), err
    assert "Traceback" not in err + out
    return lines[0]


@pytest.mark.parametrize("route", ["set", "config_file", "resume"])
@pytest.mark.parametrize("case", CROSS_FIELD)
def test_cross_field_errors_from_the_cli(case: str, route: str, tmp_path: Path, capsys, nothing_may_start):
    """Through `moedist train` (--set, a --config file, or --set on --resume of a run):
    exit 2, one line naming the fields, before Ray, the data or a Trainer start, and no run
    folder written (a resumed run's config.toml is left as it was)."""
    sets, message = CROSS_FIELD[case]
    out = tmp_path / "run"
    if route == "set":
        argv = ["train", "--out", str(out), *[a for item in sets for a in ("--set", item)]]
    elif route == "config_file":
        data: dict = {}
        for item in sets:
            deep_update(data, parse_override(item))
        cfg_file = tmp_path / "bad.toml"
        cfg_file.write_text(tomli_w.dumps(data))
        argv = ["train", "--out", str(out), "--config", str(cfg_file)]
    else:
        write_config(out, build_config())  # a valid run folder (config.toml)
        before = (out / "config.toml").read_text()
        argv = ["train", "--resume", str(out), *[a for item in sets for a in ("--set", item)]]
    line = _one_error_line(capsys, argv)
    assert message in line
    if route == "resume":
        assert (out / "config.toml").read_text() == before and sorted(p.name for p in out.iterdir()) == [
            "config.toml", "plots"]  # fmt: skip
    else:
        assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--resume", "RUN", "--out", "OTHER"], "--out: cannot be used with --resume"),
        (["train", "--resume", "RUN", "--preset", "tiny"], "--preset: cannot be used with --resume"),
        (["train", "--resume", "RUN", "--config", "RUN/config.toml"], "--config: cannot be used with --resume"),
        (["eval", "--run", "RUN", "--task", "code"], "--task needs --experts-from"),
        (["eval", "--run", "RUN", "--experts-from", "SIG"], "--experts-from needs --task"),
        (["eval", "--run", "RUN", "--experts-from", "SIG", "--task", "code", "--keep", "0"],
         "--keep: must be in (0, 1]"),
        (["generate", "--run", "RUN", "--prompt", "x", "--task", "code"], "--task needs --experts-from"),
        (["generate", "--run", "RUN", "--prompt", "x", "--experts-from", "SIG"], "--experts-from needs --task"),
        (["generate", "--run", "RUN", "--prompt", "x", "--experts-from", "SIG", "--task", "code", "--keep", "1.5"],
         "--keep: must be in (0, 1]"),
    ],
)  # fmt: skip
def test_flags_that_go_together_are_checked_first(argv: list[str], message: str, tmp_path: Path, capsys,
                                                  nothing_may_start, monkeypatch):  # fmt: skip
    """Cross-flag checks of cli_checks: refused before a run, checkpoint or signature
    folder is read (RUN and SIG do not exist: their errors would come later)."""

    def no_loading(*a, **k):
        raise AssertionError("a run was loaded before the flags were checked")

    monkeypatch.setattr("moedist.training.trainer.load_trained", no_loading)
    argv = [a.replace("RUN", str(tmp_path / "run")).replace("OTHER", str(tmp_path / "o")).replace(
        "SIG", str(tmp_path / "sig")) for a in argv]  # fmt: skip
    assert message in _one_error_line(capsys, argv)
    assert not any(tmp_path.iterdir())


def test_tiny_paper_preset_is_tiny_with_the_et_papers_router_settings():
    """`--preset tiny-paper`: the tiny model and schedule, routers as the ET paper's
    baselines (sigmoid gates, TC not renormalised with aux 0.001, LF bias on logits)."""
    tiny, paper = build_config("tiny"), build_config("tiny-paper")
    assert to_dict(paper)["model"] == to_dict(tiny)["model"] and to_dict(paper)["train"] == to_dict(tiny)["train"]
    r = paper.router
    assert (r.gate, r.normalize_weights, r.aux_loss_coef, r.lf_bias_on) == ("sigmoid", False, 0.001, "logits")
    assert (tiny.router.gate, tiny.router.normalize_weights, tiny.router.aux_loss_coef, tiny.router.lf_bias_on) == (
        "auto", True, 0.01, "scores")  # moedist's defaults are unchanged  # fmt: skip
    diff = {k for k, v in to_dict(r).items() if to_dict(tiny.router)[k] != v}
    assert diff == {"gate", "normalize_weights", "aux_loss_coef", "lf_bias_on"}
    assert build_config("tiny-paper", None, {"router": {"kind": "tc"}}).router.kind == "tc"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["router.lf_bias_on=bias"], "router.lf_bias_on: 'bias' is not one of: scores, logits"),
        (["router.aoe_renormalize=1"], "router.aoe_renormalize: expected true/false, got 1"),
        (["router.etr_capacity_floor=yes"], "router.etr_capacity_floor: expected true/false, got 'yes'"),
        (["router.etr_aux_loss_coef=-0.1"], "router.etr_aux_loss_coef: must be >= 0.0, got -0.1"),
        (["router.etr_capacity_factor=-1"], "router.etr_capacity_factor: must be >= 0.0, got -1.0"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("preset", ["tiny", "tiny-paper"])
def test_bad_router_switches_are_refused_before_anything_starts(sets, message, preset, tmp_path: Path, capsys,
                                                                nothing_may_start):  # fmt: skip
    out = tmp_path / "run"
    argv = ["train", "--preset", preset, "--out", str(out), *[a for item in sets for a in ("--set", item)]]
    assert message in _one_error_line(capsys, argv)
    assert not out.exists()


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


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"log": "tensorboard,tb"}, "profile.log: 'tb' is not one of: tensorboard, wandb, wandb:offline, wandb:online"),
        ({"log": "tensorboard,tensorboard"}, "profile.log: 'tensorboard,tensorboard' names a sink twice"),
        ({"torch_profile": "2-x"}, "profile.torch_profile: '2-x' is not a step range A-B (e.g. 10-12) or a step A"),
        ({"torch_profile": "4"}, "profile.torch_profile: step 4 is past the run's last step (train.steps = 4"),
    ],
)
def test_profile_sinks_and_torch_profile_steps_are_checked(profile: dict, message: str):
    """From a dict too (a config file, a resumed run's config.toml), not only the CLI."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(_cfg(profile=profile, train={"steps": 4}))


def test_profile_sinks_and_torch_profile_steps_parse():
    cfg = from_dict(_cfg(profile={"log": " tensorboard , wandb:online", "torch_profile": "1 - 3"}, train={"steps": 4}))
    from moedist.training.sinks import parse_log
    from moedist.training.torch_profile import parse_window

    assert parse_log(cfg.profile.log) == ["tensorboard", "wandb:online"] and parse_log("") == []
    assert parse_window(cfg.profile.torch_profile) == (1, 3) and parse_window("2") == (2, 2)
    assert parse_window("") is None

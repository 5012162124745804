"""The Ray runtime end to end on loopback: N workers == 1 worker (every metrics column),
resuming on other worker counts, clean failure when workers cannot be placed or die."""

from __future__ import annotations

import json
import math
import shutil
import time
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray

from moedist.config import build_config
from moedist.runtime.coordinator import Coordinator, PlacementTimeoutError, WorkerDiedError
from moedist.training.evaluate import evaluate
from moedist.training.loop import TIMING_KEYS, RunLoop, single_process_loop, write_config
from moedist.training.profile import PROFILE_KEYS, SPAN_COLUMNS
from moedist.training.trainer import Trainer, load_dataset, load_trained, resume_config
from tests.sink_helpers import assert_tensorboard_equals_metrics

# Tiny on purpose: what is tested is the exchange of tokens and statistics, not learning.
SMALL = {
    "model": {"d_model": 32, "n_heads": 2, "n_layers": 2, "seq_len": 32, "n_experts": 8, "first_layer_dense": False},
    "train": {"batch_size": 8, "eval_every": 0, "eval_tokens": 1024, "progress": False, "warmup_steps": 2,
              "grad_clip": 1.0},
    "router": {"top_k": 1, "et_warmup_steps": 4, "et_beta": 0.9, "aux_loss_coef": 0.01},
}  # fmt: skip
STEPS = 10

# Cases beyond a router's defaults: name -> (router, overrides of SMALL).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # a TC capacity that binds: tokens over ceil(N/E) are dropped in global token order
    "tc-cap": ("tc", {"router": {"capacity_factor": 1.0}}),
    # each worker routes its share of each micro-batch; ET's cutoff pools the whole step
    "et-mb2": ("et", {"train": {"micro_batches": 2}}),
}


def cfg_for(case: str, workers: int, steps: int = STEPS, data: str = ""):
    router, extra = CASES.get(case, (case, {}))
    over = json.loads(json.dumps(SMALL))
    over["data"] = {"path": data}
    over["router"]["kind"] = router
    if router == "etr":  # a capacity that binds, so the global capacity path is exercised
        over["router"]["etr_capacity_factor"] = 1.0
        over["router"]["etr_capacity_floor"] = False
    for table, values in extra.items():
        over[table].update(values)
    over["train"]["steps"] = steps
    over["workers"] = workers
    return build_config("tiny", None, over)


# Metrics columns that are not compared between runs: wall-clock seconds and the rate
# derived from them. Every other column is compared (see COLUMN_RULES); a column with no
# rule fails the comparison, so a new column is never skipped silently.
# The step profile's columns (spans, bytes, collectives: a single process has no exchanges).
NOT_COMPARED = frozenset(TIMING_KEYS) | {"tokens_per_s"} | PROFILE_KEYS
# Only expert-parallel rows have it; each test checks it against the workers it ran.
WORKERS_KEY = "workers"
# Step 0 runs on identical weights and EP's forward pass is bitwise that of one process;
# later weights differ in the last bits (gradients are summed in another order), and
# losses are means of per-worker sums: floats match to a relative tolerance. Measured
# worst over every case (10 steps): 2.8e-7 (grad_norm), 1.8e-7 (loss), 1.8e-7 (aux_loss);
# thresholds 5.4e-7 absolute on 0.119 (4.5e-6 relative), 1.9e-5 relative on 0.00053 (1e-8
# absolute).
FLOAT_TOL = {"rel": 2e-6, "abs": 0.0}
THRESHOLD_TOL = {"rel": 2e-5, "abs": 2e-7}


def column_rule(key: str) -> str:
    """How a metrics column is compared: 'exact' for decisions and counts (identical
    routing gives identical loads, fan-outs and capacity drops), 'float' for values that
    carry the last-bit differences of the weights."""
    if key in ("step", "tokens", "lr", "skipped") or key.endswith(("_load", "_fanout", "_capped", "_bias")):
        return "exact"  # LF's bias moves by +-u on the (exact) loads
    if key in ("loss", "aux_loss", "grad_norm", "val_loss") or key.endswith("_threshold"):
        return "float"
    raise AssertionError(f"metrics column {key!r} has no comparison rule: add one to column_rule")


def assert_rows_match(ref: list[dict], rows: list[dict]) -> None:
    """Every column of every row of `rows` equals the reference's (NOT_COMPARED and
    WORKERS_KEY aside): decisions exactly, floats to FLOAT_TOL, thresholds to THRESHOLD_TOL
    (the first MoE layer's exactly at step 0)."""
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    # Step 0's cutoffs of the first MoE layer come from identical weights and the dense
    # per-token math: exact too. A later layer's input has been through expert GEMMs over
    # other row groupings, whose last bits depend on the BLAS kernel (exact on one Intel
    # host, 1 ulp apart on an AMD EPYC one).
    first = min((k for k in ref[0] if k.endswith("_threshold")), key=lambda k: int(k[1:].split("_")[0]), default=None)
    for a, b in zip(ref, rows, strict=True):
        keys = set(a) - NOT_COMPARED - {WORKERS_KEY}
        assert set(b) - NOT_COMPARED - {WORKERS_KEY} == keys, (a["step"], set(a) ^ set(b))
        for k in sorted(keys):
            where = (a["step"], k, a[k], b[k])
            if column_rule(k) == "exact" or (a["step"] == 0 and k == first):
                assert b[k] == a[k], where
            elif isinstance(a[k], list):  # thresholds
                assert b[k] == pytest.approx(a[k], **THRESHOLD_TOL), where
            elif a[k] is None or b[k] is None:
                assert a[k] is b[k], where
            else:
                assert b[k] == pytest.approx(a[k], **FLOAT_TOL) and math.isfinite(a[k]), where


def assert_capacity_binds(rows: list[dict]) -> None:
    """A run with a capacity (ET's guard, ETR's or TC's capacity) changed some routing
    decision in some step, so its cross-rank path was exercised."""
    capped = [k for k in rows[0] if k.endswith("_capped")]
    assert capped, sorted(rows[0])
    assert any(sum(r[k]) > 0 for r in rows for k in capped), [[r[k] for k in capped] for r in rows]


@pytest.fixture(scope="module")
def local_ray():
    """One single-node Ray instance on 127.0.0.2 for the module (4 logical CPUs)."""
    ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    yield
    ray.shutdown()


_single: dict[str, tuple[list[dict], Trainer]] = {}


def single_process_run(case: str, data: str, steps: int = STEPS) -> tuple[list[dict], Trainer]:
    """Metric rows of a single-process run (no run folder) and its trainer, cached per
    (case, steps)."""
    key = f"{case}-{steps}"
    if key not in _single:
        cfg = cfg_for(case, 1, steps=steps, data=data)
        tr = Trainer(cfg, load_dataset(cfg))
        _single[key] = ([tr.train_step() for _ in range(steps)], tr)
    return _single[key]


def assert_no_leftovers():
    from ray.util.placement_group import placement_group_table

    live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert live == [], live
    # list_named_actors reads the GCS directly (the state API would need the dashboard).
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("moedist-")]
    assert alive == [], alive


# ET and TC at 2 workers are covered by their harder cases (et-mb2: two micro-batches per
# step; tc-cap: a capacity that drops tokens) and ET's plain path at 4 workers; every job
# costs seconds of worker start-up, so plain duplicates are left out.
N_WORKERS_CASES = [("et", 4), ("ec", 4), ("aoe", 2), ("etr", 2), ("lf", 2), ("tc-cap", 2), ("et-mb2", 2)]


@pytest.mark.parametrize(("case", "workers"), N_WORKERS_CASES)
def test_n_workers_equal_one_worker(local_ray, random_text, case, workers):
    ref, _ = single_process_run(case, random_text)
    coord = Coordinator(cfg_for(case, workers, data=random_text), strategy="SPREAD", start_timeout_s=120)
    try:
        infos = coord.start()
        assert sorted(i["rank"] for i in infos) == list(range(workers))
        rows = [coord.train_step() for _ in range(STEPS)]
    finally:
        coord.shutdown()
    assert [r[WORKERS_KEY] for r in rows] == [workers] * STEPS
    assert_rows_match(ref, rows)
    if any(k.endswith("_capped") for k in ref[0]):
        assert_capacity_binds(ref)
    assert_no_leftovers()


def test_job_writes_the_run_folder(local_ray, random_text, tmp_path, capsys):
    cfg = cfg_for("et", 2, steps=6, data=random_text)
    cfg.profile.torch_profile, cfg.profile.log = "2-3", "tensorboard"  # traces of every rank; rows to TensorBoard
    cfg.profile.trace_steps = "2-3"
    coord = Coordinator(cfg, start_timeout_s=120)
    try:
        coord.start()
        loop = RunLoop(cfg, tmp_path / "run", coord, load_dataset(cfg).tokenizer.to_spec())
        write_config(tmp_path / "run", cfg)
        summary = loop.run()
    finally:
        coord.shutdown()
    assert summary["workers"] == 2 and summary["steps"] == 6 and summary["final_val_loss"] > 0
    rows = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
    assert len(rows) == 6
    # every step exchanged tokens and pool statistics and synced gradients, and said how long
    assert all(r["a2a_s"] > 0 and r["pool_s"] > 0 and r["grad_sync_s"] > 0 for r in rows)
    # Each column is the slowest rank's, maybe not the same rank's: comm_s (the largest sum)
    # bounds each part, not the sum of the parts' maxima (under load that sum was larger).
    assert all(r["comm_s"] >= max(r["a2a_s"], r["pool_s"], r["grad_sync_s"]) and r["compute_s"] > 0 for r in rows)
    assert summary["nodes"] == 1 and summary["comm_s_per_step"] > 0 and summary["a2a_s_per_step"] > 0
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()
    # each worker's torch.profiler trace came back to the driver, one per rank
    traces = sorted((tmp_path / "run" / "torch_profile").iterdir())
    assert [p.name for p in traces] == ["rank0.step2-3.pt.trace.json", "rank1.step2-3.pt.trace.json"]
    for p in traces:
        names = {e.get("name", "") for e in json.loads(p.read_text())["traceEvents"]}
        assert "aten::mm" in names and any("all_to_all" in n for n in names), (p.name, sorted(names)[:30])
    assert_tensorboard_equals_metrics(tmp_path / "run")  # the coordinator's rows (a2a_s, comm_s, ... included)
    assert_profile(tmp_path / "run", rows, capsys)
    # The checkpoint holds the whole model, like a single-process run's: evaluating it in
    # one process gives the loss the two workers measured on their shards of the val set.
    _, model, _, step = load_trained(tmp_path / "run")
    assert step == 6
    ev = evaluate(model, load_dataset(cfg), cfg.model.seq_len, cfg.train.batch_size, cfg.train.eval_tokens)
    assert ev.val_loss == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert_no_leftovers()


def assert_profile(run, rows: list[dict], capsys) -> None:
    """A 2-worker ET run's profile: every step exchanged tokens (bytes and collectives of
    dispatch and combine, as many as 2 MoE layers x (rows forward + rows backward; ET plans
    carry every rank's counts and [comm] plan_counts is on by default, so no counts
    exchange) and 2 x 2), ran pool
    statistics; trace.json has one track per worker holding the chosen steps; `moedist
    profile` and `moedist plot` read the folder."""
    from moedist.cli import main

    for r in rows:
        assert r["a2a_bytes"] > 0 and r["a2a_bytes"] == r["dispatch_bytes"] + r["combine_bytes"]
        assert r["dispatch_collectives"] == 2 * 2 and r["combine_collectives"] == 2 * 2, r
        assert r["pool_collectives"] > 0 and r["grad_sync_collectives"] > 0
        assert r["stats_collectives"] == 0  # fused, 2 workers: the loss sums ride with the step's counts
        assert r["collectives"] >= sum(r[f"{k}_collectives"] for k in ("pool", "dispatch", "combine", "grad_sync"))
        assert len(r["workers_step_s"]) == len(r["workers_span_expert_s"]) == 2 and r["slowest_worker"] in (0, 1)
        assert r["span_expert_s"] == r["workers_span_expert_s"][r["slowest_worker"]]
        # The spans are the slowest worker's and cover its step: what is left is the glue
        # between spans (a few statements, well under 1 ms; 25% + 5 ms allows a busy machine).
        inner = sum(r[c] for c in SPAN_COLUMNS)
        assert inner <= r["worker_step_s"] + 1e-9 and r["worker_step_s"] - inner < 0.25 * r["worker_step_s"] + 5e-3
        assert r["worker_step_s"] <= r["step_s"]
        # The legacy columns are the profile's kinds: a2a = dispatch + combine (each the max over ranks).
        assert r["a2a_s"] >= r["span_dispatch_s"] + r["span_combine_s"] - 1e-9 and r["span_expert_s"] > 0
        # The workers ran the same communication blocks: own cost + waiting = each one's comm_s.
        assert 0 < r["comm_own_s"] <= min(r["workers_comm_s"]) + 1e-9 and min(r["workers_comm_wait_s"]) >= 0
        assert [r["comm_own_s"] + w for w in r["workers_comm_wait_s"]] == pytest.approx(r["workers_comm_s"], abs=1e-9)
    trace = json.loads((run / "trace.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert all(isinstance(e["name"], str) and e["ts"] >= 0 and e["dur"] >= 0 and e["tid"] == 0 for e in xs)
    assert {e["pid"] for e in xs} == {0, 1} and {e["args"]["step"] for e in xs} == {2, 3}
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    assert sorted(names) == [0, 1] and all(n.startswith(f"worker {r}") for r, n in names.items())
    for pid in (0, 1):
        mine = {e["name"] for e in xs if e["pid"] == pid}
        assert {"step 2", "step 3", "router", "pool", "dispatch", "expert", "combine", "dense_fwd", "dense_bwd",
                "grad_sync", "optimiser"} <= mine, mine  # fmt: skip
        assert any(e["args"].get("bytes", 0) > 0 for e in xs if e["pid"] == pid and e["name"] == "dispatch")
    capsys.readouterr()
    assert main(["profile", str(run), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["workers"] == 2 and rep["steps"] == [1, 5] and rep["exchange_bandwidth_Bps"] > 0
    assert rep["kinds"]["dispatch"]["collectives"] == 4 and rep["slowest_worker"] in (0, 1)
    shares = {p["span"]: p["share"] for p in rep["spans"]}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)  # spans + unaccounted + driver = the step
    assert rep["comm_split"]["steps"] == 5 and len(rep["comm_split"]["wait_s_by_worker"]) == 2
    code = main(["profile", str(run)])
    text = capsys.readouterr().out
    assert code == 0 and "slowest worker: rank" in text and "communication per step: own cost" in text, text
    (run / "plots" / "comm_vs_compute.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "comm_vs_compute.png").stat().st_size > 1000 and (run / "plots" / "fanout.png").is_file()


def test_resume_on_other_worker_counts_continues_the_same_run(local_ray, random_text, tmp_path):
    """2 workers for 3 of 6 steps, then 4 workers (or 1 process) from the checkpoint: the
    losses are those of 6 uninterrupted steps (expert shards are re-cut from the whole
    model and optimiser state)."""
    straight_rows, straight_trainer = single_process_run("et", random_text, steps=6)
    # The resumed runs end with a final evaluation (val_loss of the last row): so does this.
    straight = [dict(r) for r in straight_rows]
    straight[-1]["val_loss"] = straight_trainer.evaluate().val_loss
    cfg = cfg_for("et", 2, steps=6, data=random_text)
    coord = Coordinator(cfg, start_timeout_s=120)
    try:
        coord.start()
        loop = RunLoop(cfg, tmp_path / "run", coord, load_dataset(cfg).tokenizer.to_spec())
        write_config(tmp_path / "run", cfg)
        loop.rows = [coord.train_step() for _ in range(3)]
        loop.save()
    finally:
        coord.shutdown()
    shutil.copytree(tmp_path / "run", tmp_path / "run1")

    cfg4 = resume_config(tmp_path / "run", {"workers": 4})
    coord = Coordinator(cfg4, start_timeout_s=120)
    try:
        coord.start()
        loop = RunLoop(cfg4, tmp_path / "run", coord, load_dataset(cfg4).tokenizer.to_spec())
        assert loop.restore() == 3
        loop.run()
    finally:
        coord.shutdown()
    four = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()

    one = single_process_loop(resume_config(tmp_path / "run1", {"workers": 1}), tmp_path / "run1", resume=True)
    assert one.step == 3
    one.run()
    # Every column, as in the N-workers test: the thresholds (and ET's update count, which
    # the loads depend on) must survive the re-cut of the checkpoint.
    assert [r[WORKERS_KEY] for r in four] == [2, 2, 2, 4, 4, 4]
    assert [r.get(WORKERS_KEY) for r in one.rows] == [2, 2, 2, None, None, None]
    for resumed in (four, one.rows):
        assert_rows_match(straight, resumed)
    assert_capacity_binds(straight)
    assert_no_leftovers()


def test_unplaceable_workers_fail_fast_and_clean(local_ray, tmp_path):
    coord = Coordinator(cfg_for("et", 2), gpus_per_worker=1.0, start_timeout_s=5)
    with pytest.raises(PlacementTimeoutError, match="could not place 2 workers"):
        coord.start()
    assert_no_leftovers()


def test_a_worker_that_dies_mid_job_is_a_typed_error_and_nothing_is_left(local_ray, random_text, tmp_path):
    coord = Coordinator(cfg_for("et", 2, data=random_text), start_timeout_s=120, grace_s=5)
    try:
        coord.start()
        coord.train_step()
        ray.kill(coord.workers[1])
        t0 = time.monotonic()
        # rank 0 waits for rank 1 inside a collective; the death is reported at once anyway
        with pytest.raises(WorkerDiedError, match="a worker died while trying to finish step 1"):
            coord.train_step()
        assert time.monotonic() - t0 < 30
    finally:
        coord.shutdown()
    assert_no_leftovers()

"""The Ray runtime end to end on loopback: N workers == 1 worker, multi-node placement,
clean failure when workers cannot be placed."""

from __future__ import annotations

import json
import shutil
import time

import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from moedist.config import build_config  # noqa: E402
from moedist.runtime.coordinator import Coordinator, PlacementTimeoutError, WorkerDiedError  # noqa: E402
from moedist.training.evaluate import evaluate  # noqa: E402
from moedist.training.loop import RunLoop, single_process_loop, write_config  # noqa: E402
from moedist.training.trainer import Trainer, load_dataset, load_trained, resume_config  # noqa: E402

# Tiny on purpose: what is tested is the exchange of tokens and statistics, not learning.
SMALL = {
    "model": {"d_model": 32, "n_heads": 2, "n_layers": 2, "seq_len": 32, "n_experts": 8, "first_layer_dense": False},
    "train": {"batch_size": 8, "eval_every": 0, "eval_tokens": 1024, "progress": False, "warmup_steps": 2,
              "grad_clip": 1.0},
    "router": {"top_k": 1, "et_warmup_steps": 4, "et_beta": 0.9, "aux_loss_coef": 0.01},
}  # fmt: skip
STEPS = 10


def cfg_for(router: str, workers: int, steps: int = STEPS, data: str = ""):
    over = json.loads(json.dumps(SMALL))
    over["data"] = {"path": data}
    over["router"]["kind"] = router
    if router == "etr":  # a capacity that binds, so the global capacity path is exercised
        over["router"]["etr_capacity_factor"] = 1.0
    over["train"]["steps"] = steps
    over["workers"] = workers
    return build_config("tiny", None, over)


@pytest.fixture(scope="module")
def local_ray():
    """One single-node Ray instance on 127.0.0.2 for the module (4 logical CPUs)."""
    ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    yield
    ray.shutdown()


_single: dict[str, list[dict]] = {}


def single_process_rows(router: str, tmp_path_factory, data: str, steps: int = STEPS) -> list[dict]:
    """Metric rows of a single-process run (no run folder), cached per (router, steps)."""
    key = f"{router}-{steps}"
    if key not in _single:
        cfg = cfg_for(router, 1, steps=steps, data=data)
        tr = Trainer(cfg, load_dataset(cfg))
        _single[key] = [tr.train_step() for _ in range(steps)]
    return _single[key]


def assert_no_leftovers():
    from ray.util.placement_group import placement_group_table

    live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert live == [], live
    # list_named_actors reads the GCS directly (the state API would need the dashboard).
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("moedist-")]
    assert alive == [], alive


@pytest.mark.parametrize(("router", "workers"), [("et", 2), ("et", 4), ("tc", 2), ("ec", 4), ("aoe", 2), ("etr", 2)])
def test_n_workers_equal_one_worker(local_ray, random_text, tmp_path, tmp_path_factory, router, workers):
    ref = single_process_rows(router, tmp_path_factory, random_text)
    coord = Coordinator(cfg_for(router, workers, data=random_text), strategy="SPREAD", start_timeout_s=120)
    try:
        infos = coord.start()
        assert sorted(i["rank"] for i in infos) == list(range(workers))
        rows = [coord.train_step() for _ in range(STEPS)]
    finally:
        coord.shutdown()
    # Step 0 runs on identical weights and EP's forward pass is bitwise that of one
    # process, so its EMA cutoffs must match exactly; later weights differ in the last
    # bits (gradients are summed in another order), so thresholds match to 1e-4.
    for a, b in zip(ref, rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        for k in a:
            if k.endswith("_load"):  # identical routing decisions give identical loads
                assert a[k] == b[k], (a["step"], k)
            if k.endswith("_threshold"):
                tol = {"rel": 0.0, "abs": 0.0} if a["step"] == 0 else {"rel": 1e-4, "abs": 1e-6}
                assert b[k] == pytest.approx(a[k], **tol), (a["step"], k)
    assert_no_leftovers()


def test_job_writes_the_run_folder(local_ray, random_text, tmp_path):
    cfg = cfg_for("et", 2, steps=6, data=random_text)
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
    assert all(r["comm_s"] >= r["a2a_s"] + r["pool_s"] - 1e-9 and r["compute_s"] > 0 for r in rows)
    assert summary["nodes"] == 1 and summary["comm_s_per_step"] > 0 and summary["a2a_s_per_step"] > 0
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()
    # The checkpoint holds the whole model, like a single-process run's: evaluating it in
    # one process gives the loss the two workers measured on their shards of the val set.
    _, model, _, step = load_trained(tmp_path / "run")
    assert step == 6
    ev = evaluate(model, load_dataset(cfg), cfg.model.seq_len, cfg.train.batch_size, cfg.train.eval_tokens)
    assert ev.val_loss == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert_no_leftovers()


def test_resume_on_other_worker_counts_continues_the_same_run(local_ray, random_text, tmp_path):
    """2 workers for 3 of 6 steps, then 4 workers (or 1 process) from the checkpoint: the
    losses are those of 6 uninterrupted steps (expert shards are re-cut from the whole
    model and optimiser state)."""
    straight = single_process_rows("et", None, random_text, steps=6)
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
    for resumed in (four, one.rows):
        assert [r["step"] for r in resumed] == list(range(6))
        for a, b in zip(straight, resumed, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
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

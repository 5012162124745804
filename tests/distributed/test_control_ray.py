"""The control API of a job on a 2-node Ray cluster (raylets on 127.0.0.2 and 127.0.0.3):
`moedist train --address` in a new process, as a user starts it, grown live from 2 to 4
workers with `moedist ctl scale`, watched with `ctl status` and `ctl metrics`, and ended
with `ctl stop`."""

from __future__ import annotations

import json
import time
import tomllib

import psutil

from tests.control_helpers import TINY, ctl, metric_rows, moedist, status, training_job, wait_for_step
from tests.distributed.test_runtime import assert_no_leftovers

STEPS = 100_000  # far more than the test takes: the run ends by `moedist ctl stop`
NODES = ["127.0.0.2", "127.0.0.3"]
# The two_nodes cluster runs without Ray's token authentication. A driver joining by address
# on a machine with a token file (~/.ray/auth_token) turns it on (moedist.runtime.cluster),
# and then refuses the calls of the cluster's workers, which send no token: they die at
# start. So the job is told to use none, as the cluster does.
NO_RAY_TOKEN = {"RAY_AUTH_MODE": "disabled"}


def workers_of(st: dict) -> list[tuple[int, str, list[int]]]:
    """(rank, node, experts) of each worker in a `ctl --json status`."""
    return [(w["rank"], w["node"], w["experts"]) for w in st["workers"]]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ctl_scales_a_ray_job_from_2_to_4_workers_and_stops_it(two_nodes, tmp_path):
    run = tmp_path / "run"
    # 4 experts, a batch of 4 sequences: 2 or 4 workers; one CPU each, and the cluster has 4
    flags = ["--address", two_nodes.address, "--workers", "2", "--placement", "SPREAD", "--steps", str(STEPS)]
    with training_job(run, *flags, *TINY, env=NO_RAY_TOKEN) as job:
        proc = job["proc"]
        info = json.loads((run / "control.json").read_text())
        assert info["address"].startswith("127.0.0.2:")  # the driver's node address, never the wildcard
        st = wait_for_step(run, 2)
        assert st["state"] == "RUNNING" and st["total_steps"] == STEPS
        assert workers_of(st) == [(0, "127.0.0.2", [0, 1]), (1, "127.0.0.3", [2, 3])]
        before = {w["rank"]: w["pid"] for w in st["workers"]}

        res = ctl(run, "--json", "scale", "--workers", "4")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        at = out["step"]
        assert (out["workers"], out["experts"]) == (4, 4) and at >= 2
        st = status(run)  # the status after the scale shows the new workers at once
        # the 2 workers stay (same ranks and processes) and keep their lowest expert; the
        # experts they release, 1 and 3, go to the new ranks 2 and 3 (the fewest moves)
        assert [(rank, experts) for rank, _, experts in workers_of(st)] == [(0, [0]), (1, [2]), (2, [1]), (3, [3])]
        assert {w["rank"]: w["pid"] for w in st["workers"][:2]} == before
        assert sorted({node for _, node, _ in workers_of(st)}) == NODES
        assert all(w["backend"] == "gloo" for w in st["workers"])
        pids = {w["pid"] for w in st["workers"]}
        assert len(pids) == 4
        text = ctl(run, "status").stdout  # the same for people
        assert "workers     4" in text and all(f"node {n}" in text for n in NODES), text

        wait_for_step(run, at + 2)
        rows = metric_rows(run, "--from", str(at - 2), "--limit", "4")
        assert [r["step"] for r in rows] == [at - 2, at - 1, at, at + 1]
        assert [r["workers"] for r in rows] == [2, 2, 4, 4]  # steps before the boundary on 2, after on 4
        assert all(sum(r["L1_load"]) > 0 and len(r["L1_load"]) == 4 for r in rows)

        res = moedist("ctl", "--run", str(run), "--json", "stop")  # a new process, as a user runs it
        assert res.returncode == 0, res.stderr
        stop_step = json.loads(res.stdout)["step"]
        assert proc.wait(120) == 0, job["log"].read_text()
    log = job["log"].read_text()
    assert f"Stopped at step {stop_step} by the control API" in log and "Control:    127.0.0.2:" in log

    # the run folder follows the new size
    members = json.loads((run / "workers.json").read_text())
    assert [(m["rank"], m["pid"]) for m in members] == [(w["rank"], w["pid"]) for w in st["workers"]]
    assert tomllib.loads((run / "config.toml").read_text())["workers"] == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers"] == 4 and summary["nodes"] == 2 and summary["stopped_at_step"] == stop_step
    [scale] = summary["scales"]
    assert (scale["step"], scale["workers_before"], scale["workers_after"]) == (at, 2, 4)
    assert scale["scale_s"] > 0
    assert not (run / "control.json").exists()

    # nothing is left running: actors, placement groups, worker processes
    assert_no_leftovers()
    deadline = time.monotonic() + 30
    while alive := [p for p in pids if running(p)]:
        assert time.monotonic() < deadline, f"worker processes still running: {alive}"
        time.sleep(0.5)

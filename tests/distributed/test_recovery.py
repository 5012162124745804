"""A job outlives a lost worker: on a 2-node cluster started the way users start one
(`cluster/local up`), SIGKILL a worker's process by pid, or kill a node's raylet; the job
recovers from its last checkpoint, finishes with exit 0, its metrics equal an uninterrupted
run's step for step, and nothing is left running afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from moedist.config import build_config
from moedist.training.trainer import Trainer, load_dataset
from tests.distributed.conftest import FAST_NODE_DEATH
from tests.distributed.test_runtime import SMALL

ROOT = Path(__file__).resolve().parents[2]
PORT = 6431
DASHBOARD = 8431
ADDRESS = f"127.0.0.2:{PORT}"
STEPS = 40


# conftest's FAST_NODE_DEATH for this module's cluster (`ray start` reads Ray's settings from
# RAY_<name> in its environment): the lost-raylet recoveries took 19 s with Ray's defaults, 8 s so.
RAY_ENV = {f"RAY_{k}": str(v) for k, v in FAST_NODE_DEATH.items()}


def cluster_local(state: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cluster" / "local"), *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, **RAY_ENV})  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two raylets (127.0.0.2 head, 127.0.0.3), 2 CPUs each, started by cluster/local; this
    test process joins as a driver to inspect actors and placement groups."""
    state = tmp_path_factory.mktemp("cluster-state")
    res = cluster_local(state, "up", "--nodes", "2", "--cpus-per-node", "2", "--port", str(PORT),
                        "--dashboard-port", str(DASHBOARD))
    assert res.returncode == 0, res.stdout + res.stderr
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    try:
        from moedist.runtime.cluster import connect

        connect(ADDRESS, None, None)
        yield state
    finally:
        ray.shutdown()
        # Joining with a token file on the machine turned Ray's token mode on for this
        # process (RAY_AUTH_MODE=token); the clusters of later modules must start without it.
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode
        res = cluster_local(state, "down")
        assert res.returncode == 0, res.stdout + res.stderr


def flags(data: str, steps: int = STEPS) -> list[str]:
    out = ["--steps", str(steps), "--data", data, "--no-progress", "--set", "train.checkpoint_every=5",
           "--set", "train.eval_every=0", "--set", "train.batch_size=16"]  # fmt: skip
    for section, fields in SMALL.items():
        for k, v in fields.items():
            if k not in ("batch_size", "eval_every", "progress"):
                out += ["--set", f"{section}.{k}={json.dumps(v) if isinstance(v, bool) else v}"]
    return out


_oracle: dict[tuple[str, int], list[dict]] = {}


def oracle_rows(data: str, steps: int = STEPS) -> list[dict]:
    """An uninterrupted single-process run of the same job (the N-workers oracle)."""
    if (data, steps) not in _oracle:
        over = json.loads(json.dumps(SMALL))
        over["train"].update({"batch_size": 16, "steps": steps, "eval_every": 0, "checkpoint_every": 5})
        over["data"] = {"path": data}
        cfg = build_config("tiny", None, over)
        tr = Trainer(cfg, load_dataset(cfg))
        _oracle[data, steps] = [tr.train_step() for _ in range(steps)]
    return _oracle[data, steps]


def start_job(run: Path, data: str, *extra: str, steps: int = STEPS) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moedist.cli", "train", "--address", ADDRESS, "--workers", "2",
           "--placement", "SPREAD", "--out", str(run), *flags(data, steps), *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, job: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def raylet_pid(node_ip: str) -> int:
    """The raylet process of the node at `node_ip` in this module's cluster."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmd]
        if args and args[0].endswith("raylet/raylet") and f"--node_ip_address={node_ip}" in args and \
                any(a.endswith(f"127.0.0.2:{PORT}") for a in args):  # fmt: skip
            return int(d)
    raise AssertionError(f"no raylet for {node_ip} on port {PORT}")


def assert_matches_oracle(run: Path, data: str, steps: int = STEPS) -> None:
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    ref = oracle_rows(data, steps)
    assert [r["step"] for r in rows] == list(range(steps))  # replayed steps replaced the lost ones
    for a, b in zip(ref, rows, strict=True):
        for k in a:
            if k.endswith("_load"):
                assert b[k] == a[k], (a["step"], k)
            elif k in ("loss", "aux_loss", "grad_norm") or k.endswith(("_threshold", "_fanout")):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


def assert_nothing_left(pids: list[int]) -> None:
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + 15
    while True:
        live_pg = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("moedist-")]
        procs = [p for p in pids if alive(p)]
        if not (live_pg or actors or procs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert live_pg == [] and actors == [] and procs == [], (live_pg, actors, procs)


def worker_pids(run: Path) -> list[int]:
    return [w["pid"] for w in json.loads((run / "workers.json").read_text())]


def test_a_sigkilled_worker_is_replaced_and_the_run_matches_an_uninterrupted_one(cluster, random_text, tmp_path):
    run = tmp_path / "run"
    job = start_job(run, random_text)
    wait_for(run / "checkpoints" / "step_000005", job)
    before = worker_pids(run)
    os.kill(before[1], signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["failures"]) == 1 and summary["workers"] == 2 and summary["nodes"] == 2
    f = summary["failures"][0]
    assert f["restored_step"] >= 5 and f["restored_step"] % 5 == 0 and f["recovery_s"] < 30, f
    assert "worker lost" in err and "recovered" in err
    after = worker_pids(run)
    assert before[1] not in after and before[0] in after  # the survivor was kept, the lost one replaced
    assert_matches_oracle(run, random_text)
    assert_nothing_left(before + after)


def test_past_max_failures_the_job_stops_with_a_report_and_its_checkpoint(cluster, random_text, tmp_path):
    run = tmp_path / "run"
    job = start_job(run, random_text, "--max-failures", "0")
    wait_for(run / "checkpoints" / "step_000005", job)
    pids = worker_pids(run)
    os.kill(pids[0], signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 1, err
    last = [ln for ln in err.splitlines() if ln.startswith("moedist: error:")]
    assert len(last) == 1 and "more than --max-failures 0" in last[0] and "last checkpoint" in last[0], err
    assert "Traceback" not in err
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts and ckpts[-1] in last[0]
    assert_nothing_left(pids)


def test_a_lost_raylet_moves_its_worker_to_the_surviving_node(cluster, random_text, tmp_path):
    """Node 127.0.0.3's raylet is killed: Ray moves its bundle to the head (which has room),
    the job goes on with 2 workers on one node and the same numbers. (Runs last: the
    module's cluster has one node afterwards.)"""
    run = tmp_path / "run"
    job = start_job(run, random_text)
    wait_for(run / "checkpoints" / "step_000005", job)
    before = worker_pids(run)
    os.kill(raylet_pid("127.0.0.3"), signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["failures"]) == 1 and summary["workers"] == 2 and summary["nodes"] == 1
    assert summary["failures"][0]["recovery_s"] < 30, summary["failures"]
    assert_matches_oracle(run, random_text)
    assert_nothing_left(before + worker_pids(run))


def test_with_no_room_for_a_replacement_the_job_goes_on_with_fewer_workers(cluster, random_text, tmp_path):
    """Each worker takes a whole node (2 CPUs); when a node's raylet dies there is no room
    for a replacement, so the job goes on with 1 worker, and the numbers are still those of
    the uninterrupted run (the batch is global). Re-adds the node the previous test lost."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    node = subprocess.Popen([ray_bin, "start", "--block", f"--address={ADDRESS}", "--node-ip-address=127.0.0.3",
                             "--num-cpus=2", "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
            assert time.monotonic() < deadline, "the re-added node did not join"
            time.sleep(0.5)
        run = tmp_path / "run"
        # One thread per worker all the same: two spinning threads on a 2-core machine shared
        # with Ray's daemons and this test make the survivor's steps crawl.
        # 20 steps (the others run 40): one worker with one thread is slow on 2 shared cores.
        job = start_job(run, random_text, "--cpus-per-worker", "2", "--start-timeout", "10", "--set",
                        "train.threads=1", steps=20)  # fmt: skip
        wait_for(run / "checkpoints" / "step_000005", job)
        before = worker_pids(run)
        os.kill(raylet_pid("127.0.0.3"), signal.SIGKILL)
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
        summary = json.loads((run / "summary.json").read_text())
        assert len(summary["failures"]) == 1 and summary["failures"][0]["workers_after"] == 1
        assert summary["workers"] == 1 and summary["nodes"] == 1
        assert_matches_oracle(run, random_text, steps=20)
        assert_nothing_left(before + worker_pids(run))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=20)

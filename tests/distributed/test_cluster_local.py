"""`cluster/local` as a user runs it: a 2-node cluster on 127.0.0.2/.3 with the dashboard,
Ray jobs (submitted, detached, stopped), a driver killed mid-run, `--address auto`, and
the safety of the state folder and of `down`.

The cluster runs with HOME set to a temporary folder, so its token (~/.ray/auth_token)
and its private state folder are fresh and this user's real ones are never touched. The
test process itself never joins it: Ray is driven from subprocesses (`moedist train`,
`ray job ...`, tests/distributed/_cluster_probe.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from moedist.runtime import cluster as rc
from moedist.runtime import localstate

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster" / "local"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
# Tiny on purpose: what is tested is the cluster plumbing, not learning.
TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
        "--set", "model.seq_len=32", "--set", "train.batch_size=8", "--set", "train.eval_tokens=1024",
        "--no-progress"]  # fmt: skip


def port_free(port: int) -> bool:
    for host in ("127.0.0.2", "0.0.0.0"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def make_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["RAY_AUTH_MODE"] = "token"  # what the `ray job` CLI needs to send the token
    return env


def local(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOCAL), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def alive(pid: int, start: int | None = None) -> bool:
    st = localstate.proc_stat(pid)
    return st is not None and st.state not in ("Z", "X") and (start is None or st.start == start)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after up to `timeout` seconds."""
    starts = {p: s.start for p in pids if (s := localstate.proc_stat(p))}
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p, s in starts.items() if alive(p, s)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


class Cluster:
    """The module's cluster: its environment, addresses and record."""

    def __init__(self, home: Path, port: int, dashboard_port: int):
        self.home = home
        self.env = make_env(home)
        self.port = port
        self.address = f"127.0.0.2:{port}"
        self.dashboard = f"http://127.0.0.2:{dashboard_port}"
        self.state_dir = home / ".cache" / "moedist" / "cluster"  # the default under this HOME
        self.up_output = ""

    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def api(self, path: str) -> dict:
        """GET on the dashboard's HTTP API with this cluster's token."""
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def job_status(self, job: str) -> str:
        return self.api(f"/api/jobs/{job}")["status"]

    def wait_job(self, job: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (st := self.job_status(job)) not in states and time.monotonic() < deadline:
            time.sleep(0.5)
        return st

    def job(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, "job", *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              cwd=self.home)  # fmt: skip

    def processes(self) -> dict[int, int]:
        """pid -> start time of every process the recorded nodes run now."""
        st = localstate.read_state(self.state_dir)
        out: dict[int, int] = {}
        for node in st["nodes"]:
            out.update(localstate.node_processes(node))
        return out

    def probe(self, workers: int, timeout: float = 120) -> Probe:
        return Probe(self, workers, timeout)


class Probe:
    """tests/distributed/_cluster_probe.py running as its own driver on the cluster."""

    def __init__(self, cl: Cluster, workers: int, timeout: float):
        cmd = [sys.executable, "-m", "tests.distributed._cluster_probe", cl.address, cl.dashboard, str(workers),
               str(timeout)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=cl.env, cwd=ROOT)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.proc.stdout], daemon=True).start()
        self.timeout = timeout

    def read(self) -> dict:
        return json.loads(self.lines.get(timeout=self.timeout + 60))

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def cl(tmp_path_factory) -> Cluster:
    """One `cluster/local up --nodes 2` for the module; `down` at the end whatever happens."""
    home = tmp_path_factory.mktemp("home")
    port = next((p for p in (6411, 6413) if port_free(p)), None)
    dash = next((p for p in (8275, 8277) if port_free(p)), None)
    if port is None or dash is None:
        pytest.fail("ports 6411/6413 or 8275/8277 are taken: another cluster of this engineer is running")
    c = Cluster(home, port, dash)
    res = local("up", "--nodes", "2", "--cpus-per-node", "2", "--port", str(port), "--dashboard-port", str(dash),
                "--state-dir", str(c.state_dir), env=c.env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    c.up_output = res.stdout
    try:
        yield c
    finally:
        local("down", "--state-dir", str(c.state_dir), env=c.env)


# ------------------------------------------------------------------ up, state, token
def test_up_prints_dashboard_and_keeps_private_state(cl):
    assert f"head at {cl.address}" in cl.up_output
    assert f"Dashboard and job API: {cl.dashboard}" in cl.up_output
    assert stat.S_IMODE(cl.state_dir.stat().st_mode) == 0o700
    assert cl.state_dir.stat().st_uid == os.getuid()
    assert stat.S_IMODE((cl.state_dir / "cluster.json").stat().st_mode) == 0o600
    token = cl.home / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600, "the Ray token must be readable by its owner only"
    st = json.loads((cl.state_dir / "cluster.json").read_text())
    assert st["address"] == cl.address and [n["ip"] for n in st["nodes"]] == ["127.0.0.2", "127.0.0.3"]
    assert all(localstate.is_recorded_process(n) for n in st["nodes"])
    res = local("status", "--state-dir", str(cl.state_dir), env=cl.env)
    assert res.returncode == 0 and res.stdout.count("running") == 2 and cl.dashboard in res.stdout
    # The dashboard answers on the head's loopback address and wants the token.
    assert cl.api("/api/version")["ray_version"]


def test_up_refuses_a_port_in_use_at_once(cl, tmp_path):
    """Defect 5: the GCS port of the running cluster, and a port held by a plain socket."""
    t0 = time.monotonic()
    res = local("up", "--port", str(cl.port), "--dashboard-port", "8279", "--state-dir", str(tmp_path / "s1"),
                env=cl.env)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.startswith("cluster/local: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert f"port {cl.port} is already in use" in res.stderr and "Traceback" not in res.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.listen()
        taken = s.getsockname()[1]
        free = next(p for p in range(6419, 6500, 2) if port_free(p))  # so the dashboard port is checked
        res = local("up", "--port", str(free), "--dashboard-port", str(taken), "--state-dir", str(tmp_path / "s2"),
                    env=cl.env)  # fmt: skip
    assert res.returncode == 2 and f"dashboard port {taken} is already in use" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 10, "a taken port must be refused at once, not after the start-up timeout"


# ---------------------------------------------------------------------- Ray jobs
def test_ray_job_submit_trains_and_survives_the_client_detaching(cl, tmp_path):
    """`ray job submit --no-wait -- moedist train --address auto ...`: the client returns at
    once, the job runs on the head node, joins its own cluster and finishes."""
    run = tmp_path / "run"
    res = cl.job("submit", "--address", cl.dashboard, "--submission-id", "moedist-test-train", "--no-wait", "--",
                 "moedist", "train", "--address", "auto", "--workers", "2", "--steps", "4", *TINY,
                 "--out", str(run))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert cl.wait_job("moedist-test-train", {"SUCCEEDED", "FAILED", "STOPPED"}, 240) == "SUCCEEDED", \
        cl.job("logs", "--address", cl.dashboard, "moedist-test-train").stdout  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 4
    logs = cl.job("logs", "--address", cl.dashboard, "moedist-test-train").stdout
    assert f"moedist: joining the Ray cluster at {cl.address} (this Ray job's cluster)" in logs


def test_ray_job_stop_leaves_nothing(cl, tmp_path):
    probe = cl.probe(workers=2)
    try:
        res = cl.job("submit", "--address", cl.dashboard, "--submission-id", "moedist-test-stop", "--no-wait", "--",
                     "moedist", "train", "--address", "auto", "--workers", "2", "--steps", "100000", *TINY,
                     "--out", str(tmp_path / "run"))  # fmt: skip
        assert res.returncode == 0, res.stderr
        seen = probe.read()  # the job's workers are up: it kept running after the client left
        assert len(seen["names"]) == 2 and len(seen["pids"]) == 2, seen  # the 2 workers (the coordinator is the driver)
        assert cl.job_status("moedist-test-stop") == "RUNNING"
        driver = cl.api("/api/jobs/moedist-test-stop")["driver_info"]["pid"]
        probe.go()  # the probe's clock starts now
        res = cl.job("stop", "--address", cl.dashboard, "moedist-test-stop")
        assert res.returncode == 0, res.stderr
        after = probe.read()
    finally:
        probe.close()
    print(f"ray job stop: actors and placement group gone {after['after_s']:.2f} s after `ray job stop` began")
    assert cl.job_status("moedist-test-stop") == "STOPPED"
    assert after["clean"], after
    assert wait_gone([int(driver), *seen["pids"]], 10) == []


# ---------------------------------------------------------------- driver killed
def test_driver_killed_mid_run_leaves_nothing(cl, tmp_path):
    """SIGKILL of `moedist train --address ...` (the driver): the worker
    actors are owned by the driver's job, so Ray removes them and the placement group."""
    probe = cl.probe(workers=2)
    drv = subprocess.Popen([sys.executable, "-m", "moedist.cli", "train", "--address", cl.address, "--workers", "2",
                            "--steps", "100000", *TINY, "--out", str(tmp_path / "run")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cl.env, cwd=tmp_path)  # fmt: skip
    try:
        seen = probe.read()
        assert len(seen["names"]) == 2 and len(seen["pids"]) == 2, seen  # the 2 workers (the coordinator is the driver)
        time.sleep(2)  # some steps run
        assert drv.poll() is None, "the driver ended before it was killed"
        os.kill(drv.pid, signal.SIGKILL)
        probe.go()
        after = probe.read()
    finally:
        drv.kill()
        drv.wait()
        probe.close()
    print(f"driver SIGKILL: actors and placement group gone after {after['after_s']:.2f} s")
    assert after["clean"], after
    assert after["after_s"] < 10, f"actors and placement group left for {after['after_s']:.1f} s"
    assert wait_gone(seen["pids"], 10) == [], "worker processes of the killed driver's job are still running"


# ------------------------------------------------------------------ --address auto
def test_address_auto_prefers_the_recorded_cluster(cl, monkeypatch):
    """Defect 9: `auto` takes the cluster `cluster/local up` recorded for this user, not
    what Ray's machine-wide record says; inside a Ray job it takes the job's cluster."""
    for var in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(rc, "_ray_current_cluster", lambda temp_dir=None: "10.9.9.9:6379")  # someone else's
    addr, why = rc.resolve_address("auto", cl.state_dir)
    assert addr == cl.address and "cluster/local up" in why and str(cl.state_dir) in why
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:7777")  # set by a user, not by Ray for a job: ignored
    assert rc.resolve_address("auto", cl.state_dir)[0] == cl.address
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # a job's entrypoint: Ray's own mechanism
    assert rc.resolve_address("auto", cl.state_dir) == ("127.0.0.2:7777", "this Ray job's cluster")


def test_address_auto_from_the_cli_joins_the_recorded_cluster(cl):
    """The driver joins and says which cluster, even when Ray's own `auto` points elsewhere."""
    code = (
        "import ray\nfrom moedist.runtime.cluster import connect\n"
        "connect('auto', None, None, say=print)\nprint('gcs', ray.get_runtime_context().gcs_address)\n"
    )
    env = {**cl.env, "RAY_ADDRESS": "127.0.0.2:1"}  # where Ray's own resolution would go
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"moedist: joining the Ray cluster at {cl.address} (started by cluster/local up" in res.stdout
    assert f"gcs {cl.address}" in res.stdout


def test_address_auto_refuses_another_users_ray_record(tmp_path, monkeypatch):
    """Ray's fallback record (a file in a world-writable folder) is not followed when it is
    someone else's or writable by anyone."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # Ray's resolution would take it first
    # With exactly one Ray instance running on the machine (this module's cluster, in a quiet
    # CI run) Ray's "auto" takes that one and ignores the record: hide running instances so
    # that the record is what Ray follows, as it is when several run.
    import ray._private.services as services

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    record = tmp_path / "ray_current_cluster"
    record.write_text("127.0.0.9:6379")
    record.chmod(0o644)
    assert rc._ray_current_cluster(str(tmp_path)) == "127.0.0.9:6379"  # ours: followed
    record.chmod(0o666)
    with pytest.raises(rc.ClusterError, match="writable by anyone"):
        rc._ray_current_cluster(str(tmp_path))
    if os.getuid() == 0:
        record.chmod(0o644)
        os.chown(record, 4242, 4242)
        with pytest.raises(rc.ClusterError, match="uid 4242"):
            rc._ray_current_cluster(str(tmp_path))


# ------------------------------------------------------------------------- down
# --------------------------------------------------------- add-node and remove-node
def alive_nodes(address: str, expect: set[str], env: dict[str, str]) -> dict[str, float]:
    """ip -> CPUs of the nodes Ray counts alive, from a driver of its own that waits up to
    30 s for the alive set to become `expect` (a node that left is marked dead soon after)."""
    code = (
        "import json, sys, time, ray\n"
        "ray.init(address=sys.argv[1], _node_ip_address='127.0.0.2', log_to_driver=False)\n"
        "deadline = time.monotonic() + 30\n"
        "while True:\n"
        "    seen = {n['NodeManagerAddress']: n['Resources'].get('CPU') for n in ray.nodes() if n['Alive']}\n"
        "    if set(seen) == set(sys.argv[2:]) or time.monotonic() > deadline: break\n"
        "    time.sleep(0.25)\n"
        "print(json.dumps(seen))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, address, *expect], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def one_line_error(res: subprocess.CompletedProcess, text: str) -> None:
    assert res.returncode == 2 and res.stderr.startswith("cluster/local: error: "), res
    assert res.stderr.count("\n") == 1 and text in res.stderr and res.stdout == "", res.stderr


def test_add_node_and_remove_node(cl):
    """On the module's 2-node cluster: add-node starts 127.0.0.4 and then 127.0.0.5 (Ray
    counts them alive with the CPUs asked for, `status` lists them); remove-node stops
    exactly the newest one's processes; bad input is one line, exit 2. The added node left
    is the next test's: `down` must stop it too."""
    sd = ("--state-dir", str(cl.state_dir))
    res = local("add-node", *sd, env=cl.env)  # as many CPUs as up's nodes
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"node 127.0.0.4 added to the Ray cluster at {cl.address}: 2 CPUs, pid " \
                         f"{localstate.read_state(cl.state_dir)['nodes'][2]['pid']} (3 nodes)\n"  # fmt: skip
    res = local("add-node", "--cpus-per-node", "1", *sd, env=cl.env)
    assert res.returncode == 0 and res.stdout.startswith("node 127.0.0.5 added"), res.stderr
    nodes = localstate.read_state(cl.state_dir)["nodes"]
    try:
        assert [n["ip"] for n in nodes] == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        ips = {"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"}
        assert alive_nodes(cl.address, ips, cl.env) == \
            {"127.0.0.2": 2.0, "127.0.0.3": 2.0, "127.0.0.4": 2.0, "127.0.0.5": 1.0}  # fmt: skip
        res = local("status", *sd, env=cl.env)
        assert res.stdout.count("running") == 4 and f"127.0.0.5: pid {nodes[3]['pid']} running" in res.stdout
        # Bad input while the cluster runs: nothing changes.
        one_line_error(local("remove-node", "127.0.0.2", *sd, env=cl.env), "127.0.0.2 is the head node")
        one_line_error(local("remove-node", "127.0.0.9", *sd, env=cl.env), "no recorded node at 127.0.0.9")
        one_line_error(local("add-node", "--cpus-per-node", "0", *sd, env=cl.env),
                       "--cpus-per-node must be at least 1")  # fmt: skip
        gone = localstate.node_processes(nodes[3])
        kept = {k: v for n in nodes[:3] for k, v in localstate.node_processes(n).items()}
        assert len(gone) > 2 and len(kept) > 6, (gone, kept)  # `ray start`, raylet, agents, ...
        res = local("remove-node", *sd, env=cl.env)  # the newest: 127.0.0.5
        assert res.returncode == 0 and res.stdout == f"node 127.0.0.5 removed from the Ray cluster at " \
                                                     f"{cl.address} (3 nodes left)\n", res  # fmt: skip
        assert wait_gone(list(gone), 0) == [], "remove-node returned before the node's processes were gone"
        assert all(alive(p, s) for p, s in kept.items()), "remove-node stopped processes of another node"
        assert [n["ip"] for n in localstate.read_state(cl.state_dir)["nodes"]] == ips_sorted(ips - {"127.0.0.5"})
        assert alive_nodes(cl.address, ips - {"127.0.0.5"}, cl.env) == \
            {"127.0.0.2": 2.0, "127.0.0.3": 2.0, "127.0.0.4": 2.0}  # fmt: skip
    finally:  # a node a faulty remove-node dropped from the record: not left running
        recorded = {n["ip"] for n in localstate.read_state(cl.state_dir)["nodes"]}
        for node in nodes:
            if node["ip"] not in recorded:
                for pid, start in localstate.node_processes(node).items():
                    localstate.signal_if_same(pid, start, signal.SIGKILL)


def ips_sorted(ips: set[str]) -> list[str]:
    return sorted(ips, key=lambda ip: int(ip.rsplit(".", 1)[1]))


def test_down_stops_every_process_up_started(cl):
    """Last test of the module: `down` ends every process of both nodes (dashboard, GCS,
    raylets, workers) and forgets the cluster."""
    procs = cl.processes()
    assert len(procs) > 10, procs  # the two `ray start` and their Ray processes
    res = local("down", "--state-dir", str(cl.state_dir), env=cl.env)
    assert res.returncode == 0, res.stderr
    left = [p for p, s in procs.items() if alive(p, s)]
    assert left == [], [localstate.proc_cmdline(p) for p in left]
    assert not (cl.state_dir / "cluster.json").exists()
    assert local("status", "--state-dir", str(cl.state_dir), env=cl.env).stdout.strip() == "no cluster recorded"


def test_add_node_and_remove_node_need_a_cluster(tmp_path):
    """No cluster recorded, or one whose head is gone: one line, exit 2, nothing started."""
    for cmd in ("add-node", "remove-node"):
        one_line_error(local(cmd, "--state-dir", str(tmp_path / "none")), "no cluster is up")
    gone = subprocess.Popen(["true"])
    gone.wait()
    state = fake_node(tmp_path, {"pid": gone.pid, "start": 1, "cmdline": ["ray"], "boot": localstate.boot_id()})
    for cmd in ("add-node", "remove-node"):
        one_line_error(local(cmd, "--state-dir", str(state)), "its head is gone")
    one_line_error(local("up", "127.0.0.3", "--state-dir", str(state)), "only remove-node takes an address")


# ----------------------------------------------- state folder and down, without Ray
def fake_node(tmp_path: Path, record: dict) -> Path:
    state = localstate.ensure_private_dir(tmp_path / "state")
    localstate.write_state(state, {"address": "127.0.0.2:6419", "nodes": [{"ip": "127.0.0.2", **record}]})
    return state


def test_down_does_not_signal_an_unrelated_process(tmp_path):
    """Defect 8: a recorded pid that is now some other process (here a `sleep`, recorded
    with another start time or command line) is left alone."""
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        real = localstate.describe(sleeper.pid)
        for record in ({**real, "start": real["start"] - 1}, {**real, "cmdline": ["ray", "start", "--block"]}):
            state = fake_node(tmp_path, record)
            res = local("down", "--state-dir", str(state), "--grace", "1")
            time.sleep(0.2)
            assert sleeper.poll() is None, "down signalled a process it did not start"
            assert res.returncode == 0 and "no longer the Ray node" in res.stdout, res
    finally:
        sleeper.kill()
        sleeper.wait()


def test_down_sends_sigterm_then_sigkill(tmp_path):
    """A recorded process that still matches gets SIGTERM, and SIGKILL only after the grace
    period if it ignores SIGTERM; its session's other processes go too."""
    code = "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "subprocess.Popen(['sleep', '300']); time.sleep(300)"  # fmt: skip
    stubborn = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        time.sleep(0.5)
        child = [p for p, s in localstate.all_procs().items() if s.ppid == stubborn.pid]
        assert len(child) == 1
        state = fake_node(tmp_path, localstate.describe(stubborn.pid))
        t0 = time.monotonic()
        res = local("down", "--state-dir", str(state), "--grace", "1.5")
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert stubborn.wait(5) == -signal.SIGKILL and took >= 1.5
        assert wait_gone(child, 5) == []
    finally:
        stubborn.kill()
        stubborn.wait()
    polite = subprocess.Popen(["sleep", "300"], start_new_session=True)
    state = fake_node(tmp_path / "p", localstate.describe(polite.pid))
    assert local("down", "--state-dir", str(state)).returncode == 0
    assert polite.wait(5) == -signal.SIGTERM


def test_state_folder_must_be_private(tmp_path):
    """A state folder with group/other access, a symlink, or another owner is refused in
    one line (exit 2); `up` creates its folder with mode 0700."""
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    for cmd in ("status", "down", "up"):
        res = local(cmd, "--state-dir", str(loose))
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "mode 0755" in res.stderr and "chmod 700" in res.stderr
    link = tmp_path / "link"
    link.symlink_to(loose)
    res = local("status", "--state-dir", str(link))
    assert res.returncode == 2 and "symbolic link" in res.stderr
    if os.getuid() == 0:
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 4242, 4242)
        res = local("status", "--state-dir", str(other))
        assert res.returncode == 2 and "owned by uid 4242" in res.stderr
    fresh = localstate.ensure_private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_bad_flags_are_one_line_errors(tmp_path):
    for args in (["--nodes", "0"], ["--port", "80"], ["--cpus-per-node", "0"], ["--timeout", "nan"],
                 ["--port", "7000", "--dashboard-port", "7000"]):  # fmt: skip
        res = local("up", *args, "--state-dir", str(tmp_path / "s"))
        assert res.returncode == 2 and res.stderr.startswith("cluster/local: error: "), (args, res.stderr)
        assert res.stderr.count("\n") == 1


def test_token_file_made_private(tmp_path, monkeypatch):
    """A token Ray left world-readable is made 0600 (what `up` and the driver do)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("x" * 32)
    token.chmod(0o644)
    localstate.secure_token_file()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600

"""The control API as a user drives it: a real tiny `moedist train` in a subprocess, and
`moedist ctl` (and raw gRPC calls) against it; then the checks that need no job.

The tests of the live job run in file order on one job (module fixture); the last one
stops it.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest

from moedist.control.v1 import control_pb2 as pb
from moedist.control.v1 import control_pb2_grpc as pb_grpc
from moedist.training.checkpoint import list_checkpoints, load_checkpoint
from tests.control_helpers import TINY, ctl, moedist, moedist_here, one_error_line, status, training_job, wait_for_step

ROOT = Path(__file__).resolve().parents[2]
STEPS = 100_000  # far more than the tests take: the run ends by `moedist ctl stop`


# `moedist ARGS` in a new process, then the modules it imported that a ctl call must not
# (seconds of start-up): on the last line of stdout, as JSON.
IMPORT_PROBE = """
import json, sys
from moedist.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # argparse: --help
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray", "numba")
               or m.startswith(("moedist.training", "moedist.runtime", "moedist.model", "moedist.kernels")))
print(json.dumps({"code": code, "heavy": heavy}))
"""


def moedist_imports(*args: str) -> tuple[subprocess.CompletedProcess, int, list[str]]:
    """(the process, its exit status, the heavy modules it imported) of `moedist ARGS`."""
    res = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *args], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip(), res.stderr
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    return res, probe["code"], probe["heavy"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    run = tmp_path_factory.mktemp("ctl") / "run"
    with training_job(run, "--steps", str(STEPS), *TINY) as job:
        yield job


# ---------------------------------------------------------------- a live job
def test_control_json_is_private_and_on_loopback(job):
    path = job["run"] / "control.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = json.loads(path.read_text())
    assert info["address"].startswith("127.0.0.1:") and info["pid"] == job["proc"].pid and len(info["token"]) >= 40


def test_status_json_and_plain(job):
    st = wait_for_step(job["run"], 2)
    assert st["state"] == "RUNNING" and st["total_steps"] == STEPS and st["router"] == "et"
    assert st["run_dir"] == str(job["run"]) and st["failures"] == 0 and st["stopped_at_step"] is None
    assert st["train_loss"] is not None and st["tokens_per_s"] > 0 and st["checkpoint_step"] is None
    assert st["workers"] == [{"rank": 0, "node": "127.0.0.1", "pid": job["proc"].pid, "experts": [0, 1, 2, 3],
                              "backend": ""}]  # fmt: skip
    # tiny: 2 layers, the first dense -> one MoE layer (L1) with 4 experts and 4 ET thresholds
    assert [(layer["layer"], layer["n_experts"], len(layer["thresholds"])) for layer in st["layers"]] == [(1, 4, 4)]
    res = moedist("ctl", "--run", str(job["run"]), "status")  # the console entry point, in a new process
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "state       RUNNING" in text and f"of {STEPS}" in text and "experts 0-3" in text
    assert "L1  4 experts  ET thresholds" in text


def test_ctl_calls_import_neither_torch_ray_nor_numba(job):
    """What makes `moedist ctl` start in a fraction of a second: a call against a live job
    loads gRPC and the generated messages, never the training code."""
    res, code, heavy = moedist_imports("ctl", "--run", str(job["run"]), "--json", "status")
    assert code == 0 and heavy == [], (heavy, res.stderr)
    assert json.loads(res.stdout.splitlines()[0])["state"] == "RUNNING"
    res, code, heavy = moedist_imports("ctl", "--run", str(job["run"]), "metrics", "--limit", "2")
    assert code == 0 and heavy == [], (heavy, res.stderr)
    assert [ln.split()[:2] for ln in res.stdout.splitlines()[:-1]] == [["step", "0"], ["step", "1"]]


def test_metrics_streams_rows_of_the_run(job):
    res = ctl(job["run"], "--json", "metrics", "--follow", "--from", "1", "--limit", "3")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"loss", "lr", "grad_norm", "tokens", "step_s", "tokens_per_s", "L1_fanout", "skipped"} <= r.keys()
        assert len(r["L1_load"]) == 4 and sum(r["L1_load"]) > 0 and len(r["L1_threshold"]) == 4
        assert r["tokens"] == (r["step"] + 1) * 4 * 32
    res = ctl(job["run"], "metrics", "--limit", "2")  # plain: the steps done from 0
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 0  loss ") and "fanout" in lines[0]


def test_checkpoint_is_written_at_a_step_boundary(job):
    res = ctl(job["run"], "--json", "checkpoint")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    step, path = out["step"], Path(out["path"])
    assert path == job["run"] / "checkpoints" / f"step_{step:06d}" and step > 0
    assert (step, path) in [(s, p) for s, p in list_checkpoints(job["run"])]
    _, state = load_checkpoint(path, [])  # verifies the manifest's sums
    assert state["step"] == step
    assert status(job["run"])["checkpoint_step"] >= step


def test_bad_calls_get_their_codes_and_the_server_still_answers(job):
    info = json.loads((job["run"] / "control.json").read_text())
    channel = grpc.insecure_channel(info["address"], options=[("grpc.enable_http_proxy", 0)])
    stub = pb_grpc.ControlStub(channel)
    good = (("authorization", f"Bearer {info['token']}"),)
    raw = channel.unary_unary("/moedist.v1.Control/Scale", request_serializer=None, response_deserializer=None)

    def code(fn) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            fn()
        return e.value.code()

    try:
        checks = [
            (lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=10), grpc.StatusCode.UNAUTHENTICATED),
            (lambda: stub.Stop(pb.StopRequest(), metadata=(("authorization", "Bearer x"),), timeout=10),
             grpc.StatusCode.UNAUTHENTICATED),
            (lambda: list(stub.StreamMetrics(pb.StreamMetricsRequest(), timeout=10)), grpc.StatusCode.UNAUTHENTICATED),
            (lambda: raw(b"\x08", metadata=good, timeout=10), grpc.StatusCode.INVALID_ARGUMENT),  # does not decode
            (lambda: stub.Scale(pb.ScaleRequest(workers=-1), metadata=good, timeout=10),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: raw(b"\x00" * 100_000, metadata=good, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]  # fmt: skip
        for fn, want in checks:
            assert code(fn) == want
            assert stub.GetStatus(pb.GetStatusRequest(), metadata=good, timeout=10).state == pb.RUN_STATE_RUNNING
    finally:
        channel.close()
    # the same through `moedist ctl`: invalid -> exit 2, refused -> exit 1, one line each
    res = ctl(job["run"], "scale", "--workers", "0")
    assert res.returncode == 2 and "INVALID_ARGUMENT: workers must be > 0, got 0" in one_error_line(res)
    res = ctl(job["run"], "metrics", "--from", str(STEPS))
    assert res.returncode == 2 and "INVALID_ARGUMENT: from_step must be in 0 .. 99999" in one_error_line(res)
    assert status(job["run"])["state"] == "RUNNING"


def test_scale_changes_the_experts_of_the_live_job(job):
    """Trainer.scale(experts=) through the API: every MoE layer goes from 4 to 8 experts at a
    step boundary, and the job trains on; a worker count is refused (one process)."""
    res = ctl(job["run"], "scale", "--workers", "2")
    assert res.returncode == 1
    assert one_error_line(res).startswith("moedist: error: ctl scale: FAILED_PRECONDITION: scale refused: a "
                                          "single-process run cannot have 2 workers")  # fmt: skip
    res = ctl(job["run"], "--json", "scale", "--experts", "8")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["workers"] == 1 and out["experts"] == 8
    at = out["step"]
    st = wait_for_step(job["run"], at + 2)
    assert st["state"] == "RUNNING" and st["workers"][0]["experts"] == list(range(8))
    assert [(layer["n_experts"], len(layer["thresholds"])) for layer in st["layers"]] == [(8, 8)]
    res = ctl(job["run"], "--json", "metrics", "--from", str(at - 1), "--limit", "2")
    rows = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [len(r["L1_load"]) for r in rows] == [4, 8]  # the step before the change, the step after
    assert [sum(r["L1_load"]) > 0 for r in rows] == [True, True]
    # the run folder follows: config.toml has the new count and a checkpoint of the new shape
    # was written at the change (resume and recovery find it)
    assert tomllib.loads((job["run"] / "config.toml").read_text())["model"]["n_experts"] == 8
    assert at in [step for step, _ in list_checkpoints(job["run"])]


def test_scale_with_a_checkpoint_at_the_same_boundary_twice_and_to_the_current_size(job):
    """A checkpoint and two identical resizes requested at once, then a resize to the size
    the job already has: all answered, carried out one after the other at step boundaries
    (the checkpoint is never cut by a resize), and the job trains on."""
    run = job["run"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        # separate processes, as users would run them (ctl in this process redirects stdout)
        base = ("ctl", "--run", str(run), "--json")
        futs = [pool.submit(moedist, *base, "checkpoint"), pool.submit(moedist, *base, "scale", "--experts", "6"),
                pool.submit(moedist, *base, "scale", "--experts", "6")]  # fmt: skip
        ck, first, second = [f.result() for f in futs]
    for res in (ck, first, second):
        assert res.returncode == 0, res.stderr
    ck, first, second = (json.loads(r.stdout) for r in (ck, first, second))
    assert first["experts"] == second["experts"] == 6
    _, state = load_checkpoint(Path(ck["path"]), [])  # whole: its manifest's sums verify
    # written before the resize, or re-saved by it at the same step (then with the new shape)
    assert state["step"] == ck["step"] and state["config"]["model"]["n_experts"] in (8, 6)
    same = ctl(run, "--json", "scale", "--experts", "6")
    assert same.returncode == 0 and json.loads(same.stdout)["experts"] == 6, same.stderr
    st = wait_for_step(run, json.loads(same.stdout)["step"] + 1)
    assert st["state"] == "RUNNING" and [layer["n_experts"] for layer in st["layers"]] == [6]


def test_stop_ends_the_run_early_with_its_final_checkpoint_and_summary(job):
    run, proc = job["run"], job["proc"]
    res = moedist("ctl", "--run", str(run), "--json", "stop")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    stop_step, total = out["step"], out["total_steps"]
    assert total == STEPS and 0 < stop_step < STEPS
    assert proc.wait(180) == 0, job["log"].read_text()
    log = job["log"].read_text()
    assert f"Stopped at step {stop_step} by the control API" in log and "Control:    127.0.0.1:" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_at_step"] == stop_step and summary["steps"] == stop_step
    assert summary["final_val_loss"] is not None
    assert list_checkpoints(run)[-1][0] == stop_step  # the final checkpoint is the stop step's
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(stop_step))
    assert rows[-1]["val_loss"] == summary["final_val_loss"]
    assert not (run / "control.json").exists()  # removed on exit
    # the run (resized live by the tests before) evaluates and resumes from its checkpoint
    res = moedist("eval", "--run", str(run), "--tokens", "1024")
    assert res.returncode == 0 and json.loads(res.stdout.strip().splitlines()[-1])["val_loss"] > 0, res.stderr
    res = moedist("train", "--resume", str(run), "--steps", str(stop_step + 1), "--no-progress", "--no-control")
    assert res.returncode == 0, res.stderr
    assert pq.read_table(run / "metrics.parquet").num_rows == stop_step + 1
    res = ctl(run, "status")
    assert res.returncode == 2 and "job not running" in one_error_line(res)


# ---------------------------------------------------------------- no job needed
def test_ctl_without_a_running_job_exits_2_with_one_line(tmp_path):
    res = ctl(tmp_path, "status")
    assert res.returncode == 2 and "job not running" in one_error_line(res)
    res = ctl(tmp_path / "nope", "status")
    assert res.returncode == 2 and "is not a folder" in one_error_line(res)
    # a control.json left behind by a job that died: nothing listens at its address
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "control.json").write_text(json.dumps({"address": f"127.0.0.1:{port}", "token": "t"}))
    res = ctl(tmp_path, "checkpoint")
    assert res.returncode == 2 and "job not running: nothing answers at" in one_error_line(res)


def test_ctl_without_a_job_and_help_import_neither_torch_ray_nor_numba(tmp_path):
    res, code, heavy = moedist_imports("ctl", "--run", str(tmp_path), "status")  # no control.json
    assert code == 2 and "job not running" in one_error_line(res) and heavy == []
    for args in (["--help"], ["ctl", "--help"], ["ctl", "--run", str(tmp_path), "scale", "--help"]):
        res, code, heavy = moedist_imports(*args)
        assert code == 0 and res.stdout.startswith("usage: moedist") and heavy == [], (args, heavy)


@pytest.mark.parametrize(("flags", "message"), [
    (["--control-port", "70000"], "--control-port: must be in 0 .. 65535"),
    (["--control-port", "-1"], "--control-port: must be in 0 .. 65535"),
    (["--control-host", "0.0.0.0"], "--control-host: '0.0.0.0' means every interface"),
    (["--control-host", "::"], "--control-host: '::' means every interface"),
    (["--control-host", "192.0.2.1"], "cannot listen on 192.0.2.1:0"),  # not this machine's (TEST-NET-1)
    (["--no-control", "--control-port", "5000"], "--control-port: cannot be used with --no-control"),
])  # fmt: skip
def test_bad_control_flags_fail_before_anything_starts(tmp_path, flags, message):
    run = tmp_path / "run"
    res = moedist_here("train", "--steps", "2", "--out", str(run), *flags)
    assert res.returncode == 2 and message in one_error_line(res)
    assert not run.exists()


def test_a_taken_port_is_refused_not_shared(tmp_path):
    with socket.socket() as s:  # grpc would otherwise share it (SO_REUSEPORT)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = moedist_here("train", "--steps", "2", "--out", str(tmp_path / "run"), "--control-host", "127.0.0.1",
                           "--control-port", str(port))  # fmt: skip
    assert res.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in one_error_line(res)


def test_generated_code_is_what_grpcio_tools_emits_from_the_proto():
    """The committed moedist/control/v1/*_pb2* equal a fresh `make protos` byte for byte."""
    committed = sorted((ROOT / "moedist" / "control" / "v1").glob("control_pb2*"))
    assert [p.name for p in committed] == ["control_pb2.py", "control_pb2.pyi", "control_pb2_grpc.py"]
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", tmp],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        for path in committed:
            fresh = Path(tmp) / "moedist" / "control" / "v1" / path.name
            assert fresh.read_bytes() == path.read_bytes(), f"{path.name} differs: run `make protos`"


def test_generated_code_agrees_with_the_pinned_runtime_bounds():
    """pyproject's protobuf and grpcio lower bounds are the generated code's own versions."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    gen_dir = ROOT / "moedist" / "control" / "v1"
    gencode = re.search(r"Protobuf Python Version: (\S+)", (gen_dir / "control_pb2.py").read_text()).group(1)
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '(\S+)'", (gen_dir / "control_pb2_grpc.py").read_text()).group(1)
    assert f"protobuf>={gencode},<{int(gencode.split('.')[0]) + 1}" in deps
    assert f"grpcio>={grpc_gen}" in deps
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert f"grpcio-tools=={grpc_gen}" in extras

"""Driving `moedist train` and `moedist ctl` as a user does, for the tests of the control API
(tests/e2e/test_control_cli.py: a single-process job; tests/distributed/test_control_ray.py:
a job on a Ray cluster)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moedist.cli import main

# A tiny model: steps of a few milliseconds.
TINY = ["--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
        "--set", "model.seq_len=32", "--set", "train.batch_size=4", "--set", "train.eval_tokens=512",
        "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "model.n_experts=4",
        "--no-progress"]  # fmt: skip


def moedist(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`moedist ARGS` as a user runs it: a new process."""
    return subprocess.run([sys.executable, "-m", "moedist.cli", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def moedist_here(*args: str) -> subprocess.CompletedProcess:
    """`moedist ARGS` through its entry point in this process (what a new process runs, less
    the interpreter's start-up, which takes seconds on a loaded machine)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def ctl(run: Path, *args: str) -> subprocess.CompletedProcess:
    return moedist_here("ctl", "--run", str(run), *args)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moedist: error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def status(run: Path) -> dict[str, Any]:
    res = ctl(run, "--json", "status")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_for_step(run: Path, n: int, timeout: float = 120) -> dict[str, Any]:
    """The job's status once it has done `n` steps."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(run)
        if st["step"] >= n:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.5)


def metric_rows(run: Path, *args: str) -> list[dict[str, Any]]:
    """`moedist ctl --json metrics ARGS`, one dict per row."""
    res = ctl(run, "--json", "metrics", *args)
    assert res.returncode == 0, res.stderr
    return [json.loads(ln) for ln in res.stdout.splitlines()]


@contextlib.contextmanager
def training_job(run: Path, *train_args: str, start_timeout: float = 180,
                 env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """`moedist train --out RUN TRAIN_ARGS` in a new process (output to RUN/../train.log;
    `env`: variables added to this process's environment), yielded once its control server
    is up ({"run", "proc", "log"}); killed on exit if it still runs."""
    log_path = run.parent / "train.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moedist.cli", "train", "--out", str(run), *train_args],
                                stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=None if env is None else {**os.environ, **env})  # fmt: skip
        try:
            deadline = time.monotonic() + start_timeout
            while not (run / "control.json").exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"no control.json within {start_timeout} s"
                time.sleep(0.2)
            yield {"run": run, "proc": proc, "log": log_path}
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)

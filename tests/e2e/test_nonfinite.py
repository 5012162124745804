"""Non-finite steps: stop with a one-line error naming the step, or skip and count them;
never a non-finite checkpoint, never an optimiser step on NaN gradients."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from moedist.training.checkpoint import list_checkpoints, load_checkpoint

# lr 1e30: step 0's update is finite but enormous, so step 1's forward pass overflows.
BLOWUP = ["--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.checkpoint_every=1",
          "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
          "--set", "model.seq_len=32", "--set", "train.batch_size=4", "--set", "train.eval_tokens=512",
          "--set", "train.eval_every=0", "--no-progress"]  # fmt: skip


def moedist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moedist.cli", *args], capture_output=True, text=True, timeout=300)


def assert_checkpoints_finite(run: Path) -> list[int]:
    steps = []
    for step, path in list_checkpoints(run):
        objs, _ = load_checkpoint(path, ["model", "optim"])
        for name, t in objs["model"].items():
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (step, name)
        for slot in objs["optim"]["state"].values():
            for name, t in slot.items():
                assert not (torch.is_tensor(t) and t.is_floating_point()) or bool(torch.isfinite(t).all()), (step, name)
        steps.append(step)
    return steps


@pytest.mark.parametrize(("router", "what"), [("et", "router logits contain NaN"), ("tc", "gradient norm nan")])
def test_a_non_finite_step_stops_with_one_line_naming_it(tmp_path, router, what):
    run = tmp_path / "run"
    res = moedist("train", "--router", router, "--steps", "4", "--out", str(run), *BLOWUP)
    assert res.returncode == 2, res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("moedist: error:")]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "step 1 is not finite" in err[0] and what in err[0], err[0]
    if router == "tc":  # a NaN gradient is traced to the layer it is deepest in
        assert "deepest non-finite gradient in" in err[0]
    # step 1's checkpoint (taken after step 0) is the last one, and holds only finite state
    assert assert_checkpoints_finite(run) == [1]
    assert [r["step"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [0]


def test_skip_drops_the_update_counts_it_and_writes_valid_json(tmp_path):
    run = tmp_path / "run"
    res = moedist("train", "--router", "et", "--steps", "4", "--out", str(run), "--set", "train.nonfinite=skip",
                  *BLOWUP)  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads((run / "summary.json").read_text())  # strict JSON: no NaN
    assert summary["skipped_steps"] == 3 and summary["steps"] == 4
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["skipped"] for r in rows] == [False, True, True, True]
    assert all(math.isnan(r["loss"]) for r in rows[1:])
    # no update was applied after step 0: every later checkpoint holds step 1's weights
    assert assert_checkpoints_finite(run) == [3, 4]
    w3, _ = load_checkpoint(run / "checkpoints" / "step_000003", ["model"])
    w4, _ = load_checkpoint(run / "checkpoints" / "step_000004", ["model"])
    assert all(torch.equal(w3["model"][k], w4["model"][k]) for k in w3["model"] if "ema" not in k)

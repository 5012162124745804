"""Readers for the metric sinks' files (profile.log), shared by the tests that check them:
TensorBoard's own EventAccumulator, and W&B's transaction log (run-ID.wandb) record by record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _tb_tag(column: str) -> str:
    """The TensorBoard tag docs/profiling.md gives a metrics column."""
    if column.endswith("_s") and not column.endswith("_per_s"):  # seconds, not rates
        return f"time/{column}"
    return f"routing/{column}" if re.match(r"L\d+_", column) else f"train/{column}"


def assert_tensorboard_equals_metrics(run: Path) -> None:
    """Every numeric metrics.parquet column (step aside) is a TensorBoard scalar with one
    value per step that has it, equal to the row's (as float32, TensorBoard's scalar type);
    no other scalar; each layer's load is a histogram of the per-expert counts. Read with
    TensorBoard's own reader, as TensorBoard reads the folder."""
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    ea.Reload()
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    want: dict[str, dict[int, float]] = {}
    for r in rows:
        for col, v in r.items():
            if col != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                want.setdefault(_tb_tag(col), {})[r["step"]] = float(np.float32(v))
    assert {"train/loss", "train/val_loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "time/step_s",
            "routing/L1_fanout"} <= set(want)  # fmt: skip
    assert sorted(ea.Tags()["scalars"]) == sorted(want)
    for tag, by_step in want.items():
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert got == sorted(by_step.items()), f"tensorboard {tag}: {got} != metrics.parquet {sorted(by_step.items())}"
    loads = {_tb_tag(c) for c in rows[0] if c.endswith("_load")}
    assert loads and sorted(ea.Tags()["histograms"]) == sorted(loads)
    for tag in loads:
        hist = [(e.step, e.histogram_value.num, e.histogram_value.sum) for e in ea.Histograms(tag)]
        col = tag.split("/", 1)[1]
        assert hist == [(r["step"], len(r[col]), sum(r[col])) for r in rows], tag


def wandb_records(path):
    """The records of a W&B transaction log (run-ID.wandb): a ':W&B' header (7 bytes),
    then LevelDB-log blocks of 32 KiB whose chunks (crc32 4, length 2, type 1: full, first,
    middle, last) carry serialised wandb_internal_pb2.Record messages."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, part = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            yield rec


def wandb_runs(run_dir):
    """Each offline run under RUN/wandb (in the order they ran): (run id, history rows)."""
    runs = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = d.glob("run-*.wandb")
        run_id, history = None, []
        for rec in wandb_records(log):
            if rec.WhichOneof("record_type") == "run":
                run_id = rec.run.run_id
            elif rec.WhichOneof("record_type") == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in rec.history.item})  # fmt: skip
        runs.append((run_id, history))
    return runs

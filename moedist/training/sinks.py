"""Metric sinks beyond metrics.parquet: TensorBoard event files and Weights & Biases runs.

`profile.log` (`moedist train --log tensorboard,wandb`) names them. The run loop hands
every metric row to `MetricSinks.write` on the driver (rows of single-process and Ray runs
alike) and closes the sinks on every way out of a run.

    tensorboard     RUN/tensorboard/ (torch.utils.tensorboard event files)
    wandb           RUN/wandb/ offline (upload later: wandb sync RUN/wandb/offline-run-*)
    wandb:online    streamed to W&B (needs `wandb login`)

Every numeric column of a row is a scalar, its tag the column name under a group (see
`tag_of`); TensorBoard also gets each layer's per-expert load as a histogram (W&B: the
scalars only). A resumed run or a recovery rewinds to the step it continues from:
TensorBoard purges the events at and after that step (SessionLog.START, honoured by
TensorBoard's readers), W&B keeps one run id per run folder and drops the replayed steps
it already has (W&B histories only go forward; a replayed step reproduces the lost one).

This module imports neither torch nor the sink libraries at import time: the config's
validation uses its parser.
"""

from __future__ import annotations

import importlib.util
import math
import re
import secrets
from pathlib import Path
from typing import Any

from moedist.config import ConfigError, RunConfig, to_dict

SINKS = ("tensorboard", "wandb", "wandb:offline", "wandb:online")
# sink -> (the package it imports, the pip command that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "pip install 'moedist[log]' (or: pip install tensorboard)"),
            "wandb": ("wandb", "pip install 'moedist[log]' (or: pip install wandb)")}  # fmt: skip
WANDB_PROJECT = "moedist"
_LAYER = re.compile(r"L\d+_")


def parse_log(value: str) -> list[str]:
    """profile.log -> its sinks, e.g. "tensorboard,wandb" -> ["tensorboard", "wandb"]
    (ConfigError naming the field for anything else; "" = none)."""
    if not value.strip():
        return []
    items = [item.strip() for item in value.split(",")]
    for item in items:
        if item not in SINKS:
            raise ConfigError(f"profile.log: {item!r} is not one of: {', '.join(SINKS)} (comma-separated)")
    if sum(item.startswith("wandb") for item in items) > 1 or len(set(items)) < len(items):
        raise ConfigError(f"profile.log: {value!r} names a sink twice")
    return items


def check_installed(value: str) -> None:
    """Every sink of profile.log `value` can be imported (checked before Ray starts)."""
    for item in parse_log(value):
        package, pip = PACKAGES[item.split(":")[0]]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"profile.log: '{item}' needs the {package} package, which is not installed: {pip}")


def tag_of(column: str) -> str:
    """The sink tag of a metrics column: time/ for seconds (step_s, a2a_s, ...; not rates
    such as tokens_per_s), routing/ for a layer's columns (L1_fanout, ...), train/ for the
    rest (loss, val_loss, lr, ...)."""
    if column.endswith("_s") and not column.endswith("_per_s"):
        return f"time/{column}"
    if _LAYER.match(column):
        return f"routing/{column}"
    return f"train/{column}"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric columns (not `step`, not flags such as `skipped`, not lists, not
    the None of a missing value) by tag."""
    return {tag_of(k): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip


class TensorBoardSink:
    """Event files in RUN/tensorboard/; each (re)opening purges the steps from `step` on."""

    def __init__(self, run_dir: Path, step: int):
        self.dir = Path(run_dir) / "tensorboard"
        self.writer = None
        self.rewind(step)

    def rewind(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        # purge_step writes SessionLog.START at `step`: readers drop what an earlier run of
        # this folder logged at or after it (the steps a resume or a recovery replays).
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=step)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        for key, load in row.items():
            if key.endswith("_load") and isinstance(load, list) and load:
                import numpy as np

                # bins: TensorBoard's default makes ~1500 buckets (about 3x slower to write)
                self.writer.add_histogram(tag_of(key), np.asarray(load, dtype=np.float64), step,
                                          bins=min(len(load), 64))  # fmt: skip

    def write_value(self, step: int, column: str, value: float) -> None:
        self.writer.add_scalar(tag_of(column), float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """One W&B run per run folder (its id kept in RUN/wandb/moedist_run_id, so a resumed
    job continues it), files under RUN/wandb/; offline unless `online`."""

    def __init__(self, run_dir: Path, cfg: RunConfig, step: int, online: bool = False):
        import wandb

        run_dir = Path(run_dir)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb" / "moedist_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        # Everything through the API: mode, folder and quiet output (our own stdout and
        # progress bar stay as they are).
        settings = wandb.Settings(console="off", silent=True)
        try:
            self.run = wandb.init(project=WANDB_PROJECT, name=run_dir.name, id=run_id, resume="allow",
                                  dir=str(run_dir), mode="online" if online else "offline", config=to_dict(cfg),
                                  settings=settings)  # fmt: skip
        except wandb.Error as e:
            raise ConfigError(f"profile.log: W&B could not start a run: {e}") from e
        self.next_step = step  # W&B histories only go forward: replayed steps it has are dropped
        self.dir = Path(self.run.dir).parent  # RUN/wandb/offline-run-... (or run-...)

    def rewind(self, step: int) -> None:
        pass  # the replayed steps reproduce what W&B already has; `write` skips them

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if step < self.next_step:
            return
        self.run.log(scalars(row), step=step)
        self.next_step = step + 1

    def write_value(self, step: int, column: str, value: float) -> None:
        if step == self.next_step - 1:  # the newest step: merged into its row
            self.run.log({tag_of(column): float(value)}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MetricSinks:
    """The sinks of profile.log, opened at `step` (0, or where a resume continues)."""

    def __init__(self, sinks: list[Any] | None = None):
        self.sinks = sinks or []

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, step: int) -> MetricSinks:
        out = cls()
        try:
            for item in parse_log(cfg.profile.log):
                if item == "tensorboard":
                    out.sinks.append(TensorBoardSink(run_dir, step))
                else:
                    out.sinks.append(WandbSink(run_dir, cfg, step, online=item == "wandb:online"))
        except BaseException:
            out.close()
            raise
        return out

    def write(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(row)

    def write_value(self, step: int, column: str, value: float | None) -> None:
        """One more value of an already written step (the final evaluation's val_loss)."""
        if value is not None and math.isfinite(value):
            for sink in self.sinks:
                sink.write_value(step, column, value)

    def rewind(self, step: int) -> None:
        """The run goes back to `step` (a recovery): the steps from there on are replayed."""
        for sink in self.sinks:
            sink.rewind(step)

    def close(self) -> None:
        """Flush and close every sink (each one even if another fails)."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # close the rest first
                errors.append(e)
        self.sinks = []
        if errors:
            raise errors[0]

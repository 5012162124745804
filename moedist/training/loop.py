"""The one run loop: steps, evaluation, checkpoints, metrics, progress, summary and plots.

Every run, single-process or expert-parallel on Ray, goes through `RunLoop` over a step
executor (the `StepExecutor` protocol):

    single process   moedist.training.trainer.Trainer (the oracle)
    expert-parallel  moedist.runtime.coordinator.Coordinator (fans each call out to the
                     worker actors; every worker runs a Trainer on its share)

Schedule of a run to train.steps (S) from step s0:

    for each step s0..S-1: row = train_step()
        done % eval_every == 0 and done < S         -> row.val_loss = evaluate()
        done % checkpoint_every == 0 and done < S   -> checkpoint (model, optimiser, rows)
        on_boundary hooks (the control API's commands) -> may checkpoint, or stop: leave the loop
    checkpoint at S (unless just saved), then the final evaluation
    metrics.parquet, summary.json, plots/

The final checkpoint is written before the final evaluation, so a failure there loses no
training. An executor that loses a worker raises `WorkerLostError`; the loop then asks it to
`recover` (re-form its workers) and continues from the newest checkpoint that verifies
(or from step 0 if there is none): batches are a pure function of (seed, step), so the
replayed steps reproduce the lost ones and their rows replace them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tomli_w

from moedist.config import RunConfig, to_dict
from moedist.errors import TooManyFailuresError  # defined there: the CLI handles it without importing torch
from moedist.training.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from moedist.training.evaluate import EvalResult
from moedist.training.sinks import MetricSinks
from moedist.training.trainer import parquet_bytes, read_resume_checkpoint, write_atomic

# Per-step timing columns whose means summary.json reports (those a run's rows have).
TIMING_KEYS = ("step_s", "compute_s", "comm_s", "a2a_s", "pool_s", "grad_sync_s")


class WorkerLostError(RuntimeError):
    """An executor lost a worker; the run can go on after `recover` and a restore.

    `noticed` is the time.monotonic() at which the loss was noticed.
    """

    def __init__(self, message: str, noticed: float | None = None):
        super().__init__(message)
        self.noticed = time.monotonic() if noticed is None else noticed


# Relative noise on split copies' input projections (breaks their symmetry; 0 = exact).
DEFAULT_SPLIT_NOISE = 0.01


class ScaleError(ValueError):
    """A requested change of worker or expert count that cannot be made; the job goes on
    unchanged."""


class StepExecutor(Protocol):
    """What the run loop drives: one optimiser step at a time over the global batch."""

    step: int

    def train_step(self) -> dict[str, Any]:
        """Run step `self.step` and advance; the step's metric row (global numbers)."""

    def evaluate(self) -> EvalResult:
        """Validation loss and eval-mode routing statistics."""

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(whole-model tensors {model, optim}, extra JSON state) for a checkpoint."""

    def load_state(self, tensors: dict[str, Any], extra: dict[str, Any], step: int) -> None:
        """Continue from a checkpoint's tensors and state at `step`."""

    def info(self) -> dict[str, Any]:
        """Where the run runs (device, workers, nodes, ...) for summary.json."""

    def param_counts(self) -> dict[str, int]:
        """Total and active parameter counts."""


@dataclass
class Failure:
    """One lost worker and the recovery from it (seconds; None while unknown)."""

    step: int  # the step that was running when the loss was noticed
    error: str
    restored_step: int | None = None  # the checkpoint's step (0: no checkpoint, a fresh start)
    parts: dict[str, float] = field(default_factory=dict)  # probe_s, actor_start_s, group_s, load_s
    first_step_s: float | None = None  # restore done -> first step done
    total_s: float | None = None  # loss noticed -> first step done after the restore
    noticed: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "error": self.error, "restored_step": self.restored_step, **self.parts,
                "first_step_s": self.first_step_s, "recovery_s": self.total_s}  # fmt: skip


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    """The run folder's resolved config.toml (and its plots/ folder)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plots").mkdir(exist_ok=True)
    write_atomic(run_dir / "config.toml", tomli_w.dumps(to_dict(cfg)).encode())


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


class RunLoop:
    """Trains `executor` to cfg.train.steps, writing the run folder `run_dir`."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        executor: StepExecutor,
        tokenizer_spec: dict[str, Any],
        max_failures: int = 3,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ex = executor
        self.tokenizer_spec = tokenizer_spec
        self.max_failures = max_failures
        self.rows: list[dict[str, Any]] = []
        self.failures: list[Failure] = []
        self.scales: list[dict[str, Any]] = []  # live changes of worker/expert count (RunLoop.scale)
        self.saved_step: int | None = None
        self.last_eval: EvalResult | None = None
        self.on_row: list[Any] = []  # callables(row), e.g. a metrics stream
        # callables(loop) run at each step boundary (after the step's row and checkpoint),
        # e.g. the control API's commands; they may save() or request_stop()
        self.on_boundary: list[Callable[[RunLoop], None]] = []
        self.stopped_at: int | None = None  # set by request_stop: the step the run ended at
        self.saved_path: Path | None = None  # the newest checkpoint written or restored
        self._recovering: Failure | None = None
        self.save_s: list[float] = []  # seconds of each checkpoint (gather, merge, write, fsync)
        self.sinks = MetricSinks()  # profile.log's TensorBoard / W&B, open while run() runs

    @property
    def step(self) -> int:
        return self.ex.step

    # ------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Checkpoint the executor's state at this step, with the metric rows so far."""
        t0 = time.perf_counter()
        tensors, extra = self.ex.state()
        state = {"step": self.ex.step, "tokenizer": self.tokenizer_spec, "config": to_dict(self.cfg), **extra}
        path = save_checkpoint(self.run_dir, self.ex.step, tensors, state,
                               blobs={"metrics.parquet": parquet_bytes(self.rows)},
                               keep=self.cfg.train.keep_checkpoints)  # fmt: skip
        self.saved_step, self.saved_path = self.ex.step, path
        self.save_s.append(time.perf_counter() - t0)
        return path

    def restore(self) -> int:
        """Continue from the newest checkpoint that verifies; returns its step."""
        tensors, state, rows, ckpt = read_resume_checkpoint(self.run_dir, self.cfg)
        step = int(state["step"])
        try:
            self.ex.load_state(tensors, state, step)
        except WorkerLostError:
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint '{ckpt}' does not fit the model in config.toml: {e}") from e
        self.rows = rows
        self.saved_step, self.saved_path = step, Path(ckpt)
        return step

    # ------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train to cfg.train.steps, evaluating and checkpointing; return the summary."""
        from tqdm import tqdm

        total = self.cfg.train.steps
        t_start = time.perf_counter()
        first = self.ex.step
        self.sinks = MetricSinks.open(self.cfg, self.run_dir, self.ex.step)
        bar = tqdm(total=total, initial=self.ex.step, disable=not self.cfg.train.progress, unit="step",
                   dynamic_ncols=True)  # fmt: skip
        self.write_members()
        try:
            while True:
                try:
                    self._train(bar)
                    if self.saved_step != self.ex.step:
                        self.save()  # before the final evaluation: a failure there loses no training
                    final_eval = self._evaluate(final=True)
                    if self.rows and self.rows[-1]["step"] == self.ex.step - 1:
                        self.sinks.write_value(self.ex.step - 1, "val_loss", final_eval.val_loss)
                    break
                except WorkerLostError as e:
                    self._recover(e)
                    bar.n = self.ex.step
                    bar.refresh()
        except BaseException:
            if self.rows:  # what was trained stays readable (the checkpoints are intact)
                self.write_metrics()
            raise
        finally:
            bar.close()
            self.sinks.close()  # finished, stopped or failed: the sinks' files are complete
        if self.rows and self.rows[-1]["step"] == self.ex.step - 1:  # the final step (also of a stopped run)
            self.rows[-1]["val_loss"] = final_eval.val_loss
        self.write_metrics()
        self.write_trace()
        summary = self.summary(time.perf_counter() - t_start, self.ex.step - first)
        # The final evaluation's fanout histogram under the inference rule (ET in warm-up: the
        # thresholds' pass): `moedist plot` redraws fanout.png from it.
        summary["eval_fanout_hist"] = final_eval.inference_hist
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1).encode())
        from moedist.training.plots import write_plots

        write_plots(self.run_dir, self.rows, final_eval)
        return summary

    def _train(self, bar) -> None:
        cfg = self.cfg.train
        while self.ex.step < cfg.steps:
            row = self.ex.train_step()
            self.write_torch_traces()
            done = self.ex.step
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                row["val_loss"] = self._evaluate().val_loss
            self._finish_recovery()
            self.rows = [r for r in self.rows if r["step"] < row["step"]]  # replayed steps replace lost ones
            self.rows.append(row)
            bar.update(done - bar.n)
            bar.set_postfix(progress_postfix(row), refresh=False)
            self.sinks.write(row)
            for fn in self.on_row:
                fn(row)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self.save()
            for hook in self.on_boundary:
                hook(self)
            if self.stopped_at is not None:
                return

    def scale(self, workers: int | None = None, experts: int | None = None, noise: float | None = None) -> dict:
        """Scale the executor at this step boundary (ScaleError: refused, nothing changed),
        then keep the run folder true to it: config.toml and workers.json; after a change of
        expert count also a checkpoint, so resume and recovery find the new shape."""
        before = self.cfg.model.n_experts
        kwargs: dict[str, Any] = {"workers": workers, "experts": experts}
        if experts is not None:
            kwargs["noise"] = DEFAULT_SPLIT_NOISE if noise is None else noise
        t0 = time.perf_counter()
        report = self.ex.scale(**kwargs)
        write_config(self.run_dir, self.cfg)
        self.write_members()
        t1 = time.perf_counter()
        if self.cfg.model.n_experts != before:
            self.save()
        # summary.json's "scales": what each change did and cost (its checkpoint apart)
        self.scales.append({"step": self.ex.step, **{k: v for k, v in report.items() if k != "layers"},
                            "scale_s": t1 - t0, "save_s": time.perf_counter() - t1})  # fmt: skip
        return report

    def request_stop(self) -> None:
        """End the run after the current step (call at a step boundary): the final
        checkpoint, evaluation, metrics and summary follow as at the last step."""
        self.stopped_at = self.ex.step

    def _evaluate(self, final: bool = False) -> EvalResult:
        self.last_eval = ev = self.ex.evaluate()
        # A far-off inference fanout is expected while ET is in warm-up (its evaluations route
        # with the warm-up rule then): warn after warm-up, and always at the final evaluation.
        if final or ev.thresholds_settled is not False:
            for w in ev.warnings:
                _log(f"moedist: warning: step {self.ex.step}: {w}")
        return ev

    # -------------------------------------------------------------- recovery
    def _recover(self, err: WorkerLostError) -> None:
        """Re-form the executor's workers and go back to the newest valid checkpoint."""
        failure = Failure(step=self.ex.step, error=str(err), noticed=err.noticed)
        self.failures.append(failure)
        if len(self.failures) > self.max_failures:
            ckpts = list_checkpoints(self.run_dir)
            last = f"last checkpoint {ckpts[-1][1]}" if ckpts else "no checkpoint was written"
            report = "; ".join(f"#{i + 1} at step {f.step}: {f.error}" for i, f in enumerate(self.failures))
            raise TooManyFailuresError(
                f"{len(self.failures)} worker failures, more than --max-failures {self.max_failures} allows "
                f"({report}); {last}"
            )
        _log(f"moedist: worker lost at step {failure.step} ({err}); recovering "
             f"({len(self.failures)} of at most {self.max_failures})")  # fmt: skip
        recover = getattr(self.ex, "recover", None)
        if recover is None:
            raise err
        failure.parts.update(recover(err))
        self.write_members()
        t0 = time.perf_counter()
        if list_checkpoints(self.run_dir):
            failure.restored_step = self.restore()
        else:  # nothing saved yet: the re-formed workers start from the seed's initial model
            failure.restored_step = 0
            self.rows, self.saved_step, self.saved_path = [], None, None
        failure.parts["load_s"] = time.perf_counter() - t0
        self.sinks.rewind(failure.restored_step)  # the steps from there on are replayed
        self._recovering = failure
        self._recovery_t = time.perf_counter()
        _log(f"moedist: recovered in {time.monotonic() - err.noticed:.1f} s; replaying from step "
             f"{failure.restored_step}")  # fmt: skip

    def _finish_recovery(self) -> None:
        """Record the first step after a recovery (its time, and loss noticed -> done)."""
        f = self._recovering
        if f is not None:
            f.first_step_s = time.perf_counter() - self._recovery_t
            f.total_s = time.monotonic() - f.noticed
            self._recovering = None

    # ---------------------------------------------------------------- outputs
    def write_members(self) -> None:
        """RUN/workers.json: each worker's rank, node and pid (executors with workers)."""
        members = getattr(self.ex, "members", None)
        if members is not None:
            write_atomic(self.run_dir / "workers.json", json.dumps(members(), indent=1).encode())

    def write_torch_traces(self) -> None:
        """RUN/torch_profile/: the torch.profiler traces the executor's workers finished."""
        take = getattr(self.ex, "take_torch_traces", None)
        for name, data in (take() if take is not None else {}).items():
            (self.run_dir / "torch_profile").mkdir(exist_ok=True)
            write_atomic(self.run_dir / "torch_profile" / name, data)

    def write_metrics(self) -> None:
        write_atomic(self.run_dir / "metrics.parquet", parquet_bytes(self.rows))

    def write_trace(self) -> None:
        """RUN/trace.json of the steps in profile.trace_steps (executors that trace)."""
        events = getattr(self.ex, "trace_events", None)
        if events is None:
            return
        from moedist.training.profile import write_trace

        names = getattr(self.ex, "trace_names", dict)
        write_trace(self.run_dir, events(), names())

    def summary(self, wall_s: float, steps_this_run: int) -> dict[str, Any]:
        """summary.json: run_summary's keys, the executor's facts, per-step timings, failures."""
        out = run_summary(self.cfg, self.rows, self.ex.step, wall_s, steps_this_run, self.last_eval,
                          self.ex.param_counts())  # fmt: skip
        out.update(self.ex.info())
        spans = [k for k in (self.rows[0] if self.rows else {}) if k.startswith("span_")]
        for key in (*TIMING_KEYS, *spans):
            vals = [r[key] for r in self.rows if r.get(key) is not None]
            if vals:  # mean seconds per step (the slowest rank of each step, when distributed)
                out[f"{key}_per_step"] = float(np.mean(vals))
        out["skipped_steps"] = sum(1 for r in self.rows if r.get("skipped"))
        # What checkpoint_every costs: seconds per save, against the steps a loss replays.
        out["checkpoints_saved"] = len(self.save_s)
        out["checkpoint_s_per_save"] = float(np.mean(self.save_s)) if self.save_s else None
        out["failures"] = [f.to_json() for f in self.failures]
        out["scales"] = self.scales
        out["stopped_at_step"] = self.stopped_at  # None unless stopped early (moedist ctl stop)
        return out


def progress_postfix(row: dict[str, Any]) -> dict[str, str]:
    """The progress bar's loss, throughput, fan-out and load balance."""
    post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
    if row.get("skipped"):
        return {"loss": "skipped (non-finite)"}
    loads = [np.asarray(v) for k, v in row.items() if k.endswith("_load")]
    if loads:
        fan = np.mean([v for k, v in row.items() if k.endswith("_fanout")])
        ratio = max(lo.max() / max(lo.mean(), 1e-9) for lo in loads)
        post.update({"fanout": f"{fan:.2f}", "max/mean load": f"{ratio:.2f}"})
    return post


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def run_summary(
    cfg: RunConfig,
    rows: list[dict[str, Any]],
    step: int,
    wall_s: float,
    steps_this_run: int,
    ev: EvalResult | None,
    counts: dict[str, int],
) -> dict[str, Any]:
    """summary.json keys shared by every run.

    Train loss, fan-out and load balance are averaged over the last 10% of steps (skipped
    non-finite steps left out); the throughput is the wall clock of this invocation
    (evaluation, checkpoints and any recovery included).
    """
    kept = [r for r in rows if not r.get("skipped")]
    tail = kept[-max(1, len(kept) // 10) :] if kept else []
    fan_keys = [k for k in (tail[0] if tail else {}) if k.endswith("_fanout")]
    load_keys = [k for k in (tail[0] if tail else {}) if k.endswith("_load")]
    ratios = []
    for k in load_keys:  # over the rows with the last row's expert count (a live Scale may change it)
        load = np.sum([r[k] for r in tail if len(r[k]) == len(tail[-1][k])], axis=0)
        ratios.append(float(load.max() / max(load.mean(), 1e-9)))
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    return {
        "router": cfg.router.kind,
        "preset": cfg.preset,
        "steps": step,
        "tokens": step * tokens_per_step,
        "wall_s": wall_s,
        "tokens_per_s": steps_this_run * tokens_per_step / wall_s if wall_s > 0 else 0.0,
        "final_train_loss": _finite_or_none(float(np.mean([r["loss"] for r in tail]))) if tail else None,
        "final_val_loss": _finite_or_none(ev.val_loss) if ev else None,
        "val_tokens": ev.tokens if ev else 0,
        "n_experts": cfg.model.n_experts if cfg.router.kind != "dense" else 0,
        "mean_fanout": ev.mean_fanout if ev else None,
        "inference_fanout": ev.inference_fanout if ev else None,
        "inference_val_loss": _finite_or_none(ev.inference_loss) if ev else None,
        "thresholds_settled": ev.thresholds_settled if ev else None,
        "eval_warnings": ev.warnings if ev else [],
        "train_fanout": float(np.mean([[r[k] for k in fan_keys] for r in tail])) if fan_keys else None,
        "max_load_ratio": max(ratios) if ratios else None,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "workers": cfg.workers,
    }


def single_process_loop(cfg: RunConfig, run_dir: Path, resume: bool = False) -> RunLoop:
    """A RunLoop over a single-process Trainer: a new run (config.toml written) or, with
    `resume`, the run folder's newest checkpoint."""
    from moedist.training.trainer import Trainer, load_dataset

    dataset = load_dataset(cfg)
    loop = RunLoop(cfg, Path(run_dir), Trainer(cfg, dataset), dataset.tokenizer.to_spec())
    if resume:
        loop.restore()
    else:
        write_config(Path(run_dir), cfg)
    return loop

"""Live scaling of a running job (workers 2 -> 4 -> 2, experts 16 -> 32) against what every
other system does: stop at a checkpoint and restart the same job with the new size.

A 2-node local cluster (`cluster/local up`: raylets on 127.0.0.2 and 127.0.0.3, 2 CPUs
each, one per worker) runs the tiny preset (ET router, 16 experts) with 2 workers, SPREAD,
one torch thread per worker. Every job has the same 10,000-step schedule and is ended with
`moedist ctl stop`; nothing is checkpointed periodically.

- live: one job; `moedist ctl --run RUN --json scale --workers 4`, then `--workers 2`, then
  `--experts 32`, a few steps apart. A shrink or an expert change happens at the next step
  boundary; a scale-up first starts and warms up its new workers while the job trains on,
  and switches at the first boundary after they are ready (the pause is the switch only).
- restart: one job; for each change `moedist ctl stop` (the final checkpoint, a small final
  evaluation of 4096 tokens, exit), then `moedist train --resume RUN --workers N`. `--resume`
  cannot change the expert count (the checkpoint's shape must fit config.toml), so for
  16 -> 32 a separate process (this script with --resize-offline) loads the checkpoint,
  resizes it with moedist.training.trainer.resize_experts (the function the live path
  uses, same loads, same noise), saves it and rewrites config.toml; then --resume.

Both are timed the same way, from the moment the `moedist ctl` command is launched to the
moment the first step after the change is done (its metrics row reaches a client
streaming the job's metrics). The parts of each live change come from the run's
summary.json ("scales"). Three changes x reps, the live and restart chains interleaved.

The loss curve across a live expert split: one more job (2 workers throughout) splits
16 -> 32 live after step 110 (past ET's 100-step expert-choice warm-up) and runs 30 steps
past it; the same job unsplit runs
to the same step. Until the split the two are the same job (identical losses).

    python benchmarks/elastic.py [--quick] [--plot-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cluster_local, moedist, save_figure, target, write_results

ROOT = Path(__file__).resolve().parents[1]
PORT, DASHBOARD = 6461, 8461
ADDRESS = f"127.0.0.2:{PORT}"
E0, E1 = 16, 32
STEPS = 10_000  # every job's schedule (learning rate); jobs are ended by `moedist ctl stop`
RUNTIME = ["--address", ADDRESS, "--placement", "SPREAD", "--cpus-per-worker", "1", "--no-progress"]
JOB = ["--preset", "tiny", "--steps", str(STEPS), "--set", f"model.n_experts={E0}", "--set", "train.threads=1",
       "--set", f"train.checkpoint_every={STEPS}", "--set", "train.eval_every=0",
       "--set", "train.eval_tokens=4096"]  # fmt: skip
CHANGES = [("workers 2 -> 4", {"workers": 4}), ("workers 4 -> 2", {"workers": 2}),
           ("experts 16 -> 32", {"experts": E1})]  # fmt: skip
# The split (requested after this step, then this many steps run past it): after ET's
# 100-step expert-choice warm-up, where a split preserves the function (docs/scaling.md).
SPLIT_AT, SPLIT_AT_QUICK = (110, 30), (3, 6)
TARGET = 0.2  # the target: live time / checkpoint-and-restart time


def ctl(run: Path, *args: str) -> dict[str, Any]:
    res = subprocess.run(moedist("ctl", "--run", str(run), "--json", *args), capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"moedist ctl {' '.join(args)} failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout)


class Rows:
    """Streams a job's metric rows (from `from_step`) in a thread and notes when each
    arrives (time.monotonic): the moment its step was done, to a client's eye."""

    def __init__(self, run: Path, job: subprocess.Popen, from_step: int, old_token: str | None = None):
        self.run, self.job, self.from_step, self.old_token = run, job, from_step, old_token
        self.arrived: dict[int, float] = {}
        self.rows: dict[int, dict[str, float]] = {}
        self.token: str | None = None
        self.error: str | None = None
        self.done = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        from moedist.control.client import Client
        from moedist.control.v1 import control_pb2 as pb

        try:
            path = self.run / "control.json"
            while True:  # this job's control.json (not one left by the job before it)
                try:
                    info = json.loads(path.read_text())
                    if info["token"] != self.old_token:
                        break
                except (OSError, ValueError, KeyError):
                    pass
                if self.job.poll() is not None:
                    raise RuntimeError("the job ended before its control API came up")
                time.sleep(0.01)
            self.token = info["token"]
            client = Client(info["address"], info["token"])
            for row in client.stream(pb.StreamMetricsRequest(from_step=self.from_step, follow=True)):
                with self.cond:
                    self.arrived.setdefault(row.step, time.monotonic())
                    self.rows[row.step] = dict(row.values)
                    self.cond.notify_all()
            client.close()
        except Exception as e:  # reported by wait()
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def wait(self, step: int, timeout: float = 900) -> float:
        """When the row of `step` arrived (waiting for it)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while step not in self.arrived:
                if self.done:
                    raise SystemExit(f"{self.run}: the metric stream ended before step {step} ({self.error})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"{self.run}: step {step} was not done within {timeout:g} s")
                self.cond.wait(min(left, 1.0))
            return self.arrived[step]

    def last(self) -> int:
        with self.cond:
            return max(self.arrived) if self.arrived else self.from_step - 1


def start(args: list[str], jobs: list[subprocess.Popen]) -> subprocess.Popen:
    """A `moedist train` process; its output goes to a file (a pipe nobody reads could fill
    up with the workers' forwarded logs and block the job)."""
    log = Path(tempfile.mkstemp(prefix="moedist-elastic-job-", suffix=".log")[1])
    with log.open("w") as f:
        job = subprocess.Popen(moedist("train", *args), stdout=f, stderr=subprocess.STDOUT, text=True)
    job.log = log  # type: ignore[attr-defined]
    jobs.append(job)
    return job


def finish(job: subprocess.Popen, what: str) -> None:
    job.wait(timeout=900)
    text = job.log.read_text()  # type: ignore[attr-defined]
    job.log.unlink()  # type: ignore[attr-defined]
    if job.returncode != 0:
        raise SystemExit(f"{what} failed (exit {job.returncode}): {text[-2000:]}")


def step_s(rows: Rows, steps: range) -> float | None:
    vals = [rows.rows[s]["step_s"] for s in steps if s in rows.rows]
    return statistics.median(vals) if vals else None


def live_chain(run: Path, warm: int, gap: int, jobs: list) -> tuple[list[dict], dict]:
    """One job, three live changes; returns a row per change and the run's summary."""
    job = start(["--out", str(run), "--workers", "2", *RUNTIME, *JOB], jobs)
    rows = Rows(run, job, 0)
    rows.wait(warm - 1)
    out = []
    for name, change in CHANGES:
        (key, value), = change.items()
        t0 = time.monotonic()
        ans = ctl(run, "scale", f"--{key}", str(value))
        t_ans = time.monotonic()
        s = ans["step"]  # steps done at the boundary: the first step after the change is step s
        t_first = rows.wait(s)
        rows.wait(s + gap)
        t_boundary = rows.arrived.get(s - 1, t0)
        out.append({"mode": "live", "change": name, "step": s, "total_s": t_first - t0,
                    "pause_s": t_first - max(t0, t_boundary),
                    "boundary_wait_s": max(0.0, t_boundary - t0), "answer_s": t_ans - t0,
                    "first_step_s": rows.rows[s]["step_s"], "step_s_before": step_s(rows, range(s - 3, s)),
                    "step_s_after": step_s(rows, range(s + 1, s + 1 + gap))})  # fmt: skip
    ctl(run, "stop")
    finish(job, "live job")
    summary = json.loads((run / "summary.json").read_text())
    for r in out:  # the coordinator's parts of each change (RunLoop.scale writes them)
        sc = next(x for x in summary["scales"] if x["step"] == r["step"])
        r.update({k: sc.get(k) for k in ("prepared_s", "warm_s", "actor_start_s", "group_s", "move_s", "resize_s",
                                         "scale_s", "save_s",
                                         "experts_moved", "bytes_moved", "state_bytes_before",
                                         "state_bytes_after")})  # fmt: skip
    return out, summary


def resize_offline(run: Path, n_experts: int) -> None:
    """The restart path's resize: newest checkpoint -> resize_experts -> saved at the same
    step, config.toml rewritten (what a user would script between stop and --resume)."""
    import pyarrow.parquet as pq

    from moedist.config import to_dict
    from moedist.training.checkpoint import load_latest_checkpoint, save_checkpoint
    from moedist.training.loop import DEFAULT_SPLIT_NOISE, write_config
    from moedist.training.trainer import resize_experts, resume_config

    cfg = resume_config(run)
    ckpt, objs, state = load_latest_checkpoint(run, ["model", "optim"])
    metrics = (ckpt / "metrics.parquet").read_bytes()
    last_row = pq.read_table(ckpt / "metrics.parquet").to_pylist()[-1]
    new_cfg, tensors, _ = resize_experts(cfg, objs, n_experts, last_row, DEFAULT_SPLIT_NOISE)
    state["config"] = to_dict(new_cfg)
    save_checkpoint(run, int(state["step"]), tensors, state, blobs={"metrics.parquet": metrics},
                    keep=new_cfg.train.keep_checkpoints)  # fmt: skip
    write_config(run, new_cfg)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def restart_chain(run: Path, warm: int, gap: int, jobs: list) -> list[dict]:
    """One job stopped and resumed with the new size for each change."""
    job = start(["--out", str(run), "--workers", "2", *RUNTIME, *JOB], jobs)
    rows = Rows(run, job, 0)
    rows.wait(warm - 1)
    workers = 2
    out = []
    for name, change in CHANGES:
        t0 = time.monotonic()
        s = ctl(run, "stop")["step"]
        t_ans = time.monotonic()
        finish(job, "job before a restart")
        t_exit = time.monotonic()
        t_boundary = rows.arrived.get(s - 1, t0)
        ckpt_bytes = dir_bytes(run / "checkpoints" / f"step_{s:06d}")
        if "experts" in change:
            res = subprocess.run([sys.executable, __file__, "--resize-offline", str(run), str(change["experts"])],
                                 capture_output=True, text=True, timeout=900)  # fmt: skip
            if res.returncode != 0:
                raise SystemExit(f"offline resize failed: {res.stderr[-2000:]}")
        t_resized = time.monotonic()
        workers = change.get("workers", workers)
        job = start(["--resume", str(run), "--workers", str(workers), *RUNTIME], jobs)
        rows = Rows(run, job, s, old_token=rows.token)
        t_first = rows.wait(s)
        rows.wait(s + gap)
        out.append({"mode": "restart", "change": name, "step": s, "total_s": t_first - t0,
                    "pause_s": t_first - max(t0, t_boundary), "boundary_wait_s": max(0.0, t_boundary - t0),
                    "stop_s": t_exit - t0, "stop_answer_s": t_ans - t0, "resize_s": t_resized - t_exit,
                    "start_to_first_step_s": t_first - t_resized,
                    "first_step_s": rows.rows[s]["step_s"], "step_s_after": step_s(rows, range(s + 1, s + 1 + gap)),
                    "checkpoint_bytes": ckpt_bytes})  # fmt: skip
    ctl(run, "stop")
    finish(job, "restarted job")
    return out


def loss_pair(tmp: Path, warm: int, after: int, jobs: list) -> tuple[dict[int, float], dict[int, float], int]:
    """The loss across a live split 16 -> 32 (2 workers all along: worker changes reorder
    float sums, and with ET's hard thresholds such differences grow over the steps), and
    the same job unsplit, to the same step. Returns (split losses, unsplit losses, split step)."""
    job = start(["--out", str(tmp / "split"), "--workers", "2", *RUNTIME, *JOB], jobs)
    rows = Rows(tmp / "split", job, 0)
    rows.wait(warm - 1)
    split = ctl(tmp / "split", "scale", "--experts", str(E1))["step"]
    rows.wait(split + after - 1)
    ctl(tmp / "split", "stop")
    finish(job, "split job")
    job = start(["--out", str(tmp / "unsplit"), "--workers", "2", *RUNTIME, *JOB], jobs)
    ref = Rows(tmp / "unsplit", job, 0)
    ref.wait(max(rows.rows))
    ctl(tmp / "unsplit", "stop")
    finish(job, "unsplit job")
    return {s: v["loss"] for s, v in rows.rows.items()}, {s: v["loss"] for s, v in ref.rows.items()}, split


def loss_summary(live_l: dict[int, float], ref_l: dict[int, float], split: int) -> dict[str, Any]:
    common_steps = sorted(s for s in live_l if s in ref_l)
    before = [abs(live_l[s] - ref_l[s]) / abs(ref_l[s]) for s in common_steps if s < split]
    after = [s for s in common_steps if s >= split]
    return {
        "split_step": split, "max_rel_diff_before_split": max(before),
        "loss_at_split": {"live": live_l[split], "unsplit": ref_l[split]},
        "mean_diff_after_split": statistics.mean(live_l[s] - ref_l[s] for s in after),
        "mean_diff_first_10": statistics.mean(live_l[s] - ref_l[s] for s in after[:10]),
        "mean_diff_last_10": statistics.mean(live_l[s] - ref_l[s] for s in after[-10:]),
        "steps_after_split": len(after),
        "live": {str(k): v for k, v in sorted(live_l.items())},
        "unsplit": {str(k): v for k, v in sorted(ref_l.items())},
    }  # fmt: skip


def loss_only(quick: bool) -> None:
    """The loss pair alone; its row replaces the JSON's "loss_curve" (the one before is
    kept as "loss_curve_before")."""
    split_at, after = SPLIT_AT_QUICK if quick else SPLIT_AT
    tmp = Path(tempfile.mkdtemp(prefix="moedist-elastic-"))
    jobs: list[subprocess.Popen] = []
    cluster_local(tmp / "cluster", "up", "--nodes", "2", "--cpus-per-node", "2", "--port", str(PORT),
                  "--dashboard-port", str(DASHBOARD))  # fmt: skip
    try:
        live_l, ref_l, split = loss_pair(tmp, split_at, after, jobs)
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
        cluster_local(tmp / "cluster", "down")
    path = RESULTS / ("elastic-quick.json" if quick else "elastic.json")
    doc = json.loads(path.read_text())
    for r in doc["results"]:
        if r["mode"] == "loss_curve":
            r["mode"] = "loss_curve_before"
    doc["results"].append({"mode": "loss_curve", "split_requested_after_step": split_at, "date":
                           time.strftime("%Y-%m-%d %H:%M:%S"), **loss_summary(live_l, ref_l, split)})  # fmt: skip
    path.write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc["results"][-1].items() if k not in ("live", "unsplit")}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


def plot(results: list[dict], curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [n for n, _ in CHANGES]
    for j, mode in enumerate(("live", "restart")):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
        color = ("tab:green", "tab:gray")[j]
        for key, alpha in (("total_s", 0.3), ("pause_s", 1.0)):
            meds = [statistics.median(r[key] for r in results if r["mode"] == mode and r["change"] == n)
                    for n in names]  # fmt: skip
            label = ("live", "stop + restart")[j]
            ax.bar(xs, meds, width=0.38, color=color, alpha=alpha,
                   label=f"{label}: {'pause' if key == 'pause_s' else 'from the ctl request'}")  # fmt: skip
            for i, n in enumerate(names):
                pts = [r[key] for r in results if r["mode"] == mode and r["change"] == n]
                ax.plot([xs[i]] * len(pts), pts, "k.", ms=3)
                ax.text(xs[i], meds[i], f"{meds[i]:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("seconds to the first step done after the change")
    ax.set_title("Live scaling vs checkpoint + restart (median; dots: runs)", fontsize=10)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    split = curve["split_step"]
    steps = sorted(s for s in curve["live"] if s in curve["unscaled"] and s >= split - 15)
    bx.plot(steps, [curve["unscaled"][s] for s in steps], color="tab:gray", label=f"unsplit ({E0} experts)")
    bx.plot(steps, [curve["live"][s] for s in steps], color="tab:green", lw=1,
            label=f"live split {E0} -> {E1} at step {split}")  # fmt: skip
    bx.axvline(split - 0.5, color="k", ls="--", lw=0.8)
    bx.set_xlabel("step")
    bx.set_ylabel("training loss")
    bx.set_title("Training loss across a live expert split (2 workers, same seed and batches)", fontsize=10)
    cx = bx.twinx()  # the difference, which the two curves hide
    cx.bar(steps, [curve["live"][s] - curve["unscaled"][s] for s in steps], color="tab:orange", alpha=0.5,
           label="split - unsplit (right axis)")  # fmt: skip
    cx.axhline(0, color="tab:orange", lw=0.5)
    cx.set_ylabel("loss difference")
    lim = max(abs(v) for v in cx.get_ylim())
    cx.set_ylim(-3 * lim, lim)  # the bars below the curves
    h1, l1 = bx.get_legend_handles_labels()
    h2, l2 = cx.get_legend_handles_labels()
    bx.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--loss-only", action="store_true", help="only the loss curve across a split, added to the JSON")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the results JSON")
    ap.add_argument("--resize-offline", nargs=2, metavar=("RUN", "EXPERTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.resize_offline:
        resize_offline(Path(args.resize_offline[0]), int(args.resize_offline[1]))
        return
    if args.plot_only:  # the PNG again from the JSON
        path = RESULTS / ("elastic-quick.json" if args.quick else "elastic.json")
        rows = json.loads(path.read_text())["results"]
        lc = next(r for r in rows if r["mode"] == "loss_curve")
        curve = {"split_step": lc["split_step"], "live": {int(k): v for k, v in lc["live"].items()},
                 "unscaled": {int(k): v for k, v in lc["unsplit"].items()}}  # fmt: skip
        plot([r for r in rows if r["mode"] in ("live", "restart")], curve, path.with_suffix(".png"))
        return
    if args.loss_only:  # only the loss pair, added to the results JSON of a full run
        loss_only(args.quick)
        return
    reps = args.reps or (1 if args.quick else 3)
    warm, gap = (3, 2) if args.quick else (5, 4)
    split_at, after_split = SPLIT_AT_QUICK if args.quick else SPLIT_AT
    tmp = Path(tempfile.mkdtemp(prefix="moedist-elastic-"))
    state = tmp / "cluster"
    jobs: list[subprocess.Popen] = []
    results: list[dict] = []
    t_start = time.monotonic()
    cluster_local(state, "up", "--nodes", "2", "--cpus-per-node", "2", "--port", str(PORT), "--dashboard-port",
                  str(DASHBOARD))  # fmt: skip
    try:
        for i in range(reps):  # interleaved, so slow phases of the shared machine hit both alike
            live_rows, live_summary = live_chain(tmp / f"live{i}", warm, gap, jobs)
            for r in live_rows:
                print(json.dumps(r), flush=True)
            results += live_rows
            rest = restart_chain(tmp / f"restart{i}", warm, gap, jobs)
            for r in rest:
                print(json.dumps(r), flush=True)
            results += rest
        live_l, ref_l, split = loss_pair(tmp, split_at, after_split, jobs)
    finally:
        for job in jobs:  # only ours, by handle
            if job.poll() is None:
                job.kill()
                job.wait()
        cluster_local(state, "down")
    wall = time.monotonic() - t_start
    model_state = live_summary["scales"][-1]["state_bytes_before"]  # model + AdamW, 16 experts, fp32
    per_change = []
    for name, _ in CHANGES:
        lv = [r for r in results if r["mode"] == "live" and r["change"] == name]
        rs = [r for r in results if r["mode"] == "restart" and r["change"] == name]
        live_s, restart_s = statistics.median(r["total_s"] for r in lv), statistics.median(r["total_s"] for r in rs)
        live_p, restart_p = statistics.median(r["pause_s"] for r in lv), statistics.median(r["pause_s"] for r in rs)
        per_change.append({
            "change": name, "live_pause_s": live_p, "restart_pause_s": restart_p, "pause_ratio": live_p / restart_p,
            "live_s": live_s, "restart_s": restart_s, "ratio": live_s / restart_s,
            "bytes_moved": statistics.median(r["bytes_moved"] for r in lv),
            "bytes_moved_of_state": statistics.median(r["bytes_moved"] for r in lv) / model_state,
            "restart_checkpoint_bytes": statistics.median(r["checkpoint_bytes"] for r in rs),
        })  # fmt: skip
    loss_cmp = loss_summary(live_l, ref_l, split)
    targets = [target(f"live / restart pause in training, {c['change']} (median)", c["pause_ratio"], "<=", TARGET)
               for c in per_change]  # fmt: skip
    targets += [target(f"live / restart time from the ctl request, {c['change']} (median)", c["ratio"], "<=", TARGET)
                for c in per_change]  # fmt: skip
    config = {"preset": "tiny", "router": "et", "experts": f"{E0} (-> {E1})", "workers": "2 -> 4 -> 2",
              "placement": "SPREAD", "cpus_per_worker": 1, "train.threads": 1, "schedule_steps": STEPS,
              "reps": reps, "warm_steps": warm, "steps_between_changes": gap,
              "split_requested_after_step": split_at, "steps_after_split": after_split,
              "cluster": "cluster/local: 2 raylets x 2 CPUs (127.0.0.2, 127.0.0.3)",
              "model_state_bytes": model_state, "wall_s": wall,
              "timing": "pause_s: the last step before the change done -> the first step after it done (their "
                        "metrics rows reaching a client that streams them; the training that did not happen, plus "
                        "one step); total_s: from the moment `moedist ctl` is launched (its start-up, the wait for "
                        "the step in flight and, for a scale-up, the steps trained while the new workers started "
                        "included) to the first step after; prepared_s/warm_s: a scale-up's placement and actor "
                        "start, and the slowest new worker's warm-up, both while the job trained on",
              "restart": "moedist ctl stop (final checkpoint, final eval of 4096 tokens, exit), [experts: a process "
                         "that loads the checkpoint, resize_experts, saves it, rewrites config.toml], then "
                         "moedist train --resume RUN --workers N"}  # fmt: skip
    rows_out = results + [{"mode": "median", **c} for c in per_change] + [{"mode": "loss_curve", **loss_cmp}]
    path = write_results("elastic", config, rows_out, targets, args.quick)
    plot(results, {"live": live_l, "unscaled": ref_l, "split_step": split}, path.with_suffix(".png"))
    loss_brief = {k: v for k, v in loss_cmp.items() if k not in ("live", "unsplit")}
    print(json.dumps({"per_change": per_change, "loss": loss_brief}, indent=1))
    print(f"-> {path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

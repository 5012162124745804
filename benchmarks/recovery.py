"""Recovery from a lost worker: how long from the loss to the first step done after the
restore, and what it is made of, against a full restart of the same job from the same
checkpoint (`moedist train --resume`, what a user does when the job dies).

A 2-node local cluster (`cluster/local up`: raylets on 127.0.0.2 and 127.0.0.3, 2 CPUs
each) runs the tiny preset with 2 workers (SPREAD, one per node) and a checkpoint every
10 steps. After checkpoint 10 is written, rank 1's process is killed with SIGKILL.

- live: the job recovers by itself (survivor kept, replacement actor, new process group,
  checkpoint loaded); its summary.json holds the parts, measured by the coordinator.
- restart: the same job with --max-failures 0 stops at the loss; then `moedist train
  --resume RUN --steps 11` (one step past the checkpoint) is launched at once, as a script
  or a scheduler would. Its time is loss -> the first job's exit -> the resumed process's
  exit; that includes the resumed run's final save and a small final evaluation (4096
  tokens; its loop time is in the JSON as resume_loop_s). A person noticing and
  relaunching would add more.
- raylet (last, once): node 127.0.0.3's raylet is killed instead; Ray moves the bundle to
  the head node and the job goes on there.

    python benchmarks/recovery.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cluster_local, moedist, save_figure, target, write_results

ROOT = Path(__file__).resolve().parents[1]
PORT, DASHBOARD = 6441, 8441
ADDRESS = f"127.0.0.2:{PORT}"
CKPT = 10
JOB = ["--preset", "tiny", "--workers", "2", "--placement", "SPREAD", "--no-progress",
       "--set", f"train.checkpoint_every={CKPT}", "--set", "train.eval_every=0",
       "--set", "train.eval_tokens=4096"]  # fmt: skip
TARGET_S = 30.0  # the target for a 2-node local cluster


def wait_for(path: Path, job: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if job.poll() is not None:
            raise SystemExit(f"job ended before {path} appeared: {job.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.02)


def raylet_pid(node_ip: str) -> int:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                args = [a.decode() for a in Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")]
            except (OSError, UnicodeDecodeError):
                continue
            if args and args[0].endswith("raylet/raylet") and f"--node_ip_address={node_ip}" in args and \
                    any(a.endswith(ADDRESS) for a in args):  # fmt: skip
                return int(d)
    raise SystemExit(f"no raylet of this cluster on {node_ip}")


def live(run: Path, steps: int, kill: str) -> dict:
    """A job that loses a worker (kill='worker') or a node (kill='raylet') and recovers."""
    job = subprocess.Popen(moedist("train", "--address", ADDRESS, "--steps", str(steps), "--out", str(run), *JOB),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(run / "checkpoints" / f"step_{CKPT:06d}", job)
    pid = json.loads((run / "workers.json").read_text())[1]["pid"] if kill == "worker" else raylet_pid("127.0.0.3")
    os.kill(pid, signal.SIGKILL)
    _, err = job.communicate(timeout=900)
    if job.returncode != 0:
        raise SystemExit(f"live recovery run failed: {err[-2000:]}")
    summary = json.loads((run / "summary.json").read_text())
    f = summary["failures"][0]
    return {"mode": f"live ({kill} lost)", "recovery_s": f["recovery_s"], "probe_s": f["probe_s"],
            "actor_start_s": f["actor_start_s"], "group_s": f["group_s"], "load_s": f["load_s"],
            "first_step_s": f["first_step_s"], "restored_step": f["restored_step"], "replayed_steps":
            f["step"] - f["restored_step"], "workers_after": summary["workers"], "nodes_after": summary["nodes"],
            "step_s_per_step": summary["step_s_per_step"]}  # fmt: skip


def restart(run: Path, steps: int) -> dict:
    """The same loss without recovery, then a full restart from the checkpoint."""
    job = subprocess.Popen(moedist("train", "--address", ADDRESS, "--steps", str(steps), "--out", str(run),
                                   "--max-failures", "0", *JOB), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    wait_for(run / "checkpoints" / f"step_{CKPT:06d}", job)
    pid = json.loads((run / "workers.json").read_text())[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    _, err = job.communicate(timeout=900)
    t_dead = time.monotonic()
    if job.returncode != 1:
        raise SystemExit(f"the run without recovery should stop with exit 1: {err[-2000:]}")
    ckpt = max(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    # Resume to one step past the checkpoint: start-up, restore and that step; the resumed
    # run's own final save and evaluation are timed by its loop and reported apart.
    res = subprocess.run(moedist("train", "--resume", str(run), "--address", ADDRESS, "--steps", str(ckpt + 1)),
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    t_done = time.monotonic()
    if res.returncode != 0:
        raise SystemExit(f"resume failed: {res.stderr[-2000:]}")
    summary = json.loads((run / "summary.json").read_text())
    return {"mode": "restart (--resume)", "stop_s": t_dead - t_kill, "resume_process_s": t_done - t_dead,
            "resume_loop_s": summary["wall_s"], "restored_step": ckpt,
            "recovery_s": t_done - t_kill}  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live_rows = [r for r in results if r["mode"].startswith("live")]
    rest = [r for r in results if r["mode"].startswith("restart")]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, bottoms = [], []
    parts = [("probe_s", "probe survivors"), ("actor_start_s", "start replacement"), ("group_s", "new process group"),
             ("load_s", "load checkpoint"), ("first_step_s", "first step")]  # fmt: skip
    colors = plt.cm.tab10.colors
    x = 0
    for r in live_rows:
        b = 0.0
        for i, (k, name) in enumerate(parts):
            ax.bar(x, r[k], bottom=b, color=colors[i], label=name if x == 0 else None)
            b += r[k]
        labels.append(r["mode"])
        bottoms.append(b)
        x += 1
    for r in rest:
        ax.bar(x, r["stop_s"], color=colors[5], label="job stops" if r is rest[0] else None)
        ax.bar(x, r["resume_process_s"], bottom=r["stop_s"], color=colors[6],
               label="moedist train --resume (to step ckpt+1)" if r is rest[0] else None)  # fmt: skip
        labels.append(r["mode"])
        x += 1
    ax.axhline(TARGET_S, color="k", ls="--", lw=0.8, label=f"target {TARGET_S:g} s (live)")
    ax.set_xticks(range(x), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("seconds from the loss to the first step done")
    ax.set_title("Recovery from a lost worker: live vs restart from the checkpoint (2 nodes, 2 workers)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    steps = 14 if args.quick else 20
    tmp = Path(tempfile.mkdtemp(prefix="moedist-recovery-"))
    state = tmp / "cluster"
    cluster_local(state, "up", "--nodes", "2", "--cpus-per-node", "2", "--port", str(PORT), "--dashboard-port",
                  str(DASHBOARD))  # fmt: skip
    results = []
    try:
        for i in range(reps):  # interleaved, so slow phases of the machine hit both alike
            results.append(live(tmp / f"live{i}", steps, "worker"))
            print(json.dumps(results[-1]), flush=True)
            results.append(restart(tmp / f"restart{i}", steps))
            print(json.dumps(results[-1]), flush=True)
        results.append(live(tmp / "raylet", steps, "raylet"))  # last: the cluster keeps one node
        print(json.dumps(results[-1]), flush=True)
    finally:
        cluster_local(state, "down")
    live_s = statistics.median(r["recovery_s"] for r in results if r["mode"] == "live (worker lost)")
    restart_s = statistics.median(r["recovery_s"] for r in results if r["mode"].startswith("restart"))
    raylet_s = next(r["recovery_s"] for r in results if r["mode"] == "live (raylet lost)")
    targets = [
        target("live recovery after SIGKILL of a worker (s, median)", live_s, "<=", TARGET_S),
        target("live recovery after a lost raylet (s)", raylet_s, "<=", TARGET_S),
        target("live / restart time (median)", live_s / restart_s, "<=", 1.0),
    ]
    config = {"preset": "tiny", "workers": 2, "placement": "SPREAD", "steps": steps, "checkpoint_every": CKPT,
              "reps": reps, "cluster": "cluster/local: 2 raylets x 2 CPUs (127.0.0.2, 127.0.0.3)",
              "restart_note": "restart = job stops at the loss, then `moedist train --resume` launched at once "
                              "(no human delay); it runs to one step past the checkpoint, and its process time "
                              "includes Ray connection, actor start, restore, that step, a final save and a "
                              "small final evaluation (eval_tokens 4096)"}  # fmt: skip
    path = write_results("recovery", config, results, targets, args.quick)
    plot(results, path.with_suffix(".png"))
    print(json.dumps({"live_s": live_s, "restart_s": restart_s, "raylet_s": raylet_s}))
    print(f"-> {path}")


if __name__ == "__main__":
    main()

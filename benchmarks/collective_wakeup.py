"""What does a tiny collective cost the last worker to arrive, when the other worker has been
blocked in it for a while?

Inside a 2-worker training step every collective cost about 1 ms of its own (the time the
last worker to arrive spends in it), whatever it carried, while a bare all-reduce between
idle workers took 0.16 ms (weak_scaling.py, docs/benchmarks.md). This isolates that: two
processes in one gloo group on loopback (moedist's own group set-up, as threshold_sync.py
and shm_exchange.py use it), one torch thread each, an all-reduce of 17 int64
(the size of ET's guard counts for 16 experts). Before each call the group meets at a
barrier, then worker 1 stays away for S ms, sleeping or spinning on its core, while
worker 0 enters the all-reduce at once and blocks. The time worker 1 (the last to arrive)
spends inside the call is recorded; median of `reps` after 10 warm-up calls, every S and
mode interleaved rep by rep.

    python benchmarks/collective_wakeup.py [--quick] [--reps R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, write_results
from threshold_sync import LOOPBACK, free_port, init_loopback_group

AWAY_MS = (0, 1, 5, 20, 50)
MODES = ("sleep", "spin")
WARMUP = 10


def _spin(seconds: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def _worker(rank: int, port: int, reps: int, out: str) -> None:
    torch.set_num_threads(1)
    init_loopback_group(rank, 2, port)
    try:
        x = torch.zeros(17, dtype=torch.int64)
        cases = [(m, s) for s in AWAY_MS for m in MODES if s or m == "sleep"]
        samples: dict[str, list[float]] = {f"{m} {s}": [] for m, s in cases}
        for i in range(WARMUP + reps):
            for mode, away in cases:
                dist.barrier()
                if rank == 1 and away:
                    (time.sleep if mode == "sleep" else _spin)(away / 1e3)
                t0 = time.perf_counter()
                dist.all_reduce(x)
                if i >= WARMUP:
                    samples[f"{mode} {away}"].append(time.perf_counter() - t0)
        if rank == 1:
            Path(out).write_text(json.dumps(samples))
    finally:
        dist.destroy_process_group()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        pts = [(r["away_ms"], r["last_arriver_ms"]) for r in rows if r["mode"] == mode or r["away_ms"] == 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"worker 1 {mode}s")
    ax.set_xlabel("ms the other worker was blocked in the all-reduce")
    ax.set_ylabel("ms the last worker spends in it (median)")
    ax.set_title("all-reduce of 17 int64, 2 gloo workers, 2-core VM", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="15 reps")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    reps = args.reps or (15 if args.quick else 60)
    if reps < 1:
        print(f"--reps: must be >= 1, got {reps}", file=sys.stderr)
        raise SystemExit(2)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "samples.json"
        mp.start_processes(_worker, args=(free_port(), reps, str(out)), nprocs=2, start_method="spawn")
        samples = json.loads(out.read_text())
    rows = []
    for key, ts in samples.items():
        mode, away = key.split()
        rows.append({"mode": mode if int(away) else "none", "away_ms": int(away),
                     "last_arriver_ms": statistics.median(ts) * 1e3, "samples_s": ts})  # fmt: skip
        print(f"peer blocked {away:>2} ms ({mode}): last arriver {rows[-1]['last_arriver_ms']:.3f} ms", flush=True)
    base = next(r["last_arriver_ms"] for r in rows if r["away_ms"] == 0)
    for r in rows:
        r["vs_not_blocked"] = r["last_arriver_ms"] / base
    config = {"workers": 2, "backend": "gloo", "address": LOOPBACK, "payload": "17 x int64 all_reduce",
              "reps": reps, "warmup": WARMUP, "threads_per_worker": 1, "away_ms": list(AWAY_MS)}  # fmt: skip
    path = write_results("collective_wakeup", config, rows, [], args.quick)
    plot(rows, path.with_suffix(".png"))
    print(f"-> {path}")


if __name__ == "__main__":
    main()

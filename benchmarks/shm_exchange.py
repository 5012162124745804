"""How fast do token rows move between workers: gloo's all_to_all_single, moedist's
shared-memory exchange, the hierarchical exchange, and plain memcpy, side by side.

Each worker holds ROWS rows of D float32 (4096 x 1024 = 16.8 MB, the issue's figure) split
evenly over the W destinations (itself included) and receives as much. Timed, interleaved
in the same processes on the same data:
  gloo          dist.all_to_all_single (the plain path)
  shm           moedist.parallel.exchange.ShmExchange, all workers on one node
  memcpy        every worker copies its 16.8 MB at the same time (the machine's copy
                bandwidth per worker under the same load; the shm path copies each byte twice)
  sync_*        the cost of one synchronisation alone: a zero-row shm round (round numbers
                in the segment, a datagram wake-up), dist.barrier, an all-reduce of W int64
With W=4 also two simulated nodes (ranks 0,1 and 2,3; one machine, so "between nodes" is
gloo over loopback): shm_2nodes (shm within, gloo between), hier_shm and hier_gloo (gather
at a node leader, leaders exchange, scatter). And memcpy_1proc: one process copying alone
(measured in the driver before the workers start).

Bandwidth = a worker's bytes / time, time = the median over reps of the slowest worker
(each candidate starts at a barrier); every result is checked bitwise against gloo's first.
Workers: spawned processes, 1 torch thread each, gloo on 127.0.0.1.

    python benchmarks/shm_exchange.py [--quick] [--reps R]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, save_figure, target, write_results
from threshold_sync import free_port, init_loopback_group

D = 1024


def _worker(rank: int, world: int, port: int, sizes: list[int], reps: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from moedist.parallel.exchange import make_exchange

    init_loopback_group(rank, world, port)
    rows_out = []
    try:
        exchanges = {"shm": make_exchange(None, ["n0"] * world, shm=True)}
        if world == 4:
            two = ["n0", "n0", "n1", "n1"]
            exchanges["shm_2nodes"] = make_exchange(None, two, shm=True)
            exchanges["hier_shm"] = make_exchange(None, two, shm=True, hierarchical=True)
            exchanges["hier_gloo"] = make_exchange(None, two, shm=False, hierarchical=True)
        for rows in sizes:
            splits = [rows // world] * world
            splits[-1] += rows - sum(splits)
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(rows, D, generator=g)
            outs = {name: torch.empty(rows, D) for name in ["gloo", "memcpy", *exchanges]}
            dist.all_to_all_single(outs["gloo"], x, splits, splits)
            fns = _candidates(x, outs, splits, exchanges, world)
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for rep in range(reps + 1):  # rep 0 warms up (maps and faults the segments)
                for name, fn in fns.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    if rep > 0:
                        samples[name].append(dt)
            equal = all(torch.equal(outs[name], outs["gloo"]) for name in exchanges)
            ok = torch.tensor([int(not equal)])
            dist.all_reduce(ok)
            for name in fns:
                s = torch.tensor(samples[name], dtype=torch.float64)
                dist.all_reduce(s, op=dist.ReduceOp.MAX)
                samples[name] = s.tolist()
            nbytes = rows * D * 4
            row = {"workers": world, "rows_per_worker": rows, "bytes_per_worker": nbytes,
                   "bitwise_equal": int(ok) == 0, "seconds": {n: median(s) for n, s in samples.items()},
                   "samples": samples}  # fmt: skip
            row["GBps"] = {n: nbytes / t / 1e9 for n, t in row["seconds"].items() if not n.startswith("sync")}
            rows_out.append(row)
        for ex in exchanges.values():
            ex.close()
        if rank == 0:
            Path(out).write_text(json.dumps(rows_out))
    finally:
        dist.destroy_process_group()


def _candidates(x, outs: dict, splits: list[int], exchanges: dict, world: int) -> dict:
    """name -> a call timed as one rep."""
    import torch.distributed as dist

    fns = {"gloo": lambda: dist.all_to_all_single(outs["gloo"], x, splits, splits),
           "memcpy": lambda: outs["memcpy"].copy_(x)}  # fmt: skip
    for name, ex in exchanges.items():
        fns[name] = lambda ex=ex, o=outs[name]: ex(o, x, splits, splits)
    empty = torch.empty(0, D)
    flag = torch.zeros(world, dtype=torch.int64)
    fns["sync_shm"] = lambda: exchanges["shm"](empty, empty, [0] * world, [0] * world)
    fns["sync_barrier"] = lambda: dist.barrier()
    fns["sync_allreduce"] = lambda: dist.all_reduce(flag)
    return fns


def run_world(world: int, sizes: list[int], reps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        mp.start_processes(_worker, args=(world, free_port(), sizes, reps, str(out)), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return json.loads(out.read_text())


def memcpy_alone(rows: int, reps: int) -> float:
    """GB/s of one process copying `rows` x D float32 with one thread (nothing else of ours running)."""
    torch.set_num_threads(1)
    x, y = torch.randn(rows, D), torch.empty(rows, D)
    y.copy_(x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y.copy_(x)
        ts.append(time.perf_counter() - t0)
    return rows * D * 4 / median(ts) / 1e9


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        names = ["memcpy_1proc", *r["GBps"]]
        vals = [r["memcpy_1proc_GBps"], *r["GBps"].values()]
        ax.bar(range(len(names)), vals, color=["0.6" if "memcpy" in n else "C0" for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"W={r['workers']}, {r['bytes_per_worker'] / 1e6:.1f} MB/worker", fontsize=9)
        ax.set_ylabel("GB/s per worker")
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small messages, few reps (< 1 min)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    sizes = [16, 1024] if args.quick else [16, 256, 4096]  # 64 KB (latency-bound) .. 16.8 MB per worker
    reps = args.reps or (3 if args.quick else 9)
    worlds = [2, 4]
    alone = {rows: memcpy_alone(rows, reps) for rows in sizes}
    results: list[dict] = []
    for world in worlds:
        for r in run_world(world, sizes, reps):
            r["memcpy_1proc_GBps"] = alone[r["rows_per_worker"]]
            results.append(r)
            bw = "  ".join(f"{n} {v:.2f}" for n, v in r["GBps"].items())
            sync = "  ".join(f"{n[5:]} {t * 1e6:.0f} us" for n, t in r["seconds"].items() if n.startswith("sync"))
            print(f"W={world} {r['bytes_per_worker'] / 1e6:5.1f} MB/worker  GB/s: memcpy_1proc "
                  f"{r['memcpy_1proc_GBps']:.2f}  {bw}  | sync: {sync}  | bitwise {r['bitwise_equal']}",
                  flush=True)  # fmt: skip
    targets = [target("exchanges not bitwise equal to gloo", sum(not r["bitwise_equal"] for r in results), "<=", 0)]
    for r in results:
        if r["rows_per_worker"] != max(sizes):
            continue
        tag = f"W={r['workers']}"
        gb = r["GBps"]
        targets.append(target(f"shm / memcpy (same load) {tag}", gb["shm"] / gb["memcpy"], ">=", 0.5))
        targets.append(target(f"shm / memcpy_1proc {tag}", gb["shm"] / r["memcpy_1proc_GBps"], ">=", 0.5))
        targets.append(target(f"shm / gloo {tag}", gb["shm"] / gb["gloo"], ">=", 2.0))
    config = {"workers": worlds, "rows_per_worker": sizes, "d": D, "dtype": "float32", "reps": reps,
              "threads_per_worker": 1, "backend": "gloo on 127.0.0.1", "splits": "even over W (self included)",
              "time": "median over reps of the max over workers; each candidate starts at a barrier"}  # fmt: skip
    path = write_results("shm_exchange", config, results, targets, args.quick)
    plot([r for r in results if r["rows_per_worker"] == max(sizes)], path.with_suffix(".png"))
    met = sum(t["met"] for t in targets)
    print(f"targets met: {met}/{len(targets)} -> {path}")


if __name__ == "__main__":
    main()

"""What does the exact global ET cutoff cost: distributed radix select vs all-gathering logits?

Per layer and optimiser step, ET needs each expert's k-th largest logit over the global pool
(k = N / E). Two ways, both exact, timed interleaved on the same data in the same processes:
  radix      moedist: 4 rounds of (local E x 256 digit histogram, one all-reduce of int32
             counts); moves 4 x E x 256 x 4 bytes whatever N is;
  allgather  the ET paper's code: all-gather every rank's [T, E] logits (N x E x 4 bytes),
             then a local torch.topk over the pool. This is the reference of the ratios.
Also timed, to show what the radix time is made of: radix_local, its NaN check and 4
histogram passes without any collective (compute alone), and allreduce_x4, 4 bare
all-reduces of the same int32 messages (the group's latency floor for 4 rounds).

Workers are separate processes (torch.multiprocessing, spawn) in one gloo group; every
socket is on 127.0.0.1 (store and gloo device bound to loopback). Each worker runs with 1
torch thread and 1 numba thread; with more workers than cores (8 on a 2-core machine) the
processes time-share the cores, and a layer-step is as slow as its slowest worker, so the
time of one rep is the maximum over workers (each rep starts at a barrier), and the median
over reps is reported.

    python benchmarks/threshold_sync.py [--quick] [--reps R]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, save_figure, target, write_results

LOOPBACK = "127.0.0.1"
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def init_loopback_group(rank: int, world: int, port: int, timeout_s: float = 600.0) -> None:
    """Default gloo group with the store and every gloo socket on 127.0.0.1 (moedist's own
    group set-up, as the workers use it)."""
    from moedist.parallel.group import init_group, listen_socket

    listen = listen_socket(LOOPBACK, port) if rank == 0 else None
    init_group(rank, world, LOOPBACK, port, LOOPBACK, backend="gloo", timeout_s=timeout_s, listen=listen)


def make_logits(rank: int, tokens: int, n_experts: int) -> torch.Tensor:
    """Router-like logits [T, E]: per-expert offset and scale, so columns differ."""
    g = torch.Generator().manual_seed(1000 * n_experts + rank)
    offset_E = torch.linspace(-1.0, 1.0, n_experts)
    scale_E = torch.linspace(0.5, 2.0, n_experts)
    return torch.randn(tokens, n_experts, generator=g) * scale_E + offset_E


def _worker(rank: int, world: int, port: int, tokens: int, experts: list[int], reps: int, out: str) -> None:
    torch.set_num_threads(1)
    import numba

    numba.set_num_threads(1)
    import torch.distributed as dist

    from moedist.kernels.radix import N_ROUNDS, RadixCounter
    from moedist.parallel.pool import AllGatherPoolOps, DistributedPoolOps, threshold_sync_bytes

    init_loopback_group(rank, world, port)
    rows = []
    try:
        radix_ops, gather_ops = DistributedPoolOps(), AllGatherPoolOps()
        for E in experts:
            x_TE = make_logits(rank, tokens, E)
            N = radix_ops.total(tokens)
            k_E = torch.full((E,), max(1, N // E), dtype=torch.int64)

            def radix_local(x_TE=x_TE, E=E) -> None:
                c = RadixCounter(x_TE)
                c.has_nan()
                for r in range(N_ROUNDS):
                    c.histogram(torch.zeros(E, dtype=torch.int64), r)

            msg = torch.zeros(E * 256 + world + 1, dtype=torch.int32)

            def allreduce_x4(msg=msg) -> None:
                for _ in range(N_ROUNDS):
                    dist.all_reduce(msg)

            fns = {
                "radix": lambda x_TE=x_TE, k_E=k_E: radix_ops.kth_largest(x_TE, k_E),
                "allgather": lambda x_TE=x_TE, k_E=k_E: gather_ops.kth_largest(x_TE, k_E),
                "radix_local": radix_local,
                "allreduce_x4": allreduce_x4,
            }
            # Correctness first: same cutoffs from both methods, on every rank.
            cut_r, cut_g = fns["radix"](), fns["allgather"]()
            # Bitwise, with -0.0 read as +0.0 (topk may return either zero; radix gives +0.0).
            same_local = torch.equal(cut_r.view(torch.int32), (cut_g + 0.0).view(torch.int32))
            bits_WE = [torch.empty(E, dtype=torch.int32) for _ in range(world)]
            dist.all_gather(bits_WE, cut_r.view(torch.int32))
            same_ranks = all(torch.equal(b, bits_WE[0]) for b in bits_WE)
            flags = torch.tensor([int(not same_local), int(not same_ranks)])
            dist.all_reduce(flags)
            # Interleaved reps, each candidate starting at a barrier; one warm-up round.
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for rep in range(reps + 1):
                for name, fn in fns.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    if rep > 0:
                        samples[name].append(dt)
            # The step is as slow as the slowest rank: per rep, the max over ranks.
            for name in fns:
                s = torch.tensor(samples[name], dtype=torch.float64)
                dist.all_reduce(s, op=dist.ReduceOp.MAX)
                samples[name] = s.tolist()
            b = threshold_sync_bytes(E, [tokens] * world)
            t_r, t_g, t_l, t_a = (median(samples[n]) for n in ("radix", "allgather", "radix_local", "allreduce_x4"))
            rows.append({
                "workers": world, "experts": E, "tokens_per_worker": tokens, "pool_tokens": N, "k": int(k_E[0]),
                "cutoffs_identical": int(flags.sum()) == 0, "bytes_radix": b["radix"],
                "bytes_allgather": b["allgather"], "bytes_ratio": b["radix"] / b["allgather"],
                "radix_s": t_r, "allgather_s": t_g, "time_ratio": t_r / t_g,
                "radix_local_s": t_l, "allreduce_x4_s": t_a,
                "samples": samples,
            })  # fmt: skip
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def run_world(world: int, tokens: int, experts: list[int], reps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        mp.start_processes(_worker, args=(world, free_port(), tokens, experts, reps, str(out)), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return json.loads(out.read_text())


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    for E, marker in zip(sorted({r["experts"] for r in results}), "os^", strict=False):
        rows = sorted((r for r in results if r["experts"] == E), key=lambda r: r["workers"])
        w = [r["workers"] for r in rows]
        ax_t.plot(w, [r["radix_s"] * 1e3 for r in rows], marker=marker, label=f"radix E={E}")
        ax_t.plot(w, [r["allgather_s"] * 1e3 for r in rows], marker=marker, ls="--", label=f"all-gather E={E}")
        ax_b.plot(w, [r["bytes_radix"] for r in rows], marker=marker, label=f"radix E={E}")
        ax_b.plot(w, [r["bytes_allgather"] for r in rows], marker=marker, ls="--", label=f"all-gather E={E}")
    tokens = results[0]["tokens_per_worker"]
    ax_t.set_title(f"seconds per layer-step ({tokens} tokens/worker)")
    ax_t.set_ylabel("ms (median over reps of the slowest worker)")
    ax_b.set_title("bytes received per rank per layer-step")
    ax_b.set_ylabel("bytes")
    for ax in (ax_t, ax_b):
        ax.set_yscale("log")
        ax.set_xlabel("workers (2 cores: 4 and 8 time-share)")
        ax.set_xticks(sorted({r["workers"] for r in results}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 and 4 workers, 16k tokens each (< 3 min)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    worlds = [2, 4] if args.quick else [2, 4, 8]
    tokens = 16_384 if args.quick else 65_536
    experts = [16, 64]
    reps = args.reps or (5 if args.quick else 7)
    results: list[dict] = []
    for world in worlds:
        t0 = time.perf_counter()
        for r in run_world(world, tokens, experts, reps):
            results.append(r)
            print(
                f"W={world} E={r['experts']:>2}: radix {r['radix_s'] * 1e3:8.1f} ms ({r['bytes_radix']:>9} B)  "
                f"all-gather {r['allgather_s'] * 1e3:8.1f} ms ({r['bytes_allgather']:>10} B)  "
                f"time {r['time_ratio']:.3f}  bytes {r['bytes_ratio']:.4f}  "
                f"[radix: local {r['radix_local_s'] * 1e3:.1f} ms, 4 all-reduces {r['allreduce_x4_s'] * 1e3:.1f} ms]  "
                f"identical {r['cutoffs_identical']}",
                flush=True,
            )
        print(f"  ({time.perf_counter() - t0:.0f} s for {world} workers)", flush=True)
    targets = [target("cutoffs identical (configs that differ)", sum(not r["cutoffs_identical"] for r in results),
                      "<=", 0)]  # fmt: skip
    for r in results:
        tag = f"W={r['workers']} E={r['experts']}"
        targets.append(target(f"bytes radix/all-gather {tag}", r["bytes_ratio"], "<=", 0.01))
        targets.append(target(f"time radix/all-gather {tag}", r["time_ratio"], "<=", 1.0))
    config = {
        "workers": worlds, "tokens_per_worker": tokens, "experts": experts, "reps": reps, "k": "N / E",
        "threads_per_worker": {"torch": 1, "numba": 1}, "backend": "gloo on 127.0.0.1",
        "time": "median over reps of the max over workers; each candidate starts at a barrier",
    }  # fmt: skip
    path = write_results("threshold_sync", config, results, targets, args.quick)
    plot(results, path.with_suffix(".png"))
    met = sum(t["met"] for t in targets)
    print(f"targets met: {met}/{len(targets)} -> {path}")


if __name__ == "__main__":
    main()

"""Weak scaling: step time at a fixed number of tokens per worker for 1, 2 and 4 workers on
a 2-node local Ray cluster (raylets on 127.0.0.2 and 127.0.0.3), with the split into
computation and communication (all-to-all token exchange, gradient all-reduce, threshold
statistics) as measured inside the workers.

Efficiency = (1-worker step time) / (N-worker step time): 1.0 is perfect weak scaling.
On a 2-core machine, 4 single-threaded workers share 2 physical cores, so efficiency at 4
workers is bounded by about 0.5 by the hardware, not by moedist; the JSON says so.

    python benchmarks/weak_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, target, write_results

from moedist.config import build_config
from moedist.runtime.coordinator import Coordinator


def job_cfg(workers: int, seqs_per_worker: int, steps: int, router: str):
    over = {
        "workers": workers,
        "router": {"kind": router, "et_warmup_steps": 2},
        "train": {"steps": steps, "batch_size": seqs_per_worker * workers, "eval_every": 0, "progress": False,
                  "threads": 1},
    }  # fmt: skip
    return build_config("tiny", None, over)


def measure(workers: int, seqs_per_worker: int, args, tmp: Path) -> dict:
    cfg = job_cfg(workers, seqs_per_worker, args.steps, args.router)
    coord = Coordinator(cfg, strategy="SPREAD", start_timeout_s=180)
    try:
        infos = coord.start()
        rows = [coord.train_step() for _ in range(args.steps)]
    finally:
        coord.shutdown()
    body = rows[args.warmup :]  # first steps include numba compilation and allocator warm-up
    step_s = statistics.median(r["step_s"] for r in body)
    # Medians of what the workers measured (slowest rank per step; 0 with one worker).
    parts = {k: statistics.median(r.get(k, 0.0) for r in body) for k in ("compute_s", "comm_s", "a2a_s", "pool_s",
                                                                          "grad_sync_s")}  # fmt: skip
    return {
        "workers": workers,
        "nodes": len({i["node"] for i in infos}),
        "seqs_per_worker": seqs_per_worker,
        "tokens_per_worker": seqs_per_worker * cfg.model.seq_len,
        "step_s": step_s,
        **parts,
        "tokens_per_s": cfg.train.batch_size * cfg.model.seq_len / step_s,
        "step_samples": [r["step_s"] for r in body],
    }


def plot(results: list[dict], path: Path) -> None:
    """Stacked step time (compute, a2a, pool, grad sync) per worker count, one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["tokens_per_worker"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        rows = [r for r in results if r["tokens_per_worker"] == size]
        xs = [str(r["workers"]) for r in rows]
        bottom = [0.0] * len(rows)
        for key in ("compute_s", "a2a_s", "pool_s", "grad_sync_s"):
            ys = [1e3 * r[key] for r in rows]
            ax.bar(xs, ys, bottom=bottom, label=key[:-2])
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
        for x, r, b in zip(xs, rows, bottom, strict=True):
            ax.text(x, b, f"eff {r['efficiency']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{size} tokens / worker")
        ax.set_xlabel("workers (2 nodes, 2 cores in all)")
        ax.set_ylabel("ms per step (slowest worker)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seqs-per-worker", default="8,32", help="comma-separated sizes, each a weak-scaling series")
    ap.add_argument("--router", default="et")
    args = ap.parse_args()
    args.steps = args.steps or (6 if args.quick else 20)
    args.warmup = 2
    sizes = [int(x) for x in args.seqs_per_worker.split(",")]
    tmp = Path("/tmp") / "moedist-weak-scaling"
    cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.2", "num_cpus": 2})
    results = []
    try:
        cluster.add_node(node_ip_address="127.0.0.3", num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.2", log_to_driver=False, configure_logging=False)
        for spw in sizes:
            series = [measure(w, spw, args, tmp) for w in (1, 2, 4)]
            for r in series:
                r["efficiency"] = series[0]["step_s"] / r["step_s"]
                print(json.dumps({k: v for k, v in r.items() if k != "step_samples"}), flush=True)
            results += series
    finally:
        ray.shutdown()
        cluster.shutdown()
    # 2 workers have a core each, so 0.5 is a modest bar; 4 workers share 2 cores (see note).
    targets = [target(f"efficiency 2 workers, {r['tokens_per_worker']} tokens/worker", r["efficiency"], ">=", 0.5)
               for r in results if r["workers"] == 2]  # fmt: skip
    config = {"steps": args.steps, "warmup_steps_dropped": args.warmup, "seqs_per_worker": sizes,
              "router": args.router, "preset": "tiny", "cluster": "2 raylets x 2 CPUs (127.0.0.2, 127.0.0.3)",
              "threads_per_worker": 1,
              "note": "2 physical cores: 4 workers share them, so ~0.5 is the hardware bound at 4 workers"}  # fmt: skip
    path = write_results("weak_scaling", config, results, targets, args.quick)
    plot(results, path.with_suffix(".png"))
    print(f"-> {path}")


if __name__ == "__main__":
    main()

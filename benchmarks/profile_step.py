"""Where a full training step's time goes, for the TC, EC and ET routers on 1, 2 and 4
workers (a 2-node local Ray cluster: raylets on 127.0.0.2 and 127.0.0.3), and the model
FLOP utilisation: achieved FLOP/s over the machine's GEMM FLOP/s measured in the same run.

Spans are the workers' own (profile.spans, docs/profiling.md): the median over the steps
after the warm-up of the slowest worker's seconds per span.

Model FLOPs per step (matmuls only; training = 3 x forward: the backward pass costs two
forward matmuls, one for the input gradient and one for the weight gradient):

    forward per token = 2 x (weights of every non-expert matmul: attention qkv and out,
                             router gates, shared experts, dense FFNs, LM head)
                      + 2 x (weights of one routed expert) x (routed experts per token, measured)
                      + 2 x 2 x seq_len x d_model per layer  (attention scores and values,
                             full square as in PaLM's MFU; the causal half is not subtracted)
    step FLOPs = 3 x forward per token x tokens of the global batch

MFU = (step FLOPs / step seconds) / (GEMM FLOP/s of one thread x min(workers, cores)):
every worker runs one torch thread, so W workers can use at most min(W, cores) cores. The
GEMM FLOP/s is a 1-thread torch.mm of square float32 matrices, timed before and after the
jobs (the larger of the two: a shared machine only ever slows it down).

Also the profile's own cost: one process, steps with spans on and off alternated on the
same trainer (paired, so a slow phase of the machine hits both alike).

    python benchmarks/profile_step.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, target, write_results

from moedist.config import build_config
from moedist.training.profile import COUNT_KINDS, SPAN_NAMES

ROUTERS = ("tc", "ec", "et")


def job_cfg(router: str, workers: int, args):
    over = {
        "workers": workers,
        "router": {"kind": router, "et_warmup_steps": 2, "top_k": 1},
        "train": {"steps": args.steps, "batch_size": args.seqs_per_worker * workers, "eval_every": 0,
                  "progress": False, "threads": 1, "warmup_steps": 2},
        "profile": {"spans": True, "trace_steps": ""},
    }  # fmt: skip
    if args.quick:
        over["model"] = {"d_model": 64, "seq_len": 64, "n_layers": 2}
    return build_config("tiny", None, over)


def gemm_flops(n: int, reps: int, threads: int = 1) -> float:
    """FLOP/s of an n x n @ n x n float32 torch.mm on `threads` threads (median of reps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return 2 * n**3 / statistics.median(times)


def model_flops_per_token(cfg, fanout: float) -> dict[str, float]:
    """Forward matmul FLOPs per token (see the module docstring), by part."""
    import torch

    from moedist.model.transformer import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg.model, cfg.router)
    expert_ids = {id(p) for b in model.moe_blocks() for p in b.experts.parameters()}
    dense = sum(p.numel() for n, p in model.named_parameters()
                if p.ndim >= 2 and id(p) not in expert_ids and not n.startswith("embed"))  # fmt: skip
    n_moe = len(model.moe_blocks())
    per_expert = 0.0
    if n_moe:
        per_expert = sum(p.numel() for p in model.moe_blocks()[0].experts.parameters()) / cfg.model.n_experts
    attn = 2 * 2 * cfg.model.seq_len * cfg.model.d_model * cfg.model.n_layers
    return {"dense": 2.0 * dense, "experts": 2.0 * per_expert * fanout * n_moe, "attention": float(attn)}


def measure(router: str, workers: int, args) -> dict:
    from moedist.runtime.coordinator import Coordinator

    cfg = job_cfg(router, workers, args)
    coord = Coordinator(cfg, strategy="SPREAD", start_timeout_s=180)
    try:
        infos = coord.start()
        rows = [coord.train_step() for _ in range(args.steps)]
    finally:
        coord.shutdown()
    body = rows[args.warmup :]  # the first steps compile kernels and warm the allocator

    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in body)

    fanout = statistics.mean(v for r in body for k, v in r.items() if k.endswith("_fanout"))
    per_token = model_flops_per_token(cfg, fanout)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    step_flops = 3 * sum(per_token.values()) * tokens
    step_s = med("step_s")
    return {
        "router": router, "workers": workers, "nodes": len({i["node"] for i in infos}),
        "tokens_per_worker": args.seqs_per_worker * cfg.model.seq_len,
        "step_s": step_s, "worker_step_s": med("worker_step_s"),
        "spans_s": {s: med(f"span_{s}_s") for s in SPAN_NAMES},
        "a2a_bytes": med("a2a_bytes"), "collectives": med("collectives"),
        "kinds": {k: {"collectives": med(f"{k}_collectives"), "bytes": med(f"{k}_bytes")} for k in COUNT_KINDS},
        "exchange_Bps": (sum(r["a2a_bytes"] for r in body)
                         / max(sum(r["span_dispatch_s"] + r["span_combine_s"] for r in body), 1e-12)),
        "slowest_by_s": med("slowest_by_s"),
        "fanout": fanout, "flops_per_token_fwd": per_token, "step_flops": step_flops,
        "achieved_flops": step_flops / step_s,
        "step_samples": [r["step_s"] for r in body],
    }  # fmt: skip


def spans_overhead(args) -> dict:
    """Step time with spans on / off, alternating steps of one single-process trainer."""
    import torch

    from moedist.training.trainer import Trainer, load_dataset

    cfg = job_cfg("et", 1, args)
    cfg.workers = 1
    cfg.train.steps = 2 * args.overhead_pairs + args.warmup
    torch.set_num_threads(1)
    tr = Trainer(cfg, load_dataset(cfg))
    on, off = [], []
    for i in range(cfg.train.steps):
        spans = i % 2 == 0
        tr.clock.spans = spans
        for block in tr.model.moe_blocks():
            block.clock = tr.clock if spans else None
        row = tr.train_step()
        if i >= args.warmup:
            (on if spans else off).append(row["step_s"])
    pairs = [a / b for a, b in zip(on, off, strict=False)]
    # The same cost counted instead of timed (a busy machine's noise dwarfs it): blocks
    # measured per step (the events of a traced step) x the cost of one empty block, plus
    # one pair of backward markers per MoE layer x their cost.
    tr.clock.spans = True
    for block in tr.model.moe_blocks():
        block.clock = tr.clock
    tr.trace_window = (tr.step, tr.step)
    tr.cfg.train.steps += 1
    tr.train_step()
    blocks = len(next(iter(tr.take_trace().values()))) - 1
    per_block, per_markers = block_costs()
    n_moe = len(tr.model.moe_blocks())
    counted = blocks * per_block + n_moe * per_markers
    return {"on_s": statistics.median(on), "off_s": statistics.median(off), "ratio_median": statistics.median(pairs),
            "blocks_per_step": blocks, "block_cost_s": per_block, "marker_pair_cost_s": per_markers,
            "counted_s_per_step": counted, "counted_ratio": 1 + counted / statistics.median(off),
            "on_samples": on, "off_samples": off}  # fmt: skip


def block_costs(n: int = 20000) -> tuple[float, float]:
    """Seconds of one empty measured block, and of one pair of backward markers (forward and
    backward of clock.traced on a small tensor, less the same call untraced)."""
    import torch

    from moedist.parallel.clock import CommClock

    clock = CommClock(spans=True)
    clock.begin_step()
    t0 = time.perf_counter()
    for _ in range(n):
        with clock.measure("x"):
            pass
    per_block = (time.perf_counter() - t0) / n
    x = torch.ones(4, requires_grad=True)

    def run(traced: bool, reps: int = 2000) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            y = clock.traced("e", torch.neg, x) if traced else torch.neg(x)
            y.sum().backward()
        return (time.perf_counter() - t0) / reps

    run(True, 50)
    return per_block, max(0.0, min(run(True) for _ in range(3)) - min(run(False) for _ in range(3)) - 2 * per_block)


def plot(results: list[dict], gemm: float, path: Path) -> None:
    """Stacked median seconds per span (slowest worker), one bar per (router, workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moedist.training.plots import SPAN_COLOURS

    fig, ax = plt.subplots(figsize=(10, 4.8))
    labels = [f"{r['router']}\n{r['workers']}w" for r in results]
    bottom = [0.0] * len(results)
    for s in SPAN_NAMES:
        ys = [1e3 * r["spans_s"][s] for r in results]
        if not any(ys):
            continue
        ax.bar(labels, ys, bottom=bottom, color=SPAN_COLOURS[s], label=s)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    for x, r, b in zip(labels, results, bottom, strict=True):
        ax.text(x, b, f"MFU {r['mfu']:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("ms per step (slowest worker, median)")
    ax.set_title(f"A training step by span; MFU against {gemm / 1e9:.1f} GFLOP/s per core (1-thread torch.mm)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model, fewer steps, 1 and 2 workers")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seqs-per-worker", type=int, default=None)
    args = ap.parse_args()
    args.steps = args.steps or (5 if args.quick else 14)
    args.seqs_per_worker = args.seqs_per_worker or (2 if args.quick else 8)
    args.warmup = 2
    args.overhead_pairs = 8 if args.quick else 30
    worker_counts = (1, 2) if args.quick else (1, 2, 4)
    n = 256 if args.quick else 512
    cores = os.cpu_count() or 1
    gemm_before = gemm_flops(n, 5 if args.quick else 20)
    overhead = spans_overhead(args)
    print(json.dumps({"spans_overhead": {k: v for k, v in overhead.items() if not k.endswith("samples")}}), flush=True)

    with socket.socket() as probe:  # the dashboard's API server on a free port, not the fixed 8265
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.2", "num_cpus": 2,
                                                             "include_dashboard": False, "dashboard_port": api_port})
    results = []
    try:
        cluster.add_node(node_ip_address="127.0.0.3", num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.2", log_to_driver=False, configure_logging=False)
        for router in ROUTERS:
            for w in worker_counts:
                r = measure(router, w, args)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "step_samples"}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    gemm_after = gemm_flops(n, 5 if args.quick else 20)
    gemm = max(gemm_before, gemm_after)
    for r in results:
        r["gemm_flops_available"] = gemm * min(r["workers"], cores)
        r["mfu"] = r["achieved_flops"] / r["gemm_flops_available"]
    targets = [target("spans on / off step time, counted (1 process)", overhead["counted_ratio"], "<=", 1.02),
               target("spans on / off step time, timed (1 process, paired median)", overhead["ratio_median"], "<=",
                      1.02)]  # fmt: skip
    config = {"steps": args.steps, "warmup_steps_dropped": args.warmup, "seqs_per_worker": args.seqs_per_worker,
              "routers": ROUTERS, "workers": worker_counts, "preset": "tiny" + (" (d64, seq 64, 2 layers)" if args.quick
                                                                                   else ""),
              "cluster": "2 raylets x 2 CPUs (127.0.0.2, 127.0.0.3)", "threads_per_worker": 1, "cores": cores,
              "gemm_n": n, "gemm_flops_1thread_before": gemm_before, "gemm_flops_1thread_after": gemm_after,
              "spans_overhead": overhead,
              "flops_formula": "3 x (2 x non-expert matmul weights + 2 x one expert's weights x fanout x MoE layers "
                               "+ 4 x seq_len x d_model x layers) x tokens per step",
              "mfu": "achieved FLOP/s / (1-thread GEMM FLOP/s x min(workers, cores))"}  # fmt: skip
    path = write_results("profile_step", config, results, targets, args.quick)
    plot(results, gemm, path.with_suffix(".png"))
    print(f"-> {path}")


if __name__ == "__main__":
    main()

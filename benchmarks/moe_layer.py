"""How close is one MoE block (forward + backward) to the machine's GEMM limit?

For each router, shape and dtype, three things are timed side by side (interleaved):
  block  moedist's MoEBlock: router -> counting sort -> gather -> grouped GEMMs -> combine,
         plus the shared expert, forward + backward through autograd;
  limit  the same expert work on tokens ALREADY sorted and contiguous: the 6 GEMMs per
         expert segment (3 forward-and-backward pairs) and the ReLU^2 elementwise work,
         hand-scheduled into preallocated buffers, no router, no autograd;
  loop   the common reference implementation: the same router, then a per-expert masked
         loop (boolean mask, index, expert MLP, index_add), plus the shared expert.
Reported: block/limit and block/loop (each pair timed interleaved, median of `reps`), with
absolute seconds beside them.

Shapes (the issue's): (a) d=512, 16 routed experts of width 1024 + 1 shared, ~1 routed
expert per token; (b) d=512, 64 routed experts of width 256 + 1 shared, ~3 per token.

Under bf16 autocast the block casts its float32 expert weights once and reuses the copy
until they change (GroupedExperts.cast_weights); the limit uses bf16 weights as given.

train.keep_heap (glibc mallopt, moedist.training.heap) is process-wide, so it is measured
apart: the block of each shape in fresh subprocesses, keep_heap off and on alternating
(`--heap-rounds` each), with each process's peak RSS and minor page faults per
forward+backward. The main table runs with `--keep-heap` (default: the config default).

    python benchmarks/moe_layer.py [--quick] [--tokens N] [--reps R] [--keep-heap on|off]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, median, save_figure, target, write_results

from moedist.config import RouterConfig, TrainConfig
from moedist.model.moe import MoEBlock, masked_loop_reference
from moedist.training.heap import keep_heap, keep_heap_status

SHAPES = {
    "a": {"d": 512, "E": 16, "F": 1024, "top_k": 1, "goal": 1.10},
    "b": {"d": 512, "E": 64, "F": 256, "top_k": 3, "goal": 1.15},
}
ROUTERS = ["tc", "lf", "ec", "et"]
BF16_GOAL = 1.3  # block/limit under bf16 autocast (issue 10)


def make_block(shape: dict, router: str, x_TD: torch.Tensor) -> MoEBlock:
    torch.manual_seed(0)
    cfg = RouterConfig(kind=router, top_k=shape["top_k"], et_warmup_steps=0)
    block = MoEBlock(shape["d"], shape["E"], shape["F"], 1, "relu2", cfg, init_std=0.02, out_std=0.02)
    block.train()
    if router == "et":
        # Calibrate thresholds on this batch so threshold routing (not warm-up) is timed.
        with torch.no_grad():
            block.router(x_TD)
        block.router.step_end()
    return block


class Limit:
    """Raw GEMM + ReLU^2 work of the routed and shared experts on pre-sorted rows."""

    def __init__(self, block: MoEBlock, counts_E: torch.Tensor, x_TD: torch.Tensor, dtype: torch.dtype):
        ex = block.experts
        T, D = x_TD.shape
        A = int(counts_E.sum())
        self.sizes = [int(c) for c in counts_E]
        self.w1 = ex.w1_EDF.detach().to(dtype).contiguous()
        self.w2 = ex.w2_EFD.detach().to(dtype).contiguous()
        self.sw1 = block.shared.w1_EDF[0].detach().to(dtype).contiguous()
        self.sw2 = block.shared.w2_EFD[0].detach().to(dtype).contiguous()
        g = torch.Generator().manual_seed(1)
        self.x_AD = torch.randn(A, D, generator=g).to(dtype)
        self.gy_AD = torch.randn(A, D, generator=g).to(dtype)
        self.x_TD = x_TD.detach().to(dtype)
        self.gy_TD = torch.randn(T, D, generator=g).to(dtype)
        F, SF = self.w1.shape[2], self.sw1.shape[1]
        self.buf = {
            n: torch.empty(rows, cols, dtype=dtype)
            for n, rows, cols in [("h", A, F), ("a", A, F), ("y", A, D), ("ga", A, F), ("gx", A, D),
                                  ("sh", T, SF), ("sa", T, SF), ("sy", T, D), ("sga", T, SF), ("sgx", T, D)]
        }  # fmt: skip
        self.gw1, self.gw2 = torch.empty_like(self.w1), torch.empty_like(self.w2)
        self.sgw1, self.sgw2 = torch.empty_like(self.sw1), torch.empty_like(self.sw2)

    @staticmethod
    def _mlp_fwd_bwd(x, gy, w1, w2, h, a, y, ga, gx, gw1, gw2) -> None:
        torch.mm(x, w1, out=h)
        torch.clamp_min(h, 0.0, out=a)
        torch.mul(a, a, out=ga)  # ga holds relu(h)^2 for now
        torch.mm(ga, w2, out=y)
        torch.mm(ga.T, gy, out=gw2)
        torch.mm(gy, w2.T, out=ga)  # d(relu^2)
        ga.mul_(a).mul_(2.0)  # chain rule through relu(h)^2
        torch.mm(x.T, ga, out=gw1)
        torch.mm(ga, w1.T, out=gx)

    def __call__(self) -> None:
        b = self.buf
        start = 0
        for e, n in enumerate(self.sizes):
            if n == 0:
                continue
            s = slice(start, start + n)
            self._mlp_fwd_bwd(self.x_AD[s], self.gy_AD[s], self.w1[e], self.w2[e], b["h"][s], b["a"][s], b["y"][s],
                              b["ga"][s], b["gx"][s], self.gw1[e], self.gw2[e])  # fmt: skip
            start += n
        self._mlp_fwd_bwd(self.x_TD, self.gy_TD, self.sw1, self.sw2, b["sh"], b["sa"], b["sy"], b["sga"], b["sgx"],
                          self.sgw1, self.sgw2)  # fmt: skip


def bench_one(shape_name: str, router: str, dtype: torch.dtype, tokens: int, reps: int) -> dict:
    shape = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(tokens, shape["d"], generator=g)
    gy = torch.randn(tokens, shape["d"], generator=g)
    block = make_block(shape, router, x0)
    amp = dtype == torch.bfloat16

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        plan = block.router(x0)
    block.router.train()  # drop ET's pending logits
    counts_E = plan.load_E
    limit = Limit(block, counts_E, x0, dtype)

    def run_block() -> None:
        x = x0.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y, _ = block(x)
        y.backward(gy)
        block.zero_grad(set_to_none=True)
        block.router.train()

    def run_loop() -> None:
        x = x0.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            p = block.router(x)
            y = masked_loop_reference(x, p, block.experts) + block.shared(x, [x.shape[0]])
        y.backward(gy)
        block.zero_grad(set_to_none=True)
        block.router.train()

    # Two interleaved pairs rather than one triple: the masked loop's many freed buffers
    # change what the allocator hands the next candidate (on this VM a fresh >= 32 MB buffer
    # costs page faults), which would flatter whichever candidate follows it.
    s = interleaved_medians({"block": run_block, "limit": limit}, reps=reps)
    s2 = interleaved_medians({"block": run_block, "loop": run_loop}, reps=reps)
    s["block_vs_loop"], s["loop"] = s2["block"], s2["loop"]
    t_block, t_limit = median(s["block"]), median(s["limit"])
    t_block2, t_loop = median(s2["block"]), median(s2["loop"])
    return {
        "shape": shape_name,
        "router": router,
        "dtype": "bf16-autocast" if amp else "fp32",
        "tokens": tokens,
        "assignments": int(counts_E.sum()),
        "fanout": int(counts_E.sum()) / tokens,
        "block_s": t_block,
        "limit_s": t_limit,
        "loop_s": t_loop,
        "block_over_limit": t_block / t_limit,
        "block_over_loop": t_block2 / t_loop,
        "samples": s,
    }


def heap_child(shape_name: str, router: str, tokens: int, reps: int, on: bool) -> dict:
    """In a fresh process: the block's fwd+bwd (fp32) with keep_heap on or off; its median,
    minor page faults per rep and the process's peak RSS."""
    status = keep_heap() if on else keep_heap_status()
    shape = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(tokens, shape["d"], generator=g)
    gy = torch.randn(tokens, shape["d"], generator=g)
    block = make_block(shape, router, x0)

    def run_block() -> None:
        x = x0.detach().requires_grad_()
        y, _ = block(x)
        y.backward(gy)
        block.zero_grad(set_to_none=True)
        block.router.train()

    run_block()
    times, faults = [], []
    for _ in range(reps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        run_block()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"keep_heap": status, "block_s": median(times), "samples": times, "faults_per_rep": median(faults),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def heap_ab(shape_name: str, router: str, tokens: int, reps: int, rounds: int, threads: int) -> dict:
    """keep_heap off vs on, one subprocess per measurement, alternating (off first in even
    rounds, on first in odd ones)."""
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            cmd = [sys.executable, __file__, "--heap-child", f"{shape_name},{router},{tokens},{reps},{mode}",
                   "--threads", str(threads)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    res = {"shape": shape_name, "router": router, "tokens": tokens, "runs": runs}
    for mode, rs in runs.items():
        res[f"{mode}_block_s"] = median([x["block_s"] for x in rs])
        res[f"{mode}_peak_rss_mb"] = max(x["peak_rss_mb"] for x in rs)
        res[f"{mode}_faults_per_rep"] = median([x["faults_per_rep"] for x in rs])
    res["on_over_off"] = res["on_block_s"] / res["off_block_s"]
    return res


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, dt in zip(axes, ["fp32", "bf16-autocast"], strict=True):
        rows = [r for r in results if r["dtype"] == dt]
        labels = [f"{r['shape']}/{r['router']}" for r in rows]
        xs = range(len(rows))
        ax.bar([i - 0.2 for i in xs], [r["block_over_limit"] for r in rows], 0.4, label="moedist / GEMM limit")
        ax.bar([i + 0.2 for i in xs], [r["block_over_loop"] for r in rows], 0.4, label="moedist / masked loop")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=45)
        ax.set_title(f"MoE block fwd+bwd, {dt}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("time ratio (lower is better)")
    axes[0].legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2048 tokens, fp32 only, 3 reps (< 3 min)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    default_heap = "on" if TrainConfig().keep_heap else "off"
    ap.add_argument("--keep-heap", choices=["on", "off"], default=default_heap,
                    help=f"keep_heap for the main table (default: the config's, {default_heap})")
    ap.add_argument("--heap-rounds", type=int, default=None, help="subprocesses per keep_heap mode and shape (0: skip)")
    ap.add_argument("--heap-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heap_child:
        shape_name, router, tokens, reps, mode = args.heap_child.split(",")
        print(json.dumps(heap_child(shape_name, router, int(tokens), int(reps), mode == "on")))
        return
    tokens = args.tokens or (2048 if args.quick else 8192)
    reps = args.reps or (3 if args.quick else 5)
    heap_rounds = args.heap_rounds if args.heap_rounds is not None else (1 if args.quick else 3)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    heap_results = []
    for shape_name in SHAPES if heap_rounds > 0 else []:
        h = heap_ab(shape_name, "tc", tokens, max(reps, 5 if args.quick else 10), heap_rounds, torch.get_num_threads())
        heap_results.append(h)
        print(f"keep_heap shape {shape_name} tc fp32: off {h['off_block_s'] * 1e3:7.1f} ms "
              f"(peak RSS {h['off_peak_rss_mb']:.0f} MB, {h['off_faults_per_rep']:.0f} faults/rep)  "
              f"on {h['on_block_s'] * 1e3:7.1f} ms (peak RSS {h['on_peak_rss_mb']:.0f} MB, "
              f"{h['on_faults_per_rep']:.0f} faults/rep)  on/off {h['on_over_off']:.3f}", flush=True)  # fmt: skip
    heap_status = keep_heap() if args.keep_heap == "on" else keep_heap_status()
    results, targets = [], []
    for dtype in dtypes:
        for shape_name, shape in SHAPES.items():
            for router in args.routers.split(","):
                r = bench_one(shape_name, router, dtype, tokens, reps)
                results.append(r)
                print(
                    f"{r['dtype']:>13} shape {shape_name} {router:>3}: block {r['block_s'] * 1e3:7.1f} ms  "
                    f"limit {r['limit_s'] * 1e3:7.1f} ms  loop {r['loop_s'] * 1e3:7.1f} ms  "
                    f"block/limit {r['block_over_limit']:.3f}  block/loop {r['block_over_loop']:.3f}",
                    flush=True,
                )
                tag = f"{shape_name}/{router}/{r['dtype']}"
                goal = shape["goal"] if dtype == torch.float32 else BF16_GOAL
                targets.append(target(f"block/limit {tag}", r["block_over_limit"], "<=", goal))
                targets.append(target(f"block/loop {tag}", r["block_over_loop"], "<=", 1.0))
    config = {"shapes": SHAPES, "tokens": tokens, "reps": reps, "activation": "relu2", "shared_experts": 1,
              "keep_heap": heap_status, "heap_rounds": heap_rounds, "threads": torch.get_num_threads(),
              "bf16_goal": BF16_GOAL}  # fmt: skip
    path = write_results("moe_layer", config, results + [{"kind": "keep_heap_ab", **h} for h in heap_results], targets,
                         args.quick)  # fmt: skip
    plot(results, path.with_suffix(".png"))
    met = sum(t["met"] for t in targets)
    print(f"targets met: {met}/{len(targets)} -> {path}")


if __name__ == "__main__":
    main()

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

    python benchmarks/moe_layer.py [--quick] [--tokens N] [--reps R]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, median, save_figure, target, write_results

from moedist.config import RouterConfig
from moedist.model.moe import MoEBlock, masked_loop_reference

SHAPES = {
    "a": {"d": 512, "E": 16, "F": 1024, "top_k": 1, "goal": 1.10},
    "b": {"d": 512, "E": 64, "F": 256, "top_k": 3, "goal": 1.15},
}
ROUTERS = ["tc", "lf", "ec", "et"]


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
    args = ap.parse_args()
    tokens = args.tokens or (2048 if args.quick else 8192)
    reps = args.reps or (3 if args.quick else 5)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
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
                targets.append(target(f"block/limit {tag}", r["block_over_limit"], "<=", shape["goal"]))
                targets.append(target(f"block/loop {tag}", r["block_over_loop"], "<=", 1.0))
    config = {"shapes": SHAPES, "tokens": tokens, "reps": reps, "activation": "relu2", "shared_experts": 1}
    path = write_results("moe_layer", config, results, targets, args.quick)
    plot(results, path.with_suffix(".png"))
    met = sum(t["met"] for t in targets)
    print(f"targets met: {met}/{len(targets)} -> {path}")


if __name__ == "__main__":
    main()

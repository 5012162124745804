"""What each router costs: forward + backward of one MoE block (router, dispatch, experts,
combine, 1 shared expert) for TC, EC, ET, AoE and ETR at the same expert parameter count
(AoE param-matched, its W_down included), timed interleaved against TC in one run.

AoE pays for every expert's low-rank projection on every token (D x E*d_low), so its cost
grows with E; ETR's router is a fixed cosine (no parameters). Two shapes: (a) d=512, 16
experts of width 1024, ~1 routed per token; (b) d=512, 64 experts of width 256, ~3 per token.

    python benchmarks/routers.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, median, save_figure, write_results

from moedist.config import RouterConfig
from moedist.model.moe import MoEBlock

SHAPES = {
    "a": {"d": 512, "E": 16, "F": 1024, "top_k": 1},
    "b": {"d": 512, "E": 64, "F": 256, "top_k": 3},
}
ROUTERS = ["tc", "ec", "et", "aoe", "etr"]


def make_block(shape: dict, router: str, x_TD: torch.Tensor) -> MoEBlock:
    torch.manual_seed(0)
    # AoE: d_low = 64 (the paper's throughput setting); ETR: capacity 1.25 x balance
    cfg = RouterConfig(kind=router, top_k=shape["top_k"], et_warmup_steps=0, aoe_d_low=64, etr_capacity_factor=1.25,
                       etr_capacity_floor=False)  # exactly 1.25, as recorded in results/routers.json
    block = MoEBlock(shape["d"], shape["E"], shape["F"], 1, "relu2", cfg, init_std=0.02, out_std=0.02).train()
    if router == "et":  # calibrated thresholds, so threshold routing (not warm-up) is timed
        with torch.no_grad():
            block.router(x_TD)
        block.router.step_end()
    return block


def step(block: MoEBlock, x_TD: torch.Tensor, g_TD: torch.Tensor):
    def fn():
        block.zero_grad(set_to_none=True)
        y_TD, plan = block(x_TD)
        loss = (y_TD * g_TD).sum()
        if plan.aux_loss is not None:
            loss = loss + plan.aux_loss
        loss.backward()
        if hasattr(block.router, "_pending"):
            block.router._pending.clear()  # ET: do not accumulate logits across timed calls

    return fn


def plot(results: list[dict], path: Path) -> None:
    """Bars: fwd+bwd time per router relative to TC, one group per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(ROUTERS)
    for i, r in enumerate(ROUTERS):
        ys = [next(x["ratio_vs_tc"] for x in results if x["shape"] == s and x["router"] == r) for s in SHAPES]
        ax.bar([j + i * width for j in range(len(SHAPES))], ys, width, label=r)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SHAPES))],
                  [f"({s}) E={v['E']}, k={v['top_k']}" for s, v in SHAPES.items()])  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("MoE block fwd+bwd time / TC's")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2048 tokens, 3 reps")
    args = ap.parse_args()
    tokens, reps = (2048, 3) if args.quick else (8192, 5)
    torch.manual_seed(0)
    results = []
    for name, shape in SHAPES.items():
        x_TD = torch.randn(tokens, shape["d"])
        g_TD = torch.randn(tokens, shape["d"])
        blocks = {r: make_block(shape, r, x_TD) for r in ROUTERS}
        samples = interleaved_medians({r: step(b, x_TD, g_TD) for r, b in blocks.items()}, reps)
        base = median(samples["tc"])
        for r, b in blocks.items():
            with torch.no_grad():
                plan = b.router(x_TD)
            n_params = sum(p.numel() for p in b.parameters())
            row = {"shape": name, **shape, "router": r, "tokens": tokens, "ms": 1e3 * median(samples[r]),
                   "ratio_vs_tc": median(samples[r]) / base, "params": n_params,
                   "fanout": plan.token_idx_A.numel() / tokens, "samples": samples[r]}  # fmt: skip
            results.append(row)
            print(f"{name} {r:4s} {row['ms']:8.1f} ms  x{row['ratio_vs_tc']:.2f} vs tc  params {n_params / 1e6:.2f}M "
                  f"fanout {row['fanout']:.2f}", flush=True)  # fmt: skip
    config = {"tokens": tokens, "reps": reps, "activation": "relu2", "shared_experts": 1, "aoe_d_low": 64,
              "etr_capacity_factor": 1.25, "threads": torch.get_num_threads()}  # fmt: skip
    path = write_results("routers", config, results, [], args.quick)
    plot(results, path.with_suffix(".png"))
    print(f"-> {path}")


if __name__ == "__main__":
    main()

"""Task-aware expert pre-selection: what keeping only the fraction F of experts a task's
routing signature uses most does to that task's loss, the other tasks' loss, and the
expert-FFN work.

For each router (ET: thresholds, so dropping experts lowers the experts per token; TC
top-1: every token still gets one expert) a `tiny` model is trained on the embedded
corpus, signatures are taken on the shipped prompt set's "signature" rows, and for every
task and F in {1, 0.75, 0.5, 0.25} the model is evaluated on the "heldout" rows (prompts
from other files, never used for the signature): next-token loss on the task's own
prompts and on the other tasks', routed expert assignments per token (expert-FFN FLOPs
are proportional), and the forward time over all held-out prompts, timed interleaved
against F = 1.

    python benchmarks/preselection.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, median, save_figure, target, write_results

from moedist.analysis.signatures import compute_signatures, load_prompts, restrict_experts, task_expert_mask
from moedist.config import build_config
from moedist.training.loop import single_process_loop

KEEP = (1.0, 0.75, 0.5, 0.25)


def batches(model, tokenizer, texts: list[str], seq_len: int) -> list[torch.Tensor]:
    return [torch.tensor([[int(i) for i in tokenizer.encode(t)][: seq_len + 1]]) for t in texts]


@torch.no_grad()
def loss_and_fanout(model, seqs: list[torch.Tensor]) -> tuple[float, float]:
    """Token-weighted next-token loss and routed assignments per token (mean over layers)."""
    nll, n, assigned, tokens = 0.0, 0, 0, 0
    for s in seqs:
        out = model(s[:, :-1], s[:, 1:])
        k = s.shape[1] - 1
        nll += float(out.loss) * k
        n += k
        assigned += sum(p.token_idx_A.numel() for p in out.plans) / len(out.plans)
        tokens += k
    return nll / n, assigned / tokens


def expert_flops_per_token(model, fanout: float) -> float:
    """Routed-expert FLOPs per token per MoE layer: fanout x 2 x (expert parameters)."""
    block = model.moe_blocks()[0]
    per_expert = sum(p.numel() for p in block.experts.parameters()) / block.experts.n_experts
    return fanout * 2 * per_expert


def run_router(router: str, steps: int, reps: int, out: Path) -> list[dict]:
    cfg = build_config("tiny", None, {"router": {"kind": router}, "train": {"steps": steps, "progress": False,
                                                                          "eval_every": 0}})  # fmt: skip
    loop = single_process_loop(cfg, out / f"run-{router}")
    loop.run()
    tr = loop.ex
    model, tok = tr.model.eval(), tr.dataset.tokenizer
    sig_prompts = load_prompts(split="signature")
    report = compute_signatures(model, tok, cfg.model.seq_len, sig_prompts, out / f"sig-{router}")
    held = load_prompts(split="heldout")
    tasks = sorted({p["task"] for p in held})
    seqs = {t: batches(model, tok, [p["text"] for p in held if p["task"] == t], cfg.model.seq_len) for t in tasks}
    all_seqs = [s for t in tasks for s in seqs[t]]
    rows = []
    for task in tasks:
        masks = {f: task_expert_mask(out / f"sig-{router}", task, f) for f in KEEP}

        def timed(mask: np.ndarray):
            def fn():
                restrict_experts(model, mask)
                with torch.no_grad():
                    for s in all_seqs:
                        model(s[:, :-1])
            return fn

        samples = interleaved_medians({f"keep={f}": timed(masks[f]) for f in KEEP}, reps)
        for f in KEEP:
            restrict_experts(model, masks[f])
            own, fan_own = loss_and_fanout(model, seqs[task])
            other_losses = [loss_and_fanout(model, seqs[t]) for t in tasks if t != task]
            other = float(np.mean([x[0] for x in other_losses]))
            fan_other = float(np.mean([x[1] for x in other_losses]))
            rows.append({
                "router": router, "task": task, "keep": f, "experts_kept": int(masks[f].sum(1)[0]),
                "own_loss": own, "other_loss": other, "fanout_own": fan_own, "fanout_other": fan_other,
                "expert_flops_per_token_own": expert_flops_per_token(model, fan_own),
                "forward_s": median(samples[f"keep={f}"]), "forward_samples": samples[f"keep={f}"],
            })  # fmt: skip
        base = next(r for r in rows if r["task"] == task and r["keep"] == 1.0 and r["router"] == router)
        for r in rows:
            if r["task"] == task and r["router"] == router:
                r["own_loss_delta"] = r["own_loss"] - base["own_loss"]
                r["other_loss_delta"] = r["other_loss"] - base["other_loss"]
                r["expert_flops_saved"] = 1 - r["expert_flops_per_token_own"] / base["expert_flops_per_token_own"]
                r["time_ratio"] = r["forward_s"] / base["forward_s"]
    for r in rows:
        r["signature_cv_accuracy"] = report["cv_accuracy"]
    restrict_experts(model, np.ones_like(masks[1.0]))
    SIGNATURE_REPORTS[router] = report
    return rows


SIGNATURE_REPORTS: dict[str, dict] = {}


def plot(results: list[dict], path: Path) -> None:
    """Loss deltas (own task, other tasks) and expert FLOPs saved against F, per router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers = sorted({r["router"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for router in routers:
        mean = {k: {f: float(np.mean([r[k] for r in results if r["router"] == router and r["keep"] == f]))
                    for f in KEEP} for k in ("own_loss_delta", "other_loss_delta", "expert_flops_saved")}  # fmt: skip
        axes[0].plot(KEEP, [mean["own_loss_delta"][f] for f in KEEP], "o-", label=f"{router}: own task")
        axes[0].plot(KEEP, [mean["other_loss_delta"][f] for f in KEEP], "s--", label=f"{router}: other tasks")
        axes[1].plot(KEEP, [100 * mean["expert_flops_saved"][f] for f in KEEP], "o-", label=router)
    axes[0].set_ylabel("held-out loss - loss at F=1 (nats/byte)")
    axes[1].set_ylabel("routed-expert FLOPs saved (%)")
    for ax in axes:
        ax.set_xlabel("F = fraction of experts kept per layer")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("task-aware expert pre-selection (mean over 4 tasks)")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 training steps, 2 timing reps")
    ap.add_argument("--routers", default="et,tc")
    args = ap.parse_args()
    steps, reps = (60, 2) if args.quick else (300, 5)
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="moedist-preselect-") as tmp:
        for router in args.routers.split(","):
            rows = run_router(router, steps, reps, Path(tmp))
            results += rows
            for r in rows:
                print(f"{r['router']} {r['task']:10s} keep={r['keep']:.2f} own {r['own_loss']:.3f} "
                      f"({r['own_loss_delta']:+.3f}) other {r['other_loss']:.3f} ({r['other_loss_delta']:+.3f}) "
                      f"fanout {r['fanout_own']:.2f} flops saved {r['expert_flops_saved']:.0%} "
                      f"time x{r['time_ratio']:.2f}", flush=True)  # fmt: skip
    targets = []
    for router in args.routers.split(","):
        half = [r for r in results if r["router"] == router and r["keep"] == 0.5]
        targets.append(target(f"{router}: keep=0.5 hurts the task's own loss less than the others' (mean delta)",
                              float(np.mean([r["own_loss_delta"] - r["other_loss_delta"] for r in half])), "<=", 0.0))
    config = {"preset": "tiny", "train_steps": steps, "reps": reps, "keep": list(KEEP),
              "prompts": "moedist/analysis/prompts.jsonl (signature rows for signatures, heldout rows for losses)",
              "flops": "routed-expert FLOPs per token per MoE layer = fanout x 2 x expert params",
              "signature_reports": SIGNATURE_REPORTS}  # fmt: skip
    path = write_results("preselection", config, results, targets, args.quick)
    plot(results, path.with_suffix(".png"))
    print(f"-> {path}")


if __name__ == "__main__":
    main()

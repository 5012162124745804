"""Changing the number of experts of a running model: what the loss does.

1. Loss jump at the change, per router: a model trained S steps is resized (noise 0) and
   the eval-mode loss on fixed held-out batches is measured right before and right after:
   split 8 -> 16 for ET, TC, LF and EC; drop 16 -> 12 for ET (after the split).
2. Loss curve and balance across an ET split: an ET run splits 8 -> 16 experts at step
   S (most loaded first, noise 0.01) and trains on; an unsplit run of the same seed trains
   the same steps. Per step: training loss, experts per token (fanout) and max/mean
   expert load, to show ET's thresholds settling on the new target k = N x top_k / E2.

Single process (the resize itself is the same code in a Ray job; the distributed tests
check that a resized job equals a resized single process).

    python benchmarks/expert_split.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_figure, target, write_results

from moedist.config import build_config
from moedist.data.dataset import val_batches
from moedist.training.trainer import Trainer, load_dataset

OVER = {"model": {"d_model": 64, "n_heads": 4, "n_layers": 3, "seq_len": 64, "n_experts": 8},
        "train": {"batch_size": 16, "eval_every": 0, "progress": False, "warmup_steps": 10, "lr": 3e-3},
        "router": {"top_k": 2, "et_warmup_steps": 10}}  # fmt: skip


def make(router: str, steps: int) -> Trainer:
    over = copy.deepcopy(OVER)
    over["router"]["kind"] = router
    over["train"]["steps"] = steps
    cfg = build_config("tiny", None, over)
    return Trainer(cfg, load_dataset(cfg))


def held_out(tr: Trainer, tokens: int = 8192) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's fixed validation windows."""
    out = []
    for rows in val_batches(tr.dataset, tr.cfg.model.seq_len, 16, tokens):
        t = torch.from_numpy(rows)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def eval_loss(tr: Trainer, batches) -> float:
    """Eval-mode loss (frozen thresholds, no guard) in float64."""
    tr.model.eval().double()
    with torch.no_grad():
        loss = float(np.mean([tr.model(x, y).loss.item() for x, y in batches]))
    tr.model.float().train()
    return loss


def jump(router: str, steps: int) -> dict:
    tr = make(router, 2 * steps)
    for _ in range(steps):
        tr.train_step()
    batches = held_out(tr)
    before = eval_loss(tr, batches)
    tr.scale(experts=16, noise=0.0)
    after = eval_loss(tr, batches)
    res = {"router": router, "change": "split 8->16", "loss_before": before, "loss_after": after,
           "loss_change": after - before}  # fmt: skip
    out = [res]
    if router == "et":
        tr.scale(experts=12)
        dropped = eval_loss(tr, batches)
        out.append({"router": router, "change": "drop 16->12", "loss_before": after, "loss_after": dropped,
                    "loss_change": dropped - after})  # fmt: skip
    return out


def curve(steps: int, split_at: int) -> dict:
    runs = {}
    for name in ("unsplit", "split"):
        tr = make("et", steps)
        rows = []
        for s in range(steps):
            if name == "split" and s == split_at:
                tr.scale(experts=16, noise=0.01)
            r = tr.train_step()
            loads = [np.asarray(r[k], dtype=float) for k in r if k.endswith("_load") and r[k] is not None]
            rows.append({"step": s, "loss": r["loss"], "experts": len(loads[0]),
                         "fanout": float(np.mean([r[k] for k in r if k.endswith("_fanout") and r[k] is not None])),
                         "max_over_mean_load": float(np.mean([x.max() / x.mean() for x in loads]))})  # fmt: skip
        runs[name] = rows
    return runs


def settling(runs: dict, split_at: int, window: int = 10) -> dict:
    """Split vs unsplit run after the split: mean fanout, max/mean load and loss over the
    first and the last `window` steps (how far ET's thresholds have moved to the new k)."""
    out = {}
    n = len(runs["split"])
    for where, lo in (("first", split_at), ("last", n - window)):
        for key in ("fanout", "max_over_mean_load", "loss"):
            for name in ("split", "unsplit"):
                vals = [r[key] for r in runs[name][lo:lo + window]]
                out[f"{key}_{name}_{where}_{window}"] = float(np.mean(vals))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = ap.parse_args()
    steps = 20 if args.quick else 150
    split_at = steps // 2
    jumps = [r for router in ("et", "tc", "lf", "ec") for r in jump(router, split_at)]
    runs = curve(steps, split_at)
    settle = settling(runs, split_at)
    et_split = next(r for r in jumps if r["router"] == "et" and r["change"].startswith("split"))
    results = [{"kind": "loss_jump", **r} for r in jumps] + [
        {"kind": "curve", "run": name, "split_at": split_at, "rows": rows} for name, rows in runs.items()
    ]
    results.append({"kind": "settle", **settle})
    targets = [target("ET split 8->16: |eval loss change| (noise 0)", abs(et_split["loss_change"]), "<=", 1e-5)]
    cfg = {"over": OVER, "steps": steps, "split_at": split_at, "noise_curve": 0.01}
    path = write_results("expert_split", cfg, results, targets, args.quick)
    plot(runs, split_at, jumps, path.with_suffix(".png"))
    for r in jumps:
        print(f"{r['router']:3s} {r['change']:12s} eval loss {r['loss_before']:.6f} -> {r['loss_after']:.6f} "
              f"({r['loss_change']:+.2e})")  # fmt: skip
    for k, v in settle.items():
        print(f"{k}: {v:.4f}")
    print(f"wrote {path}")


def plot(runs: dict, split_at: int, jumps: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in runs.items():
        s = [r["step"] for r in rows]
        ax[0].plot(s, [r["loss"] for r in rows], label=name)
        ax[1].plot(s, [r["fanout"] for r in rows], label=name)
        ax[2].plot(s, [r["max_over_mean_load"] for r in rows], label=name)
    for a, title in zip(ax, ("training loss", "experts per token (fanout)", "max / mean expert load"), strict=True):
        a.axvline(split_at, color="grey", ls="--", lw=0.8)
        a.set_title(title)
        a.set_xlabel("step")
        a.legend()
    fig.suptitle(f"ET: 8 -> 16 experts at step {split_at} (split the most loaded, noise 0.01) vs unsplit")
    save_figure(fig, out)


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    main()

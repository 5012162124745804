"""How routing-signature accuracy grows with training, and how it depends on the task set.

For each router (--routers, default ET and TC top-1) ONE single-process model (moedist's
Trainer, no Ray) of --preset (default `tiny`; `fine` works too) is trained on the embedded
corpus for --steps steps (default 1500; the presets' own runs are 300). At step 0 and every
--every steps (default 150) and at the end, training pauses and the model, in eval mode,
routes the shipped prompt set's 96 "signature" prompts (moedist/analysis/prompts.jsonl:
code, docstring, comment, arithmetic; 24 each); `signature_report` scores those
histograms (no files are written per checkpoint). The SAME histograms are scored for three
task sets (`merge_tasks` relabels them):

  4 tasks       code, docstring, comment, arithmetic           (chance 1/4)
  prose merged  docstring + comment as one class "prose"       (chance 1/2: the majority)
  no comment    code, docstring, arithmetic                    (chance 1/3)

Two kinds of English prose are hard to tell apart for a small byte-level model; the two
reduced sets show how much of the 4-task error is that one confusion (the confusion
matrix shows it directly).

Recorded per router, checkpoint and task set: step, train loss (that step's and the mean
since the previous checkpoint), stratified 5-fold CV accuracy (pooled, per fold, fold mean
and sample sd), macro-F1, within/across-task cosine with their sds and Cohen's d, the
permutation and load-balance baselines, the accuracy of each MoE layer alone, the
confusion matrix, the chance level (majority-class share), and the share of (prompt,
layer) rows where nothing was routed (ET before its thresholds settle).

--quick: a smoke run, not a measurement: d=64, 3 layers, 8 experts, seq 64, batch 8,
40 steps (ET warm-up 10), a checkpoint every 20 steps, 1 permutation / balance shuffle.

    python benchmarks/signature_growth.py [--quick] [--routers et,tc] [--preset tiny|fine]
        [--steps N] [--every N] [--threads N] [--seed N] [--shuffles N]
        [--normalization assignment|token]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, write_results

from moedist.analysis.signatures import (
    NORMALIZATIONS,
    check_normalization,
    draw_confusion,
    load_prompts,
    merge_tasks,
    routing_histograms,
    signature_report,
)
from moedist.config import ROUTERS, ConfigError, build_config, deep_update
from moedist.errors import DataError
from moedist.training.trainer import Trainer, load_dataset

# name -> merge_tasks mapping over the shipped tasks (code, docstring, comment, arithmetic)
TASK_SETS: dict[str, dict[str, str | None]] = {
    "4 tasks": {},
    "prose merged": {"docstring": "prose", "comment": "prose"},
    "no comment": {"comment": None},
}
FULL_SET = "4 tasks"
# routers with routing to sign (dense has no MoE layer to read)
SIGNED_ROUTERS = tuple(r for r in ROUTERS if r != "dense")
# --quick: the model and schedule of a smoke run (as in quality.py)
QUICK = {"model": {"d_model": 64, "n_heads": 4, "n_layers": 3, "seq_len": 64, "n_experts": 8},
         "train": {"batch_size": 8, "warmup_steps": 5},
         "router": {"et_warmup_steps": 10}}  # fmt: skip


def run_config(preset: str, router: str, steps: int, seed: int, threads: int, quick: bool):
    """The RunConfig of one router's training run."""
    over: dict[str, Any] = copy.deepcopy(QUICK) if quick else {}
    deep_update(over, {"router": {"kind": router},
                       "train": {"steps": steps, "seed": seed, "threads": threads, "eval_every": 0,
                                 "progress": False}})  # fmt: skip
    return build_config(preset, None, over)


def checkpoint_steps(steps: int, every: int) -> list[int]:
    """0, every, 2 every, ... and the last step."""
    return sorted({0, *range(every, steps + 1, every), steps})


def score(hist_PLE: np.ndarray, tasks: list[str], seed: int, shuffles: int, normalization: str) -> dict[str, dict]:
    """signature_report of the same histograms for every task set."""
    out = {}
    for name, mapping in TASK_SETS.items():
        keep_P, labels = merge_tasks(tasks, mapping)
        out[name] = signature_report(hist_PLE[keep_P], labels, seed, shuffles, normalization)
    return out


def run_router(router: str, args: argparse.Namespace, prompts: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Train one model; a result row per checkpoint and task set."""
    cfg = run_config(args.preset, router, args.steps, args.seed, args.threads, args.quick)
    tr = Trainer(cfg, load_dataset(cfg))
    texts, tasks = [p["text"] for p in prompts], [p["task"] for p in prompts]
    marks = set(checkpoint_steps(args.steps, args.every))
    rows: list[dict[str, Any]] = []
    losses: list[float] = []
    loss, since = None, None  # that step's loss, mean since the previous checkpoint
    t_train, t_start = 0.0, time.perf_counter()
    for step in range(args.steps + 1):
        if step in marks:
            t0 = time.perf_counter()
            hist_PLE = routing_histograms(tr.model, tr.dataset.tokenizer, texts, cfg.model.seq_len,
                                          args.normalization)  # fmt: skip
            tr.model.train()  # routing_histograms left it in eval mode
            empty = float((hist_PLE.sum(-1) == 0).mean())
            reports = score(hist_PLE, tasks, args.seed, args.shuffles, args.normalization)
            sig_s = time.perf_counter() - t0
            for name, rep in reports.items():
                rows.append({"router": router, "step": step, "task_set": name, "train_loss": loss,
                             "train_loss_mean": since, "empty_rows": empty, "signature_s": sig_s,
                             "train_s": t_train, **rep})  # fmt: skip
            full = reports[FULL_SET]
            print(f"{router} step {step:5d}  loss {'-' if loss is None else f'{loss:.3f}':>6s}  "
                  + "  ".join(f"{n}: {r['cv_accuracy']:.2f}" for n, r in reports.items())
                  + f"  d {full['cosine_cohens_d']:.2f}  empty {empty:.2f}  ({sig_s:.1f} s)", flush=True)  # fmt: skip
            losses = []
        if step == args.steps:
            break
        t0 = time.perf_counter()
        loss = float(tr.train_step()["loss"])
        t_train += time.perf_counter() - t0
        losses.append(loss)
        since = float(np.mean(losses))
    print(f"{router}: {args.steps} steps in {t_train:.0f} s of training, {time.perf_counter() - t_start:.0f} s "
          "in all", flush=True)  # fmt: skip
    return rows


def plot(results: list[dict[str, Any]], routers: list[str], path: Path, title: str) -> None:
    """Top row: CV accuracy (fold mean +- sd) vs step per task set, a line per router, the
    chance level dashed. Bottom row: the last checkpoint's 4-task confusion matrix per
    router, and the train loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = max(len(TASK_SETS), len(routers) + 1)
    fig, axes = plt.subplots(2, n_cols, figsize=(4.6 * n_cols, 8.5), squeeze=False)
    colors = {r: f"C{i}" for i, r in enumerate(routers)}
    for ax, name in zip(axes[0], TASK_SETS, strict=False):
        for router in routers:
            rs = [r for r in results if r["router"] == router and r["task_set"] == name]
            steps = np.array([r["step"] for r in rs])
            mean = np.array([r["cv_fold_accuracy_mean"] for r in rs])
            sd = np.array([r["cv_fold_accuracy_std"] for r in rs])
            ax.plot(steps, mean, "o-", ms=3, color=colors[router], label=router)
            ax.fill_between(steps, mean - sd, mean + sd, color=colors[router], alpha=0.2)
        chance = next(r["chance_accuracy"] for r in results if r["task_set"] == name)
        ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance {chance:.2f}")
        labels = next(r["confusion"]["labels"] for r in results if r["task_set"] == name)
        ax.set_title(f"{name}: {', '.join(labels)}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("CV accuracy (5-fold mean +- sd)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[0][len(TASK_SETS) :]:
        ax.axis("off")
    for ax, router in zip(axes[1], routers, strict=False):
        last = max((r for r in results if r["router"] == router and r["task_set"] == FULL_SET),
                   key=lambda r: r["step"])  # fmt: skip
        draw_confusion(ax, last["confusion"], f"{router}, step {last['step']}: accuracy {last['cv_accuracy']:.2f}", 30)
    ax = axes[1][len(routers)]
    for router in routers:
        rs = [r for r in results if r["router"] == router and r["task_set"] == FULL_SET and r["train_loss_mean"]]
        ax.plot([r["step"] for r in rs], [r["train_loss_mean"] for r in rs], "o-", ms=3, color=colors[router],
                label=router)  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel("train loss, mean since previous checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax in axes[1][len(routers) + 1 :]:
        ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, path)


def bad(msg: str) -> None:
    print(f"signature_growth: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 40 steps, a checkpoint every 20")
    ap.add_argument("--routers", default="et,tc", help=f"comma list of {', '.join(SIGNED_ROUTERS)} (default et,tc)")
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny; e.g. fine)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per router (default 1500; quick 40)")
    ap.add_argument("--every", type=int, default=None, help="signatures every N steps (default 150; quick 20)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed and the CV folds' seed (default 0)")
    ap.add_argument("--shuffles", type=int, default=None,
                    help="shuffles of the permutation and load-balance baselines (default 5; quick 1)")  # fmt: skip
    ap.add_argument("--normalization", default="assignment", help=f"signature rows: {' or '.join(NORMALIZATIONS)}")
    args = ap.parse_args()
    args.steps = args.steps if args.steps is not None else (40 if args.quick else 1500)
    args.every = args.every if args.every is not None else (20 if args.quick else 150)
    args.shuffles = args.shuffles if args.shuffles is not None else (1 if args.quick else 5)
    # bad input: one line, exit 2, before any training
    for name, val, lo in (("--steps", args.steps, 1), ("--every", args.every, 1), ("--threads", args.threads, 0),
                          ("--seed", args.seed, 0), ("--shuffles", args.shuffles, 1)):  # fmt: skip
        if val < lo:
            bad(f"{name}: must be >= {lo}, got {val}")
    routers = [x.strip() for x in args.routers.split(",") if x.strip()]
    unknown = [r for r in routers if r not in SIGNED_ROUTERS]
    if not routers:
        bad(f"--routers: no router given (choose from {', '.join(SIGNED_ROUTERS)})")
    if unknown:
        bad(f"--routers: unknown {', '.join(unknown)} (choose from {', '.join(SIGNED_ROUTERS)})")
    if len(set(routers)) != len(routers):
        bad(f"--routers: {args.routers!r} names a router twice")
    try:
        check_normalization(args.normalization)
        cfgs = [run_config(args.preset, r, args.steps, args.seed, args.threads, args.quick) for r in routers]
        load_dataset(cfgs[0])
        prompts = load_prompts(split="signature")
        tasks = [p["task"] for p in prompts]
        for mapping in TASK_SETS.values():
            merge_tasks(tasks, mapping)
    except (ConfigError, DataError) as e:
        bad(str(e))

    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for router in routers:
        results += run_router(router, args, prompts)
    wall = time.perf_counter() - t0
    chance = {name: next(r["chance_accuracy"] for r in results if r["task_set"] == name) for name in TASK_SETS}
    config = {"quick": args.quick, "smoke_run": args.quick, "preset": args.preset, "routers": routers,
              "steps": args.steps, "every": args.every, "checkpoints": checkpoint_steps(args.steps, args.every),
              "threads": args.threads, "seed": args.seed, "shuffles": args.shuffles,
              "normalization": args.normalization, "overrides": QUICK if args.quick else {},
              "prompts": "moedist/analysis/prompts.jsonl, signature rows", "task_sets": TASK_SETS,
              "chance_accuracy": chance, "chance": "share of the largest class",
              "cv": "stratified 5-fold logistic regression on standardised features", "wall_s": wall}  # fmt: skip
    path = write_results("signature_growth", config, results, [], args.quick)
    title = (f"routing-signature accuracy vs training step ({args.preset}, {args.steps} steps)"
             + (" - smoke run, not a result" if args.quick else ""))  # fmt: skip
    plot(results, routers, path.with_suffix(".png"), title)
    print(f"-> {path} ({wall:.0f} s)")


if __name__ == "__main__":
    main()

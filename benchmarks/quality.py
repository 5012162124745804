"""What each router buys in model quality: the same data and active compute, several seeds.

What is run. Single-process training (moedist's own Trainer, no Ray) of the `tiny` preset
(4 layers, d=128, first layer dense, 16 routed experts of width 2d + 1 shared expert, about
1 routed expert per token, byte tokens, 300 steps by default there; here --steps, default
1000) for each router, each seed (train.seed = 0..N-1; it seeds the model and the batches):

- dense: every FFN dense, width (n_shared + top_k) x expert width (active-matched: 4d);
- tc, lf, ec, et: moedist's defaults (setting "moedist", the `tiny` preset) and, where the
  ET paper's baseline settings differ (tc: sigmoid gate, aux 0.001; lf: bias on the logits;
  ec: sigmoid gate), the `tiny-paper` preset (setting "paper"). ET's own settings are the
  same in both presets, so ET and dense run once. ET's target fanout = top_k = TC's top_k;
- aoe (parameter-matched: router.aoe_param_match) and etr: moedist's defaults only. They are
  not baselines of the ET paper, and `tiny-paper`'s router fields would only change AoE's
  aux coefficient and ETR's gate to values neither paper uses.

The data is the embedded standard-library corpus, or the prepared dataset of --data DIR.

What is measured, per run: validation loss (nats per token = per byte with byte tokens;
`Trainer.evaluate`, the held-out split, train.eval_tokens targets) every --eval-every steps
and at the end; at the end also the inference fanout and loss (`inference_fanout`,
`inference_val_loss`: ET routes with its thresholds there, even in warm-up); per MoE layer
the load spread over the last 20% of steps (the metrics rows' L{layer}_load columns summed
over those steps: max/mean and coefficient of variation std/mean; also the mean of the same
per step), whether that window lies after ET's warm-up, and each expert's share of the
window's assignments (ET: against 1/E, as the paper reports it); tokens/s (tokens per step /
median step time; the machine is shared, so read it as rough). Per (router, setting): the
final validation loss mean and spread (half the range over seeds) and whether the seed
spread separates each pair (|mean diff| > sum of spreads; with 1 seed: undetermined).
A PNG shows the validation loss curves (mean over seeds).

Ablations (--ablations NAME,... or all; none by default, except et_gate in --quick as a
smoke test of the path): named groups of variants, each run with every seed, each group
with its own reference runs (moedist's defaults) so it reads on its own:
  et_gate         ET with its sigmoid gate (published) vs a softmax gate
  et_warmup       ET warm-up length (x0.5, x2) and EMA beta (0.95, 0.999) vs tiny's 100 / 0.99
  et_capacity     ET capacity guard C = 0.5 (default) vs 0.25 and 1.0 (the loosest the
                  config allows: 0..2k tokens per expert; the guard cannot be switched off)
  shared_expert   ET and TC without the shared expert (top_k 1: less active compute; top_k 2:
                  active-matched)
  tc_settings     TC aux coefficient 0.001 / 0.01 / 0.1 x softmax / sigmoid gate
  model_size      ET and TC at d=256 and at d=256 with 6 layers

Runs are kept: each finished run is written to --runs-dir (default
benchmarks/results/quality-runs/, --quick: none) as one JSON named by its variant, seed and
a hash of everything that decides it (the resolved configuration - preset, overrides, data,
seed - plus steps and eval schedule), and a later call with the same settings reads it
instead of training again (under any variant name that resolves to the same run). So a
long study can be run in pieces (e.g. `--routers` first, ablations later, or after an
interruption) and the summary is always built from every run it needs.
--jobs N trains N runs at once in separate processes (use --threads 1 with it; on a 2-core
machine --jobs 2 --threads 1 does about twice the runs per hour of one 2-thread run, and
each run's tokens/s is then that of a shared machine).

--quick: a smoke run, not a quality measurement: d=64, 3 layers, 8 experts, seq 64, batch 8,
20 steps (ET warm-up 10), eval every 5 steps on 4096 tokens, 1 seed, 1 torch thread, routers
dense, tc (and TC with the paper's settings), et (and ET's softmax gate).

    python benchmarks/quality.py [--quick] [--steps N] [--seeds N] [--eval-every N]
        [--routers dense,tc,...] [--ablations et_gate,...|all] [--data DIR] [--threads N]
        [--jobs N] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import hashlib
import itertools
import json
import multiprocessing
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, save_figure, write_results

from moedist.config import ROUTERS, ConfigError, build_config, deep_update, to_dict
from moedist.errors import DataError
from moedist.routing import ROUTER_CLASSES
from moedist.training.trainer import Trainer, load_dataset, write_atomic

# Routers whose ET-paper baseline settings (the tiny-paper preset) differ from moedist's.
PAPER_ROUTERS = ("tc", "lf", "ec")
PRESETS = {"moedist": "tiny", "paper": "tiny-paper"}
TAIL = 0.2  # load spread over the last 20% of steps

# --quick: the model and schedule of a smoke run (applied to every run alike)
QUICK = {"model": {"d_model": 64, "n_heads": 4, "n_layers": 3, "seq_len": 64, "n_experts": 8},
         "train": {"batch_size": 8, "eval_tokens": 4096, "warmup_steps": 5},
         "router": {"et_warmup_steps": 10}}  # fmt: skip
QUICK_ROUTERS = ("dense", "tc", "et")


@dataclass
class Variant:
    """One training configuration: a router, a preset setting and extra overrides."""

    name: str  # label in tables and plots
    router: str
    setting: str = "moedist"  # key of PRESETS
    over: dict[str, Any] = field(default_factory=dict)  # nested overrides on top of the preset

    def key(self) -> str:
        """Identity of the configuration (runs with equal keys are run once)."""
        return json.dumps([self.router, self.setting, self.over], sort_keys=True)


def ablation_groups(base_warmup: int) -> dict[str, list[Variant]]:
    """The named ablation groups; each lists its reference variants first."""
    et, tc = Variant("et", "et"), Variant("tc", "tc")
    warmups = (max(1, base_warmup // 2), 2 * base_warmup)
    return {
        "et_gate": [et, Variant("et softmax gate", "et", over={"router": {"gate": "softmax"}})],
        "et_warmup": [
            et,
            *[Variant(f"et warmup {w}", "et", over={"router": {"et_warmup_steps": w}}) for w in warmups],
            *[Variant(f"et beta {b}", "et", over={"router": {"et_beta": b}}) for b in (0.95, 0.999)],
        ],
        "et_capacity": [
            et,
            *[Variant(f"et guard C={c}", "et", over={"router": {"et_capacity": c}}) for c in (0.25, 1.0)],
        ],
        "shared_expert": [
            et,
            tc,
            *[
                Variant(f"{r} no shared, top_k {k}", r, over={"model": {"n_shared": 0}, "router": {"top_k": k}})
                for r in ("et", "tc")
                for k in (1, 2)
            ],
        ],
        "tc_settings": [
            Variant(f"tc {g} aux {a}", "tc", over={"router": {"gate": g, "aux_loss_coef": a}})
            for g in ("softmax", "sigmoid")
            for a in (0.001, 0.01, 0.1)
        ],
        "model_size": [
            et,
            tc,
            *[
                Variant(
                    f"{r} d256" + ("" if n == 4 else f" {n} layers"), r, over={"model": {"d_model": 256, "n_layers": n}}
                )
                for r in ("et", "tc")
                for n in (4, 6)
            ],
        ],
    }


def main_variants(routers: list[str]) -> list[Variant]:
    """Each router with moedist's defaults, and with the paper's settings where they differ."""
    out = []
    for r in routers:
        out.append(Variant(r, r))
        if r in PAPER_ROUTERS:
            out.append(Variant(f"{r} paper", r, "paper"))
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Nested dict a updated by b (copies of both)."""
    return deep_update(copy.deepcopy(a), copy.deepcopy(b))


def run_config(v: Variant, seed: int, common: dict[str, Any]):
    """The RunConfig of variant v, seed `seed`, on top of the options every run shares."""
    over = merge(merge(common, v.over), {"router": {"kind": v.router}, "train": {"seed": seed}})
    if v.router == "dense":  # active-matched: the shared experts' plus top_k routed experts' width
        m = build_config(PRESETS[v.setting], None, merge(over, {"router": {"kind": "tc"}})).model
        k = build_config(PRESETS[v.setting], None, over).router.top_k
        over = merge(over, {"model": {"dense_width": (m.n_shared + k) * m.resolved_expert_width}})
    return build_config(PRESETS[v.setting], None, over)


def load_spread(rows: list[dict[str, Any]], et_warmup: int | None) -> dict[str, Any]:
    """Per MoE layer: load spread over the last TAIL of steps and each expert's share."""
    n_tail = max(1, round(TAIL * len(rows)))
    tail = rows[-n_tail:]
    layers = sorted({k[:-5] for k in rows[-1] if k.startswith("L") and k.endswith("_load")}, key=lambda s: int(s[1:]))
    after = None if et_warmup is None else tail[0]["step"] >= et_warmup
    out: dict[str, Any] = {"window_steps": [tail[0]["step"], tail[-1]["step"]], "window_after_et_warmup": after}
    per_layer = {}
    for name in layers:
        steps_SE = np.array([r[f"{name}_load"] for r in tail if r.get(f"{name}_load") is not None], dtype=float)
        if steps_SE.size == 0:
            continue
        load_E = steps_SE.sum(0)
        share_E = load_E / load_E.sum()
        per_step_mm = steps_SE.max(1) / np.maximum(steps_SE.mean(1), 1e-12)
        per_step_cv = steps_SE.std(1) / np.maximum(steps_SE.mean(1), 1e-12)
        per_layer[name] = {
            "max_over_mean": float(load_E.max() / load_E.mean()),
            "cv": float(load_E.std() / load_E.mean()),
            "per_step_max_over_mean": float(per_step_mm.mean()),
            "per_step_cv": float(per_step_cv.mean()),
            "share": share_E.tolist(),
            "share_min": float(share_E.min()),
            "share_max": float(share_E.max()),
            "uniform_share": 1.0 / len(share_E),
            "fanout": float(np.mean([r[f"{name}_fanout"] for r in tail])),
        }
    out["layers"] = per_layer
    if per_layer:
        out["max_over_mean"] = float(np.mean([x["max_over_mean"] for x in per_layer.values()]))
        out["cv"] = float(np.mean([x["cv"] for x in per_layer.values()]))
    return out


def train_one(v: Variant, seed: int, steps: int, eval_every: int, common: dict[str, Any]) -> dict[str, Any]:
    """Train variant v with `seed` for `steps` steps; the run's measurements."""
    cfg = run_config(v, seed, merge(common, {"train": {"steps": steps}}))
    tr = Trainer(cfg, load_dataset(cfg))
    rows, curve = [], []
    t_start = time.perf_counter()
    for step in range(steps):
        row = tr.train_step()
        rows.append(row)
        if step + 1 == steps or (eval_every and (step + 1) % eval_every == 0):
            ev = tr.evaluate().to_json()
            curve.append({"step": step + 1, "val_loss": ev["val_loss"],
                          "inference_val_loss": ev["inference_val_loss"],
                          "inference_fanout": ev["inference_fanout"]})  # fmt: skip
    wall = time.perf_counter() - t_start
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    et_warmup = cfg.router.et_warmup_steps if v.router == "et" else None
    return {
        "variant": v.name, "router": v.router, "setting": v.setting, "over": v.over, "seed": seed,
        "steps": steps, "params": tr.param_counts(),
        "final_val_loss": ev["val_loss"], "final_inference_val_loss": ev["inference_val_loss"],
        "inference_fanout": ev["inference_fanout"], "mean_fanout": ev["mean_fanout"],
        "target_fanout": ev["target_fanout"], "et_routing": ev["et_routing"],
        "thresholds_settled": ev["thresholds_settled"], "eval_warnings": ev["warnings"],
        "tokens_per_s": tokens_per_step / statistics.median(r["step_s"] for r in rows),
        "wall_s": wall, "curve": curve,
        "train_loss": [r["loss"] for r in rows],
        "load_spread": load_spread(rows, et_warmup),
    }  # fmt: skip


def run_digest(v: Variant, seed: int, steps: int, eval_every: int, common: dict[str, Any]) -> str:
    """Hash of the full configuration a run trains: a changed preset or override never reuses
    a stored run, and two variants that resolve to the same configuration share theirs."""
    cfg = run_config(v, seed, merge(common, {"train": {"steps": steps}}))
    config = to_dict(cfg)
    # A gate named as the router's own default is the "auto" gate ("tc softmax aux 0.01" is
    # "tc"), so both spellings share one key. (Runs stored before 2026-11-29 under a spelled-out
    # default gate - lf paper, tc softmax aux 0.001 / 0.1 - were trained again under the new
    # key, bitwise equal to the old runs.)
    if v.router in ROUTER_CLASSES and config["router"]["gate"] == ROUTER_CLASSES[v.router].default_gate:
        config["router"]["gate"] = "auto"
    ident = json.dumps({"seed": seed, "steps": steps, "eval_every": eval_every, "config": config},
                       sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def run_file(v: Variant, seed: int, digest: str) -> str:
    """A run's file name in the store: readable name and seed, then the digest (its key)."""
    slug = re.sub(r"[^a-z0-9]+", "-", v.name.lower()).strip("-")
    return f"{slug}-seed{seed}-{digest}.json"


def _train_job(job: tuple[Variant, int, int, int, dict[str, Any], Path | None]) -> dict[str, Any]:
    """One run in a worker process; written to the run store (atomically) when it has one."""
    v, seed, steps, eval_every, common, path = job
    r = train_one(v, seed, steps, eval_every, common)
    if path is not None:
        write_atomic(path, json.dumps({**r, "machine": machine_info()}).encode())
    return r


def summarise(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per variant: final validation loss mean and spread (half range) over seeds, and means."""
    out = []
    for name in names:
        rs = [r for r in runs if r["variant"] == name]
        losses = [r["final_val_loss"] for r in rs]
        spreads = [r["load_spread"] for r in rs]
        et_share = None
        if rs[0]["router"] == "et":  # per layer, over seeds: the extreme shares vs 1/E
            et_share = {}
            for layer in spreads[0]["layers"]:
                per_seed = [sp["layers"][layer] for sp in spreads]
                et_share[layer] = {"min": min(x["share_min"] for x in per_seed),
                                   "max": max(x["share_max"] for x in per_seed),
                                   "uniform": per_seed[0]["uniform_share"]}  # fmt: skip
        dense = rs[0]["router"] == "dense"  # no routed experts, so no fanout
        fanout = None if dense else float(np.mean([r["inference_fanout"] for r in rs]))
        out.append({
            "variant": name, "router": rs[0]["router"], "setting": rs[0]["setting"], "over": rs[0]["over"],
            "seeds": len(rs), "val_loss_mean": float(np.mean(losses)),
            "val_loss_spread": float((max(losses) - min(losses)) / 2), "val_loss_seeds": losses,
            "inference_fanout": fanout,
            "inference_val_loss_mean": float(np.mean([r["final_inference_val_loss"] for r in rs])),
            "load_max_over_mean": float(np.mean([s.get("max_over_mean", 1.0) for s in spreads])),
            "load_cv": float(np.mean([s.get("cv", 0.0) for s in spreads])),
            "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in rs])),
            "et_usage_share": et_share,
        })  # fmt: skip
    return out


def separation(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the seed spread separate the variants? Pairwise |mean diff| > sum of spreads."""
    if not summary or min(s["seeds"] for s in summary) < 2:
        return {"rule": "|mean diff| > sum of half-ranges over seeds", "pairs": [], "all_separated": None,
                "reading": "undetermined: fewer than 2 seeds, so no spread was measured"}  # fmt: skip
    pairs = []
    for a, b in itertools.combinations(summary, 2):
        diff = abs(a["val_loss_mean"] - b["val_loss_mean"])
        margin = a["val_loss_spread"] + b["val_loss_spread"]
        pairs.append({"a": a["variant"], "b": b["variant"], "abs_mean_diff": diff, "sum_spread": margin,
                      "separated": diff > margin})  # fmt: skip
    n_sep = sum(p["separated"] for p in pairs)
    reading = (f"{n_sep} of {len(pairs)} pairs separated beyond the seed spread"
               + ("" if n_sep == len(pairs) else "; the others need more steps or seeds"))  # fmt: skip
    return {"rule": "|mean diff| > sum of half-ranges over seeds", "pairs": pairs, "all_separated": n_sep == len(pairs),
            "reading": reading}  # fmt: skip


def plot(groups: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Validation loss vs step (mean over seeds), one panel per group (main set, ablations);
    `groups` maps a group to (its summary rows, its runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (gname, (summary, runs)) in zip(axes[0], groups.items(), strict=True):
        for s in summary:
            rs = [r for r in runs if r["variant"] == s["variant"]]
            steps = [c["step"] for c in rs[0]["curve"]]
            vals = np.mean([[c["val_loss"] for c in r["curve"]] for r in rs], axis=0)
            ax.plot(steps, vals, marker=".", label=f"{s['variant']} ({s['val_loss_mean']:.3f})")
        ax.set_title(gname)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def parse_list(text: str, allowed: list[str] | tuple[str, ...], what: str) -> list[str]:
    """Comma list checked against `allowed` ('all' = every one); one-line error, exit 2."""
    items = list(allowed) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        print(f"{what}: unknown {', '.join(bad)} (choose from {', '.join(allowed)} or all)", file=sys.stderr)
        raise SystemExit(2)
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 20 steps, 1 seed, 3 routers")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000; quick 20)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 2; quick 1)")
    ap.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default 100; quick 5)")
    ap.add_argument("--routers", default=None, help=f"comma list of {', '.join(ROUTERS)} (default all)")
    ap.add_argument("--ablations", default=None, help="comma list of ablation groups or 'all' (default none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default torch's; quick 1)")
    ap.add_argument("--data", default=None, help="prepared dataset folder (default: the embedded corpus)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process (default 1)")
    ap.add_argument("--runs-dir", default=None,
                    help="where finished runs are kept and reused (default benchmarks/results/quality-runs; "
                         "quick: none; 'none' keeps none)")  # fmt: skip
    args = ap.parse_args()
    steps = args.steps if args.steps is not None else (20 if args.quick else 1000)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    eval_every = args.eval_every if args.eval_every is not None else (5 if args.quick else 100)
    # 1 thread in --quick: a tiny model gains nothing from 2, and on a shared 2-core machine
    # spinning OpenMP threads made 20-step runs 50x slower (measured 2.2 s against 0.04 s a step)
    threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    checks = (("--steps", steps, 1), ("--seeds", seeds, 1), ("--eval-every", eval_every, 0), ("--threads", threads, 0),
              ("--jobs", args.jobs, 1))  # fmt: skip
    for name, val, lo in checks:
        if val < lo:
            print(f"{name}: must be >= {lo}, got {val}", file=sys.stderr)
            raise SystemExit(2)
    routers = parse_list(args.routers or ",".join(QUICK_ROUTERS if args.quick else ROUTERS), ROUTERS, "--routers")
    common: dict[str, Any] = copy.deepcopy(QUICK) if args.quick else {}
    common = merge(common, {"train": {"eval_every": 0, "progress": False, "threads": threads}})
    if args.data:
        common = merge(common, {"data": {"path": args.data}})
    try:  # bad input: one line, exit 2, before any training
        base = run_config(Variant("et", "et"), 0, common)
        groups_all = ablation_groups(base.router.et_warmup_steps)
        ablations = parse_list(args.ablations or ("et_gate" if args.quick else ""), list(groups_all), "--ablations")
        load_dataset(base)
    except (ConfigError, DataError) as e:
        print(f"quality: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    variant_sets = {"routers": main_variants(routers)} | {g: groups_all[g] for g in ablations}
    todo: dict[str, Variant] = {}
    for vs in variant_sets.values():
        for v in vs:
            todo.setdefault(v.key(), v)
    try:
        for v in todo.values():
            for seed in range(seeds):
                run_config(v, seed, common)  # every configuration valid before the first step
    except ConfigError as e:
        print(f"quality: {v.name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    store_arg = args.runs_dir or ("none" if args.quick else str(RESULTS / "quality-runs"))
    store = None if store_arg == "none" else Path(store_arg)
    if store is not None:
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"--runs-dir: cannot create {store}: {e.strerror}", file=sys.stderr)
            raise SystemExit(2) from None
    print(f"{len(todo)} configurations x {seeds} seeds x {steps} steps"
          + (f"; run store {store}" if store else ""), flush=True)  # fmt: skip
    runs_by_key: dict[str, list[dict[str, Any] | None]] = {k: [None] * seeds for k in todo}
    # the store's runs by digest (the file name's last part), read once
    in_store = {} if store is None else {f.stem.rsplit("-", 1)[-1]: f for f in store.glob("*.json")}
    jobs, stored = [], 0
    twins: dict[str, list[tuple[str, int]]] = {}  # digest -> (key, seed) of every variant it serves
    for key, v in todo.items():
        for seed in range(seeds):
            digest = run_digest(v, seed, steps, eval_every, common)
            if digest in in_store:  # the same configuration, perhaps run under another variant's name
                runs_by_key[key][seed] = {**json.loads(in_store[digest].read_text()), "variant": v.name}
                stored += 1
            elif digest in twins:  # already queued for another variant: trained once
                twins[digest].append((key, seed))
            else:
                twins[digest] = [(key, seed)]
                path = None if store is None else store / run_file(v, seed, digest)
                jobs.append((digest, (v, seed, steps, eval_every, common, path)))
    print(f"{stored} runs read from the store, {len(jobs)} to train", flush=True)

    def fanout_text(fanout: float | None) -> str:
        return "-" if fanout is None else f"{fanout:.2f}"  # None: dense, no routed experts

    def report(v: Variant, seed: int, r: dict[str, Any]) -> None:
        fanout = fanout_text(None if v.router == "dense" else r["inference_fanout"])
        print(f"{v.name:28s} seed {seed}  val {r['final_val_loss']:.4f}  inference fanout "
              f"{fanout}  load max/mean {r['load_spread'].get('max_over_mean', 1.0):.2f}  "
              f"{r['tokens_per_s']:.0f} tok/s  ({r['wall_s']:.0f} s)", flush=True)  # fmt: skip
        for w in r.get("eval_warnings", []):  # e.g. ET evaluated before its thresholds settled
            print(f"{'':28s} warning: {w}", flush=True)

    def finish(digest: str, r: dict[str, Any]) -> None:
        for key, seed in twins[digest]:
            runs_by_key[key][seed] = {**r, "variant": todo[key].name}
            report(todo[key], seed, r)

    if args.jobs == 1:
        for digest, job in jobs:
            finish(digest, _train_job(job))
    elif jobs:
        # spawn: a fresh interpreter per worker (no forked torch/numba thread state)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_train_job, job): digest for digest, job in jobs}
            for fut in concurrent.futures.as_completed(futures):
                finish(futures[fut], fut.result())
    runs = [r for rs in runs_by_key.values() for r in rs]
    results: list[dict[str, Any]] = [{"kind": "run", **r} for r in runs]
    panels: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for gname, vs in variant_sets.items():
        # a group's runs, relabelled with the group's variant names (shared runs appear in several groups)
        g_runs = [{**r, "variant": v.name} for v in vs for r in runs_by_key[v.key()]]
        summary = summarise(g_runs, [v.name for v in vs])
        panels[gname] = (summary, g_runs)
        results.append({"kind": "summary", "group": gname, "variants": summary, "separation": separation(summary)})
        print(f"-- {gname}: {results[-1]['separation']['reading']}")
        for s in summary:
            print(f"   {s['variant']:28s} val {s['val_loss_mean']:.4f} +- {s['val_loss_spread']:.4f}  "
                  f"fanout {fanout_text(s['inference_fanout'])}  "
                  f"load max/mean {s['load_max_over_mean']:.2f} "
                  f"cv {s['load_cv']:.2f}")  # fmt: skip
    config = {"quick": args.quick, "steps": steps, "seeds": seeds, "eval_every": eval_every, "routers": routers,
              "jobs": args.jobs, "threads": threads, "run_store": str(store) if store else None,
              "ablations": ablations, "data": args.data or "embedded corpus", "presets": PRESETS,
              "common_overrides": common, "load_window": f"last {TAIL:.0%} of steps",
              "spread": "half the range of the final validation loss over seeds",
              "smoke_run": args.quick}  # fmt: skip
    path = write_results("quality", config, results, [], args.quick)
    title = f"validation loss, mean of {seeds} seed(s), {steps} steps" + (" (smoke run, not a quality result)"
                                                                           if args.quick else "")  # fmt: skip
    plot(panels, path.with_suffix(".png"), title)
    print(f"-> {path}")


if __name__ == "__main__":
    main()

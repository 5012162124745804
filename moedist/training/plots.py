"""PNG plots of a run: loss curves, expert load over time, fanout histogram, time per step by span."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

from moedist.training.evaluate import EvalResult


def _layers(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k[: -len("_load")] for k in rows[0] if k.endswith("_load")}, key=lambda s: int(s[1:]))


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    steps = [r["step"] + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], lw=0.8, label="train")
    val = [(r["step"] + 1, r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(rows: list[dict[str, Any]], path: Path) -> None:
    """Per MoE layer: heat map of each expert's load / mean load over steps."""
    layers = _layers(rows)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.8 * len(layers) + 0.8), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        # The most experts the layer had (a live Scale changes the count); a skipped (non-finite)
        # step has no loads, and steps with fewer experts leave the rest blank.
        key = f"{layer}_load"
        E = max(len(r[key]) for r in rows if r.get(key) is not None)
        load_SE = np.full((len(rows), E), np.nan)
        for s, r in enumerate(rows):
            if r.get(key) is not None:
                load_SE[s, : len(r[key])] = r[key]
        known_SE = ~np.isnan(load_SE)
        mean_S1 = np.nansum(load_SE, axis=1, keepdims=True) / np.maximum(known_SE.sum(axis=1, keepdims=True), 1)
        ratio_SE = load_SE / np.maximum(mean_S1, 1e-9)
        im = ax.imshow(ratio_SE.T, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, np.nanmax(ratio_SE)),
                       extent=(1, len(rows) + 1, ratio_SE.shape[1] - 0.5, -0.5), interpolation="nearest")
        ax.set_ylabel(f"{layer}\nexpert")
        fig.colorbar(im, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("Expert load per MoE layer (tokens / mean tokens per expert)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fanout(ev: EvalResult, layer_names: list[str], path: Path) -> None:
    """Histogram of routed experts per token on the validation set under the routing inference
    uses (ET during warm-up: the thresholds' pass, not the evaluation's expert choice)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    hists = ev.inference_hist
    width = 0.8 / max(len(hists), 1)
    for i, (name, hist) in enumerate(zip(layer_names, hists, strict=True)):
        h = np.asarray(hist, dtype=np.float64)
        h = h / max(h.sum(), 1)
        last = int(np.nonzero(h)[0].max()) + 1 if h.any() else 1
        ax.bar(np.arange(last) + i * width, h[:last], width=width, label=name)
    ax.set_xlabel("routed experts per token")
    ax.set_ylabel("share of validation tokens")
    ax.set_title(f"Fanout at inference (eval mode), mean {ev.inference_fanout:.2f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Span colours: communication in reds/oranges, compute in blues/greens, bookkeeping in greys.
SPAN_COLOURS = {"data": "#bdbdbd", "router": "#6baed6", "pool": "#fd8d3c", "dispatch": "#e6550d", "expert": "#2171b5",
                "combine": "#a63603", "dense_fwd": "#74c476", "dense_bwd": "#238b45", "stats": "#969696",
                "grad_sync": "#de2d26", "optimiser": "#9e9ac8", "other": "#636363"}  # fmt: skip
MAX_WORKER_PANELS = 8


def plot_comm_vs_compute(rows: list[dict[str, Any]], path: Path) -> bool:
    """Stacked seconds per step by span, one panel per worker (the first MAX_WORKER_PANELS);
    False when the rows have no span columns (profile.spans off)."""
    from moedist.training.profile import SPAN_NAMES

    prof = [r for r in rows if r.get("span_data_s") is not None]
    if not prof:
        return False
    steps = np.array([r["step"] for r in prof])
    # Expert-parallel rows carry per-rank lists; a single-process row (also part of a run
    # resumed on one worker) is worker 0's alone.
    W = max(len(r.get("workers_step_s") or [None]) for r in prof)
    per_worker = any(r.get("workers_step_s") is not None for r in prof)
    shown = min(W, MAX_WORKER_PANELS)

    def at(r: dict[str, Any], span: str | None, w: int) -> float:
        lst = r.get(f"workers_span_{span}_s" if span else "workers_step_s")
        if lst is not None:
            return lst[w] if w < len(lst) else np.nan
        if w:
            return np.nan
        return r[f"span_{span}_s"] if span else (r.get("worker_step_s") or r["step_s"])

    fig, axes = plt.subplots(shown, 1, figsize=(9, 2.2 * shown + 1.2), squeeze=False, sharex=True, sharey=True)
    for w in range(shown):
        ax = axes[w, 0]
        sec = {s: np.array([at(r, s, w) for r in prof]) for s in SPAN_NAMES}
        step_s = np.array([at(r, None, w) for r in prof])
        title = f"worker {w}" if per_worker else "one process"
        bottom = np.zeros(len(prof))
        for s in SPAN_NAMES:
            if s == "other" and not np.nansum(sec[s]):
                continue
            ms = np.nan_to_num(sec[s]) * 1e3
            ax.bar(steps, ms, bottom=bottom, width=1.0, color=SPAN_COLOURS[s], label=s, linewidth=0)
            bottom += ms
        ax.plot(steps, step_s * 1e3, "k-", lw=0.7, label="step time")
        ax.set_ylabel(f"{title}\nms")
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel("step")
    more = f" (first {shown} of {W} workers)" if shown < W else ""
    axes[0, 0].set_title(f"Time per step by span{more}: communication red/orange, compute blue/green")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=7, fontsize=7, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_plots(run_dir: Path, rows: list[dict[str, Any]], ev: EvalResult | None) -> list[Path]:
    """Write every plot that applies to this run into RUN/plots; return the paths."""
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if rows:
        plot_loss(rows, out / "loss.png")
        written.append(out / "loss.png")
        layers = _layers(rows)
        if layers:
            plot_load(rows, out / "expert_load.png")
            written.append(out / "expert_load.png")
            if ev is not None and ev.fanout_hist:
                plot_fanout(ev, layers, out / "fanout.png")
                written.append(out / "fanout.png")
        if plot_comm_vs_compute(rows, out / "comm_vs_compute.png"):
            written.append(out / "comm_vs_compute.png")
    return written


def redraw_plots(run_dir: Path) -> list[Path]:
    """Every plot of a run folder again, from metrics.parquet and summary.json (`moedist plot`)."""
    import json

    from moedist.training.profile import read_rows

    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    ev = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        hist = json.loads(summary.read_text()).get("eval_fanout_hist")
        if hist:
            ev = EvalResult(val_loss=float("nan"), tokens=0, fanout_hist=hist)
    return write_plots(run_dir, rows, ev)

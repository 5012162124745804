"""PNG plots of a run: loss curves, expert load over time, fanout histogram."""

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
    """Histogram of routed experts per token on the validation set (eval-mode routing)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(ev.fanout_hist)
    width = 0.8 / max(n, 1)
    for i, (name, hist) in enumerate(zip(layer_names, ev.fanout_hist, strict=True)):
        h = np.asarray(hist, dtype=np.float64)
        h = h / max(h.sum(), 1)
        last = int(np.nonzero(h)[0].max()) + 1 if h.any() else 1
        ax.bar(np.arange(last) + i * width, h[:last], width=width, label=name)
    ax.set_xlabel("routed experts per token")
    ax.set_ylabel("share of validation tokens")
    ax.set_title(f"Fanout (eval mode), mean {ev.mean_fanout:.2f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    return written

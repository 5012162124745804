"""Shared helpers for benchmarks: machine facts, interleaved timing, result files.

Every benchmark writes benchmarks/results/NAME.json:
{"machine": {...}, "config": {...}, "results": [...], "targets": [{"name", "value", "op", "target", "met"}]}
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numba
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba": numba.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def interleaved_medians(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each fn `reps` times, round-robin (A B C A B C ...), so that slow phases of a
    shared, noisy machine hit every candidate alike. Returns all samples (seconds)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def target(name: str, value: float, op: str, goal: float) -> dict[str, Any]:
    """One target row; `met` is computed, never asserted."""
    met = value <= goal if op == "<=" else value >= goal
    return {"name": name, "value": value, "op": op, "target": goal, "met": bool(met)}


def write_results(name: str, config: dict[str, Any], results: list[dict[str, Any]], targets: list[dict[str, Any]],
                  quick: bool) -> Path:  # fmt: skip
    """benchmarks/results/NAME.json (NAME-quick.json for --quick runs)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}-quick.json" if quick else f"{name}.json")
    doc = {"machine": machine_info(), "config": config, "results": results, "targets": targets}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


def moedist(*args: str) -> list[str]:
    """The `moedist` command line, run by this interpreter."""
    return [sys.executable, "-m", "moedist.cli", *args]


def cluster_local(state: Path, *args: str) -> None:
    """`cluster/local ARGS --state-dir STATE`; exits with its error if it fails."""
    res = subprocess.run([sys.executable, str(ROOT / "cluster" / "local"), *args, "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"cluster/local {args[0]} failed: {res.stderr.strip()}")


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (PNG, 110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

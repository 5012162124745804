"""The step profile as an output: span columns of the metrics rows, RUN/trace.json (Chrome
trace event format, loads in ui.perfetto.dev) and the report `moedist profile RUN` prints.

Columns of a row (profile.spans on; moedist.parallel.clock says how spans are timed):

    span_<name>_s         self seconds of each part of the step (clock.SPANS), span_other_s
                          for kinds outside that list; they add up to the worker's step
                          time but for the few statements between spans
    a2a_bytes             bytes this worker sent in token exchanges (dispatch + combine,
                          forward and backward), rows to other workers only
    collectives           collectives this worker ran in the step (every kind)
    <kind>_collectives, <kind>_bytes   for pool, dispatch, combine, grad_sync, stats
    (expert-parallel runs, one row per step for all workers:)
    worker_step_s         the slowest worker's own step time (the row's step_s is the driver's)
    slowest_worker        rank with the most busy time (step time less collective time: the
                          others wait for it inside collectives)
    slowest_by_s          its busy time less the mean busy time of the other workers
    workers_step_s, workers_comm_s, workers_span_<name>_s
                          the same per rank (lists in rank order)
    comm_own_s            the communication blocks' own cost: per block (one collective
                          and the work around it, paired across workers in the order they
                          ran), the least time any worker spent in it, summed over the step;
                          the last worker to arrive at a collective waits for nobody
    workers_comm_wait_s   per rank, its time in communication blocks less comm_own_s: time
                          spent waiting for the other workers (both None when the workers'
                          block sequences differ)
The span/bytes/collective columns of an expert-parallel row are the slowest worker's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from moedist.config import ConfigError
from moedist.parallel.clock import COMM_KINDS, EXCHANGE_KINDS, SPANS, CommClock
from moedist.parallel.counting import split_wait

SPAN_NAMES = (*SPANS, "other")
SPAN_COLUMNS = tuple(f"span_{s}_s" for s in SPAN_NAMES)
COUNT_KINDS = ("pool", "dispatch", "combine", "grad_sync", "stats")
# Per-rank lists (one number per worker, rank order): plain float arrays, so parquet and the
# control API's metric streams carry them as they do the per-expert loads.
WORKER_LISTS = ("workers_step_s", "workers_comm_s", "workers_comm_wait_s",
                *(f"workers_span_{s}_s" for s in SPAN_NAMES))  # fmt: skip
WORKER_KEYS = ("worker_step_s", "slowest_worker", "slowest_by_s", "comm_own_s", *WORKER_LISTS)
# A worker's row carries its step's communication blocks [(kind, self seconds)] under this
# key to the driver, which pairs them across workers (worker_columns) and drops them.
COMM_BLOCKS_KEY = "_comm_blocks"
PROFILE_KEYS = frozenset(
    (*SPAN_COLUMNS, "a2a_bytes", "collectives", *(f"{k}_collectives" for k in COUNT_KINDS),
     *(f"{k}_bytes" for k in COUNT_KINDS), *WORKER_KEYS)
)  # fmt: skip


class ProfileError(ConfigError):
    """A run folder `moedist profile` / `moedist plot` cannot read (bad input: exit status 2)."""


# ----------------------------------------------------------------------------- worker side


def step_columns(seconds: dict[str, float], colls: dict[str, int], nbytes: dict[str, int]) -> dict[str, Any]:
    """A worker's profile columns of one step, from its clock's totals."""
    row: dict[str, Any] = {f"span_{s}_s": float(seconds.get(s, 0.0)) for s in SPANS}
    row["span_other_s"] = float(sum(v for k, v in seconds.items() if k not in SPANS))
    row["a2a_bytes"] = int(sum(nbytes.get(k, 0) for k in EXCHANGE_KINDS))
    row["collectives"] = int(sum(colls.values()))
    for k in COUNT_KINDS:
        row[f"{k}_collectives"] = int(colls.get(k, 0))
        row[f"{k}_bytes"] = int(nbytes.get(k, 0))
    return row


def comm_seconds(seconds: dict[str, float]) -> dict[str, float]:
    """The legacy communication columns (a2a_s, pool_s, grad_sync_s, comm_s) of a step."""
    return {"a2a_s": sum(seconds.get(k, 0.0) for k in EXCHANGE_KINDS), "pool_s": seconds.get("pool", 0.0),
            "grad_sync_s": seconds.get("grad_sync", 0.0), "comm_s": sum(seconds.get(k, 0.0) for k in COMM_KINDS)}


def step_events(clock: CommClock, t0: float, t1: float, wall_offset: float) -> list[list[Any]]:
    """The traced step's events [name, start us (wall clock), duration us, bytes, collectives],
    the whole step first."""
    out = [["step", (t0 + wall_offset) * 1e6, (t1 - t0) * 1e6, 0, 0]]
    for kind, a, b, nbytes, colls in clock.take_events():
        out.append([kind, (a + wall_offset) * 1e6, (b - a) * 1e6, nbytes, colls])
    return out


def wall_offset() -> float:
    """time.time() - time.perf_counter(): turns this process's perf_counter into wall time,
    so the tracks of workers on different nodes line up (to the nodes' clock sync)."""
    return time.time() - time.perf_counter()


# ----------------------------------------------------------------------------- driver side


def worker_columns(rows: list[dict[str, Any]], blocks: list[list[tuple[str, float]] | None] | None = None
                   ) -> dict[str, Any]:  # fmt: skip
    """The profile columns of a step run by len(rows) workers (rows in rank order): the
    slowest worker's spans, bytes and collectives, who it was, by how much, every worker's
    spans, and (given every worker's communication blocks, rank order; a worker that sent
    none leaves the split empty) their time in collectives split into own cost and waiting."""
    busy = [r["step_s"] - r.get("comm_s", 0.0) for r in rows]
    slow = int(np.argmax(busy))
    others = [b for i, b in enumerate(busy) if i != slow]
    out = {k: rows[slow][k] for k in PROFILE_KEYS if k in rows[slow] and k not in WORKER_KEYS}
    out["worker_step_s"] = rows[slow]["step_s"]
    out["slowest_worker"] = slow
    out["slowest_by_s"] = busy[slow] - float(np.mean(others)) if others else 0.0
    out["workers_step_s"] = [r["step_s"] for r in rows]
    out["workers_comm_s"] = [r.get("comm_s", 0.0) for r in rows]
    for s in SPAN_NAMES:
        out[f"workers_span_{s}_s"] = [r[f"span_{s}_s"] for r in rows]
    split = split_wait(blocks) if blocks and len(blocks) == len(rows) and all(blocks) else None
    out["comm_own_s"] = split["cost_s"] if split else None
    out["workers_comm_wait_s"] = [float(w) for w in split["wait_s"]] if split else None
    return out


def chrome_trace(traces: dict[int, dict[int, list[list[Any]]]], names: dict[int, str]) -> dict[str, Any]:
    """Chrome trace event JSON of {step: {rank: events}}: one process (track) per worker,
    complete ("X") events, microseconds from the first event."""
    events: list[dict[str, Any]] = []
    ranks = sorted({r for per in traces.values() for r in per})
    t_min = min((e[1] for per in traces.values() for evs in per.values() for e in evs), default=0.0)
    for rank in ranks:
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": names.get(rank, f"worker {rank}")}})  # fmt: skip
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "step"}})
    body = []
    for step in sorted(traces):
        for rank, evs in traces[step].items():
            for name, ts, dur, nbytes, colls in evs:
                args: dict[str, Any] = {"step": step}
                if colls:
                    args.update(bytes=int(nbytes), collectives=int(colls))
                body.append({"name": name if name != "step" else f"step {step}",
                             "cat": "comm" if name in COMM_KINDS else "step" if name == "step" else "compute",
                             "ph": "X", "ts": round(ts - t_min, 3), "dur": round(max(dur, 0.0), 3), "pid": rank,
                             "tid": 0, "args": args})  # fmt: skip
    # Parents before children that start at the same microsecond (nesting is by time).
    body.sort(key=lambda e: (e["pid"], e["ts"], -e["dur"]))
    return {"traceEvents": events + body, "displayTimeUnit": "ms",
            "otherData": {"steps": sorted(traces), "workers": len(ranks)}}  # fmt: skip


def write_trace(run_dir: Path, traces: dict[int, dict[int, list[list[Any]]]], names: dict[int, str]) -> Path | None:
    """RUN/trace.json from the traced steps' events (nothing traced: nothing written, so a
    resumed run keeps the trace of its first part)."""
    if not traces:
        return None
    from moedist.training.trainer import write_atomic

    path = Path(run_dir) / "trace.json"
    write_atomic(path, json.dumps(chrome_trace(traces, names)).encode())
    return path


# ----------------------------------------------------------------------------- report


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows of a run folder that has a profile (ProfileError otherwise)."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ProfileError(f"'{run_dir}' is not a run folder (no such directory)")
    path = run_dir / "metrics.parquet"
    if not path.is_file():
        raise ProfileError(f"'{run_dir}' is not a run folder with metrics (no metrics.parquet)")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # a truncated or foreign file
        raise ProfileError(f"'{path}' cannot be read: {type(e).__name__}: {e}") from None


def _p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95)) if xs else 0.0


def profile_report(rows: list[dict[str, Any]], skip: int = 1) -> dict[str, Any]:
    """Where the steps' time went (see `format_report`). The first `skip` steps of the rows
    (kernel compilation, cold caches) are left out while more steps remain."""
    prof = [r for r in rows if r.get("span_data_s") is not None and not r.get("skipped")]
    if not prof:
        raise ProfileError("the run has no span columns (trained with profile.spans = false, or before "
                           "moedist recorded them)")  # fmt: skip
    first = min(r["step"] for r in prof)
    kept = [r for r in prof if r["step"] >= first + skip] or prof
    # Expert-parallel rows (a resumed run may mix them with single-process ones)
    dist = any(r.get("worker_step_s") is not None for r in kept)
    step_s = [r["step_s"] for r in kept]
    parts: list[dict[str, Any]] = []

    def part(name: str, secs: list[float]) -> None:
        shares = [s / t for s, t in zip(secs, step_s, strict=True) if t > 0]
        parts.append({"span": name, "mean_s": float(np.mean(secs)), "p95_s": _p95(secs),
                      "share": float(np.mean(shares)) if shares else 0.0, "p95_share": _p95(shares)})  # fmt: skip

    for s in SPAN_NAMES:
        secs = [r[f"span_{s}_s"] for r in kept]
        if s != "other" or any(secs):
            part(s, secs)
    inner = [r.get("worker_step_s") or r["step_s"] for r in kept]
    part("unaccounted", [t - sum(r[c] for c in SPAN_COLUMNS) for r, t in zip(kept, inner, strict=True)])
    if dist:
        part("driver", [r["step_s"] - (r.get("worker_step_s") or r["step_s"]) for r in kept])
    exch_s = sum(r[f"span_{k}_s"] for r in kept for k in ("dispatch", "combine"))
    exch_b = sum(r["a2a_bytes"] for r in kept)
    kinds = {k: {"collectives": float(np.mean([r[f"{k}_collectives"] for r in kept])),
                 "bytes": float(np.mean([r[f"{k}_bytes"] for r in kept]))} for k in COUNT_KINDS}  # fmt: skip
    out: dict[str, Any] = {
        "steps": [kept[0]["step"], kept[-1]["step"]],
        "n_steps": len(kept),
        "step_s": float(np.mean(step_s)),
        "step_p95_s": _p95(step_s),
        "spans": parts,
        "a2a_bytes_per_step": float(np.mean([r["a2a_bytes"] for r in kept])),
        "collectives_per_step": float(np.mean([r["collectives"] for r in kept])),
        "kinds": kinds,
        "exchange_s_per_step": exch_s / len(kept),
        "exchange_bandwidth_Bps": exch_b / exch_s if exch_s > 0 else None,
        "workers": 1,
    }
    if dist:
        ranks = [r.get("slowest_worker") or 0 for r in kept]
        W = max(max(len(r.get("workers_step_s") or []) for r in kept), max(ranks) + 1)
        counts = np.bincount(ranks, minlength=W)
        by = [r.get("slowest_by_s") or 0.0 for r in kept]
        by_share = [b / t for b, t in zip(by, step_s, strict=True) if t > 0]
        split = [r for r in kept if r.get("comm_own_s") is not None and r.get("workers_comm_wait_s")]
        if split:
            waits = np.array([r["workers_comm_wait_s"] for r in split if len(r["workers_comm_wait_s"]) == W])
            own = [r["comm_own_s"] for r in split]
            most = [max(r["workers_comm_wait_s"]) for r in split]
            out["comm_split"] = {"steps": len(split), "own_s": float(np.mean(own)), "own_p95_s": _p95(own),
                                 "most_wait_s": float(np.mean(most)), "most_wait_p95_s": _p95(most),
                                 "wait_s_by_worker": waits.mean(0).tolist() if len(waits) else []}  # fmt: skip
        out.update(workers=W, slowest_worker=int(np.argmax(counts)),
                   slowest_share_of_steps=float(counts.max() / len(kept)), slowest_by_s=float(np.mean(by)),
                   slowest_by_p95_s=_p95(by),
                   slowest_by_share=float(np.mean(by_share)) if by_share else 0.0)  # fmt: skip
    return out


def _bytes_text(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(rep: dict[str, Any]) -> str:
    """The table `moedist profile` prints."""
    a, b = rep["steps"]
    who = "slowest worker per step" if rep["workers"] > 1 else "one process"
    lines = [f"steps {a}-{b} ({rep['n_steps']} steps), {rep['workers']} worker(s), spans of the {who}",
             f"step time: mean {rep['step_s'] * 1e3:.1f} ms, p95 {rep['step_p95_s'] * 1e3:.1f} ms", "",
             f"{'span':<12} {'mean ms':>9} {'p95 ms':>9} {'share':>7} {'p95 share':>10}"]  # fmt: skip
    for p in rep["spans"]:
        lines.append(f"{p['span']:<12} {p['mean_s'] * 1e3:>9.2f} {p['p95_s'] * 1e3:>9.2f} {p['share']:>7.1%} "
                     f"{p['p95_share']:>10.1%}")  # fmt: skip
    lines += ["", f"{'collectives':<12} {'per step':>9} {'bytes/step':>12}"]
    for k, v in rep["kinds"].items():
        lines.append(f"{k:<12} {v['collectives']:>9.1f} {_bytes_text(v['bytes']):>12}")
    lines.append(f"{'all kinds':<12} {rep['collectives_per_step']:>9.1f}")
    bw = rep["exchange_bandwidth_Bps"]
    lines += ["", f"token exchange: {_bytes_text(rep['a2a_bytes_per_step'])} sent per step in "
                  f"{rep['exchange_s_per_step'] * 1e3:.2f} ms: "
                  + (f"{_bytes_text(bw)}/s achieved" if bw else "no exchange (one worker)")]  # fmt: skip
    if rep["workers"] > 1:
        lines.append(f"slowest worker: rank {rep['slowest_worker']} (slowest in {rep['slowest_share_of_steps']:.0%} of "
                     f"steps); the slowest worker of a step is busy {rep['slowest_by_s'] * 1e3:.2f} ms longer than "
                     f"the mean of the others ({rep['slowest_by_share']:.1%} of the step; p95 "
                     f"{rep['slowest_by_p95_s'] * 1e3:.2f} ms)")  # fmt: skip
    cs = rep.get("comm_split")
    if cs:
        by = ", ".join(f"rank {i} {w * 1e3:.2f}" for i, w in enumerate(cs["wait_s_by_worker"]))
        lines.append(f"communication per step: own cost {cs['own_s'] * 1e3:.2f} ms (p95 {cs['own_p95_s'] * 1e3:.2f}), "
                     f"waiting for other workers up to {cs['most_wait_s'] * 1e3:.2f} ms "
                     f"(p95 {cs['most_wait_p95_s'] * 1e3:.2f}); mean wait ms by worker: {by}")  # fmt: skip
    return "\n".join(lines)

"""What do clients streaming metrics from the control API cost a running job?

A tiny single-process run (the control server in its process, as `moedist train` has it)
alternates phases of STEPS steps: no client, then CLIENTS clients following
StreamMetrics (each on its own connection, all in one separate client process, as
`moedist ctl metrics --follow` would be), then no client again, and so on, ROUNDS times
each, so that the slow moments of a shared machine hit both alike. The time per step is
the wall clock from one step boundary to the next (the step itself, its row going to the
subscribers, the control hooks); the first steps of each phase (clients connecting or
leaving) are left out. The clients count the rows they receive, to show that they kept up.

    python benchmarks/control_stream.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import target, write_results

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "seq_len": 64, "n_experts": 8},
         "train": {"batch_size": 8, "eval_every": 0, "checkpoint_every": 0, "eval_tokens": 1024,
                   "progress": False}}  # fmt: skip
SKIP = 2  # steps left out at the start of each phase
TARGET_RATIO = 1.10  # 10 streaming clients cost at most 10% of the step time


def client_main(run: str, n: int) -> None:
    """The client process: `n` threads following StreamMetrics; prints their row counts on SIGTERM."""
    sys.path.insert(0, str(ROOT))
    from moedist.control.client import Client
    from moedist.control.v1 import control_pb2 as pb

    counts = [0] * n
    done = threading.Event()

    def follow(i: int) -> None:
        c = Client.for_run(Path(run))
        from_step = c.call("GetStatus", pb.GetStatusRequest()).step
        try:
            for _ in c.stream(pb.StreamMetricsRequest(from_step=from_step, follow=True)):
                counts[i] += 1
        except Exception:  # cancelled at exit
            pass

    signal.signal(signal.SIGTERM, lambda *a: done.set())
    for i in range(n):
        threading.Thread(target=follow, args=(i,), daemon=True).start()
    while not done.wait(0.2):  # short waits: the SIGTERM handler runs between them
        pass
    print(json.dumps(counts), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--client", nargs=2, metavar=("RUN", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client_main(args.client[0], int(args.client[1]))

    import torch

    from moedist.config import build_config
    from moedist.control.server import serve
    from moedist.training.loop import single_process_loop

    torch.set_num_threads(1)  # one core for training, the other for the clients
    steps, rounds = (8, 2) if args.quick else (15, 4)
    phases = [c for _ in range(rounds) for c in (0, args.clients)]
    warm = 3
    total = warm + len(phases) * steps
    cfg = build_config("tiny", None, {**MODEL, "train": {**MODEL["train"], "steps": total}})
    run = Path(tempfile.mkdtemp(prefix="moedist-bench-ctl-")) / "run"
    loop = single_process_loop(cfg, run)

    times: dict[int, list[float]] = {0: [], args.clients: []}
    received: list[list[int]] = []
    state = {"t": None, "proc": None}

    def n_subs() -> int:
        return len(hub._subs)

    def at_boundary(lp) -> None:
        now = time.perf_counter()
        done = lp.step
        if state["t"] is not None and done > warm:
            phase = (done - 1 - warm) // steps
            if (done - 1 - warm) % steps >= SKIP:
                times[phases[phase]].append(now - state["t"])
        if done >= warm and (done - warm) % steps == 0 and done < total:  # a phase starts
            proc = state["proc"]
            if proc is not None:  # end the clients of the previous phase
                proc.send_signal(signal.SIGTERM)
                received.append(json.loads(proc.communicate(timeout=60)[0]))
                state["proc"] = None
                while n_subs():
                    time.sleep(0.01)
            n = phases[(done - warm) // steps]
            if n:
                state["proc"] = subprocess.Popen([sys.executable, __file__, "--client", str(run), str(n)],
                                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
                deadline = time.monotonic() + 60
                while n_subs() < n:
                    if time.monotonic() > deadline:
                        raise SystemExit("the clients did not subscribe within 60 s")
                    time.sleep(0.01)
        state["t"] = time.perf_counter()  # waiting for clients above is not a step's time

    with serve(loop, "127.0.0.1", 0) as server:
        hub = server.hub
        loop.on_boundary.append(at_boundary)
        t0 = time.perf_counter()
        loop.run()
        wall = time.perf_counter() - t0
    if state["proc"] is not None:  # the last phase's clients: their streams ended with the run
        state["proc"].send_signal(signal.SIGTERM)
        received.append(json.loads(state["proc"].communicate(timeout=60)[0]))

    shutil.rmtree(run.parent, ignore_errors=True)  # the run folder is scratch

    base, with_c = times[0], times[args.clients]
    med0, med1 = statistics.median(base), statistics.median(with_c)
    ratio = med1 / med0
    results = [
        {"clients": 0, "median_step_ms": med0 * 1e3, "mean_step_ms": statistics.mean(base) * 1e3, "steps": len(base),
         "samples_s": base},
        {"clients": args.clients, "median_step_ms": med1 * 1e3, "mean_step_ms": statistics.mean(with_c) * 1e3,
         "steps": len(with_c), "samples_s": with_c, "rows_received_per_client_per_phase": received,
         "rows_per_phase": steps},
    ]  # fmt: skip
    targets = [target(f"step time with {args.clients} streaming clients / without", ratio, "<=", TARGET_RATIO)]
    config = {"model": MODEL, "steps_per_phase": steps, "rounds": rounds, "skipped_per_phase": SKIP,
              "clients": args.clients, "torch_threads": 1, "wall_s": wall}  # fmt: skip
    path = write_results("control_stream", config, results, targets, args.quick)
    print(f"step {med0 * 1e3:.1f} ms without clients, {med1 * 1e3:.1f} ms with {args.clients} streaming "
          f"(x{ratio:.3f}); rows received per client and phase: {received}; {wall:.0f} s -> {path}")


if __name__ == "__main__":
    main()

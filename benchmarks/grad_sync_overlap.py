"""Exposed dense-gradient sync with and without [comm] overlap_grad_sync.

Two gloo processes on loopback (one thread each) hold two Trainers of the same model and
data, one per mode, and step them alternately (plain, overlapped, plain, ...) so a busy
machine slows both alike. Per step each worker records step_s and the clock's grad_sync_s:
plain, the whole sync_gradients after backward; overlapped, only the wait at the end for
the all-reduces still running (the part the backward pass did not hide). Reported: medians
over the steps after warm-up (the slower worker of each step), exposed sync before/after,
and the step time change. The two modes train bitwise the same numbers (checked here too).

    python benchmarks/grad_sync_overlap.py [--quick] [--steps N] [--d-model D]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import target, write_results


def job_cfg(args, overlap: bool):
    from moedist.config import build_config

    over = {
        "model": {"d_model": args.d_model, "n_heads": 4, "n_layers": args.layers, "seq_len": 64, "n_experts": 8},
        "router": {"kind": "tc", "top_k": 2},
        "train": {"batch_size": 16, "eval_every": 0, "progress": False, "threads": 1, "warmup_steps": 0},
        "comm": {"overlap_grad_sync": overlap},
        "workers": 2,
    }
    return build_config("tiny", None, over)


def worker(rank: int, port: int, args, out) -> None:
    import torch.distributed as dist

    from moedist.parallel.placement import ExpertPlacement
    from moedist.training.trainer import DistContext, Trainer, load_dataset

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # this benchmark's processes only: loopback
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    trainers = {}
    for overlap in (False, True):
        cfg = job_cfg(args, overlap)
        trainers[overlap] = Trainer(cfg, load_dataset(cfg), DistContext(rank, 2, ExpertPlacement(8, 2)))
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for step in range(args.steps):
        for overlap in (False, True) if step % 2 == 0 else (True, False):
            rows[overlap].append(trainers[overlap].train_step())
    same = all(a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
               for a, b in zip(rows[False], rows[True], strict=True))  # fmt: skip
    n_dense = sum(b.n for b in trainers[True].grad_sync.buckets)
    out.put((rank, rows, same, n_dense, len(trainers[True].grad_sync.buckets)))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model, 6 steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    args.steps = args.steps or (6 if args.quick else 20)
    args.d_model = args.d_model or (64 if args.quick else 256)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get() for _ in procs)
    for p in procs:
        p.join()
    res = {"d_model": args.d_model, "layers": args.layers, "steps": args.steps, "warmup": args.warmup,
           "dense_params": got[0][3], "buckets": got[0][4], "bitwise_equal": all(g[2] for g in got)}  # fmt: skip
    for overlap, name in ((False, "plain"), (True, "overlap")):
        per_step = list(zip(*(g[1][overlap] for g in got), strict=True))[args.warmup :]  # rows of both ranks
        for key in ("step_s", "grad_sync_s", "a2a_s"):
            res[f"{name}_{key}"] = statistics.median(max(r[key] for r in rows) for rows in per_step)
    res["exposed_sync_ratio"] = res["overlap_grad_sync_s"] / res["plain_grad_sync_s"]
    res["step_ratio"] = res["overlap_step_s"] / res["plain_step_s"]
    print(f"d_model {args.d_model}, {args.layers} layers, {res['dense_params'] / 1e6:.2f} M dense params in "
          f"{res['buckets']} buckets; bitwise equal: {res['bitwise_equal']}")  # fmt: skip
    for name in ("plain", "overlap"):
        print(f"{name:>8}: step {res[f'{name}_step_s'] * 1e3:7.1f} ms  exposed grad sync "
              f"{res[f'{name}_grad_sync_s'] * 1e3:6.1f} ms  a2a {res[f'{name}_a2a_s'] * 1e3:6.1f} ms")  # fmt: skip
    print(f"exposed sync overlap/plain {res['exposed_sync_ratio']:.3f}, "
          f"step time overlap/plain {res['step_ratio']:.3f}")
    targets = [target("exposed grad sync overlap/plain", res["exposed_sync_ratio"], "<=", 0.5),
               target("step time overlap/plain", res["step_ratio"], "<=", 1.0),
               target("bitwise equal", float(res["bitwise_equal"]), ">=", 1.0)]  # fmt: skip
    write_results("grad_sync_overlap", vars(args), [res], targets, args.quick)


if __name__ == "__main__":
    main()

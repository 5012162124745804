"""Token exchange of one MoE layer (dispatch + combine, forward and backward) against what the
machine allows: a raw all_to_all_single of the same byte matrix, memcpy of the same bytes,
and the obvious Ray-only design; each optimisation of the dispatcher (dedup, bf16 on the
wire) on and off.

Workers are Ray actors on a 2-node local Ray cluster (raylets on 127.0.0.2 and 127.0.0.3,
free ports, stopped at the end), rank r on node r % 2, one torch thread each, in one gloo
group bound to their node addresses (moedist's own group set-up). Candidates, each timed
inside the workers, every rep starting at a barrier, the max over workers per rep, the median
over reps; candidates interleaved rep by rep so a noisy phase hits them alike:

  dispatch[_dedup][_bf16]  AllToAllDispatcher forward + backward (x and gate grads) with
                           identity experts, so only moving rows (and the gate math) is timed
  dispatch_plan_counts     the plain dispatcher with ``[comm] plan_counts``: the plan carries
                           every worker's counts (as ET's guard, EC and TC's capacity give
                           them), so no counts exchange precedes the rows
  raw[_dedup][_bf16]       the same byte matrix as 4 bare all_to_all_single calls (rows out,
                           results back, and both again in backward): the exchange floor
  raw_fresh                raw, receiving into new buffers each call as the dispatcher does
                           (their first touch page-faults inside the collective)
  NAME:a2a                 of a dispatch candidate, the seconds inside its collectives (the
                           rest is sorting, gathers, reordering, combine and their backward)
  memcpy                   one torch copy of the bytes a worker sends in a plain fwd+bwd, all
                           workers at once (the bandwidth a shared-memory path could reach)
  shm                      dispatch through moedist.parallel.exchange's shared-memory path
                           (``[comm] shm``: shared memory within a node, gloo between the
                           nodes) when ``--shm`` is given; the workers' two nodes as placed,
                           so at 2 workers every row crosses nodes through gloo
  shm_node                 the same with every worker named on one node: the two raylets
                           run on one machine and share its /dev/shm, so this is the path
                           inside a node (what a node with W workers gets), all rows through
                           shared memory
  layer                    AllToAllDispatcher with real experts (relu^2 MLPs D -> F=D -> D,
                           moedist's GroupedExperts), forward + backward: the exchange next to
                           the compute it can overlap with
  layer_overlapC           the same with ``[comm] overlap_chunks = C``: the exchange in C chunks
                           of each worker's experts, async, pipelined with the experts
  local_work               the dispatcher's own passes over the rows with no exchange: the
                           gather of the rows out, the gated combine, and their backward
                           (raw + local_work is the dispatcher's floor when its own work
                           cannot overlap the exchange, as on 2 busy cores)
  experts_only             those experts' forward + backward on the rows the worker receives,
                           no exchange (the compute floor of the layer)
  ray_objects              (timed by the driver) each worker ships each destination's rows as a
                           Ray object to the owning actor, which runs the experts and ships the
                           results back the same way; run twice (forward and backward move the
                           same bytes)

The routing plan is ET-like with a variable fanout: logits r_te = s_t + z_te with a per-token
offset s_t ~ N(0, spread^2) (some tokens clear many experts' cutoffs, some none, as in a
trained ET router whose fanout follows token difficulty) and noise z_te ~ N(0, 1); each expert
takes its k = T * top_k / E largest logits (ET's balanced cutoff), gates sigmoid(r). The JSON
gives the fanout histogram, and the rows dedup saves by fanout for several mean fanouts.

Workers run with ``train.keep_heap`` as training workers do by default (``--keep-heap off``
for glibc's defaults, under which every fresh buffer of 32 MB or more page-faults).

    python benchmarks/dispatch.py [--quick] [--shm] [--reps R] [--keep-heap on|off]
"""

from __future__ import annotations

import argparse
import inspect
import socket
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, save_figure, target, write_results

from moedist.kernels.dispatch import unique_pairs
from moedist.model.experts import GroupedExperts
from moedist.parallel.alltoall import AllToAllDispatcher
from moedist.parallel.clock import CommClock
from moedist.parallel.placement import ExpertPlacement
from moedist.routing.base import RoutingPlan

NODES = ("127.0.0.2", "127.0.0.3")
OVERLAP_CHUNKS = (2, 4, 8)
VARIANTS = {"": (False, "float32"), "_dedup": (True, "float32"), "_bf16": (False, "bfloat16"),
            "_dedup_bf16": (True, "bfloat16")}  # fmt: skip


def et_plan(rank: int, T: int, E: int, top_k: int, spread: float, seed: int = 0) -> RoutingPlan:
    """An ET-like plan of T tokens with variable fanout (module docstring)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    r_TE = torch.randn(T, 1, generator=g) * spread + torch.randn(T, E, generator=g)
    k = max(1, T * top_k // E)
    cut_E = r_TE.topk(k, dim=0).values[-1]
    token_A, expert_A = (r_TE >= cut_E).nonzero().unbind(1)
    return RoutingPlan(token_A, expert_A, torch.sigmoid(r_TE[token_A, expert_A]), T, E)


def dedup_by_fanout(plans: list[RoutingPlan], placement: ExpertPlacement) -> dict[int, dict[str, int]]:
    """Per fanout f: assignments (rows of the plain path) and (token, worker) pairs (rows with
    dedup) of the tokens routed to f experts."""
    owner_E = torch.tensor(placement.owner_E)
    out: dict[int, dict[str, int]] = {}
    for plan in plans:
        fan_T = plan.fanout_T
        token_U = unique_pairs(plan.token_idx_A, owner_E[plan.expert_idx_A], plan.n_tokens,
                               placement.world_size)[1]  # fmt: skip
        a_F = torch.bincount(fan_T[plan.token_idx_A], minlength=placement.n_experts + 1)
        u_F = torch.bincount(fan_T[token_U], minlength=placement.n_experts + 1)
        for f in range(1, placement.n_experts + 1):
            if int(a_F[f]):
                row = out.setdefault(f, {"assignments": 0, "pairs": 0})
                row["assignments"] += int(a_F[f])
                row["pairs"] += int(u_F[f])
    return dict(sorted(out.items()))


class _Identity(torch.nn.Module):
    """Experts that cost nothing (identity): the benchmark times moving rows, not GEMMs."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts

    def forward(self, x_AD: torch.Tensor, counts_L: list[int]) -> torch.Tensor:
        return x_AD

    def forward_segments(self, x_AD: torch.Tensor, experts_S: list[int], sizes_S: list[int]) -> torch.Tensor:
        return x_AD  # rows where they arrived, as GroupedExperts runs them


@ray.remote(num_cpus=0)
class Worker:
    """One rank: its plan, its rows, the candidates (module docstring)."""

    def __init__(self, rank: int, world: int, node: str, heap: bool = True):
        import numba

        from moedist.training.heap import keep_heap

        torch.set_num_threads(1)
        numba.set_num_threads(1)
        if heap:  # as a training worker does by default (train.keep_heap): fresh buffers are reused heap
            keep_heap()
        self.rank, self.world, self.node = rank, world, node
        self._listen = None

    def open_port(self) -> int:
        from moedist.parallel.group import listen_socket

        self._listen = listen_socket(self.node, 0)
        return self._listen.getsockname()[1]

    def setup(self, port: int, T: int, D: int, E: int, top_k: int, spread: float, shm: bool) -> dict:
        from moedist.parallel.group import init_group

        init_group(self.rank, self.world, NODES[0], port, self.node, backend="gloo", timeout_s=600,
                   listen=self._listen)  # fmt: skip
        W = self.world
        self.P = ExpertPlacement(E, W)
        self.plan = et_plan(self.rank, T, E, top_k, spread)
        g = torch.Generator().manual_seed(self.rank + 77)
        self.x_TD = torch.randn(T, D, generator=g)
        self.grad_TD = torch.randn(T, D, generator=g)
        self.experts = _Identity(self.P.n_local(self.rank))
        self.fns = {}
        has_shm = "exchange" in inspect.signature(AllToAllDispatcher.__init__).parameters
        bytes_fwd = {}
        self.clocks = {}
        # Every worker's counts per expert, as a router's own collective would give them.
        import torch.distributed as dist

        load_E = torch.bincount(self.plan.expert_idx_A, minlength=E)
        parts = [torch.empty_like(load_E) for _ in range(W)]
        dist.all_gather(parts, load_E)
        self.counts_WE = torch.stack(parts)
        self._candidate("dispatch_plan_counts", AllToAllDispatcher(self.P, plan_counts=True), plan_counts=True)
        for suffix, (dedup, wire) in VARIANTS.items():
            disp = self._candidate("dispatch" + suffix, AllToAllDispatcher(self.P, dedup=dedup, wire_dtype=wire))
            self.fns["raw" + suffix] = self._raw_fn(dedup, getattr(torch, wire))
            bytes_fwd[suffix] = disp.fwd_bytes_sent  # counted in the warm-up call
        self.fns["raw_fresh"] = self._raw_fn(False, torch.float32, fresh=True)
        # Real experts: the plain exchange and the pipelined one next to their compute.
        L = self.P.n_local(self.rank)
        torch.manual_seed(self.rank)
        self.real = GroupedExperts(L, D, D, activation="relu2")
        for C in (1, *OVERLAP_CHUNKS):
            if max(self.P.n_local(w) for w in range(W)) < C:
                continue
            name = "layer" if C == 1 else f"layer_overlap{C}"
            self._candidate(name, AllToAllDispatcher(self.P, overlap_chunks=C), experts=self.real)
        counts = self._received_counts()
        x_RD = torch.randn(sum(counts), D, requires_grad=True)
        grad_RD = torch.randn(sum(counts), D)
        self.fns["experts_only"] = lambda: self.real(x_RD, counts).backward(grad_RD)
        self.fns["local_work"] = self._local_work
        if shm and has_shm:
            from moedist.parallel.exchange import make_exchange

            # shm: shared memory between the workers of a node as placed, gloo between the
            # nodes; shm_node: every worker named on one node (module docstring)
            for name, nodes in (("shm", [NODES[r % 2] for r in range(W)]), ("shm_node", [NODES[0]] * W)):
                self._candidate(name, AllToAllDispatcher(self.P, exchange=make_exchange(None, nodes, shm=True)))
        n = 2 * bytes_fwd[""] // 4  # float32 elements a worker sends in a plain fwd + bwd
        src, dst = torch.randn(n), torch.empty(n)
        self.fns["memcpy"] = lambda: dst.copy_(src)
        return {"bytes_fwd_bwd": {k: 2 * v for k, v in bytes_fwd.items()}, "shm": bool(shm and has_shm),
                "assignments": int(self.plan.token_idx_A.numel()), "fanout_T": self.plan.fanout_T.tolist()}  # fmt: skip

    def _candidate(self, name: str, disp: AllToAllDispatcher, **kw: Any) -> AllToAllDispatcher:
        """Time `disp` as candidate `name` (`_dispatch` with `kw`) on a clock of its own,
        after one untimed call (warm-up: compiles kernels, maps shared-memory segments,
        counts the bytes sent)."""
        self._dispatch(disp, **kw)
        self.fns[name] = lambda: self._dispatch(disp, **kw)
        disp.clock = self.clocks[name] = CommClock()
        return disp

    def _dispatch(self, disp: AllToAllDispatcher, experts=None, plan_counts: bool = False) -> None:
        p = self.plan
        x_TD = self.x_TD.detach().requires_grad_()
        plan = RoutingPlan(p.token_idx_A, p.expert_idx_A, p.weight_A.detach().requires_grad_(), p.n_tokens,
                           p.n_experts, rank_counts_WE=self.counts_WE if plan_counts else None)  # fmt: skip
        disp(x_TD, plan, self.experts if experts is None else experts).backward(self.grad_TD)

    def _local_work(self) -> None:
        """gather_rows + combine, forward and backward, on this worker's assignments."""
        from moedist.kernels.dispatch import combine, gather_rows

        p = self.plan
        x_TD = self.x_TD.detach().requires_grad_()
        w_A = p.weight_A.detach().requires_grad_()
        combine(gather_rows(x_TD, p.token_idx_A), w_A, p.token_idx_A, p.n_tokens).backward(self.grad_TD)

    def _received_counts(self) -> list[int]:
        """Rows this worker's local experts receive from all workers (a collective)."""
        import torch.distributed as dist

        P, W = self.P, self.world
        slot_E = torch.tensor(P.slot_E())
        counts_S = torch.bincount(slot_E[self.plan.expert_idx_A], minlength=P.n_experts)
        L = P.n_local(self.rank)
        recv_WL = torch.empty(W * L, dtype=counts_S.dtype)
        dist.all_to_all_single(recv_WL, counts_S, [L] * W, [P.n_local(w) for w in range(W)])
        return recv_WL.view(W, L).sum(0).tolist()

    def _raw_fn(self, dedup: bool, wire: torch.dtype, fresh: bool = False):
        """4 bare all_to_all_single calls of the byte matrix the dispatcher moves (`fresh`:
        into new receive buffers each call, as the dispatcher does, not reused ones)."""
        import torch.distributed as dist

        P, W, p = self.P, self.world, self.plan
        owner_E = torch.tensor(P.owner_E)
        dest_A = owner_E[p.expert_idx_A]
        if dedup:
            send_W = unique_pairs(p.token_idx_A, dest_A, p.n_tokens, W)[2]
        else:
            send_W = torch.bincount(dest_A, minlength=W)
        recv_W = torch.empty_like(send_W)
        dist.all_to_all_single(recv_W, send_W)
        send, recv = send_W.tolist(), recv_W.tolist()
        D = self.x_TD.shape[1]
        width = D + (-(-max(P.n_local(w) for w in range(W)) * 4 // wire.itemsize) if dedup else 0)
        a_out, a_in = torch.randn(sum(send), width).to(wire), torch.empty(sum(recv), width, dtype=wire)
        b_out, b_in = torch.randn(sum(recv), D).to(wire), torch.empty(sum(send), D, dtype=wire)

        def run() -> None:
            for _ in range(2):  # forward, then backward (the same bytes)
                dist.all_to_all_single(torch.empty_like(a_in) if fresh else a_in, a_out, recv, send)
                dist.all_to_all_single(torch.empty_like(b_in) if fresh else b_in, b_out, send, recv)

        return run

    def bench(self, names: list[str], reps: int) -> dict[str, list[float]]:
        """Samples per candidate: per rep the max over ranks (each rep starts at a barrier)."""
        import torch.distributed as dist

        samples = {n: [] for n in names}
        samples.update({n + ":a2a": [] for n in names if n in self.clocks})
        for _ in range(reps):
            for n in names:
                if n in self.clocks:
                    self.clocks[n].take()
                dist.barrier()
                t0 = time.perf_counter()
                self.fns[n]()
                samples[n].append(time.perf_counter() - t0)
                if n in self.clocks:  # seconds inside the dispatcher's collectives
                    samples[n + ":a2a"].append(sum(self.clocks[n].take().values()))
        for n in samples:
            s = torch.tensor(samples[n], dtype=torch.float64)
            dist.all_reduce(s, op=dist.ReduceOp.MAX)
            samples[n] = s.tolist()
        return samples

    # ---- the Ray-only design: rows as Ray objects, driver-orchestrated
    def ray_send(self) -> list[torch.Tensor]:
        p, P = self.plan, self.P
        dest_A = torch.tensor(P.owner_E)[p.expert_idx_A]
        order = torch.argsort(dest_A, stable=True)
        rows = self.x_TD.index_select(0, p.token_idx_A[order])
        return list(rows.split(torch.bincount(dest_A, minlength=self.world).tolist()))

    def ray_expert(self, *rows_from: torch.Tensor) -> list[torch.Tensor]:
        return list(rows_from)

    def ray_combine(self, *outs_from: torch.Tensor) -> int:
        p, P = self.plan, self.P
        dest_A = torch.tensor(P.owner_E)[p.expert_idx_A]
        order = torch.argsort(dest_A, stable=True)
        out_AD = torch.cat(outs_from)
        y_TD = torch.zeros_like(self.x_TD).index_add_(0, p.token_idx_A[order], out_AD * p.weight_A[order, None])
        return int(y_TD.shape[0])

    def close(self) -> None:
        from moedist.parallel.exchange import close_exchanges
        from moedist.parallel.group import destroy_group

        close_exchanges()
        destroy_group()


def ray_objects_pass(workers: list) -> None:
    """One forward of the Ray-only design: rows out as objects, results back as objects."""
    W = len(workers)
    sent = [w.ray_send.options(num_returns=W).remote() for w in workers]
    outs = [w.ray_expert.options(num_returns=W).remote(*[sent[s][d] for s in range(W)])
            for d, w in enumerate(workers)]  # fmt: skip
    ray.get([w.ray_combine.remote(*[outs[d][s] for d in range(W)]) for s, w in enumerate(workers)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(world: int, args) -> dict:
    workers = [Worker.options(resources={f"node{r % 2}": 1}).remote(r, world, NODES[r % 2], args.keep_heap == "on")
               for r in range(world)]  # fmt: skip
    try:
        port = ray.get(workers[0].open_port.remote())
        infos = ray.get([w.setup.remote(port, args.tokens, args.d_model, args.experts, args.top_k, args.spread,
                                        args.shm) for w in workers])  # fmt: skip
        names = [p + s for s in VARIANTS for p in ("dispatch", "raw")]
        names += ["dispatch_plan_counts", "raw_fresh", "memcpy", "local_work", "experts_only", "layer"]
        names += [f"layer_overlap{C}" for C in OVERLAP_CHUNKS if args.experts // world >= C]
        if infos[0]["shm"]:
            names += ["shm", "shm_node"]
        samples = ray.get([w.bench.remote(names, args.reps) for w in workers])[0]
        ray_objects_pass(workers)  # warm-up
        ray_s = []
        for _ in range(args.ray_reps):
            t0 = time.perf_counter()
            ray_objects_pass(workers)
            ray_objects_pass(workers)  # backward moves the same bytes again
            ray_s.append(time.perf_counter() - t0)
        samples["ray_objects"] = ray_s
        ray.get([w.close.remote() for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
    t = {n: median(s) for n, s in samples.items()}
    bytes_ = infos[0]["bytes_fwd_bwd"]  # rank 0's; ranks send about the same
    fan = torch.tensor([f for i in infos for f in i["fanout_T"]])
    row = {
        "workers": world, "tokens_per_worker": args.tokens, "d_model": args.d_model, "experts": args.experts,
        "top_k": args.top_k, "spread": args.spread, "times_s": t, "samples": samples,
        "bytes_fwd_bwd_rank0": bytes_,
        "fanout": {"mean": float(fan.float().mean()), "std": float(fan.float().std()),
                   "zero_share": float((fan == 0).float().mean()), "max": int(fan.max()),
                   "hist": torch.bincount(fan).tolist()},
        "ratio_dispatch_vs_raw": {**{s or "plain": t["dispatch" + s] / t["raw" + s] for s in VARIANTS},
                                  "plan_counts": t["dispatch_plan_counts"] / t["raw"]},
        "ratio_vs_plain_dispatch": {n: t[n] / t["dispatch"] for n in t},
        "ray_objects_vs_raw": t["ray_objects"] / t["raw"],
        # The floor of dispatch/raw when the dispatcher's own passes cannot overlap the exchange.
        "floor_dispatch_vs_raw": (t["raw"] + t["local_work"]) / t["raw"],
        # Real experts: the layer's time, its exposed communication (seconds waiting in or
        # launching collectives) and the layer over its compute floor, per chunk count.
        "overlap": {n: {"ms": t[n] * 1e3, "exposed_comm_ms": t[n + ":a2a"] * 1e3,
                        "vs_experts_only": t[n] / t["experts_only"], "vs_plain_layer": t[n] / t["layer"]}
                    for n in t if n.startswith("layer") and ":" not in n},
        "memcpy_GBps": bytes_[""] / t["memcpy"] / 1e9,
        "exchange_GBps_per_worker": {s or "plain": bytes_[s] / t["dispatch" + s] / 1e9 for s in VARIANTS},
    }  # fmt: skip
    if "shm" in t:
        row["shm_GBps_per_worker"] = bytes_[""] / t["shm"] / 1e9
        row["shm_node_GBps_per_worker"] = bytes_[""] / t["shm_node"] / 1e9
        row["ratio_shm_node_vs_raw"] = t["shm_node"] / t["raw"]
        # the shared-memory exchanges alone (the dispatcher's own passes left out)
        row["shm_node_exchange_GBps_per_worker"] = bytes_[""] / t["shm_node:a2a"] / 1e9
    return row


def plot(results: list[dict], saved: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [n for n in results[0]["times_s"] if n != "ray_objects" and ":" not in n] + ["ray_objects"]
    names = [n for n in names if n in results[-1]["times_s"]]  # (overlap8 exists for W=2 only)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [j + i * width for j in range(len(names))]
        ax_t.bar(xs, [r["times_s"].get(n, 0) * 1e3 for n in names], width, label=f"{r['workers']} workers")
    ax_t.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right", fontsize=8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("ms per layer, fwd + bwd")
    ax_t.set_title(f"{results[0]['tokens_per_worker']} tokens/worker, D={results[0]['d_model']}, "
                   f"E={results[0]['experts']}, mean fanout {results[0]['top_k']}")  # fmt: skip
    ax_t.legend(fontsize=8)
    ax_t.grid(alpha=0.3, axis="y")
    for label, by_f in saved.items():
        fs = [int(f) for f in by_f]
        ax_b.plot(fs, [1 - v["pairs"] / v["assignments"] for v in by_f.values()], marker="o", label=label)
    ax_b.set_xlabel("fanout of the token (experts it is routed to)")
    ax_b.set_ylabel("share of rows dedup saves")
    ax_b.set_title("deduplication: rows saved against fanout")
    ax_b.grid(alpha=0.3)
    ax_b.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small rows, few reps (a smoke run, ~1 min)")
    ap.add_argument("--shm", action="store_true", help="also time the dispatcher with shm=True, if it has it")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--keep-heap", choices=["on", "off"], default="on",
                    help="train.keep_heap in the workers (on: the training default)")
    args = ap.parse_args()
    args.tokens, args.d_model = (1024, 256) if args.quick else (4096, 512)
    args.experts, args.top_k, args.spread = 16, 2, 0.5
    args.reps = args.reps or (3 if args.quick else 7)
    args.ray_reps = 2 if args.quick else 3
    worlds = [2, 4]

    # Rows saved by dedup against fanout (no timing): several mean fanouts, E=16, 2 and 4 workers.
    saved = {}
    for world in worlds:
        for top_k in (1, 2, 4):
            plans = [et_plan(r, args.tokens, args.experts, top_k, args.spread) for r in range(world)]
            saved[f"W={world} mean fanout {top_k}"] = dedup_by_fanout(plans, ExpertPlacement(args.experts, world))

    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": NODES[0], "num_cpus": 2, "resources": {"node0": 8}, "include_dashboard": False,
        "dashboard_port": free_port(), "object_store_memory": 600 << 20})  # fmt: skip
    results = []
    try:
        cluster.add_node(node_ip_address=NODES[1], num_cpus=2, resources={"node1": 8}, object_store_memory=600 << 20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address=NODES[0], log_to_driver=False, configure_logging=False)
        for world in worlds:
            t0 = time.perf_counter()
            r = measure(world, args)
            results.append(r)
            t = r["times_s"]
            print(f"W={world}: " + "  ".join(f"{n} {v * 1e3:.1f}" for n, v in t.items()) + " (ms)", flush=True)
            print(f"  dispatch/raw {r['ratio_dispatch_vs_raw']}  "
                  f"floor (raw + local)/raw {r['floor_dispatch_vs_raw']:.2f}  "
                  f"ray_objects/raw {r['ray_objects_vs_raw']:.1f}  "
                  f"memcpy {r['memcpy_GBps']:.2f} GB/s  exchange {r['exchange_GBps_per_worker']} GB/s  "
                  + (f"shm inside a node {r['shm_node_GBps_per_worker']:.2f} GB/s (its exchanges alone "
                     f"{r['shm_node_exchange_GBps_per_worker']:.2f}), {r['ratio_shm_node_vs_raw']:.2f}x raw  "
                     if "shm_node_GBps_per_worker" in r else "")
                  + f"fanout {r['fanout']['mean']:.2f}+-{r['fanout']['std']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    targets = []
    for r in results:
        W = r["workers"]
        targets.append(target(f"dispatch/raw all_to_all_single W={W}", r["ratio_dispatch_vs_raw"]["plain"], "<=", 1.25))
        targets.append(target(f"dispatch (plan counts)/raw all_to_all_single W={W}",
                              r["ratio_dispatch_vs_raw"]["plan_counts"], "<=", 1.25))  # fmt: skip
        for n, o in r["overlap"].items():
            print(f"W={W} {n}: {o['ms']:.1f} ms, exposed comm {o['exposed_comm_ms']:.1f} ms, "
                  f"{o['vs_experts_only']:.2f}x experts only, {o['vs_plain_layer']:.2f}x plain layer")
        if "shm_node_GBps_per_worker" in r:
            # The target is the path inside a node; the 2-node placement's shm row
            # (rows between the nodes through gloo) is in the JSON beside it.
            targets.append(target(f"shm inside a node GB/s / memcpy GB/s W={W}",
                                  r["shm_node_GBps_per_worker"] / r["memcpy_GBps"], ">=", 0.5))  # fmt: skip
            targets.append(target(f"dispatch with shm inside a node / raw all_to_all_single W={W}",
                                  r["ratio_shm_node_vs_raw"], "<=", 1.25))  # fmt: skip
    config = {
        "workers": worlds, "tokens_per_worker": args.tokens, "d_model": args.d_model, "experts": args.experts,
        "top_k": args.top_k, "spread": args.spread, "reps": args.reps, "ray_reps": args.ray_reps,
        "keep_heap": args.keep_heap,
        "placement": "rank r on node r % 2 (127.0.0.2 / 127.0.0.3), experts in contiguous blocks",
        "time": "forward + backward of one layer; median over reps of the max over workers",
        "threads_per_worker": 1,
    }  # fmt: skip
    path = write_results("dispatch", config, [*results, {"dedup_rows_by_fanout": saved}], targets, args.quick)
    plot(results, saved, path.with_suffix(".png"))
    print(f"targets met: {sum(t['met'] for t in targets)}/{len(targets)} -> {path}")


if __name__ == "__main__":
    main()

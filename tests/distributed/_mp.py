"""Multi-process helpers for tests/distributed: a pool of spawned processes forming one gloo group
on loopback, kept alive across tests so each test pays only for its own work.

    pool = GlooPool(world=4)
    results = pool.run(fn, *args)   # fn(rank, world, *args) on every rank; list by rank
    pool.close()

`fn` must be importable by module path (a module-level function of a test module), and
its arguments and results picklable. An exception on any rank is re-raised in the caller
with that rank's traceback; the pool is then torn down (other ranks may be stuck in a
collective) and a new one must be made (`GlooPools.get` does that).

Network: rank 0's store listens on a socket bound to 127.0.0.1 and gloo binds the loopback
interface (GLOO_SOCKET_IFNAME=lo, set in the spawned processes only): nothing listens on or
connects to another address.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

HOST = "127.0.0.1"


def _worker_main(rank: int, world: int, tasks, results, threads: int, timeout_s: float) -> None:
    """A pool process: join the group, then run tasks until told to stop (None)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # test processes only: gloo binds loopback
    import numba
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if rank == 0:
            # The store listens on a socket bound to loopback (TCPStore alone would listen on
            # every interface); binding port 0 here also avoids a free-port race.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sock.listen(128)
            port = sock.getsockname()[1]
            results.put((rank, "port", port))
            store = dist.TCPStore(HOST, port, world, is_master=True, timeout=timeout,
                                  master_listen_fd=sock.detach(), use_libuv=True)  # fmt: skip
        else:
            port = tasks.get()
            store = dist.TCPStore(HOST, port, world, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "err", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        except BaseException:
            results.put((rank, "err", traceback.format_exc()))
    dist.destroy_process_group()


class GlooPool:
    """`world` spawned processes in one gloo process group on 127.0.0.1."""

    def __init__(self, world: int, threads: int = 1, timeout_s: float = 60.0):
        self.world, self.timeout_s = world, timeout_s
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._procs = []
        for r in range(world):
            args = (r, world, self._tasks[r], self._results, threads, timeout_s)
            self._procs.append(ctx.Process(target=_worker_main, args=args, daemon=True))
            self._procs[-1].start()
        self.broken = False
        (port,) = self._collect("port", timeout_s, ranks=[0])
        for q in self._tasks[1:]:
            q.put(port)
        self._collect("ready", timeout_s)

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """fn(rank, world, *args) on every rank; results in rank order."""
        if self.broken:
            raise RuntimeError("this pool was torn down after an error; make a new one")
        for q in self._tasks:
            q.put((fn, args))
        return self._collect("ok", timeout_s or self.timeout_s)

    def _collect(self, what: str, timeout_s: float, ranks: list[int] | None = None) -> list[Any]:
        """The `what` message of each of `ranks` (default: all), in rank order; on an error or
        a timeout the pool is torn down and the ranks' tracebacks are raised."""
        ranks = list(range(self.world)) if ranks is None else ranks
        out: dict[int, Any] = {}
        errors: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout_s
        first_error = deadline
        while len(out) + len(errors) < len(ranks):
            # After a first error give the other ranks 5 s to report theirs: they may well
            # be blocked in a collective the failed rank never joined.
            if time.monotonic() > (min(deadline, first_error + 5.0) if errors else deadline):
                break
            try:
                rank, status, value = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in out]
                if dead and not errors:
                    errors.append((dead[0], f"process exited with code {self._procs[dead[0]].exitcode}"))
                    first_error = time.monotonic()
                continue
            if status == what and rank in ranks:
                out[rank] = value
            else:
                if not errors:
                    first_error = time.monotonic()
                errors.append((rank, value if status == "err" else f"unexpected message {status!r}"))
        if errors or len(out) < len(ranks):
            self.close(force=True)
            missing = sorted(set(ranks) - set(out) - {r for r, _ in errors})
            msg = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors)
            if missing:
                msg += f"\nranks {missing} gave no {what!r} within {timeout_s:.0f} s"
            raise AssertionError(f"pool of {self.world} failed:{msg}")
        return [out[r] for r in ranks]

    def close(self, force: bool = False) -> None:
        """Stop the processes (ask first; terminate what is left, ours only)."""
        self.broken = True
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


class GlooPools:
    """One live pool per world size, made on first use and replaced after a failure."""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._pools: dict[int, GlooPool] = {}

    def get(self, world: int) -> GlooPool:
        pool = self._pools.get(world)
        if pool is None or pool.broken:
            pool = self._pools[world] = GlooPool(world, self.threads)
        return pool

    def run(self, world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(rank, world, *args) on a pool of `world` processes."""
        return self.get(world).run(fn, *args)

    def close(self) -> None:
        for pool in self._pools.values():
            if not pool.broken:
                pool.close()
        self._pools.clear()

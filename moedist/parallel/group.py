"""Forming (and tearing down) the torch.distributed process group of the workers.

gloo's default device binds the address the machine's hostname resolves to. On a cluster
whose nodes were given explicit addresses (Ray's --node-ip-address; on one machine several
loopback addresses 127.0.0.2, 127.0.0.3, ...) that is the wrong address, so moedist
registers a gloo backend whose device is bound to the node address the runtime reports.

Rendezvous: rank 0 hosts the TCPStore on a socket it bound to its node address (a plain
TCPStore listens on every interface); `listen_socket` makes that socket before the other
ranks are told the port, so there is no window in which another process takes the port.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo

BOUND_GLOO = "moedist_gloo"


def listen_socket(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on `host` (port 0: a free one), for rank 0's rendezvous store."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _bound_gloo_creator(host: str):
    def create(opts, backend_options=None):
        o = ProcessGroupGloo._Options()
        o._devices = [ProcessGroupGloo.create_device(hostname=host)]
        o._timeout = opts.timeout
        return ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, o)

    return create


def init_group(
    rank: int,
    world: int,
    master_addr: str,
    master_port: int,
    node_addr: str,
    backend: str = "auto",
    timeout_s: float = 120.0,
    listen: socket.socket | None = None,
) -> str:
    """Join the default process group; returns the backend used ('gloo' or 'nccl').

    backend 'auto' = NCCL when this process sees a CUDA device, else gloo bound to node_addr.
    Rank 0 passes `listen` (from `listen_socket(master_addr)`, port = master_port) and
    hosts the store on it; it is consumed either way.
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        if listen is None:
            raise ValueError("rank 0 hosts the rendezvous store: pass listen=listen_socket(master_addr)")
        store = dist.TCPStore(master_addr, master_port, world, is_master=True, timeout=timeout,
                              master_listen_fd=listen.detach(), use_libuv=True)  # fmt: skip
    else:
        store = dist.TCPStore(master_addr, master_port, world, is_master=False, timeout=timeout)
    if backend == "gloo":
        # One registration per process; the creator captures this node's address.
        if BOUND_GLOO not in dist.Backend.backend_list:
            dist.Backend.register_backend(BOUND_GLOO, _bound_gloo_creator(node_addr), extended_api=True,
                                          devices=["cpu"])  # fmt: skip
        dist.init_process_group(BOUND_GLOO, store=store, rank=rank, world_size=world, timeout=timeout)
    elif backend == "nccl":
        torch.cuda.set_device(0)  # Ray gives each worker exactly one visible GPU
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        raise ValueError(f"unknown backend '{backend}' (auto, gloo, nccl)")
    return backend


def destroy_group() -> None:
    """Leave the process group (no-op when not initialised)."""
    if dist.is_initialized():
        dist.destroy_process_group()

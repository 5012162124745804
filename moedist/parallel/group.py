"""Forming (and tearing down) the torch.distributed process group of the workers.

gloo's default device binds the address the machine's hostname resolves to. On a cluster
whose nodes were given explicit addresses (Ray's --node-ip-address; on one machine several
loopback addresses 127.0.0.2, 127.0.0.3, ...) that is the wrong address, so moedist
registers a gloo backend whose device is bound to the node address the runtime reports,
and rendezvous happens on rank 0's node address. NCCL uses the standard initialisation.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo

BOUND_GLOO = "moedist_gloo"


def free_port(host: str) -> int:
    """A TCP port that is free on `host` right now (for rank 0's rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
) -> str:
    """Join the default process group; returns the backend used ('gloo' or 'nccl').

    backend 'auto' = NCCL when this process sees a CUDA device, else gloo bound to node_addr.
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    init = f"tcp://{master_addr}:{master_port}"
    if backend == "gloo":
        # One registration per process; the creator captures this node's address.
        if BOUND_GLOO not in dist.Backend.backend_list:
            dist.Backend.register_backend(BOUND_GLOO, _bound_gloo_creator(node_addr), extended_api=True,
                                          devices=["cpu"])  # fmt: skip
        dist.init_process_group(BOUND_GLOO, init_method=init, rank=rank, world_size=world, timeout=timeout)
    elif backend == "nccl":
        torch.cuda.set_device(0)  # Ray gives each worker exactly one visible GPU
        dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, timeout=timeout)
    else:
        raise ValueError(f"unknown backend '{backend}' (auto, gloo, nccl)")
    return backend


def destroy_group() -> None:
    """Leave the process group (no-op when not initialised)."""
    if dist.is_initialized():
        dist.destroy_process_group()

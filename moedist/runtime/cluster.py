"""Connecting the driver to Ray: a new local instance, or an existing cluster."""

from __future__ import annotations

import os

# Ray rewrites 127.0.0.1 and "localhost" to the machine's outward address but leaves other
# loopback addresses alone, so a local instance lives on 127.0.0.2.
LOCAL_NODE_ADDR = "127.0.0.2"


def connect(address: str | None, node_addr: str | None, num_cpus: int | None) -> bool:
    """Initialise Ray in this process; returns True when it started a local instance.

    address None: a new single-node instance on `node_addr` (default 127.0.0.2) with
    `num_cpus` logical CPUs. Otherwise join the cluster at `address` ("auto" or host:port)
    as `node_addr` (default: the host part of address, so a cluster started on loopback
    addresses is driven over loopback).
    """
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            address="local",  # a new instance even if this machine ran `ray start` before
            _node_ip_address=node_addr or LOCAL_NODE_ADDR,
            num_cpus=max(num_cpus or 1, os.cpu_count() or 1),
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        return True
    if address == "auto":
        address = _running_cluster_address()
    _use_auth_token_if_present()
    if node_addr is None:
        node_addr = address.rsplit(":", 1)[0]
    ray.init(address=address, _node_ip_address=node_addr, log_to_driver=False, configure_logging=False)
    return False


def _running_cluster_address() -> str:
    """host:port of the cluster this machine last started (what Ray's "auto" means).

    Resolved here rather than by ray.init so the driver can join as a node on the same
    address as the head (a cluster on loopback is then driven over loopback).
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
    except Exception as e:  # Ray raises ConnectionError when no cluster is running
        raise ConnectionError(f"--address auto: no running Ray cluster found on this machine ({e}); "
                              "start one with `cluster/local up` or `ray start --head`") from None  # fmt: skip
    if not found:
        raise ConnectionError("--address auto: no running Ray cluster found on this machine; "
                              "start one with `cluster/local up` or `ray start --head`")  # fmt: skip
    return found


def _use_auth_token_if_present() -> None:
    """Send this machine's Ray token (~/.ray/auth_token) when joining by address.

    Ray enables token authentication for clusters started with `ray start` when a token
    exists, but a driver given an explicit address only sends it if told to; this does what
    Ray itself does for address="auto". No token file: nothing changes.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)

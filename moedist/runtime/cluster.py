"""Connecting the driver to Ray: a new local instance, or an existing cluster.

`--address auto` is resolved here, in this order:
1. inside a Ray job's entrypoint (`ray job submit -- moedist train --address auto ...`),
   the job's own cluster: Ray hands it to the entrypoint in RAY_ADDRESS, its documented
   mechanism, and that is the only environment variable moedist reads for this;
2. the cluster `cluster/local up` recorded for this user in its private state folder
   (~/.cache/moedist/cluster), if its head node is still the process `up` started;
3. Ray's own resolution (the machine's most recent `ray start`, recorded in a file under
   the system temp folder that any user can write), refused when that record or the
   cluster it names belongs to another user, since the driver sends its token there.
The driver prints which cluster it joins and why.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from moedist.config import ConfigError
from moedist.runtime import localstate

# Ray rewrites 127.0.0.1 and "localhost" to the machine's outward address but leaves other
# loopback addresses alone, so a local instance lives on 127.0.0.2.
LOCAL_NODE_ADDR = "127.0.0.2"


class ClusterError(ConfigError):
    """The cluster to join cannot be found, reached or trusted (one-line message)."""


def connect(
    address: str | None,
    node_addr: str | None,
    num_cpus: int | None,
    say: Callable[[str], None] | None = None,
    state_dir: Path | None = None,
) -> bool:
    """Initialise Ray in this process; returns True when it started a local instance.

    address None: a new single-node instance on `node_addr` (default 127.0.0.2) with
    `num_cpus` logical CPUs. Otherwise join the cluster at `address` ("auto", see the
    module docstring, or host:port) as `node_addr` (default: the host part of the address,
    so a cluster started on loopback addresses is driven over loopback); `say` gets one
    line naming the cluster joined. `state_dir` is cluster/local's state folder.
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
        localstate.secure_token_file()  # ray.init may just have written a new token
        return True
    address, why = resolve_address(address, state_dir)
    if say:
        say(f"moedist: joining the Ray cluster at {address} ({why})")
    _check_reachable(address)
    localstate.secure_token_file()
    _use_auth_token_if_present()
    if node_addr is None:
        node_addr = address.rsplit(":", 1)[0]
    try:
        ray.init(address=address, _node_ip_address=node_addr, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as e:
        # e.g. a token that is missing or not this cluster's: Ray's message, first line only
        cause = e.__cause__ or e
        first = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first}") from None
    return False


def resolve_address(address: str, state_dir: Path | None = None) -> tuple[str, str]:
    """(host:port, where it came from) for `--address` (host:port or "auto")."""
    if address != "auto":
        if ":" not in address:
            raise ClusterError(f"--address: '{address}' is not 'auto' or host:port")
        return address, "--address"
    job_addr = os.environ.get("RAY_ADDRESS", "")
    if job_addr and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # both set by Ray for an entrypoint
        return job_addr, "this Ray job's cluster"
    try:
        rec = localstate.recorded_cluster(state_dir)
    except localstate.StateError as e:
        raise ClusterError(f"--address auto: {e}") from None
    if rec is not None:
        where = localstate.default_state_dir() if state_dir is None else state_dir
        return rec["address"], f"started by cluster/local up, recorded in {where}"
    found = _ray_current_cluster()
    return found, "Ray's most recent cluster on this machine"


def _ray_current_cluster(temp_dir: str | None = None) -> str:
    """What Ray itself means by "auto" (`temp_dir`: Ray's temp folder, default /tmp/ray),
    refused when the record it follows or the cluster it names belongs to another user."""
    hint = "start one with `cluster/local up`, or pass --address host:port"
    try:
        from ray._common.utils import get_ray_address_file
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto", temp_dir)
    except Exception as e:  # Ray raises ConnectionError when no cluster is running
        raise ClusterError(f"--address auto: no running Ray cluster found on this machine ({e}); {hint}") from None
    if not found:
        raise ClusterError(f"--address auto: no running Ray cluster found on this machine; {hint}")
    current = Path(get_ray_address_file(temp_dir))
    with contextlib.suppress(OSError):
        st = os.stat(current)
        if current.read_text().strip() == found and (st.st_uid != os.getuid() or st.st_mode & stat.S_IWOTH):
            raise ClusterError(
                f"--address auto: Ray's record of the current cluster ({current}) points at {found} but was "
                f"written by uid {st.st_uid}{' and is writable by anyone' if st.st_mode & stat.S_IWOTH else ''}; "
                "it may name another user's cluster. Pass --address host:port"
            )
    owners = _local_cluster_owners(found)
    if owners and os.getuid() not in owners:
        raise ClusterError(f"--address auto: the Ray cluster at {found} runs as uid {', '.join(map(str, owners))}, "
                           "not as you; pass --address host:port to join it anyway")  # fmt: skip
    return found


def _local_cluster_owners(address: str) -> set[int]:
    """uids of this machine's raylets of the cluster at `address` (empty if none runs here)."""
    import psutil  # a dependency of Ray

    owners = set()
    for p in psutil.process_iter(["cmdline", "uids"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if any(a == f"--gcs-address={address}" for a in p.info["cmdline"] or ()):
                owners.add(p.info["uids"].real)
    return owners


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when nothing listens at host:port (ray.init would retry
    for a long time and then raise)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise ClusterError(f"--address: no Ray cluster answers at {address} ({e})") from None


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

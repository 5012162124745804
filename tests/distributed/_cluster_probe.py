"""A separate Ray driver that watches moedist's actors on a cluster (used by
test_cluster_local.py, so the test process itself never joins that cluster).

    python -m tests.distributed._cluster_probe ADDRESS DASHBOARD_URL WORKERS TIMEOUT

Prints one JSON line per phase:
1. once WORKERS moedist worker actors are alive (per Ray's state API): {"job": id, "pids": [...]}, the pids of
   every live actor of their job (the workers; the coordinator lives in the driver);
2. after a line "go" on stdin, polls until no named actor whose name starts with
   "moedist-" (any namespace) and no placement group that is not REMOVED is left, or
   TIMEOUT seconds pass: {"clean": bool, "after_s": seconds, "actors": [...], "pgs": [...]}.
"""

from __future__ import annotations

import json
import sys
import time


def leftovers() -> tuple[list[str], list[str]]:
    import ray
    from ray.util.placement_group import placement_group_table

    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("moedist-")]
    pgs = [pg["placement_group_id"] for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    return actors, pgs


def main() -> None:
    address, dashboard, workers, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    import ray
    from ray.util.state import list_actors

    ray.init(address=address, _node_ip_address=address.split(":")[0], log_to_driver=False, configure_logging=False)
    deadline = time.monotonic() + timeout
    while True:  # named actors are listed from creation on; wait until the workers run
        alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
        names = [a.name for a in alive if (a.name or "").startswith("moedist-worker-")]
        if len(names) >= workers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    jobs = {a.job_id for a in alive if a.name in names}
    print(json.dumps({"job": sorted(jobs), "pids": sorted(a.pid for a in alive if a.job_id in jobs),
                      "names": names}), flush=True)  # fmt: skip
    sys.stdin.readline()
    t0 = time.monotonic()
    while True:
        actors, pgs = leftovers()
        if (not actors and not pgs) or time.monotonic() - t0 > timeout:
            break
        time.sleep(0.1)
    print(json.dumps({"clean": not actors and not pgs, "after_s": time.monotonic() - t0, "actors": actors,
                      "pgs": pgs}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""torch.distributed data plane of the expert-parallel runtime (never imports ray).

Everything here works under any initialised torch.distributed process group, so a
torchrun or Ray Train user can use the MoE layer without moedist's runtime.
"""

from moedist.parallel.alltoall import AllToAllDispatcher, all_to_all_rows
from moedist.parallel.clock import CommClock
from moedist.parallel.grads import (
    all_reduce_sum,
    expert_parameters,
    replicated_parameters,
    shard_model,
    shard_model_experts,
    sync_gradients,
)
from moedist.parallel.placement import ExpertPlacement
from moedist.parallel.pool import AllGatherPoolOps, DistributedPoolOps, radix_kth_largest, threshold_sync_bytes

__all__ = [
    "AllGatherPoolOps",
    "AllToAllDispatcher",
    "CommClock",
    "DistributedPoolOps",
    "ExpertPlacement",
    "all_reduce_sum",
    "all_to_all_rows",
    "expert_parameters",
    "radix_kth_largest",
    "replicated_parameters",
    "shard_model",
    "shard_model_experts",
    "sync_gradients",
    "threshold_sync_bytes",
]

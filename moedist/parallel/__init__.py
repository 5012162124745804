"""torch.distributed data plane of the expert-parallel runtime (never imports ray).

Everything here works under any initialised torch.distributed process group, so a
torchrun or Ray Train user can use the MoE layer without moedist's runtime.
"""

from moedist.parallel.alltoall import AllToAllDispatcher, all_to_all_rows
from moedist.parallel.clock import CommClock
from moedist.parallel.expert_parallel import enable_expert_parallel, experts_on_node
from moedist.parallel.grads import (
    OverlappedGradSync,
    all_reduce_sum,
    all_reduce_sum_counts,
    all_reduce_sum_counts_and_floats,
    expert_parameters,
    floats_ride_with_counts,
    gather_objects,
    grad_presence,
    replicated_parameters,
    scale_expert_grads,
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
    "OverlappedGradSync",
    "all_reduce_sum",
    "all_reduce_sum_counts",
    "all_reduce_sum_counts_and_floats",
    "all_to_all_rows",
    "enable_expert_parallel",
    "expert_parameters",
    "experts_on_node",
    "floats_ride_with_counts",
    "gather_objects",
    "grad_presence",
    "radix_kth_largest",
    "replicated_parameters",
    "scale_expert_grads",
    "shard_model_experts",
    "sync_gradients",
    "threshold_sync_bytes",
]

"""The step engine: model, optimiser, sampler and one optimiser step over the global batch.

Single-process, the Trainer is the run loop's step executor (moedist.training.loop) and the
oracle the expert-parallel runtime must match; in an expert-parallel job each worker runs
one over its expert shard. Also: building models and optimisers, the learning-rate
schedule, and loading trained runs. Legend: B batch, S positions, E experts, L MoE layers.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moedist.config import ConfigError, RunConfig, deep_update, from_dict, parse_trace_steps, to_dict
from moedist.data import BatchSampler, TokenDataset, tokenizer_from_spec
from moedist.model.transformer import MoETransformer
from moedist.routing.base import NonFiniteLogitsError
from moedist.training.checkpoint import (
    CheckpointError,
    load_latest_checkpoint,
)
from moedist.training.evaluate import EvalResult, evaluate
from moedist.training.heap import keep_heap, keep_heap_status
from moedist.training.nonfinite import NonFiniteError, first_nonfinite, params_finite
from moedist.training.torch_profile import StepProfiler, parse_window


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def set_threads(threads: int) -> None:
    """This process's intra-op threads: torch's, and numba's parallel kernels' (dispatch,
    radix histograms; at most the threads numba started). Left at one thread per core,
    numba's OpenMP threads spin beside a 1-thread run (an AoE step burnt 1.9x its wall time
    in CPU time with 2 numba threads, 1.0x with 1, and was not faster)."""
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_dataset(cfg: RunConfig) -> TokenDataset:
    """The prepared dataset at cfg.data.path, or the embedded stdlib corpus, checked to
    hold a sequence of model.seq_len + 1 tokens in each split."""
    dataset = TokenDataset.open(cfg.data.path) if cfg.data.path else TokenDataset.default()
    dataset.check_seq_len(cfg.model.seq_len)
    return dataset


def build_model(cfg: RunConfig) -> MoETransformer:
    """A freshly initialised model, seeded from cfg.train.seed."""
    torch.manual_seed(cfg.train.seed)
    return MoETransformer(cfg.model, cfg.router)


def make_optimizer(model: MoETransformer, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms)."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=False, foreach=True)


def check_resize(cfg: RunConfig, n_experts: int, workers: int) -> None:
    """Refuse (ScaleError) an expert count the run cannot have."""
    from moedist.training.loop import ScaleError

    r = cfg.router
    if r.kind == "dense":
        raise ScaleError("a dense model has no experts to scale")
    if r.kind in ("aoe", "etr"):
        raise ScaleError(f"changing the number of experts is not supported for the {r.kind} router yet")
    if n_experts < 1 or n_experts < workers:
        raise ScaleError(f"cannot have {n_experts} experts on {workers} workers: each worker owns at least one")
    if r.kind in ("tc", "lf") and r.top_k > n_experts:
        raise ScaleError(f"cannot have {n_experts} experts with router.top_k = {r.top_k}")
    if n_experts > 64 * cfg.model.n_experts:
        raise ScaleError(f"{n_experts} experts is more than 64x the {cfg.model.n_experts} the model has")


def resize_experts(
    cfg: RunConfig,
    tensors: dict[str, Any],
    n_experts: int,
    last_row: dict[str, Any] | None = None,
    noise: float = 0.0,
) -> tuple[RunConfig, dict[str, Any], list[dict[str, Any]]]:
    """A whole-model state (model + optimiser) with every MoE layer resized to n_experts.

    Each layer splits its most loaded experts or drops its least loaded, judged by the
    loads of `last_row` (a metrics row), equal loads without one. Returns the new config,
    the new tensors and each layer's plan (moedist.model.resize).
    """
    from moedist.model.resize import moe_prefixes, param_slots, plan_resize, resize_state

    with torch.device("meta"):  # names and optimiser slots, without allocating a model
        meta = MoETransformer(cfg.model, cfg.router)
        slots = param_slots(meta, make_optimizer(meta, cfg))
        layers = list(zip(meta.moe_layer_ids(), moe_prefixes(meta), strict=True))
    plans = {}
    for layer, prefix in layers:
        load = (last_row or {}).get(f"L{layer}_load")
        plans[prefix] = plan_resize(cfg.model.n_experts, n_experts, load)
    gen = torch.Generator().manual_seed(cfg.train.seed + 7919 * n_experts)
    model, optim = resize_state(tensors["model"], tensors["optim"], slots, plans, noise, gen)
    new_cfg = from_dict(to_dict(cfg))
    new_cfg.model.n_experts = n_experts
    report = [{"layer": layer, **plans[prefix].to_json()} for layer, prefix in layers]
    return new_cfg, {"model": model, "optim": optim}, report


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync it, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@dataclass
class DistContext:
    """This process's place in an expert-parallel job (see moedist.runtime)."""

    rank: int
    world: int
    placement: Any  # moedist.parallel.placement.ExpertPlacement
    group: Any = None  # torch.distributed process group; None = the default group
    nodes: list[str] | None = None  # node address of every rank (None: all on one node)


class Trainer:
    """Owns a model, its optimiser and the data sampler, and runs optimiser steps.

    Single-process, it is the step executor of the run loop (moedist.training.loop) and the
    oracle the expert-parallel runtime must match; with a DistContext it is one worker of an
    expert-parallel job (the Ray coordinator drives it and owns the run folder).
    """

    def __init__(self, cfg: RunConfig, dataset: TokenDataset, dist_ctx: DistContext | None = None):
        if dist_ctx is None and cfg.workers != 1:
            raise ConfigError(
                f"workers: {cfg.workers} requested, but this trainer is single-process (workers = 1); "
                "the expert-parallel Ray runtime drives multi-worker runs"
            )
        if dataset.vocab_size != cfg.model.vocab_size:
            cfg.model.vocab_size = dataset.vocab_size  # the tokenizer decides the vocabulary
        self.cfg = cfg
        self.dataset = dataset
        self.dist = dist_ctx
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            set_threads(cfg.train.threads)
        if cfg.train.keep_heap:  # once per process, before the model's buffers exist
            keep_heap()
        # The full model is built (and seeded) the same way on every worker, so a worker's
        # expert shard starts from exactly the weights the 1-process model has.
        self.model = build_model(cfg).to(self.device)
        self.clock = None
        self.expert_ids: list[int] | None = None  # global id of each local expert row
        if dist_ctx is not None:
            from moedist.parallel import enable_expert_parallel

            self.clock = enable_expert_parallel(
                self.model, dist_ctx.placement, dist_ctx.rank, dist_ctx.group, dist_ctx.nodes, comm=cfg.comm
            )
            self.expert_ids = list(dist_ctx.placement.local_experts(dist_ctx.rank))
        # The step profile (docs/profiling.md): spans of every step, events of the trace window.
        self.trace_window = parse_trace_steps(cfg.profile.trace_steps, cfg.train.steps)
        self.trace: dict[int, list[list[Any]]] = {}  # step -> events (moedist.training.profile)
        if cfg.profile.spans:
            from moedist.parallel.clock import CommClock

            if self.clock is None:
                self.clock = CommClock()
            self.clock.spans = True
            self._attach_clock()
        # [comm] overlap_grad_sync: dense-gradient all-reduces start during the last
        # micro-batch's backward (hooks on this model's parameters; a rebuilt model gets a
        # new Trainer or new hooks).
        self.grad_sync = None
        if dist_ctx is not None and cfg.comm.overlap_grad_sync:
            from moedist.parallel import OverlappedGradSync

            self.grad_sync = OverlappedGradSync(self.model, dist_ctx.group)
        self.opt = make_optimizer(self.model, cfg)
        self.sampler = BatchSampler(dataset, cfg.model.seq_len, cfg.train.batch_size, cfg.train.seed)
        self.step = 0
        self.skipped = 0
        self.last_row: dict[str, Any] | None = None  # its loads choose the experts a resize splits
        self.autocast_dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None
        self.torch_profiler = StepProfiler(parse_window(cfg.profile.torch_profile),
                                           dist_ctx.rank if dist_ctx else 0, self.device.type)  # fmt: skip

    # ----------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors {model, optim}, extra JSON state) for a checkpoint of this step."""
        extra = {"torch_rng": torch.get_rng_state().tolist(), "skipped_steps": self.skipped}
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}, extra

    def load_state(self, tensors: dict[str, Any], extra: dict[str, Any], step: int) -> None:
        """Continue from a whole-model checkpoint (written by any number of workers)."""
        self.model.load_state_dict(tensors["model"])
        self.opt.load_state_dict(tensors["optim"])
        torch.set_rng_state(torch.tensor(extra["torch_rng"], dtype=torch.uint8))
        self.skipped = int(extra.get("skipped_steps", 0))
        self.step = int(step)

    def scale(self, workers: int | None = None, experts: int | None = None, noise: float = 0.0) -> dict[str, Any]:
        """Change the number of routed experts per MoE layer at a step boundary (see
        moedist.model.resize); a single-process run has exactly one worker."""
        from moedist.training.loop import ScaleError

        if workers not in (None, 1):
            raise ScaleError(f"a single-process run cannot have {workers} workers: start it on Ray "
                             "(--workers, --address) to scale its workers")  # fmt: skip
        report: dict[str, Any] = {"workers_before": 1, "workers_after": 1}
        if experts is not None:
            report.update(self.resize_experts(experts, noise))
        return report

    def resize_experts(self, n_experts: int, noise: float = 0.0) -> dict[str, Any]:
        """Split (most loaded first) or drop (least loaded first) experts of every MoE layer;
        the model, its optimiser state and the router state follow; cfg is updated in place."""
        E = self.cfg.model.n_experts
        check_resize(self.cfg, n_experts, workers=1)
        if n_experts == E:
            return {"experts_before": E, "experts_after": E, "layers": []}
        tensors, extra = self.state()
        new_cfg, tensors, layers = resize_experts(self.cfg, tensors, n_experts, self.last_row, noise)
        self.cfg.model.n_experts = new_cfg.model.n_experts
        self.model = build_model(self.cfg).to(self.device)  # reseeds: load_state restores the RNG
        self._attach_clock()
        self.opt = make_optimizer(self.model, self.cfg)
        self.load_state(tensors, extra, self.step)
        self.last_row = None  # its loads were the old experts'
        return {"experts_before": E, "experts_after": n_experts, "layers": layers}

    def info(self) -> dict[str, Any]:
        """Facts about where the run ran, for summary.json."""
        return {"device": str(self.device), "workers": 1, "keep_heap": keep_heap_status()}

    # ----------------------------------------------------------------- profile
    def _attach_clock(self) -> None:
        """Let the MoE blocks time their router and experts on the step clock (spans on)."""
        if self.clock is not None and self.clock.spans:
            for block in self.model.moe_blocks():
                block.clock = self.clock

    def _span(self, kind: str):
        """The step clock's span `kind` (a no-op without spans)."""
        return self.clock.span(kind) if self.clock is not None else contextlib.nullcontext()

    def take_trace(self) -> dict[int, list[list[Any]]]:
        """The traced steps' events recorded since the last call ({step: events})."""
        out, self.trace = self.trace, {}
        return out

    def take_comm_blocks(self) -> list[tuple[str, float]]:
        """(kind, self seconds) of the last step's communication blocks, once (an
        expert-parallel worker with spans on; otherwise empty): the clock keeps them until
        the next step begins."""
        clock = self.clock
        if self.dist is None or clock is None or not clock.spans:
            return []
        return clock.take_comm_blocks()

    def trace_events(self) -> dict[int, dict[int, list[list[Any]]]]:
        """{step: {rank 0: events}} of the traced steps (the run loop writes trace.json)."""
        return {step: {0: evs} for step, evs in sorted(self.trace.items())}

    def param_counts(self) -> dict[str, int]:
        return self.model.param_counts()

    # ----------------------------------------------------------------- steps
    def train_step(self) -> dict[str, Any]:
        """One optimiser step (`_train_step`), under torch.profiler in profile.torch_profile's steps."""
        return self.torch_profiler.run(self.step, self._train_step)

    def take_torch_traces(self) -> dict[str, bytes]:
        """Chrome traces of finished torch.profiler windows (file name -> bytes), once."""
        return self.torch_profiler.take()

    def _train_step(self) -> dict[str, Any]:
        """One optimiser step over the global batch (split into micro-batches).

        The loss and the global gradient norm are checked before the update and the
        parameters after it: a non-finite value raises NonFiniteError naming the step and
        layer (train.nonfinite = "stop"), or drops the step's update and counts it ("skip").
        """
        cfg, model, clock = self.cfg, self.model, self.clock
        model.train()
        w = self.trace_window
        tracing = w is not None and w[0] <= self.step <= w[1] and clock is not None and clock.spans
        t0 = clock.begin_step(tracing) if clock is not None else time.perf_counter()
        d = self.dist
        with self._span("data"):  # the batch, and the step's set-up (learning rate, counters)
            if d is None:
                batch_BS1 = self.sampler.global_batch(self.step)
            else:
                batch_BS1 = self.sampler.local_batch(self.step, d.rank, d.world, cfg.train.micro_batches)
            n_micro = cfg.train.micro_batches
            lr = lr_at(self.step, cfg)
            for g in self.opt.param_groups:
                g["lr"] = lr
            ce_sum, aux_sum = 0.0, 0.0
            n_moe = len(model.moe_blocks())
            load_LE = torch.zeros(n_moe, cfg.model.n_experts, dtype=torch.int64)
            assigned_L = torch.zeros(n_moe, dtype=torch.int64)
            # Per-expert counts the routers' plans carry (e.g. "capped"), summed like the loads.
            stat_names = [router.plan_stat_names() for router in model.routers()]
            stat_LE = {(i, name): torch.zeros(cfg.model.n_experts, dtype=torch.int64)
                       for i, names in enumerate(stat_names) for name in names}  # fmt: skip
            micro_batches = np.split(batch_BS1, n_micro)
        try:
            for i_mb, mb in enumerate(micro_batches):
                with self._span("data"):
                    b = torch.from_numpy(np.ascontiguousarray(mb)).to(self.device)
                # dense_fwd / dense_bwd are the self times of these two blocks: the forward and
                # backward passes less the router, pool, expert and exchange spans inside them.
                with self._span("dense_fwd"):
                    amp = self.autocast_dtype
                    with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        out = model(b[:, :-1], b[:, 1:])
                    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
                with self._span("dense_bwd"):
                    if self.grad_sync is not None and i_mb == n_micro - 1:
                        self.grad_sync.arm()  # only the last backward's gradients are final
                    (loss / n_micro).backward()
                with self._span("stats"):
                    ce_sum += float(out.loss.detach())
                    aux_sum += float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
                    for i, plan in enumerate(out.plans):
                        load_LE[i] += plan.load_E.cpu()
                        assigned_L[i] += plan.token_idx_A.numel()
                        for name in stat_names[i]:
                            stat_LE[i, name] += plan.stats[name].cpu()
        except NonFiniteLogitsError as e:  # raised on every worker alike: all stop or all skip
            return self._skipped_row(e, lr, t0)
        sq_exp = None  # the expert gradients' global squared norm, when summed with the counts
        if d is not None:
            from moedist.parallel import (
                all_reduce_sum,
                all_reduce_sum_counts_and_floats,
                floats_ride_with_counts,
                grad_presence,
                scale_expert_grads,
                sync_gradients,
            )

            # Fused, where floats ride with the counts (2 workers), the clip's expert norm
            # rides in the step's one all-reduce of counts and floats instead of an all-reduce
            # of its own after the sync: the expert gradients need no communication to be
            # final, only the 1/W scaling, so their norm is known before the replicated
            # gradients are synced.
            fuse_norm = cfg.comm.fuse and floats_ride_with_counts(d.group)
            # Overlapped, this measures only the wait for the all-reduces still running
            # after backward (the exposed part); the rest hid behind the backward pass.
            with self.clock.measure("grad_sync"):
                if cfg.comm.fuse:
                    floats = [ce_sum, aux_sum]
                    if fuse_norm:
                        scale_expert_grads(model, d.world)
                        floats.append(expert_grad_sq(model))
                    # Integer counts sum exactly in any order: which dense parameters have a
                    # gradient (the plain sync's; the overlapped one sends its own flags) and the
                    # step's loads, assignments and plan counts in ONE all-reduce.
                    presence = [grad_presence(model)] if self.grad_sync is None else []
                    # (with 2 workers the float losses ride along: see the function)
                    summed, loss_sums = all_reduce_sum_counts_and_floats(
                        [*presence, load_LE, assigned_L, *stat_LE.values()],
                        torch.tensor(floats, dtype=torch.float64), d.group)  # fmt: skip
                    if fuse_norm:
                        sq_exp, loss_sums = float(loss_sums[2]), loss_sums[:2]
                    has_P = summed.pop(0) if presence else None
                    load_LE, assigned_L, *summed = summed
                    stat_LE = dict(zip(stat_LE, summed, strict=True))
                if self.grad_sync is not None:
                    self.grad_sync.finish(scale_experts=not fuse_norm)
                elif cfg.comm.fuse:
                    sync_gradients(model, d.group, has_P=has_P, scale_experts=not fuse_norm)
                else:
                    sync_gradients(model, d.group)
            # Every worker reports the global numbers: losses averaged, loads summed. Unfused,
            # the float losses have their own all-reduce (fused: summed above, in the same
            # all-reduce as the counts with 2 workers, in one of their own with more, since
            # gloo's summation order then depends on an element's place in the buffer).
            with self._span("stats"):
                if not cfg.comm.fuse:
                    loss_sums = all_reduce_sum(torch.tensor([ce_sum, aux_sum], dtype=torch.float64), d.group)
                stats = loss_sums / d.world
                ce_sum, aux_sum = float(stats[0]), float(stats[1])
                if not cfg.comm.fuse:
                    load_LE = all_reduce_sum(load_LE, d.group)
                    assigned_L = all_reduce_sum(assigned_L, d.group)
                    if stat_LE:
                        summed = all_reduce_sum(torch.stack(list(stat_LE.values())), d.group)
                        stat_LE = dict(zip(stat_LE, summed, strict=True))
        with self._span("optimiser"):  # clipping (its norm all-reduce), the update, the routers' step end
            grad_norm = self.clip_gradients(sq_exp)
            # Loss and norm are global (all-reduced), so every worker takes the same branch.
            skipped = not (math.isfinite(ce_sum) and math.isfinite(aux_sum) and math.isfinite(grad_norm))
            if skipped:
                self._nonfinite_step(ce_sum, grad_norm)
            else:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                model.routing_step_end()
                if not params_finite(list(model.parameters())):
                    where = first_nonfinite(model, "param", self.expert_ids)
                    raise NonFiniteError(
                        f"parameters became non-finite in step {self.step}'s update ({where}; loss "
                        f"{ce_sum / n_micro:.4g}, gradient norm {grad_norm:.4g}); nothing was saved from this step: "
                        "lower train.lr",
                        self.step,
                    )
        t1 = time.perf_counter()
        dt = t1 - t0
        n_tokens = cfg.train.batch_size * cfg.model.seq_len  # the global batch
        row: dict[str, Any] = {
            "step": self.step,
            "loss": ce_sum / n_micro,
            "aux_loss": aux_sum / n_micro,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": (self.step + 1) * n_tokens,
            "step_s": dt,
            "tokens_per_s": n_tokens / dt,
            "val_loss": None,
            "skipped": skipped,
        }
        self._profile_columns(row, t0, t1)
        for i, (layer, router) in enumerate(zip(model.moe_layer_ids(), model.routers(), strict=True)):
            row[f"L{layer}_load"] = load_LE[i].tolist()
            row[f"L{layer}_fanout"] = float(assigned_L[i]) / n_tokens
            for name in stat_names[i]:
                row[f"L{layer}_{name}"] = stat_LE[i, name].tolist()
            for name, val in router.state_stats().items():
                row[f"L{layer}_{name}"] = val.cpu().tolist()
        self.step += 1
        self.last_row = row
        return row

    def _profile_columns(self, row: dict[str, Any], t0: float, t1: float) -> None:
        """The step clock's columns (and a traced step's events) for the step t0..t1."""
        clock = self.clock
        if clock is None:
            return
        from moedist.training import profile

        seconds = clock.take()
        if self.dist is not None:
            # a2a: token exchanges (dispatch and combine, forward and backward); pool: global
            # routing statistics (token counts, radix-select cutoffs); grad_sync: the
            # dense-gradient all-reduce; comm_s their sum.
            row.update(profile.comm_seconds(seconds))
        if clock.spans:
            row.update(profile.step_columns(seconds, *clock.take_counts()))
        if clock.tracing:
            self.trace[self.step] = profile.step_events(clock, t0, t1, profile.wall_offset())

    def _skipped_row(self, err: Exception, lr: float, t0: float) -> dict[str, Any]:
        """The forward pass of this step produced NaN router logits: stop or skip."""
        if self.grad_sync is not None:
            self.grad_sync.reset()
        self.opt.zero_grad(set_to_none=True)
        self.model.train()  # drops the routers' pending step statistics
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteError(
                f"step {self.step} is not finite ({err}); no update was applied and nothing non-finite saved: "
                "lower train.lr, or set train.nonfinite=skip",
                self.step,
            )
        self.skipped += 1
        t1 = time.perf_counter()
        dt = t1 - t0
        n_tokens = self.cfg.train.batch_size * self.cfg.model.seq_len
        row = {"step": self.step, "loss": math.nan, "aux_loss": math.nan, "lr": lr, "grad_norm": math.nan,
               "tokens": (self.step + 1) * n_tokens, "step_s": dt, "tokens_per_s": n_tokens / dt, "val_loss": None,
               "skipped": True}  # fmt: skip
        self._profile_columns(row, t0, t1)  # the columns every row has (parquet keeps the first row's)
        for layer, router in zip(self.model.moe_layer_ids(), self.model.routers(), strict=True):
            row[f"L{layer}_load"] = None  # nothing was routed to completion
            row[f"L{layer}_fanout"] = None
            for name in router.plan_stat_names():
                row[f"L{layer}_{name}"] = None
            for name, val in router.state_stats().items():
                row[f"L{layer}_{name}"] = val.cpu().tolist()
        self.step += 1
        self.last_row = row
        return row

    def _nonfinite_step(self, loss_sum: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm is not finite: stop, naming where, or skip."""
        where = first_nonfinite(self.model, "grad", self.expert_ids)
        if self.dist is not None:
            # Expert gradients live on their owners: the first culprit in rank order.
            from moedist.parallel import gather_objects

            where = next((w for w in gather_objects(where, self.dist.group) if w), None)
        n_micro = self.cfg.train.micro_batches
        what = f"loss {loss_sum / n_micro:.4g}, gradient norm {grad_norm:.4g}"
        if where:
            what += f", deepest non-finite gradient in {where}"
        self.opt.zero_grad(set_to_none=True)
        self.model.train()  # drops the routers' pending step statistics (ET's logits)
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteError(
                f"step {self.step} is not finite ({what}); no update was applied and nothing non-finite saved: "
                "lower train.lr, or set train.nonfinite=skip to skip such steps",
                self.step,
            )
        self.skipped += 1

    def clip_gradients(self, sq_exp: float | None = None) -> float:
        """Clip to train.grad_clip by the global gradient norm; return the norm.

        With expert parallelism, replicated gradients are identical on every worker (count
        them once) while each expert's gradient lives on its owner (sum over workers).
        ``sq_exp``: the expert gradients' squared norm already summed over the workers
        (`expert_grad_sq`, all-reduced by the caller); None: all-reduced here.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        if self.dist is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from moedist.parallel import all_reduce_sum, expert_parameters

        sharded = {id(p) for p in expert_parameters(self.model)}
        sq_rep = sum(float(p.grad.double().square().sum()) for p in params if id(p) not in sharded)
        if sq_exp is None:
            sq_exp = float(all_reduce_sum(torch.tensor([expert_grad_sq(self.model)], dtype=torch.float64),
                                          self.dist.group)[0])  # fmt: skip
        total = math.sqrt(sq_rep + sq_exp)
        if math.isfinite(max_norm) and total > max_norm:
            scale = max_norm / (total + 1e-6)
            for p in params:
                p.grad.mul_(scale)
        return total

    def evaluate(self) -> EvalResult:
        t = self.cfg.train
        d = self.dist
        if d is None:
            shard, reduce = (0, 1), None
        else:
            from moedist.parallel import all_reduce_sum

            shard, reduce = (d.rank, d.world), (lambda x: all_reduce_sum(x, d.group))
        return evaluate(
            self.model, self.dataset, self.cfg.model.seq_len, t.batch_size, t.eval_tokens, self.autocast_dtype,
            shard=shard, all_reduce=reduce,
        )  # fmt: skip


def expert_grad_sq(model: torch.nn.Module) -> float:
    """This worker's expert (sharded) gradients' squared norm, in float64, in parameter order
    (the same sum wherever it is taken, so a fused and a plain step agree bitwise)."""
    from moedist.parallel import expert_parameters

    sharded = {id(p) for p in expert_parameters(model)}
    return sum(float(p.grad.double().square().sum()) for p in model.parameters()
               if p.grad is not None and id(p) in sharded)  # fmt: skip


def resume_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """RUN/config.toml with `overrides` applied (e.g. more steps, another worker count)."""
    cfg_path = Path(run_dir) / "config.toml"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a run folder (no config.toml)")
    cfg = from_dict(tomllib.loads(cfg_path.read_text()))
    if not overrides:
        return cfg
    new = from_dict(deep_update(to_dict(cfg), overrides))
    # The checkpoint holds the model's tensors: a resumed run keeps their shapes and the router.
    old_m, new_m = to_dict(cfg)["model"], to_dict(new)["model"]
    for key in sorted(old_m):
        if key != "seq_len" and old_m[key] != new_m[key]:
            hint = " (a running job changes them with `moedist ctl scale --experts`)" if key == "n_experts" else ""
            raise ConfigError(f"model.{key}: a resumed run keeps the model of its checkpoint ({old_m[key]} in "
                              f"{cfg_path}), cannot change to {new_m[key]}{hint}")  # fmt: skip
    if new.router.kind != cfg.router.kind:
        raise ConfigError(f"router.kind: a resumed run keeps its router ({cfg.router.kind}), cannot change to "
                          f"{new.router.kind}")  # fmt: skip
    return new


def read_resume_checkpoint(
    run_dir: Path, cfg: RunConfig
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], Path]:
    """(objects {model, optim}, state, metric rows, path) of the newest checkpoint that
    verifies (older ones are tried, with a warning, when it does not), after checking that
    it was trained on the tokenizer of cfg's data."""
    ckpt, objs, state = load_latest_checkpoint(Path(run_dir), ["model", "optim"])
    dataset = load_dataset(cfg)
    if dataset.tokenizer.to_spec() != state["tokenizer"]:
        raise CheckpointError(
            f"checkpoint '{ckpt}' was trained with a different tokenizer than the data at "
            f"'{cfg.data.path or 'the embedded corpus'}'"
        )
    return objs, state, pq.read_table(ckpt / "metrics.parquet").to_pylist(), ckpt


def load_trained(run_dir: Path, device: str = "cpu") -> tuple[RunConfig, MoETransformer, Any, int]:
    """(config, model in eval mode, tokenizer, step) from a run folder's newest checkpoint
    that verifies (files match the manifest, every tensor finite); older ones are tried,
    with a warning, when it does not."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"'{run_dir}' is not a run folder (no config.toml)")
    ckpt, objs, state = load_latest_checkpoint(run_dir, ["model"], map_location=device)
    cfg = from_dict(state["config"])
    model = MoETransformer(cfg.model, cfg.router)
    try:
        model.load_state_dict(objs["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}' does not fit its own config: {e}") from e
    return cfg, model.to(device).eval(), tokenizer_from_spec(state["tokenizer"]), int(state["step"])

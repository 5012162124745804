"""Single-process training loop: the oracle the expert-parallel runtime must match.

A run folder holds config.toml (resolved), metrics.parquet (a row per step), summary.json,
checkpoints/ and plots/. Legend: B batch, S positions, E experts.
"""

from __future__ import annotations

import io
import json
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
import tomli_w
import torch

from moedist.config import ConfigError, RunConfig, deep_update, from_dict, to_dict
from moedist.data import BatchSampler, TokenDataset, tokenizer_from_spec
from moedist.model.transformer import MoETransformer
from moedist.training.checkpoint import (
    CheckpointError,
    load_latest_checkpoint,
    save_checkpoint,
)
from moedist.training.evaluate import EvalResult, evaluate


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
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
    """Owns a model, its optimiser and the data sampler; single-process, or one worker of an
    expert-parallel job when given a DistContext (then the Ray coordinator owns the run folder)."""

    def __init__(self, cfg: RunConfig, run_dir: Path | None, dataset: TokenDataset,
                 dist_ctx: DistContext | None = None):  # fmt: skip
        if dist_ctx is None and cfg.workers != 1:
            raise ConfigError(
                f"workers: {cfg.workers} requested, but this trainer is single-process (workers = 1); "
                "the expert-parallel Ray runtime drives multi-worker runs"
            )
        if dataset.vocab_size != cfg.model.vocab_size:
            cfg.model.vocab_size = dataset.vocab_size  # the tokenizer decides the vocabulary
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dataset = dataset
        self.dist = dist_ctx
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        # The full model is built (and seeded) the same way on every worker, so a worker's
        # expert shard starts from exactly the weights the 1-process model has.
        self.model = build_model(cfg).to(self.device)
        if dist_ctx is not None:
            from moedist.parallel import CommClock, DistributedPoolOps, shard_model

            shard_model(self.model, dist_ctx.placement, dist_ctx.rank, dist_ctx.group)
            # One clock for every collective of the step: metrics split compute / communication.
            self.clock = CommClock()
            for block in self.model.moe_blocks():
                block.dispatcher.clock = self.clock
            # Routers now ask the whole cluster for pool statistics (exact radix select).
            for router in self.model.routers():
                router.pool = DistributedPoolOps(dist_ctx.group, self.clock)
                if hasattr(router, "local_experts_E") and dist_ctx.nodes is not None:
                    # ETR's locality loss: the experts whose owner shares this worker's node
                    here, P = dist_ctx.nodes[dist_ctx.rank], dist_ctx.placement
                    on_node = [dist_ctx.nodes[P.owner(e)] == here for e in range(P.n_experts)]
                    router.local_experts_E = torch.tensor(on_node, device=self.device)
        self.opt = make_optimizer(self.model, cfg)
        self.sampler = BatchSampler(dataset, cfg.model.seq_len, cfg.train.batch_size, cfg.train.seed)
        self.step = 0
        self.rows: list[dict[str, Any]] = []
        self.last_eval: EvalResult | None = None
        self.autocast_dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None

    # ------------------------------------------------------------ run folder
    def init_run_dir(self) -> None:
        """Create the run folder and write the resolved config."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "plots").mkdir(exist_ok=True)
        write_atomic(self.run_dir / "config.toml", tomli_w.dumps(to_dict(self.cfg)).encode())

    @classmethod
    def resume(cls, run_dir: Path, overrides: dict[str, Any] | None = None) -> Trainer:
        """Rebuild a trainer from RUN/config.toml and its newest checkpoint (written by a
        single-process or a distributed run: the checkpoint holds the whole model)."""
        cfg = resume_config(run_dir, overrides)
        objs, state, rows, ckpt = read_resume_checkpoint(run_dir, cfg)
        tr = cls(cfg, run_dir, load_dataset(cfg))
        try:
            tr.model.load_state_dict(objs["model"])
            tr.opt.load_state_dict(objs["optim"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint '{ckpt}' does not fit the model in config.toml: {e}") from e
        tr.step = int(state["step"])
        tr.rows = rows
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        return tr

    def save(self) -> Path:
        """Checkpoint the current state (model, optimiser, metrics so far)."""
        state = {
            "step": self.step,
            "tokenizer": self.dataset.tokenizer.to_spec(),
            "config": to_dict(self.cfg),
            "torch_rng": torch.get_rng_state().tolist(),
        }
        return save_checkpoint(
            self.run_dir,
            self.step,
            {"model": self.model.state_dict(), "optim": self.opt.state_dict()},
            state,
            blobs={"metrics.parquet": parquet_bytes(self.rows)},
            keep=self.cfg.train.keep_checkpoints,
        )

    # ----------------------------------------------------------------- steps
    def train_step(self) -> dict[str, Any]:
        """One optimiser step over the global batch (split into micro-batches)."""
        cfg, model = self.cfg, self.model
        model.train()
        t0 = time.perf_counter()
        d = self.dist
        if d is None:
            batch_BS1 = self.sampler.global_batch(self.step)
        else:
            batch_BS1 = self.sampler.local_batch(self.step, d.rank, d.world)
        n_micro = cfg.train.micro_batches
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        ce_sum, aux_sum = 0.0, 0.0
        n_moe = len(model.moe_blocks())
        load_LE = torch.zeros(n_moe, cfg.model.n_experts, dtype=torch.int64)
        assigned_L = torch.zeros(n_moe, dtype=torch.int64)
        for mb in np.split(batch_BS1, n_micro):
            b = torch.from_numpy(np.ascontiguousarray(mb)).to(self.device)
            with torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
            ):
                out = model(b[:, :-1], b[:, 1:])
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
            (loss / n_micro).backward()
            ce_sum += float(out.loss.detach())
            aux_sum += float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
            for i, plan in enumerate(out.plans):
                load_LE[i] += plan.load_E.cpu()
                assigned_L[i] += plan.token_idx_A.numel()
        if d is not None:
            from moedist.parallel import all_reduce_sum, sync_gradients

            with self.clock.measure("grad_sync"):
                sync_gradients(model, d.group)
            # Every worker reports the global numbers: losses averaged, loads summed.
            stats = all_reduce_sum(torch.tensor([ce_sum, aux_sum], dtype=torch.float64), d.group) / d.world
            ce_sum, aux_sum = float(stats[0]), float(stats[1])
            load_LE = all_reduce_sum(load_LE, d.group)
            assigned_L = all_reduce_sum(assigned_L, d.group)
        if not math.isfinite(ce_sum):
            raise FloatingPointError(f"loss became {ce_sum} at step {self.step}; lower train.lr")
        grad_norm = self.clip_gradients()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        model.routing_step_end()
        dt = time.perf_counter() - t0
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
        }
        if d is not None:
            comm = self.clock.take()
            # a2a: token exchanges (forward and backward); pool: global routing statistics
            # (token counts, radix-select cutoffs); grad_sync: the dense-gradient all-reduce.
            for kind in ("a2a", "pool", "grad_sync"):
                row[f"{kind}_s"] = comm.get(kind, 0.0)
            row["comm_s"] = sum(comm.values())
        for i, (layer, router) in enumerate(zip(model.moe_layer_ids(), model.routers(), strict=True)):
            row[f"L{layer}_load"] = load_LE[i].tolist()
            row[f"L{layer}_fanout"] = float(assigned_L[i]) / n_tokens
            for name, val in router.state_stats().items():
                row[f"L{layer}_{name}"] = val.cpu().tolist()
        self.step += 1
        return row

    def clip_gradients(self) -> float:
        """Clip to train.grad_clip by the global gradient norm; return the norm.

        With expert parallelism, replicated gradients are identical on every worker (count
        them once) while each expert's gradient lives on its owner (sum over workers).
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        if self.dist is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from moedist.parallel import all_reduce_sum, expert_parameters

        sharded = {id(p) for p in expert_parameters(self.model)}
        sq_rep = sum(float(p.grad.double().square().sum()) for p in params if id(p) not in sharded)
        sq_exp = torch.tensor([sum(float(p.grad.double().square().sum()) for p in params if id(p) in sharded)],
                              dtype=torch.float64)  # fmt: skip
        total = math.sqrt(sq_rep + float(all_reduce_sum(sq_exp, self.dist.group)[0]))
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
        self.last_eval = evaluate(
            self.model, self.dataset, self.cfg.model.seq_len, t.batch_size, t.eval_tokens, self.autocast_dtype,
            shard=shard, all_reduce=reduce,
        )  # fmt: skip
        return self.last_eval

    # ------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train to cfg.train.steps, evaluating and checkpointing; return the summary."""
        from tqdm import tqdm

        cfg = self.cfg
        total = cfg.train.steps
        t_start = time.perf_counter()
        first = self.step
        bar = tqdm(total=total, initial=self.step, disable=not cfg.train.progress, unit="step", dynamic_ncols=True)
        try:
            while self.step < total:
                row = self.train_step()
                done = self.step
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < total:
                    row["val_loss"] = self.evaluate().val_loss
                self.rows.append(row)
                bar.update(1)
                bar.set_postfix(self._postfix(row), refresh=False)
                if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done < total:
                    self.save()
        finally:
            bar.close()
        final_eval = self.evaluate()
        if self.rows and self.rows[-1]["step"] == total - 1:
            self.rows[-1]["val_loss"] = final_eval.val_loss
        self.save()
        wall = time.perf_counter() - t_start
        self.write_metrics()
        summary = self.summary(wall, self.step - first)
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1).encode())
        from moedist.training.plots import write_plots

        write_plots(self.run_dir, self.rows, final_eval)
        return summary

    def _postfix(self, row: dict[str, Any]) -> dict[str, str]:
        post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
        loads = [np.asarray(v) for k, v in row.items() if k.endswith("_load")]
        if loads:
            fan = np.mean([v for k, v in row.items() if k.endswith("_fanout")])
            ratio = max(lo.max() / max(lo.mean(), 1e-9) for lo in loads)
            post.update({"fanout": f"{fan:.2f}", "max/mean load": f"{ratio:.2f}"})
        return post

    def write_metrics(self) -> None:
        write_atomic(self.run_dir / "metrics.parquet", parquet_bytes(self.rows))

    def summary(self, wall_s: float, steps_this_run: int) -> dict[str, Any]:
        """summary.json contents (see `run_summary`)."""
        out = run_summary(self.cfg, self.rows, self.step, wall_s, steps_this_run, self.last_eval,
                          self.model.param_counts())  # fmt: skip
        out["device"] = str(self.device)
        return out


def run_summary(
    cfg: RunConfig,
    rows: list[dict[str, Any]],
    step: int,
    wall_s: float,
    steps_this_run: int,
    ev: EvalResult | None,
    counts: dict[str, int],
) -> dict[str, Any]:
    """summary.json keys shared by single-process and distributed runs.

    Train loss, fan-out and load balance are averaged over the last 10% of steps; the
    throughput is the wall clock of this invocation (evaluation and checkpoints included).
    """
    tail = rows[-max(1, len(rows) // 10) :] if rows else []
    fan_keys = [k for k in (tail[0] if tail else {}) if k.endswith("_fanout")]
    load_keys = [k for k in (tail[0] if tail else {}) if k.endswith("_load")]
    ratios = []
    for k in load_keys:
        load = np.sum([r[k] for r in tail], axis=0)
        ratios.append(float(load.max() / max(load.mean(), 1e-9)))
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    return {
        "router": cfg.router.kind,
        "preset": cfg.preset,
        "steps": step,
        "tokens": step * tokens_per_step,
        "wall_s": wall_s,
        "tokens_per_s": steps_this_run * tokens_per_step / wall_s if wall_s > 0 else 0.0,
        "final_train_loss": float(np.mean([r["loss"] for r in tail])) if tail else None,
        "final_val_loss": ev.val_loss if ev else None,
        "val_tokens": ev.tokens if ev else 0,
        "n_experts": cfg.model.n_experts if cfg.router.kind != "dense" else 0,
        "mean_fanout": ev.mean_fanout if ev else None,
        "train_fanout": float(np.mean([[r[k] for k in fan_keys] for r in tail])) if fan_keys else None,
        "max_load_ratio": max(ratios) if ratios else None,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "workers": cfg.workers,
    }


def resume_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """RUN/config.toml with `overrides` applied (e.g. more steps, another worker count)."""
    cfg_path = Path(run_dir) / "config.toml"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a run folder (no config.toml)")
    cfg = from_dict(tomllib.loads(cfg_path.read_text()))
    return from_dict(deep_update(to_dict(cfg), overrides)) if overrides else cfg


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

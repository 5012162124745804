"""Validation loss and inference-time routing statistics.

ET before its thresholds have settled: while training still routes with the warm-up's
expert choice (fewer than router.et_warmup_steps threshold updates), the thresholds hold
an EMA of early cutoffs that lags the router (a 30-step `fine` run routed 13.7 experts per
token against a target of 3), so a loss measured with them describes neither the model
being trained nor its compute. `evaluate` therefore routes each eval batch with the rule
training uses at that step (expert choice over the batch: the target fanout, comparable
with the other routers' curves), and makes a second pass over the same windows with the
thresholds, which is what inference and generation use: expert choice is not causal (a
token's experts depend on later tokens), so generation always routes with the thresholds.
The second pass (its loss and fanout: `inference_*`) runs only while ET is in warm-up; a
per-layer count taken in the first pass would not do, since deeper layers see other
inputs once the layers before them route differently. `thresholds=True` evaluates with
the thresholds only (one pass, what `generate` computes).

The result says which rule routed (`et_routing`), whether the thresholds had settled, and
warns when the inference fanout (experts per token under the causal rule) is outside
FANOUT_WARN_RANGE times the target (router.top_k).

Legend: B batch, S positions, E experts, L MoE layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moedist.data import TokenDataset, val_batches
from moedist.model.generate import Generation
from moedist.model.transformer import MoETransformer
from moedist.routing.base import NonFiniteLogitsError
from moedist.routing.et import ExpertThresholdRouter

# An inference fanout outside [lo, hi] x router.top_k draws a warning.
FANOUT_WARN_RANGE = (0.5, 2.0)


def hist_fanout(hist_L: list[list[int]]) -> float:
    """Mean over MoE layers of the mean of each layer's fanout histogram (tokens with 0..E experts)."""
    means = [np.average(np.arange(len(h)), weights=h) if sum(h) else 0.0 for h in hist_L]
    return float(np.mean(means)) if means else 0.0


def mean_layer_fanout(assigned_L: list[int] | np.ndarray, tokens_L: list[int] | np.ndarray) -> float:
    """Mean over MoE layers of (assignments / tokens) of each layer."""
    if len(tokens_L) == 0:
        return 0.0
    return float(np.mean([a / t if t else 0.0 for a, t in zip(assigned_L, tokens_L, strict=True)]))


@dataclass
class ETState:
    """Where a model's ET routers stand: threshold updates done vs the warm-up's length."""

    updates: int  # fewest updates over the ET layers (all layers update together)
    warmup_steps: int

    @property
    def settled(self) -> bool:
        """True once training routes with the thresholds (warm-up over)."""
        return self.updates >= self.warmup_steps

    @property
    def progress(self) -> str:
        """E.g. "3 of 10 warm-up updates" (for warnings)."""
        return f"{self.updates} of {self.warmup_steps} warm-up updates"

    def to_json(self) -> dict[str, Any]:
        """The state as report fields (the keys `eval` prints too)."""
        return {"et_updates": self.updates, "et_warmup_steps": self.warmup_steps, "thresholds_settled": self.settled}


def et_state(model: MoETransformer) -> ETState | None:
    """The ET routers' state; None if the model has no ET router."""
    ets = [r for r in model.routers() if isinstance(r, ExpertThresholdRouter)]
    if not ets:
        return None
    return ETState(min(int(r.n_updates) for r in ets), ets[0].cfg.et_warmup_steps)


def fanout_warning(fanout: float, target: float, et: ETState | None, what: str) -> str | None:
    """A warning line when `fanout` (experts per token of the causal rule, for `what`) is
    outside FANOUT_WARN_RANGE x target; None when it is inside or there is no target."""
    lo, hi = FANOUT_WARN_RANGE
    if target <= 0 or lo * target <= fanout <= hi * target:
        return None
    why = ""
    if et is not None:
        why = (f"; ET thresholds have not settled ({et.progress})"
               if not et.settled else f"; ET thresholds after {et.updates} updates")  # fmt: skip
    return (f"{what} routes {fanout:.2f} experts per token, outside [{lo:g}, {hi:g}] x the target "
            f"router.top_k = {target:g}{why}: its loss and cost are not those of the trained router")  # fmt: skip


@dataclass
class EvalResult:
    """Mean next-token loss (nats/token) over `tokens` targets, and routing in eval mode."""

    val_loss: float
    tokens: int
    fanout_hist: list[list[int]] = field(default_factory=list)  # per MoE layer: tokens with 0..E experts
    load: list[list[int]] = field(default_factory=list)  # per MoE layer: tokens per expert
    # ET in warm-up: loss and fanout histogram of the pass routed with the thresholds (the
    # causal rule inference uses); None / empty = the same as val_loss / fanout_hist
    inference_val_loss: float | None = None
    inference_fanout_hist: list[list[int]] = field(default_factory=list)
    target_fanout: float = 0.0  # router.top_k (0: dense)
    et_routing: str | None = None  # ET: "thresholds" or "warmup-expert-choice"; None otherwise
    et_updates: int | None = None
    et_warmup_steps: int | None = None

    @property
    def mean_fanout(self) -> float:
        """Mean routed experts per token of the routing this evaluation used, over MoE layers."""
        return hist_fanout(self.fanout_hist)

    @property
    def inference_hist(self) -> list[list[int]]:
        """Per MoE layer, the fanout histogram of the causal rule inference and generation use."""
        return self.inference_fanout_hist or self.fanout_hist

    @property
    def inference_fanout(self) -> float:
        """Mean experts per token of the causal rule inference and generation use."""
        return hist_fanout(self.inference_hist)

    @property
    def inference_loss(self) -> float:
        """Validation loss under the causal rule (val_loss unless ET routed its warm-up rule)."""
        return self.val_loss if self.inference_val_loss is None else self.inference_val_loss

    @property
    def et(self) -> ETState | None:
        """The ET routers' state at this evaluation; None without ET."""
        if self.et_updates is None or self.et_warmup_steps is None:
            return None
        return ETState(self.et_updates, self.et_warmup_steps)

    @property
    def thresholds_settled(self) -> bool | None:
        """ET: True once training routes with the thresholds (warm-up over); None otherwise."""
        return None if self.et is None else self.et.settled

    @property
    def warnings(self) -> list[str]:
        """Warning lines (inference fanout far from the target)."""
        w = fanout_warning(self.inference_fanout, self.target_fanout, self.et, "inference (eval mode)")
        return [w] if w else []

    def to_json(self) -> dict[str, Any]:
        return {
            "val_loss": self.val_loss,
            "tokens": self.tokens,
            "mean_fanout": self.mean_fanout,
            "inference_fanout": self.inference_fanout,
            "inference_val_loss": self.inference_loss,
            "target_fanout": self.target_fanout,
            "et_routing": self.et_routing,
            "thresholds_settled": self.thresholds_settled,
            "et_updates": self.et_updates,
            "et_warmup_steps": self.et_warmup_steps,
            "warnings": self.warnings,
            "fanout_hist": self.fanout_hist,
            "load": self.load,
            "inference_fanout_hist": self.inference_fanout_hist,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalResult:
        """Inverse of to_json (derived keys are recomputed)."""
        keys = ("val_loss", "tokens", "fanout_hist", "load", "inference_fanout_hist", "target_fanout", "et_routing",
                "et_updates", "et_warmup_steps")  # fmt: skip
        res = cls(**{k: d[k] for k in keys if k in d})
        if d.get("inference_fanout_hist"):
            res.inference_val_loss = d["inference_val_loss"]
        return res


@contextlib.contextmanager
def warmup_rule(model: MoETransformer, on: bool) -> Iterator[None]:
    """ET routers route eval-mode forwards with the warm-up rule while in warm-up (`on`)."""
    ets = [r for r in model.routers() if isinstance(r, ExpertThresholdRouter)]
    before = [r.eval_warmup_rule for r in ets]
    for r in ets:
        r.eval_warmup_rule = on
    try:
        yield
    finally:
        for r, b in zip(ets, before, strict=True):
            r.eval_warmup_rule = b


@torch.no_grad()
def _eval_pass(
    model: MoETransformer,
    dataset: TokenDataset,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    autocast_dtype: torch.dtype | None,
    shard: tuple[int, int],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[float, int, np.ndarray, np.ndarray]:
    """(loss sum, target tokens, fanout hist_L(E+1), load_LE) over the validation windows, summed over workers."""
    device = model.embed.weight.device
    E = model.cfg.n_experts
    n_moe = len(model.moe_blocks())
    hist = np.zeros((n_moe, E + 1), dtype=np.int64)
    load = np.zeros((n_moe, E), dtype=np.int64)
    total_loss, total_tokens = 0.0, 0
    rank, world = shard
    for batch in val_batches(dataset, seq_len, batch_size, max_tokens):
        b = torch.from_numpy(np.ascontiguousarray(batch[rank::world])).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(b[:, :-1])
        logits = out.logits_BSV.reshape(-1, out.logits_BSV.shape[-1])
        total_loss += float(F.cross_entropy(logits, b[:, 1:].reshape(-1), reduction="sum"))
        total_tokens += b[:, 1:].numel()
        for i, plan in enumerate(out.plans):
            hist[i] += np.bincount(plan.fanout_T.cpu().numpy(), minlength=E + 1)[: E + 1]
            load[i] += plan.load_E.cpu().numpy()
    if all_reduce is not None:
        totals = all_reduce(torch.tensor([total_loss, float(total_tokens)], dtype=torch.float64))
        total_loss, total_tokens = float(totals[0]), int(totals[1])
        hist = all_reduce(torch.from_numpy(hist)).numpy()
        load = all_reduce(torch.from_numpy(load)).numpy()
    if total_tokens == 0:
        raise ValueError("validation set is empty: no window of seq_len+1 tokens fits in the val split")
    return total_loss, total_tokens, hist, load


@torch.no_grad()
def evaluate(
    model: MoETransformer,
    dataset: TokenDataset,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    autocast_dtype: torch.dtype | None = None,
    shard: tuple[int, int] = (0, 1),
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    thresholds: bool = False,
) -> EvalResult:
    """Loss over the fixed validation windows, with the model in eval mode.

    With shard=(rank, world), this process takes rows rank::world of every window batch
    (possibly none: it still runs the forward, since MoE layers exchange tokens with the
    other workers) and `all_reduce` sums the totals over workers. ET in warm-up routes
    with expert choice over each eval batch, plus a pass with the thresholds, unless
    `thresholds` (module docstring).
    """
    was_training = model.training
    model.eval()
    et = et_state(model)
    warmup_ec = et is not None and not et.settled and not thresholds
    args = (model, dataset, seq_len, batch_size, max_tokens, autocast_dtype, shard, all_reduce)
    try:
        try:
            with warmup_rule(model, warmup_ec):
                loss, tokens, hist, load = _eval_pass(*args)
        except NonFiniteLogitsError:
            if not warmup_ec:
                raise
            # A model whose router logits are NaN (a run that skips non-finite steps) cannot
            # select by expert choice; the thresholds still route (NaN is above none), and
            # the loss says what the model is: not finite. (Raised on every worker alike.)
            warmup_ec = False
            loss, tokens, hist, load = _eval_pass(*args)
        inf_loss, inf_hist = None, np.zeros((0, 0), dtype=np.int64)
        if warmup_ec:
            inf_loss, inf_tokens, inf_hist, _ = _eval_pass(*args)
            inf_loss /= inf_tokens
    finally:
        model.train(was_training)
    routers = model.routers()
    return EvalResult(
        loss / tokens, tokens, hist.tolist(), load.tolist(),
        inference_val_loss=inf_loss,
        inference_fanout_hist=inf_hist.tolist(),
        target_fanout=float(routers[0].top_k) if routers else 0.0,
        et_routing=None if et is None else ("warmup-expert-choice" if warmup_ec else "thresholds"),
        et_updates=None if et is None else et.updates,
        et_warmup_steps=None if et is None else et.warmup_steps,
    )  # fmt: skip

def generation_warnings(model: MoETransformer, gen: Generation) -> list[str]:
    """Warning lines for a generation recorded with record_routing: its fanout far from the
    target, or (ET) thresholds that have not settled; generation routes with them either way."""
    routers = model.routers()
    if not gen.routing_SE or not routers:
        return []
    fanout = mean_layer_fanout([int(m.sum()) for m in gen.routing_SE], [m.shape[0] for m in gen.routing_SE])
    et = et_state(model)
    w = fanout_warning(fanout, float(routers[0].top_k), et, "generation")
    if w is None and et is not None and not et.settled:
        w = (f"generation routes with ET thresholds that have not settled ({et.progress}): "
             f"{fanout:.2f} experts per token, target router.top_k = {routers[0].top_k}")
    return [w] if w else []

"""Validation loss and inference-time routing statistics.

Legend: B batch, S positions, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from moedist.data import TokenDataset, val_batches
from moedist.model.transformer import MoETransformer


@dataclass
class EvalResult:
    """Mean next-token loss (nats/token) over `tokens` targets, and routing in eval mode."""

    val_loss: float
    tokens: int
    fanout_hist: list[list[int]] = field(default_factory=list)  # per MoE layer: tokens with 0..E experts
    load: list[list[int]] = field(default_factory=list)  # per MoE layer: tokens per expert

    @property
    def mean_fanout(self) -> float:
        """Mean routed experts per token, averaged over MoE layers."""
        if not self.fanout_hist:
            return 0.0
        means = [np.average(np.arange(len(h)), weights=h) if sum(h) else 0.0 for h in self.fanout_hist]
        return float(np.mean(means))

    def to_json(self) -> dict:
        return {
            "val_loss": self.val_loss,
            "tokens": self.tokens,
            "mean_fanout": self.mean_fanout,
            "fanout_hist": self.fanout_hist,
            "load": self.load,
        }


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
) -> EvalResult:
    """Loss over the fixed validation windows, with the model in eval mode.

    With shard=(rank, world), this process takes rows rank::world of every window batch
    (possibly none: it still runs the forward, since MoE layers exchange tokens with the
    other workers) and `all_reduce` sums the totals over workers.
    """
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    E = model.cfg.n_experts
    n_moe = len(model.moe_blocks())
    hist = np.zeros((n_moe, E + 1), dtype=np.int64)
    load = np.zeros((n_moe, E), dtype=np.int64)
    total_loss, total_tokens = 0.0, 0
    try:
        for batch in val_batches(dataset, seq_len, batch_size, max_tokens):
            rank, world = shard
            b = torch.from_numpy(np.ascontiguousarray(batch[rank::world])).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = model(b[:, :-1])
            logits = out.logits_BSV.reshape(-1, out.logits_BSV.shape[-1])
            total_loss += float(F.cross_entropy(logits, b[:, 1:].reshape(-1), reduction="sum"))
            total_tokens += b[:, 1:].numel()
            for i, plan in enumerate(out.plans):
                hist[i] += np.bincount(plan.fanout_T.cpu().numpy(), minlength=E + 1)[: E + 1]
                load[i] += plan.load_E.cpu().numpy()
    finally:
        model.train(was_training)
    if all_reduce is not None:
        totals = all_reduce(torch.tensor([total_loss, float(total_tokens)], dtype=torch.float64))
        total_loss, total_tokens = float(totals[0]), int(totals[1])
        hist = all_reduce(torch.from_numpy(hist)).numpy()
        load = all_reduce(torch.from_numpy(load)).numpy()
    if total_tokens == 0:
        raise ValueError("validation set is empty: no window of seq_len+1 tokens fits in the val split")
    return EvalResult(total_loss / total_tokens, total_tokens, hist.tolist(), load.tolist())

"""Autoregressive sampling with the KV cache.

Legend: S positions, E experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moedist.model.attention import KVCache
from moedist.model.transformer import MoETransformer


@dataclass
class Generation:
    """Generated ids (prompt included) and, if asked, the routing masks per MoE layer."""

    ids: list[int]
    routing_SE: list[Tensor] = field(default_factory=list)  # bool [S_processed, E] per MoE layer


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    record_routing: bool = False,
) -> Generation:
    """Sample `max_new_tokens` after `prompt_ids` (temperature 0 = greedy).

    Runs in eval mode: ET uses its frozen thresholds, so each token's routing is fixed
    the moment it is processed. The context is capped at model.cfg.seq_len positions.
    """
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    limit = model.cfg.seq_len
    ids = list(prompt_ids)[-limit:]
    cache = KVCache.empty(len(model.blocks))
    routing: list[list[Tensor]] = [[] for _ in model.moe_blocks()]
    step_ids = ids
    try:
        for _ in range(max_new_tokens + 1):
            out = model(torch.tensor([step_ids], device=device), cache=cache)
            if record_routing:
                for layer, plan in enumerate(out.plans):
                    routing[layer].append(plan.mask_TE().cpu())
            if len(ids) - len(prompt_ids[-limit:]) >= max_new_tokens or cache.length >= limit:
                break
            logits_V = out.logits_BSV[0, -1].cpu()
            if temperature == 0:
                nxt = int(torch.argmax(logits_V))
            else:
                logits_V = logits_V / temperature
                if top_k > 0:
                    kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
                    logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=gen))
            ids.append(nxt)
            step_ids = [nxt]
    finally:
        model.train(was_training)
    return Generation(ids=ids, routing_SE=[torch.cat(r) for r in routing] if record_routing else [])

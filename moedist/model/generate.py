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
    """Generated ids (the whole prompt included) and, if asked, per processed position the
    routing masks of each MoE layer and the logits.

    Positions are processed for ids[first:], first = max(0, len(prompt) - seq_len): row i
    of `routing_SE` and `logits_SV` belongs to ids[first + i] (its logits predict the next
    token; the last row's were not sampled from).
    """

    ids: list[int]
    routing_SE: list[Tensor] = field(default_factory=list)  # bool [S_processed, E] per MoE layer
    logits_SV: Tensor | None = None  # [S_processed, V]


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    record_routing: bool = False,
    record_logits: bool = False,
) -> Generation:
    """Sample `max_new_tokens` after `prompt_ids` (temperature 0 = greedy).

    Runs in eval mode: ET uses its frozen thresholds, so each token's routing is fixed
    the moment it is processed. The model sees at most model.cfg.seq_len positions (what
    it was trained on): up to seq_len tokens, each new token is one step on the KV cache;
    beyond, the context is a window of the last seq_len tokens, recomputed for every new
    token (a cached key carries its absolute RoPE position and the context it was computed
    in, so it cannot be reused once the window slides). Either way the logits equal those
    of a full forward over the window (teacher forcing).
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
    ids = list(prompt_ids)
    cache: KVCache | None = KVCache.empty(len(model.blocks))
    routing: list[list[Tensor]] = [[] for _ in model.moe_blocks()]
    logits: list[Tensor] = []
    step_ids = ids[-limit:]
    try:
        for i in range(max_new_tokens + 1):
            if cache is not None and cache.length + len(step_ids) > limit:
                cache = None  # the window slides from here on
            if cache is None:
                step_ids = ids[-limit:]
            out = model(torch.tensor([step_ids], device=device), cache=cache)
            new = len(step_ids) if cache is not None else 1  # positions processed for the first time
            if record_routing:
                for layer, plan in enumerate(out.plans):
                    routing[layer].append(plan.mask_TE()[-new:].cpu())
            if record_logits:
                logits.append(out.logits_BSV[0, -new:].cpu())
            if i == max_new_tokens:
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
    return Generation(
        ids=ids,
        routing_SE=[torch.cat(r) for r in routing] if record_routing else [],
        logits_SV=torch.cat(logits) if record_logits else None,
    )

"""Causal multi-head attention with rotary embeddings and a KV cache.

Legend: B batch, S new positions, P cached (past) positions, H heads, K head dim, D model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rope_cos_sin(positions_S: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [S, K/2] for rotary embeddings (computed in float32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions_S.device, dtype=torch.float32) / head_dim))
    angles_SK = positions_S.to(torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    return angles_SK.cos(), angles_SK.sin()


def apply_rope(x_BHSK: Tensor, cos_SK: Tensor, sin_SK: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of each head's features."""
    half = x_BHSK.shape[-1] // 2
    x1, x2 = x_BHSK[..., :half], x_BHSK[..., half:]
    cos, sin = cos_SK.to(x_BHSK.dtype), sin_SK.to(x_BHSK.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class KVCache:
    """Per-layer cached keys/values for incremental decoding."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)
    length: int = 0  # positions already cached

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls(keys=[None] * n_layers, values=[None] * n_layers, length=0)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (no biases), RoPE on queries and keys."""

    def __init__(self, d_model: int, n_heads: int, rope_base: float, init_std: float, out_std: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.rope_base = rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=init_std)
        nn.init.normal_(self.out.weight, std=out_std)

    def forward(self, x_BSD: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, S, D = x_BSD.shape
        H, K = self.n_heads, self.head_dim
        past = cache.length if cache is not None else 0
        q, k, v = self.qkv(x_BSD).view(B, S, 3, H, K).permute(2, 0, 3, 1, 4)  # each [B, H, S, K]
        positions_S = torch.arange(past, past + S, device=x_BSD.device)
        cos, sin = rope_cos_sin(positions_S, K, self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if cache.keys[layer] is not None:
                k = torch.cat((cache.keys[layer], k), dim=2)
                v = torch.cat((cache.values[layer], v), dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        if past == 0:
            y_BHSK = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # New position i (absolute past+i) may see keys 0..past+i.
            P = k.shape[2]
            allowed_SP = torch.arange(P, device=x_BSD.device).unsqueeze(0) <= positions_S.unsqueeze(1)
            y_BHSK = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_SP)
        return self.out(y_BHSK.transpose(1, 2).reshape(B, S, D))

"""Decoder-only MoE language model (single-device math: no ray, no torch.distributed).

Legend: B batch, S sequence positions, T = B*S tokens, D model width, V vocabulary,
E routed experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedist.config import ModelConfig, RouterConfig
from moedist.model.attention import CausalSelfAttention, KVCache
from moedist.model.experts import DenseMLP
from moedist.model.moe import MoEBlock
from moedist.routing import Router, RoutingPlan


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, moe: bool, out_std: float):
        super().__init__()
        D = cfg.d_model
        self.norm1 = RMSNorm(D, cfg.norm_eps)
        self.attn = CausalSelfAttention(D, cfg.n_heads, cfg.rope_base, cfg.init_std, out_std)
        self.norm2 = RMSNorm(D, cfg.norm_eps)
        self.ffn: nn.Module
        if moe:
            self.ffn = MoEBlock(
                D,
                cfg.n_experts,
                cfg.resolved_expert_width,
                cfg.n_shared,
                cfg.mlp,
                router_cfg,
                cfg.init_std,
                out_std,
            )
        else:
            self.ffn = DenseMLP(D, cfg.resolved_dense_width, activation=cfg.mlp, init_std=cfg.init_std, out_std=out_std)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoEBlock)

    def forward(self, x_BSD: Tensor, cache: KVCache | None, layer: int) -> tuple[Tensor, RoutingPlan | None]:
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD), cache, layer)
        h_BSD = self.norm2(x_BSD)
        if not self.is_moe:
            return x_BSD + self.ffn(h_BSD), None
        B, S, D = h_BSD.shape
        y_TD, plan = self.ffn(h_BSD.reshape(B * S, D))
        return x_BSD + y_TD.view(B, S, D), plan


@dataclass
class ModelOutput:
    """What a forward pass returns."""

    logits_BSV: Tensor
    loss: Tensor | None = None  # mean next-token cross-entropy (nats)
    aux_loss: Tensor | None = None  # sum of router aux losses (already scaled)
    plans: list[RoutingPlan] = field(default_factory=list)  # one per MoE layer, in depth order


class MoETransformer(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> LM head."""

    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.router_cfg = router_cfg
        # Residual-output projections scaled down with depth (GPT-2 style).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList()
        for i in range(cfg.n_layers):
            moe = router_cfg.kind != "dense" and not (cfg.first_layer_dense and i == 0)
            self.blocks.append(Block(cfg, router_cfg, moe, out_std))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    # ----------------------------------------------------------------- queries
    def moe_blocks(self) -> list[MoEBlock]:
        """MoE FFNs in depth order."""
        return [b.ffn for b in self.blocks if b.is_moe]

    def moe_layer_ids(self) -> list[int]:
        """Depth index of each MoE layer."""
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    def routers(self) -> list[Router]:
        return [m.router for m in self.moe_blocks()]

    def routing_step_end(self) -> None:
        """Once per optimiser step: update router state (ET thresholds, LF biases). The
        routers of one class update together, so they can share one statistics exchange."""
        by_class: dict[type[Router], list[Router]] = {}
        for r in self.routers():
            by_class.setdefault(type(r), []).append(r)
        for cls, routers in by_class.items():
            cls.step_end_all(routers)

    def _new_pool(self) -> None:
        """Tell each distinct routing pool that a forward pass (new tokens) begins."""
        pools = {id(r.pool): r.pool for r in self.routers()}
        for pool in pools.values():
            pool.new_pool()

    def param_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one token at the target fanout."""
        total = sum(p.numel() for p in self.parameters())
        expert = sum(p.numel() for m in self.moe_blocks() for p in m.experts.parameters())
        per_expert = expert / max(1, self.cfg.n_experts)
        active = total - expert + per_expert * self.router_cfg.top_k
        return {"total": total, "routed_expert": expert, "active": int(active)}

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        idx_BS: Tensor,
        targets_BS: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """Logits for every position; loss if targets are given (ignore_index = -1)."""
        self._new_pool()
        x_BSD = self.embed(idx_BS)
        plans: list[RoutingPlan] = []
        for i, block in enumerate(self.blocks):
            x_BSD, plan = block(x_BSD, cache, i)
            if plan is not None:
                plans.append(plan)
        if cache is not None:
            cache.length += idx_BS.shape[1]
        logits_BSV = self.lm_head(self.norm(x_BSD))
        # float32 for the loss under bf16 autocast; a float64 model keeps its precision
        if logits_BSV.dtype != torch.float64:
            logits_BSV = logits_BSV.float()
        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits_BSV.view(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1), ignore_index=-1)
        aux = [p.aux_loss for p in plans if p.aux_loss is not None]
        return ModelOutput(logits_BSV, loss, torch.stack(aux).sum() if aux else None, plans)

"""CUDA paths (torch fallbacks of the kernels): the same numbers as on the CPU."""

from __future__ import annotations

import pytest
import torch

from moedist.config import ModelConfig, RouterConfig
from moedist.model.transformer import MoETransformer


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tc", "ec", "et"])
def test_cuda_forward_backward_matches_cpu(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, seq_len=32, d_model=32, n_layers=2, n_heads=2, n_experts=4)
    cpu = MoETransformer(cfg, RouterConfig(kind=kind, et_warmup_steps=0)).double()
    gpu = MoETransformer(cfg, RouterConfig(kind=kind, et_warmup_steps=0)).double()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    idx = torch.randint(0, 64, (2, 32))
    out_c = cpu(idx, idx)
    out_g = gpu(idx.cuda(), idx.cuda())
    torch.testing.assert_close(out_g.loss.cpu(), out_c.loss, rtol=1e-9, atol=1e-9)
    out_c.loss.backward()
    out_g.loss.backward()
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-7, atol=1e-9, msg=name)

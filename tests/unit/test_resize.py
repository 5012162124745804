"""Changing the number of experts (moedist.model.resize): splitting is function-preserving
for threshold routing, Adam's state follows the copies, dropping keeps the rest exact."""

from __future__ import annotations

import pytest
import torch

from moedist.config import build_config
from moedist.model.resize import param_slots, plan_resize
from moedist.training.trainer import Trainer, load_dataset, resize_experts

SMALL = {"model": {"d_model": 32, "n_heads": 2, "n_layers": 3, "seq_len": 32, "n_experts": 8},
         "train": {"batch_size": 8, "eval_every": 0, "progress": False, "warmup_steps": 2, "steps": 20},
         "router": {"top_k": 2, "et_warmup_steps": 2}}  # fmt: skip


def trained(router: str, steps: int = 5) -> Trainer:
    over = {k: dict(v) for k, v in SMALL.items()}
    over["router"]["kind"] = router
    cfg = build_config("tiny", None, over)
    tr = Trainer(cfg, load_dataset(cfg))
    for _ in range(steps):
        tr.train_step()
    return tr


@pytest.fixture(scope="module")
def et() -> Trainer:
    """A few ET steps (thresholds and Adam moments set), shared: tests only read it."""
    return trained("et")


def eval_loss(tr: Trainer, x_BS: torch.Tensor, y_BS: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Eval-mode (frozen thresholds, no guard) loss and logits on a fixed batch, float64."""
    tr.model.eval().double()
    with torch.no_grad():
        out = tr.model(x_BS, y_BS)
    tr.model.float().train()
    return out.loss.item(), out.logits_BSV


def resized(tr: Trainer, n: int, noise: float = 0.0) -> tuple[Trainer, list[dict]]:
    tensors, extra = tr.state()
    cfg2, tensors2, report = resize_experts(tr.cfg, tensors, n, None, noise)
    tr2 = Trainer(cfg2, tr.dataset)
    tr2.load_state(tensors2, extra, tr.step)
    return tr2, report


def batch(tr: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(tr.sampler.global_batch(1000)[:4])
    return rows[:, :-1], rows[:, 1:]


def test_plans_split_the_most_loaded_and_drop_the_least():
    p = plan_resize(4, 6, [5, 9, 1, 7])
    assert p.src == [0, 1, 2, 3, 1, 3] and p.split == [1, 3] and p.share() == [1, 2, 1, 2, 2, 2]
    p = plan_resize(2, 6, [3, 1])  # beyond 2x: the highest load per copy is split again
    assert p.src == [0, 1, 0, 0, 0, 1] and p.share() == [4, 2, 4, 4, 4, 2]  # 3/1, 1.5, 1 (tie: lower id), then 1
    p = plan_resize(4, 2, [5, 9, 1, 7])
    assert p.src == [1, 3] and p.dropped == [0, 2]
    with pytest.raises(ValueError, match="3 loads for 4 experts"):
        plan_resize(4, 6, [1, 2, 3])


@pytest.mark.parametrize("router", ["et", "ec", "lf", "tc"])
def test_splitting_8_to_16_experts(router, et):
    tr = et if router == "et" else trained(router, steps=3)
    x_BS, y_BS = batch(tr)
    before, logits_before = eval_loss(tr, x_BS, y_BS)
    tr2, report = resized(tr, 16)
    assert [r["experts_after"] for r in report] == [16, 16] and report[0]["split"] == list(range(8))
    after, logits_after = eval_loss(tr2, x_BS, y_BS)
    if router == "et":
        # a per-expert cutoff and a sigmoid gate: the copies get the tokens the source got
        # and their halves add up to its output, so the function is the same
        assert after == pytest.approx(before, abs=1e-5)
        torch.testing.assert_close(logits_after, logits_before, rtol=0, atol=1e-5)
        # thresholds (bias-corrected EMA) and the router rows were copied
        for l in (1, 2):
            th = tr2.model.blocks[l].ffn.router.threshold_E()
            assert torch.equal(th[8:], tr.model.blocks[l].ffn.router.threshold_E())
    else:
        assert abs(after - before) < 1.0  # top-k / batch-wide selection: not preserved, measured in docs
    # training goes on from the resized state
    row = tr2.train_step()
    assert row["step"] == tr.step and len(row["L1_load"]) == 16 and torch.isfinite(torch.tensor(row["loss"]))


def test_adam_state_follows_the_copies(et):
    tr = et
    tr2, _ = resized(tr, 12)
    st1, st2 = tr.opt.state_dict()["state"], tr2.opt.state_dict()["state"]
    for name, i in param_slots(tr.model, tr.opt).items():
        if ".ffn.experts." not in name and not name.endswith("ffn.router.proj.weight"):
            torch.testing.assert_close(st2[i]["exp_avg"], st1[i]["exp_avg"], rtol=0, atol=0)
            continue
        src = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
        s = torch.tensor([2.0] * 4 + [1.0] * 4 + [2.0] * 4).view(-1, *[1] * (st1[i]["exp_avg"].dim() - 1))
        m, v = st1[i]["exp_avg"][src], st1[i]["exp_avg_sq"][src]
        if name.endswith("w2_EFD"):  # the output projection's gradient does not change
            torch.testing.assert_close(st2[i]["exp_avg"], m, rtol=0, atol=0)
        else:  # input projections and router row: the gradient is divided by the copies
            torch.testing.assert_close(st2[i]["exp_avg"], m / s, rtol=0, atol=0)
            torch.testing.assert_close(st2[i]["exp_avg_sq"], v / s**2, rtol=0, atol=0)


def test_noise_breaks_the_symmetry_of_copies_only(et):
    tr = et
    tr2, _ = resized(tr, 16, noise=0.01)
    w1 = tr2.model.blocks[1].ffn.experts.w1_EDF.detach()
    w1_old = tr.model.blocks[1].ffn.experts.w1_EDF.detach()
    assert torch.equal(w1[:8], w1_old)  # the originals are untouched
    rel = ((w1[8:] - w1_old).norm() / w1_old.norm()).item()
    assert 0.003 < rel < 0.03


def test_dropping_experts_keeps_the_others_exactly(et):
    tr = et
    tr2, report = resized(tr, 6)
    kept = [e for e in range(8) if e not in report[0]["dropped"]]
    assert len(report[0]["dropped"]) == 2
    for l in (1, 2):
        a, b = tr.model.blocks[l].ffn, tr2.model.blocks[l].ffn
        assert torch.equal(b.experts.w1_EDF.detach(), a.experts.w1_EDF.detach()[kept])
        assert torch.equal(b.router.threshold_E(), a.router.threshold_E()[kept])
    row = tr2.train_step()
    assert len(row["L1_load"]) == 6
    # twice in a row without a step between (the last loads were the old experts')
    assert tr2.scale(experts=5)["experts_after"] == 5 and tr2.scale(experts=7)["experts_after"] == 7
    assert len(tr2.train_step()["L1_load"]) == 7

"""ET evaluation and generation before the thresholds have settled: evaluation routes with
the warm-up's expert choice and reports what the thresholds would route; generation keeps
the (causal) thresholds; warnings when the inference fanout is far from router.top_k."""

from __future__ import annotations

import math

import numpy as np
import torch

from moedist.config import ModelConfig, RouterConfig, build_config
from moedist.model.generate import generate
from moedist.model.transformer import MoETransformer
from moedist.training.evaluate import EvalResult, evaluate, fanout_warning, generation_warnings
from moedist.training.trainer import Trainer, load_dataset
from tests.unit.test_model import calibrate_thresholds, teacher_forced

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.seq_len=32", "model.n_experts=8",
        "model.first_layer_dense=false", "train.batch_size=4", "train.eval_tokens=512", "train.warmup_steps=2",
        "train.progress=false"]  # fmt: skip


def trained(steps: int, *sets: str) -> Trainer:
    cfg = build_config("tiny", None, None, [*TINY, *sets])
    tr = Trainer(cfg, load_dataset(cfg))
    for _ in range(steps):
        tr.train_step()
    return tr


def thresholds_eval(tr: Trainer) -> EvalResult:
    cfg = tr.cfg
    return evaluate(tr.model, tr.dataset, cfg.model.seq_len, cfg.train.batch_size, cfg.train.eval_tokens,
                    thresholds=True)  # fmt: skip


def test_eval_inside_warmup_routes_like_training_and_reports_the_thresholds():
    # A fast-moving router (lr 1e-2) 3 steps into a 12-step warm-up: the thresholds lag it.
    tr = trained(3, "router.et_warmup_steps=12", "router.et_beta=0.99", "train.lr=1e-2")
    ema_before = [r.ema_E.clone() for r in tr.model.routers()]
    ev = tr.evaluate()
    assert ev.et_routing == "warmup-expert-choice" and ev.thresholds_settled is False
    assert (ev.et_updates, ev.et_warmup_steps) == (3, 12)
    # expert choice over each eval batch (4 x 32 tokens, k = 128 / 8 = 16): exactly balanced
    n_batches = ev.tokens // (4 * 32)
    assert ev.load == [[16 * n_batches] * 8] * 2 and ev.mean_fanout == 1.0
    # what inference routes is what an evaluation with the thresholds routes (same tokens)
    th = thresholds_eval(tr)
    assert th.et_routing == "thresholds" and th.inference_fanout_hist == [] and th.tokens == ev.tokens
    assert ev.inference_fanout_hist == th.fanout_hist and ev.inference_val_loss == th.val_loss
    assert ev.inference_fanout == th.mean_fanout == th.inference_fanout
    assert th.to_json()["inference_val_loss"] == th.val_loss and ev.val_loss != th.val_loss
    # the thresholds route > 2x the target: the warning says so, also in the JSON
    assert ev.inference_fanout > 2.0
    assert len(ev.warnings) == 1 and "not settled (3 of 12 warm-up updates)" in ev.warnings[0]
    assert ev.to_json()["warnings"] == ev.warnings and ev.to_json()["thresholds_settled"] is False
    assert EvalResult.from_json(ev.to_json()).to_json() == ev.to_json()  # what a Ray worker sends
    # evaluating changes no router state, and eval-mode forwards route with thresholds again
    for r, before in zip(tr.model.routers(), ema_before, strict=True):
        assert torch.equal(r.ema_E, before) and int(r.n_updates) == 3 and not r.eval_warmup_rule


def test_eval_after_warmup_uses_the_thresholds_and_warns_only_when_far_from_target():
    # A slow router (lr 1e-4) with a short EMA: the thresholds track it after warm-up.
    tr = trained(4, "router.et_warmup_steps=2", "router.et_beta=0.5", "train.lr=1e-4")
    ev = tr.evaluate()
    assert ev.et_routing == "thresholds" and ev.thresholds_settled is True and ev.inference_fanout_hist == []
    assert ev.inference_fanout == ev.mean_fanout and 0.5 <= ev.mean_fanout <= 2.0
    assert ev.warnings == []
    # thresholds far below every logit: every token takes every expert (8 = 8x the target)
    for r in tr.model.routers():
        r.ema_E.fill_(-1e6)
    ev = tr.evaluate()
    assert ev.mean_fanout == 8.0 and len(ev.warnings) == 1
    assert "routes 8.00 experts per token" in ev.warnings[0] and "after 4 updates" in ev.warnings[0]


def test_fanout_warning_rule():
    assert fanout_warning(1.0, 2.0, None, "x") is None
    assert fanout_warning(4.0, 2.0, None, "x") is None and fanout_warning(4.01, 2.0, None, "x") is not None
    assert fanout_warning(0.99, 2.0, None, "x") is not None
    assert fanout_warning(5.0, 0.0, None, "x") is None  # dense: no target
    ev = EvalResult(val_loss=1.0, tokens=10, fanout_hist=[[0, 0, 0, 10]], load=[[10, 10, 10]], target_fanout=1.0)
    assert ev.thresholds_settled is None and ev.et_routing is None and len(ev.warnings) == 1  # any router


def test_generation_in_warmup_keeps_the_thresholds_and_equals_teacher_forcing():
    """Generation after a warm-up evaluation (which switches ET to expert choice for its
    duration) routes with the thresholds: positions equal the teacher-forced forward; the
    unsettled thresholds are reported."""
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=256, seq_len=32, d_model=32, n_layers=3, n_heads=2, n_experts=4, granularity=2)
    model = MoETransformer(mcfg, RouterConfig(kind="et", et_warmup_steps=100, top_k=1)).double()
    calibrate_thresholds(model)
    cfg = build_config("tiny", None, None, [])
    dataset = load_dataset(cfg)
    ev = evaluate(model, dataset, 32, 2, 256)
    assert ev.et_routing == "warmup-expert-choice"
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    gen = generate(model, [p % 50 for p in prompt], 30, temperature=1.0, seed=0, record_routing=True,
                   record_logits=True)  # fmt: skip
    ref_logits_SV, ref_masks = teacher_forced(model, gen.ids, 0)
    torch.testing.assert_close(gen.logits_SV, ref_logits_SV, rtol=1e-10, atol=1e-10)
    for got, want in zip(gen.routing_SE, ref_masks, strict=True):
        assert torch.equal(got, want)
    warnings = generation_warnings(model, gen)
    fan = float(np.mean([m.sum() / m.shape[0] for m in gen.routing_SE]))
    assert len(warnings) == 1 and "3 of 100 warm-up updates" in warnings[0]
    assert f"{fan:.2f} experts per token" in warnings[0]
    assert not math.isnan(fan)
    # settled and on target: no warning
    for r in model.routers():
        r.cfg.et_warmup_steps = 3
    gen = generate(model, [1, 2, 3], 5, record_routing=True)
    fan = float(np.mean([m.sum() / m.shape[0] for m in gen.routing_SE]))
    assert 0.5 <= fan <= 2.0 and generation_warnings(model, gen) == []
    for r in model.routers():  # thresholds far below every logit: all 4 experts
        r.ema_E.fill_(-1e6)
    gen = generate(model, [1, 2, 3], 5, record_routing=True)
    assert generation_warnings(model, gen) == [
        "generation routes 4.00 experts per token, outside [0.5, 2] x the target router.top_k = 1; ET thresholds "
        "after 3 updates: its loss and cost are not those of the trained router"
    ]

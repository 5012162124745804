"""Routing signatures: a model whose routing is planted by task is recognised (~100%),
the permutation baseline sits near chance; prompts, masks and errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from moedist.analysis.signatures import (
    compute_signatures,
    load_prompts,
    merge_tasks,
    restrict_experts,
    routing_histograms,
    signature_report,
    task_expert_mask,
)
from moedist.config import ConfigError, ModelConfig, RouterConfig
from moedist.data.tokenizer import ByteTokenizer
from moedist.model.transformer import ModelOutput, MoETransformer
from moedist.routing.base import RoutingPlan

TASKS = ["alpha", "digits", "punct", "upper"]
ALPHABETS = {"alpha": "abcdefgh", "digits": "0123456789", "punct": "!#$%&*+-/=", "upper": "ABCDEFGHIJ"}


class PlantedModel(torch.nn.Module):
    """Routes each byte to expert (byte // 16) % E in layer 0, a layer-dependent shift
    deeper: the task (which alphabet a prompt uses) is planted in the routing."""

    def __init__(self, n_layers: int = 3, n_experts: int = 8):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.L, self.E = n_layers, n_experts

    def forward(self, idx_BS):
        ids = idx_BS.flatten()
        plans = []
        for layer in range(self.L):
            e = ((ids // 16) + layer) % self.E
            plans.append(RoutingPlan(torch.arange(len(ids)), e, torch.ones(len(ids)), len(ids), self.E))
        return ModelOutput(logits_BSV=torch.zeros(1), plans=plans)


def planted_prompts(n_per_task: int = 20, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [{"task": t, "text": "".join(rng.choice(list(ALPHABETS[t]), 40))} for t in TASKS for _ in range(n_per_task)]


def test_planted_routing_is_recognised_and_baselines_are_near_chance(tmp_path):
    prompts = planted_prompts()
    report = compute_signatures(PlantedModel(), ByteTokenizer(), 64, prompts, tmp_path)
    assert report["cv_accuracy"] >= 0.95 and report["cv_macro_f1"] >= 0.95
    assert report["within_cosine"] > report["across_cosine"]
    assert abs(report["permutation_accuracy"] - 0.25) < 0.15  # chance = 1/4
    assert len(report["accuracy_by_layer"]) == 3
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["cv_accuracy"] == report["cv_accuracy"]
    table = pq.read_table(tmp_path / "signatures.parquet")
    assert table.num_rows == 80 and len(table.column("signature")[0].as_py()) == 3 * 8
    for name in ("similarity.png", "projection.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_identity_shuffle_destroys_planted_identity_but_keeps_counts():
    # every task uses 2 experts per layer equally: only WHICH experts tells tasks apart
    rng = np.random.default_rng(0)
    hist = np.zeros((40, 2, 8))
    for i in range(40):
        t = i // 10
        hist[i, :, 2 * t] = 0.5 + rng.normal(0, 0.02)
        hist[i, :, 2 * t + 1] = 1 - hist[i, 0, 2 * t]
    report = signature_report(hist, [TASKS[i // 10] for i in range(40)])
    assert report["cv_accuracy"] == 1.0
    assert report["load_balance_accuracy"] < 0.6


def test_histograms_are_per_layer_shares():
    hist = routing_histograms(PlantedModel(2, 4), ByteTokenizer(), ["a" * 10 + "0" * 30], 64)
    assert hist.shape == (1, 2, 4)
    np.testing.assert_allclose(hist.sum(-1), 1.0)
    e_a, e_0 = (ord("a") // 16) % 4, (ord("0") // 16) % 4
    assert hist[0, 0, e_a] == pytest.approx(0.25) and hist[0, 0, e_0] == pytest.approx(0.75)


def test_shipped_prompt_set_has_four_tasks_of_twenty_or_more():
    rows = load_prompts()
    counts = {t: sum(r["task"] == t for r in rows) for t in {r["task"] for r in rows}}
    assert len(counts) >= 4 and min(counts.values()) >= 20
    held = load_prompts(split="heldout")
    assert {r["text"] for r in held}.isdisjoint(r["text"] for r in rows)


def test_bad_prompt_files_are_named(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"task": "a", "text": "x"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:2: not JSON"):
        load_prompts(bad)
    bad.write_text('{"task": "a", "text": "x"}\n{"task": "a"}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:2"):
        load_prompts(bad)
    bad.write_text('{"task": "a", "text": "x"}\n')
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        load_prompts(bad)


def test_task_mask_keeps_the_most_used_experts_and_routers_obey_it(tmp_path):
    compute_signatures(PlantedModel(3, 8), ByteTokenizer(), 64, planted_prompts(), tmp_path)
    keep = task_expert_mask(tmp_path, "digits", 0.25)
    assert keep.shape == (3, 8) and (keep.sum(1) == 2).all()
    assert keep[0, (ord("0") // 16) % 8]  # digits live in one expert per layer
    with pytest.raises(ConfigError, match="not in"):
        task_expert_mask(tmp_path, "poetry", 0.5)
    with pytest.raises(ConfigError, match="--keep"):
        task_expert_mask(tmp_path, "digits", 0.0)

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, seq_len=32, d_model=32, n_layers=3, n_heads=2, n_experts=8)
    model = MoETransformer(cfg, RouterConfig(kind="tc", top_k=2)).eval()
    keep_LE = np.zeros((2, 8), dtype=bool)
    keep_LE[:, [1, 5, 6]] = True
    restrict_experts(model, keep_LE)
    out = model(torch.randint(0, 257, (2, 32)))
    for plan in out.plans:
        assert set(plan.expert_idx_A.tolist()) <= {1, 5, 6} and plan.token_idx_A.numel() == 2 * 32 * 2
    with pytest.raises(ConfigError, match=r"fewer than router\.top_k"):
        restrict_experts(model, np.eye(2, 8, dtype=bool))


def test_cosine_spreads_and_cohens_d_by_hand():
    # unit vectors (one layer, 2 experts): a1 = a2 = (1, 0); b1 = (0, 1); b2 = (1, 1)/sqrt 2
    X = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    r = 1 / np.sqrt(2)
    within, across = [1.0, r], [0.0, r, 0.0, r]  # (a1,a2), (b1,b2) | a-b pairs
    s_w, s_a = (1 - r) / np.sqrt(2), np.sqrt(4 * (r / 2) ** 2 / 3)  # sample sds (ddof 1)
    pooled = np.sqrt((1 * s_w**2 + 3 * s_a**2) / 4)
    hist = X.reshape(4, 1, 2)
    report = signature_report(hist, ["a", "a", "b", "b"])
    assert report["within_cosine"] == pytest.approx(np.mean(within))
    assert report["across_cosine"] == pytest.approx(np.mean(across))
    assert report["within_cosine_std"] == pytest.approx(s_w) and report["across_cosine_std"] == pytest.approx(s_a)
    assert (report["within_pairs"], report["across_pairs"]) == (2, 4)
    assert report["cosine_cohens_d"] == pytest.approx((np.mean(within) - np.mean(across)) / pooled)
    assert report["cosine_cohens_d"] == pytest.approx(1.3572, abs=1e-4)


def test_fold_accuracy_spread_and_confusion_matrix_with_one_misplaced_prompt():
    # two tasks of 10 well-separated prompts; one "a" prompt carries a "b" signature: it is
    # the only error, so one of the 5 folds (4 prompts each) scores 3/4 and the rest 4/4
    rng = np.random.default_rng(0)
    hist = np.zeros((20, 1, 4))
    tasks = ["a"] * 10 + ["b"] * 10
    for i in range(20):
        hist[i, 0, :2] = (0.9, 0.1) if tasks[i] == "a" and i != 3 else (0.1, 0.9)
        hist[i, 0, :2] += rng.normal(0, 0.01, 2)
    report = signature_report(hist, tasks)
    assert sorted(report["cv_fold_accuracy"]) == [0.75, 1.0, 1.0, 1.0, 1.0]
    assert report["cv_accuracy"] == 0.95 and report["cv_fold_accuracy_mean"] == pytest.approx(0.95)
    # sample sd of (0.75, 1, 1, 1, 1): deviations -0.2 and 4 x 0.05 -> sqrt(0.05 / 4)
    assert report["cv_fold_accuracy_std"] == pytest.approx(np.sqrt(0.05 / 4))
    assert report["confusion"] == {"labels": ["a", "b"], "matrix": [[9, 1], [0, 10]]}


class VariableFanoutModel(torch.nn.Module):
    """One MoE layer, 4 experts: token 0 -> experts {0, 1}, token 1 -> {0}, token 2 -> none,
    token 3 -> {2} (prompts of 4 tokens)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx_BS):
        plan = RoutingPlan(torch.tensor([0, 0, 1, 3]), torch.tensor([0, 1, 0, 2]), torch.ones(4), 4, 4)
        return ModelOutput(logits_BSV=torch.zeros(1), plans=[plan])


def test_per_token_normalisation_by_hand():
    per_assignment = routing_histograms(VariableFanoutModel(), ByteTokenizer(), ["abcd"], 64)
    np.testing.assert_allclose(per_assignment[0, 0], [2 / 4, 1 / 4, 1 / 4, 0])  # 4 assignments
    per_token = routing_histograms(VariableFanoutModel(), ByteTokenizer(), ["abcd"], 64, "token")
    # 3 routed tokens: token 0 splits 1 over experts 0 and 1, tokens 1 and 3 give 1 each
    np.testing.assert_allclose(per_token[0, 0], [(0.5 + 1) / 3, 0.5 / 3, 1 / 3, 0])
    assert per_token[0, 0].sum() == pytest.approx(1.0)
    # a fixed fanout (the planted model: one expert per token) gives the same either way
    texts = ["a" * 10 + "0" * 30]
    np.testing.assert_allclose(routing_histograms(PlantedModel(2, 4), ByteTokenizer(), texts, 64, "token"),
                               routing_histograms(PlantedModel(2, 4), ByteTokenizer(), texts, 64))  # fmt: skip
    with pytest.raises(ConfigError, match="normalization"):
        routing_histograms(VariableFanoutModel(), ByteTokenizer(), ["abcd"], 64, "tokens")


def test_report_records_the_normalisation_and_writes_the_confusion_png(tmp_path):
    report = compute_signatures(PlantedModel(), ByteTokenizer(), 64, planted_prompts(10), tmp_path,
                                normalization="token")  # fmt: skip
    assert report["normalization"] == "token"
    assert pq.read_table(tmp_path / "signatures.parquet").schema.metadata[b"normalization"] == b"token"
    assert np.trace(report["confusion"]["matrix"]) == round(report["cv_accuracy"] * 40)
    assert (tmp_path / "confusion.png").stat().st_size > 1000


def test_merge_tasks_relabels_drops_and_keeps_order():
    tasks = ["code", "doc", "comment", "doc", "arith", "comment", "code"]
    keep, labels = merge_tasks(tasks, {"doc": "prose", "comment": "prose"})
    assert keep.tolist() == [True] * 7
    assert labels == ["code", "prose", "prose", "prose", "arith", "prose", "code"]
    keep, labels = merge_tasks(tasks, {"comment": None})
    assert keep.tolist() == [True, True, False, True, True, False, True]
    assert labels == ["code", "doc", "doc", "arith", "code"]
    keep, labels = merge_tasks(tasks, {})
    assert keep.all() and labels == tasks
    # merge and drop at once; a task mapped to its own name stays
    keep, labels = merge_tasks(tasks, {"code": "code", "doc": "text", "arith": None})
    assert keep.tolist() == [True, True, True, True, False, True, True]
    assert labels == ["code", "text", "comment", "text", "comment", "code"]
    with pytest.raises(ConfigError, match="poetry not among the tasks"):
        merge_tasks(tasks, {"poetry": None})
    with pytest.raises(ConfigError, match="leaves 1 task"):
        merge_tasks(tasks, {"code": None, "doc": "x", "comment": "x", "arith": "x"})


def test_merged_task_set_scores_the_subset_of_the_same_signatures():
    # the planted model tells all 4 alphabets apart; merging two of them into one class
    # leaves 3 classes (chance = the merged class's share 1/2), dropping one leaves 3 of 1/3
    prompts = planted_prompts(10)
    tasks = [p["task"] for p in prompts]
    hist = routing_histograms(PlantedModel(), ByteTokenizer(), [p["text"] for p in prompts], 64)
    keep, labels = merge_tasks(tasks, {"alpha": "letters", "upper": "letters"})
    merged = signature_report(hist[keep], labels)
    assert merged["tasks"] == {"digits": 10, "letters": 20, "punct": 10}
    assert merged["chance_accuracy"] == 0.5 and merged["cv_accuracy"] >= 0.95
    assert merged["confusion"]["labels"] == ["digits", "letters", "punct"]
    keep, labels = merge_tasks(tasks, {"punct": None})
    dropped = signature_report(hist[keep], labels)
    assert dropped["prompts"] == 30 and dropped["tasks"] == {"alpha": 10, "digits": 10, "upper": 10}
    assert dropped["chance_accuracy"] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(hist[keep], hist[[t != "punct" for t in tasks]])


def test_classifier_separates_tasks_whose_shares_differ_by_little():
    # Signatures as a trained model gives them: shares near 1/E, each task a few points
    # higher on its own expert. The 4 tasks and the merged set (two of them as one class of
    # twice the size) must both be told apart; an unscaled, L2-regularised classifier
    # predicted the larger class for every prompt of a smaller one here.
    rng = np.random.default_rng(0)
    P_task, L, E = 24, 3, 16
    names = ["arithmetic", "code", "comment", "docstring"]
    rows, tasks = [], []
    for t, name in enumerate(names):
        base_LE = np.full((L, E), 1.0 / E)
        base_LE[:, t] += 0.015  # the task's own expert, in every layer
        for _ in range(P_task):
            h_LE = np.clip(base_LE + rng.normal(0, 0.006, (L, E)), 0, None)
            rows.append(h_LE / h_LE.sum(1, keepdims=True))
            tasks.append(name)
    hist_PLE = np.stack(rows)
    four = signature_report(hist_PLE, tasks)
    assert four["cv_accuracy"] >= 0.9, four["confusion"]
    keep, labels = merge_tasks(tasks, {"comment": "prose", "docstring": "prose"})
    merged = signature_report(hist_PLE[keep], labels)
    m = np.asarray(merged["confusion"]["matrix"])
    assert merged["cv_accuracy"] >= 0.9 and m.diagonal().min() >= 0.8 * P_task, merged["confusion"]

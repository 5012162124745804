"""Routing signatures (arXiv 2603.11114) and task-aware expert pre-selection.

A prompt's signature is, for every MoE layer, the share of its routed assignments that
went to each expert (eval-mode routing over the prompt's tokens), the layers concatenated;
with normalization "token" each routed token's experts share 1 instead (for routers whose
tokens reach a variable number of experts, ET and EC: a token with 3 experts then weighs
as much as one with 1). `signature_report` asks how much of the task those vectors carry:
within- vs across-task cosine similarity (means, spreads and Cohen's d between them), a
logistic-regression classifier's stratified 5-fold accuracy (pooled, per fold and its
spread), macro-F1 and confusion matrix, the same classifier on shuffled labels
(permutation baseline) and on signatures whose expert identities are shuffled per prompt
and layer while each layer's counts are kept (load-balance baseline), and the accuracy
from each layer alone. `merge_tasks` relabels the prompts for a coarser or smaller task
set (e.g. two kinds of prose merged into one), so the same signatures score it.

Beyond the paper, `task_expert_mask` turns a task's mean signature into a per-layer list
of the experts it uses most, which `restrict_experts` imposes on a model's routers.

Legend: P prompts, L MoE layers, E experts, T tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moedist.config import ConfigError

DEFAULT_PROMPTS = "prompts.jsonl"
# How a layer's routing becomes a signature row: share of the prompt's assignments per
# expert, or per-token shares (each routed token's experts split 1 equally).
NORMALIZATIONS = ("assignment", "token")


# --------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path | None = None, split: str | None = "signature") -> list[dict[str, str]]:
    """Prompts from a JSONL file of {"task", "text"} lines (None: the shipped set).

    `split` keeps only rows whose "split" is that value (rows without one always stay);
    None keeps every row. Errors name the file and line.
    """
    if path is None:
        src = resources.files("moedist.analysis").joinpath(DEFAULT_PROMPTS)
        name, lines = f"moedist/analysis/{DEFAULT_PROMPTS}", src.read_text().splitlines()
    else:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--prompts: '{path}' is a folder, not a JSONL file")
        if not p.is_file():
            raise ConfigError(f"--prompts: file '{path}' does not exist")
        try:
            name, lines = str(p), p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"--prompts: file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
            ) from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}:{i}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("task"), str) or not isinstance(obj.get("text"), str):
            raise ConfigError(f'{name}:{i}: each line must be {{"task": str, "text": str}}')
        if not obj["text"]:
            raise ConfigError(f"{name}:{i}: empty text")
        if split is None or obj.get("split", split) == split:
            rows.append({"task": obj["task"], "text": obj["text"], "split": obj.get("split", "")})
    tasks = {r["task"] for r in rows}
    if len(tasks) < 2:
        raise ConfigError(f"{name}: signatures need at least 2 tasks, found {sorted(tasks)}")
    return rows


def merge_tasks(tasks: list[str], mapping: dict[str, str | None]) -> tuple[np.ndarray, list[str]]:
    """Relabel prompts for another task set: a task in `mapping` becomes mapping[task]
    (several tasks to one name merge them; None drops the task's prompts), the rest keep
    their name. Returns keep_P (which prompts stay) and the kept prompts' labels in order,
    so that hist_PLE[keep_P] with those labels scores the new task set."""
    unknown = sorted(set(mapping) - set(tasks))
    if unknown:
        raise ConfigError(f"task set: {', '.join(unknown)} not among the tasks ({', '.join(sorted(set(tasks)))})")
    keep_P = np.array([mapping.get(t, t) is not None for t in tasks], dtype=bool)
    labels = [m for t in tasks if (m := mapping.get(t, t)) is not None]
    if len(set(labels)) < 2:
        raise ConfigError(f"task set: {mapping} leaves {len(set(labels))} task(s), signatures need at least 2")
    return keep_P, labels


# --------------------------------------------------------------------------- signatures
def check_normalization(normalization: str) -> None:
    """ConfigError unless `normalization` is one of NORMALIZATIONS."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"signature normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")


def layer_signature(token_idx_A: torch.Tensor, expert_idx_A: torch.Tensor, n_tokens: int, n_experts: int,
                    normalization: str = "assignment") -> np.ndarray:  # fmt: skip
    """sig_E of one layer's routing of one prompt; each normalization sums to 1 (0s if nothing routed).

    assignment: sig_i = (assignments to i) / (all assignments).
    token:      sig_i = mean over routed tokens t of z_ti / fanout_t (tokens with no expert left out).
    """
    if normalization == "assignment":
        counts_E = torch.bincount(expert_idx_A.cpu(), minlength=n_experts).double()
        return (counts_E / counts_E.sum().clamp_min(1)).numpy()
    check_normalization(normalization)
    fanout_T = torch.bincount(token_idx_A.cpu(), minlength=n_tokens).double()
    share_A = 1.0 / fanout_T[token_idx_A.cpu()]
    sig_E = torch.zeros(n_experts, dtype=torch.float64).index_add_(0, expert_idx_A.cpu(), share_A)
    return (sig_E / (fanout_T > 0).sum().clamp_min(1)).numpy()


@torch.no_grad()
def routing_histograms(model: Any, tokenizer: Any, texts: list[str], seq_len: int,
                       normalization: str = "assignment") -> np.ndarray:  # fmt: skip
    """hist_PLE: per prompt and MoE layer, its signature row (`layer_signature`).

    The model runs in eval mode on each prompt (its first seq_len tokens); a layer that
    routed nothing gives a row of zeros.
    """
    check_normalization(normalization)  # before any forward pass
    model.eval()
    out = []
    for text in texts:
        ids = [int(i) for i in tokenizer.encode(text)][:seq_len]
        if not ids:
            raise ConfigError(f"prompt {text[:40]!r} has no tokens")
        res = model(torch.tensor([ids], device=next(model.parameters()).device))
        layers = []
        for plan in res.plans:
            layers.append(layer_signature(plan.token_idx_A, plan.expert_idx_A, plan.n_tokens, plan.n_experts,
                                          normalization))  # fmt: skip
        out.append(np.stack(layers))
    return np.stack(out)


@dataclass
class CVResult:
    """Stratified k-fold cross-validation of the task classifier: pooled out-of-fold
    predictions and the accuracy of each fold."""

    accuracy: float  # over all out-of-fold predictions
    macro_f1: float
    fold_accuracy: list[float]
    pred: np.ndarray  # out-of-fold predicted task per prompt


def _cv_scores(X: np.ndarray, y: np.ndarray, seed: int) -> CVResult:
    """Stratified 5-fold (fewer if a task has fewer prompts) logistic regression on
    standardised features.

    Standardised (each column to zero mean, unit variance on the training folds): the
    shares are of order 1/E, so with sklearn's default L2 strength the raw features leave
    the classifier nearly flat, and with unequal classes (two tasks merged into one) it
    predicted the larger class for every prompt of a task the 4-class fit told apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(5, int(np.bincount(np.unique(y, return_inverse=True)[1]).min()))
    if folds < 2:
        raise ConfigError("every task needs at least 2 prompts for cross-validation")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    pred = np.empty_like(y)
    fold_acc = []
    for train, test in cv.split(X, y):  # what cross_val_predict does, keeping each fold's score
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(X[train], y[train])
        pred[test] = clf.predict(X[test])
        fold_acc.append(float(accuracy_score(y[test], pred[test])))
    return CVResult(float(accuracy_score(y, pred)), float(f1_score(y, pred, average="macro")), fold_acc, pred)


def _cosine(X: np.ndarray) -> np.ndarray:
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return Xn @ Xn.T


def _std(x: np.ndarray) -> float:
    """Sample standard deviation (ddof 1); 0 for fewer than 2 values."""
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def cosine_stats(X: np.ndarray, tasks: list[str]) -> dict[str, float]:
    """Within-task vs across-task cosine similarity over unordered pairs of distinct prompts:
    means, sample standard deviations, pair counts and Cohen's d of within vs across,
    d = (mean_w - mean_a) / s_pooled, s_pooled^2 = ((n_w-1) s_w^2 + (n_a-1) s_a^2) / (n_w + n_a - 2).
    The pairs share prompts, so d describes the separation; it is not a test statistic."""
    y = np.asarray(tasks)
    sim = _cosine(X)
    iu = np.triu_indices(len(y), k=1)
    same = (y[:, None] == y[None, :])[iu]
    w, a = sim[iu][same], sim[iu][~same]
    sw, sa = _std(w), _std(a)
    dof = len(w) + len(a) - 2
    pooled = np.sqrt(((len(w) - 1) * sw**2 + (len(a) - 1) * sa**2) / dof) if dof > 0 else 0.0
    d = float((w.mean() - a.mean()) / pooled) if pooled > 0 else float("nan")
    return {
        "within_cosine": float(w.mean()) if len(w) else float("nan"),
        "within_cosine_std": sw,
        "within_pairs": len(w),
        "across_cosine": float(a.mean()) if len(a) else float("nan"),
        "across_cosine_std": sa,
        "across_pairs": len(a),
        "cosine_cohens_d": d,
    }


def signature_report(hist_PLE: np.ndarray, tasks: list[str], seed: int = 0, n_shuffles: int = 5,
                     normalization: str = "assignment") -> dict[str, Any]:  # fmt: skip
    """The report.json numbers for signatures hist_PLE of prompts labelled `tasks`."""
    from sklearn.metrics import confusion_matrix

    P, L, E = hist_PLE.shape
    y = np.asarray(tasks)
    X = hist_PLE.reshape(P, L * E)
    cv = _cv_scores(X, y, seed)
    rng = np.random.default_rng(seed)
    perm = [_cv_scores(X, rng.permutation(y), seed).accuracy for _ in range(n_shuffles)]
    balance = []
    for _ in range(n_shuffles):
        # each prompt's expert identities shuffled per layer: its per-layer counts stay
        shuffled = np.stack([[h[rng.permutation(E)] for h in prompt] for prompt in hist_PLE])
        balance.append(_cv_scores(shuffled.reshape(P, L * E), y, seed).accuracy)
    by_layer = [_cv_scores(hist_PLE[:, layer, :], y, seed).accuracy for layer in range(L)]
    labels = sorted(set(tasks))
    cos = cosine_stats(X, tasks)
    return {
        "prompts": P,
        "tasks": {t: int((y == t).sum()) for t in labels},
        "layers": L,
        "experts": E,
        "normalization": normalization,
        **cos,
        "cv_accuracy": cv.accuracy,
        "cv_macro_f1": cv.macro_f1,
        "cv_fold_accuracy": cv.fold_accuracy,
        "cv_fold_accuracy_mean": float(np.mean(cv.fold_accuracy)),
        "cv_fold_accuracy_std": _std(np.asarray(cv.fold_accuracy)),
        # rows: true task, columns: predicted task (out-of-fold), both in `labels` order
        "confusion": {"labels": labels, "matrix": confusion_matrix(y, cv.pred, labels=labels).tolist()},
        "chance_accuracy": float(max((y == t).mean() for t in labels)),
        "permutation_accuracy": float(np.mean(perm)),
        "load_balance_accuracy": float(np.mean(balance)),
        "accuracy_by_layer": by_layer,
    }


def write_plots(out: Path, hist_PLE: np.ndarray, tasks: list[str], confusion: dict[str, Any] | None = None) -> None:
    """similarity.png (cosine heatmap ordered by task), projection.png (PCA, by task) and,
    given the report's confusion matrix, confusion.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    P = hist_PLE.shape[0]
    X = hist_PLE.reshape(P, -1)
    order = sorted(range(P), key=lambda i: (tasks[i], i))
    sim = _cosine(X[order])
    labels = sorted(set(tasks))
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    bounds = np.cumsum([sum(1 for t in tasks if t == lab) for lab in labels])
    for b in bounds[:-1]:
        ax.axhline(b - 0.5, color="white", lw=0.8)
        ax.axvline(b - 0.5, color="white", lw=0.8)
    mids = bounds - np.diff(np.concatenate([[0], bounds])) / 2
    ax.set_xticks(mids - 0.5, labels, rotation=45)
    ax.set_yticks(mids - 0.5, labels)
    ax.set_title("routing-signature similarity (prompts ordered by task)")
    fig.tight_layout()
    fig.savefig(out / "similarity.png", dpi=110)
    plt.close(fig)

    xy = PCA(n_components=2, random_state=0).fit_transform(X) if P > 2 else np.zeros((P, 2))
    fig, ax = plt.subplots(figsize=(6, 5))
    for lab in labels:
        m = np.asarray(tasks) == lab
        ax.scatter(xy[m, 0], xy[m, 1], s=18, label=lab)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("routing signatures, 2-D PCA projection")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "projection.png", dpi=110)
    plt.close(fig)

    if confusion is not None:
        n = len(confusion["labels"])
        fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.2 * n + 2))
        draw_confusion(ax, confusion, "task classifier on routing signatures")
        fig.tight_layout()
        fig.savefig(out / "confusion.png", dpi=110)
        plt.close(fig)


def draw_confusion(ax: Any, confusion: dict[str, Any], title: str, rotation: int = 45) -> None:
    """A confusion matrix ({"labels", "matrix"} of `signature_report`) on a matplotlib axis,
    each cell's count written in it."""
    names, m = confusion["labels"], np.asarray(confusion["matrix"])
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=rotation)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted task (out of fold)")
    ax.set_ylabel("true task")
    ax.set_title(title, fontsize=9)


def compute_signatures(model: Any, tokenizer: Any, seq_len: int, prompts: list[dict[str, str]], out_dir: str | Path,
                       seed: int = 0, normalization: str = "assignment",
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Signatures of `prompts` -> OUT/signatures.parquet, OUT/report.json and the PNGs;
    `extra` (e.g. the routers' state) is recorded in the report as it is."""
    out = Path(out_dir)
    hist_PLE = routing_histograms(model, tokenizer, [p["text"] for p in prompts], seq_len, normalization)
    tasks = [p["task"] for p in prompts]
    report = signature_report(hist_PLE, tasks, seed, normalization=normalization)
    report.update(extra or {})
    out.mkdir(parents=True, exist_ok=True)
    P, L, E = hist_PLE.shape
    table = pa.table({
        "prompt": pa.array(range(P), pa.int32()),
        "task": tasks,
        "text": [p["text"] for p in prompts],
        "signature": pa.array(hist_PLE.reshape(P, L * E).tolist(), pa.list_(pa.float64())),
    }).replace_schema_metadata({"layers": str(L), "experts": str(E), "normalization": normalization})  # fmt: skip
    tmp = out / "signatures.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out / "signatures.parquet")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_plots(out, hist_PLE, tasks, report["confusion"])
    return report


# --------------------------------------------------------------------------- pre-selection
def task_expert_mask(sig_dir: str | Path, task: str, keep: float) -> np.ndarray:
    """keep_LE: per MoE layer, the ceil(keep * E) experts the task's signatures use most."""
    path = Path(sig_dir) / "signatures.parquet"
    if not path.is_file():
        raise ConfigError(f"--experts-from: '{sig_dir}' has no signatures.parquet (run `moedist signatures` first)")
    if not 0 < keep <= 1:
        raise ConfigError(f"--keep must be in (0, 1], got {keep}")
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    L, E = int(meta[b"layers"]), int(meta[b"experts"])
    tasks = table.column("task").to_pylist()
    if task not in tasks:
        raise ConfigError(f"--task: '{task}' is not in {path} (tasks: {', '.join(sorted(set(tasks)))})")
    sig_PLE = np.asarray(table.column("signature").to_pylist()).reshape(-1, L, E)
    usage_LE = sig_PLE[np.asarray(tasks) == task].mean(0)
    n_keep = max(1, math.ceil(keep * E))
    keep_LE = np.zeros((L, E), dtype=bool)
    for layer in range(L):
        # most-used first; ties by expert id (stable sort)
        keep_LE[layer, np.argsort(-usage_LE[layer], kind="stable")[:n_keep]] = True
    return keep_LE


def restrict_experts(model: Any, keep_LE: np.ndarray) -> None:
    """Let each MoE layer's router choose only among its kept experts (None lifts it)."""
    routers = list(model.routers())
    if keep_LE.shape != (len(routers), routers[0].n_experts):
        raise ConfigError(f"expert mask of shape {keep_LE.shape} does not fit a model with {len(routers)} MoE "
                          f"layers of {routers[0].n_experts} experts")  # fmt: skip
    n_keep = int(keep_LE.sum(1).min())
    token_choice = routers[0].cfg.kind in ("tc", "lf", "aoe", "etr")
    if token_choice and n_keep < routers[0].top_k:
        raise ConfigError(f"--keep leaves {n_keep} experts per layer, fewer than router.top_k = {routers[0].top_k}")
    for router, keep_E in zip(routers, keep_LE, strict=True):
        router.allowed_E = torch.as_tensor(keep_E, dtype=torch.bool)

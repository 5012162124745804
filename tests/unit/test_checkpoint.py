"""Checkpoint durability: fsync before rename and prune, safe re-save, no non-finite state,
and loading that falls back to the newest checkpoint that verifies."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import tomli_w
import torch

from moedist.config import build_config, to_dict
from moedist.data import ByteTokenizer
from moedist.model.transformer import MoETransformer
from moedist.training import checkpoint as ckpt_mod
from moedist.training.checkpoint import CheckpointError, checkpoint_dir, save_checkpoint, verify_checkpoint


def _save(run: Path, step: int, value: float, keep: int | None = None) -> Path:
    tensors = {"model": {"w": torch.full((4,), value)}, "optim": {"state": {0: {"exp_avg": torch.zeros(4)}}}}
    return save_checkpoint(run, step, tensors, {"step": step}, blobs={"metrics.parquet": b"rows"}, keep=keep)


def _value(path: Path) -> float:
    return float(torch.load(path / "model.pt", weights_only=True)["w"][0])


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str, str]]:
    """Record fsync(path), replace(src, dst) and rmtree(path) in order (and still do them)."""
    log: list[tuple[str, str, str]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        log.append(("replace", str(Path(src).absolute()), str(Path(dst).absolute())))
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        log.append(("rmtree", str(Path(path).absolute()), ""))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return log


def test_every_file_and_folder_is_fsynced_before_the_rename_and_before_pruning(tmp_path: Path, events):
    run = tmp_path / "run"
    _save(run, 1, 1.0, keep=1)
    events.clear()
    final = _save(run, 2, 2.0, keep=1)  # prunes step 1
    parent = str(final.parent)
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final)]
    assert len(renames) == 1, events
    i_rename = renames[0]
    tmp = events[i_rename][1]
    synced_before = {e[1] for e in events[:i_rename] if e[0] == "fsync"}
    for name in ("model.pt", "optim.pt", "metrics.parquet", "state.json", "manifest.json"):
        assert f"{tmp}/{name}" in synced_before, name
    assert tmp in synced_before and parent in synced_before
    # the rename is made durable before the old checkpoint is deleted
    prune = [i for i, e in enumerate(events) if e[0] == "rmtree" and e[1] == str(checkpoint_dir(run, 1))]
    assert len(prune) == 1 and not checkpoint_dir(run, 1).exists()
    assert ("fsync", parent, "") in events[i_rename + 1 : prune[0]]


def test_resaving_a_step_moves_the_old_folder_aside_until_the_new_one_is_in_place(tmp_path: Path, events):
    run = tmp_path / "run"
    final = _save(run, 3, 1.0)
    events.clear()
    _save(run, 3, 2.0)
    assert _value(final) == 2.0 and verify_checkpoint(final)["step"] == 3
    moves = [e for e in events if e[0] in ("replace", "rmtree")]
    aside = moves[0][2]
    assert moves[0] == ("replace", str(final), aside) and Path(aside).name.startswith(".old-step_000003")
    assert moves[1][0] == "replace" and moves[1][2] == str(final)  # the new one moves in
    assert moves[2] == ("rmtree", aside, "")  # only then is the old one deleted
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_000003"]


def test_a_failed_resave_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    final = _save(run, 3, 1.0)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        _save(run, 3, 2.0)
    assert verify_checkpoint(final)["step"] == 3 and _value(final) == 1.0
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_000003"]  # no temp or aside folders left


@pytest.mark.parametrize(
    ("tensors", "name"),
    [
        ({"model": {"a": torch.ones(3), "blocks.1.ffn.router.threshold_E": torch.tensor([0.0, float("nan"), 1.0])}},
         r"model: blocks.1.ffn.router.threshold_E \(1 of 3 values NaN/Inf\)"),
        ({"model": {"a": torch.ones(2)}, "optim": {"state": {7: {"exp_avg_sq": torch.tensor([float("inf")])}}}},
         r"optim: state.7.exp_avg_sq \(1 of 1 values NaN/Inf\)"),
    ],
)  # fmt: skip
def test_non_finite_state_is_never_saved(tmp_path: Path, tensors: dict, name: str):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=rf"refusing to save checkpoint of step 5: tensor {name}"):
        save_checkpoint(run, 5, tensors, {"step": 5})
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_integer_and_bfloat16_tensors_are_checked_only_when_floating(tmp_path: Path):
    tensors = {"model": {"i": torch.tensor([2**62]), "b": torch.ones(2, dtype=torch.bfloat16)}}
    assert save_checkpoint(tmp_path, 1, tensors, {"step": 1}).is_dir()
    with pytest.raises(CheckpointError, match="model: b"):
        save_checkpoint(tmp_path, 2, {"model": {"b": torch.full((2,), float("inf"), dtype=torch.bfloat16)}}, {})


def _corrupt(path: Path) -> None:
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))


def test_loading_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path: Path):
    from moedist.training.checkpoint import load_latest_checkpoint, newest_valid_checkpoint

    run = tmp_path / "run"
    _save(run, 2, 2.0)
    _save(run, 4, 4.0)
    _save(run, 6, 6.0)
    _corrupt(checkpoint_dir(run, 6))
    (checkpoint_dir(run, 4) / "optim.pt").unlink()
    warnings: list[str] = []
    path, objs, state = load_latest_checkpoint(run, ["model"], warn=warnings.append)
    assert path == checkpoint_dir(run, 2) and state["step"] == 2 and float(objs["model"]["w"][0]) == 2.0
    assert len(warnings) == 2
    assert "step_000006" in warnings[0] and "sha256 of model.pt does not match" in warnings[0]
    assert "step_000004" in warnings[1] and "optim.pt is missing" in warnings[1]
    assert all("using 'step_000002'" in w and "\n" not in w for w in warnings)
    assert newest_valid_checkpoint(run) == (checkpoint_dir(run, 2), 2)
    _corrupt(checkpoint_dir(run, 2))
    with pytest.raises(CheckpointError, match=r"step_000006.*sha256.*\(and the 2 older checkpoint\(s\) do not verify"):
        load_latest_checkpoint(run, ["model"], warn=warnings.append)


def test_the_default_warning_is_one_line_on_stderr(tmp_path: Path, capsys):
    from moedist.training.checkpoint import load_latest_checkpoint

    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    _corrupt(checkpoint_dir(tmp_path, 2))
    assert load_latest_checkpoint(tmp_path, ["model"])[2]["step"] == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moedist: warning: skipping checkpoint") and "step_000002" in err


def _raw_checkpoint(run: Path, step: int, tensors: dict, state: dict) -> Path:
    """A checkpoint folder written without save_checkpoint's checks (as an older moedist,
    or a bug, could have left it)."""
    path = checkpoint_dir(run, step)
    path.mkdir(parents=True)
    files = {}
    for name, obj in tensors.items():
        torch.save(obj, path / f"{name}.pt")
        files[f"{name}.pt"] = path / f"{name}.pt"
    (path / "state.json").write_text(json.dumps(state))
    files["state.json"] = path / "state.json"
    manifest = {"format": 1, "step": step, "files": {
        n: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size} for n, p in files.items()
    }}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_load_trained_refuses_a_checkpoint_with_non_finite_tensors(tmp_path: Path):
    from moedist.training.trainer import load_trained

    cfg = build_config(None, None, None, ["model.d_model=32", "model.n_heads=2", "model.n_layers=2",
                                         "model.n_experts=4", "model.seq_len=16"])  # fmt: skip
    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.router)
    state_dict = model.state_dict()
    state_dict["lm_head.weight"][3, 1] = float("nan")
    (tmp_path / "config.toml").write_text(tomli_w.dumps(to_dict(cfg)))
    state = {"step": 7, "config": to_dict(cfg), "tokenizer": ByteTokenizer().to_spec()}
    _raw_checkpoint(tmp_path, 7, {"model": state_dict}, state)
    with pytest.raises(CheckpointError, match=r"non-finite values: tensor model: lm_head.weight \(1 of \d+ values"):
        load_trained(tmp_path)
    assert ckpt_mod.list_checkpoints(tmp_path)[-1][0] == 7


def test_huge_finite_values_are_not_mistaken_for_inf():
    from moedist.training.checkpoint import nonfinite_tensor

    huge = {"f32": torch.full((8,), 3e38), "f64": torch.full((8,), 1e308, dtype=torch.float64)}
    assert nonfinite_tensor(huge) is None  # their sums overflow; the values do not
    huge["f64"][5] = float("-inf")
    assert nonfinite_tensor(huge) == "f64 (1 of 8 values NaN/Inf)"

"""The `moedist` CLI as a user runs it: train, resume, eval, generate, data prepare, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from moedist.cli import main
from moedist.training.profile import PROFILE_KEYS, SPAN_COLUMNS
from tests.sink_helpers import assert_tensorboard_equals_metrics

# A small but real model: the tiny preset shrunk so a run takes seconds on 2 cores.
SMALL = [
    "--set", "model.d_model=64", "--set", "model.n_heads=2", "--set", "model.n_layers=3",
    "--set", "model.seq_len=64", "--set", "model.n_experts=8", "--set", "train.batch_size=8",
    "--set", "train.eval_tokens=4096", "--set", "train.warmup_steps=5", "--set", "router.et_warmup_steps=10",
    "--no-progress",
]  # fmt: skip


def run_cli(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One ET run on the embedded corpus, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("runs") / "et"
    assert run_cli("train", "--steps", "60", "--out", str(out), "--set", "train.eval_every=30", *SMALL) == 0
    return out


def test_training_lowers_val_loss_and_writes_run_folder(trained: Path):
    summary = json.loads((trained / "summary.json").read_text())
    for key in ("router", "steps", "tokens", "wall_s", "tokens_per_s", "final_train_loss", "final_val_loss",
                "n_experts", "mean_fanout", "max_load_ratio", "workers"):  # fmt: skip
        assert key in summary, key
    assert summary["router"] == "et" and summary["steps"] == 60 and summary["workers"] == 1
    # well below a uniform byte model (ln 256 = 5.55 nats)
    assert summary["final_val_loss"] < 3.6 < math.log(256)
    rows = pq.read_table(trained / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(60))
    assert rows[29]["val_loss"] is not None and rows[59]["val_loss"] == pytest.approx(summary["final_val_loss"])
    assert len(rows[0]["L1_load"]) == 8 and len(rows[-1]["L2_threshold"]) == 8
    # EC warm-up: exactly balanced; afterwards the capacity guard bounds every expert
    assert len(set(rows[0]["L1_load"])) == 1
    k = 8 * 64 / 8
    assert all(math.floor(0.5 * k) <= x <= math.ceil(1.5 * k) for x in rows[-1]["L1_load"])
    for name in ("loss.png", "expert_load.png", "fanout.png", "comm_vs_compute.png"):
        assert (trained / "plots" / name).stat().st_size > 1000
    # the step profile: trace.json of the default window (steps 2-4), span columns
    trace = json.loads((trained / "trace.json").read_text())
    assert {e["args"]["step"] for e in trace["traceEvents"] if e["ph"] == "X"} == {2, 3, 4}
    assert all(r["span_expert_s"] > 0 and r["collectives"] == 0 for r in rows)
    assert (trained / "config.toml").is_file()
    ckpt = trained / "checkpoints" / "step_000060"
    assert (ckpt / "manifest.json").is_file()


def test_eval_prints_json(trained: Path, capsys):
    assert run_cli("eval", "--run", str(trained), "--tokens", "2048") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens"] >= 2048 and 0 < res["val_loss"] < 4.0


def test_eval_and_generate_say_whether_et_thresholds_had_settled(trained: Path, tmp_path: Path, capsys):
    """A run still in ET's warm-up (3 of 10 steps): eval routes with the warm-up's expert
    choice and reports the thresholds' pass beside it; --thresholds evaluates with them only;
    generate (always the thresholds) warns. The 60-step run is past warm-up."""
    assert run_cli("eval", "--run", str(trained), "--tokens", "1024") == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["et_routing"] == "thresholds" and ev["thresholds_settled"] is True and ev["et_updates"] == 60
    assert ev["inference_fanout"] == ev["mean_fanout"] and ev["target_fanout"] == 1.0
    out = tmp_path / "warm"
    assert run_cli("train", "--steps", "3", "--out", str(out), *SMALL) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["thresholds_settled"] is False and summary["mean_fanout"] == 1.0  # expert choice
    capsys.readouterr()
    assert run_cli("eval", "--run", str(out), "--tokens", "1024") == 0
    cap = capsys.readouterr()
    ev = json.loads(cap.out.strip().splitlines()[-1])
    assert ev["et_routing"] == "warmup-expert-choice" and ev["thresholds_settled"] is False
    assert (ev["et_updates"], ev["et_warmup_steps"], ev["mean_fanout"]) == (3, 10, 1.0)
    far = not 0.5 <= ev["inference_fanout"] <= 2.0
    assert ("moedist: warning: inference (eval mode) routes" in cap.err) == far
    assert run_cli("eval", "--run", str(out), "--tokens", "1024", "--thresholds") == 0
    th = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert th["et_routing"] == "thresholds" and th["val_loss"] == ev["inference_val_loss"]
    assert th["mean_fanout"] == th["inference_fanout"] == ev["inference_fanout"]
    assert run_cli("generate", "--run", str(out), "--prompt", "def ", "--max-new-tokens", "8") == 0
    assert "3 of 10 warm-up updates" in capsys.readouterr().err
    # signatures route with the thresholds too: warned, and the state is in the report
    assert run_cli("signatures", "--run", str(out), "--out", str(tmp_path / "sig")) == 0
    assert "signatures route with ET thresholds that have not settled (3 of 10" in capsys.readouterr().err
    report = json.loads((tmp_path / "sig" / "report.json").read_text())
    assert (report["thresholds_settled"], report["et_updates"], report["et_warmup_steps"]) == (False, 3, 10)


def test_generate_prints_continuation(trained: Path, capsys):
    assert run_cli("generate", "--run", str(trained), "--prompt", "def main(", "--max-new-tokens", "40") == 0
    text = capsys.readouterr().out
    assert text.startswith("def main(") and len(text) > len("def main(") + 10


# Metric columns a resumed run must reproduce bit for bit, and the ones it cannot.
RESUME_EQUAL = {"step", "loss", "aux_loss", "lr", "grad_norm", "tokens", "val_loss", "skipped",
                # the step profile's counts: what the step did, not how long it took
                *(k for k in PROFILE_KEYS if k.endswith(("_bytes", "collectives")))}  # fmt: skip
RESUME_EQUAL_PER_LAYER = re.compile(r"^L\d+_(load|fanout|threshold|capped)$")
# Wall-clock measurements of the step (and its throughput): they differ between any two runs.
RESUME_TIMING = {"step_s", "tokens_per_s", *SPAN_COLUMNS}
# summary.json keys that measure time, or count what this invocation did (the resumed run
# saved one checkpoint, the uninterrupted one two).
SUMMARY_NOT_EQUAL = {"wall_s", "tokens_per_s", "step_s_per_step", "checkpoints_saved", "checkpoint_s_per_save",
                     *(f"{c}_per_step" for c in SPAN_COLUMNS)}  # fmt: skip


def _assert_rows_equal(want: list[dict], got: list[dict], what: str) -> None:
    """Every metric column equal (NaN == NaN), except the wall-clock ones; a column this
    test does not know fails it (decide whether a resume must reproduce it)."""
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    cols = set(want[0])
    assert set(got[0]) == cols, f"{what}: columns differ: {sorted(cols ^ set(got[0]))}"
    unknown = {c for c in cols if c not in RESUME_EQUAL | RESUME_TIMING and not RESUME_EQUAL_PER_LAYER.match(c)}
    assert not unknown, f"{what}: unknown metric columns {sorted(unknown)}: add them to RESUME_EQUAL or RESUME_TIMING"
    assert any(RESUME_EQUAL_PER_LAYER.match(c) and c.endswith("_threshold") for c in cols)  # ET's state is logged
    for ra, rb in zip(want, got, strict=True):
        for c in sorted(cols - RESUME_TIMING):
            a, b = ra[c], rb[c]
            same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
            assert same, f"{what}: step {ra['step']} column {c}: {a!r} (uninterrupted) != {b!r} (resumed)"


def _assert_tensors_equal(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and numbers: same structure, bitwise-equal tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ (max |diff| {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            _assert_tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_checkpoints_equal(want: Path, got: Path) -> None:
    """model.pt and optim.pt bitwise (every tensor and optimiser entry) and state.json
    whole (step, config, tokenizer, torch RNG state, skipped steps: no timings). Not
    compared byte for byte: metrics.parquet (holds the step timings; its rows are compared
    by column) and manifest.json (it holds the sha256 of metrics.parquet; the other files'
    hashes must agree)."""
    files = {p.name for p in want.iterdir()}
    assert files == {p.name for p in got.iterdir()} == {"model.pt", "optim.pt", "state.json", "metrics.parquet",
                                                         "manifest.json"}  # fmt: skip
    for name in ("model.pt", "optim.pt"):
        _assert_tensors_equal(torch.load(want / name, weights_only=True), torch.load(got / name, weights_only=True),
                              f"{got.name}/{name}")  # fmt: skip
    assert json.loads((want / "state.json").read_text()) == json.loads((got / "state.json").read_text())
    # torch.save writes equal state dicts to equal bytes: the manifests' hashes agree as well
    hashes = [{n: f["sha256"] for n, f in json.loads((c / "manifest.json").read_text())["files"].items()}
              for c in (want, got)]  # fmt: skip
    for name in ("model.pt", "optim.pt", "state.json"):
        assert hashes[0][name] == hashes[1][name], f"{got.name}/{name}: sha256 differs"
    _assert_rows_equal(pq.read_table(want / "metrics.parquet").to_pylist(),
                       pq.read_table(got / "metrics.parquet").to_pylist(), f"{got.name}/metrics.parquet")  # fmt: skip


def test_resume_after_ctrl_c_continues_exactly(tmp_path: Path, monkeypatch, capsys):
    """Ctrl-C during step 8 of 14 (checkpoints every 7 steps), then --resume: every metric,
    the summary and both checkpoints equal those of an uninterrupted run.

    The interrupt is raised in-process, deterministically, where a SIGINT/SIGTERM (which
    the CLI turns into KeyboardInterrupt) would land: after step 8's update has changed the
    model, the optimiser and the ET thresholds, but before the loop records or saves it.
    The resumed run must continue from the cut run's own checkpoint of step 7 and its own
    metric rows.
    """
    from moedist.training.trainer import Trainer

    full, cut = tmp_path / "full", tmp_path / "cut"
    # eval at 5 (before the cut) and 10 (after it); ET leaves its expert-choice warm-up at step 10
    args = ["--steps", "14", "--set", "train.checkpoint_every=7", "--set", "train.eval_every=5", *SMALL]
    assert run_cli("train", "--out", str(full), *args) == 0

    real_step = Trainer.train_step
    stepped: list[int] = []

    def recording_step(self: Trainer) -> dict:
        stepped.append(self.step)
        return real_step(self)

    def interrupted_step(self: Trainer) -> dict:
        stepped.append(self.step)
        row = real_step(self)
        if self.step == 8:  # step 8 (index 7) is done in memory: Ctrl-C arrives now
            raise KeyboardInterrupt
        return row

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", interrupted_step)
        capsys.readouterr()
        assert run_cli("train", "--out", str(cut), *args) == 130
    assert "moedist: interrupted" in capsys.readouterr().err
    assert stepped == list(range(8))
    # what the interrupted run left: the checkpoint of step 7 and the rows of steps 0..6
    assert [p.name for p in sorted((cut / "checkpoints").iterdir())] == ["step_000007"]
    assert not (cut / "summary.json").exists()
    assert [r["step"] for r in pq.read_table(cut / "metrics.parquet").to_pylist()] == list(range(7))

    stepped.clear()
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", recording_step)
        assert run_cli("train", "--resume", str(cut), "--no-progress") == 0
    assert f"Resuming {cut} at step 7 of 14" in capsys.readouterr().out
    assert stepped == list(range(7, 14))  # only what was lost: a resume from step 0 would reproduce every row

    want = pq.read_table(full / "metrics.parquet").to_pylist()
    got = pq.read_table(cut / "metrics.parquet").to_pylist()
    assert [r["step"] for r in got] == list(range(14))
    assert want[4]["val_loss"] is not None and want[9]["val_loss"] is not None and want[13]["val_loss"] is not None
    _assert_rows_equal(want, got, "metrics.parquet")
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["step_000007", "step_000014"] == sorted(p.name for p in (cut / "checkpoints").iterdir())
    for name in ckpts:
        _assert_checkpoints_equal(full / "checkpoints" / name, cut / "checkpoints" / name)
    sa, sb = (json.loads((run / "summary.json").read_text()) for run in (full, cut))
    assert set(sa) == set(sb)
    for key in sorted(set(sa) - SUMMARY_NOT_EQUAL):
        assert sa[key] == sb[key], f"summary.json {key}: {sa[key]!r} (uninterrupted) != {sb[key]!r} (resumed)"


@pytest.mark.parametrize("router", ["dense", "tc", "lf", "ec"])
def test_every_router_trains(router: str, tmp_path: Path):
    out = tmp_path / router
    assert run_cli("train", "--router", router, "--steps", "6", "--out", str(out), "--set", "train.eval_every=0",
                   *SMALL) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["router"] == router and summary["final_val_loss"] < math.log(256)


def test_data_prepare_then_train_on_it(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 60)
    ds = tmp_path / "ds"
    assert run_cli("data", "prepare", "--input", str(corpus), "--out", str(ds), "--val-fraction", "0.3") == 0
    assert (ds / "meta.json").is_file()
    out = tmp_path / "run"
    assert run_cli("train", "--data", str(ds), "--steps", "8", "--out", str(out), "--set", "train.eval_every=0",
                   "--set", "train.eval_tokens=256", *SMALL) == 0  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["final_val_loss"] < math.log(256)


# ------------------------------------------------------------------ bad input
def _fails(capsys, *argv: str, match: str) -> None:
    """The command exits with status 2 and an error line containing `match`."""
    code = run_cli(*argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err, err


def test_unknown_router_is_rejected(capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as e:
        run_cli("train", "--router", "magic", "--out", str(tmp_path / "r"))
    assert e.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    # the same through a config key names the field and the allowed values
    _fails(capsys, "train", "--set", "router.kind=magic", "--out", str(tmp_path / "r"), match="router.kind")
    assert not (tmp_path / "r").exists()


def test_bad_values_name_the_field(capsys, tmp_path: Path):
    out = tmp_path / "r"
    _fails(capsys, "train", "--steps", "-3", "--out", str(out), match="train.steps: must be >= 0")
    _fails(capsys, "train", "--set", "train.lr=fast", "--out", str(out), match="train.lr: expected a number")
    _fails(capsys, "train", "--set", "model.d_modle=64", "--out", str(out), match="unknown config key 'model.d_modle'")
    _fails(capsys, "train", "--preset", "huge", "--out", str(out), match="unknown preset 'huge'")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train\nsteps = 3")
    _fails(capsys, "train", "--config", str(bad_toml), "--out", str(out), match="not valid TOML")
    assert not out.exists()


def test_missing_and_empty_data(capsys, tmp_path: Path):
    out = tmp_path / "r"
    _fails(capsys, "train", "--data", str(tmp_path / "nope"), "--out", str(out), match="does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, "data", "prepare", "--input", str(empty), "--out", str(tmp_path / "ds"), match="empty")
    assert not (tmp_path / "ds").exists()
    _fails(capsys, "train", "--data", str(empty), "--out", str(out), match=str(empty))
    assert not out.exists()


def test_corrupt_checkpoint_is_refused(trained: Path, tmp_path: Path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    # every checkpoint corrupt (with one valid, eval/generate/resume fall back to it: test_bad_input.py)
    models = sorted(run.glob("checkpoints/step_*/model.pt"))
    data = [bytearray(p.read_bytes()) for p in models]
    for p, d in zip(models, data, strict=True):
        d[len(d) // 2] ^= 0xFF
        p.write_bytes(bytes(d))
    _fails(capsys, "eval", "--run", str(run), match="sha256 of model.pt does not match")
    for p, d in zip(models, data, strict=True):
        p.write_bytes(bytes(d[:100]))
    _fails(capsys, "generate", "--run", str(run), "--prompt", "x", match="truncated")
    _fails(capsys, "train", "--resume", str(run), match="truncated")
    _fails(capsys, "eval", "--run", str(tmp_path), match="not a run folder")


def test_existing_run_folder_is_not_overwritten(trained: Path, capsys):
    before = (trained / "summary.json").read_text()
    _fails(capsys, "train", "--out", str(trained), "--steps", "1", match="exists and is not empty")
    assert (trained / "summary.json").read_text() == before


def test_console_script_runs():
    exe = Path(sys.executable).with_name("moedist")
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "train" in res.stdout and "generate" in res.stdout


def test_expert_parallel_training_from_the_cli(tmp_path: Path, capsys):
    """--workers 2 on a local Ray instance; eval and a 1-process resume use its checkpoint."""
    out = tmp_path / "ep"
    assert run_cli("train", "--workers", "2", "--steps", "4", "--out", str(out), *SMALL) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["nodes"] == 1 and summary["steps"] == 4
    assert summary["comm_s_per_step"] > 0 and summary["a2a_s_per_step"] > 0
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["pool_s"] > 0 for r in rows)
    capsys.readouterr()
    assert run_cli("eval", "--run", str(out)) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["step"] == 4 and ev["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert run_cli("train", "--resume", str(out), "--workers", "1", "--steps", "6", "--no-progress") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    # the profile of a run whose rows are part 2-worker, part single-process
    assert (out / "plots" / "comm_vs_compute.png").is_file()
    capsys.readouterr()
    assert run_cli("profile", str(out), "--json") == 0
    assert json.loads(capsys.readouterr().out)["workers"] == 2


def test_bad_worker_count_is_refused_before_anything_starts(tmp_path: Path, capsys):
    assert run_cli("train", "--workers", "0", "--out", str(tmp_path / "x"), *SMALL) == 2
    assert "workers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_signatures_and_task_aware_preselection_from_the_cli(trained: Path, tmp_path: Path, capsys):
    out = tmp_path / "sig"
    assert run_cli("signatures", "--run", str(trained), "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("within_cosine", "across_cosine", "cv_accuracy", "cv_macro_f1", "permutation_accuracy",
                "load_balance_accuracy", "accuracy_by_layer"):  # fmt: skip
        assert key in report, key
    assert report["prompts"] >= 80 and len(report["accuracy_by_layer"]) == 2
    assert (out / "signatures.parquet").is_file() and (out / "similarity.png").is_file()
    assert report["normalization"] == "assignment" and len(report["confusion"]["matrix"]) == 4
    assert (report["thresholds_settled"], report["et_updates"]) == (True, 60)
    assert "warning" not in capsys.readouterr().err
    assert run_cli("signatures", "--run", str(trained), "--out", str(tmp_path / "tok"), "--normalize", "token") == 0
    assert json.loads((tmp_path / "tok" / "report.json").read_text())["normalization"] == "token"
    assert (tmp_path / "tok" / "confusion.png").is_file()
    capsys.readouterr()
    assert run_cli("eval", "--run", str(trained), "--experts-from", str(out), "--task", "code", "--keep", "0.5") == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["experts_kept_per_layer"] == 4 and math.isfinite(ev["val_loss"])
    assert run_cli("generate", "--run", str(trained), "--prompt", "def ", "--max-new-tokens", "8",
                   "--experts-from", str(out), "--task", "code", "--keep", "0.25") == 0  # fmt: skip
    assert run_cli("eval", "--run", str(trained), "--experts-from", str(out), "--task", "poetry") == 2
    assert "poetry" in capsys.readouterr().err


@pytest.mark.parametrize("router", ["aoe", "etr"])
def test_aoe_and_etr_train_eval_generate_resume(router: str, tmp_path: Path, capsys):
    out = tmp_path / router
    assert run_cli("train", "--router", router, "--steps", "4", "--out", str(out), *SMALL) == 0
    assert json.loads((out / "summary.json").read_text())["router"] == router
    capsys.readouterr()
    assert run_cli("eval", "--run", str(out)) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"])
    assert run_cli("generate", "--run", str(out), "--prompt", "import ", "--max-new-tokens", "8") == 0
    assert run_cli("train", "--resume", str(out), "--steps", "6", "--no-progress") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


# A model for tests of outputs, not of learning: a step takes milliseconds.
TINY = [
    "--set", "model.d_model=32", "--set", "model.n_heads=2", "--set", "model.n_layers=2",
    "--set", "model.seq_len=16", "--set", "model.n_experts=4", "--set", "train.batch_size=4",
    "--set", "train.eval_tokens=256", "--set", "router.et_warmup_steps=2", "--no-progress", "--no-control",
]  # fmt: skip


def test_tensorboard_log_and_torch_profile_survive_ctrl_c_and_resume(tmp_path: Path, monkeypatch, capsys):
    """--log tensorboard --torch-profile 0-1, Ctrl-C before step 3 (checkpoint at 2, an
    evaluation logged at step 2), then --resume without evaluations: TensorBoard's reader
    sees exactly metrics.parquet (the interrupted run's sinks were closed, so its steps are
    on disk; the replayed step 2 replaces the old one, its val_loss included), and the
    profiled window is one Chrome trace of rank 0."""
    from moedist.training.trainer import Trainer

    run = tmp_path / "run"
    real_step = Trainer.train_step

    def interrupted_step(self: Trainer) -> dict:
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", interrupted_step)
        code = run_cli("train", "--steps", "5", "--out", str(run), "--log", "tensorboard", "--torch-profile", "0-1",
                       "--set", "train.checkpoint_every=2", "--set", "train.eval_every=3", *TINY)  # fmt: skip
    assert code == 130
    assert pq.read_table(run / "metrics.parquet").to_pylist()[2]["val_loss"] is not None
    assert_tensorboard_equals_metrics(run)  # what the interrupted run left: steps 0..2
    assert run_cli("train", "--resume", str(run), "--set", "train.eval_every=0", "--no-progress", "--no-control") == 0
    assert f"TensorBoard: tensorboard --logdir {run / 'tensorboard'}" in capsys.readouterr().out
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(5))
    assert rows[2]["val_loss"] is None and rows[4]["val_loss"] is not None  # the final evaluation
    assert_tensorboard_equals_metrics(run)

    assert sorted(p.name for p in (run / "torch_profile").iterdir()) == ["rank0.step0-1.pt.trace.json"]
    trace = json.loads((run / "torch_profile" / "rank0.step0-1.pt.trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names) and "aten::mm" in names, sorted(names)[:20]

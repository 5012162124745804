"""Bad input to the `moedist` CLI: one line `moedist: error: ...`, exit status 2, found
before Ray, a worker or the training starts and before anything is written; and the
reliability of run folders and checkpoints as the CLI sees them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import moedist
from moedist import cli
from moedist.cli import main
from moedist.data import read_documents, split_documents
from moedist.runtime.coordinator import JobError
from moedist.training.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint

REPO = Path(moedist.__file__).resolve().parent.parent
# A tiny model: each step takes a fraction of a second on 2 cores.
SMALL = [
    "--set", "model.d_model=32", "--set", "model.n_heads=2", "--set", "model.n_layers=2",
    "--set", "model.seq_len=32", "--set", "model.n_experts=4", "--set", "train.batch_size=4",
    "--set", "train.eval_tokens=256", "--set", "train.eval_every=0", "--set", "router.et_warmup_steps=2",
    "--no-progress",
]  # fmt: skip


def _fails(capsys, *argv: str, match: str) -> str:
    """The command exits with status 2 and one error line containing `match`."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moedist: error: "), err
    assert match in lines[0], err
    return lines[0]


@pytest.fixture
def no_ray(monkeypatch):
    """Starting (or joining) Ray fails the test: the error must come first."""

    def connect(*a, **k):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr("moedist.runtime.cluster.connect", connect)


@pytest.fixture
def no_training(monkeypatch):
    """A training step fails the test: the error must come before any compute."""

    def train_step(self):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr("moedist.training.trainer.Trainer.train_step", train_step)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 4-step ET run with checkpoints at steps 2 and 4 (tests that change it copy it)."""
    out = tmp_path_factory.mktemp("runs") / "et"
    assert main(["train", "--steps", "4", "--out", str(out), "--set", "train.checkpoint_every=2",
                 "--set", "train.keep_checkpoints=3", *SMALL]) == 0  # fmt: skip
    return out


@pytest.fixture
def run_copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def _corpus(folder: Path, val_text: str, train_text: str) -> Path:
    """Two documents; the one split_documents puts in validation holds `val_text`."""
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text("placeholder")
    _, val = split_documents(read_documents([folder]), 0.05)
    for name in ("a.txt", "b.txt"):
        path = folder / name
        path.write_text(val_text if any(Path(d.name).name == name for d in val) else train_text)
    return folder


# ------------------------------------------------------------------ defect 3: short validation split
def test_a_validation_split_shorter_than_a_sequence_fails_when_the_data_is_loaded(
    tmp_path: Path, capsys, run: Path, no_training, no_ray
):
    corpus = _corpus(tmp_path / "corpus", "tiny val text\n", "def f(x):\n    return x + 1\n" * 200)
    ds = tmp_path / "ds"
    assert main(["data", "prepare", "--input", str(corpus), "--out", str(ds), "--val-fraction", "0.05"]) == 0
    err = capsys.readouterr().err
    # data prepare says how short the split is and which sequence lengths cannot evaluate on it
    assert "moedist: warning: the validation split has 15 tokens" in err
    assert "128, 256, 512, 1024, 2048" in err and "model.seq_len <= 14" in err
    out = tmp_path / "r"
    for extra in ([], ["--workers", "2"]):
        _fails(capsys, "train", "--data", str(ds), "--out", str(out), *SMALL, *extra,
               match="validation split of prepared dataset")  # fmt: skip
        assert not out.exists()
    line = _fails(capsys, "eval", "--run", str(run), "--data", str(ds), match="validation split")
    assert "has 15 tokens, fewer than one sequence (seq_len + 1 = 33)" in line


def test_data_prepare_does_not_warn_when_the_validation_split_is_long_enough(tmp_path: Path, capsys):
    corpus = _corpus(tmp_path / "corpus", "x = 1\n" * 400, "y = 2\n" * 400)
    assert main(["data", "prepare", "--input", str(corpus), "--out", str(tmp_path / "ds")]) == 0
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------ defect 4: runtime flags
@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--workers", "4", "--set", "model.n_experts=2"], "model.n_experts (2) must be >= workers (4)"),
        (["--workers", "2", "--cpus-per-worker", "0"], "--cpus-per-worker: must be a finite number > 0, got 0"),
        (["--workers", "2", "--cpus-per-worker", "nan"], "--cpus-per-worker: must be a finite number > 0, got nan"),
        (["--workers", "2", "--start-timeout", "-1"], "--start-timeout: must be a finite number > 0, got -1"),
        (["--workers", "2", "--start-timeout", "inf"], "--start-timeout: must be a finite number > 0, got inf"),
        (["--workers", "2", "--seed", "-1"], "--seed: must be in 0 .. 2^63-1"),
        (["--workers", "2", "--elastic", "4"], "--elastic: expected MIN:MAX worker counts such as 2:8, got '4'"),
        (["--workers", "2", "--elastic", "2:x"], "--elastic: expected MIN:MAX worker counts"),
        (["--workers", "2", "--elastic", "0:4"], "--elastic: MIN must be >= 1, got 0 in '0:4'"),
        (["--workers", "2", "--elastic", "4:2"], "--elastic: MAX must be >= MIN, got '4:2'"),
        (
            ["--workers", "2", "--elastic", "3:4"],
            "--elastic: the job starts with 2 workers (--workers or the config's workers), outside 3:4",
        ),
        (["--elastic", "1:4"], "--elastic: a single-process run cannot change its worker count"),
        (["--workers", "2", "--log", "tensorboard,foo"],
         "profile.log: 'foo' is not one of: tensorboard, wandb, wandb:offline, wandb:online (comma-separated)"),
        (["--workers", "2", "--log", "wandb,wandb:online"], "profile.log: 'wandb,wandb:online' names a sink twice"),
        (["--workers", "2", "--torch-profile", "3-1"], "profile.torch_profile: '3-1' ends before it starts"),
        (["--workers", "2", "--torch-profile", "1:2"], "profile.torch_profile: '1:2' is not a step range A-B"),
        (["--workers", "2", "--steps", "4", "--torch-profile", "2-4"],
         "profile.torch_profile: step 4 is past the run's last step (train.steps = 4: steps 0..3)"),
        (["--workers", "2", "--set", "profile.trace_steps=3-1"], "trace_steps: the first step must not be after"),
        (["--workers", "2", "--set", "profile.trace_steps=2..4"], "profile.trace_steps: expected \"A-B\""),
        (["--steps", "4", "--set", "profile.trace_steps=4-5"], "trace_steps: window '4-5' starts after the run"),
        (["--set", "profile.trace_steps=0-500"], "trace_steps: '0-500' is 501 steps; a trace holds at most 200"),
        (["--workers", "2", "--set", "comm.overlap_chunks=0"], "comm.overlap_chunks: must be >= 1, got 0"),
        (["--workers", "2", "--set", "comm.overlap_chunks=2", "--set", "comm.shm=true"],
         "comm.overlap_chunks (2) cannot be combined with comm.shm"),
    ],
)
def test_runtime_flags_are_checked_before_ray_starts(flags, match, tmp_path: Path, capsys, no_ray):
    out = tmp_path / "r"
    _fails(capsys, "train", "--out", str(out), *SMALL, *flags, match=match)
    assert not out.exists()


@pytest.mark.parametrize(("flag", "package"), [("tensorboard", "tensorboard"), ("tensorboard,wandb", "wandb")])
def test_a_metric_sink_that_is_not_installed_is_refused_before_ray_starts(flag, package, tmp_path: Path, capsys,
                                                                          monkeypatch, no_ray):  # fmt: skip
    monkeypatch.setitem(sys.modules, package, None)  # as if absent: find_spec and import fail
    out = tmp_path / "r"
    line = _fails(capsys, "train", "--out", str(out), "--workers", "2", "--log", flag, *SMALL,
                  match=f"needs the {package} package, which is not installed: pip install 'moedist[log]'")  # fmt: skip
    assert f"pip install {package})" in line
    assert not out.exists()


# ------------------------------------------------------------------ defect 5: one-line errors
@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0, got -1"),
        (["--temperature", "-1"], "--temperature: must be a finite number >= 0, got -1"),
        (["--temperature", "nan"], "--temperature: must be a finite number >= 0, got nan"),
        (["--top-k", "-2"], "--top-k: must be >= 0"),
        (["--seed", str(2**64 + 1)], "--seed: must be in 0 .. 2^63-1"),
        (["--prompt", ""], "--prompt: is empty"),
    ],
)
def test_generate_flags(flags, match, run: Path, capsys):
    argv = ["generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "4", *flags]
    _fails(capsys, *argv, match=match)


def test_signatures_prompts_that_are_not_utf8_or_a_folder(run: Path, tmp_path: Path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'{"task": "code", "text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    line = _fails(capsys, "signatures", "--run", str(run), "--prompts", str(bad), "--out", str(tmp_path / "s"),
                  match="is not UTF-8 text")  # fmt: skip
    assert "byte 0xe9" in line
    _fails(capsys, "signatures", "--run", str(run), "--prompts", str(tmp_path), "--out", str(tmp_path / "s"),
           match="is a folder, not a JSONL file")  # fmt: skip


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        # 100000 layers of the tiny preset: 1.2e11 parameters (this used to allocate until memory ran out)
        (["model.n_layers=100000"], "parameters need about 1.7 TiB for weights, gradients and AdamW state"),
        (["model.d_model=1048576", "model.n_heads=2"], "TiB for weights, gradients and AdamW state"),
        (["model.n_experts=4000000"], "TiB for weights, gradients and AdamW state"),
        (["model.d_model=4611686018427387904", "model.n_heads=2"], "model is too large to build"),
    ],
    ids=["n_layers", "d_model", "n_experts", "overflow"],
)
def test_models_that_cannot_fit_in_memory_are_refused_with_an_estimate(sets, match, tmp_path: Path, capsys,
                                                                        no_training):  # fmt: skip
    out = tmp_path / "r"
    argv = ["train", "--out", str(out), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    line = _fails(capsys, *argv, match=match)
    assert "more than this machine's" in line or "overflow" in line
    assert not out.exists()


def test_seeds_and_integers_out_of_range(run: Path, tmp_path: Path, capsys):
    out = tmp_path / "r"
    _fails(capsys, "train", "--seed", str(2**64 + 1), "--out", str(out), *SMALL, match="--seed: must be in 0 .. 2^63-1")
    _fails(capsys, "train", "--set", f"train.seed={2**64}", "--out", str(out), *SMALL,
           match=f"train.seed: {2**64} is out of range")  # fmt: skip
    _fails(capsys, "train", "--set", f"train.steps={2**70}", "--out", str(out), *SMALL, match="train.steps")
    _fails(capsys, "signatures", "--run", str(run), "--seed", str(2**40), "--out", str(tmp_path / "s"),
           match="--seed: must be in 0 .. 2^32-1")  # fmt: skip
    assert not out.exists() and not (tmp_path / "s").exists()


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create entries in (root ignores permission bits)."""
    if os.geteuid() == 0:
        if not Path("/sys").is_dir():
            pytest.skip("needs /sys (read-only for root) to test an unwritable folder as root")
        return Path("/sys")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro


@pytest.mark.parametrize("command", ["train", "signatures", "data"])
def test_out_that_is_a_file_or_not_writable(command: str, run: Path, tmp_path: Path, capsys):
    corpus = _corpus(tmp_path / "corpus", "x = 1\n" * 100, "y = 2\n" * 400)
    argv = {
        "train": ["train", *SMALL, "--steps", "1"],
        "signatures": ["signatures", "--run", str(run)],
        "data": ["data", "prepare", "--input", str(corpus)],
    }[command]
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    _fails(capsys, *argv, "--out", str(a_file), match=f"--out: '{a_file}' is a file, not a folder")
    _fails(capsys, *argv, "--out", str(a_file / "sub"), match=f"'{a_file}' is a file, not a folder")
    ro = _unwritable(tmp_path)
    _fails(capsys, *argv, "--out", str(ro / "moedist-out"), match=f"folder '{ro}' is not writable")
    assert a_file.read_text() == "not a folder"


# ------------------------------------------------------------------ defect 6: concurrent runs
_CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from moedist.cli import main
    # Both runs take the same default name, runs/et-20250101-000000, as if started in one second.
    time.strftime = lambda fmt, t=None: "20250101-000000"
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.005)
    sys.exit(main(sys.argv[2:]))
""")


def test_two_runs_started_at_once_with_the_default_out_never_share_a_folder(tmp_path: Path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(go), "train", "--steps", "2", "--seed", str(seed),
                          *SMALL], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (11, 22)
    ]  # fmt: skip
    time.sleep(3)  # both have imported moedist and wait for the start signal
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["et-20250101-000000", "et-20250101-000000-2"]
    seeds = set()
    for r in runs:
        seed = int(r.joinpath("config.toml").read_text().split("seed = ")[1].split()[0])
        _, state = load_checkpoint(checkpoint_dir(r, 2), [])
        assert state["config"]["train"]["seed"] == seed  # config and checkpoint from the same run
        seeds.add(seed)
    assert seeds == {11, 22}


def test_claiming_run_folders(tmp_path: Path, monkeypatch):
    from moedist import cli_checks

    monkeypatch.chdir(tmp_path)
    a = cli_checks.claim_run_dir(None, "et", now=0.0)
    b = cli_checks.claim_run_dir(None, "et", now=0.0)
    assert a != b and b.name == a.name + "-2" and a.is_dir() and b.is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_checks.claim_run_dir(str(empty), "et") == empty  # an empty folder is claimed via its plots/
    with pytest.raises(cli_checks.ConfigError, match="exists and is not empty"):
        cli_checks.claim_run_dir(str(empty), "et")
    # a command that fails before writing gives the folders back, but keeps the user's own
    cli_checks.release_unused_run_dirs()
    assert not a.exists() and not b.exists() and empty.is_dir() and not any(empty.iterdir())


def test_a_failed_run_leaves_no_folder_behind(tmp_path: Path, capsys, monkeypatch):
    def broken_init(self, *a, **k):
        raise FloatingPointError("injected failure before anything is written")

    monkeypatch.setattr("moedist.training.trainer.Trainer.__init__", broken_init)
    out = tmp_path / "r"
    _fails(capsys, "train", "--out", str(out), *SMALL, match="injected failure")
    assert not out.exists()


# ------------------------------------------------------------------ defect 7: checkpoints from the CLI
def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_eval_generate_and_resume_fall_back_to_the_newest_valid_checkpoint(run_copy: Path, capsys):
    _corrupt(checkpoint_dir(run_copy, 4) / "model.pt")
    assert main(["eval", "--run", str(run_copy), "--tokens", "256"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["step"] == 2
    warning = [ln for ln in err.splitlines() if ln.strip()]
    assert len(warning) == 1 and warning[0].startswith("moedist: warning: skipping checkpoint")
    assert "step_000004" in warning[0] and "sha256 of model.pt" in warning[0] and "using 'step_000002'" in warning[0]
    assert main(["generate", "--run", str(run_copy), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert "skipping checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_copy), "--steps", "5", "--no-progress"]) == 0
    assert "step_000004" in capsys.readouterr().err
    rows = pq.read_table(run_copy / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # steps 2 and 3 trained again from step 2


def test_eval_refuses_a_non_finite_validation_loss(run_copy: Path, capsys):
    ckpt = checkpoint_dir(run_copy, 4)
    objs, state = load_checkpoint(ckpt, ["model", "optim"])
    # finite, but so large that the logits overflow to inf and the loss is NaN
    objs["model"]["lm_head.weight"].fill_(3e38)
    save_checkpoint(run_copy, 4, objs, state)
    line = _fails(capsys, "eval", "--run", str(run_copy), "--tokens", "256", match="validation loss of run")
    assert "at step 4 is nan (not finite)" in line or "at step 4 is inf (not finite)" in line


def test_a_checkpoint_with_non_finite_tensors_does_not_verify_and_is_skipped(run_copy: Path, capsys):
    """One written by an older moedist (or by hand): eval warns, naming the tensor, and
    uses the newest checkpoint without NaN/Inf."""
    ckpt = checkpoint_dir(run_copy, 4)
    sd = torch.load(ckpt / "model.pt", weights_only=True)
    sd["lm_head.weight"][5, 3] = float("nan")
    torch.save(sd, ckpt / "model.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "model.pt").read_bytes()
    manifest["files"]["model.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", "--run", str(run_copy), "--tokens", "256"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["step"] == 2
    assert "holds non-finite values: tensor model: lm_head.weight (1 of" in err and "step_000004" in err


# ------------------------------------------------------------------ defect 10: smaller ones
def test_resume_refuses_config_and_preset(run_copy: Path, tmp_path: Path, capsys, no_training):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nsteps = 9\n")
    _fails(
        capsys, "train", "--resume", str(run_copy), "--config", str(cfg), match="--config: cannot be used with --resume"
    )
    _fails(
        capsys, "train", "--resume", str(run_copy), "--preset", "tiny", match="--preset: cannot be used with --resume"
    )


def test_resume_refuses_a_new_model_shape_or_router_before_ray_starts(run_copy: Path, capsys, no_training, no_ray):
    """The checkpoint's tensors fix the model: another expert count, width or router is
    refused in one line, before Ray or a worker starts (a running job resizes through ctl)."""
    line = _fails(capsys, "train", "--resume", str(run_copy), "--workers", "2", "--set", "model.n_experts=32",
                  match="model.n_experts: a resumed run keeps the model of its checkpoint")  # fmt: skip
    assert "cannot change to 32" in line and "moedist ctl scale --experts" in line
    _fails(capsys, "train", "--resume", str(run_copy), "--set", "model.d_model=64", match="model.d_model: a resumed")
    _fails(capsys, "train", "--resume", str(run_copy), "--set", "router.kind=tc",
           match="router.kind: a resumed run keeps its router (et)")  # fmt: skip


def test_resume_with_fewer_steps_than_the_run_has_is_an_error(run_copy: Path, capsys, no_training):
    before = (run_copy / "summary.json").read_text()
    line = _fails(capsys, "train", "--resume", str(run_copy), "--steps", "3", match="is already past step 3")
    assert "step_000004" in line and "--steps 5 or more" in line
    assert (run_copy / "summary.json").read_text() == before


def test_a_table_given_a_value_in_the_config_file_with_a_train_flag(tmp_path: Path, capsys, no_training):
    cfg = tmp_path / "c.toml"
    cfg.write_text("train = 3\n")
    out = tmp_path / "r"
    _fails(
        capsys, "train", "--config", str(cfg), "--steps", "2", "--out", str(out), match="train: expected a table, got 3"
    )
    assert not out.exists()


def test_data_that_is_a_file(run: Path, tmp_path: Path, capsys):
    f = tmp_path / "corpus.txt"
    f.write_text("some text")
    _fails(capsys, "train", "--data", str(f), "--out", str(tmp_path / "r"),
           match=f"--data: '{f}' is a file, not a prepared dataset folder")  # fmt: skip
    _fails(capsys, "eval", "--run", str(run), "--data", str(f), match="is a file, not a prepared dataset folder")


def test_data_prepare_overwrite(tmp_path: Path, capsys):
    corpus = _corpus(tmp_path / "corpus", "x = 1\n" * 400, "y = 2\n" * 400)
    ds = tmp_path / "ds"
    assert main(["data", "prepare", "--input", str(corpus), "--out", str(ds)]) == 0
    line = _fails(capsys, "data", "prepare", "--input", str(corpus), "--out", str(ds), match="not empty")
    assert "--overwrite" in line and "overwrite=True" not in line
    assert main(["data", "prepare", "--input", str(corpus), "--out", str(ds), "--overwrite"]) == 0
    assert (ds / "meta.json").is_file()


_NUMBA = textwrap.dedent("""
    import json, torch, numba
    from moedist.kernels import dispatch
    dispatch.sort_by_expert(torch.tensor([2, 0, 1, 2, 0]), 3, backend="numba")
    st = dispatch._counting_sort_nb.stats
    print(json.dumps({"dir": numba.config.CACHE_DIR, "path": st.cache_path,
                      "hits": sum(st.cache_hits.values()), "misses": sum(st.cache_misses.values())}))
""")


def test_numba_caches_kernels_in_the_user_cache_folder(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", _NUMBA], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    first, second = runs
    cache = tmp_path / "cache" / "moedist" / "numba"
    assert first["dir"] == str(cache) and Path(first["path"]).is_relative_to(cache)
    assert not Path(first["path"]).is_relative_to(REPO / "moedist")
    assert list(cache.rglob("dispatch._counting_sort_nb-*.nbi"))
    assert first["misses"] == 1 and first["hits"] == 0  # compiled, then cached ...
    assert second["hits"] == 1 and second["misses"] == 0  # ... and loaded from the cache


def test_colour_codes_are_stripped_from_errors(monkeypatch, capsys):
    def fail(args):
        raise JobError("\x1b[36m(Worker pid=123)\x1b[0m worker died:\n  \x1b[1;31mRayActorError\x1b[0m: gone")

    monkeypatch.setitem(cli.COMMANDS, "eval", fail)
    assert main(["eval", "--run", "x"]) == 1
    err = capsys.readouterr().err
    assert err == "moedist: error: JobError: (Worker pid=123) worker died: | RayActorError: gone\n"


@pytest.mark.parametrize("command", ["profile", "plot"])
def test_profile_and_plot_of_a_folder_that_is_not_a_run(command: str, run: Path, tmp_path: Path, capsys):
    _fails(capsys, command, str(tmp_path / "nope"), match="is not a run folder (no such directory)")
    _fails(capsys, command, str(tmp_path), match="is not a run folder with metrics (no metrics.parquet)")
    (tmp_path / "metrics.parquet").write_bytes(b"not parquet")
    _fails(capsys, command, str(tmp_path), match="metrics.parquet' cannot be read")
    if command == "profile":
        _fails(capsys, "profile", str(run), "--skip", "-1", match="--skip: must be >= 0")


def test_shared_memory_exchange_on_a_machine_that_is_not_x86_is_refused_before_ray_starts(
    tmp_path: Path, capsys, no_ray, monkeypatch
):
    """comm.shm relies on x86-64's store order: elsewhere it is a one-line error, exit 2."""
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    out = tmp_path / "r"
    _fails(capsys, "train", "--out", str(out), *SMALL, "--workers", "2", "--set", "comm.shm=true",
           match="comm.shm: the shared-memory exchange needs an x86-64 machine, this one is aarch64")  # fmt: skip
    assert not out.exists()

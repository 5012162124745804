"""`moedist train | eval | generate | signatures | data prepare | ctl | profile | plot`.

Bad input exits with status 2 and one line `moedist: error: ...` naming what is wrong;
no run folder is created until the configuration and the data have been checked.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from moedist import cli_checks
from moedist.config import ROUTERS, ConfigError, build_config, preset_names
from moedist.control import ControlCallError
from moedist.errors import CheckpointError, DataError, JobError, TooManyFailuresError


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: tiny ET MoE on the embedded stdlib corpus)")
    p.add_argument("--config", help="TOML config file (fields as in a run's config.toml)")
    p.add_argument("--preset", help=f"base preset (default tiny; available: {', '.join(preset_names())})")
    p.add_argument("--router", choices=ROUTERS, help="router kind (overrides router.kind)")
    p.add_argument("--data", help="prepared dataset dir (moedist data prepare); default: embedded corpus")
    p.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    p.add_argument("--seed", type=int, help="seed for init and data order (train.seed)")
    p.add_argument("--out", help="run folder (default runs/<router>-<time>)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any field, e.g. train.lr=1e-3"
    )
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log", metavar="SINKS", help="metrics also to tensorboard (RUN/tensorboard/), wandb (offline, "
                   "RUN/wandb/; wandb:online to stream) or both: tensorboard,wandb (profile.log)")  # fmt: skip
    p.add_argument("--torch-profile", metavar="A-B", help="torch.profiler Chrome traces of steps A..B on every "
                   "worker into RUN/torch_profile/ (profile.torch_profile)")  # fmt: skip
    g = p.add_argument_group("expert parallelism on Ray (used when workers > 1 or --address is given)")
    g.add_argument("--workers", type=int, help="worker actors; the global batch is split among them (workers)")
    g.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: a new local instance")
    g.add_argument("--node-address", help="this driver's node address (default 127.0.0.2 for a local instance, "
                   "else the host of --address)")  # fmt: skip
    g.add_argument("--placement", default="PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                   help="placement-group strategy for the workers' bundles")  # fmt: skip
    g.add_argument("--cpus-per-worker", type=float, default=1.0)
    g.add_argument("--start-timeout", type=float, default=120.0,
                   help="seconds to place and start the workers (and replacements after a failure)")
    g.add_argument("--step-timeout", type=float, default=1800.0,
                   help="seconds a step, evaluation or checkpoint may take before the job counts it as hung")
    g.add_argument("--max-failures", type=int, default=3,
                   help="lost workers to recover from (from the newest checkpoint) before the job stops")
    g.add_argument("--elastic", metavar="MIN:MAX",
                   help="follow the cluster's size: grow to the most workers in MIN..MAX that fit when nodes "
                        "join, grow back after a recovery to fewer (off by default; see docs/scaling.md)")
    g = p.add_argument_group("control API while the job runs (moedist ctl; address and token in RUN/control.json)")
    g.add_argument("--control-host", help="address to serve on (default 127.0.0.1; with Ray the driver's node address)")
    g.add_argument("--control-port", type=int, help="port to serve on (default 0: any free port)")
    g.add_argument("--no-control", action="store_true", help="no control API for this job")


def cmd_train(args: argparse.Namespace) -> int:
    from moedist.training.loop import RunLoop, write_config
    from moedist.training.sinks import check_installed as check_log_installed
    from moedist.training.trainer import Trainer, load_dataset

    cli_checks.check_train_flags(args)
    overrides: dict[str, Any] = {}
    if args.router:
        overrides.setdefault("router", {})["kind"] = args.router
    if args.steps is not None:
        overrides.setdefault("train", {})["steps"] = args.steps
    if args.seed is not None:
        overrides.setdefault("train", {})["seed"] = args.seed
    if args.data is not None:
        if not Path(args.data).exists():
            raise ConfigError(f"--data: path '{args.data}' does not exist")
        overrides.setdefault("data", {})["path"] = str(Path(args.data).resolve())
    if args.no_progress:
        overrides.setdefault("train", {})["progress"] = False
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.log is not None:
        overrides.setdefault("profile", {})["log"] = args.log
    if args.torch_profile is not None:
        overrides.setdefault("profile", {})["torch_profile"] = args.torch_profile

    if args.resume:
        from moedist.config import deep_update, parse_override
        from moedist.training.trainer import resume_config

        for item in args.set:
            deep_update(overrides, parse_override(item))
        out = Path(args.resume)
        cfg = resume_config(out, overrides)
        cli_checks.check_resume_step(out, cfg)
    else:
        cfg = build_config(args.preset, args.config, overrides, args.set)
        out = None
    cli_checks.check_elastic(args, cfg)
    cli_checks.check_comm(cfg)
    check_log_installed(cfg.profile.log)  # before Ray starts or a run folder appears
    dataset = load_dataset(cfg)  # checked before anything is written or started
    if out is None:
        cli_checks.check_fits_in_memory(cfg, dataset.vocab_size)
        out = cli_checks.claim_run_dir(args.out, cfg.router.kind)  # exclusively: never shared by two runs
    if cfg.workers > 1 or args.address:
        return _train_distributed(cfg, out, dataset.tokenizer.to_spec(), args, resume=bool(args.resume))
    trainer = Trainer(cfg, dataset)
    loop = RunLoop(cfg, out, trainer, dataset.tokenizer.to_spec(), max_failures=args.max_failures)
    if args.resume:
        loop.restore()
        print(f"Resuming {out} at step {trainer.step} of {cfg.train.steps}")
    else:
        write_config(out, cfg)
        counts = trainer.param_counts()
        print(
            f"moedist: {cfg.router.kind} router, {cfg.model.n_experts} experts, "
            f"{counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active), "
            f"data: {dataset.source}, {cfg.train.steps} steps -> {out}"
        )
    with _control(args, loop, "127.0.0.1"):
        summary = loop.run()
    _print_done(out, summary)
    return 0


def _control(args: argparse.Namespace, loop, default_host: str):
    """The job's control API (moedist ctl) around its run loop, unless --no-control."""
    if args.no_control:
        return contextlib.nullcontext()
    from moedist.control.server import serve

    return serve(loop, args.control_host or default_host, args.control_port or 0, say=print)


def _print_done(run: Path, summary: dict[str, Any]) -> None:
    keys = ("final_train_loss", "final_val_loss", "tokens_per_s", "mean_fanout", "workers")
    print(json.dumps({k: summary.get(k) for k in keys}))
    if summary.get("stopped_at_step") is not None:
        print(f"Stopped at step {summary['stopped_at_step']} by the control API (final checkpoint written)")
    if summary.get("failures"):
        print(f"Recovered from {len(summary['failures'])} lost worker(s): see 'failures' in summary.json")
    print(f"Run folder: {run}\nSummary:    {run / 'summary.json'}\nMetrics:    {run / 'metrics.parquet'}")
    print(f"Plots:      {run / 'plots'}/ (loss.png, expert_load.png, fanout.png, comm_vs_compute.png)")
    if (run / "trace.json").is_file():
        print(f"Trace:      {run / 'trace.json'} (ui.perfetto.dev); breakdown: moedist profile {run}")
    if (run / "tensorboard").is_dir():
        print(f"TensorBoard: tensorboard --logdir {run / 'tensorboard'}")
    if any((run / "wandb").glob("offline-run-*")):
        print(f"W&B:        {run / 'wandb'}/ (upload: wandb sync {run / 'wandb'}/offline-run-*)")
    if (run / "torch_profile").is_dir():
        print(f"Profiles:   {run / 'torch_profile'}/ (Chrome traces: ui.perfetto.dev)")


def _train_distributed(cfg, out: Path, tokenizer_spec: dict[str, Any], args: argparse.Namespace,
                       resume: bool = False) -> int:  # fmt: skip
    """Expert-parallel training: the coordinator (in this process) drives cfg.workers worker
    actors through the same run loop as a single-process run."""
    import ray

    from moedist.runtime.cluster import connect
    from moedist.runtime.coordinator import Coordinator
    from moedist.training.loop import RunLoop, write_config

    started = connect(args.address, args.node_address, num_cpus=math.ceil(cfg.workers * args.cpus_per_worker),
                      say=print)  # fmt: skip
    policy, replace_s = None, None
    if args.elastic:
        from moedist.runtime.elastic import REPLACE_TIMEOUT_S, ElasticPolicy, parse_range

        policy, replace_s = ElasticPolicy(*parse_range(args.elastic)), min(REPLACE_TIMEOUT_S, args.start_timeout)
    coord = Coordinator(cfg, args.placement, args.cpus_per_worker, None, args.start_timeout, args.step_timeout,
                        replace_timeout_s=replace_s)  # fmt: skip
    try:
        infos = coord.start()
        nodes = sorted({i["node"] for i in infos})
        loop = RunLoop(cfg, out, coord, tokenizer_spec, max_failures=args.max_failures)
        if policy is not None:
            loop.on_boundary.append(policy)
        if resume:
            loop.restore()
        else:
            write_config(out, cfg)
        print(
            f"moedist: {cfg.router.kind} router, {cfg.model.n_experts} experts on {cfg.workers} workers "
            f"({infos[0]['backend']}, {len(nodes)} node(s): {', '.join(nodes)}), "
            f"{'resuming at step ' + str(coord.step) + ' of ' if resume else ''}{cfg.train.steps} steps -> {out}"
            f"{'; elastic: ' + args.elastic + ' workers, following the cluster' if args.elastic else ''}",
            flush=True,
        )
        with _control(args, loop, ray.util.get_node_ip_address()):  # the driver's node address
            summary = loop.run()
    finally:
        coord.shutdown()
        if started:
            ray.shutdown()
    _print_done(out, summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moedist.data import TokenDataset
    from moedist.training.evaluate import evaluate
    from moedist.training.trainer import load_trained

    cli_checks.check_eval_flags(args)
    cfg, model, tokenizer, step = load_trained(Path(args.run))
    kept = _apply_expert_selection(model, args)
    if args.data:
        dataset = TokenDataset.open(args.data)
        if dataset.tokenizer.to_spec() != tokenizer.to_spec():
            raise ConfigError(f"--data: '{args.data}' uses a different tokenizer than run '{args.run}'")
    else:
        dataset = TokenDataset.open(cfg.data.path) if cfg.data.path else TokenDataset.default()
    dataset.check_seq_len(cfg.model.seq_len)
    tokens = args.tokens or cfg.train.eval_tokens
    res = evaluate(model, dataset, cfg.model.seq_len, cfg.train.batch_size, tokens, thresholds=args.thresholds)
    if not math.isfinite(res.val_loss):  # NaN is not JSON; a model that gives it is broken
        raise CheckpointError(
            f"validation loss of run '{args.run}' at step {step} is {res.val_loss} (not finite): "
            "its checkpoint's model produces non-finite logits on this data"
        )
    out = {"val_loss": res.val_loss, "tokens": res.tokens, "step": step, "mean_fanout": res.mean_fanout,
           "inference_fanout": res.inference_fanout, "target_fanout": res.target_fanout}  # fmt: skip
    if res.et_routing is not None:
        out.update(et_routing=res.et_routing, thresholds_settled=res.thresholds_settled, et_updates=res.et_updates,
                   et_warmup_steps=res.et_warmup_steps, inference_val_loss=res.inference_loss)
    if kept is not None:
        out["experts_kept_per_layer"] = kept
    for w in res.warnings:
        print(f"moedist: warning: {w}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def _apply_expert_selection(model, args: argparse.Namespace) -> int | None:
    """--experts-from/--task/--keep (checked by cli_checks.check_selection_flags): restrict
    the routers to the task's most-used experts."""
    if args.experts_from is None:
        return None
    from moedist.analysis.signatures import restrict_experts, task_expert_mask

    keep_LE = task_expert_mask(args.experts_from, args.task, args.keep)
    restrict_experts(model, keep_LE)
    return int(keep_LE.sum(1)[0])


def cmd_signatures(args: argparse.Namespace) -> int:
    from moedist.analysis.signatures import compute_signatures, load_prompts
    from moedist.training.evaluate import et_state
    from moedist.training.trainer import load_trained

    cli_checks.check_signatures_flags(args)
    prompts = load_prompts(args.prompts, split=None if args.prompts else "signature")
    cfg, model, tokenizer, _ = load_trained(Path(args.run))
    # Signatures route with ET's thresholds, settled or not: the report says which.
    et = et_state(model)
    state = et.to_json() if et is not None else dict.fromkeys(("et_updates", "et_warmup_steps", "thresholds_settled"))
    report = compute_signatures(model, tokenizer, cfg.model.seq_len, prompts, args.out, args.seed, args.normalize,
                                extra=state)  # fmt: skip
    keys = ("prompts", "normalization", "within_cosine", "across_cosine", "cosine_cohens_d", "cv_accuracy",
            "cv_fold_accuracy_std", "cv_macro_f1", "permutation_accuracy", "load_balance_accuracy",
            "accuracy_by_layer")  # fmt: skip
    print(json.dumps({k: report[k] for k in keys}))
    if et is not None and not et.settled:
        print(f"moedist: warning: the signatures route with ET thresholds that have not settled ({et.progress}): "
              "they are not those of the trained router", file=sys.stderr)  # fmt: skip
    print(f"Signatures: {Path(args.out) / 'signatures.parquet'}\nReport:     {Path(args.out) / 'report.json'}")
    print(f"Plots:      {Path(args.out)}/ (similarity.png, projection.png, confusion.png)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moedist.model.generate import generate
    from moedist.training.evaluate import generation_warnings
    from moedist.training.trainer import load_trained

    cli_checks.check_generate_flags(args)
    _, model, tokenizer, _ = load_trained(Path(args.run))
    _apply_expert_selection(model, args)
    ids = [int(i) for i in tokenizer.encode(args.prompt)]
    if not ids:
        raise ConfigError(f"--prompt: {args.prompt!r} encodes to no tokens with this run's tokenizer")
    gen = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed, record_routing=True)
    for w in generation_warnings(model, gen):
        print(f"moedist: warning: {w}", file=sys.stderr)
    sys.stdout.write(tokenizer.decode(gen.ids) + "\n")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from moedist.data import prepare_dataset

    cli_checks.check_prepare_flags(args)
    info = prepare_dataset(
        args.input or None,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        text_column=args.text_column,
        overwrite=args.overwrite,
    )
    warning = cli_checks.val_split_warning(info.n_val_tokens)
    if warning:
        print(f"moedist: warning: {warning}", file=sys.stderr)
    print(json.dumps(dataclasses.asdict(info), default=str))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from moedist.training.profile import format_report, profile_report, read_rows

    if args.skip < 0:
        raise ConfigError(f"--skip: must be >= 0, got {args.skip}")
    report = profile_report(read_rows(Path(args.run)), args.skip)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from moedist.training.plots import redraw_plots

    for path in redraw_plots(Path(args.run)):
        print(path)
    return 0


def _selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task-aware expert pre-selection")
    g.add_argument("--experts-from", help="a `moedist signatures` output folder")
    g.add_argument("--task", help="keep the experts this task's signatures use most")
    g.add_argument("--keep", type=float, default=0.5, help="fraction of experts kept per layer (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moedist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    from moedist.control.client import add_parser as add_ctl_parser

    add_ctl_parser(sub)

    p = sub.add_parser("eval", help="validation loss of a trained run (JSON)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data", help="prepared dataset dir (default: the run's data)")
    p.add_argument("--tokens", type=int, help="validation tokens (default: the run's train.eval_tokens)")
    p.add_argument("--thresholds", action="store_true", help="ET in warm-up: route with the thresholds (as "
                   "generate does) instead of the warm-up's expert choice over each eval batch")  # fmt: skip
    _selection_args(p)

    p = sub.add_parser("generate", help="sample text from a trained run (KV cache)")
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    _selection_args(p)

    p = sub.add_parser("signatures", help="routing signatures of prompts by task, and how well they predict it")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--prompts", help='JSONL of {"task": ..., "text": ...} (default: the shipped prompt set)')
    p.add_argument("--out", required=True, help="output folder (signatures.parquet, report.json, PNGs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds and baselines")
    p.add_argument("--normalize", choices=("assignment", "token"), default="assignment",
                   help="signature of a layer: share of the prompt's assignments per expert (default), or "
                        "per-token shares, each routed token's experts splitting 1 (ET, EC: variable fanout)")

    p = sub.add_parser("profile", help="where a run's step time went: spans, collectives, bytes, slowest worker")
    p.add_argument("run", help="run folder")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("--skip", type=int, default=1, help="leave out the first SKIP steps (warm-up; default 1)")

    p = sub.add_parser("plot", help="redraw every plot of a run folder (plots/*.png)")
    p.add_argument("run", help="run folder")

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("prepare", help="tokenize text/folders/Parquet into Arrow shards")
    p.add_argument("--input", nargs="+", help="text files, folders or .parquet files (default: stdlib corpus)")
    p.add_argument("--out", required=True, help="output dataset directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a prepared dataset")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--text-column", default="text", help="Parquet column holding the text")
    return parser


def cmd_ctl(args: argparse.Namespace) -> int:
    from moedist.control.client import cmd_ctl as run_ctl

    return run_ctl(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "signatures": cmd_signatures,
            "data": cmd_data_prepare, "ctl": cmd_ctl, "profile": cmd_profile, "plot": cmd_plot}  # fmt: skip


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moedist` console script."""
    args = build_parser().parse_args(argv)
    # `ray job stop` and schedulers send SIGTERM: unwind like Ctrl-C, so the coordinator
    # removes its workers and placement group (the newest checkpoint is intact either way).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        code = COMMANDS[args.command](args)
        cli_checks.forget_claimed_run_dirs()
        return code
    except (ConfigError, DataError, CheckpointError, FloatingPointError) as e:
        print(f"moedist: error: {cli_checks.one_line(e)}", file=sys.stderr)
        return 2
    except ControlCallError as e:
        print(f"moedist: error: {cli_checks.one_line(e)}", file=sys.stderr)
        return 1
    except (JobError, TooManyFailuresError) as e:
        print(f"moedist: error: {type(e).__name__}: {cli_checks.one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moedist: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        cli_checks.release_unused_run_dirs()  # a run folder the command claimed but never wrote to


if __name__ == "__main__":
    sys.exit(main())

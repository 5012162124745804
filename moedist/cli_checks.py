"""Checks of the command line, run before anything starts or is written.

Every `moedist` command calls its `check_*` function first, so that bad input (a flag, an
output folder, a run that cannot fit in memory) ends in one line `moedist: error: ...`
with exit status 2, before a dataset is tokenized, Ray starts or a run folder appears.
Also here: the exclusive creation of a run folder, and one-line error text for the CLI.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import time
from pathlib import Path

from moedist.config import INT64_MAX, ConfigError, RunConfig

# ------------------------------------------------------------------- error text
# CSI sequences (colours, cursor moves) and the two-byte escapes; Ray's errors carry them.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def one_line(text: str) -> str:
    """`text` without ANSI escape codes, its lines joined by ' | ' (one line of output)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(text)).splitlines()]
    return " | ".join(ln for ln in lines if ln)


# ------------------------------------------------------------------- numbers
def check_number(flag: str, value: float | int | None, *, minimum: float = 0.0, strict: bool = True) -> None:
    """A finite number > minimum (strict) or >= minimum; None (flag not given) passes."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        op = ">" if strict else ">="
        raise ConfigError(f"{flag}: must be a finite number {op} {minimum:g}, got {value}")


def check_seed(flag: str, value: int | None) -> None:
    """Seeds go to torch, numpy and TOML: 0 .. 2^63-1."""
    if value is not None and not 0 <= value <= INT64_MAX:
        raise ConfigError(f"{flag}: must be in 0 .. 2^63-1 (= {INT64_MAX}), got {value}")


# ------------------------------------------------------------------- output folders
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(flag: str, path: str | Path, *, must_be_empty: bool) -> None:
    """`path` can become (or already is) a writable output folder.

    A file in its place or on its way, or a parent that cannot be written, is an error.
    Writability is probed by creating (and removing) an empty folder, which also holds
    for root, ACLs and read-only mounts, where os.access would answer wrongly.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag}: '{p}' is a file, not a folder")
    if p.is_dir():
        if must_be_empty and any(p.iterdir()):
            raise ConfigError(f"{flag}: folder '{p}' exists and is not empty")
        probe_in = p
    else:
        probe_in = _nearest_existing(p)
        if not probe_in.is_dir():
            raise ConfigError(f"{flag}: cannot create '{p}': '{probe_in}' is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".moedist-probe-", dir=probe_in))
    except OSError as e:
        raise ConfigError(f"{flag}: cannot write '{p}': folder '{probe_in}' is not writable ({e.strerror})") from None


# Run folders this process claimed (path, whether it created the folder itself): a command
# that fails before writing into them gives them back (see release_unused_run_dirs).
_CLAIMED: list[tuple[Path, bool]] = []


def _mkdir_exclusive(p: Path) -> bool:
    """Create folder `p` (its parents as needed); False if it already exists."""
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, FileExistsError | NotADirectoryError) else e.strerror
        raise ConfigError(f"--out: cannot create '{p.parent}' ({why})") from None
    try:
        os.mkdir(p)  # no exist_ok: of two runs creating the same folder, exactly one succeeds
    except FileExistsError:
        return False
    except OSError as e:
        raise ConfigError(f"--out: cannot create run folder '{p}' ({e.strerror})") from None
    return True


def claim_run_dir(out: str | None, router: str, now: float | None = None) -> Path:
    """Create the run folder exclusively, so two runs can never share one.

    An explicit `out` must not exist, or be an empty folder (then its plots/ subfolder is
    created exclusively, which claims it). The default runs/<router>-<time> gets a suffix
    -2, -3, ... when another run (started in the same second) already took the name.
    """
    if out is not None:
        p = Path(out)
        created = _mkdir_exclusive(p)
        if not created:
            if not p.is_dir():
                raise ConfigError(f"--out: '{p}' is a file, not a folder")
            # An empty folder the user made is claimed by creating the run's plots/ in it.
            if any(p.iterdir()) or not _mkdir_exclusive(p / "plots"):
                raise ConfigError(f"--out: run folder '{p}' exists and is not empty (use --resume {p} to continue)")
        _CLAIMED.append((p, created))
        return p
    base = f"{router}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    for i in range(1, 1000):
        p = Path("runs") / (base if i == 1 else f"{base}-{i}")
        if _mkdir_exclusive(p):
            _CLAIMED.append((p, True))
            return p
    raise ConfigError(f"--out: runs/{base} and 998 suffixed names are taken; give --out")


def release_unused_run_dirs() -> None:
    """Give back the run folders this process claimed and left empty (the command failed
    before writing into them), so the same --out can be used again; a folder the user made
    is kept."""
    while _CLAIMED:
        p, created = _CLAIMED.pop()
        try:
            if (p / "plots").is_dir() and not any((p / "plots").iterdir()):
                os.rmdir(p / "plots")
            if created:
                os.rmdir(p)  # fails (and keeps it) unless empty
        except OSError:
            pass


def forget_claimed_run_dirs() -> None:
    """The command succeeded: keep every claimed folder as it is."""
    _CLAIMED.clear()


# ------------------------------------------------------------------- memory
def machine_memory_bytes() -> int:
    """Physical memory, or the container's (cgroup) limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def training_memory(cfg: RunConfig, vocab_size: int | None = None) -> tuple[int, int]:
    """(parameters, bytes) that training `cfg` needs at least: weights, gradients and
    AdamW's two moments (16 bytes per float32 parameter), plus buffers; activations and
    the data are extra.

    The model is built on the meta device (shapes only, nothing allocated) with at most
    two blocks; the others repeat the second one's shapes.
    """
    import dataclasses

    import torch

    from moedist.model.transformer import MoETransformer

    small = dataclasses.replace(
        cfg.model, n_layers=min(cfg.model.n_layers, 2), vocab_size=vocab_size or cfg.model.vocab_size
    )
    try:
        with torch.device("meta"):
            model = MoETransformer(small, cfg.router)
    except ConfigError:
        raise  # a field the model cannot be built with: its own message names it
    except (RuntimeError, OverflowError, ValueError) as e:
        raise ConfigError(f"model is too large to build: its tensor sizes overflow ({one_line(e)})") from None

    def size(module: torch.nn.Module) -> tuple[int, int]:
        params = list(module.parameters())
        p_bytes = sum(p.numel() * p.element_size() for p in params)
        b_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
        return sum(p.numel() for p in params), 4 * p_bytes + b_bytes  # weight, grad, exp_avg, exp_avg_sq

    n, nbytes = size(model)
    if cfg.model.n_layers > len(model.blocks):  # blocks 2.. have the shapes of block 1
        n_blk, bytes_blk = size(model.blocks[-1])
        extra = cfg.model.n_layers - len(model.blocks)
        n, nbytes = n + extra * n_blk, nbytes + extra * bytes_blk
    return n, nbytes


def _gib(n: int) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.1f} GiB"


def check_fits_in_memory(cfg: RunConfig, vocab_size: int | None = None) -> None:
    """Refuse a model whose parameters and optimiser state alone exceed this machine's
    memory (it would allocate until the machine runs out); `vocab_size` is the data's,
    when the tokenizer decides it."""
    n, need = training_memory(cfg, vocab_size)
    have = machine_memory_bytes()
    if need > have:
        m = cfg.model
        raise ConfigError(
            f"model too large: {n:.3g} parameters need about {_gib(need)} for weights, gradients and AdamW state, "
            f"more than this machine's {_gib(have)} (model.d_model={m.d_model}, model.n_layers={m.n_layers}, "
            f"model.n_experts={m.n_experts})"
        )


# ------------------------------------------------------------------- per command
def check_train_flags(args: argparse.Namespace) -> None:
    """`moedist train` flags that the config does not cover, checked first."""
    if args.resume and (args.config or args.preset):
        which = " and ".join(f for f, v in (("--config", args.config), ("--preset", args.preset)) if v)
        raise ConfigError(
            f"{which}: cannot be used with --resume (a resumed run keeps its own config.toml; "
            "change fields with --set KEY=VALUE or --steps)"
        )
    if args.resume and args.out:
        raise ConfigError("--out: cannot be used with --resume (the run continues in its own folder)")
    if args.data is not None:
        d = Path(args.data)
        if d.is_file():
            raise ConfigError(
                f"--data: '{d}' is a file, not a prepared dataset folder (make one with "
                f"`moedist data prepare --input {d} --out DIR`)"
            )
        if not d.exists():
            raise ConfigError(f"--data: path '{d}' does not exist")
    check_seed("--seed", args.seed)
    check_number("--cpus-per-worker", args.cpus_per_worker)
    # Flags of the Ray runtime that may or may not exist in this version of the parser.
    for name in ("start_timeout", "step_timeout"):
        check_number(f"--{name.replace('_', '-')}", getattr(args, name, None))
    if getattr(args, "max_failures", None) is not None and args.max_failures < 0:
        raise ConfigError(f"--max-failures: must be >= 0, got {args.max_failures}")
    check_control_flags(args)
    if getattr(args, "elastic", None) is not None:  # its form now; against the workers once the config is known
        from moedist.runtime.elastic import parse_range

        parse_range(args.elastic)
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"--out: run folder '{out}' exists and is not empty (use --resume {out} to continue)")
        check_out_dir("--out", out, must_be_empty=False)


def check_elastic(args: argparse.Namespace, cfg: RunConfig) -> None:
    """`--elastic MIN:MAX`: a range that holds the job's starting worker count, on Ray."""
    text = getattr(args, "elastic", None)
    if text is None:
        return
    from moedist.runtime.elastic import parse_range

    lo, hi = parse_range(text)
    if cfg.workers == 1 and not args.address:
        raise ConfigError("--elastic: a single-process run cannot change its worker count; start on Ray with "
                          "--workers 2 or more, or join a cluster with --address")  # fmt: skip
    if not lo <= cfg.workers <= hi:
        raise ConfigError(f"--elastic: the job starts with {cfg.workers} worker{'s' if cfg.workers != 1 else ''} "
                          f"(--workers or the config's workers), outside {lo}:{hi}")  # fmt: skip


def check_comm(cfg: RunConfig, machine: str | None = None) -> None:
    """[comm] switches this machine cannot run: the shared-memory exchange publishes rows
    relying on x86-64's store order (moedist.parallel.exchange)."""
    import platform

    arch = machine or platform.machine()
    if cfg.comm.shm and cfg.workers > 1 and arch not in ("x86_64", "AMD64"):
        raise ConfigError(f"comm.shm: the shared-memory exchange needs an x86-64 machine, this one is {arch} "
                          "(set comm.shm=false)")  # fmt: skip


def check_control_host(host: str) -> None:
    """The control API listens on one address of this machine, never on all of them."""
    import ipaddress

    if not host or any(c.isspace() or c in "/@" for c in host):
        raise ConfigError(f"--control-host: '{host}' is not a host name or address")
    try:
        unspecified = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        unspecified = False  # a host name
    if unspecified:
        raise ConfigError(f"--control-host: '{host}' means every interface; give one address of this machine "
                          "(default: 127.0.0.1, or the driver's Ray node address)")  # fmt: skip


def check_control_flags(args: argparse.Namespace) -> None:
    """`moedist train --control-host/--control-port/--no-control`: a port number, one
    address of this machine that can be listened on (probed), not both --no-control and
    an address."""
    import socket

    host, port = getattr(args, "control_host", None), getattr(args, "control_port", None)
    if getattr(args, "no_control", False):
        if host is not None or port is not None:
            flag = "--control-host" if host is not None else "--control-port"
            raise ConfigError(f"{flag}: cannot be used with --no-control")
        return
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--control-port: must be in 0 .. 65535 (0: any free port), got {port}")
    if host is None:
        return  # the default address is known only once Ray (if any) has started; it is always listenable
    check_control_host(host)
    try:  # bind now, so that a wrong address or a taken port fails before anything starts
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port or 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(addr)
    except OSError as e:
        raise ConfigError(f"--control-host/--control-port: cannot listen on {host}:{port or 0} "
                          f"({e.strerror or e})") from None  # fmt: skip


def check_resume_step(run_dir: Path, cfg: RunConfig) -> None:
    """A resumed run must not be asked for fewer steps than its checkpoint already has
    (nothing would be trained; the run would look finished with 0 tokens/s)."""
    from moedist.training.checkpoint import newest_valid_checkpoint

    path, step = newest_valid_checkpoint(run_dir)
    if cfg.train.steps < step:
        raise ConfigError(
            f"--steps: run '{run_dir}' is already past step {cfg.train.steps}: its checkpoint '{path.name}' is at "
            f"step {step}; ask for --steps {step + 1} or more to train further"
        )


def check_selection_flags(args: argparse.Namespace) -> None:
    """--experts-from, --task and --keep (eval, generate) go together."""
    if args.experts_from is None and args.task is not None:
        raise ConfigError("--task needs --experts-from (a `moedist signatures` output folder)")
    if args.experts_from is not None and args.task is None:
        raise ConfigError("--experts-from needs --task (which task's experts to keep)")
    if args.experts_from is not None and not (math.isfinite(args.keep) and 0 < args.keep <= 1):
        raise ConfigError(f"--keep: must be in (0, 1], got {args.keep}")


def check_generate_flags(args: argparse.Namespace) -> None:
    """`moedist generate`: counts, temperature, seed, prompt and expert selection."""
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    check_number("--temperature", args.temperature, strict=False)
    if args.top_k < 0:
        raise ConfigError(f"--top-k: must be >= 0 (0 = no top-k), got {args.top_k}")
    check_seed("--seed", args.seed)
    if not args.prompt:
        raise ConfigError("--prompt: is empty; give at least one character to continue from")
    check_selection_flags(args)


def check_signatures_flags(args: argparse.Namespace) -> None:
    """`moedist signatures`: seed (scikit-learn takes 32-bit seeds) and the output folder."""
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed: must be in 0 .. 2^32-1 (scikit-learn's range), got {args.seed}")
    check_out_dir("--out", args.out, must_be_empty=False)


def check_eval_flags(args: argparse.Namespace) -> None:
    """`moedist eval`: the token count and expert selection."""
    if args.tokens is not None and args.tokens < 1:
        raise ConfigError(f"--tokens: must be >= 1, got {args.tokens}")
    check_selection_flags(args)


def check_prepare_flags(args: argparse.Namespace) -> None:
    """`moedist data prepare`: sizes, fraction and the output folder (before tokenizing)."""
    if args.vocab_size < 1:
        raise ConfigError(f"--vocab-size: must be >= 1, got {args.vocab_size}")
    if not (math.isfinite(args.val_fraction) and 0 < args.val_fraction < 1):
        raise ConfigError(f"--val-fraction: must be in (0, 1), got {args.val_fraction}")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out: folder '{out}' is not empty; pass --overwrite to replace it")
    check_out_dir("--out", out, must_be_empty=False)


def val_split_warning(n_val_tokens: int, seq_lens: tuple[int, ...] = (128, 256, 512, 1024, 2048)) -> str | None:
    """A warning when a validation split of `n_val_tokens` cannot hold one sequence
    (seq_len + 1 tokens) of some common length, naming which lengths fail."""
    too_long = [s for s in seq_lens if n_val_tokens < s + 1]
    if not too_long:
        return None
    if n_val_tokens < 2:
        return f"the validation split has {n_val_tokens} tokens: no run can evaluate on it; raise --val-fraction"
    return (
        f"the validation split has {n_val_tokens} tokens, fewer than one sequence of model.seq_len "
        f"{', '.join(map(str, too_long))} needs (seq_len + 1 tokens): runs on this dataset need "
        f"model.seq_len <= {n_val_tokens - 1} to evaluate; raise --val-fraction or add text"
    )

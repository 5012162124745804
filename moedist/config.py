"""Typed configuration: one dataclass tree, loaded from TOML, overridden by flags.

Every field is validated on load; an error names the field (dotted path), the value
given and what is allowed. Presets live in moedist/presets/NAME.toml.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

ROUTERS = ("dense", "tc", "lf", "ec", "et", "aoe", "etr")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ConfigError(ValueError):
    """A configuration value, file or override is invalid; the message names it."""


def _choice(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


def _rng(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi, "lo_open": lo_open})


@dataclass
class RouterConfig:
    """Which router an MoE layer uses and its constants (see docs/routers.md)."""

    kind: str = _choice(*ROUTERS, default="et")
    top_k: int = _rng(1, 1)
    """TC/LF: experts per token. EC/ET: mean routed experts per token, k = N*top_k/E."""
    gate: str = _choice("auto", "softmax", "sigmoid", default="auto")
    """Gate function; auto = the router's own (TC/EC/ETR softmax, LF/ET sigmoid)."""
    normalize_weights: bool = True
    """TC/LF: renormalise the selected gate weights to sum to 1 (only when top_k > 1)."""
    aux_loss_coef: float = _rng(0.01, 0.0)
    """TC: Switch load-balancing loss alpha * E * sum_i f_i P_i."""
    z_loss_coef: float = _rng(0.0, 0.0)
    """TC: router z-loss mean(logsumexp(r)^2) coefficient."""
    capacity_factor: float = _rng(0.0, 0.0)
    """TC: tokens kept per expert = ceil(cf * N * k / E), overflow dropped; 0 = dropless."""
    lf_update_rate: float = _rng(1e-3, 0.0)
    """LF: bias step u in b_i <- b_i + u * sign(mean_load - load_i)."""
    lf_bias_on: str = _choice("scores", "logits", default="scores")
    """LF: add the selection bias to the gate probabilities (scores) or to the raw logits
    (the ET paper's LF baseline)."""
    et_beta: float = _rng(0.999, 0.0, 1.0, lo_open=True)
    """ET: EMA decay of the per-expert threshold."""
    et_warmup_steps: int = _rng(100, 0)
    """ET: optimiser steps routed with expert choice while the EMA accumulates."""
    et_capacity: float = _rng(0.5, 0.0, 1.0)
    """ET: training-time capacity guard C: each expert takes (1-C)..(1+C) * N*top_k/E tokens."""
    et_inclusive: bool = False
    """ET: route when r >= c (the official code) instead of r > c (the paper)."""
    aoe_d_low: int = _rng(0, 0)
    """AoE: rank of each expert's factorised gate projection; 0 = d_model // 3."""
    aoe_param_match: bool = True
    """AoE: choose the expert width so each expert has the parameters of the model's own
    expert (3DF for SwiGLU, as in the paper; 2DF for ReLU^2)."""
    aoe_renormalize: bool = False
    """AoE: gate weights = softmax over the k selected norms (sum 1; weight 1 at top_k = 1)
    instead of the official code's softmax over all E norms, top-k values kept as they are."""
    aoe_d_wide: int = _rng(0, 0)
    """AoE: expert width when aoe_param_match is false; 0 = the model's expert width."""
    etr_capacity_factor: float = _rng(1.25, 0.0)
    """ETR: expert-side capacity C = ceil(cf * N*top_k/E) tokens (at least the paper's bound
    when etr_capacity_floor); 0 = the paper's bound at the pool's largest affinity alone."""
    etr_capacity_floor: bool = True
    """ETR: with a capacity factor, C is at least the paper's lower bound read at the typical
    affinity 1/sqrt(d_model) of its assumptions (about 1.65 * N*top_k/E)."""
    etr_aux_loss_coef: float = _rng(0.01, 0.0)
    """ETR: alpha of the Switch load-balancing loss beside the locality loss (0 turns it off)."""
    locality_loss_coef: float = _rng(0.0, 0.0)
    """ETR: mu of the locality loss (favours experts on the token's own node)."""


@dataclass
class ModelConfig:
    """Decoder-only transformer with MoE FFN blocks."""

    vocab_size: int = _rng(257, 2)
    seq_len: int = _rng(128, 2)
    d_model: int = _rng(128, 8)
    n_layers: int = _rng(4, 1)
    n_heads: int = _rng(4, 1)
    mlp: str = _choice("relu2", "swiglu", default="relu2")
    dense_width: int = _rng(0, 0)
    """Width of dense FFNs; 0 = 4 * d_model."""
    first_layer_dense: bool = True
    n_experts: int = _rng(16, 1)
    expert_width: int = _rng(0, 0)
    """Routed expert width; 0 = dense_width / granularity."""
    granularity: int = _rng(2, 1)
    n_shared: int = _rng(1, 0)
    """Always-on shared experts (each of expert_width); 0 or 1 in practice."""
    rope_base: float = _rng(10000.0, 1.0)
    init_std: float = _rng(0.02, 0.0, lo_open=True)
    norm_eps: float = _rng(1e-6, 0.0, lo_open=True)

    @property
    def resolved_dense_width(self) -> int:
        return self.dense_width or 4 * self.d_model

    @property
    def resolved_expert_width(self) -> int:
        return self.expert_width or max(1, self.resolved_dense_width // self.granularity)


@dataclass
class TrainConfig:
    """Optimisation and run-loop settings. batch_size is the GLOBAL batch in sequences."""

    steps: int = _rng(300, 0)
    batch_size: int = _rng(16, 1)
    micro_batches: int = _rng(1, 1)
    lr: float = _rng(3e-3, 0.0, lo_open=True)
    min_lr_ratio: float = _rng(0.1, 0.0, 1.0)
    warmup_steps: int = _rng(20, 0)
    weight_decay: float = _rng(0.0, 0.0)
    beta1: float = _rng(0.9, 0.0, 1.0)
    beta2: float = _rng(0.95, 0.0, 1.0)
    grad_clip: float = _rng(1.0, 0.0)
    """Global gradient-norm clip; 0 disables."""
    dtype: str = _choice("float32", "bfloat16", default="float32")
    """bfloat16 = autocast on top of float32 master weights."""
    eval_every: int = _rng(100, 0)
    eval_tokens: int = _rng(65536, 1)
    checkpoint_every: int = _rng(50, 0)
    """Steps between checkpoints; 0 = only at the end. Bounds the steps a recovery from a
    lost worker (or a Ctrl-C and --resume) replays, at the cost of one save each."""
    keep_checkpoints: int = _rng(2, 1)
    seed: int = _rng(0, 0)
    device: str = _choice("auto", "cpu", "cuda", default="auto")
    """auto = CUDA when available, else CPU."""
    threads: int = _rng(0, 0)
    """torch intra-op threads (and numba's kernel threads, at most as many); 0 = their defaults."""
    progress: bool = True
    keep_heap: bool = True
    """Keep big buffers mapped across steps (glibc mallopt, once per process) instead of
    mapping and faulting them in afresh every step; costs resident memory (docs/profiling.md)."""
    nonfinite: str = _choice("stop", "skip", default="stop")
    """A step whose loss or gradient norm is NaN/Inf: stop with an error naming the step and
    layer (the last checkpoint stays intact), or skip its update and count it."""


@dataclass
class CommConfig:
    """How tokens and statistics move between workers (each switch keeps results equal to
    the plain path; docs/profiling.md measures each on and off)."""

    fuse: bool = True
    """Fewer, larger collectives, same results bit for bit: a pool selection with a small k
    is one all-gather of every worker's local top-k (not 4 radix all-reduces), ET's step-end
    select covers all MoE layers in one exchange (LF's loads likewise), the pool size is
    counted once per forward pass, and a step's integer counts share one all-reduce."""
    plan_counts: bool = True
    """Take each token exchange's split sizes from the routing plan when its router's own
    collective already gave every worker's counts per expert (ET's guard and warm-up, EC,
    TC with a capacity), instead of exchanging them first: one collective fewer per MoE
    layer and micro-batch. Dedup keeps its own counts exchange (per worker, not per expert)."""
    dedup: bool = False
    """Send a token routed to several experts of one worker once, with its gates; that worker
    combines their outputs and sends one row back (docs/profiling.md)."""
    wire_dtype: str = _choice("auto", "float32", "bfloat16", default="auto")
    """Dtype of token rows (and their grads) on the wire; auto = the compute dtype (bfloat16
    under autocast); sums stay in float32."""
    shm: bool = False
    """Exchange rows through shared memory between workers on the same node."""
    hierarchical: bool = False
    """Gather within a node, one exchange between nodes, scatter within the node."""
    overlap_grad_sync: bool = False
    """All-reduce dense gradients in buckets during the backward pass."""
    overlap_chunks: int = _rng(1, 1)
    """Split each token exchange into this many chunks (groups of each worker's experts,
    at most the largest worker's expert count) and run one chunk's experts while the others
    travel, forward and backward; 1 = one exchange, no overlap. Not with dedup, shm or
    hierarchical."""


@dataclass
class ProfileConfig:
    """What a run records about where its time goes (docs/profiling.md)."""

    spans: bool = True
    """Per-step spans on every worker (metrics columns, trace.json, plots/comm_vs_compute.png)."""
    trace_steps: str = "auto"
    """Steps written to trace.json: "A-B" (inclusive), "auto" (a few steps after the first),
    or "" for none."""
    torch_profile: str = ""
    """Steps "A-B" captured with torch.profiler on every worker into RUN/torch_profile/."""
    log: str = ""
    """Extra metric sinks: "tensorboard", "wandb" or both ("tensorboard,wandb")."""


TRACE_MAX_STEPS = 200  # steps trace.json may hold (events are kept in memory until the run ends)


def parse_trace_steps(text: str, steps: int) -> tuple[int, int] | None:
    """profile.trace_steps -> the inclusive window (first, last) of 0-based steps, or None.

    "" = no trace; "auto" = steps 2-4 (after the warm-up steps that compile kernels), cut
    to the run's steps; "A-B" = steps A..B (0 <= A <= B < train.steps, at most
    TRACE_MAX_STEPS steps)."""
    text = text.strip()
    if text == "" or (text == "auto" and steps <= 0):
        return None
    if text == "auto":
        first = min(2, steps - 1)
        return first, min(first + 2, steps - 1)
    parts = text.split("-")
    if len(parts) != 2 or not all(re.fullmatch(r"[0-9]+", p.strip()) for p in parts):
        raise ConfigError(f"profile.trace_steps: expected \"A-B\" (0-based steps, e.g. 10-12), \"auto\" or \"\", "
                          f"got {text!r}")  # fmt: skip
    first, last = int(parts[0]), int(parts[1])
    if first > last:
        raise ConfigError(f"profile.trace_steps: the first step must not be after the last, got {text!r}")
    if first >= steps:
        raise ConfigError(f"profile.trace_steps: window {text!r} starts after the run's last step "
                          f"(train.steps = {steps}, steps 0..{steps - 1})")  # fmt: skip
    if last - first + 1 > TRACE_MAX_STEPS:
        raise ConfigError(f"profile.trace_steps: {text!r} is {last - first + 1} steps; a trace holds at most "
                          f"{TRACE_MAX_STEPS}")  # fmt: skip
    return first, last


@dataclass
class DataConfig:
    """Where tokens come from: a prepared dataset dir, or the embedded stdlib corpus."""

    path: str = ""
    """Prepared dataset directory (moedist data prepare); empty = embedded stdlib corpus."""


@dataclass
class RunConfig:
    """The whole job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    workers: int = _rng(1, 1)
    preset: str = "tiny"


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        # torch, numpy and TOML (config.toml) all take 64-bit integers; a larger one would
        # fail deep inside them (e.g. as the seed of torch.manual_seed).
        if not INT64_MIN <= value <= INT64_MAX:
            raise ConfigError(f"{path}: {value} is out of range (integers must lie in -2^63 .. 2^63-1)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _check_field(path: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"])
        raise ConfigError(f"{path}: {value!r} is not one of: {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{path}: must be {op} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}: must be <= {hi}, got {value!r}")


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> None:
    """Set fields of dataclass `obj` from nested dict `data`, validating each."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{path}' (known here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a table, got {value!r}")
            _merge(getattr(obj, key), value, f"{path}.")
            continue
        if isinstance(tp, types.UnionType):
            raise ConfigError(f"{path}: unsupported type {tp}")
        value = _coerce(path, tp, value)
        _check_field(path, fields[key], value)
        setattr(obj, key, value)


def check_tables(data: dict[str, Any], where: str = "", cls: type | None = None) -> None:
    """Every key of `data` that names a config table ([model], [train], ...) holds a table.

    Run on each source (file, flags, --set) before they are merged: merging would silently
    replace `train = 3` from a file by the table of a --steps flag.
    """
    cls = RunConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None or not dataclasses.is_dataclass(tp):
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a table, got {value!r}")
        check_tables(value, f"{where}{key}.", tp)


def check_expert_placement(n_experts: int, workers: int) -> None:
    """The expert-parallel runtime's placement (ExpertPlacement.blocks) gives every worker
    at least one expert."""
    if workers > n_experts:
        raise ConfigError(
            f"model.n_experts ({n_experts}) must be >= workers ({workers}): every worker owns at least one expert"
        )


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that single-field metadata cannot express."""
    m, r, t = cfg.model, cfg.router, cfg.train
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"model.d_model / model.n_heads ({m.d_model} / {m.n_heads} = {m.d_model // m.n_heads}) must be even "
            "(rotary embeddings)"
        )
    if r.kind != "dense" and r.top_k > m.n_experts:
        raise ConfigError(f"router.top_k ({r.top_k}) must be <= model.n_experts ({m.n_experts})")
    if r.kind == "etr" and m.n_experts > m.d_model:
        raise ConfigError(
            f"model.n_experts ({m.n_experts}) must be <= model.d_model ({m.d_model}) for router.kind etr "
            "(each expert's fixed affinity averages its own slice of the dimensions)"
        )
    if r.kind == "aoe":
        from moedist.routing.aoe import aoe_dims  # imports this module: only when needed

        aoe_dims(m.d_model, m.resolved_expert_width, r, m.mlp)  # raises ConfigError naming the fields
    if t.batch_size % t.micro_batches:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.micro_batches ({t.micro_batches})"
        )
    if t.batch_size % (t.micro_batches * cfg.workers):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.micro_batches x workers "
            f"({t.micro_batches} x {cfg.workers})"
        )
    check_expert_placement(m.n_experts, cfg.workers)
    c = cfg.comm
    if c.overlap_chunks > 1:
        clash = [name for name in ("dedup", "shm", "hierarchical") if getattr(c, name)]
        if clash:
            raise ConfigError(f"comm.overlap_chunks ({c.overlap_chunks}) cannot be combined with comm.{clash[0]} "
                              "(the pipelined exchange is the plain collective in chunks)")  # fmt: skip
    from moedist.training import sinks, torch_profile  # light modules (no torch until used)

    sinks.parse_log(cfg.profile.log)
    torch_profile.parse_window(cfg.profile.torch_profile, t.steps)
    parse_trace_steps(cfg.profile.trace_steps, t.steps)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass tree -> plain nested dict (TOML-writable)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Nested dict -> validated RunConfig (fields absent from `data` keep `base`'s values)."""
    cfg = RunConfig()
    if base is not None:  # copy field by field so `base` is untouched
        _merge(cfg, to_dict(base), "")
    _merge(cfg, data, "")
    return validate(cfg)


def preset_names() -> list[str]:
    """Names of the presets shipped with moedist."""
    return sorted(p.name[:-5] for p in resources.files("moedist.presets").iterdir() if p.name.endswith(".toml"))


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from e


def load_preset(name: str) -> dict[str, Any]:
    """The dict of preset `name`."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(names)})")
    text = resources.files("moedist.presets").joinpath(f"{name}.toml").read_text()
    return tomllib.loads(text)


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; value parsed as TOML, else a string."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set '{item}': empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words such as router.kind=et
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def deep_update(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `src` into `dst` (in place) and return it."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """Resolve preset -> TOML file -> flag overrides -> --set items, validating at the end.

    The preset named in the file (key `preset`) is used when `preset` is None.
    """
    file_data = load_toml(config_file) if config_file else {}
    if config_file:
        check_tables(file_data, f"config file '{config_file}': ")
    check_tables(overrides or {})
    name = preset or file_data.get("preset") or "tiny"
    if not isinstance(name, str):
        raise ConfigError(f"preset: expected a string, got {name!r}")
    data = load_preset(name)
    deep_update(data, file_data)
    data["preset"] = name
    deep_update(data, overrides or {})
    for item in sets or []:
        item_data = parse_override(item)
        check_tables(item_data, f"--set '{item}': ")
        deep_update(data, item_data)
    return from_dict(data)

"""`moedist ctl --run RUN status | metrics | scale | checkpoint | stop`: the control API's client.

It reads the job's address and token from RUN/control.json. Exit status: 0 done; 2 the
job is not running (no control.json, or nothing answers at its address) or the request
was refused as invalid (INVALID_ARGUMENT); 1 any other error from the server (its status
code and message on one line). Plain text for people, `--json` for scripts (one JSON
object; `metrics --json` one per line).

Imports neither torch, Ray nor the training code, and gRPC only once RUN/control.json is
read: it starts fast (tests/e2e/test_control_cli.py checks what a ctl call imports).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from moedist.config import ConfigError
from moedist.control import CONTROL_FILE, ControlCallError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ctl", help="control a running training job (status, metrics, checkpoint, stop, scale)")
    p.add_argument("--run", required=True, help="the job's run folder (holds control.json while it runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for an answer (commands wait for the end of the current step)")  # fmt: skip
    csub = p.add_subparsers(dest="ctl_command", required=True)
    csub.add_parser("status", help="step, losses, throughput, workers and their experts, checkpoint, state")
    m = csub.add_parser("metrics", help="the metric rows of the steps done (with --follow: and then each new one)")
    m.add_argument("--from", dest="from_step", type=int, default=0, metavar="STEP", help="first step (default 0)")
    m.add_argument("--follow", action="store_true", help="keep printing new steps until the run ends")
    m.add_argument("--limit", type=int, help="stop after this many rows")
    s = csub.add_parser("scale", help="change the number of workers and/or experts at the next step boundary")
    s.add_argument("--workers", type=int)
    s.add_argument("--experts", type=int, help="routed experts per MoE layer")
    s.add_argument("--noise", type=float, help="growth: noise on the copies' input projections, relative to "
                   "each tensor's std, in [0, 1] (default 0.01; 0 = an exact split)")  # fmt: skip
    csub.add_parser("checkpoint", help="write a checkpoint at the next step boundary")
    csub.add_parser("stop", help="end the run after the current step (final checkpoint, evaluation, summary)")


def read_control_file(run: Path) -> dict[str, Any]:
    """RUN/control.json, or a one-line ConfigError saying the job is not running."""
    path = Path(run) / CONTROL_FILE
    try:
        info = json.loads(path.read_text())
        return {"address": str(info["address"]), "token": str(info["token"])}
    except FileNotFoundError:
        if not Path(run).is_dir():
            raise ConfigError(f"--run: '{run}' is not a folder") from None
        raise ConfigError(f"job not running: '{path}' does not exist (the run has ended, or was started with "
                          "--no-control)") from None  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"job not running: cannot read '{path}' ({type(e).__name__}: {e})") from None


class Client:
    """A connection to one job's control API."""

    def __init__(self, address: str, token: str, timeout_s: float = 600.0):
        import grpc

        from moedist.control.v1 import control_pb2_grpc as pb_grpc

        self.address = address
        self.timeout_s = timeout_s
        # Never through an HTTP proxy from the environment: the job is on this network.
        self.channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
        self.stub = pb_grpc.ControlStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    @classmethod
    def for_run(cls, run: Path, timeout_s: float = 600.0) -> Client:
        info = read_control_file(run)
        return cls(info["address"], info["token"], timeout_s)

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout_s or self.timeout_s)

    def stream(self, request: Any) -> Any:
        return self.stub.StreamMetrics(request, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


def _raise_rpc_error(e: Exception, address: str, what: str) -> None:
    """A failed call as a one-line error: ConfigError (exit 2) when the job is not running
    or the request is invalid, else ControlCallError (exit 1)."""
    import grpc

    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    detail = (e.details() if hasattr(e, "details") else str(e)) or ""
    detail = " | ".join(ln.strip() for ln in detail.splitlines() if ln.strip())
    if code == grpc.StatusCode.UNAVAILABLE:
        raise ConfigError(f"job not running: nothing answers at {address} ({detail}); its control.json is left "
                          "from a job that ended without removing it") from None  # fmt: skip
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise ConfigError(f"ctl {what}: INVALID_ARGUMENT: {detail}") from None
    raise ControlCallError(f"ctl {what}: {code.name}: {detail}") from None


def cmd_ctl(args: argparse.Namespace) -> int:
    """`moedist ctl ...` (see the module docstring)."""
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ConfigError(f"--timeout: must be a finite number > 0, got {args.timeout}")
    what = args.ctl_command
    if what == "metrics" and args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    client = Client.for_run(Path(args.run), args.timeout)  # a job that is not running: an error before gRPC loads
    import grpc

    from moedist.control.v1 import control_pb2 as pb

    try:
        if what == "status":
            st = client.call("GetStatus", pb.GetStatusRequest(), timeout_s=min(args.timeout, 30.0))
            print(json.dumps(_status_json(st)) if args.json else format_status(st))
        elif what == "metrics":
            req = pb.StreamMetricsRequest(from_step=args.from_step, follow=args.follow)
            for n, row in enumerate(client.stream(req), 1):
                print(json.dumps(_row_json(row)) if args.json else format_row(row), flush=True)
                if args.limit is not None and n >= args.limit:
                    break
        elif what == "scale":
            try:
                req = pb.ScaleRequest(workers=args.workers, experts=args.experts, noise=args.noise)
            except ValueError as e:  # beyond int32
                raise ConfigError(f"ctl scale: {e}") from None
            res = client.call("Scale", req)
            workers = f"{res.workers} worker{'s' if res.workers != 1 else ''}"
            text = f"rescaled at step {res.step}: {workers}, {res.experts} experts per MoE layer"
            out = {"step": res.step, "workers": res.workers, "experts": res.experts}
            print(json.dumps(out) if args.json else text)
        elif what == "checkpoint":
            res = client.call("Checkpoint", pb.CheckpointRequest())
            out = {"step": res.step, "path": res.path}
            print(json.dumps(out) if args.json else f"checkpoint at step {res.step}: {res.path}")
        elif what == "stop":
            res = client.call("Stop", pb.StopRequest())
            out = {"step": res.step, "total_steps": res.total_steps}
            print(json.dumps(out) if args.json else f"stopping after step {res.step} of {res.total_steps}: the final "
                  "checkpoint, evaluation and summary follow")  # fmt: skip
    except grpc.RpcError as e:
        _raise_rpc_error(e, client.address, what)
    finally:
        client.close()
    return 0


# ------------------------------------------------------------------- output
STATE_NAMES = {0: "UNSPECIFIED", 1: "RUNNING", 2: "STOPPING", 3: "FINISHED", 4: "FAILED"}


def _status_json(st: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    out = MessageToDict(st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    out["state"] = STATE_NAMES.get(st.state, str(st.state))
    for key in ("train_loss", "val_loss", "val_loss_step", "checkpoint_step", "stopped_at_step"):
        out.setdefault(key, None)  # unset optional fields: null, so scripts can rely on every key
    for key in ("step", "total_steps", "val_loss_step", "checkpoint_step", "stopped_at_step"):
        if out.get(key) is not None:  # proto3 JSON writes int64 as strings
            out[key] = int(out[key])
    for w in out.get("workers", []):
        w["pid"] = int(w["pid"])
    return out


def _row_json(row: Any) -> dict[str, Any]:
    return {"step": row.step, **dict(sorted(row.values.items())),
            **{k: list(v.values) for k, v in sorted(row.arrays.items())}}  # fmt: skip


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def format_status(st: Any) -> str:
    """GetStatus for people."""
    lines = [f"state       {STATE_NAMES.get(st.state, st.state)}" + (f" ({st.error})" if st.error else ""),
             f"run         {st.run_dir} ({st.router} router)",
             f"step        {st.step} of {st.total_steps}"
             + (f" (stopped at step {st.stopped_at_step})" if st.HasField("stopped_at_step") else "")]  # fmt: skip
    loss = f"train {st.train_loss:.4f}" if st.HasField("train_loss") else "train -"
    if st.HasField("val_loss"):
        loss += f", validation {st.val_loss:.4f} (at step {st.val_loss_step})"
    lines.append(f"loss        {loss}")
    lines.append(f"throughput  {st.tokens_per_s:,.0f} tokens/s")
    ckpt = f"step {st.checkpoint_step}: {st.checkpoint_path}" if st.HasField("checkpoint_step") else "none yet"
    lines.append(f"checkpoint  {ckpt}")
    lines.append(f"failures    {st.failures}")
    lines.append(f"workers     {len(st.workers)}")
    for w in st.workers:
        backend = f"  {w.backend}" if w.backend else ""
        lines.append(f"  rank {w.rank}  node {w.node}  pid {w.pid}{backend}  experts {_ranges(list(w.experts))}")
    lines.append(f"MoE layers  {len(st.layers)}")
    for layer in st.layers:
        thr = ""
        if layer.thresholds:
            t = list(layer.thresholds)
            thr = f"  ET thresholds min {min(t):.4g}  mean {sum(t) / len(t):.4g}  max {max(t):.4g}"
        lines.append(f"  L{layer.layer}  {layer.n_experts} experts{thr}")
    return "\n".join(lines)


def format_row(row: Any) -> str:
    """A MetricsRow for people: the step and its main numbers on one line."""
    v = row.values
    parts = [f"step {row.step}"]
    for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f"),
                     ("tokens_per_s", ",.0f")):  # fmt: skip
        if key in v:
            parts.append(f"{key} {v[key]:{fmt}}")
    fanouts = [x for k, x in v.items() if k.endswith("_fanout")]
    if fanouts:
        parts.append(f"fanout {sum(fanouts) / len(fanouts):.2f}")
    loads = [list(a.values) for k, a in row.arrays.items() if k.endswith("_load") and a.values]
    if loads:
        ratio = max(max(lo) / max(sum(lo) / len(lo), 1e-9) for lo in loads)
        parts.append(f"max/mean load {ratio:.2f}")
    if v.get("skipped"):
        parts.append("skipped (non-finite)")
    return "  ".join(parts)

"""The control API's gRPC server, in the driver process of a training job.

Security model (docs/control.md): the server listens on one address of the driver's node
(127.0.0.1 for a single-process run, the driver's Ray node address for a Ray run; never
the wildcard address), and every call must carry the job's token, a fresh
`secrets.token_urlsafe(32)`, as metadata `authorization: Bearer <token>`. The address and
token are in RUN/control.json, created with mode 0600, so only the run folder's owner can
read them. There is no TLS: a token crosses the network in clear text when the address
is not a loopback one (reach such a job over an SSH tunnel from elsewhere).

Bad calls are answered, and the server goes on serving: no or a wrong token ->
UNAUTHENTICATED; a request that does not decode, or whose fields are out of range ->
INVALID_ARGUMENT; a request over 64 KiB -> RESOURCE_EXHAUSTED (gRPC's own size check).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from moedist.cli_checks import check_control_host
from moedist.config import ConfigError
from moedist.control import CONTROL_FILE
from moedist.control.hub import Command, ControlError, ControlHub
from moedist.control.v1 import control_pb2 as pb
from moedist.control.v1 import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from moedist.training.loop import RunLoop

MAX_REQUEST_BYTES = 64 * 1024  # every request is a few bytes; anything larger is refused
MAX_WORKERS = 32  # server threads; each open metric stream holds one
MAX_STREAMS = 16  # metric streams at once (the other threads stay free for the other calls)
COMMAND_TIMEOUT_S = 3600.0  # longest a command waits for its step boundary (or the client's deadline)
INT32_MAX = 2**31 - 1
SERVICE = pb.DESCRIPTOR.services_by_name["Control"].full_name  # moedist.v1.Control


# ------------------------------------------------------------------ interceptor
class _Malformed:
    """A request body that did not decode (handed to the method, which rejects it)."""

    def __init__(self, error: str):
        self.error = error


_UNREAD = object()  # the request of a call refused before its body is read


def _handler_of_same_kind(handler: grpc.RpcMethodHandler, behavior: Callable, deserializer: Callable):
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(behavior, deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(behavior, deserializer, handler.response_serializer)


class TokenInterceptor(grpc.ServerInterceptor):
    """Every call must carry `authorization: Bearer <token>` (compared in constant time);
    requests that do not decode become INVALID_ARGUMENT instead of gRPC's INTERNAL."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        given = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        if len(given) != 1 or not hmac.compare_digest(_as_bytes(given[0]), self._expected):
            why = "no authorization metadata" if not given else "wrong token"

            def refuse(request: Any, context: grpc.ServicerContext) -> None:
                hint = "send 'authorization: Bearer <token>' with the token in RUN/control.json"
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{why}: {hint}")

            # The body is never decoded (gRPC takes a None from a deserializer for a failure).
            return _handler_of_same_kind(handler, refuse, lambda _body: _UNREAD)
        return _decode_guard(handler)


def _as_bytes(v: str | bytes) -> bytes:
    return v if isinstance(v, bytes) else v.encode("utf-8", "replace")


def _decode_guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    decode = handler.request_deserializer
    behavior = handler.unary_stream or handler.unary_unary

    def safe_decode(body: bytes) -> Any:
        try:
            return decode(body)
        except DecodeError as e:
            return _Malformed(str(e))

    def checked(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not decode: {request.error}")
        return behavior(request, context)

    return _handler_of_same_kind(handler, checked, safe_decode)


# ---------------------------------------------------------------------- service
def _abort(context: grpc.ServicerContext, e: ControlError) -> None:
    context.abort(getattr(grpc.StatusCode, e.code), e.message)


def _invalid(context: grpc.ServicerContext, message: str) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class ControlService(pb_grpc.ControlServicer):
    """moedist.v1.Control over a ControlHub."""

    def __init__(self, hub: ControlHub, command_timeout_s: float = COMMAND_TIMEOUT_S):
        self.hub = hub
        self.command_timeout_s = command_timeout_s

    def _run(self, cmd: Command, context: grpc.ServicerContext) -> Any:
        left = context.time_remaining()  # the client's deadline, if it gave one
        timeout = self.command_timeout_s if left is None else min(left, self.command_timeout_s)
        try:
            return self.hub.submit(cmd, timeout, context.is_active)
        except ControlError as e:
            _abort(context, e)

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.Status:
        return self.hub.status()

    def StreamMetrics(self, request: pb.StreamMetricsRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Serialised MetricsRows (see _method_handlers): each row's bytes are made once for every stream."""
        total = self.hub.loop.cfg.train.steps
        if not 0 <= request.from_step < total:
            _invalid(context, f"from_step must be in 0 .. {total - 1} (the run's steps), got {request.from_step}")
        try:
            for row in self.hub.stream(request.from_step, request.follow, context.is_active):
                yield row.wire()
        except ControlError as e:
            _abort(context, e)

    def Scale(self, request: pb.ScaleRequest, context: grpc.ServicerContext) -> pb.ScaleResponse:
        args = {}
        for name in ("workers", "experts"):
            if request.HasField(name):
                if getattr(request, name) <= 0:
                    _invalid(context, f"{name} must be > 0, got {getattr(request, name)}")
                args[name] = getattr(request, name)
        if not args:
            _invalid(context, "give workers and/or experts")
        if request.HasField("noise"):
            if not 0.0 <= request.noise <= 1.0:  # also refuses NaN
                _invalid(context, f"noise must be in [0, 1], got {request.noise}")
            args["noise"] = request.noise
        if not self.hub.can_scale():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this job's executor cannot scale yet")
        step, workers, experts = self._run(Command("scale", args), context)
        return pb.ScaleResponse(step=step, workers=workers, experts=experts)

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        step, path = self._run(Command("checkpoint"), context)
        return pb.CheckpointResponse(step=step, path=path)

    def Stop(self, request: pb.StopRequest, context: grpc.ServicerContext) -> pb.StopResponse:
        step = self._run(Command("stop"), context)
        return pb.StopResponse(step=step, total_steps=self.hub.loop.cfg.train.steps)


def _sent_as_is(wire: bytes) -> bytes:
    """StreamMetrics' response serializer: its rows come serialised already."""
    return wire


def _method_handlers(service: ControlService) -> dict[str, grpc.RpcMethodHandler]:
    """The handlers pb_grpc.add_ControlServicer_to_server would register (the same methods,
    messages and wire format), except that StreamMetrics sends the bytes its method yields:
    a row is serialised once for all the streams that send it, not once per stream."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["Control"].methods:
        request, response = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        behaviour = getattr(service, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(behaviour, request.FromString, _sent_as_is)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(behaviour, request.FromString,
                                                                   response.SerializeToString)  # fmt: skip
    return handlers


# ----------------------------------------------------------------------- server
def _target(host: str, port: int) -> str:
    return f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"


def write_control_file(path: Path, info: dict[str, Any]) -> None:
    """RUN/control.json, readable by its owner only: created 0600 (never widened and then
    narrowed), written whole and renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ControlServer:
    """The gRPC server of one job: started on (host, port; 0 = any free port), announced in
    RUN/control.json, stopped with a grace period."""

    def __init__(self, hub: ControlHub, run_dir: Path, host: str, port: int = 0, grace_s: float = 2.0,
                 command_timeout_s: float = COMMAND_TIMEOUT_S):  # fmt: skip
        check_control_host(host)
        self.hub = hub
        self.run_dir = Path(run_dir)
        self.host, self.port = host, port
        self.grace_s = grace_s
        self.token = secrets.token_urlsafe(32)
        self.address: str | None = None
        self.control_file = self.run_dir / CONTROL_FILE
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="moedist-control"),
            interceptors=[TokenInterceptor(self.token)],
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.so_reuseport", 0),  # a port another process holds is an error, not shared
            ],
            maximum_concurrent_rpcs=MAX_WORKERS,  # beyond: RESOURCE_EXHAUSTED at once, never a queue
        )
        handlers = _method_handlers(ControlService(hub, command_timeout_s))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self._server.add_registered_method_handlers(SERVICE, handlers)

    def start(self) -> str:
        """Listen and write RUN/control.json; returns host:port."""
        where = _target(self.host, self.port)
        try:
            port = self._server.add_insecure_port(where)
        except RuntimeError as e:  # e.g. the port is taken, or the address is not this machine's
            raise ConfigError(f"--control-host/--control-port: cannot listen on {where} ({e})") from None
        if port == 0:
            raise ConfigError(f"--control-host/--control-port: cannot listen on {where}")
        self._server.start()
        self.address = _target(self.host, port)
        write_control_file(self.control_file, {
            "address": self.address,
            "token": self.token,
            "pid": os.getpid(),
            "run_dir": str(self.run_dir.resolve()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "service": "moedist.v1.Control",
        })  # fmt: skip
        return self.address

    def stop(self) -> None:
        """Remove RUN/control.json (if it is still this server's), then stop serving:
        calls in progress get `grace_s` to finish."""
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.control_file.read_text()).get("token") == self.token:
                self.control_file.unlink()
        self._server.stop(self.grace_s).wait()


@contextlib.contextmanager
def serve(loop: RunLoop, host: str, port: int = 0, say: Callable[[str], None] | None = None) -> Iterator[ControlServer]:
    """The control API around `loop.run()`: started before, finished and removed after
    (also when the run fails or is interrupted)."""
    hub = ControlHub(loop, node=host, max_streams=MAX_STREAMS)
    server = ControlServer(hub, loop.run_dir, host, port)
    server.start()
    hub.attach()
    if say is not None:
        say(f"Control:    {server.address} (moedist ctl --run {loop.run_dir} status)")
    error: BaseException | None = None
    try:
        yield server
    except BaseException as e:
        error = e
        raise
    finally:
        hub.finish(error)
        try:
            server.stop()
        except Exception as e:  # never hide the run's own outcome behind a shutdown problem
            print(f"moedist: warning: stopping the control server: {e}", file=sys.stderr)

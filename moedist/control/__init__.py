"""The gRPC control API of a running training job (moedist.v1.Control).

    hub.py     the run loop's side: commands carried out at step boundaries, the status
               snapshot, the metric streams' subscribers (no gRPC here)
    server.py  the gRPC server in the driver: token check, request checks, RUN/control.json
    client.py  `moedist ctl`: the command-line client
    v1/        generated from protos/moedist/v1/control.proto by `make protos` (never edit)

This module imports nothing heavy: the CLI's error handling needs only ControlCallError.
"""

from __future__ import annotations

CONTROL_FILE = "control.json"  # in the run folder: the server's address and token (mode 0600)


class ControlCallError(RuntimeError):
    """`moedist ctl`: the job's server answered a call with an error (exit status 1)."""

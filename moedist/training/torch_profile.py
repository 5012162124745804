"""torch.profiler captures of chosen steps (`profile.torch_profile`, `--torch-profile A-B`).

Every worker (the single process, or each Ray worker) profiles steps A..B (inclusive, the
`step` numbers of metrics.parquet) and exports one Chrome trace, rank{r}.step{A}-{B}.pt.trace.json.
The trace is returned as bytes, not written where it was made: Ray workers may run on other
machines, and the run folder lives on the driver's, so the bytes travel back with the step's
result and the driver writes RUN/torch_profile/. Load a trace in ui.perfetto.dev or
chrome://tracing.

This module imports torch only when a capture starts: the config's validation uses its parser.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from moedist.config import ConfigError

T = TypeVar("T")
# Key of the traces a Ray worker attaches to a step's row (the coordinator takes them off).
ROW_KEY = "_torch_traces"


def parse_window(value: str, steps: int | None = None) -> tuple[int, int] | None:
    """profile.torch_profile "A-B" (or "A") -> (A, B); "" -> None. With `steps` (train.steps),
    the window must end before the run does (a capture is written when step B is done)."""
    if not value.strip():
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
    if m is None:
        raise ConfigError(f"profile.torch_profile: {value!r} is not a step range A-B (e.g. 10-12) or a step A")
    a, b = int(m[1]), int(m[2] if m[2] is not None else m[1])
    if b < a:
        raise ConfigError(f"profile.torch_profile: {value!r} ends before it starts")
    if steps is not None and b >= steps:
        raise ConfigError(f"profile.torch_profile: step {b} is past the run's last step "
                          f"(train.steps = {steps}: steps 0..{steps - 1})")  # fmt: skip
    return a, b


def trace_name(rank: int, first: int, last: int) -> str:
    return f"rank{rank}.step{first}-{last}.pt.trace.json"


class StepProfiler:
    """Runs each step through `run`; the steps of `window` under torch.profiler."""

    def __init__(self, window: tuple[int, int] | None, rank: int = 0, device_type: str = "cpu"):
        self.window = window
        self.rank = rank
        self.device_type = device_type
        self.traces: dict[str, bytes] = {}  # file name -> Chrome trace, until taken
        self._prof: Any = None
        self._first = -1

    def run(self, step: int, fn: Callable[[], T]) -> T:
        """fn() (one step), profiled when `step` is in the window; after the window's last
        step the trace is in `traces`."""
        w = self.window
        if w is None or not w[0] <= step <= w[1]:
            return fn()
        if self._prof is None:  # the window's first step, or the first one a resume reaches
            self._start(step)
        try:
            out = fn()
        except BaseException:
            self.stop()  # a failed step ends the capture; nothing half-done is written
            raise
        if step == w[1]:
            self._finish()
        return out

    def _start(self, step: int) -> None:
        import torch

        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device_type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts)
        self._prof.__enter__()
        self._first = step

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        # export_chrome_trace writes a file: a private temporary one on this machine, read back.
        fd, path = tempfile.mkstemp(suffix=".pt.trace.json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path, "rb") as f:
                self.traces[trace_name(self.rank, self._first, self.window[1])] = f.read()
        finally:
            os.unlink(path)

    def stop(self) -> None:
        """End a capture in progress without writing it (a failed step, a reset worker)."""
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.__exit__(None, None, None)

    def take(self) -> dict[str, bytes]:
        """The finished traces (file name -> bytes), handed over once."""
        out, self.traces = self.traces, {}
        return out

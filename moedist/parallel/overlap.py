"""The token exchange in chunks, pipelined with the expert compute (``[comm] overlap_chunks``).

Legend: A local assignments, R rows this worker receives, D row width, W workers, L local
experts of this worker, C chunks.

A chunk is a group of each worker's local experts (worker w's expert l belongs to chunk
``l * C // L_w``, so every rank derives the same chunks from the placement). The sender sorts
its assignments chunk-major, (chunk, destination, local expert), so each chunk's rows are one
contiguous slice of the send buffer, and the results of a chunk come back into the same
slice. Every exchange is an async ``all_to_all_single`` per chunk:

    forward:  launch every chunk's rows out
              for each chunk c: wait for c, run its experts, launch its results back
              wait for all results; the caller combines them
    backward: launch every chunk's result grads back (last chunk first)
              for each chunk c (last first): wait for it, expert backward,
                                             launch its row grads back to their senders
              wait for all row grads

so one chunk's experts run while the other chunks are on the wire, forward and backward.
With one expert per chunk the receiver's rows are already expert-major, so the two
reorderings the one-shot exchange needs on the receiver (and their backward) disappear.

The backward pipelining needs no hand-written backward of the experts: each wait and each
launch is an autograd node of its own, and autograd runs ready nodes newest first (on CPU
and on one CUDA stream alike), which is the order above. Every rank builds the same graph,
so every rank issues its collectives in the same order, as a process group needs. Spans:
launches and waits are timed under "dispatch" / "combine" (the waits are the exposed
communication); the expert work between them belongs to the caller's span.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from moedist.parallel.clock import CommClock, bytes_to_others, measure, note_collective

__all__ = ["ChunkPlan", "chunk_of_local", "run_pipelined"]


def chunk_of_local(l: int, n_local: int, n_chunks: int) -> int:
    """Chunk of local expert `l` of a worker with `n_local` experts (contiguous, balanced)."""
    return l * n_chunks // n_local


@dataclass
class ChunkPlan:
    """Host-side sizes of one pipelined exchange (the same formulas on every rank).

    ``send[c][w]`` rows go to worker w in chunk c (and come back from it), ``recv[c][w]`` rows
    arrive from worker w in chunk c; ``start[c]`` is chunk c's first row in the sender's
    chunk-major layout."""

    send: list[list[int]]
    recv: list[list[int]]
    start: list[int]
    group: object
    clock: CommClock | None
    rank: int
    # Async work in flight and the buffers it writes (kept alive until waited).
    fwd_out: list = field(default_factory=list)
    fwd_back: list = field(default_factory=list)
    bwd_back: list = field(default_factory=list)
    bwd_out: list = field(default_factory=list)
    out_AD: Tensor | None = None
    grad_rows_AD: Tensor | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.send)

    @property
    def n_rows(self) -> int:
        """Rows of the sender's layout (every chunk's)."""
        return self.start[-1] + sum(self.send[-1])

    def rows(self, c: int) -> slice:
        """Chunk c's rows in the sender's layout."""
        return slice(self.start[c], self.start[c] + sum(self.send[c]))

    def launch(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], kind: str):
        """One async all_to_all_single, counted and timed under `kind`."""
        inp = inp.contiguous()
        with measure(self.clock, kind):
            note_collective(bytes_to_others(inp, in_splits, self.rank))
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
        return work, out, inp

    def wait(self, item, kind: str) -> Tensor:
        """Wait for a launched exchange (the exposed communication); its output buffer."""
        work, out, _ = item
        with measure(self.clock, kind):
            work.wait()
        return out


class _LaunchOut(torch.autograd.Function):
    """Every chunk's rows out (async); one receive buffer per chunk, filled in the background.
    Backward: wait for the row grads that `_WaitOut` nodes sent back, all in one buffer."""

    @staticmethod
    def forward(ctx, rows_AD: Tensor, cp: ChunkPlan) -> tuple[Tensor, ...]:
        ctx.cp = cp
        bufs = []
        for c in range(cp.n_chunks):
            recv_RD = rows_AD.new_empty((sum(cp.recv[c]), *rows_AD.shape[1:]))
            cp.fwd_out.append(cp.launch(recv_RD, rows_AD[cp.rows(c)], cp.recv[c], cp.send[c], "dispatch"))
            bufs.append(recv_RD)
        return tuple(bufs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        cp = ctx.cp
        for item in cp.bwd_out:
            cp.wait(item, "dispatch")
        grad_AD, cp.grad_rows_AD, cp.bwd_out = cp.grad_rows_AD, None, []
        return grad_AD, None


class _WaitOut(torch.autograd.Function):
    """Chunk c's received rows, once they are there. Backward: launch their grads back to
    their senders (async), into chunk c's slice of the sender's grad buffer."""

    @staticmethod
    def forward(ctx, recv_RD: Tensor, cp: ChunkPlan, c: int) -> Tensor:
        ctx.cp, ctx.c = cp, c
        cp.wait(cp.fwd_out[c], "dispatch")
        cp.fwd_out[c] = None
        return recv_RD.view_as(recv_RD)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_RD: Tensor):
        cp, c = ctx.cp, ctx.c
        if cp.grad_rows_AD is None:
            cp.grad_rows_AD = grad_RD.new_empty((cp.n_rows, *grad_RD.shape[1:]))
        cp.bwd_out.append(cp.launch(cp.grad_rows_AD[cp.rows(c)], grad_RD, cp.send[c], cp.recv[c], "dispatch"))
        return grad_RD, None, None  # ignored by _LaunchOut


class _LaunchBack(torch.autograd.Function):
    """Chunk c's expert outputs back to their senders (async), into chunk c's slice of the
    sender's result buffer; returns an empty token for `_WaitBack`. Backward: wait for the
    result grads `_WaitBack` sent."""

    @staticmethod
    def forward(ctx, out_RD: Tensor, cp: ChunkPlan, c: int) -> Tensor:
        ctx.cp, ctx.c = cp, c
        if cp.out_AD is None:
            cp.out_AD = out_RD.new_empty((cp.n_rows, *out_RD.shape[1:]))
        cp.fwd_back.append(cp.launch(cp.out_AD[cp.rows(c)], out_RD, cp.send[c], cp.recv[c], "combine"))
        return out_RD.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, _token):
        cp, c = ctx.cp, ctx.c
        grad_RD = cp.wait(cp.bwd_back[c], "combine")
        cp.bwd_back[c] = None
        return grad_RD, None, None


class _WaitBack(torch.autograd.Function):
    """All chunks' results, once they are back, as one buffer in the sender's layout.
    Backward: launch every chunk's result grads to the workers that ran them, last chunk
    first (the first the backward pass needs)."""

    @staticmethod
    def forward(ctx, cp: ChunkPlan, *tokens: Tensor) -> Tensor:
        ctx.cp = cp
        for item in cp.fwd_back:
            cp.wait(item, "combine")
        out_AD, cp.out_AD, cp.fwd_back = cp.out_AD, None, []
        return out_AD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_AD: Tensor):
        cp = ctx.cp
        cp.bwd_back = [None] * cp.n_chunks
        for c in reversed(range(cp.n_chunks)):
            recv_RD = grad_AD.new_empty((sum(cp.recv[c]), *grad_AD.shape[1:]))
            cp.bwd_back[c] = cp.launch(recv_RD, grad_AD[cp.rows(c)], cp.recv[c], cp.send[c], "combine")
        return (None, *(grad_AD.new_empty(0) for _ in range(cp.n_chunks)))


def run_pipelined(rows_AD: Tensor, cp: ChunkPlan, compute) -> Tensor:
    """Send chunk-major rows_AD out, run ``compute(c, recv_RD) -> out_RD`` on each chunk as it
    arrives, and return the results in rows_AD's layout (module docstring)."""
    recv = _LaunchOut.apply(rows_AD, cp)
    tokens = []
    for c in range(cp.n_chunks):
        x_RD = _WaitOut.apply(recv[c], cp, c)
        tokens.append(_LaunchBack.apply(compute(c, x_RD), cp, c))
    return _WaitBack.apply(cp, *tokens)

"""Row exchanges with the contract of ``dist.all_to_all_single(out, inp, recv_splits,
send_splits, group)`` (rows, uneven splits): the plain collective, a shared-memory path
between the workers of one node, and a hierarchical exchange across nodes.

Legend: W ranks of the group, n ranks on this node (local indices 0..n-1 in rank order),
N rows sent, R rows received, B bytes.

    ex = make_exchange(group, nodes, shm=True, hierarchical=False)
    ex(out_RD, x_ND, recv_splits, send_splits)   # a collective: every rank calls it
    ex.close()                                    # or close_exchanges() for all of them

`nodes[r]` names rank r's node (any string: a node address); ranks with the same name
share a node and so /dev/shm. Everything is a copy, so every path gives the bitwise result
of the plain collective.

Shared memory (`_NodeShm`): each rank owns one data segment (a file in /dev/shm, mapped by
the node's ranks) with two halves used in alternate rounds, and a slot in one control
segment per node. A round: write the rows for each node peer into my half, publish their
byte offsets and my round number in my slot, wait until every node peer has published the
round (spinning on their round numbers, yielding the core), copy my rows out of each
peer's half. Two halves make one wait per round enough: a peer writes round k+2 into the
half I read in round k only after it saw me publish round k+1, which I do after reading.
(x86-64 keeps stores in order (TSO), so a published round number implies its rows are
visible; the module refuses other machines.) A segment outgrows itself by making a bigger
one (a new generation named in the slot); peers map it when they see it, and the owner
unlinks the file once every peer has (each slot records the generations it mapped).

Files are unlinked right after the node's ranks mapped them, so a killed worker leaks no
memory: the kernel frees a mapping with its last process. For the short windows before
that, names carry the creator's pid (``moedist-x.<pid>.<token>.<what>``) and every new
exchange first removes the files of dead pids (`sweep_stale_segments`).
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import math
import mmap
import os
import platform
import secrets
import socket
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CollectiveExchange",
    "HierarchicalExchange",
    "RowExchange",
    "ShmExchange",
    "close_exchanges",
    "make_exchange",
    "sweep_stale_segments",
]

SHM_DIR = Path("/dev/shm")
PREFIX = "moedist-x"
_ALIGN = 64  # row blocks start on cache lines
_MIN_CAPACITY = 1 << 20
_LIVE: weakref.WeakSet = weakref.WeakSet()


class RowExchange(abc.ABC):
    """``ex(out_RD, x_ND, recv_splits, send_splits)``: ``send_splits[w]`` consecutive rows of
    x_ND go to rank w, ``recv_splits[w]`` rows arrive from rank w into out_RD (rank order)."""

    @abc.abstractmethod
    def __call__(self, out: Tensor, inp: Tensor, recv_splits: list[int], send_splits: list[int]) -> None:
        """Move the rows (a collective: every rank of the group calls it)."""

    def close(self) -> None:  # noqa: B027 (optional: an exchange that holds nothing keeps this no-op)
        """Release what the exchange holds (files, mappings); idempotent."""


class CollectiveExchange(RowExchange):
    """The plain ``dist.all_to_all_single`` on `group` (the default path)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group

    def __call__(self, out: Tensor, inp: Tensor, recv_splits: list[int], send_splits: list[int]) -> None:
        dist.all_to_all_single(out, inp, recv_splits, send_splits, group=self.group)

    def __repr__(self) -> str:
        return "CollectiveExchange()"


# ----------------------------------------------------------------------------- files


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_segments(directory: Path = SHM_DIR) -> list[str]:
    """Remove this module's segment files whose creator process is gone; returns their names.
    (A worker killed between creating a file and its peers mapping it leaves one behind.)"""
    removed = []
    for path in directory.glob(f"{PREFIX}.*"):
        parts = path.name.split(".")
        if len(parts) < 3 or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:  # another sweeper was first
            pass
    return removed


def _create(name: str, nbytes: int) -> mmap.mmap:
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _open(name: str, writable: bool = False) -> mmap.mmap:
    fd = os.open(SHM_DIR / name, os.O_RDWR if writable else os.O_RDONLY)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # MAP_POPULATE: map every page now, not one fault per page in the first copies.
        return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, prot)
    finally:
        os.close(fd)


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SHM_DIR / name)


def _bytes(t: Tensor) -> Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (a view: writes land in `t`)."""
    if not t.is_contiguous():
        raise ValueError("the shared-memory exchange moves contiguous tensors only")
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)


# ----------------------------------------------------------------------------- node segment

# Control slot of one local rank, int64 words.
_PID, _ROUND, _GEN0 = 0, 1, 2  # _GEN0 + parity: data generation written in that round
_HDR = 8  # then per parity: n offsets, n byte counts; then n acks (generation mapped, per peer)


def _slot_words(n: int) -> int:
    """int64 words of one control slot for n local ranks, whole cache lines (8 words), so
    ranks never write to the same line."""
    return -(-(_HDR + 5 * n) // 8) * 8


class _NodeShm:
    """Byte exchange among the n ranks of one node through shared memory (module docstring).

    ``exchange(send, recv)``: ``send[j]`` (contiguous) goes to local rank j, ``recv[j]``
    (contiguous, its size known to the receiver) is filled from local rank j.

    Waiting: a rank that finds a peer's round number behind blocks in recv on its own
    datagram socket (abstract namespace: no file, gone with the process); every rank sends
    each peer a token after publishing a round. Blocking, not spinning, because a node may
    run more workers than cores, and the peers being waited for need the core. A token is
    only a wake-up (the round numbers decide), so one dropped on a full queue is harmless:
    the receiver still has unread tokens and re-checks the rounds after each.
    """

    def __init__(self, ctl_name: str, token: str, me: int, n: int, timeout_s: float):
        self.me, self.n, self.token, self.timeout_s = me, n, token, timeout_s
        self.round = 0
        self._ctl_mm = _open(ctl_name, writable=True)
        self.slot = _slot_words(n)
        self.ctl = memoryview(self._ctl_mm).cast("q")  # word w of slot j: ctl[j * self.slot + w]
        self.base = me * self.slot
        self.pids = [0] * n
        self.gen, self.capacity = 0, 0  # my data segment: generation, bytes per half
        self._own: mmap.mmap | None = None
        self._own_u8: Tensor | None = None
        self._pending: list[tuple[int, str]] = []  # my files not yet mapped by every peer
        self._peer_gen = [0] * n
        self._peer_mm: list[mmap.mmap | None] = [None] * n
        self._peer_u8: list[Tensor | None] = [None] * n
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self._address(me))
        self._sock.settimeout(0.5)
        # Sends from a second, non-blocking socket: a send on a socket with a timeout waits
        # for room in a full queue, and here a full queue means "already woken".
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)

    def _address(self, j: int) -> bytes:
        return f"\0{PREFIX}.{self.token}.{j}".encode()

    def word(self, j: int, w: int) -> int:
        return self.ctl[j * self.slot + w]

    def _words(self, parity: int) -> tuple[int, int]:
        off = _HDR + parity * 2 * self.n
        return off, off + self.n

    def _grow(self, need: int) -> None:
        """A new data segment of at least `need` bytes per half, announced in the next round."""
        cap = max(_MIN_CAPACITY, 1 << math.ceil(math.log2(max(need, 1))))
        self.gen += 1
        name = f"{PREFIX}.{os.getpid()}.{self.token}.r{self.me}.g{self.gen}"
        self._own_u8 = None
        self._own = _create(name, 2 * cap)
        self._own_u8 = torch.frombuffer(self._own, dtype=torch.uint8)
        self.capacity = cap
        self._pending.append((self.gen, name))

    def exchange(self, send: list[Tensor], recv: list[Tensor]) -> None:
        n, me, ctl, base = self.n, self.me, self.ctl, self.base
        self.round += 1
        k, parity = self.round, self.round % 2
        recv[me].copy_(send[me])  # my own rows never touch the segment
        sizes = [0 if j == me else send[j].numel() * send[j].element_size() for j in range(n)]
        offsets, pos = [0] * n, 0
        for j in range(n):
            offsets[j] = pos
            pos += -(-sizes[j] // _ALIGN) * _ALIGN
        if pos > self.capacity:
            self._grow(pos)
        half = parity * self.capacity
        for j in range(n):
            if sizes[j]:
                self._own_u8[half + offsets[j] : half + offsets[j] + sizes[j]].copy_(_bytes(send[j]))
        o, c = self._words(parity)
        for j in range(n):
            ctl[base + o + j] = half + offsets[j]
            ctl[base + c + j] = sizes[j]
        ctl[base + _GEN0 + parity] = self.gen
        ctl[base + _ROUND] = k  # published last: the peers may read the rows once they see it
        self._notify()
        self._wait(k)
        for j in range(n):
            if j == me:
                continue
            nbytes = self.word(j, c + me)
            want = recv[j].numel() * recv[j].element_size()
            if nbytes != want:
                raise RuntimeError(
                    f"shared-memory exchange: local rank {j} sent {nbytes} bytes to local rank {me}, "
                    f"which expects {want} (the ranks' splits disagree)"
                )
            gen = self.word(j, _GEN0 + parity)
            if gen != self._peer_gen[j]:
                self._map_peer(j, gen)
            if nbytes:
                at = self.word(j, o + me)
                _bytes(recv[j]).copy_(self._peer_u8[j][at : at + nbytes])
        self._release()

    def _notify(self) -> None:
        for j in range(self.n):
            if j != self.me:
                # Queue full (it holds wake-ups already) or peer gone (the wait sees it): fine.
                with contextlib.suppress(BlockingIOError, ConnectionRefusedError, FileNotFoundError):
                    self._send.sendto(b"k", self._address(j))

    def _map_peer(self, j: int, gen: int) -> None:
        self._peer_u8[j] = None
        self._peer_mm[j] = _open(f"{PREFIX}.{self.pids[j]}.{self.token}.r{j}.g{gen}")
        with warnings.catch_warnings():  # read-only mapping: we only ever read from it
            warnings.simplefilter("ignore", UserWarning)
            self._peer_u8[j] = torch.frombuffer(self._peer_mm[j], dtype=torch.uint8)
        self._peer_gen[j] = gen
        self.ctl[self.base + _HDR + 4 * self.n + j] = gen  # ack: the owner may unlink the file

    def _release(self) -> None:
        """Unlink my files that every peer has mapped (or skipped for a newer one)."""
        if not self._pending:
            return
        acked = min((self.word(j, _HDR + 4 * self.n + self.me) for j in range(self.n) if j != self.me),
                    default=self.gen)  # fmt: skip
        while self._pending and self._pending[0][0] <= acked:
            _unlink(self._pending.pop(0)[1])

    def _wait(self, k: int) -> None:
        """Until every node peer has published round k; fails fast if one died."""
        t0 = time.monotonic()
        for j in range(self.n):
            for _ in range(64):  # a short spin: the peer is often there already
                if self.word(j, _ROUND) >= k:
                    break
            while self.word(j, _ROUND) < k:
                try:
                    self._sock.recv(16)
                except TimeoutError:
                    if not _alive(self.pids[j]):
                        raise RuntimeError(
                            f"shared-memory exchange: local rank {j} (pid {self.pids[j]}) died"
                        ) from None
                    if time.monotonic() - t0 > self.timeout_s:
                        raise TimeoutError(
                            f"shared-memory exchange: local rank {j} did not reach round {k} in {self.timeout_s:.0f} s"
                        ) from None

    def close(self, wait_s: float = 2.0) -> None:
        # A peer may still be in the last round, about to map a file I made in it: give the
        # live peers `wait_s` to record that they did (they take milliseconds unless they
        # failed elsewhere), then unlink whatever is left.
        deadline = time.monotonic() + wait_s
        while self._pending and self.ctl is not None and time.monotonic() < deadline:
            self._release()
            if self._pending:
                if not all(_alive(pid) for j, pid in enumerate(self.pids) if j != self.me):
                    break
                time.sleep(1e-3)
        for _, name in self._pending:
            _unlink(name)
        self._pending.clear()
        if self._sock is not None:
            self._sock.close()
            self._send.close()
            self._sock = self._send = None
        if self.ctl is not None:
            self.ctl.release()
            self.ctl = None
        self._own_u8, self._peer_u8 = None, [None] * self.n  # tensors over the mappings go first
        for mm in [self._ctl_mm, self._own, *self._peer_mm]:
            if mm is not None:
                with contextlib.suppress(BufferError):  # a tensor view still alive somewhere; GC frees it
                    mm.close()
        self._ctl_mm, self._own, self._peer_mm = None, None, [None] * self.n


def _node_shm(group, nodes: list[str], rank: int, timeout_s: float) -> _NodeShm:
    """Collective over `group`: every node's ranks map one control segment (made by the
    node's first rank, unlinked once all have mapped it)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the shared-memory exchange relies on x86-64 store order; this is {platform.machine()}")
    sweep_stale_segments()
    local = [r for r in range(len(nodes)) if nodes[r] == nodes[rank]]
    me, n = local.index(rank), len(local)
    ctl_name = None
    mine = None
    try:
        if me == 0:
            token = secrets.token_hex(4)
            ctl_name = f"{PREFIX}.{os.getpid()}.{token}.ctl"
            _create(ctl_name, n * _slot_words(n) * 8).close()
        names: list = [None] * len(nodes)
        dist.all_gather_object(names, ctl_name, group=group)
        leader_ctl = names[local[0]]
        shm = _NodeShm(leader_ctl, leader_ctl.split(".")[2], me, n, timeout_s)
        shm.ctl[shm.base + _PID] = os.getpid()
        dist.barrier(group=group)  # every node rank has mapped its control segment and bound its socket
        shm.pids = [shm.word(j, _PID) for j in range(n)]
        mine = shm
        return shm
    finally:
        if ctl_name is not None:
            _unlink(ctl_name)
        del mine


# ----------------------------------------------------------------------------- exchanges


def _starts(splits: list[int]) -> list[int]:
    out, pos = [], 0
    for s in splits:
        out.append(pos)
        pos += s
    return out


class ShmExchange(RowExchange):
    """Rows between ranks of one node through shared memory; rows to other nodes through
    the collective (the full group, concurrently, with this node's pairs left out)."""

    def __init__(self, group: dist.ProcessGroup | None, nodes: list[str], timeout_s: float = 120.0):
        self.group, self.nodes, self.timeout_s = group, list(nodes), timeout_s
        self.multi_node = len(set(self.nodes)) > 1
        self._shm: _NodeShm | None = None
        self._local: list[int] = []
        _LIVE.add(self)

    def _setup(self) -> _NodeShm:
        if self._shm is None:
            rank, W = dist.get_rank(self.group), dist.get_world_size(self.group)
            if len(self.nodes) != W:
                raise ValueError(f"nodes names {len(self.nodes)} ranks, the process group has {W}")
            self._local = [r for r in range(W) if self.nodes[r] == self.nodes[rank]]
            self._shm = _node_shm(self.group, self.nodes, rank, self.timeout_s)
        return self._shm

    def __call__(self, out: Tensor, inp: Tensor, recv_splits: list[int], send_splits: list[int]) -> None:
        if out.dtype != inp.dtype:
            raise TypeError(f"exchange: out is {out.dtype}, inp is {inp.dtype}; they must match")
        shm = self._setup()
        W = len(self.nodes)
        s0, r0 = _starts(send_splits), _starts(recv_splits)
        inp = inp.contiguous()
        work = None
        if self.multi_node:
            # Rows for other nodes go packed through the collective, which runs on gloo's
            # threads while this thread does the node's shared-memory part.
            local = set(self._local)
            rs = [0 if t in local else send_splits[t] for t in range(W)]
            rr = [0 if t in local else recv_splits[t] for t in range(W)]
            rin = torch.cat([inp[s0[t] : s0[t] + rs[t]] for t in range(W)]) if sum(rs) else inp[:0]
            rout = out.new_empty((sum(rr), *out.shape[1:]))
            work = dist.all_to_all_single(rout, rin, rr, rs, group=self.group, async_op=True)
        send = [inp[s0[t] : s0[t] + send_splits[t]] for t in self._local]
        recv = [out[r0[t] : r0[t] + recv_splits[t]] for t in self._local]
        shm.exchange(send, recv)
        if work is not None:
            work.wait()
            pos = 0
            for t in range(W):
                if rr[t]:
                    out[r0[t] : r0[t] + rr[t]].copy_(rout[pos : pos + rr[t]])
                    pos += rr[t]

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def __repr__(self) -> str:
        return f"ShmExchange(nodes={len(set(self.nodes))}, local={len(self._local) or '?'})"


class HierarchicalExchange(RowExchange):
    """Across nodes: gather the rows for other nodes at the node's first rank (its leader),
    one exchange between the leaders, scatter within the node. Within a node through shared
    memory (`shm`) or the collective on a node sub-group.

    Every call first all-gathers the send splits (W ints per rank: the leaders must know
    every pair's rows), then runs three node-local/leader rounds."""

    def __init__(self, group: dist.ProcessGroup | None, nodes: list[str], shm: bool = True, timeout_s: float = 120.0):
        self.group, self.nodes, self.use_shm, self.timeout_s = group, list(nodes), shm, timeout_s
        order = list(dict.fromkeys(self.nodes))  # nodes by first rank
        self.members = [[r for r, x in enumerate(self.nodes) if x == node] for node in order]
        self.node_of = [order.index(x) for x in self.nodes]
        self.leaders = [m[0] for m in self.members]
        self._ready = False
        _LIVE.add(self)

    def _setup(self) -> None:
        if self._ready:
            return
        rank, W = dist.get_rank(self.group), dist.get_world_size(self.group)
        if len(self.nodes) != W:
            raise ValueError(f"nodes names {len(self.nodes)} ranks, the process group has {W}")
        self.rank = rank
        self.a = self.node_of[rank]
        self.local = self.members[self.a]
        self.me = self.local.index(rank)
        # dist.new_group is itself collective: every rank makes every group, in one order.
        # Group ranks of the sub-groups are global ranks of `group` mapped through it.
        to_global = (lambda r: r) if self.group is None else (lambda r: dist.get_global_rank(self.group, r))
        self._leader_group = dist.new_group([to_global(r) for r in self.leaders])
        node_groups = [None if self.use_shm else dist.new_group([to_global(r) for r in m]) for m in self.members]
        self._node_group = node_groups[self.a]
        self._subgroups = [self._leader_group, *node_groups]
        self._shm = _node_shm(self.group, self.nodes, rank, self.timeout_s) if self.use_shm else None
        self._ready = True

    def _node_exchange(self, send: list[Tensor], recv: list[Tensor]) -> None:
        """Among this node's ranks: send[j] to local rank j, recv[j] from it."""
        if self._shm is not None:
            self._shm.exchange(send, recv)
            return
        inp = torch.cat([s.reshape(-1) for s in send])
        out = inp.new_empty(sum(r.numel() for r in recv))
        dist.all_to_all_single(out, inp, [r.numel() for r in recv], [s.numel() for s in send], group=self._node_group)
        pos = 0
        for r in recv:
            r.view(-1).copy_(out[pos : pos + r.numel()])
            pos += r.numel()

    def __call__(self, out: Tensor, inp: Tensor, recv_splits: list[int], send_splits: list[int]) -> None:
        self._setup()
        W, rank, local = len(self.nodes), self.rank, self.local
        inp = inp.contiguous()
        M = torch.empty(W * W, dtype=torch.int64)
        dist.all_gather_single(M, torch.tensor(send_splits, dtype=torch.int64), group=self.group)
        M = M.view(W, W).tolist()  # M[s][t]: rows s -> t
        if [M[s][rank] for s in range(W)] != list(recv_splits):
            raise RuntimeError(f"hierarchical exchange: rank {rank}'s recv_splits disagree with the senders' splits")
        row = inp.shape[1:]
        s0, r0 = _starts(send_splits), _starts(recv_splits)
        remote = [t for t in range(W) if self.node_of[t] != self.a]
        leader = local[0]

        def rows(src: Tensor, n: int) -> Tensor:
            return src.new_empty((n, *row))

        # A: to each node peer its own rows, and to the leader also my rows for other nodes
        # (by destination rank).
        send = [inp[s0[t] : s0[t] + send_splits[t]] for t in local]
        if remote and rank != leader:
            send[0] = torch.cat([send[0], *[inp[s0[t] : s0[t] + send_splits[t]] for t in remote]])
        direct = [out[r0[s] : r0[s] + recv_splits[s]] for s in local]
        recv = list(direct)
        if rank == leader and remote:
            recv = [rows(out, M[s][rank] + sum(M[s][t] for t in remote)) if s != rank else direct[0] for s in local]
        self._node_exchange(send, recv)
        if len(self.members) == 1:
            return
        from_remote: Tensor | None = None
        if rank == leader:
            # gathered[s]: rows s -> t for each remote t, in rank order
            gathered = {rank: torch.cat([inp[s0[t] : s0[t] + send_splits[t]] for t in remote])}
            for j, s in enumerate(local):
                if s != rank:
                    direct[j].copy_(recv[j][: M[s][rank]])
                    gathered[s] = recv[j][M[s][rank] :]
            # B: one exchange between the leaders, blocks ordered (source s here, destination t there).
            blocks, send_l, recv_l = [], [], []
            for b, members in enumerate(self.members):
                n_b = 0
                for s in local:
                    pos = 0
                    for t in remote:
                        if self.node_of[t] == b:
                            blocks.append(gathered[s][pos : pos + M[s][t]])
                            n_b += M[s][t]
                        pos += M[s][t]
                send_l.append(0 if b == self.a else n_b)
                recv_l.append(0 if b == self.a else sum(M[s][t] for s in members for t in local))
            lin = torch.cat(blocks) if blocks else inp[:0]
            lout = rows(out, sum(recv_l))
            dist.all_to_all_single(lout, lin, recv_l, send_l, group=self._leader_group)
            # Regroup what came in by local destination t, sources in rank order.
            pieces: dict[tuple[int, int], Tensor] = {}
            pos = 0
            for b, members in enumerate(self.members):
                if b == self.a:
                    continue
                for s in members:
                    for t in local:
                        pieces[(s, t)] = lout[pos : pos + M[s][t]]
                        pos += M[s][t]
            # C: scatter within the node.
            send_c = [torch.cat([pieces[(s, t)] for s in remote]) if remote else out[:0] for t in local]
            recv_c = [rows(out, sum(M[s][rank] for s in remote)) if t == rank else out[:0] for t in local]
            self._node_exchange(send_c, recv_c)
            from_remote = recv_c[0]
        else:
            send_c = [inp[:0] for _ in local]
            recv_c = [rows(out, sum(M[s][rank] for s in remote)) if t == leader else out[:0] for t in local]
            self._node_exchange(send_c, recv_c)
            from_remote = recv_c[0]
        pos = 0
        for s in remote:
            if M[s][rank]:
                out[r0[s] : r0[s] + M[s][rank]].copy_(from_remote[pos : pos + M[s][rank]])
                pos += M[s][rank]

    def close(self) -> None:
        if getattr(self, "_shm", None) is not None:
            self._shm.close()
            self._shm = None
        # The sub-groups (their sockets and threads) go with the exchange, not only when the
        # whole process group is destroyed (a worker reset makes a new exchange). Destroying a
        # group is local; a rank holds only the groups it belongs to.
        for g in getattr(self, "_subgroups", []):
            if isinstance(g, dist.ProcessGroup) and dist.is_initialized():
                dist.destroy_process_group(g)
        self._subgroups, self._ready = [], False

    def __repr__(self) -> str:
        return f"HierarchicalExchange(nodes={len(self.members)}, shm={self.use_shm})"


def make_exchange(
    group: dist.ProcessGroup | None = None,
    nodes: list[str] | None = None,
    shm: bool = False,
    hierarchical: bool = False,
    timeout_s: float = 120.0,
) -> RowExchange:
    """The row exchange for `[comm] shm` / `[comm] hierarchical`; `nodes` (None: all ranks on
    one node) is resolved at the first call, when the group exists."""
    if nodes is None:
        if not (shm or hierarchical):
            return CollectiveExchange(group)
        return _Deferred(group, shm, hierarchical, timeout_s)
    if hierarchical and len(set(nodes)) > 1:
        return HierarchicalExchange(group, nodes, shm=shm, timeout_s=timeout_s)
    if shm:
        return ShmExchange(group, nodes, timeout_s)
    return CollectiveExchange(group)


class _Deferred(RowExchange):
    """An exchange for ranks all on one node, whose count is known only once the group is."""

    def __init__(self, group, shm: bool, hierarchical: bool, timeout_s: float):
        self.group, self.shm, self.hierarchical, self.timeout_s = group, shm, hierarchical, timeout_s
        self._inner: RowExchange | None = None

    def __call__(self, out: Tensor, inp: Tensor, recv_splits: list[int], send_splits: list[int]) -> None:
        if self._inner is None:
            nodes = ["local"] * dist.get_world_size(self.group)
            self._inner = make_exchange(self.group, nodes, self.shm, self.hierarchical, self.timeout_s)
        self._inner(out, inp, recv_splits, send_splits)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()


def close_exchanges() -> None:
    """Close every live shared-memory exchange of this process (before leaving the group)."""
    for ex in list(_LIVE):
        ex.close()


atexit.register(close_exchanges)

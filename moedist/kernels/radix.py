"""Radix-select building blocks: order-preserving float keys and per-expert digit histograms.

Legend: T tokens (rows), E experts (columns), B = 256 buckets of one 8-bit digit.

A float32 maps to a uint32 key whose unsigned order is the float order (sign bit flipped for
positives, all bits inverted for negatives), so "the k-th largest float" becomes "the k-th
largest key", which is found digit by digit: 4 rounds of 8 bits, most significant first.
In round r each expert e has a prefix (the 8r high bits fixed so far); its histogram counts
the next digit of the keys that share that prefix. The distributed select
(moedist.parallel.pool) sums these histograms over the workers.

Keys are held in int64 tensors (torch has no general uint32 arithmetic). -0.0 gets the key of
+0.0: the two compare equal, so a select must treat them as one value; two keys would make
"how many values are >= the cutoff" depend on the sign of a zero and could pick -0.0 where a
`>=` test against +0.0 would be the same anyway. A selected zero is therefore always +0.0.

``backend`` as in moedist.kernels.dispatch: "auto" (numba for CPU tensors, torch otherwise),
"numba" (demand the kernel), "torch" (the fallback that runs on GPU; also the test reference).
The numba kernel reads the float bits directly and never materialises the [T, E] key array.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from moedist.kernels.dispatch import Backend

__all__ = ["N_BUCKETS", "N_ROUNDS", "RadixCounter", "float_to_key", "key_to_float", "radix_histogram"]

N_BUCKETS = 256  # one 8-bit digit
N_ROUNDS = 4  # 32-bit keys
_SIGN = 0x80000000
_MASK32 = 0xFFFFFFFF


def _check_float32(x: Tensor, what: str) -> None:
    if x.dtype != torch.float32:
        raise TypeError(f"{what} must be float32, got {x.dtype}")


def float_to_key(x: Tensor) -> Tensor:
    """Order-preserving map float32 -> uint32 key (returned as int64, same shape).

    x < y  <=>  key(x) < key(y) for every non-NaN pair, and key(-0.0) == key(+0.0).
    Works on the bit pattern only (no float arithmetic, so denormals survive flush-to-zero).
    """
    _check_float32(x, "float_to_key input")
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    bits = torch.where(bits == _SIGN, torch.zeros_like(bits), bits)  # -0.0 -> +0.0
    return torch.where(bits >= _SIGN, bits ^ _MASK32, bits | _SIGN)


def key_to_float(key: Tensor) -> Tensor:
    """Inverse of `float_to_key` (keys in [0, 2^32) as int64) -> float32."""
    key = key.to(torch.int64)
    bits = torch.where(key >= _SIGN, key ^ _SIGN, key ^ _MASK32)
    # Reinterpret the low 32 bits as int32 (wrap into the signed range), then as float32.
    bits = torch.where(bits >= _SIGN, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


# ----------------------------------------------------------------------------- numba kernel


@numba.njit(cache=True, nogil=True, parallel=True)
def _radix_hist_nb(bits_TE: np.ndarray, prefix_E: np.ndarray, shift: int, n_chunks: int) -> np.ndarray:
    """hist[e, d] = #{t : key[t, e] >> (shift + 8) == prefix[e], (key[t, e] >> shift) & 255 == d}.

    bits_TE is the float32 data viewed as uint32. Rows are split into n_chunks blocks, each
    with its own histogram (no atomics), summed at the end; n_chunks = 1 is the serial loop.
    The key is computed without a sign branch (key = bits ^ mask, mask from the sign bit):
    on random-sign data the branch mispredicts half the time and made the pass 3-6x slower.
    """
    T, E = bits_TE.shape
    hi = shift + 8
    part = np.zeros((n_chunks, E, 256), np.int64)
    step = (T + n_chunks - 1) // n_chunks
    for c in numba.prange(n_chunks):
        h = part[c]
        for t in range(c * step, min(T, (c + 1) * step)):
            for e in range(E):
                b = bits_TE[t, e]
                if b == np.uint32(0x80000000):  # -0.0 counts as +0.0 (rare: predictable)
                    b = np.uint32(0)
                # positives: flip the sign bit; negatives: flip every bit
                mask = np.uint32(0x80000000) | ((np.uint32(0) - (b >> np.uint32(31))) & np.uint32(0x7FFFFFFF))
                key = np.int64(b ^ mask)
                if (key >> hi) == prefix_E[e]:
                    h[e, (key >> shift) & 255] += 1
    out = np.zeros((E, 256), np.int64)
    for c in range(n_chunks):
        out += part[c]
    return out


@numba.njit(cache=True, nogil=True)
def _count_nan_nb(bits_N: np.ndarray) -> int:
    """NaN = exponent all ones and a non-zero mantissa (one branch-free pass)."""
    n = 0
    for i in range(bits_N.shape[0]):
        n += (bits_N[i] & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return n


# Below this many elements one thread is faster than forking the numba pool.
_PARALLEL_MIN = 1 << 16


class RadixCounter:
    """Per-round digit histograms of one [T, E] float32 matrix (prepared once, used 4 times).

    numba path: a uint32 view of the float bits (zero copy). torch path: int64 keys plus the
    flat bucket offsets e * 256, computed once.
    """

    def __init__(self, values_TE: Tensor, backend: Backend = "auto"):
        _check_float32(values_TE, "values_TE")
        if values_TE.dim() != 2:
            raise ValueError(f"values_TE must be 2-D [T, E], got shape {tuple(values_TE.shape)}")
        if backend not in ("auto", "numba", "torch"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
        on_cpu = values_TE.device.type == "cpu"
        if backend == "numba" and not on_cpu:
            raise ValueError(f"backend='numba' needs a CPU tensor, got {values_TE.device}; use 'auto' or 'torch'")
        self.T, self.E = values_TE.shape
        self.device = values_TE.device
        self.use_numba = on_cpu and backend != "torch"
        self._values_TE = values_TE.detach()
        if self.use_numba:
            self._bits_TE = self._values_TE.contiguous().numpy().view(np.uint32)
        else:
            self._keys_TE = float_to_key(values_TE.detach())
            self._base_1E = torch.arange(self.E, device=self.device).unsqueeze(0) * N_BUCKETS

    def has_nan(self) -> bool:
        """True if any value is NaN (NaN has no place in the key order)."""
        if self.use_numba:
            return bool(_count_nan_nb(self._bits_TE.reshape(-1)) > 0)
        return bool(torch.isnan(self._values_TE).any())

    def histogram(self, prefix_E: Tensor, round_idx: int) -> Tensor:
        """int64 [E, 256]: round `round_idx` (0 = most significant digit) under prefix_E."""
        if not 0 <= round_idx < N_ROUNDS:
            raise ValueError(f"round_idx must be in [0, {N_ROUNDS}), got {round_idx}")
        if prefix_E.shape != (self.E,):
            raise ValueError(f"prefix_E must have shape ({self.E},), got {tuple(prefix_E.shape)}")
        shift = 8 * (N_ROUNDS - 1 - round_idx)
        if self.use_numba:
            n_chunks = 1
            if self.T * self.E >= _PARALLEL_MIN:
                n_chunks = max(1, min(numba.get_num_threads(), self.T))
            prefix_np = prefix_E.detach().to("cpu", torch.int64).contiguous().numpy()
            return torch.from_numpy(_radix_hist_nb(self._bits_TE, prefix_np, shift, n_chunks))
        hist_EB = torch.zeros(self.E * N_BUCKETS, dtype=torch.int64, device=self.device)
        if self.T == 0:
            return hist_EB.view(self.E, N_BUCKETS)
        match_TE = (self._keys_TE >> (shift + 8)) == prefix_E.to(self.device, torch.int64).unsqueeze(0)
        flat_TE = self._base_1E + ((self._keys_TE >> shift) & (N_BUCKETS - 1))
        # scatter_add of the 0/1 match flags: no data-dependent shapes, so no host sync on GPU.
        hist_EB.scatter_add_(0, flat_TE.reshape(-1), match_TE.reshape(-1).to(torch.int64))
        return hist_EB.view(self.E, N_BUCKETS)


def radix_histogram(values_TE: Tensor, prefix_E: Tensor, round_idx: int, backend: Backend = "auto") -> Tensor:
    """One round's int64 [E, 256] digit histogram of float32 values_TE (see `RadixCounter`)."""
    return RadixCounter(values_TE, backend).histogram(prefix_E, round_idx)

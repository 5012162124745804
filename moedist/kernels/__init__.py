"""Dispatch kernels: numba on CPU, torch fallbacks (GPU, bfloat16).

Compiled kernels are cached per user (numba's cache folder is set here, before any kernel
is decorated): by default in the user cache folder, e.g. ~/.cache/moedist/numba on Linux,
never in the installed package, which may be read-only or shared by several users. A
cache folder the user chose for numba (NUMBA_CACHE_DIR) is kept.
"""

from __future__ import annotations

from pathlib import Path

import numba
import platformdirs


def numba_cache_dir() -> Path:
    """Where numba caches moedist's compiled kernels."""
    return Path(numba.config.CACHE_DIR)


if not numba.config.CACHE_DIR:
    # Read by numba when each @njit(cache=True) function is decorated (module import).
    numba.config.CACHE_DIR = str(Path(platformdirs.user_cache_dir("moedist")) / "numba")

"""Dispatch kernels: numba on CPU, torch fallbacks (GPU, bfloat16)."""

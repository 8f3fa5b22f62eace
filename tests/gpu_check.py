"""Whether GPU tests can run here: CuPy imports and sees a CUDA device (one place for every test
file; GPU tests are marked `gpu` and skipped when HAVE_GPU is false)."""
from __future__ import annotations

try:
    import cupy as cp
    HAVE_GPU = bool(cp.cuda.is_available())
except Exception:  # noqa: BLE001 - no CuPy or no driver: skip
    cp = None
    HAVE_GPU = False

"""Whether GPU tests can run here: CuPy imports and sees a CUDA device (one place for every test
file; GPU tests are marked `gpu` and skipped when HAVE_GPU is false), and what those tests share."""
from __future__ import annotations

import numpy as np
import pytest

from efengine import quant

try:
    import cupy as cp
    HAVE_GPU = bool(cp.cuda.is_available())
except Exception:  # noqa: BLE001 - no CuPy or no driver: skip
    cp = None
    HAVE_GPU = False


def gpu(f):
    """Mark a test `gpu` and skip it where no GPU is usable."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")(f))


def rel(ref, got) -> float:
    """Relative RMS error of got against ref, in float64."""
    return quant.rel_rms(np.asarray(ref, np.float64), np.asarray(got, np.float64))

"""Random stored weights for kernel and quantizer tests."""
from __future__ import annotations

import numpy as np

from efengine import quant


def stored(rng, qtype, shape, group):
    """Random [N, K] weights at ~unit output scale -> (stored bytes, their exact float values)."""
    w = (rng.standard_normal(shape) * shape[1] ** -0.5).astype(np.float32)
    buf = quant.quantize(w, qtype, group)
    return buf, quant.dequantize(buf, qtype, shape, group)

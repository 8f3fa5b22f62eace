"""Loading the CUDA sources in efengine/ops/kernels and launching them from CuPy.

Each module is the concatenation of a few files (common.cuh first), compiled once per process
by NVRTC for the current device (CuPy also caches the binary on disk). Sources include no
toolkit headers, so nothing beyond CuPy and the driver is needed.

Kernel arguments must have the exact C types: use the helpers i32 / i64 / u64 / f32 for
scalars and ptr(a) for optional arrays (None becomes a null pointer).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EfError

try:
    import cupy
except ImportError:          # importable without CuPy; only launching needs it
    cupy = None

KERNEL_DIR = Path(__file__).parent / "kernels"
MODULES = {
    "gemv": ("common.cuh", "dot.cuh", "stream.cuh", "gemv.cu"),
    "moe": ("common.cuh", "dot.cuh", "stream.cuh", "moe.cu"),
    "attn": ("common.cuh", "attn.cu"),
    "misc": ("common.cuh", "misc.cu"),
    "offload": ("offload.cu",),
}
OPTIONS = ("--std=c++17",)
_modules: dict[str, object] = {}
_kernels: dict[tuple[str, str], object] = {}
LAUNCHES = [0]          # kernels launched through launch() (the bench counts a decode step's)

# weight type codes shared with the kernels (common.cuh)
WT = {"f32": 0, "f16": 1, "bf16": 2, "q4": 4, "q8": 8}
# activation prep formats of quantized weights' kernels (common.cuh ACT_*): code, kernel name suffix
ACT = {"f16": 0, "int8": 1}
ACT_SUFFIX = {"f16": "", "int8": "_i8"}


def source(module: str) -> str:
    """The CUDA source of a module, as compiled."""
    return "\n".join((KERNEL_DIR / f).read_text() for f in MODULES[module])


def kernel(module: str, name: str):
    """A compiled kernel (cupy.RawKernel) by module and function name."""
    key = (module, name)
    k = _kernels.get(key)
    if k is None:
        mod = _modules.get(module)
        if mod is None:
            if cupy is None:
                raise EfError("the cupy backend needs CuPy (pip install efengine[cuda12] or [cuda13])")
            mod = cupy.RawModule(code=source(module), options=OPTIONS)
            _modules[module] = mod
        k = _kernels[key] = mod.get_function(name)
    return k


def launch(module: str, name: str, grid, block, args, shared: int = 0) -> None:
    k = kernel(module, name)
    LAUNCHES[0] += 1
    if shared > 48 * 1024 and k.max_dynamic_shared_size_bytes < shared:
        k.max_dynamic_shared_size_bytes = shared
    k(tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(args), shared_mem=int(shared))


_resident: dict[tuple[str, str, int], int] = {}


def resident_blocks(module: str, name: str, threads: int) -> int:
    """How many blocks of `threads` the whole GPU holds at once (by registers): the size of a
    persistent grid."""
    key = (module, name, threads)
    n = _resident.get(key)
    if n is None:
        k = kernel(module, name)
        regs = max(1, (int(k.num_regs) + 7) // 8 * 8)
        per_sm = max(1, min(2048 // threads, 65536 // (regs * threads)))
        sms = int(cupy.cuda.Device().attributes["MultiProcessorCount"])
        n = _resident[key] = per_sm * sms
    return n


def i32(v) -> np.int32:
    return np.int32(v)


def i64(v) -> np.int64:
    return np.int64(v)


def u64(v) -> np.uint64:
    return np.uint64(v)


def f32(v) -> np.float32:
    return np.float32(v)


def ptr(a):
    """An array argument, or a null pointer for None."""
    return np.uint64(0) if a is None else a


def addr(a) -> int:
    """Device address of an array (0 for None)."""
    return 0 if a is None else int(a.data.ptr)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)

"""Loading the CUDA sources in efengine/ops/kernels and launching them from CuPy.

Each module is the concatenation of a few files (common.cuh first), compiled once per process
by NVRTC for the current device (CuPy also caches the binary on disk). Sources include no
toolkit headers, so nothing beyond CuPy and the driver is needed.

Kernel arguments must have the exact C types: use the helpers i32 / i64 / u64 / f32 for
scalars and ptr(a) for optional arrays (None becomes a null pointer).

Inside `dependent_launches()` the kernels of PDL_MODULES go out through the driver's
cuLaunchKernelEx with programmatic stream serialization (sm_90+): a kernel's blocks may be
scheduled before the previous kernel ends, and each waits in grid_dep() (common.cuh) until it has.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
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
    if _PDL[0] and module in PDL_MODULES:
        _launch_dependent(k, grid, block, args, int(shared))
    else:
        k(tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(args), shared_mem=int(shared))


# ---- programmatic dependent launch ---------------------------------------------------------------
PDL_MODULES = frozenset({"gemv", "moe", "attn", "misc"})      # every kernel starts with grid_dep()
_PDL = [False]
_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6      # CUlaunchAttributeID


class _LaunchAttr(ctypes.Structure):             # CUlaunchAttribute: id, padding, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):           # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("n_attrs", ctypes.c_uint)]


_C_ARG = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
          np.dtype(np.uint32): ctypes.c_uint32, np.dtype(np.uint64): ctypes.c_uint64,
          np.dtype(np.float32): ctypes.c_float}
_DRIVER: dict = {}


def driver_function(names: tuple, argtypes: list):
    """The first of `names` the CUDA driver library (libcuda.so.1, ctypes) has, typed to return a
    CUresult; None where the library or every name is missing. Looked up once per names."""
    fn = _DRIVER.get(names)
    if fn is None:
        fn = False
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            name = next((n for n in names if hasattr(lib, n)), None)
            if name is not None:
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
        except OSError:
            pass
        _DRIVER[names] = fn
    return fn or None


def _launch_ex():
    return driver_function(("cuLaunchKernelEx",),
                           [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])


def pdl_supported() -> bool:
    """Whether launches may carry the PDL attribute here: an sm_90+ device, a driver with
    cuLaunchKernelEx, and EFENGINE_PDL not set to 0."""
    if cupy is None or os.environ.get("EFENGINE_PDL", "1") == "0":
        return False
    return int(cupy.cuda.Device().compute_capability) >= 90 and bool(_launch_ex())


@contextmanager
def dependent_launches(on: bool = True):
    """Kernels of PDL_MODULES launched inside carry the PDL attribute (a no-op where `on` is false)."""
    prev = _PDL[0]
    _PDL[0] = bool(on)
    try:
        yield
    finally:
        _PDL[0] = prev


def _c_arg(a):
    if cupy is not None and isinstance(a, cupy.ndarray):
        return ctypes.c_uint64(a.data.ptr)
    ct = _C_ARG.get(getattr(a, "dtype", None))
    if ct is None or not isinstance(a, np.generic):
        raise TypeError(f"kernel argument of type {type(a).__name__}: pass an array or i32 / i64 / u64 / f32")
    return ct(a.item())


def _launch_dependent(k, grid, block, args, shared: int) -> None:
    vals = [_c_arg(a) for a in args]
    params = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.addressof(v) for v in vals])
    attr = _LaunchAttr(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    g = [int(x) for x in grid] + [1] * (3 - len(grid))
    b = [int(x) for x in block] + [1] * (3 - len(block))
    cfg = _LaunchConfig((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shared,
                        cupy.cuda.get_current_stream().ptr, ctypes.pointer(attr), 1)
    rc = _launch_ex()(ctypes.byref(cfg), k.kernel.ptr, params, None)
    if rc != 0:
        raise EfError(f"cuLaunchKernelEx of {k.name} failed (CUresult {rc})")


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

"""Compute backends behind one interface (documented in numpy_backend.py): numpy and cupy."""
from __future__ import annotations

from ..errors import ConfigError

BACKENDS = ("numpy", "cupy", "auto")


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - any import or driver failure means "no GPU here"
        return False


def get_backend(name: str = "numpy", act: str | None = None):
    """A backend object by name; "auto" picks cupy when a GPU is usable, numpy otherwise.
    act ("f16" | "int8"; None = the backend's default): its activation format (act_int8.py)."""
    if not isinstance(name, str):
        return name   # already a backend object
    if name == "auto":
        name = "cupy" if cupy_available() else "numpy"
    kw = {} if act is None else {"act": act}
    if name == "numpy":
        from .numpy_backend import NumpyBackend
        return NumpyBackend(**kw)
    if name == "cupy":
        if not cupy_available():
            raise ConfigError("backend 'cupy' needs CuPy and a CUDA GPU (pip install efengine[cuda12]); "
                              "use --backend numpy to run on the CPU")
        try:
            from .cupy_backend import CupyBackend
        except ImportError as e:
            raise ConfigError(f"backend 'cupy' is not available in this build ({e})") from None
        return CupyBackend(**kw)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")

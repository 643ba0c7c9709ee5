"""Fixtures shared by every test: the embedded model's converted folder and tiny models."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF once and cached."""
    result = subprocess.run(
        [sys.executable, "-m", "worker.model_loader"], stdout=subprocess.PIPE, text=True, timeout=600
    )
    assert result.returncode == 0, "converting the embedded model failed"
    return Path(result.stdout.strip().splitlines()[-1])


def build_tiny_model(arch: str, folder: Path, tokenizer_folder: Path, heads: int = 4, kv_heads: int = 2) -> Path:
    """A randomly initialised model of `arch` with SmolLM2's tokenizer, saved to `folder`."""
    import torch
    import transformers

    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    config = configs[arch](
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Larger logits than the default init: greedy choices are then far from ties.
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_folder) -> dict[str, Path]:
    """Tiny Llama, Qwen2 and Qwen3 models (heads divide by 2, for TP tests)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch, smollm2_folder) for arch in ("llama", "qwen2", "qwen3")}


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

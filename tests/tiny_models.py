"""Tiny randomly initialised models built from configs (no weights are ever downloaded)."""

import shutil
from pathlib import Path

import torch
import transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}


def tiny_config(arch: str, vocab_size: int = 512, heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
    return CONFIG_CLASSES[arch](
        vocab_size=vocab_size,
        hidden_size=heads * head_dim,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )


def save_tiny_model(config, folder: Path, tokenizer_folder: Path | None = None, embedding_std: float = 0.02) -> Path:
    """Save a model of `config` (seeded) to `folder`, with `tokenizer_folder`'s tokenizer files.

    A large `embedding_std` makes logits far apart, so greedy choices are far from ties."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, embedding_std)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES if tokenizer_folder else ():
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, Path(folder) / name)
    return Path(folder)


def perturbed_copy(folder: Path, target: Path, seed: int, scale: float = 0.5) -> Path:
    """The model at `folder` with seeded noise added to every parameter, saved at `target` with
    its tokenizer files: another model of the same shape."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale * param.std().clamp(min=1e-3))
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).exists():
            shutil.copy(Path(folder) / name, Path(target) / name)
    return Path(target)

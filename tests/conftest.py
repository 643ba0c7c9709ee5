"""Fixtures shared by every test: the embedded model's converted folder and tiny models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_model, tiny_config


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF once and cached."""
    result = subprocess.run(
        [sys.executable, "-m", "worker.model_loader"], stdout=subprocess.PIPE, text=True, timeout=600
    )
    assert result.returncode == 0, "converting the embedded model failed"
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_folder) -> dict[str, Path]:
    """Tiny Llama, Qwen2 and Qwen3 models (heads divide by 2, for TP tests)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        arch: save_tiny_model(tiny_config(arch, vocab_size=49152), root / arch, smollm2_folder, embedding_std=1.0)
        for arch in ("llama", "qwen2", "qwen3")
    }


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

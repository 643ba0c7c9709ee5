"""Resolving `--model`: folders as is, GGUF converted once into the cache, clear failures."""

import os
import subprocess
import sys
import time

import pytest

from protocol.models import ModelError, default_model_path
from worker.model_loader import resolve_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_loader(*args: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZEROSERVE_CACHE": cache}
    return subprocess.run([sys.executable, "-m", "worker.model_loader", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_folder_is_returned_as_is(llama_folder):
    assert resolve_model(llama_folder) == llama_folder


def test_missing_model_fails_with_one_line(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        resolve_model(str(tmp_path / "nope.gguf"))
    done = run_loader("--model", str(tmp_path / "nope"), cache=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: model not found")


@pytest.mark.real_model
def test_default_gguf_is_converted_once_then_cached(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF: converted into an empty cache (~20 s), then found at once."""
    monkeypatch.setenv("ZEROSERVE_CACHE", str(tmp_path))
    folder = resolve_model(None)
    assert os.path.dirname(folder) == str(tmp_path)
    assert os.path.basename(folder).startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    started = time.monotonic()
    assert resolve_model(default_model_path()) == folder
    assert time.monotonic() - started < 1
    done = run_loader(cache=str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == folder

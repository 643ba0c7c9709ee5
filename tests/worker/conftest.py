"""Fixtures for the worker tests: tiny random models saved as HF folders (no download, no GGUF)."""

import pytest

from tests.worker.worker_testutil import tiny_model


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> str:
    return tiny_model("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="session")
def qwen2_folder(tmp_path_factory) -> str:
    return tiny_model("qwen2", str(tmp_path_factory.mktemp("qwen2")))


@pytest.fixture(scope="session")
def qwen3_folder(tmp_path_factory) -> str:
    return tiny_model("qwen3", str(tmp_path_factory.mktemp("qwen3")))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "real_model: loads the real SmolLM2 GGUF (about 20 s)")

"""Frontend test fixtures: SmolLM2's tokenizer (no weights), a fake core, a frontend process."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from protocol.codec import Decoder
from protocol.config import EngineConfig, ProcessReady, encode_config

from frontend.tokenizer import Tokenizer, load_tokenizer
from tests.frontend.fake_core import FakeCore

REPO_ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2_folder: Path) -> Path:
    """SmolLM2's converted folder: the frontend needs only its tokenizer files."""
    return smollm2_folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return load_tokenizer(str(tokenizer_dir))


@dataclass
class Engine:
    """A frontend process in front of a fake core; `core_pid` is the pid the frontend watches."""

    config: EngineConfig
    core: FakeCore
    process: subprocess.Popen
    core_stand_in: subprocess.Popen
    ready: ProcessReady | None

    @property
    def address(self) -> str:
        return self.config.client_address(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _wait_ready(engine_process: subprocess.Popen, pull: zmq.Socket, port: int) -> ProcessReady | None:
    """Wait for the frontend's port; return its ready report (None when launch never got it)."""
    decoder = Decoder(ProcessReady)
    deadline = time.monotonic() + 60
    while not _port_open(port):
        if engine_process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the frontend did not start")
        if pull.poll(100):
            return decoder.decode(pull.recv_multipart())
    return decoder.decode(pull.recv_multipart()) if pull.poll(2000) else None


@contextlib.contextmanager
def running_engine(tokenizer_dir: Path) -> Iterator[Engine]:
    run_dir = tempfile.mkdtemp(prefix="zs-fe-", dir="/tmp")
    config = EngineConfig(model=str(tokenizer_dir), run_dir=run_dir, device="cpu", dtype="float32", port=_free_port())
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(config.launch_address)
    core = FakeCore(config)
    core.start()
    stand_in = subprocess.Popen(["sleep", "1000"])
    process = subprocess.Popen(
        [sys.executable, "-m", "frontend", "--config", encode_config(config), "--index", "0",
         "--watch-pids", str(stand_in.pid)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )
    try:
        ready = _wait_ready(process, pull, config.port)
        yield Engine(config, core, process, stand_in, ready)
    finally:
        for child in (process, stand_in):
            child.kill()
            child.wait(timeout=10)
        core.stop()
        context.destroy(linger=0)
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def engine(tokenizer_dir: Path) -> Iterator[Engine]:
    """One frontend shared by a module's tests that leave it healthy."""
    with running_engine(tokenizer_dir) as running:
        yield running


@pytest.fixture
def fresh_engine(tokenizer_dir: Path) -> Iterator[Engine]:
    """A frontend of a test's own, for tests that kill something."""
    with running_engine(tokenizer_dir) as running:
        yield running

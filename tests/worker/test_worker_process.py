"""`python -m worker` end to end over a real ZMQ socket: ready, one step, shutdown; and a refused start."""

import os
import subprocess
import sys

import pytest
import zmq

from protocol.codec import Decoder, Encoder
from protocol.config import EngineConfig, encode_config
from protocol.messages import SamplingParams
from protocol.process import make_socket
from protocol.step import NewRequest, ScheduledRequest, Shutdown, StepPlan, WorkerReady, WorkerToCore
from tests.worker.worker_testutil import prompt, reference_generate, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_MS = 40_000


@pytest.fixture
def worker_link(tmp_path):
    """Start ranks of `python -m worker` against a ROUTER bound here; always kill them."""
    context = zmq.Context()
    procs: list[subprocess.Popen] = []
    state = {}

    def start(model: str, workers: int = 1, ranks=(0,)) -> zmq.Socket:
        config = EngineConfig(model=model, run_dir=str(tmp_path), device="cpu", dtype="float32",
                              workers=workers, block_size=4, kv_cache_memory=4_000_000)
        state["sock"] = sock = make_socket(context, zmq.ROUTER, config.worker_address, bind=True)
        for rank in ranks:
            cmd = [sys.executable, "-m", "worker", "--config", encode_config(config), "--rank", str(rank)]
            procs.append(subprocess.Popen(cmd, cwd=REPO))
        return sock

    try:
        yield start, procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if "sock" in state:
            state["sock"].close()
        context.term()


def receive(sock: zmq.Socket) -> tuple[bytes, object]:
    assert sock.poll(TIMEOUT_MS), "no message from the worker"
    identity, *frames = sock.recv_multipart()
    return identity, Decoder(WorkerToCore).decode(frames)


def test_worker_serves_a_step_then_shuts_down(worker_link, llama_folder):
    start, procs = worker_link
    sock = start(llama_folder)
    encoder = Encoder()
    identity, ready = receive(sock)
    assert identity == b"rank0"
    assert isinstance(ready, WorkerReady) and ready.error is None
    assert ready.num_kv_blocks == 4_000_000 // (2 * 2 * 4 * 2 * 16 * 4)  # K+V, layers, block, KV heads, head dim, fp32
    assert ready.max_model_len == 2048

    sock.send_multipart([identity, b"not msgpack"])  # logged and skipped
    tokens = prompt(3, 6)
    plan = StepPlan(step_id=7, new_requests=[NewRequest("r", tokens, [0, 1], 0, SamplingParams(temperature=0))],
                    scheduled=[ScheduledRequest("r", 6)])
    sock.send_multipart([identity, *encoder.encode(plan)])
    _, result = receive(sock)
    assert result.step_id == 7 and result.error is None
    assert result.sampled_request_ids == ["r"]
    assert result.sampled_token_ids == reference_generate(llama_folder, tokens, 1)

    bad = StepPlan(step_id=8, scheduled=[ScheduledRequest("unknown", 1)])
    sock.send_multipart([identity, *encoder.encode(bad)])
    _, failed = receive(sock)
    assert failed.step_id == 8 and "unknown" in failed.error

    sock.send_multipart([identity, *encoder.encode(Shutdown())])
    assert procs[0].wait(timeout=20) == 0


def test_heads_not_divisible_by_workers_fail_start_up(worker_link, tmp_path):
    start, procs = worker_link
    sock = start(tiny_model("odd", str(tmp_path / "odd")), workers=2, ranks=(0,))
    _, ready = receive(sock)
    assert ready.error == "model has 9 attention heads and 3 KV heads: --workers 2 must divide both"
    assert procs[0].wait(timeout=20) == 1

"""`EngineConfig`: the one frozen, validated configuration every process receives."""

import os
from typing import Literal, Optional

import msgspec

API_KEY_ENV = "ZEROSERVE_API_KEY"  # the HTTP API key reaches the frontends in their environment
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where the frontends keep the metrics they share
Device = Literal["cpu", "cuda"]
Dtype = Literal["float32", "bfloat16", "float16"]


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`model` is an HF folder (launch converts a GGUF file before starting anyone).
    `kv_cache_memory` is bytes when > 1, else a fraction of free device memory.
    `max_model_len` None means the model's own limit, capped by the KV pool.
    `http_port`: every frontend also serves HTTP there (the API key, a secret, is not part of the
    config, which travels on command lines: launch hands it to the frontends in their environment)."""

    model: str
    run_dir: str
    device: Device
    dtype: Dtype
    frontends: int = 1
    workers: int = 1
    host: str = "127.0.0.1"
    port: int = 8100
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: float = 0.1
    max_model_len: Optional[int] = None
    paused_requests: Literal["hold", "reject"] = "hold"
    http_port: Optional[int] = None
    served_model_name: str = "zeroserve"

    def __post_init__(self) -> None:
        checks = [
            (self.frontends >= 1, f"--frontends must be >= 1, got {self.frontends}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (0 < self.port < 65536, f"--port must be in 1..65535, got {self.port}"),
            (
                self.port + self.frontends - 1 < 65536,
                f"--port {self.port} leaves no room for {self.frontends} frontends",
            ),
            (self.max_num_seqs >= 1, f"--max-num-seqs must be >= 1, got {self.max_num_seqs}"),
            (
                self.max_num_batched_tokens >= 1,
                f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}",
            ),
            (
                self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
                f"--block-size must be a power of two, got {self.block_size}",
            ),
            (self.kv_cache_memory > 0, f"--kv-cache-memory must be > 0, got {self.kv_cache_memory}"),
            (
                self.max_model_len is None or self.max_model_len >= 1,
                f"--max-model-len must be >= 1, got {self.max_model_len}",
            ),
            (
                self.http_port is None or 0 < self.http_port < 65536,
                f"--http-port must be in 1..65535, got {self.http_port}",
            ),
            (
                self.http_port is None or not self.port <= self.http_port < self.port + self.frontends,
                f"--http-port {self.http_port} is one of the frontends' client ports "
                f"({self.port}..{self.port + self.frontends - 1})",
            ),
            (bool(self.served_model_name), "--served-model-name must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def frontend_port(self, index: int) -> int:
        return self.port + index

    def client_address(self, index: int) -> str:
        return f"tcp://{self.host}:{self.frontend_port(index)}"

    def local_client_address(self, index: int) -> str:
        """Frontend `index`'s clients' socket for its own HTTP server, in the same process."""
        return self._ipc(f"frontend-{index}")

    def _ipc(self, name: str) -> str:
        return "ipc://" + os.path.join(self.run_dir, name)

    @property
    def core_input_address(self) -> str:
        return self._ipc("core-input")

    @property
    def core_output_address(self) -> str:
        return self._ipc("core-output")

    @property
    def worker_address(self) -> str:
        return self._ipc("workers")

    @property
    def interrupt_address(self) -> str:
        return self._ipc("interrupts")

    @property
    def launch_address(self) -> str:
        return self._ipc("launch")


def encode_config(config: EngineConfig) -> str:
    return msgspec.json.encode(config).decode()


def decode_config(text: str) -> EngineConfig:
    return msgspec.json.decode(text, type=EngineConfig)


class ProcessReady(msgspec.Struct, tag="process_ready", array_like=True):
    """A child's report to launch: ready (`error` None) or failed at start-up with one clear line."""

    role: str
    detail: str = ""
    error: Optional[str] = None

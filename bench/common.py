"""What every benchmark needs: workloads, a real engine started and always stopped, timings, tables.

    with running_engine(folder, ["--device", "cpu"], num_frontends=2) as addresses:
        ...  # addresses[i] is frontend i's `tcp://...`
"""

import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Iterator, Sequence

import numpy as np

logger = logging.getLogger("bench")

# Ids below this are special tokens (<|endoftext|>, <|im_start|>, ...) in SmolLM2's vocabulary.
MIN_ORDINARY_TOKEN_ID = 20
ENGINE_STOP_GRACE_S = 30.0
ENGINE_START_TIMEOUT_S = 300.0
WARMUP_PROMPT = list(range(1000, 1016))
WARMUP_TOKENS = 4


# ---- workload and timings -------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_new_tokens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_new_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(num_requests: int, seed: int, prompt_len: Sequence[int], new_tokens: Sequence[int],
                  vocab_size: int) -> Workload:
    """Random ordinary-token prompts and output lengths, each drawn uniformly from [MIN, MAX]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len[0], prompt_len[1] + 1, num_requests)
    outputs = rng.integers(new_tokens[0], new_tokens[1] + 1, num_requests)
    prompts = [rng.integers(MIN_ORDINARY_TOKEN_ID, vocab_size, n).tolist() for n in lengths]
    return Workload(prompts, [int(n) for n in outputs])


@dataclass(frozen=True)
class RequestTiming:
    """One request's latencies in seconds and the new token ids it produced."""

    ttft_s: float
    itls_s: list[float]
    token_ids: list[int]


@dataclass
class SystemResult:
    name: str
    elapsed_s: float = 0.0
    timings: list[RequestTiming] = field(default_factory=list)
    error: str | None = None
    note: str = ""

    @property
    def output_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.timings)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    def ttft_median_ms(self) -> float | None:
        return percentile_ms([t.ttft_s for t in self.timings], 50)

    def itl_ms(self, percentile: float) -> float | None:
        return percentile_ms([gap for t in self.timings for gap in t.itls_s], percentile)


def percentile_ms(seconds: Sequence[float], percentile: float) -> float | None:
    """The percentile of durations in seconds, in milliseconds; None for no samples."""
    return float(np.percentile(seconds, percentile)) * 1000.0 if len(seconds) else None


def timing_from_arrivals(submitted: float, arrivals: list[float], token_ids: list[int]) -> RequestTiming:
    return RequestTiming(arrivals[0] - submitted, np.diff(arrivals).tolist(), token_ids)


def check_lengths(name: str, workload: Workload, timings: list[RequestTiming]) -> None:
    for index, (timing, expected) in enumerate(zip(timings, workload.max_new_tokens)):
        if len(timing.token_ids) != expected:
            raise RuntimeError(f"{name}: request {index} got {len(timing.token_ids)} of {expected} tokens")


# ---- the engine as a real process tree ------------------------------------------------------


def resolve_model_folder(model: str | None) -> str:
    """The HF folder `python -m worker.model_loader` prints as its last stdout line."""
    command = [sys.executable, "-m", "worker.model_loader"] + (["--model", model] if model else [])
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def running_engine(folder: str, extra_args: Sequence[str], num_frontends: int = 1,
                   start_timeout_s: float = ENGINE_START_TIMEOUT_S) -> Iterator[list[str]]:
    """Yields the frontends' addresses; stops the engine however the block ends.

    The engine's log goes to a temporary file; its tail is logged when the block raises, and its
    error lines are logged in any case.
    """
    log_path = os.path.join(tempfile.gettempdir(), f"zeroserve-bench-{os.getpid()}.log")
    args = [*extra_args, "--frontends", str(num_frontends)]
    process = start_engine(folder, args, free_port_range(num_frontends), log_path)
    try:
        addresses = wait_for_addresses(process, num_frontends, start_timeout_s)
        logger.info("engine ready at %s", " ".join(addresses))
        yield addresses
    except BaseException:
        log_tail(log_path)
        raise
    finally:
        stop_engine(process)
        warn_engine_errors(log_path)


def free_port_range(count: int) -> int:
    """A base port with `count` consecutive free ports from it (frontend i listens on base + i)."""
    for _ in range(100):
        base = _free_port()
        if base + count < 65000 and all(_port_is_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_engine(folder: str, extra_args: Sequence[str], port: int, log_path: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "launch.cli", "serve", "--model", folder, "--port", str(port), *extra_args]
    logger.info("starting %s (engine log: %s)", " ".join(command), log_path)
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)


def wait_for_addresses(process: subprocess.Popen[str], num_frontends: int, timeout_s: float) -> list[str]:
    """The `frontend-<i>: <address>` lines the engine prints once it serves, in frontend order.

    Raises if the engine exits or stays silent too long.
    """
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump_lines, args=(process.stdout, lines), daemon=True).start()
    addresses: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(addresses) < num_frontends and (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError(f"engine exited with status {process.wait()} before it was ready")
        name, _, address = line.partition(": ")
        if name.startswith("frontend-") and name.removeprefix("frontend-").isdigit():
            addresses[int(name.removeprefix("frontend-"))] = address.strip()
    if len(addresses) < num_frontends:
        raise TimeoutError(f"engine announced {len(addresses)} of {num_frontends} frontends in {timeout_s:.0f} s")
    return [addresses[i] for i in range(num_frontends)]


def _pump_lines(stream: IO[str], lines: "queue.Queue[str | None]") -> None:
    # Draining stdout for the engine's whole life keeps it from blocking on a full pipe.
    for line in stream:
        logger.debug("engine stdout: %s", line.rstrip())
        lines.put(line)
    lines.put(None)


def stop_engine(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL; launch's children watch it and exit by themselves if it is killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=ENGINE_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("engine still running %.0f s after SIGTERM; killing it", ENGINE_STOP_GRACE_S)
            process.kill()
            process.wait()
    logger.info("engine stopped with status %s", process.returncode)


def log_tail(path: str, num_lines: int = 40) -> None:
    with open(path) as log:
        tail = log.readlines()[-num_lines:]
    logger.error("last engine log lines (%s):\n%s", path, "".join(tail).rstrip())


def warn_engine_errors(path: str) -> None:
    """A run can finish while some engine process logged an error; surface those lines."""
    with open(path) as log:
        errors = [line.rstrip() for line in log if " ERROR " in line or line.startswith("Traceback")]
    if errors:
        logger.warning("engine log %s has %d error lines, first ones:\n%s", path, len(errors), "\n".join(errors[:10]))


# ---- output ---------------------------------------------------------------------------------


def format_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    """The first cell left-aligned, the next ones right-aligned to `widths`, the last one as is."""
    fixed = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells[:-1])]
    return " | ".join(fixed + [cells[-1]])


def print_table(columns: Sequence[str], widths: Sequence[int], rows: Sequence[Sequence[str]]) -> None:
    header = format_row(columns, widths)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(format_row(row, widths))


def number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None, reference: float | None) -> str:
    return "n/a" if value is None or not reference else f"{value / reference:.2f}x"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

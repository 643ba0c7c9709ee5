"""What every benchmark needs: workloads, a real engine started and always stopped, timings, tables.

    with running_engine(folder, ["--device", "cpu"], num_frontends=2) as addresses:
        ...  # addresses[i] is frontend i's `tcp://...`
"""

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from launch.local import start_local_engine

logger = logging.getLogger("bench")

# Ids below this are special tokens (<|endoftext|>, <|im_start|>, ...) in SmolLM2's vocabulary.
MIN_ORDINARY_TOKEN_ID = 20
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
    logger.info("starting zeroserve serve %s (engine log: %s)", " ".join(extra_args), log_path)
    with open(log_path, "w", buffering=1) as log_file:
        engine = start_local_engine(folder, extra_args, num_frontends, start_timeout_s, echo=log_file.write)
        try:
            logger.info("engine ready at %s", " ".join(engine.addresses))
            yield engine.addresses
        except BaseException:
            logger.error("last engine log lines (%s):\n%s", log_path, "".join(engine.log[-40:]).rstrip())
            raise
        finally:
            logger.info("engine stopped with status %s", engine.stop())
            warn_engine_errors(engine.log, log_path)


def warn_engine_errors(log: list[str], path: str) -> None:
    """A run can finish while some engine process logged an error; surface those lines."""
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

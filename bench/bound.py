"""The compute bound of a benchmark workload: its matmul FLOPs, and the output tok/s they allow at
the matmul rates measured on this machine (`bench/throughput.py` prints it below its table)."""

import time
from dataclasses import dataclass
from typing import Callable

import torch
import transformers

from bench.common import Workload

MATMUL_SIZE = 2048
MATMUL_REPEATS = 5
MATMUL_ROUNDS = 4
BF16_PROBE_SIZE = 256
BF16_PROBE_SHARE = 0.25


@dataclass(frozen=True)
class MatmulRate:
    flops_per_s: float
    how: str  # how the matmul ran: "fp32", "bf16", or "bf16 widened to fp32"


def matmul_rate(dtype: torch.dtype) -> MatmulRate:
    """The best of a few timed rounds of a MATMUL_SIZE^2 matmul: a peak rate, not one spoiled by a
    busy neighbour. bf16 counts the faster of a bf16 matmul and an fp32 one over the matrices
    widened (conversion included), as bf16 prefill may run: a CPU without bf16 instructions
    (AVX2) multiplies bf16 at a small fraction of its fp32 rate, and the bf16 matmul is then
    left out when a small one runs below BF16_PROBE_SHARE of fp32's (at this size it took
    minutes)."""
    if dtype != torch.bfloat16:
        return MatmulRate(_best_rate(MATMUL_SIZE, dtype), "fp32")
    widened = MatmulRate(_best_rate(MATMUL_SIZE, torch.bfloat16, widen=True), "bf16 widened to fp32")
    probe = _best_rate(BF16_PROBE_SIZE, torch.bfloat16) / _best_rate(BF16_PROBE_SIZE, torch.float32)
    if probe < BF16_PROBE_SHARE:
        return widened
    native = MatmulRate(_best_rate(MATMUL_SIZE, torch.bfloat16), "bf16")
    return max(native, widened, key=lambda rate: rate.flops_per_s)


def _best_rate(size: int, dtype: torch.dtype, widen: bool = False) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    multiply = (lambda: (a.float() @ b.float()).to(dtype)) if widen else (lambda: a @ b)
    multiply()
    return max(_matmul_round(multiply, size) for _ in range(MATMUL_ROUNDS))


def _matmul_round(multiply: Callable[[], torch.Tensor], size: int) -> float:
    start = time.perf_counter()
    for _ in range(MATMUL_REPEATS):
        multiply()
    return 2 * size**3 * MATMUL_REPEATS / (time.perf_counter() - start)


def workload_flops(folder: str, workload: Workload) -> float:
    """The matmul FLOPs of serving the workload: every layer's projections for each prompt and
    output token, the LM head for each output token (attention's own products left out)."""
    config = transformers.AutoConfig.from_pretrained(folder)
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    qkvo = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_token = layers * (qkvo + 3 * hidden * inter)
    tokens = workload.num_prompt_tokens + workload.num_output_tokens
    return 2.0 * (per_token * tokens + hidden * config.vocab_size * workload.num_output_tokens)


def bound_lines(flops: float, workload: Workload, rates: dict[str, MatmulRate]) -> list[str]:
    """The workload's FLOPs and the output tok/s they allow at each rate (keyed by a dtype's label)."""
    lines = [f"workload: {len(workload.prompts)} requests, {workload.num_prompt_tokens} prompt + "
             f"{workload.num_output_tokens} output tokens = {flops / 1e12:.2f} TFLOP of matmuls"]  # fmt: skip
    for label, rate in rates.items():
        bound = workload.num_output_tokens / (flops / rate.flops_per_s)
        lines.append(f"{label} bound: matmul {MATMUL_SIZE}^2 ({rate.how}) at "
                     f"{rate.flops_per_s / 1e9:.0f} GFLOP/s -> {bound:.0f} output tok/s")  # fmt: skip
    return lines

"""Output throughput and latency of zeroserve against transformers on one greedy workload.

    python bench/throughput.py [--num-requests 32] [--seed 0] [--skip-hf-cb] [--engine-arg=--block-size=32]

Every system serves the same requests on the model `python -m worker.model_loader` resolves, in
fp32 on CPU: random prompt token ids (ordinary vocabulary ids, 32-256 tokens), 32-128 new tokens
per request, greedy, EOS ignored, so that each request generates exactly its own number of tokens.

* zeroserve: `python -m launch.cli serve` with all its processes, driven through `AsyncClient`,
  every request submitted at once (after one short warm-up request);
* transformers `generate` on one static, left-padded batch run to the longest request; the steps
  past a request's own length are waste and do not count as output;
* transformers continuous batching (`continuous_batching_context_manager`, per-request limits).

It prints one table, then the compute bound: the measured fp32 matmul rate / (2 x parameters).

Latency conventions: TTFT runs from a request's submission to its first new token. ITL is the gap
between consecutive token arrivals, pooled over all requests; when one output carries k tokens, its
first token gets the gap and the other k-1 get 0. The static batch's first step ends the prefill of
all requests at once, so its TTFT is the same for every request.
"""

import argparse
import asyncio
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
from typing import IO, Callable

import numpy as np
import torch
import transformers
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
from transformers.generation.continuous_batching.requests import GenerationOutput
from transformers.generation.continuous_batching.utils import WorkloadHints

from frontend.client import AsyncClient

logger = logging.getLogger("bench")

# Ids below this are special tokens (<|endoftext|>, <|im_start|>, ...) in SmolLM2's vocabulary.
MIN_ORDINARY_TOKEN_ID = 20
ENGINE_READY_PREFIX = "frontend-0: "
ENGINE_STOP_GRACE_S = 30.0
WARMUP_PROMPT = list(range(1000, 1016))
WARMUP_TOKENS = 4
MATMUL_SIZE = 2048
MATMUL_REPEATS = 5
MATMUL_ROUNDS = 4


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
        return _ms(np.median([t.ttft_s for t in self.timings])) if self.timings else None

    def itl_ms(self, percentile: float) -> float | None:
        gaps = [gap for t in self.timings for gap in t.itls_s]
        return _ms(np.percentile(gaps, percentile)) if gaps else None


def _ms(seconds: float) -> float:
    return float(seconds) * 1000.0


# ---- workload and model ---------------------------------------------------------------------


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.prompt_len[0], args.prompt_len[1] + 1, args.num_requests)
    new_tokens = rng.integers(args.new_tokens[0], args.new_tokens[1] + 1, args.num_requests)
    prompts = [rng.integers(MIN_ORDINARY_TOKEN_ID, vocab_size, n).tolist() for n in lengths]
    return Workload(prompts, [int(n) for n in new_tokens])


def resolve_model_folder(model: str | None) -> str:
    """The HF folder `python -m worker.model_loader` prints as its last stdout line."""
    command = [sys.executable, "-m", "worker.model_loader"] + (["--model", model] if model else [])
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def timing_from_arrivals(submitted: float, arrivals: list[float], token_ids: list[int]) -> RequestTiming:
    return RequestTiming(arrivals[0] - submitted, np.diff(arrivals).tolist(), token_ids)


def check_lengths(name: str, workload: Workload, timings: list[RequestTiming]) -> None:
    for index, (timing, expected) in enumerate(zip(timings, workload.max_new_tokens)):
        if len(timing.token_ids) != expected:
            raise RuntimeError(f"{name}: request {index} got {len(timing.token_ids)} of {expected} tokens")


# ---- system A: zeroserve --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_engine(folder: str, extra_args: list[str], log_path: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "launch.cli", "serve", "--model", folder, "--port", str(free_port()),
               "--device", "cpu", "--dtype", "float32", *extra_args]
    logger.info("starting %s (engine log: %s)", " ".join(command), log_path)
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)


def wait_for_address(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The address the engine prints once it serves; raises if it exits or stays silent too long."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump_lines, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError(f"engine exited with status {process.wait()} before it was ready")
        if line.startswith(ENGINE_READY_PREFIX):
            return line.removeprefix(ENGINE_READY_PREFIX).strip()
    raise TimeoutError(f"engine printed no {ENGINE_READY_PREFIX!r} line within {timeout_s:.0f} s")


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


def run_zeroserve(folder: str, workload: Workload, args: argparse.Namespace) -> SystemResult:
    log_path = os.path.join(tempfile.gettempdir(), f"zeroserve-bench-{os.getpid()}.log")
    process = start_engine(folder, args.engine_arg, log_path)
    try:
        address = wait_for_address(process, args.engine_start_timeout)
        logger.info("engine ready at %s", address)
        return asyncio.run(asyncio.wait_for(drive_zeroserve(address, workload), args.zeroserve_timeout))
    except Exception:
        log_tail(log_path)
        raise
    finally:
        stop_engine(process)
        warn_engine_errors(log_path)


async def drive_zeroserve(address: str, workload: Workload) -> SystemResult:
    async with AsyncClient(address) as client:
        await stream_request(client, WARMUP_PROMPT, WARMUP_TOKENS)
        logger.info("zeroserve: submitting %d requests at once", len(workload.prompts))
        start = time.perf_counter()
        requests = zip(workload.prompts, workload.max_new_tokens)
        timings = await asyncio.gather(*(stream_request(client, p, n) for p, n in requests))
        elapsed = time.perf_counter() - start
    check_lengths("zeroserve", workload, timings)
    return SystemResult("zeroserve", elapsed, timings)


async def stream_request(client: AsyncClient, prompt: list[int], max_tokens: int) -> RequestTiming:
    """Tokens that arrive in one output share its arrival time (so their gaps after the first are 0)."""
    arrivals: list[float] = []
    token_ids: list[int] = []
    submitted = time.perf_counter()
    stream = client.generate(token_ids=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for out in stream:
        now = time.perf_counter()
        arrivals.extend([now] * len(out.token_ids))
        token_ids.extend(out.token_ids)
        if out.finish_reason == "error":
            raise RuntimeError(f"zeroserve request failed: {out.error}")
    return timing_from_arrivals(submitted, arrivals, token_ids)


# ---- system B: transformers generate, static batch ------------------------------------------


class StepClock(StoppingCriteria):
    """Timestamps each decoding step (called once per step, after its tokens are chosen); never stops."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def run_hf_static(model: transformers.PreTrainedModel, workload: Workload) -> SystemResult:
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    generate_static(model, Workload([WARMUP_PROMPT], [WARMUP_TOKENS]), pad_id)
    logger.info("transformers static batch: %d requests, %d steps", len(workload.prompts), max(workload.max_new_tokens))
    result = generate_static(model, workload, pad_id)
    waste = len(workload.prompts) * max(workload.max_new_tokens) - workload.num_output_tokens
    result.note = f"{waste} padded-out tokens not counted"
    return result


def generate_static(model: transformers.PreTrainedModel, workload: Workload, pad_id: int) -> SystemResult:
    input_ids, attention_mask = left_pad(workload.prompts, pad_id)
    steps = max(workload.max_new_tokens)
    config = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=pad_id)
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                stopping_criteria=StoppingCriteriaList([clock]))
    elapsed = time.perf_counter() - start
    new_ids = output[:, input_ids.shape[1]:].tolist()
    timings = [timing_from_arrivals(start, clock.times[:n], row[:n])
               for row, n in zip(new_ids, workload.max_new_tokens)]
    check_lengths("transformers static", workload, timings)
    return SystemResult("transformers static batch", elapsed, timings)


# ---- system C: transformers continuous batching ---------------------------------------------


def run_hf_cb(model: transformers.PreTrainedModel, workload: Workload) -> SystemResult:
    """The context manager runs its own warm-up batches before the clock starts."""
    logger.info("transformers continuous batching: %d requests", len(workload.prompts))
    config = GenerationConfig(do_sample=False, max_new_tokens=max(workload.max_new_tokens), eos_token_id=-1,
                              pad_token_id=model.config.pad_token_id)
    hints = WorkloadHints(max(len(p) for p in workload.prompts), max(workload.max_new_tokens), len(workload.prompts))
    with model.continuous_batching_context_manager(generation_config=config, timeout=30, workload_hints=hints) as cb:
        start = time.perf_counter()
        ids = [cb.add_request(p, max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
               for p, n in zip(workload.prompts, workload.max_new_tokens)]
        outputs = collect_cb_outputs(cb, set(ids))
        elapsed = time.perf_counter() - start
    timings = [cb_timing(outputs[request_id]) for request_id in ids]
    check_lengths("transformers continuous batching", workload, timings)
    return SystemResult("transformers continuous batching", elapsed, timings)


def collect_cb_outputs(cb: ContinuousBatchingManager, pending: set[str]) -> dict[str, GenerationOutput]:
    outputs = {}
    while pending:
        output = cb.get_result(timeout=1.0)
        if output is None and not cb.is_running():
            raise RuntimeError(f"the generation thread stopped with {len(pending)} requests unfinished")
        if output is not None and output.is_finished():
            if output.error is not None:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
            outputs[output.request_id] = output
            pending.discard(output.request_id)
    return outputs


def cb_timing(output: GenerationOutput) -> RequestTiming:
    # `created_time` is taken when `add_request` builds the request: its submission.
    return timing_from_arrivals(output.created_time, output.timestamps, list(output.generated_tokens))


# ---- compute bound and table ----------------------------------------------------------------


def matmul_flops_per_s() -> float:
    """The best of a few timed rounds: a peak rate, not one spoiled by a busy neighbour."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a @ b
    return max(_matmul_round(a, b) for _ in range(MATMUL_ROUNDS))


def _matmul_round(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    for _ in range(MATMUL_REPEATS):
        a @ b
    return 2 * MATMUL_SIZE**3 * MATMUL_REPEATS / (time.perf_counter() - start)


def compute_bound_line(flops: float, num_params: int, workload: Workload) -> str:
    bound = flops / (2 * num_params)
    output_share = workload.num_output_tokens / (workload.num_output_tokens + workload.num_prompt_tokens)
    return (f"compute bound: fp32 matmul {flops / 1e9:.1f} GFLOP/s / (2 x {num_params / 1e6:.1f}M params) = "
            f"{bound:.0f} tokens/s processed; with this workload's prompt tokens, "
            f"<= {bound * output_share:.0f} output tokens/s")


COLUMNS = ["system", "out tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms",
           "tok/s vs zs", "TTFT vs zs", "ITL50 vs zs", "wall s", "note"]
WIDTHS = [32, 10, 12, 11, 11, 12, 11, 12, 8]


def format_row(cells: list[str]) -> str:
    fixed = [cell.ljust(WIDTHS[0]) if i == 0 else cell.rjust(WIDTHS[i]) for i, cell in enumerate(cells[:-1])]
    return " | ".join(fixed + [cells[-1]])


def _number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> str:
    return "n/a" if value is None or not reference else f"{value / reference:.2f}x"


def result_row(result: SystemResult, reference: SystemResult | None) -> list[str]:
    if result.error is not None:
        return [result.name] + ["n/a"] * 8 + [f"failed: {result.error}"]
    ref_ok = reference is not None and reference.error is None
    metrics: list[Callable[[SystemResult], float | None]] = [
        lambda r: r.tokens_per_s, SystemResult.ttft_median_ms, lambda r: r.itl_ms(50)]
    ratios = [_ratio(m(result), m(reference) if ref_ok else None) for m in metrics]
    return [result.name, _number(result.tokens_per_s), _number(result.ttft_median_ms()),
            _number(result.itl_ms(50)), _number(result.itl_ms(99)), *ratios,
            _number(result.elapsed_s), result.note]


def print_table(results: list[SystemResult], bound_line: str) -> None:
    reference = next((r for r in results if r.name == "zeroserve"), None)
    header = format_row(COLUMNS)
    print(header)
    print("-" * len(header))
    for result in results:
        print(format_row(result_row(result, reference)))
    print("ratios are system / zeroserve (for TTFT and ITL, above 1x means slower than zeroserve)")
    print(bound_line)


def add_agreement_notes(results: list[SystemResult]) -> None:
    """Greedy outputs of the same model should match zeroserve's; say how many requests do."""
    reference = next((r for r in results if r.name == "zeroserve" and r.error is None), None)
    for result in results:
        if reference is None or result is reference or result.error is not None:
            continue
        same = sum(a.token_ids == b.token_ids for a, b in zip(result.timings, reference.timings))
        result.note = "; ".join(filter(None, [result.note, f"{same}/{len(result.timings)} outputs = zeroserve"]))


# ---- main -----------------------------------------------------------------------------------


def guarded(name: str, run: Callable[[], SystemResult]) -> SystemResult:
    """A failing system becomes a table row with its reason; the others still run."""
    try:
        return run()
    except Exception as error:
        logger.exception("%s failed", name)
        return SystemResult(name, error=f"{type(error).__name__}: {error}".splitlines()[0])


def load_hf_model(folder: str) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # generate() fills unset fields from the model's own config: without this its EOS would still stop rows.
    model.generation_config.eos_token_id = None
    return model.eval()


def run_all(args: argparse.Namespace) -> None:
    folder = resolve_model_folder(args.model)
    logger.info("model folder: %s", folder)
    workload = make_workload(args, transformers.AutoConfig.from_pretrained(folder).vocab_size)
    logger.info("workload: %d requests, %d prompt tokens, %d output tokens", len(workload.prompts),
                workload.num_prompt_tokens, workload.num_output_tokens)
    results = []
    if not args.skip_zeroserve:
        results.append(guarded("zeroserve", lambda: run_zeroserve(folder, workload, args)))
    model = load_hf_model(folder)
    if not args.skip_hf_static:
        results.append(guarded("transformers static batch", lambda: run_hf_static(model, workload)))
    if not args.skip_hf_cb:
        results.append(guarded("transformers continuous batching", lambda: run_hf_cb(model, workload)))
    add_agreement_notes(results)
    num_params = sum(p.numel() for p in model.parameters())
    print_table(results, compute_bound_line(matmul_flops_per_s(), num_params, workload))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="passed to worker.model_loader (default: embedded SmolLM2)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--skip-zeroserve", action="store_true")
    parser.add_argument("--skip-hf-static", action="store_true")
    parser.add_argument("--skip-hf-cb", action="store_true")
    parser.add_argument("--engine-arg", action="append", default=[],
                        help="extra `serve` option, repeatable: --engine-arg=--max-num-batched-tokens=4096")
    parser.add_argument("--engine-start-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--zeroserve-timeout", type=float, default=600.0, help="seconds for warm-up and run")
    return parser


def validate(args: argparse.Namespace) -> None:
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be at least 1, got {args.num_requests}")
    for name, (low, high) in (("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} needs 1 <= MIN <= MAX, got {low} {high}")


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    try:
        validate(args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    run_all(args)


if __name__ == "__main__":
    main()

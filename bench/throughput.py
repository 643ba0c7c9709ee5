"""Output throughput and latency of zeroserve against transformers on one greedy workload.

    python bench/throughput.py [--num-requests 32] [--seed 0] [--skip-hf-cb] [--engine-arg=--block-size=32]

(from any folder; `python -m bench.throughput` from the repo root works too.)

Every system serves the same requests on the model `python -m worker.model_loader` resolves, in
fp32 on CPU: random prompt token ids (ordinary vocabulary ids, 32-256 tokens), 32-128 new tokens
per request, greedy, EOS ignored, so that each request generates exactly its own number of tokens.

* zeroserve: `python -m launch.cli serve` with all its processes, driven through `AsyncClient`,
  every request submitted at once (after one short warm-up request);
* transformers `generate` on one static, left-padded batch, and transformers continuous batching
  (`bench/hf_baselines.py`).

It prints one table, then the compute bound: the measured fp32 matmul rate / (2 x parameters).

Latency conventions: TTFT runs from a request's submission to its first new token. ITL is the gap
between consecutive token arrivals, pooled over all requests; when one output carries k tokens, its
first token gets the gap and the other k-1 get 0.
"""

import sys
from pathlib import Path

# This folder comes first on sys.path when a script here runs, and its http.py would shadow the
# standard library's `http` for every module: the repo root (for `bench.*`) takes its place.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import logging
import time
from typing import Callable

import torch
import transformers

from bench.common import (  # noqa: E402
    WARMUP_PROMPT,
    WARMUP_TOKENS,
    RequestTiming,
    SystemResult,
    Workload,
    check_lengths,
    make_workload,
    number,
    print_table,
    ratio,
    resolve_model_folder,
    running_engine,
    setup_logging,
    timing_from_arrivals,
)
from bench.hf_baselines import load_hf_model, run_hf_cb, run_hf_static  # noqa: E402
from frontend.client import AsyncClient  # noqa: E402

logger = logging.getLogger("bench")

ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32"]
MATMUL_SIZE = 2048
MATMUL_REPEATS = 5
MATMUL_ROUNDS = 4
COLUMNS = ["system", "out tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms",
           "tok/s vs zs", "TTFT vs zs", "ITL50 vs zs", "wall s", "note"]
WIDTHS = [32, 10, 12, 11, 11, 12, 11, 12, 8]


# ---- zeroserve ------------------------------------------------------------------------------


def run_zeroserve(folder: str, workload: Workload, args: argparse.Namespace) -> SystemResult:
    with running_engine(folder, ENGINE_ARGS + args.engine_arg, start_timeout_s=args.engine_start_timeout) as addresses:
        return asyncio.run(asyncio.wait_for(drive_zeroserve(addresses[0], workload), args.zeroserve_timeout))


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


def result_row(result: SystemResult, reference: SystemResult | None) -> list[str]:
    if result.error is not None:
        return [result.name] + ["n/a"] * 8 + [f"failed: {result.error}"]
    ref_ok = reference is not None and reference.error is None
    metrics: list[Callable[[SystemResult], float | None]] = [
        lambda r: r.tokens_per_s, SystemResult.ttft_median_ms, lambda r: r.itl_ms(50)]
    ratios = [ratio(m(result), m(reference) if ref_ok else None) for m in metrics]
    return [result.name, number(result.tokens_per_s), number(result.ttft_median_ms()),
            number(result.itl_ms(50)), number(result.itl_ms(99)), *ratios,
            number(result.elapsed_s), result.note]


def print_results(results: list[SystemResult], bound_line: str) -> None:
    reference = next((r for r in results if r.name == "zeroserve"), None)
    print_table(COLUMNS, WIDTHS, [result_row(result, reference) for result in results])
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


def run_all(args: argparse.Namespace) -> None:
    folder = resolve_model_folder(args.model)
    logger.info("model folder: %s", folder)
    vocab_size = transformers.AutoConfig.from_pretrained(folder).vocab_size
    workload = make_workload(args.num_requests, args.seed, args.prompt_len, args.new_tokens, vocab_size)
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
    print_results(results, compute_bound_line(matmul_flops_per_s(), num_params, workload))


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
    setup_logging()
    run_all(args)


if __name__ == "__main__":
    main()

"""Output throughput and latency of zeroserve against vLLM's CPU build and transformers on one
greedy workload, in fp32 and bf16, every system alone on the cores, one after another.

    python bench/throughput.py [--vllm-python /tmp/vllm-venv/bin/python] [--repeats 3]
        [--dtypes float32 bfloat16] [--num-requests 32] [--seed 0] [--max-num-batched-tokens 8192]
        [--engine-arg=--block-size=32] [--profile]

(from any folder; `python -m bench.throughput` from the repo root works too.) vLLM's venv comes
from `shared/peers/vllm_cpu_setup.sh`; without `--vllm-python` its rows are left out.

Every system serves the same requests on the model `python -m worker.model_loader` resolves:
random prompt token ids (ordinary vocabulary ids, 32-256 tokens), 32-128 new tokens per request,
greedy, EOS ignored, so that each request generates exactly its own number of tokens. Each
system runs the workload `--repeats` times after a short warm-up, its prefix cache reset before
each repetition; the table shows the median repetition's figures and every repetition's tok/s.
Both engines schedule at most `--max-num-batched-tokens` a step (default 8192, so that either
prefills the workload's prompts in one step; vLLM 0.32's `LLM` takes 4096 on CPU when not told,
`zeroserve serve` and vLLM's API server 2048), so that their prefills interleave with decodes alike
(ITL p99).

* zeroserve: `python -m launch.cli serve --dtype D` with all its processes, driven through
  `AsyncClient`, every request submitted at once;
* vLLM: `LLM.generate`'s loop in a subprocess of vLLM's python (`bench/vllm_runner.py`), both
  cores (`VLLM_CPU_OMP_THREADS_BIND=0-1`), each output's arrival timed;
* transformers `generate` on one static, left-padded batch (fp32, once).

Below the table: the workload's matmul FLOPs (prompt tokens included) and the bound they set at
the fp32 and bf16 matmul rates measured in the same run.

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
import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
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
from bench.bound import bound_lines, matmul_rate, workload_flops  # noqa: E402
from bench.hf_baselines import load_hf_model, run_hf_static  # noqa: E402
from frontend.client import AsyncClient  # noqa: E402
from protocol.messages import StepKindProfile, StepProfile  # noqa: E402

logger = logging.getLogger("bench")

DTYPES = ("float32", "bfloat16")
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
# Tokens a step may schedule, both engines: the whole default workload's prompts fit in one step.
BATCHED_TOKENS = 8192
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "HF_HUB_OFFLINE": "1",
            "VLLM_LOGGING_LEVEL": "WARNING"}  # fmt: skip
COLUMNS = ["system", "dtype", "out tok/s", "every repetition tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms",
           "tok/s vs zs", "ITL99 vs zs", "start s", "note"]  # fmt: skip
WIDTHS = [26, 5, 9, 24, 11, 10, 10, 11, 11, 7]
PROFILE_PARTS = ["schedule", "send", "worker.prepare", "worker.forward", "forward.projections", "forward.attention",
                 "forward.lm_head", "forward.other", "worker.sample", "worker.other", "outputs", "step"]  # fmt: skip


@dataclass
class Runs:
    """One system in one dtype: its repetitions (each a SystemResult) and its start-up time."""

    name: str
    dtype: str
    repetitions: list[SystemResult] = field(default_factory=list)
    start_s: float | None = None
    error: str | None = None
    note: str = ""
    profiles: list[StepProfile] = field(default_factory=list)  # one per repetition, with --profile

    @property
    def median_index(self) -> int:
        """The repetition of median throughput (the lower middle one for an even count)."""
        ordered = sorted(range(len(self.repetitions)), key=lambda i: self.repetitions[i].tokens_per_s)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def median(self) -> SystemResult:
        return self.repetitions[self.median_index]


# ---- zeroserve ------------------------------------------------------------------------------


def run_zeroserve(folder: str, workload: Workload, dtype: str, args: argparse.Namespace) -> Runs:
    runs = Runs("zeroserve", dtype)
    started = time.perf_counter()
    options = ["--device", "cpu", "--dtype", dtype, f"--max-num-batched-tokens={args.max_num_batched_tokens}",
               *args.engine_arg]  # fmt: skip
    with running_engine(folder, options, start_timeout_s=args.engine_start_timeout) as addresses:
        runs.start_s = time.perf_counter() - started
        for _ in range(args.repeats):
            run = drive_zeroserve(addresses[0], workload, args.profile)
            result, profile = asyncio.run(asyncio.wait_for(run, args.zeroserve_timeout))
            runs.repetitions.append(result)
            if profile is not None:
                runs.profiles.append(profile)
    return runs


async def drive_zeroserve(address: str, workload: Workload, profile: bool) -> tuple[SystemResult, StepProfile | None]:
    """One repetition; with `profile`, the steps' profile of its requests (warm-up left out)."""
    async with AsyncClient(address) as client:
        await client.reset_prefix_cache()
        await stream_request(client, WARMUP_PROMPT, WARMUP_TOKENS)
        if profile:
            await client.start_profile()
        logger.info("zeroserve: submitting %d requests at once", len(workload.prompts))
        start = time.perf_counter()
        requests = zip(workload.prompts, workload.max_new_tokens)
        timings = await asyncio.gather(*(stream_request(client, p, n) for p, n in requests))
        elapsed = time.perf_counter() - start
        steps = await client.stop_profile() if profile else None
    check_lengths("zeroserve", workload, timings)
    return SystemResult("zeroserve", elapsed, timings), steps


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


# ---- vLLM -----------------------------------------------------------------------------------


def run_vllm(python: str, folder: str, workload: Workload, dtype: str, args: argparse.Namespace) -> Runs:
    """`bench/vllm_runner.py` in vLLM's python, alone on the cores; its start-up is the seconds
    until its warm-up request finished."""
    runs = Runs("vLLM-CPU LLM.generate", dtype)
    job = {"model": folder, "dtype": dtype, "repeats": args.repeats, "prompts": workload.prompts,
           "max_new_tokens": workload.max_new_tokens, "warmup_prompt": WARMUP_PROMPT,
           "warmup_tokens": WARMUP_TOKENS, "max_num_batched_tokens": args.max_num_batched_tokens}  # fmt: skip
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_runner.py")
    with tempfile.TemporaryDirectory() as scratch:
        job_path, result_path = os.path.join(scratch, "job.json"), os.path.join(scratch, "result.json")
        with open(job_path, "w") as file:
            json.dump(job, file)
        logger.info("vLLM %s: starting %s", dtype, python)
        env = {**os.environ, **VLLM_ENV}
        # -P: this folder must not lead sys.path there either (its http.py shadows the stdlib's).
        completed = subprocess.run([python, "-P", runner, job_path, result_path], env=env, cwd=scratch,
                                   timeout=args.vllm_timeout, capture_output=True, text=True)  # fmt: skip
        if completed.returncode != 0:
            tail = completed.stderr.strip().splitlines()[-20:]
            logger.error("vLLM %s failed:\n%s", dtype, "\n".join(tail))
            raise RuntimeError(f"vllm_runner exited with {completed.returncode}: {tail[-1] if tail else ''}")
        with open(result_path) as file:
            result = json.load(file)
    runs.name = f"vLLM-CPU {result['version']} LLM.generate"
    runs.start_s = result["start_s"]
    for repetition in result["repetitions"]:
        timings = [RequestTiming(r["ttft_s"], r["itls_s"], r["token_ids"]) for r in repetition["requests"]]
        check_lengths("vLLM", workload, timings)
        runs.repetitions.append(SystemResult(runs.name, repetition["elapsed_s"], timings))
    return runs


# ---- transformers ---------------------------------------------------------------------------


def run_transformers(folder: str, workload: Workload) -> Runs:
    return Runs("transformers static batch", "float32", [run_hf_static(load_hf_model(folder), workload)])


# ---- table ----------------------------------------------------------------


def result_row(runs: Runs, reference: Runs | None) -> list[str]:
    dtype = SHORT_DTYPES[runs.dtype]
    if runs.error is not None or not runs.repetitions:
        return [runs.name, dtype] + ["n/a"] * 8 + [f"failed: {runs.error}"]
    median = runs.median
    every = " ".join(number(r.tokens_per_s, 0) for r in runs.repetitions)
    ref = reference.median if reference is not None and reference.repetitions else None
    return [runs.name, dtype, number(median.tokens_per_s), every, number(median.ttft_median_ms()),
            number(median.itl_ms(50)), number(median.itl_ms(99)),
            ratio(median.tokens_per_s, ref.tokens_per_s if ref else None),
            ratio(median.itl_ms(99), ref.itl_ms(99) if ref else None),
            number(runs.start_s), runs.note]  # fmt: skip


def add_agreement_notes(all_runs: list[Runs]) -> None:
    """Greedy outputs should match zeroserve's fp32 ones; say how many requests do."""
    reference = next((r for r in all_runs if r.name == "zeroserve" and r.dtype == "float32" and r.repetitions), None)
    for runs in all_runs:
        if reference is None or runs is reference or not runs.repetitions:
            continue
        pairs = zip(runs.median.timings, reference.median.timings)
        same = sum(a.token_ids == b.token_ids for a, b in pairs)
        runs.note = "; ".join(filter(None, [runs.note, f"{same}/{len(runs.median.timings)} outputs = zs fp32"]))


def print_results(all_runs: list[Runs], lines: list[str]) -> None:
    zeroserve = {r.dtype: r for r in all_runs if r.name == "zeroserve"}
    print_table(COLUMNS, WIDTHS, [result_row(r, zeroserve.get(r.dtype)) for r in all_runs])
    print("ratios are system / zeroserve in the same dtype (ITL above 1x: slower than zeroserve)")
    for line in lines:
        print(line)
    for runs in zeroserve.values():
        if runs.profiles:
            print_profile(runs)


def print_profile(runs: Runs) -> None:
    """Milliseconds per step by part, for each kind of step, of the median repetition."""
    profile = runs.profiles[runs.median_index]
    names = [name for name in ("decode", "prefill") if name in profile.steps]
    kinds = [profile.steps[name] for name in names]
    in_steps = sum(kind.seconds["step"] for kind in kinds)
    print(f"\nzeroserve {SHORT_DTYPES[runs.dtype]} step profile (median repetition): {in_steps:.2f} s in steps "
          f"of {profile.wall_s:.2f} s profiled")  # fmt: skip
    columns = ["part", *(f"{name} {unit}" for name in names for unit in ("ms/step", "%")), ""]
    rows = [["steps", *(cell for kind in kinds for cell in (str(kind.num_steps), "")), ""],
            ["tokens/step", *(cell for kind in kinds for cell in (number(kind.num_tokens / kind.num_steps), "")), ""]]
    for part in PROFILE_PARTS:
        rows.append([part, *(cell for kind in kinds for cell in _part_cells(kind, part)), ""])
    print_table(columns, [20] + [15, 5] * len(kinds), rows)


def _part_cells(kind: StepKindProfile, part: str) -> tuple[str, str]:
    """The part's milliseconds per step and its share of the steps' time."""
    seconds = kind.seconds.get(part, 0.0)
    return number(1000 * seconds / kind.num_steps, 2), number(100 * seconds / kind.seconds["step"])


# ---- main -----------------------------------------------------------------------------------


def guarded(name: str, dtype: str, run: Callable[[], Runs]) -> Runs:
    """A failing system becomes a table row with its reason; the others still run."""
    try:
        return run()
    except Exception as error:
        logger.exception("%s %s failed", name, dtype)
        return Runs(name, dtype, error=f"{type(error).__name__}: {error}".splitlines()[0])


def run_all(args: argparse.Namespace) -> None:
    folder = resolve_model_folder(args.model)
    logger.info("model folder: %s", folder)
    vocab_size = transformers.AutoConfig.from_pretrained(folder).vocab_size
    workload = make_workload(args.num_requests, args.seed, args.prompt_len, args.new_tokens, vocab_size)
    logger.info("workload: %d requests, %d prompt tokens, %d output tokens", len(workload.prompts),
                workload.num_prompt_tokens, workload.num_output_tokens)
    all_runs = []
    for dtype in args.dtypes:
        if not args.skip_zeroserve:
            all_runs.append(guarded("zeroserve", dtype, lambda: run_zeroserve(folder, workload, dtype, args)))
        if args.vllm_python:
            all_runs.append(guarded("vLLM-CPU", dtype, lambda: run_vllm(args.vllm_python, folder, workload, dtype,
                                                                         args)))  # fmt: skip
    if not args.skip_hf_static:
        all_runs.append(guarded("transformers static batch", "float32", lambda: run_transformers(folder, workload)))
    add_agreement_notes(all_runs)
    rates = {SHORT_DTYPES[dtype]: matmul_rate(getattr(torch, dtype)) for dtype in args.dtypes}
    print_results(all_runs, bound_lines(workload_flops(folder, workload), workload, rates))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="passed to worker.model_loader (default: embedded SmolLM2)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per system and dtype")
    parser.add_argument("--vllm-python", default=None, help="the python of a venv with vLLM's CPU build")
    parser.add_argument("--skip-zeroserve", action="store_true")
    parser.add_argument("--skip-hf-static", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also print where zeroserve's steps spend their time (core.profile's parts)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=BATCHED_TOKENS,
                        help="tokens a step may schedule, both systems (default: the workload's prompts in one step)")
    parser.add_argument("--engine-arg", action="append", default=[],
                        help="extra `serve` option, repeatable: --engine-arg=--block-size=32")
    parser.add_argument("--engine-start-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--zeroserve-timeout", type=float, default=600.0, help="seconds per repetition")
    parser.add_argument("--vllm-timeout", type=float, default=1800.0, help="seconds for vLLM's start and runs")
    return parser


def validate(args: argparse.Namespace) -> None:
    if args.num_requests < 1 or args.repeats < 1 or args.max_num_batched_tokens < 1:
        raise ValueError("--num-requests, --repeats and --max-num-batched-tokens must be at least 1")
    for name, (low, high) in (("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} needs 1 <= MIN <= MAX, got {low} {high}")
    if args.vllm_python and not os.access(args.vllm_python, os.X_OK):
        raise ValueError(f"--vllm-python {args.vllm_python} is not an executable")


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

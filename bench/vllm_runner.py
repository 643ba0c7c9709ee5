"""vLLM's offline engine on a workload, timed per token: run by `bench/throughput.py` with vLLM's
own python (its venv from `shared/peers/vllm_cpu_setup.sh`), never imported by zeroserve.

    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 HF_HUB_OFFLINE=1 \\
        /tmp/vllm-venv/bin/python bench/vllm_runner.py job.json result.json

The job holds `{model, dtype, repeats, prompts, max_new_tokens, warmup_prompt, warmup_tokens}`.
Each repetition is `LLM.generate`'s own loop (add every request, then `step()` until none is
unfinished) with each output's arrival time kept, so TTFT and ITL mean what they mean for
zeroserve. The result holds the start-up seconds and, per repetition, the elapsed seconds and
each request's `{ttft_s, itls_s, token_ids}`. Only the standard library and vLLM are used.
"""

import json
import logging
import sys
import time

logger = logging.getLogger("vllm_runner")


def timed_generate(llm, prompts: list[list[int]], max_new_tokens: list[int], sampling_cls) -> dict:
    engine = llm.llm_engine
    submitted = time.perf_counter()
    arrivals: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for index, (prompt, num_tokens) in enumerate(zip(prompts, max_new_tokens)):
        params = sampling_cls(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(str(index), {"prompt_token_ids": prompt}, params)
        arrivals[str(index)], tokens[str(index)] = [], []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            ids = list(output.outputs[0].token_ids)  # cumulative
            new = len(ids) - len(tokens[output.request_id])
            arrivals[output.request_id] += [now] * new
            tokens[output.request_id] = ids
    elapsed = time.perf_counter() - submitted
    requests = []
    for index in range(len(prompts)):
        times = arrivals[str(index)]
        gaps = [b - a for a, b in zip(times, times[1:])]
        requests.append({"ttft_s": times[0] - submitted, "itls_s": gaps, "token_ids": tokens[str(index)]})
    return {"elapsed_s": elapsed, "requests": requests}


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s vllm_runner: %(message)s")
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path) as file:
        job = json.load(file)
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job["dtype"], seed=0, max_num_batched_tokens=job["max_num_batched_tokens"])
    timed_generate(llm, [job["warmup_prompt"]], [job["warmup_tokens"]], SamplingParams)
    start_s = time.perf_counter() - started
    logger.info("vLLM %s ready in %.1f s", job["dtype"], start_s)
    repetitions = []
    for repetition in range(job["repeats"]):
        llm.reset_prefix_cache()  # every repetition computes its prompts, as the first did
        repetitions.append(timed_generate(llm, job["prompts"], job["max_new_tokens"], SamplingParams))
        logger.info("repetition %d: %.2f s", repetition + 1, repetitions[-1]["elapsed_s"])
    with open(result_path, "w") as file:
        json.dump({"start_s": start_s, "repetitions": repetitions, "version": _version()}, file)


def _version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    main()

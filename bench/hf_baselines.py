"""transformers serving the same workload as zeroserve: a static batch and continuous batching.

* `generate` on one static, left-padded batch run to the longest request; the steps past a
  request's own length are waste and do not count as output;
* continuous batching (`continuous_batching_context_manager`, per-request limits).

The static batch's first step ends the prefill of all requests at once, so its TTFT is the same
for every request.
"""

import logging
import time

import torch
import transformers
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
from transformers.generation.continuous_batching.requests import GenerationOutput
from transformers.generation.continuous_batching.utils import WorkloadHints

from bench.common import (
    WARMUP_PROMPT,
    WARMUP_TOKENS,
    RequestTiming,
    SystemResult,
    Workload,
    check_lengths,
    timing_from_arrivals,
)

logger = logging.getLogger("bench")


def load_hf_model(folder: str) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # generate() fills unset fields from the model's own config: without this its EOS would still stop rows.
    model.generation_config.eos_token_id = None
    return model.eval()


# ---- static batch ---------------------------------------------------------------------------


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


# ---- continuous batching --------------------------------------------------------------------


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

"""transformers serving the same workload as zeroserve: `generate` on one static, left-padded
batch run to the longest request; the steps past a request's own length are waste and do not
count as output.

The static batch's first step ends the prefill of all requests at once, so its TTFT is the same
for every request.
"""

import logging
import time

import torch
import transformers
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from bench.common import (
    WARMUP_PROMPT,
    WARMUP_TOKENS,
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

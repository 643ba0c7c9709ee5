"""Runs one `StepPlan`: update the rows, build the packed batch, forward, sample, answer.

    plan -> BatchState.apply -> BatchState.build -> forward -> sample -> StepResult

The forward is `worker.llama`'s native one where it supports the model, else transformers'
`model(..., attn_meta=meta)`; both reach the same paged attention (`worker.attention`).

Only the driver rank (rank 0) samples and builds a result; every rank runs the forward.
"""

import logging

import torch

from protocol.step import PromptLogprobs, StepPlan, StepResult
from worker.attention import AttentionMetadata, build_metadata
from worker.batch import BatchState, StepInputs
from worker.interrupts import InterruptWatcher, StepInterrupted
from worker.kv_cache import KVCache
from worker.llama import NativeLlama, native_model
from worker.profile import StepTimer
from worker.sampler import SampleRow, compute_logprobs, logprobs_of, sample

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        device: torch.device,
        is_driver: bool = True,
        native: bool = True,
        interrupts: InterruptWatcher | None = None,
    ) -> None:
        """`native`: run `worker.llama`'s forward where it supports the model (one rank only);
        only that forward stops for `interrupts` (transformers' runs every step to its end)."""
        self.model = model
        self.interrupts = interrupts
        self.native: NativeLlama | None = native_model(model) if native else None
        self.kv_cache = kv_cache
        self.is_driver = is_driver
        self.device = device
        self.batch = BatchState(kv_cache.block_size, device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        timer = StepTimer(plan.profile, self.device)
        with timer.part("worker"):
            result = self._execute(plan, timer)
        result.seconds = timer.seconds
        return result

    def _execute(self, plan: StepPlan, timer: StepTimer) -> StepResult:
        with timer.part("prepare"):
            self.batch.apply(plan)
            if not plan.scheduled:
                return StepResult(step_id=plan.step_id)
            inputs = self.batch.build(plan.scheduled)
            meta = build_metadata(
                self.kv_cache,
                inputs.slot_mapping,
                inputs.query_starts,
                inputs.query_lens,
                inputs.context_lens,
                inputs.block_tables,
            )
        try:
            with timer.part("forward"):
                logits = self._forward(inputs, meta, plan.step_id, timer)
        except StepInterrupted:
            # Nothing advances: the core schedules the same tokens again, and they are recomputed.
            return StepResult(step_id=plan.step_id, interrupted=True)
        self.batch.advance(plan.scheduled)
        if not self.is_driver or not (inputs.sample_ids or inputs.prompt_rows):
            return StepResult(step_id=plan.step_id)
        with timer.part("sample"):
            num_samples = len(inputs.sample_ids)
            result = self._sample(plan.step_id, inputs, logits[:num_samples])
            result.prompt_logprobs = self._prompt_logprobs(inputs, logits[num_samples:])
        return result

    def _forward(self, inputs: StepInputs, meta: AttentionMetadata, step_id: int, timer: StepTimer) -> torch.Tensor:
        """Logits `[S + P, V]` of the sampling positions, then of the prompt-logprob rows."""
        if self.native is not None:
            interrupts = self.interrupts
            stop = (lambda: interrupts.requested(step_id)) if interrupts is not None else None
            return self.native.forward(inputs.input_ids, inputs.positions, meta, inputs.logit_indices, stop, timer)
        output = self.model(
            input_ids=inputs.input_ids[None],
            position_ids=inputs.positions[None],
            attn_meta=meta,
            use_cache=False,
            logits_to_keep=inputs.logit_indices,
        )
        return output.logits[0]

    def _prompt_logprobs(self, inputs: StepInputs, logits: torch.Tensor) -> dict[str, PromptLogprobs]:
        found, offset = {}, 0
        for rows in inputs.prompt_rows:
            targets = torch.tensor(rows.targets, dtype=torch.long, device=logits.device)
            part = logits[offset : offset + rows.count]
            found[rows.request_id] = PromptLogprobs(rows.start, logprobs_of(part, targets, rows.num_top))
            offset += rows.count
        return found

    def _sample(self, step_id: int, inputs: StepInputs, logits: torch.Tensor) -> StepResult:
        if not inputs.sample_ids:
            return StepResult(step_id=step_id)
        states = inputs.sample_states
        rows = [
            SampleRow(st.sampling, st.generator, st.token_ids, st.num_prompt_tokens, st.stop_token_ids) for st in states
        ]
        token_ids = sample(logits, rows)
        logprobs = compute_logprobs(logits, token_ids, [st.sampling.logprobs for st in states])
        return StepResult(
            step_id=step_id,
            sampled_request_ids=inputs.sample_ids,
            sampled_token_ids=token_ids.tolist(),
            logprobs={inputs.sample_ids[row]: lp for row, lp in logprobs.items()},
        )

"""Greedy reference outputs from transformers itself, and the tie rule for comparing with them."""

from pathlib import Path

import torch
import transformers

TIE_TOLERANCE = 1e-3


def load_reference(folder: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # EOS must not stop the reference: the engine runs with ignore_eos, and generate() would
    # otherwise take the model's own EOS ids from generation_config.json.
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.inference_mode()
def greedy_tokens(
    model: transformers.PreTrainedModel, prompt: list[int], num_tokens: int, repetition_penalty: float = 1.0
) -> list[int]:
    """`generate(do_sample=False)` for exactly `num_tokens` tokens (EOS does not stop it)."""
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=num_tokens, min_new_tokens=0, eos_token_id=None, pad_token_id=0,
        repetition_penalty=repetition_penalty,
    )
    output = model.generate(torch.tensor([prompt]), generation_config=config)
    return output[0, len(prompt) :].tolist()


@torch.inference_mode()
def is_tie(model: transformers.PreTrainedModel, context: list[int]) -> bool:
    """True when transformers' top-2 next-token logprobs after `context` are within TIE_TOLERANCE."""
    logits = model(torch.tensor([context])).logits[0, -1]
    top = torch.log_softmax(logits.float(), -1).topk(2).values
    return float(top[0] - top[1]) < TIE_TOLERANCE


def assert_matches_greedy(
    model: transformers.PreTrainedModel, prompt: list[int], ours: list[int], reference: list[int]
) -> None:
    """Equal token for token, or the first difference is a rounding tie in transformers."""
    assert len(ours) == len(reference), f"{len(ours)} tokens, expected {len(reference)}"
    for position, (mine, theirs) in enumerate(zip(ours, reference)):
        if mine != theirs:
            context = prompt + reference[:position]
            assert is_tie(model, context), (
                f"token {position} differs ({mine} vs transformers' {theirs}) and is no tie"
            )
            return


@torch.inference_mode()
def greedy_logprobs(model: transformers.PreTrainedModel, prompt: list[int], tokens: list[int]) -> list[float]:
    """log_softmax of transformers' logits at each of `tokens`, given the prompt and the tokens before."""
    ids = torch.tensor([prompt + tokens])
    logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return logprobs[positions, torch.tensor(tokens)].tolist()

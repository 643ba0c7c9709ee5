"""The frontend's tokenizer: prompts and chat messages to token ids, and the EOS ids of the model."""

import json
import logging
import os
from dataclasses import dataclass

import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenizer:
    """An HF tokenizer plus what the frontend needs to know about it."""

    hf: PreTrainedTokenizerBase
    eos_token_ids: list[int]
    vocab_size: int

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The Rust tokenizer that `DecodeStream` steps with."""
        return self.hf.backend_tokenizer

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a text prompt, with the tokenizer's default special tokens."""
        return list(self.hf.encode(text))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of chat messages through the model's chat template, ready for the reply.

        Raises ValueError when the model has no chat template or the messages do not fit it.
        """
        try:
            encoded = self.hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except Exception as error:  # jinja errors, missing template: all the user's to fix
            raise ValueError(f"chat template failed: {error}") from error
        # transformers 5 returns a BatchEncoding; older versions a plain list.
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer of the HF folder `path`."""
    hf = AutoTokenizer.from_pretrained(path)
    eos = _eos_token_ids(hf, path)
    vocab_size = max(len(hf), hf.vocab_size)
    logger.info("tokenizer from %s: %d tokens, eos ids %s", path, vocab_size, eos)
    return Tokenizer(hf=hf, eos_token_ids=eos, vocab_size=vocab_size)


def _eos_token_ids(hf: PreTrainedTokenizerBase, path: str) -> list[int]:
    """The tokenizer's EOS id plus those of `generation_config.json`, in that order, no repeats."""
    ids: list[int] = [hf.eos_token_id] if hf.eos_token_id is not None else []
    config_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            value = json.load(f).get("eos_token_id")
        extra = value if isinstance(value, list) else [value] if value is not None else []
        for token_id in extra:
            if int(token_id) not in ids:
                ids.append(int(token_id))
    return ids

"""Logprobs as each dialect shows them: OpenAI completions' (echo too) and chat's, and vLLM's
`prompt_logprobs`; SGLang's `[logprob, id, text]` triples are built in `frontend.http.sglang`."""

from collections.abc import Callable
from typing import Any

from frontend.http.generation import Sample
from frontend.tokenizer import Tokenizer


class TokenTexts:
    """Each token's own text, as logprobs show it (cached: the same ids come again and again)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.hf.decode([token_id])
        return text


def token_names(texts: TokenTexts, as_ids: bool) -> Callable[[int], str]:
    """How logprobs name a token: its text, or `"token_id:N"` (`return_tokens_as_token_ids`)."""
    return (lambda t: f"token_id:{t}") if as_ids else texts


def text_offsets(token_ids: list[int], texts: TokenTexts, offset: int) -> list[int]:
    """Where each token's text starts, the first at `offset`."""
    offsets, position = [], offset
    for token_id in token_ids:
        offsets.append(position)
        position += len(texts(token_id))
    return offsets


def completion_logprobs(sample: Sample, start: int, texts: TokenTexts, as_ids: bool, offset: int) -> dict[str, Any]:
    """OpenAI completions' logprobs of tokens `start:` of a sample (text offsets from `offset`)."""
    name = token_names(texts, as_ids)
    token_ids = sample.token_ids[start : len(sample.token_logprobs)]
    tops = [
        {name(t): lp for t, lp in zip(ids, lps)}
        for ids, lps in zip(sample.top_ids[start:], sample.top_logprobs[start:])
    ]
    return {"tokens": [name(t) for t in token_ids], "token_logprobs": sample.token_logprobs[start:],
            "top_logprobs": tops, "text_offset": text_offsets(token_ids, texts, offset)}  # fmt: skip


def echoed_logprobs(sample: Sample, texts: TokenTexts, as_ids: bool, offset: int) -> dict[str, Any]:
    """Completions' logprobs with `echo`: the prompt's tokens first (the first has none, as in
    OpenAI's and vLLM's), then the sample's from `offset` in the text."""
    name = token_names(texts, as_ids)
    found = sample.prompt_logprobs
    generated = completion_logprobs(sample, 0, texts, as_ids, offset)
    if found is None:  # the request ended before its prompt was computed
        return generated
    tops = [{name(t): lp for t, lp in zip(ids, lps)} for ids, lps in zip(found.top_token_ids, found.top_logprobs)]
    return {"tokens": [name(t) for t in sample.prompt_ids] + generated["tokens"],
            "token_logprobs": [None, *found.token_logprobs] + generated["token_logprobs"],
            "top_logprobs": [None, *tops] + generated["top_logprobs"],
            "text_offset": text_offsets(sample.prompt_ids, texts, 0) + generated["text_offset"]}  # fmt: skip


def chat_logprobs(sample: Sample, start: int, texts: TokenTexts, as_ids: bool) -> dict[str, Any]:
    name = token_names(texts, as_ids)

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = name(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(texts(token_id).encode())}

    content = []
    for i in range(start, len(sample.token_logprobs)):
        item = entry(sample.token_ids[i], sample.token_logprobs[i])
        item["top_logprobs"] = [entry(t, lp) for t, lp in zip(sample.top_ids[i], sample.top_logprobs[i])]
        content.append(item)
    return {"content": content}


def vllm_prompt_logprobs(sample: Sample, texts: TokenTexts) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token `{id: {logprob,
    rank, decoded_token}}` of the token itself and the top ones (rank None: not among them)."""
    found = sample.prompt_logprobs
    if found is None:
        return None
    entries: list[dict[str, Any] | None] = [None]
    for token_id, logprob, ids, values in zip(sample.prompt_ids[1:], found.token_logprobs, found.top_token_ids,
                                              found.top_logprobs):  # fmt: skip
        entry = {str(t): {"logprob": v, "rank": rank, "decoded_token": texts(t)}
                 for rank, (t, v) in enumerate(zip(ids, values), start=1)}  # fmt: skip
        entry.setdefault(str(token_id), {"logprob": logprob, "rank": None, "decoded_token": texts(token_id)})
        entries.append(entry)
    return entries

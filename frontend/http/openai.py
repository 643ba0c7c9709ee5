"""OpenAI's routes the way vLLM serves them: `/v1/completions`, `/v1/chat/completions` (streaming or
not), `/v1/models`, `/health`, `/version`, `/tokenize`, `/detokenize`; vLLM's extra sampling fields,
and ours: `weight_version` and `weight_versions` in every choice.

Prompts are tokenized here (the usage, `echo` and `return_token_ids` need the ids); the engine gets
token ids. Unknown fields and wrong types are 400s naming the field (pydantic, `extra="forbid"`).
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional, Union

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from frontend.http.app import ApiError, HttpContext, api_error, check_model, error_response
from frontend.http.sampling import VllmSampling, room
from frontend.http.generation import GenerationRequest, Sample, collect, samples_of, spans_json, stream_outputs
from frontend.http.logprobs import TokenTexts, chat_logprobs, completion_logprobs, echoed_logprobs, vllm_prompt_logprobs

Prompt = Union[str, list[str], list[int], list[list[int]]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(VllmSampling):
    """What completions and chat share: OpenAI's fields and vLLM's extras."""

    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    cache_salt: Optional[str] = None
    request_id: Optional[str] = None
    user: Optional[str] = None  # OpenAI's end-user tag: accepted, not used


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: the chat template's to use
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: list[int]


def prompt_ids(ctx: HttpContext, prompt: Prompt) -> list[list[int]]:
    """Completions' `prompt`: a text, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [ctx.tokenizer.encode_prompt(prompt)]
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [ctx.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompt]


def chat_ids(ctx: HttpContext, body: Union[ChatRequest, TokenizeRequest], kwargs: Optional[dict] = None) -> list[int]:
    """The chat template over the messages (text parts of list contents joined)."""
    messages = [_template_message(m) for m in body.messages or []]
    if body.continue_final_message and body.add_generation_prompt:
        raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                       param="continue_final_message")  # fmt: skip
    try:
        encoded = ctx.tokenizer.hf.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, tokenize=True,
            continue_final_message=body.continue_final_message, **(kwargs or {}),
        )  # fmt: skip
    except Exception as error:  # jinja errors, no template: the request's to fix
        raise ApiError(400, f"messages: the chat template failed: {error}", param="messages") from error
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def _template_message(message: ChatMessage) -> dict[str, Any]:
    data = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        texts = []
        for part in message.content:
            if part.get("type") != "text":
                raise ApiError(400, f"messages: content parts of type {part.get('type')!r} are not supported",
                               param="messages")  # fmt: skip
            texts.append(str(part.get("text", "")))
        data["content"] = "".join(texts)
    return data


def usage(samples: list[Sample]) -> dict[str, Any]:
    """Each prompt counted once, whatever its `n`."""
    prompt_tokens = sum(len(s.prompt_ids) for s in _first_of_each_prompt(samples))
    completion_tokens = sum(len(s.token_ids) for s in samples)
    cached = sum(s.cached_tokens for s in _first_of_each_prompt(samples))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _first_of_each_prompt(samples: list[Sample]) -> list[Sample]:
    seen, first = set(), []
    for sample in samples:
        key = id(sample.prompt_ids)
        if key not in seen:
            seen.add(key)
            first.append(sample)
    return first


def versions(sample: Sample) -> dict[str, Any]:
    return {"weight_version": sample.weight_version, "weight_versions": spans_json(sample.weight_versions)}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def make_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter()
    texts = TokenTexts(ctx.tokenizer)

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @router.get("/version")
    async def server_version() -> JSONResponse:
        try:
            number = version("zeroserve")
        except PackageNotFoundError:
            number = "unknown"
        return JSONResponse({"version": number})

    @router.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": ctx.model_name, "object": "model", "created": int(ctx.started), "owned_by": "zeroserve",
                "root": ctx.model_path, "parent": None, "max_model_len": ctx.max_model_len}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        check_model(ctx, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages", param="prompt")
        if body.prompt is not None:
            ids = list(ctx.tokenizer.hf.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        else:
            ids = chat_ids(ctx, body)
        return JSONResponse({"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids})

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        check_model(ctx, body.model)
        bad = [t for t in body.tokens if not 0 <= t < ctx.tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"tokens: token id {bad[0]} is out of the vocabulary", param="tokens")
        return JSONResponse({"prompt": ctx.tokenizer.hf.decode(body.tokens)})

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        check_model(ctx, body.model)
        prompts = prompt_ids(ctx, body.prompt)
        # echo with logprobs shows the prompt's logprobs too (lm-eval's log-likelihood).
        echoes_logprobs = body.echo and body.logprobs is not None
        prompt_logprobs = max(body.logprobs or 0, body.prompt_logprobs or 0) if echoes_logprobs else None
        request = GenerationRequest(
            body.request_id or f"cmpl-{uuid.uuid4().hex}", prompts,
            body.engine_kwargs(body.logprobs, room(ctx, prompts, body.max_tokens), prompt_logprobs), body.n,
            body.cache_salt,
        )  # fmt: skip
        if body.stream:
            return await streaming(_completion_events(ctx, body, request, texts))
        samples = await collect(ctx.client, request)
        return JSONResponse(_completion(ctx, body, request, samples, texts))

    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Response:
        check_model(ctx, body.model)
        prompt = chat_ids(ctx, body, body.chat_template_kwargs)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request = GenerationRequest(
            body.request_id or f"chatcmpl-{uuid.uuid4().hex}", [prompt],
            body.engine_kwargs(logprobs, room(ctx, [prompt], body.max_completion_tokens or body.max_tokens)),
            body.n, body.cache_salt,
        )  # fmt: skip
        if body.stream:
            return await streaming(_chat_events(ctx, body, request, texts))
        samples = await collect(ctx.client, request)
        return JSONResponse(_chat_completion(ctx, body, request, samples, texts))

    return router


def _completion(ctx: HttpContext, body: CompletionRequest, request: GenerationRequest, samples: list[Sample],
                texts: TokenTexts) -> dict[str, Any]:  # fmt: skip
    choices = []
    for sample in samples:
        prefix = ctx.tokenizer.hf.decode(sample.prompt_ids) if body.echo else ""
        choice = {"index": sample.index, "text": prefix + sample.text, "finish_reason": sample.finish_reason,
                  "stop_reason": None, **versions(sample)}  # fmt: skip
        choice["logprobs"] = _logprobs(body, sample, texts, 0, len(prefix))
        if body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(sample, texts)
        if body.return_token_ids:
            choice["token_ids"], choice["prompt_token_ids"] = sample.token_ids, sample.prompt_ids
        choices.append(choice)
    return {"id": request.request_id, "object": "text_completion", "created": int(time.time()),
            "model": ctx.model_name, "choices": choices, "usage": usage(samples)}  # fmt: skip


def _chat_completion(ctx: HttpContext, body: ChatRequest, request: GenerationRequest, samples: list[Sample],
                     texts: TokenTexts) -> dict[str, Any]:  # fmt: skip
    choices = []
    for sample in samples:
        logprobs = chat_logprobs(sample, 0, texts, body.return_tokens_as_token_ids) if body.logprobs else None
        choice = {"index": sample.index, "message": {"role": "assistant", "content": sample.text},
                  "finish_reason": sample.finish_reason, "stop_reason": None, **versions(sample), "logprobs": logprobs}
        if body.return_token_ids:
            choice["token_ids"] = sample.token_ids
        choices.append(choice)
    response = {"id": request.request_id, "object": "chat.completion", "created": int(time.time()),
                "model": ctx.model_name, "choices": choices, "usage": usage(samples)}  # fmt: skip
    if body.return_token_ids:
        response["prompt_token_ids"] = request.prompts[0]
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = vllm_prompt_logprobs(samples[0], texts)
    return response


async def streaming(events: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response of `events`, once the first is there: an error before it (a refused
    request) is a plain error response with its status; one after it goes as an error event."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield first
            async for event in events:
                yield event
        except Exception as error:  # noqa: BLE001 - the client reads it in the stream
            mapped = api_error(error)
            yield sse(json.loads(error_response(mapped.status, mapped.message, mapped.kind).body))
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _completion_events(ctx, body: CompletionRequest, request: GenerationRequest, texts: TokenTexts):
    samples, created = samples_of(request), int(time.time())
    head = {"id": request.request_id, "object": "text_completion", "created": created, "model": ctx.model_name}
    echo_lengths: dict[int, int] = {}  # each sample's echoed prompt text, which text offsets count
    async for index, out in stream_outputs(ctx.client, request):
        sample = samples[index]
        first = index not in echo_lengths
        echo = ctx.tokenizer.hf.decode(sample.prompt_ids) if body.echo and first else ""
        if first:
            echo_lengths[index] = len(echo)
        start, offset = len(sample.token_ids), echo_lengths[index] + len(sample.text)
        sample.add(out)
        choice = {"index": index, "text": echo + out.text, "finish_reason": out.finish_reason, "stop_reason": None}
        if body.logprobs is not None:
            choice["logprobs"] = _logprobs(body, sample, texts, start, offset, first)
        if body.prompt_logprobs is not None and out.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(sample, texts)
        yield sse({**head, "choices": [_streamed(choice, sample, out, body)]})
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage(samples)})


async def _chat_events(ctx, body: ChatRequest, request: GenerationRequest, texts: TokenTexts):
    samples, created = samples_of(request), int(time.time())
    head = {"id": request.request_id, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name}
    started: set[int] = set()
    async for index, out in stream_outputs(ctx.client, request):
        if index not in started:  # a choice's first chunk names the role
            started.add(index)
            yield sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})  # fmt: skip
        sample = samples[index]
        start = len(sample.token_ids)
        sample.add(out)
        choice: dict[str, Any] = {"index": index, "delta": {"content": out.text}, "finish_reason": out.finish_reason}
        choice["logprobs"] = (
            chat_logprobs(sample, start, texts, body.return_tokens_as_token_ids) if body.logprobs else None
        )
        yield sse({**head, "choices": [_streamed(choice, sample, out, body)]})
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage(samples)})


def _logprobs(body: CompletionRequest, sample: Sample, texts: TokenTexts, start: int, offset: int,
              first: bool = True) -> dict[str, Any] | None:  # fmt: skip
    """A completion choice's `logprobs` from token `start` on; with echo, the prompt's lead the
    `first` chunk."""
    if body.logprobs is None:
        return None
    if body.echo and first:
        return echoed_logprobs(sample, texts, body.return_tokens_as_token_ids, offset)
    return completion_logprobs(sample, start, texts, body.return_tokens_as_token_ids, offset)


def _streamed(choice: dict[str, Any], sample: Sample, out: Any, body: SamplingFields) -> dict[str, Any]:
    """A streamed choice's ids (when asked) and, on its last chunk, its weight versions."""
    if body.return_token_ids:
        choice["token_ids"] = out.token_ids
    if out.finished:
        choice.update(versions(sample))
    return choice

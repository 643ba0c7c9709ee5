"""vLLM's routes beyond OpenAI's: token-in/token-out generation (`/inference/v1/generate`, what
SkyRL's rollouts call) and the control routes (`/pause`, `/resume`, `/abort_requests`, ...).

Every control route answers JSON with a Content-Length (SkyRL reads `content_length` first) once
the state holds on the whole engine: the core owns it, whichever API server took the call.
"""

import uuid
from typing import Any, Literal, Optional

import msgspec
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from frontend.http.app import ApiError, HttpContext, check_model
from frontend.http.generation import GenerationRequest, collect, spans_json
from frontend.http.sampling import VllmSampling, room


class VllmSamplingParams(VllmSampling):
    """The keys of vLLM's `SamplingParams` that can arrive; one we cannot honour is refused by name."""

    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True  # the text is not returned on this route either way
    output_kind: Optional[int] = None  # one final answer either way (no streaming here)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_ids: list[int] = Field(min_length=1)
    sampling_params: VllmSamplingParams = VllmSamplingParams()
    model: Optional[str] = None
    cache_salt: Optional[str] = None
    request_id: Optional[str] = None
    stream: bool = False
    features: Optional[Any] = None
    priority: int = 0


class AbortRequests(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_ids: list[str] = []


class ResetPrefixCache(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reset_running_requests: bool = False
    reset_external: bool = False


def engine_sampling(params: VllmSamplingParams, max_tokens: int) -> dict[str, Any]:
    if params.prompt_logprobs is not None:
        param = "sampling_params.prompt_logprobs"
        raise ApiError(400, f"{param} is not supported yet", param=param)
    return params.engine_kwargs(params.logprobs, max_tokens)


def state_json(state: Any, **extra: Any) -> JSONResponse:
    return JSONResponse({**msgspec.to_builtins(state), **extra})


def make_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter()
    client = ctx.client

    @router.post("/inference/v1/generate")
    async def generate(body: GenerateRequest) -> JSONResponse:
        check_model(ctx, body.model)
        if body.stream:
            raise ApiError(400, "stream: this route answers once; stream with /v1/completions", param="stream")
        params = body.sampling_params
        request = GenerationRequest(
            body.request_id or f"gen-{uuid.uuid4().hex}", [list(body.token_ids)],
            engine_sampling(params, room(ctx, [body.token_ids], params.max_tokens)), params.n, body.cache_salt,
        )  # fmt: skip
        samples = await collect(client, request)
        choices = []
        for sample in samples:
            logprobs = None
            if params.logprobs is not None:
                content = [
                    {"token_id": t, "logprob": lp,
                     "top_logprobs": [{"token_id": i, "logprob": v} for i, v in zip(ids, lps)]}
                    for t, lp, ids, lps in zip(sample.token_ids, sample.token_logprobs, sample.top_ids,
                                               sample.top_logprobs)
                ]  # fmt: skip
                logprobs = {"content": content}
            choices.append({"index": sample.index, "finish_reason": sample.finish_reason, "stop_reason": None,
                            "token_ids": sample.token_ids, "logprobs": logprobs,
                            "weight_version": sample.weight_version,
                            "weight_versions": spans_json(sample.weight_versions)})  # fmt: skip
        prompt_tokens = len(body.token_ids)
        completion_tokens = sum(len(s.token_ids) for s in samples)
        return JSONResponse({
            "request_id": request.request_id, "choices": choices, "prompt_token_ids": list(body.token_ids),
            "prompt_logprobs": None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": samples[0].cached_tokens}},
        })  # fmt: skip

    @router.post("/pause")
    async def pause(mode: Literal["abort", "wait", "keep"] = "abort", clear_cache: bool = False) -> JSONResponse:
        state = await client.pause(mode=mode)
        if clear_cache:
            await client.reset_prefix_cache()
        return state_json(state, status="paused")

    @router.post("/resume")
    async def resume() -> JSONResponse:
        return state_json(await client.resume(), status="running")

    @router.get("/is_paused")
    async def is_paused() -> JSONResponse:
        return JSONResponse({"is_paused": await client.is_paused()})

    @router.post("/abort_requests")
    async def abort_requests(body: AbortRequests) -> JSONResponse:
        result = await (client.abort(body.request_ids) if body.request_ids else client.abort_all())
        return JSONResponse(msgspec.to_builtins(result))

    @router.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request, reset_running_requests: bool = False) -> JSONResponse:
        """The flag comes as a query parameter (vLLM) or a JSON body (SkyRL). Ours never touches
        running requests' blocks and never fails, so it changes nothing here."""
        if await request.body():
            try:
                ResetPrefixCache.model_validate_json(await request.body())
            except ValidationError as error:
                first = error.errors()[0]
                param = ".".join(str(p) for p in first.get("loc", ()))
                raise ApiError(400, f"{param}: {first.get('msg')}", param=param) from None
        return JSONResponse({"num_dropped_blocks": await client.reset_prefix_cache()})

    @router.post("/sleep")
    async def sleep(level: Literal[1, 2] = 1) -> JSONResponse:
        return state_json(await client.sleep(level))

    @router.post("/wake_up")
    async def wake_up(tags: Optional[list[Literal["weights", "kv_cache"]]] = Query(default=None)) -> JSONResponse:
        return state_json(await client.wake_up(tags))

    @router.get("/is_sleeping")
    async def is_sleeping() -> JSONResponse:
        return JSONResponse({"is_sleeping": await client.is_sleeping()})

    @router.get("/get_world_size")
    async def get_world_size() -> JSONResponse:
        return JSONResponse({"world_size": (await client.get_state()).num_workers})

    return router

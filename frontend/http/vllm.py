"""vLLM's routes beyond OpenAI's: token-in/token-out generation (`/inference/v1/generate`, what
SkyRL's rollouts call), the control routes (`/pause`, `/resume`, `/abort_requests`, ...) and the
weight transfer (`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update`, `/weight_info`) over a vLLM-style weight group (worker/weight_group.py).

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
from frontend.http.logprobs import TokenTexts, vllm_prompt_logprobs
from frontend.http.sampling import VllmSampling, room
from protocol.messages import EngineState
from protocol.weights import VLLM_BUCKET_BYTES, VLLM_GROUP_NAME


class VllmSamplingParams(VllmSampling):
    """The keys of vLLM's `SamplingParams` that can arrive; one we cannot honour is refused by name."""

    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
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


class InitInfo(BaseModel):
    """vLLM's `init_info` for a torch.distributed weight transfer; `packed*` are the updates'
    defaults (vLLM 0.33 takes them here, SkyRL in each `update_info`)."""

    model_config = ConfigDict(extra="forbid")
    master_address: str
    master_port: int = Field(gt=0, lt=65536)
    rank_offset: int
    world_size: int
    packed: bool = False
    packed_buffer_size_bytes: int = Field(default=VLLM_BUCKET_BYTES, ge=1)
    packed_num_buffers: int = Field(default=2, ge=1)  # CUDA streams in vLLM: the layout is the same
    backend: Optional[str] = None


class InitWeightTransfer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init_info: InitInfo


class StartWeightUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    is_checkpoint_format: bool = True  # ours loads HF names either way


class UpdateInfo(BaseModel):
    """Empty lists send the last update's tensors again; `packed*` None: the group's."""

    model_config = ConfigDict(extra="forbid")
    names: list[str] = []
    dtype_names: list[str] = []
    shapes: list[list[int]] = []
    packed: Optional[bool] = None
    packed_buffer_size_bytes: Optional[int] = Field(default=None, ge=1)
    packed_num_buffers: Optional[int] = Field(default=None, ge=1)
    is_checkpoint_format: bool = True


class UpdateWeights(BaseModel):
    """A list holds one `update_info` per worker rank (vLLM's form for per-rank handles); a group
    broadcast sends every rank the same tensors, so they must agree."""

    model_config = ConfigDict(extra="forbid")
    update_info: UpdateInfo | list[UpdateInfo]

    def one_info(self) -> UpdateInfo:
        if not isinstance(self.update_info, list):
            return self.update_info
        if not self.update_info or any(info != self.update_info[0] for info in self.update_info):
            raise ApiError(400, "update_info: a list must hold one equal entry per worker rank", param="update_info")
        return self.update_info[0]


class FinishWeightUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight_version: Optional[str] = None


def state_json(state: Any, **extra: Any) -> JSONResponse:
    return JSONResponse({**msgspec.to_builtins(state), **extra})


async def optional_body(request: Request, model: type[BaseModel]) -> Any:
    """The route's JSON body, or the model's defaults when none came (older vLLM clients send
    none); a bad one is a 400 naming the field."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw) if raw.strip() else model()
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(400, f"{param}: {first.get('msg')}", param=param) from None


def make_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter()
    client = ctx.client
    texts = TokenTexts(ctx.tokenizer)

    async def transfer_engine_ready() -> EngineState:
        """The engine's state, once the weight-transfer group is there (400 otherwise)."""
        state = await client.get_state()
        if VLLM_GROUP_NAME not in state.weight_groups:
            raise ApiError(400, "no weight transfer engine: call /init_weight_transfer_engine first")
        return state

    @router.post("/inference/v1/generate")
    async def generate(body: GenerateRequest) -> JSONResponse:
        check_model(ctx, body.model)
        if body.stream:
            raise ApiError(400, "stream: this route answers once; stream with /v1/completions", param="stream")
        params = body.sampling_params
        request = GenerationRequest(
            body.request_id or f"gen-{uuid.uuid4().hex}", [list(body.token_ids)],
            params.engine_kwargs(params.logprobs, room(ctx, [body.token_ids], params.max_tokens)), params.n,
            body.cache_salt,
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
            "prompt_logprobs": vllm_prompt_logprobs(samples[0], texts),
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
        await optional_body(request, ResetPrefixCache)
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

    @router.post("/start_profile")
    async def start_profile() -> JSONResponse:
        """vLLM's and SGLang's route (their options are ignored): ours times the steps' parts,
        which `/stop_profile` answers; there is no torch trace."""
        await client.start_profile()
        return JSONResponse({})

    @router.post("/stop_profile")
    async def stop_profile() -> JSONResponse:
        return JSONResponse(msgspec.to_builtins(await client.stop_profile()))

    @router.get("/get_world_size")
    async def get_world_size() -> JSONResponse:
        return JSONResponse({"world_size": (await client.get_state()).num_workers})

    @router.post("/init_weight_transfer_engine")
    async def init_weight_transfer_engine(body: InitWeightTransfer) -> JSONResponse:
        """Answers once every worker rank joined the trainer's group (the trainer joins meanwhile).
        A second call replaces the group, as vLLM's does."""
        info = body.init_info
        if VLLM_GROUP_NAME in (await client.get_state()).weight_groups:
            await client.destroy_weight_group(VLLM_GROUP_NAME)
        await client.init_weight_group(
            info.master_address, info.master_port, info.rank_offset, info.world_size, VLLM_GROUP_NAME, info.backend,
            style="vllm", packed=info.packed, bucket_bytes=info.packed_buffer_size_bytes,
        )  # fmt: skip
        return JSONResponse({"message": "Weight transfer initialized"})

    @router.post("/shutdown_weight_transfer_engine")
    async def shutdown_weight_transfer_engine() -> JSONResponse:
        await transfer_engine_ready()
        await client.destroy_weight_group(VLLM_GROUP_NAME)
        return JSONResponse({"message": "Weight transfer shut down"})

    @router.post("/start_weight_update")
    async def start_weight_update(request: Request) -> JSONResponse:
        await optional_body(request, StartWeightUpdate)
        await transfer_engine_ready()
        return JSONResponse({"message": "Weight update started"})

    @router.post("/update_weights")
    async def update_weights(body: UpdateWeights) -> JSONResponse:
        """Answers once the broadcast landed and every rank committed it. On a running engine the
        update is atomic: pause(keep), load, resume."""
        info = body.one_info()
        running = (await transfer_engine_ready()).state == "running"
        await client.update_weights(
            group=VLLM_GROUP_NAME, names=info.names, dtypes=info.dtype_names, shapes=info.shapes,
            packed=info.packed, bucket_bytes=info.packed_buffer_size_bytes, atomic=running,
        )  # fmt: skip
        return JSONResponse({"message": "Weights updated"})

    @router.post("/finish_weight_update")
    async def finish_weight_update(request: Request) -> JSONResponse:
        """Each /update_weights already committed (with the next version); this sets the version
        given."""
        body = await optional_body(request, FinishWeightUpdate)
        if body.weight_version is not None:
            await client.set_weight_version(body.weight_version)
        return JSONResponse({"message": "Weight update finished", "weight_version": await client.get_weight_version()})

    @router.get("/weight_info")
    async def weight_info() -> JSONResponse:
        return JSONResponse({"weight_version": await client.get_weight_version()})

    return router

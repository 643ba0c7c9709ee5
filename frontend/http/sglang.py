"""SGLang's routes, as slime and AReaL call them: `/generate`, the pause and cache routes, the weight
routes (a trainer's group, a path, a version label), memory release, and the info routes.

Where SGLang and we differ, ours are the safer semantics: `/flush_cache` never refuses because
requests run (the prefix cache is keyed by weights), `/update_weight_version` aborts nothing
unless asked, and requests that arrive while paused are always held (slime retries an error 60
times, 1 s apart: a 503 during a long pause would end its run). Like SGLang, `/generate` ignores
top-level keys it does not know and refuses unknown `sampling_params` keys.
"""

import asyncio
import uuid
from typing import Any, Literal, Optional, Union

import msgspec
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from frontend.client import UtilityError
from frontend.http.app import ApiError, HttpContext
from frontend.http.generation import GenerationRequest, Sample, collect, samples_of, spans_json, stream_outputs
from frontend.http.logprobs import TokenTexts
from frontend.http.openai import sse, streaming
from frontend.http.sampling import room
from protocol.weights import DEFAULT_GROUP_NAME, tensor_specs

SGLANG_TOP_K_OFF = 1 << 30  # SGLang's default top_k, "no limit"
HEALTH_TIMEOUT_S = 20.0


class SglSamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: Optional[int] = Field(default=128, ge=1)
    min_new_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = SGLANG_TOP_K_OFF
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # no effect with fast tokenizers
    no_stop_trim: bool = False
    n: int = Field(default=1, ge=1, le=64)
    sampling_seed: Optional[int] = None


class SglGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[int], list[list[int]]]] = None
    sampling_params: SglSamplingParams = SglSamplingParams()
    rid: Optional[Union[str, list[str]]] = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(default=0, ge=0, le=20)
    logprob_start_len: int = -1
    return_text_in_logprobs: bool = False
    cache_salt: Optional[str] = None


class PauseGeneration(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mode: Literal["abort", "in_place", "retract"] = "abort"


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    rid: str = ""
    abort_all: bool = False


class InitGroup(BaseModel):
    model_config = ConfigDict(extra="ignore")
    master_address: str
    master_port: Union[int, str]
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP_NAME
    backend: str = "nccl"


class GroupName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    group_name: str = DEFAULT_GROUP_NAME


class FromDistributed(BaseModel):
    model_config = ConfigDict(extra="ignore")
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = DEFAULT_GROUP_NAME
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    load_format: Optional[Literal["flattened_bucket"]] = None


class FromDisk(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model_path: str
    load_format: Optional[str] = None
    weight_version: Optional[str] = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class WeightVersion(BaseModel):
    model_config = ConfigDict(extra="ignore")
    new_version: str
    abort_all_requests: bool = False


class MemoryTags(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tags: Optional[list[Literal["weights", "kv_cache"]]] = None


def engine_sampling(
    params: SglSamplingParams, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int]
) -> dict[str, Any]:
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    return dict(
        max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=-1 if params.top_k >= SGLANG_TOP_K_OFF else params.top_k, min_p=params.min_p,
        seed=params.sampling_seed, stop=stop, stop_token_ids=list(params.stop_token_ids or []),
        ignore_eos=params.ignore_eos, logprobs=logprobs, min_tokens=params.min_new_tokens,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.no_stop_trim, prompt_logprobs=prompt_logprobs,
    )  # fmt: skip


def finish_reason(sample: Sample) -> Optional[dict[str, Any]]:
    match sample.finish_reason:
        case None:
            return None
        case "length":
            return {"type": "length", "length": len(sample.token_ids)}
        case "stop":
            return {"type": "stop", "matched": sample.token_ids[-1] if sample.token_ids else None}
        case "abort":
            return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    return {"type": "abort", "message": sample.finish_reason, "status_code": 500, "err_type": "error"}


def result(sample: Sample, rid: str, texts: Optional[TokenTexts], body: SglGenerateRequest) -> dict[str, Any]:
    meta = {
        "id": rid, "finish_reason": finish_reason(sample), "prompt_tokens": len(sample.prompt_ids),
        "completion_tokens": len(sample.token_ids), "cached_tokens": sample.cached_tokens,
        "weight_version": sample.weight_version, "weight_versions": spans_json(sample.weight_versions),
    }  # fmt: skip
    if body.return_logprob:
        name = texts if body.return_text_in_logprobs and texts is not None else (lambda _: None)
        meta["output_token_logprobs"] = [[lp, t, name(t)] for lp, t in zip(sample.token_logprobs, sample.token_ids)]
        if body.top_logprobs_num:
            meta["output_top_logprobs"] = [
                [[lp, t, name(t)] for t, lp in zip(ids, lps)] for ids, lps in zip(sample.top_ids, sample.top_logprobs)
            ]
        if sample.prompt_logprobs is not None:
            meta.update(input_logprobs(sample, body, name))
    return {"text": sample.text, "output_ids": sample.token_ids, "meta_info": meta}


def input_logprobs(sample: Sample, body: SglGenerateRequest, name: Any) -> dict[str, Any]:
    """SGLang's `input_token_logprobs` (and `input_top_logprobs`) of the prompt from
    `logprob_start_len` on; the first prompt token's logprob is None."""
    found = sample.prompt_logprobs
    assert found is not None
    start = body.logprob_start_len
    logprobs = [None, *found.token_logprobs][start:]
    tokens = sample.prompt_ids[start:]
    meta: dict[str, Any] = {"input_token_logprobs": [[lp, t, name(t)] for lp, t in zip(logprobs, tokens)]}
    if body.top_logprobs_num:
        tops = [None, *([[lp, t, name(t)] for t, lp in zip(ids, lps)]
                        for ids, lps in zip(found.top_token_ids, found.top_logprobs))]  # fmt: skip
        meta["input_top_logprobs"] = tops[start:]
    return meta


def make_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter()
    client = ctx.client
    texts = TokenTexts(ctx.tokenizer)

    def requests(body: SglGenerateRequest) -> tuple[list[GenerationRequest], bool]:
        """One engine request per prompt (each its own rid, as SGLang aborts them), and whether
        the body was a batch (then the answer is a list)."""
        if (body.text is None) == (body.input_ids is None):
            raise ApiError(400, "give exactly one of text or input_ids", param="text")
        if body.logprob_start_len < -1:
            raise ApiError(400, "logprob_start_len: -1 (output logprobs only) or a prompt position",
                           param="logprob_start_len")  # fmt: skip
        batch = isinstance(body.text, list) or (bool(body.input_ids) and isinstance(body.input_ids[0], list))
        if body.text is not None:
            prompts = [ctx.tokenizer.encode_prompt(t) for t in (body.text if batch else [body.text])]
        else:
            prompts = [list(p) for p in (body.input_ids if batch else [body.input_ids])]
        if not prompts or not all(prompts):
            raise ApiError(400, "the prompt is empty", param="text")
        rid = body.rid or uuid.uuid4().hex
        rids = rid if isinstance(rid, list) else [f"{rid}-{i}" for i in range(len(prompts))] if batch else [rid]
        if len(rids) != len(prompts):
            raise ApiError(400, f"rid: {len(rids)} ids for {len(prompts)} prompts", param="rid")
        params = body.sampling_params
        logprobs = body.top_logprobs_num if body.return_logprob else None
        prompt_logprobs = logprobs if body.logprob_start_len >= 0 else None

        def one(rid: str, prompt: list[int]) -> GenerationRequest:
            sampling = engine_sampling(params, room(ctx, [prompt], params.max_new_tokens), logprobs, prompt_logprobs)
            return GenerationRequest(rid, [prompt], sampling, params.n, body.cache_salt, hold_while_paused=True)

        return [one(r, p) for r, p in zip(rids, prompts)], batch

    @router.post("/generate")
    async def generate(body: SglGenerateRequest) -> Response:
        generations, batch = requests(body)
        if body.stream:
            if batch:
                raise ApiError(400, "stream: a batch is answered once", param="stream")
            return await streaming(_generate_events(ctx, generations[0], texts, body))
        groups = await asyncio.gather(*(collect(client, g) for g in generations))
        answers = [result(s, g.request_id, texts, body) for g, samples in zip(generations, groups) for s in samples]
        return JSONResponse(answers if batch or body.sampling_params.n > 1 else answers[0])

    @router.post("/pause_generation")
    async def pause_generation(body: PauseGeneration) -> JSONResponse:
        match body.mode:
            case "abort":
                await client.pause(mode="abort")
            case "in_place":
                await client.pause(mode="keep")
            case "retract":
                await client.pause(mode="keep", retract=True)
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    @router.post("/continue_generation")
    async def continue_generation() -> JSONResponse:
        await client.resume()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @router.post("/abort_request")
    async def abort_request(body: AbortRequest) -> JSONResponse:
        outcome = await (client.abort_all() if body.abort_all else client.abort([body.rid]))
        return JSONResponse(msgspec.to_builtins(outcome))

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> PlainTextResponse:
        dropped = await client.reset_prefix_cache()
        return PlainTextResponse(f"Cache flushed ({dropped} cached blocks dropped; blocks in use stay).\n")

    @router.post("/init_weights_update_group")
    async def init_weights_update_group(body: InitGroup) -> JSONResponse:
        return await _outcome(client.init_weight_group(
            body.master_address, int(body.master_port), body.rank_offset, body.world_size, body.group_name,
            body.backend,
        ), "Succeeded to initialize custom process group.")  # fmt: skip

    @router.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(body: GroupName) -> JSONResponse:
        destroyed = client.destroy_weight_group(body.group_name)
        return await _outcome(destroyed, "Succeeded to destroy custom process group.")

    @router.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(body: FromDistributed) -> JSONResponse:
        packed = body.load_format == "flattened_bucket"
        try:  # flattened_bucket is one bucket of every tensor
            total = sum(s.nbytes for s in tensor_specs(body.names, body.dtypes, body.shapes))
        except ValueError as error:
            return _failure(str(error))
        return await _update(
            body.abort_all_requests, body.flush_cache,
            group=body.group_name, names=body.names, dtypes=body.dtypes, shapes=body.shapes,
            packed=packed, bucket_bytes=max(1, total), version=body.weight_version,
        )  # fmt: skip

    @router.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: FromDisk) -> JSONResponse:
        if body.load_format not in (None, "auto", "safetensors"):
            return _failure(f"load_format {body.load_format!r} is not supported (safetensors only)")
        return await _update(body.abort_all_requests, body.flush_cache, path=body.model_path,
                             version=body.weight_version)  # fmt: skip

    async def _update(abort_all: bool, flush_cache: bool, **update: Any) -> JSONResponse:
        """SGLang updates on an engine that runs too, waiting out the step in flight: here that is
        an atomic update (pause(keep), load, resume) when the engine is not paused."""
        if abort_all:
            await client.abort_all()
        running = (await client.get_state()).state == "running"
        try:
            outcome = await client.update_weights(atomic=running, **update)
        except UtilityError as error:
            return _failure(str(error))
        if flush_cache:
            await client.reset_prefix_cache()
        message = f"Succeeded to update weights. Weight version updated to {outcome.weight_version}."
        return JSONResponse({"success": True, "num_paused_requests": 0, "message": message})

    @router.post("/update_weight_version")
    async def update_weight_version(body: WeightVersion) -> JSONResponse:
        if body.abort_all_requests:
            await client.abort_all()
        version = await client.set_weight_version(body.new_version)
        message = f"Weight version updated to {version}."
        # vLLM's route of the same name reads `weight_version`.
        return JSONResponse({"success": True, "message": message, "new_version": version, "weight_version": version})

    @router.get("/get_weight_version")
    async def get_weight_version() -> JSONResponse:
        return JSONResponse({"weight_version": await client.get_weight_version()})

    @router.post("/release_memory_occupation")
    async def release_memory_occupation(body: MemoryTags = MemoryTags()) -> JSONResponse:
        tags = body.tags or ["weights", "kv_cache"]
        state = await client.get_state()
        if state.state != "paused":
            await client.pause(mode="keep")
        await client.sleep(level=2 if "weights" in tags else 1)
        return JSONResponse({"success": True, "message": "Memory released."})

    @router.post("/resume_memory_occupation")
    async def resume_memory_occupation(body: MemoryTags = MemoryTags()) -> JSONResponse:
        await client.wake_up(body.tags)
        return JSONResponse({"success": True, "message": "Memory resumed."})

    @router.get("/health_generate")
    async def health_generate() -> Response:
        """A one-token generation; while paused (it would wait) the engine answering is enough."""
        if (await client.get_state()).state != "running":
            return Response(status_code=200)
        probe = GenerationRequest(f"health-{uuid.uuid4().hex}", [[ctx.tokenizer.eos_token_ids[0]]],
                                  dict(max_tokens=1, temperature=0.0))  # fmt: skip
        await asyncio.wait_for(collect(client, probe), HEALTH_TIMEOUT_S)
        return Response(status_code=200)

    @router.get("/server_info")
    @router.get("/get_server_info")
    async def server_info() -> JSONResponse:
        state = await client.get_state()
        return JSONResponse({
            "model_path": ctx.model_path, "tokenizer_path": ctx.model_path, "served_model_name": ctx.model_name,
            "context_length": ctx.max_model_len, "tp_size": state.num_workers, "dp_size": 1,
            "weight_version": state.weight_version, "version": "zeroserve",
            "internal_states": [msgspec.to_builtins(state)],
        })  # fmt: skip

    @router.get("/get_model_info")
    @router.get("/model_info")
    async def model_info() -> JSONResponse:
        return JSONResponse({"model_path": ctx.model_path, "tokenizer_path": ctx.model_path, "is_generation": True,
                             "served_model_name": ctx.model_name,
                             "weight_version": await client.get_weight_version()})  # fmt: skip

    @router.get("/v1/loads")
    async def loads() -> JSONResponse:
        state = await client.get_state()
        running = state.num_running + state.num_frozen
        waiting = state.num_waiting + state.num_held
        return JSONResponse({"loads": [{"dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting,
                                        "num_reqs": running + waiting, "num_total_reqs": running + waiting}]})

    return router


async def _outcome(call: Any, message: str) -> JSONResponse:
    try:
        await call
    except UtilityError as error:
        return _failure(str(error))
    return JSONResponse({"success": True, "message": message})


def _failure(message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=400)


async def _generate_events(ctx: HttpContext, request: GenerationRequest, texts: TokenTexts, body: SglGenerateRequest):
    """SGLang streams the whole result so far in each event."""
    samples = samples_of(request)
    async for index, out in stream_outputs(ctx.client, request):
        samples[index].add(out)
        yield sse(result(samples[index], request.request_id, texts, body))


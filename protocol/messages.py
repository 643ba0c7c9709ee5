"""Messages between clients, frontends and the core.

Each socket has one tagged union and one typed decoder (see `codec.py`). Structs are
`array_like` (but `SamplingParams`, a map so that an unknown field is refused): a field is
only ever appended, with a default.

    client ──ClientMessage──▶ frontend ──CoreInput──▶ core
    client ◀─FrontendMessage── frontend ◀─CoreMessage── core
"""

from typing import Any, Literal, Optional

import msgspec

from protocol.weights import TensorPiece

FinishReason = Literal["stop", "length", "abort", "error"]


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request sampling. `temperature=0` is greedy; `top_k` 0 or -1 and `top_p=1` turn those off.

    `min_tokens`: stop tokens cannot be sampled, and stop strings do not count, before that many
    output tokens. Penalties as vLLM applies them: presence and frequency over the output tokens,
    repetition (divide a positive logit, multiply a negative one) over prompt and output tokens.
    `skip_special_tokens` and `include_stop_str_in_output` shape the text only."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


MAX_LOGPROBS = 20


def validate_sampling(params: SamplingParams) -> None:
    """Raise ValueError naming the first bad field. Prompt length is checked where it is known."""
    checks = [
        (params.max_tokens >= 1, f"max_tokens must be >= 1, got {params.max_tokens}"),
        (params.temperature >= 0.0, f"temperature must be >= 0, got {params.temperature}"),
        (0.0 < params.top_p <= 1.0, f"top_p must be in (0, 1], got {params.top_p}"),
        (params.top_k >= -1, f"top_k must be -1, 0 (off) or positive, got {params.top_k}"),
        (0.0 <= params.min_p <= 1.0, f"min_p must be in [0, 1], got {params.min_p}"),
        (all(s for s in params.stop), "stop strings must be non-empty"),
        (all(t >= 0 for t in params.stop_token_ids), "stop_token_ids must be >= 0"),
        (
            params.logprobs is None or 0 <= params.logprobs <= MAX_LOGPROBS,
            f"logprobs must be in [0, {MAX_LOGPROBS}], got {params.logprobs}",
        ),
        (
            params.prompt_logprobs is None or 0 <= params.prompt_logprobs <= MAX_LOGPROBS,
            f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {params.prompt_logprobs}",
        ),
        (
            0 <= params.min_tokens <= params.max_tokens,
            f"min_tokens must be in [0, max_tokens={params.max_tokens}], got {params.min_tokens}",
        ),
        (-2.0 <= params.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {params.presence_penalty}"),
        (
            -2.0 <= params.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {params.frequency_penalty}",
        ),
        (params.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {params.repetition_penalty}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class Logprobs(msgspec.Struct, array_like=True):
    """Logprobs of consecutive tokens: the sampled token's, then the top-k ids and logprobs."""

    token_logprobs: list[float]
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]

    def extend(self, other: "Logprobs") -> None:
        self.token_logprobs.extend(other.token_logprobs)
        self.top_token_ids.extend(other.top_token_ids)
        self.top_logprobs.extend(other.top_logprobs)


class WeightSpan(msgspec.Struct, array_like=True, frozen=True):
    """Output tokens `[start, end)` of a request were sampled with weight version `version`."""

    version: str
    start: int
    end: int


INITIAL_WEIGHT_VERSION = "0"


class RequestOutput(msgspec.Struct, array_like=True):
    """What a client receives: `text`, `token_ids` and `logprobs` are new since the previous output;
    `weight_versions` spans every output token so far."""

    request_id: str
    text: str = ""
    token_ids: list[int] = []
    logprobs: Optional[Logprobs] = None
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    cached_tokens: int = 0
    weight_version: str = INITIAL_WEIGHT_VERSION
    weight_versions: list[WeightSpan] = []
    prompt_logprobs: Optional[Logprobs] = None  # prompt tokens 1.. (the first has none); first output only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---- client -> frontend -------------------------------------------------------------------


class ChatMessage(msgspec.Struct, forbid_unknown_fields=False):
    role: str
    content: str


class GenerateRequest(msgspec.Struct, tag="generate", array_like=True):
    """Exactly one of `prompt`, `messages`, `token_ids`. `stream_id` is unique per client connection."""

    stream_id: int
    request_id: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    token_ids: Optional[list[int]] = None
    sampling: SamplingParams = SamplingParams()
    cache_salt: Optional[str] = None  # a namespace of the prefix cache: only equal salts share blocks
    hold_while_paused: bool = False  # held, not refused, while paused, whatever --paused-requests says


class CancelStream(msgspec.Struct, tag="cancel", array_like=True):
    stream_id: int


class ClientCall(msgspec.Struct, tag="call", array_like=True):
    """A utility call from a client; `args` is the msgpack encoding of the method's argument struct,
    `tensors` the pieces of a weight transfer (side frames)."""

    call_id: int
    method: str
    args: bytes = b""
    tensors: list[TensorPiece] = []


ClientMessage = GenerateRequest | CancelStream | ClientCall


# ---- frontend -> client -------------------------------------------------------------------


class StreamOutput(msgspec.Struct, array_like=True):
    stream_id: int
    output: RequestOutput


class StreamOutputs(msgspec.Struct, tag="outputs", array_like=True):
    items: list[StreamOutput]


class StreamError(msgspec.Struct, tag="stream_error", array_like=True):
    """The stream ends with an error before or instead of its outputs; `kind` names the error type."""

    stream_id: int
    kind: str
    message: str


class CallResult(msgspec.Struct, tag="call_result", array_like=True):
    call_id: int
    value: Any = None
    error_kind: Optional[str] = None
    error: Optional[str] = None


FrontendMessage = StreamOutputs | StreamError | CallResult


# ---- frontend -> core ---------------------------------------------------------------------


class FrontendHello(msgspec.Struct, tag="hello", array_like=True):
    """A frontend's first message; the core answers with `EngineReady` on that frontend's channel
    and from then on watches `pid`: a frontend that dies has its requests aborted."""

    client_index: int
    pid: int = 0


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    """`request_id` is the frontend's unique id; `user_request_id` the one the user gave."""

    request_id: str
    user_request_id: str
    client_index: int
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: list[int] = []
    cache_salt: Optional[str] = None
    hold_while_paused: bool = False


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    client_index: int
    request_ids: list[str]


class UtilityCall(msgspec.Struct, tag="utility", array_like=True):
    """`(call_id, method, args)` from frontend `client_index`; answered by a `UtilityResult`."""

    client_index: int
    call_id: int
    method: str
    args: bytes = b""
    tensors: list[TensorPiece] = []


class AbortFenceAck(msgspec.Struct, tag="fence_ack", array_like=True):
    """A frontend's answer to `AbortFence`: the requests it sent before this one it had accepted
    before it learned of the abort."""

    client_index: int
    fence_id: int


CoreInput = FrontendHello | AddRequest | AbortRequests | UtilityCall | AbortFenceAck


# ---- core -> frontend ---------------------------------------------------------------------


class EngineReady(msgspec.Struct, tag="ready", array_like=True):
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    weight_version: str = INITIAL_WEIGHT_VERSION


class CoreOutput(msgspec.Struct, array_like=True):
    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: Optional[Logprobs] = None
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    cached_tokens: int = 0
    weight_version: str = INITIAL_WEIGHT_VERSION
    error_kind: Optional[str] = None  # set when the request is refused with a typed error
    weight_versions: list[WeightSpan] = []
    prompt_logprobs: Optional[Logprobs] = None


class CoreOutputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[CoreOutput]


class UtilityResult(msgspec.Struct, tag="utility_result", array_like=True):
    call_id: int
    value: Any = None
    error_kind: Optional[str] = None
    error: Optional[str] = None


class AbortFence(msgspec.Struct, tag="abort_fence", array_like=True):
    """Sent to every frontend when everything is aborted (`abort_all`, `pause(mode="abort")`).
    A request that frontend sent before its `AbortFenceAck` was on its way when the abort ran, or
    was sent in the moment before the frontend read the fence: the core aborts it on arrival, so
    it never produces a token."""

    fence_id: int


CoreMessage = EngineReady | CoreOutputs | UtilityResult | AbortFence


# ---- utility call arguments and results ---------------------------------------------------


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


class PauseArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`retract` (with keep): frozen requests give up their KV at once and prefill again on
    resume (SGLang's "retract")."""

    mode: Literal["abort", "wait", "keep"] = "abort"
    retract: bool = False


class AbortArgs(msgspec.Struct, forbid_unknown_fields=True):
    request_ids: list[str]


class AbortResult(msgspec.Struct):
    aborted: list[str]
    not_found: list[str]


class EngineState(msgspec.Struct):
    """The answer of `get_state`; the same from every frontend."""

    state: str
    mode: Optional[str]
    num_running: int
    num_frozen: int
    num_held: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    weight_version: str = INITIAL_WEIGHT_VERSION
    num_preemptions: int = 0
    updating_weights: bool = False
    weights_error: Optional[str] = None  # a failed update left weights that must not serve
    sleeping: list[str] = []  # what sleep() took off the device: "weights", "kv_cache"
    num_workers: int = 1  # worker ranks (a trainer's weight group holds them and itself)
    weight_groups: list[str] = []  # the weight groups every rank joined
    prompt_tokens_total: int = 0  # since start: prompt tokens admitted, of them cached, generated
    cached_prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class StepKindProfile(msgspec.Struct):
    """The steps of one kind between `start_profile` and `stop_profile`: how many, the tokens they
    ran, and the seconds each part took, summed (the parts are named in `core.profile`)."""

    num_steps: int = 0
    num_tokens: int = 0
    seconds: dict[str, float] = {}


class StepProfile(msgspec.Struct):
    """The answer of `stop_profile`: `steps` by kind ("decode": every request ran one token;
    "prefill": some ran a prompt chunk), over `wall_s` seconds of profiling."""

    wall_s: float
    steps: dict[str, StepKindProfile] = {}

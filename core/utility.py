"""Utility calls: the table of methods a frontend may call on the core by name.

A method takes the engine loop, its decoded argument struct and the call, and returns a
msgpack-able value (a struct, a dict, a list, a scalar), or `DEFERRED` when the loop answers
later (a pause answers once its state is reached). Dispatch goes through `UTILITIES` only: an
unknown name is an error answered to the caller, never a `getattr` on a wire string.
"""

import logging
from typing import TYPE_CHECKING, Any, Callable

import msgspec

from core.pause import Waiter
from core.profile import StepProfiler
from core.weights import JoinedGroup
from protocol.codec import decode_args
from protocol.errors import UtilityError, error_kind
from protocol.messages import (
    AbortArgs,
    AbortResult,
    EngineState,
    NoArgs,
    PauseArgs,
    StepProfile,
    UtilityCall,
    UtilityResult,
)
from protocol.weights import (
    DestroyWeightGroup,
    GroupNameArgs,
    InitWeightGroup,
    InitWeightGroupArgs,
    ResumeArgs,
    SleepArgs,
    TransferArgs,
    UpdateWeightsArgs,
    VersionArgs,
    WakeUpArgs,
)

if TYPE_CHECKING:
    from core.loop import EngineLoop

logger = logging.getLogger(__name__)

DEFERRED = object()
Handler = Callable[["EngineLoop", Any, UtilityCall], Any]


def ping(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> str:
    return "pong"


def get_state(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> EngineState:
    return engine.state()


def is_paused(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> bool:
    return engine.pause.status == "paused"


def caller(call: UtilityCall) -> Waiter:
    return Waiter(call.client_index, call.call_id)


def pause(engine: "EngineLoop", args: PauseArgs, call: UtilityCall) -> Any:
    """Answered (with the state) once paused: at once for abort and keep, after the drain for wait."""
    state = engine.pause
    if state.status != "running" and args.mode not in (state.mode, "abort"):
        raise UtilityError(f"the engine is already {state.status} ({state.mode}): resume before pause({args.mode})")
    engine.weights.on_user_pause()
    if args.mode == "abort":
        engine.scheduler.abort_all()
        engine.fence_frontends()
        state.status, state.mode = "pausing", "abort"
    else:
        state.begin(args.mode)
    if args.mode == "keep" and args.retract:
        state.retract = True
    if args.mode != "wait":
        engine.interrupt_step()
    # Answered by the loop's next settle, after it sent the aborted requests' final outputs.
    state.waiters.append(caller(call))
    return DEFERRED


def resume(engine: "EngineLoop", args: ResumeArgs, call: UtilityCall) -> Any:
    """Answered once scheduling runs again: after every weight update queued or running."""
    if engine.weights.busy:
        engine.weights.resume_after_updates(caller(call), args.kv)
        return DEFERRED
    problem = engine.resume_problem()
    if problem is not None:
        raise UtilityError(problem)
    engine.resume(args.kv)
    return engine.state()


def abort(engine: "EngineLoop", args: AbortArgs, call: UtilityCall) -> AbortResult:
    return AbortResult(*engine.scheduler.abort_user_ids(args.request_ids))


def abort_all(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> AbortResult:
    user_ids = [r.user_request_id for r in engine.scheduler.requests.values()]
    result = AbortResult(*engine.scheduler.abort_user_ids(user_ids))
    engine.fence_frontends()
    engine.interrupt_step()  # the step in flight only serves aborted requests now
    return result


def update_weights(engine: "EngineLoop", args: UpdateWeightsArgs, call: UtilityCall) -> Any:
    engine.weights.submit(caller(call), args, from_client=False)
    return DEFERRED


def begin_weight_transfer(engine: "EngineLoop", args: UpdateWeightsArgs, call: UtilityCall) -> Any:
    """Answered `{"transfer_id"}` once every rank checked the tensors it declares."""
    engine.weights.submit(caller(call), args, from_client=True)
    return DEFERRED


def weight_chunk(engine: "EngineLoop", args: TransferArgs, call: UtilityCall) -> Any:
    engine.weights.add_chunk(caller(call), args.transfer_id, call.tensors)
    return DEFERRED


def end_weight_transfer(engine: "EngineLoop", args: TransferArgs, call: UtilityCall) -> Any:
    engine.weights.finish_transfer(caller(call), args.transfer_id, args.commit)
    return DEFERRED


def init_weight_group(engine: "EngineLoop", args: InitWeightGroupArgs, call: UtilityCall) -> Any:
    """Answered once every rank joined (the trainer joins meanwhile)."""
    if not 0 < args.master_port < 65536:
        raise UtilityError(f"master_port must be in 1..65535, got {args.master_port}")
    if not 0 < args.rank_offset <= args.world_size - engine.ops.num_ranks:
        raise UtilityError(
            f"rank_offset {args.rank_offset} and {engine.ops.num_ranks} worker rank(s) do not fit in "
            f"world_size {args.world_size} (the trainer is rank 0)"
        )
    if args.group_name in engine.weights.groups:
        raise UtilityError(f"weight group {args.group_name!r} exists: destroy_weight_group first")
    if args.bucket_bytes < 1:
        raise UtilityError(f"bucket_bytes must be >= 1, got {args.bucket_bytes}")

    def joined() -> None:
        engine.weights.groups[args.group_name] = JoinedGroup(args)

    engine.run_on_workers(lambda op_id: InitWeightGroup(op_id, args), caller(call), joined)
    return DEFERRED


def destroy_weight_group(engine: "EngineLoop", args: GroupNameArgs, call: UtilityCall) -> Any:
    """The group is forgotten here whatever the ranks answer: one that failed to leave it cannot use it."""
    engine.weights.groups.pop(args.group_name, None)
    engine.run_on_workers(lambda op_id: DestroyWeightGroup(op_id, args.group_name), caller(call))
    return DEFERRED


def get_weight_version(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> str:
    return engine.scheduler.weight_version


def set_weight_version(engine: "EngineLoop", args: VersionArgs, call: UtilityCall) -> str:
    """A new label for the weights in place: nothing is aborted, nothing recomputed."""
    if not args.version:
        raise UtilityError("version must be a non-empty string")
    engine.scheduler.weight_version = args.version
    return args.version


def reset_prefix_cache(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> int:
    """Never fails: blocks that running or frozen requests hold stay, the rest are dropped."""
    return engine.scheduler.reset_prefix_cache()


def sleep(engine: "EngineLoop", args: SleepArgs, call: UtilityCall) -> Any:
    engine.sleep.sleep(caller(call), args.level)
    return DEFERRED


def wake_up(engine: "EngineLoop", args: WakeUpArgs, call: UtilityCall) -> Any:
    engine.sleep.wake_up(caller(call), args.tags)
    return DEFERRED


def is_sleeping(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> bool:
    return bool(engine.sleep.asleep)


def start_profile(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> bool:
    """Time every step's parts from now on (a running profile starts again)."""
    engine.profiler = StepProfiler()
    return True


def stop_profile(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> StepProfile:
    """The steps' times since `start_profile`, by kind and part; steps run untimed again."""
    if engine.profiler is None:
        raise UtilityError("no profile is running: start_profile first")
    profile, engine.profiler = engine.profiler.summary(), None
    return profile


UTILITIES: dict[str, tuple[Handler, type]] = {
    "ping": (ping, NoArgs),
    "get_state": (get_state, NoArgs),
    "is_paused": (is_paused, NoArgs),
    "pause": (pause, PauseArgs),
    "resume": (resume, ResumeArgs),
    "abort": (abort, AbortArgs),
    "abort_all": (abort_all, NoArgs),
    "update_weights": (update_weights, UpdateWeightsArgs),
    "begin_weight_transfer": (begin_weight_transfer, UpdateWeightsArgs),
    "weight_chunk": (weight_chunk, TransferArgs),
    "end_weight_transfer": (end_weight_transfer, TransferArgs),
    "init_weight_group": (init_weight_group, InitWeightGroupArgs),
    "destroy_weight_group": (destroy_weight_group, GroupNameArgs),
    "get_weight_version": (get_weight_version, NoArgs),
    "set_weight_version": (set_weight_version, VersionArgs),
    "reset_prefix_cache": (reset_prefix_cache, NoArgs),
    "sleep": (sleep, SleepArgs),
    "wake_up": (wake_up, WakeUpArgs),
    "is_sleeping": (is_sleeping, NoArgs),
    "start_profile": (start_profile, NoArgs),
    "stop_profile": (stop_profile, NoArgs),
}


def run_utility(engine: "EngineLoop", call: UtilityCall) -> UtilityResult | None:
    """Run one call; every failure becomes an error result for the caller. None: answered later."""
    entry = UTILITIES.get(call.method)
    if entry is None:
        known = ", ".join(sorted(UTILITIES))
        return error_result(call.call_id, UtilityError(f"unknown utility method {call.method!r} (known: {known})"))
    handler, args_type = entry
    try:
        args = decode_args(call.args, args_type)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        return error_result(call.call_id, UtilityError(f"bad arguments for {call.method}: {error}"))
    try:
        value = handler(engine, args, call)
    except Exception as error:  # noqa: BLE001 - any failure in a method is the caller's error
        if not isinstance(error, UtilityError):
            logger.exception("utility %s failed", call.method)
        return error_result(call.call_id, error)
    return None if value is DEFERRED else UtilityResult(call.call_id, msgspec.to_builtins(value))


def error_result(call_id: int, error: BaseException) -> UtilityResult:
    message = str(error) if isinstance(error, UtilityError) else f"{type(error).__name__}: {error}"
    return UtilityResult(call_id, None, error_kind(error), message)

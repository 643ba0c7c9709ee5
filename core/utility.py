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
from protocol.codec import decode_args
from protocol.errors import UtilityError, error_kind
from protocol.messages import AbortArgs, AbortResult, EngineState, NoArgs, PauseArgs, UtilityCall, UtilityResult

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


def pause(engine: "EngineLoop", args: PauseArgs, call: UtilityCall) -> Any:
    """Answered (with the state) once paused: at once for abort and keep, after the drain for wait."""
    state = engine.pause
    if state.status != "running" and args.mode not in (state.mode, "abort"):
        raise UtilityError(f"the engine is already {state.status} ({state.mode}): resume before pause({args.mode})")
    if args.mode == "abort":
        engine.scheduler.abort_all()
        engine.fence_frontends()
        state.status, state.mode = "pausing", "abort"
    else:
        state.begin(args.mode)
    if args.mode != "wait":
        engine.interrupt_step()
    # Answered by the loop's next settle, after it sent the aborted requests' final outputs.
    state.waiters.append(Waiter(call.client_index, call.call_id))
    return DEFERRED


def resume(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> EngineState:
    for waiter in engine.pause.resume():
        engine.answer(waiter, error=UtilityError("pause(wait) was cancelled by resume"))
    return engine.state()


def abort(engine: "EngineLoop", args: AbortArgs, call: UtilityCall) -> AbortResult:
    return AbortResult(*engine.scheduler.abort_user_ids(args.request_ids))


def abort_all(engine: "EngineLoop", args: NoArgs, call: UtilityCall) -> AbortResult:
    user_ids = [r.user_request_id for r in engine.scheduler.requests.values()]
    result = AbortResult(*engine.scheduler.abort_user_ids(user_ids))
    engine.fence_frontends()
    engine.interrupt_step()  # the step in flight only serves aborted requests now
    return result


UTILITIES: dict[str, tuple[Handler, type]] = {
    "ping": (ping, NoArgs),
    "get_state": (get_state, NoArgs),
    "is_paused": (is_paused, NoArgs),
    "pause": (pause, PauseArgs),
    "resume": (resume, NoArgs),
    "abort": (abort, AbortArgs),
    "abort_all": (abort_all, NoArgs),
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

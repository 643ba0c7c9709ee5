"""Utility calls: the table of methods a frontend may call on the core by name.

A method takes the engine loop and its decoded argument struct and returns a msgpack-able
value (a struct, a dict, a list, a scalar). Dispatch goes through `UTILITIES` only: an unknown
name is an error answered to the caller, never a `getattr` on a wire string.
"""

import logging
from typing import TYPE_CHECKING, Any, Callable

import msgspec

from protocol.codec import decode_args
from protocol.errors import UtilityError, error_kind
from protocol.messages import EngineState, NoArgs, UtilityCall, UtilityResult

if TYPE_CHECKING:
    from core.loop import EngineLoop

logger = logging.getLogger(__name__)

Handler = Callable[["EngineLoop", Any], Any]


def ping(engine: "EngineLoop", args: NoArgs) -> str:
    return "pong"


def get_state(engine: "EngineLoop", args: NoArgs) -> EngineState:
    scheduler = engine.scheduler
    return EngineState(
        state="running",
        mode=None,
        num_running=len(scheduler.running),
        num_frozen=0,
        num_held=0,
        num_waiting=len(scheduler.waiting),
        num_free_blocks=scheduler.pool.num_free,
        num_total_blocks=scheduler.pool.num_blocks,
        weight_version=scheduler.weight_version,
        num_preemptions=scheduler.num_preemptions,
    )


UTILITIES: dict[str, tuple[Handler, type]] = {
    "ping": (ping, NoArgs),
    "get_state": (get_state, NoArgs),
}


def run_utility(engine: "EngineLoop", call: UtilityCall) -> UtilityResult:
    """Run one call; every failure becomes an error result for the caller."""
    entry = UTILITIES.get(call.method)
    if entry is None:
        known = ", ".join(sorted(UTILITIES))
        return _error(call, UtilityError(f"unknown utility method {call.method!r} (known: {known})"))
    handler, args_type = entry
    try:
        args = decode_args(call.args, args_type)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        return _error(call, UtilityError(f"bad arguments for {call.method}: {error}"))
    try:
        return UtilityResult(call.call_id, msgspec.to_builtins(handler(engine, args)))
    except Exception as error:  # noqa: BLE001 - any failure in a method is the caller's error
        logger.exception("utility %s failed", call.method)
        return _error(call, error)


def _error(call: UtilityCall, error: BaseException) -> UtilityResult:
    return UtilityResult(call.call_id, None, error_kind(error), f"{type(error).__name__}: {error}")

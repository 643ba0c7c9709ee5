"""Typed errors shared by the client and every process; the wire carries their kind by name."""


class ZeroserveError(Exception):
    """Base of every error zeroserve raises on purpose."""


class EngineDeadError(ZeroserveError):
    """The engine (core, a worker or the frontend) died: nothing in flight will finish."""


class EnginePausedError(ZeroserveError):
    """The engine is paused and rejects new requests (retryable after `resume`)."""


class InvalidRequestError(ZeroserveError, ValueError):
    """A request field is invalid; nothing was sent to the core."""


class UtilityError(ZeroserveError):
    """A utility call failed in the core (unknown method, bad arguments, or the method raised)."""


ERRORS_BY_KIND: dict[str, type[ZeroserveError]] = {
    "dead": EngineDeadError,
    "paused": EnginePausedError,
    "invalid": InvalidRequestError,
    "utility": UtilityError,
}


def error_kind(error: BaseException) -> str:
    """The wire name of an error; anything not typed above travels as a utility error."""
    for kind, cls in ERRORS_BY_KIND.items():
        if isinstance(error, cls):
            return kind
    return "utility"


def error_from_kind(kind: str, message: str) -> ZeroserveError:
    return ERRORS_BY_KIND.get(kind, UtilityError)(message)

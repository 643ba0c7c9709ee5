"""Sleep in the core: what is off the device, and what that means for requests and cached blocks.

`sleep(level)` needs a paused engine. The KV cache goes (level 1): requests frozen by
pause(keep) go back to the queue to be prefilled again after wake, and no cached block is kept.
Level 2 also takes the weights off the device. While anything sleeps, resume is refused, so
held requests stay held and nothing touches the device.
"""

from typing import TYPE_CHECKING

from core.pause import Waiter
from core.workers import first_error
from protocol.errors import UtilityError
from protocol.weights import Sleep, SleepTag, WakeUp, WorkerReply

if TYPE_CHECKING:
    from core.loop import EngineLoop

ALL_TAGS: tuple[SleepTag, ...] = ("weights", "kv_cache")


class SleepState:
    def __init__(self, engine: "EngineLoop") -> None:
        self.engine = engine
        self.asleep: set[SleepTag] = set()

    def sleep(self, caller: Waiter, level: int) -> None:
        engine = self.engine
        if engine.pause.status != "paused":
            raise UtilityError("sleep needs a paused engine: pause(mode=...) first")
        if engine.weights.busy:
            raise UtilityError("a weight update is running: sleep after it returns")
        tags: set[SleepTag] = {"kv_cache", "weights"} if level == 2 else {"kv_cache"}
        self.asleep |= tags  # from now on resume is refused, before the workers answer
        engine.scheduler.recompute_running()
        engine.scheduler.reset_prefix_cache()
        engine.ops.run(lambda op_id: Sleep(op_id, level), lambda replies: self._slept(caller, replies))

    def wake_up(self, caller: Waiter, tags: list[SleepTag] | None) -> None:
        waking = list(tags or ALL_TAGS)
        self.engine.ops.run(lambda op_id: WakeUp(op_id, waking), lambda replies: self._woken(caller, waking, replies))

    def _slept(self, caller: Waiter, replies: list[WorkerReply]) -> None:
        """A failed sleep may have freed part of the memory: it counts as asleep until wake_up."""
        error = first_error(replies)
        if error is not None:
            self.engine.answer(caller, None, UtilityError(f"sleep failed: {error}; wake_up() restores what it freed"))
        else:
            self.engine.answer(caller, self.engine.state())

    def _woken(self, caller: Waiter, tags: list[SleepTag], replies: list[WorkerReply]) -> None:
        error = first_error(replies)
        if error is not None:
            self.engine.answer(caller, None, UtilityError(f"wake_up failed: {error}"))
            return
        self.asleep -= set(tags)
        self.engine.answer(caller, self.engine.state())

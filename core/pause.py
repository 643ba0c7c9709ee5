"""The pause state machine: `running → pausing(mode) → paused(mode) → running`.

The pause never stops the machinery it waits on: the loop keeps turning while pausing, so
aborts and drains complete. What each state lets the scheduler do:

    state             new/held requests   running requests
    running           scheduled           scheduled
    pausing(wait)     held                run to completion
    paused(abort)     held                (none: all aborted)
    paused(wait)      held                (none: all finished)
    paused(keep)      held                frozen, KV kept
"""

from dataclasses import dataclass, field
from typing import Literal, Optional

PauseMode = Literal["abort", "wait", "keep"]


@dataclass(frozen=True)
class Waiter:
    """A `pause(wait)` call to answer once the drain completes."""

    client_index: int
    call_id: int


@dataclass
class PauseState:
    status: Literal["running", "pausing", "paused"] = "running"
    mode: Optional[PauseMode] = None
    waiters: list[Waiter] = field(default_factory=list)
    retract: bool = False  # once paused(keep): the frozen requests give up their KV

    @property
    def admits_new(self) -> bool:
        return self.status == "running"

    @property
    def runs_running(self) -> bool:
        return self.status == "running" or self.mode != "keep"

    def begin(self, mode: PauseMode) -> None:
        """Enter `pausing(mode)`; a pause while another is pending or in force joins it."""
        if self.status == "running":
            self.status, self.mode = "pausing", mode

    def settle(self, num_running: int) -> list[Waiter]:
        """Move `pausing` to `paused` once its condition holds; once paused, every waiter
        (a repeated pause included) is answered."""
        if self.status == "pausing" and not (self.mode == "wait" and num_running > 0):
            self.status = "paused"
        if self.status != "paused":
            return []
        waiters, self.waiters = self.waiters, []
        return waiters

    def resume(self) -> list[Waiter]:
        """Back to running; pending `pause(wait)` calls are cancelled (returned to be answered)."""
        waiters, self.waiters = self.waiters, []
        self.status, self.mode, self.retract = "running", None, False
        return waiters

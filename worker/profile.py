"""Where one step's time goes on the worker, when the core's plan asks (`StepPlan.profile`).

    timer = StepTimer(plan.profile, device)
    with timer.part("forward.attention"):
        ...
    result.seconds = timer.seconds  # {"forward.attention": 0.012, ...}, summed per name

A part may hold others (names with a dot are parts of the name before it); the core's profile
reports what a part spent outside its named children. A disabled timer measures nothing and
costs one call per part. On CUDA each part synchronizes the device first and last, so a part's
time is its kernels' time (and the step runs slower while profiled).
"""

import contextlib
import time
from types import TracebackType

import torch


class StepTimer:
    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self._synchronize = enabled and device.type == "cuda"

    def part(self, name: str) -> "TimedPart | contextlib.nullcontext[None]":
        return TimedPart(self, name) if self.enabled else NO_PART

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def now(self) -> float:
        if self._synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()


class TimedPart:
    def __init__(self, timer: StepTimer, name: str) -> None:
        self.timer = timer
        self.name = name
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = self.timer.now()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.timer.add(self.name, self.timer.now() - self.started)


NO_PART = contextlib.nullcontext()  # reusable
DISABLED = StepTimer(False, torch.device("cpu"))

"""Where the steps' time goes between `start_profile` and `stop_profile`, for benchmarks.

The core times its own parts of each step; the worker (rank 0) times its parts when the plan asks
(`worker.profile`) and sends them with the result. Parts, summed over the steps of each kind:

    schedule          scheduler.schedule(): the plan
    send              submit to result, less the worker's step: encode, ZMQ both ways, decode
    worker.prepare    the batch's tensors and attention metadata
    worker.forward    the model, and of it: forward.projections, forward.attention,
                      forward.lm_head, forward.other (embedding, norms, RoPE, activation)
    worker.sample     sampling and logprobs
    worker.other      the rest of the worker's step (the result's lists)
    outputs           scheduler.update() and the outputs sent to the frontends
    step              all of it: schedule, submit to result, outputs
"""

import time

from protocol.messages import StepKindProfile, StepProfile
from protocol.step import StepPlan


def step_kind(plan: StepPlan) -> str:
    return "decode" if all(s.num_scheduled_tokens == 1 for s in plan.scheduled) else "prefill"


class StepProfiler:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.kinds: dict[str, StepKindProfile] = {}

    def add(
        self, plan: StepPlan, worker_seconds: dict[str, float], schedule: float, wait: float, outputs: float
    ) -> None:
        """One step: the core's `schedule`, `wait` (submit to result) and `outputs` seconds, and
        the parts the worker timed."""
        kind = self.kinds.setdefault(step_kind(plan), StepKindProfile())
        kind.num_steps += 1
        kind.num_tokens += sum(s.num_scheduled_tokens for s in plan.scheduled)
        worker = worker_seconds.get("worker", 0.0)
        parts = {"schedule": schedule, "send": wait - worker, "outputs": outputs, **_worker_parts(worker_seconds),
                 "step": schedule + wait + outputs}  # fmt: skip
        for name, seconds in parts.items():
            kind.seconds[name] = kind.seconds.get(name, 0.0) + seconds

    def summary(self) -> StepProfile:
        return StepProfile(wall_s=time.perf_counter() - self.started, steps=self.kinds)


def _worker_parts(seconds: dict[str, float]) -> dict[str, float]:
    """The worker's parts, each top-level one less its named children, as `worker.<part>`."""
    if "worker" not in seconds:
        return {}
    parts = {f"worker.{name}": seconds.get(name, 0.0) for name in ("prepare", "forward", "sample")}
    parts["worker.other"] = seconds["worker"] - sum(parts.values())
    forward = {name: value for name, value in seconds.items() if name.startswith("forward.")}
    parts.update(forward)
    parts["forward.other"] = parts["worker.forward"] - sum(forward.values())
    return parts

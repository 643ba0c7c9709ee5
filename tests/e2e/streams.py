"""A request consumed in the background, for tests that act on streams while they run."""

import asyncio
import contextlib
import time

from frontend.client import AsyncClient, EngineDeadError, EnginePausedError


class Stream:
    """A request consumed in the background: its outputs, when each arrived, and how it ended.

    `leave_after` outputs, the consumer leaves the loop early (the request is cancelled); a
    cancelled task stops as well. Either way the stream is `left` and need not end."""

    def __init__(self, client: AsyncClient, leave_after: int | None = None, **request) -> None:
        self.request = request
        self.leave_after = leave_after
        self.outputs: list = []
        self.times: list[float] = []
        self.error: Exception | None = None
        self.left = False
        self.task = asyncio.create_task(self._consume(client.generate(**request)))

    async def _consume(self, stream) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    self.outputs.append(output)
                    self.times.append(time.monotonic())
                    if len(self.outputs) == self.leave_after and not output.finished:
                        self.left = True
                        break
        except (EnginePausedError, EngineDeadError) as error:
            self.error = error

    def cancel(self) -> None:
        self.left = True
        self.task.cancel()

    @property
    def request_id(self) -> str:
        return self.request["request_id"]

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def final(self):
        return self.outputs[-1]

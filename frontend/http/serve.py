"""Start and stop a frontend's HTTP server: its context, the dialects' routers, uvicorn."""

import asyncio
import os
import socket
from dataclasses import dataclass

from frontend.client import AsyncClient
from frontend.http import openai, sglang, vllm
from frontend.http.app import HttpContext, HttpServer, build_app
from frontend.http.metrics import LatencyMetrics, make_router as metrics_router
from frontend.tokenizer import Tokenizer
from protocol.config import API_KEY_ENV, EngineConfig

CLIENT_TIMEOUT_S = 600.0  # the routes' calls; a weight group waits for its trainer


@dataclass
class RunningHttp:
    server: HttpServer
    task: "asyncio.Task[None]"
    client: AsyncClient
    latencies: LatencyMetrics

    async def stop(self) -> None:
        await self.server.stop(self.task)
        await self.client.close()


def start_http(config: EngineConfig, index: int, tokenizer: Tokenizer, max_model_len: int, fd: int) -> RunningHttp:
    client = AsyncClient(config.local_client_address(index), timeout=CLIENT_TIMEOUT_S)
    ctx = HttpContext(
        client=client, tokenizer=tokenizer, model_name=config.served_model_name, model_path=config.model,
        max_model_len=max_model_len, api_key=os.environ.get(API_KEY_ENV) or None,
        reject_while_paused=config.paused_requests == "reject",
    )  # fmt: skip
    routers = [openai.make_router(ctx), vllm.make_router(ctx), sglang.make_router(ctx), metrics_router(ctx)]
    server = HttpServer(build_app(ctx, routers), socket.socket(fileno=fd))
    return RunningHttp(server, asyncio.ensure_future(server.run()), client, LatencyMetrics())

"""The frontend process's life: tokenizer, core link, client server (and the HTTP server on the
listening socket launch made, with `--http-port`), until SIGTERM."""

import asyncio
import logging
import signal
import sys
from typing import Any, Coroutine

import zmq
import zmq.asyncio

from protocol.codec import Encoder
from protocol.config import EngineConfig, ProcessReady
from protocol.process import (
    configure_logging,
    make_socket,
    report_to_launch,
    set_process_title,
    watch_parent_and_peers,
)

from frontend.core_client import CoreClient, connect_core
from frontend.http.serve import start_http
from frontend.server import Server
from frontend.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


def run_frontend(config: EngineConfig, index: int, watch_pids: list[int], http_fd: int | None = None) -> None:
    """Serve clients on `config.client_address(index)` (and HTTP on the inherited socket `http_fd`)
    until SIGTERM; exit 1 on a start-up failure."""
    role = f"frontend-{index}"
    set_process_title(f"zeroserve-{role}")
    configure_logging(role)
    watch_parent_and_peers()  # losing the parent (launch) ends the process at once
    sys.exit(_run_loop(_serve(config, index, watch_pids, http_fd)))


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop when it is installed."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def _serve(config: EngineConfig, index: int, watch_pids: list[int], http_fd: int | None) -> int:
    role = f"frontend-{index}"
    context = zmq.asyncio.Context()
    core: CoreClient | None = None
    try:
        tokenizer = load_tokenizer(config.model)
        core, limits = await connect_core(context, config, index, READY_TIMEOUT_S)
        client_sock = make_socket(context, zmq.ROUTER, config.client_address(index), bind=True)
        if http_fd is not None:
            client_sock.bind(config.local_client_address(index))  # the HTTP server's own client
    except Exception as error:  # start-up: one clear line to the log and to launch
        reason = "no EngineReady from the core" if isinstance(error, TimeoutError) else str(error)
        logger.error("start-up failed: %s", reason)
        _report(context, config, ProcessReady(role=role, error=reason))
        context.destroy(linger=0)
        return 1
    loop = asyncio.get_running_loop()
    watch_parent_and_peers(watch_pids, lambda why: loop.call_soon_threadsafe(core.mark_dead, why))
    server = Server(client_sock, core, tokenizer, limits)
    http = None
    if http_fd is not None:
        http = start_http(config, index, tokenizer, limits.max_model_len, http_fd)
        server.timings = http.latencies
    _report(context, config, ProcessReady(role=role, detail=config.client_address(index)))
    logger.info("serving clients at %s (max_model_len %d)", config.client_address(index), limits.max_model_len)
    try:
        await _until_signal(core.run(server), server.run())
    finally:
        if http is not None:
            await http.stop()
        server.fail_all("the frontend is shutting down")
        core.close()
        client_sock.close(linger=0)
        context.destroy(linger=0)
    return 0


async def _until_signal(*loops: Coroutine[Any, Any, None]) -> None:
    """Run the loops until SIGTERM or SIGINT (or one of them fails)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.ensure_future(coro) for coro in loops]
    tasks.append(asyncio.ensure_future(stop.wait()))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        logger.info("stopping on a signal")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _report(context: zmq.asyncio.Context, config: EngineConfig, ready: ProcessReady) -> None:
    report_to_launch(zmq.Context.shadow(context), config.launch_address, Encoder().encode(ready))

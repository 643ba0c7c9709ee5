"""The core process's life: sockets, workers' readiness, the KV pool, then the loop."""

import logging
import os
import queue
import signal
from typing import Sequence

import zmq

from core.block_pool import BlockPool
from core.io import InputThread, OutputThread
from core.loop import EngineLoop
from core.scheduler import Scheduler, SchedulerLimits
from core.workers import WorkerDiedError, WorkerGroup
from protocol.codec import Encoder
from protocol.config import EngineConfig, ProcessReady
from protocol.messages import EngineReady
from protocol.process import configure_logging, report_to_launch, set_process_title, watch_parent_and_peers

logger = logging.getLogger(__name__)

WORKER_READY_TIMEOUT_S = 1800.0


def run_core(config: EngineConfig, worker_pids: Sequence[int]) -> None:
    set_process_title("zeroserve-core")
    configure_logging("core")
    watch_parent_and_peers()
    signal.signal(signal.SIGTERM, lambda *_: _exit(0, "SIGTERM"))
    context = zmq.Context()
    inbox: "queue.Queue" = queue.Queue()
    workers = WorkerGroup(context, config, worker_pids, inbox)
    input_thread = InputThread(context, config.core_input_address, inbox)
    output_thread = OutputThread(context, config.core_output_address)
    for thread in (workers, input_thread, output_thread):
        thread.start()
    try:
        ready = _wait_for_workers(config, workers, context)
        scheduler = Scheduler(
            BlockPool(ready.num_kv_blocks, config.block_size),
            SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, ready.max_model_len),
        )
        EngineLoop(scheduler, workers, inbox, output_thread, ready, config.paused_requests == "reject").run()
    except WorkerDiedError as error:
        _exit(1, str(error))
    finally:
        workers.shutdown()
        output_thread.stop()
        input_thread.stopped.set()


def _wait_for_workers(config: EngineConfig, workers: WorkerGroup, context: zmq.Context) -> EngineReady:
    encoder = Encoder()
    try:
        readies = workers.wait_ready(WORKER_READY_TIMEOUT_S)
    except (RuntimeError, WorkerDiedError) as error:
        report_to_launch(context, config.launch_address, encoder.encode(ProcessReady("core", error=str(error))))
        raise SystemExit(2)
    ready = EngineReady(readies[0].max_model_len, readies[0].num_kv_blocks, config.block_size)
    detail = (
        f"KV pool: {ready.num_kv_blocks} blocks x {ready.block_size} tokens = "
        f"{ready.num_kv_blocks * ready.block_size} tokens; max_model_len {ready.max_model_len}"
    )
    logger.info("%s", detail)
    report_to_launch(context, config.launch_address, encoder.encode(ProcessReady("core", detail)))
    return ready


def _exit(status: int, reason: str) -> None:
    """Leave at once: streams fail in the frontends, which watch this process."""
    logger.error("core exiting: %s", reason) if status else logger.info("core exiting: %s", reason)
    logging.shutdown()
    os._exit(status)

"""The worker process: load the model, allocate the KV pool, say ready, then run every step and
command (weights, weight groups, sleep) the core sends."""

import logging
import sys

import msgspec
import torch
import transformers
import zmq

from protocol.codec import Decoder, Encoder
from protocol.config import EngineConfig
from protocol.process import configure_logging, make_socket, set_process_title, watch_parent_and_peers
from protocol.step import CoreToWorker, Shutdown, StepPlan, StepResult, WorkerReady
from worker import parallel
from worker.commands import WorkerCommands, one_line
from worker.host_memory import keep_freed_memory
from worker.interrupts import InterruptWatcher
from worker.kv_cache import allocate_kv_cache, kv_shape, max_model_len_for, num_blocks_for, torch_dtype
from worker.model_loader import check_model_config, load_model
from worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

POLL_MS = 1000


def run_worker(config: EngineConfig, rank: int) -> None:
    role = f"zeroserve-worker-{rank}"
    set_process_title(role)
    configure_logging(role)
    watch_parent_and_peers()
    context = zmq.Context()
    sock = make_socket(context, zmq.DEALER, config.worker_address, bind=False, identity=f"rank{rank}".encode())
    encoder = Encoder()
    interrupts = InterruptWatcher(context, config.interrupt_address)
    interrupts.start()
    try:
        try:
            runner, commands, ready = _start(config, rank, interrupts)
        except Exception as error:  # any start-up failure is reported as one line, then exit 1
            logger.exception("worker %d failed to start", rank)
            sock.send_multipart(encoder.encode(WorkerReady(rank, 0, 0, error=one_line(error))))
            sys.exit(1)
        sock.send_multipart(encoder.encode(ready))
        _serve(sock, runner, commands, encoder, rank)
    finally:
        interrupts.stop()
        sock.close()
        context.term()
        parallel.shutdown_tensor_parallel()


def _start(
    config: EngineConfig, rank: int, interrupts: InterruptWatcher
) -> tuple[ModelRunner, WorkerCommands, WorkerReady]:
    tp_size = config.workers
    model_config = transformers.AutoConfig.from_pretrained(config.model)
    check_model_config(model_config, tp_size)
    device = torch.device(config.device)
    if tp_size > 1:
        device = parallel.init_tensor_parallel(config.run_dir, rank, tp_size, config.device)
    dtype = torch_dtype(config.dtype)
    model = load_model(config.model, device, dtype, tp_size)
    num_blocks = parallel.min_across_ranks(num_blocks_for(config, model_config, tp_size), device)
    shape = kv_shape(model_config, tp_size)
    kv_cache = allocate_kv_cache(num_blocks, config.block_size, shape, dtype, device)
    if device.type == "cpu":  # the weights and the cache keep their own mappings; steps reuse the heap
        keep_freed_memory()
    max_len = max_model_len_for(config.max_model_len, model_config, num_blocks, config.block_size)
    # transformers shards the model for tensor parallelism; the native forward runs one rank.
    runner = ModelRunner(model, kv_cache, device, is_driver=rank == 0, native=tp_size == 1, interrupts=interrupts)
    packed = runner.native.packed if runner.native is not None else None
    if packed is not None:
        packed.warm_up(config.max_num_seqs)
    commands = WorkerCommands(model, kv_cache, rank, device, packed)
    return runner, commands, WorkerReady(rank=rank, num_kv_blocks=num_blocks, max_model_len=max_len)


def _serve(sock: zmq.Socket, runner: ModelRunner, commands: WorkerCommands, encoder: Encoder, rank: int) -> None:
    """Run plans and commands until `Shutdown`. A bad frame is logged and skipped; a failed step
    answers an error (rank 0 answers a step, every rank a command)."""
    decoder = Decoder(CoreToWorker)
    while True:
        if not sock.poll(POLL_MS):
            continue
        frames = sock.recv_multipart(copy=False)
        try:
            message = decoder.decode([frame.buffer for frame in frames])
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            logger.error("malformed frame from the core, skipped: %s", error)
            continue
        match message:
            case Shutdown():
                logger.info("shutdown requested")
                return
            case StepPlan():
                result = _execute(runner, message)
                if rank == 0:
                    sock.send_multipart(encoder.encode(result))
            case _:
                sock.send_multipart(encoder.encode(commands.handle(message)))


def _execute(runner: ModelRunner, plan: StepPlan) -> StepResult:
    try:
        return runner.execute(plan)
    except Exception as error:  # the step fails, the worker keeps serving
        logger.exception("step %d failed", plan.step_id)
        return StepResult(step_id=plan.step_id, error=one_line(error))



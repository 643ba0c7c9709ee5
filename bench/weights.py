"""How long a weight update takes from each source, against the raw cost of moving the same bytes.

    python bench/weights.py [--repeats 5]

The engine serves the model `python -m worker.model_loader` resolves (the embedded SmolLM2), fp32
on CPU, one worker. Each update writes every tensor of its checkpoint (272 for SmolLM2), timed
by the client from the call to its answer, the median of `--repeats`:

* `update_weights(path=...)`, against reading the checkpoint file into memory;
* `update_weights(tensors=...)`, sent through frontend and core in chunks, against the same bytes
  through three hops of bare zmq sockets, and against a gloo broadcast;
* `update_weights(group=...)` with a trainer in this process, plain (one broadcast per tensor)
  and packed (64 MiB buckets), against a bare gloo broadcast of the same tensors, or buckets,
  from this process to one other.

Then 8 greedy streams generate while pause(keep) -> packed group update -> resume runs;
the gap is the longest time a stream waited for a token across it, against the update's time.
It prints one table.
"""

import sys
from pathlib import Path

# This folder comes first on sys.path when a script here runs, and its http.py would shadow the
# standard library's `http` for every module: the repo root (for `bench.*`) takes its place.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import logging
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Awaitable, Callable

import numpy as np
import torch
import torch.distributed as dist
import zmq
from safetensors.torch import load_file

from bench.common import number, print_table, ratio, resolve_model_folder, running_engine, setup_logging  # noqa: E402
from frontend.client import AsyncClient  # noqa: E402
from frontend.weight_sync import TrainerWeightGroup, sync_weights  # noqa: E402
from launch.local import free_port_range  # noqa: E402
from protocol.weights import DEFAULT_BUCKET_BYTES  # noqa: E402

logger = logging.getLogger("bench")

ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "1GiB"]
COLUMNS = ["operation", "median s", "runs s", "GB/s", "vs raw"]
WIDTHS = [34, 9, 36, 6]
STREAM_PROMPT = list(range(1000, 1032))
RELAY_MESSAGE_BYTES = 16 * 2**20


def timed_runs(repeats: int, run: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


async def timed_async(repeats: int, run: Callable[[], Awaitable[object]]) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await run()
        times.append(time.perf_counter() - start)
    return times


def file_reader(path: Path) -> Callable[[], None]:
    """Reads the file into one buffer, the same each time (as the engine reuses its memory)."""
    buffer = bytearray(path.stat().st_size)

    def read() -> None:
        with open(path, "rb", buffering=0) as file:
            file.readinto(buffer)

    return read


def raw_broadcasts(state_dict: dict[str, torch.Tensor], repeats: int) -> dict[str, list[float]]:
    """A bare gloo broadcast of every tensor (plain) and of the same bytes in buckets (packed),
    from this process to a receiver process."""
    port = free_port_range(1)
    receiver = subprocess.Popen([sys.executable, __file__, "--receive-broadcasts", str(port), str(repeats)])
    try:
        group = TrainerWeightGroup.create("127.0.0.1", port, 2, "raw")
        times = {
            "plain": timed_runs(repeats, lambda: group.send(state_dict)),
            "packed": timed_runs(repeats, lambda: group.send(state_dict, packed=True)),
        }
        group.destroy()
        if receiver.wait(timeout=120) != 0:
            raise RuntimeError("the broadcast receiver failed")
        return times
    finally:
        receiver.kill()
        receiver.wait()


def raw_relay(nbytes: int, repeats: int) -> list[float]:
    """The bytes sent through three hops of plain zmq sockets, as `update_weights(tensors=...)` sends
    them (client -tcp-> frontend -ipc-> core -ipc-> worker, 16 MiB messages, never copied in Python):
    from the first send until the last process received the last byte."""
    folder = tempfile.mkdtemp(prefix="zeroserve-relay-")
    port = free_port_range(1)
    hops = [f"tcp://127.0.0.1:{port}", f"ipc://{folder}/core", f"ipc://{folder}/worker", f"ipc://{folder}/done"]
    children = [subprocess.Popen([sys.executable, __file__, "--relay", hops[i], hops[i + 1], str(nbytes), str(repeats)])
                for i in range(3)]  # fmt: skip
    context = zmq.Context()
    send, done = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    send.connect(hops[0])
    done.bind(hops[3])
    data = np.ones(nbytes, dtype=np.uint8)
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for offset in range(0, nbytes, RELAY_MESSAGE_BYTES):
                send.send(memoryview(data[offset : offset + RELAY_MESSAGE_BYTES]), copy=False)
            done.recv()
            times.append(time.perf_counter() - start)
        return times
    finally:
        for child in children:
            child.kill()
            child.wait()
        context.destroy(linger=0)
        shutil.rmtree(folder, ignore_errors=True)


def relay(source: str, target: str, nbytes: int, repeats: int) -> None:
    """One hop of `raw_relay` (run as a child process): pass every message on; the last hop
    says when a round's bytes all came."""
    context = zmq.Context()
    receive, send = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    receive.bind(source)
    send.connect(target)
    last_hop = target.endswith("/done")
    for _ in range(repeats):
        received = 0
        while received < nbytes:
            frame = receive.recv(copy=False)
            received += len(frame.buffer)
            if not last_hop:
                send.send(frame, copy=False)
        if last_hop:
            send.send(b"done")
    time.sleep(1.0)  # the last messages leave before the sockets close


def receive_broadcasts(port: int, repeats: int, checkpoint: Path) -> None:
    """The receiving side of `raw_broadcasts` (run as a child process)."""
    from worker.weight_group import join_group

    state_dict = load_file(checkpoint)
    group = join_group("127.0.0.1", port, 1, 2, "raw", "gloo", 120.0)
    buffers = [torch.empty_like(t) for t in state_dict.values()]
    bucket_sizes = _bucket_sizes(state_dict)
    for _ in range(repeats):
        for buffer in buffers:
            dist.broadcast(buffer, src=0, group=group)
    bucket = torch.empty(max(bucket_sizes), dtype=torch.uint8)  # reused, as the engine's ranks do
    for _ in range(repeats):
        for size in bucket_sizes:
            dist.broadcast(bucket[:size], src=0, group=group)
    dist.destroy_process_group(group)


def _bucket_sizes(state_dict: dict[str, torch.Tensor]) -> list[int]:
    from frontend.weight_sync import state_dict_specs
    from protocol.weights import bucket_layout, bucket_sizes, tensor_specs

    return bucket_sizes(bucket_layout(tensor_specs(*state_dict_specs(state_dict)), DEFAULT_BUCKET_BYTES))


async def engine_updates(address: str, folder: Path, state_dict: dict, repeats: int) -> dict[str, list[float]]:
    async with AsyncClient(address) as client:
        await client.pause("abort")
        times = {
            "path": await timed_async(repeats, lambda: client.update_weights(path=str(folder))),
            "tensors": await timed_async(repeats, lambda: client.update_weights(tensors=state_dict)),
        }
        port = free_port_range(1)
        joined = asyncio.ensure_future(client.init_weight_group("127.0.0.1", port, 1, 2, "bench"))
        group = await asyncio.to_thread(TrainerWeightGroup.create, "127.0.0.1", port, 2, "bench")
        await joined
        for packed in (False, True):
            times["group packed" if packed else "group plain"] = await timed_async(
                repeats, lambda: sync_weights(client, group, state_dict, packed=packed)
            )
        await client.resume()
        times["gap"], times["gap update"] = await streaming_gap(client, group, state_dict, repeats)
        await client.destroy_weight_group("bench")
        group.destroy()
        return times


async def streaming_gap(
    client: AsyncClient, group: TrainerWeightGroup, state_dict: dict, repeats: int, num_streams: int = 8
) -> tuple[list[float], list[float]]:
    """The longest wait for a token a stream saw across pause(keep) -> update -> resume, per repeat."""
    gaps, updates = [], []
    for _ in range(repeats):
        arrivals: list[list[float]] = [[] for _ in range(num_streams)]
        tasks = [asyncio.ensure_future(_stream(client, arrivals[i])) for i in range(num_streams)]
        while min(len(a) for a in arrivals) < 4:
            await asyncio.sleep(0.01)
        start = time.perf_counter()
        await client.pause("keep")
        await sync_weights(client, group, state_dict, packed=True)
        await client.resume()
        updates.append(time.perf_counter() - start)
        await asyncio.gather(*tasks)
        gaps.append(max(max(b - a for a, b in zip(times, times[1:])) for times in arrivals))
    return gaps, updates


async def _stream(client: AsyncClient, arrivals: list[float]) -> None:
    async for out in client.generate(token_ids=STREAM_PROMPT, max_tokens=48, temperature=0.0, ignore_eos=True):
        arrivals.extend([time.perf_counter()] * len(out.token_ids))


def row(name: str, times: list[float], nbytes: int, reference: list[float] | None) -> list[str]:
    median = statistics.median(times)
    runs = " ".join(f"{t:.3f}" for t in times)
    reference_s = statistics.median(reference) if reference else None
    return [name, number(median, 3), runs, number(nbytes / median / 1e9, 2), ratio(median, reference_s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--receive-broadcasts", nargs=2, type=int, metavar=("PORT", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--relay", nargs=4, metavar=("SOURCE", "TARGET", "BYTES", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        relay(args.relay[0], args.relay[1], int(args.relay[2]), int(args.relay[3]))
        return
    folder = Path(resolve_model_folder(None))
    checkpoint = folder / "model.safetensors"
    if args.receive_broadcasts:
        receive_broadcasts(*args.receive_broadcasts, checkpoint)
        return
    setup_logging()
    state_dict = load_file(checkpoint)
    nbytes = sum(t.nbytes for t in state_dict.values())
    logger.info("%d tensors, %.0f MB", len(state_dict), nbytes / 1e6)
    read = timed_runs(args.repeats, file_reader(checkpoint))
    raw = raw_broadcasts(state_dict, args.repeats)
    hops = raw_relay(nbytes, args.repeats)
    with running_engine(str(folder), ENGINE_ARGS) as addresses:
        ours = asyncio.run(engine_updates(addresses[0], folder, state_dict, args.repeats))
    rows = [
        row("raw: file read", read, nbytes, None),
        row("raw: gloo broadcast, plain", raw["plain"], nbytes, None),
        row("raw: gloo broadcast, packed", raw["packed"], nbytes, None),
        row("raw: zmq, 3 hops", hops, nbytes, None),
        row("update_weights(path)", ours["path"], nbytes, read),
        row("update_weights(tensors) vs 3 hops", ours["tensors"], nbytes, hops),
        row("update_weights(tensors) vs gloo", ours["tensors"], nbytes, raw["plain"]),
        row("update_weights(group), plain", ours["group plain"], nbytes, raw["plain"]),
        row("update_weights(group), packed", ours["group packed"], nbytes, raw["packed"]),
        row("pause(keep)+update+resume", ours["gap update"], nbytes, ours["group packed"]),
        row("stream gap across it", ours["gap"], nbytes, ours["group packed"]),
    ]
    print_table(COLUMNS, WIDTHS, rows)


if __name__ == "__main__":
    main()
